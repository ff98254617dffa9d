"""The compile contract for the spectral layer: every estimator runs inside
``torch.compile(fullgraph=True)`` with the default (inductor) backend, equals float64 eager, and
does not recompile for new probes, start vectors or data of the same shapes.

Loops are unrolled, so compile time grows with the iteration counts: on this 2-core machine,
while shared, one Lanczos step cost 5-10 s of compilation (``eigsh`` with 6 steps: ~65 s; with
the matvec written on flat tensors: ~37 s). The default run compiles the one-pass estimators
and the shortest Lanczos runs in one graph on a dense matvec; the longer unrolled loops
(``lanczos``, ``power_iteration``, ``logdet``, ``blockwise``) and the compositions with real
curvature products (``hvp``, ``ggn_vp``) run with ``pytest --full``.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss

pytestmark = pytest.mark.compile

LIKE = {"layer.w": torch.zeros(3, 4), "layer.b": torch.zeros(4), "head.w": torch.zeros(2)}
N = 18


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(seed):
    """A new SPD matrix, probes and start vector for each seed, same shapes."""
    B = torch.randn(N, N, generator=gen(seed))
    A = B @ B.T / N + 0.1 * torch.eye(N)
    probes = hessfunc.random_probes(LIKE, 8, generator=gen(100 + seed))
    v0 = hessfunc.ravel(LIKE)[1](torch.randn(N, generator=gen(200 + seed)))
    return A, probes, v0


def mv_of(A):
    unravel = hessfunc.ravel(LIKE)[1]
    return lambda v: unravel(A @ hessfunc.ravel(v)[0])


def cheap(A, probes, v0):
    """The one-pass estimators and the shortest Lanczos runs, in one graph."""
    mv = mv_of(A)
    density = hessfunc.slq(mv, probes, 2)
    return {
        "hutchinson_trace": hessfunc.hutchinson_trace(mv, probes),
        "hutchpp_trace": hessfunc.hutchpp_trace(mv, probes),
        "xtrace": hessfunc.xtrace(mv, probes),
        "hutchinson_diag": hessfunc.hutchinson_diag(mv, probes),
        "xdiag": hessfunc.xdiag(mv, probes),
        "block_trace": hessfunc.block_trace(mv, probes),
        "eigsh": hessfunc.eigsh(mv, v0, 2, num_iters=2, which="LM"),
        "slq": density,
        "spectral_density": hessfunc.spectral_density(density, torch.linspace(0, 3, 7), sigma=0.2),
    }


def unrolled(A, probes, v0):
    """The rest: several unrolled Lanczos or power steps each (minutes to compile here)."""
    mv = mv_of(A)
    return {
        "lanczos": hessfunc.lanczos(mv, v0, 3),
        "eigsh": hessfunc.eigsh(mv, v0, 2, num_iters=3, which="LA"),
        "power_iteration": hessfunc.power_iteration(mv, v0, 2, num_iters=2, tol=1e-6),
        "logdet": hessfunc.logdet(mv, probes, 3, damping=0.1),
        "blockwise": hessfunc.blockwise(hessfunc.eigsh, mv, LIKE, v0, 1, num_iters=2),
    }


def assert_same(actual, expected, rtol=1e-10, atol=1e-10):
    la, le = _tree.tree_leaves(actual), _tree.tree_leaves(expected)
    assert len(la) == len(le)
    for a, e in zip(la, le, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def check_contract(fn):
    compiled = torch.compile(fn, fullgraph=True)
    args = inputs(0)
    assert_same(compiled(*args), fn(*args))
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in (1, 2):
            args = inputs(seed)
            assert_same(compiled(*args), fn(*args))


def test_every_estimator_is_covered():
    covered = set(cheap(*inputs(0))) | set(unrolled(*inputs(0)))
    # import_module: hessfunc.slq is the function, which shadows the module of that name
    modules = ("linalg.estimators", "linalg.lanczos", "linalg.slq", "linalg.blocks")
    names = [n for m in modules for n in importlib.import_module(f"hessfunc.{m}").__all__]
    assert covered == {n for n in names if n[0].islower()} - EAGER_HELPERS


def test_one_pass_estimators_and_short_lanczos_compile_equal_eager_and_do_not_recompile():
    check_contract(cheap)


@pytest.mark.full
def test_unrolled_estimators_compile_equal_eager_and_do_not_recompile():
    check_contract(unrolled)


# eager helpers of the spectral modules, not estimators
EAGER_HELPERS = {"random_probes", "batched_matvec"}


# ----------------------------------------------------------------------------- with real products


def network(seed):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    apply, params = hessfunc.from_module(net.double())
    g = gen(300 + seed)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    probes = hessfunc.random_probes(params, 6, generator=gen(400 + seed))
    v0 = _tree.tree_map(lambda t: t[0], hessfunc.random_probes(params, 1, generator=gen(seed)))
    return apply, params, x, y, probes, v0


def with_products(apply, params, x, y, probes, v0):
    f = lambda p, x, y: F.cross_entropy(apply(p, x), y)  # noqa: E731
    hvp = lambda v: hessfunc.hvp(f, params, v, x, y)  # noqa: E731
    ggn = lambda v: hessfunc.ggn_vp(apply, CrossEntropyLoss(y), params, v, x)  # noqa: E731
    return {
        "xtrace": hessfunc.xtrace(hvp, probes),
        "block_trace": hessfunc.block_trace(hvp, probes),
        "eigsh": hessfunc.eigsh(hvp, v0, 2, num_iters=4),
        "logdet": hessfunc.logdet(ggn, probes, 3, damping=0.1),
    }


@functools.cache
def compiled_with_products():
    apply = network(0)[0]
    return torch.compile(lambda *a: with_products(apply, *a), fullgraph=True)


@pytest.mark.full
def test_estimators_over_hvp_and_ggn_products_compile_and_do_not_recompile():
    apply, *args = network(0)
    fn = compiled_with_products()
    assert_same(fn(*args), with_products(apply, *args))
    with torch.compiler.set_stance("fail_on_recompile"):
        _, params, x, y, probes, v0 = network(1)
        params = _tree.tree_map(lambda t: t + 0.01, params)
        args = (params, x, y, probes, v0)
        assert_same(fn(*args), with_products(apply, *args))


@pytest.mark.full
def test_a_compiled_batched_product_with_an_eager_loop_gives_the_eager_result():
    # the cheap-to-compile pattern for long runs: compile the product, not the loop. A compiled
    # function cannot sit under vmap (pytorch#128711), so it is passed as a batched product.
    apply, params, x, y, probes, v0 = network(0)
    f = lambda p, x, y: F.cross_entropy(apply(p, x), y)  # noqa: E731
    hvps = torch.compile(lambda p, V, x, y: hessfunc.hvps(f, p, V, x, y), fullgraph=True)
    compiled = hessfunc.batched_matvec(lambda V: hvps(params, V, x, y))
    eager = lambda v: hessfunc.hvp(f, params, v, x, y)  # noqa: E731
    assert_same(
        hessfunc.eigsh(compiled, v0, 3, num_iters=20),
        hessfunc.eigsh(eager, v0, 3, num_iters=20),
        rtol=1e-9,
        atol=1e-9,
    )
    assert_same(hessfunc.slq(compiled, probes, 5), hessfunc.slq(eager, probes, 5), 1e-9, 1e-9)
