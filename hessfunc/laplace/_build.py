r"""Building the curvature of each posterior structure from the data.

``curvature(where, problem, structure, options)`` returns one of the classes of
:mod:`.structures`, holding :math:`H` (the likelihood's curvature summed over the data, in
laplace-torch's scale: :math:`\frac12` the MSE's GGN for a Gaussian likelihood) in the form the
structure needs.
"""

from __future__ import annotations

from typing import Any

import torch

from .._base import _memory, _tree
from ..kron.kfac import kfac
from ..linalg.estimators import random_probes
from ..linalg.lanczos import eigsh
from ..linalg.slq import slq
from . import _problem
from .structures import Diag, Full, Kron, KronBlock, LowRank, MatrixFree

Tensor = torch.Tensor

OPTIONS = {
    "full": {"max_bytes": None, "chunk_size": None},
    "kfac": {},
    "diag": {"chunk_size": None},
    "low_rank": {"rank": 20, "num_iters": None, "generator": None},
    "matrix_free": {
        "num_probes": 30,
        "num_iters": 30,
        "generator": None,
        "cg_maxiter": 200,
        "cg_tol": 1e-10,
        "sample_iters": 30,
    },
}


def _generator(where: str, opts: dict[str, Any], structure: str) -> torch.Generator:
    gen = opts["generator"]
    if gen is None:
        raise ValueError(
            f"{where}: structure={structure!r} draws random start vectors: pass "
            "generator=torch.Generator().manual_seed(0)."
        )
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator, got {type(gen).__name__}.")
    return gen


def _gram_rows(problem: _problem.Problem, batch: tuple, chunk_size: int | None) -> Tensor:
    r"""``B`` of shape ``(N c, n)`` with :math:`B^\top B` the batch's summed GGN.

    Row ``(i, j)`` is :math:`J_i^\top r_{ij}`, with :math:`r_{ij}` column ``j`` of a square root
    of sample ``i``'s output Hessian (``loss.hvp`` on the output basis, then ``eigh``), so
    :math:`\sum_{ij} (J_i^\top r_{ij})(J_i^\top r_{ij})^\top = \sum_i J_i^\top H_i J_i`.
    """
    loss = problem.sum_loss(*batch)
    out = problem.model_flat(problem.theta, *batch).detach()
    c = out[0].numel()
    basis = torch.eye(c, dtype=out.dtype, device=out.device).reshape(c, *out.shape[1:])
    cols = torch.stack([loss.hvp(out, basis[k].expand_as(out)) for k in range(c)])
    H = cols.reshape(c, out.shape[0], c).permute(1, 2, 0)  # (N, c, c): H_i[:, k]
    evals, evecs = torch.linalg.eigh(0.5 * (H + H.mT))
    root = evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)  # (N, c, c), root root^T = H_i
    J = problem.jacobians(batch, chunk_size)  # (N, c, n)
    return torch.einsum("icn,icj->ijn", J, root).reshape(-1, J.shape[-1])


def _check_dense(where: str, theta: Tensor, max_bytes: int | None) -> None:
    n = theta.numel()
    need = 3 * n * n * theta.element_size()  # the matrix, its eigenvectors, eigh's workspace
    _memory.check_budget(
        where, need, theta.device, max_bytes,
        f"structure='full' with n = {n} parameters (three n x n matrices)",
        "Use structure='kfac', 'low_rank' or 'matrix_free', subset='last_layer', or raise "
        "max_bytes.",
    )  # fmt: skip


def _kron(problem: _problem.Problem) -> Kron:
    sub = tuple(_tree.tree_leaves(problem.params)[i] for i in problem.index)

    def one(*batch: Any) -> Any:
        return kfac(problem.model_tree, problem.sum_loss(*batch), sub, *batch, separate_bias=True)

    K = problem.sum_over(one)
    scale = _problem.base_scale(problem.likelihood)
    blocks, gb, ge, ib, ie = [], [], [], [], []
    for block, A, G in zip(K.layout.blocks, K.A, K.G, strict=True):
        leaf = block.weight if block.weight is not None else block.bias
        blocks.append(
            KronBlock(
                leaf, block.groups, block.out_features, block.size, block.transposed, block.expert
            )
        )
        la, qa = torch.linalg.eigh(A)
        lg, qg = torch.linalg.eigh(G * scale)
        gb.append(qg)
        ge.append(lg)
        ib.append(qa)
        ie.append(la)
    covered = {b.leaf for b in blocks}
    uncovered = tuple(i for i in range(len(problem.sizes)) if i not in covered)
    return Kron(tuple(blocks), tuple(gb), tuple(ge), tuple(ib), tuple(ie), uncovered, problem.sizes)


def curvature(where: str, problem: _problem.Problem, structure: str, opts: dict) -> Any:
    """Build the chosen structure's curvature from the data (one or more passes)."""
    scale = _problem.base_scale(problem.likelihood)
    theta, sizes = problem.theta, problem.sizes
    if structure == "full":
        _check_dense(where, theta, opts["max_bytes"])

        def gram(*batch: Any) -> Tensor:
            B = _gram_rows(problem, batch, opts["chunk_size"])
            return B.T @ B

        return Full.build(scale * problem.sum_over(gram), sizes)
    if structure == "diag":

        def diag(*batch: Any) -> Tensor:
            return _gram_rows(problem, batch, opts["chunk_size"]).square().sum(0)

        return Diag(scale * problem.sum_over(diag), sizes)
    if structure == "kfac":
        return _kron(problem)
    matvec = problem.matvec()
    if structure == "low_rank":
        gen = _generator(where, opts, structure)
        v0 = random_probes(theta, 1, kind="normal", generator=gen)[0]
        rank = opts["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= problem.n:
            raise ValueError(f"{where}: rank must be an int in [1, {problem.n}], got {rank!r}.")
        res = eigsh(matvec, v0, rank, num_iters=opts["num_iters"])
        return LowRank(res.eigenvectors.T * 1.0, scale * res.eigenvalues, sizes)
    gen = _generator(where, opts, structure)
    probes = random_probes(theta, opts["num_probes"], generator=gen)
    res = slq(matvec, probes, min(opts["num_iters"], problem.n))
    scaled = (lambda v: scale * matvec(v)) if scale != 1.0 else matvec
    return MatrixFree(
        scaled, scale * res.nodes, res.weights, res.sq_norms, sizes, opts["cg_maxiter"],
        opts["cg_tol"], min(opts["sample_iters"], problem.n), probes,
        min(opts["num_iters"], problem.n),
    )  # fmt: skip
