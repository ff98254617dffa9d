"""Vectorised finite-difference Hessian against the classic per-parameter loop.

Baseline (measured in the same run): perturb one raveled parameter at a time by +-h_i and take
two backward passes (torch.autograd.grad), n times in a Python loop. Contender:
hessfunc.fd.fd_hessian_matrix, all basis directions through torch.func.vmap in chunks. Both use
the same per-coordinate step h_i = u^(1/3) max(1, |theta_i|) and the same symmetrisation, so they
compute the same matrix up to rounding; accuracy is measured against hessfunc.hessian_matrix.

Usage: python benchmarks/bench_fd.py [--repeats 3] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import hessfunc
from hessfunc.fd import default_step, fd_hessian_matrix


def make_problem(widths: tuple[int, ...], batch: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    apply, params = hessfunc.from_module(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64)
    y = torch.randn(batch, widths[-1], generator=g, dtype=torch.float64)

    def f(p, x, y):
        return ((apply(p, x) - y) ** 2).mean()

    return f, params, (x, y)


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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--record", action="store_true", help="append a section to benchmarks/RESULTS.md"
    )
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
        record(rows, opts.repeats)


def record(rows: list[dict], repeats: int) -> None:
    path = Path(__file__).with_name("RESULTS.md")
    lines = [
        f"\n## bench_fd.py: vectorised FD Hessian vs per-parameter loop ({datetime.date.today()})\n",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads "
        f"({__import__('os').cpu_count()} cores visible), torch {torch.__version__}. "
        "The 2-core CPU was shared with other jobs during the run, so absolute times are noisy; "
        "the ratio is measured in the same run.\n",
        "MSE loss, tanh MLP, batch 64, float64; both methods use the step "
        "u^(1/3) max(1, |theta_i|) and symmetrise; error = ||H_fd - H||_F / ||H||_F against "
        f"hessfunc.hessian_matrix. Vectorised time: median of {repeats} after a warm-up; loop: one run.\n",
        "| MLP | n | chunk_size | loop (s) | fd_hessian_matrix (s) | speed-up | error loop | error vmapped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['chunk']} | {r['t_loop']:.2f} | {r['t_vec']:.3f} | "
            f"{r['speedup']:.1f}x | {r['err_loop']:.1e} | {r['err_vec']:.1e} |"
        )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
