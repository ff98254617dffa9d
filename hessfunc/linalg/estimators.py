r"""Randomised trace and diagonal estimators for symmetric operators given as matvecs.

Every estimator takes ``matvec(v) -> A v`` over pytrees (``lambda v: hessfunc.hvp(f, params, v,
x, y)``, a GGN or Fisher product, or your own) and a batch of random ``probes`` (a pytree like
one vector with a leading axis ``m``, e.g. from :func:`random_probes`), applies ``matvec`` to
blocks of vectors with ``vmap``, and spends exactly ``m`` matvecs. Randomness enters only through
``probes``, so results are reproducible and the estimators run inside
``torch.compile(fullgraph=True)`` without recompiling for new probes or data of the same shapes.

Which one to use, at a budget of ``m`` matvecs on an ``n``-dimensional operator:

* Hutchinson: variance :math:`2\|A\|_F^2 / m` with Gaussian probes (Rademacher: the
  off-diagonal part only). Best when the spectrum is flat: there is nothing to deflate.
* Hutch++: spends ``2m/3`` matvecs to capture the top ``m/3`` eigendirections exactly and runs
  Hutchinson on the rest. When eigenvalues decay, the error falls as :math:`1/m` instead of
  :math:`1/\sqrt m`; on a flat spectrum it wastes two thirds of the budget and can be about 2x
  *worse* than Hutchinson.
* XTrace: the exchangeable leave-one-out form of the same idea, using every probe both for the
  low-rank part and for the correction. Usually a few times better than Hutch++ when the
  spectrum decays, and no better than Hutchinson when it does not.

Measured on a power-law spectrum :math:`\lambda_i = i^{-2}`, ``n = 1000``, 60 matvecs, 200
repetitions (``tests/test_spectral.py``): Hutch++ had 4.6e3 times less variance than Hutchinson
and XTrace 2.3 times less than Hutch++. At :math:`\lambda_i = i^{-1/2}` (flat) Hutch++ had 1.4
times *more* variance than Hutchinson.

A product that already maps batches (e.g. a compiled :func:`hessfunc.hvps`) can be passed
through :func:`batched_matvec`; the estimators then call it on blocks instead of vmapping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from .._base import _checks, _operator, _tree
from .._base._types import PyTree

__all__ = [
    "DiagEstimate",
    "TraceEstimate",
    "batched_matvec",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_trace",
    "random_probes",
    "xdiag",
    "xtrace",
]

ProbeKind = Literal["rademacher", "normal", "sphere"]


class TraceEstimate(NamedTuple):
    """A scalar estimate and its standard error (a pytree: passes through ``torch.compile``)."""

    estimate: torch.Tensor
    """The estimate (0-d)."""
    std_error: torch.Tensor
    """Standard error of the estimate from the spread of its samples (0-d; ``nan`` for one)."""


class DiagEstimate(NamedTuple):
    """An estimate of a diagonal, a pytree like one probe, and elementwise standard errors."""

    estimate: PyTree
    """The diagonal estimate, a pytree like one probe."""
    std_error: PyTree
    """Elementwise standard errors, a pytree like one probe."""


def random_probes(
    like: PyTree,
    num: int,
    *,
    kind: ProbeKind = "rademacher",
    generator: torch.Generator,
) -> PyTree:
    r"""``num`` random vectors shaped like ``like``, stacked along a new leading axis.

    Every kind has :math:`\mathbb E[v v^\top] = I`, which makes the trace and diagonal estimators
    unbiased: ``"rademacher"`` (entries :math:`\pm 1`, the lowest-variance choice for
    Hutchinson), ``"normal"`` (standard Gaussian), ``"sphere"`` (uniform on the sphere of radius
    :math:`\sqrt n`, over all leaves together).

    This is an eager helper: it draws from ``generator`` (never from the global RNG). Inside
    ``torch.compile`` draw the probes outside and pass them in, since dynamo cannot trace a
    ``torch.Generator``.

    Args:
        like: a pytree of floating tensors (e.g. ``params``).
        num: the number of vectors, a Python int.
        kind: ``"rademacher"`` (default), ``"normal"`` or ``"sphere"``.
        generator: the source of randomness, e.g. ``torch.Generator().manual_seed(0)``.

    Returns:
        A pytree like ``like`` whose every leaf has shape ``(num, *leaf.shape)``.

    Cost:
        ``num`` x ``n`` random draws; memory of ``num`` pytrees like ``like``.

    Example:
        >>> import torch, hessfunc
        >>> g = torch.Generator().manual_seed(0)
        >>> like = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
        >>> v = hessfunc.random_probes(like, 4, generator=g)
        >>> v["w"].shape, v["b"].shape
        (torch.Size([4, 2, 3]), torch.Size([4, 3]))
        >>> bool((v["w"].abs() == 1).all())
        True
    """
    where = "hessfunc.random_probes(like, num, kind=, generator=)"
    _checks.check_params(where, like, name="like")
    _operator.check_int(where, "num", num)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}; "
            "use torch.Generator().manual_seed(seed) (probes never come from the global RNG)."
        )
    if kind not in ("rademacher", "normal", "sphere"):
        raise ValueError(
            f"{where}: unknown kind={kind!r}; expected 'rademacher', 'normal' or 'sphere'."
        )
    draws = _tree.random_like(
        like, generator, kind="rademacher" if kind == "rademacher" else "normal", batch=num
    )
    if kind == "sphere":
        n = sum(leaf.numel() for leaf in _tree.tree_leaves(like))
        draws = _tree.row_scale(n**0.5 / torch.sqrt(_tree.row_vdot(draws, draws)), draws)
    return draws


def batched_matvec(matmat: Callable[[PyTree], PyTree]) -> _operator.BatchedMatvec:
    r"""Mark a product that takes a batch of vectors, so the estimators call it as is.

    Every estimator normally applies ``matvec`` to blocks of vectors through ``vmap``. Wrap a
    function that already maps a batch (every leaf with a leading axis ``k``) to a batch, such
    as :func:`hessfunc.hvps` or :func:`hessfunc.ggn_vps`, and the estimators pass it blocks
    directly. This is the way to use a *compiled* product with an eager estimator loop: dynamo
    refuses ``vmap`` of a compiled function (pytorch#128711), and compiling only the product
    takes seconds, where compiling a whole Lanczos loop costs seconds per unrolled step.

    Args:
        matmat: ``V -> A V`` for a pytree ``V`` whose leaves carry a leading batch axis.

    Returns:
        A callable usable wherever a ``matvec`` is expected (called on one vector it runs a
        batch of one); the estimators recognise it and skip their ``vmap``.

    Cost:
        Nothing; each estimator call then costs its usual matvecs, in batches.

    Example:
        >>> import torch, hessfunc
        >>> f = lambda p, x: ((p * x) ** 2).sum()
        >>> p, x = torch.ones(3), torch.tensor([1.0, 2.0, 3.0])
        >>> mv = hessfunc.batched_matvec(lambda V: hessfunc.hvps(f, p, V, x))  # or compiled
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(p, 4, generator=g)
        >>> hessfunc.hutchinson_trace(mv, probes).estimate  # diag(2 x^2) = 2 + 8 + 18
        tensor(28.)
    """
    if not callable(matmat):
        raise TypeError(
            "hessfunc.batched_matvec(matmat): matmat must be callable as matmat(V) -> A V on a "
            f"batch of vectors, got {type(matmat).__name__}."
        )
    return _operator.BatchedMatvec(matmat)


def hutchinson_trace(
    matvec: Callable[[PyTree], PyTree], probes: PyTree, *, chunk_size: int | None = None
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\operatorname{tr} A \approx \frac1m \sum_i v_i^\top A v_i`.

    Unbiased for probes with :math:`\mathbb E[vv^\top] = I`. Its variance is
    :math:`2\sum_{i \ne j} A_{ij}^2 / m` for Rademacher probes and :math:`2\|A\|_F^2/m` for
    Gaussian ones: the error falls as :math:`1/\sqrt m` whatever the spectrum. It is the right
    choice when the spectrum is flat (Hutch++ and XTrace then gain nothing) and the cheapest in
    memory.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like one probe; ``A`` symmetric.
        probes: ``m`` vectors: a pytree whose leaves have a leading axis ``m``.
        chunk_size: probes pushed through ``vmap(matvec)`` at once (``None``: all ``m``).

    Returns:
        A :class:`TraceEstimate` ``(estimate, std_error)``.

    Cost:
        ``m`` matvecs in ``ceil(m / chunk_size)`` vectorised calls; memory of ``2m`` vectors.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(torch.zeros(3), 8, generator=g)
        >>> hessfunc.hutchinson_trace(lambda v: A @ v, probes).estimate  # exact for a diagonal A
        tensor(6.)
    """
    where = "hessfunc.hutchinson_trace(matvec, probes)"
    op, V = _operator.rows_operator(where, matvec, probes, chunk_size)
    samples = (V * op.apply(V)).sum(1)
    return TraceEstimate(*_operator.mean_and_error(samples))


def hutchpp_trace(
    matvec: Callable[[PyTree], PyTree], probes: PyTree, *, chunk_size: int | None = None
) -> TraceEstimate:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): low-rank deflation plus Hutchinson.

    With ``m`` probes and ``s = m // 3``: the first ``s`` give a sketch :math:`Y = A S` with
    orthonormal basis :math:`Q`; :math:`\operatorname{tr}(Q^\top A Q)` is computed exactly
    (``s`` matvecs) and the remainder :math:`\operatorname{tr}((I-QQ^\top)A(I-QQ^\top))` by
    Hutchinson on the next ``m - 2s`` probes, projected off :math:`Q`. The last ``s`` probes
    are not used. Unbiased.

    When to use it: when the spectrum decays, the top ``s`` eigenvalues carry most of the trace
    and the error falls as :math:`1/m` rather than :math:`1/\sqrt m`. On a flat spectrum the
    deflation removes little and only ``m/3`` probes feed the Hutchinson part: expect up to
    about twice Hutchinson's variance at the same budget. :func:`xtrace` is usually better.

    Args:
        matvec: ``v -> A v``; ``A`` symmetric.
        probes: ``m`` vectors (pytree leaves with a leading axis ``m``); with ``m < 3`` this is
            Hutchinson.
        chunk_size: vectors pushed through ``vmap(matvec)`` at once (``None``: all).

    Returns:
        A :class:`TraceEstimate`; ``std_error`` is that of the Hutchinson part (the deflated
        part is exact given the sketch).

    Cost:
        Exactly ``m`` matvecs in two vectorised calls (``s`` and ``m - s`` vectors); memory of
        about ``3m`` vectors and an ``n x s`` QR factorisation.

    Example:
        On a matrix of rank 2 the sketch captures everything and the estimate is exact:

        >>> import torch, hessfunc
        >>> U = torch.linalg.qr(torch.randn(50, 2, generator=torch.Generator().manual_seed(1)))[0]
        >>> A = U @ torch.diag(torch.tensor([5.0, 2.0])) @ U.T
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(torch.zeros(50), 9, generator=g)
        >>> hessfunc.hutchpp_trace(lambda v: A @ v, probes).estimate
        tensor(7.0000)
    """
    where = "hessfunc.hutchpp_trace(matvec, probes)"
    op, V = _operator.rows_operator(where, matvec, probes, chunk_size)
    m = V.shape[0]
    s = m // 3
    if s == 0:
        samples = (V * op.apply(V)).sum(1)
        return TraceEstimate(*_operator.mean_and_error(samples))
    Q = torch.linalg.qr(op.apply(V[:s]).T).Q  # (n, min(n, s))
    G = V[s : m - s]
    G = G - (G @ Q) @ Q.T
    images = op.apply(torch.cat([Q.T, G]))
    r = Q.shape[1]
    low_rank = (Q.T * images[:r]).sum()
    mean, error = _operator.mean_and_error((G * images[r:]).sum(1))
    return TraceEstimate(low_rank + mean, error)


class _Exchangeable(NamedTuple):
    """The shared factorisation of XTrace and XDiag (column convention, ``n x s``)."""

    Omega: torch.Tensor  # test vectors
    Q: torch.Tensor  # orthonormal basis of Y = A Omega
    R: torch.Tensor  # Y = Q R
    Z: torch.Tensor  # A Q
    S: torch.Tensor  # unit columns of R^{-T}: s_i spans range(Q) minus range(Y without y_i)
    W: torch.Tensor  # Q^T Omega


def _exchangeable(
    where: str, matvec: Callable[[PyTree], PyTree], probes: PyTree, chunk_size: int | None
) -> tuple[_operator.FlatOperator, _Exchangeable]:
    op, V = _operator.rows_operator(where, matvec, probes, chunk_size)
    m = V.shape[0]
    if m % 2 or m < 4:
        raise ValueError(
            f"{where}: needs an even number of probes, at least 4 (half are test vectors, half "
            f"the products with their basis); got {m}. Pass {max(4, m + m % 2)} probes."
        )
    s = m // 2
    if s > op.n:
        raise ValueError(
            f"{where}: {s} test vectors exceed the dimension n = {op.n}; use at most {2 * op.n} "
            "probes (at that budget an exact trace is cheaper: n matvecs on the unit vectors)."
        )
    Omega = V[:s].T
    Q, R = torch.linalg.qr(op.apply(V[:s]).T)
    Z = op.apply(Q.T).T
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T
    S = S / torch.linalg.vector_norm(S, dim=0)
    return op, _Exchangeable(Omega, Q, R, Z, S, Q.T @ Omega)


def _col_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a[:, i] . b[:, i])_i``: the diagonal of ``a.T @ b`` without forming it."""
    return (a * b).sum(0)


