"""Fisher products against per-sample gradient loops; the MC Fisher converges to the GGN."""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from conftest import assert_close, tol

import hessfunc
from hessfunc import losses
from hessfunc._base import _tree
from hessfunc.products.fisher import fisher_vp, per_sample_grads
from hessfunc.products.ggn import ggn_vp

N = 5


def problem(model_name: str, loss_name: str):
    model = zoo.build_model(model_name, torch.float64)
    apply, params = hessfunc.from_module(model)
    x = zoo._inputs(model_name, N, torch.float64)
    g = torch.Generator().manual_seed(11)
    y = torch.randn(N, 3, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    model_fn = apply
    loss = {
        "ce": losses.CrossEntropyLoss(labels),
        "ce_smooth_sum": losses.CrossEntropyLoss(labels, label_smoothing=0.1, reduction="sum"),
        "mse": losses.MSELoss(y),
        "bce": losses.BCEWithLogitsLoss(torch.rand(N, 3, generator=g)),
        "gauss": losses.GaussianNLLLoss(y, torch.rand(N, generator=g) + 0.5),
        "nll": losses.NLLLoss(labels),
    }[loss_name]
    if loss_name == "nll":
        model_fn = lambda p, x: torch.log_softmax(apply(p, x), -1)  # noqa: E731
    return model_fn, loss, params, x


def loop_empirical_fisher(model_fn, loss, params, x) -> torch.Tensor:
    """c * sum_i g_i g_i^T with g_i from torch.autograd.grad of sample i's own loss."""
    flat, unravel = _tree.ravel(params)
    z = flat.clone().requires_grad_(True)
    out = model_fn(unravel(z), x)
    per = loss.per_sample(out)
    F = torch.zeros(flat.numel(), flat.numel())
    for i in range(N):
        (gi,) = torch.autograd.grad(per[i], z, retain_graph=True)
        F += torch.outer(gi, gi)
    return loss.scale(out) * F


@pytest.mark.parametrize(
    "model_name,loss_name",
    [
        ("mlp-tanh", "ce"),
        ("mlp-gelu", "mse"),
        ("mlp-softplus", "bce"),
        ("cnn", "ce_smooth_sum"),
        ("cnn", "gauss"),
        ("transformer", "ce"),
        ("mlp-tanh", "nll"),
    ],
)
def test_empirical_fisher_equals_loop_of_per_sample_gradients(model_name, loss_name):
    model_fn, loss, params, x = problem(model_name, loss_name)
    F = loop_empirical_fisher(model_fn, loss, params, x)
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    for mode in ("fwd-rev", "rev-rev"):
        fv = fisher_vp(model_fn, loss, params, v, x, mode=mode)
        assert_close(_tree.ravel(fv)[0], F @ _tree.ravel(v)[0])
    assert F.abs().max() > 1e-3


def test_empirical_fisher_mean_reduction_is_batch_average_of_outer_products():
    """reduction='mean' (cross-entropy): F = (1/N) sum_i g_i g_i^T with per_sample_grads' g_i."""
    model_fn, loss, params, x = problem("mlp-tanh", "ce")
    f = lambda p, x, t: losses.CrossEntropyLoss(t)(model_fn(p, x))  # noqa: E731
    gs = per_sample_grads(f, params, x, loss.target)
    G = torch.func.vmap(lambda t: _tree.ravel(t)[0])(gs)  # (N, n)
    v = _tree.random_like(params, torch.Generator().manual_seed(1))
    expected = G.T @ (G @ _tree.ravel(v)[0]) / N
    assert_close(_tree.ravel(fisher_vp(model_fn, loss, params, v, x))[0], expected)


def test_per_sample_grads_match_a_loop():
    model_fn, loss, params, x = problem("cnn", "ce")
    labels = loss.target
    w = torch.tensor(2.5)  # an unbatched argument

    def f(p, x, t, w):
        return w * losses.CrossEntropyLoss(t)(model_fn(p, x))

    got = per_sample_grads(f, params, x, labels, w, in_dims=(0, 0, None))
    chunked = per_sample_grads(f, params, x, labels, w, in_dims=(0, 0, None), chunk_size=2)
    for i in range(N):
        p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
        ref = torch.autograd.grad(f(p, x[i : i + 1], labels[i : i + 1], w), list(p.values()))
        for k, r in zip(p, ref, strict=True):
            assert_close(got[k][i], r)
            assert_close(chunked[k][i], r)


def test_per_sample_grads_batch_axis_not_first():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, N, generator=g)  # features x samples
    w = torch.randn(3, generator=g)
    f = lambda w, X: torch.sin(w @ X).sum()  # noqa: E731  X is (3, 1) per sample
    got = per_sample_grads(f, w, X, in_dims=1)
    expected = torch.cos(w @ X)[:, None] * X.T  # row i: cos(w.x_i) x_i
    assert_close(got, expected)


