"""The Hypothesis strategies in hessfunc.testing: valid draws, and properties built on them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree
from hessfunc.testing import (
    KINKED_LOSSES,
    SMOOTH_LOSSES,
    Loss,
    Problem,
    directions_like,
    losses,
    models,
    pytrees,
    tree_problems,
)


def test_package_import_does_not_import_hypothesis_testing():
    code = (
        "import sys, hessfunc; "
        "print('hessfunc.testing' in sys.modules, 'hypothesis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@given(tree=pytrees(dtypes=(torch.float32, torch.float64), max_leaves=6, max_ndim=2, max_side=4))
def test_pytrees_are_valid_parameter_trees(tree):
    leaves = _tree.tree_leaves(tree)
    assert 1 <= len(leaves) <= 6
    for leaf in leaves:
        assert isinstance(leaf, torch.Tensor) and leaf.dtype in (torch.float32, torch.float64)
        assert leaf.dim() <= 2 and all(1 <= s <= 4 for s in leaf.shape)
    # ravel round trip preserves the tree exactly
    flat, unravel = hessfunc.ravel(tree)
    assert flat.numel() == sum(leaf.numel() for leaf in leaves)
    assert_close(unravel(flat), tree)


def test_pytrees_reach_edge_cases():
    seen = {"bare": False, "zero_d": False, "nested": False, "tuple": False}

    @given(pytrees())
    def collect(tree):
        seen["bare"] |= isinstance(tree, torch.Tensor)
        seen["zero_d"] |= any(leaf.dim() == 0 for leaf in _tree.tree_leaves(tree))
        seen["tuple"] |= isinstance(tree, tuple)
        seen["nested"] |= isinstance(tree, dict) and any(
            isinstance(c, (dict, list, tuple)) for c in tree.values()
        )

    from hypothesis import settings

    settings(max_examples=200, derandomize=True, database=None)(collect)()
    assert all(seen.values()), seen


@given(data=st.data(), tree=pytrees(), batch=st.one_of(st.none(), st.integers(1, 3)))
def test_directions_like_matches_structure(data, tree, batch):
    v = data.draw(directions_like(tree, batch=batch))
    assert _tree.tree_structure(v) == _tree.tree_structure(tree)
    for a, b in zip(_tree.tree_leaves(v), _tree.tree_leaves(tree), strict=True):
        assert a.shape == (b.shape if batch is None else (batch, *b.shape)) and a.dtype == b.dtype
    if batch is not None:
        hessfunc.hvps(lambda p: _tree.vdot(p, p), tree, v)  # accepted as a batch of directions


def test_directions_like_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        directions_like(torch.zeros(2), kind="uniform")


@given(
    loss=losses(smooth=False), n=st.integers(1, 4), c=st.integers(2, 4), seed=st.integers(0, 100)
)
def test_losses_give_scalars_with_their_targets(loss, n, c, seed):
    assert isinstance(loss, Loss) and loss.name in SMOOTH_LOSSES | KINKED_LOSSES
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, c, generator=g)
    value = loss.fn(out, loss.target((n, c), torch.float64, g))
    assert value.shape == () and torch.isfinite(value)


def test_losses_are_zero_or_minimal_at_their_targets():
    # closed forms: mse and log-cosh vanish at out == y, and are positive elsewhere
    y = torch.tensor([[0.5, -1.0]])
    for name in ("mse", "log_cosh"):
        fn = SMOOTH_LOSSES[name].fn
        assert_close(fn(y, y), torch.tensor(0.0))
        assert fn(y + 0.1, y) > 0
    # log-cosh(d) ~ d^2 / 2 for small d
    assert_close(SMOOTH_LOSSES["log_cosh"].fn(y + 1e-4, y), torch.tensor(0.5e-8), "fd")


@given(problem=models())
def test_models_are_problems_with_scalar_losses(problem):
    assert isinstance(problem, Problem)
    f, params, args = problem
    value = f(params, *args)
    assert value.shape == () and value.dtype == torch.float64 and torch.isfinite(value)
    assert "+" in f.__name__  # "<model>+<loss>"


@given(problem=models(kinds=("mlp",), dtype=torch.float32))
def test_models_respect_dtype(problem):
    f, params, args = problem
    assert all(leaf.dtype == torch.float32 for leaf in _tree.tree_leaves(params))
    assert f(params, *args).dtype == torch.float32


def test_models_reject_unknown_kinds():
    with pytest.raises(ValueError, match="kinds"):
        models(kinds=("rnn",))


@given(problem=models(), data=st.data())
def test_property_symmetry_on_generated_models(problem, data):
    # <u, Hv> = <Hu, v>: a property that fails on a wrong sign or a dropped cross term
    f, params, args = problem
    u, v = data.draw(directions_like(params)), data.draw(directions_like(params))
    hu, hv = hessfunc.hvp(f, params, u, *args), hessfunc.hvp(f, params, v, *args)
    assert_close(_tree.vdot(u, hv), _tree.vdot(hu, v))


@given(problem=tree_problems())
def test_tree_problem_hessian_has_the_closed_form(problem):
    # f = sum sin(w x) + tanh(<u, x>)^2 / 2: H = diag(-w^2 sin(w x)) + c u u^T,
    # c = (1 - t^2)(1 - 3 t^2), t = tanh(<u, x>)
    f, params, (w, u) = problem
    x, wf, uf = (_tree.ravel(t)[0] for t in (params, w, u))
    t = torch.tanh(uf @ x)
    expected = torch.diag(-(wf**2) * torch.sin(wf * x)) + (1 - t**2) * (1 - 3 * t**2) * torch.outer(
        uf, uf
    )
    assert_close(hessfunc.hessian_matrix(f, params, w, u), expected)


def test_module_docstring_example_runs():
    # the README example: a property test of a user's own model
    import hessfunc.testing as testing

    src = testing.__doc__.split("::", 1)[1]
    code = "\n".join(line[8:] for line in src.splitlines() if line.strip())
    net = "class MyNet(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    net += "        self.l = torch.nn.Linear(10, 3)\n"
    net += "    def forward(self, x):\n        return self.l(torch.tanh(x))\n"
    code = code.replace(
        "from hessfunc.testing import losses\n", "from hessfunc.testing import losses\n" + net
    )
    scope: dict = {}
    exec(compile(code, "<docstring>", "exec"), scope)
    from hypothesis import settings

    # check_hvp inside the example raises AssertionError when an HVP disagrees with FD
    settings(max_examples=5, deadline=None, database=None)(scope["test_my_net_hvp"])()
    # and the names the example sets up give a passing report on the example's model
    x = torch.randn(2, 10, dtype=torch.float64)
    f = lambda p, x: scope["apply"](p, x).pow(2).sum()  # noqa: E731
    report = scope["check_hvp"](f, scope["params"], x, raise_on_fail=False)
    assert report.ok, report.message
