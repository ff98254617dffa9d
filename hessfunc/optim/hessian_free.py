r"""Hessian-free optimisation: damped Newton steps by conjugate gradients (Martens 2010, ICML).

Each step minimises the local quadratic model of the batch loss,

.. math:: q(\delta) = f(\theta) + g^\top \delta + \tfrac12 \delta^\top B \delta,

by :func:`hessfunc.cg` on :math:`(B + \lambda I)\,\delta = -g`, with :math:`B` the generalised
Gauss-Newton matrix (``curvature="ggn"``, positive semi-definite for convex losses, the paper's
choice) or the Hessian (``curvature="hessian"``), products matrix-free and ``maxiter`` CG
iterations. CG starts from :math:`\zeta\, \delta_{\text{prev}}`, the previous step's direction
decayed by ``cg_decay`` (:math:`\zeta = 0.95` in the paper), which the state keeps.

**Levenberg-Marquardt damping.** With the reduction ratio of actual to predicted decrease,

.. math:: r = \frac{f(\theta + \delta) - f(\theta)}{q(\delta) - q(0)},
   \qquad q(\delta) - q(0) = g^\top \delta + \tfrac12 \delta^\top B \delta,

the damping becomes :math:`\tfrac32 \lambda` when :math:`r < \tfrac14` and :math:`\tfrac23 \lambda`
when :math:`r > \tfrac34` (the paper's constants), on the same batch. The step is taken only if
it does not increase the batch loss (:math:`f(\theta + \delta) \le f(\theta)`); otherwise the
parameters stay and the damping grows, which replaces the paper's backtracking over CG
iterates with a selection that has no data-dependent control flow (``torch.where``), so the
whole step is one graph under ``torch.compile``. :math:`r` is taken as 0 when the model
predicts no decrease (:math:`q(\delta) \ge q(0)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch.func import grad_and_value

from .._base import _checks, _tree
from .._base._types import PyTree
from ..linalg.solvers import cg
from ..products.ggn import ggn_vp
from ..products.hvp import hvp
from . import _base

__all__ = ["HessianFreeInfo", "hessian_free"]

NAME = "hessian_free"


class HessianFreeInfo(NamedTuple):
    """What one Hessian-free step reports (0-d tensors)."""

    loss: torch.Tensor
    """The batch loss at the incoming parameters."""
    damping: torch.Tensor
    """The damping :math:`\\lambda` this step used (the state holds the adapted one)."""
    cg_iterations: torch.Tensor
    """CG iterations that updated the direction."""
    reduction_ratio: torch.Tensor
    """:math:`r`, actual over predicted decrease (0 where no decrease was predicted)."""
    accepted: torch.Tensor
    """Whether the step was taken (the batch loss did not increase)."""


def hessian_free(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    *,
    damping: float = 1.0,
    adapt_damping: bool = True,
    maxiter: int = 50,
    curvature: Literal["ggn", "hessian"] = "ggn",
    cg_decay: float = 0.95,
) -> _base.Optimizer:
    r"""Hessian-free (truncated Newton with Levenberg-Marquardt damping), see the module docs.

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs``.
        loss_fn: ``loss_fn(*batch) -> loss`` with ``loss(outputs)`` the scalar loss (for the
            GGN, a :mod:`hessfunc.losses` object gives the output-space Hessian in closed form;
            any other callable is differentiated twice in output space).
        damping: the initial :math:`\lambda \ge 0`.
        adapt_damping: adapt :math:`\lambda` by the reduction ratio; ``False`` keeps it fixed.
        maxiter: CG iterations per step (a fixed count: one graph under compile).
        curvature: ``"ggn"`` (default) or ``"hessian"``.
        cg_decay: :math:`\zeta \in [0, 1]`, the warm start's factor (0: start from zero).

    Returns:
        An :class:`~hessfunc.optim.Optimizer` (an ``init`` and a ``step`` function).
        ``init(params)`` gives ``{"hessian_free":
        {"step", "damping", "direction"}}``; ``step(params, state, *batch)`` returns
        ``(params, state, HessianFreeInfo(loss, damping, cg_iterations, reduction_ratio,
        accepted))``. Deterministic: ``generator`` and ``noise`` are accepted and ignored.

    Cost:
        One gradient, ``maxiter + 2`` curvature products (``maxiter`` in CG, one for the warm
        start, one for the predicted decrease; about two gradients each for the GGN) and one
        forward pass at :math:`\theta + \delta`. Memory: five pytrees like ``params`` plus one
        product's.

    Example:
        On least squares, undamped CG with as many iterations as parameters reaches the
        minimiser in one step:

        >>> import torch, hessfunc
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> opt = hessfunc.optim.hessian_free(lambda w, X, y: X @ w,
        ...     lambda X, y: hessfunc.losses.MSELoss(y), damping=0.0, maxiter=2)
        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> new, state, info = opt.step(w, opt.init(w), X, y)
        >>> torch.allclose(new, torch.linalg.lstsq(X, y[:, None]).solution[:, 0])
        True
    """
    where = "hessfunc.optim.hessian_free(model_fn, loss_fn, damping=...)"
    _base.check_callables(where, model_fn, loss_fn)
    _base.check_nonnegative(
        where, "damping", damping, "Use damping >= 0 (Levenberg-Marquardt adds damping * I)."
    )
    if not isinstance(adapt_damping, bool):
        raise TypeError(f"{where}: adapt_damping must be a bool, got {adapt_damping!r}.")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{where}: maxiter must be an int >= 1, got {maxiter!r}.")
    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"{where}: unknown curvature={curvature!r}; expected 'ggn' or 'hessian'.")
    _base.check_nonnegative(where, "cg_decay", cg_decay)
    f = _base.objective(model_fn, loss_fn)
    swhere = "hessfunc.optim.hessian_free(...).step(params, state, *batch)"

    def init(params: PyTree) -> PyTree:
        _checks.check_params("hessfunc.optim.hessian_free(...).init(params)", params)
        return {
            NAME: {
                "step": _base.counter(params),
                "damping": _base.scalar(params, float(damping)),
                "direction": _tree.zeros_like(params),
            }
        }

    def step(
        params: PyTree,
        state: PyTree,
        *batch: Any,
        generator: torch.Generator | None = None,
        noise: PyTree | None = None,
    ) -> tuple[PyTree, PyTree, HessianFreeInfo]:
        s = _base.check_state(swhere, NAME, state, params, ("direction",), ("step", "damping"))
        lam = s["damping"]
        g, value = grad_and_value(f)(params, *batch)
        if curvature == "ggn":
            loss = loss_fn(*batch)

            def matvec(v: PyTree) -> PyTree:
                return ggn_vp(model_fn, loss, params, v, *batch)

        else:

            def matvec(v: PyTree) -> PyTree:
                return hvp(f, params, v, *batch)

        x0 = _tree.scale(cg_decay, s["direction"])
        res = cg(matvec, _tree.scale(-1.0, g), maxiter=maxiter, damping=lam, x0=x0)
        d = res.x
        predicted = _tree.vdot(g, d) + 0.5 * _tree.vdot(d, matvec(d))
        trial = _tree.add(params, d)
        new_value = f(trial, *batch).detach()
        decrease = predicted < 0
        ratio = torch.where(
            decrease,
            (new_value - value) / torch.where(decrease, predicted, torch.ones_like(predicted)),
            torch.zeros_like(predicted),
        )
        if adapt_damping:
            new_lam = torch.where(
                ratio < 0.25, lam * 1.5, torch.where(ratio > 0.75, lam * (2.0 / 3.0), lam)
            )
        else:
            new_lam = lam
        accepted = new_value <= value
        new = _tree.tree_map(lambda p, q: torch.where(accepted, q, p), params, trial)
        state = {NAME: {"step": s["step"] + 1, "damping": new_lam, "direction": d}}
        info = HessianFreeInfo(value.detach(), lam, res.iterations, ratio, accepted)
        return new, state, info

    return _base.Optimizer(init, step)
