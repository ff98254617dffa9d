r"""The Laplace posterior of a pure model function: :func:`fit` and :class:`LaplacePosterior`.

Around fitted parameters :math:`\theta_*` (a minimiser of the regularised negative
log-likelihood), the Laplace approximation is the Gaussian

.. math:: p(\theta \mid \mathcal D) \approx \mathcal N\big(\theta_*, P^{-1}\big), \qquad
   P = \frac{1}{\sigma^2 T}\, H + P_0,

with :math:`H` the Gauss-Newton matrix of the negative log-likelihood **summed** over the
training set (whatever the reduction of the loss object: a ``"mean"`` loss's curvature is
divided by its reduction factor), :math:`P_0` a diagonal prior precision (one value, or one
per parameter leaf), :math:`T` a temperature and :math:`\sigma` the noise of a Gaussian
likelihood. For cross-entropy :math:`H` is the GGN (= Fisher) of :math:`\sum_i \ell_i`; for
:class:`hessfunc.losses.MSELoss`, whose squared error is :math:`\sum (f - y)^2` without the
:math:`\frac12`, :math:`H = \frac12 \mathrm{GGN}(\sum (f-y)^2) = J^\top J`, the curvature of
:math:`\mathcal N(f, \sigma^2)` times :math:`\sigma^2`. These are laplace-torch's conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from .._base import _checks, _tree
from ..losses import Loss
from . import _build, _problem, evidence, predictive

__all__ = ["LaplacePosterior", "fit"]

Structure = Literal["full", "kfac", "diag", "low_rank", "matrix_free"]
STRUCTURES = ("full", "kfac", "diag", "low_rank", "matrix_free")

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class LaplacePosterior:
    """A fitted Laplace approximation (immutable: every method returns new objects).

    Build it with :func:`fit`. ``theta`` is the posterior mean (the fitted subset, raveled),
    ``prior_precision`` the prior (a 0-d tensor, or one value per subset leaf in ``names``
    order), ``names`` the leaves the posterior covers.
    """

    problem: _problem.Problem
    structure: str
    curvature: Any
    prior: Tensor  # 0-d, or (L,) one per subset leaf
    prior_mean: Tensor  # (n,)
    sigma_noise: Tensor  # 0-d
    temperature: float
    loss: Tensor  # summed NLL (half the squared error for regression), without normaliser
    n_data: int
    n_elements: int

    @property
    def names(self) -> tuple[str, ...]:
        """Dotted names of the parameter leaves the posterior covers, in ravel order."""
        return self.problem.names

    @property
    def theta(self) -> Tensor:
        """The posterior mean over the covered leaves, raveled ``(n,)``."""
        return self.problem.theta

    @property
    def prior_precision(self) -> Tensor | dict[str, Tensor]:
        """The prior precision: a 0-d tensor, or a dict leaf name -> 0-d tensor."""
        if self.prior.dim() == 0:
            return self.prior
        return dict(zip(self.names, self.prior.unbind(), strict=True))

    @property
    def likelihood(self) -> str:
        """``"classification"``, ``"binary"`` or ``"regression"``."""
        return self.problem.likelihood

    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> evidence.LogEvidence:
        r"""The Laplace approximation to :math:`\log p(\mathcal D)` (see :mod:`.evidence`).

        No pass over the data: the curvature built by :func:`fit` is reused (one
        eigendecomposition for ``"full"`` with a scalar prior; per-leaf priors there cost one
        Cholesky factorisation; for ``"matrix_free"`` the fit's SLQ rules with a scalar prior,
        a new SLQ run, ``num_iters`` data passes, with a per-leaf one). Differentiable in
        ``prior_precision`` and ``sigma_noise`` when they are tensors. Never changes ``self``.

        Args:
            prior_precision: ``None`` (the posterior's own), a positive float or 0-d tensor, or
                a dict leaf name -> value (every covered leaf), or a ``(L,)`` tensor.
            sigma_noise: ``None`` or a positive value (regression only).

        Returns:
            :class:`LogEvidence` ``(estimate, std_error)``: 0-d tensors; ``std_error`` is 0
            except for ``"matrix_free"`` (the probes' standard error of the log-determinant
            term).

        Cost:
            ``"full"``: :math:`O(n)` (scalar prior) or :math:`O(n^3)` (per leaf); ``"kfac"``:
            the number of parameters; ``"low_rank"``: :math:`O(nk + k^3)`; ``"matrix_free"``:
            probes times Lanczos steps (scalar prior), or ``num_iters`` data passes of
            ``num_probes`` GGN products (per-leaf prior).

        Example:
            Bayesian linear regression, where the Laplace evidence is exact:

            >>> import math, torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> X = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
            >>> y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
            >>> w = torch.linalg.solve(X.T @ X + torch.eye(1, dtype=torch.float64), X.T @ y)
            >>> post = hessfunc.laplace.fit(lambda p, X, y: X @ p, lambda X, y: MSELoss(y),
            ...                             w, [(X, y)])
            >>> C = X @ X.T + torch.eye(2, dtype=torch.float64)  # marginal covariance of y
            >>> exact = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
            ...                                                C).log_prob(y[:, 0])
            >>> torch.allclose(post.log_marginal_likelihood().estimate, exact)
            True
        """
        where = "hessfunc.laplace.LaplacePosterior.log_marginal_likelihood()"
        delta = self.prior if prior_precision is None else self._prior(where, prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else self._sigma(where, sigma_noise)
        return evidence.log_marginal_likelihood(self, delta, sigma)

    def with_prior_precision(self, prior_precision: Any) -> LaplacePosterior:
        """The same posterior with another prior precision (no pass over the data).

        Args:
            prior_precision: a positive float or 0-d tensor, a dict leaf name -> value, or a
                ``(L,)`` tensor (one per covered leaf, in ``names`` order).

        Returns:
            A new :class:`LaplacePosterior`; ``self`` is unchanged.

        Cost:
            Free: the curvature is shared.
        """
        where = "hessfunc.laplace.LaplacePosterior.with_prior_precision()"
        return replace(self, prior=self._prior(where, prior_precision))

    def optimize_prior_precision(
        self,
        *,
        per_leaf: bool = False,
        init: Any = None,
        tol: float = 1e-8,
        max_iter: int = 100,
    ) -> LaplacePosterior:
        r"""The posterior at the prior precision that maximises the evidence.

        Newton's method on :math:`u = \log\delta` (gradient and Hessian by autograd through
        :meth:`log_marginal_likelihood`, with the curvature fixed), with steps capped at 2 in
        log space and halved until the evidence does not fall. It stops when a step changes the
        prior by a relative ``tol`` (default 1e-8): near the optimum Newton converges
        quadratically, so the returned prior is accurate to about ``tol`` (relative), far under
        1%. For ``"matrix_free"`` the objective is the SLQ estimate with its probes fixed; with
        ``per_leaf=True`` every evaluation reruns SLQ (``num_iters`` data passes) and the
        gradient and Hessian go through those Lanczos runs, which costs far more than a scalar
        search.

        Args:
            per_leaf: one prior precision per covered leaf (``"layerwise"`` in laplace-torch)
                instead of one for all.
            init: starting prior (default: the posterior's own).
            tol: stopping tolerance on the step in :math:`\log\delta`.
            max_iter: at most this many Newton steps (a ``RuntimeError`` beyond).

        Returns:
            A new :class:`LaplacePosterior` with the optimal prior; ``self`` is unchanged.

        Cost:
            Per step one evidence evaluation with its gradient and Hessian
            (:math:`L` backward passes through it for ``L`` leaves), plus a few evaluations
            in the line search; no pass over the data. Typically 5-15 steps.
        """
        where = "hessfunc.laplace.LaplacePosterior.optimize_prior_precision()"
        start = self.prior if init is None else self._prior(where, init)
        start = start.detach()
        if per_leaf and start.dim() == 0:
            start = start.expand(len(self.names)).clone()
        elif not per_leaf and start.dim() != 0:
            start = start.mean()

        def objective(u: Tensor) -> Tensor:
            return -evidence.log_marginal_likelihood(self, u.exp(), self.sigma_noise).estimate

        u, _ = evidence.newton_log_prior(
            objective, start.log(), tol=tol, max_iter=max_iter, where=where
        )
        return replace(self, prior=u.exp().detach())

    def predictive(self, *inputs: Any, **kwargs: Any) -> Any:
        """The linearised predictive at ``model_fn(params, *inputs)``; see :func:`.predictive`."""
        return predictive.predictive(self, *inputs, **kwargs)

    def sample(self, n: int, *, generator: torch.Generator) -> Any:
        """``n`` parameter draws from the posterior; see :func:`.predictive.sample`."""
        return predictive.sample(self, n, generator=generator)

    # -- argument checks ------------------------------------------------------------------------

    def _prior(self, where: str, value: Any) -> Tensor:
        return parse_prior(where, value, self.names, self.theta)

    def _sigma(self, where: str, value: Any) -> Tensor:
        return parse_sigma(where, value, self.likelihood, self.theta)


def _positive(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a positive number, got {value!r}.")
    if isinstance(value, (int, float)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{where}: {name} must be positive and finite, got {value!r}.")
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating tensor, got {value.dtype}.")
        if not torch.compiler.is_compiling() and value.requires_grad is False:
            if not bool((value > 0).all()):
                raise ValueError(f"{where}: {name} must be positive, got {value}.")
    else:
        raise TypeError(
            f"{where}: {name} must be a positive float or tensor, got {type(value).__name__}."
        )


def parse_prior(where: str, value: Any, names: tuple[str, ...], like: Tensor) -> Tensor:
    """A 0-d tensor, or ``(L,)`` in ``names`` order, from a float, tensor or dict."""
    kw = {"dtype": like.dtype, "device": like.device}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = [k for k in names if k not in value]
        if unknown or missing:
            raise ValueError(
                f"{where}: a per-leaf prior_precision must name every covered leaf once: "
                f"unknown {unknown}, missing {missing} (covered: {list(names)})."
            )
        for k in names:
            _positive(where, f"prior_precision[{k!r}]", value[k])
        return torch.stack([torch.as_tensor(value[k], **kw).reshape(()) for k in names])
    _positive(where, "prior_precision", value)
    t = torch.as_tensor(value, **kw) if not isinstance(value, torch.Tensor) else value
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == len(names)):
        return t.to(**kw)
    raise ValueError(
        f"{where}: prior_precision must be a number, a 0-d tensor, a dict leaf name -> "
        f"number or a ({len(names)},) tensor (one per covered leaf), got shape "
        f"{tuple(t.shape)}."
    )


def parse_sigma(where: str, value: Any, likelihood: str, like: Tensor) -> Tensor:
    _positive(where, "sigma_noise", value)
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() != 0:
        raise ValueError(f"{where}: sigma_noise must be a scalar, got shape {tuple(t.shape)}.")
    if likelihood != _problem.REGRESSION and not isinstance(value, torch.Tensor) and value != 1:
        raise ValueError(
            f"{where}: sigma_noise applies to regression (MSELoss) only; a {likelihood} "
            "likelihood has no noise scale. Leave sigma_noise=1."
        )
    return t


def _prior_mean(where: str, value: Any, problem: _problem.Problem) -> Tensor:
    theta = problem.theta
    if value is None:
        return torch.zeros_like(theta)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full_like(theta, float(value))
    leaves = _tree.tree_leaves(value)
    full = _tree.tree_leaves(problem.params)
    if len(leaves) != len(full) or any(
        not isinstance(a, torch.Tensor) or a.shape != b.shape
        for a, b in zip(leaves, full, strict=True)
    ):
        raise ValueError(
            f"{where}: prior_mean must be None, a number or a pytree like params (same leaves "
            "and shapes)."
        )
    return torch.cat([leaves[i].reshape(-1).to(theta.dtype) for i in problem.index])


def _options(where: str, structure: str, given: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _build.OPTIONS[structure]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown options {unknown} for structure={structure!r}; it accepts "
            f"{sorted(allowed) or 'none'}."
        )
    return {**allowed, **given}


def fit(
    model_fn: Callable[..., Tensor],
    loss_fn: Callable[..., Loss],
    params: Any,
    batches: Iterable[tuple],
    *,
    structure: Structure = "full",
    subset: Literal["last_layer"] | list[str] | None = None,
    prior_precision: float | Tensor | Mapping[str, float] = 1.0,
    prior_mean: Any = None,
    temperature: float = 1.0,
    sigma_noise: float = 1.0,
    reduce: Any = None,
    **options: Any,
) -> LaplacePosterior:
    r"""Fit a Laplace approximation at ``params`` over the training ``batches``.

    ``model_fn(params, *batch) -> outputs`` (samples on axis 0) and ``loss_fn(*batch) ->`` a
    :mod:`hessfunc.losses` object holding the targets: :class:`~hessfunc.losses.CrossEntropyLoss`
    (classification), :class:`~hessfunc.losses.BCEWithLogitsLoss` (binary) or
    :class:`~hessfunc.losses.MSELoss` (regression, Gaussian noise ``sigma_noise``). Either
    reduction: the likelihood is always the sum over the dataset. Batches are summed through
    :func:`hessfunc.data.sum_over`, so ragged batches are exact.

    Structures (keyword ``options`` in brackets, defaults after ``=``):

    * ``"full"`` [``max_bytes=None``, ``chunk_size=None``]: the dense GGN, :math:`\sum B^\top
      B` over batches with ``B`` the per-sample Jacobians times a square root of each sample's
      output Hessian (``C`` backward passes per sample, vectorised, ``chunk_size`` samples at a
      time; every sample runs through ``model_fn`` as a batch of one), and its
      eigendecomposition. Refused before allocating above ``max_bytes`` (default half the free
      memory).
    * ``"kfac"``: :func:`hessfunc.kfac` with ``separate_bias=True``, every weight and bias its own
      Kronecker block (laplace-torch's Kronecker posterior); leaves no layer covers keep the
      prior alone.
    * ``"diag"`` [``chunk_size=None``]: the exact GGN diagonal, from per-sample Jacobians
      (``chunk_size`` samples per vectorised pass).
    * ``"low_rank"`` [``rank=20``, ``num_iters=None``, ``generator`` (required)]: the top
      ``rank`` GGN eigenpairs by :func:`hessfunc.eigsh` plus the prior.
    * ``"matrix_free"`` [``num_probes=30``, ``num_iters=30``, ``generator`` (required),
      ``cg_maxiter=200``, ``cg_tol=1e-10``, ``sample_iters=30``]: GGN products only; the
      log-determinant by stochastic Lanczos quadrature (:func:`hessfunc.slq`, ``num_iters``
      steps per probe) with its standard error; predictive variances by CG, samples by
      Lanczos (``sample_iters`` steps), all on :math:`P = fH + P_0`. A scalar prior reuses the
      fit's Lanczos runs for every value; a per-leaf prior is not a shift of :math:`H`, so each
      new one reruns SLQ from the same probes (``num_iters`` data passes).

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs``.
        loss_fn: ``loss_fn(*batch) ->`` a loss object with the batch's targets.
        params: the fitted parameters, a pytree of floating tensors (not changed).
        batches: an iterable of batch tuples, e.g. ``[(X, y)]`` or a ``DataLoader``.
        structure: see above.
        subset: ``None`` (every leaf), ``"last_layer"`` (weight and bias of the last
            ``F.linear`` that ``model_fn`` runs) or a list of leaf names (as
            ``hessfunc.laplace`` prints them: ``"0.weight"``, ``"head.bias"``).
        prior_precision: :math:`\delta > 0`, one number, or a dict leaf name -> number.
        prior_mean: ``None`` (zero), a number or a pytree like ``params``.
        temperature: :math:`T > 0`, dividing the likelihood.
        sigma_noise: :math:`\sigma > 0` of the Gaussian likelihood (regression only).
        reduce: ``None``, or :class:`hessfunc.distributed.AllReduce` (any ``tree -> tree``
            sum over participants) when each process holds a shard of the batches: every
            data pass (loss, counts, curvature, products) is summed over processes once.
        **options: the structure's options, see above.

    Returns:
        A :class:`LaplacePosterior`.

    Cost:
        One pass over the data for the loss, plus: ``"full"`` per-sample Jacobians (``C``
        backward passes per sample), :math:`O(N C n^2)` for the products and an
        :math:`O(n^3)` eigendecomposition; ``"kfac"`` one K-FAC pass; ``"diag"``
        per-sample Jacobians (``C`` backward passes per sample); ``"low_rank"`` ``num_iters``
        data passes; ``"matrix_free"`` ``num_iters`` data passes of ``num_probes`` products.

    Example:
        >>> import torch, hessfunc
        >>> from hessfunc.losses import CrossEntropyLoss
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([0, 1])
        >>> model = lambda p, X, y: torch.nn.functional.linear(X, p["w"])
        >>> p = {"w": torch.zeros(2, 2, dtype=torch.float64)}
        >>> post = hessfunc.laplace.fit(model, lambda X, y: CrossEntropyLoss(y), p, [(X, y)])
        >>> post.names
        ('w',)
        >>> # at zero logits the GGN is diag(p) - p p^T per sample: eigenvalues 0 and 1/2 each
        >>> float(post.curvature.evals.sum())
        1.0
    """
    where = "hessfunc.laplace.fit(model_fn, loss_fn, params, batches)"
    if not callable(model_fn) or not callable(loss_fn):
        raise TypeError(
            f"{where}: model_fn(params, *batch) -> outputs and loss_fn(*batch) -> a "
            "hessfunc.losses object must both be callable."
        )
    _checks.check_params(where, params)
    if structure not in STRUCTURES:
        raise ValueError(
            f"{where}: unknown structure={structure!r}; expected one of {list(STRUCTURES)}."
        )
    opts = _options(where, structure, options)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{where}: temperature must be a positive float, got {temperature!r}.")
    _positive(where, "temperature", temperature)
    batches = _problem.check_batches(where, batches)
    if reduce is not None and not callable(reduce):
        raise TypeError(
            f"{where}: reduce must be None or a callable tree -> tree such as "
            f"hessfunc.distributed.AllReduce(), got {type(reduce).__name__}."
        )
    problem = _problem.build(where, model_fn, loss_fn, params, batches, subset, reduce)
    delta = parse_prior(where, prior_precision, problem.names, problem.theta)
    sigma = parse_sigma(where, sigma_noise, problem.likelihood, problem.theta)
    mean0 = _prior_mean(where, prior_mean, problem)
    loss, n_data, n_elements = _problem.data_terms(problem)
    curvature = _build.curvature(where, problem, structure, opts)
    return LaplacePosterior(
        problem, structure, curvature, delta, mean0, sigma, float(temperature), loss, n_data,
        n_elements,
    )  # fmt: skip
