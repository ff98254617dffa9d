"""The one module that talks to optree.

Every flat vector and matrix in hessfunc uses the leaf order defined here: optree's order with
dicts flattened in *insertion* order (the order of ``module.named_parameters()``), not optree's
default sorted-key order. The order is switched on for hessfunc's own optree namespace only, so a
user's own ``optree`` calls keep their behaviour. torch.compile's optree polyfills read the same
per-namespace setting, so compiled and eager code see one order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

NAMESPACE = "hessfunc"

# `dict_insertion_ordered` is a generator-based context manager; entering it once and keeping a
# reference keeps the setting for our namespace for the life of the process (if the object were
# garbage collected its `finally` would restore sorted order).
_INSERTION_ORDER = optree.dict_insertion_ordered(True, namespace=NAMESPACE)
_INSERTION_ORDER.__enter__()

PyTree = Any


def _is_leaf(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def tree_flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    return optree.tree_flatten(tree, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE)


def tree_leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE)


def tree_structure(tree: PyTree) -> optree.PyTreeSpec:
    return optree.tree_structure(tree, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE)


def tree_unflatten(spec: optree.PyTreeSpec, leaves: list[Any]) -> PyTree:
    return optree.tree_unflatten(spec, leaves)


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    return optree.tree_map(
        fn, tree, *rest, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE
    )


def tree_paths(tree: PyTree) -> list[str]:
    """Readable path of every leaf (``"['layer']['weight']"`` style), for error messages."""
    paths = optree.tree_paths(tree, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE)
    return ["".join(f"[{k!r}]" for k in path) or "<root>" for path in paths]


def register_static(cls: type) -> type:
    """Register ``cls`` as a pytree node with no children, its instance kept in the tree spec.

    For frozen, hashable descriptions that travel inside a result pytree (which layer a factor
    belongs to, which parameters are covered): they carry no tensors, so tree arithmetic and
    reductions over the result (summing it over batches, an all-reduce) skip them, and two
    results combine only if their descriptions compare equal.
    """
    optree.register_pytree_node(
        cls, lambda x: ((), x), lambda meta, children: meta, namespace=NAMESPACE
    )
    return cls


# ----------------------------------------------------------------------------- arithmetic


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over leaves of ``<a_i, b_i>``, a 0-d tensor."""
    terms = [torch.sum(x * y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def add(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.sub, a, b)


def scale(alpha: float | torch.Tensor, a: PyTree) -> PyTree:
    return tree_map(lambda x: alpha * x, a)


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leafwise."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def zeros_like(a: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, a)


def random_like(
    tree: PyTree,
    generator: torch.Generator | None = None,
    *,
    kind: str = "normal",
    batch: int | None = None,
) -> PyTree:
    """A random pytree shaped like ``tree`` (optionally with a leading batch axis).

    ``kind`` is ``"normal"`` or ``"rademacher"``. Draws happen on ``generator``'s device and are
    moved to each leaf's device, so a CPU generator reproduces the same directions everywhere.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def draw(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape if batch is None else (batch, *x.shape)
        if kind == "normal":
            r = torch.randn(shape, generator=generator, dtype=x.dtype, device=gen_device)
        elif kind == "rademacher":
            r = torch.randint(0, 2, shape, generator=generator, device=gen_device)
            r = (2 * r - 1).to(x.dtype)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected 'normal' or 'rademacher'")
        return r.to(x.device)

    return tree_map(draw, tree)


# ----------------------------------------------------------------------------- ravel


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flatten a pytree of tensors into one vector, and return the inverse.

    Leaf order is optree's, with dicts in insertion order (so a dict built from
    ``module.named_parameters()`` ravels in that order). Leaves of several floating dtypes are
    promoted to their common dtype; ``unravel`` casts each leaf back, restoring structure, shapes
    and dtypes exactly. ``unravel`` works on a vector of length ``n`` and, through ``vmap``, on a
    batch of them.

    Args:
        tree: any pytree (nested dicts, lists, tuples, NamedTuples) whose leaves are tensors.

    Returns:
        ``(flat, unravel)``: a 1-d tensor of length ``n = sum(leaf.numel())``, and a function
        mapping such a vector back to a pytree like ``tree``.

    Example:
        >>> import torch, hessfunc
        >>> tree = {"w": torch.ones(2, 2), "b": torch.zeros(3)}
        >>> flat, unravel = hessfunc.ravel(tree)
        >>> flat
        tensor([1., 1., 1., 1., 0., 0., 0.])
        >>> unravel(2 * flat)["w"]
        tensor([[2., 2.],
                [2., 2.]])
    """
    leaves, spec = tree_flatten(tree)
    for path, leaf in zip(tree_paths(tree), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"hessfunc.ravel(tree): every leaf must be a torch.Tensor; leaf {path} is "
                f"{type(leaf).__name__}. Convert it with torch.as_tensor or move it out of the "
                "tree."
            )
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]
    if leaves:
        dtype = leaves[0].dtype
        for leaf in leaves[1:]:
            dtype = torch.promote_types(dtype, leaf.dtype)
        flat = torch.cat([leaf.reshape(-1).to(dtype) for leaf in leaves])
    else:
        flat = torch.zeros(0)

    # A PyTreeSpec made outside a torch.compile region cannot be used inside it (dynamo's optree
    # polyfill rejects the foreign spec object), so unravel keeps a template with placeholder
    # leaves and flattens it where it runs: eager, or while being traced.
    template = tree_unflatten(spec, list(range(len(leaves))))

    def unravel(vec: torch.Tensor) -> PyTree:
        if vec.shape != (sum(sizes),):
            raise ValueError(
                f"hessfunc.ravel(...) unravel: expected a vector of shape ({sum(sizes)},), "
                f"got {tuple(vec.shape)}. Use torch.func.vmap(unravel) for a batch of vectors."
            )
        parts = torch.split(vec, sizes) if sizes else []
        out = [p.reshape(s).to(d) for p, s, d in zip(parts, shapes, dtypes, strict=True)]
        return tree_unflatten(tree_structure(template), out)

    return flat, unravel


def leaf_slices(tree: PyTree) -> list[tuple[int, int, torch.Size]]:
    """``(start, stop, shape)`` of every leaf in the raveled vector."""
    out, start = [], 0
    for leaf in tree_leaves(tree):
        out.append((start, start + leaf.numel(), leaf.shape))
        start += leaf.numel()
    return out


def blocks_from_matrix(matrix: torch.Tensor, tree: PyTree) -> PyTree:
    """Split an ``(n, n)`` matrix in ravel order into a tree-of-trees of blocks.

    Block ``[i][j]`` has shape ``leaf_i.shape + leaf_j.shape``; the outer and inner structures are
    both that of ``tree`` (the layout of ``torch.func.hessian`` and ``jax.hessian``).
    """
    spec = tree_structure(tree)
    slices = leaf_slices(tree)
    rows = []
    for a, b, si in slices:
        row = [matrix[a:b, c:d].reshape(tuple(si) + tuple(sj)) for c, d, sj in slices]
        rows.append(tree_unflatten(spec, row))
    return tree_unflatten(spec, rows)


# ----------------------------------------------------------------------------- per-sample rows


def row_vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """``(N,)``: for each index ``i`` of the leading axis, the sum over leaves of ``<a_i, b_i>``."""
    pairs = zip(tree_leaves(a), tree_leaves(b), strict=True)
    terms = [(x * y).reshape(x.shape[0], -1).sum(1) for x, y in pairs]
    return torch.stack(terms).sum(0)


def row_scale(s: torch.Tensor, a: PyTree) -> PyTree:
    """Every leaf of ``a`` with row ``i`` of its leading axis multiplied by ``s[i]``."""
    return tree_map(lambda x: s.reshape(-1, *([1] * (x.dim() - 1))) * x, a)


def ravel_rows(tree: PyTree) -> torch.Tensor:
    """``(k, n)``: a pytree whose leaves share a leading axis of size ``k``, one raveled row each.

    Row ``i`` is ``ravel`` of entry ``i`` along the leading axis (same leaf order and dtype
    promotion as :func:`ravel`).
    """
    leaves = tree_leaves(tree)
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return torch.cat([leaf.reshape(leaf.shape[0], -1).to(dtype) for leaf in leaves], dim=1)


def unravel_rows(like: PyTree) -> Callable[[torch.Tensor], PyTree]:
    """The inverse of :func:`ravel_rows` for trees shaped like ``like`` plus a leading axis."""
    leaves = tree_leaves(like)
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]
    template = tree_unflatten(tree_structure(like), list(range(len(leaves))))

    def unravel(rows: torch.Tensor) -> PyTree:
        if rows.dim() != 2 or rows.shape[1] != sum(sizes):
            raise ValueError(
                f"hessfunc: expected a (k, {sum(sizes)}) block of raveled rows, got "
                f"{tuple(rows.shape)}."
            )
        parts = torch.split(rows, sizes, dim=1)
        out = [
            p.reshape(rows.shape[0], *s).to(d)
            for p, s, d in zip(parts, shapes, dtypes, strict=True)
        ]
        return tree_unflatten(tree_structure(template), out)

    return unravel


def leaf_names(tree: PyTree) -> list[str]:
    """Dotted name of every leaf (``"body.0.weight"``, ``"enc.w"``, ``"0"``), in ravel order.

    A dict from ``named_parameters()`` keeps its keys; nested containers join their keys with
    ``"."``; a bare tensor is ``""``.
    """
    paths = optree.tree_paths(tree, is_leaf=_is_leaf, none_is_leaf=False, namespace=NAMESPACE)
    return [".".join(str(k) for k in path) for path in paths]


def batch_size(tree: PyTree) -> int:
    """The leading (batch) size of a pytree of stacked tensors, read from its first leaf."""
    return tree_leaves(tree)[0].shape[0]
