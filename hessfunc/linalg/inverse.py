r"""Inverse curvature products beside :func:`hessfunc.cg`: the Neumann series and low rank.

Each solver applies :math:`(A + \lambda I)^{-1}` to a pytree ``b`` for a symmetric positive
semi-definite ``A`` given only as a product ``matvec`` (a Hessian, Gauss-Newton or Fisher
product, or your own), with Tikhonov damping :math:`\lambda` added inside so ``matvec`` stays the
bare curvature product. ``damping`` means the same thing in :func:`hessfunc.cg`, :func:`lissa`
and :func:`low_rank_inverse`, so one value gives one problem whichever solver runs it.

Which solver, for an operator with eigenvalues :math:`\mu_1 \ge \ldots \ge \mu_n \ge 0` and
condition number :math:`\kappa = (\mu_1 + \lambda) / (\mu_n + \lambda)`:

* :func:`hessfunc.cg`: the default. Its error falls like
  :math:`2\big((\sqrt\kappa - 1)/(\sqrt\kappa + 1)\big)^k` after ``k`` matvecs, and faster when
  the spectrum is clustered. Needs one fixed operator (every product the same matrix).
* :func:`lissa`: the Neumann series, one matvec per step, error :math:`(1 - 1/\kappa)^k` with the
  best scale: about :math:`\kappa \ln(1/\epsilon)` matvecs, so :math:`\sqrt\kappa` times more
  than CG. Its one advantage is that every step may use a different minibatch (a stochastic
  operator whose mean is ``A``), which CG cannot.
* :func:`low_rank_inverse`: ``rank`` eigenpairs once (``num_iters`` matvecs of Lanczos), after
  which every solve is free of matvecs. Exact on the kept eigenspace; elsewhere
  :math:`1/\lambda` stands in for :math:`1/(\mu_i + \lambda)`, a relative error of at most
  :math:`\mu_{r+1}/\lambda`. The choice for many right-hand sides when the spectrum decays fast
  or the damping is large compared with the discarded eigenvalues.

Nothing here differentiates anything: these are matvec algorithms, like the spectral layer, and
they run inside ``torch.compile(fullgraph=True)`` (iteration counts are Python ints, flags are
0-d tensors, nothing branches on tensor values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from .._base import _checks, _tree
from .._base._types import PyTree
from .lanczos import eigsh

__all__ = ["LissaResult", "LowRankInverse", "lissa", "low_rank_inverse"]

# Rounding slack of the divergence test on the iterate's norm: the bound holds exactly in exact
# arithmetic and is met with equality only by a singular undamped operator (x_k = (k+1) b / s).
_SLACK = 1.01


class LissaResult(NamedTuple):
    """Result of :func:`lissa` (a pytree: passes through ``vmap`` and ``torch.compile``)."""

    x: PyTree
    """The approximate solution, a pytree like ``b``; all ``nan`` when ``diverged``."""
    diverged: torch.Tensor
    """0-d bool: some step left the region where the recursion contracts (see :func:`lissa`)."""
    residual_norm: torch.Tensor
    """0-d: :math:`\\|b - (A_T + \\lambda I)\\, x_{T-1}\\|` at the last step's operator."""
    iterations: torch.Tensor
    """0-d integer: the number of matvecs, one per element of ``batches``."""


def _norm(tree: PyTree) -> torch.Tensor:
    return torch.sqrt(_tree.vdot(tree, tree))


def _check_damping(where: str, damping: Any, *, positive: bool = False) -> None:
    _checks.check_damping(where, damping, positive=positive)


