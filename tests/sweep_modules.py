"""The module sweep: every ``torch.nn`` module class through ``from_module`` + ``hvp``.

Cases come from three sources, in this order of preference:

* ``torch.testing._internal.common_modules.module_db``: a ``ModuleInfo`` per class, with
  constructor arguments and forward inputs for training and evaluation mode;
* ``_extra()``: hand-written constructors and inputs for classes module_db lacks but users build
  (``EmbeddingBag``, ``Upsample``, ``Fold``...), and for configurations known to mutate state
  (``Embedding(max_norm=...)``, the hook and parametrisation forms of weight and spectral norm);
* every other ``torch.nn`` class that can be built with default arguments, fed the first of a few
  standard inputs its forward accepts.

Each module input becomes a ``sweep.Problem`` whose ``params`` are the module's trainable
parameters followed by the floating forward inputs that require grad (so parameter-free modules
are tested through their input, and the cross terms between parameters and inputs are covered).
The model is ``apply`` from ``hessfunc.from_module``; the references evaluate a second instance
built the same way (same seed) through ``torch.func.functional_call``, so they depend on no
hessfunc code. Each hvp mode runs on a freshly built module, so a mutation in one mode cannot
leak into the other.

Around every hessfunc call (also one that raises) the sweep compares a snapshot of the module:
parameters (value, identity, ``requires_grad``, ``.grad``), buffers, plain tensor attributes
(what forward pre-hooks write, e.g. ``weight`` of the hook form of weight norm), training flags,
the global RNG state and the multi-head-attention fast-path flag. A module whose own forward is
not a pure function of its parameters and inputs (it writes buffers, consumes the global RNG)
has no finite-difference reference; it can still be checked for mutation.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sweep
import torch
from sweep import F64, Problem, Verdict
from torch import nn
from torch.func import functional_call
from torch.testing._internal.common_modules import module_db

import hessfunc

MODES = ("train", "eval")


@dataclass
class Input:
    """One module configuration: how to build it and what to feed it."""

    build: Callable[[], nn.Module]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    desc: str = ""


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _extra() -> dict[str, Callable[[bool], list[Input]]]:
    """Cases module_db lacks, keyed by a display name: ``training -> inputs``."""
    P = nn.utils.parametrizations

    def one(build: Callable[[], nn.Module], *makers: Callable[[], torch.Tensor]):
        def inputs(training: bool) -> list[Input]:
            torch.manual_seed(0)  # the same inputs in every process, whatever ran before
            return [Input(build, tuple(make() for make in makers))]

        return inputs

    def x(*shape: int) -> Callable[[], torch.Tensor]:
        return lambda: _t(*shape)

    def tokens(*shape: int, high: int = 5) -> Callable[[], torch.Tensor]:
        return lambda: torch.randint(high, shape)

    def decoder() -> nn.Module:
        layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        return nn.TransformerDecoder(layer, 1)

    return {
        "nn.EmbeddingBag": one(lambda: nn.EmbeddingBag(5, 3, mode="mean"), tokens(2, 4)),
        "nn.EmbeddingBag(mode=max)": one(lambda: nn.EmbeddingBag(5, 3, mode="max"), tokens(2, 4)),
        "nn.Embedding(max_norm=0.5)": one(lambda: nn.Embedding(5, 3, max_norm=0.5), tokens(2, 4)),
        # pseudo-gradients: hessfunc holds the padding row constant and differentiates the plain
        # lookup for scale_grad_by_freq (hessfunc/_base/_pseudo.py)
        "nn.Embedding(padding_idx=0)": one(lambda: nn.Embedding(5, 3, padding_idx=0), tokens(2, 4)),
        "nn.Embedding(padding_idx=-1)": one(
            lambda: nn.Embedding(5, 3, padding_idx=-1), tokens(2, 4)
        ),
        "nn.Embedding(scale_grad_by_freq)": one(
            lambda: nn.Embedding(5, 3, scale_grad_by_freq=True), tokens(2, 4)
        ),
        "nn.Sequential(Embedding(padding_idx=0), Flatten, Linear)": one(
            lambda: nn.Sequential(
                nn.Embedding(5, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)
            ),
            lambda: torch.tensor([[0, 1, 0, 4], [2, 0, 3, 3]]),
        ),
        "nn.EmbeddingBag(padding_idx=0)": one(
            lambda: nn.EmbeddingBag(5, 3, mode="mean", padding_idx=0), tokens(2, 4)
        ),
        "nn.AdaptiveLogSoftmaxWithLoss": one(
            lambda: nn.AdaptiveLogSoftmaxWithLoss(4, 6, [3]), x(5, 4), tokens(5, high=6)
        ),
        "nn.TransformerDecoder": one(decoder, x(2, 3, 4), x(2, 5, 4)),
        # module_db has 857 inputs for this class; these two pick its fused and chunked paths
        "nn.LinearCrossEntropyLoss(options=None)": one(
            lambda: nn.LinearCrossEntropyLoss(5, 4, reduction="sum"), x(8, 5), tokens(8, high=4)
        ),
        "nn.LinearCrossEntropyLoss(options=chunked)": one(
            lambda: nn.LinearCrossEntropyLoss(
                5, 4, reduction="sum", options=nn.LinearCrossEntropyOptions(batch_chunk_size=2)
            ),
            x(8, 5),
            tokens(8, high=4),
        ),
        "nn.ChannelShuffle": one(lambda: nn.ChannelShuffle(2), x(2, 4, 3, 3)),
        "nn.CrossMapLRN2d": one(lambda: nn.CrossMapLRN2d(3), x(2, 4, 3, 3)),
        "nn.Fold": one(lambda: nn.Fold((3, 3), (2, 2)), x(2, 8, 4)),
        "nn.Unfold": one(lambda: nn.Unfold((2, 2)), x(2, 2, 3, 3)),
        "nn.PixelShuffle": one(lambda: nn.PixelShuffle(2), x(2, 8, 2, 2)),
        "nn.PixelUnshuffle": one(lambda: nn.PixelUnshuffle(2), x(2, 2, 4, 4)),
        "nn.Unflatten": one(lambda: nn.Unflatten(1, (2, 3)), x(4, 6)),
        "nn.Upsample(bilinear)": one(
            lambda: nn.Upsample(scale_factor=2, mode="bilinear"), x(2, 2, 3, 3)
        ),
        "nn.Upsample(bicubic)": one(
            lambda: nn.Upsample(scale_factor=2, mode="bicubic"), x(2, 2, 3, 3)
        ),
        "nn.UpsamplingNearest2d": one(
            lambda: nn.UpsamplingNearest2d(scale_factor=2), x(1, 2, 2, 2)
        ),
        "nn.UpsamplingBilinear2d": one(
            lambda: nn.UpsamplingBilinear2d(scale_factor=2), x(1, 2, 2, 2)
        ),
        "nn.LazyLinear": one(lambda: nn.LazyLinear(3), x(4, 5)),
        "nn.LazyBatchNorm1d(track_running_stats=False)": one(
            lambda: nn.LazyBatchNorm1d(track_running_stats=False), x(4, 3)
        ),
        "nn.BatchNorm2d(track_running_stats=False)": one(
            lambda: nn.BatchNorm2d(3, track_running_stats=False), x(4, 3, 2, 2)
        ),
        "nn.InstanceNorm2d(affine=True)": one(
            lambda: nn.InstanceNorm2d(3, affine=True), x(2, 3, 4, 4)
        ),
        "utils.weight_norm(nn.Linear)": one(lambda: nn.utils.weight_norm(nn.Linear(4, 3)), x(5, 4)),
        "parametrizations.weight_norm(nn.Linear)": one(
            lambda: P.weight_norm(nn.Linear(4, 3)), x(5, 4)
        ),
        "utils.spectral_norm(nn.Linear)": one(
            lambda: nn.utils.spectral_norm(nn.Linear(4, 3)), x(5, 4)
        ),
        "parametrizations.spectral_norm(nn.Linear)": one(
            lambda: P.spectral_norm(nn.Linear(4, 3)), x(5, 4)
        ),
        "parametrizations.orthogonal(nn.Linear)": one(
            lambda: P.orthogonal(nn.Linear(3, 3)), x(5, 3)
        ),
    }


# Default-constructible classes get the first of these inputs their forward accepts.
_STANDARD_INPUTS = ((2, 3, 4, 5), (2, 3, 4), (3, 4))


def _db_cases() -> dict[str, Callable[[bool], list[Input]]]:
    cases = {}
    for info in module_db:
        if F64 not in info.dtypes:
            continue

        def inputs(training: bool, info=info) -> list[Input]:
            torch.manual_seed(0)
            with sweep.quiet():
                mis = info.module_inputs_func(
                    info, device="cpu", dtype=F64, requires_grad=True, training=training
                )
            out = []
            for mi in mis:
                ci, fi = mi.constructor_input, mi.forward_input
                if fi is None:
                    continue
                out.append(
                    Input(
                        lambda ci=ci: info.module_cls(*ci.args, **ci.kwargs),
                        fi.args,
                        fi.kwargs,
                        mi.desc,
                    )
                )
            return out

        cases[info.name] = inputs
    return cases


def _default_cases(covered: set[type]) -> tuple[dict, dict[str, str]]:
    """Cases for the remaining classes buildable with default arguments, and why others are not."""
    cases, missing = {}, {}
    classes = {
        c
        for c in vars(nn).values()
        if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__.startswith("torch.nn")
    }
    for cls in sorted(classes - covered, key=lambda c: c.__name__):
        name = f"nn.{cls.__name__}"
        try:
            with sweep.quiet():
                cls()
        except Exception as err:  # noqa: BLE001
            missing[name] = f"needs constructor arguments ({sweep.first_line(err)[:60]})"
            continue
        picked = None
        for arity in (1, 2, 3):
            for shape in _STANDARD_INPUTS:
                try:
                    with sweep.quiet(), torch.no_grad():
                        out = cls().double()(*(torch.rand(shape, dtype=F64) for _ in range(arity)))
                except Exception:  # noqa: BLE001
                    continue
                if sweep.real_outputs(out):
                    picked = (arity, shape)
                    break
            if picked:
                break
        if picked is None:
            missing[name] = "no standard input works with its default construction"
            continue
        arity, shape = picked

        def inputs(training: bool, cls=cls, arity=arity, shape=shape) -> list[Input]:
            torch.manual_seed(0)
            return [Input(cls, tuple(_t(*shape) for _ in range(arity)), {}, f"default, {shape}")]

        cases[name] = inputs
    return cases, missing


def _all_cases() -> tuple[dict[str, Callable[[bool], list[Input]]], dict[str, str]]:
    cases = _db_cases()
    extra = _extra()
    cases.update(extra)
    covered = {info.module_cls for info in module_db}
    named = {n.split("(")[0].removeprefix("nn.") for n in extra}
    covered |= {c for c in vars(nn).values() if inspect.isclass(c) and c.__name__ in named}
    defaults, missing = _default_cases(covered)
    cases.update(defaults)
    return cases, missing


CASES, NOT_COVERED = _all_cases()


# ----------------------------------------------------------------------------- state snapshots


def _wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _plain_attrs(module: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for name, sub in module.named_modules():
        for k, val in vars(sub).items():
            if isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter):
                found[f"{name}.{k}" if name else k] = val
    return found


@dataclass
class Snapshot:
    params: dict[str, tuple]
    buffers: dict[str, torch.Tensor]
    attrs: dict[str, tuple]
    training: dict[str, bool]
    rng: torch.Tensor
    fastpath: bool


def snapshot(module: nn.Module) -> Snapshot:
    def copy_plain(t: torch.Tensor) -> tuple:
        wrapped = _wrapped(t)
        value = None if wrapped else t.detach().clone()
        return (id(t), value, t.requires_grad, wrapped)

    return Snapshot(
        params={
            n: (
                id(p),
                p.detach().clone(),
                p.requires_grad,
                None if p.grad is None else p.grad.clone(),
            )
            for n, p in module.named_parameters(remove_duplicate=False)
        },
        buffers={n: b.detach().clone() for n, b in module.named_buffers(remove_duplicate=False)},
        attrs={n: copy_plain(t) for n, t in _plain_attrs(module).items()},
        training={n: m.training for n, m in module.named_modules()},
        rng=torch.get_rng_state(),
        fastpath=torch.backends.mha.get_fastpath_enabled(),
    )


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs between two snapshots of the same module, in words."""
    found = []
    if set(before.params) != set(after.params):
        found.append("the set of parameters")
    for n in before.params.keys() & after.params.keys():
        (i0, v0, r0, g0), (i1, v1, r1, g1) = before.params[n], after.params[n]
        if i0 != i1:
            found.append(f"parameter {n} replaced")
        if not _equal(v0, v1):
            found.append(f"parameter {n} value")
        if r0 != r1:
            found.append(f"parameter {n}.requires_grad")
        if not _equal(g0, g1):
            found.append(f"parameter {n}.grad")
    if set(before.buffers) != set(after.buffers):
        found.append("the set of buffers")
    for n in before.buffers.keys() & after.buffers.keys():
        if not _equal(before.buffers[n], after.buffers[n]):
            found.append(f"buffer {n}")
    for n in before.attrs.keys() | after.attrs.keys():
        if n not in before.attrs or n not in after.attrs:
            found.append(f"attribute {n} added or removed")
            continue
        (i0, v0, r0, w0), (i1, v1, r1, w1) = before.attrs[n], after.attrs[n]
        if i0 == i1:
            continue
        if w1 and not w0:
            found.append(f"attribute {n} holds a torch.func-internal tensor")
        elif not _equal(v0, v1) or r0 != r1:
            found.append(f"attribute {n}")
    if before.training != after.training:
        found.append("training flags")
    if not torch.equal(before.rng, after.rng):
        found.append("global RNG state")
    if before.fastpath != after.fastpath:
        found.append("torch.backends.mha fast-path flag")
    return found