def xtrace(
    matvec: Callable[[PyTree], PyTree], probes: PyTree, *, chunk_size: int | None = None
) -> TraceEstimate:
    r"""XTrace (Epperly, Tropp & Webber, 2024): the exchangeable version of Hutch++.

    With ``m = 2s`` probes, the first ``s`` are test vectors :math:`\Omega`. For each
    :math:`i`, :math:`Q_{(i)}` is an orthonormal basis of :math:`A\Omega` without its
    :math:`i`-th column, and

    .. math:: t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
       + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) A (I - Q_{(i)}Q_{(i)}^\top)\, \omega_i

    is unbiased because :math:`\omega_i` is independent of :math:`Q_{(i)}`. The estimate is the
    mean of the :math:`t_i`, all obtained from one QR factorisation of :math:`A\Omega` and the
    products :math:`AQ` by rank-one downdates (no extra matvecs). The other ``s`` probes are not
    used (their budget goes to :math:`AQ`).

    When to use it: when the spectrum decays, it is the most accurate of the three at equal
    matvecs (every probe serves both the low-rank part and the correction); on a flat spectrum
    it is no better than :func:`hutchinson_trace`. It needs ``rank(A) >= s``: with fewer
    non-zero eigenvalues the factor :math:`R` is singular and the result is ``nan`` or ``inf``
    (use :func:`hutchpp_trace`, which is exact there).

    Args:
        matvec: ``v -> A v``; ``A`` symmetric.
        probes: ``m`` vectors, ``m`` even, at least 4, at most ``2n``.
        chunk_size: vectors pushed through ``vmap(matvec)`` at once (``None``: all ``s``).

    Returns:
        A :class:`TraceEstimate`; ``std_error`` is the standard error of the mean of the
        :math:`t_i` (they are exchangeable, not independent: a rough guide).

    Cost:
        Exactly ``m`` matvecs in two vectorised calls of ``m/2`` vectors; memory of about
        ``2m`` vectors and an ``n x m/2`` QR factorisation.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.diag(0.5 ** torch.arange(30.0))  # fast decay: trace = 2 - 2**-29
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(torch.zeros(30), 24, generator=g)
        >>> est = hessfunc.xtrace(lambda v: A @ v, probes)
        >>> bool(abs(est.estimate - A.trace()) < 1e-3)
        True
    """
    where = "hessfunc.xtrace(matvec, probes)"
    _, x = _exchangeable(where, matvec, probes, chunk_size)
    H = x.Q.T @ x.Z
    Y = x.Q @ x.R
    T = x.Z.T @ x.Omega  # T[:, i] = Z^T omega_i
    sHs = _col_dots(x.S, H @ x.S)
    c = _col_dots(x.S, x.W)  # component of Q^T omega_i along s_i
    # r_i = (I - QQ^T) omega_i; A r_i = y_i - Z w_i and Q^T y_i = R[:, i]
    rAr = _col_dots(x.Omega, Y) - _col_dots(x.W, x.R) - _col_dots(T, x.W) + _col_dots(x.W, H @ x.W)
    rAQs = _col_dots(T, x.S) - _col_dots(x.W, H @ x.S)
    samples = torch.trace(H) - sHs + rAr + 2 * c * rAQs + c * c * sHs
    return TraceEstimate(*_operator.mean_and_error(samples))


