"""Embeddings whose backward is a pseudo-gradient: every product is a derivative of one function.

``nn.Embedding(padding_idx=p)`` zeroes the padding row's gradient on purpose. hessfunc reads
that as "row p is held constant" (``hessfunc/_base/_pseudo.py``), so the Hessian is ``P H P`` and
the GGN ``P G P``. The references here are built from the VALUE of a function that holds the row
constant explicitly with plain indexing (``torch.autograd.functional`` on it, and second
differences of ``f`` itself), never from torch's pseudo-gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tol
from torch import nn

import hessfunc
from hessfunc.losses import CrossEntropyLoss

D = torch.float64
MODES = ("fwd-rev", "rev-rev")
V, E, C, PAD = 5, 3, 2, 0
IDX = torch.tensor([[0, 1, 2, 0], [3, 0, 4, 4], [2, 2, 0, 1]])  # the padding id in every row
Y = torch.tensor([0, 1, 1])
N = IDX.shape[0]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _rv(tree):
    return hessfunc.ravel(tree)[0]


PARAMS = {"emb": _randn(V, E), "A": _randn(C, E, seed=1), "b": _randn(C, seed=2)}
SIZES = [t.numel() for t in PARAMS.values()]
FLAT = _rv(PARAMS)
n = FLAT.numel()
# P: zero on the padding row of the embedding, the identity elsewhere
KEEP = torch.ones(n, dtype=D)
KEEP[PAD * E : (PAD + 1) * E] = 0


def model(p, idx):
    """Two layers, the padding row reaching the loss through mean pooling over all positions."""
    h = F.embedding(idx, p["emb"], padding_idx=PAD).mean(1)
    return F.linear(h, p["A"], p["b"])


def f(p, idx, y):
    return F.cross_entropy(model(p, idx), y)


def _unflat(x):
    emb, A, b = x.split(SIZES)
    return emb.reshape(V, E), A.reshape(C, E), b


def held_logits(x):
    """The model with the padding row replaced by a constant: plain indexing, no pseudo-gradient."""
    emb, A, b = _unflat(x)
    emb = torch.cat([PARAMS["emb"][PAD : PAD + 1], emb[PAD + 1 :]])
    return emb[IDX].mean(1) @ A.T + b


def held_f(x):
    return F.cross_entropy(held_logits(x), Y)


H_REF = torch.autograd.functional.hessian(held_f, FLAT)
J_REF = torch.autograd.functional.jacobian(held_logits, FLAT)  # (N, C, n)
_P = torch.softmax(held_logits(FLAT), -1)
_R = _P - F.one_hot(Y, C).to(D)  # d loss_i / d logits_i
G_REF = (
    torch.einsum(
        "ica,icd,idb->ab", J_REF, torch.diag_embed(_P) - _P[:, :, None] * _P[:, None], J_REF
    )
    / N
)
F_REF = torch.einsum("ica,ic,id,idb->ab", J_REF, _R, _R, J_REF) / N
EXACT = tol("exact", D)


def _close(a, b, t=EXACT):
    torch.testing.assert_close(a, b, rtol=t["rtol"], atol=t["atol"])


def _dir(seed):
    return hessfunc.unravel(_randn(n, seed=seed), PARAMS) if hasattr(hessfunc, "unravel") else None


def _tree(x):
    emb, A, b = _unflat(x)
    return {"emb": emb, "A": A, "b": b}


V1, V2 = _randn(n, seed=10), _randn(n, seed=11)


def test_reference_is_p_h_p_and_differs_from_the_full_hessian():
    """The reference is the held-row Hessian (P H P); the full one has padding-row curvature."""
    full = torch.autograd.functional.hessian(
        lambda x: F.cross_entropy(_unflat(x)[0][IDX].mean(1) @ _unflat(x)[1].T + _unflat(x)[2], Y),
        FLAT,
    )
    _close(H_REF, KEEP[:, None] * full * KEEP[None, :])
    assert (full - H_REF).abs().max() > 1e-2  # the padding row matters at this point


def test_second_differences_of_f_agree_with_the_reference():
    """A VALUE-only reference: second differences of hessfunc's own f along held directions."""
    u, v = KEEP * V1, KEEP * V2

    def fx(x):
        return f(_tree(x), IDX, Y)

    h = 1e-3
    s = (fx(FLAT + h * u + h * v) - fx(FLAT + h * u - h * v) - fx(FLAT - h * u + h * v)) + fx(
        FLAT - h * u - h * v
    )
    s2 = s / (4 * h * h)
    h2 = h / 2
    t = (
        fx(FLAT + h2 * u + h2 * v)
        - fx(FLAT + h2 * u - h2 * v)
        - fx(FLAT - h2 * u + h2 * v)
        + fx(FLAT - h2 * u - h2 * v)
    ) / (4 * h2 * h2)
    richardson = (4 * t - s2) / 3
    torch.testing.assert_close(richardson, u @ H_REF @ v, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_hvps_hessian(mode):
    got = _rv(hessfunc.hvp(f, PARAMS, _tree(V1), IDX, Y, mode=mode))
    _close(got, H_REF @ V1)
    vs = {
        k: torch.stack([a, b])
        for k, a, b in zip(PARAMS, _tree(V1).values(), _tree(V2).values(), strict=True)
    }
    many = hessfunc.hvps(f, PARAMS, vs, IDX, Y, mode=mode)
    _close(torch.cat([many[k][1].reshape(-1) for k in PARAMS]), H_REF @ V2)
    H = hessfunc.hessian_matrix(f, PARAMS, IDX, Y, mode=mode)
    _close(H, H_REF)
    _close(H, H.T)
    blocks = hessfunc.hessian(lambda p: f(p, IDX, Y), mode=mode)(PARAMS)
    _close(blocks["emb"]["emb"].reshape(V * E, V * E), H_REF[: V * E, : V * E])


@pytest.mark.parametrize("mode", MODES)
def test_ggn_and_fisher(mode):
    G = hessfunc.ggn_matrix(model, CrossEntropyLoss(Y), PARAMS, IDX, mode=mode)
    _close(G, G_REF)
    _close(G, G.T)
    gv = hessfunc.ggn_vp(model, CrossEntropyLoss(Y), PARAMS, _tree(V1), IDX, mode=mode)
    _close(_rv(gv), G_REF @ V1)
    fv = hessfunc.fisher_vp(model, CrossEntropyLoss(Y), PARAMS, _tree(V1), IDX, mode=mode)
    _close(_rv(fv), F_REF @ V1)


def test_per_sample_grads_and_kfac_hold_the_row():
    g = hessfunc.per_sample_grads(lambda p, i, y: f(p, i, y), PARAMS, IDX, Y)
    assert g["emb"][:, PAD].abs().max() == 0
    ref = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda x, i=i: F.cross_entropy(held_logits(x)[i : i + 1], Y[i : i + 1]), FLAT
            )
            for i in range(N)
        ]
    )
    got = torch.cat([g[k].reshape(N, -1) for k in PARAMS], 1)
    _close(got, ref)
    K = hessfunc.kfac(model, CrossEntropyLoss(Y), PARAMS, IDX)
    assert any("emb" in name for name, _ in K.uncovered)  # no curvature claimed for the table


