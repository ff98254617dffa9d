"""The solvers behind :func:`hessfunc.influence`: each turns the training problem into a map from
blocks of test gradients to ``(C + λI)⁻¹`` times them.

A solver is a factory ``(problem, damping, solver_options) -> Solve``, registered by name in
:data:`SOLVERS`; a new backend is one entry. Solvers applied row by row go through ``vmap``
(one plain call for a single row, so that eager CG can stop early).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch.func import vmap

from .._base import _tree
from .._base._types import PyTree
from ..kron import _influence_kron
from ..linalg.inverse import lissa, low_rank_inverse
from ..linalg.solvers import cg

WHERE = "hessfunc.influence(loss, params, train, test)"


class Problem(NamedTuple):
    """What a solver factory needs to know about the training problem."""

    params: PyTree
    matvec: Callable[[PyTree], PyTree]  # v -> C v, C the curvature of the mean training loss
    batch_matvec: Callable[..., PyTree]  # (v, *batch) -> C_batch v, one minibatch's curvature
    dense: Callable[[int | None, int | None], torch.Tensor]  # (chunk, max_bytes) -> (n, n) C
    n: int
    batches: Callable[[], list[tuple]]  # the training set in chunks of chunk_size samples


class Solve(NamedTuple):
    """A built solver, applied to blocks of right-hand sides.

    ``block(G)`` maps a pytree with leading axis ``k`` to ``(k, n)`` solutions and a dict of
    0-d bool flags, each explained by ``hessfunc.influence.MESSAGES``.
    """

    block: Callable[[PyTree], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _map_rows(fn: Callable[[PyTree], Any], rows: PyTree, k: int) -> Any:
    """``fn`` on each row of ``rows`` (leading axis ``k``).

    Through ``vmap``, or one plain call for a single row (so eager solvers can stop early, which
    ``vmap`` forbids).
    """
    if k > 1:
        return vmap(fn)(rows)
    out = fn(_tree.tree_map(lambda t: t[0], rows))
    return _tree.tree_map(lambda t: t.unsqueeze(0), out)


def _rows(one: Callable[[PyTree], PyTree], G: PyTree) -> torch.Tensor:
    """``one`` applied to every row of ``G`` (leading axis ``k``), raveled to ``(k, n)``."""
    return _tree.ravel_rows(_map_rows(one, G, _tree.batch_size(G)))


def _options(name: str, given: Mapping[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"{WHERE}: unknown solver_options {unknown} for solver={name!r}; it accepts "
            f"{sorted(allowed)}."
        )
    return {**allowed, **given}


def _cg(problem: Problem, damping: Any, given: Mapping[str, Any]) -> Solve:
    opts = _options("cg", given, {"maxiter": min(problem.n, 100), "tol": 1e-6})

    def one(g: PyTree) -> Any:
        return cg(problem.matvec, g, maxiter=opts["maxiter"], damping=damping, tol=opts["tol"])

    def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        res = _map_rows(one, G, _tree.batch_size(G))
        flags = {"negative_curvature": res.negative_curvature.any()}
        if opts["tol"] is not None:
            b_norm = torch.sqrt(_tree.row_vdot(G, G))
            # 1% over the tolerance: the recurrence's residual, not a recomputed one
            flags["unconverged"] = (res.residual_norm > 1.01 * opts["tol"] * b_norm).any()
        return _tree.ravel_rows(res.x), flags

    return Solve(block)


def _lissa(problem: Problem, damping: Any, given: Mapping[str, Any]) -> Solve:
    opts = _options("lissa", given, {"scale": None, "num_iters": 1000, "batches": None})
    if opts["scale"] is None:
        raise ValueError(
            f"{WHERE}: solver='lissa' needs solver_options={{'scale': s}} with s at least the "
            "largest eigenvalue of the curvature plus damping (the series diverges below half "
            "of it); estimate it with hessfunc.eigsh(lambda v: hessfunc.hvp(loss, params, v, "
            "*train), v0, 1)."
        )
    if opts["batches"] is None:
        steps, matvec = [()] * opts["num_iters"], (lambda v: problem.matvec(v))
    else:
        steps, matvec = opts["batches"], problem.batch_matvec
        if iter(steps) is steps:
            raise TypeError(
                f"{WHERE}: solver_options['batches'] is an iterator, used up by the first block "
                "of test samples; pass a re-iterable (a list of (x, y) minibatches, a DataLoader)."
            )

    def one(g: PyTree) -> Any:
        return lissa(matvec, g, steps, damping=damping, scale=opts["scale"])

    def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        res = _map_rows(one, G, _tree.batch_size(G))
        return _tree.ravel_rows(res.x), {"diverged": res.diverged.any()}

    return Solve(block)


def _default_start(like: PyTree) -> PyTree:
    """A fixed Lanczos start vector with no structure in common with a curvature matrix.

    A cosine at an irrational frequency over the raveled entries: it compiles and needs no RNG.
    """
    flat, unravel = _tree.ravel(like)
    idx = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    return unravel(torch.cos(idx * 0.7548776662 + 0.5698402910))


def _low_rank(problem: Problem, damping: Any, given: Mapping[str, Any]) -> Solve:
    opts = _options("low_rank", given, {"rank": None, "num_iters": None, "v0": None})
    if opts["rank"] is None:
        raise ValueError(
            f"{WHERE}: solver='low_rank' needs solver_options={{'rank': r}}: the number of top "
            "eigenpairs kept (e.g. 20 to 200; the error is at most the (r+1)-th eigenvalue over "
            "damping)."
        )
    if not isinstance(damping, torch.Tensor) and not damping > 0:
        raise ValueError(
            f"{WHERE}: solver='low_rank' needs damping > 0 (the space outside the kept "
            f"eigenvectors is divided by it); got damping={damping!r}."
        )
    v0 = opts["v0"] if opts["v0"] is not None else _default_start(problem.params)
    inv = low_rank_inverse(
        problem.matvec, v0, opts["rank"], num_iters=opts["num_iters"], damping=damping
    )
    bad = (inv.eigenvalues + damping <= 0).any()

    def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _rows(inv.solve, G), {"not_positive_definite": bad}

    return Solve(block)


def _dense(problem: Problem, damping: Any, given: Mapping[str, Any]) -> Solve:
    opts = _options("dense", given, {"chunk_size": None, "max_bytes": None})
    C = problem.dense(opts["chunk_size"], opts["max_bytes"])
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    shifted = evals + damping
    bad = (shifted <= 0).any()

    def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = _tree.ravel_rows(G).to(evecs.dtype)
        return ((rows @ evecs) / shifted) @ evecs.T, {"not_positive_definite": bad}

    return Solve(block)


def _kron(kind: str) -> Callable[[Problem, Any, Mapping[str, Any]], Solve]:
    """The factory of ``solver="kfac"`` or ``"ekfac"``.

    The factors are built once over the training chunks and eigendecomposed once; each test
    sample then costs one exact solve with them.
    """

    def factory(problem: Problem, damping: Any, given: Mapping[str, Any]) -> Solve:
        opts = _options(kind, given, _influence_kron.DEFAULTS)
        _influence_kron.check(WHERE, kind, opts, damping)
        op = _influence_kron.build(WHERE, kind, problem.params, problem.batches(), opts)

        def one(g: PyTree) -> PyTree:
            return op.solve(g, damping)

        def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return _rows(one, G), {}

        return Solve(block)

    return factory


def user_solver(solver: Any, damping: Any) -> Solve:
    """A solver passed in: an object with ``.solve(b, damping)`` or a callable ``b -> x``.

    Applied one row at a time unless a block size is given (it need not support ``vmap``).
    """
    if hasattr(solver, "solve") and callable(solver.solve):

        def one(g: PyTree) -> PyTree:
            return solver.solve(g, damping)

    elif callable(solver):
        if not isinstance(damping, torch.Tensor) and damping != 0:
            raise ValueError(
                f"{WHERE}: a callable solver b -> x applies its own damping, so damping must "
                f"stay 0 (got {damping!r}); pass an object with .solve(b, damping) to let "
                "influence set it."
            )
        one = solver
    else:
        raise TypeError(
            f"{WHERE}: solver must be one of {sorted(SOLVERS)}, an object with a "
            "method .solve(b, damping) -> (C + damping I)^-1 b, or a callable b -> x; got "
            f"{type(solver).__name__}."
        )

    def block(G: PyTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _rows(one, G), {}

    return Solve(block)


# name -> factory(problem, damping, solver_options) -> Solve. A new backend is one entry.
SOLVERS: dict[str, Callable[[Problem, Any, Mapping[str, Any]], Solve]] = {
    "cg": _cg,
    "lissa": _lissa,
    "low_rank": _low_rank,
    "dense": _dense,
    "kfac": _kron("kfac"),
    "ekfac": _kron("ekfac"),
}
