"""Inverse curvature products and influence scores: cost to a target accuracy.

Part 1, solvers. The damped Gauss-Newton matrix ``G + λI`` of the MLP workload
(``workloads.mlp``: 784-512-512-10 tanh, 669,706 parameters, cross-entropy) in float64, on a
batch of ``--batch`` samples (default 16 instead of the workload's 256: the exact reference
holds the ``B C x n`` matrix ``M``, and a low-rank inverse of the whole range needs about
``B (C - 1)`` Lanczos vectors of ``n`` float64 entries, twice). ``G = MᵀM`` with ``M``
(``B C x n``) the output-space square root times the Jacobian, so ``(G + λI)⁻¹ b = (b - Mᵀ(MMᵀ + λI)⁻¹ M b) / λ`` exactly, and the
nonzero spectrum of ``G`` is that of ``MMᵀ``. The damping is ``--cond-damping`` times the top
eigenvalue (condition number about its inverse). The right-hand side is the gradient of one
held-out sample's loss, as in an influence computation. For each solver: matvecs and time to
reach ``--target`` relative error.

* ``cg``: the smallest ``maxiter`` that reaches the target (CG's error decreases monotonically,
  so bisection over ``maxiter``), timed on one run with that count;
* ``lissa``: ``scale = λ_max + λ`` (the best fixed scale), every iterate's error read from the
  vector each matvec receives;
* ``low_rank_inverse``: error against rank; the target needs the whole range of ``G`` (rank
  ``B (C - 1)``) because the discarded part is divided by ``λ`` instead of ``μ_i + λ``.

Part 2, influence. An MLP (64-32-10 tanh, L2 1e-3, 2,410 parameters) fitted with L-BFGS on
80% of ``sklearn.datasets.load_digits`` (1,437 training digits); influence of every training
digit on 10 test digits, damping ``1e-3``, by each solver, against the dense route
(``solver="dense"``): time, relative Frobenius error, Pearson correlation and overlap of the
ten most influential training digits per test digit.

    python benchmarks/bench_inverse.py [--record] [--batch 32] [--target 1e-6]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, record, table  # noqa: E402
from workloads import mlp  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc.losses import CrossEntropyLoss  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- part 1


def exact_ggn(w, batch: int):
    """``M`` with ``G = MᵀM`` (rows: samples x classes, ravel order) and the reference solve."""
    x, y = w.x[:batch], w.y[:batch]
    flat, unravel = hessfunc.ravel(w.params)
    out = w.model_fn(w.params, x)
    p = torch.softmax(out, -1)
    # the symmetric square root of each sample's (diag p - p pᵀ) / B
    evals, evecs = torch.linalg.eigh((torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / batch)
    root = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(1, 2)
    jac = torch.func.jacrev(lambda t: w.model_fn(unravel(t), x))(flat)  # (B, C, n)
    M = torch.einsum("bij,bjn->bin", root, jac).reshape(-1, flat.numel())
    del jac
    return M, x, y


def part1(args) -> tuple[str, dict]:
    w = mlp(dtype=torch.float64, batch=args.batch + 1)
    flat, unravel = hessfunc.ravel(w.params)
    n = flat.numel()
    t0 = time.perf_counter()
    M, x, y = exact_ggn(w, args.batch)
    mu = torch.linalg.eigvalsh(M @ M.T).clamp_min(0)
    rank = int((mu > 1e-12 * mu[-1]).sum())
    lam = args.cond_damping * float(mu[-1])
    print(f"reference: {time.perf_counter() - t0:.1f} s, rank {rank}, mu_max {float(mu[-1]):.4g}")
    held_out = (w.x[args.batch :], w.y[args.batch :])
    b_tree = torch.func.grad(lambda p: w.f(p, *held_out))(w.params)
    b = hessfunc.ravel(b_tree)[0]
    x_star = (b - M.T @ torch.linalg.solve(M @ M.T + lam * torch.eye(M.shape[0]), M @ b)) / lam
    x_norm = float(torch.linalg.norm(x_star))

    def err(v: torch.Tensor) -> float:
        return float(torch.linalg.norm(v - x_star)) / x_norm

    loss = CrossEntropyLoss(y)
    count = [0]

    def matvec(v):
        count[0] += 1
        return hessfunc.ggn_vp(w.model_fn, loss, w.params, v, x)

    # time of one product
    matvec(b_tree)
    t0 = time.perf_counter()
    for _ in range(3):
        matvec(b_tree)
    per_mv = (time.perf_counter() - t0) / 3
    rows, info = [], {"n": n, "rank": rank, "mu_max": float(mu[-1]), "damping": lam,
                      "kappa": (float(mu[-1]) + lam) / lam, "per_matvec": per_mv}  # fmt: skip

    # CG: bisection on maxiter (its 2-norm error decreases monotonically)
    def cg_err(k: int) -> float:
        return err(hessfunc.ravel(hessfunc.cg(matvec, b_tree, maxiter=k, damping=lam).x)[0])

    hi = 8
    while cg_err(hi) > args.target:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cg_err(mid) <= args.target else (mid, hi)
    count[0] = 0
    t0 = time.perf_counter()
    res = hessfunc.cg(matvec, b_tree, maxiter=hi, damping=lam)
    t_cg = time.perf_counter() - t0
    rows.append(["cg", hi, t_cg, err(hessfunc.ravel(res.x)[0]), "maxiter found by bisection"])
    print(rows[-1], flush=True)

    # LiSSA at the best fixed scale: every iterate's error from the vector each matvec receives
    scale = float(mu[-1]) + lam
    errors, observer = [], [0.0]

    def watching(v):
        t = time.perf_counter()
        errors.append(err(hessfunc.ravel(v)[0]))
        observer[0] += time.perf_counter() - t
        return matvec(v)

    predicted = int(np.ceil(np.log(args.target) / np.log(1 - lam / scale)))
    steps = min(int(1.2 * predicted), args.lissa_max)
    t0 = time.perf_counter()
    out = hessfunc.lissa(watching, b_tree, [()] * steps, damping=lam, scale=scale)
    t_lissa = time.perf_counter() - t0 - observer[0]
    errors.append(err(hessfunc.ravel(out.x)[0]))  # errors[k] is the iterate after k matvecs
    reached = next((k for k, e in enumerate(errors) if e <= args.target), None)
    if reached is None:
        rows.append(["lissa", f">{steps}", t_lissa, errors[-1], f"scale {scale:.3g}, cap"])
    else:
        rows.append(["lissa", reached, t_lissa * reached / steps, errors[reached],
                     f"scale = mu_max + damping; predicted {predicted}"])  # fmt: skip
    print(rows[-1], flush=True)
    info["lissa_curve"] = {k: errors[k] for k in (10, 100, 1000) if k < len(errors)}

    # low rank: error against rank (one Lanczos run per rank)
    v0 = hessfunc.ravel(w.params)[1](torch.randn(n, generator=torch.Generator().manual_seed(0)))
    for r in sorted({r for r in args.ranks if r < rank} | {rank}):  # and the whole range
        iters = min(n, r + max(20, r // 4)) if r < rank else rank + 12
        count[0] = 0
        t0 = time.perf_counter()
        inv = hessfunc.low_rank_inverse(matvec, v0, r, num_iters=iters, damping=lam)
        sol = inv.solve(b_tree)
        t_lr = time.perf_counter() - t0
        bound = float(mu.flip(0)[r]) / lam if r < len(mu) else 0.0
        rows.append(["low_rank_inverse", iters, t_lr, err(hessfunc.ravel(sol)[0]),
                     f"rank {r}; bound mu_(r+1)/damping = {bound:.2g}"])  # fmt: skip
        print(rows[-1], flush=True)
        del inv
    return table(["solver", "matvecs", "seconds", "relative error", "notes"], rows), info


# ----------------------------------------------------------------------------- part 2


def digits_problem():
    d = load_digits()
    X, y = torch.tensor(d.data) / 16.0, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train, test = (X[perm[:cut]], y[perm[:cut]]), (X[perm[cut:]], y[perm[cut:]])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    apply, params = hessfunc.from_module(net)

    def test_loss(p, X, y):
        return F.cross_entropy(apply(p, X), y)

    def loss(p, X, y):
        return test_loss(p, X, y) + 0.5e-3 * sum((t**2).sum() for t in p.values())

    flat, unravel = hessfunc.ravel(params)
    flat = flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([flat], max_iter=5000, tolerance_grad=1e-7, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        value = loss(unravel(flat), *train)
        value.backward()
        return value

    opt.step(closure)
    params = unravel(flat.detach())
    gnorm = float(torch.linalg.norm(hessfunc.ravel(torch.func.grad(loss)(params, *train))[0]))
    return loss, test_loss, params, train, test, gnorm


def agreement(S: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    rel = float(torch.linalg.norm(S - ref) / torch.linalg.norm(ref))
    a, b = S.flatten() - S.mean(), ref.flatten() - ref.mean()
    pearson = float(a @ b / (a.norm() * b.norm()))
    top = [len(set(S[t].argsort(descending=True)[:10].tolist())
               & set(ref[t].argsort(descending=True)[:10].tolist())) / 10
           for t in range(S.shape[0])]  # fmt: skip
    return rel, pearson, float(np.mean(top))


def part2(args) -> tuple[str, dict]:
    loss, test_loss, params, train, test, gnorm = digits_problem()
    test = (test[0][:10], test[1][:10])
    lam = 1e-3
    n = hessfunc.ravel(params)[0].numel()
    print(f"digits MLP: {n} parameters, {train[0].shape[0]} training digits, |grad| {gnorm:.2g}")

    def run(solver, **options):
        t0 = time.perf_counter()
        S = hessfunc.influence(loss, params, train, test, damping=lam, solver=solver,
                               solver_options=options, test_loss=test_loss)  # fmt: skip
        return S, time.perf_counter() - t0

    ref, t_dense = run("dense", chunk_size=256)
    H = hessfunc.hessian_matrix(loss, params, *train, chunk_size=256)
    mu = torch.linalg.eigvalsh(H)
    info = {"n": n, "grad_norm": gnorm, "mu_min": float(mu[0]), "mu_max": float(mu[-1]),
            "kappa": (float(mu[-1]) + lam) / (float(mu[0]) + lam)}  # fmt: skip
    print(info, flush=True)
    rows = [["dense: n HVPs and an eigendecomposition (the reference)", t_dense, 0.0, 1.0, 1.0]]
    configs = [
        ("cg", dict(maxiter=100, tol=1e-6), "maxiter 100, tol 1e-6 (defaults)"),
        ("cg", dict(maxiter=500, tol=1e-10), "maxiter 500, tol 1e-10"),
        ("lissa", dict(scale=float(mu[-1]) + lam, num_iters=args.lissa_steps),
         f"{args.lissa_steps} steps, scale mu_max + damping"),
        ("low_rank", dict(rank=50, num_iters=100), "rank 50, 100 Lanczos steps"),
        ("low_rank", dict(rank=200, num_iters=300), "rank 200, 300 Lanczos steps"),
    ]  # fmt: skip
    for solver, options, note in configs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            S, t = run(solver, **options)
        rel, pearson, overlap = agreement(S, ref)
        warned = "; warned" if caught else ""
        rows.append([f"{solver}: {note}{warned}", t, rel, pearson, overlap])
        print(rows[-1], flush=True)
    header = ["solver", "seconds", "relative error", "Pearson", "top-10 overlap"]
    return table(header, rows), info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--target", type=float, default=1e-6)
    ap.add_argument("--cond-damping", type=float, default=1e-2)
    ap.add_argument("--ranks", type=int, nargs="*", default=[20, 50, 100])
    ap.add_argument("--lissa-max", type=int, default=5000)
    ap.add_argument("--lissa-steps", type=int, default=1000)
    ap.add_argument("--parts", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    body = [f"Machine: {machine('cpu')}, 1 torch thread, float64.\n"]
    if 1 in args.parts:
        torch.set_default_dtype(torch.float64)
        text, info = part1(args)
        body.append(
            f"### Solvers: damped GGN of the MLP workload, batch {args.batch}\n\n"
            f"n = {info['n']:,}, rank of G = {info['rank']}, mu_max = {info['mu_max']:.4g}, "
            f"damping = {info['damping']:.3g} (condition number {info['kappa']:.0f}); one "
            f"ggn_vp {info['per_matvec'] * 1e3:.0f} ms; target relative error {args.target:g} "
            f"against the exact (Woodbury) solve. LiSSA error after 10/100/1000 matvecs: "
            + ", ".join(f"{v:.2g}" for v in info["lissa_curve"].values())
            + ".\n\n"
            + text
        )
    if 2 in args.parts:
        torch.set_default_dtype(torch.float64)
        text, info = part2(args)
        body.append(
            "### Influence: 10 test digits x 1,437 training digits, MLP 64-32-10\n\n"
            f"n = {info['n']:,}, gradient norm at the fit {info['grad_norm']:.1g}, Hessian "
            f"eigenvalues in [{info['mu_min']:.3g}, {info['mu_max']:.3g}], damping 1e-3 "
            f"(condition number {info['kappa']:.0f}). Agreement with the dense route.\n\n" + text
        )
    out = "\n\n".join(body)
    print(out)
    if args.record:
        record("bench_inverse.py: inverse products and influence scores", out)


if __name__ == "__main__":
    main()
