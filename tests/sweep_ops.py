"""The op sweep: every OpInfo of torch's op database with second derivatives, through hessfunc.

Each float64 CPU sample of an op becomes a ``sweep.Problem``: ``params`` is the tuple of the
floating tensors the sample marks as requiring grad (in the order torch's own ``gradgradcheck``
uses: input, args, kwargs; tensor lists element by element); everything else (other tensors,
ints, dtypes, flags) travels through ``*args`` untouched; the model calls the op through its
``gradcheck_wrapper`` and ``output_process_fn_grad`` (e.g. the Hermitian symmetrisation that
``eigh``'s derivatives assume) and returns the floating outputs.

Samples are skipped, and counted by reason, when they have nothing to differentiate, when the op
draws random numbers (two seeds give two outputs), when the objective is not finite at the
sample, or when finite differences do not converge (see ``sweep``). Samples that write to their
own arguments are run on clones inside the model, which keeps the function pure and its
derivatives unchanged.

Importing this module imports ``torch.testing._internal.common_methods_invocations`` (needs
``expecttest``; about 8 s), which also freezes assignments to ``torch.backends`` flags outside
their context managers for the rest of the process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sweep
import torch
from sweep import F64, Problem, Verdict
from torch.testing._internal.common_methods_invocations import op_db

from hessfunc._base import _decomp

# Ops run by default (the rest need pytest --full): each category the sweep should watch, and
# every op it has found wrong or raising a raw error.
FAST = frozenset(
    {
        # reductions
        "prod",
        "amax",
        "logsumexp",
        "var",
        "nn.functional.normalize",
        # scatter / gather / indexing
        "gather",
        "scatter_add",
        "scatter_reduce.prod",
        "index_put",
        "take_along_dim",
        "masked_select",
        # normalisation
        "nn.functional.layer_norm",
        "native_layer_norm",
        "nn.functional.batch_norm",
        "nn.functional.instance_norm",
        "nn.functional.group_norm",
        "nn.functional.rms_norm",
        # linear algebra
        "linalg.det",
        "linalg.inv",
        "linalg.solve",
        "linalg.eigh",
        "cholesky",
        "linalg.svdvals",
        # activations
        "nn.functional.gelu",
        "nn.functional.softplus",
        "nn.functional.elu",
        "nn.functional.hardswish",
        "nn.functional.logsigmoid",
        "softmax",
        "log_softmax",
        # cumulative
        "cumsum",
        "cumprod",
        "logcumsumexp",
        "cummax",
        # losses
        "nn.functional.mse_loss",
        "nn.functional.huber_loss",
        "nn.functional.binary_cross_entropy",
        "nn.functional.cross_entropy",
        "nn.functional.kl_div",
        # attention, convolution
        "nn.functional.scaled_dot_product_attention",
        "nn.functional.conv2d",
        # failing today: every op found wrong, and the quicker of those raising raw errors
        "_native_batch_norm_legit",
        "native_batch_norm",
        "cholesky_inverse",
        "masked.logaddexp",
        "tensor_split",
        "to_sparse",
        "triangular_solve",
        "normal",
        "nn.functional.rrelu",
        "as_strided_scatter",
        "double",
        # pseudo-gradients found by the value-based references
        "nn.functional.max_unpool1d",
        "nn.functional.max_unpool2d",
        "nn.functional.max_unpool3d",
    }
)


def op_key(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


# Ops with second derivatives: the sweep's corpus.
OPS = {op_key(op): op for op in op_db if op.supports_gradgrad}


def _seeded(op: Any) -> bool:
    """Whether op_db runs the op through ``wrapper_set_seed`` (a random op made repeatable)."""
    code = getattr(op.op, "__code__", None)
    return code is not None and "wrapper_set_seed" in code.co_names


# Random ops that op_db makes repeatable by seeding. Where torch differentiates them with the
# draw held constant (``normal``'s declared gradient is zero), differences of their seeded
# values describe another function, so those samples skip the value checks
# (sweep.Problem.no_value_checks); their other samples (dropout_p=0) are checked.
SEEDED = frozenset(key for key, op in OPS.items() if _seeded(op))


def routed_ops() -> frozenset[str]:
    """Ops hessfunc routes to composite formulas: their function is a key of its routing table.

    The table is the library's declaration; an op added to it joins this set, and the sweep then
    requires it to come out ``exact`` (not merely refused).
    """
    table = _decomp.ROUTES
    return frozenset(key for key, op in OPS.items() if op.op in table)


@dataclass
class OpResult:
    """The verdict of every (product, mode) of one op, with per-sample counts and timing."""

    key: str
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    samples: int = 0
    notes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _Slot:
    """Stands in, inside the pass-through arguments, for the ``i``-th differentiated tensor."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"<params[{self.i}]>"


