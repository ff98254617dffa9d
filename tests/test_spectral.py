"""Spectral analysis on synthetic operators with known spectra.

Every operator is ``Q diag(lam) Q^T`` with a random orthogonal ``Q`` (so nothing is aligned with
the coordinate axes), given as a matvec over a pytree of two tensors. References are the
spectrum itself, dense ``torch.linalg`` calls on the matrix, or naive implementations written
from the definitions. Statistical tests use bounds derived from the estimator's variance, with
the number of standard errors stated.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import hessfunc
from hessfunc._base import _tree


def like(n: int) -> dict[str, torch.Tensor]:
    """Two leaves, 100 + (n - 100) entries."""
    return {"w": torch.zeros(2, 50), "b": torch.zeros(n - 100)}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def rotation(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g))[0]


class Operator:
    """A symmetric matrix with a given spectrum, as a pytree matvec that counts its calls."""

    def __init__(self, spectrum: torch.Tensor, seed: int = 0):
        n = spectrum.numel()
        Q = rotation(n, seed)
        self.spectrum = spectrum
        self.A = (Q * spectrum) @ Q.T
        self.A = (self.A + self.A.T) / 2
        self.like = like(n)
        self.unravel = hessfunc.ravel(self.like)[1]
        self.calls = 0

    def __call__(self, v):
        self.calls += 1
        return self.unravel(self.A @ hessfunc.ravel(v)[0])

    def vector(self, seed: int):
        return self.unravel(torch.randn(self.A.shape[0], generator=gen(seed)))

    def probes(self, num: int, seed: int, kind: str = "rademacher"):
        return hessfunc.random_probes(self.like, num, kind=kind, generator=gen(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(tree) -> torch.Tensor:
    return hessfunc.ravel(tree)[0]


def rows(tree) -> torch.Tensor:
    return _tree.ravel_rows(tree)


def power_law(n: int, c: float) -> torch.Tensor:
    return torch.arange(1, n + 1.0) ** -c


# ----------------------------------------------------------------------------- probes


@pytest.mark.parametrize("kind", ["rademacher", "normal", "sphere"])
def test_probes_are_isotropic_reproducible_and_leave_the_global_rng_alone(kind):
    tree = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    state = torch.random.get_rng_state()
    v = hessfunc.random_probes(tree, 20000, kind=kind, generator=gen(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert v["a"].shape == (20000, 2, 3) and v["b"].shape == (20000, 4)
    again = hessfunc.random_probes(tree, 20000, kind=kind, generator=gen(1))
    pairs = zip(_tree.tree_leaves(v), _tree.tree_leaves(again), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    V = rows(v)
    # E[v v^T] = I; each entry of the empirical second moment has sd <= sqrt(3 / 20000) ~ 0.012
    # (fourth moment <= 3 for all three kinds): 6 sd is 0.074
    assert (V.T @ V / 20000 - torch.eye(10)).abs().max() < 0.074
    if kind == "rademacher":
        assert torch.equal(V.abs(), torch.ones_like(V))
    if kind == "sphere":
        torch.testing.assert_close(V.norm(dim=1), torch.full((20000,), 10**0.5))


# ----------------------------------------------------------------------------- trace, diagonal


def naive_exchangeable(A: torch.Tensor, Omega: torch.Tensor):
    """XTrace and XDiag samples from their definitions: one QR per left-out column."""
    n, s = Omega.shape
    Y = A @ Omega
    traces, diags = [], []
    for i in range(s):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], 1)).Q
        P = torch.eye(n) - Qi @ Qi.T
        w = Omega[:, i]
        traces.append(torch.trace(Qi.T @ A @ Qi) + w @ P @ A @ P @ w)
        diags.append(torch.diag(Qi @ Qi.T @ A) + w * (P @ A @ w))
    return torch.stack(traces).mean(), torch.stack(diags).mean(0)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_xtrace_and_xdiag_equal_naive_leave_one_out(kind):
    op = Operator(power_law(400, 1.0))
    probes = op.probes(16, 3, kind)
    trace, diag = naive_exchangeable(op.A, rows(probes)[:8].T)
    torch.testing.assert_close(hessfunc.xtrace(op, probes).estimate, trace, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        flat(hessfunc.xdiag(op, probes).estimate), diag, rtol=1e-9, atol=1e-12
    )


def test_each_estimator_spends_exactly_one_matvec_per_probe():
    op = Operator(power_law(400, 1.0))
    probes = op.probes(12, 0)
    V = rows(probes)
    applied = []

    def counting(v):
        applied.append(1)
        return op(v)

    for fn in (hessfunc.hutchinson_trace, hessfunc.hutchpp_trace, hessfunc.xtrace):
        applied.clear()
        # one vmapped call per chunk: chunk_size=1 makes each call a single matvec
        fn(counting, probes, chunk_size=1)
        assert len(applied) == V.shape[0], fn.__name__


def hutchpp_unprojected(matvec, probes):
    """A broken Hutch++ that forgets to project the Hutchinson probes off the sketch: biased."""
    V = rows(probes)
    unravel = hessfunc.ravel(_tree.tree_map(lambda t: t[0], probes))[1]
    apply = lambda X: torch.stack([flat(matvec(unravel(x))) for x in X])  # noqa: E731
    s = V.shape[0] // 3
    Q = torch.linalg.qr(apply(V[:s]).T).Q
    G = V[s:]
    return hessfunc.TraceEstimate(
        (Q.T * apply(Q.T)).sum() + (G * apply(G)).sum(1).mean(), torch.tensor(0.0)
    )


TRACE_ESTIMATORS = {
    "hutchinson": hessfunc.hutchinson_trace,
    "hutchpp": hessfunc.hutchpp_trace,
    "xtrace": hessfunc.xtrace,
}


def repeated(estimator, op, num, repeats, kind="rademacher"):
    return torch.stack(
        [estimator(op, op.probes(num, 1000 + r, kind)).estimate for r in range(repeats)]
    )


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
@pytest.mark.parametrize("name", TRACE_ESTIMATORS)
def test_trace_estimators_are_unbiased(name, kind):
    # a spectrum that decays but not fast (so the low-rank parts leave a real residual)
    op = Operator(power_law(200, 0.5) - 0.05)
    est = repeated(TRACE_ESTIMATORS[name], op, 12, 300, kind)
    exact = op.spectrum.sum()
    # mean of 300 independent estimates: within 5 standard errors of the exact trace
    # (two-sided normal tail 6e-7 per test)
    assert (est.mean() - exact).abs() < 5 * est.std() / 300**0.5


def test_the_unbiasedness_check_catches_a_biased_estimator():
    # negative control for the test above: the unprojected Hutch++ counts the sketched part
    # twice, and the same 5-standard-error criterion rejects it
    op = Operator(power_law(200, 0.5) - 0.05)
    est = repeated(hutchpp_unprojected, op, 12, 100)
    assert (est.mean() - op.spectrum.sum()).abs() > 5 * est.std() / 100**0.5


@pytest.mark.parametrize("name", ["hutchinson_diag", "xdiag"])
def test_diagonal_estimators_are_unbiased(name):
    op = Operator(power_law(200, 0.5))
    fn = getattr(hessfunc, name)
    est = torch.stack([flat(fn(op, op.probes(12, 2000 + r)).estimate) for r in range(200)])
    exact = torch.diag(op.A)
    # every entry within 5 standard errors of its mean (200 entries: a Bonferroni level of
    # 200 x 6e-7 = 1e-4 for the whole test), and the errors average out overall
    se = est.std(0) / 200**0.5
    assert ((est.mean(0) - exact).abs() < 5 * se).all()
    assert (est.mean(0) - exact).abs().mean() < 1.5 * se.mean()


@functools.cache
def variances(c: float, repeats: int = 200):
    op = Operator(power_law(1000, c))
    return {name: repeated(fn, op, 60, repeats).var() for name, fn in TRACE_ESTIMATORS.items()}


def test_deflation_pays_off_on_a_decaying_spectrum():
    # lambda_i = i^-2, n = 1000, 60 matvecs. Measured here: Hutch++ ~4.6e3x less variance than
    # Hutchinson, XTrace ~2.3x less than Hutch++. A sample variance of 200 estimates has a
    # relative sd of about 10% (more with heavy tails), so the 100x and 1.5x thresholds leave
    # room for the sampling error of both variances.
    var = variances(2.0)
    assert var["hutchinson"] / var["hutchpp"] >= 100
    assert var["hutchpp"] / var["xtrace"] >= 1.5


def test_no_gain_is_claimed_on_a_flat_spectrum():
    # lambda_i = i^-0.5: the sketch removes little, and Hutch++ feeds only a third of its
    # budget to the Hutchinson part. Measured here: Hutch++ ~1.4x *more* variance than
    # Hutchinson, XTrace ~1.1x less than Hutch++. We only assert that neither comes near the
    # decaying-spectrum gains.
    var = variances(0.5)
    assert var["hutchinson"] / var["hutchpp"] < 2
    assert var["hutchinson"] / var["xtrace"] < 3


def test_hutchpp_is_exact_when_the_sketch_holds_the_range():
    spectrum = torch.zeros(400)
    spectrum[:3] = torch.tensor([5.0, -2.0, 1.0])
    op = Operator(spectrum)
    est = hessfunc.hutchpp_trace(op, op.probes(12, 0))  # sketch of 4 >= rank 3
    torch.testing.assert_close(est.estimate, torch.tensor(4.0), rtol=1e-10, atol=1e-10)


def test_hutchinson_diag_is_exact_for_a_diagonal_matrix_with_rademacher_probes():
    d = torch.linspace(-1, 3, 400)
    unravel = hessfunc.ravel(like(400))[1]
    probes = hessfunc.random_probes(like(400), 3, generator=gen(0))
    out = hessfunc.hutchinson_diag(lambda v: unravel(d * flat(v)), probes)
    torch.testing.assert_close(flat(out.estimate), d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(out.std_error), torch.zeros(400), rtol=0, atol=1e-12)


def test_standard_errors_track_the_spread_of_repeated_estimates():
    op = Operator(power_law(200, 0.5))
    for fn in (hessfunc.hutchinson_trace, hessfunc.hutchpp_trace):
        est = [fn(op, op.probes(30, 3000 + r)) for r in range(100)]
        spread = torch.stack([e.estimate for e in est]).std()
        reported = torch.stack([e.std_error for e in est]).mean()
        # the reported error is an estimate from one run's samples: within a factor 1.5
        assert spread / 1.5 < reported < 1.5 * spread, fn.__name__


# ----------------------------------------------------------------------------- eigenvalues


def gapped(n: int = 1000) -> torch.Tensor:
    bulk = torch.rand(n - 5, generator=gen(5))
    return torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0]), bulk])


def clustered(n: int = 1000) -> torch.Tensor:
    bulk = 0.9 * torch.rand(n - 5, generator=gen(6))
    return torch.cat([torch.tensor([1.0, 0.99, 0.98, 0.97, 0.96]), bulk])


def check_pairs(op: Operator, res, k: int):
    U = rows(res.eigenvectors)
    assert U.shape == (k, op.A.shape[0])
    # orthonormal to 1e-8
    torch.testing.assert_close(U @ U.T, torch.eye(k), rtol=0, atol=1e-8)
    # the reported residuals are the true ones, recomputed with the dense matrix
    true = torch.linalg.norm(U @ op.A - res.eigenvalues[:, None] * U, dim=1)
    torch.testing.assert_close(res.residual_norms, true, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize(("spectrum", "num_iters"), [(gapped, 20), (clustered, 60)])
def test_eigsh_top5_to_1e10_within_the_matvec_budget(spectrum, num_iters):
    op = Operator(spectrum())
    res = hessfunc.eigsh(op, op.vector(0), 5, num_iters=num_iters)
    assert op.calls == num_iters
    top = op.spectrum.sort(descending=True).values[:5]
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-10, atol=0)
    check_pairs(op, res, 5)


def test_no_ghosts_with_reorthogonalisation_and_ghosts_without():
    op = Operator(gapped())
    good = hessfunc.eigsh(op, op.vector(1), 5, num_iters=60)
    torch.testing.assert_close(
        good.eigenvalues, torch.tensor([10.0, 9, 8, 7, 6]), rtol=1e-12, atol=0
    )
    assert good.eigenvalues.diff().abs().min() > 0.5  # five distinct eigenvalues
    check_pairs(op, good, 5)
    # negative control: the three-term recurrence alone loses orthogonality once 10 converges,
    # and copies of it crowd out 8, 7, 6; each copy still has a tiny true residual, so only
    # the duplicates and the non-orthogonal vectors give it away
    bad = hessfunc.eigsh(op, op.vector(1), 5, num_iters=60, reorthogonalize=False)
    assert (bad.eigenvalues - 10).abs().lt(1e-6).sum() >= 2
    U = rows(bad.eigenvectors)
    assert (U @ U.T - torch.eye(5)).abs().max() > 0.5


def test_eigsh_which_smallest_and_largest_magnitude():
    spectrum = torch.cat([torch.tensor([-12.0, -11.0, 3.0]), torch.rand(397, generator=gen(7))])
    op = Operator(spectrum)
    sa = hessfunc.eigsh(op, op.vector(2), 2, num_iters=40, which="SA")
    torch.testing.assert_close(sa.eigenvalues, torch.tensor([-12.0, -11.0]), rtol=1e-10, atol=0)
    lm = hessfunc.eigsh(op, op.vector(2), 3, num_iters=40, which="LM")
    torch.testing.assert_close(
        lm.eigenvalues, torch.tensor([-12.0, -11.0, 3.0]), rtol=1e-10, atol=0
    )
    la = hessfunc.eigsh(op, op.vector(2), 1, num_iters=40)
    torch.testing.assert_close(la.eigenvalues, torch.tensor([3.0]), rtol=1e-10, atol=0)
    check_pairs(op, lm, 3)


def test_lanczos_decomposition_and_an_exhausted_krylov_space():
    # three distinct eigenvalues: the Krylov space of any start vector has dimension 3, so the
    # process restarts every three steps and must still give an orthonormal basis, Q^T A Q = T
    spectrum = torch.tensor([1.0, 2.0, 5.0]).repeat_interleave(torch.tensor([100, 150, 60]))
    op = Operator(spectrum)
    res = hessfunc.lanczos(op, op.vector(3), 12)
    Q = rows(res.basis)
    assert torch.isfinite(res.alphas).all() and torch.isfinite(res.betas).all()
    torch.testing.assert_close(Q @ Q.T, torch.eye(12), rtol=0, atol=1e-10)
    torch.testing.assert_close(Q @ op.A @ Q.T, res.tridiagonal(), rtol=0, atol=1e-10)
    assert (res.betas[2] == 0) and (res.betas.abs() > 0).sum() < 11  # decoupled at step 3
    ritz = torch.linalg.eigvalsh(res.tridiagonal())
    # every Ritz value is an eigenvalue (each block of T is exact)
    assert torch.stack([(ritz - lam).abs() for lam in (1.0, 2.0, 5.0)]).min(0).values.max() < 1e-10


def test_lanczos_with_n_steps_recovers_the_whole_spectrum():
    op = Operator(torch.linspace(-1, 2, 310) ** 3)
    res = hessfunc.lanczos(op, op.vector(4), 310)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(res.tridiagonal()), op.spectrum.sort().values, rtol=0, atol=1e-10
    )


def test_power_iteration_stops_on_the_true_residual():
    op = Operator(gapped(400))
    res = hessfunc.power_iteration(op, op.vector(5), 1, num_iters=500, tol=1e-9)
    assert res.residual_norms[0] <= 1e-9 * 10
    assert op.calls == int(res.iterations[0]) < 500  # stopped early
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0]), rtol=1e-12, atol=0)


def test_power_iteration_with_deflation_reports_true_residuals():
    op = Operator(gapped(400))
    res = hessfunc.power_iteration(op, op.vector(5), 3, num_iters=300)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 9.0, 8.0]), rtol=1e-10, atol=0)
    U = rows(res.eigenvectors)
    torch.testing.assert_close(U @ U.T, torch.eye(3), rtol=0, atol=1e-8)
    true = torch.linalg.norm(U @ op.A - res.eigenvalues[:, None] * U, dim=1)
    torch.testing.assert_close(res.residual_norms, true, rtol=1e-6, atol=1e-14)
    # each deflated pair inherits the error of the earlier ones: the second residual cannot
    # fall below the first (here both sit at about 1e-8 after 300 steps)
    assert res.residual_norms[1] >= 0.5 * res.residual_norms[0]


def test_power_iteration_needs_far_more_matvecs_than_lanczos_on_a_clustered_top():
    op = Operator(clustered(400))
    top = op.spectrum.max()
    power = hessfunc.power_iteration(op, op.vector(6), 1, num_iters=60)
    lanczos = hessfunc.eigsh(op, op.vector(6), 1, num_iters=60)
    assert (lanczos.eigenvalues[0] - top).abs() < 1e-10
    assert (power.eigenvalues[0] - top).abs() > 1e-6  # 60 steps at ratio 0.99: far from it


# ----------------------------------------------------------------------------- SLQ


def wasserstein1(result: hessfunc.SLQResult, eigenvalues: torch.Tensor) -> torch.Tensor:
    """W1 between the SLQ measure (probes averaged) and the uniform measure on eigenvalues."""
    p = result.nodes.shape[0]
    x = torch.cat([result.nodes.reshape(-1), eigenvalues])
    w = torch.cat(
        [result.weights.reshape(-1) / p, -torch.ones_like(eigenvalues) / len(eigenvalues)]
    )
    order = x.argsort()
    x, w = x[order], w[order]
    return (torch.cumsum(w, 0)[:-1].abs() * x.diff()).sum()


def test_slq_density_is_close_in_wasserstein_distance():
    # a Hessian-like spectrum: most mass near zero, a tail of large eigenvalues
    op = Operator(power_law(2000, 1.0))
    res = hessfunc.slq(op, op.probes(10, 0), 30)
    assert res.nodes.shape == res.weights.shape == (10, 30)
    torch.testing.assert_close(res.weights.sum(1), torch.ones(10), rtol=0, atol=1e-12)
    spread = op.spectrum.max() - op.spectrum.min()
    # measured here: 5e-4 of the range
    assert wasserstein1(res, op.spectrum) <= 1e-3 * spread
    assert op.calls == 30  # one vmapped call per step for all 10 probes


def test_slq_resolution_on_an_evenly_spread_spectrum():
    # With mass everywhere, an m-point Gauss rule's CDF is a staircase with steps of width
    # ~range/m, so W1 ~ range/(4m) whatever the probes: measured 1e-2 of the range at m = 30.
    # We check that floor is met and that doubling m halves it (a quadrature, not a noise, error).
    op = Operator(torch.linspace(-1, 1, 2000) ** 3)
    w = [wasserstein1(hessfunc.slq(op, op.probes(10, 0), m), op.spectrum) for m in (30, 60)]
    assert w[0] <= 2 / (2 * 30)
    assert w[1] < 0.7 * w[0]


def test_slq_with_n_steps_has_the_extreme_eigenvalues_as_extreme_nodes():
    op = Operator(torch.cat([torch.tensor([-3.0, 7.0]), torch.rand(298, generator=gen(8))]))
    res = hessfunc.slq(op, op.probes(3, 1), 300)
    torch.testing.assert_close(res.nodes[:, 0], torch.full((3,), -3.0), rtol=0, atol=1e-10)
    torch.testing.assert_close(res.nodes[:, -1], torch.full((3,), 7.0), rtol=0, atol=1e-10)


def test_spectral_density_integrates_to_one_and_peaks_where_the_mass_is():
    op = Operator(torch.cat([torch.full((200,), -1.0), torch.full((100,), 2.0)]))
    res = hessfunc.slq(op, op.probes(8, 2), 10)
    grid = torch.linspace(-4, 5, 9001)
    rho = hessfunc.spectral_density(res, grid, sigma=0.05)
    torch.testing.assert_close(torch.trapezoid(rho, grid), torch.tensor(1.0), rtol=1e-6, atol=0)
    mass_left = torch.trapezoid(rho[grid < 0.5], grid[grid < 0.5])
    # the fraction of weight at -1 is a Rademacher average of 2/3: sd ~ 0.03 over 8 probes
    assert abs(mass_left - 2 / 3) < 0.15


def test_logdet_of_a_damped_curvature_within_one_percent():
    # a damped GGN-like spectrum (Laplace evidence): a fast-decaying tail over a floor set by
    # the damping, where most eigenvalues sit. The relative error of any probe average depends
    # on the operator (it is meaningless when log det ~ 0), so the test first derives that 1%
    # is a 5-sd bound here.
    op = Operator(power_law(1000, 2.0) * 50)
    damping, p = 0.1, 30
    exact = torch.log(op.spectrum + damping).sum()
    est = hessfunc.logdet(op, op.probes(p, 3), 30, damping=damping)
    # Rademacher variance 2 sum_{i != j} (log(A + damping I))_ij^2 / p, from the dense matrix
    L = rotation(1000) @ torch.diag(torch.log(op.spectrum + damping)) @ rotation(1000).T
    sd = (2 * (L.pow(2).sum() - L.diagonal().pow(2).sum()) / p) ** 0.5
    assert 5 * sd < 1e-2 * exact.abs()  # 5 sd is 0.68% of |log det| = 2238
    assert (est.estimate - exact).abs() < 5 * sd
    # the quadrature part is exact to far better than the probe noise: the same probes with
    # the exact quadratic forms v^T log(A + damping I) v
    V = rows(op.probes(p, 3))
    exact_forms = ((V @ L) * V).sum(1).mean()
    torch.testing.assert_close(est.estimate, exact_forms, rtol=1e-8, atol=0)


# ----------------------------------------------------------------------------- blocks


def block_operator():
    op = Operator(power_law(400, 0.5) + torch.linspace(-0.3, 0.3, 400))
    tree = {"enc.w": torch.zeros(3, 50), "enc.b": torch.zeros(50), "head.w": torch.zeros(200)}
    unravel = hessfunc.ravel(tree)[1]
    matvec = lambda v: unravel(op.A @ flat(v))  # noqa: E731
    return op.A, tree, unravel, matvec


def test_blockwise_eigsh_matches_the_dense_diagonal_blocks():
    A, tree, unravel, matvec = block_operator()
    v0 = unravel(torch.randn(400, generator=gen(9)))
    res = hessfunc.blockwise(hessfunc.eigsh, matvec, tree, v0, 2, num_iters=150, which="LM")
    assert list(res) == ["enc", "head"]
    for name, block in (("enc", slice(0, 200)), ("head", slice(200, 400))):
        ev = torch.linalg.eigvalsh(A[block, block])
        expected = ev[ev.abs().argsort(descending=True)[:2]]
        torch.testing.assert_close(res[name].eigenvalues, expected, rtol=1e-8, atol=0)
    assert set(res["enc"].eigenvectors) == {"enc.w", "enc.b"}
    assert res["enc"].eigenvectors["enc.w"].shape == (2, 3, 50)


def test_blockwise_by_leaf_and_by_a_callable():
    A, tree, unravel, matvec = block_operator()
    probes = hessfunc.random_probes(tree, 300, generator=gen(10))
    by_leaf = hessfunc.blockwise(hessfunc.hutchpp_trace, matvec, tree, probes, blocks="leaf")
    assert list(by_leaf) == ["enc.w", "enc.b", "head.w"]
    for name, block in (("enc.w", slice(0, 150)), ("enc.b", slice(150, 200))):
        exact = torch.trace(A[block, block])
        assert (by_leaf[name].estimate - exact).abs() < 5 * by_leaf[name].std_error + 1e-12
    one = hessfunc.blockwise(
        hessfunc.slq, matvec, tree, probes, 3, blocks=lambda name: "all"
    )  # one block: the whole operator
    assert list(one) == ["all"] and one["all"].nodes.shape == (300, 3)


def test_block_trace_is_unbiased_and_sums_to_hutchinson():
    A, tree, unravel, matvec = block_operator()
    blocks = {"enc": slice(0, 200), "head": slice(200, 400)}
    est = [hessfunc.block_trace(matvec, hessfunc.random_probes(tree, 10, generator=gen(r)))
           for r in range(200)]  # fmt: skip
    for name, b in blocks.items():
        samples = torch.stack([e[name].estimate for e in est])
        # the variance per probe from the dense matrix (see block_trace's docstring)
        inside = A[b, b].pow(2).sum() - A[b, b].diagonal().pow(2).sum()
        outside = A[b].pow(2).sum() - A[b, b].pow(2).sum()
        sd = ((2 * inside + outside) / 10) ** 0.5
        torch.testing.assert_close(samples.std(), sd, rtol=0.2, atol=0)  # sd of 200 samples
        assert (samples.mean() - torch.trace(A[b, b])).abs() < 5 * sd / 200**0.5
    probes = hessfunc.random_probes(tree, 10, generator=gen(0))
    total = hessfunc.hutchinson_trace(matvec, probes).estimate
    parts = hessfunc.block_trace(matvec, probes)
    torch.testing.assert_close(sum(p.estimate for p in parts.values()), total)


# ----------------------------------------------------------------------------- contract


def test_every_estimator_accepts_any_pytree_and_returns_pytrees_like_a_probe():
    tree = {"x": (torch.zeros(2, 2), [torch.zeros(3)]), "y": torch.zeros(())}
    n = 8
    A = torch.diag(torch.arange(1.0, n + 1))
    unravel = hessfunc.ravel(tree)[1]
    mv = lambda v: unravel(A @ flat(v))  # noqa: E731
    probes = hessfunc.random_probes(tree, 4, generator=gen(0))
    for fn in (hessfunc.hutchinson_diag, hessfunc.xdiag):
        out = fn(mv, probes).estimate
        assert _tree.tree_structure(out) == _tree.tree_structure(tree)
    res = hessfunc.eigsh(mv, unravel(torch.ones(n)), 2, num_iters=n)
    assert res.eigenvectors["y"].shape == (2,)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([8.0, 7.0]))
    pw = hessfunc.power_iteration(mv, unravel(torch.ones(n)), 1, num_iters=5)
    assert pw.eigenvectors["x"][1][0].shape == (1, 3)


def test_errors_name_the_call_and_the_fix():
    op = Operator(power_law(400, 1.0))
    with pytest.raises(ValueError, match=r"hessfunc.xtrace\(matvec, probes\).*even.*Pass 6"):
        hessfunc.xtrace(op, op.probes(5, 0))
    with pytest.raises(ValueError, match=r"hessfunc.eigsh.*num_iters=500 exceeds.*n = 400"):
        hessfunc.eigsh(op, op.vector(0), 2, num_iters=500)
    with pytest.raises(ValueError, match=r"hessfunc.eigsh.*which='BE'"):
        hessfunc.eigsh(op, op.vector(0), 2, which="BE")
    with pytest.raises(TypeError, match=r"random_probes.*torch.Generator"):
        hessfunc.random_probes(op.like, 3, generator=0)
    with pytest.raises(ValueError, match=r"hutchinson_trace.*leading axis"):
        hessfunc.hutchinson_trace(op, {"w": torch.zeros(3, 100), "b": torch.zeros(())})
    with pytest.raises(
        ValueError, match=r"hutchinson_trace.*matvec\(v\) must have the leaves of v"
    ):
        hessfunc.hutchinson_trace(lambda v: v["w"], op.probes(3, 0))
    with pytest.raises(ValueError, match=r"lanczos.*num_iters must be a Python int"):
        hessfunc.lanczos(op, op.vector(0), 3.0)


def test_a_batched_product_gives_the_vmapped_result_and_is_called_on_blocks():
    op = Operator(power_law(400, 1.0))
    sizes = []

    def matmat(V):
        sizes.append(V["b"].shape[0])
        return torch.func.vmap(op)(V)

    batched = hessfunc.batched_matvec(matmat)
    probes = op.probes(12, 0)
    assert_same = lambda a, b: torch.testing.assert_close(flat(a), flat(b))  # noqa: E731
    assert_same(hessfunc.xtrace(batched, probes), hessfunc.xtrace(op, probes))
    assert sizes == [6, 6]
    sizes.clear()
    assert_same(
        hessfunc.hutchinson_diag(batched, probes, chunk_size=5),
        hessfunc.hutchinson_diag(op, probes),
    )
    assert sizes == [5, 5, 2]
    v0 = op.vector(0)
    assert_same(
        hessfunc.eigsh(batched, v0, 2, num_iters=10), hessfunc.eigsh(op, v0, 2, num_iters=10)
    )
    assert_same(
        hessfunc.blockwise(hessfunc.slq, batched, op.like, probes, 4),
        hessfunc.blockwise(hessfunc.slq, op, op.like, probes, 4),
    )
    # called on one vector, it is still a matvec
    assert_same(batched(v0), op(v0))


# the matvec algorithms: the spectral layer and the inverse products beside cg
MATVEC_MODULES = [
    "linalg.estimators", "linalg.lanczos", "linalg.slq", "linalg.blocks", "_base._operator",
    "linalg.inverse",
]  # fmt: skip
AD_MODULES = {"hvp", "ggn", "fisher", "hessian", "fd", "check", "module", "solvers", "influence"}


@pytest.mark.parametrize("name", MATVEC_MODULES)
def test_matvec_algorithms_import_no_differentiation_module(name):
    spec = importlib.util.find_spec(f"hessfunc.{name}")
    source = Path(spec.origin).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            # `from ..products import hvp`, `from ..products.hvp import x`, `from . import slq`
            parts = (node.module or "").split(".")
            imported |= {parts[-1]} if node.module else set()
            imported |= set(parts) | {a.name for a in node.names}
    assert not imported & AD_MODULES, imported & AD_MODULES
