r"""Sharpness tracking: the top curvature eigenvalue along a training run, warm-started.

Every ``update_every`` steps, ``num_iters`` steps of power iteration (:func:`hessfunc.
power_iteration`) on the Hessian or the Gauss-Newton matrix of the batch loss, started from the
eigenvector found last time. Between refreshes the parameters move little, so the previous
vector is already close and a few matvecs keep the estimate tracking (the quantity watched in
"edge of stability" studies, where it hovers near :math:`2/\eta` for gradient descent with step
:math:`\eta`; Cohen et al. 2021).

Power iteration finds the eigenvalue of largest *magnitude*: the top eigenvalue for the
Gauss-Newton matrix (positive semi-definite for convex losses) and for the Hessian wherever its
top positive eigenvalue dominates its most negative one, as it does during most of training.
The reported ``residual`` :math:`\|Bu - \theta u\|` (with unit :math:`u`) bounds the distance
from :math:`\theta` to an eigenvalue, so a small residual certifies the number even after only a
few iterations; a large one says to raise ``num_iters``.

The tracker has the optimizer contract, so it compiles and is driven like one; its ``step``
returns the parameters it was given unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from .._base import _checks, _tree
from .._base._types import PyTree
from ..linalg.lanczos import power_iteration
from ..products.ggn import ggn_vp
from ..products.hvp import hvp
from . import _base

__all__ = ["SharpnessInfo", "sharpness"]

NAME = "sharpness"


class SharpnessInfo(NamedTuple):
    """What one tracking step reports (0-d tensors)."""

    loss: torch.Tensor
    """The batch loss at the parameters."""
    eigenvalue: torch.Tensor
    """The current estimate of the top eigenvalue (from the last refresh)."""
    residual: torch.Tensor
    """:math:`\\|Bu - \\theta u\\|` of that estimate (``inf`` before the first refresh)."""


def _start(params: PyTree) -> PyTree:
    """A fixed, dense start vector (no generator needed): cosines of a golden-ratio sequence."""
    offset = [0]

    def leaf(x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(x.numel(), dtype=x.dtype, device=x.device) + offset[0]
        offset[0] += x.numel()
        return torch.cos(2 * math.pi * 0.6180339887 * (idx + 1)).reshape(x.shape)

    return _tree.tree_map(leaf, params)


def sharpness(
    model_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    *,
    update_every: int = 10,
    num_iters: int = 5,
    curvature: Literal["hessian", "ggn"] = "hessian",
) -> _base.Optimizer:
    r"""Track the top Hessian (or GGN) eigenvalue every ``update_every`` steps, warm-started.

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs``.
        loss_fn: ``loss_fn(*batch) -> loss`` with ``loss(outputs)`` the scalar loss.
        update_every: refresh every ``k`` steps (the first call refreshes).
        num_iters: power-iteration matvecs per refresh (a Python int: one graph).
        curvature: ``"hessian"`` (default) or ``"ggn"``.

    Returns:
        An :class:`~hessfunc.optim.Optimizer` (an ``init`` and a ``step`` function).
        ``init(params)`` gives ``{"sharpness": {"step",
        "vector", "eigenvalue", "residual"}}`` (the start vector is a fixed dense pattern);
        ``step(params, state, *batch, refresh=None)`` returns ``(params, state,
        SharpnessInfo(loss, eigenvalue, residual))`` with ``params`` unchanged.

    Cost:
        A refreshing step: ``num_iters`` curvature products (about two to three gradients each)
        plus one forward pass; otherwise one forward pass. Memory: the eigenvector and four
        vectors of the iteration.

    Example:
        :math:`\tfrac12 \theta^\top \operatorname{diag}(3, 1) \theta` has top eigenvalue 3:

        >>> import torch, hessfunc
        >>> a = torch.tensor([3.0, 1.0], dtype=torch.float64)
        >>> loss_fn = lambda: (lambda out: 0.5 * (a * out**2).sum())
        >>> tracker = hessfunc.optim.sharpness(lambda p: p, loss_fn, num_iters=60)
        >>> p = torch.ones(2, dtype=torch.float64)
        >>> _, state, info = tracker.step(p, tracker.init(p))
        >>> round(float(info.eigenvalue), 8)
        3.0
    """
    where = "hessfunc.optim.sharpness(model_fn, loss_fn, ...)"
    _base.check_callables(where, model_fn, loss_fn)
    _base.check_positive_int(where, "update_every", update_every)
    _base.check_positive_int(where, "num_iters", num_iters)
    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"{where}: unknown curvature={curvature!r}; expected 'hessian' or 'ggn'.")
    f = _base.objective(model_fn, loss_fn)
    swhere = "hessfunc.optim.sharpness(...).step(params, state, *batch)"

    def init(params: PyTree) -> PyTree:
        _checks.check_params("hessfunc.optim.sharpness(...).init(params)", params)
        return {
            NAME: {
                "step": _base.counter(params),
                "vector": _start(params),
                "eigenvalue": _base.scalar(params, 0.0),
                "residual": _base.scalar(params, math.inf),
            }
        }

    def step(
        params: PyTree,
        state: PyTree,
        *batch: Any,
        generator: torch.Generator | None = None,
        noise: PyTree | None = None,
        refresh: bool | None = None,
    ) -> tuple[PyTree, PyTree, SharpnessInfo]:
        s = _base.check_state(
            swhere, NAME, state, params, ("vector",), ("step", "eigenvalue", "residual")
        )
        do = _base.should_refresh(swhere, refresh, s["step"], update_every)
        value = f(params, *batch).detach()
        vector, theta, residual = s["vector"], s["eigenvalue"], s["residual"]
        if do:
            if curvature == "ggn":
                loss = loss_fn(*batch)

                def matvec(v: PyTree) -> PyTree:
                    return ggn_vp(model_fn, loss, params, v, *batch)

            else:

                def matvec(v: PyTree) -> PyTree:
                    return hvp(f, params, v, *batch)

            res = power_iteration(matvec, vector, 1, num_iters=num_iters)
            vector = _tree.tree_map(lambda x: x[0], res.eigenvectors)
            theta, residual = res.eigenvalues[0], res.residual_norms[0]
        new_state = {
            NAME: {
                "step": s["step"] + 1,
                "vector": vector,
                "eigenvalue": theta,
                "residual": residual,
            }
        }
        return params, new_state, SharpnessInfo(value, theta, residual)

    return _base.Optimizer(init, _base.mark(step, update_every=update_every))
