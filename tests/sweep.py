"""Shared machinery of the op and module sweeps: objective, finite-difference references, verdicts.

A *problem* is a function ``model(params, *rest) -> tuple of real floating tensors`` at a point
``params`` (a tuple of float64 tensors), turned into the scalar objective

    L(params) = sum_k <w_k, out_k> + 0.5 <c_k, out_k ** 2>,

with fixed random ``w_k ~ N(0, 1)`` and ``c_k ~ U[0.5, 1.5]``. The quadratic term gives every
model a non-trivial Hessian (``J^T C J`` plus the residual term), even a linear one. The linear
term makes the gradient jump wherever the model has a kink (``relu`` or ``abs`` at 0, ``max``
with ties): finite differences across a kink then grow like ``1/h`` and the sample is recognised
as not converged instead of yielding a meaningless reference.

Each product is compared along one random direction ``v`` (largest entry 1); a generic direction
exposes any wrong matrix with probability one:

* ``hvp``: ``H v``;
* ``hessian_matrix``: ``H v`` and ``H^T v`` (so a wrong row and a wrong column both show);
* ``ggn_vp``: ``G v = J^T C J v``, the Hessian of the loss in the outputs being ``C = diag(c)``.

References use plain ``torch.autograd`` first derivatives only, never a second-order transform:
``H v`` from central differences of the autograd gradient along ``v``, ``G v`` as the autograd
VJP at ``params`` of ``C (J v)`` with ``J v`` from central differences of the outputs. Central
differences ``D(h)`` are taken on a geometric ladder of steps ``h_0 = 0.1 max(1, |params|_inf)``,
``h_{k+1} = h_k / 4`` down to ``1e-4``, Richardson-extrapolated pairwise
(``R_k = (16 D(h_{k+1}) - D(h_k)) / 15``, error ``O(h^4)``). The pair of neighbouring estimates
that agree best gives the reference (the smaller step) and its error estimate (their
difference): truncation dominates at large steps, rounding at small ones, and a kink or a point
outside the domain makes every pair disagree. Samples whose best pair still disagrees by more
than ``TOL[("fd-converged", float64)]`` are skipped as not converged, and counted.

Two more checks keep a converged difference from describing something other than the Hessian:
the midpoint defect ``(F(+h) + F(-h)) / 2 - F(0)`` must shrink like ``h^2`` (else the function
jumps or kinks at the sample), and autograd's gradient must agree with differences of the
objective itself (else the backward formula is a convention there, e.g. repeated scatter
indices). Where either reference finds a sample unusable, both skip it.

References built from the VALUE of the objective alone, which no backward formula can leak
into (a pseudo-gradient such as an embedding's zeroed padding row is inherited by differences of
autograd's gradient, and those agree with the forward mode that differentiates it):

* ``u^T H v`` from second differences ``(L(x+hu+hv) - L(x+hu-hv) - L(x-hu+hv) + L(x-hu-hv)) /
  4h^2`` on the same ladder (``value_reference``), compared with ``<u, H v>`` for ``hvp`` and
  ``hessian_matrix``; for ``ggn_vp``, ``(J u)^T C (J v)`` with both Jacobian products from
  differences of the outputs (``ggn_value_reference``);
* symmetry ``<u, M v> = <M u, v>`` (always for ``hessian_matrix``; for the products only where
  the value reference does not converge, since matching it along random ``u, v`` already pins the
  product to the symmetric Hessian);
* fwd-rev equal to rev-rev for every product.

A failure of any of them makes the product ``wrong`` even where it matched the gradient
references (``value_verdict``); where autograd's gradient is not the derivative of the value
(``first_order_reason``), they alone judge the sample. Entries hessfunc holds constant
(``Problem.hold``: an embedding's padding row) are zeroed in the directions of every reference.

A product agrees with its reference when

    |exact - ref| <= rtol |ref| + atol + 2 err        (norms over the flattened product)

with ``rtol, atol = TOL[("fd-sweep", float64)]`` (``TOL[("fd", float32)]`` when the model
computes in float32) and ``err`` the reference's own error estimate. A reference of exact zeros
is compared too, but agreement with it counts as a skip.
"""

from __future__ import annotations

import collections
import contextlib
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from conftest import tol

import hessfunc
from hessfunc._base import _context

