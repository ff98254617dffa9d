"""LiSSA and the low-rank inverse against dense solves on SPD problems.

Two problems, each with a reference built without hessfunc's solvers:

* ridge regression: ``A = 2 ZᵀZ / N + 2α D`` from the design matrix (a closed form), applied
  matrix-free as ``v -> 2 Zᵀ(Z v) / N + 2α D v`` on a ``{"w", "b"}`` pytree;
* the Gauss-Newton matrix of a small tanh network with cross-entropy, through ``ggn_vp``, with
  a dense reference ``Jᵀ H_ℓ J`` from ``torch.autograd.functional.jacobian`` and the softmax
  Hessian in closed form. It has rank ``B (C - 1) = 12`` in 43 dimensions: damping makes it SPD.

Tolerances come from the iteration counts: LiSSA after ``T`` matvecs is the partial Neumann sum
``Σ_{j≤T} (I - M/s)^j b / s`` (checked to rounding against the eigendecomposition) and its error
is at most ``ρ^{T+1} ‖x*‖`` with ``ρ = 1 - μ_min(M)/s``; the low-rank inverse with exact eigenpairs
is the truncated formula (checked to rounding) and its error at most ``μ_{r+1}/λ`` times the
part of ``x*`` outside the kept space.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss

# rounding of a few hundred float64 matvecs and vector updates on vectors of norm ~1-100
ROUNDING = dict(rtol=1e-9, atol=1e-11)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(tree) -> torch.Tensor:
    return hessfunc.ravel(tree)[0]


class Problem:
    """A symmetric PSD operator on a pytree, its dense matrix and a right-hand side."""

    def __init__(self, like, matvec, A):
        self.like, self.matvec, self.A = like, matvec, A
        self.unravel = hessfunc.ravel(like)[1]
        self.n = A.shape[0]
        self.mu = torch.linalg.eigvalsh(A)

    def rhs(self, seed: int):
        return self.unravel(torch.randn(self.n, generator=gen(seed)))

    def solve(self, b, damping):
        return torch.linalg.solve(self.A + damping * torch.eye(self.n), flat(b))


def ridge(alpha: float = 0.05) -> Problem:
    g = gen(0)
    N, d = 60, 10
    # correlated columns: a spread-out spectrum (condition number ~ 50 with alpha = 0.05)
    X = torch.randn(N, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g))
    Z = torch.cat([X, torch.ones(N, 1)], 1)
    D = torch.diag(torch.cat([torch.ones(d), torch.zeros(1)]))  # the bias is not penalised
    A = 2 * Z.T @ Z / N + 2 * alpha * D
    like = {"w": torch.zeros(d), "b": torch.zeros(())}
    unravel = hessfunc.ravel(like)[1]

    def matvec(v):
        z = torch.cat([v["w"], v["b"].reshape(1)])
        out = 2 * Z.T @ (Z @ z) / N + 2 * alpha * D @ z
        return unravel(out)

    problem = Problem(like, matvec, A)
    problem.Z, problem.alpha, problem.D = Z, alpha, D
    return problem


def ggn() -> Problem:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    apply, params = hessfunc.from_module(net.double())
    g = gen(1)
    X, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    flat_p, unravel = hessfunc.ravel(params)
    J = torch.autograd.functional.jacobian(lambda t: apply(unravel(t), X), flat_p)  # (6, 3, n)
    p = torch.softmax(apply(params, X), -1).detach()
    H_out = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 6  # mean cross-entropy
    A = torch.einsum("bin,bij,bjm->nm", J, H_out, J)

    def matvec(v):
        return hessfunc.ggn_vp(apply, CrossEntropyLoss(y), params, v, X)

    return Problem(params, matvec, 0.5 * (A + A.T))


PROBLEMS = {"ridge": ridge, "ggn": ggn}
DAMPING = {"ridge": 0.0, "ggn": 0.1}


def dense(problem: Problem):
    """The problem's operator as a product with its dense matrix (fast, for long LiSSA runs)."""
    return lambda v: problem.unravel(problem.A @ flat(v))


def neumann_partial_sum(problem: Problem, b, damping: float, scale: float, T: int):
    """``Σ_{j=0}^{T} (I - M/s)^j b / s`` through the eigendecomposition of ``M = A + λI``."""
    mu, V = torch.linalg.eigh(problem.A + damping * torch.eye(problem.n))
    rho = 1 - mu / scale
    weights = (1 - rho ** (T + 1)) / mu  # = Σ_j rho^j / s
    return V @ (weights * (V.T @ flat(b)))


