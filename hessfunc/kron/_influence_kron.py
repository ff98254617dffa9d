"""K-FAC and EK-FAC of the training set for :func:`hessfunc.influence` (``solver="kfac"/"ekfac"``).

The factors are sums over samples with their counts, so they are built one training chunk at a
time and merged exactly: :meth:`hessfunc.KFAC.add` for K-FAC, and for EK-FAC the two-pass recipe
(the merged K-FAC gives the basis, then the moments of every chunk in that basis are added with
:meth:`hessfunc.ekfac.Moments.add`). One chunk takes one pass (``ekfac`` shares its backward
passes between the factors and the moments). The result is eigendecomposed once; every solve
after that is four small matrix products per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._base._types import PyTree
from ..losses import Loss
from ._kron import FISHERS
from .ekfac import EKFAC, ekfac
from .kfac import kfac

DEFAULTS: dict[str, Any] = {
    "model_fn": None,
    "loss_fn": None,
    "fisher": "type-2",
    "generator": None,
    "mc_samples": 1,
    "separate_bias": False,
    "chunk_size": None,
}

_EXAMPLE = (
    "solver_options={'model_fn': lambda p, X, y: apply(p, X), 'loss_fn': lambda X, y: "
    "hessfunc.losses.CrossEntropyLoss(y)}, both called with a training batch (the arguments "
    "loss gets after params)"
)


def check(where: str, kind: str, opts: Mapping[str, Any], damping: Any) -> None:
    """Validate the options that need no model pass (structure and types only)."""
    for name in ("model_fn", "loss_fn"):
        if opts[name] is None:
            raise ValueError(f"{where}: solver={kind!r} needs {name}: pass {_EXAMPLE}.")
        if not callable(opts[name]):
            raise TypeError(
                f"{where}: solver_options[{name!r}] must be callable; got "
                f"{type(opts[name]).__name__}. Pass {_EXAMPLE}."
            )
    if opts["fisher"] not in FISHERS:
        raise ValueError(
            f"{where}: unknown solver_options['fisher']={opts['fisher']!r}; expected one of "
            f"{list(FISHERS)}."
        )
    if opts["fisher"] == "mc" and opts["generator"] is None:
        raise ValueError(
            f"{where}: fisher='mc' needs solver_options['generator'], a torch.Generator for the "
            "sampled targets (hessfunc never uses the global RNG)."
        )
    if opts["fisher"] != "mc" and (opts["generator"] is not None or opts["mc_samples"] != 1):
        raise ValueError(
            f"{where}: solver_options 'generator' and 'mc_samples' are only used with "
            f"fisher='mc'; fisher={opts['fisher']!r} is deterministic. Drop them or pass "
            "fisher='mc'."
        )
    if isinstance(damping, torch.Tensor):
        return  # its value is not read: under torch.compile that would be a graph break
    if not damping > 0:
        raise ValueError(
            f"{where}: solver={kind!r} needs damping > 0, got damping={damping!r}: parameters "
            "no layer covers (the factors' .uncovered) are divided by it, and the factors are "
            "singular with fewer samples than input features. Pass e.g. damping=1e-3 times the "
            "largest eigenvalue, plus the curvature of any regulariser in loss."
        )


def _loss(where: str, kind: str, loss_fn: Callable[..., Any], batch: tuple) -> Loss:
    out = loss_fn(*batch)
    if not isinstance(out, Loss):
        raise TypeError(
            f"{where}: solver_options['loss_fn'](*batch) must return a hessfunc.losses object "
            f"bound to the batch's targets, e.g. lambda X, y: hessfunc.losses.CrossEntropyLoss(y); "
            f"got {type(out).__name__}."
        )
    if getattr(out, "reduction", "mean") != "mean":
        raise ValueError(
            f"{where}: solver={kind!r} needs loss_fn to build a loss with reduction='mean' (the "
            f"default), as loss is the mean training loss; got reduction={out.reduction!r}."
        )
    return out


def build(
    where: str, kind: str, params: PyTree, batches: Sequence[tuple], opts: Mapping[str, Any]
) -> EKFAC:
    """The K-FAC (``kind="kfac"``, eigendecomposed) or EK-FAC of the union of ``batches``."""
    model_fn, loss_fn = opts["model_fn"], opts["loss_fn"]
    kw = {
        "fisher": opts["fisher"],
        "generator": opts["generator"],
        "mc_samples": opts["mc_samples"],
        "separate_bias": opts["separate_bias"],
        "chunk_size": opts["chunk_size"],
    }

    def each(fn: Callable[..., Any], **extra: Any) -> list[Any]:
        return [
            fn(model_fn, _loss(where, kind, loss_fn, b), params, *b, **kw, **extra) for b in batches
        ]

    if kind == "ekfac" and len(batches) == 1:
        return each(ekfac)[0]
    parts = each(kfac)
    total = parts[0]
    for part in parts[1:]:
        total = total.add(part)
    basis = total.eigendecompose()
    if kind == "kfac":
        return basis
    moments = [e.moments for e in each(ekfac, basis=basis)]
    merged = moments[0]
    for m in moments[1:]:
        merged = merged.add(m)
    return basis._replace(moments=merged)
