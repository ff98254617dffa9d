"""Model outputs as the products see them: one path for every product that takes ``model_fn``.

A model may return a tensor, a tuple or dict of them, a Hugging Face ``ModelOutput``, or any
other container registered with torch's own pytree (``torch.utils._pytree``; a plain dataclass
registers with ``torch.utils._pytree.register_dataclass``). hessfunc's optree helpers do not
know those containers, so outputs are handled here, with torch's pytree only.

:class:`Flattener` wraps ``model_fn``: the differentiated call returns the tuple of the outputs'
floating-point tensor leaves, which every ``torch.func`` transform accepts, and records the
structure on the side. Every other leaf is dropped: integer tensors, Python numbers, and opaque
objects such as the ``DynamicCache`` a transformers model returns with ``use_cache=True`` (its
key/value tensors depend on the parameters, but no loss reads them). A loss callable sees the
outputs rebuilt with ``None`` in place of each dropped leaf. Pass ``use_cache=False`` to skip
building the cache at all.

:meth:`Flattener.loss_view` picks the part a :mod:`hessfunc.losses` object is applied to: the
whole outputs when they have no ``"logits"`` entry (a tensor, or the ``(mean, var)`` pair of a
Gaussian), else the ``"logits"`` entry of a dict / ``ModelOutput`` (or the ``logits`` field of a
registered dataclass). The other outputs get zero output-space curvature: the loss does not
read them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import _checks

Flat = tuple[torch.Tensor, ...]


def _is_logits(path: tuple) -> bool:
    return len(path) == 1 and (
        getattr(path[0], "key", None) == "logits" or getattr(path[0], "name", None) == "logits"
    )


class Flattener:
    """``model_fn`` as a map to a flat tuple of floating tensors, and the way back.

    One instance per product call: :meth:`call` records the structure of the outputs each time
    it runs (inside the transforms); :meth:`rebuild` and :meth:`loss_view` read that record
    after they return.
    """

    def __init__(self, where: str, model: Callable[[Any], Any]) -> None:
        self.where = where
        self.model = model
        self.record: list[tuple[Any, tuple[int, ...], int, int | None]] = []

    def call(self, params: Any) -> Flat:
        flat = self._flat(self.model(params))
        # outputs less precise than the parameters (a model that casts its logits to float32):
        # every product is then only as accurate as the outputs' dtype. Dtypes only: static
        # under torch.compile, and the warning is traced once (see _checks.warn_lower_precision).
        finest = _checks.most_precise(params)
        if finest is not None:
            for x in flat:
                if torch.finfo(x.dtype).eps > torch.finfo(finest).eps:
                    _checks.warn_lower_precision(
                        self.where, str(x.dtype), str(finest), "model_fn returns a"
                    )
                    break
        return flat

    def _flat(self, out: Any) -> Flat:
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point():
                raise TypeError(
                    f"{self.where}: model_fn returned a {out.dtype} tensor; the outputs must be "
                    "floating-point to be differentiated."
                )
            self.record.append((None, (0,), 1, None))
            return (out,)
        with_paths, spec = pytree.tree_flatten_with_path(out)
        kept = tuple(
            i
            for i, (_, x) in enumerate(with_paths)
            if isinstance(x, torch.Tensor) and x.is_floating_point()
        )
        if not kept:
            raise TypeError(
                f"{self.where}: model_fn returned {type(out).__name__} with no floating-point "
                "tensor that torch's pytree can reach. Return tensors, tuples/dicts of them, or "
                "a container registered with torch.utils._pytree (register_dataclass for a "
                "dataclass; transformers' ModelOutput is registered already)."
            )
        logits = next((k for k, i in enumerate(kept) if _is_logits(with_paths[i][0])), None)
        self.record.append((spec, kept, len(with_paths), logits))
        return tuple(with_paths[i][1] for i in kept)

    def rebuild(self, flat: Flat) -> Any:
        """The outputs as the model returned them, ``None`` for every dropped leaf."""
        spec, kept, n, _ = self.record[-1]
        if spec is None:
            return flat[0]
        leaves: list[Any] = [None] * n
        for i, x in zip(kept, flat, strict=True):
            leaves[i] = x
        return pytree.tree_unflatten(leaves, spec)

    def flatten_like(self, tree: Any) -> Flat:
        """A tree shaped like :meth:`rebuild`'s result (e.g. its gradient) as a flat tuple."""
        spec, kept, _, _ = self.record[-1]
        if spec is None:
            return (tree,)
        leaves = [x for x in pytree.tree_leaves(tree) if x is not None]
        return tuple(leaves)

    def loss_view(self, flat: Flat) -> tuple[Any, Callable[[Any], Flat]]:
        """``(part, embed)``: what a loss object reads, and the map of its cotangent back.

        ``embed(c)`` puts ``c`` (shaped like ``part``, possibly under ``vmap``) where ``part``
        sits and zeros in every other output.
        """
        index = self.record[-1][3]
        if index is None:
            return self.rebuild(flat), self.flatten_like

        def embed(c: torch.Tensor) -> Flat:
            return tuple(c if i == index else torch.zeros_like(x) for i, x in enumerate(flat))

        return flat[index], embed

    def first(self, flat: Flat) -> torch.Tensor:
        """The first output tensor (for dtype and device)."""
        return flat[0]
