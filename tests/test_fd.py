"""Finite differences: closed forms, exact-vs-FD over generated problems, steps, vmap, compile."""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from conftest import assert_close, tol
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree
from hessfunc.products.fd import (
    _step_along,
    default_step,
    fd_grad,
    fd_hessian_matrix,
    fd_hvp,
    fd_hvps,
)
from hessfunc.testing import directions_like, models, pytrees, tree_problems


def quadratic(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g)
    th = torch.randn(n, generator=g)
    return (lambda t, A: t @ A @ t), th, A


def smooth_tree():
    params = {
        "w": torch.tensor([[0.3, -1.2], [0.7, 2.0]]),
        "b": (torch.tensor(0.5), torch.tensor([1.5, -0.4])),
    }

    def f(p):
        w, (s, b) = p["w"], p["b"]
        return (
            torch.sin(w).sum() * torch.cos(s) + torch.exp(0.3 * b).sum() + (w.sum() * b.sum()) ** 2
        )

    return f, params


def flat(tree):
    return _tree.ravel(tree)[0]


# ----------------------------------------------------------------------------- closed forms


def test_quadratic_closed_forms():
    f, th, A = quadratic()
    S = A + A.T
    v = torch.randn(4)
    assert_close(fd_grad(f, th, A), S @ th, "fd")
    assert_close(fd_hvp(f, th, v, A), S @ v, "fd")
    assert_close(fd_hvps(f, th, torch.eye(4), A), S, "fd")  # row i = S e_i
    H = fd_hessian_matrix(f, th, A)
    assert_close(H, S, "fd")
    assert torch.equal(H, H.T)  # symmetrised exactly
    # directional derivatives <grad, v_j>
    vs = torch.randn(3, 4)
    assert_close(fd_grad(f, th, A, directions=vs), vs @ (S @ th), "fd")


def test_tree_results_in_tree_layout_and_ravel_order():
    f, params = smooth_tree()
    exact_g = torch.func.grad(f)(params)
    g = fd_grad(f, params)
    assert _tree.tree_structure(g) == _tree.tree_structure(params)
    assert_close(g, exact_g, "fd")
    H = fd_hessian_matrix(f, params)
    assert_close(H, zoo.raveled_reference(f, params), "fd")
    v = _tree.random_like(params, torch.Generator().manual_seed(1))
    assert_close(fd_hvp(f, params, v), hessfunc.hvp(f, params, v), "fd")
    assert_close(flat(fd_hvp(f, params, v)), H @ flat(v), "fd")


@pytest.mark.parametrize("name", ["mlp-tanh", "transformer"])
def test_fd_hessian_matrix_matches_exact_on_zoo(name):
    case = zoo.case(name, "ce")
    H = hessfunc.hessian_matrix(case.f, case.params, *case.args, mode="rev-rev")
    Hfd = fd_hessian_matrix(case.f, case.params, *case.args, chunk_size=64)
    assert_close(Hfd, H, "fd")
    assert_close(fd_hessian_matrix(case.f, case.params, *case.args), Hfd, "fd-vs-fd")


def test_chunking_does_not_change_results():
    f, params = smooth_tree()
    assert_close(fd_grad(f, params, chunk_size=2), fd_grad(f, params), "fd-vs-fd")
    assert_close(
        fd_hessian_matrix(f, params, chunk_size=3), fd_hessian_matrix(f, params), "fd-vs-fd"
    )
    vs = _tree.random_like(params, torch.Generator().manual_seed(2), batch=5)
    assert_close(fd_hvps(f, params, vs, chunk_size=2), fd_hvps(f, params, vs), "fd-vs-fd")


# ----------------------------------------------------------------------------- generated problems


@given(problem=models(), data=st.data())
def test_fd_hvp_matches_exact_hvp_on_generated_models(problem, data):
    f, params, args = problem
    v = data.draw(directions_like(params))
    assert_close(fd_hvp(f, params, v, *args), hessfunc.hvp(f, params, v, *args), "fd")


