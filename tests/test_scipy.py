"""hessfunc.to_scipy: scipy's LinearOperator over pytree matvecs, dataset operators included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh, lobpcg

import hessfunc
from hessfunc._base import _tree
from hessfunc.data import linear_operator


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    apply, params = hessfunc.from_module(net.double())
    f_sum = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    f_mean = lambda p, X, y: F.cross_entropy(apply(p, X), y)  # noqa: E731
    H = hessfunc.hessian_matrix(f_mean, params, X, y)
    return params, X, y, f_sum, f_mean, H


class Counting:
    """A matvec that counts its calls (and keeps a matmat, like a dataset operator)."""

    def __init__(self, matvec, matmat=None):
        self.fn, self.calls, self.block_calls = matvec, 0, 0
        if matmat is not None:
            self._mm = matmat

            def matmat_(vs):
                self.block_calls += 1
                return self._mm(vs)

            self.matmat = matmat_

    def __call__(self, v):
        self.calls += 1
        return self.fn(v)


def test_eigsh_through_the_adapter_equals_eigvalsh_of_the_dense_matrix(problem):
    params, X, y, f_sum, f_mean, H = problem
    batches = [(X[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]  # 7, 7, 7, 7, 2
    op = linear_operator(
        lambda v, X, y: hessfunc.hvp(f_sum, params, v, X, y), batches, count=lambda X, y: len(y)
    )
    A = hessfunc.to_scipy(op, params)
    exact = torch.linalg.eigvalsh(H).numpy()
    top = np.sort(eigsh(A, k=3, which="LA", tol=1e-12)[0])
    np.testing.assert_allclose(top, exact[-3:], rtol=1e-9, atol=1e-12)


def test_no_hidden_probe_and_both_vector_shapes(problem):
    params, X, y, f_sum, f_mean, H = problem
    mv = Counting(lambda v: hessfunc.hvp(f_mean, params, v, X, y))
    A = hessfunc.to_scipy(mv, params)
    assert mv.calls == 0  # scipy would run one matvec here to infer the dtype
    assert A.shape == (len(H), len(H)) and A.dtype == np.float64
    x = np.random.default_rng(0).standard_normal(len(H))
    expected = (H @ torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(A.matvec(x), expected, rtol=1e-10, atol=1e-12)
    column = A.matvec(x[:, None])
    assert column.shape == (len(H), 1)
    np.testing.assert_allclose(column[:, 0], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.rmatvec(x), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A @ x, expected, rtol=1e-10, atol=1e-12)
    z = A.matvec(x + 2j * x)
    np.testing.assert_allclose(z, expected + 2j * expected, rtol=1e-10, atol=1e-12)


def test_matmat_uses_the_batched_product(problem):
    params, X, y, f_sum, f_mean, H = problem
    mv = Counting(
        lambda v: hessfunc.hvp(f_mean, params, v, X, y),
        matmat=lambda vs: hessfunc.hvps(f_mean, params, vs, X, y),
    )
    A = hessfunc.to_scipy(mv, params)
    B = np.random.default_rng(1).standard_normal((len(H), 4))
    np.testing.assert_allclose(A.matmat(B), H.numpy() @ B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.rmatmat(B), H.numpy() @ B, rtol=1e-10, atol=1e-12)
    assert (mv.calls, mv.block_calls) == (0, 2)
    plain = Counting(lambda v: hessfunc.hvp(f_mean, params, v, X, y))
    np.testing.assert_allclose(
        hessfunc.to_scipy(plain, params).matmat(B), H.numpy() @ B, rtol=1e-10, atol=1e-12
    )
    assert plain.calls == 4
    # lobpcg works on blocks: the top eigenvalue through matmat.
    X0 = np.random.default_rng(2).standard_normal((len(H), 1))
    vals = lobpcg(A, X0, tol=1e-8, maxiter=200)[0]
    np.testing.assert_allclose(vals[0], torch.linalg.eigvalsh(H)[-1].item(), rtol=1e-6)


def test_dtype_from_like_or_given_and_ravel_order():
    f32 = torch.float32
    like = {"b": torch.zeros(2, dtype=f32), "a": torch.zeros(1, dtype=f32)}  # insertion order
    diag = {"b": torch.tensor([1.0, 2.0], dtype=f32), "a": torch.tensor([3.0], dtype=f32)}
    A = hessfunc.to_scipy(lambda v: _tree.tree_map(torch.mul, diag, v), like)
    assert A.dtype == np.float32
    np.testing.assert_allclose(A.matvec(np.ones(3, dtype=np.float32)), [1.0, 2.0, 3.0])
    A64 = hessfunc.to_scipy(lambda v: v, like, dtype=np.float64)
    assert A64.dtype == np.float64 and A64.matvec(np.ones(3)).dtype == np.float64
    assert hessfunc.to_scipy(lambda v: v, like, dtype=torch.float64).dtype == np.float64


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match=r"numpy has no dtype for torch.bfloat16; pass dtype"):
        hessfunc.to_scipy(lambda v: v, torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="real floating dtype"):
        hessfunc.to_scipy(lambda v: v, torch.zeros(2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"to_scipy.*matvec must have the leaves of like"):
        hessfunc.to_scipy(lambda v: {"x": v}, torch.zeros(2)).matvec(np.ones(2))
    with pytest.raises(TypeError, match="matvec must be callable"):
        hessfunc.to_scipy(None, torch.zeros(2))
    with pytest.raises(ValueError, match="no entries"):
        hessfunc.to_scipy(lambda v: v, {})
