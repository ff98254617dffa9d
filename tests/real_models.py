"""Tiny real models from Hugging Face transformers, in float64, as curvature test problems.

Every case is built from a configuration (no weights, no tokenizer, nothing downloaded): two
layers, hidden width 16-32, a vocabulary of 64, a batch of 2 short sequences or 2 small images.
Each case gives

- ``model_fn(params, *args) -> logits`` with samples on axis 0 (tokens flattened for language
  models), the form :func:`hessfunc.ggn_vp` and :func:`hessfunc.kfac` take
  (``model_fn(..., neutral=False)`` runs it with the model's own float32 upcasts);
- ``loss``: a :class:`hessfunc.losses.CrossEntropyLoss` holding the targets, computed in float64
  from ``.logits`` (a causal LM's own ``.loss`` casts the logits to float32);
- ``f(params, *args) = loss(model_fn(params, *args))``, the scalar every Hessian product takes;
- ``raw_fn(params, *args)``: the model's own output (a ``ModelOutput``).

float64 throughout. ``model.double()`` alone is not enough: several families cast to float32 on
the differentiated path (RMSNorm, ``softmax(dtype=torch.float32)``, ``scores.float()``, the
Mamba scan's ``A_log.float()``), which rounds ``f`` to about 1e-8 and ruins value-based second
differences. :class:`KeepFloat64` is a ``TorchFunctionMode`` entered inside ``model_fn`` that
turns exactly those downcasts (float64 -> float32) into no-ops; every case records how many it
neutralised per forward pass, so a test can show they happened where expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import hessfunc
from hessfunc.losses import CrossEntropyLoss

VOCAB = 64
PAD = 0  # the padding id of every case that has one


class KeepFloat64(TorchFunctionMode):
    """Turn float64 -> float32 casts into no-ops (``.to``, ``.float``, ``.type``, ``dtype=``).

    Only a cast *from float64 to float32* is touched; everything else runs unchanged, so a model
    already free of upcasts sees no difference. ``count`` says how many casts were neutralised.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    @staticmethod
    def _is_down(src: Any, dtype: Any) -> bool:
        return (
            isinstance(src, torch.Tensor)
            and src.dtype == torch.float64
            and isinstance(dtype, torch.dtype)
            and dtype == torch.float32
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        if name == "float" and isinstance(src, torch.Tensor) and src.dtype == torch.float64:
            self.count += 1
            return src
        if name in ("to", "type"):
            if self._is_down(src, kwargs.get("dtype")):
                kwargs["dtype"] = torch.float64
                self.count += 1
            elif any(i > 0 and self._is_down(src, a) for i, a in enumerate(args)):
                args = tuple(
                    torch.float64 if i > 0 and self._is_down(src, a) else a
                    for i, a in enumerate(args)
                )
                self.count += 1
        elif self._is_down(src, kwargs.get("dtype")):  # softmax(x, dtype=torch.float32), ...
            kwargs["dtype"] = torch.float64
            self.count += 1
        return func(*args, **kwargs)


@dataclass
class RealCase:
    """One real model as a curvature problem (see the module docstring)."""

    name: str
    model: nn.Module
    params: dict[str, torch.Tensor]
    args: tuple
    model_fn: Callable[..., torch.Tensor]
    loss: CrossEntropyLoss
    raw_fn: Callable[..., Any]
    # whether the model casts to float32 on the differentiated path (model_fn then runs it
    # under KeepFloat64; raw_fn never does)
    upcasts: bool = False
    # parameter names that K-FAC must cover, and names it must report as uncovered; besides,
    # every parameter of an nn.Linear or nn.Conv*d module not named uncovered must be covered
    kfac_covered: tuple[str, ...] = ()
    kfac_uncovered: tuple[str, ...] = ()
    note: str = ""

    def f(self, params: dict[str, torch.Tensor], *args: Any) -> torch.Tensor:
        return self.loss(self.model_fn(params, *args))


def _float64(fn: Callable, upcasts: bool) -> Callable:
    """``fn`` run under :class:`KeepFloat64` for a family that upcasts, else ``fn`` itself (a
    family without upcasts needs no mode, so it compiles with nothing of the tests around it)."""
    if not upcasts:
        return fn

    def run(*args: Any) -> Any:
        with KeepFloat64():
            return fn(*args)

    return run


def count_casts(case: RealCase) -> int:
    """How many float64 -> float32 casts one forward pass of the raw model makes."""
    with torch.no_grad(), KeepFloat64() as mode:
        case.raw_fn(case.params, *case.args)
    return mode.count


def _functional(
    model: nn.Module, select: Callable[[str], bool] | None = None
) -> tuple[Callable, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(apply, differentiated, frozen)``: ``apply(params, ...)`` runs the model on
    ``{**frozen, **params}`` so a test can differentiate a subset of the leaves."""
    apply, params = hessfunc.from_module(model)
    keep = {k: v for k, v in params.items() if select is None or select(k)}
    frozen = {k: v for k, v in params.items() if k not in keep}
    return apply, keep, frozen


def _lm_case(
    name: str,
    model: nn.Module,
    ids: torch.Tensor,
    select: Callable[[str], bool] | None = None,
    upcasts: bool = False,
    **kw: Any,
) -> RealCase:
    """A causal LM: next-token cross-entropy on ``logits[:, :-1]`` in float64."""
    apply, params, frozen = _functional(model.eval(), select)

    def raw_fn(p, ids):
        return apply({**frozen, **p}, input_ids=ids, use_cache=False)

    def logits(p, ids, neutral=upcasts):
        out = _float64(raw_fn, neutral)(p, ids).logits
        return out[:, :-1].reshape(-1, out.shape[-1])

    loss = CrossEntropyLoss(ids[:, 1:].reshape(-1))
    return RealCase(name, model, params, (ids,), logits, loss, raw_fn, upcasts, **kw)


def _classifier_case(
    name: str,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    select: Callable[[str], bool] | None = None,
    upcasts: bool = False,
    **kw: Any,
) -> RealCase:
    """A classifier: ``model(**inputs).logits`` against ``labels``; ``args`` is ``(inputs,)``."""
    apply, params, frozen = _functional(model.eval(), select)

    def raw_fn(p, inputs):
        return apply({**frozen, **p}, **inputs)

    def logits(p, inputs, neutral=upcasts):
        out = _float64(raw_fn, neutral)(p, inputs)
        out = out.logits if hasattr(out, "logits") else out
        return out.reshape(-1, out.shape[-1])  # tokens of a sequence model are samples

    return RealCase(
        name, model, params, (inputs,), logits, CrossEntropyLoss(labels), raw_fn, upcasts, **kw
    )


def _ids(shape: tuple[int, int], low: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, shape, generator=g)


def _built(cls: type, config: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(config).double().eval()


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# the families


def bert_padded(masked: bool = False) -> RealCase:
    """BERT classifier, a batch with padding at the end of the second sequence.

    Without an attention mask the padding tokens are attended to, so the padding row of the word
    embedding (``nn.Embedding(padding_idx=0)``) reaches the loss; with the mask, the classifier
    reads the first token only and nothing of the padding row reaches it.
    """
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = _built(BertForSequenceClassification, cfg)
    ids = _ids((2, 6))
    ids[1, 4:] = PAD
    inputs = {"input_ids": ids}
    if masked:
        inputs["attention_mask"] = (ids != PAD).long()
    name = "bert+mask" if masked else "bert-padded"
    return _classifier_case(
        name, model, inputs, torch.tensor([0, 2]),
        kfac_covered=("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"),
        kfac_uncovered=("bert.embeddings.word_embeddings.weight",),
        note="padding tokens, no attention mask" if not masked else "attention mask",
    )  # fmt: skip


def distilbert_padded() -> RealCase:
    """DistilBERT classifier, padding tokens in the batch and no attention mask."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
        max_position_embeddings=16, num_labels=3, pad_token_id=PAD, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = _built(DistilBertForSequenceClassification, cfg)
    ids = _ids((2, 6), seed=2)
    ids[1, 3:] = PAD
    return _classifier_case(
        "distilbert-padded", model, {"input_ids": ids}, torch.tensor([1, 2]),
        kfac_covered=("distilbert.transformer.layer.0.attention.q_lin.weight", "classifier.weight"),
        kfac_uncovered=("distilbert.embeddings.word_embeddings.weight",),
        note="padding tokens, no attention mask",
    )  # fmt: skip


class MeanPoolClassifier(nn.Module):
    """Embedding (``padding_idx=0``) -> mean over every position -> linear: padding is pooled."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids)).mean(1))


def meanpool_padded() -> RealCase:
    torch.manual_seed(0)
    model = MeanPoolClassifier().double().eval()
    with torch.no_grad():  # a trained model's padding row need not be zero
        model.embed.weight[PAD].normal_()
    ids = _ids((3, 5), seed=3)
    ids[0, 3:] = PAD
    ids[2, 1:] = PAD
    return _classifier_case(
        "meanpool-padded", model, {"input_ids": ids}, torch.tensor([0, 1, 2]),
        kfac_covered=("head.weight", "head.bias"), kfac_uncovered=("embed.weight",),
        note="nn.Embedding(padding_idx=0), mean over every position",
    )  # fmt: skip


def llama() -> RealCase:
    """Llama: rotary positions, grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = _built(LlamaForCausalLM, cfg)
    return _lm_case(
        "llama", model, upcasts=True, ids=_ids((2, 6), seed=4),
        kfac_covered=tuple(f"model.layers.0.self_attn.{n}.weight" for n in LINEAR_NAMES[:4])
        + tuple(f"model.layers.1.mlp.{n}.weight" for n in LINEAR_NAMES[4:]) + ("lm_head.weight",),
        kfac_uncovered=("model.embed_tokens.weight", "model.norm.weight"),
        note="rotary, GQA 4/2, RMSNorm upcast",
    )  # fmt: skip


def qwen3_pad_is_eos() -> RealCase:
    """Qwen3 (rotary, GQA, q/k RMSNorm) whose padding id is its end-of-sequence id, used as
    content in the batch: ``nn.Embedding(padding_idx=eos)`` sees real tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    eos = 2
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
        pad_token_id=eos, eos_token_id=eos, bos_token_id=1, attn_implementation="sdpa",
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _built(Qwen3ForCausalLM, cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[eos].normal_()  # eos has a learned embedding
    ids = _ids((2, 7), seed=5)
    ids[0, 3] = eos  # end of a first document packed with a second
    ids[1, 6] = eos
    return _lm_case(
        "qwen3-pad=eos", model, upcasts=True, ids=ids,
        kfac_covered=("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"),
        kfac_uncovered=("model.embed_tokens.weight",),
        note="pad_token_id == eos_token_id as content",
    )  # fmt: skip


def gpt2() -> RealCase:
    """GPT-2: ``Conv1D`` projections (``torch.addmm``, ``W`` stored ``(in, out)``), tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = _built(GPT2LMHeadModel, cfg)
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return _lm_case(
        "gpt2", model, _ids((2, 6), seed=6),
        kfac_covered=tuple(f"transformer.h.{i}.{n}.weight" for i in (0, 1) for n in names),
        kfac_uncovered=("transformer.wte.weight", "transformer.wpe.weight"),
        note="Conv1D (addmm), tied embedding",
    )  # fmt: skip


def t5() -> RealCase:
    """T5 encoder-decoder: relative position buckets, RMS layer norm, ``scores.float()``."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD,
        decoder_start_token_id=PAD, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    model = _built(T5ForConditionalGeneration, cfg)
    src, tgt = _ids((2, 6), seed=7), _ids((2, 5), seed=8)
    dec_in = torch.cat([torch.full((2, 1), PAD), tgt[:, :-1]], 1)
    return _classifier_case(
        "t5", model, upcasts=True,
        inputs={"input_ids": src, "decoder_input_ids": dec_in, "use_cache": False},
        labels=tgt.reshape(-1),
        kfac_covered=(
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "decoder.block.0.layer.1.EncDecAttention.q.weight",
            "decoder.block.1.layer.2.DenseReluDense.wo.weight",
        ),
        # the head is tied to the shared embedding: one leaf, used as an embedding too
        kfac_uncovered=("shared.weight",),
        note="encoder-decoder, tied head, LayerNorm and softmax upcasts",
    )  # fmt: skip


def mixtral() -> RealCase:
    """Mixtral: 4 experts, top-2 routing (router softmax in float32)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=16, attn_implementation="sdpa",
        router_jitter_noise=0.0, experts_implementation="eager",
    )  # fmt: skip
    model = _built(MixtralForCausalLM, cfg)
    return _lm_case(
        "mixtral", model, upcasts=True, ids=_ids((2, 6), seed=9),
        kfac_covered=("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"),
        kfac_uncovered=("model.embed_tokens.weight",),
        note="mixture of experts, top-2 of 4",
    )  # fmt: skip


def mamba() -> RealCase:
    """Mamba: selective state-space scan (the sequential torch path; no CUDA kernels here)."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=3, time_step_rank=2, use_mambapy=False,
    )  # fmt: skip
    model = _built(MambaForCausalLM, cfg)
    return _lm_case(
        "mamba", model, upcasts=True, ids=_ids((2, 6), seed=10),
        kfac_covered=tuple(
            f"backbone.layers.0.mixer.{n}.weight" for n in ("in_proj", "x_proj", "out_proj")
        ),
        # dt_proj is applied as a matrix product and the depthwise convolution's weight is
        # reshaped before use: not linear layers as K-FAC finds them
        kfac_uncovered=("backbone.embeddings.weight", "backbone.layers.0.mixer.A_log")
        + tuple(
            f"backbone.layers.{i}.mixer.{n}"
            for i in (0, 1)
            for n in ("dt_proj.weight", "dt_proj.bias", "conv1d.weight")
        ),
        note="selective scan, A_log.float()",
    )  # fmt: skip


def vit() -> RealCase:
    """ViT classifier on 2 images 8x8, patches 4x4."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = _built(ViTForImageClassification, cfg)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    return _classifier_case(
        "vit", model, upcasts=True, inputs={"pixel_values": x}, labels=torch.tensor([0, 2]),
        kfac_covered=(
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.layers.0.attention.q_proj.weight",
            "classifier.weight",
        ),
        kfac_uncovered=("vit.embeddings.cls_token", "vit.layers.0.layernorm_before.weight"),
        note="patch conv, eager attention softmax upcast",
    )  # fmt: skip


