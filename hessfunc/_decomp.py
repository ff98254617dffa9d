"""Composite normalisation layers for second-order evaluations.

torch.func's second derivatives through the fused normalisation kernels are silently wrong once
the layer's affine weight is differentiated together with its input: on torch 2.13 a
forward-over-reverse or reverse-over-reverse Hessian through ``F.layer_norm``,
``F.batch_norm`` on batch statistics and ``F.instance_norm`` is off by tens of percent, while
``torch.autograd.grad`` double backward is right (same family as pytorch#196700 for
layer_norm and pytorch#196699 for batch_norm, both for nested forward mode). ``F.group_norm``'s
forward-over-reverse raises a view error.

While hessfunc evaluates ``f`` for a second-order quantity, a ``TorchFunctionMode`` replaces
these calls by the same formula written in elementary ops (mean, variance, rsqrt, affine), whose
derivatives of every order are right. Eval-mode ``F.batch_norm`` (running statistics) is an
affine map whose fused kernel differentiates correctly, and ``F.rms_norm`` too; both pass through.
The mode also keeps ``nn.TransformerEncoderLayer`` off its fused inference fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _affine(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shape
) -> torch.Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalise(
    x: torch.Tensor, dims: Sequence[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    centred = x - mean
    # pow(2), not centred * centred: inductor miscompiles the forward-over-reverse derivative of
    # a tensor multiplied by itself in these graphs (see tests/test_compile.py).
    var = centred.pow(2).mean(dim=tuple(dims), keepdim=True)
    return centred * torch.rsqrt(var + eps), mean, var


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    k = len(normalized_shape) if isinstance(normalized_shape, (list, tuple, torch.Size)) else 1
    y, _, _ = _normalise(input, range(input.dim() - k, input.dim()), eps)
    return _affine(y, weight, bias, y.shape[input.dim() - k :])


def _update_running(running, stat, momentum, n) -> None:
    with torch.no_grad():
        running.mul_(1 - momentum).add_(momentum * stat)


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if not training:
        return _FUSED[F.batch_norm](
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    dims = [0, *range(2, input.dim())]
    y, mean, var = _normalise(input, dims, eps)
    if running_mean is not None and running_var is not None:
        n = input.numel() / input.shape[1]
        _update_running(running_mean, mean.detach().reshape(-1), momentum, n)
        _update_running(running_var, var.detach().reshape(-1) * n / max(n - 1, 1), momentum, n)
    return _affine(y, weight, bias, shape)


def instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if not use_input_stats:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
        return _affine(y, weight, bias, shape)
    y, mean, var = _normalise(input, range(2, input.dim()), eps)
    if running_mean is not None and running_var is not None:
        n = input[0, 0].numel()
        _update_running(running_mean, mean.detach().mean(0).reshape(-1), momentum, n)
        _update_running(
            running_var, var.detach().mean(0).reshape(-1) * n / max(n - 1, 1), momentum, n
        )
    return _affine(y, weight, bias, shape)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, -1)
    y, _, _ = _normalise(grouped, (2,), eps)
    y = y.reshape(input.shape)
    return _affine(y, weight, bias, (1, -1) + (1,) * (input.dim() - 2))


_FUSED: dict[Callable, Callable] = {
    F.layer_norm: F.layer_norm,
    F.batch_norm: F.batch_norm,
    F.instance_norm: F.instance_norm,
    F.group_norm: F.group_norm,
}
_COMPOSITE: dict[Callable, Callable] = {
    F.layer_norm: layer_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.group_norm: group_norm,
}


class CompositeNorms(TorchFunctionMode):
    """Route normalisation layers to their composite forms (see the module docstring)."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        composite = _COMPOSITE.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        return func(*args, **kwargs)