def iterations_for(error: float, problem: Problem, damping: float, scale: float) -> int:
    rho = 1 - (float(problem.mu[0]) + damping) / scale
    return math.ceil(math.log(error) / math.log(rho)) - 1


# ----------------------------------------------------------------------------- LiSSA


@pytest.mark.parametrize("name", PROBLEMS)
def test_lissa_is_the_partial_neumann_sum_and_meets_its_error_bound(name):
    problem = PROBLEMS[name]()
    damping = DAMPING[name]
    scale = float(problem.mu[-1]) + damping
    T = iterations_for(1e-6, problem, damping, scale)
    assert 50 < T < 5000  # conditioned so the test stays quick (ridge ~3200, GGN ~100)
    b = problem.rhs(2)
    res = hessfunc.lissa(problem.matvec, b, [()] * T, damping=damping, scale=scale)
    assert not bool(res.diverged)
    assert int(res.iterations) == T
    assert _tree.tree_structure(res.x) == _tree.tree_structure(b)
    torch.testing.assert_close(
        flat(res.x), neumann_partial_sum(problem, b, damping, scale, T), **ROUNDING
    )
    exact = problem.solve(b, damping)
    rho = 1 - (float(problem.mu[0]) + damping) / scale
    error = float(torch.linalg.norm(flat(res.x) - exact))
    assert error <= rho ** (T + 1) * float(torch.linalg.norm(exact)) * (1 + 1e-6)
    assert error > 1e-3 * rho ** (T + 1) * float(torch.linalg.norm(exact))  # the bound is tight
    # the residual reported is that of the last iterate whose product was computed
    previous = hessfunc.lissa(problem.matvec, b, [()] * (T - 1), damping=damping, scale=scale).x
    expected = torch.linalg.norm(
        flat(b) - (problem.A + damping * torch.eye(problem.n)) @ flat(previous)
    )
    torch.testing.assert_close(res.residual_norm, expected, **ROUNDING)


def test_lissa_follows_koh_and_liang_with_their_damping_times_scale():
    problem = ggn()
    b = problem.rhs(3)
    d, s = 0.05, 2.0

    h = b  # their recursion, literally: h <- v + (1 - d) h - A h / s, estimate h / s
    for _ in range(40):
        h = _tree.sub(_tree.add(b, _tree.scale(1 - d, h)), _tree.scale(1 / s, problem.matvec(h)))
    theirs = _tree.scale(1 / s, h)
    ours = hessfunc.lissa(problem.matvec, b, [()] * 40, damping=d * s, scale=s).x
    torch.testing.assert_close(flat(ours), flat(theirs), **ROUNDING)


def test_lissa_spends_one_matvec_per_batch_and_passes_the_batch():
    seen = []

    def matvec(v, *batch):
        seen.append(batch)
        return v

    b = torch.ones(3)
    hessfunc.lissa(matvec, b, [(1, 2), [3], "x", ()], scale=2.0)
    assert seen == [(1, 2), (3,), ("x",), ()]
    res = hessfunc.lissa(matvec, b, [], scale=4.0)  # no batch: the first term b / s
    torch.testing.assert_close(res.x, b / 4)
    assert int(res.iterations) == 0


def test_stochastic_lissa_with_per_sample_batches():
    """One sample per step: the batch operators M_k = 2 z_k z_kᵀ + 2αD + λI scatter widely around
    their mean, so residuals of single steps are large, yet with the scale above every M_k's top
    eigenvalue the flag stays down and the average over steps converges to the solution."""
    problem = ridge(alpha=0.5)
    Z, alpha, D = problem.Z, problem.alpha, problem.D
    N = Z.shape[0]
    damping = 0.1

    def matvec(v, k):
        z = torch.cat([v["w"], v["b"].reshape(1)])
        out = 2 * Z[k] * (Z[k] @ z) + 2 * alpha * D @ z
        return problem.unravel(out)

    scale = float((2 * (Z**2).sum(1)).max()) + 2 * alpha + damping
    order = torch.randperm(N, generator=gen(1)).tolist()
    b = problem.rhs(5)
    res = hessfunc.lissa(matvec, b, [(k,) for k in order * 40], damping=damping, scale=scale)
    assert not bool(res.diverged)
    # a single step's residual exceeds |b| (3x here): a residual test would have raised the flag
    assert float(res.residual_norm) > 2 * float(torch.linalg.norm(flat(b)))
    exact = problem.solve(b, damping)
    error = torch.linalg.norm(flat(res.x) - exact) / torch.linalg.norm(exact)
    # the noise floor of single-sample steps: 0.08 to 0.19 over eight orders (0.11 for this one)
    assert error < 0.25, float(error)


