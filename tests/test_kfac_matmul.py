"""K-FAC where the weights really are: ``x @ W`` and ``torch.addmm(b, x, W)`` with ``W`` stored
``(in, out)`` (transformers' GPT-2 ``Conv1D``), and stacked expert weights.

References: the same network written with ``nn.Linear`` (weights transposed) must give the same
factors and, up to the transpose, the same products and dense matrix; K-FAC equals the GGN for a
single layer with MSE, which checks the ravel-order placement of a transposed block on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss, MSELoss

EXACT = dict(rtol=1e-12, atol=1e-12)


class StoredInOut(nn.Module):
    """A GPT-2 ``Conv1D`` written in torch only: ``W`` is ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 4) if bias else None

    def forward(self, x):
        if self.bias is None:
            return x @ self.weight
        shape = (*x.shape[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(shape)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = StoredInOut(4, 6)
        self.b = StoredInOut(6, 5, bias=False)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def as_linear(net: nn.Module) -> nn.Module:
    """The same network with every ``StoredInOut`` replaced by ``nn.Linear(W.T, b)``."""
    out = copy.deepcopy(net)
    for mod in list(out.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, StoredInOut) or type(child).__name__ == "Conv1D":
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, name, lin)
    return out


def transposed_names(net: nn.Module) -> set[str]:
    return {
        f"{n}.weight" if n else "weight"
        for n, m in net.named_modules()
        if isinstance(m, StoredInOut) or type(m).__name__ == "Conv1D"
    }


def _swap(tree: dict, names: set[str]) -> dict:
    return {k: (v.mT if k in names else v) for k, v in tree.items()}


def _permutation(params: dict, names: set[str]) -> torch.Tensor:
    """``perm`` with entry ``i`` of the Linear layout's ravel at entry ``perm[i]`` of ours."""
    index, start = {}, 0
    for k, v in params.items():
        index[k] = torch.arange(start, start + v.numel()).reshape(v.shape)
        start += v.numel()
    return _tree.ravel(_swap(index, names))[0]


def _compare(net, model_args, loss, tol=EXACT):
    names = transposed_names(net)
    apply, params = hessfunc.from_module(net)
    apply_l, params_l = hessfunc.from_module(as_linear(net))
    perm = _permutation(params, names)
    for build in (hessfunc.kfac, hessfunc.ekfac):
        mine = build(apply, loss, params, *model_args)
        ref = build(apply_l, loss, params_l, *model_args)
        assert [b.names for b in mine.layout.blocks] == [b.names for b in ref.layout.blocks]
        assert {b.op for b in mine.layout.blocks} >= {"matmul"}
        D, R = mine.dense(), ref.dense()
        assert R.abs().max() > 1e-3
        torch.testing.assert_close(D[perm][:, perm], R, **tol)
        v = _tree.random_like(params, torch.Generator().manual_seed(0))
        got = _swap(mine.matvec(v), names)
        want = ref.matvec(_swap(v, names))
        torch.testing.assert_close(_tree.ravel(got)[0], _tree.ravel(want)[0], **tol)
        torch.testing.assert_close(D @ _tree.ravel(v)[0], _tree.ravel(mine.matvec(v))[0], **tol)
        if build is hessfunc.kfac:
            for a, b in zip(mine.A + mine.G, ref.A + ref.G, strict=True):
                torch.testing.assert_close(a, b, **tol)
            x = mine.solve(v, damping=0.1)
            back = _tree.ravel(x)[0]
            n = back.numel()
            torch.testing.assert_close(
                (D + 0.1 * torch.eye(n)) @ back, _tree.ravel(v)[0], rtol=1e-9, atol=1e-9
            )


def test_stored_in_out_layers_match_their_linear_rewrite():
    torch.manual_seed(0)
    X = torch.randn(12, 4)
    y = torch.randint(0, 3, (12,))
    y[[2, 7]] = -100  # padded rows, as in token batches
    _compare(Net(), (X,), CrossEntropyLoss(y))


def test_single_addmm_layer_with_mse_is_exact():
    """K-FAC = GGN for one layer with MSE: the transposed block sits where ravel puts W."""
    torch.manual_seed(1)
    layer = StoredInOut(3, 4)
    apply, params = hessfunc.from_module(layer)
    X, Y = torch.randn(7, 3), torch.randn(7, 4)
    loss = MSELoss(Y)
    K = hessfunc.kfac(apply, loss, params, X).dense()
    G = hessfunc.ggn_matrix(apply, loss, params, X)
    torch.testing.assert_close(K, G, **EXACT)
    E = hessfunc.ekfac(apply, loss, params, X).dense()
    torch.testing.assert_close(E, G, **EXACT)


def test_weight_on_the_left_or_scaled_addmm_is_not_a_layer():
    g = torch.Generator().manual_seed(2)
    p = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    X = torch.randn(5, 3, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    left = lambda p, X: (p["w"] @ X.T).T  # noqa: E731
    K = hessfunc.kfac(lambda p, X: F.linear(X, p["w"], p["b"]), CrossEntropyLoss(y), p, X)
    assert K.covered == ("['w']", "['b']")
    with pytest.raises(ValueError, match="nothing to factor"):
        hessfunc.kfac(left, CrossEntropyLoss(y), {"w": p["w"]}, X)
    scaled = lambda p, X: torch.addmm(p["b"], X, p["w"].T.contiguous(), alpha=2.0)  # noqa: E731
    with pytest.raises(ValueError, match="nothing to factor"):
        hessfunc.kfac(scaled, CrossEntropyLoss(y), p, X)


def _moe_params(stacked: bool):
    g = torch.Generator().manual_seed(3)
    router = torch.randn(3, 4, generator=g)
    experts = torch.randn(3, 5, 4, generator=g) / 2
    head = torch.randn(3, 5, generator=g)
    if stacked:
        return {"router": router, "experts": experts, "head": head}
    return {"router": router, **{f"e{e}": experts[e] for e in range(3)}, "head": head}


def moe(p, X):
    """Top-1 routing written like transformers' eager experts: w[e] for each expert hit."""
    gate = torch.softmax(F.linear(X, p["router"]), -1)
    top = gate.argmax(-1)
    h = torch.zeros(X.shape[0], 5)
    for e in torch.unique(top):  # a 0-d tensor index, as transformers' loop has
        rows = torch.where(top == e)[0]
        w = p["experts"][e] if "experts" in p else p[f"e{int(e)}"]
        out = F.linear(X[rows], w) * gate[rows, e].unsqueeze(-1)
        h = h.index_add(0, rows, out)
    return F.linear(torch.tanh(h), p["head"])


def test_stacked_experts_get_one_block_per_expert_from_their_tokens():
    """= K-FAC of the same experts as separate parameters (same ravel order), an idle one too."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(9, 4, generator=g)
    X[:, 0] += 3.0  # the router sends no token to one of the experts
    y = torch.randint(0, 3, (9,), generator=g)
    stacked, separate = _moe_params(True), _moe_params(False)
    top = torch.softmax(F.linear(X, stacked["router"]), -1).argmax(-1)
    hit = sorted(set(top.tolist()))
    assert 1 <= len(hit) < 3, hit
    loss = CrossEntropyLoss(y)
    K = hessfunc.kfac(moe, loss, stacked, X)
    R = hessfunc.kfac(moe, loss, separate, X)
    assert [b.op for b in K.layout.blocks] == ["linear"] + [f"linear[expert {e}]" for e in hit] + [
        "linear"
    ]
    assert K.covered == ("['router']", "['experts']", "['head']")
    D, ref = K.dense(), R.dense()
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(D, ref, **EXACT)
    v = _tree.random_like(stacked, torch.Generator().manual_seed(5))
    v_sep = {
        "router": v["router"],
        **{f"e{e}": v["experts"][e] for e in range(3)},
        "head": v["head"],
    }
    for got, want in (
        (K.matvec(v), R.matvec(v_sep)),
        (K.solve(v, damping=0.1), R.solve(v_sep, damping=0.1)),
    ):
        torch.testing.assert_close(_tree.ravel(got)[0], _tree.ravel(want)[0], **EXACT)


def test_batched_expert_weights_are_uncovered_with_the_way_out():
    p = _moe_params(True)
    p["experts"] = p["experts"].mT.contiguous()  # stored (E, in, out) for bmm
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(7))

    def dense_moe(p, X):  # every expert on every token at once, softly gated
        gate = torch.softmax(F.linear(X, p["router"]), -1)
        h = torch.bmm(X.unsqueeze(0).expand(3, -1, -1), p["experts"])  # (E, N, 5)
        return F.linear(torch.tanh((gate.T.unsqueeze(-1) * h).sum(0)), p["head"])

    K = hessfunc.kfac(dense_moe, CrossEntropyLoss(y), p, X)
    assert K.covered == ("['router']", "['head']")
    ((path, why),) = K.uncovered
    assert path == "['experts']"
    assert "stacked" in why and "Loop over the experts" in why


def test_mixtral_eager_experts_get_one_block_per_routed_expert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=8, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=30, num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=16, attn_implementation="eager", experts_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    net = transformers.MixtralForCausalLM(cfg).double().eval()
    apply, params = hessfunc.from_module(net)
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(2))
    K = hessfunc.kfac(
        lambda p, i: apply(p, i, use_cache=False).logits.reshape(-1, 30),
        CrossEntropyLoss(y),
        params,
        ids,
    )
    covered = set(K.covered)
    for name in ("gate_up_proj", "down_proj"):
        path = f"['model.layers.0.mlp.experts.{name}']"
        assert path in covered
        blocks = [i for i, b in enumerate(K.layout.blocks) if b.names == (path,)]
        assert all(K.layout.blocks[i].op.startswith("linear[expert ") for i in blocks)
        # every token goes to 2 experts: the experts' rows add up to 2 x 10 tokens
        assert sum(int(K.positions[i]) for i in blocks) == 20


def test_gpt2_conv1d_matches_its_linear_rewrite():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=8,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(cfg).double().eval()
    names = transposed_names(net)
    assert len(names) == 8
    apply, params = hessfunc.from_module(net)
    apply_l, params_l = hessfunc.from_module(as_linear(net))
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(2))
    y[:2] = -100
    loss = CrossEntropyLoss(y)
    mine = hessfunc.kfac(lambda p, i: apply(p, i).logits.reshape(-1, 30), loss, params, ids)
    ref = hessfunc.kfac(lambda p, i: apply_l(p, i).logits.reshape(-1, 30), loss, params_l, ids)
    assert [b.names for b in mine.layout.blocks] == [b.names for b in ref.layout.blocks]
    assert len(mine.layout.blocks) == 8 and {b.op for b in mine.layout.blocks} == {"matmul"}
    for a, b in zip(mine.A + mine.G, ref.A + ref.G, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    v = _tree.random_like(params, torch.Generator().manual_seed(3))
    got = _swap(mine.matvec(v), names)
    want = ref.matvec(_swap(v, names))
    torch.testing.assert_close(_tree.ravel(got)[0], _tree.ravel(want)[0], **EXACT)


def test_compiled_kfac_of_stored_in_out_layers_matches_eager():
    torch.manual_seed(4)
    net = Net()
    apply, params = hessfunc.from_module(net)
    X = torch.randn(4, 4)
    y = torch.randint(0, 3, (4,))
    v = _tree.random_like(params, torch.Generator().manual_seed(5))

    def product(p, v, X, y):
        return hessfunc.kfac(apply, CrossEntropyLoss(y), p, X).matvec(v)

    compiled = torch.compile(product, fullgraph=True)
    got, want = compiled(params, v, X, y), product(params, v, X, y)
    torch.testing.assert_close(_tree.ravel(got)[0], _tree.ravel(want)[0], **EXACT)
