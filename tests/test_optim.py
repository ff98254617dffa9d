"""Second-order optimizers (hessfunc.optim) and the Gauss-Newton-Bartlett estimate.

Each update rule is checked against its paper's equations written out here with
torch.autograd (not torch.func), the estimators against dense matrices built by hessfunc's
exact products, and the compiled steps against eager ones, step by step.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss, MSELoss

EXACT = tol("exact", torch.float64)


# ---------------------------------------------------------------------------- problems


def mlp_params(seed: int = 0, d_in: int = 3, hidden: int = 4, d_out: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(d_in, hidden, generator=g, dtype=torch.float64) * 0.7,
        "b1": torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1,
        "w2": torch.randn(hidden, d_out, generator=g, dtype=torch.float64) * 0.7,
    }


def mlp(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tanh(X @ p["w1"] + p["b1"]) @ p["w2"]


def ce_batch(seed: int = 1, n: int = 6, d_in: int = 3, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def ce_loss(X: torch.Tensor, y: torch.Tensor) -> CrossEntropyLoss:
    return CrossEntropyLoss(y)


def flat(tree) -> torch.Tensor:
    return hessfunc.ravel(tree)[0]


def same(a, b) -> bool:
    la, lb = _tree.tree_leaves(a), _tree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def close(a, b, **kw) -> None:
    for x, y in zip(_tree.tree_leaves(a), _tree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, **(kw or EXACT))


def run(opt, params, batch, steps, *, seed=0, start=None):
    """Eager run driven by the state's own counter, a generator for the draws."""
    g = torch.Generator().manual_seed(seed)
    state = opt.init(params) if start is None else start
    infos = []
    for _ in range(steps):
        params, state, info = opt.step(params, state, *batch, generator=g)
        infos.append(info)
    return params, state, infos


# ------------------------------------------------------------------ Gauss-Newton-Bartlett


def _gnb_mean(model_fn, loss, params, batch, draws, seed):
    """Mean and standard error of ``draws`` GNB estimates (vmapped over the uniform draws)."""
    out = model_fn(params, *batch)
    g = torch.Generator().manual_seed(seed)
    U = torch.rand((draws, *loss.noise_shape(out)), generator=g, dtype=torch.float64)
    est = torch.func.vmap(
        lambda u: flat(hessfunc.gnb_diag(model_fn, loss, params, *batch, noise=u))
    )(U)
    return est.mean(0), est.std(0) / math.sqrt(draws)


@pytest.mark.parametrize("kind", ["ce_mean", "mse_mean", "ce_sum"])
def test_gnb_diag_is_unbiased_for_the_ggn_diagonal(kind):
    params = mlp_params(0, d_out=3 if kind.startswith("ce") else 2)
    if kind.startswith("ce"):
        batch = ce_batch()
        loss = CrossEntropyLoss(batch[1], reduction="mean" if kind == "ce_mean" else "sum")
    else:
        g = torch.Generator().manual_seed(3)
        X = torch.randn(6, 3, generator=g, dtype=torch.float64)
        Y = torch.randn(6, 2, generator=g, dtype=torch.float64)
        batch, loss = (X, Y), MSELoss(Y)
    exact = torch.diagonal(hessfunc.ggn_matrix(mlp, loss, params, *batch))
    mean, se = _gnb_mean(mlp, loss, params, batch, 6000, seed=7)
    z = (mean - exact).abs() / se
    assert float(z.max()) < 5.0, z
    # The test can fail: the squared gradient without dividing by the reduction's factor is off
    # by the batch size (mean CE) or the element count (mean MSE).
    if kind != "ce_sum":
        c = loss.scale(mlp(params, *batch))
        assert float(((mean * c - exact).abs() / (se * c)).max()) > 20


