"""GGN products against dense J^T H J references, the Hessian of linear models, PSD properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo
from conftest import assert_close, tol
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessfunc
from hessfunc import losses
from hessfunc._base import _tree
from hessfunc.products.ggn import ggn_matrix, ggn_vp, ggn_vps


def dense_ggn(model_fn, loss_fn, params, *args) -> torch.Tensor:
    """J^T H J with J from autograd.functional.jacobian and H from autograd.functional.hessian."""
    flat, unravel = _tree.ravel(params)
    with sdpa_kernel(SDPBackend.MATH):
        out = model_fn(params, *args)
        oflat, ounravel = _tree.ravel(out)
        jac = torch.autograd.functional.jacobian(
            lambda z: _tree.ravel(model_fn(unravel(z), *args))[0], flat
        )
        hess = torch.autograd.functional.hessian(lambda o: loss_fn(ounravel(o)), oflat)
    return jac.T @ hess @ jac


def problem(model_name: str, loss_name: str, n: int = 4):
    """``(model_fn, loss object or callable, params, args)`` on the zoo's models."""
    model = zoo.build_model(model_name, torch.float64)
    apply, params = hessfunc.from_module(model)
    x = zoo._inputs(model_name, n, torch.float64)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(n, 3, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    loss = {
        "ce": losses.CrossEntropyLoss(labels),
        "ce_smooth_sum": losses.CrossEntropyLoss(labels, label_smoothing=0.1, reduction="sum"),
        "mse": losses.MSELoss(y),
        "bce": losses.BCEWithLogitsLoss(torch.sigmoid(y)),
        "callable_logcosh": lambda o: torch.log(torch.cosh(o - y)).sum() / n,
        "callable_mse": lambda o: F.mse_loss(o, y),  # jvp(grad(mse_loss)) would fail: #123996
    }[loss_name]
    return apply, loss, params, (x,)


PROBLEMS = [
    ("mlp-tanh", "ce"),
    ("mlp-gelu", "mse"),
    ("mlp-softplus", "bce"),
    ("mlp-tanh", "callable_logcosh"),
    ("mlp-relu", "callable_mse"),
    ("cnn", "ce_smooth_sum"),
    ("cnn", "mse"),
    ("transformer", "ce"),
    ("transformer", "callable_logcosh"),
]


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("model_name,loss_name", PROBLEMS)
def test_ggn_vp_matches_dense_reference(model_name, loss_name, mode):
    model_fn, loss, params, args = problem(model_name, loss_name)
    G = dense_ggn(model_fn, loss, params, *args)
    v = _tree.random_like(params, torch.Generator().manual_seed(1))
    gv = ggn_vp(model_fn, loss, params, v, *args, mode=mode)
    assert_close(_tree.ravel(gv)[0], G @ _tree.ravel(v)[0])
    assert _tree.tree_structure(gv) == _tree.tree_structure(params)
    # the GGN is not the Hessian for these non-linear models: the residual term is non-zero
    hv = hessfunc.hvp(lambda p, x: loss(model_fn(p, x)), params, v, *args)
    assert (_tree.ravel(hv)[0] - _tree.ravel(gv)[0]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "model_name,loss_name", [("mlp-tanh", "ce"), ("cnn", "mse"), ("mlp-gelu", "callable_logcosh")]
)
def test_ggn_matrix_and_vps_match_reference(model_name, loss_name):
    model_fn, loss, params, args = problem(model_name, loss_name)
    G = dense_ggn(model_fn, loss, params, *args)
    assert_close(ggn_matrix(model_fn, loss, params, *args), G)
    assert_close(ggn_matrix(model_fn, loss, params, *args, chunk_size=7, mode="rev-rev"), G)
    vs = _tree.random_like(params, torch.Generator().manual_seed(2), batch=3)
    out = ggn_vps(model_fn, loss, params, vs, *args, chunk_size=2)
    flat_vs = torch.func.vmap(lambda t: _tree.ravel(t)[0])(vs)
    flat_out = torch.func.vmap(lambda t: _tree.ravel(t)[0])(out)
    assert_close(flat_out, flat_vs @ G)


@pytest.mark.parametrize(
    "loss",
    [
        losses.MSELoss(
            torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), reduction="sum"
        ),
        losses.CrossEntropyLoss(torch.tensor([0, 2, 1, 1, 0, 2]), label_smoothing=0.2),
        losses.BCEWithLogitsLoss(torch.rand(6, 3, generator=torch.Generator().manual_seed(0))),
        losses.GaussianNLLLoss(torch.zeros(6, 3), torch.full((6,), 0.5)),
    ],
    ids=["mse", "ce", "bce", "gauss"],
)
def test_linear_model_ggn_equals_hessian(loss):
    """No residual term when the model is linear in params: G = H (any loss)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 4, generator=g)
    params = {"W": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}
    model_fn = lambda p, X: X @ p["W"].T + p["b"]  # noqa: E731
    G = ggn_matrix(model_fn, loss, params, X)
    H = hessfunc.hessian_matrix(lambda p, X: loss(model_fn(p, X)), params, X)
    assert_close(G, H)
    assert G.abs().max() > 1e-2


def test_nll_on_log_probabilities_has_zero_ggn_while_ce_on_logits_does_not():
    model_fn, _, params, args = problem("mlp-tanh", "ce")
    labels = torch.tensor([0, 1, 2, 1])
    v = _tree.random_like(params, torch.Generator().manual_seed(4))
    logp_fn = lambda p, x: torch.log_softmax(model_fn(p, x), -1)  # noqa: E731
    zero = ggn_vp(logp_fn, losses.NLLLoss(labels), params, v, *args)
    assert all(torch.count_nonzero(leaf) == 0 for leaf in _tree.tree_leaves(zero))
    # CE on logits: same loss value, non-zero GGN (the log_softmax curvature is in the loss)
    ce = ggn_vp(model_fn, losses.CrossEntropyLoss(labels), params, v, *args)
    assert _tree.vdot(v, ce) > 1e-3


def test_predicted_variance_makes_ggn_indefinite():
    """A predicted variance makes the Gaussian NLL non-convex in the outputs: G is indefinite."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(8, 2, generator=g)
    params = {"wm": torch.randn(2, 1, generator=g), "wv": 0.1 * torch.randn(2, 1, generator=g)}
    # small residuals against a variance near 0.7: d^2/ds^2 = -1/(2s^2) + d^2/s^3 < 0
    y = X @ params["wm"] + 0.05 * torch.randn(8, 1, generator=g)
    model_fn = lambda p, X: (X @ p["wm"], F.softplus(X @ p["wv"]))  # noqa: E731
    loss = losses.GaussianNLLLoss(y, None)
    G = ggn_matrix(model_fn, loss, params, X)
    assert_close(G, dense_ggn(model_fn, loss, params, X))
    assert torch.linalg.eigvalsh(G).min() < -1e-3


