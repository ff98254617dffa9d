"""Curvature products by automatic differentiation: Hessian-vector products and dense
Hessians, Gauss-Newton and Fisher products, finite differences, and the functional
view of a module.

May import: ``hessfunc._base`` and ``hessfunc.losses``. Not the matvec algorithms
(``hessfunc.linalg``) nor anything built on products.
"""
