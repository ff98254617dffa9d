"""Exact dense Hessians: as a block pytree (``hessian``) and as a flat matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from .._base import _checks, _context, _memory, _progress, _tree
from .._base._types import Mode, PyTree
from .hvp import over_gradient

__all__ = ["hessian", "hessian_matrix"]


def _basis(start: int, stop: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of the ``n x n`` identity, without building the identity."""
    rows = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    rows.diagonal(start).fill_(1)
    return rows


def _dense(
    where: str,
    flat_f: Callable[[torch.Tensor], torch.Tensor],
    flat: torch.Tensor,
    mode: str,
    chunk_size: int | None,
    max_bytes: int | None,
) -> torch.Tensor:
    """The Hessian of ``flat_f`` at ``flat``, row ``i`` = ``H e_i``, in chunks of directions."""
    n = flat.numel()
    _memory.guard(where, n, flat.dtype, flat.device, chunk_size, max_bytes)

    def product(mode: str) -> torch.Tensor:
        def run(grad_flat: Callable) -> torch.Tensor:
            if mode == "fwd-rev":
                rows = vmap(lambda t: jvp(grad_flat, (flat,), (t,))[1])
            else:
                pullback = vjp(grad_flat, flat)[1]
                rows = vmap(lambda t: pullback(t)[0])
            return rows_over_basis(where, rows, flat, chunk_size)

        return over_gradient(where, flat_f, (), mode, run)

    return _context.evaluate(where, mode, product, hessian=True)


