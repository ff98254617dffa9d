r"""A guard for compiled code: run a function compiled and eagerly, and compare every output.

Inductor, ``torch.compile``'s default backend, generates its own kernels, and on some models and
shapes they compute the wrong numbers without any error (hessfunc's own products trace the
modes that were right in every case measured: see ``hessfunc._base._context.traced_mode``). A
compiled training step that contains curvature products is only as trustworthy as the kernels
it was given, so check it once on real inputs before a long run::

    step = torch.compile(train_step, fullgraph=True)
    hessfunc.check_compiled(step, params, batch)  # raises if compiled and eager disagree
    for batch in loader:
        params = step(params, batch)

Error measure (the one :mod:`hessfunc.checking.check` uses): for each floating output leaf ``a``
(compiled) and ``b`` (eager),

.. math:: e = \frac{\|a - b\|}{\|b\| + \text{atol}/\text{rtol}},

so ``e <= rtol`` is exactly ``||a - b|| <= atol + rtol ||b||`` over the whole leaf. Leaves that
are not floating point (indices, counts, booleans, Python values) must be equal. NaN and
infinity must appear in the same places in both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._base import _tree
from .check import CheckReport

__all__ = ["TOLERANCES", "check_compiled"]

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-10},
    torch.float32: {"rtol": 1e-3, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-4},
    torch.bfloat16: {"rtol": 5e-2, "atol": 1e-3},
}
"""Default ``rtol`` / ``atol`` per output dtype: far above the differences that fused kernels and
reordered reductions make (1e-6 relative in float32, 1e-14 in float64, measured on the compile
zoo), far below the errors of the miscompiles seen (relative 0.1 to 10)."""

_HINT = (
    "The compiled function does not compute what the eager one does. If fn is deterministic "
    "(no dropout, no sampling from the global RNG), inductor's generated code is the likely "
    "cause. To confirm, rerun with backend='aot_eager' (same graph, no generated kernels): if "
    "that agrees, the kernels are at fault. Remedies: keep hessfunc's default modes (they trace "
    "reverse-over-reverse under compile), compile a smaller region, or, for the CPU backend, "
    "set torch._inductor.config.cpp.simdlen = 1 before compiling (no vectorised kernels). "
    "Please report the function upstream with this message."
)


def _unwrap(fn: Any) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """``(eager, compiled)`` for a function ``torch.compile`` wrapped, else ``(fn, None)``."""
    orig = getattr(fn, "_torchdynamo_orig_callable", None)
    if orig is not None:
        return orig, fn
    orig = getattr(fn, "_orig_mod", None)  # a compiled nn.Module (OptimizedModule)
    if orig is not None:
        return orig, fn
    return fn, None


def _copy(args: tuple) -> tuple:
    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(x.requires_grad)
        return x

    return _tree.tree_map(one, args)


def _float_dtypes(leaves: list[Any]) -> list[torch.dtype]:
    return [x.dtype for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _tolerances(where: str, leaves: list[Any], rtol: Any, atol: Any) -> tuple[float, float]:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{where}: {name} must be None or a float, got {type(value).__name__}.")
    dtypes = _float_dtypes(leaves)
    # the least precise floating dtype among the outputs sets the default
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float64
    table = TOLERANCES.get(dtype)
    if table is None and (rtol is None or atol is None):
        raise ValueError(
            f"{where}: no default tolerance for outputs of dtype {dtype}; pass rtol= and atol=."
        )
    out_rtol = float(table["rtol"] if rtol is None else rtol)
    out_atol = float(table["atol"] if atol is None else atol)
    if not out_rtol > 0 or not out_atol >= 0:
        raise ValueError(f"{where}: need rtol > 0 and atol >= 0, got {out_rtol}, {out_atol}.")
    return out_rtol, out_atol


def _leaf_error(a: Any, b: Any, rtol: float, atol: float) -> float:
    """The error measure of the module docstring; 0 or inf for leaves compared exactly."""
    if not isinstance(b, torch.Tensor):
        return 0.0 if a == b else float("inf")
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if b.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    same = (a == b) | (a.isnan() & b.isnan())  # inf and nan where the eager output has them
    if not bool(same[~finite].all()):
        return float("inf")
    diff = torch.linalg.vector_norm(a[finite] - b[finite])
    return float(diff / (torch.linalg.vector_norm(b[finite]) + atol / rtol))


def check_compiled(
    fn: Callable[..., Any],
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_fail: bool = True,
    **compile_kwargs: Any,
) -> CheckReport:
    r"""Check that ``torch.compile(fn, fullgraph=True)`` computes what ``fn`` computes eagerly.

    Compiles ``fn`` with ``torch.compile(fn, fullgraph=True, **compile_kwargs)`` (the default
    backend is inductor), calls it on ``args``, calls ``fn`` eagerly on copies of the same
    ``args``, and compares every output leaf (see the module docstring for the measure).
    ``fn`` may also be a function or module that ``torch.compile`` already wrapped: then that
    very compiled object is checked against the function it wraps (``compile_kwargs`` must be
    empty).

    Use it once, on the first batch, before a long compiled run whose step contains curvature
    products (Newton-CG, Hessian-free, sharpness penalties): it costs one compiled and one eager
    call, and it turns a silent miscompile into an error that names the output leaf.

    Args:
        fn: the function to check; it should be deterministic (a random function differs
            between any two calls).
        *args: its arguments. The compiled call receives them as they are (an in-place update
            that ``fn`` makes happens once, as in a real step); the eager call receives copies
            of the tensor leaves, taken before the compiled call.
        rtol: relative tolerance (default from :data:`TOLERANCES` for the least precise floating
            output dtype).
        atol: absolute tolerance, the floor of the scale of a leaf (default from the table).
        raise_on_fail: raise ``AssertionError`` naming the leaves that disagree (default); with
            ``False``, return the report either way.
        **compile_kwargs: passed to ``torch.compile`` (``backend=``, ``mode=``, ``dynamic=``;
            ``fullgraph`` defaults to ``True``).

    Returns:
        A :class:`hessfunc.CheckReport`: ``ok``, ``errors`` (output leaf path -> error),
        ``rtol``, ``atol`` and ``message`` (``step`` and ``directions`` are ``None``).

    Cost:
        Compiling ``fn`` (seconds to minutes, once) plus one compiled and one eager call; memory
        of one extra copy of the tensor arguments and of the outputs.

    Example:
        >>> import torch, hessfunc
        >>> f = lambda th: (th.sin() ** 2).sum()
        >>> hvp = lambda th, v: hessfunc.hvp(f, th, v)
        >>> th, v = torch.linspace(0, 1, 5), torch.ones(5)
        >>> hessfunc.check_compiled(hvp, th, v).ok
        True
    """
    where = "hessfunc.check_compiled(fn, *args)"
    eager, compiled = _unwrap(fn)
    if not callable(eager):
        raise TypeError(f"{where}: fn must be callable, got {type(fn).__name__}.")
    if compiled is None:
        compile_kwargs.setdefault("fullgraph", True)
        compiled = torch.compile(eager, **compile_kwargs)
    elif compile_kwargs:
        raise ValueError(
            f"{where}: fn is already compiled, so compile options "
            f"({', '.join(sorted(compile_kwargs))}) cannot apply; pass the uncompiled function "
            "to compile it here, or drop the options."
        )
    copies = _copy(args)
    got = compiled(*args)
    expected = eager(*copies)
    got_leaves, exp_leaves = _tree.tree_leaves(got), _tree.tree_leaves(expected)
    rtol_, atol_ = _tolerances(where, exp_leaves, rtol, atol)
    if len(got_leaves) != len(exp_leaves):
        errors = {"<structure>": float("inf")}
    else:
        paths = _tree.tree_paths(expected)
        errors = {
            p: _leaf_error(a, b, rtol_, atol_)
            for p, a, b in zip(paths, got_leaves, exp_leaves, strict=True)
        }
    failed = {p: e for p, e in errors.items() if not e <= rtol_}
    message = ""
    if failed:
        lines = [f"{where}: compiled and eager outputs disagree (rtol={rtol_:g}, atol={atol_:g}):"]
        lines += [f"  output{p}: relative error {e:.3g}" for p, e in failed.items()]
        message = "\n".join([*lines, _HINT])
    report = CheckReport(not failed, errors, None, None, rtol_, atol_, message)
    if failed and raise_on_fail:
        raise AssertionError(message)
    return report
