"""The workloads of ``bench_optim.py --task cnn|charlm``: data, functional models, parameters,
targets and budgets (:func:`task_setup`).

Both models are plain functions of a parameter dict (``model(params, x, y) -> logits``, rows
are predictions), built from ``torch.nn.functional`` calls, so that ``torch.optim`` optimizers
(on leaves with ``requires_grad``) and ``hessfunc.optim`` optimizers (pure steps) train the
same function from the same initial values.

- ``cnn``: scikit-learn's 8x8 digits (1797 images, 10 classes), one seeded split into 1497
  training and 300 validation images; conv 3x3 (1->16) - ReLU - conv 3x3 (16->32) - ReLU -
  max-pool 2 - linear 512->64 - ReLU - linear 64->10, cross-entropy.
- ``charlm``: a character-level (byte-level, vocabulary 256) transformer, 2 pre-LayerNorm
  blocks, d_model 64, 4 heads, MLP width 256, context 64, learned positions, untied output
  layer, causal attention written out (softmax of masked scores; no fused kernel, so every
  curvature product differentiates through it). Corpus: the top-level ``.py`` files of the
  running Python's standard library (``os.path.dirname(os.__file__)``), sorted by name and
  concatenated as bytes; the first ``TRAIN_BYTES`` train, the next ``VAL_BYTES`` validate.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os

import torch
import torch.nn.functional as F

from hessfunc.losses import CrossEntropyLoss

SEED = 0

# ------------------------------------------------------------------------------ cnn

CNN_VAL = 300


def digits_split(seed: int = SEED):
    """``(X_train, y_train, X_val, y_val)``: images ``(n, 1, 8, 8)`` in [0, 1], float32."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:CNN_VAL], perm[CNN_VAL:]
    return X[train], y[train], X[val], y[val]


