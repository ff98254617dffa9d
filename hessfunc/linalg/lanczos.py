r"""Extreme eigenvalues of symmetric operators: Lanczos, ``eigsh`` and power iteration.

All three take ``matvec(v) -> A v`` over pytrees and a start vector ``v0`` (a pytree like
``params``; draw it yourself, e.g. one row of :func:`hessfunc.random_probes`). Iteration counts
are Python ints and nothing branches on tensor values under ``torch.compile``, so each runs
inside ``torch.compile(fullgraph=True)`` and reruns without recompiling for new data.

Lanczos with full reorthogonalisation is the method of choice: on a well-separated top of the
spectrum it reaches the top 5 eigenvalues to machine precision in about 20 matvecs, on a
clustered top in about 60, where power iteration needs hundreds to thousands. Without
reorthogonalisation, Lanczos loses orthogonality as soon as an eigenvalue converges and then
returns *ghost* copies of it, while the Ritz residual estimate :math:`|\beta_m s_{mi}|` still
reads about zero; so ``eigsh`` reports the true residual :math:`\|Au - \theta u\|`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from .._base import _checks, _operator
from .._base._types import PyTree

__all__ = [
    "EigshResult",
    "LanczosResult",
    "PowerIterationResult",
    "eigsh",
    "lanczos",
    "power_iteration",
]

Which = Literal["LA", "SA", "LM"]


class LanczosResult(NamedTuple):
    r"""The Lanczos decomposition :math:`A Q_m \approx Q_m T_m` (a pytree)."""

    alphas: torch.Tensor
    """``(m,)``: the diagonal of the tridiagonal matrix :math:`T_m`."""
    betas: torch.Tensor
    """``(m - 1,)``: its off-diagonal (0 where the Krylov space was exhausted)."""
    basis: PyTree
    """The Lanczos vectors :math:`q_1, \\ldots, q_m`: a pytree like ``v0`` with leading axis m."""

    def tridiagonal(self) -> torch.Tensor:
        """The dense ``(m, m)`` tridiagonal matrix :math:`T_m`."""
        return _tridiagonal(self.alphas, self.betas)


class EigshResult(NamedTuple):
    """``k`` eigenpairs from :func:`eigsh` (a pytree)."""

    eigenvalues: torch.Tensor
    """``(k,)``: the Ritz values, in the order asked for by ``which``."""
    eigenvectors: PyTree
    """Unit Ritz vectors, a pytree like ``v0`` whose leaves have a leading axis ``k``."""
    residual_norms: torch.Tensor
    """``(k,)``: :math:`\\|A u_i - \\theta_i u_i\\|` for the returned (unit) vectors."""


class PowerIterationResult(NamedTuple):
    """``k`` eigenpairs from :func:`power_iteration` (a pytree)."""

    eigenvalues: torch.Tensor
    """``(k,)``: Rayleigh quotients, in the order found (largest magnitude first)."""
    eigenvectors: PyTree
    """Unit vectors, a pytree like ``v0`` whose leaves have a leading axis ``k``."""
    residual_norms: torch.Tensor
    """``(k,)``: :math:`\\|A u_i - \\theta_i u_i\\|` of the returned vectors."""
    iterations: torch.Tensor
    """``(k,)`` integer: matvecs spent on each eigenpair."""


def _tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)


def _fallback(rows: torch.Tensor, j: int) -> torch.Tensor:
    """A fixed vector with no structure in common with an operator, for step ``j``.

    Used when the Krylov space is exhausted (an invariant subspace was found): Lanczos then
    restarts from a vector orthogonal to the basis, and the zero off-diagonal it records
    decouples the tridiagonal matrix, so both blocks hold exact Ritz values. Deterministic, so
    no randomness is needed inside compiled code.
    """
    idx = torch.arange(rows.shape[-1], dtype=rows.dtype, device=rows.device)
    # irrational frequencies and phases (from the plastic number and sqrt 2): no
    # two steps give related vectors, and none lines up with the coordinate axes
    frequency = 0.7548776662 * (j + 1) + 0.5698402910
    phase = 0.4142135624 * (j + 1)
    return torch.cos(idx * frequency + phase).expand(rows.shape)


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the rows of ``Q``, twice ("twice is enough", Kahan)."""
    for _ in range(2):
        w = w - torch.einsum("pm,pmn->pn", torch.einsum("pmn,pn->pm", Q, w), Q)
    return w


