r"""Loss objects with closed-form curvature in output space.

Each loss holds its targets and is called on the model's outputs, ``loss(outputs) -> scalar``,
with the value of the matching ``torch.nn.functional`` call. It also knows its output-space
curvature and, being a negative log-likelihood, the predictive distribution of the model:

- ``loss.hvp(outputs, u)``: :math:`\nabla^2_f L(f)\, u` in closed form, without forming the
  matrix (for the softmax, :math:`(\operatorname{diag}(p) - p p^\top) u`);
- ``loss.sample(outputs, generator)``: targets drawn from the predictive distribution
  :math:`p(y \mid f)` (for the Monte-Carlo Fisher);
- ``loss.per_sample(outputs)``: the unreduced per-sample losses :math:`\ell_i`, and
  ``loss.scale(outputs)``: the reduction's factor :math:`c` with :math:`L = c \sum_i \ell_i`
  (``1`` for ``"sum"``; for ``"mean"``, ``1/N`` for the classification losses, which average over
  the batch, and ``1 / outputs.numel()`` for the element-wise losses, which average over every
  element as ``F.mse_loss`` does).

Language models: :class:`CrossEntropyLoss` and :class:`NLLLoss` take ``ignore_index``
(default ``-100``, as torch) for padded token batches: ignored rows have no loss, curvature or
sampled target, and ``"mean"`` divides by the number of the other rows, so ``scale`` is then a
0-d tensor. Flatten ``(B, T, V)`` logits to ``(B T, V)`` first.

Row ``i`` of the outputs (axis 0) is sample ``i``. Every method validates shapes and dtypes only,
so a loss built inside a function compiled with ``torch.compile(fullgraph=True)`` traces.
``sample`` takes a ``torch.Generator``, which Dynamo cannot trace; its deterministic half,
``sample_from_uniform``, compiles.

Gauss-Newton equals Fisher: when the loss is the negative log-likelihood of an exponential family
in its natural parameters, :math:`\nabla^2_f \ell = \mathbb{E}_{y \sim p(\cdot|f)}[\nabla_f
\ell\, \nabla_f \ell^\top]`, so the generalised Gauss-Newton matrix and the Fisher coincide:
:class:`MSELoss` (Gaussian with variance 1/2, mean ``f``), :class:`CrossEntropyLoss`
(categorical, logits ``f``; with probability targets summing to one), :class:`BCEWithLogitsLoss`
(Bernoulli, logit ``f``) and :class:`GaussianNLLLoss` with a fixed variance. They do not coincide
for :class:`NLLLoss` (log-probabilities are not natural parameters: the loss is linear in them,
so its GGN is zero) or for :class:`GaussianNLLLoss` when the model predicts the variance. The
GGN is positive semi-definite whenever the loss is convex in the outputs: all of the above except
:class:`GaussianNLLLoss` with a predicted variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import override

from ._base._loss import Loss, Reduction, _rows, _shape, _std_normal
from ._categorical import CrossEntropyLoss, NLLLoss

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "Loss",
    "MSELoss",
    "NLLLoss",
]

# ---------------------------------------------------------------------------------- regression


@dataclass(frozen=True, eq=False)
class _ElementwiseLoss(Loss):
    """A loss summed (or averaged) over every element of outputs shaped like the target."""

    target: torch.Tensor
    reduction: Reduction = "mean"

    def __post_init__(self) -> None:
        self._check_reduction(self.reduction)
        self._check_tensor("__init__", self.target, "target")

    def _check(self, method: str, outputs: Any) -> None:
        self._check_tensor(method, outputs)
        if _shape(outputs) != _shape(self.target):
            raise ValueError(
                f"{self._where(method)}: outputs have shape {_shape(outputs)} but the target has "
                f"{_shape(self.target)}; they must match (no broadcasting)."
            )

    @override
    def scale(self, outputs: torch.Tensor) -> float:
        return 1.0 / max(outputs.numel(), 1) if self.reduction == "mean" else 1.0


@dataclass(frozen=True, eq=False)
class MSELoss(_ElementwiseLoss):
    r"""Mean squared error :math:`c \sum (f - y)^2`, as ``F.mse_loss(outputs, target)``.

    ``"mean"`` averages over every element (:math:`c = 1/\text{numel}`), like torch. Output-space
    Hessian :math:`2c\,I`; predictive distribution :math:`\mathcal N(f, \tfrac12 I)` (the
    Gaussian whose negative log-likelihood is the squared error), so GGN = Fisher.

    Args:
        target: a floating tensor with the outputs' shape.
        reduction: ``"mean"`` (default) or ``"sum"``.

    Example:
        >>> import torch
        >>> from hessfunc.losses import MSELoss
        >>> loss = MSELoss(torch.zeros(2, 2))
        >>> loss.hvp(torch.ones(2, 2), torch.ones(2, 2))  # 2/4 * u
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])

    """

    @override
    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("__call__", outputs)
        return F.mse_loss(outputs, self.target, reduction=self.reduction)

    @override
    def hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self._check("hvp", outputs)
        return (2.0 * self.scale(outputs)) * u

    @override
    def per_sample(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("per_sample", outputs)
        return _rows((outputs - self.target) ** 2)

    @override
    def sample_from_uniform(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return outputs.detach() + math.sqrt(0.5) * _std_normal(u)

    @override
    def predictive(self, targets: torch.Tensor) -> MSELoss:
        return replace(self, target=targets)


@dataclass(frozen=True, eq=False)
class GaussianNLLLoss(Loss):
    r"""Gaussian negative log-likelihood, as ``F.gaussian_nll_loss(mean, target, var)``.

    :math:`\ell = \tfrac12(\log s + (f - y)^2 / s)` element-wise with :math:`s = \max(v, \epsilon)`
    (plus :math:`\tfrac12\log 2\pi` if ``full``); ``"mean"`` averages over every element. The
    clamp is straight-through for derivatives, as in torch.

    With a fixed ``var`` the outputs are the means: Hessian :math:`c/s` element-wise, convex, and
    GGN = Fisher of :math:`\mathcal N(f, s)`. With ``var=None`` the model predicts it: outputs
    are a pair ``(mean, var)`` of equal shapes, and the per-element Hessian in ``(mean, var)``,

    .. math:: c\begin{pmatrix} 1/s & -d/s^2 \\ -d/s^2 & -1/(2s^2) + d^2/s^3 \end{pmatrix},
       \quad d = f - y,

    is indefinite, so the GGN is not PSD and differs from the Fisher.

    Args:
        target: floating tensor shaped like the means.
        var: fixed variances, broadcastable as torch allows (same shape; one axis fewer; or one
            axis of size 1), or ``None`` when the model outputs ``(mean, var)``.
        full: add the constant :math:`\tfrac12 \log 2\pi`.
        eps: clamp for the variance.
        reduction: ``"mean"`` (default) or ``"sum"``.

    Example:
        >>> import torch
        >>> from hessfunc.losses import GaussianNLLLoss
        >>> loss = GaussianNLLLoss(torch.zeros(2), torch.tensor([0.5, 2.0]), reduction="sum")
        >>> loss.hvp(torch.ones(2), torch.ones(2))
        tensor([2.0000, 0.5000])

    """

    target: torch.Tensor
    var: torch.Tensor | None = None
    full: bool = False
    eps: float = 1e-6
    reduction: Reduction = "mean"

    def __post_init__(self) -> None:
        self._check_reduction(self.reduction)
        self._check_tensor("__init__", self.target, "target")
        if self.var is not None:
            self._check_tensor("__init__", self.var, "var")
            t, s = _shape(self.target), _shape(self.var)
            ok = (
                s == t
                or s == t[:-1]
                or (
                    len(s) == len(t)
                    and sum(a != b for a, b in zip(s, t, strict=True)) == 1
                    and 1 in s
                )
            )
            if not ok:
                raise ValueError(
                    f"{self._where('__init__')}: var of shape {s} does not fit the target's {t}; "
                    "use the same shape, one axis fewer, or a size-1 axis (torch's rules)."
                )

    def _split(self, method: str, outputs: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(mean, clamped var, var is predicted)`` after checking the outputs' form."""
        if self.var is None:
            if not (isinstance(outputs, tuple) and len(outputs) == 2):
                raise TypeError(
                    f"{self._where(method)}: with var=None the model must output a pair "
                    f"(mean, var); got {type(outputs).__name__}. Pass a fixed var to the loss "
                    "if the model predicts the mean only."
                )
            mean, var = outputs
            self._check_tensor(method, mean, "outputs[0] (mean)")
            self._check_tensor(method, var, "outputs[1] (var)")
            if _shape(var) != _shape(mean):
                raise ValueError(
                    f"{self._where(method)}: predicted var has shape {_shape(var)} but the mean "
                    f"has {_shape(mean)}; they must match."
                )
            predicted = True
        else:
            if isinstance(outputs, tuple):
                raise TypeError(
                    f"{self._where(method)}: the loss holds a fixed var, so outputs must be the "
                    "mean tensor alone; build the loss with var=None for (mean, var) outputs."
                )
            mean, var, predicted = outputs, self.var, False
            self._check_tensor(method, mean)
            if _shape(var) == _shape(mean)[:-1] and _shape(var) != _shape(mean):
                var = var.unsqueeze(-1)
        if _shape(mean) != _shape(self.target):
            raise ValueError(
                f"{self._where(method)}: the mean has shape {_shape(mean)} but the target has "
                f"{_shape(self.target)}; they must match."
            )
        # Straight-through clamp: the value of max(var, eps), the derivative of var (torch's
        # gaussian_nll_loss clamps a clone in place under no_grad, with the same effect).
        s = var + (var.clamp(min=self.eps) - var).detach()
        return mean, s, predicted

    def _elementwise(self, method: str, outputs: Any) -> torch.Tensor:
        mean, s, _ = self._split(method, outputs)
        out = 0.5 * (torch.log(s) + (mean - self.target) ** 2 / s)
        return out + 0.5 * math.log(2 * math.pi) if self.full else out

    @override
    def __call__(self, outputs: Any) -> torch.Tensor:
        out = self._elementwise("__call__", outputs)
        return out.mean() if self.reduction == "mean" else out.sum()

    @override
    def scale(self, outputs: Any) -> float:
        mean = outputs[0] if isinstance(outputs, tuple) else outputs
        return 1.0 / max(mean.numel(), 1) if self.reduction == "mean" else 1.0

    @override
    def hvp(self, outputs: Any, u: Any) -> Any:
        mean, s, predicted = self._split("hvp", outputs)
        c = self.scale(outputs)
        if not predicted:
            return c * u / s
        um, us = u
        d = mean - self.target
        s2 = s * s
        hm = um / s - d * us / s2
        hs = -d * um / s2 + (d * d / (s2 * s) - 0.5 / s2) * us
        return (c * hm, c * hs)

    @override
    def per_sample(self, outputs: Any) -> torch.Tensor:
        return _rows(self._elementwise("per_sample", outputs))

    @override
    def noise_shape(self, outputs: Any) -> tuple[int, ...]:
        return _shape(self.target)

    @override
    def sample_from_uniform(self, outputs: Any, u: torch.Tensor) -> torch.Tensor:
        mean, s, _ = self._split("sample", outputs)
        return mean.detach() + torch.sqrt(s.detach()) * _std_normal(u)

    @override
    def predictive(self, targets: torch.Tensor) -> GaussianNLLLoss:
        return replace(self, target=targets)