F64 = torch.float64
PRODUCTS = ("hvp", "hessian_matrix", "ggn_vp")
MODES = ("fwd-rev", "rev-rev")
# Every (product, mode) ends in exactly one of these.
STATES = ("exact", "clear-error", "wrong", "raw-error", "skipped")
FAILURES = frozenset({"wrong", "raw-error", "mutates"})
# When samples of one op or module disagree, the verdict is the first state in this order.
PRECEDENCE = ("wrong", "mutates", "raw-error", "clear-error", "exact", "skipped")
# Dense Hessians only for problems with at most this many parameter entries.
MAX_DENSE = 150
# Larger problems are skipped: each reference costs a dozen or more gradients (a few op samples
# hold millions of entries, e.g. grid_sampler_3d's).
MAX_ENTRIES = 100_000
# The step ladder: largest step (times max(1, |params|_inf)), ratio, smallest step, and the
# smallest step tried when no pair has converged by then (samples close to a singularity:
# atanh near 1, tan near pi/2).
LADDER = (0.1, 4.0, 1e-4)
LADDER_EXTENDED = 1e-7


def stable_seed(*parts: Any) -> int:
    """A seed that depends only on ``parts`` (Python's ``hash`` of a str is salted per run)."""
    return zlib.crc32(repr(parts).encode())


def first_line(err: BaseException) -> str:
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    lines = text.strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def is_clear_error(err: BaseException) -> bool:
    """hessfunc's own errors start with the name of the call: ``hessfunc.hvp(f, ...): ...``."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return text.startswith("hessfunc.")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings ops emit on odd samples (deprecations, vmap fallbacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- problems


def precision(outs: Iterable[torch.Tensor]) -> torch.dtype:
    """The least precise floating dtype among ``outs`` (complex counted as its real dtype)."""
    worst = F64
    for o in outs:
        d = o.real.dtype if o.is_complex() else o.dtype
        if torch.finfo(d).eps > torch.finfo(worst).eps:
            worst = d
    return worst


def real_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """The floating (complex: as real views) non-empty tensors in an output pytree."""
    leaves = torch.utils._pytree.tree_leaves(out)
    result = []
    for t in leaves:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
        if t.is_floating_point():
            result.append(t)
    return tuple(result)


@dataclass
class Problem:
    """``model(params, *rest)`` with the objective of the module docstring fixed by a seed."""

    model: Callable[..., tuple[torch.Tensor, ...]]
    params: tuple[torch.Tensor, ...]
    rest: tuple = ()
    seed: int = 0
    w: tuple[torch.Tensor, ...] = ()
    c: tuple[torch.Tensor, ...] = ()
    # the precision the model computes in: float64, or float32 when an output is float32
    # (casts like Tensor.float()); the tolerances follow it
    dtype: torch.dtype = F64
    # what the references evaluate, if not ``model`` (the module sweep keeps hessfunc's
    # from_module out of its references)
    reference_model: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # zeroes the entries hessfunc holds constant (an embedding's padding row): the references
    # differentiate along directions projected by it, so they describe the function hessfunc
    # differentiates (P H P), while hessfunc gets the full directions
    hold: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None
    # why the value-based checks do not apply, if they do not: an op that draws random numbers
    # from a seed it sets itself is a function of its inputs by value, but torch declares the
    # draw constant (``normal``'s gradient is zero), so its values describe another function
    no_value_checks: str | None = None

    def set_weights(self, outs: tuple[torch.Tensor, ...]) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.w = tuple(torch.randn(o.shape, generator=g, dtype=F64) for o in outs)
        self.c = tuple(0.5 + torch.rand(o.shape, generator=g, dtype=F64) for o in outs)

    def loss(self, outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for o, w, c in zip(outs, self.w, self.c, strict=True):
            o = o.to(F64)
            total = total + (w * o).sum() + 0.5 * (c * o.pow(2)).sum()
        return total

    def f(self, params: tuple[torch.Tensor, ...], *rest: Any) -> torch.Tensor:
        return self.loss(self.model(params, *rest))

    def outputs_for_reference(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # the fused inference path of nn.TransformerEncoder, taken without gradients, gives
        # other values at padded positions than the layers' own ops; hessfunc evaluates f with
        # it off, and so must every reference evaluated under no_grad
        with _context.attention_fastpath_off():
            return (self.reference_model or self.model)(params, *self.rest)

    def direction(self, salt: int = 1) -> tuple[torch.Tensor, ...]:
        """``v`` (``salt=1``) or the second direction ``u`` of the value checks (``salt=2``)."""
        g = torch.Generator().manual_seed(self.seed + salt)
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in self.params]
        top = max((t.abs().max().item() for t in v if t.numel()), default=1.0)
        return tuple(t / top for t in v)

    def project(self, d: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``d`` with the entries hessfunc holds constant zeroed (``hold``): the references
        differentiate along projected directions, hessfunc gets the full ones."""
        return d if self.hold is None else self.hold(d)

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def scale(self) -> float:
        """The largest finite magnitude in ``params`` (at least 1): sets the largest FD step."""
        mags = [p.detach().abs() for p in self.params if p.numel()]
        return max([1.0] + [m[m.isfinite()].max().item() for m in mags if m.isfinite().any()])