def lanczos_rows(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    num_iters: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    keep_images: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``p`` independent Lanczos runs at once, one per row of ``start`` (``(p, n)``).

    Returns ``(alphas (p, m), betas (p, m-1), basis (p, m, n) or None, images (p, m, n) or
    None)`` where ``images`` holds :math:`A q_j`. Every step is one call of ``apply`` on ``p``
    rows. The basis is preallocated and filled with ``select_scatter``, so shapes never change
    and the unrolled graph is the same at every step; reorthogonalising against the unfilled
    (zero) rows is a no-op.
    """
    p, n = start.shape
    m = num_iters
    eps = torch.finfo(start.dtype).eps
    tol = eps**0.75 * n**0.5
    q = start / torch.linalg.vector_norm(start, dim=1, keepdim=True)
    need_basis = reorthogonalize or keep_basis
    Q = q.new_zeros(p, m, n) if need_basis else None
    AQ = q.new_zeros(p, m, n) if keep_images else None
    q_prev = torch.zeros_like(q)
    beta_prev = q.new_zeros(p)
    scale = q.new_zeros(p)
    alphas, betas = [], []
    compiling = torch.compiler.is_compiling()
    for j in range(m):
        if Q is not None:
            Q = torch.select_scatter(Q, q, 1, j)
        w = apply(q)
        if AQ is not None:
            AQ = torch.select_scatter(AQ, w, 1, j)
        alpha = (q * w).sum(1)
        alphas.append(alpha)
        if j == m - 1:
            break
        w = w - alpha[:, None] * q - beta_prev[:, None] * q_prev
        if reorthogonalize:
            w = _orthogonalise(w, Q)
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = torch.maximum(scale, torch.sqrt(alpha**2 + beta**2 + beta_prev**2))
        ok = beta > tol * scale
        if compiling or not bool(ok.all()):  # eager: build the restart vector only if needed
            f = _fallback(q, j)
            if reorthogonalize:
                f = _orthogonalise(f, Q)
            else:
                f = (
                    f
                    - (f * q).sum(1, keepdim=True) * q
                    - (f * q_prev).sum(1, keepdim=True) * q_prev
                )
            f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True)
            safe = torch.where(ok, beta, torch.ones_like(beta))
            q_next = torch.where(ok[:, None], w / safe[:, None], f)
            beta = torch.where(ok, beta, torch.zeros_like(beta))
        else:
            q_next = w / beta[:, None]
        betas.append(beta)
        q_prev, q, beta_prev = q, q_next, beta
    a = torch.stack(alphas, 1)
    b = torch.stack(betas, 1) if betas else a.new_zeros(p, 0)
    return a, b, Q, AQ


def check_finite(where: str, alphas: torch.Tensor, betas: torch.Tensor) -> None:
    """Name a non-finite product before the small eigenproblem fails on it (eager only).

    A ``nan`` or ``inf`` from ``matvec`` spreads into every later Lanczos coefficient, and
    ``torch.linalg.eigh`` then reports an ill-conditioned matrix instead of the cause. One
    host synchronisation per call; skipped under torch.compile (the result is then ``nan``).
    """
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(alphas)
    if bool(bad.any()):
        step = int(bad.any(0).nonzero()[0, 0])
        raise FloatingPointError(
            f"{where}: matvec returned a non-finite value (nan or inf) at Lanczos step {step} "
            "(products before it were finite). Check the operator at that point: a loss that "
            "overflows, a log of zero, a division by a zero count; run it with "
            "torch.autograd.set_detect_anomaly(True) or check the product with "
            "torch.isfinite on a few random vectors."
        )
    if not bool(torch.isfinite(betas).all()):
        raise FloatingPointError(
            f"{where}: the Lanczos recurrence produced a non-finite value; matvec's products "
            "are finite but overflow when combined. Scale the operator down."
        )


def _check_iters(where: str, num_iters: int, n: int) -> None:
    _operator.check_int(where, "num_iters", num_iters)
    if num_iters > n:
        raise ValueError(
            f"{where}: num_iters={num_iters} exceeds the dimension n = {n}; a Krylov space has at "
            f"most n dimensions. Pass num_iters <= {n}."
        )


def lanczos(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    num_iters: int,
    *,
    reorthogonalize: bool = True,
) -> LanczosResult:
    r"""The Lanczos process: an orthonormal Krylov basis and the tridiagonal :math:`Q^\top A Q`.

    From :math:`q_1 = v_0 / \|v_0\|`, each step applies ``matvec`` once and orthogonalises
    against the previous two vectors (three-term recurrence)
    :math:`\beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}`. With
    ``reorthogonalize=True`` (default) the new vector is also orthogonalised against the whole
    basis, twice (classical Gram-Schmidt, "twice is enough"), which keeps the basis orthonormal
    to rounding and prevents ghost eigenvalues. If the Krylov space is exhausted
    (:math:`\beta_j \approx 0`: ``v0`` lies in an invariant subspace), the process records
    :math:`\beta_j = 0` and continues from a fixed vector orthogonal to the basis, so
    :math:`T_m` splits into blocks whose eigenvalues are all eigenvalues of :math:`A`.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like ``v0``; ``A`` symmetric.
        v0: the start vector, a pytree of floating tensors (need not be normalised, must not be
            zero).
        num_iters: ``m``, the number of matvecs and the size of :math:`T_m`; at most ``n``.
        reorthogonalize: full reorthogonalisation (default). ``False`` is the textbook
            three-term recurrence: :math:`O(n)` work and memory per step instead of
            :math:`O(mn)`, at the price of ghost copies of converged eigenvalues.

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis)``; ``.tridiagonal()`` builds
        :math:`T_m`. Its eigenvalues (Ritz values) approximate the extreme eigenvalues of ``A``.

    Cost:
        ``m`` matvecs; :math:`4mn` flops per step for reorthogonalisation; memory of ``m + 3``
        vectors.

    Example:
        On a diagonal matrix with ``m = n`` the Ritz values are the eigenvalues:

        >>> import torch, hessfunc
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> res = hessfunc.lanczos(lambda v: A @ v, torch.ones(4, dtype=torch.float64), 4)
        >>> [round(x, 10) for x in torch.linalg.eigvalsh(res.tridiagonal()).tolist()]
        [1.0, 2.0, 3.0, 4.0]
    """
    where = "hessfunc.lanczos(matvec, v0, num_iters)"
    _checks.check_params(where, v0, name="v0")
    op, start = _operator.flat_operator(where, matvec, v0)
    _check_iters(where, num_iters, op.n)
    a, b, Q, _ = lanczos_rows(op.apply, start[None], num_iters, reorthogonalize=reorthogonalize)
    return LanczosResult(a[0], b[0], op.to_tree(Q[0]))


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the ``k`` wanted Ritz values (``theta`` ascending), in the documented order."""
    m = theta.shape[0]
    if which == "LA":
        return torch.arange(m - 1, m - 1 - k, -1, device=theta.device)
    if which == "SA":
        return torch.arange(k, device=theta.device)
    return torch.topk(theta.abs(), k).indices


