"""hessfunc: exact and matrix-free curvature for PyTorch, as pure functions over pytrees."""

from . import data as data
from . import distributed as distributed
from . import laplace as laplace
from . import losses as losses
from . import optim as optim
from ._tree import ravel as ravel
from .blocks import block_trace as block_trace
from .blocks import blockwise as blockwise
from .check import CheckReport as CheckReport
from .check import check_grad as check_grad
from .check import check_hessian as check_hessian
from .check import check_hvp as check_hvp
from .check_compiled import check_compiled as check_compiled
from .ekfac import EKFAC as EKFAC
from .ekfac import ekfac as ekfac
from .estimators import DiagEstimate as DiagEstimate
from .estimators import TraceEstimate as TraceEstimate
from .estimators import batched_matvec as batched_matvec
from .estimators import hutchinson_diag as hutchinson_diag
from .estimators import hutchinson_trace as hutchinson_trace
from .estimators import hutchpp_trace as hutchpp_trace
from .estimators import random_probes as random_probes
from .estimators import xdiag as xdiag
from .estimators import xtrace as xtrace
from .fd import fd_grad as fd_grad
from .fd import fd_hessian_matrix as fd_hessian_matrix
from .fd import fd_hvp as fd_hvp
from .fd import fd_hvps as fd_hvps
from .fisher import fisher_vp as fisher_vp
from .fisher import per_sample_grads as per_sample_grads
from .ggn import ggn_matrix as ggn_matrix
from .ggn import ggn_vp as ggn_vp
from .ggn import ggn_vps as ggn_vps
from .gnb import gnb_diag as gnb_diag
from .hessian import hessian as hessian
from .hessian import hessian_matrix as hessian_matrix
from .hvp import hessian_operator as hessian_operator
from .hvp import hvp as hvp
from .hvp import hvps as hvps
from .influence import influence as influence
from .inverse import LissaResult as LissaResult
from .inverse import LowRankInverse as LowRankInverse
from .inverse import lissa as lissa
from .inverse import low_rank_inverse as low_rank_inverse
from .kfac import KFAC as KFAC
from .kfac import kfac as kfac
from .lanczos import EigshResult as EigshResult
from .lanczos import LanczosResult as LanczosResult
from .lanczos import PowerIterationResult as PowerIterationResult
from .lanczos import eigsh as eigsh
from .lanczos import lanczos as lanczos
from .lanczos import power_iteration as power_iteration
from .linop import to_scipy as to_scipy
from .module import from_module as from_module
from .slq import SLQResult as SLQResult
from .slq import logdet as logdet
from .slq import slq as slq
from .slq import spectral_density as spectral_density
from .solvers import CGResult as CGResult
from .solvers import NewtonCGResult as NewtonCGResult
from .solvers import cg as cg
from .solvers import newton_cg_step as newton_cg_step

__version__ = "0.1.0"

__all__ = [
    "CGResult",
    "CheckReport",
    "DiagEstimate",
    "EKFAC",
    "EigshResult",
    "KFAC",
    "LanczosResult",
    "LissaResult",
    "LowRankInverse",
    "NewtonCGResult",
    "PowerIterationResult",
    "SLQResult",
    "TraceEstimate",
    "batched_matvec",
    "block_trace",
    "blockwise",
    "cg",
    "check_compiled",
    "check_grad",
    "check_hessian",
    "check_hvp",
    "data",
    "distributed",
    "eigsh",
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
    "gnb_diag",
    "hessian",
    "hessian_matrix",
    "hessian_operator",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "hvps",
    "influence",
    "kfac",
    "lanczos",
    "laplace",
    "lissa",
    "logdet",
    "losses",
    "low_rank_inverse",
    "newton_cg_step",
    "optim",
    "per_sample_grads",
    "power_iteration",
    "random_probes",
    "ravel",
    "slq",
    "spectral_density",
    "to_scipy",
    "xdiag",
    "xtrace",
]