def resnet() -> RealCase:
    """ResNet (basic blocks) with BatchNorm in evaluation mode, non-trivial running statistics."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=3,
    )  # fmt: skip
    model = _built(ResNetForImageClassification, cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    return _classifier_case(
        "resnet", model, {"pixel_values": x}, torch.tensor([1, 0]),
        kfac_covered=("resnet.embedder.embedder.convolution.weight", "classifier.1.weight"),
        kfac_uncovered=("resnet.embedder.embedder.normalization.weight",),
        note="conv + eval BatchNorm",
    )  # fmt: skip


def gemma2() -> RealCase:
    """Gemma 2: sliding-window and global layers, attention and final logit soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
        sliding_window=4, pad_token_id=PAD, attn_implementation="eager",
    )  # fmt: skip
    model = _built(Gemma2ForCausalLM, cfg)
    with torch.no_grad():  # Gemma's RMSNorm scales by (1 + w): w = 0 at init hides the term
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(-0.3, 0.3)
    return _lm_case(
        "gemma2", model, upcasts=True, ids=_ids((2, 6), seed=13),
        kfac_covered=("model.layers.0.self_attn.q_proj.weight",),
        kfac_uncovered=("model.embed_tokens.weight",),
        note="soft-capping, sliding window, RMSNorm upcast",
    )  # fmt: skip