def test_gnb_diag_generator_and_noise_agree_and_inputs_are_checked():
    params, (X, y) = mlp_params(), ce_batch()
    loss = CrossEntropyLoss(y)
    out = mlp(params, X, y)
    u = torch.rand(loss.noise_shape(out), generator=torch.Generator().manual_seed(5))
    a = hessfunc.gnb_diag(mlp, loss, params, X, y, generator=torch.Generator().manual_seed(5))
    b = hessfunc.gnb_diag(mlp, loss, params, X, y, noise=u)
    assert same(a, b)
    with pytest.raises(TypeError, match=r"gnb_diag.*hessfunc.losses object"):
        hessfunc.gnb_diag(mlp, lambda o: F.cross_entropy(o, y), params, X, y, noise=u)
    with pytest.raises(ValueError, match="exactly one source"):
        hessfunc.gnb_diag(mlp, loss, params, X, y)
    with pytest.raises(ValueError, match="noise_shape"):
        hessfunc.gnb_diag(mlp, loss, params, X, y, noise=u[:2])


# ------------------------------------------------------------------------------- Sophia


def _reference_sophia(params, batch, noises, *, lr, b1, b2, rho, wd, k, eps, estimator):
    """Liu et al. 2023, Algorithm 3, with autograd and the draws ``noises[t]`` at refreshes."""
    X, y = batch
    theta = {n: p.clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    h = {n: torch.zeros_like(p) for n, p in params.items()}
    history = []
    for t in range(len(noises)):
        leaves = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
        logits = torch.tanh(X @ leaves["w1"] + leaves["b1"]) @ leaves["w2"]
        loss = F.cross_entropy(logits, y)
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True)
        if t % k == 0:
            if estimator == "gnb":
                # labels from the model (Gumbel-max on the same uniforms), B * grad^2
                gumbel = -torch.log(-torch.log(noises[t].clamp(min=1e-300)))
                y_hat = torch.argmax(logits.detach() + gumbel, dim=-1)
                gs = torch.autograd.grad(
                    F.cross_entropy(logits, y_hat), [leaves[n] for n in names], retain_graph=True
                )
                h_hat = {n: X.shape[0] * gi**2 for n, gi in zip(names, gs, strict=True)}
            else:
                z = {n: torch.where(noises[t][n][0] < 0.5, -1.0, 1.0) for n in names}
                gz = sum((gi * z[n]).sum() for n, gi in zip(names, grads, strict=True))
                hz = torch.autograd.grad(gz, [leaves[n] for n in names])
                h_hat = {n: z[n] * hzi for n, hzi in zip(names, hz, strict=True)}
            h = {n: b2 * h[n] + (1 - b2) * h_hat[n] for n in names}
        m = {n: b1 * m[n] + (1 - b1) * gi.detach() for n, gi in zip(names, grads, strict=True)}
        new = {}
        for n in names:
            ratio = m[n] / torch.maximum(rho * h[n], torch.tensor(eps))
            new[n] = theta[n] - lr * wd * theta[n] - lr * ratio.clamp(-1, 1)
        theta = new
        history.append({n: p.clone() for n, p in theta.items()})
    return history


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_matches_algorithm_3(estimator):
    params, batch = mlp_params(), ce_batch()
    cfg = dict(lr=0.05, b1=0.9, b2=0.95, rho=0.05, wd=0.1, k=3, eps=1e-12)
    opt = hessfunc.optim.sophia(
        mlp, ce_loss, lr=cfg["lr"], betas=(cfg["b1"], cfg["b2"]), rho=cfg["rho"],
        weight_decay=cfg["wd"], estimator=estimator, update_every=cfg["k"], eps=cfg["eps"],
    )  # fmt: skip
    g = torch.Generator().manual_seed(11)
    state, p = opt.init(params), params
    noises, got, fractions = [], [], []
    for t in range(7):
        noise = opt.step.draw_noise(p, state, *batch, generator=g) if t % 3 == 0 else None
        noises.append(noise)
        p, state, info = opt.step(p, state, *batch, noise=noise)
        got.append(p)
        fractions.append(float(info.clip_fraction))
    ref = _reference_sophia(params, batch, noises, estimator=estimator, **cfg)
    for a, b in zip(got, ref, strict=True):
        close(a, b)
    assert int(state["sophia"]["step"]) == 7
    # clipping is exercised: some coordinates clipped, not all
    assert any(0.0 < f < 1.0 for f in fractions), fractions


