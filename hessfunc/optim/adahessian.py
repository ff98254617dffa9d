r"""AdaHessian: Adam with the squared Hessian diagonal in place of the squared gradient.

Yao et al. 2021 (AAAI, arXiv:2006.00719). With gradient :math:`g_t` and a Hutchinson estimate
:math:`D = z \odot (H z)` of the Hessian diagonal (Rademacher :math:`z`, averaged over
``num_probes``) refreshed every ``update_every`` (:math:`k`) steps, step
:math:`t = 1, 2, \dots` (the counter in the state plus one):

.. math::
   d_t &= S(D_t) \text{ if } (t - 1) \bmod k = 0, \text{ else } d_{t-1} \\
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
   v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, d_t \odot d_t \\
   \theta_{t+1} &= \theta_t - \eta \Big( \frac{m_t / (1 - \beta_1^t)}
   {\big(\sqrt{v_t / (1 - \beta_2^t)}\big)^{p} + \epsilon} + \lambda \theta_t \Big)

with :math:`p` the ``hessian_power`` and decoupled weight decay :math:`\lambda` inside the
learning rate, as the authors' code applies it. Between refreshes the stored :math:`d` is reused
and :math:`v` still decays every step (the authors' ``update_each``).

**Spatial averaging** :math:`S` (the paper's eq. 10, block size :math:`b` = kernel size): for a
leaf with three or more axes, read as a convolution kernel ``(out, in, *spatial)``, every entry
of :math:`D` is replaced by the mean of :math:`D` over the kernel's spatial axes (axes 2 and up)
for its ``(out, in)`` pair, signed values averaged; leaves with at most two axes (biases, linear
weights) are left as they are. The authors' code averages :math:`|D|` instead; the two agree
after squaring whenever a kernel's entries share a sign. Turn it off with
``spatial_average=False`` (for 3-d parameters that are not kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import grad_and_value

from .._base import _checks, _tree
from .._base._types import PyTree
from ..linalg.estimators import hutchinson_diag
from ..products.hvp import hvp
from . import _base

__all__ = ["AdaHessianInfo", "adahessian"]

NAME = "adahessian"


class AdaHessianInfo(NamedTuple):
    """What one AdaHessian step reports (0-d tensors)."""

    loss: torch.Tensor
    """The batch loss at the incoming parameters."""
    step_size: torch.Tensor
    """The largest magnitude of the adaptive part of the update (before weight decay)."""


def spatial_mean(d: torch.Tensor) -> torch.Tensor:
    """The paper's spatial averaging: mean over axes 2+ of a kernel, broadcast back."""
    if d.dim() < 3:
        return d
    return d.mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)