# ----------------------------------------------------------------------------- problems


@dataclass
class ModuleResult:
    key: str
    training: bool
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # hvp mode -> verdict
    inputs: int = 0
    seconds: float = 0.0

    @property
    def verdict(self) -> Verdict:
        return sweep.aggregate(list(self.verdicts.values()))


class _Slot:
    def __init__(self, i: int) -> None:
        self.i = i


def _split(x: Any, inputs: list[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point():
        inputs.append(x.detach())
        return _Slot(len(inputs) - 1)
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_split(t, inputs) for t in x)
    return x


def _fill(x: Any, values: tuple) -> Any:
    if isinstance(x, _Slot):
        return values[x.i]
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_fill(t, values) for t in x)
    return x


def _materialise(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Lazy modules get their shapes from one forward pass, as a user's would."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        with torch.no_grad(), sweep.quiet():
            module(*_detached(args), **_detached(kwargs))


def _detached(x: Any) -> Any:  # a plain forward on the module's own inputs
    return torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x
    )


def _side_effects(module: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """What a plain forward pass of ``module`` changes: its own state, the global RNG.

    Plain tensor attributes are left out: forward pre-hooks recompute them on every call.
    """
    with torch.random.fork_rng():
        before = snapshot(module)
        with torch.no_grad(), sweep.quiet():
            module(*_detached(args), **_detached(kwargs))
        after = snapshot(module)
    return [c for c in changes(before, after) if not c.startswith("attribute ")]


def build(item: Input, training: bool) -> nn.Module:
    """The module of ``item``, float64, in the given mode; the same module on every call."""
    torch.manual_seed(0)
    with sweep.quiet():
        module = item.build()
    module = module.to(F64).train(training)
    _materialise(module, item.args, item.kwargs)
    return module


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in (*module.parameters(), *module.buffers())]


