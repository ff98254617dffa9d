"""Padded token batches: ``ignore_index`` and label smoothing through every curvature product.

A per-token model (embedding, then two linear maps, logits flattened to ``(B T, V)``) makes the
strongest reference possible: because no token sees another, a padded batch must give exactly
the curvature of the batch with the ignored rows dropped (same ``1 / N_kept`` for ``"mean"``).
The GGN is also checked against a dense ``J^T H J`` built from the value of ``F.cross_entropy``
alone, and K-FAC against the GGN where it is exact (every kept token has the same input), which
only holds if padded positions are left out of the input factor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss, NLLLoss

V, D, H = 7, 3, 4
PEER = dict(rtol=1e-10, atol=1e-10)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(V, D, generator=g),
        "w1": torch.randn(H, D, generator=g) / 2,
        "b1": torch.randn(H, generator=g) / 2,
        "w2": torch.randn(V, H, generator=g) / 2,
    }


def token_model(p, ids):
    h = torch.tanh(F.linear(F.embedding(ids, p["emb"]), p["w1"], p["b1"]))
    return F.linear(h, p["w2"]).reshape(-1, V)


def _batch(pad: int = -100):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 5), generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 3:] = pad
    labels[1, 4] = pad
    keep = labels.reshape(-1) != pad
    return ids, labels.reshape(-1), keep


def _dense_ggn(loss_value, p, ids):
    """``J^T H J`` from the Jacobian of the outputs and the Hessian of the loss's value."""
    flat, unravel = hessfunc.ravel(p)
    out = token_model(p, ids)
    J = torch.autograd.functional.jacobian(lambda z: token_model(unravel(z), ids), flat)
    J = J.reshape(out.numel(), -1)
    Hl = torch.autograd.functional.hessian(
        lambda o: loss_value(o.reshape(out.shape)), out.reshape(-1)
    )
    return J.T @ Hl @ J


