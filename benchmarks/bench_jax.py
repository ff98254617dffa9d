"""The benchmark workloads written by hand in JAX, with the same shapes and float32 weights.

Used by ``bench_hvp.py --jax``; it can also run alone to check the forward passes and time the
JAX products: ``python benchmarks/bench_jax.py [--device cuda] [--workloads mlp,cnn]``.

Each model is rewritten with ``jax.numpy``/``jax.lax`` (no Flax), reading the torch module's own
parameters and buffers, and checked against torch's logits before anything is timed: a benchmark
of a different function is worthless. The products mirror hessfunc's algorithms:

* gradient: ``jax.grad`` of the mean cross-entropy;
* HVP: forward-over-reverse, ``jax.jvp`` of ``jax.grad``;
* GGN-vector product: one forward pass carrying the tangent (``jax.jvp`` inside ``jax.vjp``, the
  tangent leaving as auxiliary output), the softmax cross-entropy output Hessian
  ``(diag(p) - p p^T) u / N`` in closed form, then the pullback.

All are jitted; timings wait on ``block_until_ready``.
"""

from __future__ import annotations

import os

# JAX grabs 75% of GPU memory on first use by default, which would starve torch in the same process
# and distort torch's peak-memory figures.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import workloads  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
    from jax import lax

    JAX_ERROR: str | None = None
except Exception as err:  # ImportError, or a broken jaxlib install
    jax = jnp = lax = None  # type: ignore[assignment]
    JAX_ERROR = f"{type(err).__name__}: {err}"

EPS = 1e-5  # BatchNorm and LayerNorm defaults in torch


def versions() -> str:
    """``"JAX x.y.z (backend)"`` or why JAX is unavailable."""
    if jax is None:
        return f"JAX unavailable ({JAX_ERROR})"
    import jaxlib

    return f"JAX {jax.__version__} (jaxlib {jaxlib.__version__}, backend {jax.default_backend()})"


def jax_device(device: str):
    """The JAX device matching a torch device string, or raise with the reason."""
    platform = "gpu" if str(device).startswith("cuda") else "cpu"
    try:
        devs = jax.devices(platform)
    except RuntimeError as err:
        raise RuntimeError(
            f"JAX has no {platform} backend here ({err}); install a CUDA build of jaxlib "
            f"(pip install 'jax[cuda12]') or run with --device cpu."
        ) from err
    return devs[0]


# ---------------------------------------------------------------------------------------------
# Conversion: the torch module's float32 parameters and buffers as JAX arrays on one device


class JaxWorkload(NamedTuple):
    name: str
    params: dict[str, Any]  # trainable parameters, torch's names and order
    consts: dict[str, Any]  # buffers (BatchNorm running statistics)
    x: Any
    y: Any
    forward: Any  # forward(params, consts, x) -> logits


def to_jax(t: torch.Tensor, dev) -> Any:
    """A JAX copy of ``t`` on ``dev`` (dtype preserved, int64 indices become int32)."""
    a = t.detach().cpu().numpy()
    if a.dtype == np.int64:
        a = a.astype(np.int32)
    return jax.device_put(a, dev)


def convert(w: workloads.Workload, dev) -> JaxWorkload:
    params = {k: to_jax(v, dev) for k, v in w.params.items()}
    consts = {k: to_jax(v, dev) for k, v in w.module.named_buffers() if v.is_floating_point()}
    arch = w.name.split()[0]  # names may carry a label, e.g. "mlp (batch 4096)"
    return JaxWorkload(w.name, params, consts, to_jax(w.x, dev), to_jax(w.y, dev), FORWARDS[arch])


