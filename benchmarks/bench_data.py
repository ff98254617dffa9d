"""Dataset products: overhead against one product on the same data, and two gloo ranks vs one.

1. Overhead. For N examples, ``hessfunc.data.sum_over`` of a per-batch product over N / b
   pre-made batches of size b, against the same product on all N examples as one batch (both
   eager, same thread count). The ratio is hessfunc's loop plus the per-call overhead of b-sized
   products (smaller batches use the cores less well); the target is <= 1.05 once batches are
   large enough to be compute-bound. A DataLoader row shows what collation adds on top.
2. Processes. The same dataset product on one rank (one thread) and on two gloo ranks (one
   thread each, half the batches each, ``reduce=AllReduce()``); the ideal ratio is 0.5.

    python benchmarks/bench_data.py [--n 2048] [--width 256] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine, record, table  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc._base import _tree  # noqa: E402
from hessfunc.data import sum_over  # noqa: E402


def workload(n: int, width: int):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(784, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    )
    apply, params = hessfunc.from_module(net)
    X = torch.randn(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    v = _tree.random_like(params, g)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    products = {
        "grad": lambda X, y: torch.func.grad(f)(params, X, y),
        "hvp (fwd-rev)": lambda X, y: hessfunc.hvp(f, params, v, X, y),
        "hvp (rev-rev)": lambda X, y: hessfunc.hvp(f, params, v, X, y, mode="rev-rev"),
    }
    return params, X, y, products


def paired(a, b, rounds: int) -> tuple[float, float]:
    """Fastest of ``rounds`` timings of ``a`` and of ``b``, called alternately.

    On a shared machine the minimum is the least disturbed sample, and alternating the two
    spreads any burst of load over both.
    """
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def overhead(n: int, width: int, batch_sizes: list[int], rounds: int) -> list[list[object]]:
    params, X, y, products = workload(n, width)
    rows = []
    for name, product in products.items():
        for b in batch_sizes:
            batches = [(X[i : i + b], y[i : i + b]) for i in range(0, n, b)]
            whole, t = paired(
                lambda p=product: p(X, y), lambda p=product, d=batches: sum_over(p, d), rounds
            )
            rows.append([name, b, len(batches), whole * 1e3, t * 1e3, t / whole])
        b = max(batch_sizes)
        loader = DataLoader(TensorDataset(X, y), batch_size=b)
        whole, t = paired(
            lambda p=product: p(X, y), lambda p=product, d=loader: sum_over(p, d), rounds
        )
        rows.append([f"{name}, DataLoader", b, len(loader), whole * 1e3, t * 1e3, t / whole])
    # The loop alone: a product that costs nothing, so what is timed is hessfunc.data's own
    # work per batch (the call, the structure check, the in-place sum), on parameter-sized trees.
    b = min(batch_sizes)
    batches = [(X[i : i + b], y[i : i + b]) for i in range(0, n, b)]
    fixed = _tree.random_like(params)
    loop = min(timed_once(lambda: sum_over(lambda X, y: fixed, batches)) for _ in range(rounds))
    rows.append(["sum_over alone (no product)", b, len(batches), "-", loop * 1e3, "-"])
    return rows


def timed_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_rank(n: int, width: int, b: int, rounds: int) -> float:
    torch.set_num_threads(1)
    _, X, y, products = workload(n, width)
    batches = [(X[i : i + b], y[i : i + b]) for i in range(0, n, b)]
    product = products["hvp (fwd-rev)"]
    sum_over(product, batches)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sum_over(product, batches)
        times.append(time.perf_counter() - t0)
    return min(times)


def rank_main(rank: int, world: int, store: str, out: str, n: int, width: int, b: int, rounds: int):
    import torch.distributed as dist

    from hessfunc.distributed import AllReduce

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
        timeout=timedelta(seconds=300),
    )  # fmt: skip
    params, X, y, products = workload(n, width)
    mine = [(X[i : i + b], y[i : i + b]) for i in range(0, n, b)][rank::world]
    reduce = AllReduce()
    product = products["hvp (fwd-rev)"]
    flat = hessfunc.ravel(params)[0]

    def timed(fn) -> float:  # the same number of calls (and collectives) on every rank
        fn()
        times = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        return min(times)

    t = timed(lambda: sum_over(product, mine, reduce=reduce))
    t_reduce = timed(lambda: reduce(flat))
    times = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(times, torch.tensor([t, t_reduce]))
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump([x.tolist() for x in times], fh)


def two_ranks(n: int, width: int, b: int, rounds: int) -> tuple[float, float]:
    tmp = tempfile.mkdtemp()
    store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(a) for a in (n, width, b, rounds)]
    procs = [
        subprocess.Popen([sys.executable, __file__, "--rank", str(r), store, out, *args], env=env)
        for r in range(2)
    ]
    for p in procs:
        p.wait(timeout=600)
    with open(out) as fh:
        times = json.load(fh)
    return max(t[0] for t in times), max(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1024,512,256,64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dist-batch", type=int, default=256)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--rank", type=int)
    args, rest = parser.parse_known_args()
    if args.rank is not None:
        store, out, n, width, b, rounds = rest
        rank_main(args.rank, 2, store, out, int(n), int(width), int(b), int(rounds))
        return
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    # One intra-op thread throughout: on a shared machine, OpenMP threads waiting for a core
    # that another job holds make every call slower by a per-call constant (seen here: 220 ms
    # per gradient with 2 threads under load, 20 ms with 1), which swamps what is measured.
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    start = time.perf_counter()
    rows = overhead(args.n, args.width, sizes, args.rounds)
    header = ["product", "batch", "batches", "one batch of N (ms)", "sum_over (ms)", "ratio"]
    text = table(header, rows)
    print(text)
    b = args.dist_batch
    t1 = one_rank(args.n, args.width, b, args.rounds)
    t2, t_reduce = two_ranks(args.n, args.width, b, args.rounds)
    dist_rows = [
        ["1 rank, 1 thread", t1 * 1e3, 1.0],
        ["2 gloo ranks, 1 thread each", t2 * 1e3, t2 / t1],
    ]
    dist_text = table(["setting", "hvp over N (ms)", "ratio to 1 rank"], dist_rows)
    dist_text += f"\n\nOne AllReduce of the parameter-sized buffer: {t_reduce * 1e3:.2f} ms."
    print(dist_text)
    elapsed = time.perf_counter() - start
    body = (
        f"Machine: {machine('cpu')}; load average {load:.1f} at the start (the cores are shared).\n"
        f"`python benchmarks/bench_data.py --n {args.n} --width {args.width}`: MLP 784-{args.width}"
        f"-10, cross-entropy summed, float32, N = {args.n}, eager, {threads} "
        f"thread(s), fastest of {args.rounds} alternating calls; {elapsed:.0f} s in all.\n\n"
        f"{text}\n\nTwo processes (gloo, one thread each) against one, batches of {b}, "
        f"fwd-rev hvp, `sum_over(..., reduce=AllReduce())`, fastest of {args.rounds} calls "
        "between barriers:\n\n"
        f"{dist_text}\n"
    )
    if args.record:
        record("bench_data.py: dataset products and two gloo ranks", body)


if __name__ == "__main__":
    main()
