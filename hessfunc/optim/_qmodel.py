r"""The exact quadratic model that sets the K-FAC optimizer's step size and momentum.

Along the preconditioned direction :math:`\Delta` and the previous update :math:`\delta`, the
update :math:`d = \alpha\Delta + \mu\delta` is chosen to minimise the damped model

.. math:: q(d) = g^\top d + \tfrac12 d^\top (C + \lambda I) d,
   \qquad C = J^\top H_\ell J + \eta I,

with :math:`C` the exact generalised Gauss-Newton matrix of the batch (not K-FAC) plus the
weight decay :math:`\eta`: a 2x2 linear system in :math:`(\alpha, \mu)`, 1x1 on the first step
where :math:`\delta = 0`; a fixed ``lr`` or ``momentum`` leaves the other one to the model.
The same computation as kfac-jax's adaptive learning rate and momentum. Only the three
products :math:`\Delta^\top C \Delta`, :math:`\Delta^\top C \delta`, :math:`\delta^\top C
\delta` need the model: the Jacobian-vector products :math:`J\Delta, J\delta` and the loss's
output Hessian.

The products :math:`Jv` come from the pullback :math:`u \mapsto J^\top u` of the forward pass
that gave the gradient: that map is linear in :math:`u`, and its own pullback is :math:`v
\mapsto Jv` (reverse over reverse, the transpose of the backward pass). Two forward-mode
``jvp`` calls would each run the forward pass again; here the gradient's one forward pass
serves all three, which on the benchmark autoencoder took a compiled step from about 17 to
about 15 ms (one thread, CPU time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import vjp

from .._base import _context, _tree
from .._base._types import PyTree
from ..losses import Loss

__all__ = ["QuadraticStep", "quadratic_step", "solve_2x2"]


class QuadraticStep(NamedTuple):
    """The model's choice (0-d tensors, and the update shaped like ``params``)."""

    lr: torch.Tensor
    momentum: torch.Tensor
    update: PyTree
    predicted: torch.Tensor
    r"""The undamped model's change :math:`q_0(d)` at the chosen update."""


def solve_2x2(m11, m12, m22, b1, b2, lr: float | None, momentum: float | None):
    """Minimise ``a b1 + u b2 + (a^2 m11 + 2 a u m12 + u^2 m22) / 2`` over the free ones.

    ``lr`` and ``momentum`` (Python floats, or None for free) fix ``a`` and ``u``;
    ``m22 = 0`` (a zero previous update: the first step) sets ``u = 0``.

    Example:
        >>> import torch
        >>> one = torch.tensor(1.0)
        >>> a, u = solve_2x2(2 * one, 0 * one, 4 * one, -2 * one, -4 * one, None, None)
        >>> a.item(), u.item()
        (1.0, 1.0)
    """
    # m22 = 0 exactly when the previous update is zero (first step): then u = 0.
    safe22 = torch.where(m22 > 0, m22, torch.ones_like(m22))
    if lr is None and momentum is None:
        det = m11 * safe22 - m12 * m12
        a = (-b1 * safe22 + m12 * b2) / det
        u = (-b2 * m11 + m12 * b1) / det
        a = torch.where(m22 > 0, a, -b1 / m11)
        u = torch.where(m22 > 0, u, torch.zeros_like(u))
        return a, u
    if lr is None:
        u = torch.full_like(m11, momentum)
        return -(b1 + u * m12) / m11, u
    a = torch.full_like(m11, lr)
    if momentum is None:
        u = torch.where(m22 > 0, -(b2 + a * m12) / safe22, torch.zeros_like(m22))
        return a, u
    return a, torch.full_like(m11, momentum)


def quadratic_step(
    out: torch.Tensor,
    pullback: Callable[[torch.Tensor], tuple[PyTree]],
    loss: Loss,
    grads: PyTree,
    direction: PyTree,
    prev: PyTree,
    damping: torch.Tensor,
    weight_decay: float,
    lr: float | None,
    momentum: float | None,
) -> QuadraticStep:
    r"""Step size and momentum from the exact damped quadratic model, and the update.

    Args:
        out: the model's outputs at the parameters the model is expanded at.
        pullback: the pullback of that forward pass, ``u -> (J^T u,)`` (what
            :func:`torch.func.vjp` returns for ``q -> model_fn(q, *batch)``).
        loss: the batch's :mod:`hessfunc.losses` object.
        grads: :math:`g`, the gradient of the objective (weight decay included).
        direction: :math:`\Delta`.
        prev: :math:`\delta` (zeros on the first step).
        damping: :math:`\lambda` (0-d).
        weight_decay: :math:`\eta`.
        lr, momentum: fixed values, or None for the model's choice.

    Returns:
        A :class:`QuadraticStep`.

    Cost:
        Two pullbacks of ``pullback`` (each about one backward pass; no new forward pass),
        and two products with the loss's output Hessian.
    """
    # J v as the pullback of the (linear) pullback, not forward-mode jvp: no second forward
    # pass. Two calls, not one vmap over the stacked directions: on torch 2.13 (CPU inductor)
    # a vmapped jvp compiled to a step whose returned update was silently wrong for some
    # leaves (seen on the 6-layer autoencoder of benchmarks/bench_optim.py; no upstream report
    # found, same family as pytorch#146536). tests/test_optim_kfac.py::
    # test_compiled_autoencoder_state (--full) compares the compiled state with eager's.
    # The pullback must come from a forward pass run under _context.second_order_kernels: the
    # fused attention kernels have no differentiable backward (pytorch#117629, #128971).
    with _context.second_order_kernels():
        _, transposed = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))
        jd, jp = transposed(direction)[0], transposed(prev)[0]
    hd, hp = loss.hvp(out, jd), loss.hvp(out, jp)
    c11 = (jd * hd).sum() + weight_decay * _tree.vdot(direction, direction)
    c12 = (jd * hp).sum() + weight_decay * _tree.vdot(direction, prev)
    c22 = (jp * hp).sum() + weight_decay * _tree.vdot(prev, prev)
    n11, n12 = _tree.vdot(direction, direction), _tree.vdot(direction, prev)
    n22 = _tree.vdot(prev, prev)
    b1, b2 = _tree.vdot(grads, direction), _tree.vdot(grads, prev)
    alpha, mu = solve_2x2(
        c11 + damping * n11, c12 + damping * n12, c22 + damping * n22, b1, b2, lr, momentum
    )
    update = _tree.tree_map(lambda d, v: alpha * d + mu * v, direction, prev)
    predicted = (
        alpha * b1 + mu * b2
        + 0.5 * (alpha * alpha * c11 + 2 * alpha * mu * c12 + mu * mu * c22)
    )  # fmt: skip
    return QuadraticStep(alpha, mu, update, predicted)
