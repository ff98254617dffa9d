"""The Laplace predictive's output covariance without per-sample Jacobians, against them.

Reference: the per-sample Jacobians ``(m, C, n)`` of every covered parameter with
:math:`P^{-1}` applied to their rows (``output_gaussian(..., jacobians=True)``), which is what
the predictive computed before the layer routes existed; for a weight applied as ``x @ W``,
``hessfunc.kfac(...).dense()`` inverted. Both routes compute the same finite sums of products,
so they agree to 1e-12 in float64. laplace-torch's predictive is checked in test_laplace.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tol
from torch import nn

import hessfunc
from hessfunc.laplace import _covariance as covariance
from hessfunc.laplace import _problem, fit
from hessfunc.laplace.predictive import output_gaussian
from hessfunc.losses import CrossEntropyLoss, MSELoss

SAME = tol("same-sums", torch.float64)
EXACT = tol("exact", torch.float64)


class Normed(nn.Module):
    """A convolution, a LayerNorm and a bare scale: two leaves no K-FAC block covers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(self.norm(h)) * self.scale


def _problem_of(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
        X = torch.randn(24, 3)
    elif name == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
        X = torch.randn(12, 1, 6, 6)
    else:
        net = Normed()
        X = torch.randn(12, 1, 6, 6)
    net = net.double()
    apply, params = hessfunc.from_module(net)
    y = torch.randint(0, 3, (X.shape[0],))
    return (lambda p, X, *rest: apply(p, X)), params, X, y


def _fit(name, structure, subset, **kw):
    model, params, X, y = _problem_of(name)
    if structure == "low_rank":
        kw.update(rank=5, generator=torch.Generator().manual_seed(0))
    post = fit(model, lambda X, y: CrossEntropyLoss(y), params, [(X, y)], structure=structure,
               subset=subset, prior_precision=0.7, **kw)  # fmt: skip
    return post, X


def _both(post, X, chunk_size=None):
    new = output_gaussian(post, (X,), chunk_size).variance
    old = output_gaussian(post, (X,), None, jacobians=True).variance
    return new, old


def _routed(post, X):
    """The route taken is the layer route, not the Jacobian fallback."""
    if post.structure in ("kfac", "diag", "low_rank"):
        return covariance.variance(post, (X,)) is not None
    return covariance.rows(post.problem, (X,)) is not None


CASES = [
    ("mlp", "kfac", None), ("cnn", "kfac", None), ("normed", "kfac", None),
    ("mlp", "kfac", "last_layer"), ("mlp", "diag", None), ("normed", "diag", None),
    ("cnn", "diag", "last_layer"), ("mlp", "low_rank", None), ("normed", "low_rank", None),
    ("mlp", "full", "last_layer"), ("normed", "full", None),
]  # fmt: skip
MORE = [
    (p, s, sub)
    for p in ("mlp", "cnn", "normed")
    for s in ("kfac", "diag", "low_rank", "full")
    for sub in (None, "last_layer")
    if (p, s, sub) not in CASES
]


def _check(name, structure, subset):
    post, X = _fit(name, structure, subset)
    # per-leaf priors exercise the per-block prior terms
    post = post.with_prior_precision(torch.linspace(0.3, 2.0, len(post.names)))
    assert _routed(post, X[:5])
    new, old = _both(post, X[:5], chunk_size=2)
    torch.testing.assert_close(new, old, **SAME)
    assert old.abs().max() > 0.1  # not a comparison of zeros


@pytest.mark.parametrize("name,structure,subset", CASES)
def test_layer_route_equals_the_jacobian_route(name, structure, subset):
    _check(name, structure, subset)


@pytest.mark.full
@pytest.mark.parametrize("name,structure,subset", MORE)
def test_layer_route_equals_the_jacobian_route_everywhere(name, structure, subset):
    _check(name, structure, subset)


def test_kfac_never_forms_the_per_sample_jacobian_of_all_parameters(monkeypatch):
    post, X = _fit("normed", "kfac", None)
    seen = []
    real = covariance.leaf_jacobians

    def spy(problem, inputs, which):
        seen.append(tuple(problem.names[i] for i in which))
        return real(problem, inputs, which)

    def refuse(*args, **kwargs):
        raise AssertionError("the per-sample Jacobian of every parameter was formed")

    want = output_gaussian(post, (X[:4],), None, jacobians=True).variance
    monkeypatch.setattr(_problem.Problem, "jacobians", refuse)
    monkeypatch.setattr(covariance, "leaf_jacobians", spy)
    got = post.predictive(X[:4], link="none").variance
    torch.testing.assert_close(got, want, **SAME)
    # the LayerNorm's leaves and the bare scale only, the convolution and head from the layers
    assert len(seen) == 1 and sorted(seen[0]) == ["norm.bias", "norm.weight", "scale"]


def test_regression_with_noise_and_a_weight_applied_as_x_at_w():
    # a weight stored (in, out) and applied as x @ W: its K-FAC block is over W.T
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(20, 3, generator=g), torch.randn(20, 4, generator=g)
    p = {"W": torch.randn(3, 5, generator=g), "b": torch.randn(5, generator=g),
         "V": torch.randn(4, 5, generator=g)}  # fmt: skip

    def model(p, X, *rest):
        return F.linear(torch.tanh(X @ p["W"] + p["b"]), p["V"])

    post = fit(model, lambda X, y: MSELoss(y), p, [(X, Y)], structure="kfac", sigma_noise=0.4,
               prior_precision=0.7)  # fmt: skip
    new, old = _both(post, X[:5])
    torch.testing.assert_close(new, old, **SAME)
    K = hessfunc.kfac(model, MSELoss(Y, reduction="sum"), p, X, separate_bias=True)
    P = 0.5 * K.dense() / 0.4**2 + 0.7 * torch.eye(40)  # H = J^T J: half the MSE's GGN
    J = post.problem.jacobians((X[:5],))
    torch.testing.assert_close(new, J @ torch.linalg.solve(P, J.mT), **EXACT)
    # the samples' square root follows the same block layout: S S^T = P^{-1}
    f = torch.tensor(1 / 0.4**2)
    S = post.curvature.sqrt_rows(torch.eye(40), f, post.prior)
    torch.testing.assert_close(S.T @ S, torch.linalg.inv(P), **EXACT)


def test_layers_whose_rows_are_not_the_samples_take_the_jacobian_route():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g)
    p = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(2, generator=g)}

    def model(p, X, *rest):  # samples along axis 1 of the layer's input
        return F.linear(X.unsqueeze(0), p["w"], p["b"])[0]

    post = fit(model, lambda X, y: CrossEntropyLoss(y), p, [(X, y)], structure="kfac")
    assert covariance.variance(post, (X[:4],)) is None
    new, old = _both(post, X[:4])
    torch.testing.assert_close(new, old, **SAME)