def tree_to_jax(tree: dict[str, torch.Tensor], dev) -> dict[str, Any]:
    return {k: to_jax(v, dev) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# Forward passes, by hand


def dense(p, name, x):
    """``nn.Linear``: ``x W^T + b`` with torch's (out, in) weight layout."""
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch's F.gelu default is the exact erf form


def layer_norm(p, name, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased, as torch
    return (x - mu) * lax.rsqrt(var + EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def conv(p, name, x, padding):
    out = lax.conv_general_dilated(
        x,
        p[f"{name}.weight"],
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return out + p[f"{name}.bias"][None, :, None, None]


def batch_norm_eval(p, c, name, x):
    """Eval-mode ``nn.BatchNorm2d``: the running statistics, then the affine map."""
    shape = (1, -1, 1, 1)
    inv = lax.rsqrt(c[f"{name}.running_var"] + EPS)
    scale = (p[f"{name}.weight"] * inv).reshape(shape)
    return (x - c[f"{name}.running_mean"].reshape(shape)) * scale + p[f"{name}.bias"].reshape(shape)


def max_pool2(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def mlp_forward(p, c, x):
    h = jnp.tanh(dense(p, "0", x))
    h = jnp.tanh(dense(p, "2", h))
    return dense(p, "4", h)


def cnn_forward(p, c, x):
    h = max_pool2(gelu(batch_norm_eval(p, c, "bn", conv(p, "c1", x, 1))))
    h = max_pool2(gelu(conv(p, "c2", h, 1)))
    return dense(p, "fc", h.reshape(h.shape[0], -1))  # NCHW flatten, as torch's flatten(1)


def attention(p, name, x, heads):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention, no mask, no dropout."""
    b, n, d = x.shape
    dh = d // heads
    qkv = x @ p[f"{name}.in_proj_weight"].T + p[f"{name}.in_proj_bias"]  # rows: q, k, v
    q, k, v = (t.reshape(b, n, heads, dh).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, axis=-1))
    scores = (q @ k.transpose(0, 1, 3, 2)) / jnp.sqrt(jnp.float32(dh))
    out = jax.nn.softmax(scores, axis=-1) @ v  # (b, heads, n, dh)
    out = out.transpose(0, 2, 1, 3).reshape(b, n, d)
    return dense(p, f"{name}.out_proj", out)


def transformer_forward(p, c, tokens, layers=2, heads=4):
    h = p["emb.weight"][tokens] + p["pos"][: tokens.shape[1]]
    for i in range(layers):  # post-norm TransformerEncoderLayer (norm_first=False), GELU
        pre = f"enc.layers.{i}"
        h = layer_norm(p, f"{pre}.norm1", h + attention(p, f"{pre}.self_attn", h, heads))
        ff = dense(p, f"{pre}.linear2", gelu(dense(p, f"{pre}.linear1", h)))
        h = layer_norm(p, f"{pre}.norm2", h + ff)
    return dense(p, "head", layer_norm(p, "norm", h).mean(1))


FORWARDS = {"mlp": mlp_forward, "cnn": cnn_forward, "transformer": transformer_forward}


# ---------------------------------------------------------------------------------------------
# Products


def cross_entropy(logits, y):
    """Mean softmax cross-entropy with integer labels, as ``F.cross_entropy``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], axis=-1).mean()


def make_products(jw: JaxWorkload):
    """Jitted ``grad(p)``, ``hvp(p, v)`` and ``ggn(p, v)`` for one workload."""
    fwd, c, x, y = jw.forward, jw.consts, jw.x, jw.y

    def loss(p):
        return cross_entropy(fwd(p, c, x), y)

    def hvp(p, v):
        return jax.jvp(jax.grad(loss), (p,), (v,))[1]

    def ggn(p, v):
        model = lambda q: fwd(q, c, x)  # noqa: E731
        # one forward pass carrying the tangent; J v leaves as aux so the pullback is first order
        _, pullback, jv = jax.vjp(lambda q: jax.jvp(model, (q,), (v,)), p, has_aux=True)
        logits = fwd(p, c, x)  # shared with the pass above by XLA's CSE
        prob = jax.nn.softmax(logits, axis=-1)
        pu = prob * jv
        hu = (pu - prob * pu.sum(-1, keepdims=True)) / logits.shape[0]
        return pullback(hu)[0]

    return {"grad": jax.jit(jax.grad(loss)), "hvp": jax.jit(hvp), "ggn": jax.jit(ggn)}


def forward_max_abs_diff(w: workloads.Workload, jw: JaxWorkload) -> float:
    """Max |JAX logits - torch logits| on the workload's batch."""
    with torch.no_grad():
        ref = w.module(w.x).detach().cpu().numpy()
    out = np.asarray(jax.jit(jw.forward)(jw.params, jw.consts, jw.x))
    return float(np.abs(out - ref).max())


def max_rel_err(a: dict[str, Any], b: dict[str, torch.Tensor]) -> float:
    """``max |a - b| / max |b|`` over all leaves (``a`` from JAX, ``b`` from torch)."""
    num = max(float(np.abs(np.asarray(a[k]) - b[k].detach().cpu().numpy()).max()) for k in b)
    den = max(float(b[k].detach().abs().max()) for k in b)
    return num / max(den, 1e-30)


def run(
    w: workloads.Workload,
    device: str,
    v: dict[str, torch.Tensor],
    repeat: int,
    *,
    check_tol: float | None,
) -> dict[str, Any]:
    """Check the forward pass, then time the jitted JAX products on ``w``'s batch.

    Returns a dict with ``forward_diff``, times in seconds (``grad``, ``hvp``, ``ggn``), compile
    times (``compile_grad``, ...), and the JAX products along ``v`` (``hvp_v``, ``ggn_v``) for
    comparison with hessfunc. Raises ``AssertionError`` if the forward differs by ``check_tol``
    or more.
    """
    dev = jax_device(device)
    jw = convert(w, dev)
    diff = forward_max_abs_diff(w, jw)
    print(f"[{w.name}] JAX forward vs torch logits: max abs diff {diff:.2e}", flush=True)
    if check_tol is not None:
        assert diff < check_tol, (
            f"{w.name}: JAX forward differs from torch by {diff:.2e} (>= {check_tol:g}); "
            "not timing a different function"
        )
    elif diff > 1e-3:  # GPU: TF32 convolutions in torch by default; warn rather than stop the run
        print(f"WARNING [{w.name}]: JAX and torch logits differ by {diff:.1e}", flush=True)
    vj = tree_to_jax(v, dev)
    fns = make_products(jw)
    calls = {
        "grad": lambda: fns["grad"](jw.params),
        "hvp": lambda: fns["hvp"](jw.params, vj),
        "ggn": lambda: fns["ggn"](jw.params, vj),
    }
    res: dict[str, Any] = {"forward_diff": diff}
    for key, call in calls.items():
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        res[f"compile_{key}"] = time.perf_counter() - t0
        if key != "grad":
            res[f"{key}_v"] = out
        # same warmup/repeat policy as the torch timings; the torch sync is a no-op for "cpu"
        res[key] = common.timeit(
            lambda call=call: jax.block_until_ready(call()), "cpu", repeat=repeat
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default="mlp,cnn,transformer")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    if jax is None:
        print(f"JAX not importable, nothing to do: {JAX_ERROR}")
        return
    print(versions())
    rows = []
    for name in filter(None, a.workloads.split(",")):
        w = workloads.WORKLOADS[name](device=a.device)
        from hessfunc._base import _tree

        v = _tree.random_like(w.params, torch.Generator().manual_seed(0))
        r = run(w, a.device, v, a.repeat, check_tol=1e-4 if a.device == "cpu" else None)
        rows.append(
            [
                name,
                r["forward_diff"],
                r["grad"] * 1e3,
                r["hvp"] * 1e3,
                r["ggn"] * 1e3,
                r["hvp"] / r["grad"],
                r["ggn"] / r["grad"],
            ]
        )
    print(
        common.table(
            [
                "workload",
                "forward max abs diff",
                "grad ms",
                "hvp ms",
                "ggn ms",
                "hvp / grad",
                "ggn / grad",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