def test_sophia_h_diagonal_is_unbiased_for_the_hessian_diagonal():
    params, batch = mlp_params(), ce_batch()
    f = lambda p, X, y: F.cross_entropy(mlp(p, X, y), y)  # noqa: E731
    exact = torch.diagonal(hessfunc.hessian_matrix(f, params, *batch))
    opt = hessfunc.optim.sophia(mlp, ce_loss, lr=0.1, betas=(0.0, 0.0), estimator="hutchinson")
    state = opt.init(params)
    draws = 4000
    g = torch.Generator().manual_seed(2)
    U = _tree.tree_map(
        lambda x: torch.rand((draws, 1, *x.shape), generator=g, dtype=x.dtype), params
    )

    def one(u):
        return flat(opt.step(params, state, *batch, noise=u, refresh=True)[1]["sophia"]["h"])

    est = torch.func.vmap(one)(U)
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    exact_entries = se < 1e-12  # entries with no off-diagonal coupling are exact
    assert float(((mean - exact).abs() / se.clamp(min=1e-300))[~exact_entries].max()) < 5.0
    torch.testing.assert_close(mean[exact_entries], exact[exact_entries], **EXACT)
    # ... and the GNB one is unbiased for the GGN (the other matrix) through the optimizer too
    gnb = hessfunc.optim.sophia(mlp, ce_loss, lr=0.1, betas=(0.0, 0.0))
    out = mlp(params, *batch)
    u = torch.rand(CrossEntropyLoss(batch[1]).noise_shape(out), generator=g)
    h = gnb.step(params, gnb.init(params), *batch, noise=u)[1]["sophia"]["h"]
    close(h, hessfunc.gnb_diag(mlp, CrossEntropyLoss(batch[1]), params, *batch, noise=u))


# --------------------------------------------------------------------------- AdaHessian


def conv_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) * 0.5,
        "w": torch.randn(2 * 3 * 3, 3, generator=g, dtype=torch.float64) * 0.3,
        "b": torch.zeros(3, dtype=torch.float64),
    }


def conv_model(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.conv2d(X, p["k"]))
    return h.flatten(1) @ p["w"] + p["b"]


def conv_batch():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (5,), generator=g)


def test_adahessian_matches_the_paper_with_spatial_averaging():
    params, batch = conv_params(), conv_batch()
    lr, b1, b2, power, wd, k, eps = 0.05, 0.9, 0.99, 0.5, 0.01, 2, 1e-4
    opt = hessfunc.optim.adahessian(
        conv_model, ce_loss, lr=lr, betas=(b1, b2), hessian_power=power, weight_decay=wd,
        update_every=k, eps=eps,
    )  # fmt: skip
    g = torch.Generator().manual_seed(9)
    state, p = opt.init(params), params
    noises, got = [], []
    for t in range(5):
        noise = opt.step.draw_noise(p, state, *batch, generator=g) if t % k == 0 else None
        noises.append(noise)
        p, state, _ = opt.step(p, state, *batch, noise=noise)
        got.append(p)
    # Yao et al. 2021, Algorithm 1, written out with autograd
    X, y = batch
    names = list(params)
    theta = {n: params[n].clone() for n in names}
    m = {n: torch.zeros_like(params[n]) for n in names}
    v = {n: torch.zeros_like(params[n]) for n in names}
    d = None
    for t in range(1, 6):
        leaves = {n: theta[n].clone().requires_grad_(True) for n in names}
        loss = F.cross_entropy(conv_model(leaves, X, y), y)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True)
        if (t - 1) % k == 0:
            z = {n: torch.where(noises[t - 1][n][0] < 0.5, -1.0, 1.0) for n in names}
            gz = sum((gi * z[n]).sum() for n, gi in zip(names, grads, strict=True))
            hz = torch.autograd.grad(gz, [leaves[n] for n in names])
            D = {n: z[n] * hzi for n, hzi in zip(names, hz, strict=True)}
            # spatial averaging over the 2x2 kernel of each (out, in) pair
            kern = D["k"]
            D["k"] = kern.reshape(2, 1, 4).mean(-1)[..., None, None].expand(2, 1, 2, 2)
            d = D
        for n, gi in zip(names, grads, strict=True):
            m[n] = b1 * m[n] + (1 - b1) * gi.detach()
            v[n] = b2 * v[n] + (1 - b2) * d[n] ** 2
            m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
            theta[n] = theta[n] - lr * (m_hat / (v_hat.sqrt() ** power + eps) + wd * theta[n])
        close(got[t - 1], theta)
    # the averaged kernel diagonal is constant over each kernel's spatial axes
    dk = state["adahessian"]["d"]["k"]
    assert torch.equal(dk, dk[:, :, :1, :1].expand_as(dk))
    assert not torch.equal(dk[0], dk[1])


