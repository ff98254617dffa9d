"""Time gradients, Hessian-vector products and dense Hessians against their baselines.

Run ``python benchmarks/bench_hvp.py [--device cuda] [--record]``. Every number is a ratio to a
baseline timed in the same run: HVPs against the gradient of the same workload (eager against
eager, compiled against compiled), dense Hessians against ``torch.autograd.functional.hessian``.
Compiled results are also checked against eager ones, since a compiled Hessian product can be
silently wrong (see the README's notes on torch.compile).

With ``--jax`` (and JAX importable; otherwise a note is printed and JAX is skipped) the same
workloads run in JAX too, written by hand in ``bench_jax.py`` with the same shapes and float32
weights. Each JAX forward is checked against torch's logits first (asserted below 1e-4 on CPU),
and JAX's HVP and GGN product against hessfunc's along the same direction; then the compiled
hessfunc products are reported as ratios to the jitted JAX ones. ``benchmarks/gpu_run.sh`` runs the
GPU comparison in one command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--jax" in sys.argv:
    # Two libraries in one process share whichever cuDNN/cuBLAS was loaded first, and JAX checks
    # that its runtime cuDNN is not older than the one it was built with (jax#19004). JAX's
    # wheels usually pin the newer one and cuDNN is backward compatible, so start JAX's backends
    # before torch loads its CUDA libraries. Preallocation off: torch's peak memory is measured.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax

        jax.devices()
    except Exception:  # reported later by bench_jax, which retries the import
        pass

import torch  # noqa: E402
from torch.func import grad, jacrev, jvp  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_jax  # noqa: E402
import common  # noqa: E402
import workloads  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc._base import _context, _tree  # noqa: E402
from hessfunc.losses import CrossEntropyLoss  # noqa: E402
from hessfunc.products.ggn import ggn_vp  # noqa: E402


class _Rows(list):
    """Table rows that are also printed as they arrive, so a run cut short still shows them."""

    def append(self, row) -> None:
        super().append(row)
        print(
            "  " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in row),
            flush=True,
        )


class Budget:
    """Wall-clock budget for the optional parts of a run (``None``: unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def parse_workloads(spec: str) -> list[tuple[str, int | None]]:
    """``"mlp,cnn:1024"`` -> ``[("mlp", None), ("cnn", 1024)]`` (``None``: the default batch)."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, batch = item.partition(":")
        if name not in workloads.WORKLOADS:
            raise SystemExit(
                f"unknown workload {name!r}; choose from {sorted(workloads.WORKLOADS)}"
            )
        out.append((name, int(batch) if batch else None))
    return out


PROFILE_HEADER = [
    "product",
    "wall ms (profiled)",
    "device busy ms",
    "busy / wall",
    "kernels per call",
]


def profile_products(label: str, fns: dict, device: str, calls: int = 5):
    """Rows of kernel count and device time per call of each compiled product; top-op tables.

    On CUDA the ratio of device-busy time to wall time says whether a product is bound by kernel
    launches (low) or by the kernels themselves (near 1); the top kernels say which ops cost.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, tops = [], []
    for name, fn in fns.items():
        fn()
        common.sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(calls):
                fn()
            common.sync(device)
        wall = (time.perf_counter() - t0) / calls
        ev = prof.key_averages()
        dev = [e for e in ev if e.device_type == DeviceType.CUDA]
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in dev) / calls / 1e3  # ms
        n_kernels = sum(e.count for e in dev) / calls
        if not cuda:  # the CPU profile has no device events; only the wall time means anything
            busy = n_kernels = "n/a"
        rows.append(
            [
                f"{label} / {name}",
                wall * 1e3,
                busy,
                busy / (wall * 1e3) if cuda else "n/a",
                n_kernels,
            ]
        )
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        tops.append(f"## {label} / {name}\n\n```\n{ev.table(sort_by=key, row_limit=15)}\n```")
    return rows, "\n\n".join(tops)


def traced_forward_over_reverse(f, params, v, *args):
    """``jvp`` of the ``jacrev`` gradient inside hessfunc's second-order context."""
    grad_fn = jacrev(f)
    with _context.second_order_kernels():
        return jvp(lambda p: grad_fn(p, *args), (params,), (v,))[1]


def autograd_double_backward(f, params, v, args):
    leaves, spec = _tree.tree_flatten(params)
    leaves = [p.detach().requires_grad_(True) for p in leaves]
    out = f(_tree.tree_unflatten(spec, leaves), *args)
    g = torch.autograd.grad(out, leaves, create_graph=True)
    return torch.autograd.grad(g, leaves, _tree.tree_leaves(v))


