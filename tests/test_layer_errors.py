"""Bad input to the layers built on matvecs: refused with hessfunc's error, never a number.

One table row per public function that takes a matvec, a vector or a right-hand side: each is
called with a product (or vector) whose leaves are right but in another order, and with one
whose leaf is transposed (same size, other shape). Both used to pass the size-only checks of
the spectral and inverse layers and give silently wrong results on a network with two layers
of equal shapes. A test introspects ``hessfunc.__all__`` so a new such function without a row
fails. The other cases follow: passes over data, stale operators, power iteration past the
rank, and the smaller argument checks.
"""

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch.func import vmap
from torch.utils.data import DataLoader, IterableDataset

import hessfunc
from hessfunc.losses import CrossEntropyLoss, MSELoss

D = torch.float64
torch.manual_seed(0)
NET = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(D)
APPLY, P = hessfunc.from_module(NET)
X = torch.randn(5, 4, dtype=D)
Y = torch.randn(5, 3, dtype=D)
N = sum(t.numel() for t in P.values())
_B = torch.randn(N, N, dtype=D, generator=torch.Generator().manual_seed(1))
A = _B @ _B.T / N + torch.eye(N, dtype=D)  # symmetric positive definite
_, UNRAVEL = hessfunc.ravel(P)


def good(v):
    return UNRAVEL(A @ hessfunc.ravel(v)[0])


def good_batch(vs):
    return vmap(good)(vs)


def reordered(tree):
    """The same leaves under the same names, in reverse order."""
    return dict(reversed(list(tree.items())))


def transposed(tree):
    """``0.weight`` (6, 4) transposed to (4, 6): the same number of entries."""
    return {k: (t.mT.contiguous() if k == "0.weight" else t) for k, t in tree.items()}


def vec(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, dtype=D, generator=g) for k, t in P.items()}


PROBES = hessfunc.random_probes(P, 4, generator=torch.Generator().manual_seed(2))


def loss(p, x, y):
    return ((APPLY(p, x) - y) ** 2).sum()


def K():
    return hessfunc.kfac(APPLY, MSELoss(Y, reduction="sum"), P, X)


def E():
    return hessfunc.ekfac(APPLY, MSELoss(Y, reduction="sum"), P, X)


def scipy_matvec(bad):
    op = hessfunc.to_scipy(lambda v: bad(good(v)), P)
    return op @ np.ones(N)


def scipy_matmat(bad):
    op = hessfunc.to_scipy(good, P, matmat=lambda vs: bad(good_batch(vs)))
    return op.matmat(np.ones((N, 2)))


