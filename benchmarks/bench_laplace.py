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

The largest whole-network full-GGN Laplace each library can hold is set by memory: both store
the dense ``n x n`` precision; the script prints the ``n`` that fits in half of the free memory
for each, from the peak bytes per ``n^2`` measured on the full case, instead of running it.

    python benchmarks/bench_laplace.py [--threads 1] [--quick] [--no-memory] [--record]

``--predictive`` runs only the predictive: the K-FAC probit predictive on the digits (an MLP
and a small CNN; ``--wide`` adds a 64-256-256-10 MLP, where laplace-torch needs ~15 GiB),
hessfunc's layer route against its per-sample Jacobian route and laplace-torch's
``la(X, pred_type="glm")`` for the same posterior, time and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import math
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
    args = parser.parse_args()
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
    full_mem = run_case("mlp " + "-".join(map(str, small)), mlp(small), X, y, "full", "full",
                        "all", rows, notes, args.no_memory)  # fmt: skip
    X2, y2 = data(N, big[0], big[-1], seed=1)
    net2 = mlp(big)
    run_case("mlp " + "-".join(map(str, big)), net2, X2, y2, "kfac", "kron", "all", rows, notes,
             args.no_memory)  # fmt: skip
    run_case("mlp " + "-".join(map(str, big)) + " last layer", net2, X2, y2, "full", "full",
             "last_layer", rows, notes, args.no_memory)  # fmt: skip
    header = ["case", "n", "step", "hessfunc s", "laplace-torch s", "ratio", "hessfunc MiB",
              "laplace-torch MiB"]  # fmt: skip
    body = [f"Machine: {common.machine('cpu')}; {args.threads} thread(s); float64; N = {N}.", ""]
    body.append(common.table(header, rows))
    body.append("")
    body += notes
    m_ours, m_theirs, n = full_mem
    if m_ours is not None:
        free = _free_bytes()
        for lib, m in (("hessfunc", m_ours), ("laplace-torch", m_theirs)):
            per = m / n**2
            body.append(
                f"- largest whole-network full-GGN Laplace in half the free memory "
                f"({free / 2**30:.1f} GiB free): about n = {math.isqrt(int(free / 2 / per)):,} for "
                f"{lib} ({per:.1f} bytes per n^2 measured at n = {n})"
            )
    body.append("")
    body.append(f"Whole run: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(body)
    print(text)
    if args.record:
        common.record("bench_laplace.py: Laplace fit and prior tuning against laplace-torch", text)


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
    body = [
        f"Machine: {common.machine('cpu')}; {args.threads} thread(s); float64. K-FAC posterior "
        f"(separate bias blocks, prior 1) fitted on {len(train[1])} training digits after 150 "
        f"Adam steps; probit predictive at the first {TEST_INPUTS} test digits in one call. "
        "Seconds: median of 3 calls after a warm-up; peak MiB: bytes allocated during one call "
        "(profiler events).",
        "",
        common.table(header, rows),
        "",
        *notes,
        "",
        f"Whole run: {time.perf_counter() - start:.0f} s.",
    ]
    text = "\n".join(body)
    print(text)
    if args.record:
        common.record("bench_laplace.py --predictive: the K-FAC predictive without Jacobians", text)


def _free_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