def hutchinson_diag(
    matvec: Callable[[PyTree], PyTree], probes: PyTree, *, chunk_size: int | None = None
) -> DiagEstimate:
    r"""Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad, 2007).

    :math:`\operatorname{diag} A \approx \frac1m \sum_i v_i \odot A v_i`, unbiased. With
    Rademacher probes entry :math:`j` has variance :math:`\sum_{k \ne j} A_{jk}^2 / m`, so it is
    exact for a diagonal matrix and good when :math:`A` is diagonally dominant. Summing the
    estimate over a parameter block gives
    Hutchinson's estimate of that block's trace (see :func:`hessfunc.block_trace`).

    Args:
        matvec: ``v -> A v``.
        probes: ``m`` vectors (pytree leaves with a leading axis ``m``).
        chunk_size: vectors pushed through ``vmap(matvec)`` at once (``None``: all).

    Returns:
        A :class:`DiagEstimate` ``(estimate, std_error)``, each a pytree like one probe.

    Cost:
        ``m`` matvecs in ``ceil(m / chunk_size)`` vectorised calls; memory of ``2m`` vectors.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(torch.zeros(2), 4, generator=g)
        >>> hessfunc.hutchinson_diag(lambda v: A @ v, probes).estimate
        tensor([2., 5.])
    """
    where = "hessfunc.hutchinson_diag(matvec, probes)"
    op, V = _operator.rows_operator(where, matvec, probes, chunk_size)
    mean, error = _operator.mean_and_error(V * op.apply(V))
    return DiagEstimate(op.unravel(mean), op.unravel(error))


