"""Vectorised finite-difference Hessian against the classic per-parameter loop.

Baseline (measured in the same run): perturb one raveled parameter at a time by +-h_i and take
two backward passes (torch.autograd.grad), n times in a Python loop. Contender:
hessfunc.fd_hessian_matrix, all basis directions through torch.func.vmap in chunks. Both use
the same per-coordinate step h_i = u^(1/3) max(1, |theta_i|) and the same symmetrisation, so they
compute the same matrix up to rounding; accuracy is measured against hessfunc.hessian_matrix.

Usage: python benchmarks/bench_fd.py [--repeats 3] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import workloads  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc.products.fd import default_step, fd_hessian_matrix  # noqa: E402


def make_problem(widths: tuple[int, ...], batch: int = 64, seed: int = 0):
    w = workloads.small_mlp(widths=widths, batch=batch, seed=seed)
    return w.f, w.params, w.args


def loop_fd_hessian(f, params, *args) -> torch.Tensor:
    """The classic loop: one coordinate at a time, two backward passes each."""
    flat, unravel = hessfunc.ravel(params)
    n = flat.numel()
    h = default_step(flat.dtype) * flat.abs().clamp_min(1.0)
    out = torch.empty(n, n, dtype=flat.dtype)
    z = flat.clone().requires_grad_(True)

    def grad_at() -> torch.Tensor:
        (g,) = torch.autograd.grad(f(unravel(z), *args), z)
        return g

    for i in range(n):
        with torch.no_grad():
            z[i] = flat[i] + h[i]
        g_plus = grad_at()
        with torch.no_grad():
            z[i] = flat[i] - h[i]
        g_minus = grad_at()
        with torch.no_grad():
            z[i] = flat[i]
        out[i] = (g_plus - g_minus) / (2 * h[i])
    return (out + out.T) / 2


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--record", action="store_true", help="append a section to benchmarks/RESULTS.md"
    )
    parser.add_argument("--note", default="", help="a line recorded with the results")
    opts = parser.parse_args()
    torch.set_grad_enabled(True)
    rows = []
    for widths, chunk in (((10, 32, 32, 1), None), ((10, 64, 64, 1), 1024)):
        f, params, args = make_problem(widths)
        n = hessfunc.ravel(params)[0].numel()
        exact = hessfunc.hessian_matrix(f, params, *args, mode="rev-rev", chunk_size=chunk)
        fd_hessian_matrix(f, params, *args, chunk_size=chunk)  # warm-up (allocator, kernels)
        t_vec, h_vec = timed(
            lambda: fd_hessian_matrix(f, params, *args, chunk_size=chunk), opts.repeats
        )
        t_loop, h_loop = timed(lambda: loop_fd_hessian(f, params, *args), 1)
        row = {
            "model": "-".join(map(str, widths)),
            "n": n,
            "chunk": chunk,
            "t_loop": t_loop,
            "t_vec": t_vec,
            "speedup": t_loop / t_vec,
            "err_loop": rel(h_loop, exact),
            "err_vec": rel(h_vec, exact),
            "loop_vs_vec": rel(h_vec, h_loop),
        }
        rows.append(row)
        print(
            f"MLP {row['model']} (n={n}, batch 64, float64): loop {t_loop:.2f} s, vmapped "
            f"{t_vec:.3f} s (chunk_size={chunk}) -> {row['speedup']:.1f}x; rel. Frobenius error vs "
            f"exact: loop {row['err_loop']:.1e}, vmapped {row['err_vec']:.1e} (between them "
            f"{row['loop_vs_vec']:.1e})"
        )
    if opts.record:
        record(rows, opts.repeats, opts.note)


def record(rows: list[dict], repeats: int, note: str) -> None:
    lines = [
        f"Machine: {common.machine('cpu')}, {torch.get_num_threads()} torch threads. {note}",
        "",
        "MSE loss, tanh MLP, batch 64, float64; both methods use the step "
        "u^(1/3) max(1, |theta_i|) and symmetrise; error = ||H_fd - H||_F / ||H||_F against "
        f"hessfunc.hessian_matrix. Vectorised time: median of {repeats} after a warm-up; "
        "loop: one run.",
        "",
        "| MLP | n | chunk_size | loop (s) | fd_hessian_matrix (s) | speed-up | error loop "
        "| error vmapped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['chunk']} | {r['t_loop']:.2f} | {r['t_vec']:.3f} | "
            f"{r['speedup']:.1f}x | {r['err_loop']:.1e} | {r['err_vec']:.1e} |"
        )
    common.record("bench_fd.py: vectorised FD Hessian vs per-parameter loop", "\n".join(lines))


if __name__ == "__main__":
    main()
