"""Composite normalisation kernels for second-order evaluations.

torch.func's second derivatives through the fused normalisation kernels are silently wrong once
the layer's affine weight is differentiated together with its input: on torch 2.13 a
forward-over-reverse or reverse-over-reverse Hessian through ``native_layer_norm``,
``native_batch_norm`` on batch statistics and ``instance_norm`` is off by tens of percent, while
``torch.autograd.grad`` double backward is right (same family as pytorch#196700 for layer_norm
and pytorch#196699 for batch_norm, both for nested forward mode); ``native_group_norm``'s
forward-over-reverse raises a view error; and the double backward of ``_weight_norm_interface``
(weight normalisation) is wrong even through ``torch.autograd.functional.hessian``.

While hessfunc evaluates ``f`` for a second-order quantity, a ``TorchFunctionMode`` replaces
these kernels by the same formulas written in elementary ops (mean, variance, rsqrt, affine),
whose derivatives of every order are right, with the kernels' own outputs (the saved mean and
inverse standard deviation of the ``native_*`` variants included).

How the kernels are recognised: a ``TorchFunctionMode`` sees the Python object that was called,
and a fused kernel can be reached through many of them: ``F.layer_norm`` (what module forward
methods call), ``torch.layer_norm``, ``torch.native_layer_norm``, ``torch.ops.aten.layer_norm``
(the packet) and ``torch.ops.aten.layer_norm.default`` (one overload). The routing table is
therefore built from the aten operator names of the kernels: for each name it collects every
callable that reaches that operator (``torch.<name>``, ``torch._C._VariableFunctions.<name>``,
every overload of ``torch.ops.aten.<name>``) and the ``torch.nn.functional`` wrapper of the same
name, whose argument order differs. ``tests/test_decomp.py`` walks torch's namespaces and fails
if a callable reaching one of these kernels is missing from the table. Internal entry points that
only the routed functions call (``_batch_norm_impl_index``, the cuDNN and MIOpen kernels) are
reached only through routed callers and need no entry.

Four ops outside the normalisation family are routed the same way for other reasons:
``masked_select`` with a mask that broadcasts its input, whose backward vmap batches wrongly
(see :func:`masked_select`), ``as_strided_scatter``, whose backward does not zero what it
overwrites (see :func:`as_strided_scatter`), and ``dot`` / ``vdot``, whose compiled
forward-mode derivative crashes (see :func:`dot`). The embedding lookups whose backward is a
pseudo-gradient (``padding_idx``, ``scale_grad_by_freq``) and the bag reductions, which have no
second derivatives, are routed to ``_pseudo``, which says how each is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import _pseudo

# ----------------------------------------------------------------------------- formulas


def _normalise(
    x: torch.Tensor, dims: Sequence[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((x - mean) * rstd, mean, biased variance, rstd)`` over ``dims`` (kept)."""
    dims = tuple(dims)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    # pow(2), not centred * centred: inductor miscompiles the forward-over-reverse derivative of
    # a tensor multiplied by itself in these graphs.
    var = centred.pow(2).mean(dim=dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return centred * rstd, mean, var, rstd


def _affine(y: torch.Tensor, weight: Any, bias: Any, shape: Sequence[int]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    k = len(normalized_shape)
    y, mean, _, rstd = _normalise(input, range(input.dim() - k, input.dim()), eps)
    # the fused kernel's saved statistics are not differentiable outputs; the composite's match
    return _affine(y, weight, bias, tuple(normalized_shape)), mean.detach(), rstd.detach()


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return native_layer_norm(input, normalized_shape, weight, bias, eps)[0]


def F_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return native_layer_norm(input, normalized_shape, weight, bias, eps)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    k = len(normalized_shape)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = tuple(range(input.dim() - k, input.dim()))
    rstd = torch.rsqrt(input.pow(2).mean(dim=dims, keepdim=True) + eps)
    return _affine(input * rstd, weight, None, tuple(normalized_shape)), rstd


def _update_running(running: torch.Tensor | None, stat: torch.Tensor, momentum: float) -> None:
    if running is not None:
        with torch.no_grad():
            running.mul_(1 - momentum).add_(momentum * stat)


def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """``(out, save_mean, save_invstd)``; the saved statistics are empty in evaluation, as in
    the fused kernel. In training the running statistics are updated in place, as torch does."""
    shape = _channel_shape(input)
    if not training:
        rstd = torch.rsqrt(running_var + eps)
        y = (input - running_mean.reshape(shape)) * rstd.reshape(shape)
        empty = input.new_empty((0,))
        return _affine(y, weight, bias, shape), empty, empty
    dims = [0, *range(2, input.dim())]
    y, mean, var, rstd = _normalise(input, dims, eps)
    n = input.numel() / input.shape[1]
    _update_running(running_mean, mean.detach().reshape(-1), momentum)
    _update_running(running_var, var.detach().reshape(-1) * n / max(n - 1, 1), momentum)
    return _affine(y, weight, bias, shape), mean.detach().reshape(-1), rstd.detach().reshape(-1)


def batch_norm(
    input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True
):
    return native_batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )[0]


def F_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    return native_batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )[0]


