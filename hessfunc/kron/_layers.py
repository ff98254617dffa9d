"""Linear layers found from what runs.

While a model function runs under :class:`Recorder` (a ``TorchFunctionMode``), every call of
``F.linear`` or ``F.conv1d/2d/3d`` whose weight or bias is one of the parameter leaves is
recorded with its input, and any other torch function that receives a parameter leaf marks that
leaf as used elsewhere. A 2-d leaf ``W`` stored ``(in, out)`` and applied as the right operand of
a matrix product is the same linear layer with weight ``W.T``: ``x @ W``, ``torch.matmul(x, W)``,
``torch.mm(x, W)``, and ``torch.addmm(b, x, W)`` with a 1-d bias ``b`` (transformers' GPT-2
``Conv1D``). Such a call is recorded as ``F.linear`` with a *transposed* weight; its block keeps
the ``(out, in)`` convention of ``F.linear`` (see :class:`Block`).

:func:`plan` turns one such run into a :class:`Layout`: the Kronecker
blocks (a weight with its bias folded in, a weight alone, or a bias alone) and the leaves that no
block covers, each with the reason. :func:`block_inputs` and :func:`block_grads` bring a block's
inputs and output gradients into one shape, ``(N, P, groups, features)``: samples, positions
where the weight is shared (sequence or spatial positions, and every call of a weight used
several times), channel groups.

No module hooks are used and nothing about the model is changed; the recorder sees the Python
functions the model calls, so a weight applied by hand (``x @ W.T``) is reported as used by
``Tensor.t``/``matmul``, not silently treated as a linear layer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._base import _tree

SUPPORTED = "F.linear / F.conv1d / F.conv2d / F.conv3d / x @ W / torch.addmm(b, x, W)"

_MATMULS = (torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm)
_ADDMMS = (torch.addmm, torch.Tensor.addmm)
_STACKED_FUNCS = (
    "__getitem__", "bmm", "baddbmm", "_grouped_mm", "grouped_mm", "index_select", "transpose",
    "mT", "permute",
)  # fmt: skip


def _stacked_reason(name: str) -> str:
    return (
        f"a stacked (3-d or more) weight used through {name}: K-FAC has a block per expert only "
        "where each expert's slice w[e] (one integer index, as a loop over experts does) is the "
        "weight of F.linear or the right operand of x @ w[e]; batched experts (bmm, grouped_mm, "
        "gathered w[idx]) have none, so its curvature is taken as zero. Loop over the experts "
        "(transformers' eager experts implementation), give each expert its own parameter, or "
        "use hessfunc.ggn_vp"
    )


def _op_dims(func: Any) -> int:
    """0 for ``F.linear``, 1-3 for ``F.conv1d``-``F.conv3d``, -1 for anything else."""
    if func is F.linear:
        return 0
    if func is F.conv1d:
        return 1
    if func is F.conv2d:
        return 2
    if func is F.conv3d:
        return 3
    return -1


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"  # an attribute read such as Tensor.T
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return qual.replace("_VariableFunctionsClass.", "torch.").replace("TensorBase.", "Tensor.")


class Call(NamedTuple):
    """One call of a supported layer whose weight or bias is a parameter leaf."""

    dims: int
    """0 for ``F.linear``, 1-3 for a convolution."""
    weight: int | None
    """Leaf index of the weight, or None if the weight is not a leaf."""
    bias: int | None
    """Leaf index of the bias, or None."""
    x: torch.Tensor
    """The layer's input."""
    conv: tuple
    """``(kernel, stride, padding, dilation, groups)`` for a convolution, ``()`` for linear."""
    out_shape: tuple[int, ...]
    """Shape of the layer's output."""
    transposed: bool = False
    """The weight is stored ``(in, out)`` and applied as ``x @ W`` (``F.linear`` with ``W.T``)."""
    expert: int | None = None
    """The weight is slice ``W[expert]`` of a stacked (mixture-of-experts) leaf, else None."""