def rows_over_basis(
    where: str,
    batched: Callable[[torch.Tensor], torch.Tensor],
    flat: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """The ``(n, n)`` matrix whose row ``i`` is ``batched`` applied to :math:`e_i`.

    ``batched`` maps a ``(k, n)`` block of basis vectors to ``(k, n)`` products. Without chunks
    the basis is built whole; with chunks the result is preallocated and filled block by block,
    so only ``chunk_size`` basis rows exist at a time (what ``_memory.dense_bytes`` assumes),
    with a progress bar where one is wanted (``_progress``).
    """
    n = flat.numel()

    def block(start: int, stop: int) -> torch.Tensor:
        return _checks.check_batched(
            where, batched(_basis(start, stop, n, flat)), flat, stop - start
        )

    if chunk_size is None or chunk_size >= n:
        return block(0, n)
    out = torch.empty(n, n, dtype=flat.dtype, device=flat.device)
    starts = _progress.track(range(0, n, chunk_size), where=where, desc="dense chunks")
    for start in starts:
        stop = min(start + chunk_size, n)
        out[start:stop] = block(start, stop)
    return out


def _flat_objective(
    where: str, f: Callable[..., torch.Tensor], tree: PyTree, call: Callable[[PyTree], Any]
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    flat, unravel = _tree.ravel(tree)
    checked = _checks.scalar_fn(where, lambda t: call(t))
    return flat, lambda z: checked(unravel(z))


def hessian_matrix(
    f: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    mode: Mode = "fwd-rev",
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    r"""The dense Hessian of ``f`` with respect to ``params`` as an ``(n, n)`` matrix.

    Rows and columns follow :func:`hessfunc.ravel` order (dicts in insertion order, i.e. the
    order of ``named_parameters()``); ``n`` is the total number of parameter entries. Leaves of
    mixed floating dtypes are promoted to their common dtype.

    Args:
        f: ``f(params, *args) -> scalar tensor``.
        params: a pytree of floating tensors.
        *args: passed to ``f`` as is, never differentiated.
        mode: ``"fwd-rev"`` (default) builds row ``i`` as a JVP of the gradient along
            :math:`e_i`; ``"rev-rev"`` as a VJP of the gradient (one shared forward/backward,
            then ``n`` batched double-backward passes).
        chunk_size: basis directions per vectorised pass (``None``: all ``n`` at once). Smaller
            chunks bound the working memory (activations scale with the chunk) at the price of
            more passes.
        max_bytes: refuse to build when the estimate (result, plus basis and products of one
            chunk) exceeds this. Default: half of the memory currently available on the
            parameters' device. The check happens before anything large is allocated and names
            the matrix-free alternatives.

    Returns:
        An ``(n, n)`` tensor :math:`H_{ij} = \partial^2 f / \partial\theta_i \partial\theta_j`.

    Cost:
        ``n`` Hessian-vector products, vectorised into ``ceil(n / chunk_size)`` passes of about
        2-3 gradient evaluations each (batched); memory :math:`O(n^2)` for the result plus
        ``chunk_size`` times the activations of one HVP.

    Example:
        Linear regression with mean squared error has Hessian :math:`2 X^\top X / N`:

        >>> import torch, hessfunc
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, dtype=torch.float64)
        >>> f = lambda w, X, y: ((X @ w - y) ** 2).mean()
        >>> H = hessfunc.hessian_matrix(f, torch.zeros(2, dtype=torch.float64), X, y)
        >>> torch.allclose(H, 2 * X.T @ X / 3)
        True
    """
    where = "hessfunc.hessian_matrix(f, params, *args)"
    _checks.check_mode(where, mode)
    _checks.check_chunk_size(where, chunk_size)
    _checks.check_params(where, params)
    flat, flat_f = _flat_objective(where, f, params, lambda p: f(p, *args))
    return _dense(where, flat_f, flat, mode, chunk_size, max_bytes)


def hessian(
    f: Callable[..., torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: Mode = "fwd-rev",
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> Callable[..., PyTree]:
    r"""Transform ``f`` into a function returning its Hessian as a block pytree.

    Like ``torch.func.hessian``: ``hessian(f, argnums)(*args)`` differentiates ``f(*args)`` (a
    scalar) twice with respect to ``args[argnums]``. ``argnums`` may pick parameters or inputs
    (for the Hessian of a network with respect to its input, e.g. a PINN's Laplacian as the
    trace), and each selected argument may be any pytree of floating tensors.

    Args:
        f: a function returning a scalar tensor.
        argnums: index, or tuple of indices, of the arguments to differentiate.
        mode: ``"fwd-rev"`` (default) or ``"rev-rev"``, as in :func:`hessian_matrix`.
        chunk_size: basis directions per vectorised pass; bounds peak memory.
        max_bytes: memory budget for the dense build, as in :func:`hessian_matrix`.

    Returns:
        A function of ``*args`` returning a tree of trees: for ``argnums=i``, with ``P`` the
        structure of ``args[i]``, an outer ``P`` whose leaf ``a`` is an inner ``P`` whose leaf
        ``b`` holds :math:`\partial^2 f / \partial a\, \partial b` with shape
        ``a.shape + b.shape``. For a tuple ``argnums`` the selected arguments form a tuple, so
        the result is a tuple of tuples (``torch.func.hessian``'s layout).

    Cost:
        As :func:`hessian_matrix` over the ``n`` entries of the selected arguments: ``n`` HVPs in
        ``ceil(n / chunk_size)`` vectorised passes; memory :math:`O(n^2)`.

    Example:
        The Laplacian of :math:`u(x) = \sum_i x_i^3` is :math:`\sum_i 6 x_i`:

        >>> import torch, hessfunc
        >>> u = lambda x: (x**3).sum()
        >>> x = torch.tensor([1.0, 2.0])
        >>> torch.trace(hessfunc.hessian(u)(x))
        tensor(18.)
    """
    where = "hessfunc.hessian(f, argnums)(*args)"
    _checks.check_mode(where, mode)
    _checks.check_chunk_size(where, chunk_size)
    if isinstance(argnums, bool) or not (
        isinstance(argnums, int)
        or (
            isinstance(argnums, tuple)
            and argnums
            and all(isinstance(a, int) and not isinstance(a, bool) for a in argnums)
        )
    ):
        raise TypeError(
            f"{where}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}."
        )

    def hess_fn(*args: Any) -> PyTree:
        nums = argnums if isinstance(argnums, tuple) else (argnums,)
        for a in nums:
            if not -len(args) <= a < len(args):
                raise IndexError(
                    f"{where}: argnums={argnums!r} is out of range for {len(args)} positional "
                    f"argument(s); use an index in [{-len(args)}, {len(args) - 1}]."
                )
        nums = tuple(a % len(args) for a in nums)
        if len(set(nums)) != len(nums):
            raise ValueError(f"{where}: argnums={argnums!r} names an argument twice.")
        primals = args[nums[0]] if isinstance(argnums, int) else tuple(args[a] for a in nums)
        _checks.check_params(where, primals, name=f"args[{argnums}]")

        def call(tree: PyTree) -> Any:
            full = list(args)
            for a, t in zip(nums, (tree,) if isinstance(argnums, int) else tree, strict=True):
                full[a] = t
            return f(*full)

        flat, flat_f = _flat_objective(where, f, primals, call)
        matrix = _dense(where, flat_f, flat, mode, chunk_size, max_bytes)
        return _tree.blocks_from_matrix(matrix, primals)

    return hess_fn
