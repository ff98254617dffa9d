"""The compile-correctness zoo: every public product, in every mode, compiled with the default
inductor backend and ``fullgraph=True``, against float64 eager, on the architectures of
``compile_zoo.py``, with one and with two intra-op threads.

Inductor's code depends on the dtype, the shapes and the thread count, and ``aot_eager`` runs
none of that code, so only inductor against an independent float64 reference can see its
miscompiles. A fast subset (the architectures where miscompiles were found) runs by default; the
whole zoo runs with ``pytest tests/test_compile_zoo.py --full`` (hours on a 2-core CPU; part of
the release checklist in the README).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import compile_zoo
import pytest
import torch
from compile_zoo import ARCHS

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss

pytestmark = pytest.mark.compile

# Norm-wise relative error allowed between a compiled product and the float64 eager one.
# float32 products are exact up to float32 rounding (~1e-6 relative observed); finite
# differences in float32 carry their own truncation and rounding error (~1e-3), so they are
# compared with the same stencil evaluated eagerly in float32 instead.
RTOL = {
    ("exact", torch.float32): 1e-4,
    ("exact", torch.float64): 1e-9,
    ("fd", torch.float32): 1e-3,
    ("fd", torch.float64): 1e-7,
}
MODES = ("fwd-rev", "rev-rev")
# Short solves: every unrolled step is compiled. The damping keeps every system positive definite
# and the LiSSA scale is far above the top eigenvalue of every architecture's Hessian here.
INFLUENCE_OPTIONS = {
    "cg": {"maxiter": 2, "tol": None},
    "lissa": {"scale": 50.0, "num_iters": 2},
    "low_rank": {"rank": 2, "num_iters": 3},
    "dense": {},
}


def _stack(*trees):
    return _tree.tree_map(lambda *xs: torch.stack(xs), *trees)


def products(apply, per_sample: bool, float_inputs: bool, dtype, classes: int = 0) -> dict:
    """name -> (fn(params, v, w, x, y) -> pytree, comparison kind), the same closures eager and
    compiled; ``v`` and ``w`` are two directions like ``params``."""

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(apply(p, x), y)

    def model(p, x):
        return apply(p, x)

    out = {}
    for m in MODES:
        out[f"hvp[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.hvp(loss, p, v, x, y, mode=m),
            "exact",
        )
        out[f"hvps[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.hvps(loss, p, _stack(v, w), x, y, mode=m),
            "exact",
        )
        out[f"hessian_matrix[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.hessian_matrix(loss, p, x, y, mode=m),
            "exact",
        )
        if float_inputs:  # the Hessian with respect to the inputs, as a block pytree
            out[f"hessian_inputs[{m}]"] = (
                lambda p, v, w, x, y, m=m: hessfunc.hessian(
                    lambda x, p, y: loss(p, x, y), argnums=0, mode=m
                )(x, p, y),
                "exact",
            )
        out[f"ggn_vp[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.ggn_vp(model, CrossEntropyLoss(y), p, v, x, mode=m),
            "exact",
        )
        out[f"ggn_vps[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.ggn_vps(
                model, CrossEntropyLoss(y), p, _stack(v, w), x, mode=m
            ),
            "exact",
        )
        out[f"ggn_matrix[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.ggn_matrix(
                model, CrossEntropyLoss(y), p, x, mode=m
            ),
            "exact",
        )
        if per_sample:
            out[f"fisher_vp_empirical[{m}]"] = (
                lambda p, v, w, x, y, m=m: hessfunc.fisher_vp(
                    model, CrossEntropyLoss(y), p, v, x, mode=m
                ),
                "exact",
            )
            out[f"fisher_vp_mc[{m}]"] = (
                lambda p, v, w, x, y, m=m: hessfunc.fisher_vp(
                    model,
                    CrossEntropyLoss(y),
                    p,
                    v,
                    x,
                    kind="mc",
                    noise=_noise(y, classes, p),
                    mc_samples=2,
                    mode=m,
                ),
                "exact",
            )
        out[f"newton_cg_step[{m}]"] = (
            lambda p, v, w, x, y, m=m: (
                hessfunc.newton_cg_step(loss, p, x, y, damping=1.0, maxiter=3, mode=m).params
            ),
            "exact",
        )
        # model outputs in a container (a dict holding an integer tensor, like a cache), and
        # padded targets (ignore_index): the same products through the outputs' one path
        out[f"ggn_vp_dict_outputs[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.ggn_vp(
                lambda q, x: {"logits": model(q, x), "steps": torch.ones(1, dtype=torch.long)},
                CrossEntropyLoss(y),
                p,
                v,
                x,
                mode=m,
            ),
            "exact",
        )
        out[f"ggn_vp_ignore_index[{m}]"] = (
            lambda p, v, w, x, y, m=m: hessfunc.ggn_vp(
                model, CrossEntropyLoss(_padded(y)), p, v, x, mode=m
            ),
            "exact",
        )
    if per_sample and float_inputs:
        out["per_sample_grads"] = (
            lambda p, v, w, x, y: hessfunc.per_sample_grads(loss, p, x, y),
            "exact",
        )
    out["newton_cg_step[ggn]"] = (
        lambda p, v, w, x, y: (
            hessfunc.newton_cg_step(
                loss,
                p,
                x,
                y,
                curvature=lambda q, t: hessfunc.ggn_vp(model, CrossEntropyLoss(y), q, t, x),
                damping=1.0,
                maxiter=3,
            ).params
        ),
        "exact",
    )
    # Kronecker-factored curvature: the factors built, then matvec and the damped solve in the
    # same graph (compared through these products: eigenbases are defined up to signs)
    out["kfac"] = (
        lambda p, v, w, x, y: _kronecker(hessfunc.kfac(model, CrossEntropyLoss(y), p, x), v, w),
        "exact",
    )
    out["kfac_empirical"] = (
        lambda p, v, w, x, y: _kronecker(
            hessfunc.kfac(model, CrossEntropyLoss(y), p, x, fisher="empirical"), v, w
        ),
        "exact",
    )
    out["kfac_ignore_index"] = (
        lambda p, v, w, x, y: _kronecker(
            hessfunc.kfac(model, CrossEntropyLoss(_padded(y)), p, x), v, w
        ),
        "exact",
    )
    if float_inputs:  # logits over the zoo's C classes
        out["kfac_mc"] = (
            lambda p, v, w, x, y: _kronecker(
                hessfunc.kfac(
                    model, CrossEntropyLoss(y), p, x, fisher="mc", noise=_noise(y, classes, p),
                    mc_samples=2,
                ),
                v,
                w,
            ),
            "exact",
        )  # fmt: skip
    if per_sample and float_inputs:  # per-sample gradients: samples on axis 0 of every layer
        out["ekfac"] = (
            lambda p, v, w, x, y: _kronecker(
                hessfunc.ekfac(model, CrossEntropyLoss(y), p, x), v, w
            ),
            "exact",
        )
    out["cg"] = (
        lambda p, v, w, x, y: (
            hessfunc.cg(lambda t: hessfunc.hvp(loss, p, t, x, y), v, maxiter=3, damping=1.0).x
        ),
        "exact",
    )
    out["hessian_operator"] = (
        lambda p, v, w, x, y: hessfunc.hessian_operator(loss, p, x, y).matmat(_stack(v, w)),
        "exact",
    )
    # the matvec algorithms over a product of this model (their model-independent parts are in
    # tests/test_spectral_compile.py); few iterations, since loops unroll under compile
    out["hutchinson_trace[hvp]"] = (
        lambda p, v, w, x, y: (
            hessfunc.hutchinson_trace(
                lambda t: hessfunc.hvp(loss, p, t, x, y), _stack(v, w)
            ).estimate
        ),
        "exact",
    )
    out["eigsh[hessian_operator]"] = (
        lambda p, v, w, x, y: (
            hessfunc.eigsh(hessfunc.hessian_operator(loss, p, x, y), v, 1, num_iters=3).eigenvalues
        ),
        "exact",
    )
    out["slq[ggn_vp]"] = (
        lambda p, v, w, x, y: (
            hessfunc.slq(
                lambda t: hessfunc.ggn_vp(model, CrossEntropyLoss(y), p, t, x), _stack(v, w), 3
            ).nodes
        ),
        "exact",
    )
    out["sum_over[hvp]"] = (  # a dataset product over two batches of the same data
        lambda p, v, w, x, y: hessfunc.data.sum_over(
            lambda xb, yb: hessfunc.hvp(loss, p, v, xb, yb), [(x, y), (x, y)]
        ),
        "exact",
    )
    out["lissa"] = (
        lambda p, v, w, x, y: (
            hessfunc.lissa(
                lambda t: hessfunc.hvp(loss, p, t, x, y), v, [()] * 3, damping=1.0, scale=50.0
            ).x
        ),
        "exact",
    )
    out["low_rank_inverse"] = (
        lambda p, v, w, x, y: hessfunc.low_rank_inverse(
            lambda t: hessfunc.hvp(loss, p, t, x, y), v, 2, num_iters=3, damping=1.0
        ).solve(w),
        "exact",
    )
    if per_sample and float_inputs:  # per-sample gradients of the batch's own samples
        for solver, options in INFLUENCE_OPTIONS.items():
            out[f"influence[{solver}]"] = (
                lambda p, v, w, x, y, solver=solver, options=options: hessfunc.influence(
                    loss, p, (x, y), (x, y), damping=1.0, solver=solver, solver_options=options
                ),
                "exact",
            )
    if float_inputs:  # second-order optimizers: one refreshing step, draws fixed
        ce = lambda x, y: CrossEntropyLoss(y)  # noqa: E731
        model_xy = lambda p, x, y: apply(p, x)  # noqa: E731
        uniform = lambda p, v: _tree.tree_map(lambda t: torch.sigmoid(t)[None], v)  # noqa: E731
        out["gnb_diag"] = (
            lambda p, v, w, x, y: hessfunc.gnb_diag(
                model, CrossEntropyLoss(y), p, x, noise=_noise(y, classes, p)[0]
            ),
            "exact",
        )
        optimizers = {
            "sophia_h": lambda: hessfunc.optim.sophia(
                model_xy, ce, lr=0.01, estimator="hutchinson"
            ),
            "adahessian": lambda: hessfunc.optim.adahessian(model_xy, ce, lr=0.01),
        }
        for name, make in optimizers.items():
            out[f"optim.{name}"] = (
                lambda p, v, w, x, y, make=make: make().step(
                    p, make().init(p), x, y, noise=uniform(p, v), refresh=True
                )[:2],
                "exact",
            )
        out["optim.sophia_g"] = (
            lambda p, v, w, x, y: hessfunc.optim.sophia(model_xy, ce, lr=0.01).step(
                p, hessfunc.optim.sophia(model_xy, ce, lr=0.01).init(p), x, y,
                noise=_noise(y, classes, p)[0], refresh=True,
            )[:2],
            "exact",
        )  # fmt: skip
        # the first K-FAC step (factors, eigendecompositions, the quadratic model's step size
        # and momentum); the new parameters only: eigenvectors in the state have free signs.
        # Fixed draws for the diagonal of leaves no Kronecker block covers (norms, embeddings)
        out["optim.kfac"] = (
            lambda p, v, w, x, y: hessfunc.optim.kfac(model_xy, ce).step(
                p, hessfunc.optim.kfac(model_xy, ce).init(p), x, y,
                noise=_noise(y, classes, p)[:1], refresh=True,
            )[0],
            "exact",
        )  # fmt: skip
        out["optim.sharpness"] = (
            lambda p, v, w, x, y: (
                hessfunc.optim.sharpness(model_xy, ce, num_iters=3)
                .step(p, hessfunc.optim.sharpness(model_xy, ce).init(p), x, y, refresh=True)[2]
                .eigenvalue
            ),
            "exact",
        )
        # a K-FAC Laplace posterior fitted and its evidence, in one graph
        out["laplace[kfac]"] = (
            lambda p, v, w, x, y: (
                hessfunc.laplace.fit(
                    lambda q, x, *rest: apply(q, x), ce, p, [(x, y)], structure="kfac"
                )
                .log_marginal_likelihood()
                .estimate
            ),
            "exact",
        )
        # a full-GGN Laplace posterior (per-sample Jacobians, eigendecomposition) and its
        # evidence: the dense memory guard reads no free memory inside the compiled graph
        out["laplace[full]"] = (
            lambda p, v, w, x, y: (
                hessfunc.laplace.fit(
                    lambda q, x, *rest: apply(q, x), ce, p, [(x, y)], structure="full"
                )
                .log_marginal_likelihood()
                .estimate
            ),
            "exact",
        )
        # the K-FAC posterior's linearised predictive: J Σ Jᵀ from the layers' inputs and
        # output gradients (no per-sample Jacobian), fitted and evaluated in one graph
        out["laplace.predictive[kfac]"] = (
            lambda p, v, w, x, y: hessfunc.laplace.fit(
                lambda q, x, *rest: apply(q, x), ce, p, [(x, y)], structure="kfac"
            ).predictive(x, link="none"),
            "exact",
        )
        out["optim.hessian_free"] = (
            lambda p, v, w, x, y: hessfunc.optim.hessian_free(model_xy, ce, maxiter=2).step(
                p, hessfunc.optim.hessian_free(model_xy, ce).init(p), x, y
            )[0],
            "exact",
        )
    out["fd_grad"] = (
        lambda p, v, w, x, y: hessfunc.fd_grad(loss, p, x, y, directions=_stack(v, w)),
        "fd",
    )
    out["fd_hvp"] = (lambda p, v, w, x, y: hessfunc.fd_hvp(loss, p, v, x, y), "fd")
    out["fd_hvps"] = (lambda p, v, w, x, y: hessfunc.fd_hvps(loss, p, _stack(v, w), x, y), "fd")
    out["fd_hessian_matrix"] = (
        lambda p, v, w, x, y: hessfunc.fd_hessian_matrix(loss, p, x, y),
        "fd",
    )
    return out


def _kronecker(op, v, w):
    return op.matvec(v), op.solve(w, 1.0)


def _padded(y):
    """``y`` with every third target the ignored index (-100), as in padded token batches."""
    return torch.where(torch.arange(y.numel()).reshape(y.shape) % 3 == 0, -100, y)


def _noise(y, classes, p):
    """Fixed uniform draws for the Monte-Carlo Fisher, shaped (samples, *y.shape, classes)."""
    ref = _tree.tree_leaves(p)[0]
    g = torch.linspace(0.01, 0.99, 2 * y.numel() * classes, dtype=ref.dtype, device=ref.device)
    return g.reshape(2, *y.shape, classes).flip(-1)


@contextlib.contextmanager
def settings(dtype: torch.dtype, threads: int):
    """Default dtype of the model (as its user would have it) and intra-op threads."""
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(old_threads)
        torch.set_default_dtype(old_dtype)


def relative_error(actual, expected) -> float:
    """Largest leaf-wise ``||a - e|| / ||e||``, each leaf's norm floored at 1e-3 of the whole
    result's (a leaf of near-zero curvature is held to the scale of the product)."""
    la, le = _tree.tree_leaves(actual), _tree.tree_leaves(expected)
    assert len(la) == len(le)
    total = math.sqrt(sum(float(e.double().pow(2).sum()) for e in le))
    worst = 0.0
    for a, e in zip(la, le, strict=True):
        assert a.shape == e.shape, (a.shape, e.shape)
        diff = float((a.double() - e.double()).norm())
        worst = max(worst, diff / max(float(e.double().norm()), 1e-3 * total, 1e-300))
    return worst