def test_pytree_outputs_with_a_callable_loss():
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    params = (torch.randn(3, generator=g), {"s": torch.randn((), generator=g)})
    model_fn = lambda p, X: {"pred": torch.tanh(X @ p[0]), "scale": p[1]["s"] * X.sum(1)}  # noqa: E731
    loss_fn = lambda o: ((o["pred"] - y) ** 2 * torch.exp(o["scale"])).mean()  # noqa: E731
    v = _tree.random_like(params, g)
    G = dense_ggn(model_fn, loss_fn, params, X)
    assert_close(_tree.ravel(ggn_vp(model_fn, loss_fn, params, v, X))[0], G @ _tree.ravel(v)[0])


CONVEX = ("mse", "ce", "bce", "ce_probs")


@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    act=st.sampled_from(sorted(zoo.ACTIVATIONS)),
    loss_name=st.sampled_from(CONVEX),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_ggn_is_psd_for_convex_losses(widths, act, loss_name, n, seed):
    """v^T G v = (Jv)^T H (Jv) >= 0, and <u, G v> = <G u, v>, on random MLPs."""
    C = 3
    model = zoo.mlp((2, *widths, C), act=act, seed=seed)
    apply, params = hessfunc.from_module(model)
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, 2, generator=g)
    loss = {
        "mse": losses.MSELoss(torch.randn(n, C, generator=g)),
        "ce": losses.CrossEntropyLoss(torch.randint(0, C, (n,), generator=g), label_smoothing=0.1),
        "bce": losses.BCEWithLogitsLoss(torch.rand(n, C, generator=g)),
        "ce_probs": losses.CrossEntropyLoss(torch.rand(n, C, generator=g), reduction="sum"),
    }[loss_name]
    u, v = _tree.random_like(params, g), _tree.random_like(params, g)
    gv, gu = ggn_vp(apply, loss, params, v, x), ggn_vp(apply, loss, params, u, x)
    atol = tol("exact", torch.float64)["atol"]
    assert _tree.vdot(v, gv) >= -atol * (1 + _tree.vdot(v, v))
    torch.testing.assert_close(_tree.vdot(u, gv), _tree.vdot(gu, v), **tol("exact", torch.float64))