# name -> bad -> the call; `bad` is applied to the matvec's output or to the vector passed
ROWS = {
    "hutchinson_trace": lambda bad: hessfunc.hutchinson_trace(lambda v: bad(good(v)), PROBES),
    "hutchpp_trace": lambda bad: hessfunc.hutchpp_trace(lambda v: bad(good(v)), PROBES),
    "xtrace": lambda bad: hessfunc.xtrace(lambda v: bad(good(v)), PROBES),
    "hutchinson_diag": lambda bad: hessfunc.hutchinson_diag(lambda v: bad(good(v)), PROBES),
    "xdiag": lambda bad: hessfunc.xdiag(lambda v: bad(good(v)), PROBES),
    "batched_matvec": lambda bad: hessfunc.hutchinson_trace(
        hessfunc.batched_matvec(lambda vs: bad(good_batch(vs))), PROBES
    ),
    "block_trace": lambda bad: hessfunc.block_trace(lambda v: bad(good(v)), PROBES),
    "blockwise": lambda bad: hessfunc.blockwise(
        hessfunc.hutchinson_trace, lambda v: bad(good(v)), P, PROBES
    ),
    "blockwise x": lambda bad: hessfunc.blockwise(hessfunc.hutchinson_trace, good, P, bad(PROBES)),
    "slq": lambda bad: hessfunc.slq(lambda v: bad(good(v)), PROBES, 5),
    "logdet": lambda bad: hessfunc.logdet(lambda v: bad(good(v)), PROBES, 5),
    "eigsh": lambda bad: hessfunc.eigsh(lambda v: bad(good(v)), vec(), 2),
    "lanczos": lambda bad: hessfunc.lanczos(lambda v: bad(good(v)), vec(), 5),
    "power_iteration": lambda bad: hessfunc.power_iteration(
        lambda v: bad(good(v)), vec(), 1, num_iters=3
    ),
    "low_rank_inverse": lambda bad: hessfunc.low_rank_inverse(
        lambda v: bad(good(v)), vec(), 2, damping=1.0
    ),
    "LowRankInverse.solve": lambda bad: hessfunc.low_rank_inverse(
        good, vec(), 2, damping=1.0
    ).solve(bad(vec(1))),
    "cg": lambda bad: hessfunc.cg(lambda v: bad(good(v)), vec(), maxiter=3),
    "cg x0": lambda bad: hessfunc.cg(good, vec(), maxiter=3, x0=bad(vec(1))),
    "cg preconditioner": lambda bad: hessfunc.cg(
        good, vec(), maxiter=3, preconditioner=lambda r: bad(r)
    ),
    "lissa": lambda bad: hessfunc.lissa(
        lambda v: bad(good(v)), vec(), [()] * 3, scale=float(torch.linalg.eigvalsh(A)[-1])
    ),
    "KFAC.matvec": lambda bad: K().matvec(bad(vec())),
    "KFAC.solve": lambda bad: K().solve(bad(vec()), 1.0),
    "KFAC.solve pi": lambda bad: K().solve(bad(vec()), 1.0, method="pi"),
    "EKFAC.matvec": lambda bad: E().matvec(bad(vec())),
    "EKFAC.solve": lambda bad: E().solve(bad(vec()), 1.0),
    "to_scipy": scipy_matvec,
    "to_scipy matmat": scipy_matmat,
    "data.linear_operator": lambda bad: hessfunc.data.linear_operator(
        lambda v, i: bad(good(v)), [(0,), (1,)]
    )(vec()),
    "data.DatasetOperator": lambda bad: hessfunc.data.linear_operator(
        lambda v, i: good(v), [(0,), (1,)], batched=lambda vs, i: bad(good_batch(vs))
    ).matmat(PROBES),
    "influence": lambda bad: hessfunc.influence(
        loss, P, (X, Y), (X[:2], Y[:2]), damping=1.0, curvature=lambda p, v, x, y: bad(good(v))
    ),
    "newton_cg_step": lambda bad: hessfunc.newton_cg_step(
        loss, P, X, Y, curvature=lambda p, v: bad(good(v)), maxiter=2
    ),
    "hvp": lambda bad: hessfunc.hvp(loss, P, bad(vec()), X, Y),
    "hvps": lambda bad: hessfunc.hvps(loss, P, bad(PROBES), X, Y),
    "hessian_operator": lambda bad: hessfunc.hessian_operator(loss, P, X, Y)(bad(vec())),
    "fd_hvp": lambda bad: hessfunc.fd_hvp(loss, P, bad(vec()), X, Y),
    "fd_hvps": lambda bad: hessfunc.fd_hvps(loss, P, bad(PROBES), X, Y),
    "ggn_vp": lambda bad: hessfunc.ggn_vp(APPLY, MSELoss(Y), P, bad(vec()), X),
    "ggn_vps": lambda bad: hessfunc.ggn_vps(APPLY, MSELoss(Y), P, bad(PROBES), X),
    "fisher_vp": lambda bad: hessfunc.fisher_vp(APPLY, MSELoss(Y), P, bad(vec()), X),
}