def problem_for(
    key: str, item: Input, training: bool, index: int
) -> tuple[nn.Module, Problem, str | None]:
    """``(module, problem, skip reason or None)`` for one input of one case.

    ``problem.model`` runs ``module`` through ``hessfunc.from_module``; its references run a
    second instance built the same way. A skip reason means there is no reference: the
    hessfunc calls still run and are still checked for mutation.
    """
    module = build(item, training)
    inputs: list[torch.Tensor] = []
    rest = (_split(item.args, inputs), _split(item.kwargs, inputs))
    apply, mparams = hessfunc.from_module(module)
    names = list(mparams)
    k = len(names)
    params = (*mparams.values(), *inputs)

    def model(p: tuple, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        values = tuple(p[k:])
        named = dict(zip(names, p[:k], strict=True))
        return sweep.real_outputs(apply(named, *_fill(args, values), **_fill(kwargs, values)))

    twin = build(item, training)
    buffers = dict(twin.named_buffers())

    def reference(p: tuple, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        values = tuple(p[k:])
        tensors = {**buffers, **dict(zip(names, p[:k], strict=True))}
        out = functional_call(twin, tensors, _fill(args, values), _fill(kwargs, values))
        return sweep.real_outputs(out)

    problem = Problem(
        model=model,
        params=params,
        rest=rest,
        seed=sweep.stable_seed(key, training, index),
        reference_model=reference,
        hold=_held_rows(module, names, len(params)),
    )
    if not params or problem.size == 0:
        return module, problem, "nothing to differentiate"
    if problem.size > sweep.MAX_ENTRIES:
        return module, problem, f"more than {sweep.MAX_ENTRIES} entries"
    if not all(_equal(a, b) for a, b in zip(_state(module), _state(twin), strict=True)):
        return module, problem, "construction is not reproducible"
    effects = _side_effects(build(item, training), item.args, item.kwargs)
    try:
        with torch.no_grad(), sweep.quiet(), torch.random.fork_rng():
            # on copies: params share storage with the module (Embedding(max_norm=...) would
            # renormalise it here)
            first = reference(tuple(p.clone() for p in params), *rest)
        with torch.enable_grad(), sweep.quiet(), torch.random.fork_rng():
            traced = reference(sweep._leaves(params), *rest)
    except Exception as err:  # noqa: BLE001
        return module, problem, f"forward fails ({sweep.first_line(err)[:80]})"
    keep = [i for i, o in enumerate(traced) if o.requires_grad]
    if not keep:
        return module, problem, "no differentiable outputs"
    if len(keep) < len(first):
        problem.model = _select(model, keep)
        problem.reference_model = _select(reference, keep)
        first = tuple(first[i] for i in keep)
    problem.dtype = sweep.precision(first)
    problem.set_weights(first)
    if effects:
        return module, problem, f"its forward changes state ({', '.join(effects)})"
    if not torch.isfinite(problem.loss(first)):
        return module, problem, "objective not finite at the input"
    return module, problem, None


def _held_rows(module: nn.Module, names: list[str], n: int):
    """The projection zeroing the padding rows hessfunc holds constant, or ``None``."""
    rows: list[tuple[int, int]] = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
            name = f"{prefix}.weight" if prefix else "weight"
            if name in names:
                rows.append((names.index(name), sub.padding_idx % sub.num_embeddings))
    if not rows:
        return None

    def hold(d: tuple) -> tuple:
        d = list(d)
        for i, row in rows:
            d[i] = d[i].clone()
            d[i][row] = 0
        return tuple(d)

    return hold


def _select(model, keep: list[int]):
    return lambda params, *rest: tuple(model(params, *rest)[i] for i in keep)


def check_mode(
    module: nn.Module,
    problem: Problem,
    mode: str,
    ref: sweep.Reference | None,
    skip: str | None,
    vals: sweep.ValueChecks | None = None,
    products: dict[str, torch.Tensor] | None = None,
) -> Verdict:
    """``hvp`` in one mode: exact against the reference, and nothing about the module changed.

    With ``vals``, also symmetric and equal to second differences of the value along ``u, v``
    (``sweep.by_value``); the product is left in ``products[mode]`` for the mode comparison.
    """
    before = snapshot(module)
    v = problem.direction()
    try:
        with sweep.quiet():
            hv = hessfunc.hvp(problem.f, problem.params, v, *problem.rest, mode=mode)
            hu = None
            if vals is not None and skip is None and not sweep.usable(vals.hessian):
                hu = hessfunc.hvp(problem.f, problem.params, vals.u, *problem.rest, mode=mode)
        exact, error = sweep.flat(hv, problem.params), None
    except Exception as err:  # noqa: BLE001
        exact, error = None, err
    mutated = sorted(set(changes(before, snapshot(module))))
    if error is not None:
        clear = sweep.is_clear_error(error)
        verdict = Verdict("clear-error" if clear else "raw-error", sweep.first_line(error))
    elif skip is not None:
        verdict = Verdict("skipped", skip)
    else:
        verdict = sweep.judge(exact.detach(), ref, problem.dtype)
        if vals is not None:
            exact = exact.detach()
            if products is not None:
                products[mode] = exact
            u_flat = sweep.flat(vals.u, problem.params)
            uv = sweep._vdot(u_flat, exact)
            vu, scale = uv, 0.0  # a usable value reference pins the product (sweep.by_value)
            if hu is not None:
                v_flat = sweep.flat(v, problem.params)
                hu_flat = sweep.flat(hu, problem.params).detach()
                vu = sweep._vdot(v_flat, hu_flat)
                scale = sweep._norm(u_flat) * sweep._norm(exact) + sweep._norm(
                    v_flat
                ) * sweep._norm(hu_flat)
            finding = sweep.by_value(vals.hessian, uv, vu, scale, problem.dtype)
            verdict = sweep.value_verdict(verdict, finding, sweep.usable(vals.hessian))
    if not mutated:
        return verdict
    # A wrong number stays the verdict (it is the worse failure); otherwise the mutation is.
    if verdict.state == "wrong":
        verdict.detail += f"; also mutates {', '.join(mutated)}"
        return verdict
    also = "" if verdict.state in ("exact", "skipped") else f"; and {verdict.describe()}"
    return Verdict("mutates", ", ".join(mutated) + also)


_CACHE: dict[tuple[str, bool], ModuleResult] = {}


def run_module(key: str, training: bool) -> ModuleResult:
    """Every input of one case in one mode, each hvp mode on a freshly built module (cached)."""
    if (key, training) in _CACHE:
        return _CACHE[key, training]
    start = time.perf_counter()
    result = ModuleResult(key, training)
    per: dict[str, list[Verdict]] = {m: [] for m in sweep.MODES}
    for i, item in enumerate(_inputs(key, training)):
        result.inputs += 1
        ref, vals = None, None
        products: dict[str, torch.Tensor] = {}
        current: dict[str, Verdict] = {}
        for mode in sweep.MODES:
            try:
                module, problem, skip = problem_for(key, item, training, i)
            except Exception as err:  # noqa: BLE001 - construction or from_module failed
                if sweep.is_clear_error(err):
                    verdict = Verdict("clear-error", sweep.first_line(err))
                else:
                    verdict = Verdict("skipped", f"setup fails ({sweep.first_line(err)[:80]})")
            else:
                if skip is None and ref is None:
                    with sweep.quiet():
                        ref = sweep.references(problem, problem.direction())[0]
                    if ref.reason in (None, "zero-product", sweep.PSEUDO_SKIP):
                        vals = sweep.value_checks(problem, problem.direction())
                verdict = check_mode(module, problem, mode, ref, skip, vals, products)
            verdict.sample = i
            current[mode] = verdict
        if len(products) == 2:
            finding = sweep.modes_disagree(*products.values(), problem.dtype)
            for mode in current:
                current[mode] = sweep.value_verdict(current[mode], finding, False)
                current[mode].sample = i
        for mode, verdict in current.items():
            per[mode].append(verdict)
    result.verdicts = {m: sweep.aggregate(vs) for m, vs in per.items()}
    result.seconds = time.perf_counter() - start
    _CACHE[key, training] = result
    return result


def _inputs(key: str, training: bool) -> Iterator[Input]:
    yield from CASES[key](training)