def adahessian(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    hessian_power: float = 1.0,
    weight_decay: float = 0.0,
    update_every: int = 1,
    eps: float = 1e-4,
    num_probes: int = 1,
    spatial_average: bool = True,
) -> _base.Optimizer:
    r"""AdaHessian (update rule and spatial averaging in :mod:`hessfunc.optim.adahessian`).

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs``.
        loss_fn: ``loss_fn(*batch) -> loss`` with ``loss(outputs)`` the scalar loss.
        lr: the learning rate :math:`\eta \ge 0`.
        betas: :math:`(\beta_1, \beta_2)`.
        hessian_power: :math:`p \in [0, 1]`; 1 is the paper's default, 0 is SGD with momentum.
        weight_decay: :math:`\lambda \ge 0`, decoupled.
        update_every: refresh the Hessian diagonal every ``k`` steps.
        eps: :math:`\epsilon > 0` added to the denominator.
        num_probes: Rademacher probes per refresh.
        spatial_average: average :math:`D` over the spatial axes of 3+-d leaves.

    Returns:
        An :class:`~hessfunc.optim.Optimizer` (an ``init`` and a ``step`` function).
        ``init(params)`` gives ``{"adahessian": {"step",
        "m", "v", "d"}}``; ``step(params, state, *batch, generator=None, noise=None,
        refresh=None)`` returns ``(params, state, AdaHessianInfo(loss, step_size))``. Noise:
        uniform draws, a pytree like ``params`` with a leading axis ``num_probes``
        (``step.draw_noise`` draws it).

    Cost:
        A refreshing step: one gradient plus ``num_probes`` Hessian-vector products (about
        three gradients with one probe); otherwise one gradient. Memory: four pytrees like
        ``params``.

    Example:
        The first step moves every coordinate by about ``lr`` against the gradient's sign
        (Adam's first step), here on :math:`\tfrac12 \sum_i a_i \theta_i^2`:

        >>> import torch, hessfunc
        >>> a = torch.tensor([1.0, 4.0], dtype=torch.float64)
        >>> loss_fn = lambda: (lambda out: 0.5 * (a * out**2).sum())
        >>> opt = hessfunc.optim.adahessian(lambda p: p, loss_fn, lr=0.1, eps=0.0)
        >>> p = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> new, _, _ = opt.step(p, opt.init(p), generator=torch.Generator().manual_seed(0))
        >>> [round(x, 12) for x in new.tolist()]  # m/(1-b1) = a p, sqrt(v/(1-b2)) = a: lr * p
        [0.9, -0.9]
    """
    where = "hessfunc.optim.adahessian(model_fn, loss_fn, lr=...)"
    _base.check_callables(where, model_fn, loss_fn)
    _base.check_nonnegative(where, "lr", lr, "AdaHessian descends with lr > 0 (e.g. 0.1).")
    _base.check_betas(where, betas)
    _base.check_nonnegative(where, "hessian_power", hessian_power)
    if isinstance(hessian_power, (int, float)) and hessian_power > 1:
        raise ValueError(f"{where}: hessian_power must be in [0, 1], got {hessian_power!r}.")
    _base.check_nonnegative(where, "weight_decay", weight_decay)
    _base.check_nonnegative(where, "eps", eps)
    _base.check_positive_int(where, "update_every", update_every)
    _base.check_positive_int(where, "num_probes", num_probes)
    b1, b2 = betas
    f = _base.objective(model_fn, loss_fn)
    swhere = "hessfunc.optim.adahessian(...).step(params, state, *batch)"

    def init(params: PyTree) -> PyTree:
        _checks.check_params("hessfunc.optim.adahessian(...).init(params)", params)
        return {
            NAME: {
                "step": _base.counter(params),
                "m": _tree.zeros_like(params),
                "v": _tree.zeros_like(params),
                "d": _tree.zeros_like(params),
            }
        }

    def draw_noise(
        params: PyTree, state: PyTree, *batch: Any, generator: torch.Generator
    ) -> PyTree:
        return _base.uniform_like(params, generator, batch=num_probes)

    def step(
        params: PyTree,
        state: PyTree,
        *batch: Any,
        generator: torch.Generator | None = None,
        noise: PyTree | None = None,
        refresh: bool | None = None,
    ) -> tuple[PyTree, PyTree, AdaHessianInfo]:
        s = _base.check_state(swhere, NAME, state, params, ("m", "v", "d"), ("step",))
        do = _base.should_refresh(swhere, refresh, s["step"], update_every)
        _base.check_random(swhere, do, generator, noise, "a refreshing AdaHessian step")
        g, value = grad_and_value(f)(params, *batch)
        if do:
            if noise is None:
                noise = draw_noise(params, state, generator=generator)
            _checks.check_like(swhere, params, noise, "noise", batched=True)
            probes = _base.rademacher(noise)
            D = hutchinson_diag(lambda v: hvp(f, params, v, *batch), probes).estimate
            d = _tree.tree_map(spatial_mean, D) if spatial_average else D
        else:
            d = s["d"]
        t = s["step"] + 1
        m = _tree.tree_map(lambda m0, gi: b1 * m0 + (1 - b1) * gi, s["m"], g)
        v = _tree.tree_map(lambda v0, di: b2 * v0 + (1 - b2) * di * di, s["v"], d)
        leaf = _tree.tree_leaves(params)[0]
        tf = t.to(leaf.dtype)
        bc1 = 1 - torch.pow(torch.full_like(tf, b1), tf)
        bc2 = 1 - torch.pow(torch.full_like(tf, b2), tf)

        def adaptive(mi: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
            return (mi / bc1) / (torch.sqrt(vi / bc2) ** hessian_power + eps)

        u = _tree.tree_map(adaptive, m, v)
        new = _tree.tree_map(lambda p, ui: p - lr * (ui + weight_decay * p), params, u)
        size = torch.stack([ui.abs().max() for ui in _tree.tree_leaves(u)]).max()
        state = {NAME: {"step": t, "m": m, "v": v, "d": d}}
        return new, state, AdaHessianInfo(value.detach(), lr * size)

    return _base.Optimizer(init, _base.mark(step, update_every=update_every, draw_noise=draw_noise))
