"""What the K-FAC build holds at once, and that holding less changes nothing.

The build pulls back the output-space columns a chunk at a time (``chunk_size=None``: as many as
fit ``_kron.CHUNK_BYTES`` of output gradients) and adds each chunk's gradient sums in place, then
unfolds the layer inputs a few samples at a time. Peak memory is read from the profiler's
allocation events (CPU, deterministic: the same allocations on every run), the count the
benchmarks report. The reference for "nothing changed" is the same build with every column in
one vectorised pass and every input unfolded at once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hessfunc
from hessfunc._base import _tree
from hessfunc.kron import _kron
from hessfunc.losses import CrossEntropyLoss

EXACT = dict(rtol=1e-12, atol=1e-12)
BATCH, WIDTH, CLASSES = 256, 256, 20


def peak_bytes(fn) -> int:
    """Peak of the running sum of allocations minus frees while ``fn`` runs (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def wide_classifier():
    """Many classes and a wide hidden layer: one column's gradients dwarf the factors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES)).double()
    apply, params = hessfunc.from_module(net)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(BATCH, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return apply, params, X, CrossEntropyLoss(y)


def test_default_build_holds_one_chunk_of_columns_not_all():
    """20 classes: every column at once holds 20 x 0.6 MiB of output gradients. The default holds
    at most CHUNK_BYTES of them (seven columns here), so its peak stays within the result (the
    factors), the layer outputs twice (the forward pass's, and an input being unfolded), the
    chunk's gradients and as much again for the pull-back's temporaries; all columns at once
    exceed that."""
    apply, params, X, loss = wide_classifier()
    columns = CLASSES
    one_column = BATCH * (WIDTH + CLASSES) * 8  # bytes of one column's output gradients
    layers = BATCH * (WIDTH + CLASSES) * 8  # the layer outputs of one forward pass
    factors = (9**2 + (WIDTH + 1) ** 2 + WIDTH**2 + CLASSES**2) * 8
    assert _kron.default_chunk(columns, _calls(apply, params, X), torch.float64) == max(
        1, _kron.CHUNK_BYTES // one_column
    )
    bound = factors + 2 * layers + 2 * _kron.CHUNK_BYTES
    default = peak_bytes(lambda: hessfunc.kfac(apply, loss, params, X))
    whole = peak_bytes(lambda: hessfunc.kfac(apply, loss, params, X, chunk_size=columns))
    assert default <= bound, (default, bound)
    assert whole > bound, (whole, bound)  # the bound can fail: all columns do not fit it
    assert whole > columns * one_column
    close = hessfunc.kfac(apply, loss, params, X, chunk_size=columns)
    got = hessfunc.kfac(apply, loss, params, X)
    for a, b in zip(_tree.tree_leaves(got), _tree.tree_leaves(close), strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def _calls(apply, params, X):
    """The layer calls of one run, as the build records them."""
    from hessfunc.kron._layers import Recorder

    calls, leaves = [], _tree.tree_leaves(params)
    with Recorder(leaves, calls, {}):
        apply(params, X)
    return calls


class TokenConv(nn.Module):
    """Embedding, a 1-d convolution over the tokens, a per-token head: every layer has
    positions, the head's rows are the loss's rows (ignore_index masks them)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, t):
        h = torch.tanh(self.conv(self.emb(t).transpose(1, 2))).transpose(1, 2)
        return self.head(h).flatten(0, 1)


@pytest.mark.parametrize("model", ["cnn", "tokens"])
def test_chunked_columns_and_inputs_equal_one_pass(monkeypatch, model):
    """With a budget of a few bytes every column is pulled back alone (without vmap) and every
    sample's patches are unfolded alone, masked rows included: the factors are unchanged."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if model == "cnn":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, groups=1),
            nn.Tanh(), nn.Flatten(), nn.Linear(16, 3),
        ).double()  # fmt: skip
        X = torch.randn(5, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)
    else:
        net = TokenConv().double()
        X = torch.randint(0, 11, (3, 7), generator=g)
        y = torch.randint(0, 5, (21,), generator=g)
        y[::4] = -100
    apply, params = hessfunc.from_module(net)
    loss = CrossEntropyLoss(y)
    whole = hessfunc.kfac(apply, loss, params, X, chunk_size=10**6)
    separate = hessfunc.kfac(apply, loss, params, X, separate_bias=True, chunk_size=10**6)
    monkeypatch.setattr(_kron, "CHUNK_BYTES", 1)
    p = _kron.collect(
        "test", apply, loss, params, (X,), fisher="type-2", generator=None, noise=None,
        mc_samples=1, separate_bias=False, chunk_size=None,
    )  # fmt: skip
    assert p.chunks == (3 if model == "cnn" else 5)  # one column each
    for a, b in (
        (hessfunc.kfac(apply, loss, params, X), whole),
        (hessfunc.kfac(apply, loss, params, X, separate_bias=True), separate),
    ):
        for u, v in zip(_tree.tree_leaves(a), _tree.tree_leaves(b), strict=True):
            torch.testing.assert_close(u, v, **EXACT)
    # the masked head rows are not data: the chunked count equals the unmasked rows
    if model == "tokens":
        assert int(whole.positions[-1]) == int((y != -100).sum())
