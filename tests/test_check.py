"""Checkers: pass on correct functions, fail with the right diagnosis on broken
autograd.Functions."""

from __future__ import annotations

import pytest
import torch
import zoo
from conftest import assert_close, tol
from hypothesis import given, settings

import hessfunc
from hessfunc._base import _tree
from hessfunc.checking.check import TOLERANCES, CheckReport, check_grad, check_hessian, check_hvp
from hessfunc.products.fd import default_step
from hessfunc.testing import models


# functorch-compatible autograd.Functions (forward without ctx, setup_context, vmap rule)
class Sin(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * torch.cos(x)


class WrongBackward(Sin):
    """The backward formula is wrong: 1.5 cos(x) instead of cos(x)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 1.5 * g * torch.cos(x)


class DetachedBackward(Sin):
    """The backward is right but not differentiable: its own derivative is lost."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x).detach()


class WrongJvp(Sin):
    """Backward right and differentiable; the forward-mode rule is wrong."""

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * t * torch.cos(x)


class NoJvp(torch.autograd.Function):
    generate_vmap_rule = True
    forward, setup_context, backward = Sin.forward, Sin.setup_context, Sin.backward


def problem(fn):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=g)
    params = {"w": torch.randn(3, generator=g), "b": torch.randn((), generator=g)}

    def f(p, A):
        return (fn.apply(A @ p["w"] + p["b"]) ** 2).sum()

    return f, params, (A,)


# ----------------------------------------------------------------------------- correct functions


def test_correct_function_passes_every_checker_with_a_full_report():
    f, params, args = problem(Sin)
    for checker, names in (
        (check_grad, {"grad"}),
        (check_hvp, {"grad", "hvp[fwd-rev]", "hvp[rev-rev]", "symmetry"}),
        (
            check_hessian,
            {"grad", "hessian[fwd-rev]", "hessian[rev-rev]", "symmetry", "matrix-vs-hvp"},
        ),
    ):
        report = checker(f, params, *args)
        assert isinstance(report, CheckReport) and report.ok and report.message == ""
        assert set(report.errors) == names
        assert all(0 <= e <= 1e-8 for e in report.errors.values())  # FD at u^(2/3), exact ~u
        assert report.step == default_step(torch.float64)
        assert (report.rtol, report.atol) == (
            TOLERANCES[torch.float64]["rtol"],
            TOLERANCES[torch.float64]["atol"],
        )
        norms = sum(x.reshape(3, -1).pow(2).sum(1) for x in _tree.tree_leaves(report.directions))
        assert_close(norms, torch.ones(3))


@pytest.mark.parametrize("name", ["mlp-gelu", "transformer"])
def test_checkers_pass_on_zoo(name):
    case = zoo.case(name, "ce")
    check_hvp(case.f, case.params, *case.args)
    if name == "mlp-gelu":
        check_hessian(case.f, case.params, *case.args, modes=("rev-rev",))


@settings(max_examples=8)
@given(problem=models())
def test_checkers_pass_on_generated_models(problem):
    f, params, args = problem
    assert check_hvp(f, params, *args, n_directions=2).ok


# ----------------------------------------------------------------------------- broken functions


def test_wrong_backward_fails_check_grad_with_diagnosis():
    f, params, args = problem(WrongBackward)
    with pytest.raises(
        AssertionError, match="gradient of f disagrees with finite differences"
    ) as err:
        check_grad(f, params, *args)
    assert "grad: max relative error" in str(err.value)
    report = check_grad(f, params, *args, raise_on_fail=False)
    assert not report.ok and report.errors["grad"] > 0.1


def test_non_differentiable_backward_passes_check_grad_fails_check_hvp():
    f, params, args = problem(DetachedBackward)
    assert check_grad(f, params, *args).ok
    with pytest.raises(AssertionError) as err:
        check_hvp(f, params, *args)
    msg = str(err.value)
    assert (
        "the HVP disagrees with finite differences of the gradient while the gradient itself "
        "is right" in msg
    )
    assert ".detach()" in msg
    report = check_hvp(f, params, *args, raise_on_fail=False)
    assert report.errors["grad"] <= report.rtol
    assert report.errors["hvp[fwd-rev]"] > 0.01 and report.errors["hvp[rev-rev]"] > 0.01
    with pytest.raises(AssertionError, match="the Hessian disagrees"):
        check_hessian(f, params, *args)
    # the broken HVP agrees with neither the exact Hessian of sin nor itself at FD level
    assert not torch.allclose(
        hessfunc.hessian_matrix(f, params, *args),
        hessfunc.hessian_matrix(problem(Sin)[0], params, *args),
    )


