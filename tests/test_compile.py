"""The compile contract: every matrix-free product compiles with fullgraph=True, gives the eager
result, and does not recompile when called again with new data of the same shapes.

Compiling costs seconds on a CPU, so each compiled function is built once per module and reused.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import zoo
from conftest import assert_close, version

import hessfunc
from hessfunc._base import _tree
from hessfunc.losses import CrossEntropyLoss
from hessfunc.products.fd import fd_hvp

pytestmark = pytest.mark.compile

# torch 2.11 fails to trace a second-order product through nn.Embedding once another function
# has been compiled in the process (test_embedding_after_another_compiled_function); 2.13 does not.
OLD_TORCH = version(torch.__version__) < (2, 13)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def problem(model: str, dtype, seed: int, n: int = 4):
    """The zoo case with new data (inputs and targets) for each seed, same shapes."""
    c = zoo.case(model, "ce", dtype=dtype, n=n)
    g = torch.Generator().manual_seed(100 + seed)
    x = c.args[0]
    x = (
        torch.randint(0, 7, x.shape, generator=g)
        if model == "transformer"
        else torch.randn(x.shape, generator=g, dtype=dtype)
    )
    y = torch.randint(0, 3, (n,), generator=g)
    apply, _ = hessfunc.from_module(c.model)
    model_fn = lambda p, x: apply(p, x)  # noqa: E731
    v = _tree.random_like(c.params, torch.Generator().manual_seed(200 + seed))
    return c.f, model_fn, c.params, v, x, y


def products(f, model_fn, dtype):
    """name -> product(params, v, x, y); the same closures run eager and compiled."""
    # uniform draws for the Monte-Carlo Fisher; dynamo cannot trace a torch.Generator argument
    noise = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return {
        "hvp": lambda p, v, x, y: hessfunc.hvp(f, p, v, x, y),
        "hvp_rev_rev": lambda p, v, x, y: hessfunc.hvp(f, p, v, x, y, mode="rev-rev"),
        "hvps": lambda p, v, x, y: hessfunc.hvps(
            f, p, _tree.tree_map(lambda t: torch.stack([t, 2 * t]), v), x, y, chunk_size=1
        ),
        "ggn_vp": lambda p, v, x, y: hessfunc.ggn_vp(model_fn, CrossEntropyLoss(y), p, v, x),
        "ggn_vps": lambda p, v, x, y: hessfunc.ggn_vps(
            model_fn, CrossEntropyLoss(y), p, _tree.tree_map(lambda t: torch.stack([t, -t]), v), x
        ),
        "fisher_vp_empirical": lambda p, v, x, y: hessfunc.fisher_vp(
            model_fn, CrossEntropyLoss(y), p, v, x
        ),
        "fisher_vp_mc": lambda p, v, x, y: hessfunc.fisher_vp(
            model_fn, CrossEntropyLoss(y), p, v, x, kind="mc", noise=noise, mc_samples=2
        ),
        "fd_hvp": lambda p, v, x, y: fd_hvp(f, p, v, x, y),
        "newton_cg_step": lambda p, v, x, y: (
            hessfunc.newton_cg_step(f, p, x, y, damping=1e-2, maxiter=3).params
        ),
        # the build, matvec and solve in one graph; eigenbases are compared through the
        # products (an eigenvector's sign is arbitrary, the operator is not)
        "kfac": lambda p, v, x, y: kronecker_products(
            hessfunc.kfac(model_fn, CrossEntropyLoss(y), p, x), v
        ),
        "ekfac": lambda p, v, x, y: kronecker_products(
            hessfunc.ekfac(model_fn, CrossEntropyLoss(y), p, x), v
        ),
    }


def kronecker_products(op, v):
    return op.matvec(v), op.solve(v, 0.1)


@functools.cache
def compiled(model: str, dtype, name: str):
    f, model_fn, *_ = problem(model, dtype, 0)
    return torch.compile(products(f, model_fn, dtype)[name], fullgraph=True)


@contextlib.contextmanager
def default_dtype(dtype):
    """Run with the default dtype of the case, as a user of a float32 model does.

    The suite's default is float64 (conftest). On torch 2.11 inductor then mixes float64 into a
    float32 graph (even a plain compiled ``torch.func.grad`` fails with "expected m1 and m2 to
    have the same dtype"; related upstream: pytorch#184405); torch 2.13 is fine.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_contract(model, dtype, name):
    if OLD_TORCH and model == "transformer":  # its Embedding: see OLD_TORCH
        torch._dynamo.reset()
    with default_dtype(dtype):
        _check_contract(model, dtype, name)


def _check_contract(model, dtype, name):
    f, model_fn, params, v, x, y = problem(model, dtype, 0)
    eager = products(f, model_fn, dtype)[name]
    fn = compiled(model, dtype, name)
    # finite differences amplify rounding differences by 1/h (~200x in float32 at the default
    # step): two FD results agree to "fd-vs-fd" in float64, to FD accuracy ("fd") in float32
    kind = "exact"
    if name.startswith("fd"):
        kind = "fd-vs-fd" if dtype == torch.float64 else "fd"
    assert_close(fn(params, v, x, y), eager(params, v, x, y), kind)
    # new data, same shapes: no recompilation allowed
    _, _, params2, v2, x2, y2 = problem(model, dtype, 1)
    params2 = _tree.tree_map(lambda t: t + 0.01, params2)
    with torch.compiler.set_stance("fail_on_recompile"):
        out = fn(params2, v2, x2, y2)
    assert_close(out, eager(params2, v2, x2, y2), kind)


MLP_PRODUCTS = [
    "hvp",
    "hvp_rev_rev",
    "hvps",
    "ggn_vp",
    "ggn_vps",
    "fisher_vp_empirical",
    "fisher_vp_mc",
    "fd_hvp",
    "newton_cg_step",
    "kfac",
    "ekfac",
]


@pytest.mark.parametrize("name", MLP_PRODUCTS)
def test_mlp_float64(name):
    check_contract("mlp-tanh", torch.float64, name)


def test_mlp_float32_hvp():
    check_contract("mlp-tanh", torch.float32, "hvp")


@pytest.mark.parametrize("name", ["hvp", "ggn_vp", "fisher_vp_empirical", "fd_hvp"])
def test_transformer_block_float32(name):
    # hvp is traced reverse-over-reverse under compile (hessfunc._base._context.traced_mode)
    check_contract("transformer", torch.float32, name)


def test_changing_batch_size():
    """Code with forward-mode AD specialises on the batch size under compile; reverse-only code
    with dynamic=True does not. Hessian products are traced reverse-over-reverse under compile
    whatever their mode (hessfunc._base._context.traced_mode), so they are shape-polymorphic; the
    GGN's forward mode (J v) is traced as asked."""
    # batch sizes unequal to every layer width, so dynamo's duck sizing cannot tie them
    f, model_fn, params, v, x, y = problem("mlp-tanh", torch.float64, 0, n=5)
    _, _, _, _, x6, y6 = problem("mlp-tanh", torch.float64, 1, n=7)
    _, _, _, _, x8, y8 = problem("mlp-tanh", torch.float64, 2, n=9)

    def ggn(mode):
        return lambda p, v, x, y: hessfunc.ggn_vp(model_fn, CrossEntropyLoss(y), p, v, x, mode=mode)

    fwd = torch.compile(ggn("fwd-rev"), fullgraph=True, dynamic=True)
    fwd(params, v, x, y)
    with (
        pytest.raises(Exception, match="(?i)recompil"),
        torch.compiler.set_stance("fail_on_recompile"),
    ):
        fwd(params, v, x6, y6)
    for fn, eager in (
        (
            lambda p, v, x, y: hessfunc.hvp(f, p, v, x, y),
            lambda x, y: hessfunc.hvp(f, params, v, x, y),
        ),
        (ggn("rev-rev"), lambda x, y: ggn("fwd-rev")(params, v, x, y)),
    ):
        compiled_fn = torch.compile(fn, fullgraph=True, dynamic=True)
        compiled_fn(params, v, x, y)
        with torch.compiler.set_stance("fail_on_recompile"):
            for xb, yb in ((x6, y6), (x8, y8)):
                assert_close(compiled_fn(params, v, xb, yb), eager(xb, yb))


def test_hessian_matrix_compiles_without_a_budget_lookup():
    # the default memory budget reads free memory, which a compiled graph cannot; under compile
    # only an explicit max_bytes is enforced (checked at trace time)
    f, _, params, _, x, y = problem("mlp-tanh", torch.float64, 0)
    compiled_h = torch.compile(lambda p, x, y: hessfunc.hessian_matrix(f, p, x, y), fullgraph=True)
    assert_close(compiled_h(params, x, y), hessfunc.hessian_matrix(f, params, x, y))
    over = torch.compile(
        lambda p, x, y: hessfunc.hessian_matrix(f, p, x, y, max_bytes=100), fullgraph=True
    )
    # dynamo re-raises errors found while tracing as Unsupported, with our message inside
    with pytest.raises(
        (MemoryError, torch._dynamo.exc.Unsupported), match="hessian_matrix.*max_bytes"
    ):
        over(params, x, y)


def test_cg_with_tol_freezes_under_compile_and_matches_eager_early_stop():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    solve = lambda A, b: hessfunc.cg(lambda v: A @ v, b, maxiter=20, tol=1e-10)  # noqa: E731
    eager = solve(A, b)
    compiled = torch.compile(solve, fullgraph=True)(A, b)
    # three distinct eigenvalues: exact in 3 steps; eager stops there, compiled freezes there
    assert int(eager.iterations) == int(compiled.iterations) == 3
    torch.testing.assert_close(compiled.x, eager.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)


def test_compiled_input_checks_still_reject_bad_directions():
    # Under compile check_like compares leaf counts, shapes and dtypes instead of tree specs
    # (torch 2.11's dynamo finds two equal specs unequal, pytorch#190649); a direction with a
    # wrong shape or a missing leaf must still fail, with hessfunc's message.
    f, _, params, v, x, y = problem("mlp-tanh", torch.float64, 0)
    fn = torch.compile(lambda p, v, x, y: hessfunc.hvp(f, p, v, x, y), fullgraph=True)
    first = next(iter(v))
    wrong_shape = {**v, first: v[first][..., :-1]}
    with pytest.raises(Exception, match="has shape"):
        fn(params, wrong_shape, x, y)
    missing = dict(list(v.items())[:-1])
    with pytest.raises(Exception, match="must have the pytree structure"):
        fn(params, missing, x, y)
    # and a well-formed call gives the eager product
    assert_close(fn(params, v, x, y), hessfunc.hvp(f, params, v, x, y), "exact")


@pytest.mark.xfail(
    OLD_TORCH,
    reason="torch 2.11: after the MLP's compiled hvp, tracing the transformer block's (an "
    "nn.Embedding model) fails inside dynamo ('cannot access PyObject for Tensor - no "
    "interpreter set'); plain torch.func with functional_call fails the same way after some "
    "other compiled functions, and torch 2.13 does not. Remedy on 2.11: torch._dynamo.reset() "
    "before compiling such a function.",
    strict=True,
)
def test_embedding_after_another_compiled_function():
    # the contract checks of the MLP and then the transformer block, with no reset between
    torch._dynamo.reset()
    with default_dtype(torch.float32):
        _check_contract("mlp-tanh", torch.float32, "hvp")
        _check_contract("transformer", torch.float32, "hvp")
