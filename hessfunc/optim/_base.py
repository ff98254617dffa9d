r"""What every optimizer in :mod:`hessfunc.optim` shares: the contract, its checks, the schedule.

**The contract.** An optimizer is an :class:`Optimizer`, a NamedTuple of two pure functions:

- ``init(params) -> state``: ``state`` is a pytree of tensors only (nested dicts), so
  ``torch.save`` / ``torch.load`` round-trip it (``weights_only=True`` works when ``params`` is
  built of dicts, lists and tuples) and a resumed run is bit-identical.
- ``step(params, state, *batch, generator=None, noise=None) -> (params, state, info)``: new
  parameters and state, never modifying the ones passed in; ``info`` is a NamedTuple whose
  first field is ``loss`` (:data:`INFO_FIELDS`), the batch loss at the incoming parameters,
  followed by what the method adapts (damping, clipping fraction, CG iterations, ...).

The model and data follow one convention: ``model_fn(params, *batch) -> outputs`` and
``loss_fn(*batch) -> loss``, where ``loss(outputs)`` is the scalar training loss, usually a
:mod:`hessfunc.losses` object (required where the method samples labels from the model).

**Randomness** comes in as an argument, never from the global RNG: ``generator=`` (eager) or
``noise=`` (uniform draws in [0, 1), the only form ``torch.compile`` can trace). Each random
optimizer's step carries a ``draw_noise(params, state, *batch, generator=)`` attribute that draws
exactly what ``step(..., generator=)`` would draw, so ``step(..., noise=draw_noise(...))`` gives
the same result, compiled or not.

**Curvature every k steps, without recompiling.** A method that refreshes its curvature every
``update_every`` steps takes a keyword ``refresh`` (a Python bool, or ``None``). With ``None``
the step reads the counter in ``state`` (an eager host read); a compiled loop keeps its own
Python counter and passes ``refresh=(t % update_every == 0)``, so ``torch.compile(step,
fullgraph=True)`` builds exactly two graphs, one with and one without the refresh, and never
recompiles after both have run once. The step function's ``update_every`` attribute tells a
driver (such as :class:`hessfunc.optim.ModuleOptimizer`) the period; a step without the
attribute takes no ``refresh``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .._base import _checks, _tree
from .._base._types import PyTree

INFO_FIELDS: tuple[str, ...] = ("loss",)
"""The fields every ``info`` starts with, in this order."""


class Optimizer(NamedTuple):
    """An optimizer as two pure functions (optax's shape): ``init`` and ``step``.

    ``init(params) -> state`` and ``step(params, state, *batch, generator=None, noise=None) ->
    (params, state, info)``; see :mod:`hessfunc.optim` for the conventions.
    """

    init: Callable[[PyTree], PyTree]
    """``init(params) -> state``, a pytree of tensors."""
    step: Callable[..., tuple[PyTree, PyTree, NamedTuple]]
    """``step(params, state, *batch, generator=None, noise=None) -> (params, state, info)``."""


# ------------------------------------------------------------------------------ hyperparameters


def check_nonnegative(where: str, name: str, value: Any, fix: str = "") -> None:
    """A Python number (or 0-d tensor, unchecked in value) that must be >= 0."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{where}: {name} must be a float or a 0-d floating tensor.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a float, got {type(value).__name__}.")
    if not value >= 0:
        raise ValueError(
            f"{where}: {name} must be >= 0, got {value!r}." + (f" {fix}" if fix else "")
        )


def check_positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{where}: {name} must be an int >= 1, got {value!r} (1 refreshes on every step)."
        )


def check_betas(where: str, betas: Any) -> None:
    ok = (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
        and all(0.0 <= b < 1.0 for b in betas)
    )
    if not ok:
        raise ValueError(f"{where}: betas must be two floats in [0, 1), got {betas!r}.")


def check_callables(where: str, model_fn: Any, loss_fn: Any) -> None:
    if not callable(model_fn):
        raise TypeError(
            f"{where}: model_fn must be callable as model_fn(params, *batch) -> outputs, got "
            f"{type(model_fn).__name__}."
        )
    if not callable(loss_fn):
        raise TypeError(
            f"{where}: loss_fn must be callable as loss_fn(*batch) -> loss, a loss object such "
            "as hessfunc.losses.CrossEntropyLoss(y) that maps outputs to the scalar loss; got "
            f"{type(loss_fn).__name__}."
        )


def objective(model_fn: Callable[..., PyTree], loss_fn: Callable[..., Any]) -> Callable:
    """``f(params, *batch) -> loss_fn(*batch)(model_fn(params, *batch))``."""

    def f(params: PyTree, *batch: Any) -> torch.Tensor:
        return loss_fn(*batch)(model_fn(params, *batch))

    return f


# ------------------------------------------------------------------------------------- state


