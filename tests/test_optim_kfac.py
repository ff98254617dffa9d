"""The K-FAC optimizer: Newton's step where K-FAC is the Hessian, the quadratic model's choice
of step size and momentum against a dense solve, the damping rule, compiled against eager,
and state round trips."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import hessfunc
import hessfunc.optim
from hessfunc.losses import BCEWithLogitsLoss, MSELoss
from hessfunc.optim.kfac import KFACState, lm_damping

F64 = torch.float64


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
    lam = s1.damping
    p2, s2, info2 = opt.step(p1, s1, X, Y)
    # the direction, independently: the batch's K-FAC solved with damping lam + wd
    g = torch.func.grad(lambda q: bce(X, Y)(mlp(q, X, Y)) + 0.5 * wd * sum(
        (t * t).sum() for t in q.values()))(p1)  # fmt: skip
    K = hessfunc.kfac(mlp, bce(X, Y), p1, X, Y)
    d = K.solve(g, lam + wd)
    d = {k: -v for k, v in d.items()}
    flat = lambda t: hessfunc.ravel(t)[0]  # noqa: E731
    D, V, gv = flat(d), flat(s1.velocity), flat(g)
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
    torch.testing.assert_close(s.damping, torch.tensor(0.5 * 0.95, dtype=F64), rtol=1e-15, atol=0)
    assert info.damping.item() == 0.5


def test_factors_ema_and_update_every():
    p, X, Y = mlp_problem()
    (X1, Y1), (X2, Y2), (X3, Y3) = batches(3)
    opt = hessfunc.optim.kfac(mlp, bce, ema=0.25, update_every=2, lr=0.1, momentum=0.0)
    p1, s1, _ = opt.step(p, opt.init(p), X1, Y1)
    K1 = hessfunc.kfac(mlp, bce(X1, Y1), p, X1, Y1)
    for a, b in zip(s1.A, K1.A, strict=True):
        torch.testing.assert_close(a, b, **tol("exact", F64))
    p2, s2, _ = opt.step(p1, s1, X2, Y2)  # count 1: no update
    assert all(torch.equal(a, b) for a, b in zip(s2.A, s1.A, strict=True))
    _, s3, _ = opt.step(p2, s2, X3, Y3)  # count 2: update
    K3 = hessfunc.kfac(mlp, bce(X3, Y3), p2, X3, Y3)
    for a, o, n in zip(s3.G, s2.G, K3.G, strict=True):
        torch.testing.assert_close(a, 0.25 * o + 0.75 * n, **tol("exact", F64))


def test_uncovered_leaf_gets_a_damped_gradient_step():
    def scaled(p, X, Y):
        return p["s"] * F.linear(X, p["w"], p["b"])

    p, X, Y = regression()
    p["s"] = torch.tensor(1.5, dtype=F64)
    lam = 0.3
    opt = hessfunc.optim.kfac(scaled, mse, lr=1.0, momentum=0.0, damping=lam, adapt_damping=False)
    new, _, _ = opt.step(p, opt.init(p), X, Y)
    g = torch.func.grad(lambda q: mse(X, Y)(scaled(q, X, Y)))(p)
    torch.testing.assert_close(new["s"], p["s"] - g["s"] / lam, **tol("exact", F64))
    assert g["s"].abs().item() > 1e-3


def test_params_and_state_not_modified():
    p, X, Y = mlp_problem()
    opt = hessfunc.optim.kfac(mlp, bce)
    s = opt.init(p)
    p1, s1, _ = opt.step(p, s, X, Y)
    leaves = torch.utils._pytree.tree_leaves
    before = [t.clone() for t in leaves((p1, s1))]
    opt.step(p1, s1, X, Y)
    assert all(torch.equal(a, b) for a, b in zip(leaves((p1, s1)), before, strict=True))


def test_state_round_trip_is_bit_identical():
    p, X, Y = mlp_problem()
    data = batches(6)
    opt = hessfunc.optim.kfac(mlp, bce, fisher="mc", invert_every=2)
    noises = [torch.rand(1, *Yb.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
              for i, (_, Yb) in enumerate(data)]  # fmt: skip
    s, q = opt.init(p), p
    for (Xb, Yb), u in zip(data[:3], noises[:3], strict=True):
        q, s, _ = opt.step(q, s, Xb, Yb, noise=u)
    buf = io.BytesIO()
    torch.save((q, s), buf)
    buf.seek(0)
    q2, s2 = torch.load(buf, weights_only=False)
    assert isinstance(s2, KFACState)
    for (Xb, Yb), u in zip(data[3:], noises[3:], strict=True):
        q, s, i1 = opt.step(q, s, Xb, Yb, noise=u)
        q2, s2, i2 = opt.step(q2, s2, Xb, Yb, noise=u)
        assert all(torch.equal(q[k], q2[k]) for k in q)
        assert torch.equal(i1.damping, i2.damping) and torch.equal(i1.lr, i2.lr)


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
    opt = hessfunc.optim.kfac(mlp, bce)
    with pytest.raises(TypeError, match="a state from another optimizer"):
        opt.step(p, (torch.zeros(()),), X, Y)
    with pytest.raises(ValueError, match="parameters of another structure"):
        opt.step(p, opt.init({"w1": p["w1"]}), X, Y)
    # factors of a one-layer model, velocity of this one: the layers do not match
    lin = hessfunc.optim.kfac(linear, mse)
    r, Xr, Yr = regression()
    _, s, _ = lin.step(r, lin.init(r), Xr, Yr)
    bad = s._replace(velocity={k: torch.zeros_like(v) for k, v in p.items()})
    with pytest.raises(ValueError, match="do not match the layers of model_fn"):
        opt.step(p, bad, X, Y)


@pytest.fixture(scope="module")
def compiled_step():
    opt = hessfunc.optim.kfac(
        mlp, bce, update_every=2, invert_every=3, damping=1e-2, fisher="empirical"
    )
    return opt, torch.compile(opt.step, fullgraph=True)


def test_compiled_equals_eager_without_recompiles(compiled_step):
    opt, cstep = compiled_step
    p, X, Y = mlp_problem()
    data = batches(22)
    # one eager step gives the state its factors: from then on one graph serves every step
    q, s, _ = opt.step(p, opt.init(p), X, Y)
    for k, (Xb, Yb) in enumerate(data):
        with torch.compiler.set_stance("fail_on_recompile" if k > 0 else "default"):
            qc, sc, ic = cstep(q, s, Xb, Yb)
        qe, se, ie = opt.step(q, s, Xb, Yb)
        for a, b in zip(torch.utils._pytree.tree_leaves((qc, sc, ic)),
                        torch.utils._pytree.tree_leaves((qe, se, ie)), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, **tol("exact", F64), equal_nan=True)
        q, s = qe, se
    assert s.count.item() == 23


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
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves((pe, se)), leaves((pc, sc)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
