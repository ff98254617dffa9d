r"""Shared machinery of the Kronecker-factored approximations (``kfac``, ``ekfac``).

:func:`collect` runs the model once to find its layers (``_layers``) and once more with a zero
probe added to every layer output, under ``vjp``; pulling back output-space columns gives each
layer's output gradients. The columns define the Fisher type:

- ``"type-2"``: the columns of a square root of each row's output Hessian, :math:`\sum_j u_j
  u_j^\top = \nabla^2_{f_i} \ell_i` (closed forms: diagonal for element-wise losses,
  :math:`s_i(\operatorname{diag}(p) - p p^\top)` factored for cross-entropy);
- ``"mc"``: per-row gradients of the loss at targets drawn from the predictive distribution,
  weighted :math:`1/S`;
- ``"empirical"``: per-row gradients at the observed targets.

Every quantity is a sum over rows of the *unreduced* per-sample losses :math:`\ell_i`; the
reduction's factor enters once, as the number of loss terms a ``"mean"`` divides by, so sums
over batches and processes stay exact.

Block-wise products over parameter pytrees (:func:`blockwise`) and the dense assembly
(:func:`dense`) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch.func import vjp, vmap

from .._base import _checks, _context, _memory, _outputs, _tree
from .._base._types import PyTree
from ..losses import CrossEntropyLoss, GaussianNLLLoss, Loss, NLLLoss, _ElementwiseLoss
from . import _layers
from ._layers import SUPPORTED, Block, Call, Layout, Recorder, block_grads, block_inputs, plan

Fisher = Literal["type-2", "mc", "empirical"]
FISHERS = ("type-2", "mc", "empirical")


def check(
    where: str,
    model_fn: Any,
    loss: Any,
    params: Any,
    fisher: Any,
    generator: Any,
    noise: Any,
    mc_samples: Any,
    separate_bias: Any,
    chunk_size: Any,
) -> None:
    """Validate the arguments shared by ``kfac`` and ``ekfac`` (structure and types only)."""
    if not callable(model_fn):
        raise TypeError(
            f"{where}: model_fn must be callable as model_fn(params, *args) -> outputs, got "
            f"{type(model_fn).__name__}."
        )
    if not isinstance(loss, Loss):
        raise TypeError(
            f"{where}: loss_fn must be a hessfunc.losses object (e.g. "
            f"hessfunc.losses.CrossEntropyLoss(targets)), got {type(loss).__name__}: the "
            "Kronecker factors need the loss's per-sample structure and output curvature."
        )
    if fisher not in FISHERS:
        raise ValueError(
            f"{where}: unknown fisher={fisher!r}; expected 'type-2' (exact output curvature), "
            "'mc' (sampled targets) or 'empirical' (observed targets)."
        )
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"{where}: mc_samples must be a positive int, got {mc_samples!r}.")
    if fisher != "mc":
        if generator is not None or noise is not None or mc_samples != 1:
            raise ValueError(
                f"{where}: generator, noise and mc_samples are only used with fisher='mc'; "
                f"fisher={fisher!r} is deterministic. Drop them or pass fisher='mc'."
            )
    else:
        _checks.check_random_source(where, "fisher='mc'", generator, noise)
    if not isinstance(separate_bias, bool):
        raise TypeError(f"{where}: separate_bias must be a bool, got {separate_bias!r}.")
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)


# Bytes of output gradients one vectorised pull-back may hold when ``chunk_size`` is None, and
# of unfolded layer inputs one step of the input sums may hold (at least one column, one sample).
CHUNK_BYTES = 1 << 22


class Pass(NamedTuple):
    """One batch seen through the model: each block's calls and, per chunk, its gradients.

    The layer inputs are kept as the model produced them (a convolution's input, not its
    patches); :func:`input_sums` and :func:`block_inputs_of` unfold them when asked.
    """

    layout: Layout
    calls: tuple[tuple[Call, ...], ...]
    """Per block its calls, each holding the layer's input ``x``."""
    mask: torch.Tensor | None
    """The loss's row mask (ignored rows are zero), or None when every row counts."""
    chunks: int
    grads: Callable[[int], tuple[tuple[torch.Tensor, ...], ...]]
    """Chunk -> per block, per call: ``(k, N, P, groups, out_features)``."""
    release: Callable[[], None]
    """Drop the forward pass's saved tensors; ``grads`` cannot be called afterwards."""
    weight: float
    """Weight of every column (``1 / mc_samples`` for ``"mc"``, else 1)."""
    loss_terms: torch.Tensor | None
    """Number of loss terms a ``"mean"`` reduction divides by (0-d int64); None for ``"sum"``."""
    rows: int
    """Rows (samples) of the model's outputs."""
    positions: tuple[torch.Tensor, ...]
    """Per block the number of input rows that count (0-d int64): padded rows excluded."""


