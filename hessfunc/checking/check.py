r"""Checkers: automatic differentiation through ``f`` against finite differences.

Modelled on ``jax.test_util.check_grads``: each checker draws random unit directions from an
explicit ``torch.Generator``, compares what autodiff computes through ``f`` with finite
differences (:mod:`hessfunc.products.fd`), checks the symmetry identity
:math:`\langle u, Hv \rangle = \langle Hu, v \rangle`, and either returns a :class:`CheckReport`
or raises an ``AssertionError`` that says which check failed, by how much, and the likely cause.

Error measure:
    Every check compares a computed value :math:`a` with a reference :math:`b` (the finite
    difference, or the transposed product for symmetry) and reports

    .. math:: e = \frac{\|a - b\|}{\|b\| + \text{atol}/\text{rtol}},

    maximised over directions. ``e <= rtol`` is exactly ``||a - b|| <= atol + rtol ||b||``
    (``torch.allclose``'s rule applied to the whole vector), so ``e`` reads as a relative error
    in which ``atol`` sets the smallest scale that counts.

Tolerances:
    One table, :data:`TOLERANCES`, keyed by the least precise dtype among the leaves of
    ``params``; ``rtol=`` / ``atol=`` override it. The defaults leave a wide margin over the
    finite-difference error at the default step (about :math:`u^{2/3}`: 1e-10 in float64, 1e-5
    in float32), because third derivatives of real models can be large.

The checkers run eagerly and read values (``.item()``); they are test utilities, not meant to
be compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.func import jacrev, vmap

from .._base import _checks, _tree
from .._base._checks import LowPrecisionWarning
from .._base._types import PyTree
from ..products.fd import (
    _check_order,
    _check_step,
    _least_precise,
    default_step,
    fd_grad,
    fd_hessian_matrix,
    fd_hvps,
)
from ..products.hessian import hessian_matrix
from ..products.hvp import hvps
from ._diagnoses import diagnose as _diagnose
from ._diagnoses import lower_precision as _lower_precision

__all__ = [
    "TOLERANCES",
    "CheckReport",
    "LowPrecisionWarning",
    "check_grad",
    "check_hessian",
    "check_hvp",
]

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-6, "atol": 1e-7},
    torch.float32: {"rtol": 1e-2, "atol": 1e-3},
}
"""Default ``rtol`` / ``atol`` per dtype (override per call with ``rtol=`` / ``atol=``)."""

MODES = ("fwd-rev", "rev-rev")


class CheckReport(NamedTuple):
    """What a checker measured.

    Attributes:
        ok: every check passed.
        errors: check name -> largest relative error over directions (see the module docstring);
            ``inf`` for a check whose autodiff call raised.
        step: the explicit ``step``, or the base step :math:`h_0` of the default rule (scaled per
            direction as described in :mod:`hessfunc.products.fd`); ``None`` for
            :func:`hessfunc.check_compiled`, which uses no finite differences.
        directions: the unit directions used, a pytree like ``params`` with a leading axis
            (``None`` for :func:`hessfunc.check_compiled`).
        rtol: the relative tolerance applied.
        atol: the absolute tolerance applied.
        message: the diagnosis (empty when ``ok``).

    """

    ok: bool
    errors: dict[str, float]
    step: float | None
    directions: PyTree | None
    rtol: float
    atol: float
    message: str


# ----------------------------------------------------------------------------- helpers


def _tolerances(where: str, params: PyTree, rtol: Any, atol: Any) -> tuple[float, float]:
    dtype = _least_precise(params)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{where}: {name} must be None or a float, got {type(value).__name__}.")
    if rtol is not None and not rtol > 0:
        raise ValueError(f"{where}: rtol must be positive, got {rtol!r}.")
    if atol is not None and not atol >= 0:
        raise ValueError(f"{where}: atol must be non-negative, got {atol!r}.")
    table = TOLERANCES.get(dtype)
    if table is None and (rtol is None or atol is None):
        raise ValueError(
            f"{where}: no default tolerance for {dtype} (hessfunc.checking.check.TOLERANCES covers "
            f"{', '.join(map(str, TOLERANCES))}); pass rtol= and atol= explicitly."
        )
    return (
        float(table["rtol"] if rtol is None else rtol),
        float(table["atol"] if atol is None else atol),
    )


def _check_common(
    where: str, params: PyTree, n_directions: Any, generator: Any, step: Any, order: Any
) -> None:
    _checks.check_params(where, params)
    _check_order(where, order)
    _check_step(where, step)
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"{where}: n_directions must be a positive int, got {n_directions!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be None (a CPU generator seeded with 0) or a "
            f"torch.Generator, got {type(generator).__name__}."
        )


def _check_modes(where: str, modes: Any) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    if not modes:
        raise ValueError(f"{where}: modes must name at least one of {MODES}.")
    for m in modes:
        _checks.check_mode(where, m)
    return modes


def _unit_directions(params: PyTree, k: int, generator: torch.Generator | None) -> PyTree:
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    raw = _tree.random_like(params, gen, batch=k)
    norms = torch.sqrt(sum(_batched(lambda x: x * x, raw)))
    return _tree.tree_map(lambda x: x / norms.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype), raw)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], tree: PyTree) -> list[torch.Tensor]:
    """Per-leaf sums over all but the leading axis, in float64."""
    return [fn(x).reshape(x.shape[0], -1).sum(1).double() for x in _tree.tree_leaves(tree)]


def _norms(tree: PyTree) -> torch.Tensor:
    return torch.sqrt(sum(_batched(lambda x: x * x, tree)))


def _rel(a: PyTree, b: PyTree, floor: float) -> float:
    """Largest ``||a_j - b_j|| / (||b_j|| + floor)`` over the leading axis."""
    diff = _tree.tree_map(lambda x, y: x.double() - y.double(), a, b)
    return float((_norms(diff) / (_norms(b) + floor)).max())


def _gram(us: PyTree, hvs: PyTree) -> torch.Tensor:
    """``M[i, j] = <u_i, H u_j>`` in float64."""
    terms = [
        x.reshape(x.shape[0], -1).double() @ y.reshape(y.shape[0], -1).double().T
        for x, y in zip(_tree.tree_leaves(us), _tree.tree_leaves(hvs), strict=True)
    ]
    return sum(terms)


def _symmetry_error(m: torch.Tensor, floor: float) -> float:
    return float(torch.linalg.norm(m - m.T) / (torch.linalg.norm(m) + floor))


def _grad_error(
    where: str,
    f: Callable,
    params: PyTree,
    args: tuple,
    dirs: PyTree,
    step: Any,
    order: int,
    floor: float,
) -> float:
    grad = jacrev(_checks.scalar_fn(where, f), argnums=0)(params, *args)
    exact = sum(_batched(lambda x: x, _tree.tree_map(lambda v, g: v * g, dirs, grad)))
    approx = fd_grad(f, params, *args, step=step, order=order, directions=dirs).double()
    return float(((approx - exact).abs() / (approx.abs() + floor)).max())


def _finish(
    where: str,
    errors: dict[str, float],
    raised: dict[str, str],
    params: PyTree,
    step: Any,
    order: int,
    dirs: PyTree,
    rtol: float,
    atol: float,
    raise_on_fail: bool,
    lower: tuple[str, str] | None = None,
) -> CheckReport:
    message = _diagnose(where, errors, raised, rtol, lower)
    base = float(step) if step is not None else default_step(_least_precise(params), order)
    report = CheckReport(not message, errors, base, dirs, rtol, atol, message)
    if message and raise_on_fail:
        raise AssertionError(message)
    return report


def _try(name: str, raised: dict[str, str], thunk: Callable[[], Any]) -> Any:
    try:
        return thunk()
    except (NotImplementedError, RuntimeError) as err:
        raised[name] = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        return None


# ----------------------------------------------------------------------------- public


def check_grad(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    n_directions: int = 3,
    generator: torch.Generator | None = None,
    step: float | None = None,
    order: int = 2,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_fail: bool = True,
) -> CheckReport:
    r"""Check the reverse-mode gradient of ``f`` against finite differences of ``f``.

    For ``n_directions`` random unit directions :math:`v_j`, compares
    :math:`\langle \nabla f(\theta), v_j\rangle` (autodiff) with
    :func:`hessfunc.products.fd.fd_grad` along :math:`v_j`.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is.
        n_directions: number of random directions.
        generator: source of the directions (``None``: a CPU generator seeded with 0, so the
            check is reproducible); it is advanced.
        step: finite-difference step (``None``: the default rule of :mod:`hessfunc.products.fd`).
        order: finite-difference order, 2 or 4.
        rtol: relative tolerance (default from :data:`TOLERANCES` for the least precise dtype).
        atol: absolute tolerance, the floor of the scale (default from :data:`TOLERANCES`).
        raise_on_fail: raise ``AssertionError`` with the diagnosis on failure (default); with
            ``False`` return the report either way.

    Returns:
        :class:`CheckReport` with the check ``"grad"``.

    Cost:
        One gradient plus ``order * n_directions`` evaluations of ``f`` (vectorised).

    Example:
        >>> import torch
        >>> from hessfunc.checking.check import check_grad
        >>> check_grad(lambda t: torch.sin(t).sum(), torch.randn(4, dtype=torch.float64)).ok
        True

    """
    where = "hessfunc.check_grad(f, params, *args)"
    _check_common(where, params, n_directions, generator, step, order)
    rtol_, atol_ = _tolerances(where, params, rtol, atol)
    dirs = _unit_directions(params, n_directions, generator)
    errors = {"grad": _grad_error(where, f, params, args, dirs, step, order, atol_ / rtol_)}
    lower = _lower_precision(f, params, args)
    return _finish(where, errors, {}, params, step, order, dirs, rtol_, atol_, raise_on_fail, lower)


def check_hvp(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    modes: Sequence[str] = MODES,
    n_directions: int = 3,
    generator: torch.Generator | None = None,
    step: float | None = None,
    order: int = 2,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_fail: bool = True,
) -> CheckReport:
    r"""Check Hessian-vector products of ``f`` against finite differences of its gradient.

    Checks, for random unit directions :math:`v_j`:

    * ``"grad"``: the gradient, as in :func:`check_grad` (so a wrong first derivative is
      told apart from a wrong second derivative);
    * ``"hvp[<mode>]"`` for each of ``modes``: :func:`hessfunc.hvps` against
      :func:`hessfunc.products.fd.fd_hvps` (differences of exact gradients);
    * ``"symmetry"``: the matrix :math:`M_{ij} = \langle v_i, H v_j \rangle` of the first mode
      that ran is symmetric, i.e. :math:`\langle u, Hv\rangle = \langle Hu, v\rangle`
      (needs ``n_directions >= 2`` to say anything).

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is.
        modes: the AD modes to check, ``"fwd-rev"`` and/or ``"rev-rev"`` (default both). A mode
            that raises (e.g. an op without forward-mode AD) fails with error ``inf`` and the
            exception text in the message.
        n_directions: number of random directions.
        generator: source of the directions (``None``: a CPU generator seeded with 0).
        step: finite-difference step (``None``: the default rule of :mod:`hessfunc.products.fd`).
        order: finite-difference order, 2 or 4.
        rtol: relative tolerance (default from :data:`TOLERANCES`).
        atol: absolute tolerance (default from :data:`TOLERANCES`).
        raise_on_fail: raise ``AssertionError`` with the diagnosis on failure (default).

    Returns:
        :class:`CheckReport` with the checks ``"grad"``, ``"hvp[<mode>]"`` and ``"symmetry"``.

    Cost:
        One gradient, ``n_directions`` HVPs per mode and ``order * n_directions`` gradients for
        the finite differences, all vectorised over directions.

    Example:
        >>> import torch
        >>> from hessfunc.checking.check import check_hvp
        >>> f = lambda t, A: torch.tanh(A @ t).sum()
        >>> A = torch.randn(3, 3, dtype=torch.float64)
        >>> report = check_hvp(f, torch.randn(3, dtype=torch.float64), A)
        >>> report.ok, sorted(report.errors)
        (True, ['grad', 'hvp[fwd-rev]', 'hvp[rev-rev]', 'symmetry'])

    """
    where = "hessfunc.check_hvp(f, params, *args)"
    modes = _check_modes(where, modes)
    _check_common(where, params, n_directions, generator, step, order)
    rtol_, atol_ = _tolerances(where, params, rtol, atol)
    floor = atol_ / rtol_
    dirs = _unit_directions(params, n_directions, generator)
    errors = {"grad": _grad_error(where, f, params, args, dirs, step, order, floor)}
    raised: dict[str, str] = {}
    reference = fd_hvps(f, params, dirs, *args, step=step, order=order)
    first = None
    for mode in modes:
        name = f"hvp[{mode}]"
        hv = _try(name, raised, lambda m=mode: hvps(f, params, dirs, *args, mode=m))
        errors[name] = float("inf") if hv is None else _rel(hv, reference, floor)
        first = hv if first is None else first
    errors["symmetry"] = (
        float("inf") if first is None else _symmetry_error(_gram(dirs, first), floor)
    )
    lower = _lower_precision(f, params, args)
    return _finish(
        where, errors, raised, params, step, order, dirs, rtol_, atol_, raise_on_fail, lower
    )


def check_hessian(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    modes: Sequence[str] = MODES,
    n_directions: int = 3,
    generator: torch.Generator | None = None,
    step: float | None = None,
    order: int = 2,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_fail: bool = True,
) -> CheckReport:
    r"""Check the dense Hessian of ``f`` against the finite-difference Hessian of its gradient.

    Checks:

    * ``"grad"``: the gradient, as in :func:`check_grad`;
    * ``"hessian[<mode>]"`` for each of ``modes``: :func:`hessfunc.hessian_matrix` against
      :func:`hessfunc.products.fd.fd_hessian_matrix`, relative error in the Frobenius norm;
    * ``"symmetry"``: :math:`\|H - H^\top\| / \|H\|` for the first mode that ran (the identity
      :math:`\langle u, Hv\rangle = \langle Hu, v\rangle` for all directions at once);
    * ``"matrix-vs-hvp"``: :math:`H v_j` from the matrix against :func:`hessfunc.hvps` along
      random unit directions.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is.
        modes: the AD modes to check (default both).
        n_directions: number of random directions for ``"grad"`` and ``"matrix-vs-hvp"``.
        generator: source of the directions (``None``: a CPU generator seeded with 0).
        step: finite-difference step (``None``: the default rule of :mod:`hessfunc.products.fd`).
        order: finite-difference order, 2 or 4.
        chunk_size: basis directions per vectorised pass for both dense builds.
        max_bytes: memory budget for each dense build (see :func:`hessfunc.hessian_matrix`).
        rtol: relative tolerance (default from :data:`TOLERANCES`).
        atol: absolute tolerance (default from :data:`TOLERANCES`).
        raise_on_fail: raise ``AssertionError`` with the diagnosis on failure (default).

    Returns:
        :class:`CheckReport` with the checks ``"grad"``, ``"hessian[<mode>]"``, ``"symmetry"``
        and ``"matrix-vs-hvp"``.

    Cost:
        ``n`` HVPs per mode and ``order * n`` gradients for the finite-difference matrix
        (vectorised in chunks), plus ``n_directions`` HVPs; memory :math:`O(n^2)`.

    Example:
        Logistic regression, :math:`H = X^\top \mathrm{diag}(p(1-p)) X / N`:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from hessfunc.checking.check import check_hessian
        >>> X = torch.randn(6, 3, dtype=torch.float64)
        >>> y = torch.rand(6, dtype=torch.float64)
        >>> f = lambda w, X, y: F.binary_cross_entropy_with_logits(X @ w, y)
        >>> check_hessian(f, torch.zeros(3, dtype=torch.float64), X, y).ok
        True

    """
    where = "hessfunc.check_hessian(f, params, *args)"
    modes = _check_modes(where, modes)
    _check_common(where, params, n_directions, generator, step, order)
    _checks.check_chunk_size(where, chunk_size)
    rtol_, atol_ = _tolerances(where, params, rtol, atol)
    floor = atol_ / rtol_
    dirs = _unit_directions(params, n_directions, generator)
    errors = {"grad": _grad_error(where, f, params, args, dirs, step, order, floor)}
    raised: dict[str, str] = {}
    reference = fd_hessian_matrix(
        f, params, *args, step=step, order=order, chunk_size=chunk_size, max_bytes=max_bytes
    )
    first = None
    for mode in modes:
        name = f"hessian[{mode}]"
        h = _try(
            name,
            raised,
            lambda m=mode: hessian_matrix(
                f, params, *args, mode=m, chunk_size=chunk_size, max_bytes=max_bytes
            ),
        )
        errors[name] = float("inf") if h is None else _rel(h[None], reference[None], floor)
        first = h if first is None else first
    if first is None:
        errors["symmetry"] = errors["matrix-vs-hvp"] = float("inf")
    else:
        errors["symmetry"] = _symmetry_error(first.double(), floor)
        flat_dirs = vmap(lambda t: _tree.ravel(t)[0])(dirs)
        from_matrix = flat_dirs @ first.T
        hv = _try("matrix-vs-hvp", raised, lambda: hvps(f, params, dirs, *args, mode=modes[0]))
        errors["matrix-vs-hvp"] = (
            float("inf")
            if hv is None
            else _rel(from_matrix, vmap(lambda t: _tree.ravel(t)[0])(hv), floor)
        )
    lower = _lower_precision(f, params, args)
    return _finish(
        where, errors, raised, params, step, order, dirs, rtol_, atol_, raise_on_fail, lower
    )
