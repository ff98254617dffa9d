r"""Generalised Gauss-Newton products, matrix-free: :math:`G v = J^\top H_\ell J v`.

For a loss :math:`L(\theta) = \ell(m(\theta))` with model outputs :math:`f = m(\theta)`, the
Hessian splits as

.. math:: \nabla^2 L = J^\top H_\ell J + \sum_k \frac{\partial \ell}{\partial f_k}
   \nabla^2 f_k, \qquad J = \partial f / \partial \theta,\ H_\ell = \nabla^2_f \ell,

and the generalised Gauss-Newton matrix :math:`G = J^\top H_\ell J` drops the second (residual)
term. :math:`G` is positive semi-definite whenever :math:`\ell` is convex in the outputs, and
equals the Fisher information when :math:`\ell` is an exponential-family negative
log-likelihood in its natural parameters (see :mod:`hessfunc.losses`).

The model and loss are separate: ``model_fn(params, *args) -> outputs`` (any pytree of tensors)
and ``loss_fn(outputs) -> scalar``, whose targets are closed over or held by a loss object from
:mod:`hessfunc.losses`. With such an object :math:`H_\ell u` is a closed form; any other callable
gets it from autodiff in output space (forward-over-reverse of ``loss_fn``, cheap because the
outputs are small).

Outputs may be any container torch's own pytree knows (tuples, dicts, a transformers
``ModelOutput``, a registered dataclass); leaves that are not floating tensors (a
``DynamicCache`` from ``use_cache=True``, integer tensors) are dropped, and ``loss_fn`` sees
``None`` in their place. A loss object reads the tensor itself or its ``"logits"`` entry; the
other outputs then carry no curvature (see ``docs/guides/real_models.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import jacrev, jvp, vjp, vmap

from .._base import _checks, _context, _memory, _outputs, _tree
from .._base._types import Mode, PyTree
from ..losses import Loss
from .hessian import rows_over_basis

__all__ = ["ggn_matrix", "ggn_vp", "ggn_vps"]


def _linearise(
    flat: _outputs.Flattener, params: PyTree, v: PyTree, mode: str
) -> tuple[_outputs.Flat, _outputs.Flat, Callable[[_outputs.Flat], PyTree]]:
    """``(f, J v, u -> J^T u)`` at ``params`` from a single forward pass of the model.

    Outputs travel as the flat tuple of their floating tensors (:mod:`hessfunc._base._outputs`), so
    tensors, tuples, dicts, ``ModelOutput``s and outputs holding a cache behave the same in
    both modes.

    ``"fwd-rev"``: the forward pass carries the tangent ``v`` (``jvp``) inside a ``vjp``; ``J v``
    leaves as auxiliary output, so the pullback only runs back through the primal outputs: a
    plain first-order backward, never reverse-over-forward through a tangent.
    ``"rev-rev"``: no forward mode at all. ``u -> J^T u`` is linear in ``u``, so its VJP at any
    ``u`` along ``v`` is ``J v`` (the double-VJP trick), again sharing the forward. The point is
    ``u = 1`` (every entry one), not ``u = 0``: a few backward formulas are singular at a zero
    cotangent even though the map they compute is linear (``logcumsumexp``'s backward takes the
    log of ``|u|``, so at ``u = 0`` its linearisation is NaN or exactly zero).
    """
    if mode == "fwd-rev":

        def primal_and_tangent(p: PyTree) -> tuple[PyTree, PyTree]:
            return jvp(flat.call, (p,), (v,))

        out, pullback, jv = vjp(primal_and_tangent, params, has_aux=True)
    else:
        out, pullback = vjp(flat.call, params)
        ones = tuple(torch.ones_like(x) for x in out)
        jv = vjp(lambda u: pullback(u)[0], ones)[1](v)[0]
    return out, jv, lambda u: pullback(u)[0]


def _output_hvp(
    where: str, loss_fn: Callable[[PyTree], torch.Tensor], mode: str, flat: _outputs.Flattener
) -> Callable[[_outputs.Flat, _outputs.Flat], _outputs.Flat]:
    """Return ``(outputs, u) -> H_ℓ u`` on flat outputs: closed form or autodiff.

    Closed form for hessfunc losses (on the part they read), else autodiff of ``loss_fn`` of the
    rebuilt outputs.
    The autodiff product is a Hessian product in output space, so it follows the rule of
    :func:`hessfunc._base._context.traced_mode`: ``mode``'s path eagerly, reverse-over-reverse under
    compile. ``jvp`` of ``jacrev`` rather than of ``grad``: ``jvp(grad(L))`` raises
    "ZeroTensors are immutable" when ``L`` uses ``F.mse_loss`` (pytorch#123996).
    """
    if isinstance(loss_fn, Loss):

        def closed_form(out: _outputs.Flat, u: _outputs.Flat) -> _outputs.Flat:
            part, embed = flat.loss_view(out)
            return embed(loss_fn.hvp(part, flat.loss_view(u)[0]))

        return closed_form
    if not callable(loss_fn):
        raise TypeError(
            f"{where}: loss_fn must be callable as loss_fn(outputs) -> scalar, got "
            f"{type(loss_fn).__name__}. Close over the targets: lambda out: F.mse_loss(out, y)."
        )
    checked = _checks.scalar_fn(where, loss_fn)
    grad_out = jacrev(lambda out: checked(flat.rebuild(out)))
    if _context.traced_mode(mode) == "fwd-rev":
        return lambda out, u: jvp(grad_out, (out,), (u,))[1]
    return lambda out, u: vjp(grad_out, out)[1](u)[0]


def _check_model_fn(where: str, model_fn: Any) -> None:
    if not callable(model_fn):
        raise TypeError(
            f"{where}: model_fn must be callable as model_fn(params, *args) -> outputs, got "
            f"{type(model_fn).__name__}."
        )


def _ggn_product(
    where: str,
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[[PyTree], torch.Tensor],
    mode: str,
    args: tuple[Any, ...],
) -> Callable[[PyTree, PyTree], PyTree]:
    """``(params, v) -> G v``; call it through ``_context.evaluate``."""

    def product(params: PyTree, v: PyTree) -> PyTree:
        flat = _outputs.Flattener(where, lambda p: model_fn(p, *args))
        hvp_out = _output_hvp(where, loss_fn, mode, flat)
        out, jv, pullback = _linearise(flat, params, v, mode)
        return pullback(hvp_out(out, jv))

    return product


def ggn_vp(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    v: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
) -> PyTree:
    r"""Exact generalised Gauss-Newton-vector product :math:`G v = J^\top H_\ell J v`.

    :math:`J v` by forward mode, :math:`H_\ell (J v)` in output space, then one VJP; the
    Jacobian is never formed and one forward pass of the model serves both directions.

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``: a tensor, or any container torch's
            pytree knows (tuples, dicts, a ``ModelOutput``); leaves that are not floating
            tensors (a cache) are dropped and ``loss_fn`` sees ``None`` there. A loss object
            reads the tensor or its ``"logits"`` entry.
        loss_fn: ``loss_fn(outputs) -> scalar``: a :mod:`hessfunc.losses` object (closed-form
            output curvature) or any callable with the targets closed over (autodiff).
        params: a pytree of floating tensors.
        v: a pytree like ``params`` (structure, shapes, dtypes, device).
        *args: passed to ``model_fn`` as is, never differentiated.
        mode: ``"fwd-rev"`` (default): ``jvp`` for :math:`Jv`. ``"rev-rev"``: no forward-mode AD
            (for ops that lack it): :math:`Jv` as the VJP of the linear map :math:`u \mapsto
            J^\top u`.

    Returns:
        A pytree like ``params``: :math:`Gv`.

    Cost:
        ``"fwd-rev"``: one forward pass carrying one tangent and one backward pass, about 2-3
        gradient evaluations (less than :func:`hessfunc.hvp`, which also differentiates the
        backward pass); memory of one gradient plus the tangent activations. Output-space work
        is negligible. ``"rev-rev"``: one forward and three backward passes (about 4
        gradients), memory of a differentiable backward graph.

    Example:
        A linear model with summed squared error has :math:`G = 2 X^\top X`, equal to the
        Hessian:

        >>> import torch, hessfunc.products.ggn as ggn
        >>> from hessfunc.losses import MSELoss
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> model = lambda w, X: X @ w
        >>> w, v = torch.zeros(2), torch.tensor([1.0, 0.0])
        >>> ggn.ggn_vp(model, MSELoss(torch.ones(2), reduction="sum"), w, v, X)
        tensor([20., 28.])

    """
    where = "hessfunc.ggn_vp(model_fn, loss_fn, params, v, *args)"
    _checks.check_mode(where, mode)
    _check_model_fn(where, model_fn)
    _checks.check_params(where, params)
    _checks.check_like(where, params, v)
    return _context.evaluate(
        where,
        mode,
        lambda m: _ggn_product(where, model_fn, loss_fn, m, args)(params, v),
        hessian=False,
    )


def ggn_vps(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    vs: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
    chunk_size: int | None = None,
) -> PyTree:
    r"""GGN times a batch of directions, vectorised with ``vmap``.

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``.
        loss_fn: ``loss_fn(outputs) -> scalar``, as in :func:`ggn_vp`.
        params: a pytree of floating tensors.
        vs: a pytree like ``params`` whose every leaf has one extra leading axis of size ``k``.
        *args: passed to ``model_fn`` as is.
        mode: ``"fwd-rev"`` or ``"rev-rev"``, as in :func:`ggn_vp`.
        chunk_size: directions per vectorised pass (``None``: all ``k``); bounds peak memory.

    Returns:
        A pytree like ``vs``: entry ``[i]`` along the leading axis is :math:`G v_i`.

    Cost:
        ``k`` GGN products in ``ceil(k / chunk_size)`` vectorised passes. Under ``vmap`` the
        primal forward does not depend on the direction, so it runs once per pass; tangents,
        output-space products and backward passes are batched. Memory grows linearly with
        ``chunk_size``.

    Example:
        >>> import torch, hessfunc.products.ggn as ggn
        >>> from hessfunc.losses import MSELoss
        >>> model = lambda w: 3.0 * w
        >>> loss = MSELoss(torch.zeros(2), reduction="sum")
        >>> ggn.ggn_vps(model, loss, torch.ones(2), torch.eye(2))
        tensor([[18.,  0.],
                [ 0., 18.]])

    """
    where = "hessfunc.ggn_vps(model_fn, loss_fn, params, vs, *args)"
    _checks.check_mode(where, mode)
    _checks.check_chunk_size(where, chunk_size)
    _check_model_fn(where, model_fn)
    _checks.check_params(where, params)
    _checks.check_like(where, params, vs, "vs", batched=True)

    def product(m: str) -> PyTree:
        one = _ggn_product(where, model_fn, loss_fn, m, args)
        out = vmap(lambda t: one(params, t), chunk_size=chunk_size)(vs)
        return _checks.check_batched(where, out, params, _tree.batch_size(vs))

    return _context.evaluate(where, mode, product, hessian=False)


def ggn_matrix(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    r"""Build the dense generalised Gauss-Newton matrix :math:`G = J^\top H_\ell J`, ``(n, n)``.

    Rows and columns follow :func:`hessfunc.ravel` order (dicts in insertion order); row ``i``
    is :math:`G e_i`. Mixed floating dtypes are promoted to their common dtype.

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``.
        loss_fn: ``loss_fn(outputs) -> scalar``, as in :func:`ggn_vp`.
        params: a pytree of floating tensors.
        *args: passed to ``model_fn`` as is.
        mode: ``"fwd-rev"`` or ``"rev-rev"``, as in :func:`ggn_vp`.
        chunk_size: basis directions per vectorised pass (``None``: all ``n``).
        max_bytes: refuse (before allocating) when the estimate exceeds this; default half of
            the memory available on the parameters' device.

    Returns:
        An ``(n, n)`` symmetric tensor; PSD when the loss is convex in the outputs.

    Cost:
        ``n`` GGN products in ``ceil(n / chunk_size)`` vectorised passes (about 2-3 gradients
        each, batched); memory :math:`O(n^2)` plus ``chunk_size`` sets of tangent activations.

    Example:
        Logistic regression, :math:`G = X^\top \operatorname{diag}(\sigma(1-\sigma)) X`:

        >>> import torch, hessfunc.products.ggn as ggn
        >>> from hessfunc.losses import BCEWithLogitsLoss
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> loss = BCEWithLogitsLoss(torch.ones(2, dtype=torch.float64), reduction="sum")
        >>> G = ggn.ggn_matrix(lambda w, X: X @ w, loss, torch.zeros(2, dtype=torch.float64), X)
        >>> torch.allclose(G, 0.25 * X.T @ X)
        True

    """
    where = "hessfunc.ggn_matrix(model_fn, loss_fn, params, *args)"
    _checks.check_mode(where, mode)
    _checks.check_chunk_size(where, chunk_size)
    _check_model_fn(where, model_fn)
    _checks.check_params(where, params)
    flat, unravel = _tree.ravel(params)
    n = flat.numel()
    _memory.guard(where, n, flat.dtype, flat.device, chunk_size, max_bytes)

    def product(m: str) -> torch.Tensor:
        one = _ggn_product(where, lambda z, *a: model_fn(unravel(z), *a), loss_fn, m, args)
        return rows_over_basis(where, vmap(lambda t: one(flat, t)), flat, chunk_size)

    return _context.evaluate(where, mode, product, hessian=False)