def lissa(
    matvec: Callable[..., PyTree],
    b: PyTree,
    batches: Iterable[Any],
    *,
    damping: float | torch.Tensor = 0.0,
    scale: float | torch.Tensor = 1.0,
) -> LissaResult:
    r"""Solve :math:`(A + \lambda I)\,x = b` by the Neumann series (LiSSA), one matvec per batch.

    With :math:`M = A + \lambda I` and step :math:`1/s` (``s = scale``), the recursion

    .. math:: x_0 = b / s, \qquad x_{k} = x_{k-1} + \big(b - M_k\, x_{k-1}\big) / s

    sums the Neumann series :math:`x_T = \frac1s \sum_{j=0}^{T} (I - M/s)^j b \to M^{-1} b`. Step
    ``k`` calls ``matvec(x, *batch)`` with the ``k``-th element of ``batches``: a minibatch of
    training data, so :math:`M_k` is a stochastic estimate of :math:`M` (the LiSSA of Agarwal et
    al. as Koh & Liang use it), or ``()`` for a fixed operator (``[()] * T``).

    **Conventions.** ``damping`` is the :math:`\lambda` of :math:`(A + \lambda I)^{-1}`, as in
    :func:`hessfunc.cg` and :func:`low_rank_inverse`, and the result is already divided by the
    scale. Koh & Liang's recursion :math:`h \leftarrow v + (1 - d)\,h - A h / s`, whose
    estimate is :math:`h / s`, solves with :math:`A + d s I`: their ``damping=d, scale=s`` is
    ``damping=d * s, scale=s`` here.

    **Convergence.** The error after ``T`` matvecs is :math:`(I - M/s)^{T+1} x^*`, so the
    series converges if and only if every eigenvalue of :math:`M` lies in :math:`(0, 2s)`:
    the scale must exceed half the largest eigenvalue, :math:`s > (\mu_{\max} + \lambda)/2`.
    Take :math:`s \ge \mu_{\max} + \lambda` (every component then decays without changing
    sign) and as small as that allows: the slowest component decays like
    :math:`(1 - (\mu_{\min} + \lambda)/s)^T`, so reaching a relative error :math:`\epsilon`
    takes about :math:`\kappa \ln(1/\epsilon)` matvecs with :math:`\kappa = s / (\mu_{\min} +
    \lambda)`. Estimate :math:`\mu_{\max}` with a few steps of :func:`hessfunc.eigsh`. With
    minibatches the scale must exceed every batch operator's top eigenvalue, and the result
    keeps a floor that more steps do not lower: the iterate follows the last few batches. The
    floor falls like :math:`1/s` while the steps needed grow like :math:`s` (on a logistic
    regression with two alternating half-batches, 11% relative error at :math:`s =
    \mu_{\max}`, 0.85% at :math:`10 \mu_{\max}`); averaging independent runs lowers it too.

    **Divergence flag.** If every :math:`M_k` has its spectrum in :math:`[0, 2s]`, each step
    applies the non-expansion :math:`I - M_k/s` to the iterate and adds :math:`b/s`, so
    :math:`\|x_k - x_0\| \le \|x_{k-1}\|` at every step and :math:`\|x_k\| \le (k + 1)\|b\|/s`,
    for fixed and stochastic operators alike. ``diverged`` is set when an iterate breaks either
    (beyond rounding) or stops being finite: some batch operator had an eigenvalue above
    :math:`2s` (``scale`` too small) or below zero (an indefinite ``A`` with too little
    damping). It never trips on a spectrum inside :math:`[0, 2s]`, singular or not; a growing
    component is caught once it outweighs the contracting ones, after a few steps for an
    eigenvalue well above :math:`2s` and after hundreds for one just above it. (A test on the
    residual could not be sound: with minibatches one step's residual
    :math:`\|b - M_k x\|` routinely exceeds :math:`\|b\|` while the series converges.) A
    diverged ``x`` is returned as ``nan``: it is never a number that looks like an answer.

    Args:
        matvec: ``matvec(v, *batch) -> A v`` for ``v`` a pytree like ``b``; ``A`` symmetric
            positive semi-definite. A tuple or list element of ``batches`` is unpacked into
            ``*batch``; any other element is passed as one argument.
        b: the right-hand side, a pytree of floating tensors.
        batches: an iterable with one element per step (its length is the number of matvecs):
            minibatch tuples such as ``(x, y)``, or ``[()] * T`` for a fixed operator.
        damping: :math:`\lambda \ge 0`, added to ``A``.
        scale: :math:`s > 0`, larger than :math:`(\mu_{\max} + \lambda)/2`; take
            :math:`s \ge \mu_{\max} + \lambda`.

    Returns:
        A :class:`LissaResult` ``(x, diverged, residual_norm, iterations)``.

    Cost:
        One ``matvec`` per element of ``batches``; memory of three pytrees like ``b``. CG needs
        about :math:`\sqrt\kappa` times fewer matvecs on a fixed operator.

    Example:
        With the scale at the largest eigenvalue, 60 steps shrink the error by
        :math:`(1 - 1/4)^{61}`:

        >>> import torch, hessfunc
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> b = torch.ones(3, dtype=torch.float64)
        >>> res = hessfunc.lissa(lambda v: A @ v, b, [()] * 60, scale=4.0)
        >>> [round(v, 6) for v in res.x.tolist()], bool(res.diverged)
        ([1.0, 0.5, 0.25], False)
        >>> bool(hessfunc.lissa(lambda v: A @ v, b, [()] * 60, scale=1.5).diverged)
        True
    """
    where = "hessfunc.lissa(matvec, b, batches, damping=, scale=)"
    if not callable(matvec):
        raise TypeError(
            f"{where}: matvec must be callable as matvec(v, *batch) -> A v, got "
            f"{type(matvec).__name__}."
        )
    _checks.check_params(where, b, name="b")
    _check_damping(where, damping)
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"{where}: scale must be a number or a 0-d tensor.")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(
            f"{where}: scale must be a positive number, larger than half of (the largest "
            f"eigenvalue of A) + damping; got {scale!r}. Estimate the top eigenvalue with "
            "hessfunc.eigsh and take scale at least that plus damping."
        )
    try:
        steps = iter(batches)
    except TypeError:
        raise TypeError(
            f"{where}: batches must be an iterable with one element per step, e.g. a list of "
            f"(x, y) minibatches, or [()] * T for a fixed operator; got {type(batches).__name__}."
        ) from None

    leaf = _tree.tree_leaves(b)[0]
    b_norm = _norm(b)
    x = _tree.scale(1.0 / scale, b)
    diverged = torch.zeros((), dtype=torch.bool, device=leaf.device)
    residual = b_norm
    count = 0
    x0, x_norm = x, _norm(x)
    x0_norm = x_norm
    slack = 1.0 + torch.finfo(x_norm.dtype).eps ** 0.5
    for batch in steps:
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        out = matvec(x, *args)
        if count == 0:  # matched to b by name once per call (see _checks.check_tree)
            _checks.check_tree(where, b, out, "matvec(x, *batch)", "b")
        r = _tree.sub(b, _tree.axpy(damping, x, out))
        residual = _norm(r)
        x_new = _tree.axpy(1.0 / scale, r, x)
        count += 1
        # x_new - x0 = (I - M_k / s) x: no longer than x when M_k's spectrum is in [0, 2s]
        # (the second term absorbs rounding when x is about zero, e.g. an eigenvalue at 2s)
        stretched = _norm(_tree.sub(x_new, x0)) > slack * x_norm + (slack - 1) * x0_norm
        x, x_norm = x_new, _norm(x_new)
        total = x_norm > _SLACK * (count + 1) * b_norm / scale
        diverged = diverged | stretched | total | ~torch.isfinite(x_norm)
    x = _tree.tree_map(lambda t: torch.where(diverged, torch.full_like(t, float("nan")), t), x)
    iterations = torch.full((), count, dtype=torch.int64, device=leaf.device)
    return LissaResult(x, diverged, residual, iterations)


