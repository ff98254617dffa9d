r"""Eigenvalue-corrected K-FAC (EK-FAC, George et al. 2018).

K-FAC's block :math:`G \otimes A` has the eigenbasis :math:`Q_G \otimes Q_A` and the
eigenvalues :math:`\lambda_G \otimes \lambda_A`. EK-FAC keeps the basis and replaces the
eigenvalues by the second moments of the per-sample gradients projected onto it,

.. math:: E = (Q_G \otimes Q_A)\, \operatorname{diag}(m)\, (Q_G \otimes Q_A)^\top, \qquad
   m = c \sum_{i, j} \big(Q_G^\top\, \textstyle\sum_p g_{ipj} a_{ip}^\top\, Q_A\big)^{\odot 2},

with :math:`\sum_p g_{ipj} a_{ip}^\top` the gradient of sample :math:`i` for output-space column
:math:`j` (see :func:`hessfunc.kfac`), summed over the positions where the weight is shared, and
:math:`c` the loss's reduction factor, as curvlinops does. For ``fisher="type-2"``,
:math:`\sum_j` of those outer products is the sample's exact GGN block, so :math:`m` is the
diagonal of the GGN block in the basis, the best diagonal there in Frobenius norm: EK-FAC's
error against the GGN's block is never larger than K-FAC's (which is another diagonal in the
same basis).

The moments are sums over samples with the same counts as :class:`hessfunc.KFAC`: for one
fixed basis, the ``moments`` of several batches add up to the moments of their union.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._base._types import PyTree
from ..losses import Loss
from . import _kron
from ._eigenbasis import EKFAC, Moments
from ._kron import Fisher
from ._layers import samples_positions
from .kfac import KFAC, factor_sums

__all__ = ["EKFAC", "Moments", "ekfac"]


def _moments(at: torch.Tensor, g: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """``sum_{k, n} (qg^T (sum_p g a^T) qa)^2`` per group, ``(groups, out, size)``.

    ``at``: the inputs in their eigenbasis, ``a @ qa``, ``(N, P, groups, size)`` (projected once
    for every chunk of columns); ``g``: ``(k, N, P, groups, out)``. Either the per-sample
    gradients are formed (memory ``k N o d``) or their squares are expanded over pairs of
    positions (memory ``N P^2 (o + d)``), whichever is smaller; without weight sharing
    (``P = 1``) the latter is two element-wise squares and one matrix product.
    """
    gt = torch.einsum("knpgi,gij->knpgj", g, qg)
    k, n, p, groups, o = gt.shape
    d = at.shape[-1]
    if k * o * d <= p * p * (o + d):
        per_sample = torch.einsum("knpgo,npgd->kngod", gt, at)
        return per_sample.square().sum((0, 1))
    gg = torch.einsum("knpgo,knqgo->npqgo", gt, gt)
    aa = torch.einsum("npgd,nqgd->npqgd", at, at)
    return torch.einsum("npqgo,npqgd->god", gg, aa)


def ekfac(
    model_fn: Callable[..., torch.Tensor],
    loss_fn: Loss,
    params: PyTree,
    *args: Any,
    fisher: Fisher = "type-2",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    mc_samples: int = 1,
    separate_bias: bool = False,
    chunk_size: int | None = None,
    basis: KFAC | EKFAC | None = None,
) -> EKFAC:
    r"""Eigenvalue-corrected K-FAC of every linear layer in ``model_fn`` (see the module doc).

    Arguments and layer discovery are those of :func:`hessfunc.kfac`. Without ``basis``, the
    K-FAC factors of this batch give the eigenbasis and the same backward passes give the
    moments. With ``basis`` (a ``KFAC``, e.g. summed over a dataset, or an ``EKFAC``), its
    eigenbasis is used and only the moments of this batch are computed: the two-pass recipe
    for datasets, where the moments of every batch in one basis are summed.

    Per-sample gradients need the samples on axis 0 of every covered layer's input, the rows of
    the outputs; a model that flattens tokens into the output rows is refused (use
    :func:`hessfunc.kfac`, which needs no per-sample gradients).

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``, one tensor with samples on axis 0,
            or a container (dict, ``ModelOutput``) whose ``"logits"`` entry is that tensor.
        loss_fn: a :mod:`hessfunc.losses` object holding the targets.
        params: a pytree of floating tensors.
        *args: passed to ``model_fn`` as is.
        fisher: ``"type-2"`` (default), ``"mc"`` or ``"empirical"``.
        generator: for ``"mc"``: a ``torch.Generator`` (eager code).
        noise: for ``"mc"``: uniform draws ``(mc_samples, *loss_fn.noise_shape(outputs))``.
        mc_samples: targets drawn per sample (``"mc"`` only).
        separate_bias: give each bias its own block.
        chunk_size: output-space columns pulled back per vectorised pass (``None``: as many
            as fit 4 MiB of output gradients, at least one; see :func:`hessfunc.kfac`).
        basis: a ``KFAC`` or ``EKFAC`` with the same layout whose eigenbasis to use.

    Returns:
        An :class:`EKFAC` with ``.matvec``, ``.solve`` (exact, in the eigenbasis), ``.dense``,
        ``.eigenvalues``, ``.covered`` and ``.uncovered``.

    Cost:
        As :func:`hessfunc.kfac` plus two eigendecompositions per block (none with an
        ``EKFAC`` basis) and the projected per-sample gradients (see ``_moments``); when the
        columns take more than one chunk and no ``basis`` is given, the backward passes run
        twice (once for the factors, once for the moments). Memory: as :func:`hessfunc.kfac`,
        plus every layer's unfolded inputs for the moments.

    Example:
        On one linear layer with summed squared error EK-FAC, like K-FAC, is the GGN itself:

        >>> import torch, hessfunc
        >>> from hessfunc.losses import MSELoss
        >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
        >>> f64 = torch.float64
        >>> p = {"w": torch.ones(2, 2, dtype=f64), "b": torch.zeros(2, dtype=f64)}
        >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"], p["b"])
        >>> loss = MSELoss(torch.zeros(3, 2, dtype=torch.float64), reduction="sum")
        >>> E = hessfunc.ekfac(model, loss, p, X)
        >>> torch.allclose(E.dense(), hessfunc.ggn_matrix(model, loss, p, X))
        True
    """
    where = "hessfunc.ekfac(model_fn, loss_fn, params, *args)"
    _kron.check(
        where, model_fn, loss_fn, params, fisher, generator, noise, mc_samples, separate_bias,
        chunk_size,
    )  # fmt: skip
    if basis is not None and not isinstance(basis, (KFAC, EKFAC)):
        raise TypeError(
            f"{where}: basis must be a hessfunc.KFAC or hessfunc.EKFAC, got {type(basis).__name__}."
        )
    p = _kron.collect(
        where, model_fn, loss_fn, params, args, fisher=fisher, generator=generator, noise=noise,
        mc_samples=mc_samples, separate_bias=separate_bias, chunk_size=chunk_size,
    )  # fmt: skip
    for block, calls in zip(p.layout.blocks, p.calls, strict=True):
        for c in calls:
            n = samples_positions(c)[0]
            if n != p.rows:
                raise ValueError(
                    f"{where}: the input of {'+'.join(block.names)} has {n} samples on "
                    f"axis 0 but the outputs have {p.rows} rows; per-sample gradients need the "
                    "samples on axis 0 of every layer input, as in the outputs. Keep a sample "
                    "axis in the outputs (loss terms per sample), or use hessfunc.kfac."
                )
    kept = None
    if basis is None:
        k, kept = factor_sums(p, keep=True)
        basis = k.eigendecompose()
    elif isinstance(basis, KFAC):
        basis = basis.eigendecompose()
    if basis.layout != p.layout:
        raise ValueError(
            f"{where}: basis has the blocks {[b.names for b in basis.layout.blocks]} but this "
            f"call finds {[b.names for b in p.layout.blocks]}; build the basis with the same "
            "model_fn, params and separate_bias."
        )
    projected = []
    for i in range(len(p.calls)):
        a = _kron.block_inputs_of(p, i)
        a = torch.cat(a, 1) if len(a) > 1 else a[0]
        projected.append(torch.einsum("npgi,gij->npgj", a, basis.input_bases[i]))
        del a
    sums: list[Any] = [0] * len(projected)
    for chunk in range(p.chunks):
        gs = kept[0] if kept is not None else p.grads(chunk)
        for i, (at, grads) in enumerate(zip(projected, gs, strict=True)):
            g = torch.cat(grads, 2) if len(grads) > 1 else grads[0]
            sums[i] = sums[i] + _moments(at, g, basis.grad_bases[i])
        del gs
    kept = None
    p.release()
    sums = [s * p.weight if p.weight != 1.0 else s for s in sums]
    moments = Moments(tuple(sums), p.loss_terms, _kron.options(fisher, loss_fn))
    return basis._replace(moments=moments)