def run_case(arch: str, product: str, dtype: torch.dtype, threads: int) -> tuple[float, float]:
    """``(error, allowed)``: the compiled product's relative error against float64 eager and
    what it may be; ``(0, 0)`` when dynamo refuses the architecture as recorded."""
    spec = ARCHS[arch]
    model64 = compile_zoo.build(arch, torch.float64)
    apply64, p64 = hessfunc.from_module(model64)
    x64, y = compile_zoo.data(arch, torch.float64)
    float_inputs = x64.is_floating_point()
    v64 = _tree.random_like(p64, torch.Generator().manual_seed(2))
    w64 = _tree.random_like(p64, torch.Generator().manual_seed(3))
    with settings(dtype, threads):
        model = compile_zoo.build(arch, dtype)
        apply, p = hessfunc.from_module(model)
        x, _ = compile_zoo.data(arch, dtype)
        v, w = (_tree.tree_map(lambda t: t.to(dtype), t) for t in (v64, w64))
        classes = apply64(p64, x64).shape[-1]  # the model's classes (a vocabulary for tokens)
        fn, kind = products(apply, spec.per_sample, float_inputs, dtype, classes)[product]
        compiled = torch.compile(fn, fullgraph=True)
        if spec.refused is not None:
            with pytest.raises(Exception, match=spec.refused):
                compiled(p, v, w, x, y)
            return 0.0, 0.0
        got = compiled(p, v, w, x, y)
        same_dtype = fn(p, v, w, x, y)  # eager, in the compiled dtype
        if kind == "fd":  # finite differences: the same stencil, evaluated eagerly
            expected, eager_err = same_dtype, 0.0
        else:
            fn64, _ = products(apply64, spec.per_sample, float_inputs, torch.float64, classes)[
                product
            ]
            expected = fn64(p64, v64, w64, x64, y)
            eager_err = relative_error(same_dtype, expected)
    # A product whose float32 rounding is amplified (a few CG steps on an ill-conditioned
    # system) may differ from float64 by more than RTOL in eager code too; the compiled result
    # may then be as far off as eager float32 is, with a margin, never more. The miscompiles
    # this zoo is for are errors of order one.
    assert eager_err < 1e-2, f"{arch} {product}: eager {dtype} is {eager_err:.3g} off float64"
    err = relative_error(got, expected)
    # 30x: with two threads, batch-statistics BatchNorm under the rev-rev GGN came out 14x the
    # eager float32 error (2e-4): summation order through a variance, not a miscompile
    allowed = max(RTOL[(kind, dtype)], 30 * eager_err)
    return err, allowed


