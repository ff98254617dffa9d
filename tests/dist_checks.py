"""Two-process checks of hessfunc.data and hessfunc.distributed on the gloo backend (CPU).

Run them directly (two ranks are started, one line per check is printed)::

    python tests/dist_checks.py
    torchrun --nproc-per-node 2 tests/dist_checks.py   # the same checks under torchrun

``tests/test_distributed.py`` starts the ranks once and turns each check into a test. Every
check runs on every rank, in the same order, and raises ``AssertionError`` on failure. Products
are compared with the single-process product on the concatenated data (every rank builds the
same full data set from one seed), at the float64 "exact" tolerance.

The ``upstream_*`` checks pin today's behaviour of torch (2.13) that hessfunc routes around:
when one fails, torch changed, and the routes and the docs can be revisited.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # import this checkout's hessfunc, whatever is installed
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hessfunc  # noqa: E402
from hessfunc._base import _progress, _tree  # noqa: E402
from hessfunc.data import check_deterministic, linear_operator, mean_over, sum_over  # noqa: E402
from hessfunc.distributed import AllReduce, from_sharded, replicate_batch, shard_batch  # noqa: E402
from hessfunc.losses import CrossEntropyLoss  # noqa: E402

EXACT = dict(rtol=1e-10, atol=1e-10)
N, D, C = 23, 4, 3
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def close(actual, expected, **tol):
    a, e = _tree.ravel(actual)[0], _tree.ravel(expected)[0]
    torch.testing.assert_close(a, e, **(tol or EXACT))


def differ(actual, expected):
    a, e = _tree.ravel(actual)[0], _tree.ravel(expected)[0]
    return not torch.allclose(a, e, **EXACT)


def full(tree):
    """A pytree of DTensors gathered into plain tensors (outside any transform)."""
    return _tree.tree_map(lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x, tree)


def net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, C))


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return X, y


def shards(rank, X, y):
    """Uneven shards and batch counts: rank 0 holds 14 examples (4+4+4+2), rank 1 9 (4+4+1)."""
    lo, hi = (0, 14) if rank == 0 else (14, N)
    return [(X[i : min(i + 4, hi)], y[i : min(i + 4, hi)]) for i in range(lo, hi, 4)]


def direction(params):
    return _tree.random_like(params, torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------- data parallel


@check
def ddp_uneven_shards_equal_the_full_data_products(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(net())
    apply, params = hessfunc.from_module(model)
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    v = direction(params)
    X, y = data()
    local = shards(rank, X, y)
    assert len(local) == (4 if rank == 0 else 3)

    def ce(reduction):
        return lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction=reduction)

    products = {
        "grad": lambda r: lambda X, y: torch.func.grad(ce(r))(params, X, y),
        "hvp": lambda r: lambda X, y: hessfunc.hvp(ce(r), params, v, X, y),
        "ggn_vp": lambda r: (
            lambda X, y: hessfunc.ggn_vp(apply, CrossEntropyLoss(y, reduction=r), params, v, X)
        ),
        "fisher_vp": lambda r: (
            lambda X, y: hessfunc.fisher_vp(apply, CrossEntropyLoss(y, reduction=r), params, v, X)
        ),
    }
    count = lambda X, y: len(y)  # noqa: E731
    for name, make in products.items():
        expected = make("mean")(X, y)
        got = mean_over(make("sum"), local, count=count, reduce=AllReduce())
        close(got, expected)
        close(sum_over(make("sum"), local, reduce=AllReduce()), make("sum")(X, y))
        # Negative control: a uniform mean over ranks of the ranks' means (14 vs 9 examples).
        per_rank = mean_over(make("sum"), local, count=count)
        uniform = _tree.scale(1 / world, AllReduce()(per_rank))
        assert differ(uniform, expected), name


@check
def kronecker_factor_sums_are_all_reduced_once(rank, world):
    """K-FAC and EK-FAC hold sums over samples with their counts: one all-reduce of a rank's sums
    gives the factors of the whole data set (uneven shards, ragged batches); EK-FAC takes a
    second pass for its moments in the all-reduced basis."""
    apply, params = hessfunc.from_module(net())
    params = _tree.tree_map(lambda p: p.double(), params)
    X, y = data()
    X = X.double()
    local = shards(rank, X, y)
    kfac = lambda X, y: hessfunc.kfac(apply, CrossEntropyLoss(y), params, X)  # noqa: E731
    K = sum_over(kfac, local, reduce=AllReduce())
    close(K.dense(), kfac(X, y).dense(), rtol=1e-12, atol=1e-14)
    ekfac = lambda X, y: hessfunc.ekfac(apply, CrossEntropyLoss(y), params, X, basis=K)  # noqa: E731
    moments = sum_over(lambda X, y: ekfac(X, y).moments, local, reduce=AllReduce())
    whole = ekfac(X, y)
    close(whole._replace(moments=moments).dense(), whole.dense(), rtol=1e-12, atol=1e-14)
    # negative control: a rank's own factors are not the data set's
    assert differ(sum_over(kfac, local).dense(), K.dense())


@check
def token_counts_are_reduced_with_the_sums(rank, world):
    apply, params = hessfunc.from_module(net())
    v = direction(params)
    X, y = data()
    y = y.clone()
    y[::3] = -100  # ignored targets, unevenly spread over the two shards

    def f(reduction):
        return lambda p, X, y: F.cross_entropy(
            apply(p, X), y, ignore_index=-100, reduction=reduction
        )

    got = mean_over(
        lambda X, y: hessfunc.hvp(f("sum"), params, v, X, y),
        shards(rank, X, y),
        count=lambda X, y: (y != -100).sum(),
        reduce=AllReduce(),
    )
    expected = hessfunc.hvp(f("mean"), params, v, X, y)
    close(got, expected)


@check
def cg_on_an_all_reduced_operator_is_identical_on_every_rank(rank, world):
    apply, params = hessfunc.from_module(net())
    X, y = data()
    f_sum = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    f_mean = lambda p, X, y: F.cross_entropy(apply(p, X), y)  # noqa: E731
    op = linear_operator(
        lambda u, X, y: hessfunc.hvp(f_sum, params, u, X, y, mode="rev-rev"),
        shards(rank, X, y),
        count=lambda X, y: len(y),
        reduce=AllReduce(),
    )
    b = direction(params)
    res = hessfunc.cg(op, b, maxiter=40, damping=0.5, tol=1e-10)
    flat = torch.cat([hessfunc.ravel(res.x)[0], res.iterations.reshape(1).double()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], other) for other in everyone[1:]), "ranks disagree"
    single = hessfunc.cg(
        lambda u: hessfunc.hvp(f_mean, params, u, X, y), b, maxiter=40, damping=0.5, tol=1e-10
    )
    close(res.x, single.x, rtol=1e-8, atol=1e-10)


@check
def a_rank_without_batches_joins_with_zeros(rank, world):
    apply, params = hessfunc.from_module(net())
    v = direction(params)
    X, y = data()
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    local = [] if rank == 0 else [(X[:12], y[:12]), (X[12:], y[12:])]
    got = mean_over(
        lambda X, y: hessfunc.hvp(f, params, v, X, y),
        local,
        count=lambda X, y: len(y),
        reduce=AllReduce(),
        like=params,
    )
    close(got, _tree.scale(1 / N, hessfunc.hvp(f, params, v, X, y)))


@check
def determinism_check_agrees_across_ranks(rank, world):
    apply, params = hessfunc.from_module(net())
    v = direction(params)
    X, y = data()
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    report = check_deterministic(
        lambda X, y: hessfunc.hvp(f, params, v, X, y), shards(rank, X, y), reduce=AllReduce()
    )
    assert report.ok and report.difference == 0.0


@check
def progress_bars_only_on_rank_zero(rank, world):
    assert _progress.wanted("w", True) is (rank == 0)


@check
def ddp_is_unwrapped(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    plain = net()
    wrapped = DistributedDataParallel(plain)
    assert hessfunc.distributed.unwrap(wrapped) is plain
    assert list(hessfunc.from_module(wrapped)[1]) == list(hessfunc.from_module(plain)[1])


# ----------------------------------------------------------------------------- sharded models


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _reference(model, X, y):
    apply, params = hessfunc.from_module(model)
    v = direction(params)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    hv = hessfunc.hvp(f, params, v, X, y)
    gv = hessfunc.ggn_vp(apply, CrossEntropyLoss(y, reduction="sum"), params, v, X)
    return v, hv, gv


def _sharded_like(tree, params):
    from torch.distributed.tensor import distribute_tensor

    return {k: distribute_tensor(tree[k], p.device_mesh, p.placements) for k, p in params.items()}


@check
def fsdp2_products_equal_the_unsharded_reference(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    model = net()
    X, y = data()
    reference = copy.deepcopy(model)
    V, HV, GV = _reference(reference, X, y)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    apply, params = from_sharded(model)
    v = _sharded_like(V, params)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    # Every rank passes the same batch.
    Xr, yr = replicate_batch((X, y), mesh)
    hv = hessfunc.hvp(f, params, v, Xr, yr, mode="rev-rev")
    assert all(hv[k].device_mesh == mesh for k in params)
    close(full(hv), HV)
    gv = hessfunc.ggn_vp(
        apply, CrossEntropyLoss(yr, reduction="sum"), params, v, Xr, mode="rev-rev"
    )
    close(full(gv), GV)
    grad = torch.func.grad(f)(params, Xr, yr)
    ref_apply, ref_params = hessfunc.from_module(reference)
    ref_f = lambda p, X, y: F.cross_entropy(ref_apply(p, X), y, reduction="sum")  # noqa: E731
    close(full(grad), torch.func.grad(ref_f)(ref_params, X, y))
    vs = {k: torch.stack([t, -t]) for k, t in V.items()}
    hvs = hessfunc.hvps(f, params, _sharded_batched(vs, params), Xr, yr, mode="rev-rev")
    close(full(hvs), {k: torch.stack([t, -t]) for k, t in HV.items()})
    # Each rank passes its slice (12 + 11 = torch.chunk's layout of 23).
    lo, hi = (0, 12) if rank == 0 else (12, N)
    Xs, ys = shard_batch((X[lo:hi], y[lo:hi]), mesh)
    assert Xs.shape == (N, D)
    close(full(hessfunc.hvp(f, params, v, Xs, ys, mode="rev-rev")), HV)
    # A dataset mean over sharded batches: counts come out global (len of a DTensor).
    batches = [shard_batch((X[a:b], y[a:b]), mesh) for a, b in ((lo, lo + 6), (lo + 6, hi))]
    got = mean_over(
        lambda X, y: hessfunc.hvp(f, params, v, X, y, mode="rev-rev"),
        batches,
        count=lambda X, y: len(y),
    )
    close(full(got), _tree.scale(1 / N, HV))
    # Forward mode is refused with the fix.
    try:
        hessfunc.hvp(f, params, v, Xr, yr)
    except NotImplementedError as err:
        assert "mode='rev-rev'" in str(err) and "DTensor sharding rules" in str(err), err
    else:
        raise AssertionError("mode='fwd-rev' on DTensor parameters did not raise")
    # A plain-tensor batch gets the conversion to use.
    try:
        hessfunc.hvp(f, params, v, X, yr, mode="rev-rev")
    except RuntimeError as err:
        assert "replicate_batch" in str(err), err
    else:
        raise AssertionError("a plain-tensor batch did not raise")


@check
def tensor_parallel_products_equal_the_unsharded_reference(rank, world):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = _mesh(world)
    model = net()
    X, y = data()
    V, HV, GV = _reference(copy.deepcopy(model), X, y)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    apply, params = from_sharded(model)
    v = _sharded_like(V, params)
    Xr, yr = replicate_batch((X, y), mesh)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    close(full(hessfunc.hvp(f, params, v, Xr, yr, mode="rev-rev")), HV)
    vs = {k: torch.stack([t, 2 * t]) for k, t in V.items()}
    hvs = hessfunc.hvps(f, params, _sharded_batched(vs, params), Xr, yr, mode="rev-rev")
    close(full(hvs), {k: torch.stack([t, 2 * t]) for k, t in HV.items()})
    gv = hessfunc.ggn_vp(
        apply, CrossEntropyLoss(yr, reduction="sum"), params, v, Xr, mode="rev-rev"
    )
    close(full(gv), GV)


def _sharded_batched(vs, params):
    """Stacked directions as DTensors: each placement shifted past the new leading axis."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for k, p in params.items():
        placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements]
        out[k] = distribute_tensor(vs[k], p.device_mesh, placements)
    return out