class MeanPoolClassifier(nn.Module):
    """A text classifier without attention mask: mean over every position, padding included."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=1)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


def _classifier():
    torch.manual_seed(0)
    net = MeanPoolClassifier().double()
    with torch.no_grad():  # a padding row that is not zero (loaded weights, a padding id in use)
        net.emb.weight[1] = _randn(4, seed=5)
    apply, named = hessfunc.from_module(net)
    idx = torch.tensor([[2, 1, 1], [3, 4, 1], [6, 1, 5], [1, 2, 3]])
    y = torch.tensor([0, 2, 1, 1])
    return net, apply, named, idx, y


def test_mean_pool_classifier_from_module():
    net, apply, named, idx, y = _classifier()
    w0 = named["emb.weight"]
    keys = list(named)

    def loss(p):
        return F.cross_entropy(apply(p, idx), y)

    def held(x):
        parts = dict(zip(keys, x.split([t.numel() for t in named.values()]), strict=True))
        p = {k: parts[k].reshape(named[k].shape) for k in keys}
        p["emb.weight"] = torch.cat([p["emb.weight"][:1], w0[1:2], p["emb.weight"][2:]])
        return F.cross_entropy(torch.func.functional_call(net, p, (idx,)), y)

    # reference: the module itself with the padding row replaced by a constant tensor; under
    # plain torch.autograd.functional, padding_idx's zeroed gradient would leak in, so the
    # module's lookup here must not see padding_idx at all
    net.emb.padding_idx = None
    ref = torch.autograd.functional.hessian(held, _rv(named))
    net.emb.padding_idx = 1
    for mode in MODES:
        H = hessfunc.hessian_matrix(loss, named, mode=mode)
        _close(H, ref)
        _close(H, H.T)
    assert net.emb.weight.grad is None  # nothing written to the module


def test_scale_grad_by_freq_is_the_plain_lookup():
    """Its backward rescales by frequency in the batch; hessfunc differentiates the value."""

    def g(p, freq):
        return F.embedding(IDX, p, scale_grad_by_freq=freq).tanh().pow(2).sum()

    w = PARAMS["emb"]
    ref = torch.autograd.functional.hessian(lambda x: x[IDX].tanh().pow(2).sum(), w)
    for mode in MODES:
        _close(hessfunc.hessian_matrix(g, w, True, mode=mode), ref.reshape(V * E, V * E))
        _close(
            hessfunc.hessian_matrix(lambda p: g(p, True), w, mode=mode),
            hessfunc.hessian_matrix(lambda p: g(p, False), w, mode=mode),
        )


def test_max_norm_is_refused_by_name():
    w = PARAMS["emb"].clone()
    with pytest.raises(NotImplementedError, match=r"^hessfunc\.hvp.*max_norm.*max_norm=None"):
        hessfunc.hvp(lambda p: F.embedding(IDX, p, max_norm=1.0).sum(), w, w)
    assert torch.equal(w, PARAMS["emb"])  # the refusal comes before any write


@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_padding_and_negative_padding_idx(mode):
    """embedding_bag leaves padding entries out of its forward: the plain derivative is right.
    A negative padding_idx counts from the end, as in F.embedding."""
    w = PARAMS["emb"]
    flat_idx, offsets = IDX.reshape(-1), torch.tensor([0, 5, 9])

    def bag(p):
        out = F.embedding_bag(flat_idx, p, offsets, mode="mean", padding_idx=PAD)
        return out.tanh().pow(2).sum()

    def bag_ref(x):
        rows = x.reshape(V, E)
        bags = [flat_idx[0:5], flat_idx[5:9], flat_idx[9:]]
        means = [rows[b[b != PAD]].mean(0) for b in bags]
        return torch.stack(means).tanh().pow(2).sum()

    _close(
        hessfunc.hessian_matrix(bag, w, mode=mode),
        torch.autograd.functional.hessian(bag_ref, w.reshape(-1)),
    )

    weights = torch.linspace(0.5, 1.5, flat_idx.numel(), dtype=D)

    def weighted(p):
        out = F.embedding_bag(flat_idx, p, offsets, mode="sum", per_sample_weights=weights)
        return out.tanh().pow(2).sum()

    def weighted_ref(x):
        rows = x.reshape(V, E)[flat_idx] * weights[:, None]
        return (
            torch.stack([rows[0:5].sum(0), rows[5:9].sum(0), rows[9:].sum(0)]).tanh().pow(2).sum()
        )

    _close(
        hessfunc.hessian_matrix(weighted, w, mode=mode),
        torch.autograd.functional.hessian(weighted_ref, w.reshape(-1)),
    )

    def last(p):
        return F.embedding(IDX, p, padding_idx=-1).tanh().pow(2).sum()

    H = hessfunc.hessian_matrix(last, w, mode=mode)
    assert H[-E:].abs().max() == 0 and H[:, -E:].abs().max() == 0
    _close(H, H.T)


def test_compiled_hvp_equals_float64_eager():
    """fullgraph=True with the default (inductor) backend: the routed lookup traces."""
    compiled = torch.compile(lambda p, v: hessfunc.hvp(f, p, v, IDX, Y), fullgraph=True)
    got = _rv(compiled(PARAMS, _tree(V1)))
    _close(got, H_REF @ V1)
    _close(_rv(compiled(PARAMS, _tree(V2))), H_REF @ V2)  # same shapes: no recompilation
    assert got[PAD * E : (PAD + 1) * E].abs().max() == 0  # the padding row is held
