"""Linear algebra on matvecs: solvers (CG, LiSSA, low rank), Lanczos and eigenvalues,
trace and diagonal estimators, SLQ, per-block estimators and the SciPy view. Every
function takes ``matvec(v) -> A v`` over pytrees.

May import: ``hessfunc._base`` and ``torch.func.vmap``; no automatic differentiation
and no product module (the one exception: ``solvers.newton_cg_step``, a Newton step,
takes ``hvp`` by default).
"""
