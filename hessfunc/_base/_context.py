"""The second-order evaluation context: which kernels run, which AD mode is traced, and how AD
errors are reported.

Every public function that differentiates twice runs its product through :func:`evaluate`: the
AD mode it traces (:func:`traced_mode`), the kernels and the routing of ``f``
(:func:`second_order_kernels`), and hessfunc's errors for missing derivatives
(:func:`ad_error_hint`). Validation of inputs lives in ``_checks``; this module holds what
happens while ``f`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import _decomp, _pseudo

T = TypeVar("T")


class UnsoundForwardAD(NotImplementedError):
    """An op whose forward-mode derivative is silently wrong upstream met a forward-mode pass."""


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


# Ops whose forward-mode AD returns a wrong number instead of raising (found by the op sweep in
# tests/test_opinfo_sweep.py): aten name -> (does this call hit it?, what is wrong).
FORWARD_AD_UNSOUND: dict[str, tuple[Callable[[tuple, dict], bool], str]] = {
    "scatter_reduce": (
        lambda a, k: _arg(a, k, 4, "reduce") == "prod",
        "scatter_reduce(reduce='prod') returns a zero tangent (pytorch#196702)",
    ),
    "cholesky_inverse": (
        lambda a, k: True,
        "cholesky_inverse's forward-mode rule multiplies in the wrong order (pytorch#196682)",
    ),
    "cholesky_solve": (
        lambda a, k: True,
        "cholesky_solve's forward-mode rule is wrong through the factor (pytorch#196694)",
    ),
    "logcumsumexp": (
        lambda a, k: True,
        "logcumsumexp's forward-mode rule is accurate to about 1e-6 relative in float64, where "
        "reverse mode is exact",
    ),
}


def _unsound_table() -> dict[Any, tuple[Callable[[tuple, dict], bool], str]]:
    table = {}
    for name, entry in FORWARD_AD_UNSOUND.items():
        for fn in _decomp.callables_reaching(name):
            table[fn] = entry
    return table


_UNSOUND = _unsound_table()


class SecondOrderMode(TorchFunctionMode):
    """The mode every second-order evaluation of ``f`` runs under.

    It routes the fused normalisation kernels to their composites (``_decomp``) and, while a
    forward-mode tangent is carried (``forward=True``), stops at ops whose forward-mode AD is
    silently wrong upstream (:data:`FORWARD_AD_UNSOUND`) by raising :class:`UnsoundForwardAD`,
    so that the product is evaluated in reverse mode instead.
    """

    def __init__(self, forward: bool) -> None:
        super().__init__()
        self.forward = forward

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        composite = _decomp.ROUTES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        if self.forward:
            unsound = _UNSOUND.get(func)
            if unsound is not None and unsound[0](args, kwargs):
                raise UnsoundForwardAD(unsound[1])
        return func(*args, **kwargs)


def _dynamo_dispatches_routes() -> bool:
    """Make dynamo hand the routed private functions to :class:`SecondOrderMode`, as eager does.

    Dynamo dispatches a torch function mode only for functions in its overridable set, built
    from ``torch.overrides.get_overridable_functions()``, which leaves out private functions.
    Eagerly the mode sees ``torch._weight_norm``, ``torch._weight_norm_interface``,
    ``torch._fused_rms_norm`` and ``torch._native_batch_norm_legit*``; while tracing, dynamo put
    them into the graph unrouted, so a compiled Hessian product through a weight-normalised
    layer was 30-75% wrong on torch 2.13 (their double backward is wrong upstream, see
    ``_decomp``). Marked as ``assume_constant_result``, this body runs for real while dynamo
    traces, before the mode is entered, and adds the routed functions to that set. Importing
    dynamo costs about 2 s, which is why this happens only when compiling; the set is dynamo's
    own cache, and eager dispatch already reaches every function added.
    """
    try:
        from torch._dynamo.variables.torch import get_overridable_functions
    except ImportError:  # a torch whose dynamo is organised differently: the zoo would tell
        return False
    ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
    plain = [f for f in (*_decomp.ROUTES, *_UNSOUND) if callable(f) and not isinstance(f, ops)]
    get_overridable_functions().update(plain)
    return True


# What torch.compiler.assume_constant_result(fn) does, without the import of dynamo (about 2 s
# at hessfunc's import) that the decorator performs first.
_dynamo_dispatches_routes._dynamo_marked_constant = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def second_order_kernels(forward: bool = False) -> Iterator[None]:
    """Run ``f`` with kernels that have right second derivatives.

    ``forward`` says whether a forward-mode tangent flows through this evaluation.

    The fused scaled-dot-product-attention kernels (flash, memory-efficient, and the CPU flash
    kernel ``_scaled_dot_product_flash_attention_for_cpu``) have neither forward-mode AD nor a
    differentiable backward (pytorch#117629, pytorch#128971), so any Hessian product through
    ``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention`` fails with them. The math
    kernel is composed of differentiable ops; we select it for every second-order evaluation.
    It costs O(L^2) memory in the sequence length, like the attention weights themselves.

    Normalisation layers are routed to composite forms at the same time (``_decomp``), because
    torch.func's second derivatives through their fused kernels are wrong, and ops with unsound
    forward-mode AD are caught (:class:`SecondOrderMode`).

    The fused inference fast paths of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` are switched off as well: under ``torch.compile`` the tensors
    inside torch.func transforms do not report ``requires_grad``, so an eval-mode layer takes
    ``torch._transformer_encoder_layer_fwd``, which has no derivatives (forward AD raises, and in
    larger graphs the Hessian came out silently wrong on torch 2.13).
    """
    if torch.compiler.is_compiling():
        _dynamo_dispatches_routes()
    with attention_fastpath_off(), sdpa_kernel(SDPBackend.MATH), SecondOrderMode(forward):
        yield


@contextlib.contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """Keep ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` off their fused fast path.

    In eval mode these layers call one fused kernel (``torch._transformer_encoder_layer_fwd``,
    ``torch._native_multi_head_attention``) when no argument has a torch function and none needs
    a gradient. Under ``torch.compile``, inside torch.func transforms, neither test holds even
    while hessfunc's torch function modes are active, so the compiled graph took the fused
    kernel where eager code did not: it has no derivatives, and it hides the layer's
    ``F.linear`` calls from the layer discovery of ``hessfunc.kfac``.
    """
    # The flag is a plain module global; dynamo refuses to trace set_fastpath_enabled but does
    # trace an attribute store on the module.
    mha = torch.backends.mha
    fastpath = mha._is_fastpath_enabled
    mha._is_fastpath_enabled = False
    try:
        yield
    finally:
        mha._is_fastpath_enabled = fastpath


def traced_mode(mode: str) -> str:
    """The AD mode a Hessian product uses: ``mode`` eagerly, reverse-over-reverse when compiled.

    The rule: under ``torch.compile`` no tangent is pushed through a reverse pass. Inductor has
    miscompiled forward-over-reverse products in ways that depend on how the model is written
    and on the shapes, never on anything hessfunc can recognise: on torch 2.13 CPU,

    * a norm (``nn.RMSNorm``, the same formula by hand, ``F.normalize``, LayerNorm) followed by
      projection-free self-attention on a 3-D batch: relative error 0.1 to 7, while the 2-D
      version of the same function is right. The C++ backend's vectorised code is at fault:
      the error goes away with ``torch._inductor.config.cpp.simdlen = 1``
      (``tests/test_upstream.py`` keeps the smallest torch-only reproduction);
    * top-k routing over gathered expert weights (``w[idx]``): relative error 0.9 to 9 with one
      intra-op thread, an ``InductorError`` with two.

    Reverse-over-reverse traced the same functions exactly in every case measured (the compile
    zoo in ``tests/test_compile_zoo.py``), and it is the faster compiled HVP on the CPU
    benchmarks (``benchmarks/RESULTS.md``). Both modes compute the same product, so tracing
    ``"fwd-rev"`` as ``"rev-rev"`` changes cost, not results. Eager calls keep the mode asked
    for. The generalised Gauss-Newton and Fisher products are not affected: their forward mode
    runs over the primal model only (``J v``), never through a reverse pass.
    """
    return "rev-rev" if torch.compiler.is_compiling() else mode


_FWD_AD_MARKERS = (
    "forward AD",
    "forward mode AD",
    "jvp function",
    # a forward-mode rule that returns a tangent of the wrong shape (triangular_solve, normal)
    "forward gradient that has a different size",
)
_DOUBLE_BACKWARD_MARKERS = ("derivative for",)


def _first_line(err: BaseException) -> str:
    msg = str(err).strip()
    return msg.splitlines()[0] if msg else type(err).__name__


# Limits of torch.func that f can run into whatever the mode: markers in torch's message, and
# what to do. Each was met by the op sweep (tests/test_opinfo_sweep.py).
_TRANSFORM_LIMITS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("random operation while in randomness error mode", "rrelu_with_noise"),
        "f draws random numbers; hessfunc's batched products run f under vmap, which refuses "
        "randomness, and a Hessian is a property of a deterministic function. Make f "
        "deterministic (module.eval(); training=False for functional dropout).",
    ),
    (
        ("would mutate a captured Tensor",),
        "f writes in place to a tensor it did not create, which torch.func transforms refuse; "
        "batch norm in training mode does this to its running statistics. Pass training=False, "
        "or running_mean=None and running_var=None to normalise by batch statistics.",
    ),
    (
        ("batching rule", "inside of vmap", "vmap: we do not yet support", "channels_last"),
        "an op in f cannot run under vmap, which hessfunc uses to batch directions (hvps, "
        "hessian_matrix, ggn_vps, the dense matrices). Take one direction at a time with "
        "hessfunc.hvp (or ggn_vp) in a Python loop.",
    ),
    (
        ("must override the setup_context staticmethod",),
        "f calls a custom torch.autograd.Function in the old style (forward takes ctx); "
        "torch.func transforms need forward without ctx plus a setup_context staticmethod (and "
        "a jvp staticmethod for mode='fwd-rev').",
    ),
    (
        ("doesn't have storage", "data pointer"),
        "an op in f reads the values of a tensor argument (split points, sizes, indices given "
        "as a tensor), which torch.func transforms cannot; pass them as Python ints.",
    ),
    (
        ("Sparse",),
        "f makes sparse tensors, which torch.func does not differentiate twice; work with dense "
        "tensors (.to_dense()) inside f.",
    ),
)


_CHECKPOINT_ADVICE = (
    "f runs gradient (activation) checkpointing, which torch.func transforms cannot "
    "differentiate through (pytorch#122729: checkpoint's saved-tensor hooks, its old-style "
    "autograd.Function, and the hooks that call requires_grad_() on activations are all refused "
    "inside a transform). Call f without it: for a transformers model, "
    "model.gradient_checkpointing_disable() and model.disable_input_require_grads() (the "
    "second removes the requires_grad_() hook, which stays after the first; re-enable both "
    "after), or call the wrapped function directly instead of "
    "torch.utils.checkpoint.checkpoint(fn, ...). Checkpointing trades compute for the memory of "
    "a training backward; hessfunc's products bound their memory with chunk_size instead."
)


def _checkpointing(err: BaseException) -> bool:
    """Whether ``err`` comes from activation checkpointing inside a torch.func transform.

    Three failures, one cause: non-reentrant ``torch.utils.checkpoint`` raises "don't yet
    support saved tensor hooks"; the reentrant form is an old-style ``autograd.Function``
    (``CheckpointFunction``); transformers' ``gradient_checkpointing_enable()`` registers a
    forward hook that calls ``requires_grad_()`` on the embeddings' output, which torch.func
    refuses. The last two messages do not name checkpointing, so the traceback is read too.
    """
    msg = str(err)
    if "saved tensor hooks" in msg:
        return True
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.replace("\\", "/").endswith("torch/utils/checkpoint.py"):
            return True
        if code.co_name in ("make_inputs_require_grads", "_checkpoint_without_reentrant"):
            return True
        tb = tb.tb_next
    return False


def ad_error_hint(where: str, mode: str, err: BaseException) -> NotImplementedError | None:
    """hessfunc's error for an op in ``f`` that lacks the derivative ``mode`` needs, else None.

    The advice names only what can work: the other mode needs the other derivative (forward
    mode, or a double backward), which the op may lack too, so the message says so and points
    at :func:`hessfunc.check_hvp` to confirm a result.
    """
    if isinstance(err, _pseudo.PseudoGradient):
        return NotImplementedError(f"{where}: {err}")
    msg = str(err)
    first = _first_line(err)
    if _checkpointing(err):
        return NotImplementedError(f"{where}: {_CHECKPOINT_ADVICE} ({first})")
    for markers, advice in _TRANSFORM_LIMITS:
        if any(m in msg for m in markers):
            return NotImplementedError(f"{where}: {advice} ({first})")
    if mode == "fwd-rev" and "_has_same_storage_numel" in msg and "sharding strategy" in msg:
        # DTensor (FSDP2 / tensor-parallel parameters): forward mode's make_dual has no
        # sharding rule on current torch (pytorch#182641), whatever op f calls.
        return NotImplementedError(
            f"{where}: forward-mode AD has no DTensor sharding rules on current torch "
            "(pytorch#182641), so mode='fwd-rev' cannot run on sharded parameters. Pass "
            "mode='rev-rev'."
        )
    if mode == "fwd-rev" and any(m in msg for m in _FWD_AD_MARKERS):
        return NotImplementedError(
            f"{where}: an operation inside f has no forward-mode AD, which mode='fwd-rev' needs "
            f"({first}). mode='rev-rev' computes the same product without forward mode and "
            "works if the op has a double backward (ops with neither cannot be differentiated "
            "twice by any mode: replace them); confirm a result with hessfunc.check_hvp. For a "
            "custom autograd.Function, implement its jvp staticmethod."
        )
    if (
        mode == "rev-rev"
        and any(m in msg for m in _DOUBLE_BACKWARD_MARKERS)
        and ("not implemented" in msg)
    ):
        compiled = (
            " Under torch.compile every Hessian product is traced reverse-over-reverse (see "
            "hessfunc's README, 'torch.compile'), so compute this one eagerly."
            if torch.compiler.is_compiling()
            else ""
        )
        return NotImplementedError(
            f"{where}: an operation inside f has no double backward, which reverse-over-reverse "
            f"needs ({first}).{compiled} mode='fwd-rev' computes the same product with forward "
            "mode and works if the op has forward-mode AD (ops with neither cannot be "
            "differentiated twice by any mode: replace them); confirm a result with "
            "hessfunc.check_hvp. For a custom autograd.Function, make its backward "
            "differentiable."
        )
    return None


def is_derivative_error(mode: str, err: BaseException) -> bool:
    """Whether ``err`` says that an op lacks (or gets wrong) a derivative ``mode`` needs."""
    return isinstance(err, UnsoundForwardAD) or ad_error_hint("", mode, err) is not None


def evaluate(where: str, mode: str, product: Callable[[str], T], *, hessian: bool) -> T:
    """``product(mode)`` inside the second-order context, with hessfunc's errors.

    ``hessian=True`` for products that differentiate a gradient (the HVP family): under
    ``torch.compile`` they run ``"rev-rev"`` (:func:`traced_mode`). An op whose forward-mode AD
    is silently wrong (:data:`FORWARD_AD_UNSOUND`) makes a ``"fwd-rev"`` evaluation start again
    in ``"rev-rev"`` (eagerly; under compile, where nothing can be re-run, it raises with the
    fix).
    """
    if hessian:
        mode = traced_mode(mode)
    try:
        return _run(where, mode, product)
    except UnsoundForwardAD as err:
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                f"{where}: {err}; forward mode would give a wrong number here. Pass "
                "mode='rev-rev' (the same product in reverse mode)."
            ) from err
    return _run(where, "rev-rev", product)


def _run(where: str, mode: str, product: Callable[[str], T]) -> T:
    try:
        with second_order_kernels(forward=mode == "fwd-rev"):
            return product(mode)
    except UnsoundForwardAD:
        raise
    except (NotImplementedError, RuntimeError) as err:
        hint = ad_error_hint(where, mode, err)
        if hint is None:
            raise
        raise hint from err
