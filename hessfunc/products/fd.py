r"""Finite differences as a vectorised oracle: gradients, Hessian-vector products, dense Hessians.

Every function here perturbs ``params`` along directions :math:`v` and combines evaluations with
a central stencil. Directions are batched with ``torch.func.vmap``: never a Python loop over
parameters.

Stencils (``order``):
    * ``order=2`` (central differences):
      :math:`D_h = [F(\theta + h v) - F(\theta - h v)] / 2h`.
    * ``order=4`` (Richardson extrapolation of :math:`D_h`, i.e. the five-point stencil):
      :math:`(4 D_h - D_{2h}) / 3 = [-F(\theta+2hv) + 8F(\theta+hv) - 8F(\theta-hv)
      + F(\theta-2hv)] / 12h`.

``F`` is ``f`` for :func:`fd_grad` and the exact gradient :math:`\nabla f` (reverse mode) for
:func:`fd_hvp`, :func:`fd_hvps` and :func:`fd_hessian_matrix`.

Error model and default step:
    With unit roundoff :math:`u` (``torch.finfo(dtype).eps``), the error of :math:`D_h` is a
    truncation term :math:`\tfrac{h^2}{6} |F'''|` plus a rounding term :math:`u |F| / h`
    (each evaluation of ``F`` carries a relative error of about :math:`u`, and the difference is
    divided by :math:`2h`). Balancing the two gives :math:`h^* \propto u^{1/3}` and a total error
    of order :math:`u^{2/3}` (about 1e-10 relative in float64, 1e-5 in float32). The order-4
    stencil has truncation :math:`\tfrac{h^4}{30}|F^{(5)}|` and the same kind of rounding term,
    so :math:`h^* \propto u^{1/5}` and the error is of order :math:`u^{4/5}`. The constants
    depend on the ratio of :math:`|F|` to its third (fifth) derivative, which we take to scale
    like :math:`\max(1, |\theta|)^3` (:math:`^5`).

    The default step along a direction :math:`v` is

    .. math:: h(v) = h_0 \max\bigl(1, s(v)\bigr) / \|v\|, \qquad
              s(v) = \|\theta \odot v\| / \|v\|,

    with :math:`h_0 = u^{1/3}` for ``order=2`` and :math:`u^{1/5}` for ``order=4`` (u of the
    least precise leaf dtype) and 2-norms over the whole pytree. :math:`s(v)` is the size of
    :math:`\theta` measured on the coordinates that :math:`v` moves: for a basis direction
    :math:`e_i` it is :math:`|\theta_i|`, so the perturbation is :math:`h_0 \max(1, |\theta_i|)`,
    the textbook per-coordinate rule. Dividing by :math:`\|v\|` makes the perturbation
    :math:`h v` independent of the length of :math:`v`. A zero direction gives an exact zero.
    The step is computed with tensor operations only (no ``.item()``), so it is traced by
    ``vmap`` and ``torch.compile``.

    An explicit ``step=`` (a positive float) always wins: the perturbation is then exactly
    :math:`\theta \pm \text{step}\cdot v` (and :math:`\pm 2\,\text{step}\cdot v` for order 4), with
    no scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import vmap

from .._base import _checks, _context, _memory, _tree
from .._base._types import PyTree
from .hessian import _flat_objective
from .hvp import _grad_fn

__all__ = ["default_step", "fd_grad", "fd_hessian_matrix", "fd_hvp", "fd_hvps"]

ORDERS = (2, 4)


# ----------------------------------------------------------------------------- validation


def _check_order(where: str, order: Any) -> None:
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(
            f"{where}: order must be 2 (central differences) or 4 (Richardson / five-point "
            f"stencil), got {order!r}."
        )


def _check_step(where: str, step: Any) -> None:
    if step is None:
        return
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(
            f"{where}: step must be None (the default rule) or a positive Python float, got "
            f"{type(step).__name__}. Pass a tensor step as float(step)."
        )
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"{where}: step must be a positive finite float, got {step!r}.")


def _least_precise(tree: PyTree) -> torch.dtype:
    # A plain loop: dynamo has no handler for max(..., key=...) over a generator.
    worst = None
    for leaf in _tree.tree_leaves(tree):
        if worst is None or torch.finfo(leaf.dtype).eps > torch.finfo(worst).eps:
            worst = leaf.dtype
    return worst


def default_step(dtype: torch.dtype, order: int = 2) -> float:
    r"""The base step :math:`h_0` of the default rule: :math:`u^{1/3}` or :math:`u^{1/5}`.

    Args:
        dtype: a floating dtype; :math:`u` is ``torch.finfo(dtype).eps``.
        order: 2 (central differences) or 4 (Richardson / five-point stencil).

    Returns:
        A Python float. The step actually used along a direction is scaled by the size of
        ``params`` and of the direction (see the module docstring).

    Cost:
        None (no tensor is touched).

    Example:
        >>> import torch
        >>> from hessfunc.products.fd import default_step
        >>> u = torch.finfo(torch.float32).eps
        >>> default_step(torch.float32) == u ** (1 / 3)
        True
        >>> default_step(torch.float32, 4) == u ** (1 / 5)
        True
        >>> round(default_step(torch.float64), 8)
        6.06e-06

    """
    _check_order("hessfunc.products.fd.default_step(dtype, order)", order)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            "hessfunc.products.fd.default_step(dtype, order): expected a floating dtype, "
            f"got {dtype!r}."
        )
    return torch.finfo(dtype).eps ** (1.0 / (order + 1))


# ----------------------------------------------------------------------------- core


def _sumsq(tree: PyTree, dtype: torch.dtype) -> torch.Tensor:
    terms = [torch.sum(x * x).to(dtype) for x in _tree.tree_leaves(tree)]
    return torch.stack(terms).sum()


def _step_along(params: PyTree, v: PyTree, step: float | None, order: int) -> torch.Tensor | float:
    """The step ``h`` for direction ``v`` (a 0-d tensor, or the explicit float)."""
    if step is not None:
        return step
    leaves = _tree.tree_leaves(params)
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    h0 = default_step(_least_precise(params), order)
    tiny = torch.finfo(dtype).tiny
    norm_v = torch.sqrt(_sumsq(v, dtype)).clamp_min(tiny)
    size = torch.sqrt(_sumsq(_tree.tree_map(torch.mul, params, v), dtype)) / norm_v
    return h0 * torch.clamp_min(size, 1.0) / norm_v


def _shift(params: PyTree, v: PyTree, h: torch.Tensor | float) -> PyTree:
    """``params + h * v`` leafwise, ``h`` cast to each leaf's dtype."""
    if isinstance(h, torch.Tensor):
        return _tree.tree_map(lambda p, t: p + h.to(p.dtype) * t, params, v)
    return _tree.tree_map(lambda p, t: p + h * t, params, v)