# ------------------------------------------------------------------------- Hessian-free


def test_hessian_free_reaches_least_squares_in_one_step():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    params = {"W": torch.zeros(4, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    model = lambda p, X, Y: X @ p["W"] + p["b"]  # noqa: E731
    opt = hessfunc.optim.hessian_free(
        model, lambda X, Y: MSELoss(Y), damping=0.0, maxiter=10, curvature="ggn"
    )
    new, state, info = opt.step(params, opt.init(params), X, Y)
    A = torch.cat([X, torch.ones(12, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(A, Y).solution
    torch.testing.assert_close(new["W"], sol[:4], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new["b"], sol[4], rtol=1e-9, atol=1e-9)
    assert bool(info.accepted)
    torch.testing.assert_close(info.reduction_ratio, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_hessian_free_step_matches_dense_levenberg_marquardt(curvature):
    params, batch = mlp_params(), ce_batch()
    f = lambda p, X, y: F.cross_entropy(mlp(p, X, y), y)  # noqa: E731
    lam = 0.3
    if curvature == "hessian":  # damp above the most negative eigenvalue: CG then solves exactly
        lam += 3 * float(torch.linalg.eigvalsh(hessfunc.hessian_matrix(f, params, *batch))[0].abs())
    opt = hessfunc.optim.hessian_free(mlp, ce_loss, damping=lam, maxiter=40, curvature=curvature)
    state = opt.init(params)
    p = params
    for _ in range(3):
        flat_p, unravel = hessfunc.ravel(p)
        g = torch.func.grad(lambda w: f(unravel(w), *batch))(flat_p)
        if curvature == "ggn":
            B = hessfunc.ggn_matrix(mlp, CrossEntropyLoss(batch[1]), p, *batch)
        else:
            B = hessfunc.hessian_matrix(f, p, *batch)
        lam = float(state["hessian_free"]["damping"])
        assert float(torch.linalg.eigvalsh(B)[0]) + lam > 0
        d = torch.linalg.solve(B + lam * torch.eye(len(g)), -g)
        q = g @ d + 0.5 * d @ B @ d
        actual = f(unravel(flat_p + d), *batch) - f(p, *batch)
        r = float(actual / q) if q < 0 else 0.0
        new_lam = lam * 1.5 if r < 0.25 else (lam * 2 / 3 if r > 0.75 else lam)
        expected = unravel(flat_p + d) if actual <= 0 else p
        p, state, info = opt.step(p, state, *batch)
        close(p, expected, rtol=1e-8, atol=1e-10)
        assert math.isclose(float(info.reduction_ratio), r, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(float(state["hessian_free"]["damping"]), new_lam, rel_tol=1e-12)
        assert float(info.damping) == lam


def test_hessian_free_warm_starts_cg_from_the_previous_direction():
    params, batch = mlp_params(), ce_batch()
    opt = hessfunc.optim.hessian_free(mlp, ce_loss, damping=1.0, maxiter=3, cg_decay=0.95)
    p, state, _ = opt.step(params, opt.init(params), *batch)
    d = state["hessian_free"]["direction"]
    loss = CrossEntropyLoss(batch[1])
    g = torch.func.grad(lambda q: loss(mlp(q, *batch)))(p)
    lam = state["hessian_free"]["damping"]
    x0 = _tree.scale(0.95, d)
    ref = hessfunc.cg(
        lambda v: hessfunc.ggn_vp(mlp, loss, p, v, *batch),
        _tree.scale(-1.0, g), maxiter=3, damping=lam, x0=x0,
    )  # fmt: skip
    _, state2, _ = opt.step(p, state, *batch)
    close(state2["hessian_free"]["direction"], ref.x)
    cold = hessfunc.cg(
        lambda v: hessfunc.ggn_vp(mlp, loss, p, v, *batch),
        _tree.scale(-1.0, g), maxiter=3, damping=lam,
    )  # fmt: skip
    assert float((flat(cold.x) - flat(ref.x)).abs().max()) > 1e-8


# ---------------------------------------------------------------------------- sharpness


def test_sharpness_tracks_the_top_eigenvalue_with_warm_starts():
    params, batch = mlp_params(), ce_batch()
    f = lambda p, X, y: F.cross_entropy(mlp(p, X, y), y)  # noqa: E731
    for curvature in ("hessian", "ggn"):
        if curvature == "hessian":
            M = hessfunc.hessian_matrix(f, params, *batch)
        else:
            M = hessfunc.ggn_matrix(mlp, CrossEntropyLoss(batch[1]), params, *batch)
        ev = torch.linalg.eigvalsh(M)
        top = ev[ev.abs().argmax()]
        tracker = hessfunc.optim.sharpness(
            mlp, ce_loss, update_every=2, num_iters=3, curvature=curvature
        )
        state = tracker.init(params)
        values = []
        for _ in range(40):
            p, state, info = tracker.step(params, state, *batch)
            assert p is params
            values.append(float(info.eigenvalue))
        # non-refreshing steps repeat the last estimate; warm starts keep improving it
        assert values[0] == values[1] and values[2] == values[3]
        assert abs(values[-1] - float(top)) < 1e-6 * abs(float(top))
        assert abs(values[0] - float(top)) > 1e3 * abs(values[-1] - float(top))
        assert float(info.residual) < 1e-3 * abs(float(top))


# --------------------------------------------------------------- contract: state and purity


def _all_optimizers():
    return {
        "sophia_g": hessfunc.optim.sophia(mlp, ce_loss, lr=0.05, update_every=2),
        "sophia_h": hessfunc.optim.sophia(
            mlp, ce_loss, lr=0.05, update_every=2, estimator="hutchinson"
        ),
        "adahessian": hessfunc.optim.adahessian(mlp, ce_loss, lr=0.05, update_every=2),
        "hessian_free": hessfunc.optim.hessian_free(mlp, ce_loss, maxiter=4),
        "sharpness": hessfunc.optim.sharpness(mlp, ce_loss, update_every=2, num_iters=3),
        "kfac": hessfunc.optim.kfac(mlp, ce_loss, fisher="mc", update_every=2, invert_every=2),
    }


@pytest.mark.parametrize("name", list(_all_optimizers()))
def test_state_round_trips_through_torch_save_and_resumes_bit_identically(name):
    opt = _all_optimizers()[name]
    params, batch = mlp_params(), ce_batch()
    snapshot = _tree.tree_map(torch.clone, params)
    full_p, full_s, full_i = run(opt, params, batch, 5, seed=3)
    assert same(params, snapshot)  # never modified in place
    # the same run, interrupted after 2 steps and resumed from disk
    g = torch.Generator().manual_seed(3)
    p, s = params, opt.init(params)
    for _ in range(2):
        p, s, _ = opt.step(p, s, *batch, generator=g)
    buf = io.BytesIO()
    torch.save({"params": p, "state": s, "rng": g.get_state()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    g2 = torch.Generator()
    g2.set_state(loaded["rng"])
    p, s = loaded["params"], loaded["state"]
    for _ in range(3):
        p, s, info = opt.step(p, s, *batch, generator=g2)
    assert same(p, full_p) and same(s, full_s) and same(info, full_i[-1])
    assert info._fields[: len(hessfunc.optim.INFO_FIELDS)] == hessfunc.optim.INFO_FIELDS


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return net.double()


def test_module_optimizer_updates_in_place_and_its_state_dict_round_trips():
    net = _net(0)
    apply, _ = hessfunc.from_module(net)
    opt = hessfunc.optim.sophia(lambda p, X, y: apply(p, X), ce_loss, lr=0.05, update_every=2)
    batch = ce_batch()
    driver = hessfunc.optim.ModuleOptimizer(net, opt, generator=torch.Generator().manual_seed(1))
    weight = net[0].weight
    losses = [float(driver.step(*batch).loss) for _ in range(3)]
    assert net[0].weight is weight and weight.requires_grad and weight.grad is None
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": driver.state_dict()}, buf)
    losses += [float(driver.step(*batch).loss) for _ in range(3)]
    assert losses[-1] < losses[0]

    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    other = _net(5)  # other weights and another generator: everything comes from the checkpoint
    other.load_state_dict(checkpoint["model"])
    resumed = hessfunc.optim.ModuleOptimizer(other, opt, generator=torch.Generator())
    resumed.load_state_dict(checkpoint["opt"])
    assert [float(resumed.step(*batch).loss) for _ in range(3)] == losses[3:]
    for x, y in zip(other.parameters(), net.parameters(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="another structure"):
        hessfunc.optim.ModuleOptimizer(
            other, hessfunc.optim.hessian_free(lambda p, X, y: apply(p, X), ce_loss)
        ).load_state_dict(checkpoint["opt"])


# -------------------------------------------------------------------------- bad input


def test_bad_input_gets_errors_that_name_the_fix():
    params, batch = mlp_params(), ce_batch()
    with pytest.raises(ValueError, match=r"sophia.*lr must be >= 0"):
        hessfunc.optim.sophia(mlp, ce_loss, lr=-1.0)
    with pytest.raises(ValueError, match=r"adahessian.*lr must be >= 0"):
        hessfunc.optim.adahessian(mlp, ce_loss, lr=-0.1)
    with pytest.raises(ValueError, match=r"hessian_free.*damping must be >= 0"):
        hessfunc.optim.hessian_free(mlp, ce_loss, damping=-1.0)
    for make in (
        lambda: hessfunc.optim.sophia(mlp, ce_loss, lr=0.1, update_every=0),
        lambda: hessfunc.optim.adahessian(mlp, ce_loss, lr=0.1, update_every=0),
        lambda: hessfunc.optim.sharpness(mlp, ce_loss, update_every=0),
    ):
        with pytest.raises(ValueError, match="update_every must be an int >= 1"):
            make()
    # GNB needs a hessfunc loss object
    plain = hessfunc.optim.sophia(mlp, lambda X, y: lambda o: F.cross_entropy(o, y), lr=0.1)
    with pytest.raises(TypeError, match=r"loss_fn\(\*batch\) must be a hessfunc.losses object"):
        plain.step(params, plain.init(params), *batch, generator=torch.Generator())
    sophia = hessfunc.optim.sophia(mlp, ce_loss, lr=0.1)
    ada = hessfunc.optim.adahessian(mlp, ce_loss, lr=0.1)
    with pytest.raises(TypeError, match="state was not made by this optimizer"):
        sophia.step(params, ada.init(params), *batch, generator=torch.Generator())
    other = {"w1": params["w1"], "w2": params["w2"]}
    with pytest.raises(ValueError, match="another parameter structure"):
        sophia.step(params, sophia.init(other), *batch, generator=torch.Generator())
    wider = mlp_params(hidden=5)
    with pytest.raises(ValueError, match="belongs to other parameters"):
        sophia.step(params, sophia.init(wider), *batch, generator=torch.Generator())
    with pytest.raises(ValueError, match="exactly one source of randomness"):
        sophia.step(params, sophia.init(params), *batch)
    with pytest.raises(ValueError, match="generator="):
        hessfunc.optim.ModuleOptimizer(torch.nn.Linear(2, 2), sophia)


# -------------------------------------------------------------------------------- compile


def _compiled_vs_eager(opt, params, batch, steps):
    """Drive the same run eagerly and compiled, step by step from the same state; the compiled
    step may build its (at most two) graphs on the first refreshing and plain steps only."""
    step = opt.step
    every = getattr(step, "update_every", None)
    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    p, s = params, opt.init(params)
    warm = 2 * (every or 1)
    for t in range(steps):
        kw = {}
        refresh = True
        if every is not None:
            refresh = t % every == 0
            kw["refresh"] = refresh
        if hasattr(step, "draw_noise") and refresh:
            kw["noise"] = step.draw_noise(p, s, *batch, generator=g)
        want = step(p, s, *batch, **kw)
        stance = "fail_on_recompile" if t >= warm else "default"
        with torch.compiler.set_stance(stance):
            got = compiled(p, s, *batch, **kw)
        close(got, want, rtol=1e-9, atol=1e-11)
        p, s = want[0], want[1]  # the next step starts from the same state for both


@pytest.fixture(scope="module")
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_CASES = {
    "sophia_g": lambda: hessfunc.optim.sophia(mlp, ce_loss, lr=0.05, update_every=5),
    "sophia_h": lambda: hessfunc.optim.sophia(
        mlp, ce_loss, lr=0.05, update_every=5, estimator="hutchinson"
    ),
    "adahessian": lambda: hessfunc.optim.adahessian(mlp, ce_loss, lr=0.05, update_every=5),
    "hessian_free": lambda: hessfunc.optim.hessian_free(mlp, ce_loss, maxiter=3),
    "sharpness": lambda: hessfunc.optim.sharpness(mlp, ce_loss, update_every=5, num_iters=3),
    "kfac": lambda: hessfunc.optim.kfac(
        mlp, ce_loss, fisher="mc", update_every=5, invert_every=3, damping=1e-2
    ),
}


@pytest.mark.full
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compiled_step_equals_eager_without_recompiling(name, fresh_dynamo, one_thread):
    _compiled_vs_eager(COMPILE_CASES[name](), mlp_params(), ce_batch(), 20)


def test_compiled_module_optimizer_equals_eager_without_recompiling(fresh_dynamo, one_thread):
    """Sophia-G through the module driver: 20 steps, 4 refreshes, two graphs, no recompile."""
    eager_net, compiled_net = _net(0), _net(0)
    apply, _ = hessfunc.from_module(eager_net)
    opt = hessfunc.optim.sophia(lambda p, X, y: apply(p, X), ce_loss, lr=0.05, update_every=5)
    eager = hessfunc.optim.ModuleOptimizer(
        eager_net, opt, generator=torch.Generator().manual_seed(4)
    )
    compiled = hessfunc.optim.ModuleOptimizer(
        compiled_net, opt, generator=torch.Generator().manual_seed(4), compile=True
    )
    batch = ce_batch()
    for t in range(20):
        want = eager.step(*batch)
        # both graphs (refresh at t = 0, plain at t = 1) exist after two steps
        with torch.compiler.set_stance("fail_on_recompile" if t >= 2 else "default"):
            got = compiled.step(*batch)
        close(got, want, rtol=1e-9, atol=1e-12)
        for x, y in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