def check_state(
    where: str,
    name: str,
    state: Any,
    params: PyTree,
    trees: tuple[str, ...],
    scalars: tuple[str, ...],
) -> Mapping[str, Any]:
    """``state`` must be ``{name: {...}}`` with the given fields; tree fields shaped like params.

    Returns the inner mapping. Structure, shapes and dtypes only, so it is free under compile.
    """
    _checks.check_params(where, params)
    if not isinstance(state, Mapping) or set(state) != {name}:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise TypeError(
            f"{where}: state was not made by this optimizer (expected a dict with the single key "
            f"{name!r}, got {got}). Create it with .init(params) of the same optimizer; a state "
            "from another optimizer cannot be reused."
        )
    inner = state[name]
    expected = set(trees) | set(scalars)
    if not isinstance(inner, Mapping) or set(inner) != expected:
        got = sorted(inner) if isinstance(inner, Mapping) else type(inner).__name__
        raise TypeError(
            f"{where}: state[{name!r}] has fields {got}, expected {sorted(expected)}: it was "
            "made by another version or configuration of the optimizer. Re-create it with "
            ".init(params)."
        )
    spec = _tree.tree_structure(params)
    leaves = _tree.tree_leaves(params)
    for key in trees:
        tree = inner[key]
        if _tree.tree_structure(tree) != spec:
            raise ValueError(
                f"{where}: state[{name!r}][{key!r}] does not have the structure of params "
                f"({_tree.tree_structure(tree)} vs {spec}): the state belongs to another "
                "parameter structure. Create it with .init(params) for these parameters."
            )
        for path, a, b in zip(
            _tree.tree_paths(params), leaves, _tree.tree_leaves(tree), strict=True
        ):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"{where}: state[{name!r}][{key!r}]{path} is {tuple(b.shape)} {b.dtype} but "
                    f"params{path} is {tuple(a.shape)} {a.dtype}: the state belongs to other "
                    "parameters. Create it with .init(params)."
                )
    for key in scalars:
        if not isinstance(inner[key], torch.Tensor) or inner[key].dim() != 0:
            raise TypeError(f"{where}: state[{name!r}][{key!r}] must be a 0-d tensor.")
    return inner


def counter(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the parameters' device."""
    return torch.zeros((), dtype=torch.int64, device=_tree.tree_leaves(params)[0].device)


def scalar(params: PyTree, value: float) -> torch.Tensor:
    """A 0-d tensor in the parameters' (first leaf's) dtype and device."""
    leaf = _tree.tree_leaves(params)[0]
    return torch.full((), value, dtype=leaf.dtype, device=leaf.device)


# ---------------------------------------------------------------------------------- schedule


def should_refresh(where: str, refresh: Any, step: torch.Tensor, every: int) -> bool:
    """The Python bool that picks the graph: ``refresh`` if given, else ``step % every == 0``."""
    if refresh is not None:
        if not isinstance(refresh, bool):
            raise TypeError(
                f"{where}: refresh must be None or a Python bool (it selects the graph), got "
                f"{type(refresh).__name__}."
            )
        return refresh
    if every == 1:
        return True
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{where}: under torch.compile pass refresh=(t % update_every == 0) from a Python "
            "step counter t kept outside the state (reading the state's counter would need a "
            "host sync); hessfunc.optim.ModuleOptimizer does this for you."
        )
    return int(step) % every == 0


def check_random(where: str, needed: bool, generator: Any, noise: Any, what: str) -> None:
    """A refreshing step of a random method needs exactly one of ``generator`` and ``noise``."""
    if not needed:
        return
    if (generator is None) == (noise is None):
        raise ValueError(
            f"{where}: {what} needs exactly one source of randomness: generator="
            "torch.Generator().manual_seed(...) or noise=step.draw_noise(params, state, *batch, "
            f"generator=g); got {'both' if generator is not None else 'neither'}. hessfunc never "
            "uses the global RNG; under torch.compile pass noise."
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"{where}: generator must be a torch.Generator, got {type(generator).__name__}."
            )
        if torch.compiler.is_compiling():
            raise ValueError(
                f"{where}: a torch.Generator cannot be traced by torch.compile; pass "
                "noise=step.draw_noise(params, state, *batch, generator=g) instead."
            )
    else:
        leaves = _tree.tree_leaves(noise)
        if not leaves or not all(
            isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves
        ):
            raise TypeError(
                f"{where}: noise must hold floating tensors of uniform draws in [0, 1), as "
                "step.draw_noise(...) makes them."
            )


def mark(
    step: Callable, *, update_every: int | None = None, draw_noise: Callable | None = None
) -> Callable:
    """Attach the schedule (``update_every``) and the noise drawer to a step function."""
    if update_every is not None:
        step.update_every = update_every  # type: ignore[attr-defined]
    if draw_noise is not None:
        step.draw_noise = draw_noise  # type: ignore[attr-defined]
    return step


def rademacher(u: PyTree) -> PyTree:
    """Uniform draws in [0, 1) mapped to signs: ``-1`` below one half, ``+1`` from it on."""
    return _tree.tree_map(
        lambda x: torch.where(x < 0.5, -torch.ones_like(x), torch.ones_like(x)), u
    )


def uniform_like(tree: PyTree, generator: torch.Generator, batch: int | None = None) -> PyTree:
    """Uniform draws shaped like ``tree``, with a leading ``batch`` axis if given.

    Leaf by leaf in ``ravel`` order, drawn on the generator's device and moved to each leaf's.
    """

    def draw(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape if batch is None else (batch, *x.shape)
        return torch.rand(shape, generator=generator, dtype=x.dtype, device=generator.device).to(
            x.device
        )

    return _tree.tree_map(draw, tree)