def _loss_terms(loss: Loss, out: torch.Tensor) -> torch.Tensor | None:
    if getattr(loss, "reduction", "mean") == "sum":
        return None
    return loss._mean_terms(out)


def _sqrt_columns(
    where: str, loss: Loss, out: torch.Tensor
) -> tuple[int, Callable[[int, int], torch.Tensor]]:
    r"""``(K, make)``: ``make(a, b)`` gives columns ``a..b-1`` of every row's Hessian root.

    Column ``j`` is shaped like the outputs; over all ``K`` columns, row ``i`` satisfies
    :math:`\sum_j u_j[i] u_j[i]^\top = \nabla^2_{f_i} \ell_i` (unreduced).
    """
    if isinstance(loss, CrossEntropyLoss):
        # H_i = s_i (diag(p) - p p^T) = S S^T with S[:, j] = sqrt(s_i) (e_j - p) sqrt(p_j),
        # because sum_j p_j = 1.
        p = torch.softmax(out, dim=-1)
        root_p = p.sqrt()
        # s_i: probability targets need not sum to one; an ignored index row has s_i = 0
        s = loss._row_weights(out).sqrt()
        eye = torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)

        def make(a: int, b: int) -> torch.Tensor:
            u = (eye[a:b].unsqueeze(1) - p.unsqueeze(0)) * root_p.T[a:b].unsqueeze(-1)
            return u * s

        return out.shape[-1], make
    if isinstance(loss, NLLLoss):  # linear in the outputs: no curvature
        return 1, lambda a, b: torch.zeros((b - a, *out.shape), dtype=out.dtype, device=out.device)
    if isinstance(loss, (_ElementwiseLoss, GaussianNLLLoss)):
        # diagonal output Hessian: the root is its element-wise square root, one column per
        # element of a row
        diag = loss.hvp(out, torch.ones_like(out)) / loss.scale(out)
        root = diag.clamp(min=0).sqrt()
        rows = out.shape[0] if out.dim() > 0 else 1
        per_row = out.numel() // max(rows, 1)
        rest = tuple(out.shape[1:])
        eye = torch.eye(per_row, dtype=out.dtype, device=out.device)

        def make(a: int, b: int) -> torch.Tensor:
            return eye[a:b].reshape(b - a, 1, *rest) * root.unsqueeze(0)

        return per_row, make
    raise TypeError(
        f"{where}: fisher='type-2' has no output-Hessian square root for "
        f"{type(loss).__name__}; use fisher='mc' or 'empirical'."
    )


def _columns(
    where: str,
    loss: Loss,
    out: torch.Tensor,
    fisher: str,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    mc_samples: int,
) -> tuple[int, float, Callable[[int, int], torch.Tensor]]:
    """``(K, weight, make)``: the output-space columns that define the Fisher type."""
    if fisher == "empirical":
        r = loss.output_grads(out)
        return 1, 1.0, lambda a, b: r.unsqueeze(0)
    if fisher == "mc":
        shape = (mc_samples, *loss.noise_shape(out))
        u = noise
        if u is None:
            u = torch.rand(shape, generator=generator, dtype=out.dtype, device=generator.device)
            u = u.to(out.device)
        elif tuple(u.shape) != shape:
            raise ValueError(
                f"{where}: noise has shape {tuple(u.shape)}; expected (mc_samples, "
                f"*loss_fn.noise_shape(outputs)) = {shape}."
            )
        rows = vmap(
            lambda ui: loss.predictive(loss.sample_from_uniform(out, ui)).output_grads(out)
        )(u.to(out.dtype))
        return mc_samples, 1.0 / mc_samples, lambda a, b: rows[a:b]
    k, make = _sqrt_columns(where, loss, out)
    return k, 1.0, make


