"""A pytree ``matvec`` seen as a map on flat vectors, applied to blocks of them with ``vmap``.

The spectral algorithms work on ``(k, n)`` matrices of stacked vectors in :func:`hessfunc.ravel`
order: QR factorisations, Gram-Schmidt and small eigenproblems are one call each there. Only
the user's ``matvec`` sees pytrees; it is vmapped over rows, like :func:`hessfunc.hvps`.
Nothing here reads tensor values, so all of it traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import vmap

from . import _checks, _tree
from ._types import PyTree


class BatchedMatvec(NamedTuple):
    """A product given on batches of vectors (see :func:`hessfunc.batched_matvec`)."""

    matmat: Callable[[PyTree], PyTree]

    def __call__(self, v: PyTree) -> PyTree:
        """The product with one vector: a batch of one."""
        out = self.matmat(_tree.tree_map(lambda t: t.unsqueeze(0), v))
        return _tree.tree_map(lambda t: t.squeeze(0), out)


class FlatOperator(NamedTuple):
    apply: Callable[[torch.Tensor], torch.Tensor]  # (k, n) -> (k, n), one matvec per row
    n: int
    unravel: Callable[[torch.Tensor], PyTree]  # (n,) -> pytree like one vector

    def to_tree(self, rows: torch.Tensor) -> PyTree:
        """``(k, n)`` -> a pytree whose leaves carry a leading axis ``k``."""
        return vmap(self.unravel)(rows)


def check_int(where: str, name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: {name} must be a Python int >= {low}, got {value!r}.")


def check_rows(where: str, tree: Any, name: str = "probes") -> int:
    """``tree`` is a non-empty pytree of floating tensors with a common leading axis; its size."""
    leaves = _tree.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{where}: {name} is an empty pytree; pass at least one tensor.")
    size = -1
    for path, leaf in zip(_tree.tree_paths(tree), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise TypeError(
                f"{where}: every leaf of {name} must be a floating tensor; {name}{path} is "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}."
            )
        if leaf.dim() == 0:
            raise ValueError(
                f"{where}: {name}{path} is 0-d; {name} needs a leading axis (one row per "
                "vector). Build it with hessfunc.random_probes(params, num, generator=g)."
            )
        if size == -1:
            size = leaf.shape[0]
        elif leaf.shape[0] != size:
            raise ValueError(
                f"{where}: every leaf of {name} needs the same leading size (the number of "
                f"vectors); {name}{path} has {leaf.shape[0]}, an earlier leaf {size}."
            )
    if size == 0:
        raise ValueError(
            f"{where}: {name} holds no vector (a leading axis of size 0); pass at least one, "
            "e.g. hessfunc.random_probes(params, num, generator=g) with num >= 1."
        )
    return size


def flat_operator(
    where: str, matvec: Callable[[PyTree], PyTree], one: PyTree, chunk_size: int | None = None
) -> tuple[FlatOperator, torch.Tensor]:
    """The operator on flat vectors, and ``one`` raveled (it fixes ``n``, dtype and device)."""
    if not callable(matvec):
        raise TypeError(
            f"{where}: matvec must be callable as matvec(v) -> A v, got "
            f"{type(matvec).__name__}; e.g. lambda v: hessfunc.hvp(f, params, v, x, y)."
        )
    _checks.check_chunk_size(where, chunk_size)
    flat, unravel = _tree.ravel(one)
    n = flat.numel()
    # matvec's output is matched to its input by name, once per call of the public function
    # (the first product): a reordered or transposed leaf of the right size is refused, never
    # read by position (see _checks.check_tree)
    unchecked = [True]

    def check(out: PyTree, batched: bool = False) -> int:
        if not unchecked[0]:
            return -1
        size = _checks.check_tree(where, one, out, "matvec(v)", "v", batched=batched)
        unchecked[0] = False
        return size

    def single(x: torch.Tensor) -> torch.Tensor:
        out = matvec(unravel(x))
        check(out)
        return _tree.ravel(out)[0].to(flat.dtype)

    def apply(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 1:  # one vector (Lanczos, power iteration): vmap would only add cost
            return single(rows[0]).unsqueeze(0)
        return vmap(single, chunk_size=chunk_size)(rows)

    if isinstance(matvec, BatchedMatvec):
        # called as is on a batch: no vmap around it, so it may be a compiled function
        # (vmap of a compiled function is refused by dynamo, pytorch#128711)

        def block(rows: torch.Tensor) -> torch.Tensor:
            tree = matvec.matmat(vmap(unravel)(rows))
            if unchecked[0]:
                size = check(tree, batched=True)
                if size != rows.shape[0]:
                    raise ValueError(
                        f"{where}: the batched matvec must return one product per input "
                        f"vector: {rows.shape[0]} vectors went in, every leaf came back with a "
                        f"leading axis of {size}."
                    )
            out = _tree.ravel_rows(tree)
            if out.shape != rows.shape:
                raise ValueError(
                    f"{where}: the batched matvec must return a batch like its input "
                    f"({tuple(rows.shape)} as rows); it returned {tuple(out.shape)}."
                )
            return out.to(flat.dtype)

        def apply(rows: torch.Tensor) -> torch.Tensor:
            if chunk_size is None or chunk_size >= rows.shape[0]:
                return block(rows)
            return torch.cat([block(c) for c in torch.split(rows, chunk_size)])

    return FlatOperator(apply, n, unravel), flat


def rows_operator(
    where: str,
    matvec: Callable[[PyTree], PyTree],
    probes: PyTree,
    chunk_size: int | None = None,
    name: str = "probes",
) -> tuple[FlatOperator, torch.Tensor]:
    """Check ``probes`` (a batch of vectors) and return the operator and the ``(k, n)`` rows."""
    check_rows(where, probes, name)
    rows = _tree.ravel_rows(probes)
    op, _ = flat_operator(where, matvec, _tree.tree_map(lambda t: t[0], probes), chunk_size)
    return op, rows


def mean_and_error(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the leading axis and its standard error ``std / sqrt(m)`` (``nan`` for m = 1)."""
    m = samples.shape[0]
    mean = samples.mean(0)
    if m == 1:
        return mean, torch.full_like(mean, float("nan"))
    var = ((samples - mean) ** 2).sum(0) / (m - 1)
    return mean, torch.sqrt(var / m)