# what a refusal says: the by-name rule ("another order"), or the shape of the leaf
REORDERED = r"another order|structure of params"
TRANSPOSED = (
    r"\['0\.weight'\] (has shape \((\d+, )?4, 6\)|must have shape \(6, 4\).*got \(4, 4, 6\))"
)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_reordered_tree_is_refused(name):
    with pytest.raises(ValueError, match=REORDERED):
        ROWS[name](reordered)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_transposed_leaf_of_the_same_size_is_refused(name):
    with pytest.raises(ValueError, match=TRANSPOSED):
        ROWS[name](transposed)


def test_the_rows_run_with_good_input():
    """The same calls with the right trees succeed, so each row's refusal is the tree's doing."""
    same = lambda tree: tree  # noqa: E731
    for call in ROWS.values():
        call(same)
    # and the estimators read the right matrix: the n unit vectors give tr(A) / n exactly
    units = vmap(UNRAVEL)(torch.eye(N, dtype=D))
    got = hessfunc.hutchinson_trace(good, units).estimate
    torch.testing.assert_close(got, A.trace() / N, rtol=1e-12, atol=0)


MATVEC_ARGS = {"matvec", "matmat", "b", "v", "vs", "v0", "probes", "x0", "curvature", "product"}


def _public_callables():
    for name in hessfunc.__all__:
        obj = getattr(hessfunc, name)
        if inspect.ismodule(obj):
            yield from ((f"{name}.{m}", getattr(obj, m)) for m in obj.__all__)
        elif inspect.isclass(obj):
            for m, attr in vars(obj).items():
                if not m.startswith("_") and inspect.isfunction(attr):
                    yield f"{name}.{m}", attr
        else:
            yield name, obj


# Public callables whose argument has one of those names but is no vector or product.
NOT_VECTORS = {
    "optim.hessian_free": "curvature='ggn' | 'hessian' names the product the optimizer builds",
    "optim.sharpness": "curvature='ggn' | 'hessian' names the product the tracker builds",
    "laplace.LaplacePosterior": "curvature is the fitted structure that laplace.fit builds",
}


def test_every_public_function_taking_a_matvec_or_vector_has_a_row():
    missing = []
    for name, obj in _public_callables():
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if MATVEC_ARGS & set(params) and name not in ROWS and name not in NOT_VECTORS:
            missing.append(name)
    assert missing == []
    assert "eigsh" in ROWS and "KFAC.solve" in ROWS  # the introspection sees the API


# ----------------------------------------------------------------------------- data passes


class _Stream(IterableDataset):
    """A streaming dataset that yields its batches once (like a socket or a file read once)."""

    def __init__(self, items):
        self.items = iter(items)

    def __iter__(self):
        return self.items


def test_a_pass_with_fewer_batches_than_the_first_is_refused():
    b = {k: torch.ones_like(t) for k, t in P.items()}
    loader = DataLoader(_Stream([(i,) for i in range(3)]), batch_size=None)
    op = hessfunc.data.linear_operator(lambda v, i: good(v), loader)
    first = op(b)
    torch.testing.assert_close(hessfunc.ravel(first)[0], 3 * A @ hessfunc.ravel(b)[0])
    with pytest.raises(ValueError, match=r"yielded 0 batches but the first pass yielded 3"):
        op(b)
    op = hessfunc.data.linear_operator(lambda v, i: good(v), DataLoader(_Stream([(0,)] * 3)))
    with pytest.raises(ValueError, match=r"DataLoader over _Stream"):
        hessfunc.cg(op, b, maxiter=10)
    op = hessfunc.data.linear_operator(lambda v, i: good(v), DataLoader(_Stream([(0,)] * 3)))
    with pytest.raises(ValueError, match=r"first pass yielded"):
        hessfunc.eigsh(op, b, 1, num_iters=3)


def test_an_empty_pass_is_refused_unless_reduce_is_given():
    b = vec()
    with pytest.raises(ValueError, match=r"linear_operator.*yielded no batch.*reduce="):
        hessfunc.data.linear_operator(lambda v, i: good(v), [])(b)
    with pytest.raises(ValueError, match=r"sum_over.*yielded no batch"):
        hessfunc.data.sum_over(lambda i: good(b), [])
    # with reduce= an empty shard joins with zeros (other processes hold the data)
    out = hessfunc.data.linear_operator(lambda v, i: good(v), [], reduce=lambda t: t)(b)
    assert all(bool((t == 0).all()) for t in out.values())


