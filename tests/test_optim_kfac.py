"""The K-FAC optimizer: Newton's step where K-FAC is the Hessian, the quadratic model's choice
of step size and momentum against a dense solve, the damping rule, compiled against eager,
and state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import hessfunc
import hessfunc.optim
from hessfunc.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from hessfunc.optim.kfac import lm_damping

F64 = torch.float64
leaves = torch.utils._pytree.tree_leaves


def factors(state, key):
    """The factor tensors of a state, block by block (the leaves that hold one)."""
    return [x for x in leaves(state["kfac"][key]) if x.numel()]


def linear(p, X, Y):
    return F.linear(X, p["w"], p["b"])


def mse(X, Y):
    return MSELoss(Y)


def mlp(p, X, Y):
    h = torch.tanh(F.linear(X, p["w1"], p["b1"]))
    return F.linear(h, p["w2"], p["b2"])


def bce(X, Y):
    return BCEWithLogitsLoss(Y)


def regression(seed=0, n=12, d=3, o=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = torch.randn(n, o, generator=g, dtype=F64)
    p = {"w": torch.randn(o, d, generator=g, dtype=F64), "b": torch.zeros(o, dtype=F64)}
    return p, X, Y


def mlp_problem(seed=0, n=16, d=4, h=5, o=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = (torch.rand(n, o, generator=g, dtype=F64) > 0.5).to(F64)
    p = {
        "w1": torch.randn(h, d, generator=g, dtype=F64) / 2,
        "b1": torch.zeros(h, dtype=F64),
        "w2": torch.randn(o, h, generator=g, dtype=F64) / 2,
        "b2": torch.zeros(o, dtype=F64),
    }
    return p, X, Y


def batches(k, seed=1, n=16, d=4, o=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, d, generator=g, dtype=F64),
            (torch.rand(n, o, generator=g, dtype=F64) > 0.5).to(F64),
        )
        for _ in range(k)
    ]


def test_newton_step_on_linear_regression():
    # one linear layer with MSE: K-FAC = GGN = Hessian, so lr=1, no momentum, no damping is
    # Newton's step, which solves least squares (bias included) in one step
    p, X, Y = regression()
    opt = hessfunc.optim.kfac(linear, mse, lr=1.0, momentum=0.0, damping=1e-12, adapt_damping=False)
    new, _, info = opt.step(p, opt.init(p), X, Y)
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(X1, Y).solution.T
    torch.testing.assert_close(new["w"], sol[:, :3], **tol("exact", F64))
    torch.testing.assert_close(new["b"], sol[:, 3], **tol("exact", F64))
    torch.testing.assert_close(info.loss, F.mse_loss(linear(p, X, Y), Y), **tol("exact", F64))


def test_adaptive_lr_and_momentum_minimise_the_quadratic_model():
    p, X, Y = mlp_problem()
    wd, lam0 = 0.01, 0.1
    opt = hessfunc.optim.kfac(mlp, bce, damping=lam0, ema=0.0, invert_every=1, weight_decay=wd)
    p1, s1, info1 = opt.step(p, opt.init(p), X, Y)
    assert info1.momentum.item() == 0.0  # first step: no previous update
    lam = s1["kfac"]["damping"]
    p2, s2, info2 = opt.step(p1, s1, X, Y)
    # the direction, independently: the batch's K-FAC solved with damping lam + wd
    g = torch.func.grad(lambda q: bce(X, Y)(mlp(q, X, Y)) + 0.5 * wd * sum(
        (t * t).sum() for t in q.values()))(p1)  # fmt: skip
    K = hessfunc.kfac(mlp, bce(X, Y), p1, X, Y)
    d = K.solve(g, lam + wd)
    d = {k: -v for k, v in d.items()}
    flat = lambda t: hessfunc.ravel(t)[0]  # noqa: E731
    D, V, gv = flat(d), flat(s1["kfac"]["velocity"]), flat(g)
    C = hessfunc.ggn_matrix(mlp, bce(X, Y), p1, X, Y) + (wd + lam) * torch.eye(len(D), dtype=F64)
    M = torch.stack([torch.stack([D @ C @ D, D @ C @ V]), torch.stack([V @ C @ D, V @ C @ V])])
    a, m = torch.linalg.solve(M, -torch.stack([gv @ D, gv @ V]))
    torch.testing.assert_close(info2.lr, a, **tol("fd", F64))
    torch.testing.assert_close(info2.momentum, m, **tol("fd", F64))
    assert abs(m.item()) > 1e-3  # the momentum term is really used
    step = flat(p2) - flat(p1)
    torch.testing.assert_close(step, a * D + m * V, **tol("fd", F64))
    # the predicted change is the undamped model at the step taken
    C0 = C - lam * torch.eye(len(D), dtype=F64)
    torch.testing.assert_close(
        info2.predicted, gv @ step + 0.5 * step @ C0 @ step, **tol("fd", F64)
    )


def test_lm_rule_by_hand():
    lam = torch.tensor(1.0, dtype=F64)
    cases = {0.9: 0.95, 0.5: 1.0, 0.25: 1.0, 0.75: 1.0, 0.1: 1 / 0.95, -3.0: 1 / 0.95}
    for rho, factor in cases.items():
        out = lm_damping(lam, torch.tensor(rho, dtype=F64))
        torch.testing.assert_close(out, lam * factor, rtol=1e-15, atol=0)
    assert lm_damping(lam, torch.tensor(float("nan"), dtype=F64)).item() == 1 / 0.95
    assert lm_damping(torch.tensor(1e-8, dtype=F64), torch.tensor(1.0, dtype=F64)).item() == 1e-8


def test_lm_rule_in_a_step():
    # the objective is exactly quadratic, so the model is exact: rho = 1, damping * 19/20
    p, X, Y = regression()
    opt = hessfunc.optim.kfac(linear, mse, damping=0.5)
    _, s, info = opt.step(p, opt.init(p), X, Y)
    torch.testing.assert_close(info.rho, torch.tensor(1.0, dtype=F64), **tol("fd", F64))
    torch.testing.assert_close(
        s["kfac"]["damping"], torch.tensor(0.5 * 0.95, dtype=F64), rtol=1e-15, atol=0
    )
    assert info.damping.item() == 0.5


def test_factors_ema_and_update_every():
    p, X, Y = mlp_problem()
    (X1, Y1), (X2, Y2), (X3, Y3) = batches(3)
    opt = hessfunc.optim.kfac(mlp, bce, ema=0.25, update_every=2, lr=0.1, momentum=0.0)
    p1, s1, _ = opt.step(p, opt.init(p), X1, Y1)
    K1 = hessfunc.kfac(mlp, bce(X1, Y1), p, X1, Y1)
    assert len(factors(s1, "A")) == len(K1.A) == 2
    for a, b in zip(factors(s1, "A"), K1.A, strict=True):
        torch.testing.assert_close(a, b, **tol("exact", F64))
    p2, s2, _ = opt.step(p1, s1, X2, Y2)  # count 1: no update
    assert all(torch.equal(a, b) for a, b in zip(factors(s2, "A"), factors(s1, "A"), strict=True))
    # refresh= overrides the count: a forced refresh at count 1 updates the factors
    _, s2r, _ = opt.step(p1, s1, X2, Y2, refresh=True)
    K2 = hessfunc.kfac(mlp, bce(X2, Y2), p1, X2, Y2)
    for a, o, n in zip(factors(s2r, "A"), factors(s1, "A"), K2.A, strict=True):
        torch.testing.assert_close(a, 0.25 * o + 0.75 * n, **tol("exact", F64))
    _, s3, _ = opt.step(p2, s2, X3, Y3)  # count 2: update
    K3 = hessfunc.kfac(mlp, bce(X3, Y3), p2, X3, Y3)
    for a, o, n in zip(factors(s3, "G"), factors(s2, "G"), K3.G, strict=True):
        torch.testing.assert_close(a, 0.25 * o + 0.75 * n, **tol("exact", F64))


def _uncovered_model(p, X, Y):
    # "s" scales a layer's output and "e" shifts it: neither is a layer's weight or bias
    return p["s"] * F.linear(X, p["w"], p["b"]) + p["e"]


@pytest.mark.parametrize("fisher", ["mc", "type-2", "empirical"])
def test_uncovered_leaves_get_a_damped_running_diagonal(fisher):
    # three steps, factors refreshed on steps 0 and 2: the uncovered leaves move by exactly
    # -g / (dbar + damping + weight decay), dbar the EMA of the batch estimates on refreshing
    # steps: Gauss-Newton-Bartlett at the given uniform draws, or g_L^2 / c (empirical)
    p, _, _ = regression()
    p |= {"s": torch.tensor(1.5, dtype=F64), "e": torch.tensor([0.2, -0.1], dtype=F64)}
    data = batches(3, d=3, o=2)
    lam, wd, ema = 0.02, 0.01, 0.5
    opt = hessfunc.optim.kfac(
        _uncovered_model, mse, lr=1.0, momentum=0.0, damping=lam, adapt_damping=False,
        reject_steps=False, update_every=2, ema=ema, fisher=fisher, weight_decay=wd,
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    q, s, dbar = p, opt.init(p), None
    for t, (X, Y) in enumerate(data):
        kw, loss = {}, mse(X, Y)
        if t % 2 == 0:
            if fisher != "empirical":
                kw["noise"] = opt.step.draw_noise(q, s, X, Y, generator=g)
                est = hessfunc.gnb_diag(_uncovered_model, loss, q, X, Y, noise=kw["noise"][0])
            else:
                gl = torch.func.grad(lambda r: loss(_uncovered_model(r, X, Y)))(q)
                est = {k: v * v * Y.numel() for k, v in gl.items()}  # c = 1 / numel
            est = {k: est[k] for k in ("s", "e")}
            dbar = est if dbar is None else {k: ema * dbar[k] + (1 - ema) * est[k] for k in est}
        new, s, _ = opt.step(q, s, X, Y, **kw)
        grad = torch.func.grad(lambda r: loss(_uncovered_model(r, X, Y)))(q)
        for k in ("s", "e"):
            want = q[k] - (grad[k] + wd * q[k]) / (dbar[k] + lam + wd)
            torch.testing.assert_close(new[k], want, **tol("exact", F64))
            torch.testing.assert_close(s["kfac"]["diag"][k], dbar[k], **tol("exact", F64))
            assert dbar[k].max() > lam  # the diagonal really changes the step
        assert s["kfac"]["diag"]["w"].shape == (0,)  # covered: a placeholder
        q = new
    if fisher == "type-2":
        with pytest.raises(ValueError, match="leaves no layer covers"):
            opt.step(p, opt.init(p), *data[0])


def _tiny_lm(p, x, y):
    # token and position embeddings, pre-LayerNorm causal attention, a final LayerNorm: 6 of
    # the 10 leaves are no layer's weight
    T, D = x.shape[1], p["tok"].shape[1]
    h = F.embedding(x, p["tok"]) + p["pos"][:T]
    q, k, v = F.linear(F.layer_norm(h, (D,), p["ln.w"], p["ln.b"]), p["qkv.w"]).chunk(3, -1)
    scores = (q @ k.transpose(-2, -1)) / D**0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    h = h + F.linear(scores.softmax(-1) @ v, p["out.w"], p["out.b"])
    h = F.layer_norm(h, (D,), p["lnf.w"], p["lnf.b"])
    return F.linear(h, p["head.w"]).reshape(-1, p["head.w"].shape[0])


def _tiny_lm_problem(V=64, D=16, T=16, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = lambda *shape, std: std * torch.randn(*shape, generator=g, dtype=F64)  # noqa: E731
    p = {
        "tok": n(V, D, std=0.02), "pos": n(T, D, std=0.02),
        "ln.w": torch.ones(D, dtype=F64), "ln.b": torch.zeros(D, dtype=F64),
        "qkv.w": n(3 * D, D, std=D**-0.5),
        "out.w": n(D, D, std=D**-0.5), "out.b": torch.zeros(D, dtype=F64),
        "lnf.w": torch.ones(D, dtype=F64), "lnf.b": torch.zeros(D, dtype=F64),
        "head.w": n(V, D, std=0.02),
    }  # fmt: skip
    x = torch.randint(0, V, (6, B, T), generator=g)
    return p, [(xb, (xb + 1) % V) for xb in x]  # next token: this one plus one


def _tiny_lm_losses(opt, p, data, steps):
    s, g, losses = opt.init(p), torch.Generator().manual_seed(1), []
    for t in range(steps):
        p, s, info = opt.step(p, s, *data[t % len(data)], generator=g)
        losses.append(float(info.loss))
    X, Y = data[0]
    return losses, float(CrossEntropyLoss(Y.reshape(-1))(_tiny_lm(p, X, Y))), s


def test_embedding_and_layer_norm_model_takes_finite_decreasing_steps():
    # a small version of the character-level transformer of benchmarks/optim_tasks.py at a
    # small damping: without step rejection the adaptive step size and momentum blow up on
    # this draw (the loss passes 1e30 within 12 steps); with it (the default) every step is
    # finite and the loss falls. At damping 1e-3 the damped diagonal alone trains it.
    p, data = _tiny_lm_problem(seed=4)
    ce = lambda x, y: CrossEntropyLoss(y.reshape(-1))  # noqa: E731
    no_reject = hessfunc.optim.kfac(_tiny_lm, ce, damping=1e-6, fisher="mc", reject_steps=False)
    losses, _, _ = _tiny_lm_losses(no_reject, p, data, 12)
    assert not max(losses) < 1e6  # NaN or huge: the control really diverges
    opt = hessfunc.optim.kfac(_tiny_lm, ce, damping=1e-6, fisher="mc")
    losses, final, s = _tiny_lm_losses(opt, p, data, 12)
    assert all(math.isfinite(x) for x in losses) and max(losses) <= losses[0] + 1e-12
    assert final < losses[0]
    assert s["kfac"]["damping"] > 1e-4  # rejections raised the damping
    losses, final, s = _tiny_lm_losses(
        hessfunc.optim.kfac(_tiny_lm, ce, damping=1e-3, fisher="mc"), p, data, 12
    )
    assert final < 0.5 * losses[0]
    assert s["kfac"]["diag"]["tok"].shape == p["tok"].shape
    # the state, new diagonal included, survives a weights-only round trip
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(leaves(loaded), leaves(s), strict=True))


def test_rejected_step_keeps_params_and_velocity():
    # a fixed, far too long step on least squares raises the loss: it is undone, the previous
    # update is kept and the damping grows by 2 after the Levenberg-Marquardt rule's 1/0.95
    p, X, Y = regression()
    opt = hessfunc.optim.kfac(linear, mse, lr=3.0, momentum=0.0, damping=0.5)
    new, s, info = opt.step(p, opt.init(p), X, Y)
    assert info.rejected.item() and info.predicted.item() > 0  # no decrease, even predicted
    assert all(torch.equal(new[k], p[k]) for k in p)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in leaves(s["kfac"]["velocity"]))
    torch.testing.assert_close(s["kfac"]["damping"], torch.tensor(0.5 / 0.95 * 2, dtype=F64))
    kept = hessfunc.optim.kfac(linear, mse, lr=3.0, momentum=0.0, damping=0.5, reject_steps=False)
    new, _, info = kept.step(p, kept.init(p), X, Y)
    assert not info.rejected.item() and not torch.equal(new["w"], p["w"])


def test_params_and_state_not_modified():
    p, X, Y = mlp_problem()
    opt = hessfunc.optim.kfac(mlp, bce)
    s = opt.init(p)
    p1, s1, _ = opt.step(p, s, X, Y)
    before = [t.clone() for t in leaves((p1, s1))]
    opt.step(p1, s1, X, Y)
    assert all(torch.equal(a, b) for a, b in zip(leaves((p1, s1)), before, strict=True))


def test_state_round_trips_through_weights_only_load_bit_identically():
    p, X, Y = mlp_problem()
    data = batches(6)
    opt = hessfunc.optim.kfac(mlp, bce, fisher="mc", invert_every=2, update_every=2)
    # draw_noise draws what a refreshing step would draw from the generator
    want = opt.step(p, opt.init(p), X, Y, generator=torch.Generator().manual_seed(7))
    u = opt.step.draw_noise(p, opt.init(p), X, Y, generator=torch.Generator().manual_seed(7))
    got = opt.step(p, opt.init(p), X, Y, noise=u)
    assert all(torch.equal(x, y) for x, y in zip(leaves(want), leaves(got), strict=True))
    assert opt.step.update_every == 2

    def run(q, s, g, chunk):
        for Xb, Yb in chunk:
            q, s, info = opt.step(q, s, Xb, Yb, generator=g)
        return q, s, info

    g = torch.Generator().manual_seed(3)
    q, s, _ = run(p, opt.init(p), g, data[:3])
    buf = io.BytesIO()
    torch.save({"params": q, "state": s, "rng": g.get_state()}, buf)
    full = run(q, s, g, data[3:])
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    g2 = torch.Generator()
    g2.set_state(loaded["rng"])
    resumed = run(loaded["params"], loaded["state"], g2, data[3:])
    assert all(torch.equal(x, y) for x, y in zip(leaves(full), leaves(resumed), strict=True))
    assert full[2]._fields[: len(hessfunc.optim.INFO_FIELDS)] == hessfunc.optim.INFO_FIELDS


def test_errors_name_the_fix():
    p, X, Y = mlp_problem()
    with pytest.raises(ValueError, match="lr must be > 0"):
        hessfunc.optim.kfac(mlp, bce, lr=-1.0)
    with pytest.raises(ValueError, match="damping must be > 0"):
        hessfunc.optim.kfac(mlp, bce, damping=-1e-3)
    with pytest.raises(ValueError, match="update_every must be an int >= 1"):
        hessfunc.optim.kfac(mlp, bce, update_every=0)
    with pytest.raises(TypeError, match="function of the batch that returns a hessfunc.losses"):
        hessfunc.optim.kfac(mlp, BCEWithLogitsLoss(Y))
    with pytest.raises(ValueError, match="ema must be < 1"):
        hessfunc.optim.kfac(mlp, bce, ema=1.0)
    opt = hessfunc.optim.kfac(mlp, lambda X, Y: torch.nn.functional.mse_loss)
    with pytest.raises(TypeError, match="must return a hessfunc.losses object"):
        opt.step(p, opt.init(p), X, Y)
    # the base's state checks, with the same messages as every other optimizer
    opt = hessfunc.optim.kfac(mlp, bce, update_every=2)
    sophia = hessfunc.optim.sophia(mlp, bce, lr=0.1)
    with pytest.raises(TypeError, match="state was not made by this optimizer"):
        opt.step(p, sophia.init(p), X, Y)
    with pytest.raises(TypeError, match="state was not made by this optimizer"):
        opt.step(p, (torch.zeros(()),), X, Y)
    with pytest.raises(ValueError, match="another parameter structure"):
        opt.step(p, opt.init({"w1": p["w1"]}), X, Y)
    wider, _, _ = mlp_problem(h=6)
    with pytest.raises(ValueError, match="belongs to other parameters"):
        opt.step(p, opt.init(wider), X, Y)
    s = opt.init(p)
    with pytest.raises(TypeError, match="another version or configuration"):
        opt.step(p, {"kfac": {k: v for k, v in s["kfac"].items() if k != "A"}}, X, Y)
    with pytest.raises(TypeError, match="refresh must be None or a Python bool"):
        opt.step(p, s, X, Y, refresh=torch.tensor(True))
    with pytest.raises(ValueError, match="only used with fisher='mc' or 'type-2'"):
        emp = hessfunc.optim.kfac(mlp, bce, fisher="empirical")
        emp.step(p, emp.init(p), X, Y, generator=torch.Generator())
    mc = hessfunc.optim.kfac(mlp, bce, fisher="mc")
    with pytest.raises(ValueError, match="exactly one|generator"):
        mc.step(p, mc.init(p), X, Y)
    with pytest.raises(ValueError, match="generator="):
        hessfunc.optim.ModuleOptimizer(torch.nn.Linear(2, 2), mc)

    # factors of the two-layer model, but model_fn now uses w2 outside a layer
    def other(q, X, Y):
        return torch.tanh(F.linear(X, q["w1"], q["b1"])) @ q["w2"].T.clone() + q["b2"]

    _, s1, _ = opt.step(p, s, X, Y)
    with pytest.raises(ValueError, match="do not match the layers of model_fn"):
        hessfunc.optim.kfac(other, bce).step(p, s1, X, Y)


def _net(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return net.double()


def _driver_opt(net, **kw):
    apply, _ = hessfunc.from_module(net)
    return hessfunc.optim.kfac(lambda q, X, Y: apply(q, X), bce, **kw)


def test_module_optimizer_and_its_state_dict_round_trip():
    net = _net(0)
    opt = _driver_opt(net, fisher="mc", update_every=2, invert_every=3)
    driver = hessfunc.optim.ModuleOptimizer(net, opt, generator=torch.Generator().manual_seed(1))
    data = batches(1, d=4) * 6  # one batch: its loss must fall
    weight = net[0].weight
    losses = [float(driver.step(*b).loss) for b in data[:3]]
    assert net[0].weight is weight and weight.requires_grad and weight.grad is None
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": driver.state_dict()}, buf)
    losses += [float(driver.step(*b).loss) for b in data[3:]]
    assert losses[-1] < losses[0]
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    other = _net(5)
    other.load_state_dict(checkpoint["model"])
    resumed = hessfunc.optim.ModuleOptimizer(other, opt, generator=torch.Generator())
    resumed.load_state_dict(checkpoint["opt"])
    assert [float(resumed.step(*b).loss) for b in data[3:]] == losses[3:]
    for x, y in zip(other.parameters(), net.parameters(), strict=True):
        assert torch.equal(x, y)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_module_optimizer_equals_eager_without_recompiles(fresh_dynamo, one_thread):
    """22 steps through the module driver, eager and compiled: three graphs (the first step,
    refreshing steps, plain steps), all built by step 3; then no recompilation, and the whole
    state equals eager's at every step; a state_dict restored mid-run replays bit for bit."""
    eager_net, compiled_net = _net(0), _net(0)
    kw = dict(fisher="mc", update_every=2, invert_every=3, damping=1e-2)
    eager = hessfunc.optim.ModuleOptimizer(
        eager_net, _driver_opt(eager_net, **kw), generator=torch.Generator().manual_seed(4)
    )
    compiled = hessfunc.optim.ModuleOptimizer(
        compiled_net,
        _driver_opt(compiled_net, **kw),
        generator=torch.Generator().manual_seed(4),
        compile=True,
    )
    data = batches(22, d=4)
    saved, replay = None, []
    for t, batch in enumerate(data):
        want = eager.step(*batch)
        with torch.compiler.set_stance("fail_on_recompile" if t >= 3 else "default"):
            got = compiled.step(*batch)
        for a, b in zip(leaves((got, compiled.state)), leaves((want, eager.state)), strict=True):
            torch.testing.assert_close(a, b, **tol("exact", F64), equal_nan=True)
        for x, y in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
            torch.testing.assert_close(x, y, **tol("exact", F64))
        if t == 15:
            saved = (compiled.state_dict(), [x.clone() for x in compiled_net.parameters()])
        if t > 15:
            replay.append(got)
    assert eager.state["kfac"]["count"].item() == 22
    state_dict, weights = saved
    with torch.no_grad():
        for x, w in zip(compiled_net.parameters(), weights, strict=True):
            x.copy_(w)
    compiled.load_state_dict(state_dict)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = [compiled.step(*b) for b in data[16:]]
    assert all(torch.equal(x, y) for x, y in zip(leaves(again), leaves(replay), strict=True))


