"""Errors and warnings that name the cause: gradient checkpointing and a lower-precision loss."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import hessfunc
from hessfunc.checking.check import LowPrecisionWarning, check_hvp

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


W, X = _randn(3, 3), _randn(4, 3, seed=1)


# ----------------------------------------------------------------------------- checkpointing


def _checkpointed(reentrant):
    def f(w, x):
        return checkpoint(lambda x: torch.tanh(x @ w.T), x, use_reentrant=reentrant).pow(2).sum()

    return f


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_checkpoint_is_named_with_the_fix(reentrant, mode):
    with pytest.raises(NotImplementedError) as info:
        hessfunc.hvp(_checkpointed(reentrant), W, W, X, mode=mode)
    msg = str(info.value)
    assert msg.startswith("hessfunc.hvp(f, params, v, *args): f runs gradient (activation) check")
    assert "gradient_checkpointing_disable()" in msg and "checkpoint(fn, ...)" in msg
    # the fix works: the same function without checkpointing
    plain = hessfunc.hvp(lambda w, x: torch.tanh(x @ w.T).pow(2).sum(), W, W, X, mode=mode)
    assert plain.shape == W.shape


def test_checkpoint_named_by_the_dense_hessian_too():
    with pytest.raises(NotImplementedError, match=r"^hessfunc\.hessian_matrix.*checkpointing"):
        hessfunc.hessian_matrix(_checkpointed(False), W, X)


def test_requires_grad_hook_is_named_as_checkpointing():
    """transformers' gradient_checkpointing_enable() installs a forward hook that calls
    requires_grad_() on the embeddings' output (``make_inputs_require_grads``)."""
    emb = torch.nn.Embedding(5, 3).double()

    def make_inputs_require_grads(module, inputs, output):
        output.requires_grad_(True)

    handle = emb.register_forward_hook(make_inputs_require_grads)
    apply, named = hessfunc.from_module(emb)
    try:
        with pytest.raises(NotImplementedError, match="disable_input_require_grads"):
            hessfunc.hvp(lambda p: apply(p, torch.tensor([1, 2])).pow(3).sum(), named, named)
    finally:
        handle.remove()


@pytest.mark.full
def test_transformers_gradient_checkpointing():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().train()
    model.gradient_checkpointing_enable()
    apply, named = hessfunc.from_module(model)
    ids = torch.randint(32, (2, 5))

    def f(p, ids):
        logits = apply(p, input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids.reshape(-1))

    with pytest.raises(NotImplementedError, match="gradient_checkpointing_disable"):
        hessfunc.hvp(f, named, named, ids, mode="rev-rev")
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()
    hv = hessfunc.hvp(f, named, named, ids, mode="rev-rev")
    assert torch.isfinite(hessfunc.ravel(hv)[0]).all()


# ----------------------------------------------------------------------------- precision


def _upcast_loss(w, x):
    """float64 parameters, the loss computed in float32 (as ``logits.float()`` does)."""
    return torch.tanh(x @ w.T).float().pow(2).sum()


def test_lower_precision_loss_warns_once_per_call():
    hessfunc._base._checks._WARNED.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hessfunc.hvp(_upcast_loss, W, W, X)
        hessfunc.hvp(_upcast_loss, W, W, X, mode="rev-rev")
        hessfunc.hessian_matrix(_upcast_loss, W, X)
        hessfunc.hvp(lambda w, x: torch.tanh(x @ w.T).pow(2).sum(), W, W, X)  # float64: quiet
    ours = [w for w in seen if issubclass(w.category, LowPrecisionWarning)]
    assert [str(w.message).split(":")[0] for w in ours] == [
        "hessfunc.hvp(f, params, v, *args)",
        "hessfunc.hessian_matrix(f, params, *args)",
    ]
    assert "float32" in str(ours[0].message) and ".logits" in str(ours[0].message)


def test_lower_precision_model_outputs_warn_in_gauss_newton_and_fisher():
    """A model that casts its outputs to float32 (float64 parameters): the GGN, Fisher and
    K-FAC products say so, once per call site, and a float64 model stays quiet."""
    from hessfunc.losses import MSELoss

    hessfunc._base._checks._WARNED.clear()
    y = torch.zeros(X.shape[0], W.shape[0], dtype=torch.float32)
    low = lambda w, x: torch.tanh(x @ w.T).float()  # noqa: E731
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hessfunc.ggn_vp(low, MSELoss(y), W, W, X)
        hessfunc.ggn_vp(low, MSELoss(y), W, W, X, mode="rev-rev")
        hessfunc.fisher_vp(low, MSELoss(y), W, W, X)
        hessfunc.ggn_vp(lambda w, x: torch.tanh(x @ w.T), MSELoss(y.double()), W, W, X)
    ours = [w for w in seen if issubclass(w.category, LowPrecisionWarning)]
    assert [str(w.message).split(":")[0] for w in ours] == [
        "hessfunc.ggn_vp(model_fn, loss_fn, params, v, *args)",
        str(ours[1].message).split(":")[0],
    ]
    assert ours[1].message.args[0].startswith("hessfunc.fisher_vp(")
    assert "model_fn returns a torch.float32 output" in str(ours[0].message)


def test_lower_precision_check_survives_fullgraph_compile():
    hessfunc._base._checks._WARNED.clear()
    compiled = torch.compile(lambda w, v: hessfunc.hvp(_upcast_loss, w, v, X), fullgraph=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = compiled(W, W)
        compiled(W, 2 * W)
    assert any(issubclass(w.category, LowPrecisionWarning) for w in seen)
    torch.testing.assert_close(got, hessfunc.hvp(_upcast_loss, W, W, X, mode="rev-rev"))


def test_check_hvp_blames_precision_not_a_backward_formula():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowPrecisionWarning)
        report = check_hvp(_upcast_loss, W, X, raise_on_fail=False)
    assert not report.ok
    assert "computed in lower precision" in report.message
    assert "backward formula of an op" not in report.message


def test_check_hvp_names_pseudo_gradients():
    """A straight-through estimator: the gradient is a surrogate, and the diagnosis says so."""

    class RoundSTE(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return torch.round(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

        @staticmethod
        def jvp(ctx, t):
            return t

    def f(w, x):
        return RoundSTE.apply(x @ w.T * 3).pow(2).sum()

    report = check_hvp(f, W, X, raise_on_fail=False)
    assert not report.ok
    assert "pseudo-gradient" in report.message and "straight-through" in report.message
