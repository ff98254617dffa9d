"""Laplace approximations: fit and tune the prior, hessfunc.laplace against laplace-torch.

For each case, in one run (float64, cross-entropy, synthetic data, batches of 128):

- fit: ``hessfunc.laplace.fit`` against ``laplace.Laplace(...).fit`` (its default curvlinops
  GGN backend) for the same structure and subset;
- tune: ``post.optimize_prior_precision()`` (Newton on the log prior, to a relative 1e-8)
  against laplace-torch's ``optimize_prior_precision(method="marglik")`` (100 Adam steps on the
  log prior, its default, with one prior for all parameters as here);
- the two log marginal likelihoods at the same prior (they agree to rounding: the ``diff``
  column), and the two tuned priors.

Time is one call after a warm-up call (``time.perf_counter``; the runs are seconds long);
memory the peak bytes that call allocates (``common.peak_memory``, CPU profiler events). The ratio
column is laplace-torch's time over hessfunc's, both from this run.

``--largest`` measures, instead, the largest whole-network Laplace each library and structure
fits on this machine: an MLP 64-h-h-10 (tanh) on sklearn's digits (1797 images, float64,
batches of 128) is widened by about 1.4x per step (h = 16, 22, 31, ...), and each size runs
``fit`` plus one log marginal likelihood in a fresh child process, one at a time, under a
wall-clock cap (``--cap-s``, default 300 s) and a resident-memory cap (``--cap-gib``, default
8 GiB: the parent polls the child's ``VmRSS`` in ``/proc/<pid>/status`` every 50 ms and kills
it above the cap). The child reports its seconds and its peak resident memory
(``resource.getrusage``); a structure stops at its first failure or cap. The parameters sit at
initialisation: the cost of a fit does not depend on their values. The dense structures' peak
bytes per ``n^2`` at their largest size give a labelled extrapolation to the whole machine.

    python benchmarks/bench_laplace.py [--threads 1] [--quick] [--no-memory] [--record]
    python benchmarks/bench_laplace.py --largest [--cap-s 300] [--cap-gib 8] [--record]

``--predictive`` runs only the predictive: the K-FAC probit predictive on the digits (an MLP
and a small CNN; ``--wide`` adds a 64-256-256-10 MLP, where laplace-torch needs ~15 GiB),
hessfunc's layer route against its per-sample Jacobian route and laplace-torch's
``la(X, pred_type="glm")`` for the same posterior, time and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

import common
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfunc
from hessfunc.losses import CrossEntropyLoss

BATCH = 128


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def data(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_case(name, net, X, y, ours, theirs, subset, rows, notes, no_memory):
    import laplace

    apply, params = hessfunc.from_module(net)
    model_fn = lambda p, X, *rest: apply(p, X)  # noqa: E731
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH)
    n = sum(p.numel() for p in params.values())

    def ours_fit():
        return hessfunc.laplace.fit(
            model_fn, lambda X, y: CrossEntropyLoss(y), params, batches, structure=ours,
            subset=None if subset == "all" else subset,
        )  # fmt: skip

    def theirs_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = laplace.Laplace(
                net, "classification", subset_of_weights=subset, hessian_structure=theirs
            )
            la.fit(loader)
        return la

    ours_fit(), theirs_fit()  # warm-up: first calls pay one-off costs of torch.func and imports
    post, t_ours = timed(ours_fit)
    la, t_theirs = timed(theirs_fit)
    m_ours = None if no_memory else common.peak_memory(ours_fit, "cpu")
    m_theirs = None if no_memory else common.peak_memory(theirs_fit, "cpu")
    tuned, tt_ours = timed(post.optimize_prior_precision)

    def theirs_tune():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")

    _, tt_theirs = timed(theirs_tune)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    rows.append([name, n, "fit", t_ours, t_theirs, t_theirs / t_ours, mib(m_ours), mib(m_theirs)])
    rows.append([name, n, "tune prior", tt_ours, tt_theirs, tt_theirs / tt_ours, "-", "-"])
    print(rows[-2], rows[-1], flush=True)
    delta_theirs = float(la.prior_precision)  # read first: evaluating the evidence resets it
    lml_ours = float(post.log_marginal_likelihood(1.0).estimate)
    lml_theirs = float(la.log_marginal_likelihood(torch.tensor(1.0)))
    grad = torch.tensor(delta_theirs, requires_grad=True)
    (g,) = torch.autograd.grad(post.log_marginal_likelihood(grad).estimate, grad)
    notes.append(
        f"- {name}: log evidence at prior 1: {lml_ours:.10g} (hessfunc), {lml_theirs:.10g} "
        f"(laplace-torch), diff {abs(lml_ours - lml_theirs):.1e}; tuned prior "
        f"{float(tuned.prior):.6g} (hessfunc, evidence gradient there ~0) vs {delta_theirs:.6g} "
        f"(laplace-torch's 100 Adam steps; evidence gradient there {float(g):.2e})"
    )
    return m_ours, m_theirs, n


def report(args, title: str, intro: str, header, rows, notes, start: float) -> None:
    """Print a section (intro, table, notes, total time) and record it with ``--record``."""
    body = [intro, "", common.table(header, rows), "", *notes, ""]
    body.append(f"Whole run: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(body)
    print(text)
    if args.record:
        common.record(title, text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler runs")
    parser.add_argument("--record", action="store_true")
    parser.add_argument(
        "--predictive", action="store_true", help="only the K-FAC predictive on the digits"
    )
    parser.add_argument(
        "--wide", action="store_true", help="with --predictive: also a 64-256-256-10 MLP"
    )
    parser.add_argument("--largest", action="store_true", help="measure the largest network")
    parser.add_argument("--cap-s", type=float, default=300.0, help="--largest: seconds per size")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="--largest: GiB per size")
    parser.add_argument("--only", default=None, help="--largest: e.g. hessfunc:full")
    parser.add_argument("--min-h", type=int, default=0, help="--largest: skip smaller widths")
    parser.add_argument(
        "--child", nargs=3, metavar=("LIB", "STRUCTURE", "H"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], int(args.child[2]), args.cap_gib)
        return
    if args.largest:
        largest(args)
        return
    torch.set_num_threads(args.threads)
    if args.predictive:
        torch.set_default_dtype(torch.float64)
        predictive_main(args)
        return
    # laplace-torch's full GGN multiplies by torch.eye(n) in the default dtype: float64 here, so
    # both libraries compute in float64
    torch.set_default_dtype(torch.float64)
    try:
        import laplace  # noqa: F401
    except ImportError:
        raise SystemExit("needs laplace-torch: pip install --no-deps laplace-torch ...") from None
    start = time.perf_counter()
    rows: list[list[object]] = []
    notes: list[str] = []
    small = [20, 30, 10] if args.quick else [64, 32, 10]
    big = [64, 64, 10] if args.quick else [256, 256, 256, 10]
    N = 512 if args.quick else 1024
    torch.manual_seed(0)
    X, y = data(N, small[0], small[-1])
    run_case("mlp " + "-".join(map(str, small)), mlp(small), X, y, "full", "full", "all", rows,
             notes, args.no_memory)  # fmt: skip
    X2, y2 = data(N, big[0], big[-1], seed=1)
    net2 = mlp(big)
    run_case("mlp " + "-".join(map(str, big)), net2, X2, y2, "kfac", "kron", "all", rows, notes,
             args.no_memory)  # fmt: skip
    run_case("mlp " + "-".join(map(str, big)) + " last layer", net2, X2, y2, "full", "full",
             "last_layer", rows, notes, args.no_memory)  # fmt: skip
    header = ["case", "n", "step", "hessfunc s", "laplace-torch s", "ratio", "hessfunc MiB",
              "laplace-torch MiB"]  # fmt: skip
    notes.append(
        "- the largest whole-network Laplace each library and structure fits is measured by "
        "--largest (a growing MLP, one capped child process per size), not extrapolated here"
    )
    report(
        args, "bench_laplace.py: Laplace fit and prior tuning against laplace-torch",
        f"Machine: {common.machine('cpu')}; {args.threads} thread(s); float64; N = {N}.",
        header, rows, notes, start,
    )  # fmt: skip


# ------------------------------------------------------------------------- the predictive


def _digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (X[perm[:cut]], y[perm[:cut]]), (X[perm[cut:]], y[perm[cut:]])


def _trained(net: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X), y) + 1e-4 * sum(
            (p**2).sum() for p in net.parameters()
        )
        loss.backward()
        opt.step()
    return net.eval()


# laplace-torch's K-FAC predictive grew faster than linearly in the inputs of one call on the
# CNN (0.08 GiB for 10 inputs, 0.62 GiB for 40) and was killed for memory at all 360 test digits
TEST_INPUTS = 100


def _predictive_case(name, net, train, test, rows, notes, no_memory):
    """K-FAC predictive at the test inputs: layer route, Jacobian route, laplace-torch."""
    import laplace

    from hessfunc.laplace import predictive as pred_module

    apply, params = hessfunc.from_module(net)
    model_fn = lambda p, X, *rest: apply(p, X)  # noqa: E731
    X, y = train
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
    post = hessfunc.laplace.fit(model_fn, lambda X, y: CrossEntropyLoss(y), params, batches,
                                structure="kfac", prior_precision=1.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(net, "classification", subset_of_weights="all",
                             hessian_structure="kron", prior_precision=1.0)  # fmt: skip
        la.fit(DataLoader(TensorDataset(X, y), batch_size=BATCH))
    Xt = test[0][:TEST_INPUTS]
    n = sum(p.numel() for p in params.values())
    layer_route = pred_module.output_gaussian

    def jacobian_route(post, inputs, chunk_size):
        return layer_route(post, inputs, chunk_size, jacobians=True)

    def ours():
        return post.predictive(Xt)

    def ours_jacobians():
        pred_module.output_gaussian = jacobian_route
        try:
            return post.predictive(Xt)
        finally:
            pred_module.output_gaussian = layer_route

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return la(Xt, pred_type="glm", link_approx="probit")

    results, times, mems = {}, {}, {}
    for key, fn in (("layers", ours), ("jacobians", ours_jacobians), ("laplace-torch", theirs)):
        results[key] = fn()  # warm-up
        t = []
        for _ in range(3):
            _, dt = timed(fn)
            t.append(dt)
        times[key] = sorted(t)[1]
        mems[key] = None if no_memory else common.peak_memory(fn, "cpu")
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    base = times["jacobians"]
    for key in ("jacobians", "layers", "laplace-torch"):
        rows.append([name, n, len(Xt), key, times[key], base / times[key], mib(mems[key])])
        print(rows[-1], flush=True)
    var_new = layer_route(post, (Xt,), None).variance
    var_old = jacobian_route(post, (Xt,), None).variance
    notes.append(
        f"- {name}: max |probability difference| layers vs Jacobians "
        f"{float((results['layers'] - results['jacobians']).abs().max()):.1e}, layers vs "
        f"laplace-torch {float((results['layers'] - results['laplace-torch']).abs().max()):.1e}; "
        f"max |variance difference| layers vs Jacobians "
        f"{float((var_new - var_old).abs().max()):.1e} (largest variance "
        f"{float(var_old.abs().max()):.3g}); the Jacobian route's (m, C, n) block alone is "
        f"{len(Xt) * 10 * n * 8 / 2**20:.0f} MiB"
    )


def predictive_main(args) -> None:
    """``--predictive``: the K-FAC predictive on the digits, its own RESULTS.md subsection."""
    start = time.perf_counter()
    train, test = _digits()
    torch.manual_seed(0)
    mlp_net = _trained(mlp([64, 32, 10]), *train)
    cnn = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 64, 10),
    ).double()  # fmt: skip
    cnn = _trained(cnn, *train)
    rows: list[list[object]] = []
    notes: list[str] = []
    cases = [("digits mlp 64-32-10", mlp_net), ("digits cnn 8-16 conv", cnn)]
    if args.wide:  # laplace-torch peaks near 15 GiB here
        cases.append(("digits mlp 64-256-256-10", _trained(mlp([64, 256, 256, 10]), *train)))
    for name, net in cases:
        _predictive_case(name, net, train, test, rows, notes, args.no_memory)
        gc.collect()
    header = ["case", "n", "test inputs", "route", "seconds", "speed-up vs Jacobians",
              "peak MiB"]  # fmt: skip
    intro = (
        f"Machine: {common.machine('cpu')}; {args.threads} thread(s); float64. K-FAC posterior "
        f"(separate bias blocks, prior 1) fitted on {len(train[1])} training digits after 150 "
        f"Adam steps; probit predictive at the first {TEST_INPUTS} test digits in one call. "
        "Seconds: median of 3 calls after a warm-up; peak MiB: bytes allocated during one call "
        "(profiler events)."
    )
    title = "bench_laplace.py --predictive: the K-FAC predictive without Jacobians"
    report(args, title, intro, header, rows, notes, start)


# -- the largest network: one child process per size ---------------------------------------------

LARGEST_CASES = [
    ("hessfunc", "full"),
    ("laplace-torch", "full"),
    ("hessfunc", "low_rank"),
    ("laplace-torch", "diag"),
    ("hessfunc", "kfac"),
    ("laplace-torch", "kron"),
    ("hessfunc", "matrix_free"),
]
GROWTH = 1.4


def _widths() -> list[int]:
    out, h = [], 16.0
    while h < 20000:
        out.append(int(round(h)))
        h *= GROWTH
    return out


def _rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(lib: str, structure: str, h: int, cap_gib: float) -> None:
    """One size: build the MLP, fit, evaluate the evidence; print one JSON line."""
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = mlp([64, h, h, 10])
    n = sum(p.numel() for p in net.parameters())
    base = _rss_bytes()
    t0 = time.perf_counter()
    if lib == "hessfunc":
        apply, params = hessfunc.from_module(net)
        batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
        opts = {}
        if structure in ("low_rank", "matrix_free"):
            opts["generator"] = torch.Generator().manual_seed(0)
        if structure == "full":  # the RSS cap, not the machine's momentary free memory, decides
            opts["max_bytes"] = int(cap_gib * 2**30)
        post = hessfunc.laplace.fit(
            lambda p, X, *rest: apply(p, X), lambda X, y: CrossEntropyLoss(y), params, batches,
            structure=structure, **opts,
        )  # fmt: skip
        t1 = time.perf_counter()
        lml = float(post.log_marginal_likelihood().estimate)
    else:
        import laplace
        from laplace.curvature.curvature import GGNInterface

        loader = DataLoader(TensorDataset(X, y), batch_size=BATCH)
        # "full": the torch.func Jacobians and GGN of laplace-torch's own interface;
        # "kron", "diag": its default curvlinops backend
        backend = {"backend": GGNInterface} if structure == "full" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = laplace.Laplace(net, "classification", subset_of_weights="all",
                                 hessian_structure=structure, **backend)  # fmt: skip
            la.fit(loader)
            t1 = time.perf_counter()
            lml = float(la.log_marginal_likelihood())
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the one-minute load average: the machine is shared, so seconds depend on it
    print(json.dumps({"n": n, "fit_s": t1 - t0, "lml_s": t2 - t1, "seconds": t2 - t0,
                      "peak": peak, "base": base, "lml": lml, "load": os.getloadavg()[0]}),
          flush=True)  # fmt: skip


def _run_child(lib: str, structure: str, h: int, cap_s: float, cap_bytes: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, structure, str(h),
           "--cap-gib", str(cap_bytes / 2**30)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start, seen, why = time.perf_counter(), 0, None
    while proc.poll() is None:
        rss = _rss_bytes(proc.pid)
        seen = max(seen, rss)
        if rss > cap_bytes:
            why = f"killed above the {cap_bytes / 2**30:.0f} GiB cap"
        elif time.perf_counter() - start > cap_s:
            why = f"killed at the {cap_s:.0f} s cap"
        if why:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if why is None and proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        why = f"failed: {last[:160]}"
    if why is not None:
        return {"ok": False, "why": why, "wall": wall, "rss_seen": seen}
    res = json.loads(out.strip().splitlines()[-1])
    return {"ok": True, "wall": wall, **res}


def largest(args: argparse.Namespace) -> None:
    cap_bytes = int(args.cap_gib * 2**30)
    cases = LARGEST_CASES
    if args.only:  # in the order given, e.g. "hessfunc:kfac,laplace-torch:kron"
        cases = [tuple(c.split(":")) for c in args.only.split(",")]
        unknown = [c for c in cases if c not in LARGEST_CASES]
        if unknown:
            raise SystemExit(f"--only: unknown {unknown}; choose from {LARGEST_CASES}")
    total = _mem_total()
    start = time.perf_counter()
    rows, notes = [], []
    for lib, structure in cases:
        best, fail, best_h = None, None, None
        for h in [w for w in _widths() if w >= args.min_h]:
            res = _run_child(lib, structure, h, args.cap_s, cap_bytes)
            print(lib, structure, h, res, flush=True)
            if not res["ok"]:
                fail = (h, res)
                break
            best, best_h = res, h
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        if best is None:
            rows.append([lib, structure, "-", "-", "-", "-", "-", _why(fail)])
            continue
        stop = "-" if fail is None else f"h = {fail[0]}: {fail[1]['why']}"
        rows.append([lib, structure, f"64-{best_h}-{best_h}-10", f"{best['n']:,}",
                     best["fit_s"] + best["lml_s"], gib(best["peak"]),
                     gib(best["peak"] - best["base"]), stop])  # fmt: skip
        if structure in ("full",):
            per = (best["peak"] - best["base"]) / best["n"] ** 2
            n_all = math.isqrt(int((total - best["base"]) / per))
            notes.append(
                f"- extrapolation, not measured: {lib} {structure} used {per:.1f} bytes per n^2 "
                f"above its {gib(best['base'])} GiB start at n = {best['n']:,}; the whole "
                f"{total / 2**30:.0f} GiB of this machine would hold about n = {n_all:,} by that "
                "law (memory only; time grows as n^3 for the eigendecomposition)"
            )
    header = ["library", "structure", "largest MLP", "n", "fit + evidence s", "peak RSS GiB",
              "above start GiB", "next size"]  # fmt: skip
    intro = (
        f"Machine: {common.machine('cpu')}, {total / 2**30:.0f} GiB shared with other users; "
        f"one thread; float64; sklearn digits (N = 1797, 10 classes); MLP 64-h-h-10 tanh, h "
        f"grown x{GROWTH} per step from 16; caps per size: {args.cap_s:.0f} s wall clock and "
        f"{args.cap_gib:.0f} GiB resident memory (child killed above either); one child at a "
        "time."
    )
    title = "bench_laplace.py --largest: the largest whole-network Laplace"
    report(args, title, intro, header, rows, notes, start)


def _why(fail) -> str:
    return "-" if fail is None else f"h = {fail[0]}: {fail[1]['why']}"


def _mem_total() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
