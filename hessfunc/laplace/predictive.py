r"""The linearised (GLM) predictive of a Laplace posterior, and posterior samples.

Linearising the model around the posterior mean, :math:`f(x; \theta) \approx f(x; \theta_*) +
J(x) (\theta - \theta_*)`, turns the Gaussian posterior over parameters into a Gaussian over
outputs, :math:`\mathcal N(f(x; \theta_*), J(x) P^{-1} J(x)^\top)`, one ``C x C`` covariance per
input. For classification a link turns it into class probabilities:

- ``"probit"``: :math:`\operatorname{softmax}\big(\mu / \sqrt{1 + \frac\pi8
  \operatorname{diag}\Sigma}\big)` (MacKay's approximation; a sigmoid for binary outputs);
- ``"mc"``: the mean softmax over ``n_samples`` draws of the output Gaussian;
- ``"bridge"``: the Laplace bridge to a Dirichlet (Hobbhahn et al. 2022), laplace-torch's
  formula, multi-class only;
- ``"none"``: the output Gaussian itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .._base import _tree
from . import _covariance, _problem, evidence

if TYPE_CHECKING:
    from .posterior import LaplacePosterior

Tensor = torch.Tensor
LINKS = ("probit", "mc", "bridge", "none")


class GaussianPredictive(NamedTuple):
    """The linearised predictive over outputs: mean and covariance of the latent function."""

    mean: Tensor
    """``(m, *out)``: the outputs at the posterior mean."""
    variance: Tensor
    """``(m, C, C)``: :math:`J P^{-1} J^\\top` per input (``C`` outputs per sample). For the
    predictive of a regression target add ``sigma_noise**2`` to its diagonal."""


def output_gaussian(
    post: LaplacePosterior, inputs: tuple, chunk_size: int | None, *, jacobians: bool = False
) -> GaussianPredictive:
    """The output Gaussian at ``inputs``, ``chunk_size`` inputs at a time.

    The covariance comes from :mod:`._covariance`: without per-sample Jacobians for ``"kfac"``,
    ``"diag"`` and ``"low_rank"``, from Jacobian rows assembled from the layers for ``"full"``
    and ``"matrix_free"``. ``jacobians=True`` (or a model the layers cannot describe) takes
    the per-sample Jacobians ``(m, C, n)`` of every parameter instead and applies
    :math:`P^{-1}` to their rows: the reference the other routes are tested against.
    """
    problem = post.problem
    with torch.no_grad():
        mean = problem.model_flat(problem.theta, *inputs)
    f = evidence.factor(post, post.sigma_noise)
    m = mean.shape[0]
    step = m if chunk_size is None else chunk_size
    parts = []
    for start in range(0, m, step):  # bounds the work at step inputs
        chunk = tuple(x[start : start + step] for x in inputs)
        var = None if jacobians else _covariance.variance(post, chunk)
        if var is None:
            J = None if jacobians else _covariance.rows(problem, chunk)
            if J is None:
                J = problem.jacobians(chunk)  # (k, C, n)
            k, c, n = J.shape
            S = post.curvature.cov_rows(J.reshape(k * c, n), f, post.prior).reshape(k, c, n)
            var = torch.einsum("mcn,mkn->mck", J, S)
        parts.append(var.detach())
    return GaussianPredictive(mean, torch.cat(parts) if len(parts) > 1 else parts[0])


def _psd_root(cov: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
    return evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)


def predictive(
    post: LaplacePosterior,
    *inputs: Any,
    link: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Any:
    r"""The linearised predictive at ``model_fn(params, *inputs)``.

    Args:
        post: a fitted :class:`LaplacePosterior`.
        *inputs: ``model_fn``'s batch arguments, samples along axis 0 (write ``model_fn`` to
            accept what you pass, e.g. ``lambda p, X, *rest: net(p, X)``).
        link: for classification ``"probit"`` (default), ``"mc"``, ``"bridge"`` or ``"none"``;
            regression always returns the Gaussian.
        n_samples: draws for ``"mc"``.
        generator: a ``torch.Generator`` for ``"mc"``.
        chunk_size: inputs at a time (``None``: all): bounds what is formed per chunk (see
            Cost).

    Returns:
        Classification: ``(m, C)`` class probabilities (``(m,)`` probabilities of class 1 for
        binary); regression or ``link="none"``: a :class:`GaussianPredictive` ``(mean,
        variance)``.

    Cost:
        One forward pass and ``C`` backward passes (vectorised) per chunk give every covered
        layer's inputs :math:`a` and output gradients :math:`b_c` (the K-FAC recorder, see
        :func:`hessfunc.kfac`); leaves no layer covers (normalisation scales, bare parameters)
        take per-sample Jacobians of those leaves only. Then ``"kfac"``: per layer and sample
        :math:`\sum_i q_{ci} q_{c'i} \sum_j p_j^2 / (f\mu_i\lambda_j + \delta)` in the
        eigenbasis (:math:`O(\text{out} \cdot \text{in} + C^2 \text{out})`; a weight shared
        over positions forms its own ``C x out x in`` rows per sample); ``"diag"``: the same
        with the variances; ``"low_rank"``: that plus ``k`` jvps for :math:`JU`;
        ``"full"`` and ``"matrix_free"``: the rows :math:`J` (``chunk_size x C x n``) built
        from the layers, then :math:`P^{-1}` on them (one CG solve per row for
        ``"matrix_free"``).
    """
    where = "hessfunc.laplace.LaplacePosterior.predictive(*inputs)"
    if link not in LINKS:
        raise ValueError(f"{where}: unknown link={link!r}; expected one of {list(LINKS)}.")
    if not inputs:
        raise ValueError(f"{where}: pass the inputs model_fn needs, e.g. post.predictive(X).")
    kind = post.likelihood
    g = output_gaussian(post, inputs, chunk_size)
    if kind == _problem.REGRESSION or link == "none":
        return g
    mean, cov = g
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    if link == "probit":
        z = mean.reshape(var.shape) / torch.sqrt(1.0 + math.pi / 8.0 * var)
        return torch.sigmoid(z).reshape(mean.shape) if kind == _problem.BINARY else z.softmax(-1)
    if link == "mc":
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{where}: link='mc' needs generator=torch.Generator().manual_seed(0).")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"{where}: n_samples must be a positive int, got {n_samples!r}.")
        eps = torch.randn(
            (n_samples, *var.shape), generator=generator, dtype=var.dtype, device=generator.device
        ).to(var.device)
        draws = mean.reshape(var.shape) + torch.einsum("mck,smk->smc", _psd_root(cov), eps)
        if kind == _problem.BINARY:
            return torch.sigmoid(draws).mean(0).reshape(mean.shape)
        return draws.softmax(-1).mean(0)
    if kind == _problem.BINARY:
        raise ValueError(f"{where}: link='bridge' needs several classes; use 'probit' or 'mc'.")
    # Laplace bridge, after projecting the output Gaussian onto sum-zero logits
    mu, cov = mean.clone(), cov.clone()
    total = cov.sum((1, 2))
    mu = mu - cov.sum(-1) * mu.sum(-1, keepdim=True) / total.unsqueeze(-1)
    cov = cov - torch.einsum("bi,bj->bij", cov.sum(-1), cov.sum(-2)) / total.reshape(-1, 1, 1)
    k = mu.shape[-1]
    var = torch.diagonal(cov, dim1=1, dim2=2)
    sum_exp = torch.exp(-mu).sum(1, keepdim=True)
    alpha = (1 - 2 / k + mu.exp() / k**2 * sum_exp) / var
    return torch.nan_to_num(alpha / alpha.sum(1, keepdim=True), nan=1.0)


def sample(post: LaplacePosterior, n: int, *, generator: torch.Generator) -> Any:
    r"""``n`` draws :math:`\theta_* + S z`, :math:`S S^\top = P^{-1}`, as a pytree like params.

    Args:
        post: a fitted :class:`LaplacePosterior`.
        n: the number of draws.
        generator: a ``torch.Generator`` (the global RNG is never used).

    Returns:
        A pytree like ``params`` whose every leaf has a leading axis ``n``; leaves outside the
        posterior's subset are repeated at their fitted values. Feed it to
        ``torch.func.vmap(model_fn, in_dims=(0, None))``.

    Cost:
        One application of :math:`P^{-1/2}` per draw (a Lanczos run of ``sample_iters`` data
        passes for ``"matrix_free"``).
    """
    where = "hessfunc.laplace.LaplacePosterior.sample(n, generator=)"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n must be a positive int, got {n!r}.")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}."
        )
    problem = post.problem
    theta = problem.theta
    z = torch.randn((n, theta.numel()), generator=generator, dtype=theta.dtype,
                    device=generator.device).to(theta.device)  # fmt: skip
    f = evidence.factor(post, post.sigma_noise)
    rows = theta + post.curvature.sqrt_rows(z, f, post.prior)
    leaves, spec = _tree.tree_flatten(problem.params)
    out = [leaf.detach().unsqueeze(0).expand(n, *leaf.shape) for leaf in leaves]
    for i, part in zip(problem.index, torch.split(rows, list(problem.sizes), dim=1), strict=True):
        out[i] = part.reshape(n, *leaves[i].shape).to(leaves[i].dtype)
    return _tree.tree_unflatten(spec, out)