CASES = [
    ("ce-100-mean", -100, 0.0, "mean"),
    ("ce-100-smooth-mean", -100, 0.1, "mean"),
    ("ce-pad-class-sum", 2, 0.2, "sum"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_ggn_matrix_matches_dense_reference(case, mode):
    _, pad, smooth, red = case
    p = _params()
    ids, y, keep = _batch(pad)
    loss = CrossEntropyLoss(y, ignore_index=pad, label_smoothing=smooth, reduction=red)
    value = lambda o: F.cross_entropy(  # noqa: E731
        o, y, ignore_index=pad, label_smoothing=smooth, reduction=red
    )
    ref = _dense_ggn(value, p, ids)
    assert ref.abs().max() > 1e-3  # not vacuous
    assert_close(hessfunc.ggn_matrix(token_model, loss, p, ids, mode=mode), ref)
    # and the generic autodiff path (a plain callable) agrees with the closed form
    assert_close(hessfunc.ggn_matrix(token_model, value, p, ids, mode=mode), ref)


def _dropped(pad, y, keep, ids):
    return ids.reshape(1, -1)[:, keep], y[keep]


@pytest.mark.parametrize("pad", [-100, 2])
def test_padded_batch_equals_batch_without_the_ignored_rows(pad):
    """Fisher, K-FAC and EK-FAC of a padded batch = those of the kept tokens alone."""
    p = _params()
    ids, y, keep = _batch(pad)
    ids_k, y_k = _dropped(pad, y, keep, ids)
    padded = CrossEntropyLoss(y, ignore_index=pad, label_smoothing=0.1)
    kept = CrossEntropyLoss(y_k, label_smoothing=0.1)
    assert abs(float(padded(token_model(p, ids))) - float(kept(token_model(p, ids_k)))) < 1e-12
    v = _tree.random_like(p, torch.Generator().manual_seed(2))
    for kind in ("empirical",):
        a = hessfunc.fisher_vp(token_model, padded, p, v, ids, kind=kind)
        b = hessfunc.fisher_vp(token_model, kept, p, v, ids_k, kind=kind)
        assert_close(hessfunc.ravel(a)[0], hessfunc.ravel(b)[0])
    for fisher in ("type-2", "empirical"):
        # K-FAC on (B, T) token layers; EK-FAC needs the samples on axis 0 of every layer
        # input, so it sees the tokens as a flat batch
        for build, flat in ((hessfunc.kfac, False), (hessfunc.ekfac, True)):
            x, x_k = (ids.reshape(-1), ids_k.reshape(-1)) if flat else (ids, ids_k)
            a = build(token_model, padded, p, x, fisher=fisher).dense()
            b = build(token_model, kept, p, x_k, fisher=fisher).dense()
            assert a.abs().max() > 1e-3
            torch.testing.assert_close(a, b, **PEER)


def test_mc_fisher_of_padded_batch_samples_only_kept_rows():
    """With the same draws on the kept rows, the MC Fisher equals that of the kept batch."""
    p = _params()
    ids, y, keep = _batch(2)  # pad id 2 is also a class: sampled 2s must still count
    ids_k, y_k = _dropped(2, y, keep, ids)
    padded, kept = CrossEntropyLoss(y, ignore_index=2), CrossEntropyLoss(y_k)
    u = torch.rand(3, y.numel(), V, generator=torch.Generator().manual_seed(3))
    v = _tree.random_like(p, torch.Generator().manual_seed(4))
    a = hessfunc.fisher_vp(token_model, padded, p, v, ids, kind="mc", noise=u, mc_samples=3)
    b = hessfunc.fisher_vp(
        token_model, kept, p, v, ids_k, kind="mc", noise=u[:, keep], mc_samples=3
    )
    assert_close(hessfunc.ravel(a)[0], hessfunc.ravel(b)[0])
    ka = hessfunc.kfac(token_model, padded, p, ids, fisher="mc", noise=u, mc_samples=3).dense()
    kb = hessfunc.kfac(
        token_model, kept, p, ids_k, fisher="mc", noise=u[:, keep], mc_samples=3
    ).dense()
    torch.testing.assert_close(ka, kb, **PEER)


def test_kfac_is_exact_when_every_kept_token_has_the_same_input():
    """One linear layer, CE, padded rows with other inputs: K-FAC = GGN only if A skips them."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(D, generator=g)
    X = torch.randn(6, D, generator=g)
    y = torch.randint(0, V, (6,), generator=g)
    y[[1, 4]] = -100
    X[y != -100] = a  # every kept row sees the same input; the padded rows do not
    p = {"w": torch.randn(V, D, generator=g), "b": torch.randn(V, generator=g)}
    model = lambda p, X: F.linear(X, p["w"], p["b"])  # noqa: E731
    loss = CrossEntropyLoss(y)
    K = hessfunc.kfac(model, loss, p, X).dense()
    G = hessfunc.ggn_matrix(model, loss, p, X)
    torch.testing.assert_close(K, G, **PEER)


def test_kfac_of_padded_batch_agrees_with_curvlinops_on_kept_rows():
    """curvlinops has no ignore_index: its K-FAC of the kept rows is the reference."""
    cl = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, V))
    g = torch.Generator().manual_seed(6)
    X = torch.randn(9, D, generator=g)
    y = torch.randint(0, V, (9,), generator=g)
    y[[0, 5, 6]] = -100
    keep = y != -100
    apply, params = hessfunc.from_module(net)
    n = sum(t.numel() for t in net.parameters())
    for ours, theirs in (
        (hessfunc.kfac, cl.KFACLinearOperator),
        (hessfunc.ekfac, cl.EKFACLinearOperator),
    ):
        mine = ours(apply, CrossEntropyLoss(y), params, X, separate_bias=True).dense()
        op = theirs(
            net,
            nn.CrossEntropyLoss(),
            list(net.parameters()),
            [(X[keep], y[keep])],
            check_deterministic=False,
            fisher_type="type-2",
        )
        torch.testing.assert_close(mine, op @ torch.eye(n), **PEER)


def test_nll_ignore_index_fisher_equals_kept_rows():
    p = _params()
    ids, y, keep = _batch()
    ids_k, y_k = _dropped(-100, y, keep, ids)
    logp = lambda p, ids: torch.log_softmax(token_model(p, ids), -1)  # noqa: E731
    v = _tree.random_like(p, torch.Generator().manual_seed(7))
    a = hessfunc.fisher_vp(logp, NLLLoss(y), p, v, ids)
    b = hessfunc.fisher_vp(logp, NLLLoss(y_k), p, v, ids_k)
    assert_close(hessfunc.ravel(a)[0], hessfunc.ravel(b)[0])
    # linear in the outputs: no Gauss-Newton curvature, padded or not
    assert hessfunc.ravel(hessfunc.ggn_vp(logp, NLLLoss(y), p, v, ids))[0].abs().max() == 0