def test_a_bool_count_is_refused():
    with pytest.raises(TypeError, match=r"mean_over.*torch.bool.*\.sum\(\)"):
        hessfunc.data.mean_over(
            lambda x: x, [(torch.ones(2),)] * 8, count=lambda x: torch.tensor(True)
        )


def test_a_single_batch_sum_is_a_copy():
    state = torch.ones(3)
    out = hessfunc.data.sum_over(lambda i: state, [(0,)])
    assert out is not state
    out.add_(1)
    assert torch.equal(state, torch.ones(3))


# ----------------------------------------------------------------------------- stale operators


def test_hessian_operator_refuses_products_after_an_optimizer_step():
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net = net.to(D)
    apply, params = hessfunc.from_module(net)
    f = lambda p, x, y: ((apply(p, x) - y) ** 2).sum()  # noqa: E731
    H = hessfunc.hessian_operator(f, params, X, Y)
    v = {k: torch.ones_like(t) for k, t in params.items()}
    torch.testing.assert_close(H(v), hessfunc.hvp(f, params, v, X, Y))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    f(dict(net.named_parameters()), X, Y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"params\['0.weight'\].*changed in place.*Rebuild"):
        H(v)
    H = hessfunc.hessian_operator(f, params, X, Y)  # rebuilt: the new point's Hessian
    torch.testing.assert_close(H(v), hessfunc.hvp(f, params, v, X, Y))


def test_hessian_operator_refuses_products_after_the_batch_changed():
    x = X.clone()
    H = hessfunc.hessian_operator(loss, P, x, Y)
    x.mul_(2)
    with pytest.raises(RuntimeError, match=r"args\[0\] changed in place"):
        H.matmat(PROBES)


# ----------------------------------------------------------------------------- power iteration


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_past_the_rank_returns_zero_with_an_orthogonal_vector(seed):
    A5 = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0], dtype=D))
    v0 = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(seed))
    res = hessfunc.power_iteration(lambda v: A5 @ v, v0, 3)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0, 0.0], dtype=D))
    U = res.eigenvectors
    torch.testing.assert_close(U @ U.T, torch.eye(3, dtype=D), atol=1e-12, rtol=0)
    assert bool((res.residual_norms < 1e-10).all())
    assert bool(torch.isfinite(U).all())


def test_power_iteration_on_a_null_operator_and_a_start_in_the_span():
    res = hessfunc.power_iteration(lambda v: 0 * v, torch.ones(3, dtype=D), 2)
    assert res.eigenvalues.tolist() == [0.0, 0.0]
    torch.testing.assert_close(res.eigenvectors @ res.eigenvectors.T, torch.eye(2, dtype=D))
    A5 = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=D))
    res = hessfunc.power_iteration(lambda v: A5 @ v, torch.tensor([1.0, 0, 0], dtype=D), 2)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0], dtype=D))


# ----------------------------------------------------------------------------- smaller cases


def _kfac_mlp(width, fisher="type-2", loss_cls=MSELoss):
    net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    apply, params = hessfunc.from_module(net.to(D))
    target = Y if loss_cls is MSELoss else Y.argmax(1)
    return hessfunc.kfac(apply, loss_cls(target, reduction="sum"), params, X, fisher=fisher)


