"""Upstream behaviour hessfunc works around, pinned so that a torch release that changes it is
noticed (each test names the workaround to revisit).

The smallest torch-only reproduction of inductor's miscompile of forward-over-reverse products
(torch 2.13, CPU): the HVP of ``f(W) = ||softmax(h h^T) h||^2`` with ``h = rmsnorm(x W^T)`` on a
3-D batch ``x``, as ``jvp(grad(f))``, compiled with the default backend. The 2-D version of the
same function, ``backend="aot_eager"`` and ``torch._inductor.config.cpp.simdlen = 1`` (no
vectorised kernels) are all right, so the vectorised C++ kernels are at fault.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad, jvp

pytestmark = pytest.mark.compile


def norm_attention(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ W.T
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (torch.softmax(h @ h.transpose(-1, -2), -1) @ h).pow(2).sum()


def forward_over_reverse(W: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return jvp(lambda w: grad(norm_attention)(w, x), (W,), (V,))[1]


def inputs(shape: tuple[int, ...] = (1, 10, 8)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    W, V = (torch.randn(d, d, generator=g) for _ in range(2))
    return W, V, torch.randn(shape, generator=g)


@functools.cache
def compiled_error(shape: tuple[int, ...] = (1, 10, 8), **compile_kwargs) -> float:
    """Relative error of the compiled float32 product against float64 eager, one thread."""
    W, V, x = inputs(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        out = torch.compile(forward_over_reverse, fullgraph=True, **compile_kwargs)(W, V, x)
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
    ref = forward_over_reverse(W.double(), V.double(), x.double())
    return float((out.double() - ref).norm() / ref.norm())


def miscompiled() -> bool:
    """Whether this torch, on this CPU, miscompiles the reproduction."""
    return compiled_error() > 1e-2


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the reproduction concerns inductor's CPU kernels"
)
def test_inductor_miscompiles_forward_over_reverse_through_norm_attention():
    err = compiled_error()
    assert err > 1e-2, (
        f"torch {torch.__version__} now compiles the forward-over-reverse reproduction right "
        f"(relative error {err:.2g}). hessfunc traces every Hessian product reverse-over-reverse "
        "under torch.compile because of it (hessfunc._base._context.traced_mode): rerun the whole "
        "compile zoo with forward-over-reverse before revisiting that rule."
    )


def test_the_reproduction_is_right_without_the_miscompile():
    # the same function eagerly in float32, and compiled without inductor's kernels, is right:
    # the reference and the function are sound, only the generated code is not
    W, V, x = inputs()
    ref = forward_over_reverse(W.double(), V.double(), x.double())
    eager = forward_over_reverse(W, V, x)
    assert float((eager.double() - ref).norm() / ref.norm()) < 1e-5
    assert compiled_error(backend="aot_eager") < 1e-5


_DOT_JVP = """
import torch
from torch.func import jvp
u, w, t = torch.randn(8), torch.randn(8), torch.randn(8)
out = torch.compile(lambda w, t: jvp(lambda w: torch.dot(u, w), (w,), (t,))[1])(w, t)
print(float(out - torch.dot(u, t)))
"""


def test_compiled_forward_mode_dot_crashes_the_process():
    """Inductor's forward-mode derivative of ``torch.dot`` segfaults on its first call (torch 2.13
    CPU). hessfunc routes ``dot`` and ``vdot`` to a product and a sum during second-order
    evaluations (``_decomp.dot``). When this fails, the crash is fixed: revisit that route."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DOT_JVP], capture_output=True, text=True)
    if out.returncode == 0:  # the crash may depend on the CPU's vector extensions too
        assert abs(float(out.stdout.strip())) < 1e-5, out.stdout
        pytest.skip(
            f"torch {torch.__version__} no longer crashes here and gets it right: revisit "
            "hessfunc._base._decomp.dot"
        )
    assert "Segmentation fault" in out.stderr or out.returncode == -11, out.stderr[-500:]
