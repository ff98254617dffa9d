"""hessfunc: exact and matrix-free curvature for PyTorch, as pure functions over pytrees."""

from ._tree import ravel as ravel
from .hessian import hessian as hessian
from .hessian import hessian_matrix as hessian_matrix
from .hvp import hvp as hvp
from .hvp import hvps as hvps
from .module import from_module as from_module

__version__ = "0.1.0"

__all__ = [
    "from_module",
    "hessian",
    "hessian_matrix",
    "hvp",
    "hvps",
    "ravel",
]
