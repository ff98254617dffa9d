"""A functional view of an ``nn.Module``: ``(apply, params)``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import _SpectralNorm as _SpectralNormParametrization
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook

from .._base._unwrap import unwrap_module

__all__ = ["from_module"]

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _stochastic_or_stateful(module: nn.Module) -> list[str]:
    """Submodules whose forward is random or writes to the module (parameters or buffers).

    Each entry names the layer, what its forward does, and the fix. The classes come from a
    sweep over every module class torch ships, in training and in evaluation mode
    (``tests/test_module_sweep.py``).
    """
    found = []
    for name, sub in module.named_modules():
        label = name or "<root>"
        kind = type(sub).__name__
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            found.append(
                f"{label} ({kind}(max_norm={sub.max_norm}) renormalises rows of its weight in "
                "place on every forward, in any mode; build it without max_norm, or renormalise "
                "the weight yourself before calling hessfunc)"
            )
        if not sub.training:
            continue
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            found.append(
                f"{label} ({kind} updates its running statistics; call module.eval() or build it "
                "with track_running_stats=False to differentiate through batch statistics)"
            )
        elif isinstance(sub, _DROPOUT) and sub.p > 0:
            found.append(f"{label} ({kind}(p={sub.p}) is random; call module.eval())")
        elif isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
            found.append(
                f"{label} (MultiheadAttention(dropout={sub.dropout}) is random; call module.eval())"
            )
        elif isinstance(sub, nn.RReLU):
            found.append(
                f"{label} (RReLU draws its slopes at random in training; call module.eval())"
            )
        elif isinstance(sub, _SpectralNormParametrization):
            found.append(
                f"{label} (spectral_norm runs a power iteration that updates its vectors _u and "
                "_v in training mode; call module.eval())"
            )
        if any(isinstance(h, _SpectralNormHook) for h in sub._forward_pre_hooks.values()):
            found.append(
                f"{label} (torch.nn.utils.spectral_norm updates its vectors weight_u and "
                "weight_v on every training-mode forward; call module.eval())"
            )
    return found


def _hook_attributes(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(submodule, name)`` of the plain attributes that weight- and spectral-norm hooks set.

    ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.spectral_norm`` (the hook forms, not the
    parametrisations) recompute ``submodule.<name>`` in a forward pre-hook and store it as a
    plain attribute, which would keep a tensor of hessfunc's transforms after the call; ``apply``
    puts the attribute back.
    """
    return [
        (sub, hook.name)
        for sub in module.modules()
        for hook in sub._forward_pre_hooks.values()
        if isinstance(hook, (_WeightNormHook, _SpectralNormHook))
    ]


def _buffer_versions(buffers: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: b._version for n, b in buffers.items()}


