"""Products accept whatever the model returns: tensors, dicts, registered dataclasses, ModelOutputs.

Reference: the same model returning its logits tensor alone. Returning them inside a container,
next to other floating outputs (which the loss does not read), integer tensors and an opaque
cache object, must change nothing, in both AD modes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from conftest import assert_close

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss

N, D, C = 6, 4, 3


class OpaqueCache:
    """Stands in for a transformers DynamicCache: holds tensors, unknown to any pytree."""

    def __init__(self, k: torch.Tensor) -> None:
        self.k = k


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor
    cache: object = None


pytree.register_dataclass(Out)


def _setup():
    g = torch.Generator().manual_seed(0)
    p = {
        "w1": torch.randn(5, D, generator=g),
        "b1": torch.randn(5, generator=g),
        "w2": torch.randn(C, 5, generator=g),
    }
    X = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return p, X, y


def _parts(p, X):
    h = torch.tanh(F.linear(X, p["w1"], p["b1"]))
    return F.linear(h, p["w2"]), h


def as_tensor(p, X):
    return _parts(p, X)[0]


def as_dict(p, X):
    logits, h = _parts(p, X)
    return {"hidden": h, "logits": logits, "ids": logits.argmax(-1), "cache": OpaqueCache(h)}


def as_dataclass(p, X):
    logits, h = _parts(p, X)
    return Out(logits, h, OpaqueCache(h))


def as_tuple_first(p, X):  # a callable loss picks what it needs
    logits, h = _parts(p, X)
    return logits, h


MODELS = {"dict": as_dict, "dataclass": as_dataclass}


def _flat(tree):
    return _tree.ravel(tree)[0]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_container_outputs_equal_the_tensor_output(kind, mode):
    p, X, y = _setup()
    model = MODELS[kind]
    loss = CrossEntropyLoss(y)
    v = _tree.random_like(p, torch.Generator().manual_seed(1))
    ref = _flat(hessfunc.ggn_vp(as_tensor, loss, p, v, X, mode=mode))
    assert ref.abs().max() > 1e-3
    assert_close(_flat(hessfunc.ggn_vp(model, loss, p, v, X, mode=mode)), ref)
    # a plain callable reads the field itself; the cache it never sees is None
    pick = (lambda o: o["logits"]) if kind == "dict" else (lambda o: o.logits)

    def value(o):
        cache = o["cache"] if kind == "dict" else o.cache
        assert cache is None
        return F.cross_entropy(pick(o), y)

    assert_close(_flat(hessfunc.ggn_vp(model, value, p, v, X, mode=mode)), ref)
    vs = torch.func.vmap(lambda t: t)(_tree.random_like(p, torch.Generator(), batch=2))
    assert_close(
        _flat(hessfunc.ggn_vps(model, loss, p, vs, X, mode=mode)),
        _flat(hessfunc.ggn_vps(as_tensor, loss, p, vs, X, mode=mode)),
    )
    assert_close(
        hessfunc.ggn_matrix(model, loss, p, X, mode=mode),
        hessfunc.ggn_matrix(as_tensor, loss, p, X, mode=mode),
    )
    for fkind, extra in (("empirical", {}), ("mc", {"noise": torch.rand(2, N, C)})):
        mc = {"mc_samples": 2} if fkind == "mc" else {}
        a = hessfunc.fisher_vp(model, loss, p, v, X, kind=fkind, mode=mode, **extra, **mc)
        b = hessfunc.fisher_vp(as_tensor, loss, p, v, X, kind=fkind, mode=mode, **extra, **mc)
        assert_close(_flat(a), _flat(b))


@pytest.mark.parametrize("kind", list(MODELS))
def test_kfac_and_ekfac_read_the_logits_entry(kind):
    p, X, y = _setup()
    loss = CrossEntropyLoss(y)
    for build in (hessfunc.kfac, hessfunc.ekfac):
        a = build(MODELS[kind], loss, p, X).dense()
        b = build(as_tensor, loss, p, X).dense()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tuple_outputs_with_a_callable_loss_in_both_modes():
    p, X, y = _setup()
    v = _tree.random_like(p, torch.Generator().manual_seed(2))
    value = lambda o: F.cross_entropy(o[0], y) + 0.1 * (o[1] ** 2).sum()  # noqa: E731
    a = hessfunc.ggn_vp(as_tuple_first, value, p, v, X)
    b = hessfunc.ggn_vp(as_tuple_first, value, p, v, X, mode="rev-rev")
    assert_close(_flat(a), _flat(b))


def test_outputs_with_nothing_differentiable_are_refused():
    p, X, y = _setup()
    with pytest.raises(TypeError, match="no floating-point tensor"):
        hessfunc.ggn_vp(lambda p, X: OpaqueCache(X), lambda o: 0.0, p, p, X)
    with pytest.raises(TypeError, match="floating-point"):
        hessfunc.ggn_vp(lambda p, X: as_tensor(p, X).argmax(-1), lambda o: 0.0, p, p, X)


# ----------------------------------------------------------------------------- transformers


def _gpt2(cls_name: str):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=8, num_labels=3,
        pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).double().eval()
    apply, params = hessfunc.from_module(model)
    return model, apply, params


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_transformers_model_output_with_cache(mode):
    model, apply, params = _gpt2("GPT2LMHeadModel")
    ids = torch.randint(1, 30, (2, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(1))
    labels[:2] = -100
    out = apply(params, ids)
    assert type(out).__name__.endswith("Output") or "Output" in type(out).__name__
    assert any("Cache" in type(x).__name__ for x in pytree.tree_leaves(out))  # use_cache=True

    def full(p, ids):  # the ModelOutput as is, cache included
        return dict(logits=apply(p, ids).logits.reshape(-1, 30))

    def whole(p, ids):
        return apply(p, ids)

    def flat(p, ids):
        return apply(p, ids, use_cache=False).logits.reshape(-1, 30)

    value = lambda o: F.cross_entropy(o.logits.reshape(-1, 30), labels)  # noqa: E731
    loss = CrossEntropyLoss(labels)
    v = _tree.random_like(params, torch.Generator().manual_seed(3))
    ref = _flat(hessfunc.ggn_vp(flat, loss, params, v, ids, mode=mode))
    assert ref.abs().max() > 1e-4
    assert_close(_flat(hessfunc.ggn_vp(whole, value, params, v, ids, mode=mode)), ref)
    assert_close(_flat(hessfunc.ggn_vp(full, loss, params, v, ids, mode=mode)), ref)
    a = hessfunc.fisher_vp(full, loss, params, v, ids, mode=mode)
    b = hessfunc.fisher_vp(flat, loss, params, v, ids, mode=mode)
    assert_close(_flat(a), _flat(b))


def test_transformers_classifier_output_feeds_a_loss_object():
    model, apply, params = _gpt2("GPT2ForSequenceClassification")
    ids = torch.randint(1, 30, (3, 4), generator=torch.Generator().manual_seed(0))
    loss = CrossEntropyLoss(torch.tensor([0, 2, 1]))
    v = _tree.random_like(params, torch.Generator().manual_seed(4))
    ref = hessfunc.ggn_vp(lambda p, ids: apply(p, ids).logits, loss, params, v, ids)
    for mode in ("fwd-rev", "rev-rev"):
        got = hessfunc.ggn_vp(apply, loss, params, v, ids, mode=mode)
        assert_close(_flat(got), _flat(ref))


def test_influence_kfac_solver_reads_container_outputs():
    p, X, y = _setup()
    loss = lambda p, X, y: F.cross_entropy(as_tensor(p, X), y)  # noqa: E731
    scores = {}
    for name, model in (("tensor", as_tensor), ("dict", as_dict)):
        opts = {
            "model_fn": lambda p, X, y, m=model: m(p, X),
            "loss_fn": lambda X, y: CrossEntropyLoss(y),
        }
        scores[name] = hessfunc.influence(
            loss, p, (X, y), (X[:2], y[:2]), damping=0.1, solver="kfac", solver_options=opts
        )
    assert scores["tensor"].abs().max() > 1e-3
    assert_close(scores["dict"], scores["tensor"])


@pytest.mark.full
@pytest.mark.parametrize("kind", list(MODELS))
def test_container_outputs_compile_with_fullgraph(kind):
    """A dict holding an opaque cache, and a registered dataclass, trace without a break."""
    p, X, y = _setup()
    v = _tree.random_like(p, torch.Generator().manual_seed(1))
    model = MODELS[kind]

    def product(p, v, X, y):
        return hessfunc.ggn_vp(model, CrossEntropyLoss(y), p, v, X)

    got = torch.compile(product, fullgraph=True)(p, v, X, y)
    assert_close(_flat(got), _flat(product(p, v, X, y)))
