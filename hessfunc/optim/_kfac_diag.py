r"""The damped diagonal of the K-FAC optimizer on the leaves no Kronecker block covers.

Embeddings, positional tables and normalisation scales enter the model outside a supported
layer, so :func:`hessfunc.kfac` gives them no factors (:attr:`hessfunc.KFAC.uncovered`). The
optimizer gives each such leaf a diagonal curvature block instead (what kfac-jax does for
parameters it registers no layer for): a running average :math:`\bar d` of an unbiased estimate
of the diagonal of the curvature on those leaves, refreshed on the same steps and with the same
``ema`` as the Kronecker factors, and the direction

.. math:: \Delta_u = -\frac{g_u}{\bar d_u + \lambda + \eta}.

The estimate follows the ``fisher`` setting:

- ``"type-2"`` and ``"mc"``: the Gauss-Newton-Bartlett estimate (:func:`hessfunc.gnb_diag`),
  :math:`\hat g \odot \hat g / c` with :math:`\hat g` the gradient of the loss at labels drawn
  from the model and :math:`c` the loss's reduction factor; unbiased for the GGN diagonal. With
  ``"mc"`` the labels are those the factor build draws (one set of uniform draws serves both);
  ``"type-2"`` draws them only for this estimate. It costs one more backward pass through the
  step's own forward pass (no new forward pass).
- ``"empirical"``: :math:`g_L \odot g_L / c` with :math:`g_L` the batch gradient at the observed
  labels (the loss alone, without weight decay): no extra pass.

The averages sit in a tree shaped like ``params`` (state field ``diag``): an uncovered leaf holds
its :math:`\bar d` (the leaf's shape), every other leaf an empty ``(0,)`` placeholder, as the
factor trees do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._base import _tree
from .._base._types import PyTree
from ..kron._layers import Layout
from ..losses import Loss
from ..products.gnb import gnb_from_pullback
from ._kfac_factors import empty

__all__ = ["apply", "average", "check", "estimate", "uncovered"]


def uncovered(layout: Layout) -> tuple[int, ...]:
    """Indices (in ``params``' leaf order) of the leaves no block covers."""
    names = set(layout.uncovered_paths)
    return tuple(j for j, p in enumerate(layout.paths) if p in names)


def check(where: str, stored: PyTree, params: PyTree, idx: tuple[int, ...]) -> None:
    """Raise if the stored diagonal tree was made for other uncovered leaves than ``idx``."""
    for j, (d, x) in enumerate(
        zip(_tree.tree_leaves(stored), _tree.tree_leaves(params), strict=True)
    ):
        want = tuple(x.shape) if j in idx else (0,)
        if tuple(d.shape) != want:
            raise ValueError(
                f"{where}: the state's diagonal (field 'diag') does not match the leaves no layer "
                "of model_fn covers (another model or structure); call init(params) for this "
                "model."
            )


def estimate(
    where: str,
    fisher: str,
    loss: Loss,
    out: torch.Tensor,
    pullback: Callable[[torch.Tensor], tuple[PyTree]],
    loss_grads: PyTree,
    noise: torch.Tensor | None,
    idx: tuple[int, ...],
) -> list[torch.Tensor]:
    """The batch's diagonal estimate on the leaves ``idx`` (a list, in that order).

    ``noise`` (``(1, *loss.noise_shape(out))``) gives the labels of the Gauss-Newton-Bartlett
    estimate (``"type-2"``, ``"mc"``); ``loss_grads`` is the batch gradient of the loss alone
    (``"empirical"``).
    """
    if fisher == "empirical":
        c = loss.scale(out)
        leaves = _tree.tree_leaves(loss_grads)
        return [leaves[j] * leaves[j] / c for j in idx]
    tree = gnb_from_pullback(where, loss, out, lambda u: pullback(u)[0], None, noise[0])
    leaves = _tree.tree_leaves(tree)
    return [leaves[j] for j in idx]


def average(
    params: PyTree,
    stored: PyTree | None,
    new: list[torch.Tensor] | None,
    idx: tuple[int, ...],
    ema: float,
) -> PyTree:
    r"""The new ``diag`` tree: :math:`\epsilon\,\bar d + (1 - \epsilon)\, d` at ``idx``.

    ``stored`` None (the first step): the batch's estimate alone; ``new`` None (a step that
    keeps the curvature): the stored averages.
    """
    leaves = _tree.tree_leaves(params)
    old = None if stored is None else _tree.tree_leaves(stored)
    out = [empty(x) for x in leaves]
    for k, j in enumerate(idx):
        if new is None:
            out[j] = old[j]
        elif old is None:
            out[j] = new[k]
        else:
            out[j] = old[j] + (1.0 - ema) * (new[k] - old[j])
    return _tree.tree_unflatten(_tree.tree_structure(params), out)


def apply(
    solved: PyTree, grads: PyTree, diag: PyTree, idx: tuple[int, ...], shift: torch.Tensor
) -> PyTree:
    r"""``solved`` with every leaf at ``idx`` replaced by :math:`g / (\bar d + \text{shift})`."""
    out = _tree.tree_leaves(solved)
    g, d = _tree.tree_leaves(grads), _tree.tree_leaves(diag)
    for j in idx:
        out[j] = g[j] / (d[j] + shift)
    return _tree.tree_unflatten(_tree.tree_structure(solved), out)