def native_batch_norm_legit(input, weight, bias, *rest):
    """Both overloads: ``(running_mean, running_var, training, momentum, eps)`` or, without
    statistics (``no_stats``), ``(training, momentum, eps)``."""
    if len(rest) == 3:
        return native_batch_norm(input, weight, bias, None, None, *rest)
    return native_batch_norm(input, weight, bias, *rest)


def native_batch_norm_legit_no_training(
    input, weight, bias, running_mean, running_var, momentum, eps
):
    return native_batch_norm(input, weight, bias, running_mean, running_var, False, momentum, eps)


def instance_norm(
    input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled
):
    shape = _channel_shape(input)
    if not use_input_stats:
        return native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
    y, mean, var, _ = _normalise(input, range(2, input.dim()), eps)
    n = input[0, 0].numel()
    _update_running(running_mean, mean.detach().mean(0).reshape(-1), momentum)
    _update_running(running_var, var.detach().mean(0).reshape(-1) * n / max(n - 1, 1), momentum)
    return _affine(y, weight, bias, shape)


def F_instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    return instance_norm(
        input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, False
    )


def native_group_norm(input, weight, bias, N, C, HxW, group, eps):
    """``(out, mean, rstd)`` with statistics of shape ``(N, group)`` (differentiable outputs,
    as in the fused kernel)."""
    grouped = input.reshape(N, group, -1)
    y, mean, _, rstd = _normalise(grouped, (2,), eps)
    out = _affine(y.reshape(input.shape), weight, bias, _channel_shape(input))
    return out, mean.reshape(N, group), rstd.reshape(N, group)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    n, c = input.shape[:2]
    return native_group_norm(input, weight, bias, n, c, input[0, 0].numel(), num_groups, eps)[0]


