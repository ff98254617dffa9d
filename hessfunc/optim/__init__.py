"""Second-order optimizers as pure functions, for compiled training loops.

Every optimizer is an :class:`Optimizer` ``(init, step)``: ``init(params) -> state`` and
``step(params, state, *batch, generator=None, noise=None) -> (params, state, info)``; see
:mod:`hessfunc.optim._base` for the conventions and docs/guides/optimizers.md for a guide.
"""

from ._base import INFO_FIELDS as INFO_FIELDS
from ._base import Optimizer as Optimizer
from .adahessian import AdaHessianInfo as AdaHessianInfo
from .adahessian import adahessian as adahessian
from .hessian_free import HessianFreeInfo as HessianFreeInfo
from .hessian_free import hessian_free as hessian_free
from .kfac import KFACInfo as KFACInfo
from .kfac import kfac as kfac
from .module import ModuleOptimizer as ModuleOptimizer
from .sharpness import SharpnessInfo as SharpnessInfo
from .sharpness import sharpness as sharpness
from .sophia import SophiaInfo as SophiaInfo
from .sophia import sophia as sophia

__all__ = [
    "INFO_FIELDS",
    "AdaHessianInfo",
    "HessianFreeInfo",
    "KFACInfo",
    "ModuleOptimizer",
    "Optimizer",
    "SharpnessInfo",
    "SophiaInfo",
    "adahessian",
    "hessian_free",
    "kfac",
    "sharpness",
    "sophia",
]
