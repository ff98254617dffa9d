r"""Posterior precision structures: :math:`P = f H + P_0`, one class per structure.

:math:`H` is the likelihood's curvature summed over the data (the Gauss-Newton matrix of the
summed negative log-likelihood; for a Gaussian likelihood :math:`J^\top J`), :math:`f =
1/(\sigma^2 T)` the factor set by the noise and the temperature, and :math:`P_0` the diagonal
prior precision, one value per parameter leaf (``delta`` of shape ``(L,)``) or one for all
(``delta`` 0-d). Each structure holds what it built once from the data and answers, for any
``f`` and ``delta`` without another pass over the data:

- ``logdet(f, delta) -> (value, std_error)``: :math:`\log\det P` (std_error 0 where exact);
- ``cov_rows(R, f, delta)``: :math:`R\, P^{-1}` for rows ``R`` of shape ``(m, n)``;
- ``sqrt_rows(Z, f, delta)``: rows :math:`S z` with :math:`S S^\top = P^{-1}` (for sampling).

They are differentiable in ``f`` and ``delta`` (autograd), which the prior search uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from typing_extensions import override

from ..linalg import solvers
from ..linalg.lanczos import lanczos
from ..linalg.slq import slq

Tensor = torch.Tensor


def expand(delta: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """``(n,)``: every parameter's prior precision from a 0-d or per-leaf ``delta``."""
    if delta.dim() == 0:
        return delta.expand(sum(sizes))
    return torch.repeat_interleave(delta, torch.tensor(sizes, device=delta.device))


def _zero(ref: Tensor) -> Tensor:
    return torch.zeros((), dtype=ref.dtype, device=ref.device)


class Precision:
    """Base class: the posterior precision :math:`P = f H + P_0` of one structure."""

    sizes: tuple[int, ...]

    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`\log\det P` and its standard error (0-d tensors; 0 where exact)."""
        raise NotImplementedError

    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        """Return :math:`R P^{-1}` for rows ``R`` of shape ``(m, n)``."""
        raise NotImplementedError

    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        r"""Return rows :math:`S z` for rows ``z`` of ``Z``, with :math:`S S^\top = P^{-1}`."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Full(Precision):
    """Dense :math:`H` with its eigendecomposition (one, at fit time)."""

    H: Tensor
    evals: Tensor
    evecs: Tensor
    sizes: tuple[int, ...]

    @classmethod
    def build(cls, H: Tensor, sizes: tuple[int, ...]) -> Full:
        """Symmetrise ``H`` and eigendecompose it once."""
        H = 0.5 * (H + H.T)
        evals, evecs = torch.linalg.eigh(H)
        return cls(H, evals, evecs, sizes)

    def _chol(self, f: Tensor, delta: Tensor) -> Tensor:
        return torch.linalg.cholesky(f * self.H + torch.diag(expand(delta, self.sizes)))

    @override
    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        if delta.dim() == 0:  # one eigendecomposition serves every scalar prior
            value = torch.log(f * self.evals + delta).sum()
        else:
            value = 2 * torch.log(torch.diagonal(self._chol(f, delta))).sum()
        return value, _zero(value)

    @override
    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        if delta.dim() == 0:
            return ((R @ self.evecs) / (f * self.evals + delta)) @ self.evecs.T
        return torch.cholesky_solve(R.T, self._chol(f, delta)).T

    @override
    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        if delta.dim() == 0:
            scale = torch.rsqrt(f * self.evals + delta)
            return ((Z @ self.evecs) * scale) @ self.evecs.T
        L = self._chol(f, delta)
        return torch.linalg.solve_triangular(L.T, Z.T, upper=True).T


@dataclass(frozen=True, eq=False)
class Diag(Precision):
    """The exact diagonal of :math:`H`."""

    d: Tensor
    sizes: tuple[int, ...]

    def _p(self, f: Tensor, delta: Tensor) -> Tensor:
        return f * self.d + expand(delta, self.sizes)

    @override
    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        value = torch.log(self._p(f, delta)).sum()
        return value, _zero(value)

    @override
    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        return R / self._p(f, delta)

    @override
    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        return Z * torch.rsqrt(self._p(f, delta))


@dataclass(frozen=True)
class KronBlock:
    r"""One Kronecker block on one leaf: ``groups`` products :math:`G_g \otimes A_g`."""

    leaf: int  # position of the leaf in the subset
    groups: int
    out: int
    size: int
    transposed: bool = False  # the leaf is stored (in, out) and applied as x @ W: the block is W.T
    expert: int | None = None  # a stacked (E, ...) leaf: the block covers the slice leaf[expert]

    @property
    def length(self) -> int:
        """Entries of the leaf the block covers."""
        return self.groups * self.out * self.size


