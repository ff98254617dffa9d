"""Architectures for the compile-correctness zoo, written the ways people write them.

Every architecture maps a batch ``x`` to logits of shape ``(B, C)`` (or ``(B * L, C)`` for the
token models) and is built twice from one seed, in float64 (the reference) and in float32 (what
is compiled). The inputs are 3-D ``(B, L, D)`` sequences, 4-D ``(B, C, H, W)`` images or 2-D
token ids; attention layers work on 4-D multi-head tensors ``(B, heads, L, D / heads)`` where
they have heads. The sizes (``L = 10``, ``D = 8``) are not multiples of every vector width, so
vectorised code meets its tail loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

B, L, D, C, HEADS = 2, 10, 8, 3, 2


def _rms(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class NormAttention(nn.Module):
    """Linear -> norm -> projection-free self-attention -> (residual, GELU) -> pooled head."""

    def __init__(self, norm: str, residual: bool = False, gelu: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.norm_kind = norm
        self.norm = {"layer": nn.LayerNorm(D), "rms": nn.RMSNorm(D)}.get(norm, nn.Identity())
        self.residual, self.gelu = residual, gelu
        self.mlp = nn.Linear(D, D) if gelu else nn.Identity()
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        if self.norm_kind == "hand_rms":
            h = _rms(z)
        elif self.norm_kind == "normalize":
            h = F.normalize(z, dim=-1)
        else:
            h = self.norm(z)
        a = torch.softmax(h @ h.transpose(-1, -2), -1) @ h
        if self.residual:
            a = a + z
        if self.gelu:
            a = F.gelu(self.mlp(a))
        return self.head(a.mean(1))


class MultiHead(nn.Module):
    """Projected multi-head attention on 4-D tensors: QK-norm, causal or padding masks, SDPA."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.q_norm, self.k_norm = nn.RMSNorm(D // HEADS), nn.RMSNorm(D // HEADS)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (
            t.reshape(b, length, HEADS, D // HEADS).transpose(1, 2)
            for t in self.qkv(x).chunk(3, -1)
        )
        if self.kind == "qk_norm":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5
            if self.kind == "causal":
                mask = torch.ones(length, length, dtype=torch.bool).triu(1)
                s = s.masked_fill(mask, float("-inf"))
            elif self.kind == "padding":  # the last three keys of every sequence are padding
                keep = torch.arange(length) < length - 3
                s = s.masked_fill(~keep, float("-inf"))
            a = torch.softmax(s, -1) @ v
        a = self.out(a.transpose(1, 2).reshape(b, length, D))
        return self.head((x + a).mean(1))


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` with a residual and LayerNorm, post-norm as in the 2017 paper."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + a).mean(1))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (pre-norm, GELU), in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            D, HEADS, dim_feedforward=12, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(D, D, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class ConvNet(nn.Module):
    """A convolution of one kind, a normalisation of one kind, a pooled head."""

    def __init__(self, conv: str, norm: str = "none") -> None:
        super().__init__()
        c = 4
        self.conv = {
            "grouped": nn.Conv2d(c, c, 3, padding=1, groups=2),
            "depthwise": nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1)),
            "dilated": nn.Conv2d(c, c, 3, padding=2, dilation=2),
            "transposed": nn.ConvTranspose2d(c, c, 3, stride=2, padding=1),
            "plain": nn.Conv2d(c, c, 3, padding=1),
        }[conv]
        self.norm = {
            "none": nn.Identity(),
            "group": nn.GroupNorm(2, c),
            "batch_eval": nn.BatchNorm2d(c),
            "batch_stats": nn.BatchNorm2d(c, track_running_stats=False),
            "instance": nn.InstanceNorm2d(c, affine=True),
        }[norm]
        self.head = nn.Linear(c, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.gate, self.up, self.down = nn.Linear(D, 12), nn.Linear(D, 12), nn.Linear(12, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.head((x + self.down(F.silu(self.gate(h)) * self.up(h))).mean(1))


class MixtureOfExperts(nn.Module):
    """Top-k routing: expert weights gathered by index, gates a softmax over the k scores."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.w = nn.Parameter(torch.randn(experts, D, D) / D**0.5)
        self.head = nn.Linear(D, C)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        val, idx = self.router(x).topk(self.k, -1)
        gates = val.softmax(-1)
        y = torch.einsum("blkij,blj->blki", self.w[idx], x)
        return self.head((gates.unsqueeze(-1) * torch.tanh(y)).sum(-2).mean(1))


class TiedEmbedding(nn.Module):
    """A token model whose output projection is its embedding matrix (one parameter)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens)))).reshape(-1, self.out.out_features)


class PaddedEmbeddings(nn.Module):
    """A token model whose padding rows reach the loss: ``nn.Embedding(padding_idx=0)`` pooled
    over every position, and an ``nn.EmbeddingBag`` (mean) of each sequence with the same
    padding id (the padding row is held constant, and the bag is routed through a lookup)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D, padding_idx=0)
        self.bag = nn.EmbeddingBag(vocab, D, mode="mean", padding_idx=0)
        with torch.no_grad():  # a non-zero padding row, as after loading other weights
            self.emb.weight[0].normal_()
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + h.mean(1, keepdim=True) + self.bag(tokens).unsqueeze(1)
        return self.out(torch.tanh(self.mix(h))).reshape(-1, self.out.out_features)


class StoredInOut(nn.Module):
    """Weights stored ``(in, out)`` and applied as ``torch.addmm(b, x, W)`` (GPT-2's ``Conv1D``)
    and as ``x @ W``: layers K-FAC finds by the weight's place in the product."""

    def __init__(self, hidden: int = 12) -> None:
        super().__init__()
        self.w1 = nn.Parameter(0.4 * torch.randn(D, hidden))
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden))
        self.w2 = nn.Parameter(0.4 * torch.randn(hidden, D))
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1, x.reshape(-1, D), self.w1).reshape(*x.shape[:-1], -1)
        return self.head((torch.tanh(h) @ self.w2).mean(1))


class Parametrised(nn.Module):
    """A linear layer under ``weight_norm`` or ``spectral_norm`` (the parametrisation API)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        wrap = {
            "weight_norm": nn.utils.parametrizations.weight_norm,
            "spectral_norm": nn.utils.parametrizations.spectral_norm,
        }[kind]
        self.lin = wrap(nn.Linear(D, D))
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)).mean(1))


class ResidualStack(nn.Module):
    """Pre-norm residual MLP blocks."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, D)) for _ in range(depth)
        )
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        return self.head(x.mean(1))


@dataclass(frozen=True)
class Arch:
    build: Callable[[], nn.Module]
    inputs: str = "sequence"  # "sequence" (B, L, D), "image" (B, 4, 6, 6) or "tokens" (B, L)
    per_sample: bool = True  # row i of the outputs depends on sample i only (Fisher, per-sample)
    refused: str | None = None  # a dynamo refusal this torch raises, matched against its message


ARCHS: dict[str, Arch] = {
    "layernorm_attention": Arch(lambda: NormAttention("layer")),
    "rmsnorm_attention": Arch(lambda: NormAttention("rms")),
    "hand_rmsnorm_attention": Arch(lambda: NormAttention("hand_rms")),
    "normalize_attention": Arch(lambda: NormAttention("normalize")),
    "rmsnorm_attention_residual_gelu": Arch(lambda: NormAttention("rms", True, True)),
    "hand_rmsnorm_attention_residual": Arch(lambda: NormAttention("hand_rms", residual=True)),
    "attention_no_norm": Arch(lambda: NormAttention("none")),
    "qk_norm": Arch(lambda: MultiHead("qk_norm")),
    "projected_attention": Arch(lambda: MultiHead("plain")),
    "causal_attention": Arch(lambda: MultiHead("causal")),
    "padding_mask_attention": Arch(lambda: MultiHead("padding")),
    "sdpa_causal": Arch(lambda: MultiHead("sdpa")),
    "multihead_attention": Arch(TorchMHA),
    "transformer_encoder_layer": Arch(EncoderLayer),
    "gru": Arch(lambda: Recurrent(nn.GRU), refused="Attempted to wrap RNN, GRU, or LSTM"),
    "lstm": Arch(lambda: Recurrent(nn.LSTM), refused="Attempted to wrap RNN, GRU, or LSTM"),
    "grouped_conv": Arch(lambda: ConvNet("grouped"), "image"),
    "depthwise_conv": Arch(lambda: ConvNet("depthwise"), "image"),
    "dilated_conv": Arch(lambda: ConvNet("dilated"), "image"),
    "transposed_conv": Arch(lambda: ConvNet("transposed"), "image"),
    "groupnorm_conv": Arch(lambda: ConvNet("plain", "group"), "image"),
    "batchnorm_eval_conv": Arch(lambda: ConvNet("plain", "batch_eval"), "image"),
    "batchnorm_batch_stats_conv": Arch(
        lambda: ConvNet("plain", "batch_stats"), "image", per_sample=False
    ),
    "instancenorm_conv": Arch(lambda: ConvNet("plain", "instance"), "image"),
    "swiglu": Arch(SwiGLU),
    "mixture_of_experts": Arch(MixtureOfExperts),
    "tied_embedding": Arch(TiedEmbedding, "tokens"),
    # rows of the outputs depend on the whole sequence (pooling): not one sample per row
    "padded_embeddings": Arch(PaddedEmbeddings, "tokens", per_sample=False),
    "stored_in_out": Arch(StoredInOut),
    "weight_norm": Arch(lambda: Parametrised("weight_norm")),
    "spectral_norm": Arch(lambda: Parametrised("spectral_norm")),
    "residual_stack": Arch(ResidualStack),
}


def build(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The architecture in ``dtype``, in eval mode, with weights from ``seed``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the same draws whatever the caller's default
    try:
        torch.manual_seed(seed)
        model = ARCHS[name].build()
    finally:
        torch.set_default_dtype(old)
    for buf_name, buf in model.named_buffers():  # non-trivial running statistics
        if buf_name.endswith("running_mean"):
            buf.uniform_(-0.5, 0.5)
        elif buf_name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def data(name: str, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: a batch of inputs and class labels for the architecture's outputs."""
    g = torch.Generator().manual_seed(seed)
    kind = ARCHS[name].inputs
    if kind == "tokens":
        x = torch.randint(0, 7, (B, L), generator=g)
        return x, torch.randint(0, 7, (B * L,), generator=g)
    shape = (B, 4, 6, 6) if kind == "image" else (B, L, D)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, C, (B,), generator=g)
