"""Laplace posteriors against closed forms, dense references, and laplace-torch.

References: Bayesian linear regression (the Laplace evidence and predictive are exact there);
dense matrices built another way (``hessfunc.ggn_matrix`` over the whole data set, ``KFAC.dense``,
the Jacobian by ``torch.func.jacrev``); laplace-torch (test-only, installed with ``--no-deps``;
skipped without it) on an MLP and a small CNN, in its documented conventions: the summed loss,
``0.5 * MSE`` for a Gaussian likelihood, K-FAC with a separate bias block, the evidence
``log p(D | θ) - (log det P - log det P0 + scatter) / 2``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import tol
from torch import nn

import hessfunc
from hessfunc.laplace import fit
from hessfunc.losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss

EXACT = tol("exact", torch.float64)


def _mlp_problem(seed=0, n=40, classes=3):
    torch.manual_seed(seed)
    X = torch.randn(n, 3)
    y = torch.randint(0, classes, (n,))
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    return net, X, y


def _cnn_problem(seed=1, n=12):
    torch.manual_seed(seed)
    X = torch.randn(n, 1, 6, 6)
    y = torch.randint(0, 3, (n,))
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    return net, X, y


def _model(net):
    apply, params = hessfunc.from_module(net)
    return (lambda p, X, *rest: apply(p, X)), params


def _ce(X, y):
    return CrossEntropyLoss(y)


MLP = _mlp_problem()
BATCHES = [(MLP[1][:16], MLP[2][:16]), (MLP[1][16:], MLP[2][16:])]  # ragged: 16 + 24


@pytest.fixture(scope="module")
def mlp_full():
    model, params = _model(MLP[0])
    return fit(model, _ce, params, BATCHES, prior_precision=0.7)


# ----------------------------------------------------------------------------- closed forms


def _blr(seed=0, n=9, d=3, delta=0.8, sigma=0.6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.randn(n, 1, generator=g)
    P = X.T @ X / sigma**2 + delta * torch.eye(d)
    w = torch.linalg.solve(P, X.T @ y / sigma**2)  # the MAP, exactly
    return X, y, w, P


# ids avoid the bare word "full", which is also the name of the marker for slow tests
STRUCTURES = [pytest.param(s, id=f"{s}-structure") for s in ("full", "diag", "kfac", "low_rank")]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_bayesian_linear_regression_evidence_is_exact(structure):
    # one F.linear layer with MSE: K-FAC (separate bias aside) is the GGN; a diagonal or
    # low-rank GGN is exact when the GGN is diagonal or its rank is kept whole
    X, y, w, P = _blr()
    if structure == "diag":  # orthogonal columns make X^T X diagonal
        X = torch.linalg.qr(X)[0] * torch.tensor([1.0, 2.0, 3.0])
        P = X.T @ X / 0.36 + 0.8 * torch.eye(3)
        w = torch.linalg.solve(P, X.T @ y / 0.36)
    model = lambda p, X, *rest: torch.nn.functional.linear(X, p["w"])  # noqa: E731
    opts = (
        {"rank": 3, "generator": torch.Generator().manual_seed(0)}
        if structure == "low_rank"
        else {}
    )
    post = fit(
        model, lambda X, y: MSELoss(y), {"w": w.T.clone()}, [(X, y)], structure=structure,
        prior_precision=0.8, sigma_noise=0.6, **opts,
    )  # fmt: skip
    cov = 0.36 * torch.eye(len(y)) + X @ X.T / 0.8
    exact = torch.distributions.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y[:, 0])
    got = post.log_marginal_likelihood()
    torch.testing.assert_close(got.estimate, exact, **EXACT)
    assert float(got.std_error) == 0.0
    Xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    mean, var = post.predictive(Xs)
    torch.testing.assert_close(mean, Xs @ w, **EXACT)
    torch.testing.assert_close(var[:, 0, 0], ((Xs @ torch.linalg.inv(P)) * Xs).sum(1), **EXACT)


def test_bayesian_linear_regression_matrix_free():
    # the Gaussian likelihood's 1/2 applies to the SLQ nodes and to the CG products alike
    X, y, w, P = _blr()
    model = lambda p, X, *rest: X @ p  # noqa: E731
    post = fit(
        model, lambda X, y: MSELoss(y), w, [(X, y)], structure="matrix_free", num_iters=3,
        num_probes=200, sample_iters=3, prior_precision=0.8, sigma_noise=0.6,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    cov = 0.36 * torch.eye(len(y)) + X @ X.T / 0.8
    exact = torch.distributions.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y[:, 0])
    got = post.log_marginal_likelihood()
    assert 0 < float(got.std_error) and abs(float(got.estimate - exact)) < 4 * float(got.std_error)
    Xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    _, var = post.predictive(Xs)
    torch.testing.assert_close(var[:, 0, 0], ((Xs @ torch.linalg.inv(P)) * Xs).sum(1), **EXACT)


def test_blr_evidence_tracks_sigma_and_prior_without_refitting():
    X, y, w, _ = _blr()
    model = lambda p, X, *rest: X @ p  # noqa: E731
    post = fit(model, lambda X, y: MSELoss(y, reduction="sum"), w, [(X, y)], sigma_noise=0.6,
               prior_precision=0.8)  # fmt: skip
    for delta, sigma in [(0.8, 0.6), (2.0, 0.6), (0.8, 1.3), (0.1, 0.2)]:
        # at another prior the fit is no longer the MAP: the evidence formula still holds with
        # the scatter of the fitted w, so compare with the formula written densely
        P = X.T @ X / sigma**2 + delta * torch.eye(3)
        loglik = -((X @ w - y) ** 2).sum() / (2 * sigma**2) - len(y) * math.log(
            sigma * math.sqrt(2 * math.pi)
        )
        ref = loglik - 0.5 * (torch.logdet(P) - 3 * math.log(delta) + delta * (w * w).sum())
        got = post.log_marginal_likelihood(delta, sigma_noise=sigma).estimate
        torch.testing.assert_close(got, ref, **EXACT)
    assert float(post.prior) == 0.8 and float(post.sigma_noise) == 0.6  # never mutated


# ----------------------------------------------------------------------- dense references


def _dense_ggn(model, params, X, y):
    flat, unravel = hessfunc.ravel(params)
    return hessfunc.ggn_matrix(
        lambda t, X: model(unravel(t), X), CrossEntropyLoss(y, reduction="sum"), flat, X
    )


def test_ragged_batches_and_mean_reduction_match_the_whole_data_dense_ggn(mlp_full):
    net, X, y = MLP
    model, params = _model(net)
    G = _dense_ggn(model, params, X, y)
    torch.testing.assert_close(mlp_full.curvature.H, G, **EXACT)
    mean_loss = fit(model, lambda X, y: CrossEntropyLoss(y, reduction="mean"), params, [(X, y)])
    torch.testing.assert_close(mean_loss.curvature.H, G, **EXACT)
    diag = fit(model, _ce, params, BATCHES, structure="diag")
    torch.testing.assert_close(diag.curvature.d, torch.diagonal(G), **EXACT)


def test_a_dataloader_and_a_one_shot_iterator_give_the_list_result(mlp_full):
    from torch.utils.data import DataLoader, TensorDataset

    net, X, y = MLP
    model, params = _model(net)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)  # 16 + 16 + 8
    for batches in (loader, iter(BATCHES)):
        post = fit(model, _ce, params, batches, prior_precision=0.7)
        torch.testing.assert_close(post.curvature.H, mlp_full.curvature.H, **EXACT)
        assert post.n_data == 40


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_reduce_sums_every_pass_over_processes(structure):
    # two processes holding the same shard are the data set twice over
    net, X, y = MLP
    model, params = _model(net)
    twice = fit(model, _ce, params, BATCHES + BATCHES, structure=structure)
    double = lambda tree: hessfunc._base._tree.tree_map(lambda t: 2 * t, tree)  # noqa: E731
    reduced = fit(model, _ce, params, BATCHES, structure=structure, reduce=double)
    assert reduced.n_data == twice.n_data == 80
    for delta in (0.5, torch.tensor([0.5, 1.5, 2.0, 3.0])):
        torch.testing.assert_close(
            reduced.log_marginal_likelihood(delta).estimate,
            twice.log_marginal_likelihood(delta).estimate,
            **EXACT,
        )


def _dense_precision(post, delta):
    n = post.theta.numel()
    eye = torch.eye(n)
    f = torch.tensor(1.0)
    cov = post.curvature.cov_rows(eye, f, delta)
    return torch.linalg.inv(0.5 * (cov + cov.T)), cov


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("per_leaf", [False, True])
def test_each_structure_is_one_consistent_gaussian(structure, per_leaf):
    # logdet, P^{-1} rows and P^{-1/2} rows all describe the same matrix, for scalar and per-leaf
    # priors; K-FAC's matrix is hessfunc.kfac's own dense(), built another way
    net, X, y = MLP
    model, params = _model(net)
    opts = (
        {"rank": 6, "generator": torch.Generator().manual_seed(0)}
        if structure == "low_rank"
        else {}
    )
    post = fit(model, _ce, params, BATCHES, structure=structure, **opts)
    delta = torch.tensor([0.5, 1.5, 2.0, 3.0]) if per_leaf else torch.tensor(0.7)
    P, cov = _dense_precision(post, delta)
    f = torch.tensor(1.0)
    torch.testing.assert_close(post.curvature.logdet(f, delta)[0], torch.logdet(P), **EXACT)
    S = post.curvature.sqrt_rows(torch.eye(P.shape[0]), f, delta)
    torch.testing.assert_close(S.T @ S, cov, **EXACT)
    prior = torch.diag(torch.repeat_interleave(delta.expand(4), torch.tensor(post.problem.sizes)))
    if structure == "kfac":
        K = hessfunc.kfac(
            lambda p, X: model(p, X), CrossEntropyLoss(y, reduction="sum"), params, X,
            separate_bias=True,
        ).dense()  # fmt: skip
        torch.testing.assert_close(P, K + prior, **EXACT)
    if structure == "low_rank":  # the top-6 eigenpairs of the GGN, nothing else
        evals, evecs = torch.linalg.eigh(_dense_ggn(model, params, X, y))
        top = evecs[:, -6:] @ torch.diag(evals[-6:]) @ evecs[:, -6:].T
        torch.testing.assert_close(P, top + prior, rtol=1e-8, atol=1e-8)


def test_predictive_variance_is_j_sigma_jt_with_a_dense_jacobian(mlp_full):
    net, X, _ = MLP
    model, params = _model(net)
    flat, unravel = hessfunc.ravel(params)
    Xs = X[:5]
    J = torch.func.jacrev(lambda t: model(unravel(t), Xs))(flat)  # (5, 3, n), across samples
    J = torch.stack([J[i, :, :] for i in range(5)])
    P = mlp_full.curvature.H + 0.7 * torch.eye(flat.numel())
    want = J @ torch.linalg.inv(P) @ J.mT
    mean, var = mlp_full.predictive(Xs, link="none")
    torch.testing.assert_close(var, want, **EXACT)
    torch.testing.assert_close(mlp_full.predictive(Xs, link="none", chunk_size=2)[1], want, **EXACT)
    probit = mlp_full.predictive(Xs)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(want, dim1=1, dim2=2))
    torch.testing.assert_close(probit, torch.softmax(kappa * mean, -1), **EXACT)


def test_mc_predictive_matches_an_independent_monte_carlo(mlp_full):
    Xs = MLP[1][:3]
    mean, var = mlp_full.predictive(Xs, link="none")
    got = mlp_full.predictive(
        Xs, link="mc", n_samples=4000, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(2)
    draws = torch.distributions.MultivariateNormal(mean, var + 1e-12 * torch.eye(3)).sample((4000,))
    probs = draws.softmax(-1)
    se = probs.std(0) / math.sqrt(4000)
    assert ((got - probs.mean(0)).abs() < 6 * se * math.sqrt(2) + 1e-12).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(3), **EXACT)


def test_samples_have_the_posterior_mean_and_covariance(mlp_full):
    draws = mlp_full.sample(20000, generator=torch.Generator().manual_seed(0))
    net, _, _ = MLP
    _, params = _model(net)
    assert set(draws) == set(params) and all(
        draws[k].shape == (20000, *params[k].shape) for k in params
    )
    rows = torch.cat([draws[k].reshape(20000, -1) for k in params], 1)
    cov = torch.linalg.inv(mlp_full.curvature.H + 0.7 * torch.eye(rows.shape[1]))
    # the sample mean is within 5 standard errors of the fitted parameters, per coordinate
    se = torch.sqrt(torch.diagonal(cov) / 20000)
    assert ((rows.mean(0) - mlp_full.theta).abs() < 5 * se).all()
    emp = torch.cov(rows.T)
    assert torch.linalg.matrix_norm(emp - cov) < 0.05 * torch.linalg.matrix_norm(cov)


def test_optimised_prior_is_a_stationary_point_and_matches_a_golden_section(mlp_full):
    opt = mlp_full.optimize_prior_precision()
    d = opt.prior.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mlp_full.log_marginal_likelihood(d).estimate, d)
    assert abs(float(g)) < 1e-8
    # an independent 1-D search on the evidence alone
    a, b = math.log(1e-2), math.log(1e3)
    r = (math.sqrt(5) - 1) / 2
    lml = lambda u: float(mlp_full.log_marginal_likelihood(math.exp(u)).estimate)  # noqa: E731
    for _ in range(120):
        c, e = b - r * (b - a), a + r * (b - a)
        a, b = (a, e) if lml(c) > lml(e) else (c, b)
    assert abs(float(opt.prior) / math.exp((a + b) / 2) - 1) < 1e-6
    assert float(mlp_full.prior) == 0.7  # a new posterior; the old one is unchanged
    per_leaf = mlp_full.optimize_prior_precision(per_leaf=True)
    d = per_leaf.prior.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mlp_full.log_marginal_likelihood(d).estimate, d)
    assert g.abs().max() < 1e-8
    assert per_leaf.log_marginal_likelihood().estimate >= opt.log_marginal_likelihood().estimate


def test_last_layer_and_named_subsets_cover_the_right_leaves():
    net, X, y = MLP
    model, params = _model(net)
    last = fit(model, _ce, params, BATCHES, subset="last_layer")
    assert last.names == ("2.weight", "2.bias")
    named = fit(model, _ce, params, BATCHES, subset=["2.bias", "2.weight"])
    torch.testing.assert_close(named.curvature.H, last.curvature.H, **EXACT)
    G = _dense_ggn(model, params, X, y)
    torch.testing.assert_close(last.curvature.H, G[-18:, -18:], **EXACT)
    draws = last.sample(2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws["0.weight"][1], params["0.weight"], rtol=0, atol=0)
    # weights stored (in, out) and applied as x @ W or addmm(b, x, W) (GPT-2's Conv1D) are
    # linear layers too, as K-FAC records them: the head is the last one, not the body
    g = torch.Generator().manual_seed(0)
    p2 = {"body": torch.randn(3, 5, generator=g), "head_w": torch.randn(5, 3, generator=g),
          "head_b": torch.zeros(3)}  # fmt: skip
    model2 = lambda p, X, *r: torch.addmm(p["head_b"], torch.tanh(X @ p["body"]), p["head_w"])  # noqa: E731
    assert sorted(fit(model2, _ce, p2, BATCHES, subset="last_layer").names) == ["head_b", "head_w"]


def test_binary_logistic_equals_two_class_softmax_with_a_zero_logit():
    # sigmoid(f) is softmax((0, f))[1]: same likelihood, same output curvature p(1 - p)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(25, 3, generator=g)
    y = (torch.rand(25, generator=g) < 0.5).double()
    w = 0.3 * torch.randn(3, generator=g)
    binary = fit(lambda w, X, *r: X @ w, lambda X, y: BCEWithLogitsLoss(y), w, [(X, y)])
    two = fit(
        lambda w, X, *r: torch.stack([torch.zeros(len(X)), X @ w], -1),
        lambda X, y: CrossEntropyLoss(y.long()), w, [(X, y)],
    )  # fmt: skip
    for delta in (0.5, 4.0):
        torch.testing.assert_close(
            binary.log_marginal_likelihood(delta).estimate,
            two.log_marginal_likelihood(delta).estimate,
            **EXACT,
        )
    Xs = X[:4]
    P = binary.curvature.H + torch.eye(3)
    var = ((Xs @ torch.linalg.inv(P)) * Xs).sum(1)
    want = torch.sigmoid(Xs @ w / torch.sqrt(1 + math.pi / 8 * var))
    torch.testing.assert_close(binary.predictive(Xs), want, **EXACT)


# ---------------------------------------------------------------------------- matrix-free


@pytest.fixture(scope="module")
def mlp_slq():
    net, _, _ = MLP
    model, params = _model(net)
    return [
        fit(
            model,
            _ce,
            params,
            BATCHES,
            structure="matrix_free",
            num_probes=p,
            num_iters=20,
            prior_precision=0.7,
            generator=torch.Generator().manual_seed(p),
        )  # fmt: skip
        for p in (16, 64)
    ]


def test_matrix_free_evidence_within_its_standard_error(mlp_full, mlp_slq):
    for post in mlp_slq:
        for delta in (0.7, 3.0):
            est = post.log_marginal_likelihood(delta)
            ref = mlp_full.log_marginal_likelihood(delta).estimate
            assert 0 < float(est.std_error) < 1.0
            assert abs(float(est.estimate - ref)) < 4 * float(est.std_error)
    # 4x the probes: the standard error halves (1/sqrt(probes)); a wrong scaling gives 1 or 1/4
    ratio = float(mlp_slq[1].log_marginal_likelihood().std_error) / float(
        mlp_slq[0].log_marginal_likelihood().std_error
    )
    assert 0.3 < ratio < 0.8, ratio


def test_matrix_free_predictive_and_samples_match_the_dense_posterior(mlp_full, mlp_slq):
    Xs = MLP[1][:2]
    _, want = mlp_full.predictive(Xs, link="none")
    _, got = mlp_slq[0].predictive(Xs, link="none")
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    z = torch.randn(2, mlp_full.theta.numel(), generator=torch.Generator().manual_seed(3))
    f = torch.tensor(1.0)
    free = mlp_slq[0].curvature
    full = mlp_full.curvature
    # Lanczos' P^{-1/2} z is the symmetric root: compare with the eigendecomposition's
    torch.testing.assert_close(
        free.sqrt_rows(z, f, torch.tensor(0.7)), full.sqrt_rows(z, f, torch.tensor(0.7)),
        rtol=1e-6, atol=1e-8,
    )  # fmt: skip
    opt = mlp_slq[1].optimize_prior_precision()
    assert (
        abs(math.log(float(opt.prior)) - math.log(float(mlp_full.optimize_prior_precision().prior)))
        < 0.5
    )


# --------------------------------------------------------------------------------- errors


def test_bad_input_is_refused_clearly(mlp_full):
    net, X, y = MLP
    model, params = _model(net)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        fit(model, _ce, params, BATCHES, prior_precision=-1.0)
    with pytest.raises(ValueError, match="subset names no leaf"):
        fit(model, _ce, params, BATCHES, subset=["head.weight"])
    with pytest.raises(ValueError, match="NLLLoss has a zero Gauss-Newton"):
        fit(model, lambda X, y: NLLLoss(y), params, BATCHES)
    with pytest.raises(ValueError, match="unknown structure"):
        fit(model, _ce, params, BATCHES, structure="kron")
    with pytest.raises(ValueError, match="sigma_noise applies to regression"):
        fit(model, _ce, params, BATCHES, sigma_noise=2.0)
    with pytest.raises(ValueError, match="pass generator="):
        fit(model, _ce, params, BATCHES, structure="low_rank")
    with pytest.raises(ValueError, match="unknown options"):
        fit(model, _ce, params, BATCHES, structure="full", rank=3)
    with pytest.raises(ValueError, match="missing"):
        mlp_full.log_marginal_likelihood({"0.weight": 1.0})
    with pytest.raises(ValueError, match="last_layer' found no linear layer"):
        fit(lambda p, X, *r: (X * p).sum(-1, keepdim=True), lambda X, y: MSELoss(y),
            torch.zeros(3), [(X, torch.zeros(40, 1))], subset="last_layer")  # fmt: skip
    with pytest.raises(ValueError, match="nothing to factor"):  # no layer: an element-wise map
        fit(lambda p, X, *r: (X * p).sum(-1, keepdim=True), lambda X, y: MSELoss(y), torch.zeros(3),
            [(X, torch.zeros(40, 1))], structure="kfac")  # fmt: skip
    with pytest.raises(ValueError, match="unknown link"):
        mlp_full.predictive(X[:2], link="softmax")


def test_the_dense_guard_refuses_a_too_large_full_fit_eagerly(monkeypatch):
    # the guard is hessfunc._base._memory's, shared with hessian_matrix: an explicit budget,
    # and by default half the free memory (read eagerly; inside torch.compile it is skipped)
    net, X, y = MLP
    model, params = _model(net)
    n = sum(p.numel() for p in params.values())
    need = 3 * n * n * 8
    with pytest.raises(MemoryError, match=r"fit.*structure='full' with n = 38.*max_bytes="):
        fit(model, _ce, params, BATCHES, max_bytes=need - 1)
    assert fit(model, _ce, params, BATCHES, max_bytes=need).curvature.H.shape == (n, n)
    from hessfunc._base import _memory

    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2 * need - 2)
    with pytest.raises(MemoryError, match="half of the memory available"):
        fit(model, _ce, params, BATCHES)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2 * need)
    assert fit(model, _ce, params, BATCHES).curvature.H.shape == (n, n)


def test_nothing_is_mutated():
    net, X, y = MLP
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    model, params = _model(net)
    copies = {k: v.clone() for k, v in params.items()}
    post = fit(model, _ce, params, BATCHES, structure="kfac", prior_precision=0.7)
    post.optimize_prior_precision().predictive(X[:3])
    post.sample(2, generator=torch.Generator().manual_seed(0))
    post.log_marginal_likelihood({k: 1.0 for k in post.names})
    for k, v in params.items():
        assert torch.equal(v, copies[k]) and not v.requires_grad
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert [p.requires_grad for p in net.parameters()] == flags and net.training
    assert all(p.grad is None for p in net.parameters())
    assert float(post.prior) == 0.7


PER_LEAF = [0.5, 2.0, 1.0, 4.0]


def test_matrix_free_per_leaf_prior_evidence_within_its_standard_error(mlp_full, mlp_slq):
    # a diagonal prior is not a shift of H: the evidence reruns SLQ on f H + diag(delta)
    delta = dict(zip(mlp_full.names, PER_LEAF, strict=True))
    ref = mlp_full.log_marginal_likelihood(delta).estimate
    for post in mlp_slq:
        est = post.log_marginal_likelihood(delta)
        assert 0 < float(est.std_error) < 1.0
        assert abs(float(est.estimate - ref)) < 4 * float(est.std_error)
        # the same value on every leaf: the new run from the same probes is the fit's rule,
        # shifted (the Krylov spaces coincide), to rounding
        same = post.log_marginal_likelihood({k: 0.7 for k in post.names})
        scalar = post.log_marginal_likelihood(0.7)
        torch.testing.assert_close(same.estimate, scalar.estimate, rtol=1e-10, atol=0)
        torch.testing.assert_close(same.std_error, scalar.std_error, rtol=1e-8, atol=0)
    # and a per-leaf prior moves the estimate the way the dense value moves (not a scalar mean)
    mean = sum(PER_LEAF) / len(PER_LEAF)
    gap = float(ref - mlp_full.log_marginal_likelihood(mean).estimate)
    got = float(
        mlp_slq[1].log_marginal_likelihood(delta).estimate
        - mlp_slq[1].log_marginal_likelihood(mean).estimate
    )
    assert abs(got - gap) < 0.25 * abs(gap), (got, gap)


def test_matrix_free_per_leaf_predictive_and_samples_match_the_dense_posterior(mlp_full, mlp_slq):
    delta = dict(zip(mlp_full.names, PER_LEAF, strict=True))
    Xs = MLP[1][:2]
    _, want = mlp_full.with_prior_precision(delta).predictive(Xs, link="none")
    _, got = mlp_slq[0].with_prior_precision(delta).predictive(Xs, link="none")
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # Lanczos' P^{-1/2} z is the symmetric root of the dense P = H + diag(delta)
    d = torch.repeat_interleave(torch.tensor(PER_LEAF), torch.tensor(mlp_full.problem.sizes))
    evals, evecs = torch.linalg.eigh(mlp_full.curvature.H + torch.diag(d))
    root = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    z = torch.randn(2, d.numel(), generator=torch.Generator().manual_seed(3))
    got = mlp_slq[0].curvature.sqrt_rows(z, torch.tensor(1.0), torch.tensor(PER_LEAF))
    torch.testing.assert_close(got, z @ root, rtol=1e-6, atol=1e-8)


@pytest.mark.full
def test_matrix_free_per_leaf_prior_search_lands_near_the_dense_optimum(mlp_full, mlp_slq):
    # Newton through the SLQ runs (autograd through Lanczos and the GGN products)
    got = mlp_slq[1].optimize_prior_precision(per_leaf=True).prior
    want = mlp_full.optimize_prior_precision(per_leaf=True).prior
    assert (got.log() - want.log()).abs().max() < 0.3, (got, want)


# ------------------------------------------------------------------------------- compile


def test_compiled_evidence_equals_eager_and_does_not_recompile():
    net, X, y = MLP
    model, params = _model(net)
    post = fit(model, _ce, params, BATCHES, structure="kfac")
    fn = torch.compile(lambda d: post.log_marginal_likelihood(d).estimate, fullgraph=True)
    first, second = torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([3.0, 0.2, 1.0, 7.0])
    torch.testing.assert_close(fn(first), post.log_marginal_likelihood(first).estimate, **EXACT)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = fn(second)
    torch.testing.assert_close(got, post.log_marginal_likelihood(second).estimate, **EXACT)


# --------------------------------------------------------------------------- laplace-torch


def _laplace_torch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import laplace
    except ImportError:  # pragma: no cover - the peer is optional
        pytest.skip("laplace-torch is not installed (pip install --no-deps laplace-torch)")
    return laplace


CASES = [("full", "full", "all"), ("kfac", "kron", "all"), ("full", "full", "last_layer"),
         ("kfac", "kron", "last_layer")]  # fmt: skip


def _pair(problem, ours, theirs, subset, batches, likelihood="classification", **kw):
    laplace = _laplace_torch()
    from torch.utils.data import DataLoader, TensorDataset

    net, X, y = problem
    model, params = _model(net)
    loss_fn = _ce if likelihood == "classification" else (lambda X, y: MSELoss(y))
    post = fit(model, loss_fn, params, batches, structure=ours,
               subset=None if subset == "all" else "last_layer", **kw)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(net, likelihood, subset_of_weights=subset, hessian_structure=theirs,
                             **kw)  # fmt: skip
        la.fit(DataLoader(TensorDataset(X, y), batch_size=len(batches[0][0])))
    return post, la


@pytest.mark.parametrize("ours,theirs,subset", CASES)
def test_laplace_torch_mlp_evidence_prior_and_predictive(ours, theirs, subset):
    post, la = _pair(MLP, ours, theirs, subset, BATCHES, prior_precision=0.7)
    X = MLP[1]
    for delta in (0.7, 2.5):
        want = la.log_marginal_likelihood(torch.tensor(delta))
        torch.testing.assert_close(post.log_marginal_likelihood(delta).estimate, want, **EXACT)
    la.prior_precision = 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for link in ("probit", "bridge"):
            want = la(X[:6], pred_type="glm", link_approx=link)
            torch.testing.assert_close(post.predictive(X[:6], link=link), want, **EXACT)
    # the optimum of our search is a stationary point of laplace-torch's own evidence
    opt = post.optimize_prior_precision()
    d = opt.prior.clone().requires_grad_(True)
    la_value = la.log_marginal_likelihood(d)
    (g,) = torch.autograd.grad(la_value, d)
    assert abs(float(g)) < 1e-8
    torch.testing.assert_close(opt.log_marginal_likelihood().estimate, la_value.detach(), **EXACT)


def test_laplace_torch_per_layer_prior_kfac():
    post, la = _pair(MLP, "kfac", "kron", "all", BATCHES)
    delta = torch.tensor([0.3, 1.1, 2.0, 5.0])
    want = la.log_marginal_likelihood(delta)
    torch.testing.assert_close(post.log_marginal_likelihood(delta).estimate, want, **EXACT)


def test_laplace_torch_regression_with_noise():
    torch.manual_seed(3)
    X = torch.randn(30, 2)
    y = torch.sin(X).sum(1, keepdim=True).repeat(1, 2)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    problem = (net, X, y)
    batches = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])]
    post, la = _pair(problem, "full", "full", "all", batches, "regression", sigma_noise=0.4,
                     prior_precision=1.3)  # fmt: skip
    torch.testing.assert_close(
        post.log_marginal_likelihood().estimate, la.log_marginal_likelihood(), **EXACT
    )
    for sigma in (0.2, 0.9):
        want = la.log_marginal_likelihood(torch.tensor(1.3), torch.tensor(sigma))
        got = post.log_marginal_likelihood(sigma_noise=sigma).estimate
        torch.testing.assert_close(got, want, **EXACT)
    la.sigma_noise = 0.4
    mean, var = post.predictive(X[:4])
    want_mean, want_var = la(X[:4], pred_type="glm")
    torch.testing.assert_close(mean, want_mean, **EXACT)
    torch.testing.assert_close(var, want_var, **EXACT)


@pytest.mark.parametrize("ours,theirs,subset", CASES)
def test_laplace_torch_cnn(ours, theirs, subset):
    problem = _cnn_problem()
    X, y = problem[1], problem[2]
    post, la = _pair(problem, ours, theirs, subset, [(X, y)], prior_precision=0.5)
    torch.testing.assert_close(
        post.log_marginal_likelihood().estimate, la.log_marginal_likelihood(), **EXACT
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = la(X[:4], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(post.predictive(X[:4]), want, **EXACT)


@pytest.mark.full
@pytest.mark.parametrize("ours,theirs,subset", CASES)
def test_laplace_torch_cnn_ragged_batches_and_per_layer_prior(ours, theirs, subset):
    problem = _cnn_problem(seed=2, n=17)
    X, y = problem[1], problem[2]
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, 17, 5)]  # 5 + 5 + 5 + 2
    post, la = _pair(problem, ours, theirs, subset, batches)
    # laplace-torch's last-layer posteriors take a scalar or per-parameter prior only
    per_layer = subset != "last_layer"
    delta = torch.linspace(0.3, 3.0, len(post.names)) if per_layer else torch.tensor(0.8)
    want = la.log_marginal_likelihood(delta)
    torch.testing.assert_close(post.log_marginal_likelihood(delta).estimate, want, **EXACT)
    la.prior_precision = delta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = la(X[:5], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(post.with_prior_precision(delta).predictive(X[:5]), want, **EXACT)
    opt = post.optimize_prior_precision(per_leaf=per_layer)
    d = opt.prior.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(d), d)
    assert g.abs().max() < 1e-7