@pytest.mark.parametrize("factor", [0.2, 0.3, 0.45])
def test_lissa_flags_a_scale_below_half_the_top_eigenvalue(factor):
    problem = ggn()
    damping = 0.1
    top = float(problem.mu[-1]) + damping
    res = hessfunc.lissa(dense(problem), problem.rhs(6), [()] * 200, damping=damping,
                         scale=factor * top)  # fmt: skip
    assert bool(res.diverged)
    assert all(torch.isnan(leaf).all() for leaf in _tree.tree_leaves(res.x))


@pytest.mark.parametrize("factor", [0.51, 0.6, 1.0, 3.0, 100.0])
def test_lissa_does_not_flag_a_convergent_scale(factor):
    problem = ggn()
    damping = 0.1
    top = float(problem.mu[-1]) + damping
    res = hessfunc.lissa(dense(problem), problem.rhs(6), [()] * 300, damping=damping,
                         scale=factor * top)  # fmt: skip
    assert not bool(res.diverged)
    assert all(torch.isfinite(leaf).all() for leaf in _tree.tree_leaves(res.x))


def test_lissa_flags_negative_curvature_and_damping_removes_it():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.5, -0.3]))
    b = torch.ones(4)
    assert bool(hessfunc.lissa(lambda v: A @ v, b, [()] * 200, scale=2.0).diverged)
    res = hessfunc.lissa(lambda v: A @ v, b, [()] * 400, damping=0.5, scale=2.5)
    assert not bool(res.diverged)
    torch.testing.assert_close(res.x, b / (torch.diagonal(A) + 0.5), rtol=1e-8, atol=1e-8)


@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 12),
    zeros=st.integers(0, 3),
    damping=st.sampled_from([0.0, 0.01, 0.3]),
    factor=st.floats(0.5, 20.0),
)
def test_lissa_never_flags_a_spectrum_inside_its_contraction_region(
    seed, n, zeros, damping, factor
):
    """The flag's bound holds exactly for spectra in [0, 2s]: no false alarm, singular or not."""
    g = gen(seed)
    mu = torch.rand(n, generator=g)
    mu[: min(zeros, n)] = 0.0
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = Q @ torch.diag(mu) @ Q.T
    scale = factor * (float(mu.max()) + damping) + 1e-12
    b = torch.randn(n, generator=g)
    assert not bool(hessfunc.lissa(lambda v: A @ v, b, [()] * 300, damping=damping,
                                   scale=scale).diverged)  # fmt: skip


