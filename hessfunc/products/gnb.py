r"""The Gauss-Newton-Bartlett (GNB) estimate of the Gauss-Newton diagonal: one gradient.

Write the loss as :math:`L(\theta) = c \sum_{i=1}^N \ell_i(f_i(\theta), y_i)`, with
:math:`f_i` the model's outputs for sample ``i``, :math:`J_i = \partial f_i / \partial \theta`,
:math:`H_i = \nabla^2_f \ell_i` and :math:`c` the reduction's factor
(:meth:`hessfunc.losses.Loss.scale`: ``1`` for ``"sum"``; for ``"mean"``, ``1/N`` for the
classification losses and ``1/numel`` for the element-wise ones). The generalised Gauss-Newton
matrix of :math:`L` is :math:`G = c \sum_i J_i^\top H_i J_i`.

Draw labels from the model, :math:`\hat y_i \sim p(\cdot \mid f_i)` independently, and take the
gradient of the loss at those labels, :math:`\hat g = c \sum_i J_i^\top r_i` with
:math:`r_i = \nabla_f \ell_i(f_i, \hat y_i)`. Then

.. math:: \operatorname{gnb} = \hat g \odot \hat g \,/\, c

is unbiased for :math:`\operatorname{diag} G`:

1. :math:`\mathbb E[r_i] = 0`: :math:`r_i` is the score of the predictive distribution
   (:math:`\ell_i = -\log p(\hat y_i \mid f_i)` up to a constant), whose mean is zero.
2. The draws are independent across samples, so for :math:`i \ne k`,
   :math:`\mathbb E[r_i r_k^\top] = \mathbb E[r_i]\, \mathbb E[r_k]^\top = 0`: every cross term
   of :math:`\hat g \hat g^\top = c^2 \sum_{i,k} J_i^\top r_i r_k^\top J_k` vanishes in
   expectation, leaving :math:`\mathbb E[\hat g \hat g^\top] = c^2 \sum_i J_i^\top
   \mathbb E[r_i r_i^\top] J_i`.
3. For the exponential-family losses of :mod:`hessfunc.losses` (``MSELoss``,
   ``CrossEntropyLoss``, ``BCEWithLogitsLoss``, ``GaussianNLLLoss`` with a fixed variance), the
   Fisher of the outputs equals their Hessian: :math:`\mathbb E[r_i r_i^\top] = H_i`.

So :math:`\mathbb E[\hat g \hat g^\top] = c^2 \sum_i J_i^\top H_i J_i = c\, G`, and the diagonal of
:math:`\hat g \hat g^\top / c` has mean :math:`\operatorname{diag} G`. Dividing by :math:`c`
is what makes the estimate independent of the reduction: for mean cross-entropy it is
:math:`N \hat g^2`, the "batch size times squared gradient" of Sophia (Liu et al. 2023).
Two common shortcuts are biased: the squared gradient at the *observed* labels (the empirical
Fisher's diagonal, another matrix altogether), and the squared mean-loss gradient without the
factor :math:`1/c` (too small by :math:`c`, i.e. by the batch size).

For a loss whose Fisher differs from its GGN (:class:`~hessfunc.losses.NLLLoss`, whose GGN is
zero; :class:`~hessfunc.losses.GaussianNLLLoss` with a predicted variance) the same estimate is
unbiased for the diagonal of the Fisher :math:`c \sum_i J_i^\top \mathbb E[r_i r_i^\top] J_i`
instead. The argument needs row ``i`` of the outputs to depend on sample ``i`` only (no batch
statistics, no attention across the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vjp

from .._base import _checks, _tree
from .._base._types import PyTree
from ..losses import Loss

__all__ = ["gnb_diag"]

WHERE = "hessfunc.gnb_diag(model_fn, loss, params, *args)"


def check_loss(where: str, loss: Any, what: str = "loss") -> None:
    """GNB needs the predictive distribution and the reduction factor of a hessfunc loss."""
    if not isinstance(loss, Loss):
        raise TypeError(
            f"{where}: {what} must be a hessfunc.losses object (e.g. "
            f"hessfunc.losses.CrossEntropyLoss(targets)), got {type(loss).__name__}: the "
            "Gauss-Newton-Bartlett estimate samples labels from the model's predictive "
            "distribution and divides by the reduction's factor, which only those objects know. "
            "Wrap the loss in one, or use the Hutchinson estimate of the Hessian diagonal."
        )


def uniform_noise(loss: Loss, outputs: PyTree, generator: torch.Generator) -> torch.Tensor:
    """Uniform draws shaped ``loss.noise_shape(outputs)`` from ``generator``.

    Drawn on the generator's device (so a CPU generator gives the same numbers everywhere) in
    the outputs' dtype, then moved to the outputs' device.
    """
    ref = _tree.tree_leaves(outputs)[0]
    u = torch.rand(
        loss.noise_shape(outputs), generator=generator, dtype=ref.dtype, device=generator.device
    )
    return u.to(ref.device)


def gnb_from_pullback(
    where: str,
    loss: Loss,
    outputs: PyTree,
    pullback: Callable[[PyTree], PyTree],
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
) -> PyTree:
    """The estimate from the model's outputs and its pullback ``u -> J^T u`` at ``params``.

    Callers that also need the gradient at the observed labels share the forward pass.
    """
    if noise is None:
        if torch.compiler.is_compiling():
            raise ValueError(
                f"{where}: a torch.Generator cannot be traced by torch.compile; pass noise= "
                "(uniform draws of shape loss.noise_shape(outputs)) instead."
            )
        noise = uniform_noise(loss, outputs, generator)
    shape = tuple(loss.noise_shape(outputs))
    if tuple(noise.shape) != shape:
        raise ValueError(
            f"{where}: noise has shape {tuple(noise.shape)}; expected loss.noise_shape(outputs) "
            f"= {shape} (uniform draws in [0, 1))."
        )
    sampled = loss.predictive(loss.sample_from_uniform(outputs, noise))
    g = pullback(grad(sampled)(outputs))
    c = loss.scale(outputs)
    return _tree.tree_map(lambda x: (x * x) / c, g)


def gnb_diag(
    model_fn: Callable[..., PyTree],
    loss: Loss,
    params: PyTree,
    *args: Any,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> PyTree:
    r"""Gauss-Newton-Bartlett estimate of the GGN diagonal: :math:`\hat g \odot \hat g / c`.

    :math:`\hat g` is the gradient of the loss at labels drawn from the model's predictive
    distribution, :math:`c` the reduction's factor ``loss.scale(outputs)``; the estimate is
    unbiased for ``diag(hessfunc.ggn_matrix(model_fn, loss, params, *args))`` (proof in
    :mod:`hessfunc.products.gnb`). One draw per sample; average several calls for less variance.

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``, samples along axis 0, each row
            depending on its own sample only.
        loss: a :mod:`hessfunc.losses` object holding the observed targets (they are replaced
            by sampled ones; only their shape and the loss's settings are used).
        params: a pytree of floating tensors.
        *args: passed to ``model_fn`` as is.
        generator: a ``torch.Generator`` for the label draws (the global RNG is never used).
            Dynamo cannot trace generators: under ``torch.compile`` pass ``noise``.
        noise: instead of ``generator``: uniform draws in [0, 1) of shape
            ``loss.noise_shape(outputs)``, turned into labels deterministically.

    Returns:
        A pytree like ``params``: the diagonal estimate (non-negative).

    Cost:
        One forward and one backward pass (a gradient), plus sampling and a gradient in output
        space; memory of one gradient.

    Example:
        A linear model with summed squared error has the constant GGN :math:`2 X^\top X`; the
        mean of many estimates approaches its diagonal :math:`2 \sum_i x_i^2 = (4, 8)`:

        >>> import torch, hessfunc
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> loss = hessfunc.losses.MSELoss(torch.zeros(2, dtype=torch.float64), reduction="sum")
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> draws = [hessfunc.gnb_diag(lambda w, X: X @ w, loss, w, X, generator=g)
        ...          for _ in range(4000)]
        >>> torch.stack(draws).mean(0).round().tolist()
        [4.0, 8.0]
    """
    where = WHERE
    if not callable(model_fn):
        raise TypeError(
            f"{where}: model_fn must be callable as model_fn(params, *args) -> outputs, got "
            f"{type(model_fn).__name__}."
        )
    check_loss(where, loss)
    _checks.check_random_source(where, "the label draws", generator, noise)
    _checks.check_params(where, params)
    outputs, pullback = vjp(lambda p: model_fn(p, *args), params)
    return gnb_from_pullback(where, loss, outputs, lambda u: pullback(u)[0], generator, noise)
