"""Matrix-free solvers over pytrees: conjugate gradients and a Newton-CG step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import grad_and_value

from .._base import _checks, _tree
from .._base._types import Mode, PyTree
from ..products.hvp import hvp

__all__ = ["CGResult", "NewtonCGResult", "cg", "newton_cg_step"]


class CGResult(NamedTuple):
    """Result of :func:`cg` (a pytree: passes through ``vmap`` and ``torch.compile``)."""

    x: PyTree
    """The approximate solution, a pytree like ``b``."""
    iterations: torch.Tensor
    """Number of iterations that updated ``x`` (0-d integer tensor)."""
    residual_norm: torch.Tensor
    """:math:`\\|b - (A + \\lambda I) x\\|` as tracked by the recurrence (0-d)."""
    negative_curvature: torch.Tensor
    """True if a search direction had :math:`p^\\top (A + \\lambda I) p \\le 0` (0-d bool)."""


def cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    maxiter: int,
    damping: float | torch.Tensor = 0.0,
    tol: float | None = None,
    x0: PyTree | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
) -> CGResult:
    r"""Solve :math:`(A + \lambda I)\, x = b` by conjugate gradients, matrix-free, over pytrees.

    ``A`` is given by ``matvec(v) -> A v`` (e.g. a Hessian- or Gauss-Newton-vector product) and
    should be symmetric; CG converges when :math:`A + \lambda I` is positive definite. Damping
    :math:`\lambda` (Tikhonov / Levenberg-Marquardt) is added inside, so ``matvec`` stays the
    bare curvature product. If a direction of non-positive curvature appears (an indefinite
    Hessian with too little damping), the iteration stops updating there and reports it, the
    safeguard Newton-CG methods use (Steihaug).

    With ``preconditioner`` (:math:`M \approx (A + \lambda I)^{-1}`, symmetric positive
    definite, e.g. ``lambda r: hessfunc.kfac(...).eigendecompose().solve(r, damping)``) the
    iteration is preconditioned CG: the same solution, in fewer iterations when :math:`M (A +
    \lambda I)` has fewer distinct or better-clustered eigenvalues. ``tol`` and
    ``residual_norm`` still refer to the plain residual :math:`\|b - (A + \lambda I) x\|`.

    Control flow never depends on tensor values, so with a fixed ``maxiter`` the whole solve
    compiles as one graph under ``torch.compile(fullgraph=True)``. With ``tol``, eager mode stops
    as soon as :math:`\|r\| \le \mathrm{tol}\, \|b\|` (one host sync per iteration); compiled
    code, and code under a ``torch.func`` transform such as ``vmap`` (one solve per right-hand
    side of a batch), runs all ``maxiter`` iterations but freezes ``x`` once converged (no sync,
    no graph break), so all return the same ``x``.

    Args:
        matvec: ``v -> A v`` for ``v`` shaped like ``b``.
        b: the right-hand side, a pytree of floating tensors.
        maxiter: the number of iterations (at most), a Python int.
        damping: :math:`\lambda \ge 0` added to the diagonal.
        tol: relative residual tolerance, or ``None`` to always run ``maxiter`` iterations.
        x0: initial guess (default zeros).
        preconditioner: ``r -> M r`` for ``r`` shaped like ``b``, or ``None``.

    Returns:
        A :class:`CGResult` ``(x, iterations, residual_norm, negative_curvature)``.

    Cost:
        One ``matvec`` per iteration (plus one for a non-zero ``x0``) and a few vector operations;
        memory of four pytrees like ``b`` (five with a preconditioner, applied once per
        iteration plus once at the start).

    Example:
        >>> import torch, hessfunc
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = hessfunc.cg(lambda v: A @ v, b, maxiter=2)
        >>> torch.allclose(res.x, torch.linalg.solve(A, b))
        True
    """
    where = "hessfunc.cg(matvec, b, maxiter=...)"
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"{where}: maxiter must be a non-negative int, got {maxiter!r}.")
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"{where}: tol must be None or a non-negative float, got {tol!r}.")
    if not callable(matvec):
        raise TypeError(
            f"{where}: matvec must be callable as matvec(v) -> A v, got {type(matvec).__name__}."
        )
    _checks.check_params(where, b, name="b")
    _checks.check_damping(where, damping)
    if x0 is not None:
        _checks.check_tree(where, b, x0, "x0", "b")
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(
            f"{where}: preconditioner must be None or callable as preconditioner(r) -> M r, got "
            f"{type(preconditioner).__name__}."
        )
    # the first product and the first preconditioned residual are matched to b by name (see
    # _checks.check_tree); later ones are not re-checked
    unchecked = {"matvec(v)": True, "preconditioner(r)": True}

    def checked(name: str, out: PyTree) -> PyTree:
        if unchecked[name]:
            _checks.check_tree(where, b, out, name, "b")
            unchecked[name] = False
        return out

    def op(v: PyTree) -> PyTree:
        return _tree.axpy(damping, v, checked("matvec(v)", matvec(v)))

    precondition = preconditioner
    if preconditioner is not None:

        def precondition(r: PyTree) -> PyTree:
            return checked("preconditioner(r)", preconditioner(r))

    if x0 is None:
        x = _tree.zeros_like(b)
        r = b
    else:
        x = x0
        r = _tree.sub(b, op(x0))
    # z = M r; without a preconditioner z is r and r.z is r.r, so the iterates are plain CG's
    z = r if preconditioner is None else precondition(r)
    p = z
    rs = _tree.vdot(r, r)
    rz = rs if preconditioner is None else _tree.vdot(r, z)
    leaf = _tree.tree_leaves(b)[0]
    threshold = None if tol is None else (tol * tol) * _tree.vdot(b, b)
    active = torch.ones((), dtype=torch.bool, device=leaf.device)
    negative = torch.zeros((), dtype=torch.bool, device=leaf.device)
    iterations = torch.zeros((), dtype=torch.int64, device=leaf.device)
    # Stopping early reads a tensor on the host: not while compiling (a graph break), nor under
    # a torch.func transform (vmap refuses it). Both run the fixed loop with x frozen instead.
    eager_stop = (
        tol is not None
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
    )
    for _ in range(maxiter):
        if threshold is not None:
            active = active & (rs > threshold)
            if eager_stop and not bool(active):
                break
        Ap = op(p)
        pAp = _tree.vdot(p, Ap)
        curved = pAp > 0
        negative = negative | (active & ~curved)
        active = active & curved
        alpha = torch.where(
            active, rz / torch.where(curved, pAp, torch.ones_like(pAp)), torch.zeros_like(rz)
        )
        x = _tree.axpy(alpha, p, x)
        r = _tree.axpy(-alpha, Ap, r)
        rs_new = _tree.vdot(r, r)
        if preconditioner is None:
            z, rz_new = r, rs_new
        else:
            z = precondition(r)
            rz_new = _tree.vdot(r, z)
        beta = torch.where(
            active & (rz > 0),
            rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)),
            torch.zeros_like(rz),
        )
        p = _tree.axpy(beta, p, z)
        rs = torch.where(active, rs_new, rs)
        rz = torch.where(active, rz_new, rz)
        iterations = iterations + active.to(iterations.dtype)
        if eager_stop and not bool(active):
            break
    return CGResult(x, iterations, torch.sqrt(rs), negative)


class NewtonCGResult(NamedTuple):
    """Result of :func:`newton_cg_step`."""

    params: PyTree
    """The updated parameters :math:`\\theta + \\eta\\, \\Delta`."""
    value: torch.Tensor
    """:math:`f(\\theta)` before the step."""
    grad: PyTree
    """:math:`\\nabla f(\\theta)` before the step."""
    cg: CGResult
    """The inner solve of :math:`(C + \\lambda I) \\Delta = -\\nabla f`."""


def newton_cg_step(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    curvature: str | Callable[[PyTree, PyTree], PyTree] = "hessian",
    damping: float | torch.Tensor = 1e-3,
    maxiter: int = 10,
    tol: float | None = None,
    lr: float | torch.Tensor = 1.0,
    mode: Mode = "fwd-rev",
) -> NewtonCGResult:
    r"""One damped Newton-CG (Hessian-free) step: :math:`\theta \leftarrow \theta + \eta\,\Delta`.

    :math:`\Delta` approximately solves :math:`(C + \lambda I)\,\Delta = -\nabla f(\theta)` by
    :func:`cg`, with :math:`C` the Hessian (``curvature="hessian"``, products by
    :func:`hessfunc.hvp`) or any curvature product you pass as ``curvature(params, v) -> C v``,
    typically the Gauss-Newton matrix, positive semi-definite and so safer for CG::

        curvature=lambda p, v: hessfunc.ggn_vp(model_fn, loss, p, v, x)

    The step is pure (``params`` is not changed; new tensors are returned) and, with ``tol=None``,
    free of data-dependent control flow: wrap it in ``torch.compile(fullgraph=True)`` and call
    it in a training loop; new batches of the same shapes reuse the compiled graph.

    Args:
        f: ``f(params, *args) -> scalar``: the objective whose gradient drives the step.
        params: a pytree of floating tensors.
        *args: passed to ``f`` (and not to a custom ``curvature``, which closes over its data).
        curvature: ``"hessian"`` or a callable ``(params, v) -> C v``.
        damping: :math:`\lambda`, Tikhonov damping added to the curvature.
        maxiter: CG iterations (the curvature products per step).
        tol: relative CG tolerance (eager early stop), or ``None``.
        lr: step length :math:`\eta` (1 is the full Newton step).
        mode: AD mode for ``curvature="hessian"`` (see :func:`hessfunc.hvp`).

    Returns:
        A :class:`NewtonCGResult` ``(params, value, grad, cg)``.

    Cost:
        One gradient plus ``maxiter`` curvature products (each ~2-3 gradients for HVPs, ~2 for
        GGN products); memory of a gradient plus four parameter-sized pytrees.

    Example:
        On a quadratic, one undamped step with enough iterations lands on the minimiser:

        >>> import torch, hessfunc
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> f = lambda x: 0.5 * x @ A @ x - b @ x
        >>> x0 = torch.zeros(2, dtype=torch.float64)
        >>> out = hessfunc.newton_cg_step(f, x0, damping=0.0, maxiter=2)
        >>> torch.allclose(out.params, torch.linalg.solve(A, b))
        True
    """
    where = "hessfunc.newton_cg_step(f, params, *args)"
    _checks.check_params(where, params)
    _checks.check_mode(where, mode)
    if curvature == "hessian":

        def matvec(v: PyTree) -> PyTree:
            return hvp(f, params, v, *args, mode=mode)

    elif callable(curvature):

        def matvec(v: PyTree) -> PyTree:
            return curvature(params, v)

    else:
        raise ValueError(
            f"{where}: curvature must be 'hessian' or a callable (params, v) -> C v, got "
            f"{curvature!r}; for Gauss-Newton pass "
            "lambda p, v: hessfunc.ggn_vp(model_fn, loss, p, v, x)."
        )
    g, value = grad_and_value(_checks.scalar_fn(where, f))(params, *args)
    sol = cg(matvec, _tree.scale(-1.0, g), maxiter=maxiter, damping=damping, tol=tol)
    new = _tree.axpy(lr, sol.x, params)
    return NewtonCGResult(new, value, g, sol)
