"""Model outputs as the products see them: one path for every product that takes ``model_fn``.

A model may return a tensor, a tuple or dict of them, a Hugging Face ``ModelOutput``, or any
other container registered with torch's own pytree (``torch.utils._pytree``, which
``torch.func`` uses to flatten outputs; a plain dataclass registers with
``torch.utils._pytree.register_dataclass``). hessfunc's optree helpers do not know those
containers, so outputs are handled here with torch's pytree only.

:func:`clean` runs inside the differentiated call: every floating-point tensor leaf stays, every
other leaf becomes ``None``. That drops what cannot be differentiated: integer tensors, Python
numbers, and opaque objects such as the ``DynamicCache`` a transformers model returns with
``use_cache=True`` (its key/value tensors depend on the parameters but no loss reads them; the
loss sees ``None`` in its place). Pass ``use_cache=False`` to skip building the cache at all.

:func:`loss_view` picks the part of the outputs a :mod:`hessfunc.losses` object is applied to:
the tensor itself, or the ``"logits"`` entry of a dict / ``ModelOutput`` (or a ``logits``
attribute of a registered dataclass); every other output gets zero output-space curvature,
because the loss does not read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

PyTree = Any


def _keep(x: Any) -> Any:
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def clean(where: str, out: Any) -> Any:
    """``out`` with every leaf that is not a floating tensor replaced by ``None``."""
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            raise TypeError(
                f"{where}: model_fn returned a {out.dtype} tensor; the outputs must be "
                "floating-point to be differentiated."
            )
        return out
    kept = pytree.tree_map(_keep, out)
    if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(kept)):
        raise TypeError(
            f"{where}: model_fn returned {type(out).__name__} with no floating-point tensor "
            "that torch's pytree can reach. Return tensors, tuples/dicts of them, or a "
            "container registered with torch.utils._pytree (register_dataclass for a "
            "dataclass; transformers' ModelOutput is registered already)."
        )
    return kept


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` over the tensor leaves of cleaned outputs (torch's pytree order)."""
    return pytree.tree_map(fn, tree, *rest)


def first_leaf(out: PyTree) -> torch.Tensor:
    """The first tensor of cleaned outputs (for dtype and device)."""
    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def _logits_index(out: Any) -> int | None:
    """Leaf index of the ``logits`` entry of a container, or None."""
    if isinstance(out, (torch.Tensor, tuple, list)):
        return None
    has = (isinstance(out, Mapping) and "logits" in out) or (
        not isinstance(out, Mapping) and isinstance(getattr(out, "logits", None), torch.Tensor)
    )
    if not has:
        return None
    flat, _ = pytree.tree_flatten_with_path(out)
    for i, (path, _) in enumerate(flat):
        if len(path) == 1 and (
            getattr(path[0], "key", None) == "logits" or getattr(path[0], "name", None) == "logits"
        ):
            return i
    return None


def loss_view(out: PyTree) -> tuple[Any, Callable[[Any], PyTree]]:
    """``(part, embed)``: the part a loss object reads, and its map back to all outputs.

    ``embed(c)`` puts ``c`` (shaped like ``part``, possibly under ``vmap``) where ``part`` sits
    in ``out`` and zeros in every other output.
    """
    index = _logits_index(out)
    if index is None:
        return out, lambda c: c
    leaves, spec = pytree.tree_flatten(out)

    def embed(c: Any) -> PyTree:
        parts = [
            c if i == index else (None if x is None else torch.zeros_like(x))
            for i, x in enumerate(leaves)
        ]
        return pytree.tree_unflatten(parts, spec)

    return leaves[index], embed