def test_wrong_jvp_rule_is_blamed_on_forward_mode():
    f, params, args = problem(WrongJvp)
    report = check_hvp(f, params, *args, raise_on_fail=False)
    assert report.errors["hvp[rev-rev]"] <= report.rtol < report.errors["hvp[fwd-rev]"]
    assert "forward-mode (jvp) rule" in report.message and "mode='rev-rev'" in report.message
    assert check_hvp(f, params, *args, modes=("rev-rev",)).ok


def test_missing_forward_ad_is_reported_not_raised():
    f, params, args = problem(NoJvp)
    report = check_hvp(f, params, *args, raise_on_fail=False)
    assert report.errors["hvp[fwd-rev]"] == float("inf")
    assert report.errors["hvp[rev-rev]"] <= report.rtol
    assert "raised" in report.message
    assert check_hvp(f, params, *args, modes="rev-rev").ok


def test_symmetry_check_catches_a_non_symmetric_second_derivative():
    # backward returns the true gradient at theta0 plus K (x - x0) with K antisymmetric: first
    # derivatives are right at theta0, the Jacobian of the gradient is not symmetric there
    x0 = torch.tensor([0.3, -0.5, 1.1])
    K = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 2.0], [0.0, -2.0, 0.0]])

    class Skew(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return (x**2).sum()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (2 * x + K @ (x - x0))

    report = check_hvp(lambda t: Skew.apply(t), x0.clone(), modes=("rev-rev",), raise_on_fail=False)
    assert report.errors["grad"] <= report.rtol
    assert report.errors["symmetry"] > 0.1
    report = check_hessian(
        lambda t: Skew.apply(t), x0.clone(), modes=("rev-rev",), raise_on_fail=False
    )
    assert report.errors["symmetry"] > 0.1


# ----------------------------------------------------------------------------- float32 and steps


def test_float32_default_step_passes_where_naive_step_fails():
    case = zoo.case("mlp-tanh", "ce", dtype=torch.float32)
    report = check_hvp(case.f, case.params, *case.args)
    assert report.ok and report.rtol == tol("fd", torch.float32)["rtol"]
    naive = check_hvp(case.f, case.params, *case.args, step=1e-6, raise_on_fail=False)
    assert not naive.ok and naive.errors["hvp[rev-rev]"] > naive.rtol
    assert check_grad(case.f, case.params, *case.args).ok
    assert not check_grad(case.f, case.params, *case.args, step=1e-6, raise_on_fail=False).ok


def test_tolerance_override_and_order4():
    f, params, args = problem(Sin)
    strict = check_hvp(f, params, *args, rtol=1e-14, atol=0.0, raise_on_fail=False)
    assert not strict.ok and strict.rtol == 1e-14  # FD error ~1e-10 is above 1e-14
    rich = check_hvp(f, params, *args, order=4)
    assert rich.ok and rich.step == default_step(torch.float64, 4)


# ----------------------------------------------------------------------------- randomness, errors


def test_directions_come_from_the_generator_only():
    f, params, args = problem(Sin)
    state = torch.get_rng_state()
    a = check_grad(f, params, *args, generator=torch.Generator().manual_seed(5))
    b = check_grad(f, params, *args, generator=torch.Generator().manual_seed(5))
    c = check_grad(f, params, *args)  # None: a fixed-seed generator
    d = check_grad(f, params, *args)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(a.directions, b.directions)
    assert_close(c.directions, d.directions)
    assert not torch.equal(a.directions["w"], c.directions["w"])


def test_bad_arguments():
    f, params, args = problem(Sin)
    with pytest.raises(ValueError, match=r"check_hvp\(f, params, \*args\): n_directions"):
        check_hvp(f, params, *args, n_directions=0)
    with pytest.raises(TypeError, match="generator must be None"):
        check_grad(f, params, *args, generator=0)
    with pytest.raises(ValueError, match="unknown mode"):
        check_hvp(f, params, *args, modes=("fwd-fwd",))
    with pytest.raises(ValueError, match="rtol must be positive"):
        check_grad(f, params, *args, rtol=0.0)
    with pytest.raises(ValueError, match="order must be 2"):
        check_hessian(f, params, *args, order=3)
    with pytest.raises(ValueError, match="no default tolerance"):
        check_grad(lambda t: t.sum(), torch.ones(2, dtype=torch.float16))


def test_checkers_mutate_nothing():
    case = zoo.case("cnn", "ce", n=2)
    model = case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [
        (m.training, [(p.requires_grad, p.grad) for p in m.parameters(recurse=False)])
        for m in model.modules()
    ]
    params = {k: v.clone() for k, v in case.params.items()}
    rng = torch.get_rng_state()
    check_hvp(case.f, case.params, *case.args, modes=("rev-rev",), n_directions=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == [
        (m.training, [(p.requires_grad, p.grad) for p in m.parameters(recurse=False)])
        for m in model.modules()
    ]
    assert all(torch.equal(params[k], v) for k, v in case.params.items())
    assert torch.equal(rng, torch.get_rng_state())
