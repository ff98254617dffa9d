"""Checking tools: autodiff against finite differences (``check_grad``, ``check_hvp``,
``check_hessian``) and compiled against eager code (``check_compiled``).

May import: ``hessfunc._base`` and the products. Nothing built on top of them.
"""