def flat(tensors: Iterable[torch.Tensor | None], like: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate, with zeros for ``None`` (autograd's unused inputs)."""
    parts = [
        (torch.zeros_like(p) if t is None else t).reshape(-1).to(F64)
        for t, p in zip(tensors, like, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=F64)


def _leaves(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(p.detach().clone().requires_grad_(True) for p in params)


def autograd_grad(problem: Problem, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The gradient of the objective by one plain ``torch.autograd.grad`` (first order only)."""
    leaves = _leaves(params)
    with torch.enable_grad():
        value = problem.loss(problem.outputs_for_reference(leaves))
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return flat(grads, leaves)


def shifted(params: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], h: float) -> tuple:
    return tuple((p.detach() + h * t).to(p.dtype) for p, t in zip(params, v, strict=True))


# ----------------------------------------------------------------------------- references


@dataclass
class Reference:
    """A finite-difference product: value and error estimate, or why there is none."""

    value: torch.Tensor | None = None
    err: float = math.inf
    delta: torch.Tensor | None = None  # the difference of the best pair (err is its norm)
    step: float = math.nan
    reason: str | None = None


def _norm(x: torch.Tensor) -> float:
    n = torch.linalg.vector_norm(x).item() if x.numel() else 0.0
    return n if math.isfinite(n) else math.inf


def ladder_steps(scale: float, bottom: float = LADDER[2]) -> list[float]:
    top, ratio, _ = LADDER
    h, steps = top * max(1.0, scale), []
    while h >= bottom * 0.999 or len(steps) < 3:
        steps.append(h)
        h /= ratio
    return steps


def richardson(
    pair: Callable[[float], tuple[torch.Tensor, torch.Tensor]],
    center: torch.Tensor,
    scale: float,
    dtype: torch.dtype = F64,
    value_size: float = 0.0,
) -> Reference:
    """Best-agreeing pair of Richardson estimates over the step ladder (module docstring).

    ``value_size``: where ``F`` is itself a difference quotient of values of size
    ``value_size`` (``value_reference``), its rounding grows like ``value_size / h``, and so
    does the rounding level of the defect.

    ``pair(h)`` is ``(F(params + h v), F(params - h v))`` and ``center`` is ``F(params)``. Besides
    convergence, the midpoint defect ``(F(+h) + F(-h)) / 2 - F(0)`` must shrink like ``h^2``
    between the two steps behind the reference: where ``F`` jumps (``hinge_embedding_loss`` at a
    target of exactly 1), differences can agree at every step and still describe another branch.
    """
    ratio = LADDER[1]
    conv = tol("fd-converged" if dtype == F64 else "fd", dtype)
    steps = ladder_steps(scale)
    d: list[torch.Tensor | None] = []
    defect: list[float] = []

    def evaluate(upto: list[float]) -> None:
        for h in upto[len(d) :]:
            try:
                with torch.no_grad(), quiet():
                    plus, minus = pair(h)
                d.append((plus - minus) / (2 * h))
                defect.append(_norm((plus + minus) / 2 - center))
            except Exception:  # noqa: BLE001 - a step outside the op's domain, e.g. a target > 1
                d.append(None)
                defect.append(math.inf)

    evaluate(steps)
    ref = _best_pair(d, steps, ratio)
    if ref.value is not None and ref.err > conv["rtol"] * _norm(ref.value) + conv["atol"]:
        steps = ladder_steps(scale, LADDER_EXTENDED)
        evaluate(steps)
        ref = _best_pair(d, steps, ratio)
    if ref.value is None:
        return ref
    best = steps.index(ref.step) - 1
    # rounding level of the defect: a few units in the last place of F
    noise = 64 * torch.finfo(dtype).eps * max(_norm(center), value_size / ref.step, 1e-300)
    small, large = defect[best + 1], defect[best]
    if ref.err > conv["rtol"] * _norm(ref.value) + conv["atol"]:
        ref.reason = "fd-not-converged"
    elif small > noise and small > large / 8:
        ref.reason = "not smooth at the sample"
    elif _norm(ref.value) == 0.0:
        ref.reason = "zero-product"
    return ref


def _best_pair(d: list[torch.Tensor | None], steps: list[float], ratio: float) -> Reference:
    """The Richardson estimate whose neighbour agrees with it best, with that disagreement."""
    r = [
        None if d[k] is None or d[k + 1] is None else (ratio**2 * d[k + 1] - d[k]) / (ratio**2 - 1)
        for k in range(len(d) - 1)
    ]
    best, best_err = None, math.inf
    for k in range(len(r) - 1):
        if r[k] is None or r[k + 1] is None:
            continue
        if not (torch.isfinite(r[k]).all() and torch.isfinite(r[k + 1]).all()):
            continue
        e = _norm(r[k] - r[k + 1])
        if e < best_err:
            best, best_err = k + 1, e
    if best is None:
        return Reference(reason="fd-non-finite")
    return Reference(r[best], best_err, r[best - 1] - r[best], steps[best + 1])


def hvp_reference(problem: Problem, v: tuple[torch.Tensor, ...]) -> Reference:
    def pair(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        plus = autograd_grad(problem, shifted(problem.params, v, h))
        return plus, autograd_grad(problem, shifted(problem.params, v, -h))

    center = autograd_grad(problem, problem.params)
    return richardson(pair, center, problem.scale, problem.dtype)


def ggn_reference(problem: Problem, v: tuple[torch.Tensor, ...]) -> Reference:
    """``J^T C (J v)``: ``J v`` by differences of the outputs, ``J^T`` by autograd at params."""

    def outputs(params: tuple) -> torch.Tensor:
        return flat(problem.outputs_for_reference(params), problem.w)

    def pair(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs(shifted(problem.params, v, h)), outputs(shifted(problem.params, v, -h))

    with torch.no_grad():
        center = outputs(problem.params)
    jv = richardson(pair, center, problem.scale, problem.dtype)
    if jv.value is None:
        return jv
    c = flat(problem.c, problem.c)

    def pullback(u: torch.Tensor) -> torch.Tensor:
        # a fresh graph per call: some backward functions run only once per graph
        leaves = _leaves(problem.params)
        with torch.enable_grad():
            outs = problem.outputs_for_reference(leaves)
            used, start = [], 0
            for o in outs:
                if o.requires_grad:
                    cot = c[start : start + o.numel()] * u[start : start + o.numel()]
                    used.append((o, cot.view_as(o).to(o.dtype)))
                start += o.numel()
            if not used:
                return torch.zeros(problem.size, dtype=F64)
            grads = torch.autograd.grad(
                [o for o, _ in used], leaves, [t for _, t in used], allow_unused=True
            )
        return flat(grads, leaves)

    gv = pullback(jv.value)
    err = _norm(pullback(jv.delta))  # the error estimate of J v, through the linear pullback
    ref = Reference(gv, err, None, jv.step, jv.reason)
    if ref.reason is None and _norm(gv) == 0.0:
        ref.reason = "zero-product"
    return ref


# ----------------------------------------------------------------------------- by value


def _shifted2(params: tuple, u: tuple, a: float, v: tuple, b: float) -> tuple:
    return tuple(
        (p.detach() + a * s + b * t).to(p.dtype) for p, s, t in zip(params, u, v, strict=True)
    )


def value_reference(problem: Problem, u: tuple, v: tuple) -> Reference:
    """``u^T H v`` from second differences of the objective's VALUE (no derivative at all).

    ``(L(x+hu+hv) - L(x+hu-hv) - L(x-hu+hv) + L(x-hu-hv)) / 4h^2`` on the step ladder, written
    as central differences along ``u`` of central differences along ``v`` so that
    :func:`richardson` extrapolates it; its midpoint defect is measured against the directional
    derivative along ``v``, itself from differences of values. A backward formula that is not
    the derivative of the forward (a pseudo-gradient) cannot leak into this reference.
    """

    def value(params: tuple) -> torch.Tensor:
        return problem.loss(problem.outputs_for_reference(params)).reshape(1)

    x = problem.params

    def along_v(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        return value(shifted(x, v, h)), value(shifted(x, v, -h))

    def pair(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        plus = (value(_shifted2(x, u, h, v, h)) - value(_shifted2(x, u, h, v, -h))) / (2 * h)
        minus = (value(_shifted2(x, u, -h, v, h)) - value(_shifted2(x, u, -h, v, -h))) / (2 * h)
        return plus, minus

    with torch.no_grad():
        at = value(x)
        slope = richardson(along_v, at, problem.scale, problem.dtype)
    if slope.value is None:
        return slope
    ref = richardson(pair, slope.value, problem.scale, problem.dtype, _norm(at))
    if ref.reason is None and slope.reason not in (None, "zero-product"):
        ref.reason = slope.reason
    return ref


def ggn_value_reference(problem: Problem, u: tuple, v: tuple) -> Reference:
    """``(J u)^T C (J v)``, both Jacobian products by differences of the outputs' values."""

    def outputs(params: tuple) -> torch.Tensor:
        return flat(problem.outputs_for_reference(params), problem.w)

    with torch.no_grad():
        center = outputs(problem.params)
    ju, jv = (
        richardson(
            lambda h, d=d: (
                outputs(shifted(problem.params, d, h)),
                outputs(shifted(problem.params, d, -h)),
            ),
            center,
            problem.scale,
            problem.dtype,
        )
        for d in (u, v)
    )
    for r in (ju, jv):
        if r.value is None or r.reason not in (None, "zero-product"):
            return Reference(reason=r.reason or "no reference")
    c = flat(problem.c, problem.c)
    value = (c * ju.value * jv.value).sum().reshape(1)
    err = _norm(c * ju.value) * jv.err + _norm(c * jv.value) * ju.err
    ref = Reference(value, err, None, min(ju.step, jv.step))
    if _norm(value) == 0.0:
        ref.reason = "zero-product"
    return ref


@dataclass
class ValueChecks:
    """What the value-based checks of one problem compare against."""

    u: tuple[torch.Tensor, ...]
    hessian: Reference  # u^T H v
    ggn: Reference  # (J u)^T C (J v)


def value_checks(problem: Problem, v: tuple) -> ValueChecks:
    u = problem.direction(salt=2)
    pu, pv = problem.project(u), problem.project(v)
    try:
        with quiet():
            return ValueChecks(
                u, value_reference(problem, pu, pv), ggn_value_reference(problem, pu, pv)
            )
    except Exception as err:  # noqa: BLE001 - the sample cannot be differenced
        reason = f"reference fails ({first_line(err)[:80]})"
        return ValueChecks(u, Reference(reason=reason), Reference(reason=reason))


def _vdot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) * b.to(F64)).sum())


def by_value(
    ref: Reference,
    uv: float,
    vu: float,
    scale: float,
    dtype: torch.dtype = F64,
) -> str | None:
    """Why ``uv = <u, M v>`` and ``vu = <v, M u>`` are not the second derivative ``ref``, or
    ``None``.

    Two checks: symmetry (``uv == vu``, within ``rtol * scale`` with ``scale = |u| |Mv| +
    |v| |Mu|``, ``fd-sweep`` tolerances) and, where the value reference is usable, ``uv``
    against it, within ``rtol |ref| + atol + 2 err`` with the looser ``fd-value`` tolerances
    (conftest.py says why). Where the value
    reference is usable, the callers pass ``vu = uv`` and spare the product along ``u``: a
    product that matches the second differences (a symmetric form) along random ``u, v`` is,
    with probability one, the Hessian itself.
    """
    t = tol("fd-sweep" if dtype == F64 else "fd", dtype)
    if not (math.isfinite(uv) and math.isfinite(vu)):
        return None  # non-finite products are judged by the gradient references
    if abs(uv - vu) > t["rtol"] * scale + t["atol"]:
        return f"not symmetric: <u, Mv> {uv:.6e} vs <Mu, v> {vu:.6e}"
    if ref.value is None or ref.reason not in (None, "zero-product"):
        return None
    r = float(ref.value.reshape(-1)[0])
    t = tol("fd-value", F64 if dtype == F64 else torch.float32)
    if abs(uv - r) > t["rtol"] * abs(r) + t["atol"] + 2 * ref.err:
        return (
            f"second differences of the value give u^T M v = {r:.6e} (error {ref.err:.1e}), "
            f"the product {uv:.6e}"
        )
    return None


def modes_disagree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = F64) -> str | None:
    """Why the two AD modes' products differ, or ``None``."""
    t = tol("fd-sweep" if dtype == F64 else "fd", dtype)
    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    diff = _norm(a.to(F64) - b.to(F64))
    size = max(_norm(a), _norm(b))
    if diff > t["rtol"] * size + t["atol"]:
        return f"fwd-rev and rev-rev differ: |difference| {diff:.2e}, |product| {size:.2e}"
    return None


def usable(ref: Reference) -> bool:
    return ref.value is not None and ref.reason in (None, "zero-product")


def value_verdict(verdict: Verdict, finding: str | None, checked: bool) -> Verdict:
    """Fold a value-check finding into a gradient-reference verdict.

    A finding turns ``exact`` (and a skip because autograd's gradient is not the derivative,
    which is where pseudo-gradients live) into ``wrong``; with no finding such a skip becomes
    ``exact`` by value where the value reference was usable (``checked``). Errors and other
    skips stay as they are.
    """
    pseudo = verdict.state == "skipped" and verdict.detail == PSEUDO_SKIP
    if finding is not None and (verdict.state == "exact" or pseudo):
        return Verdict("wrong", f"by value: {finding}", math.inf)
    if finding is None and pseudo and checked:
        return Verdict("exact", "by value (autograd's gradient is not the derivative here)")
    return verdict


# ----------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """The outcome of one product in one mode on one sample, or aggregated over samples."""

    state: str
    detail: str = ""
    rel_err: float = 0.0
    sample: int | None = None
    counts: collections.Counter = field(default_factory=collections.Counter)

    def describe(self) -> str:
        where = "" if self.sample is None else f" (sample {self.sample})"
        return f"{self.state}{where}: {self.detail}"


def compare(exact: torch.Tensor, ref: Reference, dtype: torch.dtype = F64) -> Verdict:
    """``exact`` or ``wrong`` against a converged reference (see the module docstring)."""
    t = tol("fd-sweep" if dtype == F64 else "fd", dtype)
    ref_norm = _norm(ref.value)
    if exact.shape != ref.value.shape:
        return Verdict("wrong", f"shape {tuple(exact.shape)} vs {tuple(ref.value.shape)}", math.inf)
    if not torch.isfinite(exact).all():
        return Verdict("wrong", "non-finite entries where the reference is finite", math.inf)
    diff = _norm(exact - ref.value)
    rel = diff / ref_norm if ref_norm > 0 else math.inf
    if diff <= t["rtol"] * ref_norm + t["atol"] + 2 * ref.err:
        fd_rel = ref.err / ref_norm if ref_norm > 0 else math.inf
        return Verdict("exact", f"rel. error {rel:.1e} (fd error {fd_rel:.1e})", rel)
    detail = (
        f"rel. error {rel:.2e} (|exact - ref| {diff:.2e}, |ref| {ref_norm:.2e}, "
        f"|exact| {_norm(exact):.2e}, fd error {ref.err:.1e})"
    )
    return Verdict("wrong", detail, rel)


def run_product(
    call: Callable[[], torch.Tensor], ref: Reference, dtype: torch.dtype = F64
) -> Verdict:
    """Call hessfunc and classify: clear-error, raw-error, or compare with the reference."""
    try:
        with quiet():
            exact = call()
    except Exception as err:  # noqa: BLE001 - every escape is classified
        return Verdict("clear-error" if is_clear_error(err) else "raw-error", first_line(err))
    return judge(exact.detach(), ref, dtype)


def judge(exact: torch.Tensor, ref: Reference, dtype: torch.dtype = F64) -> Verdict:
    """``compare``, where the reference is usable.

    A reference of exact zeros (a product that vanishes at the sample) is still compared, so a
    nonzero result is caught, but agreement there counts as a skip: it shows little.
    """
    if ref.reason == "zero-product":
        verdict = compare(exact, ref, dtype)
        return verdict if verdict.state == "wrong" else Verdict("skipped", ref.reason)
    if ref.value is None or ref.reason is not None:
        return Verdict("skipped", ref.reason or "no reference")
    return compare(exact, ref, dtype)


def aggregate(verdicts: list[Verdict]) -> Verdict:
    """One verdict for an op or module: the first state of ``PRECEDENCE`` any sample reached.

    The detail of a ``wrong`` verdict is the sample with the largest relative error; of an error
    or a skip, the first sample with that state. ``counts`` tallies every sample's state (skips
    by reason).
    """
    counts = collections.Counter(
        f"skipped: {v.detail}" if v.state == "skipped" else v.state for v in verdicts
    )
    if not verdicts:
        return Verdict("skipped", "no samples", counts=counts)
    for state in PRECEDENCE:
        hits = [v for v in verdicts if v.state == state]
        if hits:
            pick = max(hits, key=lambda v: v.rel_err) if state == "wrong" else hits[0]
            if state == "skipped":  # the most frequent reason
                reasons = collections.Counter(v.detail for v in hits)
                detail = reasons.most_common(1)[0][0]
                pick = next(v for v in hits if v.detail == detail)
            return Verdict(pick.state, pick.detail, pick.rel_err, pick.sample, counts)
    raise AssertionError(verdicts)


PSEUDO_SKIP = "autograd's gradient is not the derivative here"
_UNUSABLE = (
    "fd-not-converged",
    "not smooth at the sample",
    "fd-non-finite",
    PSEUDO_SKIP,
)


def first_order_reason(problem: Problem, v: tuple[torch.Tensor, ...]) -> str | None:
    """Why autograd's gradient cannot anchor the references here, or ``None`` if it can.

    Both references differentiate autograd's first derivatives, so they are only as right as
    those: where the gradient is not the derivative of the objective (``max_unpool`` with
    repeated indices, whose forward keeps one of the colliding values while its backward feeds
    all of them), differences of gradients measure a convention, not a Hessian.
    """

    def value(params: tuple) -> torch.Tensor:
        return problem.loss(problem.outputs_for_reference(params)).reshape(1)

    def pair(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        return value(shifted(problem.params, v, h)), value(shifted(problem.params, v, -h))

    with torch.no_grad():
        center = value(problem.params)
    ref = richardson(pair, center, problem.scale, problem.dtype)
    if ref.reason in _UNUSABLE:
        return ref.reason
    g = autograd_grad(problem, problem.params)
    directional = (g * flat(v, problem.params)).sum().reshape(1)
    ref.reason = None
    if compare(directional, ref, problem.dtype).state != "exact":
        return "autograd's gradient is not the derivative here"
    return None


def references(problem: Problem, v: tuple[torch.Tensor, ...]) -> tuple[Reference, Reference]:
    """The ``H v`` and ``G v`` references; where either finds the sample unusable, both do.

    A kink in the model makes the gradient jump (the objective's linear term) but may leave the
    outputs' differences converged to the average of the one-sided slopes; a jump in the outputs
    misleads differences of the gradient. Either way the sample tells nothing, and neither does
    one where autograd's gradient is not the derivative (``first_order_reason``).
    """
    v = problem.project(v)
    try:
        h_ref, g_ref = hvp_reference(problem, v), ggn_reference(problem, v)
    except Exception as err:  # noqa: BLE001 - the sample cannot be differenced (a harness limit)
        reason = f"reference fails ({first_line(err)[:80]})"
        return Reference(reason=reason), Reference(reason=reason)
    for a, b in ((h_ref, g_ref), (g_ref, h_ref)):
        if a.reason in _UNUSABLE and b.reason not in _UNUSABLE:
            b.reason = a.reason
    if h_ref.reason not in _UNUSABLE and g_ref.value is not None:
        reason = first_order_reason(problem, v)
        if reason is not None:
            h_ref.reason = g_ref.reason = reason
    return h_ref, g_ref


def check_problem(
    problem: Problem, products: Iterable[str] = PRODUCTS, modes: Iterable[str] = MODES
) -> dict[tuple[str, str], Verdict]:
    """Every product in every mode on one problem, against the two references."""
    with quiet():
        return _check_problem(problem, tuple(products), tuple(modes))


def _check_problem(
    problem: Problem, products: tuple[str, ...], modes: tuple[str, ...]
) -> dict[tuple[str, str], Verdict]:
    v = problem.direction()
    v_flat = flat(v, problem.params)
    h_ref, g_ref = references(problem, v)
    # the references built from values only: where the sample is smooth and converged (or
    # where autograd's gradient is not the derivative, which only they can judge)
    judged = h_ref.reason in (None, "zero-product", PSEUDO_SKIP)
    if problem.no_value_checks is not None and h_ref.reason == PSEUDO_SKIP:
        judged = False
    vals = value_checks(problem, v) if judged else None
    u = vals.u if vals else None
    u_flat = flat(u, problem.params) if vals else None
    params, rest = problem.params, problem.rest
    out: dict[tuple[str, str], Verdict] = {}
    results: dict[tuple[str, str], torch.Tensor] = {}

    def product(
        name: str, mode: str, apply: Callable[[tuple], Any], ref: Reference, vref: Reference | None
    ) -> Verdict:
        try:
            with quiet():
                mv = flat(apply(v), params).detach()
        except Exception as err:  # noqa: BLE001 - every escape is classified
            return Verdict("clear-error" if is_clear_error(err) else "raw-error", first_line(err))
        verdict = judge(mv, ref, problem.dtype)
        results[name, mode] = mv
        if vref is None:
            return verdict
        uv = _vdot(u_flat, mv)
        if usable(vref):
            # matching the second differences along random u, v already pins the product to
            # the (symmetric) Hessian; spare the product along u
            finding = by_value(vref, uv, uv, 0.0, problem.dtype)
            return value_verdict(verdict, finding, True)
        try:
            with quiet():
                mu = flat(apply(u), params).detach()
        except Exception as err:  # noqa: BLE001
            return Verdict("clear-error" if is_clear_error(err) else "raw-error", first_line(err))
        scale = _norm(u_flat) * _norm(mv) + _norm(v_flat) * _norm(mu)
        finding = by_value(vref, uv, _vdot(v_flat, mu), scale, problem.dtype)
        return value_verdict(verdict, finding, False)

    for mode in modes:
        if "hvp" in products:
            out["hvp", mode] = product(
                "hvp",
                mode,
                lambda d: hessfunc.hvp(problem.f, params, d, *rest, mode=mode),
                h_ref,
                vals.hessian if vals else None,
            )
        if "hessian_matrix" in products:
            if problem.size > MAX_DENSE:
                out["hessian_matrix", mode] = Verdict("skipped", f"n > {MAX_DENSE}")
            else:
                out["hessian_matrix", mode] = _dense_verdict(
                    problem, mode, v_flat, h_ref, vals, u_flat, results
                )
        if "ggn_vp" in products:
            out["ggn_vp", mode] = product(
                "ggn_vp",
                mode,
                lambda d: hessfunc.ggn_vp(problem.model, problem.loss, params, d, *rest, mode=mode),
                g_ref,
                vals.ggn if vals else None,
            )
    if judged and len(modes) == 2:
        for name in products:
            a, b = results.get((name, modes[0])), results.get((name, modes[1]))
            if a is None or b is None:
                continue
            finding = modes_disagree(a, b, problem.dtype)
            for mode in modes:
                out[name, mode] = value_verdict(out[name, mode], finding, False)
    return out


def _dense_verdict(
    problem: Problem,
    mode: str,
    v_flat: torch.Tensor,
    ref: Reference,
    vals: ValueChecks | None = None,
    u_flat: torch.Tensor | None = None,
    results: dict | None = None,
) -> Verdict:
    try:
        with quiet():
            H = hessfunc.hessian_matrix(problem.f, problem.params, *problem.rest, mode=mode)
    except Exception as err:  # noqa: BLE001
        return Verdict("clear-error" if is_clear_error(err) else "raw-error", first_line(err))
    n = problem.size
    if H.shape != (n, n):
        return Verdict("wrong", f"shape {tuple(H.shape)}, expected {(n, n)}", math.inf)
    H = H.detach().to(F64)
    if results is not None:
        results["hessian_matrix", mode] = H
    rows = judge(H @ v_flat, ref, problem.dtype)
    cols = judge(H.T @ v_flat, ref, problem.dtype)
    worse = max((rows, cols), key=lambda x: (x.state == "wrong", x.rel_err))
    if worse is cols and cols.state == "wrong":
        worse.detail = "H^T v: " + worse.detail
    if vals is None or u_flat is None:
        return worse
    hv, hu = H @ v_flat, H @ u_flat
    scale = _norm(u_flat) * _norm(hv) + _norm(v_flat) * _norm(hu)
    finding = by_value(vals.hessian, _vdot(u_flat, hv), _vdot(v_flat, hu), scale, problem.dtype)
    return value_verdict(worse, finding, usable(vals.hessian))
