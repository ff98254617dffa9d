"""Time gradients, Hessian-vector products and dense Hessians against their baselines.

Run ``python benchmarks/bench_hvp.py [--device cuda] [--record]``. Every number is a ratio to a
baseline timed in the same run: HVPs against the gradient of the same workload (eager against
eager, compiled against compiled), dense Hessians against ``torch.autograd.functional.hessian``.
Compiled results are also checked against eager ones, since a compiled Hessian product can be
silently wrong (see the README's notes on torch.compile).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.func import grad, jacrev, jvp

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import workloads  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc import _tree  # noqa: E402


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


def products(w, device, compile_: bool, repeat: int):
    f, params, args = w.f, w.params, w.args
    v = _tree.random_like(params, torch.Generator().manual_seed(0))
    rows, notes = [], []
    t_grad = common.timeit(lambda: grad(f)(params, *args), device, repeat=repeat)
    eager = {
        "hvp fwd-rev": lambda: hessfunc.hvp(f, params, v, *args),
        "hvp rev-rev": lambda: hessfunc.hvp(f, params, v, *args, mode="rev-rev"),
        "hand-written jvp(jacrev(f))": lambda: jvp(lambda p: jacrev(f)(p, *args), (params,), (v,))[1],
        "autograd double backward": lambda: autograd_double_backward(f, params, v, args),
        "torch.autograd.functional.hvp": lambda: autograd_functional_hvp(f, params, v, args),
    }
    mem_grad = common.peak_memory(lambda: grad(f)(params, *args), device)
    rows.append([w.name, "gradient (eager)", t_grad * 1e3, 1.0, "-", mem_grad and 1.0 or "n/a"])
    for name, fn in eager.items():
        try:
            t = common.timeit(fn, device, repeat=repeat)
        except Exception as err:  # a baseline that cannot run this workload
            rows.append([w.name, name, "fails", "-", "-", "-"])
            notes.append(f"{w.name} / {name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        mem = common.peak_memory(fn, device)
        rows.append([w.name, name + " (eager)", t * 1e3, t / t_grad, "-", (mem / mem_grad) if mem and mem_grad else "n/a"])
    if compile_:
        torch._dynamo.reset()
        cg = torch.compile(lambda p, *a: grad(f)(p, *a), fullgraph=True)
        tc_grad = common.timeit(lambda: cg(params, *args), device, repeat=repeat)
        mem_cg = common.peak_memory(lambda: cg(params, *args), device)
        rows.append([w.name, "gradient (compiled)", tc_grad * 1e3, tc_grad / t_grad, 1.0, mem_cg and mem_cg / mem_grad or "n/a"])
        for mode in ("fwd-rev", "rev-rev"):
            ch = torch.compile(lambda p, v, *a, mode=mode: hessfunc.hvp(f, p, v, *a, mode=mode), fullgraph=True)
            err = max_rel_err(ch(params, v, *args), hessfunc.hvp(f, params, v, *args, mode=mode))
            t = common.timeit(lambda: ch(params, v, *args), device, repeat=repeat)
            mem = common.peak_memory(lambda: ch(params, v, *args), device)
            rows.append([w.name, f"hvp {mode} (compiled)", t * 1e3, t / t_grad, t / tc_grad, (mem / mem_grad) if mem and mem_grad else "n/a"])
            notes.append(f"{w.name} / compiled hvp {mode}: max relative error against eager {err:.1e}")
    return rows, notes


def dense(device, repeat: int):
    w = workloads.small_mlp(device=device)
    f, params, args = w.f, w.params, w.args
    flat, unravel = hessfunc.ravel(params)
    n = flat.numel()
    ref_fn = lambda z: f(unravel(z), *args)  # noqa: E731
    t_grad = common.timeit(lambda: grad(f)(params, *args), device, repeat=repeat)
    H = hessfunc.hessian_matrix(f, params, *args)
    rows = []
    base = {}
    for vec in (False, True):
        t = common.timeit(lambda vec=vec: torch.autograd.functional.hessian(ref_fn, flat, vectorize=vec), device, warmup=1, repeat=3, min_time=0)
        base[vec] = t
        rows.append([f"torch.autograd.functional.hessian(vectorize={vec})", t * 1e3, t / t_grad, 1.0 if not vec else t / base[False]])
    R = torch.autograd.functional.hessian(ref_fn, flat)
    for mode in ("fwd-rev", "rev-rev"):
        t = common.timeit(lambda mode=mode: hessfunc.hessian_matrix(f, params, *args, mode=mode), device, warmup=1, repeat=repeat)
        rows.append([f"hessfunc.hessian_matrix(mode={mode!r})", t * 1e3, t / t_grad, t / base[False]])
    err = ((H - R).abs().max() / R.abs().max()).item()
    text = common.table(["dense Hessian, n=%d" % n, "ms", "gradient times", "time / autograd.functional (default)"], rows)
    return text + f"\n\nhessian_matrix vs autograd.functional.hessian: max relative difference {err:.1e}.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default="mlp,cnn,transformer")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a line recorded with the results (e.g. machine load)")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows, notes = [], []
    for name in a.workloads.split(","):
        if not name:
            continue
        w = workloads.WORKLOADS[name](device=a.device)
        print(f"[{name}] {sum(t.numel() for t in w.params.values()):,} parameters", flush=True)
        r, n = products(w, a.device, not a.no_compile, a.repeat)
        rows += r
        notes += n
        print(common.table(["workload", "product", "ms", "/ eager grad", "/ compiled grad", "peak mem / grad"], r), flush=True)
    body = f"Machine: {common.machine(a.device)}. float32 products; {a.note}\n\n"
    if rows:
        body += common.table(["workload", "product", "ms", "/ eager grad", "/ compiled grad", "peak mem / grad"], rows)
        body += "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"
    if not a.no_dense:
        d = dense(a.device, a.repeat)
        print(d)
        body += "\n" + d
    if a.record:
        common.record(f"bench_hvp.py on {a.device}", body)


if __name__ == "__main__":
    main()
