"""K-FAC and EK-FAC against closed forms, the dense GGN, and curvlinops on the same models.

References, strongest first: the GGN itself where K-FAC is exact (one linear or convolution
layer with MSE: every sample has the same output Hessian), closed forms (the empirical Fisher of
logistic regression), curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` (a test-only
dependency, module hooks instead of a traced function) on the same model, data and conventions,
and EK-FAC's defining optimality against the dense GGN's diagonal blocks. float64 throughout;
"exact" agreement is held to 1e-12 (closed forms) or 1e-10 (curvlinops).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss

EXACT = dict(rtol=1e-12, atol=1e-12)
PEER = dict(rtol=1e-10, atol=1e-10)


def linear(p, X):
    return F.linear(X, p["w"], p.get("b"))


def mlp(seed: int = 0, widths=(5, 8, 6, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh() if i % 2 == 0 else nn.ReLU())
    return nn.Sequential(*layers).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


def data(shape, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


def indices(layout, names) -> torch.Tensor:
    """Ravel indices of the leaves with the given paths."""
    out, start = [], 0
    for path, shape in zip(layout.paths, layout.shapes, strict=True):
        n = math.prod(shape)
        if path in names:
            out.append(torch.arange(start, start + n))
        start += n
    return torch.cat(out)


# ------------------------------------------------------------------------ exact on one layer


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_linear_layer_with_mse_is_the_ggn(reduction):
    X, _ = data((9, 4))
    p = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    loss = MSELoss(torch.randn(9, 3), reduction=reduction)
    G = hessfunc.ggn_matrix(linear, loss, p, X)
    K = hessfunc.kfac(linear, loss, p, X)
    assert [b.names for b in K.layout.blocks] == [("['w']", "['b']")]
    torch.testing.assert_close(K.dense(), G, **EXACT)
    torch.testing.assert_close(hessfunc.ekfac(linear, loss, p, X).dense(), G, **EXACT)
    # separate blocks: the GGN without its weight-bias coupling
    Ks = hessfunc.kfac(linear, loss, p, X, separate_bias=True)
    assert [b.names for b in Ks.layout.blocks] == [("['w']",), ("['b']",)]
    blockdiag = G.clone()
    blockdiag[:12, 12:] = 0
    blockdiag[12:, :12] = 0
    torch.testing.assert_close(Ks.dense(), blockdiag, **EXACT)
    assert (G[:12, 12:].abs() > 1e-3).any()  # the coupling it drops is real


CONVS = [
    # (dims, conv kwargs): padding as ints, "same" (odd and even totals), "valid"; strides,
    # dilations, channel groups
    (1, dict(padding=2, stride=2)),
    (1, dict(padding="same", dilation=2, groups=2)),
    (2, dict(padding=1, groups=2)),
    (2, dict(padding="same", kernel_size=(2, 3))),
    (2, dict(padding="valid", stride=(2, 1), dilation=(1, 2))),
    (3, dict(padding=(1, 0, 1), stride=2)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("dims, kwargs", CONVS, ids=[f"{d}d-{k}" for d, k in CONVS])
def test_one_convolution_with_mse_is_the_ggn(dims, kwargs):
    # every output element depends on one input patch, so with MSE the expand approximation
    # is exact: this pins the unfold convention (patch order, padding, stride, dilation, groups)
    kwargs = {"kernel_size": 3, **kwargs}
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{dims}d")(4, 6, **kwargs).double()
    apply, params = hessfunc.from_module(conv)
    X = torch.randn(3, 4, *([7, 6, 5][:dims]))
    out = apply(params, X)
    loss = MSELoss(torch.randn(out.shape), reduction="mean")
    K = hessfunc.kfac(apply, loss, params, X)
    torch.testing.assert_close(K.dense(), hessfunc.ggn_matrix(apply, loss, params, X), **EXACT)


def test_unbatched_inputs():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3).double()
    apply, params = hessfunc.from_module(conv)
    x = torch.randn(2, 6)  # (channels, length): no batch axis, so one sample: one output row

    def model_fn(p, x):
        return apply(p, x).reshape(1, -1)

    loss = MSELoss(torch.randn(1, 12), reduction="sum")
    K = hessfunc.kfac(model_fn, loss, params, x)
    torch.testing.assert_close(K.dense(), hessfunc.ggn_matrix(model_fn, loss, params, x), **EXACT)
    lin = {"w": torch.randn(3, 4)}  # and a linear layer on a single vector
    x1 = torch.randn(4)
    loss1 = MSELoss(torch.randn(1, 3), reduction="sum")
    one = lambda p, x: linear(p, x).unsqueeze(0)  # noqa: E731
    torch.testing.assert_close(
        hessfunc.kfac(one, loss1, lin, x1).dense(),
        hessfunc.ggn_matrix(one, loss1, lin, x1),
        **EXACT,
    )


# ------------------------------------------------------------------------------- curvlinops


def curvlinops_dense(op_class, net, loss_module, X, y, **kwargs):
    n = sum(p.numel() for p in net.parameters())
    op = op_class(
        net, loss_module, list(net.parameters()), [(X, y)], check_deterministic=False, **kwargs
    )
    return op @ torch.eye(n)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("separate_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_agrees_with_curvlinops_on_cross_entropy(model, separate_bias, reduction):
    cl = pytest.importorskip("curvlinops")
    net = mlp() if model == "mlp" else cnn()
    X, y = data((12, 5) if model == "mlp" else (6, 2, 6, 6))
    apply, params = hessfunc.from_module(net)
    loss = CrossEntropyLoss(y, reduction=reduction)
    for ours, theirs in (
        (hessfunc.kfac, cl.KFACLinearOperator),
        (hessfunc.ekfac, cl.EKFACLinearOperator),
    ):
        mine = ours(apply, loss, params, X, separate_bias=separate_bias).dense()
        ref = curvlinops_dense(
            theirs,
            net,
            nn.CrossEntropyLoss(reduction=reduction),
            X,
            y,
            fisher_type="type-2",
            separate_weight_and_bias=separate_bias,
        )
        torch.testing.assert_close(mine, ref, **PEER)


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_agrees_with_curvlinops_on_mse_and_bce(fisher):
    cl = pytest.importorskip("curvlinops")
    net = mlp(widths=(4, 6, 2))
    X, _ = data((10, 4))
    apply, params = hessfunc.from_module(net)
    targets = {
        "mse": (torch.randn(10, 2), MSELoss, nn.MSELoss),
        "bce": ((torch.randn(10, 2) > 0).double(), BCEWithLogitsLoss, nn.BCEWithLogitsLoss),
    }
    for y, ours, theirs in targets.values():
        for op, fn in (
            (cl.KFACLinearOperator, hessfunc.kfac),
            (cl.EKFACLinearOperator, hessfunc.ekfac),
        ):
            mine = fn(apply, ours(y), params, X, fisher=fisher).dense()
            ref = curvlinops_dense(
                op, net, theirs(), X, y, fisher_type=fisher, separate_weight_and_bias=False
            )
            torch.testing.assert_close(mine, ref, **PEER)


def test_weight_sharing_expands_over_positions_like_curvlinops():
    cl = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 7, 4)  # 6 sequences of 7 positions
    y = torch.randn(6, 7, 3)
    apply, params = hessfunc.from_module(net)
    mine = hessfunc.kfac(apply, MSELoss(y), params, X).dense()
    ref = curvlinops_dense(
        cl.KFACLinearOperator,
        net,
        nn.MSELoss(),
        X,
        y,
        fisher_type="type-2",
        separate_weight_and_bias=False,
    )
    torch.testing.assert_close(mine, ref, **PEER)


def test_a_weight_called_once_per_position_equals_one_call_over_the_sequence():
    # expand: every call of a shared weight is one more position, within the same sample
    torch.manual_seed(0)
    p = {"w": torch.randn(3, 4), "b": torch.randn(3), "v": torch.randn(2, 3)}
    X = torch.randn(5, 6, 4)

    def batched(p, X):
        return F.linear(torch.tanh(F.linear(X, p["w"], p["b"])).sum(1), p["v"])

    def looped(p, X):
        h = torch.stack([F.linear(X[:, t], p["w"], p["b"]) for t in range(X.shape[1])], 1)
        return F.linear(torch.tanh(h).sum(1), p["v"])

    loss = CrossEntropyLoss(torch.tensor([0, 1, 1, 0, 1]))
    for fn in (hessfunc.kfac, hessfunc.ekfac):
        a, b = fn(batched, loss, p, X), fn(looped, loss, p, X)
        torch.testing.assert_close(a.dense(), b.dense(), **EXACT)
    assert int(hessfunc.kfac(looped, loss, p, X).positions[0]) == 30


# ------------------------------------------------------------------------------ EK-FAC


def test_ekfac_error_is_at_most_kfac_error_on_every_block():
    net = mlp(seed=3)
    X, y = data((16, 5), seed=4)
    apply, params = hessfunc.from_module(net)
    loss = CrossEntropyLoss(y)
    G = hessfunc.ggn_matrix(apply, loss, params, X)
    K = hessfunc.kfac(apply, loss, params, X)
    E = hessfunc.ekfac(apply, loss, params, X)
    Kd, Ed = K.dense(), E.dense()
    assert len(K.layout.blocks) == 3
    for block in K.layout.blocks:
        i = indices(K.layout, block.names)
        ref = G[i][:, i]
        err_k = torch.linalg.norm(Kd[i][:, i] - ref)
        err_e = torch.linalg.norm(Ed[i][:, i] - ref)
        # the factors are not exact here, and EK-FAC is strictly better on every block
        assert err_k > 1e-3 * torch.linalg.norm(ref), block.names
        assert err_e < 0.99 * err_k, (block.names, float(err_e), float(err_k))
        # its eigenvalues are the GGN block's diagonal in the Kronecker eigenbasis
    for qa, qg, ev, block in zip(
        E.input_bases, E.grad_bases, E.eigenvalues, E.layout.blocks, strict=True
    ):
        i = indices(K.layout, block.names)
        # ravel order of a joint block is [W rows, b]; the Kronecker order is rows of [W | b]
        o, d = block.out_features, block.in_features
        perm = torch.cat([torch.arange(o * d).reshape(o, d), o * d + torch.arange(o)[:, None]], 1)
        ref = G[i][:, i][perm.reshape(-1)][:, perm.reshape(-1)]
        q = torch.kron(qg[0], qa[0])
        torch.testing.assert_close(ev[0].reshape(-1), (q.T @ ref @ q).diagonal(), **PEER)


# ------------------------------------------------------------------------------- solve


def test_solve_is_the_exact_damped_inverse():
    net = mlp()
    X, y = data((12, 5))
    apply, params = hessfunc.from_module(net)
    loss = CrossEntropyLoss(y)
    b = _tree.random_like(params, torch.Generator().manual_seed(5))
    flat_b, unravel = hessfunc.ravel(b)
    for damping in (1e-3, 0.5):
        for op in (hessfunc.kfac(apply, loss, params, X), hessfunc.ekfac(apply, loss, params, X)):
            M = op.dense() + damping * torch.eye(flat_b.numel())
            x = hessfunc.ravel(op.solve(b, damping))[0]
            torch.testing.assert_close(x, torch.linalg.solve(M, flat_b), rtol=1e-9, atol=1e-9)
            # and matvec inverts it
            back = hessfunc.ravel(op.matvec(unravel(x)))[0] + damping * x
            torch.testing.assert_close(back, flat_b, rtol=1e-9, atol=1e-9)


def test_pi_damping_is_the_factored_tikhonov_inverse():
    X, _ = data((9, 4))
    p = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    K = hessfunc.kfac(linear, CrossEntropyLoss(torch.tensor([0, 1, 2] * 3)), p, X)
    lam = 0.3
    A, G = K.A[0][0], K.G[0][0]
    pi = math.sqrt((A.trace() / 5) / (G.trace() / 3))
    inv = torch.kron(
        torch.linalg.inv(G + math.sqrt(lam) / pi * torch.eye(3)),
        torch.linalg.inv(A + pi * math.sqrt(lam) * torch.eye(5)),
    )
    b = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    x = K.solve(b, lam, method="pi")
    flat = torch.cat([b["w"], b["b"][:, None]], 1).reshape(-1)  # Kronecker order [W | b]
    ref = (inv @ flat).reshape(3, 5)
    torch.testing.assert_close(x["w"], ref[:, :4], **PEER)
    torch.testing.assert_close(x["b"], ref[:, 4], **PEER)


def test_kfac_preconditions_cg_where_input_scales_dominate():
    # Where K-FAC is the GGN (one linear layer, MSE) preconditioned CG needs one iteration.
    # Softmax regression on features whose scales span four orders of magnitude: the input
    # factor captures that scaling, and K-FAC / EK-FAC cut CG's iterations more than tenfold
    # (measured: 264 -> 19 / 18 at damping 1e-4). On well-scaled inputs they need not help
    # (README: digits MLP).
    X, _ = data((9, 4))
    p = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    loss = MSELoss(torch.randn(9, 3))
    b = _tree.random_like(p, torch.Generator().manual_seed(1))
    K = hessfunc.kfac(linear, loss, p, X).eigendecompose()

    def ggn(v):
        return hessfunc.ggn_vp(linear, loss, p, v, X)

    def pre(r):
        return K.solve(r, 1e-3)

    assert (
        int(hessfunc.cg(ggn, b, maxiter=15, damping=1e-3, tol=1e-10, preconditioner=pre).iterations)
        == 1
    )
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 10, generator=g) * torch.logspace(-2, 2, 10)
    y = torch.randint(0, 4, (64,), generator=g)
    p = {"w": 0.01 * torch.randn(4, 10, generator=g), "b": torch.zeros(4)}
    loss = CrossEntropyLoss(y)
    b = _tree.random_like(p, torch.Generator().manual_seed(1))
    lam = 1e-4

    def ggn(v):
        return hessfunc.ggn_vp(linear, loss, p, v, X)

    plain = hessfunc.cg(ggn, b, maxiter=300, damping=lam, tol=1e-8)
    for op in (
        hessfunc.kfac(linear, loss, p, X).eigendecompose(),
        hessfunc.ekfac(linear, loss, p, X),
    ):
        res = hessfunc.cg(
            ggn,
            b,
            maxiter=300,
            damping=lam,
            tol=1e-8,
            preconditioner=lambda r, op=op: op.solve(r, lam),
        )
        assert int(res.iterations) < int(plain.iterations) / 5, (res.iterations, plain.iterations)
        torch.testing.assert_close(res.x, plain.x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Fisher types


def test_mc_converges_to_type2_within_its_standard_deviation():
    # One linear layer of logits with summed cross-entropy: the output gradients are the
    # residuals r = p - e_y themselves, so G_mc = (1/S) sum_s sum_n r r^T is an average of S
    # independent draws with mean G = sum_n (diag p_n - p_n p_n^T), and
    # E ||G_mc - G||_F^2 = sigma^2 = (1/S) sum_n (E ||r||^4 - ||diag p_n - p_n p_n^T||_F^2),
    # with E ||r||^4 = sum_k p_nk ||p_n - e_k||^4 in closed form. Chebyshev: the error exceeds
    # 10 sigma with probability at most 1%. The error is a norm of a sum of S * N independent
    # terms in 16 dimensions, so an error below sigma / 10 would mean no sampling happened.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 3, generator=g)
    p = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    y = torch.randint(0, 4, (16,), generator=g)
    loss = CrossEntropyLoss(y, reduction="sum")
    S = 20000
    G2 = hessfunc.kfac(linear, loss, p, X).G[0][0]
    Gmc = hessfunc.kfac(linear, loss, p, X, fisher="mc", mc_samples=S, generator=g).G[0][0]
    probs = torch.softmax(linear(p, X), -1)
    eye = torch.eye(4)
    fourth = ((probs[:, None, :] - eye[None]).pow(2).sum(-1).pow(2) * probs).sum(-1)
    H = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    sigma = math.sqrt(float((fourth - H.pow(2).sum((1, 2))).sum()) / S)
    err = float(torch.linalg.norm(Gmc - G2))
    assert sigma / 10 < err < 10 * sigma, (err, sigma)
    assert 10 * sigma < 0.1 * float(torch.linalg.norm(G2))  # the bound says something


def test_mc_generator_noise_and_chunks_agree():
    net = mlp()
    X, y = data((8, 5))
    apply, params = hessfunc.from_module(net)
    loss = CrossEntropyLoss(y)
    u = torch.rand((3, 8, 3), generator=torch.Generator().manual_seed(9))
    by_noise = hessfunc.kfac(apply, loss, params, X, fisher="mc", noise=u, mc_samples=3)
    by_gen = hessfunc.kfac(
        apply,
        loss,
        params,
        X,
        fisher="mc",
        mc_samples=3,
        generator=torch.Generator().manual_seed(9),
    )
    chunked = hessfunc.kfac(
        apply, loss, params, X, fisher="mc", noise=u, mc_samples=3, chunk_size=2
    )
    for other in (by_gen, chunked):
        torch.testing.assert_close(other.dense(), by_noise.dense(), **EXACT)
    for fisher in ("type-2", "mc"):
        kw = dict(noise=u, mc_samples=3) if fisher == "mc" else {}
        a = hessfunc.ekfac(apply, loss, params, X, fisher=fisher, **kw)
        b = hessfunc.ekfac(apply, loss, params, X, fisher=fisher, chunk_size=1, **kw)
        torch.testing.assert_close(b.dense(), a.dense(), **EXACT)


def test_empirical_matches_the_closed_form_on_logistic_regression():
    # logits f_n = w.x_n + b, BCE mean over N: the per-sample gradient is r_n (x_n, 1) with
    # r_n = sigmoid(f_n) - y_n, so G = (1/N) sum r^2 (1x1), A = (1/N) sum x~ x~^T, and EK-FAC's
    # eigenvalues are (1/N) sum_n r_n^2 (q^T x~_n)^2 in the eigenbasis q of A
    g = torch.Generator().manual_seed(2)
    X = torch.randn(20, 3, generator=g)
    y = (torch.rand(20, 1, generator=g) > 0.5).double()
    p = {"w": torch.randn(1, 3, generator=g), "b": torch.randn(1, generator=g)}
    loss = BCEWithLogitsLoss(y)
    r = (torch.sigmoid(linear(p, X)) - y).squeeze(1)
    Xt = torch.cat([X, torch.ones(20, 1)], 1)
    A = Xt.T @ Xt / 20
    K = hessfunc.kfac(linear, loss, p, X, fisher="empirical")
    torch.testing.assert_close(K.A[0][0], A, **EXACT)
    torch.testing.assert_close(K.G[0][0], (r**2).mean().reshape(1, 1), **EXACT)
    E = hessfunc.ekfac(linear, loss, p, X, fisher="empirical")
    q = E.input_bases[0][0]
    torch.testing.assert_close(
        E.eigenvalues[0][0][0], ((r[:, None] * (Xt @ q)) ** 2).mean(0), **EXACT
    )
    F_emp = (r[:, None] * Xt).T @ (r[:, None] * Xt) / 20  # the empirical Fisher itself
    torch.testing.assert_close(
        E.dense(), q @ torch.diag((q.T @ F_emp @ q).diagonal()) @ q.T, **EXACT
    )


def test_nll_has_no_type2_curvature():
    X, y = data((6, 4))
    p = {"w": torch.randn(3, 4)}
    K = hessfunc.kfac(lambda p, X: torch.log_softmax(linear(p, X), -1), NLLLoss(y), p, X)
    assert torch.count_nonzero(K.dense()) == 0


# ------------------------------------------------------------------------ sums over samples


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sums_over_batches_are_the_factors_of_the_union(reduction):
    net = mlp()
    X, y = data((14, 5))
    apply, params = hessfunc.from_module(net)
    parts = [(X[:9], y[:9]), (X[9:], y[9:])]  # a short last batch

    def batch(X, y, **kw):
        return hessfunc.kfac(apply, CrossEntropyLoss(y, reduction=reduction), params, X, **kw)

    whole = batch(X, y)
    first, second = batch(*parts[0]), batch(*parts[1])
    summed = first.add(second)
    torch.testing.assert_close(summed.dense(), whole.dense(), **EXACT)
    # a plain leafwise sum of the pytrees (what a dataset or all-reduce of them does) is the same
    torch.testing.assert_close(_tree.add(first, second).dense(), whole.dense(), **EXACT)
    dataset = hessfunc.data.sum_over(batch, parts)
    torch.testing.assert_close(dataset.dense(), whole.dense(), **EXACT)
    assert _tree.tree_leaves(summed.layout) == []
    assert int(summed.loss_terms if reduction == "mean" else 14) == 14
    # EK-FAC in one fixed basis: the moments add up the same way
    E = hessfunc.ekfac(apply, CrossEntropyLoss(y, reduction=reduction), params, X, basis=whole)

    def moments(X, y):
        loss = CrossEntropyLoss(y, reduction=reduction)
        return hessfunc.ekfac(apply, loss, params, X, basis=whole).moments

    merged = E._replace(moments=moments(*parts[0]).add(moments(*parts[1])))
    torch.testing.assert_close(merged.dense(), E.dense(), **EXACT)
    torch.testing.assert_close(
        E.dense(),
        hessfunc.ekfac(apply, CrossEntropyLoss(y, reduction=reduction), params, X).dense(),
        **PEER,
    )


# ---------------------------------------------------------------------- coverage and errors


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.scale = nn.Parameter(torch.ones(4))
        self.unused = nn.Parameter(torch.ones(2))
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens).mean(1))
        h = torch.tanh(self.lin(h)) * self.scale
        h = self.wn(h)
        return self.head(h) + h @ self.lin.weight.T[:, :3]


def test_leaves_that_are_not_layer_weights_are_reported_with_the_reason():
    torch.manual_seed(0)
    model = Mixed().double()
    apply, params = hessfunc.from_module(model)
    tokens = torch.randint(0, 5, (6, 3))
    K = hessfunc.kfac(apply, CrossEntropyLoss(torch.tensor([0, 1, 2, 0, 1, 2])), params, tokens)
    assert K.covered == (
        "['lin.bias']",
        "['wn.bias']",
        "['head.weight']",
        "['head.bias']",
    )
    why = dict(K.uncovered)
    assert set(why) == {f"['{n}']" for n in params} - set(K.covered)
    assert "embedding" in why["['emb.weight']"]
    assert "layer_norm" in why["['norm.weight']"]
    assert "_weight_norm" in why["['wn.parametrizations.weight.original0']"]
    assert "Tensor.T" in why["['lin.weight']"]
    assert "mul" in why["['scale']"]
    assert "not passed to any torch function" in why["['unused']"]
    assert [b.op for b in K.layout.blocks] == ["bias", "bias", "linear"]
    # the approximation is zero on uncovered leaves; the damped solve divides them by damping
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    Kv, x = K.matvec(v), K.solve(v, 0.5)
    for path, _ in K.uncovered:
        key = path[2:-2]
        assert torch.count_nonzero(Kv[key]) == 0
        torch.testing.assert_close(x[key], v[key] / 0.5)
    D = K.dense()
    off = indices(K.layout, {p for p, _ in K.uncovered})
    assert torch.count_nonzero(D[off]) == 0 and torch.count_nonzero(D[:, off]) == 0
    assert "uncovered" in repr(K)


class AttentionHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_is_one_call_and_its_projections_are_reported():
    # nn.MultiheadAttention dispatches F.multi_head_attention_forward as a whole, so the
    # linear projections inside it are not seen; they are reported, not dropped
    torch.manual_seed(0)
    apply, params = hessfunc.from_module(AttentionHead().double().eval())
    x = torch.randn(2, 5, 4)
    K = hessfunc.kfac(apply, CrossEntropyLoss(torch.tensor([0, 2])), params, x)
    assert K.covered == ("['head.weight']", "['head.bias']")
    assert len(K.uncovered) == 4
    assert all("multi_head_attention_forward" in why for _, why in K.uncovered)


def test_errors_name_the_function_and_the_fix():
    X, y = data((6, 4))
    p = {"w": torch.randn(3, 4)}
    loss = CrossEntropyLoss(y)
    with pytest.raises(TypeError, match=r"hessfunc.kfac.*hessfunc.losses object"):
        hessfunc.kfac(linear, lambda out: out.sum(), p, X)
    with pytest.raises(ValueError, match=r"unknown fisher='exact'"):
        hessfunc.kfac(linear, loss, p, X, fisher="exact")
    with pytest.raises(ValueError, match=r"only used with fisher='mc'"):
        hessfunc.kfac(linear, loss, p, X, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"exactly one source of randomness"):
        hessfunc.kfac(linear, loss, p, X, fisher="mc")
    with pytest.raises(ValueError, match=r"noise has shape"):
        hessfunc.kfac(linear, loss, p, X, fisher="mc", noise=torch.rand(2, 6, 3))
    with pytest.raises(ValueError, match=r"no leaf of params is the weight or bias.*ggn_vp"):
        hessfunc.kfac(lambda p, X: X @ p["w"].T, loss, p, X)
    with pytest.raises(ValueError, match=r"same tensor twice"):
        hessfunc.kfac(linear, loss, {"w": p["w"], "u": p["w"]}, X)
    with pytest.raises(TypeError, match=r"one tensor of outputs"):
        hessfunc.kfac(lambda p, X: (linear(p, X), X), loss, p, X)
    K = hessfunc.kfac(linear, loss, p, X)
    with pytest.raises(ValueError, match=r"KFAC.matvec\(v\): v\['w'\] has shape \(4, 3\)"):
        K.matvec({"w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"KFAC.solve.*unknown method"):
        K.solve({"w": torch.zeros(3, 4)}, 1.0, method="cholesky")
    with pytest.raises(ValueError, match=r"damping must be non-negative"):
        K.solve({"w": torch.zeros(3, 4)}, -1.0)
    # EK-FAC needs samples on axis 0 of every layer input: flattened tokens are refused
    tokens = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"ekfac.*samples on axis 0.*hessfunc.kfac"):
        hessfunc.ekfac(
            lambda p, X: linear(p, X).reshape(6, 3),
            CrossEntropyLoss(torch.arange(6) % 3),
            p,
            tokens,
        )
    with pytest.raises(ValueError, match=r"KFAC.add.*cover different blocks"):
        K.add(hessfunc.kfac(linear, loss, {"w": p["w"], "b": torch.zeros(3)}, X))
    with pytest.raises(ValueError, match=r"KFAC.add.*one reduction for every batch"):
        K.add(hessfunc.kfac(linear, CrossEntropyLoss(y, reduction="sum"), p, X))
    with pytest.raises(ValueError, match=r"ekfac.*basis has the blocks"):
        hessfunc.ekfac(linear, loss, {"w": p["w"], "b": torch.zeros(3)}, X, basis=K)


# ------------------------------------------------------------------------------ properties


@settings(max_examples=25 if os.environ.get("CI") else 12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    n=st.integers(1, 7),
    loss=st.sampled_from(["mse", "ce", "bce"]),
    separate_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_properties_over_random_networks(widths, n, loss, separate_bias, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if loss == "ce":
        widths[-1] = max(widths[-1], 2)
    net = mlp(seed=seed, widths=tuple(widths))
    apply, params = hessfunc.from_module(net)
    X = torch.randn(n, widths[0], generator=g)
    out = (n, widths[-1])
    loss_fn = {
        "mse": lambda: MSELoss(torch.randn(out, generator=g)),
        "ce": lambda: CrossEntropyLoss(torch.randint(0, widths[-1], (n,), generator=g)),
        "bce": lambda: BCEWithLogitsLoss((torch.rand(out, generator=g) > 0.5).double()),
    }[loss]()
    K = hessfunc.kfac(apply, loss_fn, params, X, separate_bias=separate_bias)
    E = hessfunc.ekfac(apply, loss_fn, params, X, separate_bias=separate_bias)
    G = hessfunc.ggn_matrix(apply, loss_fn, params, X)
    scale = max(float(G.abs().max()), 1e-12)
    u, v = (_tree.random_like(params, g) for _ in range(2))
    lam = 0.1 * scale + 1e-6
    for op in (K, E):
        D = op.dense()
        torch.testing.assert_close(D, D.T, rtol=1e-10, atol=1e-12 * scale)
        assert float(torch.linalg.eigvalsh(D).min()) > -1e-10 * scale  # PSD
        # <u, Kv> = <Ku, v>, and solve inverts matvec + damping
        assert abs(float(_tree.vdot(u, op.matvec(v)) - _tree.vdot(op.matvec(u), v))) < 1e-10 * (
            scale * float(_tree.vdot(u, u) * _tree.vdot(v, v)) ** 0.5 + 1e-300
        )
        x = op.solve(v, lam)
        back = _tree.axpy(lam, x, op.matvec(x))
        torch.testing.assert_close(back, v, rtol=1e-8, atol=1e-8)
    # EK-FAC is never further than K-FAC from any of the GGN's diagonal blocks
    Kd, Ed = K.dense(), E.dense()
    for block in K.layout.blocks:
        i = indices(K.layout, block.names)
        ref = G[i][:, i]
        err_k, err_e = torch.linalg.norm(Kd[i][:, i] - ref), torch.linalg.norm(Ed[i][:, i] - ref)
        assert err_e <= err_k * (1 + 1e-9) + 1e-12 * scale
    if len(widths) == 2 and loss == "mse":  # one layer with MSE: both are the GGN
        blocks = G.clone()
        if separate_bias:
            w = widths[0] * widths[1]
            blocks[:w, w:] = 0
            blocks[w:, :w] = 0
        torch.testing.assert_close(Kd, blocks, rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(Ed, blocks, rtol=1e-9, atol=1e-12 * scale)
