"""K-FAC and EK-FAC: build, matvec and solve, against curvlinops and against the exact GGN product.

Workloads (``workloads.py``, float32, cross-entropy): ``mlp`` (784-512-512-10 tanh, batch 256) and
``cnn`` (conv-BN-conv-linear on 28x28, batch 64; BatchNorm's scale and shift are not layer
weights, so hessfunc reports them as uncovered and curvlinops is given the other parameters).

For each workload, in one run:

- build: ``hessfunc.kfac`` / ``hessfunc.ekfac`` (eager, and compiled with ``fullgraph=True``)
  against curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` computing the same factors
  (type-2 and one-sample Monte-Carlo Fishers, the bias in the weight's block). By default
  hessfunc pulls back as many type-2 columns per vectorised pass as fit 4 MiB of output
  gradients (three of ten on the MLP, one on the CNN), curvlinops one at a time; the
  ``chunk_size=1`` row pulls back one column at a time, the ``chunk_size=10`` row all ten at
  once;
- matvec: ``KFAC.matvec`` / ``EKFAC.matvec`` against curvlinops' ``op @ v``, and against
  ``hessfunc.ggn_vp``, the exact product K-FAC approximates;
- solve with damping 1e-3: ``KFAC.solve`` (its eigendecompositions on every call), the solve of
  ``KFAC.eigendecompose()`` (computed once) and ``EKFAC.solve``, against curvlinops'
  ``KFACInverseLinearOperator(use_exact_damping=True)`` (which caches its eigendecompositions).

Time is the median of ``common.timeit``; memory the peak bytes one call allocates
(``common.peak_memory``: CUDA allocator statistics, CPU profiler events). Every ratio compares
two numbers from the same run. The type-2 products of both libraries are also compared
(relative difference of ``K v``), and K-FAC's error against the GGN along a random direction is
printed as a reminder of what is approximated.

    python benchmarks/bench_kfac.py [--device cpu|cuda] [--workloads mlp,cnn] [--no-compile]
        [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import workloads

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss

DAMPING = 1e-3


def curvlinops_ops(w, params, fisher):
    import curvlinops as cl
    from torch import nn

    names = [n for n, _ in w.module.named_parameters() if n in params]
    plist = [dict(w.module.named_parameters())[n] for n in names]
    kw = dict(
        check_deterministic=False,
        fisher_type=fisher,
        separate_weight_and_bias=False,
        num_data=w.x.shape[0],
        num_per_example_loss_terms=1,
    )
    data = [(w.x, w.y)]
    return cl, names, plist, lambda cls: cls(w.module, nn.CrossEntropyLoss(), plist, data, **kw)


def rel(a, b) -> float:
    la, lb = _tree.tree_leaves(a), _tree.tree_leaves(b)
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(la, lb, strict=True))
    den = sum(float(y.double().pow(2).sum()) for y in lb)
    return (num / max(den, 1e-300)) ** 0.5


def run(name: str, device: str, compile_: bool, repeat: int) -> tuple[list, list, list[str]]:
    w = workloads.WORKLOADS[name](device=device)
    loss = CrossEntropyLoss(w.y)
    params = w.params
    model_fn = w.model_fn
    v = _tree.random_like(params, torch.Generator().manual_seed(1))
    notes: list[str] = []

    def t(fn):
        return common.timeit(fn, device, repeat=repeat)

    def m(fn):
        return common.peak_memory(fn, device)

    K = hessfunc.kfac(model_fn, loss, params, w.x)
    E = hessfunc.ekfac(model_fn, loss, params, w.x)
    cl, names, plist, make = curvlinops_ops(w, {p[2:-2] for p in K.covered}, "type-2")
    notes.append(
        f"{name}: {len(K.layout.blocks)} blocks cover {len(K.covered)} of "
        f"{len(K.layout.paths)} leaves; uncovered: {', '.join(p for p, _ in K.uncovered) or '-'}"
    )
    vl = [v[n] for n in names]

    # agreement of the two libraries (type-2) and the distance to the exact product
    kop, eop = make(cl.KFACLinearOperator), make(cl.EKFACLinearOperator)
    mine_k, mine_e = K.matvec(v), E.matvec(v)
    notes.append(
        f"{name}: K v against curvlinops {rel([mine_k[n] for n in names], kop @ vl):.1e}, "
        f"E v {rel([mine_e[n] for n in names], eop @ vl):.1e} (relative, float32); against "
        f"the GGN: ||Kv - Gv|| / ||Gv|| = "
        f"{rel(mine_k, hessfunc.ggn_vp(model_fn, loss, params, v, w.x)):.2f}, EK-FAC "
        f"{rel(mine_e, hessfunc.ggn_vp(model_fn, loss, params, v, w.x)):.2f} on the covered "
        "and uncovered leaves together"
    )

    def ours_build(fisher, ek=False, chunk_size=None):
        fn = hessfunc.ekfac if ek else hessfunc.kfac
        kw = {"chunk_size": chunk_size}
        if fisher == "mc":
            kw.update(fisher="mc", generator=torch.Generator(device).manual_seed(0))
        return lambda: fn(model_fn, loss, params, w.x, **kw)

    def theirs_build(fisher, ek=False):
        _, _, _, mk = curvlinops_ops(w, set(names), fisher)

        def go():
            op = mk(cl.EKFACLinearOperator if ek else cl.KFACLinearOperator)
            op.compute_kronecker_factors()
            if ek:
                op.compute_eigenvalue_correction()
            return op

        return go

    rows = []
    for label, ours, theirs in (
        ("build K-FAC type-2", ours_build("type-2"), theirs_build("type-2")),
        (
            "build K-FAC type-2, chunk_size=1",
            ours_build("type-2", chunk_size=1),
            theirs_build("type-2"),
        ),  # noqa: E501
        (
            "build K-FAC type-2, chunk_size=10",
            ours_build("type-2", chunk_size=10),
            theirs_build("type-2"),
        ),
        ("build K-FAC mc (1 sample)", ours_build("mc"), theirs_build("mc")),
        ("build EK-FAC type-2", ours_build("type-2", True), theirs_build("type-2", True)),
    ):
        to, tt = t(ours), t(theirs)
        mo, mt = m(ours), m(theirs)
        rows.append([name, label, to * 1e3, tt * 1e3, to / tt, mem(mo), mem(mt), ratio(mo, mt)])

    inv = cl.KFACInverseLinearOperator(kop, damping=DAMPING, use_exact_damping=True)
    inv @ vl  # caches its eigendecompositions
    KE = K.eigendecompose()
    for label, ours, theirs in (
        ("K-FAC matvec", lambda: K.matvec(v), lambda: kop @ vl),
        ("EK-FAC matvec", lambda: E.matvec(v), lambda: eop @ vl),
        ("K-FAC solve (eigh each call)", lambda: K.solve(v, DAMPING), lambda: inv @ vl),
        ("K-FAC solve (eigendecomposed)", lambda: KE.solve(v, DAMPING), lambda: inv @ vl),
        ("EK-FAC solve", lambda: E.solve(v, DAMPING), None),
    ):
        to, mo = t(ours), m(ours)
        tt = t(theirs) if theirs is not None else float("nan")
        mt = m(theirs) if theirs is not None else None
        rows.append([name, label, to * 1e3, tt * 1e3, to / tt, mem(mo), mem(mt), ratio(mo, mt)])

    # against the exact product it approximates
    ggn = lambda: hessfunc.ggn_vp(model_fn, loss, params, v, w.x)  # noqa: E731
    t_ggn, m_ggn = t(ggn), m(ggn)
    exact = [
        [name, "hessfunc.ggn_vp (exact)", t_ggn * 1e3, 1.0, mem(m_ggn)],
        [name, "K-FAC matvec", t(lambda: K.matvec(v)) * 1e3, None, None],
        [name, "K-FAC build type-2", t(ours_build("type-2")) * 1e3, None, None],
        [name, "EK-FAC build type-2", t(ours_build("type-2", True)) * 1e3, None, None],
    ]
    for r in exact[1:]:
        r[3] = r[2] / exact[0][2]
    exact[1][4] = mem(m(lambda: K.matvec(v)))
    exact[2][4] = mem(m(ours_build("type-2")))
    exact[3][4] = mem(m(ours_build("type-2", True)))

    if compile_:
        for label, fn in (
            (
                "K-FAC build + matvec + solve",
                lambda p, x, y, v: _products(hessfunc.kfac, model_fn, p, x, y, v),
            ),  # noqa: E501
            (
                "EK-FAC build + matvec + solve",
                lambda p, x, y, v: _products(hessfunc.ekfac, model_fn, p, x, y, v),
            ),  # noqa: E501
        ):
            c = torch.compile(fn, fullgraph=True)
            t0 = time.perf_counter()
            got = c(params, w.x, w.y, v)
            first = time.perf_counter() - t0
            err = rel(got, fn(params, w.x, w.y, v))
            tc, te = t(lambda c=c: c(params, w.x, w.y, v)), t(lambda fn=fn: fn(params, w.x, w.y, v))
            exact.append(
                [name, f"compiled {label}", tc * 1e3, tc / t_ggn, f"eager {te * 1e3:.3g} ms"]
            )
            notes.append(
                f"{name}: compiled {label}: first call {first:.0f} s, relative error against "
                f"eager {err:.1e}"
            )
        cm = torch.compile(lambda v: K.matvec(v), fullgraph=True)
        cm(v)
        tcm = t(lambda: cm(v))
        exact.append([name, "compiled K-FAC matvec", tcm * 1e3, tcm / t_ggn, ""])
    return rows, exact, notes


def _products(fn, model_fn, p, x, y, v):
    op = fn(model_fn, CrossEntropyLoss(y), p, x)
    return op.matvec(v), op.solve(v, DAMPING)


def mem(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default="mlp,cnn")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    ap.add_argument("--note", default="", help="a line recorded with the results (e.g. load)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    rows, exact, notes = [], [], []
    for name in a.workloads.split(","):
        r, e, n = run(name, a.device, not a.no_compile, a.repeat)
        rows += r
        exact += e
        notes += n
        print(common.table(HEAD, r), flush=True)
        print(common.table(HEAD_EXACT, e), flush=True)
        print("\n".join(n), flush=True)
    body = (
        f"Machine: {common.machine(a.device)}, {a.threads} torch thread(s). {a.note}\n\n"
        "hessfunc against curvlinops (ratio < 1: hessfunc faster / smaller):\n\n"
        + common.table(HEAD, rows)
        + "\n\nAgainst the exact GGN-vector product of the same model (ratio: time / ggn_vp):\n\n"
        + common.table(HEAD_EXACT, exact)
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + f"\n\nWhole run: {time.perf_counter() - start:.0f} s.\n"
    )
    if a.record:
        common.record("bench_kfac.py: K-FAC and EK-FAC against curvlinops and ggn_vp", body)


HEAD = [
    "workload", "product", "hessfunc (ms)", "curvlinops (ms)", "time ratio",
    "hessfunc peak (MiB)", "curvlinops peak (MiB)", "memory ratio",
]  # fmt: skip
HEAD_EXACT = ["workload", "product", "time (ms)", "/ ggn_vp", "peak (MiB)"]

if __name__ == "__main__":
    main()
