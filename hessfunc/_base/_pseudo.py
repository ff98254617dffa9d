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
zero gradient for them is the true derivative. Its kernel has no second derivatives at all
(neither forward-mode AD nor a double backward), so ``"sum"`` and ``"mean"`` bags are computed
by a lookup and a membership-matrix product instead (:func:`_bag_sum_or_mean`); ``"max"`` keeps
the kernel, and a second-order product through it is refused with hessfunc's error for a missing
derivative.
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


def _bag_sum_or_mean(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    mean: bool,
    per_sample_weights: torch.Tensor | None,
    include_last_offset: bool,
    padding_idx: int | None,
) -> torch.Tensor:
    """A bag reduction in plain lookup and a matrix product, which have derivatives of every order.

    torch's ``embedding_bag`` kernel has neither forward-mode AD nor a double backward (torch
    2.13), so no second-order product could go through ``nn.EmbeddingBag``. Entries equal to
    ``padding_idx`` are left out of the sum and of the count, as torch does; an empty bag gives
    zeros. ``offsets`` must be sorted (torch requires it too).
    """
    bags = offsets.numel() - (1 if include_last_offset else 0)
    starts = offsets[:bags]
    position = torch.arange(indices.numel(), device=indices.device)
    bag = torch.searchsorted(starts, position, right=True) - 1
    rows = torch.embedding(weight, indices)
    keep = torch.ones_like(indices, dtype=weight.dtype)
    if padding_idx is not None and padding_idx >= 0:
        keep = (indices != padding_idx).to(weight.dtype)
    if include_last_offset:  # entries past the last offset belong to no bag
        keep = keep * (position < offsets[-1]).to(weight.dtype)
    scale = keep if per_sample_weights is None else keep * per_sample_weights
    bag = bag.clamp(0, max(bags - 1, 0))
    # Which entry goes to which bag, as a (bags, entries) matrix, and the reduction as a matrix
    # product: forward-over-reverse through index_add (a scatter) compiled by inductor came out
    # 10-20% wrong on torch 2.13 CPU (the compile zoo's padded_embeddings, ggn_vp fwd-rev), where
    # a product is right. Memory: bags x entries, the size of the index tensor times the bags.
    member = (bag[None, :] == torch.arange(bags, device=bag.device)[:, None]).to(weight.dtype)
    out = (member * scale) @ rows
    if mean:
        count = member @ keep
        out = out / count.clamp(min=1)[:, None]
    return out


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
    """``F.embedding_bag``: sums and means through :func:`_bag_sum_or_mean`, with the plain
    (true) derivative for ``scale_grad_by_freq``; ``max_norm`` refused; ``"max"`` and inputs
    the composite does not cover keep torch's kernel."""
    if max_norm is not None:
        raise PseudoGradient(_MAX_NORM.format(name="F.embedding_bag", max_norm=max_norm))
    if padding_idx is not None and padding_idx < 0:
        padding_idx = padding_idx + weight.shape[0]
    # torch accepts per_sample_weights with "sum" only (and raises for "mean"): leave that to it
    plain = mode == "sum" or (mode == "mean" and per_sample_weights is None)
    if plain and weight.dim() == 2 and input.dim() in (1, 2):
        if input.dim() == 2 and offsets is None:
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, max(length, 1), device=input.device)
            input = input.reshape(-1)
            include_last_offset = False
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        if input.dim() == 1 and offsets is not None and offsets.dim() == 1:
            return _bag_sum_or_mean(
                weight,
                input,
                offsets,
                mode == "mean",
                per_sample_weights,
                include_last_offset,
                padding_idx,
            )
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
