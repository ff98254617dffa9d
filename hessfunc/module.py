"""A functional view of an ``nn.Module``: ``(apply, params)``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ._unwrap import unwrap_module

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
    """Submodules whose training-mode forward is random or writes to buffers."""
    found = []
    for name, sub in module.named_modules():
        label = name or "<root>"
        if not sub.training:
            continue
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            found.append(f"{label} ({type(sub).__name__} updates its running statistics)")
        elif isinstance(sub, _DROPOUT) and sub.p > 0:
            found.append(f"{label} ({type(sub).__name__}(p={sub.p}) is random)")
        elif isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
            found.append(f"{label} (MultiheadAttention(dropout={sub.dropout}) is random)")
    return found


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

    Behaviour in training mode: a Hessian is a property of a deterministic function, so
    ``apply`` raises ``RuntimeError`` when the module has an active dropout layer (the result
    would be random and would consume the global RNG) or a BatchNorm layer in training mode
    that tracks running statistics (the call would write to the module's buffers, which
    ``vmap``/``jvp`` also refuse). Call ``module.eval()`` first (BatchNorm then uses its running
    statistics), or build the BatchNorm with ``track_running_stats=False`` to differentiate
    through batch statistics. Dropout written as ``F.dropout(x, training=True)`` inside your own
    ``forward`` cannot be detected; keep it out of functions you differentiate.

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
                f"{where}: the module is in training mode with layers whose forward is random or "
                f"writes to buffers: {'; '.join(unsafe)}. Call module.eval() before "
                "differentiating (hessfunc never changes the module), or use "
                "track_running_stats=False for BatchNorm on batch statistics."
            )
        tensors = dict(params)
        if frozen_names:  # frozen parameters are read live from the module, like buffers
            named = dict(module.named_parameters(remove_duplicate=True))
            tensors.update({n: named[n].detach() for n in frozen_names})
        buffers = dict(module.named_buffers())
        return functional_call(
            module, (tensors, buffers), args, kwargs, tie_weights=True, strict=True
        )

    return apply, trainable
