r"""The Laplace evidence (log marginal likelihood) and the search for the prior precision.

With the posterior precision :math:`P = f H + P_0` at the fitted parameters
:math:`\theta_*`,

.. math:: \log p(\mathcal D) \approx \log p(\mathcal D \mid \theta_*) - \tfrac12 \big(
   \log\det P - \log\det P_0 + (\theta_* - \mu_0)^\top P_0 (\theta_* - \mu_0)\big),

the convention of laplace-torch (the :math:`\log p(\theta_*)` normaliser and the Gaussian
integral's :math:`(2\pi)^{n/2}` cancel against each other). :math:`\log p(\mathcal D \mid
\theta_*)` is :math:`-\frac1T \sum_i \ell_i` for classification and :math:`-\frac{1}{2\sigma^2
T} \sum (f - y)^2 - N_{\mathrm{out}} \log(\sigma\sqrt{2\pi})` for regression (``N_out`` the
number of output elements), :math:`f = 1/(\sigma^2 T)` (:math:`\sigma = 1` for
classification).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import _problem
from .structures import expand

if TYPE_CHECKING:
    from .posterior import LaplacePosterior

Tensor = torch.Tensor


class LogEvidence(NamedTuple):
    """The log marginal likelihood and its standard error (0 where it is exact)."""

    estimate: Tensor
    """0-d: the Laplace log marginal likelihood."""
    std_error: Tensor
    """0-d: the standard error over SLQ probes (``structure="matrix_free"``), else 0."""


def factor(post: LaplacePosterior, sigma: Tensor) -> Tensor:
    r""":math:`f = 1/(\sigma^2 T)`: what multiplies the summed curvature in the precision."""
    return 1.0 / (sigma * sigma * post.temperature)


def log_likelihood(post: LaplacePosterior, sigma: Tensor) -> Tensor:
    """The log-likelihood of the training data at the fitted parameters, normaliser included."""
    value = -factor(post, sigma) * post.loss
    if post.problem.likelihood == _problem.REGRESSION:
        value = value - _problem.gaussian_normaliser(post.n_elements, sigma)
    return value


def log_marginal_likelihood(post: LaplacePosterior, delta: Tensor, sigma: Tensor) -> LogEvidence:
    """The evidence for prior ``delta`` (0-d or per leaf) and noise ``sigma``; no data pass."""
    f = factor(post, sigma)
    logdet, err = post.curvature.logdet(f, delta)
    p = expand(delta, post.problem.sizes)
    logdet_prior = torch.log(p).sum()
    diff = post.problem.theta - post.prior_mean
    scatter = (p * diff * diff).sum()
    value = log_likelihood(post, sigma) - 0.5 * (logdet - logdet_prior + scatter)
    return LogEvidence(value, 0.5 * err)


def newton_log_prior(
    objective: Any, u0: Tensor, *, tol: float, max_iter: int, where: str
) -> tuple[Tensor, int]:
    r"""Minimise ``objective(u)`` over ``u = log(delta)`` by damped Newton steps.

    Gradient and Hessian by autograd (``u`` has one entry, or one per leaf). A step is the
    Newton step where the Hessian is positive definite, else a gradient step; every step is
    capped at 2 in log space (a factor :math:`e^2` in the prior) and halved until the objective
    does not rise. Stops when the step is below ``tol`` in log space, i.e. a relative change of
    the prior below ``tol``.
    """
    u = u0.detach().clone()
    for it in range(1, max_iter + 1):
        x = u.clone().requires_grad_(True)
        value = objective(x)
        (g,) = torch.autograd.grad(value, x, create_graph=True)
        flat = g.reshape(-1)
        rows = [torch.autograd.grad(flat[i], x, retain_graph=True)[0] for i in range(flat.numel())]
        H = torch.stack(rows).reshape(flat.numel(), flat.numel()).detach()
        g = flat.detach()
        value = value.detach()
        try:
            L = torch.linalg.cholesky(0.5 * (H + H.T))
            step = -torch.cholesky_solve(g.reshape(-1, 1), L).reshape(-1)
        except torch.linalg.LinAlgError:
            step = -g
        if not torch.isfinite(step).all():
            step = -g
        big = step.abs().max()
        if big > 2.0:
            step = step * (2.0 / big)
        t = 1.0
        while True:
            trial = u + t * step.reshape(u.shape)
            with torch.no_grad():
                new = objective(trial)
            if torch.isfinite(new) and new <= value + 1e-12 * value.abs():
                break
            t *= 0.5
            if t < 1e-8:
                return u, it
        u = trial
        if (t * step).abs().max() < tol:
            return u, it
    raise RuntimeError(
        f"{where}: the search did not converge in {max_iter} Newton steps; raise max_iter or "
        "check that the evidence has a maximum (a prior precision of 0 or infinity is best "
        "when the data carry no information about it)."
    )
