"""hessfunc: exact and matrix-free curvature for PyTorch, as pure functions over pytrees."""

from . import losses as losses
from ._tree import ravel as ravel
from .check import CheckReport as CheckReport
from .check import check_grad as check_grad
from .check import check_hessian as check_hessian
from .check import check_hvp as check_hvp
from .check_compiled import check_compiled as check_compiled
from .ekfac import EKFAC as EKFAC
from .ekfac import ekfac as ekfac
from .fd import fd_grad as fd_grad
from .fd import fd_hessian_matrix as fd_hessian_matrix
from .fd import fd_hvp as fd_hvp
from .fd import fd_hvps as fd_hvps
from .fisher import fisher_vp as fisher_vp
from .fisher import per_sample_grads as per_sample_grads
from .ggn import ggn_matrix as ggn_matrix
from .ggn import ggn_vp as ggn_vp
from .ggn import ggn_vps as ggn_vps
from .hessian import hessian as hessian
from .hessian import hessian_matrix as hessian_matrix
from .hvp import hvp as hvp
from .hvp import hvps as hvps
from .kfac import KFAC as KFAC
from .kfac import kfac as kfac
from .module import from_module as from_module
from .solvers import CGResult as CGResult
from .solvers import NewtonCGResult as NewtonCGResult
from .solvers import cg as cg
from .solvers import newton_cg_step as newton_cg_step

__version__ = "0.1.0"

__all__ = [
    "CGResult",
    "CheckReport",
    "EKFAC",
    "KFAC",
    "NewtonCGResult",
    "cg",
    "check_compiled",
    "check_grad",
    "check_hessian",
    "check_hvp",
    "ekfac",
    "fd_grad",
    "fd_hessian_matrix",
    "fd_hvp",
    "fd_hvps",
    "fisher_vp",
    "from_module",
    "ggn_matrix",
    "ggn_vp",
    "ggn_vps",
    "hessian",
    "hessian_matrix",
    "hvp",
    "hvps",
    "kfac",
    "losses",
    "newton_cg_step",
    "per_sample_grads",
    "ravel",
]