def xdiag(
    matvec: Callable[[PyTree], PyTree], probes: PyTree, *, chunk_size: int | None = None
) -> DiagEstimate:
    r"""XDiag (Epperly, Tropp & Webber, 2024): exchangeable low-rank-plus-Hutchinson diagonal.

    With ``m = 2s`` probes and :math:`Q_{(i)}` as in :func:`xtrace`, sample :math:`i` is

    .. math:: \operatorname{diag}(Q_{(i)}Q_{(i)}^\top A)
       + \omega_i \odot (I - Q_{(i)}Q_{(i)}^\top) A\,\omega_i,

    unbiased for the diagonal; the estimate is their mean. Like :func:`xtrace` it beats
    :func:`hutchinson_diag` when the spectrum decays (the low-rank part then holds most of every
    diagonal entry) and not on a flat one; it needs ``rank(A) >= s``.

    Args:
        matvec: ``v -> A v``; ``A`` symmetric.
        probes: ``m`` vectors, ``m`` even, at least 4, at most ``2n``.
        chunk_size: vectors pushed through ``vmap(matvec)`` at once (``None``: all ``s``).

    Returns:
        A :class:`DiagEstimate` ``(estimate, std_error)``, each a pytree like one probe.

    Cost:
        Exactly ``m`` matvecs in two vectorised calls; memory of about ``2m`` vectors.

    Example:
        With a decaying spectrum XDiag is far closer than Hutchinson at the same budget:

        >>> import torch, hessfunc
        >>> d = torch.float64
        >>> B = torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=d)
        >>> U = torch.linalg.qr(B)[0]
        >>> A = U @ torch.diag(0.5 ** torch.arange(30.0, dtype=d)) @ U.T
        >>> g = torch.Generator().manual_seed(0)
        >>> probes = hessfunc.random_probes(torch.zeros(30, dtype=d), 24, generator=g)
        >>> for est in (hessfunc.xdiag, hessfunc.hutchinson_diag):
        ...     print(f"{(est(lambda v: A @ v, probes).estimate - A.diag()).abs().max():.0e}")
        8e-04
        8e-02
    """
    where = "hessfunc.xdiag(matvec, probes)"
    op, x = _exchangeable(where, matvec, probes, chunk_size)
    QS, ZS = x.Q @ x.S, x.Z @ x.S
    low_rank = (x.Q * x.Z).sum(1, keepdim=True) - QS * ZS  # diag(Q_(i) Q_(i)^T A), column i
    correction = x.Omega * QS * _col_dots(x.S, x.R)  # omega_i * (I - Q_(i)Q_(i)^T) y_i
    mean, error = _operator.mean_and_error((low_rank + correction).T)
    return DiagEstimate(op.unravel(mean), op.unravel(error))