# name -> builder; FAST is the subset of the default test run
CASES: dict[str, Callable[[], RealCase]] = {
    "bert-padded": bert_padded,
    "bert+mask": lambda: bert_padded(masked=True),
    "distilbert-padded": distilbert_padded,
    "meanpool-padded": meanpool_padded,
    "llama": llama,
    "qwen3-pad=eos": qwen3_pad_is_eos,
    "gpt2": gpt2,
    "t5": t5,
    "mixtral": mixtral,
    "mamba": mamba,
    "vit": vit,
    "resnet": resnet,
    "gemma2": gemma2,
}
FAST = ("bert-padded", "llama", "gpt2", "resnet")
# cases where the padding row of an nn.Embedding(padding_idx=...) reaches the loss
PADDING = ("bert-padded", "distilbert-padded", "meanpool-padded", "qwen3-pad=eos")


# ----------------------------------------------------------------------------------------------
# value-based references: nothing but evaluations of f (or of the model's outputs)


def directions(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A random direction like ``params``, of unit norm over all leaves."""
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    norm = torch.sqrt(sum((x * x).sum() for x in d.values()))
    return {k: x / norm for k, x in d.items()}


class PaddingRowsFixed(TorchFunctionMode):
    """Evaluate the model with every embedding lookup's padding row fixed at its value in
    ``params`` (the reading hessfunc differentiates): ``F.embedding(..., padding_idx=p)`` reads
    row ``p`` of the unperturbed table, while every other use of the table (a tied output head)
    sees the perturbed one. Values only: the references stay free of autograd's backward."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        # the unperturbed tables of the embeddings that have a padding row
        self.tables = [
            params[f"{name}.weight"]
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Embedding)
            and mod.padding_idx is not None
            and f"{name}.weight" in params
        ]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.embedding, torch.embedding):
            names = ("input", "weight", "padding_idx")
            bound = dict(zip(names, args, strict=False)) | kwargs
            p = bound.get("padding_idx")
            weight = bound["weight"]
            if p is not None and p >= 0:
                base = next(t for t in self.tables if t.shape == weight.shape)  # one per shape
                fixed = weight.clone()
                fixed[p] = base[p]
                args = (bound["input"], fixed) + tuple(args[2:])
                kwargs = {k: w for k, w in kwargs.items() if k not in ("input", "weight")}
        return func(*args, **kwargs)


