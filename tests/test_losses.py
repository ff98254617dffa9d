"""Loss objects: values equal torch.nn.functional's, closed-form curvature equals autodiff's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tol
from torch.func import jacrev, jvp

from hessfunc import losses
from hessfunc._base import _tree

N, C = 5, 4


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(N, C, generator=g)
    y = torch.randn(N, C, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    probs = torch.softmax(torch.randn(N, C, generator=g), -1)
    unnormalised = torch.rand(N, C, generator=g) * 2  # rows do not sum to one
    binary = torch.rand(N, C, generator=g)
    var = torch.rand(N, C, generator=g) + 0.3
    var[0, 0] = 1e-9  # below eps: exercises the clamp
    return out, y, labels, probs, unnormalised, binary, var


def _cases():
    """``(id, loss object, outputs, torch reference of the outputs)``."""
    out, y, labels, probs, unnorm, binary, var = _data()
    pos_var = var.clone()
    pos_var[0, 0] = 0.7
    padded = labels.clone()
    padded[1::2] = -100
    assert 0 in labels.tolist() and 0 < int((padded == -100).sum()) < N
    cases = []
    for red in ("mean", "sum"):
        cases += [
            (
                f"mse-{red}",
                losses.MSELoss(y, reduction=red),
                out,
                lambda o, red=red: F.mse_loss(o, y, reduction=red),
            ),
            (
                f"mse-1d-{red}",
                losses.MSELoss(y[:, 0], reduction=red),
                out[:, 0],
                lambda o, red=red: F.mse_loss(o, y[:, 0], reduction=red),
            ),
            (
                f"ce-{red}",
                losses.CrossEntropyLoss(labels, reduction=red),
                out,
                lambda o, red=red: F.cross_entropy(o, labels, reduction=red),
            ),
            (
                f"ce-smooth-{red}",
                losses.CrossEntropyLoss(labels, label_smoothing=0.2, reduction=red),
                out,
                lambda o, red=red: F.cross_entropy(o, labels, label_smoothing=0.2, reduction=red),
            ),
            (
                f"ce-probs-{red}",
                losses.CrossEntropyLoss(probs, reduction=red),
                out,
                lambda o, red=red: F.cross_entropy(o, probs, reduction=red),
            ),
            (
                f"ce-probs-smooth-{red}",
                losses.CrossEntropyLoss(probs, label_smoothing=0.1, reduction=red),
                out,
                lambda o, red=red: F.cross_entropy(o, probs, label_smoothing=0.1, reduction=red),
            ),
            (
                f"ce-unnormalised-{red}",
                losses.CrossEntropyLoss(unnorm, label_smoothing=0.3, reduction=red),
                out,
                lambda o, red=red: F.cross_entropy(o, unnorm, label_smoothing=0.3, reduction=red),
            ),
            (
                f"nll-{red}",
                losses.NLLLoss(labels, reduction=red),
                torch.log_softmax(out, -1),
                lambda o, red=red: F.nll_loss(o, labels, reduction=red),
            ),
            (
                f"bce-{red}",
                losses.BCEWithLogitsLoss(binary, reduction=red),
                out,
                lambda o, red=red: F.binary_cross_entropy_with_logits(o, binary, reduction=red),
            ),
            (
                f"gauss-{red}",
                losses.GaussianNLLLoss(y, var, reduction=red),
                out,
                lambda o, red=red: F.gaussian_nll_loss(o, y, var, reduction=red),
            ),
            (
                f"gauss-short-var-{red}",
                losses.GaussianNLLLoss(y, var[:, 0], full=True, reduction=red),
                out,
                lambda o, red=red: F.gaussian_nll_loss(o, y, var[:, 0], full=True, reduction=red),
            ),
            (
                f"gauss-size1-var-{red}",
                losses.GaussianNLLLoss(y, var[:, :1], eps=1e-3, reduction=red),
                out,
                lambda o, red=red: F.gaussian_nll_loss(o, y, var[:, :1], eps=1e-3, reduction=red),
            ),
            (
                f"gauss-pair-{red}",
                losses.GaussianNLLLoss(y, None, reduction=red),
                (out, pos_var),
                lambda o, red=red: F.gaussian_nll_loss(o[0], y, o[1], reduction=red),
            ),
        ]
        # padded token batches: ignored rows (torch's -100, and a pad id that is also a class)
        for ig, tgt in ((-100, padded), (0, labels)):
            cases += [
                (
                    f"ce-ignore{ig}-{red}",
                    losses.CrossEntropyLoss(tgt, ignore_index=ig, reduction=red),
                    out,
                    lambda o, red=red, ig=ig, t=tgt: F.cross_entropy(
                        o, t, ignore_index=ig, reduction=red
                    ),
                ),
                (
                    f"ce-ignore{ig}-smooth-{red}",
                    losses.CrossEntropyLoss(
                        tgt, ignore_index=ig, label_smoothing=0.2, reduction=red
                    ),
                    out,
                    lambda o, red=red, ig=ig, t=tgt: F.cross_entropy(
                        o, t, ignore_index=ig, label_smoothing=0.2, reduction=red
                    ),
                ),
                (
                    f"nll-ignore{ig}-{red}",
                    losses.NLLLoss(tgt, ignore_index=ig, reduction=red),
                    torch.log_softmax(out, -1),
                    lambda o, red=red, ig=ig, t=tgt: F.nll_loss(
                        o, t, ignore_index=ig, reduction=red
                    ),
                ),
            ]
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_value_matches_functional(case):
    _, loss, out, ref = case
    assert_close(loss(out), ref(out))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_closed_form_hvp_matches_autodiff(case):
    """Both directions of every output entry: the whole output-space Hessian, by columns."""
    _, loss, out, ref = case
    flat, unravel = _tree.ravel(out)
    hess_ref = torch.autograd.functional.hessian(lambda z: ref(unravel(z)), flat)
    basis = torch.eye(flat.numel())
    rows = torch.stack([_tree.ravel(loss.hvp(out, unravel(e)))[0] for e in basis])
    assert_close(rows, hess_ref)
    # and through the generic path hessfunc falls back to for plain callables
    u = unravel(torch.randn(flat.numel()))
    auto = jvp(jacrev(ref), (out,), (u,))[1]
    assert_close(loss.hvp(out, u), auto)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_sample_and_scale_reassemble_the_loss(case):
    _, loss, out, ref = case
    per = loss.per_sample(out)
    assert per.shape == (N,)
    assert_close(loss.scale(out) * per.sum(), ref(out))
    # row i of output_grads is the gradient of sample i's own loss
    grads = loss.output_grads(out)
    flat, unravel = _tree.ravel(out)
    jac = torch.autograd.functional.jacobian(lambda z: loss.per_sample(unravel(z)), flat)  # (N, n)
    for i in range(N):
        ji = unravel(jac[i])
        for leaf_j, leaf_g in zip(_tree.tree_leaves(ji), _tree.tree_leaves(grads), strict=True):
            assert_close(leaf_g[i], leaf_j[i])
            rest = torch.cat([leaf_j[:i], leaf_j[i + 1 :]])
            assert torch.count_nonzero(rest) == 0  # sample i's loss only sees row i


def test_nll_has_zero_curvature_but_ce_does_not():
    out, _, labels, *_ = _data()
    u = torch.randn(N, C)
    assert torch.count_nonzero(losses.NLLLoss(labels).hvp(torch.log_softmax(out, -1), u)) == 0
    h = losses.CrossEntropyLoss(labels).hvp(out, u)
    p = torch.softmax(out, -1)
    expected = (
        torch.stack(
            [(torch.diag(pi) - torch.outer(pi, pi)) @ ui for pi, ui in zip(p, u, strict=True)]
        )
        / N
    )
    assert_close(h, expected)


def test_gaussian_pair_hessian_is_indefinite():
    """A predicted variance makes the loss non-convex in the outputs: a negative curvature."""
    y = torch.zeros(1, 1)
    loss = losses.GaussianNLLLoss(y, None, reduction="sum")
    mean, var = torch.zeros(1, 1), torch.ones(1, 1)
    h = loss.hvp((mean, var), (torch.zeros(1, 1), torch.ones(1, 1)))
    assert_close(h[1], torch.full((1, 1), -0.5))  # d^2/ds^2 at d = 0, s = 1 is -1/(2 s^2)


# --------------------------------------------------------------------------------- sampling


def _exp_family_cases():
    out, y, labels, probs, _, binary, var = _data(3)
    var = var.clamp(min=0.3)
    return [
        ("mse", losses.MSELoss(y), out),
        ("ce", losses.CrossEntropyLoss(labels, label_smoothing=0.1), out),
        ("ce-probs", losses.CrossEntropyLoss(probs), out),
        # ignored rows have no curvature and no sampled gradient; a sampled class equal to a
        # non-negative ignore_index still counts
        ("ce-ignore", losses.CrossEntropyLoss(labels, ignore_index=int(labels[0])), out),
        ("bce", losses.BCEWithLogitsLoss(binary), out),
        ("gauss", losses.GaussianNLLLoss(y, var), out),
    ]


@pytest.mark.parametrize("case", _exp_family_cases(), ids=lambda c: c[0])
def test_fisher_identity_in_output_space(case):
    """E_y[r r^T] over sampled targets equals the closed-form Hessian (GGN = Fisher).

    Bound: per entry, 5 standard errors of the sample mean of r r^T (estimated from the draws).
    """
    _, loss, out = case
    S = 4000
    g = torch.Generator().manual_seed(7)
    u = torch.rand(S, *loss.noise_shape(out), generator=g)
    rows = torch.func.vmap(
        lambda ui: loss.predictive(loss.sample_from_uniform(out, ui)).output_grads(out)
    )(u)
    outer = torch.einsum("sni,snj->snij", rows, rows)  # (S, N, C, C)
    mean, se = outer.mean(0), outer.std(0) / math.sqrt(S)
    c = loss.scale(out)
    # per-sample Hessians (N, C, C): the Hessian is block-diagonal over samples, so one product
    # with e_j in every row gives column j of every block at once
    hess = (
        torch.stack(
            [loss.hvp(out, F.one_hot(torch.full((N,), j), C).double()) for j in range(C)], -1
        )
        / c
    )
    assert torch.all((mean - hess).abs() <= 5 * se + tol("exact", torch.float64)["atol"])
    # and the bound is not vacuous: it is much tighter than the curvature itself
    assert (5 * se).max() < 0.2 * hess.abs().max()


def test_categorical_samples_follow_softmax():
    out = torch.tensor([[2.0, 0.0, -1.0]])
    loss = losses.CrossEntropyLoss(torch.tensor([0]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([loss.sample(out, g) for _ in range(3000)]).reshape(-1)
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    p = torch.softmax(out[0], -1)
    se = torch.sqrt(p * (1 - p) / draws.numel())
    assert torch.all((freq - p).abs() <= 5 * se)


def test_sample_is_reproducible_and_leaves_global_rng_alone():
    out, y, *_ = _data()
    loss = losses.MSELoss(y)
    state = torch.get_rng_state()
    a = loss.sample(out, torch.Generator().manual_seed(3))
    b = loss.sample(out, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert a.shape == out.shape and not torch.equal(a, out)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    out, y, labels, probs, *_ = _data()
    with pytest.raises(
        ValueError, match=r"MSELoss.*outputs have shape \(5, 3\).*target has \(5, 4\)"
    ):
        losses.MSELoss(y)(out[:, :3])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        losses.MSELoss(y, reduction="none")
    with pytest.raises(TypeError, match="int64 tensor of class indices"):
        losses.CrossEntropyLoss(labels.int())
    with pytest.raises(ValueError, match=r"probability targets must be \(N, C\)"):
        losses.CrossEntropyLoss(labels.double())
    with pytest.raises(ValueError, match=r"outputs must be \(N, C\)"):
        losses.CrossEntropyLoss(labels)(out[:, 0])
    with pytest.raises(ValueError, match="batch sizes"):
        losses.CrossEntropyLoss(labels).hvp(out[:3], out[:3])
    with pytest.raises(ValueError, match="batch sizes"):
        losses.CrossEntropyLoss(probs)(out[:, :3])
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.CrossEntropyLoss(labels, label_smoothing=1.5)
    for cls in (losses.CrossEntropyLoss, losses.NLLLoss):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            cls(labels, ignore_index=torch.tensor(-100))
    with pytest.raises(TypeError, match="floating-point"):
        losses.BCEWithLogitsLoss(y)(labels.reshape(N, 1).expand(N, C))
    with pytest.raises(ValueError, match="var of shape"):
        losses.GaussianNLLLoss(y, torch.ones(3))
    with pytest.raises(TypeError, match=r"pair \(mean, var\)"):
        losses.GaussianNLLLoss(y)(out)
    with pytest.raises(TypeError, match="mean tensor alone"):
        losses.GaussianNLLLoss(y, torch.ones(N, C))((out, out))
    with pytest.raises(TypeError, match="torch.Generator"):
        losses.MSELoss(y).sample(out, 0)