def _split(x: Any, params: list[torch.Tensor]) -> Any:
    """Replace tensors that require grad by slots (recording them), one level of lists deep."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad and x.is_floating_point():
            params.append(x.detach())
            return _Slot(len(params) - 1)
        return x.detach()
    if isinstance(x, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in x):
        return type(x)(_split(t, params) for t in x)
    return x


def _fill(x: Any, params: tuple, clone: bool) -> Any:
    if isinstance(x, _Slot):
        return params[x.i].clone() if clone else params[x.i]
    if isinstance(x, torch.Tensor):
        return x.clone() if clone else x
    if isinstance(x, (list, tuple)) and any(isinstance(t, (torch.Tensor, _Slot)) for t in x):
        return type(x)(_fill(t, params, clone) for t in x)
    return x


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _make_model(op: Any, sample: Any, clone: bool):
    variant = op.get_op()
    process = sample.output_process_fn_grad

    def model(params: tuple, inp: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        inp = _fill(inp, params, clone)
        args = tuple(_fill(a, params, clone) for a in args)
        kwargs = {k: _fill(a, params, clone) for k, a in kwargs.items()}
        out = op.gradcheck_wrapper(variant, inp, *args, **kwargs)
        if process is not None:
            out = process(out)
        return sweep.real_outputs(out)

    return model


def problems(key: str) -> Iterator[tuple[int, Problem | str, str | None]]:
    """``(sample index, problem or skip reason, note)`` for every float64 sample of an op."""
    op = OPS[key]
    if F64 not in op.supported_backward_dtypes("cpu"):
        yield 0, "no float64 backward on CPU", None
        return
    torch.manual_seed(0)  # sample_inputs draws from the global generator
    with sweep.quiet():
        samples = list(op.sample_inputs("cpu", F64, requires_grad=True))
    for i, sample in enumerate(samples):
        params: list[torch.Tensor] = []
        rest = (
            _split(sample.input, params),
            tuple(_split(a, params) for a in sample.args),
            {k: _split(a, params) for k, a in sample.kwargs.items()},
        )
        params_t = tuple(params)
        if not params_t:
            yield i, "nothing to differentiate", None
            continue
        if any(p.layout != torch.strided for p in params_t):
            yield i, "sparse inputs", None
            continue
        size = sum(p.numel() for p in params_t)
        if size == 0:
            yield i, "empty inputs", None
            continue
        if size > sweep.MAX_ENTRIES:
            yield i, f"more than {sweep.MAX_ENTRIES} entries", None
            continue
        yield (i, *_probe(op, sample, key, i, params_t, rest))


def _probe(op, sample, key, i, params, rest) -> tuple[Problem | str, str | None]:
    """Evaluate the sample once to decide how (and whether) it can be tested."""
    note = None
    try:
        with sweep.quiet(), torch.no_grad():
            # fresh clones, so the probe cannot change the sample; their version counters
            # show in-place writes
            inp = _fill(rest[0], params, clone=True)
            args = tuple(_fill(a, params, clone=True) for a in rest[1])
            kwargs = {k: _fill(a, params, clone=True) for k, a in rest[2].items()}
            every = _tensors((inp, args, kwargs))
            versions = [t._version for t in every]
            op.gradcheck_wrapper(op.get_op(), inp, *args, **kwargs)
            writes = any(t._version != v for t, v in zip(every, versions, strict=True))
    except Exception as err:  # noqa: BLE001
        return f"the op fails on its own sample ({sweep.first_line(err)[:80]})", None
    if writes:
        note = "writes to its arguments (run on clones)"
    problem = Problem(
        model=_make_model(op, sample, clone=writes),
        params=params,
        rest=rest,
        seed=sweep.stable_seed(key, i),
        no_value_checks="a seeded random draw" if key in SEEDED else None,
    )
    with sweep.quiet(), torch.no_grad():
        try:
            with torch.random.fork_rng():
                torch.manual_seed(1)
                first = problem.model(params, *rest)
                torch.manual_seed(2)
                second = problem.model(params, *rest)
        except Exception as err:  # noqa: BLE001
            return f"the op fails on its own sample ({sweep.first_line(err)[:80]})", note
        if not first:
            return "no non-empty floating outputs", note
        if not _same(first, second):
            return "random", note
        # as_strided and friends read the storage behind a view, not its values; the
        # references perturb fresh contiguous copies, so they would see another function
        packed = tuple(p.clone(memory_format=torch.contiguous_format) for p in params)
        if not _same(first, problem.model(packed, *rest)):
            return "reads memory layout, not values", note
        # Only outputs autograd differentiates enter the objective: the references are
        # autograd gradients, and outputs declared non-differentiable (native_layer_norm's mean
        # and rstd) carry no gradient there.
        with torch.enable_grad():
            traced = problem.model(sweep._leaves(params), *rest)
        keep = [k for k, o in enumerate(traced) if o.requires_grad]
        if not keep:
            return "no differentiable outputs", note
        if len(keep) < len(first):
            problem.model = _select(problem.model, keep)
            first = tuple(first[k] for k in keep)
        problem.dtype = sweep.precision(first)
        if problem.dtype not in (torch.float64, torch.float32):
            return f"computes in {problem.dtype}", note
        problem.set_weights(first)
        if not torch.isfinite(problem.loss(first)):
            return "objective not finite at the sample", note
    return problem, note


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.nan_to_num(), y.nan_to_num())
        for x, y in zip(a, b, strict=True)
    )


def _select(model, keep: list[int]):
    return lambda params, *rest: tuple(model(params, *rest)[k] for k in keep)


_CACHE: dict[str, OpResult] = {}


def run_op(key: str) -> OpResult:
    """Every product and mode on every sample of one op (cached per process)."""
    if key in _CACHE:
        return _CACHE[key]
    start = time.perf_counter()
    result = OpResult(key)
    per: dict[tuple[str, str], list[Verdict]] = {
        (p, m): [] for p in sweep.PRODUCTS for m in sweep.MODES
    }
    for i, problem, note in problems(key):
        result.samples += 1
        if note:
            result.notes[note] = result.notes.get(note, 0) + 1
        if isinstance(problem, str):
            for verdicts in per.values():
                verdicts.append(Verdict("skipped", problem, sample=i))
            continue
        for pm, verdict in sweep.check_problem(problem).items():
            verdict.sample = i
            per[pm].append(verdict)
    result.verdicts = {pm: sweep.aggregate(v) for pm, v in per.items()}
    result.seconds = time.perf_counter() - start
    _CACHE[key] = result
    return result
