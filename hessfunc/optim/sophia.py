r"""Sophia: clipped, diagonally preconditioned momentum (Liu et al. 2023, arXiv:2305.14342).

With gradient :math:`g_t` at the incoming parameters and a diagonal curvature estimate
:math:`\hat h` refreshed every ``update_every`` (:math:`k`) steps, step :math:`t = 0, 1, \dots`:

.. math::
   m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
   h_t &= \beta_2 h_{t-1} + (1 - \beta_2)\, \hat h_t \ \text{ if } t \bmod k = 0,
   \text{ else } h_{t-1} \\
   \theta_{t+1} &= \theta_t - \eta \lambda \theta_t
   - \eta\, \operatorname{clip}\!\big(m_t / \max(\rho h_t, \epsilon),\, 1\big)

with :math:`m_{-1} = h_{-1} = 0`, :math:`\operatorname{clip}(z, 1) = \max(\min(z, 1), -1)`
elementwise and decoupled weight decay :math:`\lambda` (Algorithm 3 of the paper). The
denominator is the paper's :math:`\max(\rho h, \epsilon)`: where :math:`h \le 0` (possible with
Hutchinson) the ratio is clipped and the coordinate moves by :math:`\eta\, \operatorname{sign}(m)`.
The authors' code uses :math:`\rho\, B\, h + 10^{-15}` with :math:`h` the squared mean-loss
gradient; here :math:`\hat h` already carries the batch factor (see below), so :math:`B` is not
applied again, and a negative :math:`h` cannot flip the sign of the step.

The refresh happens on the first step of each cycle (:math:`t = 0, k, 2k, \dots`), at the
incoming parameters and before the update, so the first step is already preconditioned.

Estimators of :math:`\hat h`:

- ``"gnb"`` (Sophia-G): :func:`hessfunc.gnb_diag`, the gradient at labels sampled from the model,
  squared and divided by the loss's reduction factor; unbiased for the Gauss-Newton diagonal.
  ``loss_fn(*batch)`` must return a :mod:`hessfunc.losses` object. Its noise is uniform draws
  shaped ``loss.noise_shape(outputs)``.
- ``"hutchinson"`` (Sophia-H): :func:`hessfunc.hutchinson_diag` on Hessian-vector products with
  ``num_probes`` Rademacher probes; unbiased for the Hessian diagonal. Its noise is a pytree like
  ``params`` with a leading axis ``num_probes`` of uniform draws (below one half: ``-1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch.func import grad_and_value, vjp

from .._base import _checks, _tree
from .._base._types import PyTree
from ..linalg.estimators import hutchinson_diag
from ..products.gnb import check_loss, gnb_from_pullback, uniform_noise
from ..products.hvp import hvp
from . import _base

__all__ = ["SophiaInfo", "sophia"]

NAME = "sophia"


class SophiaInfo(NamedTuple):
    """What one Sophia step reports (0-d tensors)."""

    loss: torch.Tensor
    """The batch loss at the incoming parameters."""
    clip_fraction: torch.Tensor
    """Fraction of coordinates whose ratio :math:`|m / \\max(\\rho h, \\epsilon)|` exceeded 1."""


def sophia(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.965, 0.99),
    rho: float = 0.04,
    weight_decay: float = 0.1,
    estimator: Literal["gnb", "hutchinson"] = "gnb",
    update_every: int = 10,
    eps: float = 1e-12,
    num_probes: int = 1,
) -> _base.Optimizer:
    r"""Sophia, the clipped second-order optimizer (update rule in :mod:`hessfunc.optim.sophia`).

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs``.
        loss_fn: ``loss_fn(*batch) -> loss`` with ``loss(outputs)`` the scalar loss; a
            :mod:`hessfunc.losses` object for ``estimator="gnb"``.
        lr: the learning rate :math:`\eta \ge 0` (the step is at most ``lr`` per coordinate).
        betas: :math:`(\beta_1, \beta_2)`, momentum of the gradient and of the diagonal.
        rho: :math:`\rho > 0`, the scale of the curvature in the denominator.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        estimator: ``"gnb"`` (Sophia-G, default) or ``"hutchinson"`` (Sophia-H).
        update_every: refresh the diagonal every ``k`` steps (``k >= 1``).
        eps: :math:`\epsilon > 0`, the floor of the denominator.
        num_probes: Rademacher probes per refresh (``"hutchinson"``).

    Returns:
        An :class:`~hessfunc.optim.Optimizer` (an ``init`` and a ``step`` function).
        ``init(params)`` gives ``{"sophia": {"step",
        "m", "h"}}``; ``step(params, state, *batch, generator=None, noise=None, refresh=None)``
        returns ``(params, state, SophiaInfo(loss, clip_fraction))``. A refreshing step needs
        ``generator`` or ``noise``; ``step.draw_noise(params, state, *batch, generator=)`` draws
        the noise it would use, ``step.update_every`` is ``k``.

    Cost:
        A plain step: one gradient. A refreshing step: ``"gnb"`` one forward and two backward
        passes (the sampled-label gradient shares the forward); ``"hutchinson"`` one gradient
        plus ``num_probes`` Hessian-vector products. Memory: three pytrees like ``params``.

    Example:
        On :math:`\tfrac12 \sum_i a_i \theta_i^2` (Hessian :math:`\operatorname{diag}(a)`, exact
        for Hutchinson), with :math:`\beta_1 = \beta_2 = 0` and large :math:`\rho`, the first
        step is the Newton step scaled by :math:`1/\rho`:

        >>> import torch, hessfunc
        >>> a = torch.tensor([1.0, 4.0], dtype=torch.float64)
        >>> loss_fn = lambda: (lambda out: 0.5 * (a * out**2).sum())
        >>> opt = hessfunc.optim.sophia(lambda p: p, loss_fn, lr=1.0, betas=(0.0, 0.0), rho=2.0,
        ...                             weight_decay=0.0, estimator="hutchinson")
        >>> p = torch.tensor([0.5, 0.5], dtype=torch.float64)
        >>> new, state, info = opt.step(p, opt.init(p), generator=torch.Generator().manual_seed(0))
        >>> new.tolist()  # p - (a p) / (2 a) = p / 2
        [0.25, 0.25]
    """
    where = "hessfunc.optim.sophia(model_fn, loss_fn, lr=...)"
    _base.check_callables(where, model_fn, loss_fn)
    _base.check_nonnegative(where, "lr", lr, "Sophia descends with lr > 0 (typically 1e-4-1e-3).")
    _base.check_betas(where, betas)
    _base.check_nonnegative(where, "rho", rho)
    _base.check_nonnegative(where, "weight_decay", weight_decay)
    _base.check_nonnegative(where, "eps", eps)
    if estimator not in ("gnb", "hutchinson"):
        raise ValueError(
            f"{where}: unknown estimator={estimator!r}; expected 'gnb' (Gauss-Newton-Bartlett) "
            "or 'hutchinson' (Hessian diagonal by Rademacher probes)."
        )
    _base.check_positive_int(where, "update_every", update_every)
    _base.check_positive_int(where, "num_probes", num_probes)
    b1, b2 = betas
    f = _base.objective(model_fn, loss_fn)
    swhere = "hessfunc.optim.sophia(...).step(params, state, *batch)"

    def init(params: PyTree) -> PyTree:
        _checks.check_params("hessfunc.optim.sophia(...).init(params)", params)
        zeros = _tree.zeros_like(params)
        return {NAME: {"step": _base.counter(params), "m": zeros, "h": _tree.zeros_like(params)}}

    def draw_noise(
        params: PyTree, state: PyTree, *batch: Any, generator: torch.Generator
    ) -> PyTree:
        if estimator == "hutchinson":
            return _base.uniform_like(params, generator, batch=num_probes)
        loss = loss_fn(*batch)
        check_loss(swhere, loss, "loss_fn(*batch)")
        with torch.no_grad():
            outputs = model_fn(params, *batch)
        return uniform_noise(loss, outputs, generator)

    def estimate(
        params: PyTree, batch: tuple, generator: Any, noise: Any
    ) -> tuple[PyTree, torch.Tensor, PyTree]:
        """``(g, loss, h_hat)`` at ``params``."""
        if estimator == "gnb":
            loss = loss_fn(*batch)
            check_loss(swhere, loss, "loss_fn(*batch)")
            outputs, pullback = vjp(lambda p: model_fn(p, *batch), params)
            r, value = grad_and_value(loss)(outputs)
            g = pullback(r)[0]
            h_hat = gnb_from_pullback(
                swhere, loss, outputs, lambda u: pullback(u)[0], generator, noise
            )
            return g, value, h_hat
        g, value = grad_and_value(f)(params, *batch)
        if noise is None:
            noise = _base.uniform_like(params, generator, batch=num_probes)
        _checks.check_like(swhere, params, noise, "noise", batched=True)
        probes = _base.rademacher(noise)
        h_hat = hutchinson_diag(lambda v: hvp(f, params, v, *batch), probes).estimate
        return g, value, h_hat

    def step(
        params: PyTree,
        state: PyTree,
        *batch: Any,
        generator: torch.Generator | None = None,
        noise: PyTree | None = None,
        refresh: bool | None = None,
    ) -> tuple[PyTree, PyTree, SophiaInfo]:
        s = _base.check_state(swhere, NAME, state, params, ("m", "h"), ("step",))
        do = _base.should_refresh(swhere, refresh, s["step"], update_every)
        _base.check_random(swhere, do, generator, noise, "a refreshing Sophia step")
        if do:
            g, value, h_hat = estimate(params, batch, generator, noise)
            h = _tree.tree_map(lambda h0, e: b2 * h0 + (1 - b2) * e, s["h"], h_hat)
        else:
            g, value = grad_and_value(f)(params, *batch)
            h = s["h"]
        m = _tree.tree_map(lambda m0, gi: b1 * m0 + (1 - b1) * gi, s["m"], g)
        ratios = _tree.tree_map(lambda mi, hi: mi / torch.clamp(rho * hi, min=eps), m, h)
        new = _tree.tree_map(
            lambda p, z: p - lr * weight_decay * p - lr * torch.clamp(z, -1.0, 1.0), params, ratios
        )
        leaves = _tree.tree_leaves(ratios)
        clipped = sum((z.abs() > 1).sum() for z in leaves)
        total = sum(z.numel() for z in leaves)
        info = SophiaInfo(value.detach(), clipped.to(value.dtype) / total)
        return new, {NAME: {"step": s["step"] + 1, "m": m, "h": h}}, info

    return _base.Optimizer(init, _base.mark(step, update_every=update_every, draw_noise=draw_noise))
