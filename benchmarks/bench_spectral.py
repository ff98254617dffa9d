"""Spectral analysis side by side: hessfunc, PyHessian, hessian-eigenthings and curvlinops.

One model and one batch for everyone: an MLP (64-48-10, 3,610 parameters) trained briefly on
``sklearn.datasets.load_digits``, cross-entropy on a fixed batch of 256 digits, float64. The
reference is the dense Hessian (``hessfunc.hessian_matrix``) and its ``eigvalsh``.

For each task and tool: Hessian-vector products (matvecs, counted by wrapping each tool's
product), wall time, and error against the reference:

* top-1 and top-5 eigenvalues: each tool's knob (iterations or tolerance) is swept from cheap to
  expensive and the first setting whose largest relative error is below ``--target`` is kept;
  its default setting is reported too;
* trace at equal matvecs: RMS relative error over ``--repeats`` seeds;
* density: Wasserstein-1 distance to the exact eigenvalues (as a fraction of the spectral
  range) at 10 probes x 30 Lanczos steps.

    pip install pyhessian && pip install --no-deps hessian-eigenthings curvlinops-for-pytorch
    python benchmarks/bench_spectral.py [--record] [--target 1e-4] [--repeats 10]

The peers are benchmark dependencies only (``pip install -e .[bench]``); a peer that is not
installed is reported as such. PyHessian's ``density`` calls ``torch.eig``, removed in torch 2;
this script supplies an ``eigh``-based stand-in so that it can run.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, record, table  # noqa: E402

import hessfunc  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- problem


def problem(batch: int = 256):
    digits = load_digits()
    X, y = torch.tensor(digits.data) / 16.0, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    return model, X[:batch], y[:batch]


class Counter:
    def __init__(self):
        self.n = 0

    def wrap(self, fn, per_call=lambda *a: 1):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.n += per_call(*args, **kwargs)
            return fn(*args, **kwargs)

        return counted


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel_err(found, exact) -> float:
    found = torch.as_tensor(np.asarray(found, dtype=np.float64))
    return float(((found - exact).abs() / exact.abs()).max())


def wasserstein1(nodes, weights, eig) -> float:
    """W1 between sum_j weights_j delta(nodes_j) (weights sum to 1) and uniform on eig."""
    x = torch.cat([torch.as_tensor(nodes).reshape(-1), eig])
    w = torch.cat([torch.as_tensor(weights).reshape(-1), -torch.ones_like(eig) / len(eig)])
    order = x.argsort()
    return float((torch.cumsum(w[order], 0)[:-1].abs() * x[order].diff()).sum())


def wasserstein1_grid(grid, density, eig) -> float:
    """W1 between a density tabulated on a grid and uniform on eig (CDFs on the grid)."""
    grid, density = torch.as_tensor(grid), torch.as_tensor(density)
    cdf = torch.cat([torch.zeros(1), torch.cumulative_trapezoid(density, grid)])
    cdf = cdf / cdf[-1]
    true = torch.searchsorted(eig.sort().values, grid, right=True) / len(eig)
    inside = torch.trapezoid((cdf - true).abs(), grid)
    # eigenvalues outside the grid add their distance to it
    outside = (grid[0] - eig).clamp(min=0).sum() + (eig - grid[-1]).clamp(min=0).sum()
    return float(inside + outside / len(eig))


# ----------------------------------------------------------------------------- tools


class HessFunc:
    """hessfunc's estimators with ``hessfunc.hvp`` (a forward and backward per product) or, like
    PyHessian, with one gradient graph kept and reused (``hessfunc.hessian_operator``)."""

    def __init__(self, model, x, y, product="hvp"):
        apply, self.params = hessfunc.from_module(model)
        self.f = lambda p, x, y: F.cross_entropy(apply(p, x), y)
        self.x, self.y = x, y
        self.counter = Counter()
        self.name = "hessfunc" if product == "hvp" else "hessfunc (kept graph)"
        if product == "hvp":
            mv = lambda v: hessfunc.hvp(self.f, self.params, v, x, y)  # noqa: E731
        else:
            mv = hessfunc.hessian_operator(self.f, self.params, x, y)
        self.mv = self.counter.wrap(mv)

    def v0(self, seed):
        return hessfunc.ravel(self.params)[1](
            torch.randn(sum(t.numel() for t in self.params.values()), generator=gen(seed))
        )

    def probes(self, m, seed):
        return hessfunc.random_probes(self.params, m, generator=gen(seed))

    def top(self, k, knob, seed=0):
        res = hessfunc.eigsh(self.mv, self.v0(seed), k, num_iters=knob)
        return res.eigenvalues, knob  # one matvec per Lanczos step

    def trace(self, method, m, seed):
        fn = {
            "hutchinson": hessfunc.hutchinson_trace,
            "hutch++": hessfunc.hutchpp_trace,
            "xtrace": hessfunc.xtrace,
        }[method]
        return float(fn(self.mv, self.probes(m, seed)).estimate), m

    def density(self, probes, steps, seed=0):
        res = hessfunc.slq(self.mv, self.probes(probes, seed), steps)
        return ("nodes", res.nodes, res.weights / probes), probes * steps


def gen(seed):
    return torch.Generator().manual_seed(seed)


class PyHessian:
    name = "PyHessian"

    def __init__(self, model, x, y):
        import pyhessian  # noqa: F401  (its __init__ shadows the submodule with the class)

        ph = sys.modules["pyhessian.hessian"]

        def eig(T, eigenvectors=True):  # torch.eig is gone in torch 2; its density calls it
            w, V = torch.linalg.eigh(T)
            return torch.stack([w, torch.zeros_like(w)], 1), V

        torch.eig = eig
        self.counter = Counter()
        ph.hessian_vector_product = self.counter.wrap(ph.hessian_vector_product)
        self.h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)

    def top(self, k, knob, seed=0):
        torch.manual_seed(seed)  # PyHessian draws its start vectors from the global RNG
        self.counter.n = 0
        ev, _ = self.h.eigenvalues(maxIter=10_000, tol=knob, top_n=k)
        return sorted(ev, reverse=True), self.counter.n

    def trace(self, method, m, seed):
        torch.manual_seed(seed)
        self.counter.n = 0
        samples = self.h.trace(maxIter=m, tol=-1e30)  # a negative tol: never stop early
        return float(np.mean(samples)), self.counter.n

    def density(self, probes, steps, seed=0):
        torch.manual_seed(seed)
        self.counter.n = 0
        nodes, weights = self.h.density(iter=steps, n_v=probes)
        return ("nodes", torch.tensor(nodes), torch.tensor(weights) / probes), self.counter.n


class Eigenthings:
    name = "hessian-eigenthings"

    def __init__(self, model, x, y):
        import hessian_eigenthings as he

        self.he = he
        self.op = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))
        self.counter = Counter()
        self.op.matvec = self.counter.wrap(self.op.matvec)

    def top(self, k, knob, seed=0):
        self.counter.n = 0
        res = self.he.lanczos(self.op, k=k, max_iter=knob, which="LA", seed=seed)
        return res.eigenvalues, self.counter.n

    def trace(self, method, m, seed):
        self.counter.n = 0
        res = self.he.trace(self.op, num_matvecs=m, method=method, seed=seed)
        return float(res.estimate), self.counter.n

    def density(self, probes, steps, seed=0):
        self.counter.n = 0
        res = self.he.spectral_density(self.op, num_runs=probes, lanczos_steps=steps, seed=seed)
        return ("grid", res.grid, res.density), self.counter.n


class Curvlinops:
    name = "curvlinops"

    def __init__(self, model, x, y):
        import curvlinops

        self.cl = curvlinops
        params = [p for p in model.parameters() if p.requires_grad]
        self.A = curvlinops.HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
        )
        self.counter = Counter()
        # _matmat receives a list of (*param.shape, k) blocks: k products per call
        self.A._matmat = self.counter.wrap(self.A._matmat, lambda X: X[0].shape[-1])

    def top(self, k, knob, seed=0):
        from scipy.sparse.linalg import eigsh

        self.counter.n = 0
        v0 = np.random.default_rng(seed).standard_normal(self.A.shape[0])
        ev = eigsh(self.A.to_scipy(), k=k, which="LA", tol=knob, v0=v0, return_eigenvectors=False)
        return sorted(ev, reverse=True), self.counter.n

    def trace(self, method, m, seed):
        fn = {
            "hutchinson": self.cl.hutchinson_trace,
            "hutch++": self.cl.hutchpp_trace,
            "xtrace": self.cl.xtrace,
        }[method]
        torch.manual_seed(seed)  # curvlinops draws its probes from the global RNG
        self.counter.n = 0
        return float(fn(self.A, m)), self.counter.n

    def density(self, probes, steps, seed=0):
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.counter.n = 0
        grid, density = self.cl.lanczos_approximate_spectrum(self.A, ncv=steps, num_repeats=probes)
        return ("grid", grid, density), self.counter.n


# knobs swept from cheap to expensive, and each tool's default
KNOBS = {
    "hessfunc": ([5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150], 20),
    "hessfunc (kept graph)": ([5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150], 20),
    "PyHessian": ([1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10], 1e-3),
    "hessian-eigenthings": ([5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150], None),
    "curvlinops": ([1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10, 0.0], 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    model, x, y = problem()
    hf = HessFunc(model, x, y)
    H, t_dense = timed(lambda: hessfunc.hessian_matrix(hf.f, hf.params, x, y, chunk_size=512))
    H = (H + H.T) / 2
    eig = torch.linalg.eigvalsh(H)
    exact_trace = float(torch.trace(H))
    n = H.shape[0]
    print(f"n = {n}, dense Hessian {t_dense:.1f} s, top-5 {eig.flip(0)[:5].tolist()}")

    tools = [hf, HessFunc(model, x, y, product="pullback")]
    missing = []
    for cls in (PyHessian, Eigenthings, Curvlinops):
        try:
            tools.append(cls(model, x, y))
        except ImportError as err:
            missing.append(f"{cls.name} ({err})")

    out = [
        f"Machine: {machine('cpu')}; 1 torch thread. Model: MLP 64-48-10 ({n} parameters), "
        f"cross-entropy on 256 digits, float64. Target relative error {args.target:g}."
    ]
    if missing:
        out.append("Not installed: " + ", ".join(missing))

    # --- top-k eigenvalues
    rows = []
    best: dict[tuple[str, int], tuple[int, float]] = {}
    for k in (1, 5):
        exact = eig.flip(0)[:k]
        for tool in tools:
            knobs, default = KNOBS[tool.name]
            if default is None:
                default = 2 * k  # hessian-eigenthings: max_iter = min(2k, n - 1)
            (ev, mv), sec = timed(lambda t=tool, d=default, k=k: t.top(k, d))
            err = rel_err(ev, exact)
            rows.append([f"top-{k}", tool.name, f"default ({default})", mv, sec, err])
            print(rows[-1], flush=True)
            for knob in knobs:
                if tool.name == "hessian-eigenthings" and knob < k:
                    continue
                try:
                    (ev, mv), sec = timed(lambda t=tool, kn=knob, k=k: t.top(k, kn))
                except Exception as err:  # report, keep going
                    rows.append([f"top-{k}", tool.name, f"{knob}", "fails", "-", str(err)[:60]])
                    break
                err = rel_err(ev, exact)
                if err <= args.target:
                    rows.append([f"top-{k}", tool.name, f"to target ({knob})", mv, sec, err])
                    best[(tool.name, k)] = (mv, sec)
                    print(rows[-1], flush=True)
                    break
            else:
                rows.append([f"top-{k}", tool.name, "to target", "not reached", "-", err])
    out.append("### Top eigenvalues\n")
    out.append(table(["task", "tool", "setting", "matvecs", "time (s)", "max rel. error"], rows))
    ratios = []
    for k in (1, 5):
        if ("hessfunc (kept graph)", k) not in best:
            continue
        mv0, t0 = best[("hessfunc (kept graph)", k)]
        for tool in tools[2:]:
            if (tool.name, k) in best:
                mv, sec = best[(tool.name, k)]
                ratios.append([f"top-{k}", tool.name, mv / mv0, sec / t0])
            else:
                ratios.append([f"top-{k}", tool.name, "target not reached", "-"])
    out.append(
        "\nRatios at the target accuracy (peer / hessfunc with the kept-graph product, the "
        "product PyHessian uses; above 1: hessfunc is cheaper):\n"
    )
    out.append(table(["task", "peer", "matvecs ratio", "time ratio"], ratios))

    # --- long Lanczos runs: hessian-eigenthings turns reorthogonalisation off past 50 steps
    rows = []
    exact5 = eig.flip(0)[:5]
    for tool in tools:
        if tool.name not in ("hessfunc (kept graph)", "hessian-eigenthings"):
            continue
        for steps in (50, 51, 80):
            (ev, mv), sec = timed(lambda t=tool, s=steps: t.top(5, s))
            top5 = [round(float(e), 6) for e in ev]
            rows.append([tool.name, steps, top5, rel_err(ev, exact5)])
            print(rows[-1], flush=True)
    out.append(
        f"\n### Top-5 from long Lanczos runs (exact {[round(float(e), 6) for e in exact5]})\n"
    )
    out.append(table(["tool", "Lanczos steps", "top-5", "max rel. error"], rows))

    # --- trace at equal matvecs
    rows = []
    for m in (30, 90):
        for tool in tools:
            for method in ("hutchinson", "hutch++", "xtrace"):
                if tool.name == "PyHessian" and method != "hutchinson":
                    continue
                if tool.name == "hessian-eigenthings" and method == "xtrace":
                    continue
                errs, secs, counts = [], [], []
                for r in range(args.repeats):
                    run = lambda t=tool, me=method, s=r, m=m: t.trace(me, m, 500 + s)  # noqa: E731
                    (est, mv), sec = timed(run)
                    errs.append((est - exact_trace) / exact_trace)
                    secs.append(sec)
                    counts.append(mv)
                rms = math.sqrt(sum(e * e for e in errs) / len(errs))
                rows.append([m, tool.name, method, max(counts), float(np.median(secs)), rms])
                print(rows[-1], flush=True)
    out.append(f"\n### Trace (exact {exact_trace:.4f}), RMS relative error over "
               f"{args.repeats} seeds\n")  # fmt: skip
    header = ["matvecs", "tool", "method", "matvecs used", "median time (s)", "RMS rel. error"]
    out.append(table(header, rows))

    # --- density
    rows = []
    spread = float(eig.max() - eig.min())
    for tool in tools:
        try:
            ((kind, a, b), mv), sec = timed(lambda t=tool: t.density(10, 30))
        except Exception as err:
            rows.append([tool.name, "fails", "-", str(err)[:80]])
            continue
        w1 = wasserstein1(a, b, eig) if kind == "nodes" else wasserstein1_grid(a, b, eig)
        compared = "quadrature nodes" if kind == "nodes" else "smoothed grid"
        rows.append([tool.name, mv, sec, w1 / spread, compared])
        print(rows[-1], flush=True)
    out.append("\n### Density: 10 probes x 30 Lanczos steps\n")
    out.append(table(["tool", "matvecs", "time (s)", "W1 / spectral range", "compared as"], rows))

    body = "\n".join(out)
    print(body)
    if args.record:
        record("bench_spectral.py: eigenvalues, trace and density against the peers", body)


if __name__ == "__main__":
    main()
