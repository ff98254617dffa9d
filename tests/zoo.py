"""A problem zoo shared by the tests: models x losses x dtypes, each as ``(f, params, args)``.

Every case is a deterministic function of its seed and dtype. ``f(params, *args)`` is a scalar
loss; ``params`` is a dict from ``hessfunc.from_module`` (or a hand-built pytree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import hessfunc


class Case(NamedTuple):
    f: Callable[..., torch.Tensor]
    params: Any
    args: tuple
    model: nn.Module | None = None


ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "softplus": nn.Softplus}


def mlp(widths=(4, 6, 3), act: str = "tanh", dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.bn(self.conv1(x))), 2)  # 8x8 -> 4x4
        x = F.avg_pool2d(F.gelu(self.conv2(x)), 1)
        return self.head(x.flatten(1))


def cnn(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = SmallCNN().to(dtype)
    with torch.no_grad():  # non-trivial running statistics for eval-mode BatchNorm
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


class TinyTransformer(nn.Module):
    """Embedding -> TransformerEncoderLayer (LayerNorm, nn.MultiheadAttention) -> SDPA head."""

    def __init__(self, vocab: int = 7, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.q = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(tokens))
        q = self.q(h).unsqueeze(1)
        a = F.scaled_dot_product_attention(q, h.unsqueeze(1), h.unsqueeze(1)).squeeze(1)
        return self.head(a.mean(1))


def transformer(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyTransformer().to(dtype).eval()


def _regression_target(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out.shape, generator=g, dtype=out.dtype)


def make_loss(
    name: str, out_shape: tuple[int, int], dtype, seed: int = 1
) -> tuple[Callable, tuple]:
    """``(loss(out, *targets), targets)`` for a named loss on logits of ``out_shape = (N, C)``."""
    g = torch.Generator().manual_seed(seed)
    N, C = out_shape
    y = torch.randn(out_shape, generator=g, dtype=dtype)
    labels = torch.randint(0, C, (N,), generator=g)
    probs = torch.softmax(torch.randn(out_shape, generator=g, dtype=dtype), -1)
    pos = torch.rand(out_shape, generator=g, dtype=dtype) * 3
    var = torch.rand(out_shape, generator=g, dtype=dtype) + 0.5
    table: dict[str, tuple[Callable, tuple]] = {
        "mse": (lambda o, y: F.mse_loss(o, y), (y,)),
        "l1": (lambda o, y: F.l1_loss(o, y), (y,)),
        "smooth_l1": (lambda o, y: F.smooth_l1_loss(o, y, beta=0.5), (y,)),
        "huber": (lambda o, y: F.huber_loss(o, y, delta=0.7), (y,)),
        "ce": (lambda o, t: F.cross_entropy(o, t), (labels,)),
        "ce_probs": (lambda o, t: F.cross_entropy(o, t), (probs,)),
        "ce_smooth": (lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), (labels,)),
        "nll": (lambda o, t: F.nll_loss(F.log_softmax(o, -1), t), (labels,)),
        "bce_logits": (lambda o, t: F.binary_cross_entropy_with_logits(o, t), (probs,)),
        "kl_div": (lambda o, t: F.kl_div(F.log_softmax(o, -1), t, reduction="batchmean"), (probs,)),
        "gaussian_nll": (lambda o, y, v: F.gaussian_nll_loss(o, y, v), (y, var)),
        "poisson_nll": (lambda o, t: F.poisson_nll_loss(o, t), (pos,)),
        "hand_written": (lambda o, y: (torch.log(torch.cosh(o - y))).sum() / N, (y,)),
    }
    return table[name]


LOSSES = (
    "mse",
    "l1",
    "smooth_l1",
    "huber",
    "ce",
    "ce_probs",
    "ce_smooth",
    "nll",
    "bce_logits",
    "kl_div",
    "gaussian_nll",
    "poisson_nll",
    "hand_written",
)


def _inputs(model_name: str, n: int, dtype, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model_name.startswith("mlp"):
        return torch.randn(n, 4, generator=g, dtype=dtype)
    if model_name == "cnn":
        return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    if model_name == "transformer":
        return torch.randint(0, 7, (n, 5), generator=g)
    raise KeyError(model_name)


def build_model(name: str, dtype) -> nn.Module:
    if name.startswith("mlp"):
        return mlp((4, 6, 3), act=name.split("-")[1], dtype=dtype)
    return {"cnn": cnn, "transformer": transformer}[name](dtype=dtype)


MODELS = ("mlp-tanh", "mlp-gelu", "mlp-relu", "mlp-softplus", "cnn", "transformer")


def case(model_name: str, loss_name: str = "ce", dtype=torch.float64, n: int = 4) -> Case:
    model = build_model(model_name, dtype)
    apply, params = hessfunc.from_module(model)
    x = _inputs(model_name, n, dtype)
    loss, targets = make_loss(loss_name, (n, 3), dtype)

    def f(p, x, *targets):
        return loss(apply(p, x), *targets)

    return Case(f, params, (x, *targets), model)


def raveled_reference(f, params, *args) -> torch.Tensor:
    """Dense Hessian by ``torch.autograd.functional.hessian`` on the raveled parameters."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flat, unravel = hessfunc.ravel(params)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        return torch.autograd.functional.hessian(lambda z: f(unravel(z), *args), flat)