@given(problem=models(max_batch=3), data=st.data())
def test_fd_hvps_and_directional_grads_on_generated_models(problem, data):
    f, params, args = problem
    vs = data.draw(directions_like(params, batch=2))
    assert_close(fd_hvps(f, params, vs, *args, order=4), hessfunc.hvps(f, params, vs, *args), "fd")
    g = torch.func.grad(f)(params, *args)
    exact = torch.stack([_tree.vdot(g, _tree.tree_map(lambda x: x[j], vs)) for j in range(2)])
    assert_close(fd_grad(f, params, *args, directions=vs), exact, "fd")


@given(problem=tree_problems())
def test_fd_on_generated_pytrees(problem):
    f, params, args = problem
    assert_close(fd_grad(f, params, *args), torch.func.grad(f)(params, *args), "fd")
    assert_close(fd_hessian_matrix(f, params, *args), zoo.raveled_reference(f, params, *args), "fd")


@given(problem=tree_problems(pytrees(dtypes=(torch.float32, torch.float64))))
def test_mixed_precision_trees_keep_leaf_dtypes(problem):
    f, params, args = problem
    v = _tree.random_like(params, torch.Generator().manual_seed(3))
    hv = fd_hvp(f, params, v, *args)
    g = fd_grad(f, params, *args)
    for leaf, p in zip(
        _tree.tree_leaves(hv) + _tree.tree_leaves(g), 2 * _tree.tree_leaves(params), strict=True
    ):
        assert leaf.dtype == p.dtype and leaf.shape == p.shape
    # float32 leaves limit the accuracy: the float32 row applies to the whole tree, norm-wise
    # (the default float32 step is tuned for unit-scale third derivatives; single entries of
    # sin(w x) with |w| ~ 3 can be off by a few percent of their own size)
    exact = flat(hessfunc.hvp(f, params, v, *args)).double()
    rt = tol("fd", torch.float32)
    assert (flat(hv).double() - exact).norm() <= rt["atol"] + rt["rtol"] * exact.norm()


# ----------------------------------------------------------------------------- orders and steps


def test_richardson_beats_central_at_the_same_step():
    f, params = smooth_tree()
    v = _tree.random_like(params, torch.Generator().manual_seed(4))
    exact_hv, exact_g = flat(hessfunc.hvp(f, params, v)), flat(torch.func.grad(f)(params))
    exact_H = zoo.raveled_reference(f, params)
    for step in (1e-2, 1e-3):
        e2 = (flat(fd_hvp(f, params, v, step=step, order=2)) - exact_hv).norm()
        e4 = (flat(fd_hvp(f, params, v, step=step, order=4)) - exact_hv).norm()
        assert e4 < 1e-2 * e2  # h^4 against h^2 truncation
        e2 = (flat(fd_grad(f, params, step=step)) - exact_g).norm()
        e4 = (flat(fd_grad(f, params, step=step, order=4)) - exact_g).norm()
        assert e4 < 1e-2 * e2
        e2 = (fd_hessian_matrix(f, params, step=step) - exact_H).norm()
        e4 = (fd_hessian_matrix(f, params, step=step, order=4) - exact_H).norm()
        assert e4 < 1e-2 * e2


def test_central_truncation_error_is_second_order():
    # the error of D_h for sin at 1.0 is h^2 cos(1)/6 up to O(h^4): a wrong stencil fails this
    f = lambda t: torch.sin(t).sum()  # noqa: E731
    th = torch.tensor([1.0])
    for h in (1e-2, 3e-3):
        err = fd_grad(f, th, step=h) - math.cos(1.0)
        torch.testing.assert_close(
            err, torch.tensor([-(h**2) * math.cos(1.0) / 6]), **tol("fd", torch.float64)
        )


