r"""The Levenberg-Marquardt damping rule of the K-FAC optimizer (Martens & Grosse 2015, §6.5).

After a step :math:`d` from :math:`\theta`, the reduction ratio

.. math:: \rho = \frac{h(\theta + d) - h(\theta)}{q_0(d)}

compares the objective's actual change with the change the *undamped* quadratic model
:math:`q_0` predicted. The damping :math:`\lambda` shrinks by :math:`\omega = 19/20` when the
model was trustworthy (:math:`\rho > 3/4`), grows by :math:`1/\omega` when it was not
(:math:`\rho < 1/4`, or no predicted decrease) and stays otherwise, within
:math:`[10^{-8}, 10^{8}]`. Pure tensor code: no data-dependent branch, so it compiles inside
a ``fullgraph=True`` step.
"""

from __future__ import annotations

import torch

__all__ = ["lm_damping", "reduction_ratio"]

OMEGA = 19.0 / 20.0
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e8


def reduction_ratio(h0: torch.Tensor, h1: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    r"""The ratio :math:`\rho = (h_1 - h_0) / q_0`; NaN unless the model predicted a decrease.

    Args:
        h0: the objective before the step (0-d).
        h1: the objective after it, on the same batch (0-d).
        predicted: the undamped model's change :math:`q_0(d)` (0-d).

    Returns:
        :math:`\rho` (0-d), NaN where ``predicted >= 0``.

    Example:
        >>> import torch
        >>> from hessfunc.optim._lm import reduction_ratio
        >>> reduction_ratio(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(-1.0)).item()
        0.5
    """
    safe = torch.where(predicted < 0, predicted, -torch.ones_like(predicted))
    return torch.where(predicted < 0, (h1 - h0) / safe, torch.full_like(h0, torch.nan))


def lm_damping(damping: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    r"""The Levenberg-Marquardt update of the damping for a reduction ratio ``rho``.

    Args:
        damping: the current :math:`\lambda` (0-d tensor).
        rho: the reduction ratio; NaN counts as a failed step.

    Returns:
        :math:`\omega\lambda` if :math:`\rho > 3/4`, :math:`\lambda/\omega` if :math:`\rho < 1/4`
        or NaN, else :math:`\lambda`; :math:`\omega = 19/20`, clamped to :math:`[10^{-8},
        10^8]`.

    Example:
        >>> import torch
        >>> from hessfunc.optim.kfac import lm_damping
        >>> lm_damping(torch.tensor(1.0), torch.tensor(0.9)).item()
        0.95
    """
    up = (rho < 0.25) | torch.isnan(rho)
    new = torch.where(rho > 0.75, damping * OMEGA, torch.where(up, damping / OMEGA, damping))
    return new.clamp(MIN_DAMPING, MAX_DAMPING)
