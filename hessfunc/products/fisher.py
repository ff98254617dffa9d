r"""Fisher-vector products (empirical and Monte-Carlo) and per-sample gradients.

Write the loss as :math:`L(\theta) = c \sum_{i=1}^N \ell_i(\theta)`, with :math:`\ell_i` the
negative log-likelihood of sample ``i`` and :math:`c` the reduction's factor
(:meth:`hessfunc.losses.Loss.scale`: ``1`` for ``"sum"``; for ``"mean"``, ``1/N`` for the
classification losses and ``1/numel`` for the element-wise ones, as torch averages). Both
Fishers here are normalised with the same :math:`c`, so they sit on the scale of the Hessian and
the GGN of ``L`` and can be compared with them directly:

.. math:: F_{\text{emp}} = c \sum_i \nabla \ell_i(y_i)\, \nabla \ell_i(y_i)^\top, \qquad
   F_{\text{MC}} = c \sum_i \frac1S \sum_{s=1}^S \nabla \ell_i(\hat y_{is})\,
   \nabla \ell_i(\hat y_{is})^\top,\ \hat y_{is} \sim p(\cdot \mid f_i).

For ``reduction="mean"`` over a batch (cross-entropy), :math:`F_{\text{emp}} = \frac1N \sum_i
g_i g_i^\top` with :math:`g_i` the gradient of sample ``i``'s own loss. The MC Fisher is an
unbiased estimate of the true Fisher :math:`J^\top \mathbb{E}[\nabla_f \ell \nabla_f
\ell^\top] J`, which equals the GGN for the exponential-family losses of
:mod:`hessfunc.losses`. The empirical Fisher uses the observed labels and in general equals
neither.

Products are formed in output space: :math:`\nabla_\theta \ell_i = J_i^\top r_i` with
:math:`r_i = \partial \ell_i / \partial f_i`, so :math:`F v = c \sum_i J_i^\top r_i\, (r_i^\top
J_i v)`: one ``jvp``, per-sample dot products of size ``C``, one ``vjp``. No per-sample
parameter gradient is materialised. This needs row ``i`` of the outputs to depend on sample ``i``
only (no batch statistics, no attention across the batch).

Outputs may be a container (a dict or a transformers ``ModelOutput``, caches dropped): the loss
reads its ``"logits"`` entry, as for :func:`hessfunc.ggn_vp`. With ``ignore_index`` in the loss,
ignored rows contribute nothing and :math:`c = 1/N_{\text{kept}}` for ``"mean"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.func import grad, vmap

from .._base import _checks, _context, _outputs, _tree
from .._base._types import Mode, PyTree
from ..losses import Loss
from .ggn import _check_model_fn, _linearise

__all__ = ["fisher_vp", "per_sample_grads"]

FisherKind = Literal["empirical", "mc"]


def _mc_rows(loss: Loss, out: PyTree, u: torch.Tensor) -> PyTree:
    """Output-space gradients of the per-sample NLL at targets drawn from ``u``."""
    return loss.predictive(loss.sample_from_uniform(out, u)).output_grads(out)


def fisher_vp(
    model_fn: Callable[..., PyTree],
    loss: Loss,
    params: PyTree,
    v: PyTree,
    *args: Any,
    kind: FisherKind = "empirical",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    mc_samples: int = 1,
    mode: Mode = "fwd-rev",
) -> PyTree:
    r"""Fisher-vector product :math:`F v`, empirical or Monte-Carlo (see the module docstring).

    Args:
        model_fn: ``model_fn(params, *args) -> outputs`` with samples along axis 0 of the
            outputs, each row depending on its own sample only.
        loss: a :mod:`hessfunc.losses` object holding the observed targets (the per-sample
            structure and the predictive distribution come from it).
        params: a pytree of floating tensors.
        v: a pytree like ``params``.
        *args: passed to ``model_fn`` as is.
        kind: ``"empirical"`` (default; observed targets) or ``"mc"`` (targets sampled from the
            model's predictive distribution; needs ``generator`` or ``noise``).
        generator: for ``kind="mc"``: a ``torch.Generator`` supplying the draws (the global RNG
            is never touched). Dynamo cannot trace generators; use ``noise`` under
            ``torch.compile``.
        noise: for ``kind="mc"``, instead of ``generator``: uniform draws in [0, 1) of shape
            ``(mc_samples, *loss.noise_shape(outputs))``, turned into samples deterministically.
        mc_samples: number :math:`S` of sampled targets per example (``kind="mc"``).
        mode: ``"fwd-rev"`` or ``"rev-rev"``, as in :func:`hessfunc.ggn_vp`.

    Returns:
        A pytree like ``params``: :math:`F v`.

    Cost:
        As :func:`hessfunc.ggn_vp`: one forward pass carrying a tangent and one backward pass
        (about 2-3 gradients), plus ``mc_samples`` output-space gradients, which are cheap;
        memory of one gradient plus the tangent activations and ``mc_samples`` copies of the
        outputs.

    Example:
        Linear least squares (:math:`\ell_i = (x_i^\top w - y_i)^2`, ``"sum"``): the empirical
        Fisher is :math:`\sum_i 4 r_i^2 x_i x_i^\top` with residuals :math:`r_i`:

        >>> import torch
        >>> from hessfunc.products.fisher import fisher_vp
        >>> from hessfunc.losses import MSELoss
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> y, w, v = torch.ones(2), torch.zeros(2), torch.ones(2)
        >>> fisher_vp(lambda w, X: X @ w, MSELoss(y, reduction="sum"), w, v, X)
        tensor([ 4., 16.])

    """
    where = "hessfunc.fisher_vp(model_fn, loss, params, v, *args)"
    _checks.check_mode(where, mode)
    _check_model_fn(where, model_fn)
    if not isinstance(loss, Loss):
        raise TypeError(
            f"{where}: loss must be a hessfunc.losses object (e.g. "
            f"hessfunc.losses.CrossEntropyLoss(targets)), got {type(loss).__name__}: the Fisher "
            "needs the per-sample structure and the predictive distribution of the loss."
        )
    if kind not in ("empirical", "mc"):
        raise ValueError(f"{where}: unknown kind={kind!r}; expected 'empirical' or 'mc'.")
    if kind == "empirical":
        if generator is not None or noise is not None:
            raise ValueError(
                f"{where}: generator/noise are only used with kind='mc'; the empirical Fisher "
                "uses the loss's own targets. Drop them or pass kind='mc'."
            )
    else:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"{where}: mc_samples must be a positive int, got {mc_samples!r}.")
        _checks.check_random_source(where, "kind='mc'", generator, noise)
    _checks.check_params(where, params)
    _checks.check_like(where, params, v)

    def product(mode: str) -> PyTree:
        flat = _outputs.Flattener(where, lambda p: model_fn(p, *args))
        full, jv_full, pull_full = _linearise(flat, params, v, mode)
        out, embed = flat.loss_view(full)
        jv = flat.loss_view(jv_full)[0]

        def pullback(c: PyTree) -> PyTree:
            return pull_full(embed(c))

        c = loss.scale(out)
        if kind == "empirical":
            r = loss.output_grads(out)
            return pullback(_tree.scale(c, _tree.row_scale(_tree.row_vdot(r, jv), r)))
        shape = (mc_samples, *loss.noise_shape(out))
        u = noise
        if u is None:
            ref = flat.first(full)
            u = torch.rand(shape, generator=generator, dtype=ref.dtype, device=generator.device)
            u = u.to(ref.device)
        elif tuple(u.shape) != shape:
            raise ValueError(
                f"{where}: noise has shape {tuple(u.shape)}; expected (mc_samples, "
                f"*loss.noise_shape(outputs)) = {shape}."
            )
        rows = vmap(lambda ui: _mc_rows(loss, out, ui))(u)
        weights = vmap(lambda r: _tree.row_vdot(r, jv))(rows)
        summed = _tree.tree_map(lambda x: x.sum(0), vmap(_tree.row_scale)(weights, rows))
        return pullback(_tree.scale(c / mc_samples, summed))

    return _context.evaluate(where, mode, product, hessian=False)


def per_sample_grads(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    in_dims: int | None | tuple[int | None, ...] = 0,
    chunk_size: int | None = None,
) -> PyTree:
    r"""Gradients of ``f`` on each sample separately: :math:`g_i = \nabla_\theta f(\theta, x_i)`.

    ``f`` is called on **one sample with a batch axis of size 1** (``x[i:i+1]``-shaped), so any
    ``f`` written for batches works unchanged, BatchNorm and ``batch_first`` attention included;
    with ``reduction="mean"`` the batch of one makes :math:`g_i` the gradient of sample ``i``'s
    own loss. The loop over samples is ``vmap``-ed.

    Args:
        f: ``f(params, *args) -> scalar``.
        params: a pytree of floating tensors.
        *args: data; batched arguments share one batch size ``N`` along their ``in_dims`` axis.
        in_dims: the batch axis of each argument (applied to every leaf of it), or ``None`` for
            an argument shared by all samples; one int or ``None`` applies to every argument.
        chunk_size: samples per vectorised pass (``None``: all ``N``).

    Returns:
        A pytree like ``params`` with a leading axis of size ``N``: entry ``[i]`` is :math:`g_i`.

    Cost:
        ``N`` gradients in ``ceil(N / chunk_size)`` vectorised passes; memory of ``N`` (or
        ``chunk_size``) gradients plus the result, ``N`` times the size of ``params``.

    Example:
        For :math:`f = \tfrac12 (x^\top w)^2` the gradient of sample ``i`` is
        :math:`(x_i^\top w)\, x_i`:

        >>> import torch
        >>> from hessfunc.products.fisher import per_sample_grads
        >>> f = lambda w, X: 0.5 * ((X @ w) ** 2).sum()
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> per_sample_grads(f, torch.ones(2), X)
        tensor([[1., 0.],
                [2., 2.]])

    """
    where = "hessfunc.per_sample_grads(f, params, *args)"
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    if len(dims) != len(args) or not all(
        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in dims
    ):
        raise ValueError(
            f"{where}: in_dims must be an int, None, or a tuple of one int-or-None per argument "
            f"({len(args)} given); got {in_dims!r}."
        )
    if all(d is None for d in dims):
        raise ValueError(
            f"{where}: no argument is batched (in_dims={in_dims!r}); mark the data's batch "
            "axis, e.g. in_dims=0."
        )
    sizes = set()
    for k, (a, d) in enumerate(zip(args, dims, strict=True)):
        if d is None:
            continue
        for leaf in _tree.tree_leaves(a):
            if not isinstance(leaf, torch.Tensor) or not -leaf.dim() <= d < leaf.dim():
                what = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ValueError(
                    f"{where}: args[{k}] is batched along axis {d} but has a leaf {what}; pass "
                    "None in in_dims for it or fix the axis."
                )
            sizes.add(leaf.shape[d])
    if len(sizes) > 1:
        raise ValueError(
            f"{where}: the batched arguments disagree on the batch size: {sorted(sizes)}."
        )

    checked = _checks.scalar_fn(where, f)

    def one(p: PyTree, *sample: Any) -> torch.Tensor:
        restored = tuple(
            a if d is None else _tree.tree_map(lambda x, d=d: x.unsqueeze(d), a)
            for a, d in zip(sample, dims, strict=True)
        )
        return checked(p, *restored)

    return vmap(grad(one), in_dims=(None, *dims), chunk_size=chunk_size)(params, *args)