def collect(
    where: str,
    model_fn: Callable[..., Any],
    loss: Loss,
    params: PyTree,
    args: tuple[Any, ...],
    *,
    fisher: str,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    mc_samples: int,
    separate_bias: bool,
    chunk_size: int | None,
) -> Pass:
    """Find the layers, run the probed forward, and prepare the pullbacks of the columns."""
    leaves = _tree.tree_leaves(params)
    paths = _tree.tree_paths(params)
    if not torch.compiler.is_compiling() and len({id(t) for t in leaves}) != len(leaves):
        raise ValueError(
            f"{where}: params holds the same tensor twice; list a tied weight once (as "
            "hessfunc.from_module does)."
        )
    calls: list[Call] = []
    others: dict[int, str] = {}
    with _context.attention_fastpath_off(), Recorder(leaves, calls, others):
        model_fn(params, *args)
    layout, block_calls = plan(where, calls, others, leaves, paths, separate_bias)
    if not layout.blocks:
        reasons = "; ".join(f"{p}: {why}" for p, why in layout.uncovered)
        raise ValueError(
            f"{where}: no leaf of params is the weight or bias of a {SUPPORTED} call inside "
            f"model_fn, so there is nothing to factor ({reasons}). Kronecker factors exist for "
            "parameters that enter model_fn as layer weights; use hessfunc.ggn_vp for others."
        )
    # The probes are zeros broadcast from one element: their gradients are what the pull-backs
    # return, and nothing of their own size is allocated.
    probes = [
        torch.zeros((), dtype=c.x.dtype, device=c.x.device).expand(c.out_shape) for c in calls
    ]
    calls = [c._replace(x=None) for c in calls]  # the first run's inputs are not needed again

    flat = _outputs.Flattener(where, lambda p: model_fn(p, *args))

    def forward(pr: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        again: list[Call] = []
        with _context.attention_fastpath_off(), Recorder(leaves, again, {}, pr):
            out = flat.call(params)
        if len(again) != len(calls):
            raise RuntimeError(
                f"{where}: model_fn called {len(again)} layers on the second run and "
                f"{len(calls)} on the first; Kronecker factors need a deterministic model_fn "
                "(the same layers on every call)."
            )
        return out, [c.x for c in again]

    full, pull_full, xs = vjp(forward, probes, has_aux=True)
    out, embed = flat.loss_view(full)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{where}: model_fn must return one tensor of outputs (samples along axis 0), or a "
            f"container whose 'logits' entry is that tensor; got {type(out).__name__}."
        )
    # the pull-back holds the forward pass's saved tensors: kept in a list that `release`
    # empties, so they are freed once the gradients are summed
    held = [pull_full]
    del pull_full

    def pullback(c: torch.Tensor) -> Any:
        return held[0](embed(c))

    calls = [c._replace(x=x) for c, x in zip(calls, xs, strict=True)]
    k, weight, make = _columns(where, loss, out, fisher, generator, noise, mc_samples)
    step = default_chunk(k, calls, out.dtype) if chunk_size is None else min(chunk_size, k)
    bounds = [(a, min(a + step, k)) for a in range(0, k, step)]

    def grads(i: int) -> tuple[tuple[torch.Tensor, ...], ...]:
        a, b = bounds[i]
        if b - a == 1:  # one column: a plain pull-back, without vmap's batching rules
            per_call = [g.unsqueeze(0) for g in pullback(make(a, b)[0])[0]]
        else:
            per_call = vmap(pullback)(make(a, b))[0]
        return tuple(
            tuple(block_grads(block, calls[c], per_call[c]) for c in ks)
            for block, ks in zip(layout.blocks, block_calls, strict=True)
        )

    rows = out.shape[0] if out.dim() > 0 else 1
    mask = loss._row_mask(out)
    per_block = tuple(tuple(calls[c] for c in ks) for ks in block_calls)
    positions = tuple(sum(_count(c, mask) for c in cs) for cs in per_block)
    return Pass(
        layout, per_block, mask, len(bounds), grads, held.clear, weight, _loss_terms(loss, out),
        rows, positions,
    )  # fmt: skip


