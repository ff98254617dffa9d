"""The second-order evaluation context: ops with unsound forward-mode AD are evaluated in
reverse mode, and missing derivatives get errors that advise only what can work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import hessfunc
from hessfunc.losses import MSELoss

MODES = ("fwd-rev", "rev-rev")
INDEX = torch.tensor([0, 0, 2, 1, 2])


def scatter_prod(x):
    base = torch.linspace(0.5, 1.5, 3)
    return torch.scatter_reduce(base, 0, INDEX, x, reduce="prod", include_self=True)


def test_scatter_reduce_prod_forward_ad_is_wrong_upstream():
    # the negative control: plain torch.func forward mode returns a zero tangent (pytorch#196702)
    x = torch.linspace(0.3, 1.2, 5)
    tangent = torch.func.jvp(scatter_prod, (x,), (torch.ones(5),))[1]
    assert float(tangent.abs().max()) == 0.0
    assert float(torch.autograd.functional.jvp(scatter_prod, x, torch.ones(5))[1].abs().max()) > 0


@pytest.mark.parametrize("mode", MODES)
def test_unsound_forward_ad_is_evaluated_in_reverse_mode(mode):
    x = torch.linspace(0.3, 1.2, 5)
    v = torch.linspace(-1.0, 1.0, 5)
    f = lambda x: scatter_prod(x).pow(2).sum()
    H = torch.autograd.functional.hessian(f, x)
    assert_close(hessfunc.hvp(f, x, v, mode=mode), H @ v)
    assert_close(hessfunc.hessian_matrix(f, x, mode=mode), H)
    # the GGN's forward mode carries J v through the model: the same op, the same route
    J = torch.autograd.functional.jacobian(scatter_prod, x)
    loss = MSELoss(torch.zeros(3), reduction="sum")
    assert_close(hessfunc.ggn_vp(lambda x: scatter_prod(x), loss, x, v, mode=mode), 2 * J.T @ J @ v)


def test_the_route_also_catches_the_tensor_method():
    x = torch.linspace(0.3, 1.2, 5)
    f = lambda x: torch.ones(3).scatter_reduce(0, INDEX, x, "prod").pow(2).sum()
    H = torch.autograd.functional.hessian(f, x)
    assert_close(hessfunc.hvp(f, x, torch.ones(5)), H.sum(1))


@pytest.mark.parametrize(
    "f, op",
    [
        (lambda x: F.hardsigmoid(x).pow(2).sum(), "hardsigmoid_backward"),
        (
            lambda w: (
                # sums and means are routed to a composite (hessfunc/_base/_pseudo.py); "max" keeps
                # torch's kernel, which has neither derivative
                F.embedding_bag(torch.tensor([0, 1, 2]), w, torch.tensor([0, 1]), mode="max")
                .pow(2)
                .sum()
            ),
            "embedding_bag",
        ),
    ],
    ids=["hardsigmoid", "embedding_bag"],
)
def test_ops_without_second_derivatives_get_errors_that_do_not_promise_the_other_mode(f, op):
    p = torch.randn(4, 3)
    with pytest.raises(NotImplementedError) as fwd:
        hessfunc.hvp(f, p, torch.ones_like(p))
    with pytest.raises(NotImplementedError) as rev:
        hessfunc.hvp(f, p, torch.ones_like(p), mode="rev-rev")
    for err, needs in ((fwd, "forward-mode AD"), (rev, "double backward")):
        msg = str(err.value)
        assert msg.startswith("hessfunc.hvp(f, params, v, *args)") and op in msg, msg
        assert f"no {needs}" in msg
        assert "works if the op has" in msg and "hessfunc.check_hvp" in msg
        assert "same result" not in msg


@pytest.mark.parametrize("op", ["cholesky_inverse", "cholesky_solve", "logcumsumexp"])
def test_ops_with_inexact_forward_mode_are_exact_through_every_product(op):
    g = torch.Generator().manual_seed(0)
    L = torch.tril(torch.randn(4, 4, generator=g)) + 3 * torch.eye(4)
    b = torch.randn(4, 2, generator=g)
    model = {
        "cholesky_inverse": lambda L: torch.cholesky_inverse(torch.tril(L)),
        "cholesky_solve": lambda L: torch.cholesky_solve(b, torch.tril(L)),
        "logcumsumexp": lambda L: torch.logcumsumexp(L, 0),
    }[op]
    f = lambda L: model(L).pow(2).sum()
    H = torch.autograd.functional.hessian(f, L).reshape(16, 16)
    v = torch.randn(4, 4, generator=g)
    assert_close(hessfunc.hvp(f, L, v), (H @ v.reshape(-1)).reshape(4, 4))
    J = torch.autograd.functional.jacobian(model, L).reshape(-1, 16)
    loss = MSELoss(torch.zeros_like(model(L)), reduction="sum")
    assert_close(hessfunc.ggn_vp(model, loss, L, v), (2 * J.T @ J @ v.reshape(-1)).reshape(4, 4))


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_masked_select_with_a_broadcast_mask_is_exact_in_batched_products(mode):
    """vmap batches masked_select's backward wrongly when the mask broadcasts the input (rows of
    zeros or of the wrong shape in rev-rev); routed through expand, every product is exact."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, dtype=torch.float64, generator=g)
    mask = torch.rand(10, 10, generator=g) > 0.5
    w = torch.randn(int(mask.sum()), dtype=torch.float64, generator=g)
    f = lambda x: (w * torch.masked_select(x, mask)).sum() + x.masked_select(mask).pow(3).sum()
    H = torch.autograd.functional.hessian(f, x)
    assert_close(hessfunc.hessian_matrix(f, x, mode=mode), H)
    vs = torch.randn(3, 10, dtype=torch.float64, generator=g)
    assert_close(hessfunc.hvps(f, x, vs, mode=mode), vs @ H)