# ------------------------------------------------------------------------------ Monte Carlo


@pytest.mark.parametrize(
    "model_name,loss_name",
    [("mlp-tanh", "ce"), ("mlp-gelu", "mse"), ("mlp-softplus", "bce"), ("mlp-relu", "gauss")],
)
def test_mc_fisher_converges_to_ggn(model_name, loss_name):
    """GGN = Fisher for these losses; the mean of K single-draw estimates is within 5 standard
    errors (estimated from the K draws) of G v in every coordinate."""
    model_fn, loss, params, x = problem(model_name, loss_name)
    v = _tree.random_like(params, torch.Generator().manual_seed(3))
    gv = _tree.ravel(ggn_vp(model_fn, loss, params, v, x))[0]
    K = 400
    u = torch.rand(
        K, 1, *loss.noise_shape(torch.zeros(N, 3)), generator=torch.Generator().manual_seed(4)
    )
    one = lambda ui: _tree.ravel(fisher_vp(model_fn, loss, params, v, x, kind="mc", noise=ui))[0]  # noqa: E731
    draws = torch.func.vmap(one)(u)  # K independent single-draw estimates, vectorised
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(K)
    atol = tol("exact", torch.float64)["atol"]
    assert torch.all((mean - gv).abs() <= 5 * se + atol)
    assert (5 * se).max() < 0.5 * gv.abs().max()  # the bound is informative


def test_mc_fisher_of_nll_equals_ggn_of_cross_entropy_on_logits():
    """NLL on log-probabilities has G = 0, but its Fisher is the categorical Fisher, which is the
    GGN of cross-entropy on the logits (J_logsoftmax^T (diag p) J_logsoftmax = diag p - p p^T)."""
    model_fn, nll, params, x = problem("mlp-tanh", "nll")
    logits_fn, ce, _, _ = problem("mlp-tanh", "ce")
    v = _tree.random_like(params, torch.Generator().manual_seed(5))
    gv = _tree.ravel(ggn_vp(logits_fn, ce, params, v, x))[0]
    S = 4000
    u = torch.rand(S, N, 3, generator=torch.Generator().manual_seed(6))
    # one call with S samples; per-draw spread from S single-draw calls on the same noise slices
    fv = _tree.ravel(fisher_vp(model_fn, nll, params, v, x, kind="mc", noise=u, mc_samples=S))[0]
    singles = torch.stack(
        [
            _tree.ravel(fisher_vp(model_fn, nll, params, v, x, kind="mc", noise=u[s : s + 1]))[0]
            for s in range(200)
        ]
    )
    assert_close(
        singles.mean(0),
        _tree.ravel(
            fisher_vp(model_fn, nll, params, v, x, kind="mc", noise=u[:200], mc_samples=200)
        )[0],
    )
    se = singles.std(0) / math.sqrt(S)
    assert torch.all((fv - gv).abs() <= 5 * se + tol("exact", torch.float64)["atol"])


