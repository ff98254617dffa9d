"""Composite normalisation kernels: every way into a fused kernel is routed, the composites
compute the kernels' values, and second derivatives through every entry point are exact
(against Richardson-extrapolated finite differences of plain autograd gradients of the fused
function, whose first derivatives are right)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import hessfunc
from hessfunc._base import _decomp
from hessfunc._base._context import second_order_kernels

MODES = ("fwd-rev", "rev-rev")
aten = torch.ops.aten


def _stats():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5


# entry point -> (differentiated inputs, call(diff inputs, running stats) -> outputs).
# Inputs are (x, weight, bias) or, for weight normalisation, (v, g).
def _x(shape=(3, 4, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g)


def _ln(shape=(3, 4, 5)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g)


def _wn():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


ENTRIES = {
    "F.layer_norm": (_ln, lambda p, s: F.layer_norm(p[0], (5,), p[1], p[2])),
    "torch.layer_norm": (_ln, lambda p, s: torch.layer_norm(p[0], (5,), p[1], p[2])),
    "torch.native_layer_norm": (
        _ln,
        lambda p, s: torch.native_layer_norm(p[0], (5,), p[1], p[2], 1e-5),
    ),
    "aten.native_layer_norm.default": (
        _ln,
        lambda p, s: aten.native_layer_norm.default(p[0], [5], p[1], p[2], 1e-5),
    ),
    "aten.layer_norm": (_ln, lambda p, s: aten.layer_norm(p[0], [5], p[1], p[2])),
    "F.rms_norm": (_ln, lambda p, s: F.rms_norm(p[0], (5,), p[1], 1e-6)),
    "torch.rms_norm": (_ln, lambda p, s: torch.rms_norm(p[0], (5,), p[1])),
    "torch._fused_rms_norm": (_ln, lambda p, s: torch._fused_rms_norm(p[0], [5], p[1], 1e-6)),
    "F.batch_norm[train]": (_x, lambda p, s: F.batch_norm(p[0], *s, p[1], p[2], training=True)),
    "F.batch_norm[eval]": (_x, lambda p, s: F.batch_norm(p[0], *s, p[1], p[2])),
    "F.batch_norm[batch stats]": (
        _x,
        lambda p, s: F.batch_norm(p[0], None, None, p[1], p[2], training=True),
    ),
    "torch.batch_norm": (
        _x,
        lambda p, s: torch.batch_norm(p[0], p[1], p[2], *s, True, 0.3, 1e-5, False),
    ),
    "torch.native_batch_norm[train]": (
        _x,
        lambda p, s: torch.native_batch_norm(p[0], p[1], p[2], *s, True, 0.3, 1e-5),
    ),
    "torch.native_batch_norm[eval]": (
        _x,
        lambda p, s: torch.native_batch_norm(p[0], p[1], p[2], *s, False, 0.3, 1e-5),
    ),
    "torch._native_batch_norm_legit": (
        _x,
        lambda p, s: torch._native_batch_norm_legit(p[0], p[1], p[2], *s, True, 0.3, 1e-5),
    ),
    "aten._native_batch_norm_legit.no_stats": (
        _x,
        lambda p, s: aten._native_batch_norm_legit.no_stats(p[0], p[1], p[2], True, 0.1, 1e-5),
    ),
    "torch._native_batch_norm_legit_no_training": (
        _x,
        lambda p, s: torch._native_batch_norm_legit_no_training(p[0], p[1], p[2], *s, 0.1, 1e-5),
    ),
    "F.instance_norm": (_x, lambda p, s: F.instance_norm(p[0], *s, p[1], p[2], momentum=0.3)),
    "F.instance_norm[running]": (
        _x,
        lambda p, s: F.instance_norm(p[0], *s, p[1], p[2], use_input_stats=False),
    ),
    "torch.instance_norm": (
        _x,
        lambda p, s: torch.instance_norm(p[0], p[1], p[2], None, None, True, 0.1, 1e-5, False),
    ),
    "F.group_norm": (_x, lambda p, s: F.group_norm(p[0], 2, p[1], p[2])),
    "torch.group_norm": (_x, lambda p, s: torch.group_norm(p[0], 2, p[1], p[2])),
    "torch.native_group_norm": (
        _x,
        lambda p, s: torch.native_group_norm(p[0], p[1], p[2], 3, 4, 25, 2, 1e-5),
    ),
    "torch._weight_norm": (_wn, lambda p, s: torch._weight_norm(p[0], p[1], 0)),
    "torch._weight_norm_interface": (
        _wn,
        lambda p, s: torch._weight_norm_interface(p[0], p[1], 0),
    ),
    "torch._weight_norm[dim=-1]": (
        lambda: (_wn()[0], torch.tensor(1.7)),
        lambda p, s: torch._weight_norm(p[0], p[1], -1),
    ),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _objective(call, stats):
    """A scalar with a non-trivial Hessian in every input: cubic in the kernel's output."""

    def f(p):
        out = _first(call(p, stats))
        w = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
        return (w * out).sum() + out.pow(3).sum() / 3

    return f