def _central(
    fn: Callable[[PyTree], PyTree], params: PyTree, v: PyTree, h: torch.Tensor | float, order: int
) -> PyTree:
    """Central (order 2) or Richardson (order 4) difference quotient of ``fn`` along ``v``."""

    def div(x: torch.Tensor, c: float) -> torch.Tensor:
        return x / ((c * h).to(x.dtype) if isinstance(h, torch.Tensor) else c * h)

    d1 = _tree.sub(fn(_shift(params, v, h)), fn(_shift(params, v, -h)))
    if order == 2:
        return _tree.tree_map(lambda a: div(a, 2.0), d1)
    d2 = _tree.sub(fn(_shift(params, v, 2 * h)), fn(_shift(params, v, -2 * h)))
    return _tree.tree_map(lambda a, b: div(8.0 * a - b, 12.0), d1, d2)


def _directional(
    fn: Callable[[PyTree], PyTree], params: PyTree, v: PyTree, step: float | None, order: int
) -> PyTree:
    return _central(fn, params, v, _step_along(params, v, step, order), order)


def _one_hot(i: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The basis vector ``e_i`` (built per index, so a chunk never holds the ``n x n`` basis)."""
    return (torch.arange(flat.numel(), device=flat.device) == i).to(flat.dtype)


# ----------------------------------------------------------------------------- public


def fd_grad(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    step: float | None = None,
    order: int = 2,
    directions: PyTree | None = None,
    chunk_size: int | None = None,
) -> PyTree | torch.Tensor:
    r"""Gradient or directional derivatives of ``f`` by finite differences of ``f`` itself.

    :math:`\partial_v f(\theta) \approx [f(\theta + hv) - f(\theta - hv)] / 2h` (``order=2``) or
    its Richardson extrapolation (``order=4``); see the module docstring for the error model
    and the step rule. All directions are evaluated in one ``vmap`` (in chunks).

    Args:
        f: ``f(params, *args) -> scalar tensor``. Only evaluated, never differentiated.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is.
        step: ``None`` for the default rule, or the exact step (a positive float).
        order: 2 (central differences) or 4 (Richardson / five-point stencil).
        directions: ``None`` for the full gradient (all ``n`` basis directions :math:`e_i` of the
            raveled parameters); or a pytree like ``params`` with one extra leading axis of
            size ``k`` (``k`` directions).
        chunk_size: directions per vectorised pass (``None``: all at once); bounds memory.

    Returns:
        With ``directions=None``: a pytree like ``params``, the gradient. Otherwise a tensor of
        shape ``(k,)``: entry ``j`` is :math:`\langle \nabla f, v_j \rangle`.

    Cost:
        ``order`` evaluations of ``f`` per direction (``2n`` or ``4n`` for the full gradient),
        batched in ``ceil(k / chunk_size)`` vectorised passes; memory of ``chunk_size`` forward
        passes (no backward graph).

    Example:
        The gradient of :math:`\sum_i \theta_i^3` is :math:`3\theta^2`:

        >>> import torch
        >>> from hessfunc.products.fd import fd_grad
        >>> th = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> g = fd_grad(lambda t: (t**3).sum(), th)
        >>> torch.allclose(g, 3 * th**2, rtol=1e-9)
        True

    """
    where = "hessfunc.fd_grad(f, params, *args)"
    _check_order(where, order)
    _check_step(where, step)
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    if directions is not None:
        _checks.check_like(where, params, directions, "directions", batched=True)
        fn = _checks.scalar_fn(where, lambda p: f(p, *args))
        with _context.second_order_kernels():
            one = lambda t: _directional(fn, params, t, step, order)  # noqa: E731
            return vmap(one, chunk_size=chunk_size)(directions)
    flat, flat_f = _flat_objective(where, f, params, lambda p: f(p, *args))
    _, unravel = _tree.ravel(params)
    with _context.second_order_kernels():
        one = lambda i: _directional(flat_f, flat, _one_hot(i, flat), step, order)  # noqa: E731
        idx = torch.arange(flat.numel(), device=flat.device)
        return unravel(vmap(one, chunk_size=chunk_size)(idx))


def fd_hvp(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    v: PyTree,
    *args: Any,
    step: float | None = None,
    order: int = 2,
) -> PyTree:
    r"""Hessian-vector product by finite differences of exact gradients.

    :math:`Hv \approx [\nabla f(\theta + hv) - \nabla f(\theta - hv)] / 2h` (``order=2``) or its
    Richardson extrapolation (``order=4``), with :math:`\nabla f` computed exactly in reverse
    mode. Only first derivatives of ``f`` are needed, so this works where second-order AD does
    not (and checks it where it does). The step follows the default rule of the module
    docstring unless ``step`` is given. Works under ``vmap`` over ``v`` and under
    ``torch.compile(fullgraph=True)``.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        v: the direction, a pytree like ``params`` (structure, shapes, dtypes, device).
        *args: passed to ``f`` as is.
        step: ``None`` for the default rule, or the exact step (a positive float).
        order: 2 (central differences) or 4 (Richardson / five-point stencil).

    Returns:
        A pytree like ``params``: approximately :math:`Hv`.

    Cost:
        ``order`` gradient evaluations (2 or 4 forward + backward passes); memory of one
        gradient.

    Example:
        The Hessian of :math:`\theta^\top A \theta` is :math:`A + A^\top`:

        >>> import torch
        >>> from hessfunc.products.fd import fd_hvp
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
        >>> th = torch.ones(2, dtype=torch.float64)
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> Hv = fd_hvp(lambda t, A: t @ A @ t, th, v, A)
        >>> torch.allclose(Hv, (A + A.T) @ v, rtol=1e-8)
        True

    """
    where = "hessfunc.fd_hvp(f, params, v, *args)"
    _check_order(where, order)
    _check_step(where, step)
    _checks.check_params(where, params)
    _checks.check_like(where, params, v)
    grad_fn = _grad_fn(where, f, args)
    with _context.second_order_kernels():
        return _directional(grad_fn, params, v, step, order)


def fd_hvps(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    vs: PyTree,
    *args: Any,
    step: float | None = None,
    order: int = 2,
    chunk_size: int | None = None,
) -> PyTree:
    r"""Finite-difference Hessian-vector products for a batch of directions, vectorised.

    :func:`fd_hvp` mapped over the leading axis of ``vs`` with ``vmap``; each direction gets
    its own step from the default rule (unless ``step`` is given).

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        vs: a pytree like ``params`` whose every leaf has one extra leading axis of size ``k``.
        *args: passed to ``f`` as is.
        step: ``None`` for the default rule, or the exact step (a positive float).
        order: 2 or 4, as in :func:`fd_hvp`.
        chunk_size: directions per vectorised pass (``None``: all ``k``); bounds memory.

    Returns:
        A pytree like ``vs``: entry ``[j]`` along the leading axis approximates :math:`H v_j`.

    Cost:
        ``order * k`` gradient evaluations batched into ``ceil(k / chunk_size)`` passes;
        memory of ``order * chunk_size`` gradients.

    Example:
        >>> import torch
        >>> from hessfunc.products.fd import fd_hvps
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> H = fd_hvps(lambda t: (t**2).sum(), torch.zeros(3, dtype=torch.float64), eye)
        >>> torch.allclose(H, 2 * torch.eye(3, dtype=torch.float64))
        True

    """
    where = "hessfunc.fd_hvps(f, params, vs, *args)"
    _check_order(where, order)
    _check_step(where, step)
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    _checks.check_like(where, params, vs, "vs", batched=True)
    grad_fn = _grad_fn(where, f, args)
    with _context.second_order_kernels():
        one = lambda t: _directional(grad_fn, params, t, step, order)  # noqa: E731
        return vmap(one, chunk_size=chunk_size)(vs)


def fd_hessian_matrix(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    step: float | None = None,
    order: int = 2,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    r"""The dense Hessian by finite differences of exact gradients, symmetrised.

    Column :math:`i` is :math:`[\nabla f(\theta + h_i e_i) - \nabla f(\theta - h_i e_i)] / 2h_i`
    (or its order-4 Richardson extrapolation) with
    :math:`h_i = h_0 \max(1, |\theta_i|)` by default; the matrix of columns is symmetrised as
    :math:`(H + H^\top)/2`, which halves the uncorrelated part of the finite-difference error.
    All ``n`` basis directions go through ``vmap`` in chunks of ``chunk_size``.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is.
        step: ``None`` for the default rule, or the exact step (a positive float).
        order: 2 (central differences) or 4 (Richardson / five-point stencil).
        chunk_size: basis directions per vectorised pass (``None``: all ``n`` at once).
        max_bytes: refuse to build above this estimate, exactly as
            :func:`hessfunc.hessian_matrix` (default: half the available memory).

    Returns:
        An ``(n, n)`` symmetric tensor in :func:`hessfunc.ravel` order (dicts in insertion
        order), in the common dtype of the leaves.

    Cost:
        ``order * n`` gradient evaluations (forward + backward each), batched into
        ``ceil(n / chunk_size)`` passes; memory :math:`O(n^2)` for the result plus
        ``order * chunk_size`` gradients and their activations.

    Example:
        Linear regression with mean squared error has Hessian :math:`2 X^\top X / N`:

        >>> import torch
        >>> from hessfunc.products.fd import fd_hessian_matrix
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        >>> f = lambda w, X: ((X @ w - 1.0) ** 2).mean()
        >>> H = fd_hessian_matrix(f, torch.zeros(2, dtype=torch.float64), X)
        >>> torch.allclose(H, 2 * X.T @ X / 3, rtol=1e-8)
        True

    """
    where = "hessfunc.fd_hessian_matrix(f, params, *args)"
    _check_order(where, order)
    _check_step(where, step)
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    flat, flat_f = _flat_objective(where, f, params, lambda p: f(p, *args))
    n = flat.numel()
    _memory.guard(where, n, flat.dtype, flat.device, chunk_size, max_bytes)
    grad_flat = _grad_fn(where, lambda z: flat_f(z), ())
    with _context.second_order_kernels():
        one = lambda i: _directional(grad_flat, flat, _one_hot(i, flat), step, order)  # noqa: E731
        columns = vmap(one, chunk_size=chunk_size)(torch.arange(n, device=flat.device))
    return (columns + columns.T) / 2
