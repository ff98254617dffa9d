"""Benchmark workloads shared by the scripts in this folder.

Each builder returns a ``Workload``: ``f(params, *args) -> scalar`` with its ``params`` and
``args``, plus the model function and loss split for Gauss-Newton products. Shapes are fixed so
runs on different machines (and in JAX) compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import hessfunc


class Workload(NamedTuple):
    name: str
    f: Callable[..., torch.Tensor]
    params: Any
    args: tuple
    model_fn: Callable[..., torch.Tensor]  # model_fn(params, x) -> logits
    x: torch.Tensor
    y: torch.Tensor
    module: nn.Module


def _finish(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Workload:
    apply, params = hessfunc.from_module(module)

    def model_fn(p, x):
        return apply(p, x)

    def f(p, x, y):
        return F.cross_entropy(apply(p, x), y)

    return Workload(name, f, params, (x, y), model_fn, x, y, module)


def mlp(device="cpu", dtype=torch.float32, batch=256, seed=0) -> Workload:
    """784-512-512-10 tanh MLP, batch 256, cross-entropy (669,706 parameters)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    m = m.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 784, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return _finish("mlp", m, x, y)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.gelu(self.bn(self.c1(x))), 2)
        x = F.max_pool2d(F.gelu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def cnn(device="cpu", dtype=torch.float32, batch=64, seed=0) -> Workload:
    """Conv(1->16)-BN(eval)-GELU-pool-Conv(16->32)-GELU-pool-Linear on 28x28, batch 64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = SmallCNN().to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 1, 28, 28, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return _finish("cnn", m, x, y)


class SmallTransformer(nn.Module):
    def __init__(self, vocab=1000, d=128, heads=4, layers=2, classes=10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(64, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.enc(h)).mean(1))


def transformer(device="cpu", dtype=torch.float32, batch=32, seq=64, seed=0) -> Workload:
    """2-layer encoder (d=128, 4 heads, GELU, LayerNorm, MHA), sequence 64, batch 32."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = SmallTransformer().to(device=device, dtype=dtype).eval()
    x = torch.randint(0, 1000, (batch, seq), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return _finish("transformer", m, x, y)


def small_mlp(device="cpu", dtype=torch.float64, batch=64, widths=(10, 32, 32, 1), seed=0) -> Workload:
    """10-32-32-1 tanh MLP with MSE (1,441 parameters): the dense-Hessian workload."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    m = nn.Sequential(*layers).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, widths[0], generator=g, dtype=dtype).to(device)
    y = torch.randn(batch, widths[-1], generator=g, dtype=dtype).to(device)
    apply, params = hessfunc.from_module(m)

    def f(p, x, y):
        return F.mse_loss(apply(p, x), y)

    return Workload("small_mlp", f, params, (x, y), lambda p, x: apply(p, x), x, y, m)


WORKLOADS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
