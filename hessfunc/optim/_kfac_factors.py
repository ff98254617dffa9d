r"""The running Kronecker factors of the K-FAC optimizer, and the preconditioner they give.

The optimizer keeps, per block of :func:`hessfunc.kfac`, the averaged factors
:math:`\bar A, \bar G` and their eigendecompositions :math:`\bar A = Q_A \Lambda_A Q_A^\top`,
:math:`\bar G = Q_G \Lambda_G Q_G^\top`. They are stored in trees shaped like ``params`` so
that the state is a plain nested dict of tensors: a block's tensor sits at its weight leaf (its
bias leaf if it has no weight; the experts of a stacked leaf are concatenated along the group
axis) and every other leaf holds an empty ``(0,)`` placeholder. This module packs and unpacks
those trees, folds a batch's factors into the averages, eigendecomposes them every
``invert_every`` steps (a ``torch.cond`` on the step count, so one compiled graph serves every
step) and applies the damped inverse

.. math:: (\bar G \otimes \bar A + \lambda I)^{-1} g
   = Q_G \left[ \frac{Q_G^\top\, g\, Q_A}{\Lambda_G \Lambda_A^\top + \lambda} \right] Q_A^\top

exactly in the eigenbasis (Tikhonov damping on K, not the factored "pi" approximation).
"""

from __future__ import annotations

from typing import Any

import torch

from .._base import _tree
from .._base._types import PyTree
from ..kron import _kron
from ..kron._layers import Layout

__all__ = ["FACTORS", "average", "check_layout", "eigen", "empty", "pack", "precondition"]

FACTORS = ("A", "G", "A_values", "A_vectors", "G_values", "G_vectors")
"""The factor trees of the state: the averages and their eigendecompositions."""


def empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder of a leaf that holds no factor (shape ``(0,)``)."""
    return torch.zeros(0, dtype=like.dtype, device=like.device)


def slots(layout: Layout) -> dict[int, list[int]]:
    """Per parameter leaf, the blocks whose factors it stores.

    A block's weight leaf, else its bias leaf; the experts of a stacked leaf share it,
    concatenated along the group axis.
    """
    out: dict[int, list[int]] = {}
    for i, b in enumerate(layout.blocks):
        out.setdefault(b.weight if b.weight is not None else b.bias, []).append(i)
    return out


def pack(params: PyTree, layout: Layout, per_block: list[torch.Tensor]) -> PyTree:
    """Per-block tensors as a tree shaped like ``params`` (placeholders elsewhere)."""
    leaves = _tree.tree_leaves(params)
    where = slots(layout)
    out = [
        torch.cat([per_block[i] for i in where[j]]) if j in where else empty(x)
        for j, x in enumerate(leaves)
    ]
    return _tree.tree_unflatten(_tree.tree_structure(params), out)


def unpack(tree: PyTree, layout: Layout) -> list[torch.Tensor]:
    """The inverse of :func:`pack`: per block its tensor."""
    leaves = _tree.tree_leaves(tree)
    per_block: list[Any] = [None] * len(layout.blocks)
    for j, idx in slots(layout).items():
        parts = torch.split(leaves[j], [layout.blocks[i].groups for i in idx])
        for i, part in zip(idx, parts, strict=True):
            per_block[i] = part
    return per_block


def check_layout(where: str, stored: PyTree, layout: Layout) -> None:
    """Raise if the stored factor tree ``stored`` was made for other layers than ``layout``."""
    where_ = slots(layout)
    for j, x in enumerate(_tree.tree_leaves(stored)):
        want = (
            sum(layout.blocks[i].groups for i in where_[j]) if j in where_ else 0,
            layout.blocks[where_[j][0]].size if j in where_ else None,
        )
        got = (x.shape[0], x.shape[-1] if j in where_ and x.dim() == 3 else None)
        if x.dim() not in (1, 3) or got != want:
            raise ValueError(
                f"{where}: the state's factors do not match the layers of model_fn "
                "(another model or structure); call init(params) for this model."
            )


def average(old: list[torch.Tensor], new: tuple, ema: float) -> list[torch.Tensor]:
    r""":math:`\epsilon\,\text{old} + (1 - \epsilon)\,\text{new}` per block."""
    return [o + (1.0 - ema) * (n - o) for o, n in zip(old, new, strict=True)]


def _decompose(A, G, *_):  # noqa: N803
    ea = [torch.linalg.eigh(a) for a in A]
    eg = [torch.linalg.eigh(g) for g in G]
    return (
        [x.contiguous() for x, _ in ea], [q.contiguous() for _, q in ea],
        [x.contiguous() for x, _ in eg], [q.contiguous() for _, q in eg],
    )  # fmt: skip


def _keep(A, G, va, qa, vg, qg):  # noqa: N803
    return (
        [x.clone() for x in va],
        [x.clone() for x in qa],
        [x.clone() for x in vg],
        [x.clone() for x in qg],
    )


def eigen(
    A: list[torch.Tensor],  # noqa: N803
    G: list[torch.Tensor],  # noqa: N803
    old: list[list[torch.Tensor]] | None,
    due: torch.Tensor | None,
) -> tuple[list, list, list, list]:
    """``(A_values, A_vectors, G_values, G_vectors)`` per block.

    Freshly computed when ``old`` is None (the first step), else the stored ``old`` unless the
    0-d bool ``due`` is true (a ``torch.cond``: both branches are in the compiled graph).
    """
    if old is None:
        return _decompose(A, G)
    return torch.cond(due, _decompose, _keep, (A, G, *old))


def precondition(
    where: str,
    layout: Layout,
    eig_a: list[tuple[torch.Tensor, torch.Tensor]],
    eig_g: list[tuple[torch.Tensor, torch.Tensor]],
    g: PyTree,
    lam: torch.Tensor,
) -> PyTree:
    r""":math:`(\bar G \otimes \bar A + \lambda I)^{-1} g` per block, :math:`g / \lambda` else."""

    def block(i: int, m: torch.Tensor) -> torch.Tensor:
        la, qa = eig_a[i]
        lg, qg = eig_g[i]
        denom = lg.unsqueeze(-1) * la.unsqueeze(-2) + lam
        return qg @ ((qg.mT @ m @ qa) / denom) @ qa.mT

    return _kron.blockwise(where, layout, g, "g", block, lambda x: x / lam)