SMALL = {
    "zero probes": (
        lambda: hessfunc.hutchinson_trace(good, {k: t[:0] for k, t in PROBES.items()}),
        ValueError,
        r"hutchinson_trace.*probes holds no vector.*num >= 1",
    ),
    "influence empty train": (
        lambda: hessfunc.influence(loss, P, (X[:0], Y[:0]), (X[:2], Y[:2]), damping=1.0),
        ValueError,
        r"influence.*train holds no sample",
    ),
    "influence empty test": (
        lambda: hessfunc.influence(loss, P, (X, Y), (X[:0], Y[:0]), damping=1.0),
        ValueError,
        r"influence.*test holds no sample",
    ),
    "tensor sigma 0": (
        lambda: hessfunc.spectral_density(
            hessfunc.slq(good, PROBES, 5), torch.linspace(0, 5, 10), sigma=torch.tensor(0.0)
        ),
        ValueError,
        r"spectral_density.*sigma must be > 0",
    ),
    "tensor sigma negative": (
        lambda: hessfunc.spectral_density(
            hessfunc.slq(good, PROBES, 5), torch.linspace(0, 5, 10), sigma=torch.tensor(-0.1)
        ),
        ValueError,
        r"spectral_density.*sigma must be > 0",
    ),
    "cg damping shape": (
        lambda: hessfunc.cg(good, vec(), maxiter=2, damping=torch.ones(3)),
        ValueError,
        r"hessfunc.cg.*damping must be a number or a 0-d tensor.*\(3,\)",
    ),
    "cg damping string": (
        lambda: hessfunc.cg(good, vec(), maxiter=2, damping="1e-3"),
        TypeError,
        r"hessfunc.cg.*damping must be a float",
    ),
    "logdet damping shape": (
        lambda: hessfunc.logdet(good, PROBES, 3, damping=torch.ones(3)),
        ValueError,
        r"logdet.*damping must be a number or a 0-d tensor",
    ),
    "logdet damping negative": (
        lambda: hessfunc.logdet(good, PROBES, 3, damping=-1.0),
        ValueError,
        r"logdet.*damping must be >= 0",
    ),
    "KFAC.matvec float32": (
        lambda: K().matvec({k: t.float() for k, t in vec().items()}),
        TypeError,
        r"KFAC.matvec.*float32 but the factors are torch.float64",
    ),
    "KFAC.solve undamped singular": (
        lambda: K().solve(vec(), 0.0),
        ValueError,
        r"KFAC.solve.*damping is 0 but the block .* is singular",
    ),
    "KFAC.solve pi undamped singular": (
        lambda: K().solve(vec(), 0.0, method="pi"),
        ValueError,
        r"KFAC.solve.*damping is 0 but the block .* is singular",
    ),
    "EKFAC.solve undamped singular": (
        lambda: E().solve(vec(), 0.0),
        ValueError,
        r"EKFAC.solve.*damping is 0",
    ),
    "KFAC.add fisher types": (
        lambda: _kfac_mlp(6).add(_kfac_mlp(6, fisher="empirical")),
        ValueError,
        r"KFAC.add.*fisher='type-2', MSELoss vs fisher='empirical', MSELoss",
    ),
    "KFAC.add loss types": (
        lambda: _kfac_mlp(6).add(_kfac_mlp(6, loss_cls=CrossEntropyLoss)),
        ValueError,
        r"KFAC.add.*MSELoss vs fisher='type-2', CrossEntropyLoss",
    ),
    "KFAC.add shapes": (
        lambda: _kfac_mlp(6).add(_kfac_mlp(5)),
        ValueError,
        r"KFAC.add.*\['0.weight'\]: \(6, 4\) vs \(5, 4\)",
    ),
    "Moments.add fisher types": (
        lambda: E().moments.add(
            hessfunc.ekfac(APPLY, MSELoss(Y, reduction="sum"), P, X, fisher="empirical").moments
        ),
        ValueError,
        r"Moments.add.*fisher='type-2'.*fisher='empirical'",
    ),
    "to_scipy integer like": (
        lambda: hessfunc.to_scipy(lambda v: v, torch.zeros(3, dtype=torch.int64)),
        TypeError,
        r"to_scipy.*like.*torch.int64",
    ),
    "batched matvec batch size": (
        lambda: hessfunc.hutchinson_trace(
            hessfunc.batched_matvec(lambda vs: good_batch({k: t[:-1] for k, t in vs.items()})),
            PROBES,
        ),
        ValueError,
        r"hutchinson_trace.*4 vectors went in.*leading axis of 3",
    ),
    "eigsh nan mid-run": (
        lambda: hessfunc.eigsh(_nan_at(4), vec(), 2, num_iters=8),
        FloatingPointError,
        r"eigsh.*non-finite value.*Lanczos step 4",
    ),
    "slq nan": (
        lambda: hessfunc.slq(_nan_at(2), PROBES, 5),
        FloatingPointError,
        r"slq.*non-finite",
    ),
}


