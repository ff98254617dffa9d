"""The base of the loss objects: the interface every negative log-likelihood implements.

Part of :mod:`hessfunc.losses` (import ``Loss`` from there): the base class and the samplers the
regression and categorical losses share. Imports nothing of hessfunc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

Reduction = Literal["mean", "sum"]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


@dataclass(frozen=True, eq=False)
class Loss:
    """Base class: a negative log-likelihood with its targets, reduction ``"mean"`` or ``"sum"``.

    Subclasses implement ``__call__``, ``hvp``, ``per_sample``, ``scale``,
    ``sample_from_uniform`` and ``predictive``; ``sample`` and ``output_grads`` are shared.
    """

    def _where(self, method: str = "") -> str:
        name = type(self).__name__
        return f"hessfunc.losses.{name}(...){'.' + method if method else ''}"

    def _check_reduction(self, reduction: Any) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{self._where()}: reduction must be 'mean' or 'sum', got {reduction!r}. "
                "Per-sample losses are available as .per_sample(outputs)."
            )

    def _check_tensor(self, method: str, outputs: Any, name: str = "outputs") -> None:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"{self._where(method)}: {name} must be a tensor, got {type(outputs).__name__}."
            )
        if not outputs.is_floating_point():
            raise TypeError(
                f"{self._where(method)}: {name} must be floating-point, got {outputs.dtype}."
            )

    # -- shared --------------------------------------------------------------------------------

    def noise_shape(self, outputs: Any) -> tuple[int, ...]:
        """Shape of the uniform draws ``sample_from_uniform`` consumes for one sample."""
        return _shape(outputs)

    def sample(self, outputs: Any, generator: torch.Generator) -> torch.Tensor:
        r"""Draw targets from the model's predictive distribution :math:`p(y \mid f)`.

        Args:
            outputs: the model's outputs at which the distribution is evaluated.
            generator: the source of randomness (the global RNG is never used); draws happen on
                the generator's device and move to the outputs' device.

        Returns:
            Targets in the form this loss accepts (class indices for the classification losses).

        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"{self._where('sample')}: generator must be a torch.Generator, got "
                f"{type(generator).__name__}. Create one with torch.Generator().manual_seed(0)."
            )
        ref = outputs[0] if isinstance(outputs, tuple) else outputs
        self._check_tensor("sample", ref)
        u = torch.rand(
            self.noise_shape(outputs), generator=generator, dtype=ref.dtype, device=generator.device
        )
        return self.sample_from_uniform(outputs, u.to(ref.device))

    def output_grads(self, outputs: Any) -> Any:
        r"""Return per-sample output gradients: row ``i`` is :math:`\partial \ell_i / \partial f_i`.

        Computed by reverse mode through :meth:`per_sample` (its sum), so it is exact for every
        loss; the result is shaped like ``outputs``.
        """
        return torch.func.grad(lambda o: self.per_sample(o).sum())(outputs)

    # -- interface (each subclass implements these) ----------------------------------------------

    def __call__(self, outputs: Any) -> torch.Tensor:
        """Return the reduced loss, equal to the matching ``torch.nn.functional`` call."""
        raise NotImplementedError

    def hvp(self, outputs: Any, u: Any) -> Any:
        """Return the output-space Hessian of the reduced loss times ``u``, in closed form."""
        raise NotImplementedError

    def per_sample(self, outputs: Any) -> torch.Tensor:
        """Return the unreduced per-sample losses, shape ``(N,)``."""
        raise NotImplementedError

    def scale(self, outputs: Any) -> float | torch.Tensor:
        """Return ``c`` with ``loss(outputs) == c * per_sample(outputs).sum()``."""
        raise NotImplementedError

    def _row_mask(self, outputs: Any) -> torch.Tensor | None:
        """``(N,)`` with 0 for rows the loss ignores (``ignore_index``), or None if none can be."""
        return None

    def _mean_terms(self, outputs: Any) -> torch.Tensor:
        """The number of loss terms a ``"mean"`` reduction divides by, a 0-d int64 tensor."""
        ref = outputs[0] if isinstance(outputs, tuple) else outputs
        return torch.tensor(round(1.0 / self.scale(outputs)), dtype=torch.int64, device=ref.device)

    def sample_from_uniform(self, outputs: Any, u: torch.Tensor) -> torch.Tensor:
        """Turn uniform draws of shape ``noise_shape(outputs)`` into sampled targets."""
        raise NotImplementedError

    def predictive(self, targets: torch.Tensor) -> Loss:
        """Return the negative log-likelihood of the predictive distribution at ``targets``."""
        raise NotImplementedError


def _std_normal(u: torch.Tensor) -> torch.Tensor:
    """Map uniforms in [0, 1) to standard normal draws by the inverse CDF."""
    u = u.clamp(min=torch.finfo(u.dtype).tiny)
    return math.sqrt(2.0) * torch.erfinv(2 * u - 1)


def _gumbel_argmax(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draws (Gumbel-max) from unnormalised log-probabilities along the last axis."""
    u = u.clamp(min=torch.finfo(u.dtype).tiny)
    return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first (per-sample totals); 0-d counts as one sample."""
    return x.reshape(x.shape[0], -1).sum(1) if x.dim() > 0 else x.reshape(1)


Loss.__module__ = "hessfunc.losses"