def eigsh(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int,
    *,
    num_iters: int | None = None,
    which: Which = "LA",
    reorthogonalize: bool = True,
) -> EigshResult:
    r"""``k`` extreme eigenpairs of a symmetric operator, by Lanczos and Rayleigh-Ritz.

    Runs :func:`lanczos` for ``num_iters`` steps, diagonalises :math:`T_m = S \Theta S^\top`
    and returns the ``k`` wanted Ritz pairs :math:`(\theta_i, u_i = Q s_i)`. The images
    :math:`A q_j` from the Lanczos steps are kept, so :math:`A u_i = (AQ) s_i` is exact by
    linearity and the residuals :math:`\|A u_i - \theta_i u_i\|` are true residuals at no
    extra matvec. (The usual Ritz estimate :math:`|\beta_m s_{mi}|` is not used: without
    reorthogonalisation it reads about zero for ghost copies too.) A small residual bounds the
    eigenvalue error: some eigenvalue lies within ``residual_norm`` of each :math:`\theta_i`,
    and within :math:`r^2/\mathrm{gap}` once the gap to the rest of the spectrum is known.

    There is no restart: to tighten the result, raise ``num_iters`` (about 20 for a few
    well-separated top eigenvalues, 60 or more for clustered ones) and read ``residual_norms``.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like ``v0``; ``A`` symmetric.
        v0: the start vector, a pytree of floating tensors (random, e.g. one row of
            :func:`hessfunc.random_probes`; non-zero).
        k: how many eigenpairs, ``1 <= k <= num_iters``.
        num_iters: Lanczos steps ``m`` (default ``min(n, max(2k + 1, 20))``), at most ``n``.
        which: ``"LA"`` largest algebraic (default, largest first), ``"SA"`` smallest algebraic
            (smallest first), ``"LM"`` largest magnitude (largest first).
        reorthogonalize: full reorthogonalisation (default; see :func:`lanczos`).

    Returns:
        An :class:`EigshResult` ``(eigenvalues (k,), eigenvectors (pytree, leading axis k),
        residual_norms (k,))``; the eigenvectors are orthonormal to rounding.

    Cost:
        ``num_iters`` matvecs, one per Lanczos step (the residuals reuse them), plus
        :math:`O(m^2 n)` flops; memory of ``2m`` vectors (basis and images).

    Example:
        >>> import torch, hessfunc
        >>> spectrum = torch.cat([torch.tensor([10.0, 8.0]), torch.linspace(0, 1, 98)])
        >>> A = torch.diag(spectrum).double()
        >>> v0 = torch.ones(100, dtype=torch.float64)
        >>> res = hessfunc.eigsh(lambda v: A @ v, v0, 2, num_iters=20)
        >>> [round(x, 10) for x in res.eigenvalues.tolist()]
        [10.0, 8.0]
        >>> bool((res.residual_norms < 1e-8).all())
        True
    """
    where = "hessfunc.eigsh(matvec, v0, k)"
    _checks.check_params(where, v0, name="v0")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"{where}: unknown which={which!r}; expected 'LA', 'SA' or 'LM'.")
    op, start = _operator.flat_operator(where, matvec, v0)
    _operator.check_int(where, "k", k)
    if num_iters is None:
        num_iters = min(op.n, max(2 * k + 1, 20))
    _check_iters(where, num_iters, op.n)
    if k > num_iters:
        raise ValueError(
            f"{where}: k={k} exceeds num_iters={num_iters}; Lanczos with m steps gives m Ritz "
            f"values. Pass num_iters >= {k} (2k or more for accurate values)."
        )
    a, b, Q, AQ = lanczos_rows(
        op.apply, start[None], num_iters, reorthogonalize=reorthogonalize, keep_images=True
    )
    check_finite(where, a, b)
    theta, S = torch.linalg.eigh(_tridiagonal(a[0], b[0]))
    idx = _select(theta, k, which)
    theta, S = theta[idx], S[:, idx]
    U, AU = S.T @ Q[0], S.T @ AQ[0]
    norms = torch.linalg.vector_norm(U, dim=1, keepdim=True)
    U, AU = U / norms, AU / norms
    residuals = torch.linalg.vector_norm(AU - theta[:, None] * U, dim=1)
    return EigshResult(theta, op.to_tree(U), residuals)