def default_chunk(k: int, calls: list[Call], dtype: torch.dtype) -> int:
    """Columns per pull-back when ``chunk_size`` is None: their output gradients fit
    :data:`CHUNK_BYTES` (at least one column, at most all ``k``)."""
    per_column = sum(math.prod(c.out_shape) for c in calls) * _itemsize(dtype)
    return max(1, min(k, CHUNK_BYTES // max(per_column, 1)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int, p: int, mask: torch.Tensor | None) -> bool:
    """Whether a layer's ``N * P`` input rows are the loss's rows (one token each)."""
    return mask is not None and n * p == mask.shape[0]


def _count(call: Call, mask: torch.Tensor | None) -> torch.Tensor:
    n, p = _layers.samples_positions(call)
    if not _aligned(n, p, mask):
        return torch.tensor(n * p, device=call.x.device)
    return (mask != 0).sum()


def _input_chunks(call: Call, rows: int | None) -> list[tuple[int, int]]:
    """Sample ranges ``[a, b)`` of one call's input, ``rows`` samples each (None: one range)."""
    n, _ = _layers.samples_positions(call)
    shape = call.out_shape
    batched = len(shape) >= 2 if call.dims == 0 else len(shape) == call.dims + 2
    step = n if rows is None or not batched else max(1, min(rows, n))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _input_chunk(
    block: Block, call: Call, mask: torch.Tensor | None, a: int, b: int
) -> torch.Tensor:
    """The block's inputs of samples ``a..b-1`` in one call, ``(b - a, P, groups, size)``.

    Rows of ignored loss rows (``ignore_index``) are zero, where the layer's ``N * P`` rows are
    the loss's rows (per-token layers of a language model whose logits are flattened to
    ``(B T, V)``); elsewhere every row counts.
    """
    n, p = _layers.samples_positions(call)
    part = call if (a, b) == (0, n) else call._replace(
        x=call.x[a:b], out_shape=(b - a, *call.out_shape[1:])
    )  # fmt: skip
    x = block_inputs(block, part)
    if not _aligned(n, p, mask):
        return x
    m = mask.reshape(n, p)[a:b].reshape(b - a, p, 1, 1).to(x.dtype)
    if call.dims > 0 or block.bias is not None:  # a new tensor (patches or a concatenation)
        return x.mul_(m)
    return x * m  # a view of the layer's input: not overwritten


def block_inputs_of(p: Pass, i: int) -> tuple[torch.Tensor, ...]:
    """Block ``i``'s inputs, per call ``(N, P, groups, size)`` (ignored rows zero)."""
    block = p.layout.blocks[i]
    out = []
    for c in p.calls[i]:
        n, _ = _layers.samples_positions(c)
        out.append(_input_chunk(block, c, p.mask, 0, n))
    return tuple(out)


def _gram_into(acc: torch.Tensor, v: torch.Tensor) -> None:
    r"""``acc += \sum v v^T`` over every axis but the last two of ``v`` (``(..., groups, m)``).

    Accumulated in place: no ``(groups, m, m)`` temporary. A view when ``v`` is contiguous;
    otherwise (a convolution's gradients or patches) one copy of ``v``.
    """
    groups, m = v.shape[-2], v.shape[-1]
    flat = v.reshape(-1, groups, m).permute(1, 2, 0)  # (groups, m, rows)
    acc.baddbmm_(flat, flat.mT)


def input_sums(p: Pass) -> tuple[torch.Tensor, ...]:
    r"""Per block :math:`\sum a a^\top`, ``(groups, size, size)``, unfolding a chunk at a time.

    A chunk holds as many samples as fit :data:`CHUNK_BYTES` of unfolded inputs (at least one),
    so a convolution's patches are never formed for the whole batch at once.
    """
    sums = []
    for block, calls in zip(p.layout.blocks, p.calls, strict=True):
        ref = calls[0].x
        acc = torch.zeros(block.groups, block.size, block.size, dtype=ref.dtype, device=ref.device)
        for c in calls:
            n, positions = _layers.samples_positions(c)
            rows = None  # a linear layer's own input, as a view: nothing to bound
            if c.dims > 0 or block.bias is not None or _aligned(n, positions, p.mask):
                per_sample = positions * block.groups * block.size * _itemsize(ref.dtype)
                rows = max(1, CHUNK_BYTES // max(per_sample, 1))
            for a, b in _input_chunks(c, rows):
                _gram_into(acc, _input_chunk(block, c, p.mask, a, b))
        sums.append(acc)
    return tuple(sums)


def grad_sums_into(sums: list[torch.Tensor], grads: tuple[tuple[torch.Tensor, ...], ...]) -> None:
    r"""Add each block's :math:`\sum g g^\top` of one chunk of columns to ``sums`` in place."""
    for acc, calls in zip(sums, grads, strict=True):
        for g in calls:
            _gram_into(acc, g)


# ------------------------------------------------------------------------------ block algebra


def gather(block: Block, leaves: list[torch.Tensor]) -> torch.Tensor:
    """A block's parameters (or a vector like them) as ``(groups, out_features, size)``."""
    g, o = block.groups, block.out_features
    parts = []
    if block.weight is not None:
        w = leaves[block.weight]
        if block.expert is not None:  # one expert's slice of a stacked weight
            w = w[block.expert]
        if block.transposed:  # stored (in, out): the block is over W.T
            w = w.mT
        parts.append(w.reshape(g, o, block.in_features))
    if block.bias is not None:
        parts.append(leaves[block.bias].reshape(g, o, 1))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def blockwise(
    where: str,
    layout: Layout,
    tree: PyTree,
    name: str,
    block_fn: Callable[[int, torch.Tensor], torch.Tensor],
    uncovered_fn: Callable[[torch.Tensor], torch.Tensor],
) -> PyTree:
    """Apply ``block_fn(i, matrices)`` to every block of ``tree``, ``uncovered_fn`` elsewhere."""
    leaves = layout.check(where, name, tree)
    out: list[torch.Tensor | None] = [None] * len(leaves)
    experts: dict[int, dict[int, torch.Tensor]] = {}
    for i, block in enumerate(layout.blocks):
        m = block_fn(i, gather(block, leaves))
        d = block.in_features
        if block.weight is not None:
            w = m[..., :d].reshape(block.out_features, d) if block.transposed else m[..., :d]
            w = w.mT if block.transposed else w
            if block.expert is None:
                out[block.weight] = w.reshape(leaves[block.weight].shape)
            else:
                shape = leaves[block.weight].shape[1:]
                experts.setdefault(block.weight, {})[block.expert] = w.reshape(shape)
        if block.bias is not None:
            out[block.bias] = m[..., d].reshape(leaves[block.bias].shape)
    for w, done in experts.items():  # experts no token reached: as uncovered leaves
        x = leaves[w]
        out[w] = torch.stack([done.get(e, uncovered_fn(x[e])) for e in range(x.shape[0])])
    out = [uncovered_fn(x) if y is None else y for x, y in zip(leaves, out, strict=True)]
    return _tree.tree_unflatten(_tree.tree_structure(tree), out)


def dense(
    where: str,
    layout: Layout,
    blocks: list[torch.Tensor],
    max_bytes: int | None,
) -> torch.Tensor:
    """The ``(n, n)`` matrix in ``ravel`` order from per-block ``(groups, m, m)`` matrices.

    Leaves that no block covers get zero rows and columns.
    """
    n = sum(int(torch.Size(s).numel()) for s in layout.shapes)
    ref = blocks[0]
    need = n * n * ref.element_size()
    if max_bytes is None and not torch.compiler.is_compiling():
        max_bytes = int(_memory.DEFAULT_SHARE * _memory.available_bytes(ref.device))
    if max_bytes is not None and need > max_bytes:
        raise MemoryError(
            f"{where}: a dense {n} x {n} matrix needs {need / 2**30:.3g} GiB, over the budget "
            f"of {max_bytes / 2**30:.3g} GiB. Use .matvec (no dense matrix) or raise max_bytes."
        )
    offsets, start = [], 0
    for s in layout.shapes:
        offsets.append(start)
        start += int(torch.Size(s).numel())
    out = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
    for block, m in zip(layout.blocks, blocks, strict=True):
        g, o, d = block.groups, block.out_features, block.in_features
        q = torch.arange(g, device=ref.device).reshape(g, 1, 1)
        r = torch.arange(o, device=ref.device).reshape(1, o, 1)
        j = torch.arange(block.size, device=ref.device).reshape(1, 1, -1)
        row = q * o + r
        # entry (row, j) of the (out, in) arrangement; a transposed weight stores it at (j, row)
        at = j * o + row if block.transposed else row * d + j
        if block.expert is not None:  # the slice's place inside the stacked leaf
            at = at + block.expert * g * o * d
        if block.weight is not None and block.bias is not None:
            idx = torch.where(j < d, offsets[block.weight] + at, offsets[block.bias] + row + 0 * j)
        elif block.weight is not None:
            idx = offsets[block.weight] + at
        else:
            idx = offsets[block.bias] + row + 0 * j
        idx = idx.reshape(-1)
        out[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.block_diag(*m.unbind(0))
    return out


def check_damping(where: str, damping: Any) -> None:
    _checks.check_damping(where, damping)


# ------------------------------------------------------------------- checks of matvec / solve


@_tree.register_static
@dataclass(frozen=True)
class Options:
    """How a Kronecker approximation was built: what two of them must share to be added.

    Travels in the result as a pytree node without leaves (like the layout), so sums over
    batches and processes keep it, and only equal options combine.
    """

    fisher: str
    loss: str
    """The loss's class name (its output curvature defines the factors)."""

    def describe(self) -> str:
        return f"fisher={self.fisher!r}, {self.loss}"


def options(fisher: str, loss: Loss) -> Options:
    return Options(fisher, type(loss).__name__)


def check_vector(where: str, layout: Layout, tree: PyTree, name: str, dtype: torch.dtype) -> None:
    """``tree`` is a vector like the parameters, matched by name, in the factors' dtype.

    The names are compared with the layout's before the shapes, so a dict holding the leaves
    in another order (two layers of one shape) is refused instead of being multiplied by the
    other layer's factors.
    """
    _checks.check_paths(where, layout.paths, tree, name, "params")
    leaves = layout.check(where, name, tree)
    covered = {i for b in layout.blocks for i in (b.weight, b.bias) if i is not None}
    for i, (path, leaf) in enumerate(zip(layout.paths, leaves, strict=True)):
        if i in covered and leaf.dtype != dtype:
            raise TypeError(
                f"{where}: {name}{path} has dtype {leaf.dtype} but the factors are {dtype}; "
                f"cast {name} with .to({dtype}) (or build the factors in {leaf.dtype})."
            )


def check_invertible(
    where: str,
    layout: Layout,
    damping: Any,
    eigenvalues: Callable[[], tuple[torch.Tensor, ...]],
) -> None:
    """Refuse an undamped solve with a singular operator (eager code only).

    With ``damping == 0`` a zero (or negative, rounding) eigenvalue, or a leaf no block covers,
    makes the solve divide by zero: the result would be ``inf``, ``nan`` or 1e30-sized numbers.
    Reading the eigenvalues is a host synchronisation, so it is skipped under torch.compile.
    """
    if torch.compiler.is_compiling():
        return
    if isinstance(damping, torch.Tensor):
        if damping.requires_grad or bool(damping != 0):
            return
    elif damping != 0:
        return
    if layout.uncovered_paths:
        raise ValueError(
            f"{where}: damping is 0 but no block covers {', '.join(layout.uncovered_paths)}, "
            "where the operator is zero; pass damping > 0."
        )
    for block, ev in zip(layout.blocks, eigenvalues(), strict=True):
        top = ev.abs().max()
        floor = torch.finfo(ev.dtype).eps * ev[0].numel() * top
        if not bool((ev > floor).all()):
            raise ValueError(
                f"{where}: damping is 0 but the block {'+'.join(block.names)} is singular "
                f"(smallest eigenvalue {float(ev.min()):.3g}, largest {float(top):.3g}; with "
                "fewer samples than input features the input factor always is). Pass damping "
                "> 0, e.g. 1e-3 times the largest eigenvalue."
            )


def normalise_grads(s: torch.Tensor, loss_terms: torch.Tensor | None) -> torch.Tensor:
    return s if loss_terms is None else s / loss_terms.to(s.dtype)


def add_results(where: str, a: Any, b: Any) -> Any:
    """Leafwise sum of two results of one type, layouts and reductions checked first."""
    if type(b) is not type(a):
        raise TypeError(f"{where}: other must be a {type(a).__name__}, got {type(b).__name__}.")
    layout_a = getattr(a, "layout", None)
    if layout_a is not None and layout_a != b.layout:
        names_a = [x.names for x in layout_a.blocks]
        names_b = [x.names for x in b.layout.blocks]
        if names_a == names_b and layout_a.paths == b.layout.paths:
            # same names: say what differs (shapes), not two identical lists of names
            diff = (
                [
                    f"{path}: {sa} vs {sb}"
                    for path, sa, sb in zip(
                        layout_a.paths, layout_a.shapes, b.layout.shapes, strict=True
                    )
                    if sa != sb
                ]
                or [
                    f"{'+'.join(x.names)}: {x} vs {y}"
                    for x, y in zip(layout_a.blocks, b.layout.blocks, strict=True)
                    if x != y
                ]
                or [f"uncovered {layout_a.uncovered_paths} vs {b.layout.uncovered_paths}"]
            )
            raise ValueError(
                f"{where}: the two results have the same blocks but different layouts "
                f"({'; '.join(diff)}); build both with the same model_fn, params (shapes) and "
                "separate_bias."
            )
        raise ValueError(
            f"{where}: the two results cover different blocks ({names_a} vs {names_b}); build "
            "both with the same model_fn, params and separate_bias."
        )
    opt_a, opt_b = getattr(a, "options", None), getattr(b, "options", None)
    if opt_a is not None and opt_b is not None and opt_a != opt_b:
        raise ValueError(
            f"{where}: the two results were built differently ({opt_a.describe()} vs "
            f"{opt_b.describe()}); their sums estimate different matrices, so adding them "
            "gives neither. Build every batch with the same fisher= and loss type."
        )
    if (opt_a is None) != (opt_b is None):
        a, b = a._replace(options=opt_a or opt_b), b._replace(options=opt_a or opt_b)
    if (a.loss_terms is None) != (b.loss_terms is None):
        raise ValueError(
            f"{where}: one result comes from a 'mean' loss and the other from a 'sum' loss; "
            "use one reduction for every batch."
        )
    return _tree.add(a, b)


# The properties every Kronecker operator (KFAC, EKFAC) shares, defined once: NamedTuples
# cannot inherit from a mixin, so the classes bind these.
def _covered(self: Any) -> tuple[str, ...]:
    """Paths (as ``hessfunc`` prints them) of the parameter leaves the blocks cover."""
    return self.layout.covered


def _uncovered(self: Any) -> tuple[tuple[str, str], ...]:
    """``(path, reason)`` for every leaf no block covers; its curvature is taken as zero."""
    return self.layout.uncovered


COVERED = property(_covered)
UNCOVERED = property(_uncovered)
