"""from_module: order, strict names, tied and frozen weights, training-mode policy, no mutation."""

import copy

import pytest
import torch
import zoo
from conftest import assert_close
from test_hvp import autograd_hvp, direction
from torch import nn

import hessfunc
from hessfunc._base import _tree


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, i):
        return self.out(torch.tanh(self.frozen(self.emb(i))))


def test_params_order_tied_once_frozen_excluded_and_apply_matches_module():
    m = Tied()
    apply, params = hessfunc.from_module(m)
    assert list(params) == ["emb.weight"]
    i = torch.tensor([0, 3, 4])
    torch.testing.assert_close(apply(params, i), m(i))
    # the tied weight really is shared: perturbing it moves both uses
    moved = apply({"emb.weight": params["emb.weight"] + 1.0}, i)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.emb.weight += 1.0
    torch.testing.assert_close(moved, ref(i))


def test_unknown_and_missing_names_are_errors_with_suggestions():
    m = nn.Sequential(nn.Linear(2, 2))
    apply, params = hessfunc.from_module(m)
    bad = {"0.wieght": params["0.weight"], "0.bias": params["0.bias"]}
    with pytest.raises(
        KeyError, match=r"'0.wieght' \(did you mean '0.weight'\?\).*missing '0.weight'"
    ):
        apply(bad, torch.zeros(1, 2))
    with pytest.raises(KeyError, match="missing '0.bias'"):
        apply({"0.weight": params["0.weight"]}, torch.zeros(1, 2))
    with pytest.raises(TypeError, match="from_module"):
        hessfunc.from_module(lambda x: x)


def test_training_mode_batchnorm_and_dropout_are_refused():
    x = torch.randn(4, 3)
    for m in (
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)),
    ):
        apply, params = hessfunc.from_module(m.train())
        with pytest.raises(RuntimeError, match=r"module.eval\(\)"):
            apply(params, x)
        m.eval()
        apply(params, x)  # fine once in eval mode (the flag is read at call time)
    mha = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True).train()
    apply, params = hessfunc.from_module(mha)
    with pytest.raises(RuntimeError, match="MultiheadAttention"):
        apply(params, torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4))


def test_batch_statistics_without_running_stats_are_differentiated_exactly():
    m = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(), nn.Linear(4, 1)
    ).train()
    apply, params = hessfunc.from_module(m)
    x = torch.randn(6, 3)
    f = lambda p, x: apply(p, x).pow(2).mean()
    v = direction(params)
    assert_close(hessfunc.hvp(f, params, v, x), autograd_hvp(f, params, v, x))


def _snapshot(m):
    return {
        "state": {k: t.detach().clone() for k, t in m.state_dict(keep_vars=True).items()},
        "grad": {k: None if p.grad is None else p.grad.clone() for k, p in m.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in m.named_parameters()},
        "training": {k: s.training for k, s in m.named_modules()},
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
    }