def _norm_except_dim(v: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == -1:
        return v.pow(2).sum().sqrt()
    dims = [d for d in range(v.dim()) if d != dim]
    return v.pow(2).sum(dim=dims, keepdim=True).sqrt()


def weight_norm_interface(v, g, dim=0):
    norm = _norm_except_dim(v, dim)
    return v * (g / norm), norm.detach()


def weight_norm(v, g, dim=0):
    return weight_norm_interface(v, g, dim)[0]


# ----------------------------------------------------------------------------- selection


def masked_select(input, mask):
    """``masked_select`` with the broadcast of ``input`` against ``mask`` done first, by ``expand``.

    When ``mask`` broadcasts ``input``, the op's backward (``masked_scatter_backward``, which has
    no vmap batching rule) reduces over the broadcast axes itself, and vmap's fallback gets that
    wrong: the rows of a ``rev-rev`` ``hessian_matrix`` or ``hvps`` come out zero or of the wrong
    shape (torch 2.13; the unbatched ``hvp`` is right). With the broadcast done by ``expand``,
    the reduction belongs to ``expand``'s backward, which vmap batches correctly.
    """
    shape = torch.broadcast_shapes(input.shape, mask.shape)
    return torch.masked_select(input.expand(shape), mask.expand(shape))


def as_strided_scatter(input, src, size, stride, storage_offset=None):
    """``as_strided_scatter`` as a ``scatter`` over the flat positions it writes.

    torch's backward for ``input`` does not zero the positions that ``src`` overwrites (torch
    2.13: the gradient of ``input`` there equals the gradient of ``src``), so even the first
    derivative is wrong and the Hessian comes out asymmetric, with fwd-rev and rev-rev
    disagreeing; the value-based checks of the op sweep found it. ``scatter`` has the right
    derivatives of every order. For a contiguous ``input`` at offset 0 (every tensor hessfunc
    differentiates), the positions written are those of ``arange(numel).as_strided(...)``;
    other layouts keep the op.
    """
    if not input.is_contiguous() or input.storage_offset() != 0:
        return torch.as_strided_scatter(input, src, size, stride, storage_offset)
    where = torch.arange(input.numel(), device=input.device).as_strided(
        size, stride, storage_offset or 0
    )
    flat = input.reshape(-1).scatter(0, where.reshape(-1), src.reshape(-1).to(input.dtype))
    return flat.reshape(input.shape)


def dot(input, tensor):
    """``torch.dot`` as a product and a sum.

    Inductor's code for the forward-mode derivative of ``dot`` / ``vdot`` crashes the process
    (a segmentation fault on the first call, torch 2.13 CPU): ``torch.compile(lambda w, t:
    jvp(lambda w: torch.dot(u, w), (w,), (t,)))`` is enough (``tests/test_upstream.py``). It
    took down compiled ``ggn_vp`` on any model with ``spectral_norm``, whose parametrisation
    computes ``vdot(u, mv(W, v))``. The elementwise form is the same number and compiles.
    """
    return (input * tensor).sum()


def vdot(input, other):
    return (input.conj() * other).sum()


# ----------------------------------------------------------------------------- routing

# aten operator name -> composite with the aten schema's argument order
_ATEN: dict[str, Callable[..., Any]] = {
    "layer_norm": layer_norm,
    "native_layer_norm": native_layer_norm,
    "rms_norm": lambda *a, **k: rms_norm(*a, **k)[0],
    "_fused_rms_norm": rms_norm,
    "batch_norm": batch_norm,
    "native_batch_norm": native_batch_norm,
    "_native_batch_norm_legit": native_batch_norm_legit,
    "_native_batch_norm_legit_no_training": native_batch_norm_legit_no_training,
    "instance_norm": instance_norm,
    "group_norm": group_norm,
    "native_group_norm": native_group_norm,
    "_weight_norm": weight_norm,
    "_weight_norm_interface": weight_norm_interface,
    "masked_select": masked_select,
    "as_strided_scatter": as_strided_scatter,
    "dot": dot,
    "vdot": vdot,
    # pseudo-gradients (see ``_pseudo``)
    "embedding": _pseudo.embedding,
    "embedding_bag": _pseudo.embedding_bag,
    "_embedding_bag": _pseudo._embedding_bag,
}
# torch.nn.functional wrappers, whose argument order differs from the aten schema
_FUNCTIONAL: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: F_layer_norm,
    F.rms_norm: lambda *a, **k: rms_norm(*a, **k)[0],
    F.batch_norm: F_batch_norm,
    F.instance_norm: F_instance_norm,
    F.group_norm: group_norm,
    F.embedding: _pseudo.F_embedding,
    F.embedding_bag: _pseudo.F_embedding_bag,
}


def callables_reaching(name: str) -> list[Any]:
    """Every Python callable that reaches the aten operator ``name`` (functions, Tensor methods,
    ``torch.ops.aten`` packets and their overloads)."""
    found = [getattr(ns, name, None) for ns in (torch, torch._C._VariableFunctions, torch.Tensor)]
    packet = getattr(torch.ops.aten, name, None)
    if packet is not None:
        found.append(packet)
        # the ``out=`` overloads write into given tensors; nothing differentiates through them
        found += [getattr(packet, o) for o in packet.overloads() if "out" not in o]
    return [c for c in found if c is not None]


def _build_routes() -> dict[Any, Callable[..., Any]]:
    routes: dict[Any, Callable[..., Any]] = dict(_FUNCTIONAL)
    for name, composite in _ATEN.items():
        for fn in callables_reaching(name):
            routes[fn] = composite
    return routes


ROUTES: dict[Any, Callable[..., Any]] = _build_routes()
