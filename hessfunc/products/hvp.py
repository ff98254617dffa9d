"""Exact Hessian-vector products, matrix-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

from .._base import _checks, _context, _operator, _tree
from .._base._types import Mode, PyTree

__all__ = ["hessian_operator", "hvp", "hvps"]

T = TypeVar("T")


def _grad_fn(
    where: str, f: Callable[..., torch.Tensor], args: tuple[Any, ...], how: str = "grad"
) -> Callable:
    """``p -> ∇f(p, *args)`` as a pytree like ``p``, by ``torch.func.grad`` or ``jacrev``."""
    checked = _checks.scalar_fn(where, f)
    g = jacrev(checked, argnums=0) if how == "jacrev" else grad(checked, argnums=0)
    return lambda p: g(p, *args)


def over_gradient(
    where: str,
    f: Callable[..., torch.Tensor],
    args: tuple[Any, ...],
    mode: str,
    run: Callable[[Callable], T],
) -> T:
    """``run(grad_fn)`` with the gradient path that suits a product in ``mode`` over it.

    Forward mode over ``grad`` raises "ZeroTensors are immutable" when ``f`` uses
    ``F.mse_loss`` (pytorch#123996) and lacks forward AD for ``huber_loss_backward``; over
    ``jacrev`` of the scalar both work, so ``"fwd-rev"`` starts there. That path runs the
    backward under ``vmap`` (over a basis of one), which a few ops refuse or get wrong
    (``max_unpool2d``: "querying is_contiguous inside of vmap"; ``masked_select`` with a
    broadcast mask), so eagerly a failure that is not a missing derivative runs the product
    again over ``grad``. Reverse mode over the gradient takes ``grad``: no ``vmap`` at all.
    """
    if mode != "fwd-rev":
        return run(_grad_fn(where, f, args, "grad"))
    try:
        return run(_grad_fn(where, f, args, "jacrev"))
    except (RuntimeError, NotImplementedError) as err:
        if torch.compiler.is_compiling() or _context.is_derivative_error(mode, err):
            raise
        try:
            return run(_grad_fn(where, f, args, "grad"))
        except (RuntimeError, NotImplementedError):
            raise err from None


def hvp(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    v: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
) -> PyTree:
    r"""Exact Hessian-vector product :math:`\nabla^2_\theta f(\theta, \ldots)\, v`.

    ``f(params, *args)`` must return a scalar; only ``params`` is differentiated, ``args`` are
    passed through unchanged.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors (the point :math:`\theta`).
        v: the direction, a pytree with the structure, shapes, dtypes and device of ``params``.
        *args: passed to ``f`` as is (data, targets, ...), never differentiated.
        mode: ``"fwd-rev"`` (default): forward-mode JVP of the reverse-mode gradient.
            ``"rev-rev"``: VJP of the gradient (double backward); same result, for ops with no
            forward-mode AD. If ``"fwd-rev"`` meets such an op, a ``NotImplementedError``
            names the op and tells you to pass ``mode="rev-rev"``; hessfunc does not switch
            modes silently.

    Returns:
        A pytree like ``params``: :math:`Hv`.

    Cost:
        ``"fwd-rev"``: one forward and one backward pass, each carrying a tangent, about 2-3
        gradient evaluations; memory of one gradient plus one set of tangents.
        ``"rev-rev"``: one forward, one backward kept for differentiation, one more backward;
        about 3-4 gradients and the memory of the backward graph.

    Example:
        The Hessian of :math:`\theta^\top A \theta` is :math:`A + A^\top`:

        >>> import torch, hessfunc
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
        >>> f = lambda th, A: th @ A @ th
        >>> th, v = torch.ones(2), torch.tensor([1.0, 0.0])
        >>> hessfunc.hvp(f, th, v, A)
        tensor([2., 2.])
    """
    where = "hessfunc.hvp(f, params, v, *args)"
    _checks.check_mode(where, mode)
    _checks.check_params(where, params)
    _checks.check_like(where, params, v)

    def product(mode: str) -> PyTree:
        if mode == "fwd-rev":
            run = lambda g: jvp(g, (params,), (v,))[1]  # noqa: E731
        else:
            run = lambda g: vjp(g, params)[1](v)[0]  # noqa: E731
        return over_gradient(where, f, args, mode, run)

    return _context.evaluate(where, mode, product, hessian=True)


def hvps(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    vs: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
    chunk_size: int | None = None,
) -> PyTree:
    r"""Hessian times a batch of directions, vectorised with ``vmap``.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        vs: directions: a pytree like ``params`` whose every leaf has one extra leading axis of
            a common size ``k``.
        *args: passed to ``f`` as is.
        mode: ``"fwd-rev"`` or ``"rev-rev"``, as in :func:`hvp`.
        chunk_size: directions processed at once (``None``: all ``k``); bounds peak memory.

    Returns:
        A pytree like ``vs``: leaf ``[i]`` along the leading axis is :math:`H v_i`.

    Cost:
        ``"fwd-rev"``: ``k`` HVPs batched into ``ceil(k / chunk_size)`` vectorised passes.
        ``"rev-rev"``: one forward and backward for the gradient graph, then ``k`` batched
        backward passes through it (the forward is shared across directions). Memory grows
        linearly with ``chunk_size``.

    Example:
        >>> import torch, hessfunc
        >>> f = lambda th: (th**2).sum()
        >>> hessfunc.hvps(f, torch.zeros(3), torch.eye(3))
        tensor([[2., 0., 0.],
                [0., 2., 0.],
                [0., 0., 2.]])
    """
    where = "hessfunc.hvps(f, params, vs, *args)"
    _checks.check_mode(where, mode)
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    _checks.check_like(where, params, vs, "vs", batched=True)

    def product(mode: str) -> PyTree:
        def run(g: Callable) -> PyTree:
            if mode == "fwd-rev":
                out = vmap(lambda t: jvp(g, (params,), (t,))[1], chunk_size=chunk_size)(vs)
            else:
                pullback = vjp(g, params)[1]
                out = vmap(lambda t: pullback(t)[0], chunk_size=chunk_size)(vs)
            return _checks.check_batched(where, out, params, _tree.batch_size(vs))

        return over_gradient(where, f, args, mode, run)

    return _context.evaluate(where, mode, product, hessian=True)


def hessian_operator(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    chunk_size: int | None = None,
) -> Callable[[PyTree], PyTree]:
    r"""The Hessian at ``params`` as a reusable product ``v -> H v``, one gradient graph kept.

    :func:`hvp` evaluates ``f`` forward and backward for every product. Iterative algorithms
    (Lanczos, ``eigsh``, ``cg``, SLQ) call the product tens to hundreds of times at the same
    point, so this builds the gradient once, keeps its backward graph, and differentiates it
    again for each vector (reverse-over-reverse, with hessfunc's kernel routing as in every
    other product). The result is a product on one vector or, through ``.matmat``, on a batch
    (every leaf with a leading axis), which the estimators call without their own ``vmap``.

    The graph is tied to the tensors it was built on: after an in-place change of
    ``params`` (an ``optimizer.step()`` on the module behind :func:`hessfunc.from_module`,
    whose parameters share storage) or of a tensor in ``args``, a product would mix the old
    point with the new one. Every product first compares the tensors' version counters with
    those recorded at build time and raises ``RuntimeError`` (rebuild the operator) if one
    moved. The comparison runs in eager code; under ``torch.compile`` it is skipped.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors (the point; fixed for the operator's life).
        *args: passed to ``f`` as is.
        chunk_size: directions per vectorised pass in ``.matmat`` (``None``: all at once).

    Returns:
        A callable ``v -> H v`` (``v`` a pytree like ``params``) with a ``.matmat(vs)`` for
        stacked directions; it plugs into :func:`hessfunc.cg`, :func:`hessfunc.eigsh`, the
        trace estimators and :func:`hessfunc.to_scipy`.

    Cost:
        Building: one forward and one backward pass kept for differentiation (about 1-2
        gradients). Each product: one backward pass through that graph (about 1-2 gradients,
        where :func:`hvp` costs 2-4). Memory: the backward graph stays alive as long as the
        operator, about the activations of one gradient.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> H = hessfunc.hessian_operator(lambda th: 0.5 * th @ A @ th, torch.zeros(2))
        >>> H(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
        >>> H.matmat(torch.eye(2))
        tensor([[2., 1.],
                [1., 3.]])
    """
    where = "hessfunc.hessian_operator(f, params, *args)"
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    grad_fn = _grad_fn(where, f, args)
    watched = _watch(params, args)
    pullback = _context.evaluate(where, "rev-rev", lambda m: vjp(grad_fn, params)[1], hessian=True)

    def matmat(vs: PyTree) -> PyTree:
        _check_unchanged(where, watched)
        _checks.check_tree(where, params, vs, "vs", batched=True)
        return _context.evaluate(
            where,
            "rev-rev",
            lambda m: _checks.check_batched(
                where,
                vmap(lambda t: pullback(t)[0], chunk_size=chunk_size)(vs),
                params,
                _tree.batch_size(vs),
            ),
            hessian=True,
        )

    return _operator.BatchedMatvec(matmat)


def _watch(params: PyTree, args: tuple[Any, ...]) -> list[tuple[str, torch.Tensor, int]]:
    """``(name, tensor, version)`` of every tensor a kept graph was built on.

    ``tensor._version`` counts in-place writes to a tensor's storage and is shared by its
    views and ``detach()``-ed aliases, so an ``optimizer.step()`` on the module behind
    :func:`hessfunc.from_module`'s parameters, or a ``batch.mul_(...)``, bumps it.
    """
    out = []
    for prefix, tree in (("params", params), ("args", args)):
        for path, leaf in zip(_tree.tree_paths(tree), _tree.tree_leaves(tree), strict=True):
            if isinstance(leaf, torch.Tensor):
                version = _version(leaf)
                if version is not None:
                    out.append((f"{prefix}{path}", leaf, version))
    return out


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # a tensor wrapped by a transform has none
        return None


def _check_unchanged(where: str, watched: list[tuple[str, torch.Tensor, int]]) -> None:
    """Refuse a product through a graph whose tensors were changed in place since it was built.

    The kept graph holds the old point's saved values for some operations and reads the
    changed tensors for others, so its products are neither the old Hessian's nor the new
    one's. Eager only: under torch.compile the versions are not guarded (build and use the
    operator within one compiled region, or rebuild it after every change).
    """
    if torch.compiler.is_compiling():
        return
    changed = [name for name, t, v in watched if _version(t) not in (None, v)]
    if changed:
        raise RuntimeError(
            f"{where}: {', '.join(changed[:5])}{' and others' if len(changed) > 5 else ''} "
            "changed in place since this operator was built (e.g. an optimizer.step() on the "
            "module behind from_module, or an in-place edit of the batch), so its kept graph "
            "mixes the old point with the new one. Rebuild it with "
            "hessfunc.hessian_operator(f, params, *args) after every change, or pass copies "
            "(.clone()) if the originals must change."
        )
