"""Dense Hessians against closed forms, torch.func and autograd references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tol
from zoo import raveled_reference

import hessfunc

MODES = ("fwd-rev", "rev-rev")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_quadratic_form(mode, chunk_size):
    A = torch.randn(5, 5)
    th = torch.randn(5)
    H = hessfunc.hessian_matrix(lambda t, A: t @ A @ t, th, A, mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(H, A + A.T, **tol("exact", torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_linear_regression_mse_is_2XtX_over_N(mode):
    X, y = torch.randn(20, 4), torch.randn(20)
    params = {"w": torch.randn(4), "b": torch.randn(())}

    def f(p, X, y):
        return F.mse_loss(X @ p["w"] + p["b"], y)

    H = hessfunc.hessian_matrix(f, params, X, y, mode=mode)
    Xa = torch.cat([X, torch.ones(20, 1)], 1)
    torch.testing.assert_close(H, 2 * Xa.T @ Xa / 20, **tol("exact", torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_logistic_regression(mode):
    X = torch.randn(30, 3)
    y = (torch.rand(30) < 0.5).double()
    w = torch.randn(3)
    f = lambda w, X, y: F.binary_cross_entropy_with_logits(X @ w, y)
    p = torch.sigmoid(X @ w)
    expected = X.T @ (X * (p * (1 - p))[:, None]) / 30
    torch.testing.assert_close(
        hessfunc.hessian_matrix(f, w, X, y, mode=mode), expected, **tol("exact", torch.float64)
    )


def _mlp_f(p, x):
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return (h @ p["w2"].T).pow(2).sum()


def _mlp_params():
    return {"w1": torch.randn(3, 2), "b1": torch.randn(3), "w2": torch.randn(2, 3)}


@pytest.mark.parametrize("mode", MODES)
def test_matrix_matches_autograd_reference_and_is_symmetric(mode):
    params, x = _mlp_params(), torch.randn(4, 2)
    H = hessfunc.hessian_matrix(_mlp_f, params, x, mode=mode)
    assert H.shape == (15, 15)
    assert_close(H, raveled_reference(_mlp_f, params, x))
    assert_close(H, H.T)


def test_block_hessian_layout_matches_torch_func():
    params, x = _mlp_params(), torch.randn(4, 2)
    blocks = hessfunc.hessian(_mlp_f)(params, x)
    reference = torch.func.hessian(_mlp_f)(params, x)
    assert list(blocks) == list(params) and list(blocks["w1"]) == list(params)
    assert blocks["w1"]["b1"].shape == (3, 2, 3)
    assert_close(blocks, reference)


@pytest.mark.parametrize("mode", MODES)
def test_block_hessian_wrt_inputs_laplacian(mode):
    # u(x) = sum(sin(a x)) has Laplacian -a^2 sum(sin(a x))
    a = torch.tensor(1.7)
    x = torch.randn(4)
    H = hessfunc.hessian(lambda params, x: torch.sin(params * x).sum(), argnums=1, mode=mode)(a, x)
    torch.testing.assert_close(
        torch.trace(H), -(a**2) * torch.sin(a * x).sum(), **tol("exact", torch.float64)
    )


def test_tuple_argnums_gives_tuple_of_tuples():
    f = lambda a, b: (a**2 * b).sum() + (a @ a) * b.sum()
    a, b = torch.randn(3), torch.randn(3)
    ours = hessfunc.hessian(f, argnums=(0, 1), chunk_size=2)(a, b)
    ref = torch.func.hessian(f, argnums=(0, 1))(a, b)
    assert isinstance(ours, tuple) and isinstance(ours[0], tuple)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(ours[i][j], ref[i][j], **tol("exact", torch.float64))


def test_negative_argnums_and_pytree_inputs():
    f = lambda p, x: (p * x["u"] ** 2).sum() * x["v"]
    p, x = torch.randn(2), {"u": torch.randn(2), "v": torch.tensor(1.5)}
    ours = hessfunc.hessian(f, argnums=-1)(p, x)
    ref = torch.func.hessian(f, argnums=1)(p, x)
    assert_close(ours, ref)


@pytest.mark.parametrize("mode", MODES)
def test_chunk_size_does_not_change_the_result(mode):
    params, x = _mlp_params(), torch.randn(4, 2)
    full = hessfunc.hessian_matrix(_mlp_f, params, x, mode=mode)
    for c in (1, 4, 15, 100):
        torch.testing.assert_close(
            hessfunc.hessian_matrix(_mlp_f, params, x, mode=mode, chunk_size=c),
            full,
            rtol=0,
            atol=1e-12,
        )


def test_mixed_dtypes_promote():
    params = {"a": torch.randn(2, dtype=torch.float32), "b": torch.randn(2)}
    f = lambda p: (p["a"].double() * p["b"]).sum() + (p["b"] ** 3).sum()
    H = hessfunc.hessian_matrix(f, params)
    assert H.dtype == torch.float64
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[:2, 2:] = torch.eye(2)
    expected[2:, :2] = torch.eye(2)
    expected[2:, 2:] = torch.diag(6 * params["b"])
    torch.testing.assert_close(H, expected, **tol("exact", torch.float64))


def test_memory_guard_refuses_before_evaluating_f():
    calls = []

    def f(p):
        calls.append(1)
        return p.sum()

    big = torch.zeros(10**7)  # a dense Hessian would need 800 TB
    with pytest.raises(MemoryError, match=r"hessfunc.hessian_matrix.*hessfunc.hvp"):
        hessfunc.hessian_matrix(f, big)
    with pytest.raises(MemoryError, match=r"max_bytes"):
        hessfunc.hessian_matrix(f, torch.zeros(100), max_bytes=1000)
    with pytest.raises(MemoryError, match=r"hessfunc.hessian\(f, argnums\)"):
        hessfunc.hessian(f)(big)
    assert calls == []
    # a generous explicit budget lets it through
    assert hessfunc.hessian_matrix(f, torch.zeros(10), max_bytes=10**6).abs().sum() == 0