# ---------------------------------------------------------------------------- binary (Bernoulli)


@dataclass(frozen=True, eq=False)
class BCEWithLogitsLoss(_ElementwiseLoss):
    r"""Binary cross-entropy on logits, as ``F.binary_cross_entropy_with_logits``.

    Element-wise :math:`\ell = \log(1 + e^f) - y f`; ``"mean"`` averages over every element.
    Hessian :math:`c\,\sigma(f)(1 - \sigma(f))` element-wise (independent of the target), PSD,
    and GGN = Fisher of the Bernoulli predictive distribution.

    Args:
        target: floating tensor in [0, 1] with the outputs' shape (``pos_weight`` and
            ``weight`` are not supported).
        reduction: ``"mean"`` (default) or ``"sum"``.

    Example:
        >>> import torch
        >>> from hessfunc.losses import BCEWithLogitsLoss
        >>> BCEWithLogitsLoss(torch.ones(3), reduction="sum").hvp(torch.zeros(3), torch.ones(3))
        tensor([0.2500, 0.2500, 0.2500])

    """

    @override
    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("__call__", outputs)
        return F.binary_cross_entropy_with_logits(outputs, self.target, reduction=self.reduction)

    @override
    def hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self._check("hvp", outputs)
        s = torch.sigmoid(outputs)
        return self.scale(outputs) * (s * (1 - s)) * u

    @override
    def per_sample(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("per_sample", outputs)
        return _rows(F.binary_cross_entropy_with_logits(outputs, self.target, reduction="none"))

    @override
    def sample_from_uniform(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (u < torch.sigmoid(outputs.detach())).to(outputs.dtype)

    @override
    def predictive(self, targets: torch.Tensor) -> BCEWithLogitsLoss:
        return replace(self, target=targets)


# the categorical losses live in their own module; they are part of this one's interface (and
# say so, for pickling, reprs and documentation tools)

CrossEntropyLoss.__module__ = NLLLoss.__module__ = __name__
