"""scipy's ``LinearOperator`` over any matvec on pytrees.

This module works at the level of matvecs: it imports no product module, and scipy only when
:func:`to_scipy` is called (scipy is an optional extra: ``pip install "hessfunc[scipy]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._base import _checks, _tree
from .._base._types import PyTree

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = ["to_scipy"]


def _numpy_dtype(where: str, dtype: Any) -> Any:
    import numpy as np

    if isinstance(dtype, torch.dtype):
        try:
            return torch.empty((), dtype=dtype).numpy().dtype
        except TypeError:
            raise TypeError(
                f"{where}: numpy has no dtype for {dtype}; pass dtype=numpy.float32 (vectors are "
                "cast to the parameters' dtype for the product and back)."
            ) from None
    out = np.dtype(dtype)
    if out.kind != "f":
        raise TypeError(
            f"{where}: dtype must be a real floating dtype, got {out}; complex vectors are "
            "handled by splitting them into real and imaginary parts."
        )
    return out


def to_scipy(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    *,
    dtype: Any = None,
    matmat: Callable[[PyTree], PyTree] | None = None,
) -> LinearOperator:
    r"""A ``scipy.sparse.linalg.LinearOperator`` for a symmetric ``matvec`` on pytrees.

    The operator acts on flat vectors in :func:`hessfunc.ravel` order of ``like`` (dicts in
    insertion order): a vector is unraveled into a pytree like ``like``, ``matvec`` is applied,
    and the result is raveled back. Use it with ``scipy.sparse.linalg.eigsh``, ``lobpcg``,
    ``cg``, ``minres``. The operator is declared symmetric (``rmatvec`` is ``matvec``), as
    Hessian, Gauss-Newton and Fisher products are.

    No product runs when the operator is built: scipy would run one hidden matvec to find the
    dtype, which over a dataset is a whole pass, so the dtype is given (``dtype``) or taken from
    ``like``. Like any scipy operator it accepts vectors of shape ``(n,)`` and ``(n, 1)``;
    complex vectors are split into real and imaginary parts for a real operator.

    Args:
        matvec: ``v -> A v`` for ``v`` a pytree like ``like``, e.g.
            ``lambda v: hessfunc.hvp(f, params, v, X, y)`` or a
            :func:`hessfunc.data.linear_operator`.
        like: a pytree of tensors giving the structure, shapes, dtype and device of the
            vectors (usually ``params``).
        dtype: the operator's numpy dtype (default: that of ``like``'s raveled vector). With
            float32 parameters, ``dtype=numpy.float64`` runs scipy in float64 and the products
            in float32.
        matmat: ``vs -> A vs`` for ``k`` directions stacked along a leading axis (e.g. with
            ``hessfunc.hvps``), used for scipy's ``matmat``. Default: ``matvec.matmat`` if
            ``matvec`` has one (as a :class:`hessfunc.data.DatasetOperator` does: one data pass
            for all ``k``), else one ``matvec`` per column.

    Returns:
        A ``LinearOperator`` of shape ``(n, n)`` and the given dtype.

    Cost:
        Nothing at construction. One ``matvec`` per scipy matvec, plus a host copy of the
        vector each way; ``matmat`` with ``k`` columns: one batched product (or ``k``
        matvecs).

    Example:
        The largest eigenvalue of the Hessian of :math:`\theta^\top A \theta`, :math:`A + A^\top`:

        >>> import torch, hessfunc
        >>> from scipy.sparse.linalg import eigsh
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> th = torch.zeros(2, dtype=torch.float64)
        >>> op = hessfunc.to_scipy(lambda v: hessfunc.hvp(lambda t: t @ A @ t, th, v), th)
        >>> round(float(eigsh(op, k=1, which="LA")[0][0]), 6)
        4.0
    """
    where = "hessfunc.to_scipy(matvec, like)"
    if not callable(matvec):
        raise TypeError(f"{where}: matvec must be callable as matvec(v) -> pytree like v.")
    if matmat is None:
        matmat = getattr(matvec, "matmat", None)
    if matmat is not None and not callable(matmat):
        raise TypeError(f"{where}: matmat must be None or callable as matmat(vs) -> pytree.")
    try:
        flat, unravel = _tree.ravel(like)
    except TypeError as err:
        raise TypeError(f"{where}: like must be a pytree of tensors ({err})") from None
    n = flat.numel()
    if n == 0:
        raise ValueError(f"{where}: like has no entries; there is no vector space to act on.")
    # floating leaves on one device: an integer like would build an integer operator
    _checks.check_params(where, like, name="like")
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator
    except ImportError:
        raise ImportError(
            f"{where}: needs scipy, an optional dependency: pip install 'hessfunc[scipy]'."
        ) from None
    np_dtype = _numpy_dtype(where, flat.dtype if dtype is None else dtype)
    compute = flat.dtype
    device = flat.device
    unravel_rows = _tree.unravel_rows(like)

    def to_torch(x: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=compute)

    def to_numpy(t: torch.Tensor) -> Any:
        return t.detach().cpu().numpy().astype(np_dtype, copy=False)

    def checked(out: PyTree, what: str, k: int | None = None) -> PyTree:
        # matched to like by name, structure, shapes and dtypes (_checks.check_tree)
        size = _checks.check_tree(where, like, out, what, "like", batched=k is not None)
        if k is not None and size != k:
            raise ValueError(
                f"{where}: {what} must return one product per direction: {k} went in, the "
                f"leaves came back with a leading axis of {size}."
            )
        return out

    def real_matvec(x: Any) -> Any:
        out = checked(matvec(unravel(to_torch(x))), "matvec")
        return to_numpy(_tree.ravel(out)[0])

    def real_matmat(X: Any) -> Any:
        if matmat is None:
            return np.column_stack([real_matvec(X[:, j]) for j in range(X.shape[1])])
        outs = checked(matmat(unravel_rows(to_torch(X.T))), "matmat(vs)", X.shape[1])
        return to_numpy(_tree.ravel_rows(outs).T)

    def split_complex(real: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def apply(x: Any) -> Any:
            if np.iscomplexobj(x):
                return real(x.real) + 1j * real(x.imag)
            return real(x)

        return apply

    mv = split_complex(lambda x: real_matvec(np.asarray(x).reshape(-1)))
    mm = split_complex(real_matmat)
    # A real symmetric operator is its own adjoint, so rmatvec / rmatmat reuse the products.
    return LinearOperator((n, n), matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np_dtype)