@dataclass(frozen=True, eq=False)
class Kron(Precision):
    r"""K-FAC with a separate block per weight and per bias, eigendecomposed once.

    Block :math:`G \otimes A = (Q_G \otimes Q_A)(\lambda_G \otimes \lambda_A)(Q_G \otimes
    Q_A)^\top`, so :math:`\log\det(f\, G \otimes A + \delta I) = \sum \log(f \lambda_{G,i}
    \lambda_{A,j} + \delta)`. Leaves no block covers have :math:`H = 0` there, and so have the
    slices of a stacked expert leaf (``w[e]``, one block per expert) that no expert block covers.
    """

    blocks: tuple[KronBlock, ...]
    grad_bases: tuple[Tensor, ...]
    grad_evals: tuple[Tensor, ...]
    input_bases: tuple[Tensor, ...]
    input_evals: tuple[Tensor, ...]
    uncovered: tuple[int, ...]
    sizes: tuple[int, ...]

    def _offsets(self) -> list[int]:
        out, start = [], 0
        for s in self.sizes:
            out.append(start)
            start += s
        return out

    def _lam(self, i: int) -> Tensor:
        return self.grad_evals[i].unsqueeze(-1) * self.input_evals[i].unsqueeze(-2)

    def _d(self, delta: Tensor, leaf: int) -> Tensor:
        return delta if delta.dim() == 0 else delta[leaf]

    @override
    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        value = 0.0
        rest = list(self.sizes)  # entries of each leaf no block covers: H = 0 there
        for i, b in enumerate(self.blocks):
            value = value + torch.log(f * self._lam(i) + self._d(delta, b.leaf)).sum()
            rest[b.leaf] -= b.length
        for leaf, count in enumerate(rest):
            if count:
                value = value + count * torch.log(self._d(delta, leaf))
        value = torch.as_tensor(value, dtype=f.dtype)
        return value, _zero(value)

    def _apply(self, R: Tensor, f: Tensor, delta: Tensor, power: float) -> Tensor:
        offsets = self._offsets()
        pieces: dict[int, Tensor] = {}  # start column -> the block's rows there
        for i, b in enumerate(self.blocks):
            start = offsets[b.leaf] + (b.expert or 0) * b.length
            m = R[:, start : start + b.length]
            if b.transposed:  # ravel order of W (in, out); the block's matrices are W.T's
                m = m.reshape(-1, b.size, b.out).mT
            m = m.reshape(-1, b.groups, b.out, b.size)
            qg, qa = self.grad_bases[i], self.input_bases[i]
            scale = torch.pow(f * self._lam(i) + self._d(delta, b.leaf), power)
            out = qg @ ((qg.mT @ m @ qa) * scale) @ qa.mT
            if b.transposed:
                out = out.reshape(-1, b.out, b.size).mT
            pieces[start] = out.reshape(R.shape[0], -1)
        parts, at = [], 0
        for leaf, (first, size) in enumerate(zip(offsets, self.sizes, strict=True)):
            starts = sorted(k for k in pieces if first <= k < first + size)
            for start, piece in [(k, pieces[k]) for k in starts] + [(first + size, None)]:
                if start > at:  # entries no block covers: the prior alone
                    parts.append(R[:, at:start] * torch.pow(self._d(delta, leaf), power))
                parts += [] if piece is None else [piece]
                at = start + (0 if piece is None else piece.shape[1])
        return torch.cat(parts, dim=1)

    @override
    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        return self._apply(R, f, delta, -1.0)

    @override
    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        return self._apply(Z, f, delta, -0.5)