def cnn_init(seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def he(*shape, fan_in):
        return torch.randn(*shape, generator=g) * math.sqrt(2.0 / fan_in)

    return {
        "c1.w": he(16, 1, 3, 3, fan_in=9),
        "c1.b": torch.zeros(16),
        "c2.w": he(32, 16, 3, 3, fan_in=144),
        "c2.b": torch.zeros(32),
        "f1.w": he(64, 512, fan_in=512),
        "f1.b": torch.zeros(64),
        "f2.w": torch.randn(10, 64, generator=g) / 8.0,
        "f2.b": torch.zeros(10),
    }


def cnn(p: dict, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    h = F.relu(F.conv2d(x, p["c1.w"], p["c1.b"], padding=1))
    h = F.relu(F.conv2d(h, p["c2.w"], p["c2.b"], padding=1))
    h = F.max_pool2d(h, 2).flatten(1)
    h = F.relu(F.linear(h, p["f1.w"], p["f1.b"]))
    return F.linear(h, p["f2.w"], p["f2.b"])


# ------------------------------------------------------------------------------ charlm

VOCAB, D, LAYERS, HEADS, MLP, CONTEXT = 256, 64, 2, 4, 256, 64
TRAIN_BYTES, VAL_BYTES = 1_000_000, 100_000


def stdlib_corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train, val, description)``: byte tensors (int64) and where they came from."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    data = b"".join(open(f, "rb").read() for f in files)  # noqa: SIM115
    need = TRAIN_BYTES + VAL_BYTES
    if len(data) < need:
        raise RuntimeError(f"the standard library at {root} has {len(data)} bytes, need {need}")
    data = data[:need]
    digest = hashlib.sha256(data).hexdigest()[:12]
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    desc = (
        f"the {len(files)} top-level .py files of the Python standard library ({root}), "
        f"sorted and concatenated; bytes [0, {TRAIN_BYTES:,}) train, the next {VAL_BYTES:,} "
        f"validate (sha256 of the slice {digest})"
    )
    return t[:TRAIN_BYTES], t[TRAIN_BYTES:], desc


def windows(text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets ``(len(starts), CONTEXT)`` at the given offsets."""
    idx = starts[:, None] + torch.arange(CONTEXT + 1)
    w = text[idx]
    return w[:, :-1], w[:, 1:]


def charlm_init(seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    p = {"tok": normal(VOCAB, D, std=0.02), "pos": normal(CONTEXT, D, std=0.02)}
    for i in range(LAYERS):
        p |= {
            f"l{i}.ln1.w": torch.ones(D),
            f"l{i}.ln1.b": torch.zeros(D),
            f"l{i}.qkv.w": normal(3 * D, D, std=D**-0.5),
            f"l{i}.qkv.b": torch.zeros(3 * D),
            f"l{i}.out.w": normal(D, D, std=D**-0.5 / math.sqrt(2 * LAYERS)),
            f"l{i}.out.b": torch.zeros(D),
            f"l{i}.ln2.w": torch.ones(D),
            f"l{i}.ln2.b": torch.zeros(D),
            f"l{i}.fc.w": normal(MLP, D, std=D**-0.5),
            f"l{i}.fc.b": torch.zeros(MLP),
            f"l{i}.proj.w": normal(D, MLP, std=MLP**-0.5 / math.sqrt(2 * LAYERS)),
            f"l{i}.proj.b": torch.zeros(D),
        }
    p |= {"lnf.w": torch.ones(D), "lnf.b": torch.zeros(D), "head.w": normal(VOCAB, D, std=0.02)}
    return p


_CAUSAL = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()


def charlm(p: dict, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Next-byte logits, flattened to ``(B * T, VOCAB)`` (one row per position)."""
    B, T = x.shape
    dh = D // HEADS
    h = F.embedding(x, p["tok"]) + p["pos"][:T]
    for i in range(LAYERS):
        a = F.layer_norm(h, (D,), p[f"l{i}.ln1.w"], p[f"l{i}.ln1.b"])
        qkv = F.linear(a, p[f"l{i}.qkv.w"], p[f"l{i}.qkv.b"])
        q, k, v = qkv.reshape(B, T, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
        scores = scores.masked_fill(~_CAUSAL[:T, :T], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        h = h + F.linear(o, p[f"l{i}.out.w"], p[f"l{i}.out.b"])
        m = F.layer_norm(h, (D,), p[f"l{i}.ln2.w"], p[f"l{i}.ln2.b"])
        m = F.gelu(F.linear(m, p[f"l{i}.fc.w"], p[f"l{i}.fc.b"]))
        h = h + F.linear(m, p[f"l{i}.proj.w"], p[f"l{i}.proj.b"])
    h = F.layer_norm(h, (D,), p["lnf.w"], p["lnf.b"])
    return F.linear(h, p["head.w"]).reshape(B * T, VOCAB)


# ------------------------------------------------------------------------------ tasks

# Chosen from pilot runs of AdamW on the same batches: at its best learning rate of the grid
# it reached 0.04 (cnn) at about step 200 of 600 (the validation loss then hovers at 0.03-0.04,
# moving by a few 1e-3 between checks) and 1.9 nats per byte (charlm) at about step 475 of 800
TARGET_CNN = 0.04
TARGET_CHARLM = 1.9


def task_setup(task: str, quick: bool) -> dict:
    """Model, loss, parameters, training batches, validation set and budgets of a task."""

    g = torch.Generator().manual_seed(SEED)
    if task == "cnn":
        Xtr, ytr, Xva, yva = digits_split()
        n_steps = 1000
        idx: list[torch.Tensor] = []
        while len(idx) < n_steps:
            perm = torch.randperm(len(Xtr), generator=g)
            idx += [perm[i : i + 128] for i in range(0, len(Xtr) - 127, 128)]
        spec = {
            "model": cnn,
            "init": cnn_init,
            "loss": lambda x, y: CrossEntropyLoss(y),
            "batches": [(Xtr[i], ytr[i]) for i in idx[:n_steps]],
            "val": (Xva, yva),
            "target": TARGET_CNN,
            "eval": 10,
            "budgets": {"first": 1000, "kfac": 300, "diag": 600, "hf": 200},
            "hf": True,
            "ada_every": 1,
            "describe": (
                "Small CNN on sklearn digits (conv 3x3 1->16, ReLU, conv 3x3 16->32, ReLU, "
                "max-pool 2, linear 512->64, ReLU, linear 64->10; cross-entropy), "
                f"{len(Xtr)} training and {len(Xva)} validation images (one seeded split), "
                "batch 128 from one seeded permutation per epoch"
            ),
        }
    elif task == "charlm":
        train, valtext, corpus = stdlib_corpus()
        n_steps = 800
        starts = torch.randint(0, len(train) - CONTEXT - 1, (n_steps, 32), generator=g)
        spec = {
            "model": charlm,
            "init": charlm_init,
            "loss": lambda x, y: CrossEntropyLoss(y.reshape(-1)),
            "batches": [windows(train, s) for s in starts],
            "val": windows(valtext, torch.linspace(0, len(valtext) - CONTEXT - 2, 128).long()),
            "target": TARGET_CHARLM,
            "eval": 25,
            "budgets": {"first": 800, "kfac": 200, "diag": 600, "hf": 0},
            "hf": False,
            "ada_every": 10,
            # the autoencoder's grids diverged here in smoke runs (K-FAC at every initial
            # damping of 1e-3, 1e-2 and 1e-1 within 15 steps, AdaHessian at lr 0.1): moved
            # up (K-FAC) and down (AdaHessian) by one decade or half a decade
            "grids": {
                "hessfunc K-FAC (adaptive lr, momentum)": [0.1, 1.0, 10.0],
                "AdaHessian": [0.01, 0.03, 0.1],
            },
            "describe": (
                "Character-level transformer (byte vocabulary 256, 2 pre-LayerNorm blocks, "
                "d_model 64, 4 heads, MLP 256, context 64, learned positions, untied output "
                "layer, causal attention written out with torch.nn.functional calls), batches "
                f"of 32 random windows of 64 bytes; corpus: {corpus}; validation: 128 evenly "
                "spaced windows of the held-out slice (8192 predicted bytes), loss in nats "
                "per byte"
            ),
        }
    else:
        raise ValueError(task)
    if quick:
        spec["budgets"] = {k: min(v, 40) for k, v in spec["budgets"].items()}
    return spec


def val_loss(spec: dict, p: dict) -> float:
    with torch.no_grad():
        return float(spec["loss"](*spec["val"])(spec["model"](p, *spec["val"])))
