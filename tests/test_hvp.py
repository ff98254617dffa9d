"""Hessian-vector products: against dense matrices, autograd double backward, and each other."""

import pytest
import torch
import torch.nn.functional as F
import zoo
from conftest import assert_close, tol
from torch import nn
from torch.func import vmap

import hessfunc
from hessfunc._base import _tree

MODES = ("fwd-rev", "rev-rev")


def autograd_hvp(f, params, v, *args):
    """Reference HVP by torch.autograd double backward (no torch.func involved)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves, spec = _tree.tree_flatten(params)
    leaves = [p.detach().clone().requires_grad_(True) for p in leaves]
    with sdpa_kernel(SDPBackend.MATH):
        out = f(_tree.tree_unflatten(spec, leaves), *args)
        grads = torch.autograd.grad(out, leaves, create_graph=True)
        hv = torch.autograd.grad(grads, leaves, _tree.tree_leaves(v), allow_unused=True)
    hv = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(leaves, hv, strict=True)]
    return _tree.tree_unflatten(spec, hv)


def direction(params, seed=1):
    return _tree.random_like(params, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_hvp_equals_matrix_times_v(mode):
    c = zoo.case("mlp-tanh", "ce")
    v = direction(c.params)
    H = hessfunc.hessian_matrix(c.f, c.params, *c.args)
    hv = hessfunc.hvp(c.f, c.params, v, *c.args, mode=mode)
    torch.testing.assert_close(
        hessfunc.ravel(hv)[0], H @ hessfunc.ravel(v)[0], **tol("exact", torch.float64)
    )


def test_modes_agree_and_symmetry_holds():
    c = zoo.case("cnn", "mse")
    u, v = direction(c.params, 1), direction(c.params, 2)
    Hv = hessfunc.hvp(c.f, c.params, v, *c.args)
    Hu = hessfunc.hvp(c.f, c.params, u, *c.args)
    assert_close(Hv, hessfunc.hvp(c.f, c.params, v, *c.args, mode="rev-rev"))
    torch.testing.assert_close(_tree.vdot(u, Hv), _tree.vdot(Hu, v), **tol("exact", torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_hvps_matches_stacked_hvp(mode, chunk_size):
    c = zoo.case("mlp-gelu", "mse")
    vs = _tree.random_like(c.params, torch.Generator().manual_seed(3), batch=5)
    batched = hessfunc.hvps(c.f, c.params, vs, *c.args, mode=mode, chunk_size=chunk_size)
    for i in range(5):
        vi = _tree.tree_map(lambda t: t[i], vs)
        assert_close(
            _tree.tree_map(lambda t: t[i], batched), hessfunc.hvp(c.f, c.params, vi, *c.args)
        )


def test_vmap_of_hvp_composes():
    c = zoo.case("mlp-softplus", "ce")
    vs = _tree.random_like(c.params, torch.Generator().manual_seed(4), batch=3)
    out = vmap(lambda v: hessfunc.hvp(c.f, c.params, v, *c.args))(vs)
    assert_close(out, hessfunc.hvps(c.f, c.params, vs, *c.args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model", zoo.MODELS)
@pytest.mark.parametrize("mode", MODES)
def test_models_against_autograd_double_backward(model, mode, dtype):
    c = zoo.case(model, "ce", dtype=dtype)
    v = direction(c.params)
    assert_close(
        hessfunc.hvp(c.f, c.params, v, *c.args, mode=mode), autograd_hvp(c.f, c.params, v, *c.args)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", zoo.LOSSES)
def test_losses_against_autograd_double_backward(loss, dtype):
    c = zoo.case("mlp-tanh", loss, dtype=dtype)
    v = direction(c.params)
    ref = autograd_hvp(c.f, c.params, v, *c.args)
    for mode in MODES:
        assert_close(hessfunc.hvp(c.f, c.params, v, *c.args, mode=mode), ref)


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_dense_hessian_of_cnn_and_transformer(model):
    c = zoo.case(model, "mse")
    H = hessfunc.hessian_matrix(c.f, c.params, *c.args, chunk_size=256)
    assert_close(H, zoo.raveled_reference(c.f, c.params, *c.args))


# --- workarounds for torch sharp edges, each under a test -------------------------------------


def test_mse_loss_forward_over_reverse_works():
    # jvp(grad(f)) raises "ZeroTensors are immutable" with F.mse_loss (pytorch#123996)
    w, x, y = torch.randn(3), torch.randn(5, 3), torch.randn(5)
    f = lambda w, x, y: F.mse_loss(x @ w, y)
    hv = hessfunc.hvp(f, w, torch.ones(3), x, y)
    torch.testing.assert_close(hv, 2 * x.T @ x @ torch.ones(3) / 5, **tol("exact", torch.float64))


NORMS = {
    "layer_norm": lambda h, p: F.layer_norm(h.permute(0, 2, 3, 1), (4,), p["g"], p["b"]),
    "batch_norm_batch_stats": lambda h, p: F.batch_norm(
        h, None, None, p["g"], p["b"], training=True
    ),
    "batch_norm_eval": lambda h, p: F.batch_norm(
        h, torch.ones(4) * 0.1, torch.ones(4) * 2, p["g"], p["b"]
    ),
    "instance_norm": lambda h, p: F.instance_norm(h, weight=p["g"], bias=p["b"]),
    "group_norm": lambda h, p: F.group_norm(h, 2, p["g"], p["b"]),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
def test_normalisation_layers_are_differentiated_correctly(norm, mode):
    # torch.func's second derivatives through the fused norm kernels are wrong once the affine
    # weight is differentiated together with the input; hessfunc routes them to composites.
    x = torch.randn(3, 4, 2, 2)
    params = {"w": torch.randn(4, 4) / 2, "g": torch.randn(4), "b": torch.randn(4)}

    def f(p, x):
        h = torch.einsum("nchw,dc->ndhw", x, p["w"])
        return NORMS[norm](h, p).pow(3).sum()

    v = direction(params)
    assert_close(hessfunc.hvp(f, params, v, x, mode=mode), autograd_hvp(f, params, v, x))


@pytest.mark.parametrize("mode", MODES)
def test_fused_attention_gets_the_math_kernel(mode):
    # the CPU flash kernel has no forward AD and no double backward (pytorch#117629, #128971)
    q = torch.randn(2, 2, 4, 3)
    f = lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True).pow(2).sum()
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(torch.func.jacrev(f), (q,), (q,))
    hv = hessfunc.hvp(f, q, q, mode=mode)
    assert_close(hv, autograd_hvp(f, q, q))


def test_transformer_encoder_fast_path_is_avoided():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    apply, params = hessfunc.from_module(layer)
    x = torch.randn(2, 3, 8)
    f = lambda p, x: apply(p, x).pow(2).sum()
    v = direction(params)
    assert_close(hessfunc.hvp(f, params, v, x), autograd_hvp(f, params, v, x))
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


class CubeNoJvp(torch.autograd.Function):
    """x**3 with a differentiable backward but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_missing_forward_ad_names_the_fix_and_rev_rev_works():
    x = torch.randn(4)
    f = lambda x: CubeNoJvp.apply(x).sum()
    with pytest.raises(NotImplementedError, match=r"hessfunc.hvp.*mode='rev-rev'"):
        hessfunc.hvp(f, x, torch.ones(4))
    torch.testing.assert_close(hessfunc.hvp(f, x, torch.ones(4), mode="rev-rev"), 6 * x)
    with pytest.raises(NotImplementedError, match=r"hessfunc.hessian_matrix.*mode='rev-rev'"):
        hessfunc.hessian_matrix(f, x)
    torch.testing.assert_close(hessfunc.hessian_matrix(f, x, mode="rev-rev"), torch.diag(6 * x))


