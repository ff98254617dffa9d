"""CG against direct solves, and Newton-CG against dense Newton steps."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tol
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree


def spd(n, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return Q @ torch.diag(torch.linspace(1.0, cond, n)) @ Q.T


@given(n=st.integers(1, 12), seed=st.integers(0, 10**6), damping=st.sampled_from([0.0, 0.1, 3.0]))
def test_cg_solves_spd_systems_exactly_in_n_steps(n, seed, damping):
    A = spd(n, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    res = hessfunc.cg(lambda v: A @ v, b, maxiter=n, damping=damping)
    expected = torch.linalg.solve(A + damping * torch.eye(n), b)
    torch.testing.assert_close(res.x, expected, rtol=1e-8, atol=1e-8)
    assert not res.negative_curvature


def test_cg_over_pytrees_with_x0_and_tol():
    A = spd(5, 0, cond=100.0)
    tree = {"a": torch.zeros(2), "b": torch.zeros(3)}
    _, unravel = hessfunc.ravel(tree)

    def matvec(v):
        return unravel(A @ hessfunc.ravel(v)[0])

    b = unravel(torch.arange(1.0, 6.0))
    x0 = unravel(torch.ones(5))
    res = hessfunc.cg(matvec, b, maxiter=50, tol=1e-10, x0=x0)
    torch.testing.assert_close(
        hessfunc.ravel(res.x)[0],
        torch.linalg.solve(A, torch.arange(1.0, 6.0)),
        rtol=1e-8,
        atol=1e-8,
    )
    assert 1 <= int(res.iterations) <= 6  # stopped early, long before maxiter
    assert (
        float(res.residual_norm)
        <= 1e-10 * float(torch.linalg.norm(torch.arange(1.0, 6.0))) * 1.0001
    )


def test_cg_with_fixed_iterations_is_a_partial_solve_and_flags_negative_curvature():
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0]))
    b = torch.tensor([1.0, 1.0, 1.0])
    res = hessfunc.cg(lambda v: A @ v, b, maxiter=3)
    assert bool(res.negative_curvature)
    assert torch.isfinite(res.x).all()
    # with enough damping the system is positive definite again
    res = hessfunc.cg(lambda v: A @ v, b, maxiter=3, damping=2.0)
    assert not bool(res.negative_curvature)
    torch.testing.assert_close(res.x, b / (torch.diagonal(A) + 2.0), **tol("exact", torch.float64))


def test_cg_with_tol_under_vmap_freezes_each_solve_instead_of_stopping():
    """vmap refuses the host read of an early stop; each right-hand side is frozen once it has
    converged, so the batch equals solving the right-hand sides one by one."""
    A = spd(6, 3, cond=50.0)
    B = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    B[0] = torch.linalg.eigh(A).eigenvectors[:, 0]  # converges in one step; the others in ~6
    batched = torch.func.vmap(lambda b: hessfunc.cg(lambda v: A @ v, b, maxiter=20, tol=1e-10))(B)
    for i in range(4):
        one = hessfunc.cg(lambda v: A @ v, B[i], maxiter=20, tol=1e-10)  # stops early, eagerly
        torch.testing.assert_close(batched.x[i], one.x, rtol=1e-12, atol=1e-12)
        assert int(batched.iterations[i]) == int(one.iterations)
    assert int(batched.iterations[0]) == 1 < int(batched.iterations[1])
    assert not batched.negative_curvature.any()


@given(n=st.integers(1, 10), seed=st.integers(0, 10**6), damping=st.sampled_from([0.0, 0.5]))
def test_preconditioned_cg_solves_spd_systems_exactly_in_n_steps(n, seed, damping):
    A, M = spd(n, seed, cond=50.0), spd(n, seed + 7, cond=5.0)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    res = hessfunc.cg(
        lambda v: A @ v, b, maxiter=n, damping=damping, preconditioner=lambda r: M @ r
    )
    expected = torch.linalg.solve(A + damping * torch.eye(n), b)
    torch.testing.assert_close(res.x, expected, rtol=1e-8, atol=1e-8)
    # the residual it reports is the plain one
    plain = torch.linalg.norm(b - (A + damping * torch.eye(n)) @ res.x)
    torch.testing.assert_close(res.residual_norm, plain, rtol=1e-6, atol=1e-8)


def test_preconditioner_that_inverts_the_system_converges_in_one_step():
    A, b, lam = spd(8, 3, cond=1e4), torch.randn(8, generator=torch.Generator().manual_seed(4)), 0.1
    exact = torch.linalg.inv(A + lam * torch.eye(8))
    res = hessfunc.cg(
        lambda v: A @ v, b, maxiter=8, damping=lam, tol=1e-10, preconditioner=lambda r: exact @ r
    )
    assert int(res.iterations) == 1
    torch.testing.assert_close(res.x, exact @ b, rtol=1e-10, atol=1e-10)
    plain = hessfunc.cg(lambda v: A @ v, b, maxiter=8, damping=lam, tol=1e-10)
    assert int(plain.iterations) == 8


def test_identity_preconditioner_gives_plain_cg_iterates():
    A, b = spd(6, 1, cond=30.0), torch.randn(6, generator=torch.Generator().manual_seed(2))
    for k in range(1, 5):
        plain = hessfunc.cg(lambda v: A @ v, b, maxiter=k, damping=0.2)
        pre = hessfunc.cg(lambda v: A @ v, b, maxiter=k, damping=0.2, preconditioner=lambda r: r)
        torch.testing.assert_close(pre.x, plain.x, rtol=1e-14, atol=1e-14)


def test_cg_bad_input():
    with pytest.raises(ValueError, match="hessfunc.cg.*maxiter"):
        hessfunc.cg(lambda v: v, torch.ones(2), maxiter=-1)
    with pytest.raises(ValueError, match="tol"):
        hessfunc.cg(lambda v: v, torch.ones(2), maxiter=1, tol=-1.0)
    with pytest.raises(ValueError, match="x0"):
        hessfunc.cg(lambda v: v, torch.ones(2), maxiter=1, x0=torch.ones(3))
    with pytest.raises(TypeError, match="hessfunc.cg.*preconditioner must be None or callable"):
        hessfunc.cg(lambda v: v, torch.ones(2), maxiter=1, preconditioner="kfac")


def _logistic():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    w_true = torch.tensor([1.5, -2.0, 0.5])
    y = (torch.rand(64, generator=g) < torch.sigmoid(X @ w_true)).double()
    params = {"w": torch.zeros(3), "b": torch.zeros(())}
    f = lambda p, X, y: (
        F.binary_cross_entropy_with_logits(X @ p["w"] + p["b"], y) + 1e-3 * (p["w"] ** 2).sum()
    )
    return f, params, X, y


def test_newton_cg_matches_a_dense_newton_step():
    f, params, X, y = _logistic()
    params = {"w": torch.tensor([0.3, -0.1, 0.2]), "b": torch.tensor(0.1)}
    out = hessfunc.newton_cg_step(f, params, X, y, damping=0.1, maxiter=4, lr=0.7)
    flat, unravel = hessfunc.ravel(params)
    H = hessfunc.hessian_matrix(f, params, X, y)
    g = hessfunc.ravel(torch.func.grad(f)(params, X, y))[0]
    dense = flat - 0.7 * torch.linalg.solve(H + 0.1 * torch.eye(4), g)
    torch.testing.assert_close(hessfunc.ravel(out.params)[0], dense, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.value, f(params, X, y))


def test_newton_cg_reaches_the_optimum_of_a_convex_problem_in_few_steps():
    f, params, X, y = _logistic()
    values = []
    for _ in range(6):
        out = hessfunc.newton_cg_step(f, params, X, y, damping=0.0, maxiter=4)
        params = out.params
        values.append(float(out.value))
    grad_norm = torch.linalg.norm(hessfunc.ravel(torch.func.grad(f)(params, X, y))[0])
    assert grad_norm < 1e-10
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_newton_cg_with_gauss_newton_curvature():
    f, params, X, y = _logistic()
    from hessfunc.losses import BCEWithLogitsLoss
    from hessfunc.products.ggn import ggn_vp

    model = lambda p, X: X @ p["w"] + p["b"]
    loss = BCEWithLogitsLoss(y)
    reg = lambda p, v: _tree.axpy(
        2e-3, {"w": v["w"], "b": torch.zeros_like(v["b"])}, ggn_vp(model, loss, p, v, X)
    )
    for _ in range(8):
        params = hessfunc.newton_cg_step(
            f, params, X, y, curvature=reg, damping=0.0, maxiter=4
        ).params
    # for a linear model with a convex loss the Gauss-Newton matrix is the Hessian: same optimum
    assert torch.linalg.norm(hessfunc.ravel(torch.func.grad(f)(params, X, y))[0]) < 1e-10
    with pytest.raises(ValueError, match="curvature must be"):
        hessfunc.newton_cg_step(f, params, X, y, curvature="ggn")


def test_newton_cg_does_not_mutate():
    f, params, X, y = _logistic()
    before = _tree.tree_map(torch.clone, params)
    hessfunc.newton_cg_step(f, params, X, y)
    assert_close(params, before)