def autograd_functional_hvp(f, params, v, args):
    leaves, spec = _tree.tree_flatten(params)
    fn = lambda *ls: f(_tree.tree_unflatten(spec, list(ls)), *args)  # noqa: E731
    return torch.autograd.functional.hvp(fn, tuple(leaves), tuple(_tree.tree_leaves(v)))[1]


def max_rel_err(a, b) -> float:
    fa, fb = hessfunc.ravel(a)[0], hessfunc.ravel(b)[0]
    return ((fa - fb).abs().max() / fb.abs().max().clamp_min(1e-30)).item()


def products(w, device, compile_: bool, repeat: int, modes=("fwd-rev", "rev-rev"), budget=None):
    """Rows of the product table, notes, and the raw numbers the JAX comparison needs.

    ``stats`` holds seconds (``grad``, ``grad_c``, ``hvp_c``, ``ggn_c``: eager and compiled
    gradient, compiled fwd-rev HVP and GGN product) and peak bytes (``mem_*``, CUDA only).
    """
    budget = budget or Budget(None)
    f, params, args = w.f, w.params, w.args
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    loss = CrossEntropyLoss(w.y)
    rows, notes = _Rows(), []
    t_grad = common.timeit(lambda: grad(f)(params, *args), device, repeat=repeat)
    eager = {
        "hvp fwd-rev": lambda: hessfunc.hvp(f, params, v, *args),
        "hvp rev-rev": lambda: hessfunc.hvp(f, params, v, *args, mode="rev-rev"),
        "ggn_vp fwd-rev": lambda: ggn_vp(w.model_fn, loss, params, v, w.x),
        "hand-written jvp(jacrev(f))": lambda: jvp(lambda p: jacrev(f)(p, *args), (params,), (v,))[
            1
        ],
        "autograd double backward": lambda: autograd_double_backward(f, params, v, args),
        "torch.autograd.functional.hvp": lambda: autograd_functional_hvp(f, params, v, args),
    }
    mem_grad = common.peak_memory(lambda: grad(f)(params, *args), device)
    stats = {"grad": t_grad, "mem_grad": mem_grad, "v": v}
    rows.append([w.name, "gradient (eager)", t_grad * 1e3, 1.0, "-", mem_grad and 1.0 or "n/a"])
    for name, fn in eager.items():
        try:
            t = common.timeit(fn, device, repeat=repeat)
        except Exception as err:  # a baseline that cannot run this workload
            rows.append([w.name, name, "fails", "-", "-", "-"])
            notes.append(
                f"{w.name} / {name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            )
            continue
        mem = common.peak_memory(fn, device)
        rows.append([w.name, name + " (eager)", t * 1e3, t / t_grad, "-", ratio(mem, mem_grad)])
    if compile_:
        torch._dynamo.reset()
        cg = torch.compile(lambda p, *a: grad(f)(p, *a), fullgraph=True)
        tc_grad = common.timeit(lambda: cg(params, *args), device, repeat=repeat)
        mem_cg = common.peak_memory(lambda: cg(params, *args), device)
        stats.update(grad_c=tc_grad, mem_grad_c=mem_cg)
        rows.append(
            [
                w.name,
                "gradient (compiled)",
                tc_grad * 1e3,
                tc_grad / t_grad,
                1.0,
                ratio(mem_cg, mem_grad),
            ]
        )

        def hvp_pair(mode):
            return (
                torch.compile(
                    lambda p, v, *a: hessfunc.hvp(f, p, v, *a, mode=mode), fullgraph=True
                ),
                lambda: hessfunc.hvp(f, params, v, *args, mode=mode),
            )

        # built lazily, in order of importance, so a time budget drops the least useful last
        compiled = {f"hvp {modes[0]}": lambda: hvp_pair(modes[0])}
        compiled["ggn_vp fwd-rev"] = lambda: (
            torch.compile(lambda p, v, *a: ggn_vp(w.model_fn, loss, p, v, w.x), fullgraph=True),
            lambda: ggn_vp(w.model_fn, loss, params, v, w.x),
        )
        for mode in modes[1:]:
            compiled[f"hvp {mode}"] = lambda mode=mode: hvp_pair(mode)
        # what a compiled fwd-rev HVP traced before every Hessian product was traced
        # reverse-over-reverse under compile (hessfunc._base._context.traced_mode): the cost the
        # rule saves or adds, and whether inductor gets this workload right
        compiled["hvp traced forward-over-reverse (before)"] = lambda: (
            torch.compile(
                lambda p, v, *a: traced_forward_over_reverse(f, p, v, *a), fullgraph=True
            ),
            lambda: hessfunc.hvp(f, params, v, *args),
        )
        essential = 2
        for i, (name, make) in enumerate(compiled.items()):
            if i >= essential and budget.spent():
                notes.append(f"{w.name} / compiled {name}: skipped, time budget spent")
                continue
            ch, ref = make()
            t0 = time.perf_counter()
            try:
                out = ch(params, v, *args)
            except Exception as err:  # keep the rest of the run; the note says what broke
                rows.append([w.name, f"{name} (compiled)", "fails", "-", "-", "-"])
                msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
                notes.append(f"{w.name} / compiled {name}: {type(err).__name__}: {msg}")
                continue
            compile_s = time.perf_counter() - t0
            err = max_rel_err(out, ref())
            t = common.timeit(lambda ch=ch: ch(params, v, *args), device, repeat=repeat)
            mem = common.peak_memory(lambda ch=ch: ch(params, v, *args), device)
            rows.append(
                [
                    w.name,
                    f"{name} (compiled)",
                    t * 1e3,
                    t / t_grad,
                    t / tc_grad,
                    ratio(mem, mem_cg),
                ]
            )
            notes.append(
                f"{w.name} / compiled {name}: first call {compile_s:.0f} s; "
                f"max relative error against eager {err:.1e}"
            )
            key = "hvp_c" if name == "hvp fwd-rev" else "ggn_c" if name.startswith("ggn") else None
            if key:
                stats.update({key: t, f"mem_{key}": mem})
            stats.setdefault("compiled", {})[name] = lambda ch=ch: ch(params, v, *args)
        stats["compiled"] = {"gradient": lambda: cg(params, *args), **stats.get("compiled", {})}
    return rows, notes, stats


def ratio(a, b):
    return a / b if a and b else "n/a"


def jax_compare(w, device, stats, repeat: int):
    """The JAX products on the same workload, checked against hessfunc's, as one table row."""
    v = stats["v"]
    r = bench_jax.run(w, device, v, repeat, check_tol=1e-4 if device == "cpu" else None)
    hv = hessfunc.hvp(w.f, w.params, v, *w.args)
    gv = ggn_vp(w.model_fn, CrossEntropyLoss(w.y), w.params, v, w.x)
    err_h = bench_jax.max_rel_err(r["hvp_v"], hv)
    err_g = bench_jax.max_rel_err(r["ggn_v"], gv)
    print(
        f"[{w.name}] JAX vs hessfunc: HVP rel. err {err_h:.1e}, GGN rel. err {err_g:.1e}",
        flush=True,
    )
    g_c, h_c, n_c = (stats.get(k, float("nan")) for k in ("grad_c", "hvp_c", "ggn_c"))
    row = [
        w.name,
        h_c / g_c,
        n_c / g_c,
        h_c / r["hvp"],
        n_c / r["ggn"],
        r["hvp"] / r["grad"],
        r["ggn"] / r["grad"],
        ratio(stats.get("mem_hvp_c"), stats.get("mem_grad_c")),
        ratio(stats.get("mem_ggn_c"), stats.get("mem_grad_c")),
        f"{r['forward_diff']:.1e}",
        f"{err_h:.1e}",
        f"{err_g:.1e}",
    ]
    note = (
        f"{w.name}: ms torch compiled grad / hvp / ggn_vp {g_c * 1e3:.3g} / {h_c * 1e3:.3g} / "
        f"{n_c * 1e3:.3g}; JAX jitted grad / hvp / ggn {r['grad'] * 1e3:.3g} / "
        f"{r['hvp'] * 1e3:.3g} / {r['ggn'] * 1e3:.3g}; JAX compile s "
        f"{r['compile_grad']:.1f} / {r['compile_hvp']:.1f} / {r['compile_ggn']:.1f}"
    )
    return row, note


JAX_HEADER = [
    "workload",
    "torch hvp / grad",
    "torch ggn_vp / grad",
    "hessfunc hvp / JAX hvp",
    "hessfunc ggn_vp / JAX ggn",
    "JAX hvp / grad",
    "JAX ggn / grad",
    "torch hvp mem / grad mem",
    "torch ggn_vp mem / grad mem",
    "JAX forward max abs diff",
    "JAX vs hessfunc HVP rel. err",
    "JAX vs hessfunc GGN rel. err",
]


def dense(device, repeat: int, batch: int, compile_: bool):
    w = workloads.small_mlp(device=device, batch=batch)
    f, params, args = w.f, w.params, w.args
    flat, unravel = hessfunc.ravel(params)
    n = flat.numel()
    ref_fn = lambda z: f(unravel(z), *args)  # noqa: E731
    t_grad = common.timeit(lambda: grad(f)(params, *args), device, repeat=repeat)
    H = hessfunc.hessian_matrix(f, params, *args)
    rows = []
    base = {}
    for vec in (False, True):
        t = common.timeit(
            lambda vec=vec: torch.autograd.functional.hessian(ref_fn, flat, vectorize=vec),
            device,
            warmup=1,
            repeat=3,
            min_time=0,
        )
        base[vec] = t
        rows.append(
            [
                f"torch.autograd.functional.hessian(vectorize={vec})",
                t * 1e3,
                t / t_grad,
                1.0 if not vec else base[False] / t,
            ]
        )
    R = torch.autograd.functional.hessian(ref_fn, flat)
    candidates = {}
    for mode in ("fwd-rev", "rev-rev"):
        candidates[f"hessfunc.hessian_matrix(mode={mode!r})"] = lambda mode=mode: (
            hessfunc.hessian_matrix(f, params, *args, mode=mode)
        )
    if compile_:
        # under compile the memory guard needs an explicit budget (free memory is not traceable)
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda p, *a: hessfunc.hessian_matrix(f, p, *a, max_bytes=2**34), fullgraph=True
        )
        compiled(params, *args)
        candidates["hessfunc.hessian_matrix, compiled"] = lambda: compiled(params, *args)
    errs = []
    for name, fn in candidates.items():
        t = common.timeit(fn, device, warmup=1, repeat=repeat)
        rows.append([name, t * 1e3, t / t_grad, base[False] / t])
        errs.append(((fn() - R).abs().max() / R.abs().max()).item())
    text = common.table(
        [
            f"dense Hessian, n={n}, batch {batch}",
            "ms",
            "eager gradient times",
            "speed-up over autograd.functional (default)",
        ],
        rows,
    )
    return (
        text
        + "\n\nhessian_matrix vs autograd.functional.hessian: max relative difference "
        + f"{max(errs):.1e}.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--workloads",
        default="mlp,cnn,transformer",
        help="comma-separated names, each optionally with a batch size, e.g. mlp:4096,cnn",
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument(
        "--jax",
        action="store_true",
        help="also run the workloads in JAX (hand-written, same weights) and compare",
    )
    ap.add_argument(
        "--hvp-modes",
        default=None,
        help="compiled hvp modes (default fwd-rev,rev-rev; fwd-rev only with --jax, to keep "
        "compile time down)",
    )
    ap.add_argument(
        "--jax-precision",
        default="highest",
        choices=["default", "high", "highest"],
        help="jax_default_matmul_precision (highest = full float32, as torch's default matmul)",
    )
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 in torch matmuls and cuDNN convolutions (default: off on CUDA, so torch "
        "computes in full float32 like JAX at precision 'highest')",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="after this many seconds, start nothing optional: later workloads, extra hvp "
        "modes, profiles and the dense Hessian are skipped (a started workload still gets its "
        "gradient, fwd-rev hvp and ggn_vp)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="profile the compiled products of each workload: kernel counts and device-busy time "
        "go into the results, each product's top ops into FILE",
    )
    ap.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    ap.add_argument("--note", default="", help="a line recorded with the results (e.g. load)")
    a = ap.parse_args()
    start = time.perf_counter()
    budget = Budget(a.budget_s)
    torch.manual_seed(0)
    if str(a.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    modes = tuple((a.hvp_modes or ("fwd-rev" if a.jax else "fwd-rev,rev-rev")).split(","))
    use_jax = a.jax
    if use_jax and bench_jax.jax is None:
        print(
            f"note: --jax given but JAX cannot be imported ({bench_jax.JAX_ERROR}); skipping JAX."
        )
        use_jax = False
    if use_jax:
        bench_jax.jax.config.update("jax_default_matmul_precision", a.jax_precision)
        try:
            bench_jax.jax_device(a.device)
        except RuntimeError as err:
            print(f"note: skipping JAX: {err}")
            use_jax = False
    header = ["workload", "product", "ms", "/ eager grad", "/ compiled grad", "peak mem / grad"]
    rows, notes, jax_rows, jax_notes, profiles = [], [], [], [], []
    dense_parts = []
    try:  # an interrupt (e.g. the run's time limit) still records what was measured
        for i, (name, batch) in enumerate(parse_workloads(a.workloads)):
            if i and budget.spent():
                notes.append(f"{name} (batch {batch or 'default'}): skipped, time budget spent")
                print(notes[-1], flush=True)
                continue
            kw = {} if batch is None else {"batch": batch}
            w = workloads.WORKLOADS[name](device=a.device, **kw)
            label = f"{name} (batch {w.x.shape[0]})"
            n_params = sum(t.numel() for t in w.params.values())
            print(
                f"[{label}] {n_params:,} parameters, {time.perf_counter() - start:.0f} s in",
                flush=True,
            )
            w = w._replace(name=label)
            r, n, stats = products(w, a.device, not a.no_compile, a.repeat, modes, budget)
            rows += r
            notes += n
            print(common.table(header, r), flush=True)
            print("\n".join(n), flush=True)
            if a.profile and stats.get("compiled") and not budget.spent():
                prow, detail = profile_products(label, stats["compiled"], a.device)
                profiles += prow
                print(common.table(PROFILE_HEADER, prow), flush=True)
                with open(a.profile, "a") as fh:
                    fh.write(detail + "\n\n")
            if use_jax:
                try:
                    jr, jn = jax_compare(w, a.device, stats, a.repeat)
                except AssertionError:  # the JAX model is not torch's: stop, timing it is pointless
                    raise
                except Exception as err:  # e.g. a CUDA library clash; keep the torch results
                    msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                    print(f"[{w.name}] JAX failed: {msg}", flush=True)
                    jr = [w.name] + ["JAX failed"] + ["-"] * (len(JAX_HEADER) - 2)
                    jn = f"{w.name}: JAX failed: {msg}"
                jax_rows.append(jr)
                jax_notes.append(jn)
                print(common.table(JAX_HEADER, [jr]), "\n" + jn, flush=True)
        if not a.no_dense:
            for b in (8, 64):
                if budget.spent():
                    dense_parts.append(f"Dense Hessian at batch {b}: skipped, time budget spent.\n")
                    continue
                try:
                    dense_parts.append(dense(a.device, a.repeat, b, not a.no_compile))
                except Exception as err:  # keep the product tables of the run
                    dense_parts.append(f"Dense Hessian at batch {b}: {type(err).__name__}: {err}\n")
                print(dense_parts[-1], flush=True)
    except KeyboardInterrupt:
        notes.append(f"interrupted after {time.perf_counter() - start:.0f} s; later parts not run")
        print(notes[-1], flush=True)
    versions = "JAX not run"
    if use_jax:
        versions = f"{bench_jax.versions()}, JAX matmul precision {a.jax_precision!r}"
    if str(a.device).startswith("cuda"):
        versions += (
            f"; torch TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN conv {torch.backends.cudnn.allow_tf32}"
        )
    body = f"Machine: {common.machine(a.device)}. {versions}. float32 products. {a.note}\n\n"
    if rows:
        body += common.table(header, rows)
        body += "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"
    if jax_rows:
        jt = common.table(JAX_HEADER, jax_rows)
        print(jt)
        body += (
            "\n### Against JAX (jitted, same architectures and float32 weights)\n\n"
            "Torch columns are compiled hessfunc products over the compiled torch.func gradient "
            "(fwd-rev); memory is peak CUDA bytes of the product over the gradient's. "
            "JAX rows: jax.jvp(jax.grad) for the HVP; jvp inside vjp with the closed-form "
            "softmax cross-entropy output Hessian for the GGN product.\n\n"
            + jt
            + "\n\n"
            + "\n".join(f"- {x}" for x in jax_notes)
            + "\n"
        )
    if profiles:
        body += (
            "\n### Profiles of the compiled products\n\n"
            "Device busy = summed kernel time per call; busy / wall near 1 means the kernels "
            "bound the time, far below 1 that launches and host overhead do.\n\n"
            + common.table(PROFILE_HEADER, profiles)
            + "\n"
        )
    if dense_parts:
        body += "\n" + "\n".join(dense_parts)
    elapsed = time.perf_counter() - start
    body += f"\nWhole run: {elapsed:.0f} s.\n"
    print(f"whole run: {elapsed:.0f} s", flush=True)
    if a.record:
        title = f"bench_hvp.py on {a.device}" + (" with JAX" if use_jax else "")
        common.record(title, body)


if __name__ == "__main__":
    main()