def test_compiled_kfac_predictive_equals_eager_and_does_not_recompile():
    post, X = _fit("mlp", "kfac", None)
    fn = torch.compile(lambda X: post.predictive(X, link="none"), fullgraph=True)
    for i, chunk in enumerate((X[:6], X[6:12])):
        stance = "fail_on_recompile" if i else "default"
        with torch.compiler.set_stance(stance):
            mean, var = fn(chunk)
        want = output_gaussian(post, (chunk,), None, jacobians=True)
        torch.testing.assert_close(mean, want.mean, **EXACT)
        torch.testing.assert_close(var, want.variance, **EXACT)


def test_stacked_experts_get_one_block_per_slice_and_the_prior_on_unused_slices():
    # w[e] of a stacked (E, out, in) leaf: one K-FAC block per expert that runs; expert 2 never
    # runs, so its slice has H = 0. Reference: hessfunc.kfac's dense matrix plus the prior.
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(16, 3, generator=g), torch.randint(0, 4, (16,), generator=g)
    p = {"w": torch.randn(3, 5, 3, generator=g), "b": torch.randn(3, 5, generator=g),
         "V": torch.randn(4, 5, generator=g)}  # fmt: skip

    def model(p, X, *rest):
        h = F.linear(X, p["w"][0], p["b"][0]) + torch.tanh(F.linear(X, p["w"][1], p["b"][1]))
        return F.linear(torch.tanh(h), p["V"])

    post = fit(model, lambda X, y: CrossEntropyLoss(y), p, [(X, y)], structure="kfac",
               prior_precision=0.7)  # fmt: skip
    # leaves w, b, V; the sliced biases are uncovered (H = 0 there, as in hessfunc.kfac)
    assert [(b.leaf, b.expert) for b in post.curvature.blocks] == [(0, 0), (0, 1), (2, None)]
    K = hessfunc.kfac(model, CrossEntropyLoss(y, reduction="sum"), p, X, separate_bias=True)
    n = sum(v.numel() for v in p.values())
    P = K.dense() + 0.7 * torch.eye(n)
    f = torch.tensor(1.0, dtype=torch.float64)
    logdet, _ = post.curvature.logdet(f, post.prior)
    torch.testing.assert_close(logdet, torch.logdet(P), **EXACT)
    eye = torch.eye(n)
    torch.testing.assert_close(post.curvature.cov_rows(eye, f, post.prior), torch.linalg.inv(P),
                               **EXACT)  # fmt: skip
    S = post.curvature.sqrt_rows(eye, f, post.prior)
    torch.testing.assert_close(S.T @ S, torch.linalg.inv(P), **EXACT)
    new, old = _both(post, X[:5])
    torch.testing.assert_close(new, old, **SAME)
    J = post.problem.jacobians((X[:5],))
    torch.testing.assert_close(new, J @ torch.linalg.solve(P, J.mT), **EXACT)