class LowRankInverse(NamedTuple):
    r"""A damped inverse from ``rank`` eigenpairs: :math:`(U \Lambda U^\top + \lambda I)^{-1}`.

    Made by :func:`low_rank_inverse`; ``solve(b)`` applies it. A pytree (a NamedTuple), so it
    passes in and out of ``torch.compile`` and its ``solve`` runs under ``vmap``.
    """

    eigenvalues: torch.Tensor
    """``(rank,)``: the kept eigenvalues, largest first."""
    eigenvectors: PyTree
    """Orthonormal eigenvectors: a pytree like ``v0`` whose leaves have a leading axis rank."""
    residual_norms: torch.Tensor
    """``(rank,)``: :math:`\\|A u_i - \\mu_i u_i\\|`, how exact each kept pair is."""
    damping: float | torch.Tensor
    """:math:`\\lambda`, the default damping of :meth:`solve`."""

    def solve(self, b: PyTree, damping: float | torch.Tensor | None = None) -> PyTree:
        r"""Apply :math:`(U \Lambda U^\top + \lambda I)^{-1}` to ``b``.

        :math:`x = b/\lambda + U\,\mathrm{diag}\big(1/(\mu_i + \lambda) - 1/\lambda\big)\,U^\top
        b`: the kept eigendirections are divided by :math:`\mu_i + \lambda`, the rest of the
        space by :math:`\lambda`.

        Args:
            b: a pytree like ``v0``.
            damping: another :math:`\lambda > 0` for this solve (default: the one the inverse
                was built with). The eigenpairs do not depend on it, so changing it is free.

        Returns:
            A pytree like ``b``.
        """
        lam = self.damping if damping is None else damping
        _check_damping("hessfunc.LowRankInverse.solve(b, damping=)", lam, positive=True)
        where = "hessfunc.LowRankInverse.solve(b)"
        # b is matched to the eigenvectors by name, then by shape and dtype: a reordered dict
        # of leaves of the same shapes would otherwise be projected by position
        _checks.check_tree(where, _tree.tree_map(lambda u: u[0], self.eigenvectors), b, "b", "v0")
        u_leaves = _tree.tree_leaves(self.eigenvectors)
        b_leaves = _tree.tree_leaves(b)
        rank = self.eigenvalues.shape[0]
        coeffs = sum(
            u.reshape(rank, -1) @ t.reshape(-1).to(u.dtype)
            for u, t in zip(u_leaves, b_leaves, strict=True)
        )
        weights = coeffs * (1.0 / (self.eigenvalues + lam) - 1.0 / lam)

        def combine(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            low = (weights.to(u.dtype) @ u.reshape(rank, -1)).reshape(t.shape)
            return t / lam + low.to(t.dtype)

        # unflattened with b's own structure: no comparison of two tree specs, which dynamo
        # gets wrong on some torch releases (see _checks.check_like)
        out = [combine(u, t) for u, t in zip(u_leaves, b_leaves, strict=True)]
        return _tree.tree_unflatten(_tree.tree_structure(b), out)


def low_rank_inverse(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    rank: int,
    *,
    num_iters: int | None = None,
    damping: float | torch.Tensor,
) -> LowRankInverse:
    r"""A damped inverse built from the top ``rank`` eigenpairs of ``A`` (Lanczos, once).

    Runs :func:`hessfunc.eigsh` for ``num_iters`` Lanczos steps and keeps the ``rank`` largest
    Ritz pairs :math:`(\mu_i, u_i)`; the returned object's ``solve(b)`` applies

    .. math:: (U \Lambda U^\top + \lambda I)^{-1} b = \frac{b}{\lambda} + \sum_{i \le r}
       \Big(\frac{1}{\mu_i + \lambda} - \frac1\lambda\Big) (u_i^\top b)\, u_i ,

    exact on the kept eigenspace and :math:`1/\lambda` on the rest of the space. This is the
    Arnoldi approach of Schioppa et al. (2022) to influence functions: one factorisation,
    then any number of solves at the cost of ``rank`` inner products each.

    **Accuracy.** With exact eigenpairs, the error on ``b`` is
    :math:`\sum_{i > r} \frac{\mu_i}{\lambda(\mu_i + \lambda)} (u_i^\top b)\, u_i`: relative to
    the exact solution's part outside the kept space, at most :math:`\mu_{r+1}/\lambda` (at
    most :math:`\max_{i > r} |\mu_i| / \lambda` if ``A`` has negative eigenvalues). It is
    small when the spectrum has fallen well below the damping by the ``rank``-th eigenvalue,
    and it does not shrink with more iterations, only with more rank. Directions in the null
    space of ``A`` (a Gauss-Newton matrix has rank at most samples times outputs) are handled
    exactly. Read ``residual_norms`` to see how converged the kept pairs are; raise
    ``num_iters`` (2 to 3 times ``rank``) if they are not small.

    Only the largest (algebraic) eigenvalues are kept: ``A`` should be positive semi-definite.
    If a kept :math:`\mu_i + \lambda \le 0` (an indefinite Hessian, too little damping) the
    solve divides by it; :func:`hessfunc.influence` warns about it.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like ``v0``; ``A`` symmetric.
        v0: the Lanczos start vector, a pytree like the right-hand sides (random, non-zero).
        rank: ``r``, the eigenpairs kept, a Python int, ``1 <= rank <= num_iters``.
        num_iters: Lanczos steps (default: :func:`hessfunc.eigsh`'s, ``max(2 rank + 1, 20)``
            capped at the dimension).
        damping: :math:`\lambda > 0` (the rest of the space is divided by it).

    Returns:
        A :class:`LowRankInverse` ``(eigenvalues, eigenvectors, residual_norms, damping)``
        with a ``solve(b, damping=None)`` method.

    Cost:
        ``num_iters`` matvecs once, plus :math:`O(\text{num\_iters}^2\, n)` flops of
        reorthogonalisation; memory of ``2 num_iters`` vectors while building and ``rank``
        vectors kept. Each ``solve``: no matvec, :math:`4 r n` flops.

    Example:
        On a rank-2 matrix the inverse is exact:

        >>> import torch, hessfunc
        >>> u = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]], dtype=torch.float64)
        >>> A = u.T @ torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64)) @ u
        >>> v0 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> inv = hessfunc.low_rank_inverse(lambda v: A @ v, v0, 2, num_iters=4, damping=0.5)
        >>> b = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
        >>> torch.allclose(inv.solve(b), torch.linalg.solve(A + 0.5 * torch.eye(4), b))
        True
    """
    where = "hessfunc.low_rank_inverse(matvec, v0, rank, num_iters=, damping=)"
    _check_damping(where, damping, positive=True)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: rank must be a Python int >= 1, got {rank!r}.")
    eig = eigsh(matvec, v0, rank, num_iters=num_iters, which="LA")
    return LowRankInverse(eig.eigenvalues, eig.eigenvectors, eig.residual_norms, damping)
