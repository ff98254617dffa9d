"""Categorical losses: softmax cross-entropy and NLL, with ``ignore_index`` for padded tokens.

Part of :mod:`hessfunc.losses` (import them from there); see that module for the interface.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import override

from ._base._loss import Loss, Reduction, _gumbel_argmax, _shape


def _check_logits(loss: Loss, method: str, outputs: Any, n_target: tuple[int, ...]) -> None:
    loss._check_tensor(method, outputs)
    if outputs.dim() != 2:
        raise ValueError(
            f"{loss._where(method)}: outputs must be (N, C) scores, got shape {_shape(outputs)}. "
            "Flatten extra axes into the batch first (outputs.movedim(1, -1).reshape(-1, C))."
        )
    if _shape(outputs)[: len(n_target)] != n_target:
        raise ValueError(
            f"{loss._where(method)}: outputs have shape {_shape(outputs)} but the targets have "
            f"{n_target}; the batch sizes (and for probability targets, classes) must match."
        )


def _check_indices(loss: Loss, target: Any) -> None:
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.dim() != 1:
        what = (
            f"{target.dtype} tensor of shape {_shape(target)}"
            if isinstance(target, torch.Tensor)
            else type(target).__name__
        )
        raise TypeError(
            f"{loss._where('__init__')}: target must be a 1-d int64 tensor of class indices "
            f"(N,); got a {what}."
        )


def _check_ignore_index(loss: Loss, ignore_index: Any) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"{loss._where('__init__')}: ignore_index must be an int (torch's default is -100), "
            f"got {ignore_index!r}."
        )


class _IgnoreIndex:
    """Masking of ignored class-index targets, shared by cross-entropy and NLL.

    Rows whose target equals ``ignore_index`` contribute nothing: zero loss, zero output
    curvature, no sampled target; a ``"mean"`` divides by the number of the other rows, as
    ``F.cross_entropy`` and ``F.nll_loss`` do. Sampled targets mark ignored rows with
    ``ignore_index`` when it cannot be a class (negative), else with ``-1``, and the
    predictive loss ignores that marker, so a sampled class equal to a non-negative
    ``ignore_index`` still counts.
    """

    target: torch.Tensor
    ignore_index: int
    reduction: str

    def _indexed(self) -> bool:
        return not self.target.is_floating_point()

    def _mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``(N,)``: 1 for rows that count, 0 for ignored rows (class-index targets only)."""
        return (self.target != self.ignore_index).to(dtype)

    def _marker(self) -> int:
        return self.ignore_index if self.ignore_index < 0 else -1

    def _mark_ignored(self, sampled: torch.Tensor) -> torch.Tensor:
        keep = self.target != self.ignore_index
        return torch.where(keep, sampled, torch.full_like(sampled, self._marker()))

    def _counted_scale(self, outputs: torch.Tensor) -> float | torch.Tensor:
        if self.reduction == "sum":
            return 1.0
        if not self._indexed():
            return 1.0 / max(outputs.shape[0], 1)
        # a tensor: the count depends on the targets' values; clamped so that a batch with
        # every row ignored scales by 1 (its loss is zero) where torch's mean gives 0/0
        return 1.0 / self._mask(outputs.dtype).sum().clamp(min=1.0)

    def _row_mask(self, outputs: Any) -> torch.Tensor | None:
        return self._mask(outputs.dtype) if self._indexed() else None

    def _count(self, outputs: torch.Tensor) -> torch.Tensor:
        if not self._indexed():
            return torch.tensor(outputs.shape[0], dtype=torch.int64, device=outputs.device)
        return (self.target != self.ignore_index).sum()


