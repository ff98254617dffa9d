"""Spectral analysis of real networks trained on ``sklearn.datasets.load_digits``.

An MLP (64-32-10, 2,410 parameters) and a small CNN (1,898 parameters; its cases run with
``pytest --full``), trained briefly with Adam, at a fixed batch of 128 digits. References: the
dense Hessian and GGN (``hessian_matrix``, ``ggn_matrix``), their ``eigvalsh``, exact traces and
diagonal blocks.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hessfunc
from hessfunc.losses import CrossEntropyLoss

pytestmark = pytest.mark.usefixtures("one_thread")


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x.reshape(-1, 1, 8, 8))), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return CNN().double()


class Problem:
    def __init__(self, kind: str):
        digits = load_digits()
        X = torch.tensor(digits.data) / 16.0
        y = torch.tensor(digits.target)
        model = build(kind)
        apply, params = hessfunc.from_module(model)
        p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
        opt = torch.optim.Adam(p.values(), lr=1e-2)
        for _ in range(60):  # full-batch: a partly trained network, indefinite Hessian
            opt.zero_grad()
            F.cross_entropy(apply(p, X), y).backward()
            opt.step()
        self.apply = apply
        self.params = {k: t.detach() for k, t in p.items()}
        self.x, self.y = X[:128], y[:128]
        self.n = sum(t.numel() for t in self.params.values())

    def f(self, p, x, y):
        return F.cross_entropy(self.apply(p, x), y)

    def hvp(self, v):
        return hessfunc.hvp(self.f, self.params, v, self.x, self.y)

    def ggn(self, v):
        return hessfunc.ggn_vp(self.apply, CrossEntropyLoss(self.y), self.params, v, self.x)

    def matvec(self, which: str):
        return self.hvp if which == "hessian" else self.ggn

    @functools.cached_property
    def hessian(self) -> torch.Tensor:
        return hessfunc.hessian_matrix(self.f, self.params, self.x, self.y, chunk_size=512)

    @functools.cached_property
    def gauss_newton(self) -> torch.Tensor:
        loss = CrossEntropyLoss(self.y)
        return hessfunc.ggn_matrix(self.apply, loss, self.params, self.x, chunk_size=512)

    def dense(self, which: str) -> torch.Tensor:
        M = self.hessian if which == "hessian" else self.gauss_newton
        return (M + M.T) / 2

    def probes(self, num: int, seed: int):
        return hessfunc.random_probes(
            self.params, num, generator=torch.Generator().manual_seed(seed)
        )

    def vector(self, seed: int):
        return hessfunc.ravel(self.params)[1](
            torch.randn(self.n, generator=torch.Generator().manual_seed(seed))
        )


@functools.cache
def problem(kind: str) -> Problem:
    return Problem(kind)


# the CNN's dense Hessian takes most of a minute on this shared 2-core machine: pytest --full
CASES = [
    pytest.param(k, w, marks=[pytest.mark.full] if k == "cnn" else [], id=f"{k}-{w}")
    for k in ("mlp", "cnn")
    for w in ("hessian", "ggn")
]


@pytest.mark.parametrize(("kind", "which"), CASES)
def test_eigsh_top5_matches_the_dense_spectrum(kind, which):
    pb = problem(kind)
    M = pb.dense(which)
    exact = torch.linalg.eigvalsh(M).flip(0)[:5]
    res = hessfunc.eigsh(pb.matvec(which), pb.vector(0), 5, num_iters=60)
    # the top of a network's spectrum is well separated: 60 steps reach rounding level
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-8, atol=0)
    U = hessfunc._base._tree.ravel_rows(res.eigenvectors)
    true = torch.linalg.norm(U @ M - res.eigenvalues[:, None] * U, dim=1)
    torch.testing.assert_close(res.residual_norms, true, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize(("kind", "which"), CASES)
def test_trace_estimators_against_the_exact_trace(kind, which):
    pb = problem(kind)
    M = pb.dense(which)
    exact = torch.trace(M)
    frob2 = M.pow(2).sum()
    m = 60
    probes = pb.probes(m, 1)
    # sound 5-sd bounds: Hutchinson's Rademacher variance is 2 sum_{i != j} M_ij^2 / m; the
    # Hutchinson parts of Hutch++ (m/3 probes) and XTrace (m/2) act on a deflated matrix whose
    # Frobenius norm is at most ||M||_F
    bounds = {
        "hutchinson_trace": 5 * (2 * (frob2 - M.diagonal().pow(2).sum()) / m) ** 0.5,
        "hutchpp_trace": 5 * (2 * frob2 / (m // 3)) ** 0.5,
        "xtrace": 5 * (2 * frob2 / (m // 2)) ** 0.5,
    }
    errors = {}
    for name, bound in bounds.items():
        est = getattr(hessfunc, name)(pb.matvec(which), probes)
        errors[name] = float((est.estimate - exact).abs() / exact.abs())
        assert (est.estimate - exact).abs() < bound, (name, errors)


@pytest.mark.parametrize(("kind", "which"), CASES)
def test_slq_density_against_the_exact_eigenvalues(kind, which):
    pb = problem(kind)
    eig = torch.linalg.eigvalsh(pb.dense(which))
    res = hessfunc.slq(pb.matvec(which), pb.probes(10, 2), 40)
    p = res.nodes.shape[0]
    x = torch.cat([res.nodes.reshape(-1), eig])
    w = torch.cat([res.weights.reshape(-1) / p, -torch.ones_like(eig) / len(eig)])
    order = x.argsort()
    w1 = (torch.cumsum(w[order], 0)[:-1].abs() * x[order].diff()).sum()
    # network spectra concentrate near zero with a few outliers: as for the power law in
    # test_spectral, the distance is far under 1e-3 of the range (measured ~1e-4)
    assert w1 < 1e-3 * (eig.max() - eig.min())
    # the extreme nodes bound the spectrum and reach its ends
    assert res.nodes.max() <= eig.max() * (1 + 1e-10)
    torch.testing.assert_close(res.nodes.max(1).values.max(), eig.max(), rtol=1e-6, atol=0)


def block_slices(params) -> dict[str, slice]:
    out, start = {}, 0
    for name, t in params.items():
        block = name.rsplit(".", 1)[0]
        stop = start + t.numel()
        out[block] = slice(out[block].start, stop) if block in out else slice(start, stop)
        start = stop
    return out


@pytest.mark.parametrize(("kind", "which"), CASES)
def test_per_layer_top_eigenvalue_and_trace_against_the_dense_diagonal_blocks(kind, which):
    pb = problem(kind)
    M = pb.dense(which)
    slices = block_slices(pb.params)
    top = hessfunc.blockwise(
        hessfunc.eigsh, pb.matvec(which), pb.params, pb.vector(3), 1, num_iters=40
    )
    traces = hessfunc.block_trace(pb.matvec(which), pb.probes(40, 4))
    assert list(top) == list(traces) == list(slices)
    for name, b in slices.items():
        block = M[b, b]
        torch.testing.assert_close(
            top[name].eigenvalues, torch.linalg.eigvalsh(block)[-1:], rtol=1e-7, atol=0
        )
        # block_trace's Rademacher variance per probe (see its docstring), from the dense matrix
        inside = block.pow(2).sum() - block.diagonal().pow(2).sum()
        outside = M[b].pow(2).sum() - block.pow(2).sum()
        sd = ((2 * inside + outside) / 40) ** 0.5
        assert (traces[name].estimate - torch.trace(block)).abs() < 5 * sd, name
