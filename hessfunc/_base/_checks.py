"""Input validation shared by every public function.

Only structure, shapes, dtypes and devices are inspected, never tensor values, so the checks are
free under ``torch.compile(fullgraph=True)`` (they turn into guards) and run before any large
allocation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch

from . import _tree
from ._types import Mode, PyTree

MODES: tuple[str, ...] = get_args(Mode)


def check_mode(where: str, mode: Any, allowed: Sequence[str] = MODES) -> None:
    if mode not in allowed:
        raise ValueError(
            f"{where}: unknown mode={mode!r}; expected one of {', '.join(map(repr, allowed))}. "
            "'fwd-rev' (forward-over-reverse) is the default and usually fastest; 'rev-rev' "
            "avoids forward-mode AD for ops that lack it."
        )


def check_chunk_size(where: str, chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{where}: chunk_size must be None or a positive int, got {chunk_size!r}.")


def check_params(where: str, params: Any, name: str = "params") -> None:
    """A non-empty pytree of floating tensors on one device."""
    leaves = _tree.tree_leaves(params)
    if not leaves:
        raise ValueError(
            f"{where}: {name} is an empty pytree (got {params!r}); there is nothing to "
            "differentiate. Pass at least one floating-point tensor."
        )
    paths = _tree.tree_paths(params)
    device = None
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{where}: every leaf of {name} must be a torch.Tensor; {name}{path} is "
                f"{type(leaf).__name__}. Pass non-differentiated values through *args instead."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{where}: {name}{path} has dtype {leaf.dtype}; only floating-point leaves can be "
                "differentiated. Cast it (e.g. .double()) or pass it through *args instead."
            )
        if device is None:
            device = leaf.device
        elif leaf.device != device:
            raise ValueError(
                f"{where}: {name}{path} is on {leaf.device} but other leaves are on {device}; "
                "move every leaf to one device first."
            )


def check_like(where: str, params: Any, v: Any, name: str = "v", *, batched: bool = False) -> int:
    """``v`` matches ``params`` in structure, shapes, dtypes and device.

    With ``batched=True`` every leaf of ``v`` carries one extra leading axis of a common size,
    which is returned (``-1`` otherwise).

    Under torch.compile the tree specs are not compared: before pytorch#190649 (torch 2.11, for
    one) dynamo's stand-in for optree's ``PyTreeSpec`` is a dataclass whose generated ``==``
    compares every field exactly and is false for the specs of two equal trees, so an exact
    comparison rejected every compiled call. The leaf count, the leaves' paths (names, so a
    reordered dict is refused), shapes, dtypes and devices are still checked there, and the
    exact check runs in every eager call.
    """
    p_leaves, v_leaves = _tree.tree_leaves(params), _tree.tree_leaves(v)
    if torch.compiler.is_compiling():
        same = len(p_leaves) == len(v_leaves)
        if same:  # the names are plain Python over the structure: compared while tracing
            check_paths(where, _tree.tree_paths(params), v, name, "params")
    else:
        same = _tree.tree_structure(params) == _tree.tree_structure(v)
    if not same:
        raise ValueError(
            f"{where}: {name} must have the pytree structure of params; got "
            f"{_tree.tree_structure(v)} vs {_tree.tree_structure(params)}. "
            f"Build {name} with hessfunc's tree helpers or torch.func's tree_map over params."
        )

    def path(i: int) -> str:  # only built for an error message
        return _tree.tree_paths(params)[i]

    batch = -1
    for i, (p, t) in enumerate(zip(p_leaves, v_leaves, strict=True)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name}{path(i)} must be a tensor, got {type(t).__name__}.")
        shape = tuple(t.shape)
        if batched:
            if t.dim() != p.dim() + 1:
                raise ValueError(
                    f"{where}: {name}{path(i)} must have a leading batch axis before params' "
                    f"shape {tuple(p.shape)}; got {shape}."
                )
            if batch == -1:
                batch = shape[0]
            elif shape[0] != batch:
                raise ValueError(
                    f"{where}: every leaf of {name} needs the same leading batch size; "
                    f"{name}{path(i)} has {shape[0]}, an earlier leaf {batch}."
                )
            shape = shape[1:]
        if shape != tuple(p.shape):
            raise ValueError(
                f"{where}: {name}{path(i)} has shape {tuple(t.shape)} but params{path(i)} has "
                f"{tuple(p.shape)}{' (after the batch axis)' if batched else ''}."
            )
        if t.dtype != p.dtype:
            raise TypeError(
                f"{where}: {name}{path(i)} has dtype {t.dtype} but params{path(i)} has "
                f"{p.dtype}; cast {name} with .to(params' dtype)."
            )
        if t.device != p.device:
            raise ValueError(
                f"{where}: {name}{path(i)} is on {t.device} but params{path(i)} is on "
                f"{p.device}; move {name} with .to(device)."
            )
    return batch


def scalar_fn(where: str, f: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """Wrap ``f`` so a non-scalar or non-floating output raises a clear error.

    The check reads only the output's shape and dtype, which are static under transforms and
    under ``torch.compile``.
    """

    def wrapped(*a: Any, **kw: Any) -> torch.Tensor:
        out = f(*a, **kw)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{where}: f must return a scalar tensor, got {type(out).__name__}. If f returns "
                "(loss, aux), wrap it: lambda *a: f(*a)[0]."
            )
        if out.dim() != 0:
            raise ValueError(
                f"{where}: f must return a scalar (0-d) tensor, got shape {tuple(out.shape)}. "
                "Reduce it first (e.g. .sum() or .mean()); for vector outputs use "
                "torch.func.jacrev or hessfunc.ggn_vp."
            )
        if not out.is_floating_point():
            raise TypeError(f"{where}: f must return a floating-point scalar, got {out.dtype}.")
        if a:
            finest = most_precise(a[0])
            if finest is not None and torch.finfo(out.dtype).eps > torch.finfo(finest).eps:
                warn_lower_precision(where, str(out.dtype), str(finest))
        return out

    return wrapped


class LowPrecisionWarning(UserWarning):
    """``f`` returns its scalar in a less precise dtype than its parameters.

    Every derivative of ``f`` is then only as accurate as that dtype: float64 parameters with a
    float32 loss (transformers' causal-LM losses call ``logits.float()``) give Hessian products
    with float32 rounding (about 1e-7 relative), and finite differences in float64 steps
    measure that rounding rather than a derivative.
    """


def most_precise(tree: Any) -> torch.dtype | None:
    """The most precise floating dtype among the tensor leaves of ``tree`` (``None`` if none)."""
    best = None
    for leaf in _tree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            if best is None or torch.finfo(leaf.dtype).eps < torch.finfo(best).eps:
                best = leaf.dtype
    return best


_WARNED: set[tuple[str, str, str, str]] = set()


def warn_lower_precision(where: str, out: str, params: str, what: str = "f returns a") -> bool:
    """Warn once per (call, dtypes) per process that ``f`` computes its value in ``out``
    (``what="model_fn returns a"``: the model's outputs are in ``out``).

    Marked like ``torch.compiler.assume_constant_result`` (see ``_context``): under
    ``torch.compile`` dynamo runs this body once while tracing instead of putting it into the
    graph, so the warning costs nothing per step and keeps ``fullgraph=True`` working. Its
    arguments are strings built from dtypes, which are static.
    """
    key = (where, out, params, what)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{where}: {what} {out} {'scalar' if what.startswith('f ') else 'output'} while "
            f"params are {params}, so every derivative is only as accurate as {out}. The "
            "computation is in lower precision (a cast such as logits.float(), which "
            "transformers' causal-LM losses apply); compute it in "
            f"{params} yourself (e.g. from the model's .logits) for {params}-accurate products.",
            LowPrecisionWarning,
            stacklevel=4,
        )
    return True


warn_lower_precision._dynamo_marked_constant = True  # type: ignore[attr-defined]


def check_random_source(where: str, what: str, generator: Any, noise: Any) -> None:
    """``what`` (e.g. ``"fisher='mc'"``) draws from exactly one of ``generator`` and ``noise``."""
    if (generator is None) == (noise is None):
        raise ValueError(
            f"{where}: {what} needs exactly one source of randomness: generator="
            "torch.Generator().manual_seed(...) or noise=<uniform draws>; got "
            f"{'both' if generator is not None else 'neither'}. hessfunc never uses the "
            "global RNG; under torch.compile pass noise."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}."
        )
    if noise is not None and (not isinstance(noise, torch.Tensor) or not noise.is_floating_point()):
        raise TypeError(f"{where}: noise must be a floating tensor of uniform draws in [0, 1).")


def check_batched(where: str, out: PyTree, like: PyTree, k: int) -> PyTree:
    """``out``, ``k`` batched products, checked to be shaped like ``like`` with a leading ``k``.

    A ``vmap`` batching rule that mishandles a broadcast in a backward formula returns a result
    of the wrong shape rather than raising: on torch 2.13, ``masked_select`` on a mask that
    broadcasts its input (its ``masked_scatter_backward`` runs through vmap's fallback) gave an
    ``(n_mask, n)`` block for a ``(k, n)`` one (hessfunc now routes that op, ``_decomp``). Any
    other such rule is caught here rather than returned; shapes are static, so this costs
    nothing under compile.
    """
    for got, ref in zip(_tree.tree_leaves(out), _tree.tree_leaves(like), strict=True):
        if tuple(got.shape) != (k, *ref.shape):
            raise NotImplementedError(
                f"{where}: vmap batched a derivative inside f wrongly: a block of {k} products "
                f"came back with shape {tuple(got.shape)} instead of {(k, *tuple(ref.shape))} (a "
                "torch.func vectorisation rule, e.g. masked_select with a mask that broadcasts its "
                "input). Take one direction at a time with hessfunc.hvp (or ggn_vp) in a Python "
                "loop, or try the other mode and confirm it with hessfunc.check_hvp."
            )
    return out


# ----------------------------------------------------------------------------- by name


def check_paths(where: str, expected: Sequence[str], tree: Any, name: str, like: str) -> None:
    """The leaves of ``tree`` have the paths ``expected``, in that order: matched by name.

    hessfunc's flat vectors keep dicts in insertion order (``_tree``), so a dict holding the
    right leaves under the right keys in another order would ravel to a permuted vector, and a
    check of sizes alone passes it (two layers of equal shapes, or a transposed leaf of equal
    size). Comparing the paths catches both. They are compared in eager code and while
    torch.compile traces (``tree_paths`` is plain Python over the structure), so a compiled
    call pays nothing at run time. A reordered tree is refused rather than reordered: one rule
    for every function, and a matvec that builds its output in another order is usually a
    matvec that puts a product under the wrong name somewhere else too.
    """
    got = _tree.tree_paths(tree)
    want = list(expected)
    if got == want:
        return
    if sorted(got) == sorted(want):
        raise ValueError(
            f"{where}: {name} holds the leaves of {like} in another order: "
            f"{' '.join(got)} where {like} has {' '.join(want)}. hessfunc matches leaves by "
            "name and refuses a reordered tree (it "
            f"would be read by position). Build {name} in the order of {like}, e.g. with "
            f"torch.func's tree_map over {like}, or a dict built by iterating over its keys."
        )
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    raise ValueError(
        f"{where}: {name} must have the leaves of {like}, matched by name; "
        f"{'missing ' + ', '.join(missing) if missing else ''}"
        f"{'; ' if missing and extra else ''}"
        f"{'unexpected ' + ', '.join(extra) if extra else ''} (got {' '.join(got)}, expected "
        f"{' '.join(want)})."
    )


def check_tree(
    where: str,
    like: PyTree,
    tree: PyTree,
    name: str,
    like_name: str = "params",
    *,
    batched: bool = False,
) -> int:
    """``tree`` matches ``like`` leaf by leaf, by name: paths, structure, shapes, dtypes, device.

    The one structural rule for vectors, right-hand sides and matvec outputs: :func:`check_paths`
    (names and their order), then :func:`check_like` (structure, shapes, dtypes, devices; with
    ``batched=True`` a common leading axis, whose size is returned).
    """
    check_paths(where, _tree.tree_paths(like), tree, name, like_name)
    return check_like(where, like, tree, name, batched=batched)


def check_damping(where: str, damping: Any, *, positive: bool = False) -> None:
    """``damping`` is a number >= 0 (> 0 with ``positive``) or a 0-d floating tensor.

    A tensor's value is not read (that would break ``torch.compile``); its shape and dtype are.
    """
    if isinstance(damping, torch.Tensor):
        if damping.dim() != 0:
            raise ValueError(
                f"{where}: damping must be a number or a 0-d tensor, got shape "
                f"{tuple(damping.shape)}; one damping is added to every eigenvalue. For a "
                "per-entry shift, fold it into matvec."
            )
        if not (damping.is_floating_point() or damping.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"{where}: damping must be a real number, got dtype {damping.dtype}.")
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(
            f"{where}: damping must be a float or a 0-d tensor, got {type(damping).__name__} "
            f"{damping!r:.60}."
        )
    if positive and not damping > 0:
        raise ValueError(
            f"{where}: damping must be > 0, got {damping!r}; the directions outside the kept "
            "eigenspace are scaled by 1/damping. Pick it on the scale of the discarded "
            "eigenvalues or larger (e.g. 1e-3 to 1e-1 times the largest eigenvalue)."
        )
    if not damping >= 0:
        raise ValueError(
            f"{where}: damping must be >= 0 (damping must be non-negative), got {damping!r}."
        )
