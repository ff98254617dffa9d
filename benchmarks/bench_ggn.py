"""GGN-vector products against gradients and Hessian-vector products, eager and compiled.

Workloads (defined here; no shared workload module existed when this was written):
  mlp          784-512-512-10 MLP, batch 256, cross-entropy
  cnn          2 conv + linear on 1x28x28, batch 128, cross-entropy
  transformer  2-layer encoder (d=64, 4 heads, seq 32), batch 32, cross-entropy

For each: median wall time of torch.func.grad, hessfunc.ggn_vp and hessfunc.hvp, eager and
under torch.compile(fullgraph=True), and ratios against the gradient of the same run. Peak memory
is reported on CUDA (torch.cuda.max_memory_allocated); on CPU there is no sound allocator counter
(tracemalloc does not see torch's allocations), so it reads 'n/a on CPU'.

    python benchmarks/bench_ggn.py [--device cpu|cuda] [--dtype float32] [--repeats 20]
        [--workloads mlp,cnn,transformer] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import grad

import hessfunc
from hessfunc.losses import CrossEntropyLoss
from hessfunc.products.ggn import ggn_vp


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Transformer(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(1))


def workload(name: str, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        x = torch.randn(256, 784, generator=g)
    elif name == "cnn":
        model, x = CNN(), torch.randn(128, 1, 28, 28, generator=g)
    elif name == "transformer":
        model, x = Transformer(), torch.randint(0, 100, (32, 32), generator=g)
    else:
        raise KeyError(name)
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
    return model, x, y


def timed(fn, repeats: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak(fn, device: str) -> str:
    if device != "cuda":
        return "n/a on CPU"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB"


def run(name: str, args: argparse.Namespace) -> dict[str, object]:
    dtype = getattr(torch, args.dtype)
    model, x, y = workload(name, args.device, dtype)
    apply, params = hessfunc.from_module(model)
    v = {k: torch.randn_like(t) for k, t in params.items()}

    def loss_of(p, x, y):
        return CrossEntropyLoss(y)(apply(p, x))

    fns = {
        "grad": lambda p, v, x, y: grad(loss_of)(p, x, y),
        "ggn_vp": lambda p, v, x, y: ggn_vp(apply, CrossEntropyLoss(y), p, v, x),
        "hvp": lambda p, v, x, y: hessfunc.hvp(loss_of, p, v, x, y),
    }
    row: dict[str, object] = {"workload": name, "params": sum(t.numel() for t in params.values())}
    for key, fn in fns.items():
        row[f"{key} eager ms"] = 1e3 * timed(
            lambda fn=fn: fn(params, v, x, y), args.repeats, args.device
        )
        row[f"{key} peak"] = peak(lambda fn=fn: fn(params, v, x, y), args.device)
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            t0 = time.perf_counter()
            compiled(params, v, x, y)
            row[f"{key} compile s"] = time.perf_counter() - t0
            row[f"{key} compiled ms"] = 1e3 * timed(
                lambda c=compiled: c(params, v, x, y), args.repeats, args.device
            )
        print(f"  {name} {key}: done", flush=True)
    return row


def report(rows: list[dict[str, object]], compiled: bool) -> str:
    lines = [
        "| workload | params | grad eager ms | ggn_vp eager ms | hvp eager ms | ggn_vp/grad eager "
        "| ggn_vp/hvp eager |"
        + (
            " grad comp. ms | ggn_vp comp. ms | hvp comp. ms | "
            "ggn_vp/grad comp. | ggn_vp/hvp comp. |"
            if compiled
            else ""
        ),
        "|---" * (7 + (5 if compiled else 0)) + "|",
    ]
    for r in rows:
        cells = [
            r["workload"], f"{r['params']:,}",
            f"{r['grad eager ms']:.2f}", f"{r['ggn_vp eager ms']:.2f}", f"{r['hvp eager ms']:.2f}",
            f"{r['ggn_vp eager ms'] / r['grad eager ms']:.2f}",
            f"{r['ggn_vp eager ms'] / r['hvp eager ms']:.2f}",
        ]  # fmt: skip
        if compiled:
            cells += [
                f"{r['grad compiled ms']:.2f}", f"{r['ggn_vp compiled ms']:.2f}",
                f"{r['hvp compiled ms']:.2f}",
                f"{r['ggn_vp compiled ms'] / r['grad compiled ms']:.2f}",
                f"{r['ggn_vp compiled ms'] / r['hvp compiled ms']:.2f}",
            ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    lines.append("Peak memory (ggn_vp / grad / hvp): " + "; ".join(
        f"{r['workload']}: {r['ggn_vp peak']} / {r['grad peak']} / {r['hvp peak']}" for r in rows
    ))  # fmt: skip
    if compiled:
        lines.append("Compile time, s (grad / ggn_vp / hvp): " + "; ".join(
            f"{r['workload']}: {r['grad compile s']:.0f} / {r['ggn_vp compile s']:.0f} / "
            f"{r['hvp compile s']:.0f}" for r in rows
        ))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workloads", default="mlp,cnn,transformer")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads "
          f"{torch.get_num_threads()}", flush=True)  # fmt: skip
    rows = [run(w, args) for w in args.workloads.split(",")]
    print(report(rows, not args.no_compile))


if __name__ == "__main__":
    main()
