"""The passes over batches behind :mod:`hessfunc.data`: accumulation, counts, inspection.

Kept apart from the public functions so each module stays small; nothing here is public.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from ._base import _progress, _tree
from ._base._types import PyTree
from ._base._unwrap import unwrap_module

Reduce = Callable[[PyTree], PyTree]
Count = Callable[..., "int | torch.Tensor"]


def call(fn: Callable[..., Any], batch: Any) -> Any:
    """``fn(*batch)`` for a plain tuple or list, ``fn(batch)`` for anything else."""
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return fn(*batch)
    return fn(batch)


def check_callable(where: str, name: str, fn: Any, signature: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{where}: {name} must be callable as {signature}, got {type(fn).__name__}."
        )


def check_batches(where: str, batches: Any, *, reiterable: bool) -> None:
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"{where}: batches must be iterable (a DataLoader, a list of tuples), got "
            f"{type(batches).__name__}."
        ) from None
    if reiterable and it is batches:
        raise TypeError(
            f"{where}: batches is an iterator ({type(batches).__name__}), which is used up after "
            "one pass, so a second pass would see no data. Pass a re-iterable: the DataLoader "
            "itself, or list(batches)."
        )


def leaf_device(tree: PyTree) -> torch.device:
    leaves = _tree.tree_leaves(tree)
    return leaves[0].device if leaves else torch.device("cpu")


class Pass(NamedTuple):
    total: PyTree
    count: torch.Tensor | None
    magnitude: torch.Tensor | None
    batches: int


def accumulate(
    where: str,
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    *,
    count: Count | None,
    like: PyTree | None,
    progress: bool | None,
    magnitude: bool = False,
) -> Pass:
    """One pass: the sum of ``fn`` over batches, the sum of counts, optionally ``sum ||fn||``.

    Counts that are Python ints stay Python ints and tensors stay tensors (no host sync per
    batch); both are combined into one 0-d tensor at the end.
    """
    total = spec = None
    owned = False  # whether `total` is our own buffer (fn's first output may alias user state)
    int_count, tensor_count = 0, None
    norms = None
    seen = 0
    for batch in _progress.track(batches, where=where, desc=where.split("(")[0], progress=progress):
        out = call(fn, batch)
        leaves = _tree.tree_leaves(out)
        if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
            raise TypeError(
                f"{where}: fn must return a tensor or a non-empty pytree of tensors; batch {seen} "
                f"gave {type(out).__name__}."
            )
        if total is None:
            total, spec = out, _tree.tree_structure(out)
        else:
            if _tree.tree_structure(out) != spec:
                raise ValueError(
                    f"{where}: fn returned a different structure for batch {seen} than for batch "
                    f"0 ({_tree.tree_structure(out)} vs {spec}); every batch's product must have "
                    "the same structure."
                )
            if owned:
                total = _tree.tree_map(lambda acc, x: acc.add_(x), total, out)
            else:
                total, owned = _tree.add(total, out), True
        if magnitude:
            norm = torch.sqrt(_tree.vdot(out, out).detach().to(torch.float64))
            norms = norm if norms is None else norms + norm
        if count is not None:
            c = call(count, batch)
            if isinstance(c, bool) or not (
                isinstance(c, int) or (isinstance(c, torch.Tensor) and c.dim() == 0)
            ):
                raise TypeError(
                    f"{where}: count must return a Python int or a 0-d tensor (e.g. len(y) or "
                    f"(y != -100).sum()); batch {seen} gave {c!r:.80}."
                )
            if isinstance(c, torch.Tensor) and (c.dtype == torch.bool or c.is_complex()):
                raise TypeError(
                    f"{where}: count must return a number of examples; batch {seen} gave a "
                    f"0-d {c.dtype} tensor, which would be added as a logical or. Count with "
                    ".sum() (e.g. (y != -100).sum()) or return len(y)."
                )
            if isinstance(c, int):
                int_count += c
            else:
                tensor_count = c if tensor_count is None else tensor_count + c
        seen += 1
    if total is None:
        if like is None:
            raise ValueError(
                f"{where}: batches yielded no batch. With reduce= across processes, pass like= "
                "(a pytree shaped like fn's output, e.g. params) so a process without data still "
                "joins the reduction with zeros instead of leaving the others waiting."
            )
        total = _tree.zeros_like(like)
    elif not owned:
        # one batch: the total would be fn's own output (e.g. a tensor of the user's state);
        # two or more are summed into a new buffer, so one gets its own copy too
        total = _tree.tree_map(torch.clone, total)
    device = leaf_device(total)
    counted = None
    if count is not None:
        if tensor_count is None:
            counted = torch.tensor(int_count, dtype=torch.int64, device=device)
        else:
            counted = (tensor_count + int_count).to(device)
    if magnitude and norms is None:
        norms = torch.zeros((), dtype=torch.float64, device=device)
    return Pass(total, counted, norms, seen)


def check_reduce(where: str, reduce: Any) -> None:
    if reduce is not None and not callable(reduce):
        raise TypeError(
            f"{where}: reduce must be None or callable as reduce(tree) -> tree (e.g. "
            f"hessfunc.distributed.AllReduce()), got {type(reduce).__name__}."
        )


def divide(where: str, total: PyTree, counted: torch.Tensor) -> PyTree:
    if hasattr(counted, "full_tensor"):  # a DTensor count from sharded batches
        counted = counted.full_tensor()
    n = counted.item()  # the one host synchronisation of a pass
    if not n > 0:
        raise ValueError(
            f"{where}: the total count is {n}; count must give the number of examples (or "
            "non-ignored tokens) in each batch, and at least one must be counted."
        )
    return _tree.tree_map(lambda x: x / n, total)


def sum_pass(
    where: str,
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    reduce: Reduce | None,
    like: PyTree | None,
    progress: bool | None,
    seen: Callable[[int], None] | None = None,
) -> PyTree:
    acc = accumulate(where, fn, batches, count=None, like=like, progress=progress)
    if seen is not None:
        seen(acc.batches)
    return acc.total if reduce is None else reduce(acc.total)


def mean_pass(
    where: str,
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    count: Count,
    reduce: Reduce | None,
    like: PyTree | None,
    progress: bool | None,
    seen: Callable[[int], None] | None = None,
) -> PyTree:
    acc = accumulate(where, fn, batches, count=count, like=like, progress=progress)
    if seen is not None:
        seen(acc.batches)
    # One reduction for the sum and the count together: AllReduce packs them into one buffer.
    total, counted = (acc.total, acc.count) if reduce is None else reduce((acc.total, acc.count))
    return divide(where, total, counted)


# ----------------------------------------------------------------------------- inspection


def loader_problems(batches: Any) -> list[str]:
    """Shuffling with ``drop_last`` and padded distributed shards, read from a DataLoader."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if not isinstance(batches, DataLoader):
        return []
    found = []
    batch_sampler = batches.batch_sampler
    sampler = getattr(batch_sampler, "sampler", batches.sampler)
    drop_last = bool(batches.drop_last or getattr(batch_sampler, "drop_last", False))
    shuffles = isinstance(sampler, RandomSampler)
    if isinstance(sampler, DistributedSampler):
        # DistributedSampler reshuffles only when set_epoch changes the epoch, so passes repeat;
        # without drop_last it pads shards by repeating examples, which biases every product.
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if not sampler.drop_last and size % sampler.num_replicas:
            found.append(
                f"the DistributedSampler pads {sampler.num_replicas - size % sampler.num_replicas}"
                " repeated example(s) into the shards (drop_last=False), so they count twice. "
                "Give each rank its own slice instead (e.g. a Subset of range(rank, N, world) "
                "with a plain sampler), so every example counts once."
            )
        if sampler.drop_last and size % sampler.num_replicas:
            found.append(
                "the DistributedSampler drops examples (drop_last=True), so the product is not "
                "over the whole dataset. Give each rank its own slice instead."
            )
    if shuffles and drop_last:
        found.append(
            "the DataLoader shuffles with drop_last=True, so every pass drops a different set "
            "of examples and each product is of a different dataset. Use shuffle=False (the "
            "order does not change a sum), or drop_last=False."
        )
    return found