def test_mc_generator_is_reproducible_and_global_rng_untouched():
    model_fn, loss, params, x = problem("mlp-tanh", "ce")
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()

    def mc(seed):
        g = torch.Generator().manual_seed(seed)
        return fisher_vp(model_fn, loss, params, v, x, kind="mc", generator=g, mc_samples=3)

    a, b, c = mc(9), mc(9), mc(10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_close(a, b)
    assert not torch.allclose(_tree.ravel(a)[0], _tree.ravel(c)[0])


def test_nothing_is_mutated():
    model = zoo.cnn()
    apply, params = hessfunc.from_module(model)
    x = zoo._inputs("cnn", N, torch.float64)
    loss = losses.CrossEntropyLoss(torch.tensor([0, 1, 2, 0, 1]))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    copies = {k: t.clone() for k, t in params.items()}
    targets = loss.target.clone()
    rng = torch.get_rng_state()
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    fisher_vp(apply, loss, params, v, x)
    fisher_vp(apply, loss, params, v, x, kind="mc", generator=torch.Generator().manual_seed(0))
    per_sample_grads(lambda p, x, t: losses.CrossEntropyLoss(t)(apply(p, x)), params, x, targets)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and torch.equal(loss.target, targets)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(params[k], copies[k]) for k in params)


def test_bad_input_raises_clear_errors():
    model_fn, loss, params, x = problem("mlp-tanh", "ce")
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"hessfunc.fisher_vp.*unknown kind='true'"):
        fisher_vp(model_fn, loss, params, v, x, kind="true")
    with pytest.raises(TypeError, match="must be a hessfunc.losses object"):
        fisher_vp(model_fn, lambda o: o.sum(), params, v, x)
    with pytest.raises(ValueError, match="neither"):
        fisher_vp(model_fn, loss, params, v, x, kind="mc")
    with pytest.raises(ValueError, match="both"):
        fisher_vp(model_fn, loss, params, v, x, kind="mc", generator=gen, noise=torch.rand(1, N, 3))
    with pytest.raises(ValueError, match="only used with kind='mc'"):
        fisher_vp(model_fn, loss, params, v, x, generator=gen)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        fisher_vp(model_fn, loss, params, v, x, kind="mc", generator=gen, mc_samples=0)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 5, 3\); expected .* \(1, 5, 3\)"):
        fisher_vp(model_fn, loss, params, v, x, kind="mc", noise=torch.rand(2, N, 3))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fisher_vp(model_fn, loss, params, v, x, kind="mc", generator=0)
    with pytest.raises(ValueError, match=r"v\['0.bias'\] has shape"):
        fisher_vp(model_fn, loss, params, {**v, "0.bias": v["0.bias"][:2]}, x)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        fisher_vp(model_fn, loss, {**params, "0.bias": params["0.bias"].int()}, v, x)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss.*outputs have shape \(5, 3\).*\(4,\)"):
        fisher_vp(model_fn, losses.CrossEntropyLoss(loss.target[:4]), params, v, x)
    f = lambda p, x, t: losses.CrossEntropyLoss(t)(model_fn(p, x))  # noqa: E731
    with pytest.raises(ValueError, match="disagree on the batch size"):
        per_sample_grads(f, params, x, loss.target[:3])
    with pytest.raises(ValueError, match="no argument is batched"):
        per_sample_grads(f, params, x, loss.target, in_dims=None)
    with pytest.raises(ValueError, match="one int-or-None per argument"):
        per_sample_grads(f, params, x, loss.target, in_dims=(0,))


# -------------------------------------------------------------------------------- compile


@pytest.mark.compile
def test_compiled_fisher_matches_eager():
    """Empirical and MC (noise as a tensor) Fisher in one fullgraph-compiled function."""
    model_fn, _, params, x = problem("mlp-tanh", "ce")

    def both(params, v, x, labels, u):
        loss = losses.CrossEntropyLoss(labels)
        emp = fisher_vp(model_fn, loss, params, v, x)
        mc = fisher_vp(model_fn, loss, params, v, x, kind="mc", noise=u, mc_samples=2)
        return emp, mc

    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = _tree.random_like(params, g)
        labels, u = torch.randint(0, 3, (N,), generator=g), torch.rand(2, N, 3, generator=g)
        assert_close(compiled(params, v, x, labels, u), both(params, v, x, labels, u))