@dataclass(frozen=True, eq=False)
class CrossEntropyLoss(_IgnoreIndex, Loss):
    r"""Softmax cross-entropy on logits, as ``F.cross_entropy(outputs, target, ...)``.

    With :math:`q_i` the smoothed target distribution of sample ``i``
    (:math:`(1-\epsilon)\,\text{target} + \epsilon / C`), :math:`\ell_i = -\sum_k q_{ik}
    \log\operatorname{softmax}(f_i)_k` and ``"mean"`` divides by the batch size ``N``. The
    output-space Hessian is block-diagonal, :math:`c\, s_i (\operatorname{diag}(p_i) - p_i
    p_i^\top)` with :math:`p_i = \operatorname{softmax}(f_i)` and :math:`s_i = \sum_k q_{ik}`
    (1 for class indices), applied as :math:`s_i (p_i \odot u_i - p_i\, p_i^\top u_i)`. It is
    PSD; with :math:`s_i = 1` the GGN equals the Fisher of the categorical predictive
    distribution (sampled without label smoothing). Label smoothing changes the value and the
    gradient but not the Hessian: :math:`q_i` enters the loss linearly, through
    :math:`-q_i^\top \log\operatorname{softmax}(f_i)`, whose Hessian is
    :math:`(\sum_k q_{ik}) (\operatorname{diag}(p_i) - p_i p_i^\top)` and the smoothed
    :math:`q_i` still sums to one.

    Padded token batches: rows whose class index equals ``ignore_index`` (torch's default
    ``-100``) have :math:`s_i = 0`: no loss, no curvature, no sampled target, and ``"mean"``
    divides by the number of the other rows (:math:`c = 1/N_{\text{kept}}`), exactly as
    ``F.cross_entropy(..., ignore_index=...)``. Flatten a language model's ``(B, T, V)``
    logits and ``(B, T)`` labels to ``(B T, V)`` and ``(B T,)`` first.

    Args:
        target: int64 class indices ``(N,)`` or floating class probabilities ``(N, C)``.
            Class weights are not supported.
        label_smoothing: :math:`\epsilon \in [0, 1]`.
        reduction: ``"mean"`` (default) or ``"sum"``.
        ignore_index: class-index targets equal to it are ignored (default ``-100``, as torch;
            not used with probability targets).

    Example:
        >>> import torch
        >>> from hessfunc.losses import CrossEntropyLoss
        >>> loss = CrossEntropyLoss(torch.tensor([0]), reduction="sum")
        >>> loss.hvp(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))  # p = (1/2, 1/2)
        tensor([[ 0.2500, -0.2500]])

    """

    target: torch.Tensor
    label_smoothing: float = 0.0
    reduction: Reduction = "mean"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        self._check_reduction(self.reduction)
        _check_ignore_index(self, self.ignore_index)
        if isinstance(self.target, torch.Tensor) and self.target.is_floating_point():
            if self.target.dim() != 2:
                raise ValueError(
                    f"{self._where('__init__')}: probability targets must be (N, C), got shape "
                    f"{_shape(self.target)}."
                )
        else:
            _check_indices(self, self.target)
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls <= 1.0:
            raise ValueError(
                f"{self._where('__init__')}: label_smoothing must be a float in [0, 1], got {ls!r}."
            )

    def _check(self, method: str, outputs: Any) -> None:
        _check_logits(self, method, outputs, _shape(self.target))

    def _q(self, outputs: torch.Tensor) -> torch.Tensor:
        """Return the smoothed target distribution, ``(N, C)``."""
        n_classes = outputs.shape[-1]
        if self.target.is_floating_point():
            q = self.target.to(outputs.dtype)
        else:
            # not F.one_hot: it reads the indices' values (max) to validate them, which breaks
            # vmap over sampled labels and torch.compile(fullgraph=True)
            classes = torch.arange(n_classes, device=outputs.device)
            q = (self.target.unsqueeze(-1) == classes).to(outputs.dtype)
        eps = float(self.label_smoothing)
        if eps != 0.0:
            q = (1.0 - eps) * q + eps / n_classes
        if self._indexed():  # ignored rows carry no mass (smoothed or not, whatever the index)
            q = q * self._mask(outputs.dtype).unsqueeze(-1)
        return q

    @override
    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("__call__", outputs)
        return F.cross_entropy(
            outputs,
            self.target,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )

    @override
    def scale(self, outputs: torch.Tensor) -> float | torch.Tensor:
        return self._counted_scale(outputs)

    @override
    def _mean_terms(self, outputs: torch.Tensor) -> torch.Tensor:
        return self._count(outputs)

    def _row_weights(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(N, 1)``: :math:`s_i`, the total mass of each row's target distribution."""
        if self.target.is_floating_point():  # probability targets need not sum to one
            return self._q(outputs).sum(-1, keepdim=True)
        return self._mask(outputs.dtype).unsqueeze(-1)

    @override
    def hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self._check("hvp", outputs)
        p = torch.softmax(outputs, dim=-1)
        pu = p * u
        hu = self._row_weights(outputs) * (pu - p * pu.sum(-1, keepdim=True))
        return self.scale(outputs) * hu

    @override
    def per_sample(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("per_sample", outputs)
        return -(self._q(outputs) * torch.log_softmax(outputs, dim=-1)).sum(-1)

    @override
    def sample_from_uniform(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        drawn = _gumbel_argmax(outputs.detach(), u)
        return self._mark_ignored(drawn) if self._indexed() else drawn

    @override
    def predictive(self, targets: torch.Tensor) -> CrossEntropyLoss:
        return replace(self, target=targets, label_smoothing=0.0, ignore_index=self._marker())


@dataclass(frozen=True, eq=False)
class NLLLoss(_IgnoreIndex, Loss):
    r"""Negative log-likelihood on log-probabilities, as ``F.nll_loss(outputs, target)``.

    :math:`\ell_i = -f_{i, y_i}` with ``"mean"`` over the batch (over the rows not ignored: a
    target equal to ``ignore_index`` contributes nothing, as in torch). The loss is linear in the
    outputs, so its Hessian, and hence the GGN, is **zero**: the curvature lives in the model's
    ``log_softmax``. Put the ``log_softmax`` into the loss (:class:`CrossEntropyLoss` on logits)
    for a useful GGN. The Fisher of the predictive distribution :math:`y \sim
    \operatorname{Cat}(\exp f)` is :math:`J^\top \operatorname{diag}(p) J` here, not zero.

    Args:
        target: int64 class indices ``(N,)``.
        reduction: ``"mean"`` (default) or ``"sum"``.
        ignore_index: targets equal to it are ignored (default ``-100``, as torch).

    Example:
        >>> import torch
        >>> from hessfunc.losses import NLLLoss
        >>> logp = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> NLLLoss(torch.tensor([1]))(logp).exp()
        tensor(1.3333)

    """

    target: torch.Tensor
    reduction: Reduction = "mean"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        self._check_reduction(self.reduction)
        _check_ignore_index(self, self.ignore_index)
        _check_indices(self, self.target)

    def _check(self, method: str, outputs: Any) -> None:
        _check_logits(self, method, outputs, _shape(self.target))

    @override
    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("__call__", outputs)
        return F.nll_loss(
            outputs, self.target, reduction=self.reduction, ignore_index=self.ignore_index
        )

    @override
    def scale(self, outputs: torch.Tensor) -> float | torch.Tensor:
        return self._counted_scale(outputs)

    @override
    def _mean_terms(self, outputs: torch.Tensor) -> torch.Tensor:
        return self._count(outputs)

    @override
    def hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        self._check("hvp", outputs)
        return torch.zeros_like(u)

    @override
    def per_sample(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check("per_sample", outputs)
        keep = self.target != self.ignore_index
        index = torch.where(keep, self.target, torch.zeros_like(self.target))
        picked = outputs.gather(1, index.unsqueeze(1)).squeeze(1)
        return -picked * keep.to(outputs.dtype)

    @override
    def sample_from_uniform(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self._mark_ignored(_gumbel_argmax(outputs.detach(), u))

    @override
    def predictive(self, targets: torch.Tensor) -> NLLLoss:
        return replace(self, target=targets, ignore_index=self._marker())