@check
def cg_runs_on_sharded_products(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    model = net()
    X, y = data()
    ref_apply, ref_params = hessfunc.from_module(copy.deepcopy(model))
    ref_f = lambda p, X, y: F.cross_entropy(ref_apply(p, X), y)  # noqa: E731
    B = direction(ref_params)
    expected = hessfunc.cg(
        lambda u: hessfunc.hvp(ref_f, ref_params, u, X, y), B, maxiter=10, damping=0.5
    )
    fully_shard(model, mesh=mesh)
    apply, params = from_sharded(model)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y)  # noqa: E731
    Xr, yr = replicate_batch((X, y), mesh)
    res = hessfunc.cg(
        lambda u: hessfunc.hvp(f, params, u, Xr, yr, mode="rev-rev"),
        _sharded_like(B, params),
        maxiter=10,
        damping=0.5,
    )
    close(full(res.x), expected.x, rtol=1e-9, atol=1e-10)


class _Scaled(torch.nn.Module):
    """Multiplies by a registered buffer: a forward that reads a plain tensor FSDP2 leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))

    def forward(self, x):
        return x * self.scale


@check
def fsdp2_model_reading_buffers_equals_the_unsharded_reference(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(D, 6), torch.nn.BatchNorm1d(6), _Scaled(), torch.nn.Tanh(),
        torch.nn.Linear(6, C),
    )  # fmt: skip
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.3, 0.4, 6))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    model.eval()
    X, y = data()
    V, HV, GV = _reference(copy.deepcopy(model), X, y)
    fully_shard(model, mesh=mesh)
    apply, params = from_sharded(model)
    v = _sharded_like(V, params)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y, reduction="sum")  # noqa: E731
    Xr, yr = replicate_batch((X, y), mesh)
    close(full(hessfunc.hvp(f, params, v, Xr, yr, mode="rev-rev")), HV)
    gv = hessfunc.ggn_vp(
        apply, CrossEntropyLoss(yr, reduction="sum"), params, v, Xr, mode="rev-rev"
    )
    close(full(gv), GV)
    # nothing of the user's module changed: its buffers stay plain tensors, in eval mode
    assert not any(hasattr(b, "device_mesh") for b in model.buffers())
    assert not model.training and torch.equal(bn.running_var, torch.linspace(0.5, 2.0, 6))


@check
def hvps_default_mode_on_sharded_parameters_names_the_fix(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    model = net()
    X, y = data()
    V = direction(hessfunc.from_module(copy.deepcopy(model))[1])
    fully_shard(model, mesh=mesh)
    apply, params = from_sharded(model)
    f = lambda p, X, y: F.cross_entropy(apply(p, X), y)  # noqa: E731
    Xr, yr = replicate_batch((X, y), mesh)
    vs = _sharded_batched({k: torch.stack([t, -t]) for k, t in V.items()}, params)
    for product in (
        lambda: hessfunc.hvps(f, params, vs, Xr, yr),
        lambda: hessfunc.hvp(f, params, _sharded_like(V, params), Xr, yr),
    ):
        try:
            product()
        except NotImplementedError as err:
            assert "mode='rev-rev'" in str(err) and "plain tensor" not in str(err), err
        else:
            raise AssertionError("mode='fwd-rev' on DTensor parameters did not raise")


# ----------------------------------------------------------------------------- upstream pins


@check
def upstream_forward_ad_has_no_dtensor_sharding_rule(rank, world):
    from torch.distributed.tensor import Replicate, distribute_tensor

    w = distribute_tensor(torch.ones(4, 2), _mesh(world), [Replicate()])
    try:
        torch.func.jvp(lambda t: (t * t).sum(), (w,), (w,))
    except NotImplementedError as err:
        assert "does not have a sharding strategy registered" in str(err), err
    else:
        raise AssertionError("jvp on a DTensor works now: allow mode='fwd-rev' in from_sharded")


@check
def upstream_fsdp2_and_tp_hooks_fail_under_transforms(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = _mesh(world)
    X = torch.randn(3, D)
    sharded = fully_shard(net(), mesh=mesh)
    params = {k: p.detach() for k, p in sharded.named_parameters()}
    try:
        torch.func.grad(lambda p: torch.func.functional_call(sharded, p, (X,)).sum())(params)
    except AttributeError as err:
        assert "_local_tensor" in str(err), err
    else:
        raise AssertionError("functional_call through fully_shard works now")
    tp = parallelize_module(torch.nn.Linear(D, 4), mesh, ColwiseParallel())
    params = {k: p.detach() for k, p in tp.named_parameters()}
    try:
        torch.func.grad(lambda p: torch.func.functional_call(tp, p, (X,)).sum())(params)
    except RuntimeError as err:
        assert "setup_context" in str(err), err
    else:
        raise AssertionError("tensor-parallel input hooks work under grad now")


@check  # last: the grad attempt leaves a collective nobody waits for
def upstream_collectives_inside_transforms_are_wrong(rank, world):
    import torch.distributed._functional_collectives as funcol

    def all_reduce(t):
        return funcol.all_reduce(t, "sum", dist.group.WORLD)

    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    try:
        torch.func.grad(lambda t: all_reduce(t * t).sum())(x)
    except RuntimeError as err:
        assert "setup_context" in str(err), err
    else:
        raise AssertionError("functional all_reduce works under grad now")
    primal, tangent = torch.func.jvp(lambda t: all_reduce(t * t), (x,), (torch.ones(2),))
    funcol.wait_tensor(primal)
    assert torch.equal(torch.as_tensor(tangent), torch.zeros(2)), "jvp tangent is not zero now"
    # vmap: there is no batching rule, so the fallback runs one collective per sample and
    # stacks buffers it never waits for; the values then depend on timing (the un-reduced
    # inputs in probes here), so the pin is the missing rule, not a racy value.
    rule = torch._C._dispatch_has_kernel_for_dispatch_key(
        "_c10d_functional::all_reduce", "FuncTorchBatched"
    )
    assert not rule, "the functional all_reduce has a vmap batching rule now"


# ----------------------------------------------------------------------------- running


def run_rank(
    rank: int, world: int, init: str | None, out: str | None, only: list[str]
) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    timeout = timedelta(seconds=60)
    if init is None:  # torchrun: MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE
        dist.init_process_group("gloo", timeout=timeout)
    else:
        store = dist.FileStore(init, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    results = {}

    def save() -> None:  # after every check, so a rank that dies still says where it was
        if out is not None:
            with open(f"{out}.{rank}", "w") as fh:
                json.dump(results, fh)

    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        results[name] = {"outcome": "started, did not finish", "seconds": None}
        save()
        start = time.perf_counter()
        try:
            fn(rank, world)
            outcome = "ok"
        except Exception:  # noqa: BLE001 - reported per check
            outcome = traceback.format_exc()
        results[name] = {"outcome": outcome, "seconds": round(time.perf_counter() - start, 3)}
        save()
        dist.barrier()  # the next check starts together on every rank
    everyone = [results]
    if out is None:  # under torchrun rank 0 reports every rank's outcome
        everyone = [None] * world
        dist.all_gather_object(everyone, results)
    dist.destroy_process_group()
    return everyone


def launch(world: int = 2, only: tuple[str, ...] = (), timeout: float = 240) -> list[dict]:
    """Start ``world`` ranks of this file, wait, and return each rank's results.

    A rank that crashed or hung reports the checks it finished, the one it was in (outcome
    ``"started, did not finish"``), and the end of its stderr under the key ``"<exit>"``.
    """
    tmp = tempfile.mkdtemp(prefix="hessfunc-dist-")
    store, out = os.path.join(tmp, "store"), os.path.join(tmp, "results")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--world", str(world), "--init", store]
    cmd += ["--out", out, *[f"--only={name}" for name in only]]
    logs = [open(os.path.join(tmp, f"stderr.{r}"), "w+") for r in range(world)]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r)], env=env, stderr=logs[r]) for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, p in enumerate(procs):
        ranked = {}
        if os.path.exists(f"{out}.{r}"):
            with open(f"{out}.{r}") as fh:
                ranked = json.load(fh)
        if p.returncode != 0:
            logs[r].seek(0)
            tail = "".join(line for line in logs[r] if "Warning" not in line)[-3000:]
            ranked["<exit>"] = {"outcome": f"exit code {p.returncode}; stderr:\n{tail}"}
        logs[r].close()
        results.append(ranked)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--init", help="FileStore path (default: torchrun's environment)")
    parser.add_argument("--out")
    parser.add_argument("--only", action="append", default=[])
    args = parser.parse_args()
    if "RANK" in os.environ and args.rank is None:  # started by torchrun
        everyone = run_rank(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, None, args.only
        )
        ranks = everyone if int(os.environ["RANK"]) == 0 else []
    elif args.rank is not None:
        run_rank(args.rank, args.world, args.init, args.out, args.only)
        return 0
    else:
        start = time.perf_counter()
        ranks = launch(args.world, tuple(args.only))
        print(f"{args.world} ranks, {time.perf_counter() - start:.1f} s in all")
    failed = 0
    names = list(dict.fromkeys(name for results in ranks for name in results))
    for name in names:
        missing = {"outcome": "not reached", "seconds": None}
        outcomes = [results.get(name, missing)["outcome"] for results in ranks]
        seconds = max((results.get(name, missing)["seconds"] or 0) for results in ranks)
        ok = all(o == "ok" for o in outcomes)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {seconds:6.2f} s  {name}")
        for r, o in enumerate(outcomes):
            if o != "ok":
                print(f"rank {r}:\n{o}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
