"""Dataset sums and means, the linear-operator view, the determinism check, progress bars.

Every dataset product is compared with the same product on the concatenated data (the mean as
the product of the ``reduction="mean"`` loss over all of it), at the float64 "exact" tolerance.
Each comparison has a negative control: the uniform mean of batch means (what several libraries
compute) must fail the same comparison, so the test can tell the two apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tol
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import hessfunc
from hessfunc._base import _progress, _tree
from hessfunc.data import check_deterministic, linear_operator, mean_over, sum_over
from hessfunc.losses import CrossEntropyLoss

N, D, C = 24, 4, 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, C))


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    apply, params = hessfunc.from_module(_net().double())
    v = _tree.random_like(params, g)
    return apply, params, v, X, y


def _products(apply, params, v):
    """name -> (summed product of a batch, the same product of the mean loss over a batch)."""

    def ce(reduction):
        return lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction=reduction)

    def grad(reduction):
        return lambda X, y: torch.func.grad(ce(reduction))(params, X, y)

    def hvp(reduction):
        return lambda X, y: hessfunc.hvp(ce(reduction), params, v, X, y)

    def ggn(reduction):
        return lambda X, y: hessfunc.ggn_vp(
            apply, CrossEntropyLoss(y, reduction=reduction), params, v, X
        )

    def fisher(reduction):
        return lambda X, y: hessfunc.fisher_vp(
            apply, CrossEntropyLoss(y, reduction=reduction), params, v, X
        )

    return {
        "grad": (grad("sum"), grad("mean")),
        "hvp": (hvp("sum"), hvp("mean")),
        "ggn_vp": (ggn("sum"), ggn("mean")),
        "fisher_vp": (fisher("sum"), fisher("mean")),
    }


def _not_close(actual, expected):
    flat_a, flat_e = _tree.ravel(actual)[0], _tree.ravel(expected)[0]
    return not torch.allclose(flat_a, flat_e, **tol("exact", torch.float64))


@pytest.mark.parametrize("batch_size", [6, 7], ids=["divides-N", "ragged-last-batch"])
@pytest.mark.parametrize("name", ["grad", "hvp", "ggn_vp", "fisher_vp"])
def test_mean_over_equals_the_product_on_the_concatenated_data(problem, name, batch_size):
    apply, params, v, X, y = problem
    summed, mean = _products(apply, params, v)[name]
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    got = mean_over(summed, loader, count=lambda X, y: len(y))
    assert_close(got, mean(X, y))
    assert_close(sum_over(summed, loader), summed(X, y))
    if batch_size == 7:  # 7 + 7 + 7 + 3: batch means weighted uniformly over-weight the last 3
        batch_means = [mean(Xb, yb) for Xb, yb in loader]
        uniform = _tree.scale(1 / len(batch_means), batch_means[0])
        for m in batch_means[1:]:
            uniform = _tree.axpy(1 / len(batch_means), m, uniform)
        assert _not_close(uniform, mean(X, y))


def test_dict_batches_are_passed_as_one_argument(problem):
    apply, params, v, X, y = problem

    class Records(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"x": X[i], "label": y[i]}

    summed, mean = _products(apply, params, v)["hvp"]
    loader = DataLoader(Records(), batch_size=5)
    got = mean_over(
        lambda b: summed(b["x"], b["label"]), loader, count=lambda b: b["label"].numel()
    )
    assert_close(got, mean(X, y))


def test_token_loss_with_ignore_index_is_weighted_by_counted_tokens():
    g = torch.Generator().manual_seed(3)
    B, T, V = 10, 5, 4
    X = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    ignored = torch.rand(B, T, generator=g) < 0.4
    ignored[0] = True  # one sequence with nothing to count, one nearly empty batch below
    y[ignored] = -100
    torch.manual_seed(2)
    apply, params = hessfunc.from_module(torch.nn.Linear(D, V).double())
    v = _tree.random_like(params, g)

    def loss(reduction):
        def f(p, X, y):
            logits = apply(p, X).reshape(-1, V)
            return F.cross_entropy(logits, y.reshape(-1), ignore_index=-100, reduction=reduction)

        return f

    batches = [(X[:1], y[:1]), (X[1:4], y[1:4]), (X[4:], y[4:])]
    summed = lambda X, y: hessfunc.hvp(loss("sum"), params, v, X, y)  # noqa: E731
    expected = hessfunc.hvp(loss("mean"), params, v, X, y)
    tokens = mean_over(summed, batches, count=lambda X, y: (y != -100).sum())
    assert_close(tokens, expected)
    # Negative controls: weighting by examples, or averaging batch means (the first is NaN-free
    # only because its batch loss is a sum; its mean over zero tokens is 0/0).
    by_examples = mean_over(summed, batches, count=lambda X, y: y.numel())
    assert _not_close(by_examples, expected)
    means = [hessfunc.hvp(loss("mean"), params, v, Xb, yb) for Xb, yb in batches[1:]]
    uniform = _tree.scale(0.5, _tree.add(*means))
    assert _not_close(uniform, expected)


def test_counts_may_mix_ints_and_tensors_and_floats(problem):
    apply, params, v, X, y = problem
    summed, mean = _products(apply, params, v)["grad"]
    batches = [(X[:10], y[:10]), (X[10:], y[10:])]
    counts = iter([10, torch.tensor(14)])
    assert_close(mean_over(summed, batches, count=lambda X, y: next(counts)), mean(X, y))
    weights = mean_over(summed, batches, count=lambda X, y: torch.tensor(float(len(y))))
    assert_close(weights, mean(X, y))


def test_linear_operator_feeds_cg_and_matmat_is_one_pass(problem):
    apply, params, v, X, y = problem
    f_sum = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    f_mean = lambda p, X, y: F.cross_entropy(apply(p, X), y)  # noqa: E731
    passes = []

    class Counted(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    batches = Counted((X[i : i + 7], y[i : i + 7]) for i in range(0, N, 7))
    op = linear_operator(
        lambda u, X, y: hessfunc.hvp(f_sum, params, u, X, y, mode="rev-rev"),
        batches,
        count=lambda X, y: len(y),
    )
    assert_close(op(v), hessfunc.hvp(f_mean, params, v, X, y))
    k = 3
    vs = _tree.random_like(params, torch.Generator().manual_seed(5), batch=k)
    passes.clear()
    block = op.matmat(vs)
    assert len(passes) == 1
    expected = hessfunc.hvps(f_mean, params, vs, X, y)
    assert_close(block, expected)
    batched = linear_operator(
        lambda u, X, y: hessfunc.hvp(f_sum, params, u, X, y),
        batches,
        count=lambda X, y: len(y),
        batched=lambda us, X, y: hessfunc.hvps(f_sum, params, us, X, y, chunk_size=2),
    )
    assert_close(batched.matmat(vs), expected)

    H = hessfunc.hessian_matrix(f_mean, params, X, y)
    flat_v, unravel = hessfunc.ravel(v)
    damping = 1.0
    res = hessfunc.cg(op, v, maxiter=60, damping=damping, tol=1e-13)
    exact = torch.linalg.solve(H + damping * torch.eye(len(H)), flat_v)
    torch.testing.assert_close(hessfunc.ravel(res.x)[0], exact, rtol=1e-9, atol=1e-9)


def test_like_gives_zeros_for_an_empty_pass(problem):
    apply, params, v, X, y = problem
    summed, _ = _products(apply, params, v)["hvp"]
    assert_close(sum_over(summed, [], like=params), _tree.zeros_like(params))


def test_the_sum_never_writes_into_what_fn_returns():
    w = {"a": torch.ones(2)}
    out = sum_over(lambda i: w, [(1,), (2,), (3,)])
    assert torch.equal(w["a"], torch.ones(2)) and torch.equal(out["a"], 3 * torch.ones(2))
    op = linear_operator(lambda v, i: v, [(1,), (2,)])
    assert "batches" not in repr(op)


def test_errors_name_the_function_and_the_fix(problem):
    apply, params, v, X, y = problem
    summed, _ = _products(apply, params, v)["grad"]
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    with pytest.raises(ValueError, match=r"sum_over\(fn, batches\): batches yielded no batch"):
        sum_over(summed, [])
    with pytest.raises(TypeError, match=r"linear_operator.*iterator.*list\(batches\)"):
        linear_operator(lambda u, X, y: u, iter(batches))
    with pytest.raises(TypeError, match=r"mean_over\(fn, batches, count=...\): count must"):
        mean_over(summed, batches, count=lambda X, y: True)
    with pytest.raises(TypeError, match=r"count must return a Python int or a 0-d tensor"):
        mean_over(summed, batches, count=lambda X, y: torch.ones(2))
    with pytest.raises(ValueError, match=r"the total count is 0"):
        mean_over(summed, batches, count=lambda X, y: 0)
    shapes = iter([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="different structure for batch 1"):
        sum_over(lambda X, y: {"a": next(shapes)} if len(y) == 5 else [torch.zeros(2)], batches)
    with pytest.raises(TypeError, match="reduce must be None or callable"):
        sum_over(summed, batches, reduce="sum")
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        sum_over(summed, batches, progress="yes")


def test_reduce_is_applied_once_to_sum_and_count_together(problem):
    apply, params, v, X, y = problem
    summed, mean = _products(apply, params, v)["grad"]
    calls = []

    def twice(tree):  # a stand-in for two processes holding the same data
        calls.append(tree)
        return _tree.scale(2, tree)

    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    assert_close(mean_over(summed, batches, count=lambda X, y: len(y), reduce=twice), mean(X, y))
    assert len(calls) == 1 and isinstance(calls[0], tuple) and calls[0][1].dim() == 0


def test_allreduce_refuses_to_run_inside_a_transform_or_without_a_group():
    reduce = hessfunc.distributed.AllReduce()
    with pytest.raises(RuntimeError, match=r"inside torch.func transform\(s\) Vmap"):
        torch.func.vmap(lambda x: reduce({"x": x})["x"])(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"inside torch.func transform\(s\) Grad"):
        torch.func.grad(lambda x: reduce(x).sum())(torch.ones(3))
    with pytest.raises(RuntimeError, match="not initialised"):
        reduce(torch.ones(3))


# ----------------------------------------------------------------------------- determinism


def _loader(X, y, **kwargs):
    return DataLoader(TensorDataset(X, y), batch_size=5, **kwargs)


def test_determinism_check_passes_a_fixed_product_even_when_shuffled(problem):
    apply, params, v, X, y = problem
    summed, _ = _products(apply, params, v)["hvp"]
    net = _net().double().eval()
    report = check_deterministic(summed, _loader(X, y), module=net)
    assert report.ok and report.difference == 0.0 and report.problems == ()
    shuffled = _loader(X, y, shuffle=True, generator=torch.Generator().manual_seed(0))
    report = check_deterministic(summed, shuffled, module=net)
    assert report.ok and 0 <= report.difference < report.rtol


def test_determinism_check_flags_shuffling_with_drop_last(problem):
    apply, params, v, X, y = problem
    summed, _ = _products(apply, params, v)["hvp"]
    gen = torch.Generator().manual_seed(0)
    loader = _loader(X, y, shuffle=True, drop_last=True, generator=gen)
    report = check_deterministic(summed, loader, raise_on_fail=False)
    assert not report.ok
    assert any("drop_last=True" in p for p in report.problems)
    assert any("two passes differ" in p for p in report.problems)
    with pytest.raises(AssertionError, match="shuffles with drop_last=True"):
        check_deterministic(summed, loader)


def test_determinism_check_flags_active_dropout():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Dropout(0.3), torch.nn.Linear(5, 1))
    net = net.double()
    X = torch.randn(N, D, dtype=torch.float64)
    params = dict(net.named_parameters())
    # A raw functional_call (hessfunc.from_module would refuse this module in training mode).
    f = lambda X: torch.func.grad(  # noqa: E731
        lambda p: torch.func.functional_call(net, p, (X,)).pow(2).sum()
    )(params)
    report = check_deterministic(f, [(X[:10],), (X[10:],)], module=net, raise_on_fail=False)
    assert not report.ok and report.difference > 1e-3
    assert any("Dropout(p=0.3)" in p for p in report.problems)
    net.eval()
    assert check_deterministic(f, [(X[:10],), (X[10:],)], module=net).ok


def test_determinism_check_flags_train_mode_batchnorm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.BatchNorm1d(5)).double()
    X = torch.randn(N, D, dtype=torch.float64)
    batches = [(X[:10],), (X[10:],)]
    report = check_deterministic(
        lambda X: net(X).detach().sum(0), batches, module=net, raise_on_fail=False
    )
    assert not report.ok
    assert any("BatchNorm1d) is in training mode" in p for p in report.problems)
    assert any("changed module buffers (1.running_mean" in p for p in report.problems)
    # Batch statistics without running statistics: flagged from the module alone.
    stateless = torch.nn.BatchNorm1d(D, track_running_stats=False).double()
    report = check_deterministic(
        lambda X: stateless(X).sum(0), batches, module=stateless, raise_on_fail=False
    )
    assert not report.ok and report.difference == 0.0
    assert any("each batch's own statistics" in p for p in report.problems)
    net.eval()
    assert check_deterministic(lambda X: net(X).detach().sum(0), batches, module=net).ok


def test_determinism_check_flags_a_padding_distributed_sampler():
    X, y = torch.randn(11, D), torch.zeros(11)
    sampler = DistributedSampler(TensorDataset(X, y), num_replicas=2, rank=0, shuffle=False)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, sampler=sampler)
    report = check_deterministic(lambda X, y: X.sum(0), loader, raise_on_fail=False)
    assert not report.ok and "pads 1 repeated example(s)" in report.problems[0]


# ----------------------------------------------------------------------------- progress bars


def test_progress_bar_only_when_asked_or_interactive(monkeypatch, capsys):
    monkeypatch.delenv("HESSFUNC_PROGRESS", raising=False)
    batches = [(torch.ones(2),)] * 3
    sum_over(lambda x: x, batches)  # not a terminal: quiet
    assert "sum_over" not in capsys.readouterr().err
    sum_over(lambda x: x, batches, progress=True)
    err = capsys.readouterr().err
    assert "hessfunc.data.sum_over" in err and "0/3" in err
    monkeypatch.setenv("HESSFUNC_PROGRESS", "1")
    assert _progress.wanted("w", None)
    bar = _progress.track(range(3), where="w", desc="d")
    assert type(bar).__name__ == "tqdm" and bar.delay == 1.0  # auto bars wait a second
    bar.close()
    monkeypatch.setenv("HESSFUNC_PROGRESS", "0")
    assert not _progress.wanted("w", None)
    assert _progress.track(range(3), where="w", desc="d") == range(3)


def test_dense_chunks_get_a_progress_bar(monkeypatch):
    bars = []

    def bar(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    monkeypatch.setattr(_progress, "wanted", lambda where, progress: True)
    monkeypatch.setattr(_progress, "_bar_class", lambda: bar)
    f = lambda th: (th**4).sum()  # noqa: E731
    H = hessfunc.hessian_matrix(f, torch.ones(6), chunk_size=2)
    torch.testing.assert_close(H, 12 * torch.eye(6))
    assert bars == [dict(desc="dense chunks", total=3, leave=False, delay=1.0)]


@pytest.mark.compile
def test_chunked_dense_matrix_still_compiles_as_one_graph(monkeypatch):
    monkeypatch.setenv("HESSFUNC_PROGRESS", "1")  # a bar would be wanted, but not while tracing
    f = lambda th: (th**4).sum()  # noqa: E731
    compiled = torch.compile(lambda t: hessfunc.hessian_matrix(f, t, chunk_size=2), fullgraph=True)
    torch.testing.assert_close(compiled(torch.ones(6)), 12 * torch.eye(6))


def test_public_functions_of_the_namespaces_document_returns_cost_and_example():
    import inspect

    for module in (hessfunc.data, hessfunc.distributed):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or name == "AllReduce":
                doc = inspect.getdoc(obj) or ""
                for part in ("Returns:", "Cost:", "Example:"):
                    assert part in doc, (module.__name__, name, part)
                if inspect.isfunction(obj):
                    assert inspect.signature(obj).return_annotation is not inspect._empty, name


# ----------------------------------------------------------------------------- optional imports

_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str, blocked=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HESSFUNC_PROGRESS", None)
    prelude = _BLOCK.format(blocked=set(blocked)) if blocked else ""
    src = prelude + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env)


def test_importing_hessfunc_imports_neither_scipy_nor_needs_tqdm():
    out = _run(
        """
        import sys, torch, hessfunc
        print("scipy" in sys.modules)
        print(hessfunc.data.sum_over(lambda x: x, [(torch.ones(2),)]).tolist())
        try:
            hessfunc.data.sum_over(lambda x: x, [(torch.ones(2),)], progress=True)
        except ImportError as err:
            print(err)
        try:
            hessfunc.to_scipy(lambda v: v, torch.ones(2))
        except ImportError as err:
            print(err)
        """,
        blocked=("tqdm", "scipy"),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False" and lines[1] == "[1.0, 1.0]"
    assert "pip install 'hessfunc[progress]'" in lines[2]
    assert "pip install 'hessfunc[scipy]'" in lines[3]


def test_the_scipy_adapter_imports_no_product_module():
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "hessfunc", "linalg", "linop.py")).read())
    local = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
    }
    local |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
        for alias in node.names
    }
    assert local <= {None, "_checks", "_tree", "_types"}, local  # the bottom layer only
