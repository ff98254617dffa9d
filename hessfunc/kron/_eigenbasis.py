"""The Kronecker-eigenbasis operator: :class:`EKFAC` and the :class:`Moments` it is built from.

Both :func:`hessfunc.kfac`'s ``KFAC.eigendecompose`` and :func:`hessfunc.ekfac` return an
``EKFAC``; it lives here so that neither of those modules imports the other. Import it from
:mod:`hessfunc.kron.ekfac` (or as ``hessfunc.EKFAC``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._base._types import PyTree
from . import _kron
from ._layers import Layout


class Moments(NamedTuple):
    """The part of an :class:`EKFAC` that is a sum over samples (for a fixed basis)."""

    sums: tuple[torch.Tensor, ...]
    """Per block the summed squared projections, ``(groups, out_features, size)``."""
    loss_terms: torch.Tensor | None
    """Loss terms a ``"mean"`` reduction divides by (0-d int64); ``None`` for ``"sum"``."""
    options: _kron.Options | None = None
    """The Fisher type and loss the moments were built with (no tensors); ``add`` compares it."""

    def add(self, other: Moments) -> Moments:
        """The moments of both batches (computed in the same basis): sums and counts added.

        Args:
            other: the ``moments`` of ``ekfac(..., basis=B)`` on other data, with the same
                basis ``B``.

        Returns:
            ``Moments`` of the union of the batches.

        Cost:
            One addition per block.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> B = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1)), {"w": w}, X)
            >>> loss = MSELoss(torch.zeros(1, 1))
            >>> parts = [
            ...     hessfunc.ekfac(model, loss, {"w": w}, X[i : i + 1], basis=B) for i in range(2)
            ... ]
            >>> E = parts[0]._replace(moments=parts[0].moments.add(parts[1].moments))
            >>> torch.allclose(E.dense(), B.dense())
            True
        """
        return _kron.add_results("hessfunc.ekfac.Moments.add(other)", self, other)


class EKFAC(NamedTuple):
    r"""An operator diagonal in a Kronecker eigenbasis, per block (see :func:`ekfac`).

    A pytree. To sum over batches with one basis, sum the ``moments`` of
    ``ekfac(..., basis=E)`` over the batches and put them in with ``E._replace(moments=...)``.
    """

    input_bases: tuple[torch.Tensor, ...]
    """Per block :math:`Q_A` (eigenvectors in columns), ``(groups, size, size)``."""
    grad_bases: tuple[torch.Tensor, ...]
    """Per block :math:`Q_G`, ``(groups, out_features, out_features)``."""
    moments: Moments
    """The eigenvalues as sums over samples, with the loss-term count that normalises them."""
    layout: Layout
    """Which leaves each block covers, and which leaves no block covers (no tensors)."""

    @property
    def eigenvalues(self) -> tuple[torch.Tensor, ...]:
        """Per block the eigenvalues :math:`m`, ``(groups, out_features, size)``."""
        return tuple(_kron.normalise_grads(s, self.moments.loss_terms) for s in self.moments.sums)

    covered = _kron.COVERED
    uncovered = _kron.UNCOVERED

    def __repr__(self) -> str:
        return self.layout.describe("EKFAC")

    def _apply(
        self, where: str, tree: PyTree, name: str, scale: Callable, rest: Callable
    ) -> PyTree:
        if self.input_bases:
            _kron.check_vector(where, self.layout, tree, name, self.input_bases[0].dtype)
        ev = self.eigenvalues

        def block(i: int, m: torch.Tensor) -> torch.Tensor:
            qa, qg = self.input_bases[i], self.grad_bases[i]
            return qg @ (scale(ev[i]) * (qg.mT @ m @ qa)) @ qa.mT

        return _kron.blockwise(where, self.layout, tree, name, block, rest)

    def matvec(self, v: PyTree) -> PyTree:
        r"""The product :math:`E v`, a pytree like ``v`` (zero on uncovered leaves).

        Args:
            v: a pytree like the ``params`` the operator was built for.

        Returns:
            A pytree like ``v``.

        Cost:
            Per block four small matrix products per group, :math:`O(o\,d\,(o + d))`.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> E = hessfunc.ekfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> E.matvec({"w": torch.ones(1, 2)})
            {'w': tensor([[2., 2.]])}
        """
        return self._apply("hessfunc.EKFAC.matvec(v)", v, "v", lambda e: e, torch.zeros_like)

    def solve(self, b: PyTree, damping: float | torch.Tensor) -> PyTree:
        r"""Solve :math:`(E + \lambda I)\, x = b` exactly, in the eigenbasis.

        :math:`x = Q (\operatorname{diag}(m) + \lambda)^{-1} Q^\top b`; uncovered leaves, where
        :math:`E` is zero, get :math:`b / \lambda`.

        Args:
            b: a pytree like ``params``.
            damping: :math:`\lambda \ge 0` (a float or a 0-d tensor); positive unless every
                eigenvalue is.

        Returns:
            A pytree like ``b``: :math:`x`.

        Cost:
            As :meth:`matvec`; no eigendecomposition (the basis is stored).

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> E = hessfunc.ekfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> E.solve({"w": torch.ones(1, 2)}, damping=2.0)
            {'w': tensor([[0.2500, 0.2500]])}
        """
        where = "hessfunc.EKFAC.solve(b, damping)"
        _kron.check_damping(where, damping)
        if self.input_bases:
            _kron.check_vector(where, self.layout, b, "b", self.input_bases[0].dtype)
        _kron.check_invertible(where, self.layout, damping, lambda: self.eigenvalues)
        return self._apply(where, b, "b", lambda e: 1.0 / (e + damping), lambda x: x / damping)

    def dense(self, *, max_bytes: int | None = None) -> torch.Tensor:
        """The ``(n, n)`` matrix in ``hessfunc.ravel`` order (zero on uncovered leaves).

        Args:
            max_bytes: refuse when the matrix needs more (default: half the available memory).

        Returns:
            An ``(n, n)`` symmetric tensor.

        Cost:
            :math:`O(n^2)` memory; per block and group one product of ``(od, od)`` matrices.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> E = hessfunc.ekfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> E.dense()
            tensor([[1., 0.],
                    [0., 1.]])
        """
        mats = []
        for qa, qg, ev in zip(self.input_bases, self.grad_bases, self.eigenvalues, strict=True):
            per_group = []
            for a, g, e in zip(qa, qg, ev, strict=True):
                q = torch.kron(g, a)
                per_group.append((q * e.reshape(-1)) @ q.T)
            mats.append(torch.stack(per_group))
        return _kron.dense("hessfunc.EKFAC.dense()", self.layout, mats, max_bytes)


Moments.__module__ = EKFAC.__module__ = "hessfunc.kron.ekfac"