def _names(arch: str) -> list[str]:
    spec = ARCHS[arch]
    return list(products(None, spec.per_sample, spec.inputs != "tokens", torch.float32))


# The fast subset: the blocks where inductor miscompiled forward-over-reverse (a norm before
# projection-free self-attention on a 3-D batch; top-k routing), in the modes that were wrong,
# and one composite of solvers on top of products.
FAST = [
    ("hand_rmsnorm_attention", "hvp[fwd-rev]", torch.float32, 1),
    ("rmsnorm_attention", "hvp[fwd-rev]", torch.float32, 1),
    ("normalize_attention", "hvp[fwd-rev]", torch.float32, 1),
    ("rmsnorm_attention_residual_gelu", "ggn_vp[fwd-rev]", torch.float32, 1),
    ("mixture_of_experts", "hvp[fwd-rev]", torch.float32, 1),
    ("mixture_of_experts", "hessian_matrix[fwd-rev]", torch.float32, 2),
    ("gru", "hvp[rev-rev]", torch.float32, 1),
    # weight normalisation's private kernel, which dynamo did not hand to the routing mode
    ("weight_norm", "hvp[rev-rev]", torch.float32, 1),
    # spectral_norm's vdot, whose compiled forward-mode derivative crashed the process
    ("spectral_norm", "ggn_vp[fwd-rev]", torch.float32, 1),
    # the default influence route (per-sample gradients, a vmapped CG over the test samples)
    ("grouped_conv", "influence[cg]", torch.float32, 1),
    # Kronecker factors: grouped convolutions (the unfold with groups), and weights shared over
    # a sequence in an eval-mode nn.TransformerEncoderLayer, whose fused fast path the compiled
    # graph took (hiding its linear layers) until the passes switched it off
    ("grouped_conv", "kfac", torch.float32, 1),
    ("transformer_encoder_layer", "ekfac", torch.float32, 1),
    # padding rows held constant and an EmbeddingBag routed to a lookup: forward-over-reverse
    # through the bag's first route (an index_add) compiled 10-20% wrong
    ("padded_embeddings", "ggn_vp[fwd-rev]", torch.float32, 1),
]

