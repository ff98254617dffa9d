"""Laplace approximations of pure model functions: posterior, evidence, predictive.

:func:`fit` builds a :class:`LaplacePosterior` from ``model_fn(params, *batch)``, a loss object
per batch, the fitted parameters and the training batches; its methods give the log marginal
likelihood (:meth:`LaplacePosterior.log_marginal_likelihood`), the prior precision that
maximises it (:meth:`LaplacePosterior.optimize_prior_precision`), the linearised predictive
(:meth:`LaplacePosterior.predictive`) and posterior samples (:meth:`LaplacePosterior.sample`).
"""

from .evidence import LogEvidence as LogEvidence
from .posterior import LaplacePosterior as LaplacePosterior
from .posterior import fit as fit
from .predictive import GaussianPredictive as GaussianPredictive

__all__ = ["GaussianPredictive", "LaplacePosterior", "LogEvidence", "fit"]