def module_problems(modules: nn.Module | Iterable[nn.Module] | None) -> list[str]:
    if modules is None:
        return []
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    found = []
    for root in mods:
        root = unwrap_module(root, "hessfunc.data.check_deterministic", allow_sharded=True)
        for name, sub in root.named_modules():
            label = name or type(root).__name__
            if not sub.training:
                continue
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
                found.append(
                    f"{label} ({type(sub).__name__}(p={sub.p})) is active in training mode: every "
                    "pass draws new masks. Call module.eval()."
                )
            elif isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
                found.append(
                    f"{label} (MultiheadAttention(dropout={sub.dropout})) drops attention weights "
                    "at random in training mode. Call module.eval()."
                )
            elif isinstance(sub, nn.modules.batchnorm._NormBase):
                what = (
                    "updates its running statistics on every forward and "
                    if sub.track_running_stats
                    else ""
                )
                found.append(
                    f"{label} ({type(sub).__name__}) is in training mode: it {what}normalises "
                    "with each batch's own statistics, so the product depends on how the data "
                    "is batched. Call module.eval()."
                )
    return found


def buffer_copies(modules: nn.Module | Iterable[nn.Module] | None) -> dict[str, torch.Tensor]:
    if modules is None:
        return {}
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    return {
        f"{i}:{name}": buf.detach().clone()
        for i, m in enumerate(mods)
        for name, buf in m.named_buffers()
    }


def describe_batches(batches: Any) -> str:
    """A short name for an iterable of batches, for error messages."""
    name = type(batches).__name__
    dataset = getattr(batches, "dataset", None)
    if dataset is not None:
        name += f" over {type(dataset).__name__}"
    return name


def check_pass(where: str, batches: Any, first: int | None, now: int, reduce: Any) -> None:
    """A pass over ``batches`` saw ``now`` batches; the first pass saw ``first`` (None: this is it).

    A re-iterable that is empty on a later pass (a DataLoader over a streaming
    ``IterableDataset`` read once, a generator-backed object) or that changes its length
    would make later products silently zero or of another dataset.
    """
    name = describe_batches(batches)
    if first is None:
        if now == 0 and reduce is None:
            raise ValueError(
                f"{where}: the pass over batches ({name}) yielded no batch, so the product "
                "would be zero. Pass a non-empty re-iterable (a DataLoader over a map-style "
                "dataset, a list of tuples); an empty shard is only accepted with reduce=, "
                "where other processes hold the data."
            )
        return
    if now != first:
        raise ValueError(
            f"{where}: this pass over batches ({name}) yielded {now} batches but the first "
            f"pass yielded {first}; every product must see the same data. An iterable that is "
            "used up after one pass (a DataLoader over an IterableDataset that streams, an "
            "object whose __iter__ returns a shared iterator) or one that changes between "
            "passes cannot back a linear operator: materialise it once with list(batches), "
            "or build a fresh operator for new data."
        )