def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int = 1,
    *,
    num_iters: int = 100,
    tol: float | None = None,
) -> PowerIterationResult:
    r"""Power iteration with deflation: the ``k`` eigenvalues of largest magnitude, one by one.

    For eigenpair :math:`i`, iterates :math:`v \leftarrow P A v / \|P A v\|` where :math:`P`
    projects out the vectors :math:`u_{j<i}` already found (deflation by projection; for a
    symmetric ``A`` it removes their eigenvalues from the iteration), from ``v0`` projected the
    same way. The baseline most tools offer; its convergence rate
    is :math:`|\lambda_{i+1}/\lambda_i|` per matvec, so a clustered top needs hundreds to
    thousands of matvecs where :func:`eigsh` needs tens, and every deflated pair inherits the
    errors of the earlier ones.

    The stopping rule is the true residual, never the change of the Rayleigh quotient (which
    stalls long before the vector converges): each matvec gives
    :math:`\theta = v^\top A v` and :math:`r = \|Av - \theta v\|` for free. With ``tol``, an
    eigenpair is done once :math:`r \le \mathrm{tol}\, |\theta|`; eager code then stops,
    compiled code keeps running its fixed ``num_iters`` steps with the pair frozen (no host
    sync, one graph), so both return the same result.

    Past the operator's rank (``k`` above the number of non-zero eigenvalues, or a null
    operator) the deflated product is rounding, about :math:`\epsilon^{3/4}\sqrt n` of the
    operator's scale or less: the pair is then returned as eigenvalue 0 with a unit vector
    orthogonal to the earlier ones (residual :math:`\|Av\|`), never a copy of an earlier pair
    or ``nan``. A start vector inside the span of the pairs already found is replaced by a fixed
    vector orthogonal to them.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like ``v0``; ``A`` symmetric.
        v0: the start vector, a pytree of floating tensors (random; non-zero).
        k: number of eigenpairs.
        num_iters: matvecs per eigenpair at most, a Python int.
        tol: relative residual tolerance, or ``None`` to always run ``num_iters`` steps.

    Returns:
        A :class:`PowerIterationResult` ``(eigenvalues, eigenvectors, residual_norms,
        iterations)``, largest magnitude first (as found).

    Cost:
        At most ``k * num_iters`` matvecs (``iterations.sum()`` of them in eager code with a
        ``tol``); memory of ``k + 3`` vectors.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.diag(torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))
        >>> v0 = torch.ones(3, dtype=torch.float64)
        >>> res = hessfunc.power_iteration(lambda v: A @ v, v0, num_iters=200, tol=1e-10)
        >>> round(float(res.eigenvalues[0]), 10), res.iterations.tolist()
        (5.0, [16])
    """
    where = "hessfunc.power_iteration(matvec, v0, k, num_iters=)"
    _checks.check_params(where, v0, name="v0")
    _operator.check_int(where, "k", k)
    _operator.check_int(where, "num_iters", num_iters)
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"{where}: tol must be None or a non-negative float, got {tol!r}.")
    op, start = _operator.flat_operator(where, matvec, v0)
    if k > op.n:
        raise ValueError(f"{where}: k={k} exceeds the dimension n = {op.n}.")
    eager_stop = tol is not None and not torch.compiler.is_compiling()
    found: list[torch.Tensor] = []
    thetas, residuals, counts = [], [], []
    # A deflated product below this fraction of the operator's scale is rounding: the operator
    # restricted to the complement of the pairs found is null (k above the rank, or a null
    # operator), and normalising that rounding would return a copy of an earlier pair or nan.
    eps = torch.finfo(start.dtype).eps
    null_tol = eps**0.75 * op.n**0.5
    scale = start.new_zeros(())  # the largest |A v| seen: the operator's scale

    def deflate(x: torch.Tensor) -> torch.Tensor:
        for u in found:
            x = x - (u @ x) * u
        return x

    def unit(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """``x`` normalised, or ``fallback`` where ``x`` is (about) zero; no host sync."""
        norm = torch.linalg.vector_norm(x)
        small = norm <= eps * op.n * torch.linalg.vector_norm(start)
        return torch.where(small, fallback, x / torch.where(small, torch.ones_like(norm), norm))

    for i in range(k):
        # a start vector inside the span of the pairs found is replaced by a fixed one
        # orthogonal to them (the restart vector Lanczos uses), never divided by zero
        spare = deflate(deflate(_fallback(start[None], i)[0]))
        v = unit(deflate(start), spare / torch.linalg.vector_norm(spare))
        vec, theta = v, v.new_zeros(())
        residual = v.new_full((), float("inf"))
        active = torch.ones((), dtype=torch.bool, device=v.device)
        count = torch.zeros((), dtype=torch.int64, device=v.device)
        for _ in range(num_iters):
            w = op.apply(v[None])[0]
            scale = torch.maximum(scale, torch.linalg.vector_norm(w))
            d = deflate(w)
            dn = torch.linalg.vector_norm(d)
            null = dn <= null_tol * scale
            t = torch.where(null, torch.zeros_like(dn), v @ w)
            r = torch.linalg.vector_norm(w - t * v)  # v is a unit vector: the true residual
            vec = torch.where(active, v, vec)
            theta = torch.where(active, t, theta)
            residual = torch.where(active, r, residual)
            count = count + active.to(count.dtype)
            # on a null deflated operator the pair is final: eigenvalue 0, v orthogonal to the
            # earlier vectors (and to every direction A maps anywhere)
            active = active & ~null
            if tol is not None:
                active = active & (r > tol * t.abs())
            if eager_stop and not bool(active):
                break
            v = torch.where(null, v, d / torch.where(null, torch.ones_like(dn), dn))
        found.append(vec)
        thetas.append(theta)
        residuals.append(residual)
        counts.append(count)
    U = torch.stack(found)
    return PowerIterationResult(
        torch.stack(thetas), op.to_tree(U), torch.stack(residuals), torch.stack(counts)
    )