def test_default_step_values_and_rule():
    assert default_step(torch.float64) == torch.finfo(torch.float64).eps ** (1 / 3)
    assert default_step(torch.float32, 4) == torch.finfo(torch.float32).eps ** (1 / 5)
    h0 = default_step(torch.float64)
    th = torch.tensor([0.5, -300.0, 2.0])
    # a basis direction: h0 * max(1, |theta_i|)
    for i, expect in enumerate((h0, 300 * h0, 2 * h0)):
        torch.testing.assert_close(
            _step_along(th, torch.eye(3)[i], None, 2), torch.tensor(expect), rtol=1e-14, atol=0
        )
    # scaling the direction scales the step inversely, so h * v is unchanged
    v = torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(
        _step_along(th, 10 * v, None, 2) * 10, _step_along(th, v, None, 2), rtol=1e-14, atol=0
    )
    # an explicit step is used as is
    assert _step_along(th, 10 * v, 1e-3, 2) == 1e-3


def test_scale_invariance_and_zero_direction():
    f, params = smooth_tree()
    v = _tree.random_like(params, torch.Generator().manual_seed(5))
    assert_close(
        fd_hvp(f, params, _tree.scale(1e3, v)), _tree.scale(1e3, fd_hvp(f, params, v)), "fd-vs-fd"
    )
    zero = fd_hvp(f, params, _tree.zeros_like(params))
    assert all(torch.equal(z, torch.zeros_like(z)) for z in _tree.tree_leaves(zero))
    zero_dd = fd_grad(
        f, params, directions=_tree.tree_map(lambda x: torch.zeros(2, *x.shape), params)
    )
    assert torch.equal(zero_dd, torch.zeros(2))


def test_large_parameters_use_a_relative_step():
    # theta ~ 1e6: a fixed absolute step h0 is dominated by rounding (u |f| / h0 ~ 1e-5 of the
    # gradient); the relative rule keeps full float64 accuracy
    f = lambda t: (t**3).sum() / 3e12  # noqa: E731
    th = torch.tensor([1e6, -2e6])
    exact = th**2 / 1e12
    assert_close(fd_grad(f, th), exact, "fd")
    naive = fd_grad(f, th, step=default_step(torch.float64))
    assert not torch.allclose(naive, exact, **tol("fd", torch.float64))


def test_float32_default_step_passes_where_naive_step_fails():
    case = zoo.case("mlp-tanh", "ce", dtype=torch.float32)
    f, params, args = case.f, case.params, case.args
    v = _tree.random_like(params, torch.Generator().manual_seed(6))
    exact = flat(hessfunc.hvp(f, params, v, *args))
    good = flat(fd_hvp(f, params, v, *args))
    naive = flat(fd_hvp(f, params, v, *args, step=1e-6))
    torch.testing.assert_close(good, exact, **tol("fd", torch.float32))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(naive, exact, **tol("fd", torch.float32))
    # same for the gradient itself
    exact_g = flat(torch.func.grad(f)(params, *args))
    torch.testing.assert_close(flat(fd_grad(f, params, *args)), exact_g, **tol("fd", torch.float32))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            flat(fd_grad(f, params, *args, step=1e-6)), exact_g, **tol("fd", torch.float32)
        )


# ----------------------------------------------------------------------------- vmap and compile


def test_fd_hvp_under_vmap_equals_loop_and_fd_hvps():
    f, params = smooth_tree()
    vs = _tree.random_like(params, torch.Generator().manual_seed(7), batch=4)
    mapped = torch.func.vmap(lambda v: fd_hvp(f, params, v))(vs)
    looped = [fd_hvp(f, params, _tree.tree_map(lambda x: x[j], vs)) for j in range(4)]
    for j in range(4):
        assert_close(_tree.tree_map(lambda x: x[j], mapped), looped[j], "fd-vs-fd")
    assert_close(fd_hvps(f, params, vs), mapped, "fd-vs-fd")


_COMPILED: dict = {}