def _assert_same(a, b):
    assert a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"]
    assert a["fastpath"] == b["fastpath"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grad"]:
        assert (a["grad"][k] is None) == (b["grad"][k] is None)
        if a["grad"][k] is not None:
            assert torch.equal(a["grad"][k], b["grad"][k])


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_nothing_is_mutated(model):
    c = zoo.case(model, "ce")
    m = c.model
    # give one parameter a .grad and freeze nothing else, to see both survive
    next(m.parameters()).grad = torch.ones_like(next(m.parameters()))
    before, rng = _snapshot(m), torch.get_rng_state()
    params_before = _tree.tree_map(torch.clone, c.params)
    v = direction(c.params)
    vs = _tree.random_like(c.params, torch.Generator().manual_seed(5), batch=2)
    hessfunc.hvp(c.f, c.params, v, *c.args)
    hessfunc.hvp(c.f, c.params, v, *c.args, mode="rev-rev")
    hessfunc.hvps(c.f, c.params, vs, *c.args, chunk_size=1)
    if model == "cnn":
        hessfunc.hessian_matrix(c.f, c.params, *c.args, chunk_size=64)
        hessfunc.hessian(c.f)(c.params, *c.args)
    _assert_same(before, _snapshot(m))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_close(c.params, params_before)
    assert all(not p.requires_grad for p in c.params.values())


def test_loss_with_inputs_as_kwargs():
    m = nn.MultiheadAttention(4, 2, batch_first=True).eval()
    apply, params = hessfunc.from_module(m)
    q = torch.randn(1, 3, 4)
    f = lambda p, q: apply(p, q, q, q, need_weights=False)[0].pow(2).sum()
    v = direction(params)
    assert_close(hessfunc.hvp(f, params, v, q), autograd_hvp(f, params, v, q))


# ----------------------------------------------------------------------------- side effects


def _state(m):
    """Everything a call could change: tensors (values and identity), flags, plain attributes."""
    tensors = {n: (t, t.clone()) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    attrs = {
        (n, k): v
        for n, sub in m.named_modules()
        for k, v in vars(sub).items()
        if isinstance(v, torch.Tensor)
    }
    flags = [(s.training, [p.requires_grad for p in s.parameters()]) for s in m.modules()]
    return tensors, attrs, flags, torch.get_rng_state()


def _assert_unchanged(m, before):
    tensors, attrs, flags, rng = before
    now = dict(list(m.named_parameters()) + list(m.named_buffers()))
    assert set(now) == set(tensors)
    for n, (obj, value) in tensors.items():
        assert now[n] is obj, n
        assert torch.equal(obj, value), n
    now_attrs = {
        (n, k): v
        for n, sub in m.named_modules()
        for k, v in vars(sub).items()
        if isinstance(v, torch.Tensor)
    }
    assert now_attrs.keys() == attrs.keys()
    assert all(now_attrs[k] is attrs[k] for k in attrs)
    assert flags == [(s.training, [p.requires_grad for p in s.parameters()]) for s in m.modules()]
    assert torch.equal(rng, torch.get_rng_state())


SIDE_EFFECTS = {
    "embedding_max_norm": (lambda: nn.Embedding(6, 3, max_norm=0.5), "max_norm", False),
    "embedding_bag_max_norm": (lambda: nn.EmbeddingBag(6, 3, max_norm=0.5), "max_norm", False),
    "rrelu_train": (lambda: nn.Sequential(nn.Linear(3, 3), nn.RReLU()), "RReLU", True),
    "spectral_norm_train": (
        lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)),
        "spectral_norm",
        True,
    ),
    "spectral_norm_hook_train": (
        lambda: nn.utils.spectral_norm(nn.Linear(3, 3)),
        "spectral_norm",
        True,
    ),
}


@pytest.mark.parametrize("name", SIDE_EFFECTS)
def test_layers_with_side_effects_are_refused_and_nothing_changes(name):
    build, match, train_only = SIDE_EFFECTS[name]
    m = build().double().train()
    x = torch.tensor([[0, 2, 5]]) if "embedding" in name else torch.randn(4, 3)
    apply, params = hessfunc.from_module(m)
    before = _state(m)
    f = lambda p, x: apply(p, x).pow(2).sum()
    with pytest.raises(RuntimeError, match=rf"(?s){match}.*hessfunc never changes"):
        hessfunc.hvp(f, params, direction(params), x)
    _assert_unchanged(m, before)
    m.eval()
    if train_only:  # evaluation mode is deterministic: exact and untouched
        before = _state(m)
        v = direction(params)
        assert_close(hessfunc.hvp(f, params, v, x), autograd_hvp(f, params, v, x))
        _assert_unchanged(m, before)
    else:
        with pytest.raises(RuntimeError, match=match):
            apply(params, x)


class OwnDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(x), 0.5, training=True)


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("cls", [OwnDropout, WritesBuffer])
def test_unknown_side_effects_are_detected_and_undone(cls):
    m = cls().double()
    apply, params = hessfunc.from_module(m)
    before = _state(m)
    with pytest.raises(RuntimeError, match="random numbers" if cls is OwnDropout else "'calls'"):
        hessfunc.hvp(lambda p, x: apply(p, x).sum(), params, direction(params), torch.ones(2, 3))
    _assert_unchanged(m, before)


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
@pytest.mark.parametrize(
    "wrap",
    [
        nn.utils.weight_norm,
        nn.utils.parametrizations.weight_norm,
        lambda m: nn.utils.spectral_norm(m).eval(),
    ],
    ids=["weight_norm_hook", "weight_norm", "spectral_norm_hook_eval"],
)
def test_weight_normalisations_are_exact_and_leave_the_module_alone(wrap, mode):
    torch.manual_seed(0)
    m = nn.Sequential(wrap(nn.Linear(3, 4).double()), nn.Tanh(), nn.Linear(4, 2).double())
    m.eval()
    x = torch.randn(5, 3)
    apply, params = hessfunc.from_module(m)
    f = lambda p, x: apply(p, x).pow(2).sum()
    before = _state(m)
    v = direction(params)
    expected = hessfunc.fd_hvp(f, params, v, x, order=4)  # first derivatives are right
    assert_close(hessfunc.hvp(f, params, v, x, mode=mode), expected, "fd")
    _assert_unchanged(m, before)


def test_lazy_modules_are_refused_until_initialised():
    m = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(ValueError, match="(?s)lazy.*forward pass"):
        hessfunc.from_module(m)
    m(torch.randn(1, 3))
    apply, params = hessfunc.from_module(m)
    assert list(params) == ["0.weight", "0.bias"]
