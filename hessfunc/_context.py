"""The second-order evaluation context: which kernels run, which AD mode is traced, and how AD
errors are reported.

Every public function that differentiates twice evaluates the user's function inside
:func:`second_order_kernels` and picks its AD mode through :func:`traced_mode`. Validation of
inputs lives in ``_checks``; this module holds what happens while ``f`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._decomp import CompositeNorms
from ._types import PyTree


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Run ``f`` with kernels that have second derivatives.

    The fused scaled-dot-product-attention kernels (flash, memory-efficient, and the CPU flash
    kernel ``_scaled_dot_product_flash_attention_for_cpu``) have neither forward-mode AD nor a
    differentiable backward (pytorch#117629, pytorch#128971), so any Hessian product through
    ``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention`` fails with them. The math
    kernel is composed of differentiable ops; we select it for every second-order evaluation.
    It costs O(L^2) memory in the sequence length, like the attention weights themselves.

    Normalisation layers are routed to composite forms at the same time (``_decomp``), because
    torch.func's second derivatives through their fused kernels are wrong.

    The fused inference fast paths of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` are switched off as well: under ``torch.compile`` the tensors
    inside torch.func transforms do not report ``requires_grad``, so an eval-mode layer takes
    ``torch._transformer_encoder_layer_fwd``, which has no derivatives (forward AD raises, and in
    larger graphs the Hessian came out silently wrong on torch 2.13).
    """
    # The flag is a plain module global; dynamo refuses to trace set_fastpath_enabled but does
    # trace an attribute store on the module.
    mha = torch.backends.mha
    fastpath = mha._is_fastpath_enabled
    mha._is_fastpath_enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH), CompositeNorms():
            yield
    finally:
        mha._is_fastpath_enabled = fastpath


def traced_mode(mode: str) -> str:
    """The AD mode a Hessian product uses: ``mode`` eagerly, reverse-over-reverse when compiled.

    The rule: under ``torch.compile`` no tangent is pushed through a reverse pass. Inductor has
    miscompiled forward-over-reverse products in ways that depend on how the model is written
    and on the shapes, never on anything hessfunc can recognise: on torch 2.13 CPU,

    * a norm (``nn.RMSNorm``, the same formula by hand, ``F.normalize``, LayerNorm) followed by
      projection-free self-attention on a 3-D batch: relative error 0.1 to 7, while the 2-D
      version of the same function is right. The C++ backend's vectorised code is at fault:
      the error goes away with ``torch._inductor.config.cpp.simdlen = 1``
      (``tests/test_upstream.py`` keeps the smallest torch-only reproduction);
    * top-k routing over gathered expert weights (``w[idx]``): relative error 0.9 to 9 with one
      intra-op thread, an ``InductorError`` with two.

    Reverse-over-reverse traced the same functions exactly in every case measured (the compile
    zoo in ``tests/test_compile_zoo.py``), and it is the faster compiled HVP on the CPU
    benchmarks (``benchmarks/RESULTS.md``). Both modes compute the same product, so tracing
    ``"fwd-rev"`` as ``"rev-rev"`` changes cost, not results. Eager calls keep the mode asked
    for. The generalised Gauss-Newton and Fisher products are not affected: their forward mode
    runs over the primal model only (``J v``), never through a reverse pass.
    """
    return "rev-rev" if torch.compiler.is_compiling() else mode


_FWD_AD_MARKERS = ("forward AD", "forward mode AD", "jvp function")


def forward_ad_hint(where: str, err: BaseException) -> NotImplementedError | None:
    """A hessfunc error for an op inside ``f`` that lacks forward-mode AD, else ``None``."""
    msg = str(err)
    if not any(m in msg for m in _FWD_AD_MARKERS):
        return None
    first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    return NotImplementedError(
        f"{where}: an operation inside f has no forward-mode AD, which mode='fwd-rev' needs "
        f"({first}). Pass mode='rev-rev' (reverse-over-reverse: same result, no forward mode), "
        "or replace the op (for a custom autograd.Function, implement its jvp staticmethod)."
    )


def with_fwd_hint(where: str, thunk: Callable[[], PyTree]) -> PyTree:
    """Run ``thunk``, turning a missing-forward-AD error into hessfunc's error with the fix."""
    try:
        return thunk()
    except (NotImplementedError, RuntimeError) as err:
        hint = forward_ad_hint(where, err)
        if hint is None:
            raise
        raise hint from err