def fixed_padding(f: Callable, model: nn.Module, params: dict[str, torch.Tensor]) -> Callable:
    """``f`` with its lookups' padding rows fixed at ``params`` (:class:`PaddingRowsFixed`)."""

    def g(*a: Any) -> Any:
        with PaddingRowsFixed(model, params):
            return f(*a)

    return g


def vdot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _moved(p: dict, u: dict, a: float, v: dict, b: float) -> dict:
    return {k: p[k] + a * u[k] + b * v[k] for k in p}


# steps h_k = STEP0 / 2^k; Richardson with ratio 2 removes the h^2 term of a central difference.
# Down to about 6e-6: along a concentrated direction (an eigenvector) a ReLU network crosses a
# kink at the larger steps, and only the small ones converge.
STEP0, STEPS = 0.2, 16


def richardson(
    d: list[torch.Tensor], rounding: list[float] | None = None
) -> tuple[torch.Tensor, float]:
    """The Richardson estimate ``r_k = (4 d(h_k / 2) - d(h_k)) / 3`` that agrees best with both
    its neighbours on the step ladder, and the larger of those two disagreements (its error
    estimate; two neighbours, so that a coincidence of one pair cannot claim convergence).
    Large steps lose to the truncation error, small ones to rounding; the best estimate sits
    between them.

    ``rounding[k]``, where given, bounds the rounding error of ``d[k]``; each estimate's error
    then includes what its two differences carry, ``(4 rounding[k+1] + rounding[k]) / 3``. The
    disagreement of neighbours cannot see rounding that scales like the truncation term: a
    second difference whose numerator is a few thousand ulps rounds to integers in the ratio
    4 : 1 from one step to the next, the quotient is constant down the ladder, and neighbours
    agree exactly on a value that is off in its fifth digit."""
    r = [(4 * d[k + 1] - d[k]) / 3 for k in range(len(d) - 1)]
    floor = [0.0] * len(r)
    if rounding is not None:
        floor = [(4 * rounding[k + 1] + rounding[k]) / 3 for k in range(len(r))]
    best, err = r[-1], float("inf")
    for k in range(1, len(r) - 1):
        e = max(float((r[k] - r[k - 1]).norm()), float((r[k + 1] - r[k]).norm())) + floor[k]
        if e < err:
            best, err = r[k], e
    return best, err