def _nan_at(call):
    calls = [0]

    def matvec(v):
        calls[0] += 1
        out = good(v)
        return {k: t * float("nan") for k, t in out.items()} if calls[0] == call + 1 else out

    return matvec


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_cases(name):
    call, error, pattern = SMALL[name]
    with pytest.raises(error, match=pattern):
        call()


def test_sound_inputs_next_to_the_refused_ones_still_work():
    # a positive tensor sigma, a 0-d tensor damping, a damped singular K-FAC solve
    res = hessfunc.slq(good, PROBES, 5)
    grid = torch.linspace(0, 10, 2001, dtype=D)
    density = hessfunc.spectral_density(res, grid, sigma=torch.tensor(0.2, dtype=D))
    torch.testing.assert_close(
        torch.trapezoid(density, grid), torch.tensor(1.0, dtype=D), atol=1e-3, rtol=0
    )
    x = hessfunc.cg(good, vec(), maxiter=N, damping=torch.tensor(0.5, dtype=D)).x
    expected = torch.linalg.solve(A + 0.5 * torch.eye(N, dtype=D), hessfunc.ravel(vec())[0])
    torch.testing.assert_close(hessfunc.ravel(x)[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = K()
        x = k.solve(vec(), 1e-3)
        back = hessfunc.ravel(k.matvec(x))[0] + 1e-3 * hessfunc.ravel(x)[0]
        torch.testing.assert_close(back, hessfunc.ravel(vec())[0])
    assert k.add(k).options == k.options


SMALL_TREE = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(2, dtype=D)}
SMALL_PROBES = hessfunc.random_probes(SMALL_TREE, 2, generator=torch.Generator().manual_seed(0))


def _small_mv(v):
    M = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D))
    return hessfunc.ravel(SMALL_TREE)[1](M @ hessfunc.ravel(v)[0])


def test_the_by_name_rule_holds_under_compile():
    # the paths are compared while dynamo traces: a reordered product is refused there too
    fn = torch.compile(
        lambda p: hessfunc.hutchinson_trace(lambda v: reordered(_small_mv(v)), p).estimate,
        fullgraph=True,
    )
    with pytest.raises(Exception, match=r"another order"):
        fn(SMALL_PROBES)


@pytest.mark.full
def test_a_good_product_compiles_to_the_eager_result():
    ok = torch.compile(lambda p: hessfunc.hutchinson_trace(_small_mv, p).estimate, fullgraph=True)
    torch.testing.assert_close(ok(SMALL_PROBES), torch.tensor(10.0, dtype=D))


@pytest.mark.parametrize("name", ["hvp", "ggn_vp"])
def test_products_refuse_a_reordered_direction_under_compile(name):
    # check_like compares leaf counts, not specs, under compile (pytorch#190649); it compares
    # the names there, so no product multiplies a reordered direction by position
    calls = {
        "hvp": lambda v: hessfunc.hvp(lambda p: _sq(p), SMALL_TREE, v),
        "ggn_vp": lambda v: hessfunc.ggn_vp(
            lambda p: torch.cat([p["a"], p["b"]]), MSELoss(torch.zeros(4, dtype=D)), SMALL_TREE, v
        ),
    }
    fn = torch.compile(calls[name], fullgraph=True)
    with pytest.raises(Exception, match=r"another order"):
        fn(reordered(SMALL_TREE))


def _sq(p):
    return sum((t**2).sum() for t in p.values())