def test_a_batched_product_of_the_wrong_shape_is_an_error():
    from hessfunc._base import _checks

    like = {"w": torch.zeros(4)}
    _checks.check_batched("hessfunc.hvps(f, params, vs, *args)", {"w": torch.ones(3, 4)}, like, 3)
    with pytest.raises(NotImplementedError, match=r"hessfunc.hvps.*shape \(10, 4\) instead of"):
        _checks.check_batched(
            "hessfunc.hvps(f, params, vs, *args)", {"w": torch.ones(10, 4)}, like, 3
        )


def test_dynamo_is_told_to_route_the_private_kernels():
    """Dynamo dispatches torch function modes only for the functions in its overridable set,
    which leaves out private ones (torch._weight_norm, ...); hessfunc adds every plain function
    it routes or checks while compiling (the compiled case is in the compile zoo)."""
    from torch._dynamo.variables.torch import get_overridable_functions

    from hessfunc._base import _context, _decomp

    assert _context._dynamo_dispatches_routes()
    routed = get_overridable_functions()
    for fn in (torch._weight_norm, torch._weight_norm_interface, torch._fused_rms_norm):
        assert fn in _decomp.ROUTES and fn in routed
    assert torch._native_batch_norm_legit in routed


def test_importing_hessfunc_does_not_import_dynamo():
    import subprocess
    import sys

    code = "import sys, hessfunc; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_dot_and_vdot_are_exact_through_the_route(mode):
    g = torch.Generator().manual_seed(4)
    u, w0 = (
        torch.randn(5, dtype=torch.float64, generator=g),
        torch.randn(5, dtype=torch.float64, generator=g),
    )
    f = lambda w: torch.dot(u, w).pow(3) + w.vdot(w * u).sin()
    H = torch.autograd.functional.hessian(f, w0)
    v = torch.randn(5, dtype=torch.float64, generator=g)
    assert_close(hessfunc.hvp(f, w0, v, mode=mode), H @ v)
