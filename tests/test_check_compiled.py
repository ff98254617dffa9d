"""check_compiled: catches a real miscompile, passes sound functions, names the leaf."""

from __future__ import annotations

import pytest
import test_upstream
import torch
import zoo

import hessfunc
from hessfunc._base import _tree
from hessfunc.checking.check_compiled import _leaf_error
from hessfunc.losses import CrossEntropyLoss

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def _one_thread_float32():
    old_t, old_d = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(old_t)
    torch.set_default_dtype(old_d)


def test_catches_the_upstream_miscompile():
    if not test_upstream.miscompiled():
        pytest.skip("this torch compiles the reproduction right; nothing to catch")
    W, V, x = test_upstream.inputs()
    with pytest.raises(AssertionError, match=r"(?s)check_compiled.*relative error.*aot_eager"):
        hessfunc.check_compiled(test_upstream.forward_over_reverse, W, V, x)
    report = hessfunc.check_compiled(
        test_upstream.forward_over_reverse, W, V, x, raise_on_fail=False
    )
    assert not report.ok and report.errors["<root>"] > 1e-2
    assert "output<root>" in report.message
    # the same function without inductor's generated kernels passes
    assert hessfunc.check_compiled(
        test_upstream.forward_over_reverse, W, V, x, backend="aot_eager"
    ).ok


def test_passes_hessfunc_products_on_zoo_models():
    c = zoo.case("mlp-tanh", "ce", dtype=torch.float32)
    apply, _ = hessfunc.from_module(c.model)
    v = _tree.random_like(c.params, torch.Generator().manual_seed(0))
    x, y = c.args

    def step(p, v, x, y):  # a pytree of results: the HVP, a GGN product, a loss value
        return {
            "hvp": hessfunc.hvp(c.f, p, v, x, y),
            "ggn": hessfunc.ggn_vp(apply, CrossEntropyLoss(y), p, v, x),
            "loss": (c.f(p, x, y), y.sum()),
        }

    report = hessfunc.check_compiled(step, c.params, v, x, y)
    assert report.ok and report.message == ""
    assert set(report.errors) >= {"['hvp']['0.weight']", "['loss'][0]", "['loss'][1]"}
    assert max(report.errors.values()) < 1e-5  # float32 rounding only
    assert report.step is None and report.directions is None and report.rtol == 1e-3


def test_checks_an_already_compiled_function_and_runs_it_once_on_the_given_args():
    calls = []

    def update(p, g):  # an in-place step, as an optimiser makes
        calls.append(1)
        p.sub_(0.1 * g)
        return p.sum()

    p, g = torch.ones(3), torch.arange(3.0)
    compiled = torch.compile(update, fullgraph=True)
    assert hessfunc.check_compiled(compiled, p, g).ok
    # the compiled call updated p once; the eager reference worked on a copy
    torch.testing.assert_close(p, torch.ones(3) - 0.1 * torch.arange(3.0))
    with pytest.raises(ValueError, match="already compiled"):
        hessfunc.check_compiled(compiled, p, g, backend="aot_eager")


def test_leaf_error_measure():
    b = torch.tensor([3.0, 4.0])
    assert _leaf_error(b, b, 1e-3, 1e-6) == 0.0
    assert _leaf_error(b + torch.tensor([0.0, 0.5]), b, 1e-3, 0.0) == pytest.approx(0.1)
    # integer leaves, shapes and dtypes compare exactly; NaN in the same place is equal
    assert _leaf_error(torch.tensor([1, 2]), torch.tensor([1, 3]), 1e-3, 0.0) == float("inf")
    assert _leaf_error(b.double(), b, 1e-3, 0.0) == float("inf")
    nan = torch.tensor([float("nan"), 1.0])
    assert _leaf_error(nan.clone(), nan, 1e-3, 0.0) == 0.0
    assert _leaf_error(torch.tensor([0.0, 1.0]), nan, 1e-3, 0.0) == float("inf")
    assert _leaf_error(3, 3, 1e-3, 0.0) == 0.0 and _leaf_error(3, 4, 1e-3, 0.0) == float("inf")


def test_bad_tolerance_is_refused():
    with pytest.raises(TypeError, match="rtol must be None or a float"):
        hessfunc.check_compiled(torch.sin, torch.ones(2), rtol="1e-3")