@pytest.mark.parametrize("model", ["mlp-tanh", "cnn", "transformer"])
def test_hessian_operator_reuses_one_graph_and_equals_hvp(model):
    c = zoo.case(model, "ce")
    H = hessfunc.hessian_operator(c.f, c.params, *c.args, chunk_size=2)
    v, w = direction(c.params, 1), direction(c.params, 2)
    assert_close(H(v), autograd_hvp(c.f, c.params, v, *c.args))
    stacked = _tree.tree_map(lambda a, b: torch.stack([a, b, a - b]), v, w)
    expected = hessfunc.hvps(c.f, c.params, stacked, *c.args)
    assert_close(H.matmat(stacked), expected)
    # it is an operator like any other: the top eigenvalue agrees with the dense Hessian's
    if model == "mlp-tanh":
        top = hessfunc.eigsh(H, v, 1, num_iters=40).eigenvalues
        dense = torch.linalg.eigvalsh(hessfunc.hessian_matrix(c.f, c.params, *c.args))
        torch.testing.assert_close(top, dense[-1:], rtol=1e-8, atol=1e-10)


def test_hessian_operator_routes_norms_like_every_product():
    # a fused layer norm differentiated twice is wrong without hessfunc's routing; the operator
    # builds its graph with the routing on, so its products are exact
    x = torch.randn(3, 5)
    p = {"w": torch.randn(5), "b": torch.randn(5)}
    f = lambda p, x: F.layer_norm(x, (5,), p["w"], p["b"]).pow(3).sum()
    v = direction(p)
    H = hessfunc.hessian_operator(f, p, x)
    assert_close(H(v), autograd_hvp(lambda p, x: f(p, x), p, v, x))