def _compiled_fd_hvp():
    if "fn" not in _COMPILED:
        f = lambda p, x: torch.tanh(x @ p["w"] + p["b"]).pow(2).sum()  # noqa: E731
        _COMPILED["f"] = f
        _COMPILED["fn"] = torch.compile(lambda p, v, x: fd_hvp(f, p, v, x), fullgraph=True)
    return _COMPILED["f"], _COMPILED["fn"]


@pytest.mark.compile
def test_fd_hvp_compiles_fullgraph_equals_eager_without_recompiling():
    f, compiled = _compiled_fd_hvp()
    g = torch.Generator().manual_seed(8)

    def draw():
        p = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
        return p, _tree.random_like(p, g), torch.randn(5, 3, generator=g)

    p, v, x = draw()
    assert_close(compiled(p, v, x), fd_hvp(f, p, v, x), "fd-vs-fd")
    assert_close(compiled(p, v, x), hessfunc.hvp(f, p, v, x), "fd")
    p, v, x = draw()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(p, v, x)
    assert_close(out, fd_hvp(f, p, v, x), "fd-vs-fd")


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_named_errors():
    f, th, A = quadratic()
    with pytest.raises(
        ValueError, match=r"fd_hvp\(f, params, v, \*args\): v must have the pytree structure"
    ):
        fd_hvp(f, th, (th,), A)
    with pytest.raises(ValueError, match="has shape"):
        fd_hvp(f, th, torch.ones(3), A)
    with pytest.raises(TypeError, match="dtype"):
        fd_hvp(f, th, torch.ones(4, dtype=torch.float32), A)
    with pytest.raises(TypeError, match=r"fd_grad.*only floating-point"):
        fd_grad(lambda t: t.sum(), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="leading batch axis"):
        fd_hvps(f, th, torch.ones(4), A)
    with pytest.raises(ValueError, match="leading batch axis"):
        fd_grad(f, th, A, directions=torch.ones(4))
    for order in (3, 1, True, "2"):
        with pytest.raises(ValueError, match="order must be 2"):
            fd_hessian_matrix(f, th, A, order=order)
    for step in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            fd_hvp(f, th, th, A, step=step)
    for step in (torch.tensor(1e-3), True, "1e-3"):
        with pytest.raises(TypeError, match="step must be None"):
            fd_grad(f, th, A, step=step)
    with pytest.raises(ValueError, match="chunk_size"):
        fd_hvps(f, th, torch.eye(4), A, chunk_size=0)
    with pytest.raises(ValueError, match="empty pytree"):
        fd_grad(lambda p: torch.zeros(()), {})
    with pytest.raises(ValueError, match="scalar"):
        fd_grad(lambda t: t * 2, th)
    with pytest.raises(MemoryError, match="fd_hessian_matrix"):
        fd_hessian_matrix(f, th, A, max_bytes=10)


# ----------------------------------------------------------------------------- no mutation


def _snapshot(model, params):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: (p.grad, p.requires_grad) for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        {k: (v.clone(), v.requires_grad) for k, v in params.items()},
        torch.get_rng_state(),
    )


def test_nothing_is_mutated():
    case = zoo.case("cnn", "ce", n=2)
    model, params = case.model, case.params
    before = _snapshot(model, params)
    v = _tree.random_like(params, torch.Generator().manual_seed(9))
    vs = _tree.random_like(params, torch.Generator().manual_seed(9), batch=2)
    fd_grad(case.f, params, *case.args)
    fd_grad(case.f, params, *case.args, directions=vs)
    fd_hvp(case.f, params, v, *case.args)
    fd_hvps(case.f, params, vs, *case.args, order=4)
    fd_hessian_matrix(case.f, params, *case.args)
    after = _snapshot(model, params)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1] == after[1] and before[2] == after[2]
    for k in before[3]:
        assert torch.equal(before[3][k][0], after[3][k][0]) and before[3][k][1] == after[3][k][1]
    assert torch.equal(before[4], after[4])