@pytest.mark.full
def test_compiled_step_with_uncovered_leaves_equals_eager(fresh_dynamo, one_thread):
    """The diagonal and the rejection compile too: eight steps with update_every=2, no
    recompilation once the first, refreshing and plain steps have run; the state equals
    eager's every step (about 45 s of compiling on this CPU: --full)."""
    p, _, _ = regression()
    p |= {"s": torch.tensor(1.5, dtype=F64), "e": torch.tensor([0.2, -0.1], dtype=F64)}
    data = batches(8, d=3, o=2)
    opt = hessfunc.optim.kfac(_uncovered_model, mse, fisher="mc", update_every=2, damping=1e-2)
    cstep = torch.compile(opt.step, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    pe, se = p, opt.init(p)
    pc, sc = pe, se
    for t, (X, Y) in enumerate(data):
        kw = {"noise": opt.step.draw_noise(pe, se, X, Y, generator=g)} if t % 2 == 0 else {}
        pe, se, ie = opt.step(pe, se, X, Y, refresh=t % 2 == 0, **kw)
        with torch.compiler.set_stance("fail_on_recompile" if t >= 3 else "default"):
            pc, sc, ic = cstep(pc, sc, X, Y, refresh=t % 2 == 0, **kw)
        for a, b in zip(leaves((pc, sc, ic)), leaves((pe, se, ie)), strict=True):
            torch.testing.assert_close(a, b, **tol("exact", F64), equal_nan=True)
    assert se["kfac"]["diag"]["e"].shape == (2,)


@pytest.mark.full
def test_compiled_autoencoder_state():
    # a deeper model, as in benchmarks/bench_optim.py: the whole returned state (the previous
    # update included) equals eager's after compiled steps fed their own output
    sizes = (8, 16, 12, 4, 12, 16, 8)
    g = torch.Generator().manual_seed(0)
    p = {}
    for i, (d, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        p[f"w{i}"] = torch.randn(o, d, generator=g, dtype=F64) / d**0.5
        p[f"b{i}"] = torch.zeros(o, dtype=F64)

    def model(q, x):
        for i in range(len(sizes) - 1):
            x = F.linear(x, q[f"w{i}"], q[f"b{i}"])
            if i not in (2, len(sizes) - 2):
                x = torch.tanh(x)
        return x

    X = torch.rand(32, 8, generator=g, dtype=F64)
    opt = hessfunc.optim.kfac(model, lambda x: BCEWithLogitsLoss(x), fisher="mc", damping=1e-3)
    cstep = torch.compile(opt.step, fullgraph=True)
    noise = [torch.rand(1, 32, 8, generator=g, dtype=F64) for _ in range(4)]
    pe, se, _ = opt.step(p, opt.init(p), X, noise=noise[0])
    pc, sc = pe, se
    for u in noise[1:]:
        pe, se, _ = opt.step(pe, se, X, noise=u)
        pc, sc, _ = cstep(pc, sc, X, noise=u)
    for a, b in zip(leaves((pe, se)), leaves((pc, sc)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.full
def test_same_steps_as_kfac_jax_when_every_choice_matches():
    # kfac-jax (a peer, when installed) with exact GGN factors of the batch, exact inverses and
    # the damping adapted every step by 19/20 takes the steps hessfunc takes: loss, step size,
    # momentum, predicted change, reduction ratio, damping and parameters, three steps, float64
    jax = pytest.importorskip("jax")
    kfac_jax = pytest.importorskip("kfac_jax")
    jnp = jax.numpy
    p, X, Y = mlp_problem()
    data = [(X, Y), *batches(2)]
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        # kfac-jax finds a dense layer only as h @ w + b, so its weights are ours transposed
        jp = {k: jnp.asarray((v.T if k[0] == "w" else v).numpy()) for k, v in p.items()}

        def loss_fn(q, batch):
            x, y = batch
            h = jnp.tanh(x @ q["w1"] + q["b1"])
            z = h @ q["w2"] + q["b2"]
            # per-element mean: registered with weight 1 / outputs (kfac-jax divides by rows)
            kfac_jax.register_sigmoid_cross_entropy_loss(z, y, weight=1.0 / z.shape[-1])
            return (jnp.logaddexp(0.0, z) - y * z).mean()

        jopt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
            use_adaptive_learning_rate=True, use_adaptive_momentum=True,
            use_adaptive_damping=True, initial_damping=0.1, multi_device=False,
            num_burnin_steps=0, estimation_mode="ggn_exact", use_exact_inverses=True,
            damping_adaptation_interval=1, damping_adaptation_decay=0.95, curvature_ema=0.0,
            inverse_update_period=1,
        )  # fmt: skip
        opt = hessfunc.optim.kfac(mlp, bce, damping=0.1, fisher="type-2", ema=0.0, invert_every=1)
        rng = jax.random.PRNGKey(0)
        as_jax = [tuple(jnp.asarray(t.numpy()) for t in b) for b in data]
        js, s = jopt.init(jp, rng, as_jax[0]), opt.init(p)
        for t, (b, jb) in enumerate(zip(data, as_jax, strict=True)):
            jp, js, st = jopt.step(jp, js, rng, batch=jb, global_step_int=t)
            p, s, info = opt.step(p, s, *b)
            theirs = [st["loss"], st["learning_rate"], st["momentum"], st["quad_model_change"],
                      st["rho"], js.damping]  # fmt: skip
            ours = [info.loss, info.lr, info.momentum, info.predicted, info.rho,
                    s["kfac"]["damping"]]  # fmt: skip
            torch.testing.assert_close(
                torch.tensor([float(x) for x in theirs], dtype=F64), torch.stack(ours),
                **tol("exact", F64),
            )  # fmt: skip
            for k, v in p.items():
                w = torch.from_numpy(jax.device_get(jp[k]).copy())
                torch.testing.assert_close(w.T if k[0] == "w" else w, v, **tol("exact", F64))
        assert abs(info.momentum.item()) > 1e-3  # the 2x2 model was really used
    finally:
        jax.config.update("jax_enable_x64", old)