@dataclass(frozen=True, eq=False)
class LowRank(Precision):
    r"""Top-``k`` eigenpairs of :math:`H`: :math:`P = P_0 + W W^\top`.

    With :math:`W = V (f\Lambda)^{1/2}`,

    :math:`\log\det P = \log\det P_0 + \log\det(I_k + W^\top P_0^{-1} W)` (the matrix
    determinant lemma) and :math:`P^{-1}` by Woodbury: :math:`k \times k` work per prior.
    """

    V: Tensor  # (n, k)
    lam: Tensor  # (k,)
    sizes: tuple[int, ...]

    def _parts(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = expand(delta, self.sizes)
        W = self.V * torch.sqrt(f * self.lam.clamp(min=0))
        C = torch.eye(W.shape[1], dtype=W.dtype, device=W.device) + (W.T / p) @ W
        return p, W, C

    @override
    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        p, _, C = self._parts(f, delta)
        L = torch.linalg.cholesky(C)
        value = torch.log(p).sum() + 2 * torch.log(torch.diagonal(L)).sum()
        return value, _zero(value)

    @override
    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        p, W, C = self._parts(f, delta)
        Rp = R / p
        return Rp - torch.linalg.solve(C, (Rp @ W).T).T @ (W.T / p)

    @override
    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        p, W, _ = self._parts(f, delta)
        B = W / torch.sqrt(p).unsqueeze(1)
        U, s, _ = torch.linalg.svd(B, full_matrices=False)
        shrink = torch.rsqrt(1 + s * s) - 1
        inner = Z + ((Z @ U) * shrink) @ U.T
        return inner / torch.sqrt(p)


@dataclass(frozen=True, eq=False)
class MatrixFree(Precision):
    r"""Products with :math:`H` only; :math:`\log\det P` by stochastic Lanczos quadrature.

    For a scalar prior :math:`\delta` the Lanczos runs made at fit time, on :math:`H` itself,
    serve every :math:`\delta` and factor :math:`f` (the Krylov spaces of :math:`H` and :math:`fH
    + \delta I` coincide, the Ritz values shift and scale): :math:`\log\det P \approx \frac1p
    \sum_k \|z_k\|^2 \sum_j w_{kj} \log(f \theta_{kj} + \delta)`, with its standard error over
    the probes. A prior with one value per leaf, :math:`P_0 = \operatorname{diag}(\delta)`, is
    not a shift: its Krylov spaces differ, so each such prior runs SLQ again, on :math:`P = fH +
    P_0` itself, from the same probes (``slq_steps`` data passes of ``num_probes`` products; the
    rules then read :math:`\log\theta_{kj}`). Both are differentiable in :math:`f` and
    :math:`\delta` (autograd, through the Lanczos run for per-leaf priors). Products with
    :math:`P^{-1}` (CG) and :math:`P^{-1/2}` (Lanczos) use :math:`P` with either prior.
    """

    matvec: Callable[[Tensor], Tensor]
    nodes: Tensor
    weights: Tensor
    sq_norms: Tensor
    sizes: tuple[int, ...]
    cg_maxiter: int
    cg_tol: float
    lanczos_steps: int
    probes: Tensor  # (num_probes, n): the start vectors of the fit's Lanczos runs
    slq_steps: int

    @staticmethod
    def _estimate(samples: Tensor) -> tuple[Tensor, Tensor]:
        p = samples.shape[0]
        mean = samples.mean()
        if p == 1:
            return mean, torch.full_like(mean, math.nan)
        return mean, samples.std() / math.sqrt(p)

    @override
    def logdet(self, f: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        if delta.dim() == 0:  # the fit's rules, shifted: no data pass
            logs = torch.log(f * self.nodes + delta)
            return self._estimate(self.sq_norms * (self.weights * logs).sum(1))
        res = slq(self._op(f, delta), self.probes, self.slq_steps)
        logs = torch.log(res.nodes.clamp(min=torch.finfo(res.nodes.dtype).tiny))
        return self._estimate(res.sq_norms * (res.weights * logs).sum(1))

    def _op(self, f: Tensor, delta: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> P v = f H v + P_0 v`` (``P_0`` a scalar or one value per parameter)."""
        p = delta if delta.dim() == 0 else expand(delta, self.sizes)
        return lambda v: f * self.matvec(v) + p * v

    @override
    def cov_rows(self, R: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        op = self._op(f, delta)
        rows = [solvers.cg(op, r, maxiter=self.cg_maxiter, tol=self.cg_tol).x for r in R]
        return torch.stack(rows)

    @override
    def sqrt_rows(self, Z: Tensor, f: Tensor, delta: Tensor) -> Tensor:
        # P^{-1/2} z ~ |z| Q T^{-1/2} e_1 from a Lanczos run on P started at z
        op = self._op(f, delta)
        out = []
        for z in Z:
            res = lanczos(op, z, self.lanczos_steps)
            theta, S = torch.linalg.eigh(res.tridiagonal())
            coef = S @ (torch.rsqrt(theta.clamp(min=torch.finfo(theta.dtype).tiny)) * S[0])
            out.append(torch.linalg.norm(z) * (coef @ res.basis))
        return torch.stack(out)