def test_lissa_bad_input():
    with pytest.raises(ValueError, match=r"hessfunc.lissa.*scale must be a positive number"):
        hessfunc.lissa(lambda v: v, torch.ones(2), [()], scale=0.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hessfunc.lissa(lambda v: v, torch.ones(2), [()], damping=-1.0)
    with pytest.raises(TypeError, match=r"batches must be an iterable.*\[\(\)\] \* T"):
        hessfunc.lissa(lambda v: v, torch.ones(2), 5)
    with pytest.raises(TypeError, match="matvec must be callable"):
        hessfunc.lissa(None, torch.ones(2), [()])


# ----------------------------------------------------------------------------- low rank


def test_low_rank_inverse_is_exact_when_the_rank_covers_the_range():
    problem = ggn()
    rank = int((problem.mu > 1e-10).sum())
    assert rank == 12  # B (C - 1)
    inv = hessfunc.low_rank_inverse(problem.matvec, problem.rhs(7), rank, num_iters=30,
                                    damping=0.1)  # fmt: skip
    assert float(inv.residual_norms.max()) < 1e-10
    for seed in (8, 9):
        b = problem.rhs(seed)
        x = inv.solve(b)
        assert _tree.tree_structure(x) == _tree.tree_structure(b)
        torch.testing.assert_close(flat(x), problem.solve(b, 0.1), rtol=1e-9, atol=1e-10)


def test_low_rank_inverse_is_the_truncated_formula_within_its_error_bound():
    problem = ridge()
    rank, damping = 4, 8.0
    mu, V = torch.linalg.eigh(problem.A)
    mu, V = mu.flip(0), V.flip(1)
    assert float(mu[rank]) < damping  # discarded eigenvalues below the damping: a useful inverse
    inv = hessfunc.low_rank_inverse(problem.matvec, problem.rhs(10), rank,
                                    num_iters=problem.n, damping=damping)  # fmt: skip
    torch.testing.assert_close(inv.eigenvalues, mu[:rank], rtol=1e-10, atol=1e-10)
    b = problem.rhs(11)
    c = V.T @ flat(b)
    kept = torch.arange(problem.n) < rank
    truncated = V @ torch.where(kept, c / (mu + damping), c / damping)
    x = flat(inv.solve(b))
    torch.testing.assert_close(x, truncated, rtol=1e-9, atol=1e-10)
    exact = problem.solve(b, damping)
    outside = torch.linalg.norm((V.T @ exact)[~kept])
    error = float(torch.linalg.norm(x - exact))
    bound = float(mu[rank]) / damping * float(outside)
    assert 0.1 * bound < error <= bound * (1 + 1e-8)


def test_low_rank_solve_with_another_damping_vmap_and_dtype():
    problem = ggn()
    inv = hessfunc.low_rank_inverse(problem.matvec, problem.rhs(12), 6, num_iters=20,
                                    damping=0.1)  # fmt: skip
    rebuilt = hessfunc.low_rank_inverse(problem.matvec, problem.rhs(12), 6, num_iters=20,
                                        damping=0.7)  # fmt: skip
    b = problem.rhs(13)
    torch.testing.assert_close(flat(inv.solve(b, 0.7)), flat(rebuilt.solve(b)), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    bs = _tree.tree_map(lambda *t: torch.stack(t), problem.rhs(14), problem.rhs(15))
    batched = torch.func.vmap(inv.solve)(bs)
    for i, seed in enumerate((14, 15)):
        one = inv.solve(problem.rhs(seed))
        torch.testing.assert_close(flat(_tree.tree_map(lambda t: t[i], batched)), flat(one),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    # damping as a 0-d tensor (a value that compiled code may change without recompiling)
    torch.testing.assert_close(flat(inv.solve(b, torch.tensor(0.7))), flat(rebuilt.solve(b)),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_low_rank_bad_input():
    A = torch.eye(3)
    with pytest.raises(ValueError, match=r"hessfunc.low_rank_inverse.*damping must be > 0"):
        hessfunc.low_rank_inverse(lambda v: A @ v, torch.ones(3), 1, damping=0.0)
    with pytest.raises(ValueError, match="rank must be a Python int"):
        hessfunc.low_rank_inverse(lambda v: A @ v, torch.ones(3), 0, damping=1.0)
    with pytest.raises(ValueError, match="exceeds num_iters"):
        hessfunc.low_rank_inverse(lambda v: A @ v, torch.ones(3), 3, num_iters=2, damping=1.0)
    inv = hessfunc.low_rank_inverse(lambda v: A @ v, torch.ones(3), 1, num_iters=2, damping=1.0)
    with pytest.raises(ValueError, match=r"LowRankInverse.solve\(b\): b<root> has shape \(4,\)"):
        inv.solve(torch.ones(4))
    with pytest.raises(ValueError, match="damping must be > 0"):
        inv.solve(torch.ones(3), 0.0)


# ----------------------------------------------------------------------------- compile


def _compiled_equals_eager(run, make_args):
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    for seed in (16, 17):  # new data of the same shapes: no recompilation (fullgraph would fail)
        args = make_args(seed)
        got, want = compiled(*args), run(*args)
        for a, e in zip(_tree.tree_leaves(got), _tree.tree_leaves(want), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch._dynamo.reset()
    return got


@pytest.mark.compile
def test_lissa_and_a_low_rank_solve_compile_to_one_graph_equal_to_eager():
    problem = ridge()
    inv = hessfunc.low_rank_inverse(dense(problem), problem.rhs(0), 2, num_iters=6, damping=0.5)

    def run(b, inv, damping):
        return hessfunc.lissa(dense(problem), b, [()] * 3, damping=damping, scale=200.0), inv.solve(
            b, damping + 0.5
        )

    got = _compiled_equals_eager(run, lambda seed: (problem.rhs(seed), inv, torch.tensor(0.1)))
    assert not bool(got[0].diverged)


@pytest.mark.compile
@pytest.mark.full
def test_the_low_rank_build_and_a_diverging_lissa_compile_equal_to_eager():
    problem = ridge()

    def run(b, v0, damping):
        bad = hessfunc.lissa(dense(problem), b, [()] * 3, damping=damping, scale=1e-3)
        inv = hessfunc.low_rank_inverse(dense(problem), v0, 2, num_iters=3, damping=0.5)
        return bad, inv

    got = _compiled_equals_eager(
        run, lambda seed: (problem.rhs(seed), problem.rhs(seed + 10), torch.tensor(0.1))
    )
    assert bool(got[0].diverged)