class Recorder(TorchFunctionMode):
    """Record the supported layers a function calls with parameter leaves, and other uses.

    ``calls`` and ``others`` are lists/dicts owned by the caller (state kept on the mode object
    itself is not visible to torch.compile's tracer after the ``with`` block). With ``probes``,
    the output of recorded call ``k`` is returned as ``output + probes[k]``: a zero tensor whose
    gradient is the gradient with respect to that output.
    """

    def __init__(
        self,
        leaves: list[torch.Tensor],
        calls: list[Call],
        others: dict[int, str],
        probes: list[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.leaves = leaves
        self.calls = calls
        self.others = others
        self.probes = probes
        self.ids = (
            None if torch.compiler.is_compiling() else {id(t): i for i, t in enumerate(leaves)}
        )
        # eager only: id of a slice w[e] of a stacked leaf -> (slice, leaf index, e)
        self.slices: dict[int, tuple[torch.Tensor, int, int]] = {}

    def weight_of(self, t: Any) -> tuple[int | None, int | None]:
        """``(leaf, expert)`` of a weight: a leaf itself, or a slice ``leaf[e]`` of one."""
        i = self.index(t)
        if i is not None or not isinstance(t, torch.Tensor):
            return i, None
        hit = self.slices.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1], hit[2]
        return None, None

    def _expert_slice(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``w[e]`` of a stacked (3-d or more) leaf with one integer index, recorded."""
        if self.ids is None or func is not torch.Tensor.__getitem__ or len(args) != 2 or kwargs:
            return None
        w, e = args
        i = self.index(w)
        if i is None or w.dim() < 3:
            return None
        if isinstance(e, torch.Tensor) and e.dim() == 0 and not e.is_floating_point():
            e = int(e)  # eager only: the expert a router picked (transformers' MoE loops)
        if isinstance(e, bool) or not isinstance(e, int):
            return None
        out = func(*args)
        self.slices[id(out)] = (out, i, e % w.shape[0])
        return out

    def index(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        if self.ids is not None:
            i = self.ids.get(id(t))
            return i if i is not None and self.leaves[i] is t else None
        for i, leaf in enumerate(self.leaves):
            if leaf is t:
                return i
        return None

    def note(self, func: Any, values: Any) -> None:
        for value in values:
            items = value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                i = self.index(item)
                if i is None and self.slices and isinstance(item, torch.Tensor):
                    hit = self.slices.get(id(item))
                    if hit is not None and hit[0] is item and hit[1] not in self.others:
                        self.others[hit[1]] = "stacked:" + _name(func)  # a slice used otherwise
                if i is not None and i not in self.others:
                    # dynamo cannot trace string work on a builtin's name: the eager call names
                    # the function, a compiled one says only that there is another use
                    if self.ids is None:
                        self.others[i] = ""
                    elif item.dim() >= 3 and _name(func).split(".")[-1] in _STACKED_FUNCS:
                        self.others[i] = "stacked:" + _name(func)
                    else:
                        self.others[i] = _name(func)

    def _right_operand(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``(x, (W leaf, expert), b index)`` of ``x @ W`` / ``addmm(b, x, W)``, ``W`` 2-d."""
        if func in _ADDMMS:
            if len(args) > 3 or any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
                return None
            b, x, w = _arg(args, kwargs, 0, "input"), args[1:2], _arg(args, kwargs, 2, "mat2")
            x = x[0] if x else kwargs.get("mat1")
            bi = self.index(b)
            if bi is not None and b.dim() != 1:
                return None
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            (x, w), b, bi = args, None, None
        else:
            return None
        wi = self.weight_of(w)
        if wi[0] is None or w.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() < 1:
            return None
        if self.weight_of(x)[0] is not None or (b is not None and bi is None):
            return None  # a leaf on the left, or a bias that is not a leaf: not a layer
        return x, wi, bi

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        sliced = self._expert_slice(func, args, kwargs)
        if sliced is not None:
            return sliced
        right = self._right_operand(func, args, kwargs)
        if right is not None:
            x, (wi, e), bi = right
            out = func(*args, **kwargs)
            self.note(func, (x,))
            k = len(self.calls)
            self.calls.append(Call(0, wi, bi, x, (), tuple(out.shape), True, e))
            if self.probes is not None:
                out = out + self.probes[k]
            return out
        dims = _op_dims(func)
        if dims >= 0:
            x = _arg(args, kwargs, 0, "input")
            w = _arg(args, kwargs, 1, "weight")
            b = _arg(args, kwargs, 2, "bias")
            (wi, e), bi = self.weight_of(w), self.index(b)
            if wi is not None or bi is not None:
                out = func(*args, **kwargs)
                conv = ()
                if dims > 0:
                    conv = (
                        tuple(w.shape[2:]),
                        _arg(args, kwargs, 3, "stride", 1),
                        _arg(args, kwargs, 4, "padding", 0),
                        _arg(args, kwargs, 5, "dilation", 1),
                        _arg(args, kwargs, 6, "groups", 1),
                    )
                self.note(func, (x,))
                k = len(self.calls)
                self.calls.append(Call(dims, wi, bi, x, conv, tuple(out.shape), False, e))
                if self.probes is not None:
                    out = out + self.probes[k]
                return out
        out = func(*args, **kwargs)
        results = out if isinstance(out, (list, tuple)) else (out,)
        if any(isinstance(r, torch.Tensor) for r in results):
            # a use that produces a tensor; property reads (shape, dtype, ...) do not count
            self.note(func, tuple(args) + tuple(kwargs.values()))
        return out


@dataclass(frozen=True)
class Block:
    """One Kronecker block: the leaves it covers and the layout of its matrices.

    Its parameters are arranged as ``groups`` matrices of shape ``(out_features, size)``: the
    weight reshaped to ``(out_features, in_features)`` per channel group (a convolution's kernel
    flattened with its input channels, the unfold convention), with the bias as one more column
    when it is folded in. The block's curvature is ``⊕_groups G_g ⊗ A_g`` in that row-major order.

    A ``transposed`` weight is stored ``(in_features, out_features)`` and applied as ``x @ W``
    (``op == "matmul"``): its matrices are still arranged ``(out_features, size)``, over ``W.T``,
    so in the ravel order of ``W`` itself the weight's curvature is ``A ⊗ G``.
    """

    weight: int | None
    bias: int | None
    groups: int
    out_features: int
    in_features: int
    op: str
    names: tuple[str, ...]
    transposed: bool = False
    expert: int | None = None
    """For a stacked (mixture-of-experts) leaf: the block covers its slice ``weight[expert]``."""

    @property
    def size(self) -> int:
        """Columns of the block's matrices: the input features, plus one for a folded bias."""
        return self.in_features + (self.bias is not None)


@_tree.register_static
@dataclass(frozen=True)
class Layout:
    """Which parameter leaves a Kronecker approximation covers, and how (no tensors).

    It travels inside ``KFAC`` / ``EKFAC`` as a pytree node without leaves, so summing two
    approximations (over batches, over processes) adds their tensors and requires equal layouts.
    """

    blocks: tuple[Block, ...]
    shapes: tuple[tuple[int, ...], ...]
    paths: tuple[str, ...]
    uncovered_paths: tuple[str, ...]
    reasons: tuple[str, ...] = field(compare=False)
    """Why each uncovered leaf is uncovered (informative: not part of equality)."""

    @property
    def uncovered(self) -> tuple[tuple[str, str], ...]:
        """``(path, reason)`` for every leaf no block covers."""
        return tuple(zip(self.uncovered_paths, self.reasons, strict=True))

    @property
    def covered(self) -> tuple[str, ...]:
        """Paths of the leaves some block covers, in the parameters' order."""
        names = {n for b in self.blocks for n in b.names}
        return tuple(p for p in self.paths if p in names)

    def describe(self, kind: str) -> str:
        """``kind(op[leaves], ...; uncovered: ...)``: the ``repr`` of an approximation."""
        blocks = ", ".join(f"{b.op}[{'+'.join(b.names)}]" for b in self.blocks)
        extra = f"; uncovered: {', '.join(self.uncovered_paths)}" if self.uncovered_paths else ""
        return f"{kind}({blocks}{extra})"

    def check(self, where: str, name: str, tree: Any) -> list[torch.Tensor]:
        """The leaves of ``tree``, checked to be shaped like the parameters."""
        leaves = _tree.tree_leaves(tree)
        if len(leaves) != len(self.shapes):
            raise ValueError(
                f"{where}: {name} must be a pytree like the params the approximation was built "
                f"for ({len(self.shapes)} leaves), got {len(leaves)} leaves."
            )
        for path, leaf, shape in zip(self.paths, leaves, self.shapes, strict=True):
            if not isinstance(leaf, torch.Tensor) or tuple(leaf.shape) != shape:
                got = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ValueError(
                    f"{where}: {name}{path} has shape {got} but params{path} has {shape}; pass "
                    "a pytree like params (e.g. built with torch.func's tree_map over params)."
                )
        return leaves


def plan(
    where: str,
    calls: list[Call],
    others: dict[int, str],
    leaves: list[torch.Tensor],
    paths: list[str],
    separate_bias: bool,
) -> tuple[Layout, tuple[tuple[int, ...], ...]]:
    """The layout of one recorded run, and for each block the indices of its calls."""
    why: dict[int, str] = {
        i: _stacked_reason(name[len("stacked:") :])
        if name.startswith("stacked:")
        else f"used by {name or 'another torch function (an eager call names it)'}, not only as "
        f"the weight or bias of {SUPPORTED}"
        for i, name in others.items()
    }
    by_weight: dict[tuple[int, int | None], list[int]] = {}  # (leaf, expert) -> calls
    by_bias: dict[int, list[int]] = {}
    for k, call in enumerate(calls):
        if call.weight is not None:
            by_weight.setdefault((call.weight, call.expert), []).append(k)
        if call.bias is not None:
            by_bias.setdefault(call.bias, []).append(k)
    experts: dict[int, set[int | None]] = {}
    for w, e in by_weight:
        experts.setdefault(w, set()).add(e)
    for (w, _), ks in by_weight.items():
        kinds = {
            (calls[k].dims, calls[k].conv[-1] if calls[k].conv else 1, calls[k].transposed)
            for k in ks
        }
        if w in by_bias:
            why.setdefault(w, "used both as a weight and as a bias")
        elif len(kinds) > 1:
            why.setdefault(
                w, "used as the weight of layers of different kinds, groups or orientations"
            )
        elif None in experts[w] and len(experts[w]) > 1:
            why.setdefault(w, "used as a weight both whole and sliced per expert (w[e])")
    for b in by_bias:
        if b in {w for w, _ in by_weight}:
            why.setdefault(b, "used both as a weight and as a bias")
    good_weights = [key for key in by_weight if key[0] not in why]

    # (first leaf, expert order, weight, expert, bias, calls)
    specs: list[tuple[int, int, int | None, int | None, int | None, tuple[int, ...]]] = []
    folded: set[int] = set()
    for w, e in good_weights:
        ks = by_weight[(w, e)]
        biases = {calls[k].bias for k in ks}
        b = next(iter(biases)) if len(biases) == 1 else None
        fold = (
            b is not None
            and not separate_bias
            and b not in why
            and all(calls[k].weight == w and calls[k].expert == e for k in by_bias[b])
        )
        if fold:
            folded.add(b)
        first = min(w, b) if fold else w
        specs.append((first, -1 if e is None else e, w, e, b if fold else None, tuple(ks)))
    for b, ks in by_bias.items():
        if b not in why and b not in folded:
            specs.append((b, -1, None, None, b, tuple(ks)))
    specs.sort()

    blocks = []
    for _, _, w, e, b, ks in specs:
        first = calls[ks[0]]
        transposed = False
        if w is not None:
            shape = leaves[w].shape if e is None else leaves[w].shape[1:]
            groups = first.conv[-1] if first.conv else 1
            transposed = first.transposed
            if transposed:  # stored (in, out), applied as x @ W
                out_features, in_features, op = shape[1], shape[0], "matmul"
            else:
                out_features = shape[0] // groups
                in_features = math.prod(shape[1:])
                op = "linear" if first.dims == 0 else f"conv{first.dims}d"
            if e is not None:
                op = f"{op}[expert {e}]"
        else:
            groups, out_features, in_features, op = 1, leaves[b].numel(), 0, "bias"
        names = tuple(paths[i] for i in (w, b) if i is not None)
        blocks.append(Block(w, b, groups, out_features, in_features, op, names, transposed, e))
    covered = {i for _, _, w, _, b, _ in specs for i in (w, b) if i is not None}
    missing = [i for i in range(len(leaves)) if i not in covered]
    unused = "not passed to any torch function while model_fn ran (no curvature)"
    shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    layout = Layout(
        tuple(blocks),
        shapes,
        tuple(paths),
        tuple(paths[i] for i in missing),
        tuple(why.get(i, unused) for i in missing),
    )
    return layout, tuple(ks for *_, ks in specs)


# ---------------------------------------------------------------------------------- unfolding


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def patches(x: torch.Tensor, conv: tuple) -> torch.Tensor:
    """``(N, P, C * K)``: the input patch of every output position of a convolution.

    Column ``c * K + k`` holds input channel ``c`` at kernel offset ``k`` (row-major over the
    kernel's axes), the order of ``weight.reshape(out_channels, -1)``, so the convolution is
    ``patches @ weight.reshape(out_channels, -1).T`` per group. Padding follows torch: integer
    padding on both sides, ``"same"`` with any odd remainder on the far side, ``"valid"`` none.
    """
    kernel, stride, padding, dilation, _ = conv
    nd = len(kernel)
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        else:
            pads = []
            for k, d in zip(kernel, dilation, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in _tuple(padding, nd)]
    if any(p for pair in pads for p in pair):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    sizes = [
        (s - d * (k - 1) - 1) // st + 1
        for s, k, st, d in zip(x.shape[2:], kernel, stride, dilation, strict=True)
    ]
    cols = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(o * d, o * d + st * (n - 1) + 1, st)
            for o, d, st, n in zip(offsets, dilation, stride, sizes, strict=True)
        )
        cols.append(x[(slice(None), slice(None), *index)])
    p = torch.stack(cols, 2)  # (N, C, K, *sizes)
    return p.reshape(p.shape[0], p.shape[1] * p.shape[2], -1).transpose(1, 2)


def samples_positions(call: Call) -> tuple[int, int]:
    """``(N, P)``: samples (axis 0 of a batched input, else 1) and positions per sample."""
    if call.dims == 0:
        shape = call.out_shape
        if len(shape) < 2:
            return 1, 1
        return shape[0], math.prod(shape[1:-1])
    batched = len(call.out_shape) == call.dims + 2
    spatial = call.out_shape[-call.dims :]
    return (call.out_shape[0] if batched else 1), math.prod(spatial)


def block_inputs(block: Block, call: Call) -> torch.Tensor:
    """The block's input vectors in one call: ``(N, P, groups, size)``, ones for a bias."""
    n, p = samples_positions(call)
    parts = []
    if block.weight is not None:
        if call.dims == 0:
            a = call.x.reshape(n, p, 1, block.in_features)
        else:
            x = call.x if len(call.out_shape) == call.dims + 2 else call.x.unsqueeze(0)
            a = patches(x, call.conv).reshape(n, p, block.groups, block.in_features)
        parts.append(a)
    if block.bias is not None:
        ref = call.x
        parts.append(torch.ones(n, p, block.groups, 1, dtype=ref.dtype, device=ref.device))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def block_grads(block: Block, call: Call, grad: torch.Tensor) -> torch.Tensor:
    """Gradients with respect to one call's output, ``(k, N, P, groups, out_features)``.

    ``grad`` has a leading axis of ``k`` columns before the output's shape.
    """
    n, p = samples_positions(call)
    k = grad.shape[0]
    if call.dims == 0:
        g = grad.reshape(k, n, p, -1)
    else:
        channels = call.out_shape[-call.dims - 1]
        g = grad.reshape(k, n, channels, p).transpose(2, 3)
    return g.reshape(k, n, p, block.groups, block.out_features)