def from_module(module: nn.Module) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """A pure function and its parameters from an ``nn.Module``.

    ``params`` holds the trainable parameters (``requires_grad=True``), detached, in
    ``named_parameters()`` order with tied weights listed once. ``apply(params, *args,
    **kwargs)`` runs ``module(*args, **kwargs)`` through ``torch.func.functional_call`` with the
    module's current buffers and frozen parameters, so ``lambda p, x, y: loss(apply(p, x), y)``
    is an ``f(params, *args)`` for every function in hessfunc.

    The module is never changed: no parameter, buffer, ``.grad``, ``requires_grad`` or training
    flag is touched. ``params`` shares storage with the module's parameters (no copy); hessfunc
    never writes to it in place, and neither should you if the module must stay intact.

    Layers with side effects: a Hessian is a property of a deterministic function, so ``apply``
    raises ``RuntimeError``, naming the layer and the fix, before running a module with a layer
    whose forward is random or writes to the module: an active dropout layer (also inside
    ``nn.MultiheadAttention``), ``nn.RReLU`` in training mode, a BatchNorm layer in training
    mode that tracks running statistics (call ``module.eval()``, or build it with
    ``track_running_stats=False`` to differentiate through batch statistics), ``spectral_norm``
    in training mode (its power iteration updates buffers), and an embedding with ``max_norm``
    (it renormalises its weight in place in any mode). Eagerly, the forward also runs on copies
    of the buffers with the global RNG state checked, so a layer of your own that writes to a
    buffer or draws random numbers (``F.dropout(x, training=True)`` in a ``forward`` method) is
    reported too, with the module and the RNG left as they were. The hook forms of
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` store the recomputed weight as a plain
    attribute; ``apply`` restores it after each call. A module with uninitialized lazy
    parameters is refused by ``from_module`` itself (run one forward first).

    Args:
        module: any ``nn.Module``.

    Returns:
        ``(apply, params)``. ``apply`` checks the names in ``params`` strictly: an unknown name
        (a typo) or a missing one raises ``KeyError`` with the closest valid names, instead of
        silently using the module's own tensor.

    Cost:
        Nothing is copied; ``apply`` costs one forward pass of ``module``.

    Example:
        >>> import torch, hessfunc
        >>> lin = torch.nn.Linear(3, 1, bias=False).double()
        >>> apply, params = hessfunc.from_module(lin)
        >>> list(params)
        ['weight']
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> f = lambda p, X: 0.5 * apply(p, X).pow(2).sum()
        >>> torch.allclose(hessfunc.hessian_matrix(f, params, X), X.T @ X)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"hessfunc.from_module(module): expected an nn.Module, got {type(module).__name__}."
        )
    # DDP / DataParallel / torch.compile wrappers: differentiate the model inside them.
    module = unwrap_module(module, "hessfunc.from_module(module)")
    lazy = [
        name or "<root>"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params()
    ]
    if lazy:
        raise ValueError(
            f"hessfunc.from_module(module): {', '.join(lazy)} still have uninitialized lazy "
            "parameters, which their first forward call creates (a change to the module). Run "
            "one forward pass on a batch first, then call from_module."
        )
    hooked = _hook_attributes(module)
    trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen_names = [n for n, p in module.named_parameters() if not p.requires_grad]
    expected = set(trainable)

    def apply(params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        where = f"hessfunc.from_module({type(module).__name__}) apply(params, ...)"
        if not isinstance(params, dict):
            raise TypeError(
                f"{where}: params must be a dict of name -> tensor, got {type(params).__name__}."
            )
        keys = set(params)
        if keys != expected:
            unknown, missing = sorted(keys - expected), sorted(expected - keys)
            hints = [
                f"{u!r} (did you mean {m[0]!r}?)"
                if (m := difflib.get_close_matches(u, expected, 1))
                else repr(u)
                for u in unknown
            ]
            msg = []
            if unknown:
                msg.append(f"unknown parameter name(s) {', '.join(hints)}")
            if missing:
                msg.append(f"missing {', '.join(map(repr, missing))}")
            raise KeyError(
                f"{where}: {'; '.join(msg)}. params must hold exactly the trainable parameters "
                "returned by from_module."
            )
        unsafe = _stochastic_or_stateful(module)
        if unsafe:
            raise RuntimeError(
                f"{where}: layers whose forward is random or writes to the module: "
                f"{'; '.join(unsafe)}. A Hessian is a property of a deterministic function, and "
                "hessfunc never changes your module."
            )
        tensors = dict(params)
        if frozen_names:  # frozen parameters are read live from the module, like buffers
            named = dict(module.named_parameters(remove_duplicate=True))
            tensors.update({n: named[n].detach() for n in frozen_names})
        buffers = dict(module.named_buffers())
        eager = not torch.compiler.is_compiling()
        if eager:
            # Eagerly, the forward runs on copies of the buffers and on the global RNG state as
            # it was, so a layer hessfunc does not know cannot change either: a write or a draw
            # is detected after the call and reported, and the RNG state is put back.
            buffers = {n: b.clone() for n, b in buffers.items()}
            versions = _buffer_versions(buffers)
            rng = torch.get_rng_state()
        saved = [(sub, name, sub.__dict__.get(name)) for sub, name in hooked]
        try:
            out = functional_call(
                module, (tensors, buffers), args, kwargs, tie_weights=True, strict=True
            )
        finally:
            for sub, name, value in saved:
                if value is None:
                    sub.__dict__.pop(name, None)
                else:
                    sub.__dict__[name] = value
            if eager:
                drew = not torch.equal(rng, torch.get_rng_state())
                if drew:
                    torch.set_rng_state(rng)
        if eager:
            written = [n for n, v in _buffer_versions(buffers).items() if v != versions[n]]
            if written or drew:
                what = (
                    f"wrote to buffer(s) {', '.join(map(repr, written))}"
                    if written
                    else "drew random numbers from the global RNG (e.g. F.dropout(x, "
                    "training=True) inside a forward method)"
                )
                raise RuntimeError(
                    f"{where}: the module's forward {what}. A Hessian is a property of a "
                    "deterministic function without side effects; hessfunc ran the forward on "
                    "copies and restored the RNG, so the module is unchanged. Make the forward "
                    "deterministic (module.eval(), or pass training=False to functional "
                    "dropout) and free of in-place updates to its buffers."
                )
        return out

    return apply, trainable