@torch.no_grad()
def second_difference(f: Callable, params: dict, u: dict, v: dict, args: tuple):
    """``u^T H v`` from values of ``f`` only: ``(f(x+hu+hv) - f(x+hu-hv) - f(x-hu+hv) +
    f(x-hu-hv)) / 4h^2`` on the step ladder, Richardson-extrapolated; ``(value, error)``."""
    d = []
    for k in range(STEPS):
        h = STEP0 / 2**k
        d.append(
            (
                f(_moved(params, u, h, v, h), *args)
                - f(_moved(params, u, h, v, -h), *args)
                - f(_moved(params, u, -h, v, h), *args)
                + f(_moved(params, u, -h, v, -h), *args)
            )
            / (4 * h * h)
        )
    return richardson(d)


@torch.no_grad()
def ggn_form(case: RealCase, u: dict, v: dict, fixed_padding: bool = False):
    """``u^T G v = (J u)^T H_l (J v)`` from values only: ``J u`` and ``J v`` by central
    differences of the model's outputs, ``H_l`` by second differences of the loss's value in
    output space; ``(value, error)``, the error adding both stages' estimates. With
    ``fixed_padding``, the lookups' padding rows stay at ``case.params``
    (:class:`PaddingRowsFixed`)."""
    model_fn = (
        globals()["fixed_padding"](case.model_fn, case.model, case.params)
        if fixed_padding
        else case.model_fn
    )
    z = model_fn(case.params, *case.args)

    def jac(w: dict) -> tuple[torch.Tensor, float]:
        d = []
        for k in range(STEPS):
            h = STEP0 / 2**k
            plus = model_fn(_moved(case.params, w, h, w, 0.0), *case.args)
            minus = model_fn(_moved(case.params, w, -h, w, 0.0), *case.args)
            d.append((plus - minus) / (2 * h))
        return richardson(d)

    (ju, eu), (jv, ev) = jac(u), jac(v)
    # The loss's second difference in output space along unit directions, so that the ladder's
    # steps are steps in the logits whatever the size of Ju and Jv; the rounding of the four
    # values of the loss (a few ulps each) bounds each rung's accuracy (see richardson).
    nu, nv = float(ju.norm()), float(jv.norm())
    a, b = ju / max(nu, 1e-300), jv / max(nv, 1e-300)
    loss, ulp = case.loss, float(torch.finfo(z.dtype).eps)
    d, rounding = [], []
    for k in range(STEPS):
        h = STEP0 / 2**k
        values = [loss(z + s * h * a + t * h * b) for s, t in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
        d.append(nu * nv * (values[0] - values[1] - values[2] + values[3]) / (4 * h * h))
        top = max(float(x.abs()) for x in values)
        rounding.append(nu * nv * 4 * (4 * ulp * top) / (4 * h * h))  # 4 values, 4 ulps each
    value, err = richardson(d, rounding)
    # first-order propagation of the Jacobian errors through the bilinear form
    scale = float(value.abs()) / max(float(ju.norm() * jv.norm()), 1e-300)
    return value, err + scale * (eu * float(jv.norm()) + ev * float(ju.norm())) * 4


# ----------------------------------------------------------------------------------------------
# what hessfunc gets on each model: `python tests/real_models.py` prints the guide's table


def measure(case: RealCase) -> dict[str, float]:
    """Relative discrepancies of hessfunc's products on ``case`` (see the guide for each)."""
    c, norm = case, lambda t: float(torch.sqrt(sum((x * x).sum() for x in t.values())))
    u, v = directions(c.params, 1), directions(c.params, 2)
    hv = {m: hessfunc.hvp(c.f, c.params, v, *c.args, mode=m) for m in ("fwd-rev", "rev-rev")}
    hu = {m: hessfunc.hvp(c.f, c.params, u, *c.args, mode=m) for m in ("fwd-rev", "rev-rev")}
    gv = {
        m: hessfunc.ggn_vp(c.model_fn, c.loss, c.params, v, *c.args, mode=m)
        for m in ("fwd-rev", "rev-rev")
    }
    ref, err = second_difference(c.f, c.params, u, v, c.args)
    gref, gerr = ggn_form(c, u, v)
    s, gs = norm(hv["rev-rev"]), norm(gv["rev-rev"])
    diff = lambda a, b: norm({k: a[k] - b[k] for k in a})
    out = {
        "params": sum(t.numel() for t in c.params.values()),
        "casts": count_casts(c),
        "hvp modes": diff(hv["fwd-rev"], hv["rev-rev"]) / s,
        "fd value err (est)": err / s,
        "ggn modes": diff(gv["fwd-rev"], gv["rev-rev"]) / gs,
        "ggn value": abs(float(vdot(u, gv["fwd-rev"]) - gref)) / gs,
        "ggn value err (est)": gerr / gs,
    }
    for m in ("fwd-rev", "rev-rev"):
        out[f"asym {m}"] = abs(float(vdot(u, hv[m]) - vdot(hu[m], v))) / s
        out[f"value {m}"] = abs(float(vdot(u, hv[m]) - ref)) / s
    return out


if __name__ == "__main__":
    import sys

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    cols = ["params", "casts", "hvp modes", "asym fwd-rev", "asym rev-rev", "value fwd-rev"]
    cols += ["value rev-rev", "fd value err (est)", "ggn modes", "ggn value"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in sys.argv[1:] or CASES:
        m = measure(CASES[name]())
        cells = [str(m[k]) if k in ("params", "casts") else f"{m[k]:.0e}" for k in cols]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
