"""Embedding lookups whose backward is not the derivative of their forward.

Three options of ``F.embedding`` / ``nn.Embedding`` (and of ``F.embedding_bag``) make autograd
return a *pseudo-gradient*, a backward formula that is deliberately not the derivative of the
forward value:

* ``padding_idx=p``: the forward reads row ``p`` like any other row, the backward zeroes its
  gradient. Differentiating that gradient once more gives no symmetric matrix at all:
  forward-over-reverse computes ``P H v`` and reverse-over-reverse ``H P v`` (``P`` zeroes row
  ``p``), so the two modes disagree and ``hessian_matrix`` is not symmetric, whenever the
  padding row reaches the loss (mean pooling over every position, an encoder without an
  attention mask, a padding id that is also content).
* ``scale_grad_by_freq=True``: the backward divides each row's gradient by how often its index
  occurs in the batch. No function of the weight has that gradient.
* ``max_norm``: the forward renormalises the looked-up rows *in place* under ``no_grad`` and the
  backward ignores the renormalisation.

hessfunc reads each as follows while it evaluates ``f`` for a derivative (``_decomp`` routes the
calls here):

* ``padding_idx``: the padding row is held constant, as training holds it (its gradient is zero
  there too). The lookup reads a weight whose row ``p`` is detached, so every product is a
  derivative of one function, ``w -> f(w with row p frozen at its current value)``: the Hessian
  is ``P H P``, the GGN ``P G P``, the gradient ``P g`` (torch's own), and both modes agree.
* ``scale_grad_by_freq``: the plain lookup, whose derivative is the true derivative of the value
  ``f`` computes (the rescaling is an optimiser heuristic, not part of the function).
* ``sparse=True``: a dense gradient (the layout of a gradient is no part of the mathematics).
* ``max_norm``: refused with :class:`PseudoGradient`; the in-place renormalisation would also
  change the caller's parameters, which no hessfunc function may do.

``F.embedding_bag`` already leaves the padding entries out of its forward reduction, so its
zero gradient for them is the true derivative and needs no change.
"""

from __future__ import annotations

from typing import Any

import torch


class PseudoGradient(NotImplementedError):
    """An op in ``f`` whose backward is not the derivative of its forward, and that hessfunc
    cannot read as a derivative of one function."""


_MAX_NORM = (
    "{name}(..., max_norm={max_norm}) renormalises the looked-up rows of the weight in place "
    "during the forward and its backward ignores the renormalisation, so no Hessian describes "
    "it (and the in-place write would change the parameters passed in). Renormalise the weight "
    "once beforehand (under torch.no_grad(), e.g. by one ordinary forward call) and construct "
    "the embedding with max_norm=None for the second-order computation."
)


def held_padding_row(weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """``weight`` with row ``padding_idx`` detached (held constant), the same values.

    Built from a comparison against a Python int, so it holds under ``vmap``, ``jvp``, ``grad``
    and ``torch.compile(fullgraph=True)`` (no data-dependent control flow).
    """
    if padding_idx is None:
        return weight
    rows = weight.shape[0]
    p = padding_idx + rows if padding_idx < 0 else padding_idx
    keep = torch.arange(rows, device=weight.device) != p
    keep = keep.reshape((rows,) + (1,) * (weight.dim() - 1))
    return torch.where(keep, weight, weight.detach())


def embedding(
    weight: torch.Tensor,
    indices: torch.Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """``aten::embedding`` (``torch.embedding``): the aten convention, ``-1`` is no padding."""
    if padding_idx is not None and padding_idx >= 0:
        weight = held_padding_row(weight, padding_idx)
    return torch.embedding(weight, indices)


def F_embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """``F.embedding``: negative ``padding_idx`` counts from the end, ``None`` is no padding."""
    if max_norm is not None:
        raise PseudoGradient(_MAX_NORM.format(name="F.embedding", max_norm=max_norm))
    if padding_idx is not None:
        weight = held_padding_row(weight, padding_idx)
    return torch.embedding(weight, input)


def embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Any:
    """``aten::embedding_bag`` / ``aten::_embedding_bag``: the plain lookup, dense gradient."""
    return torch.embedding_bag(
        weight,
        indices,
        offsets,
        False,
        mode,
        False,
        per_sample_weights,
        include_last_offset,
        padding_idx,
    )


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False, *rest):
    return torch._embedding_bag(weight, indices, offsets, False, mode, False, *rest)


def F_embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """``F.embedding_bag`` with the plain (true) derivative; ``max_norm`` refused."""
    if max_norm is not None:
        raise PseudoGradient(_MAX_NORM.format(name="F.embedding_bag", max_norm=max_norm))
    return torch.nn.functional.embedding_bag(
        input,
        weight,
        offsets,
        None,
        norm_type,
        False,
        mode,
        False,
        per_sample_weights,
        include_last_offset,
        padding_idx,
    )
