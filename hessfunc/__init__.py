"""hessfunc: exact and matrix-free curvature for PyTorch, as pure functions over pytrees."""

from . import data as data
from . import distributed as distributed
from . import laplace as laplace
from . import losses as losses
from . import optim as optim
from ._base._tree import ravel as ravel
from .checking.check import CheckReport as CheckReport
from .checking.check import check_grad as check_grad
from .checking.check import check_hessian as check_hessian
from .checking.check import check_hvp as check_hvp
from .checking.check_compiled import check_compiled as check_compiled
from .influence.influence import influence as influence
from .kron.ekfac import EKFAC as EKFAC
from .kron.ekfac import ekfac as ekfac
from .kron.kfac import KFAC as KFAC
from .kron.kfac import kfac as kfac
from .linalg.blocks import block_trace as block_trace
from .linalg.blocks import blockwise as blockwise
from .linalg.estimators import DiagEstimate as DiagEstimate
from .linalg.estimators import TraceEstimate as TraceEstimate
from .linalg.estimators import batched_matvec as batched_matvec
from .linalg.estimators import hutchinson_diag as hutchinson_diag
from .linalg.estimators import hutchinson_trace as hutchinson_trace
from .linalg.estimators import hutchpp_trace as hutchpp_trace
from .linalg.estimators import random_probes as random_probes
from .linalg.estimators import xdiag as xdiag
from .linalg.estimators import xtrace as xtrace
from .linalg.inverse import LissaResult as LissaResult
from .linalg.inverse import LowRankInverse as LowRankInverse
from .linalg.inverse import lissa as lissa
from .linalg.inverse import low_rank_inverse as low_rank_inverse
from .linalg.lanczos import EigshResult as EigshResult
from .linalg.lanczos import LanczosResult as LanczosResult
from .linalg.lanczos import PowerIterationResult as PowerIterationResult
from .linalg.lanczos import eigsh as eigsh
from .linalg.lanczos import lanczos as lanczos
from .linalg.lanczos import power_iteration as power_iteration
from .linalg.linop import to_scipy as to_scipy
from .linalg.slq import SLQResult as SLQResult
from .linalg.slq import logdet as logdet
from .linalg.slq import slq as slq
from .linalg.slq import spectral_density as spectral_density
from .linalg.solvers import CGResult as CGResult
from .linalg.solvers import NewtonCGResult as NewtonCGResult
from .linalg.solvers import cg as cg
from .linalg.solvers import newton_cg_step as newton_cg_step
from .products.fd import fd_grad as fd_grad
from .products.fd import fd_hessian_matrix as fd_hessian_matrix
from .products.fd import fd_hvp as fd_hvp
from .products.fd import fd_hvps as fd_hvps
from .products.fisher import fisher_vp as fisher_vp
from .products.fisher import per_sample_grads as per_sample_grads
from .products.ggn import ggn_matrix as ggn_matrix
from .products.ggn import ggn_vp as ggn_vp
from .products.ggn import ggn_vps as ggn_vps
from .products.gnb import gnb_diag as gnb_diag
from .products.hessian import hessian as hessian
from .products.hessian import hessian_matrix as hessian_matrix
from .products.hvp import hessian_operator as hessian_operator
from .products.hvp import hvp as hvp
from .products.hvp import hvps as hvps
from .products.module import from_module as from_module

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