def _fd_hvp(f, p, v, h=1e-3):
    """Richardson-extrapolated central differences of plain autograd gradients."""

    def grad_at(t):
        leaves = [(a + t * b).detach().requires_grad_(True) for a, b in zip(p, v, strict=True)]
        grads = torch.autograd.grad(f(tuple(leaves)), leaves, allow_unused=True)
        return [torch.zeros_like(a) if g is None else g for a, g in zip(p, grads, strict=True)]

    def central(s):
        return [(a - b) / (2 * s) for a, b in zip(grad_at(s), grad_at(-s), strict=True)]

    d1, d2 = central(h), central(2 * h)
    return tuple((4 * a - b) / 3 for a, b in zip(d1, d2, strict=True))


@pytest.mark.parametrize("name", ENTRIES)
def test_composite_computes_the_kernels_values(name):
    make, call = ENTRIES[name]
    p = make()
    s1, s2 = _stats(), _stats()
    fused = call(p, s1)
    with second_order_kernels():
        routed = call(p, s2)
    for a, b in zip(
        fused if isinstance(fused, tuple) else (fused,),
        routed if isinstance(routed, tuple) else (routed,),
        strict=True,
    ):
        torch.testing.assert_close(b, a, **tol("exact", torch.float64))
    # running statistics move as the fused kernel moves them
    for a, b in zip(s1, s2, strict=True):
        torch.testing.assert_close(b, a, **tol("exact", torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ENTRIES)
def test_hvp_through_every_entry_point(name, mode):
    make, call = ENTRIES[name]
    p = make()
    g = torch.Generator().manual_seed(3)
    v = tuple(torch.randn(t.shape, generator=g) for t in p)
    expected = _fd_hvp(_objective(call, _stats()), p, v)
    got = hessfunc.hvp(lambda q: _objective(call, _stats())(q), p, v, mode=mode)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_fused_kernels_are_wrong_without_the_routing():
    # a negative control: the same check through the fused kernel fails, so the test above can
    from torch.func import jacrev, jvp

    make, call = ENTRIES["torch.layer_norm"]
    p = make()
    v = tuple(torch.ones_like(t) for t in p)
    f = _objective(call, None)
    expected = _fd_hvp(f, p, v)
    fused = jvp(jacrev(f), (p,), (v,))[1]
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(fused, expected, strict=True))
    assert err > 1e-3


# Names in the normalisation family that need no route, and why.
EXEMPT = {
    "_batch_norm_impl_index": "internal: reached only from batch_norm, which is routed",
    "_batch_norm_with_update": "internal: produced by torch's decompositions of batch_norm",
    "_batch_norm_with_update_functional": "internal, as _batch_norm_with_update",
    "_batch_norm_no_update": "internal, as _batch_norm_with_update",
    "_native_batch_norm_legit_functional": "internal: functionalised form used by compilers",
    "cudnn_batch_norm": "GPU kernel reached only from batch_norm",
    "miopen_batch_norm": "GPU kernel reached only from batch_norm",
    "quantized_batch_norm": "quantized tensors are not differentiated",
    "batch_norm_stats": "statistics kernel of SyncBatchNorm; no derivative formula",
    "batch_norm_elemt": "SyncBatchNorm's elementwise kernel, differentiated by its Function",
    "batch_norm_gather_stats": "SyncBatchNorm statistics, no derivative",
    "batch_norm_gather_stats_with_counts": "SyncBatchNorm statistics, no derivative",
    "batch_norm_update_stats": "running statistics only",
    "embedding_renorm": "in-place renormalisation, refused by from_module (max_norm)",
    "embedding_renorm_": "in-place renormalisation, refused by from_module (max_norm)",
    "_no_grad_embedding_renorm_": "in-place renormalisation, refused by from_module (max_norm)",
    "local_response_norm": "written in Python from elementary ops",
    "normalize": "written in Python from elementary ops",
}
FAMILY = re.compile(r"(layer|batch|group|instance|rms|weight|embedding_re)_?norm")


def test_every_entry_point_of_a_fused_kernel_is_routed():
    aten_names = {
        n.split("::")[1].split(".")[0]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("aten::")
    }
    namespaces = {
        "torch": (torch, dir(torch)),
        "torch._C._VariableFunctions": (
            torch._C._VariableFunctions,
            dir(torch._C._VariableFunctions),
        ),
        "torch.nn.functional": (F, dir(F)),
        "torch.ops.aten": (aten, aten_names),
    }
    missing = []
    for label, (ns, names) in namespaces.items():
        for name in names:
            if not FAMILY.search(name) or "backward" in name or name in EXEMPT:
                continue
            obj = getattr(ns, name, None)
            if obj is None or not callable(obj):
                continue
            callables = [obj]
            if isinstance(obj, torch._ops.OpOverloadPacket):
                callables += [getattr(obj, o) for o in obj.overloads() if "out" not in o]
            missing += [f"{label}.{name}" for c in callables if c not in _decomp.ROUTES]
    assert not missing, f"fused normalisation entry points not routed: {sorted(set(missing))}"