def test_nothing_is_mutated():
    model = zoo.cnn()
    apply, params = hessfunc.from_module(model)
    x = zoo._inputs("cnn", 3, torch.float64)
    loss = losses.CrossEntropyLoss(torch.tensor([0, 1, 2]))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    copies = {k: t.clone() for k, t in params.items()}
    rng = torch.get_rng_state()
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    vs = _tree.random_like(params, torch.Generator().manual_seed(0), batch=2)
    ggn_vp(apply, loss, params, v, x)
    ggn_vps(apply, loss, params, vs, x, mode="rev-rev")
    ggn_matrix(apply, lambda o: loss(o), params, x, chunk_size=50)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(params[k], copies[k]) for k in params)


def test_bad_input_raises_clear_errors():
    model_fn, loss, params, args = problem("mlp-tanh", "ce")
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    where = r"hessfunc.ggn_vp\(model_fn, loss_fn, params, v, \*args\)"
    bad_v = dict(v)
    bad_v["0.weight"] = bad_v["0.weight"][:, :2]
    with pytest.raises(ValueError, match=where + r".*v\['0.weight'\] has shape"):
        ggn_vp(model_fn, loss, params, bad_v, *args)
    with pytest.raises(TypeError, match=r"dtype torch.int64"):
        ggn_vp(model_fn, loss, {**params, "0.bias": params["0.bias"].long()}, v, *args)
    with pytest.raises(ValueError, match="unknown mode='fwd-fwd'"):
        ggn_vp(model_fn, loss, params, v, *args, mode="fwd-fwd")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        ggn_vp(model_fn, "ce", params, v, *args)
    with pytest.raises(TypeError, match="model_fn must be callable"):
        ggn_vp(None, loss, params, v, *args)
    with pytest.raises(ValueError, match="must return a scalar"):
        ggn_vp(model_fn, lambda o: o.sum(0), params, v, *args)
    # outputs that do not fit the loss's targets: 4 samples, 6 labels
    with pytest.raises(ValueError, match=r"CrossEntropyLoss.*outputs have shape \(4, 3\).*\(6,\)"):
        ggn_vp(
            model_fn, losses.CrossEntropyLoss(torch.zeros(6, dtype=torch.long)), params, v, *args
        )
    with pytest.raises(ValueError, match="leading batch axis"):
        ggn_vps(model_fn, loss, params, v, *args)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        ggn_vps(model_fn, loss, params, v, *args, chunk_size=0)
    with pytest.raises(MemoryError, match=r"hessfunc.ggn_matrix.*max_bytes"):
        ggn_matrix(model_fn, loss, params, *args, max_bytes=100)


# -------------------------------------------------------------------------------- compile

_COMPILED: dict[str, object] = {}


def _compiled_step():
    """One compiled function shared by the compile tests: loss object built inside the trace."""
    if "step" not in _COMPILED:

        def step(params, v, x, labels):
            return ggn_vp(
                zoo_apply, losses.CrossEntropyLoss(labels, label_smoothing=0.1), params, v, x
            )

        _COMPILED["step"] = torch.compile(step, fullgraph=True)
    return _COMPILED["step"]


zoo_apply, zoo_params = hessfunc.from_module(zoo.mlp((4, 6, 3), act="tanh"))


@pytest.mark.compile
def test_compiled_ggn_vp_matches_eager_without_recompiling():
    torch._dynamo.reset()
    _COMPILED.clear()
    step = _compiled_step()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # second call: new tensors, same shapes
        x, labels = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
        v = _tree.random_like(zoo_params, g)
        params = _tree.tree_map(lambda t: t + 0.1 * torch.randn(t.shape, generator=g), zoo_params)
        with torch._dynamo.config.patch(error_on_recompile=True) if _ else _nullcontext():
            got = step(params, v, x, labels)
        want = ggn_vp(zoo_apply, losses.CrossEntropyLoss(labels, label_smoothing=0.1), params, v, x)
        assert_close(got, want)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