# With two threads inductor parallelises other loops, so the code differs; the products built
# from these (dense matrices, solvers, finite differences) repeat their kernels.
TWO_THREADS = {
    "hvp[fwd-rev]",
    "hvps[fwd-rev]",
    "hessian_matrix[fwd-rev]",
    "ggn_vp[fwd-rev]",
    "ggn_vp[rev-rev]",
    "ggn_vps[fwd-rev]",
    "fisher_vp_empirical[fwd-rev]",
}
FULL = [
    (arch, product, torch.float32, threads)
    for arch in ARCHS
    for product in _names(arch)
    for threads in ((1, 2) if product in TWO_THREADS else (1,))
] + [  # float64 for the norm-attention blocks
    (arch, f"hvp[{m}]", torch.float64, 1)
    for arch, m in itertools.product(
        [a for a in ARCHS if a.endswith(("attention", "attention_residual", "residual_gelu"))],
        MODES,
    )
]
FULL = [c for c in FULL if c not in FAST]


def _id(case) -> str:
    arch, product, dtype, threads = case
    return f"{arch}-{product}-{str(dtype).removeprefix('torch.')}-{threads}t"


@pytest.mark.parametrize("case", FAST, ids=_id)
def test_zoo_fast(case):
    err, allowed = run_case(*case)
    assert err <= allowed, f"{_id(case)}: relative error {err:.3g}, allowed {allowed:.3g}"


@pytest.mark.full
@pytest.mark.parametrize("case", FULL, ids=_id)
def test_zoo_full(case):
    err, allowed = run_case(*case)
    assert err <= allowed, f"{_id(case)}: relative error {err:.3g}, allowed {allowed:.3g}"


def test_zoo_covers_every_architecture_and_product():
    assert len(ARCHS) >= 20
    names = set(itertools.chain.from_iterable(_names(a) for a in ARCHS))
    for product in ("hvp", "hvps", "hessian_matrix", "ggn_vp", "ggn_vps", "ggn_matrix"):
        assert {f"{product}[{m}]" for m in MODES} <= names
    cases = {(a, p) for a, p, _, _ in FAST + FULL}
    assert all((a, p) in cases for a in ARCHS for p in _names(a))
