r"""Kronecker-factored approximate curvature (K-FAC) of a pure model function.

For a layer :math:`z = W a` (``F.linear``; a convolution is the same map on its input patches,
the unfold convention), the generalised Gauss-Newton block of :math:`W` is
:math:`\sum_i \sum_{p, p'} a_{ip} a_{ip'}^\top \otimes g_{ip}^{\phantom\top} g_{ip'}^\top`
summed over the columns of the output curvature, with :math:`g` the backpropagated
output-space columns. K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions)
replaces it by one Kronecker product,

.. math:: K = G \otimes A, \qquad A = \frac1M \sum_{i,p} a_{ip} a_{ip}^\top, \qquad
   G = c \sum_{i,p,j} g_{ipj} g_{ipj}^\top,

where the sums run over the samples :math:`i` and, when a weight is shared, over its
positions :math:`p` ("expand" convention of Eschenhagen et al. 2023: every sequence or spatial
position, and every call of a weight used more than once, counts as one more row), :math:`M` is
the number of rows, :math:`j` runs over the columns that define the Fisher type (see
:func:`kfac`), and :math:`c` is the loss's reduction factor
(:meth:`hessfunc.losses.Loss.scale`). A bias is folded in as one more input feature equal to one
(its block is then ``[W, b]``), or, with ``separate_bias=True``, gets its own block :math:`G`.
Rows of a weight's block are its output features, columns its input features (row-major, the
order of ``hessfunc.ravel``), so :math:`K` is ``G ⊗ A`` in ravel order; a grouped convolution
has one such product per group.

Exactness: for a single linear layer and a loss whose output Hessian is the same for every
sample (MSE), :math:`K` equals the GGN, bias included.

Sums over samples: the result holds unnormalised sums (:math:`\sum a a^\top`, :math:`\sum g
g^\top` of the *unreduced* losses) with the counts that normalise them (positions per block,
loss terms of a ``"mean"`` reduction). Adding two results (e.g. ``hessfunc``'s tree arithmetic
over batches, or one all-reduce over processes) gives the approximation of the union of their
data exactly; the normalisation happens when the factors are used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from .._base._types import PyTree
from ..losses import Loss
from . import _kron
from ._eigenbasis import EKFAC, Moments
from ._kron import Fisher, Pass
from ._layers import Layout

__all__ = ["KFAC", "kfac"]

SolveMethod = Literal["exact", "pi"]


class KFAC(NamedTuple):
    r"""K-FAC factors of every covered layer, as sums over samples (see :func:`kfac`).

    A pytree: it passes through ``torch.compile`` and, since everything it holds is a sum over
    samples with its counts, the sum of two ``KFAC`` results (leafwise, with equal layouts) is
    the K-FAC of both batches together. Blocks follow the order of their first leaf in
    ``params``; ``layout.blocks[i].names`` says which leaves block ``i`` covers.
    """

    input_sums: tuple[torch.Tensor, ...]
    r"""Per block :math:`\sum a a^\top` over every row, ``(groups, size, size)``."""
    positions: tuple[torch.Tensor, ...]
    """Per block the number of rows :math:`M` summed into ``input_sums`` (0-d int64)."""
    grad_sums: tuple[torch.Tensor, ...]
    r"""Per block :math:`\sum g g^\top` of the unreduced losses, ``(groups, out, out)``."""
    loss_terms: torch.Tensor | None
    """Loss terms a ``"mean"`` reduction divides by (0-d int64); ``None`` for ``"sum"``."""
    layout: Layout
    """Which leaves each block covers, and which leaves no block covers (no tensors)."""
    options: _kron.Options | None = None
    """The Fisher type and loss the factors were built with (no tensors); ``add`` compares it."""

    @property
    def A(self) -> tuple[torch.Tensor, ...]:  # noqa: N802 - the factor's name in the literature
        r"""Per block the input factor :math:`A = \frac1M \sum a a^\top`."""
        return tuple(
            s / n.to(s.dtype) for s, n in zip(self.input_sums, self.positions, strict=True)
        )

    @property
    def G(self) -> tuple[torch.Tensor, ...]:  # noqa: N802
        r"""Per block the output-gradient factor :math:`G = c \sum g g^\top`."""
        return tuple(_kron.normalise_grads(s, self.loss_terms) for s in self.grad_sums)

    covered = _kron.COVERED
    uncovered = _kron.UNCOVERED

    def __repr__(self) -> str:
        return self.layout.describe("KFAC")

    def add(self, other: KFAC) -> KFAC:
        """The K-FAC of both batches: every sum and count added (equal layouts required).

        Args:
            other: a ``KFAC`` of the same model, parameters and options on other data.

        Returns:
            A ``KFAC`` whose factors are those of the union of the two batches.

        Cost:
            One addition per stored tensor.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> halves = [
            ...     hessfunc.kfac(model, MSELoss(torch.zeros(1, 1)), {"w": w}, X[i : i + 1])
            ...     for i in range(2)
            ... ]
            >>> whole = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1)), {"w": w}, X)
            >>> torch.equal(halves[0].add(halves[1]).dense(), whole.dense())
            True
        """
        return _kron.add_results("hessfunc.KFAC.add(other)", self, other)

    def matvec(self, v: PyTree) -> PyTree:
        r"""The product :math:`K v`, a pytree like ``v`` (zero on uncovered leaves).

        Args:
            v: a pytree like the ``params`` the factors were built for.

        Returns:
            A pytree like ``v``.

        Cost:
            Per block two small matrix products per group, :math:`O(o\,d\,(o + d))` for an
            ``(o, d)`` weight; no pass through the model.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> K = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> K.matvec({"w": torch.ones(1, 2)})
            {'w': tensor([[2., 2.]])}
        """
        where = "hessfunc.KFAC.matvec(v)"
        if self.grad_sums:
            _kron.check_vector(where, self.layout, v, "v", self.grad_sums[0].dtype)

        def block(i: int, m: torch.Tensor) -> torch.Tensor:
            # the stored sums with one scalar, rather than normalised copies of the factors
            scale = 1.0 / self.positions[i].to(m.dtype)
            if self.loss_terms is not None:
                scale = scale / self.loss_terms.to(m.dtype)
            return self.grad_sums[i] @ (m * scale) @ self.input_sums[i]

        return _kron.blockwise(where, self.layout, v, "v", block, torch.zeros_like)

    def solve(
        self, b: PyTree, damping: float | torch.Tensor, *, method: SolveMethod = "exact"
    ) -> PyTree:
        r"""Solve :math:`(K + \lambda I)\, x = b` through the factors' eigendecompositions.

        ``method="exact"`` inverts :math:`G \otimes A + \lambda I` exactly: with
        :math:`A = Q_A \Lambda_A Q_A^\top` and :math:`G = Q_G \Lambda_G Q_G^\top`,
        :math:`x = (Q_G \otimes Q_A)(\Lambda_G \otimes \Lambda_A + \lambda)^{-1}(Q_G \otimes
        Q_A)^\top b`. ``method="pi"`` is Martens & Grosse's factored Tikhonov damping,
        :math:`(G + \lambda^{1/2}/\pi)^{-1} \otimes (A + \pi \lambda^{1/2})^{-1}` with
        :math:`\pi = \sqrt{(\operatorname{tr} A / \dim A) / (\operatorname{tr} G / \dim G)}`,
        an approximation of the damped inverse that is not :math:`(K + \lambda I)^{-1}`.
        Uncovered leaves, where :math:`K` is zero, get :math:`b / \lambda`.

        For many solves with the same factors, call :meth:`eigendecompose` once and use its
        ``solve``: the same exact result without repeating the eigendecompositions.

        Args:
            b: a pytree like ``params``.
            damping: :math:`\lambda \ge 0` (a float or a 0-d tensor); positive unless
                :math:`K` is positive definite (with fewer rows than input features, ``A`` is
                singular).
            method: ``"exact"`` (default) or ``"pi"``.

        Returns:
            A pytree like ``b``: :math:`x`.

        Cost:
            Two symmetric eigendecompositions per block and group, :math:`O(o^3 + d^3)`,
            plus four small matrix products; no pass through the model.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> K = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> K.solve({"w": torch.ones(1, 2)}, damping=1.0)
            {'w': tensor([[0.3333, 0.3333]])}
        """
        where = "hessfunc.KFAC.solve(b, damping)"
        _kron.check_damping(where, damping)
        if method not in ("exact", "pi"):
            raise ValueError(f"{where}: unknown method={method!r}; expected 'exact' or 'pi'.")
        if self.grad_sums:
            _kron.check_vector(where, self.layout, b, "b", self.grad_sums[0].dtype)
        if method == "exact":
            return self.eigendecompose().solve(b, damping)
        A, G = self.A, self.G
        _kron.check_invertible(
            where, self.layout, damping, lambda: self.eigendecompose().eigenvalues
        )

        def block(i: int, m: torch.Tensor) -> torch.Tensor:
            la, qa = torch.linalg.eigh(A[i])
            lg, qg = torch.linalg.eigh(G[i])
            mean_a = A[i].diagonal(dim1=-2, dim2=-1).mean(-1)
            mean_g = G[i].diagonal(dim1=-2, dim2=-1).mean(-1)
            ok = (mean_a > 0) & (mean_g > 0)
            pi = torch.where(
                ok, torch.sqrt(mean_a / torch.where(ok, mean_g, 1.0)), torch.ones_like(mean_a)
            )
            root = torch.as_tensor(damping, dtype=m.dtype, device=m.device).sqrt()
            denom = (lg + root / pi.unsqueeze(-1)).unsqueeze(-1) * (
                la + root * pi.unsqueeze(-1)
            ).unsqueeze(-2)
            return qg @ ((qg.mT @ m @ qa) / denom) @ qa.mT

        return _kron.blockwise(where, self.layout, b, "b", block, lambda x: x / damping)

    def dense(self, *, max_bytes: int | None = None) -> torch.Tensor:
        """The ``(n, n)`` matrix in ``hessfunc.ravel`` order (zero on uncovered leaves).

        Args:
            max_bytes: refuse when the matrix needs more (default: half the available memory;
                under ``torch.compile`` only an explicit value is checked).

        Returns:
            An ``(n, n)`` symmetric positive semi-definite tensor.

        Cost:
            :math:`O(n^2)` memory; per block a Kronecker product per group.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> K = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> K.dense()
            tensor([[1., 0.],
                    [0., 1.]])
        """
        A, G = self.A, self.G
        mats = [
            torch.stack([torch.kron(gq, aq) for gq, aq in zip(g, a, strict=True)])
            for a, g in zip(A, G, strict=True)
        ]
        return _kron.dense("hessfunc.KFAC.dense()", self.layout, mats, max_bytes)

    def eigendecompose(self) -> EKFAC:
        r"""The same operator in its Kronecker eigenbasis, as an :class:`hessfunc.EKFAC`.

        With :math:`A = Q_A \Lambda_A Q_A^\top` and :math:`G = Q_G \Lambda_G Q_G^\top`,
        :math:`K = (Q_G \otimes Q_A) (\Lambda_G \otimes \Lambda_A) (Q_G \otimes Q_A)^\top`: an
        EK-FAC whose eigenvalues are the products of the factors' eigenvalues. Its ``solve`` is
        :meth:`solve` without new eigendecompositions; its bases are the ones :func:`ekfac`
        corrects.

        Returns:
            An ``EKFAC`` with the same layout.

        Cost:
            Two symmetric eigendecompositions per block and group.

        Example:
            >>> import torch, hessfunc
            >>> from hessfunc.losses import MSELoss
            >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"])
            >>> X, w = torch.eye(2), torch.zeros(1, 2)
            >>> K = hessfunc.kfac(model, MSELoss(torch.zeros(2, 1), reduction="sum"), {"w": w}, X)
            >>> torch.allclose(K.eigendecompose().dense(), K.dense())
            True
        """
        qas, qgs, sums = [], [], []
        for a, gs in zip(self.A, self.grad_sums, strict=True):
            la, qa = torch.linalg.eigh(a)
            lg, qg = torch.linalg.eigh(gs)
            qas.append(qa)
            qgs.append(qg)
            sums.append(lg.unsqueeze(-1) * la.unsqueeze(-2))
        moments = Moments(tuple(sums), self.loss_terms, self.options)
        return EKFAC(tuple(qas), tuple(qgs), moments, self.layout)


def factor_sums(p: Pass, keep: bool = False) -> tuple[KFAC, list | None]:
    """K-FAC sums of one pass; with ``keep``, also the gradients of a single chunk for reuse.

    The gradient sums come first, a chunk of columns at a time and added in place, so only one
    chunk's output gradients exist at once; then (unless ``keep``: the caller pulls back again)
    the forward pass's saved tensors are released before the layer inputs are unfolded for the
    input sums.
    """
    grad_sums: list[torch.Tensor] = []
    kept = None
    for chunk in range(p.chunks):
        gs = p.grads(chunk)
        if not grad_sums:
            grad_sums = [
                torch.zeros(g[0].shape[-2], g[0].shape[-1], g[0].shape[-1], dtype=g[0].dtype,
                            device=g[0].device)
                for g in gs
            ]  # fmt: skip
        _kron.grad_sums_into(grad_sums, gs)
        if keep and p.chunks == 1:
            kept = [gs]
        del gs  # before the next chunk is pulled back
    if not keep:
        p.release()
    if p.weight != 1.0:
        grad_sums = [s * p.weight for s in grad_sums]
    input_sums = _kron.input_sums(p)
    result = KFAC(input_sums, p.positions, tuple(grad_sums), p.loss_terms, p.layout)
    return result, kept


def kfac(
    model_fn: Callable[..., torch.Tensor],
    loss_fn: Loss,
    params: PyTree,
    *args: Any,
    fisher: Fisher = "type-2",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    mc_samples: int = 1,
    separate_bias: bool = False,
    chunk_size: int | None = None,
) -> KFAC:
    r"""Kronecker factors of the Gauss-Newton / Fisher of every linear layer in ``model_fn``.

    Layers are found from what runs: every parameter leaf used as the weight (or bias) of
    ``F.linear`` or ``F.conv1d/2d/3d`` while ``model_fn`` runs gets a block (see the module
    docstring for the maths). Nothing is hooked or changed; ``nn.Linear`` and ``nn.Conv*d``
    modules (through :func:`hessfunc.from_module`) and hand-written ``F.linear`` calls are found
    alike. A leaf used in any other way (an embedding, a normalisation's scale, a weight
    transformed before use, ``x @ W.T``, the projections inside ``nn.MultiheadAttention``,
    whose forward torch dispatches as one call) is not covered: the result lists it with the
    reason in ``.uncovered``, and its curvature is taken as zero.

    The output-space columns :math:`j` that define :math:`G` (``fisher``):

    - ``"type-2"``: the columns of a square root of each sample's output Hessian (for one
      linear layer and a loss whose output Hessian is the same for every sample, such as MSE,
      :math:`K` is then the GGN exactly); one backward pass per column (``C`` for ``C``
      classes, one per output element of a row for element-wise losses), vectorised;
    - ``"mc"``: gradients at ``mc_samples`` targets drawn per sample from the model's
      predictive distribution (from ``generator`` or the uniform draws ``noise``), averaged;
    - ``"empirical"``: gradients at the observed targets (the uncentred gradient covariance).

    Samples are the rows (axis 0) of the outputs; for a model with outputs flattened over
    tokens, every token is a sample, and the factors follow curvlinops' conventions.

    Args:
        model_fn: ``model_fn(params, *args) -> outputs``, one tensor with samples on axis 0,
            or a container (dict, ``ModelOutput``) whose ``"logits"`` entry is that tensor.
        loss_fn: a :mod:`hessfunc.losses` object holding the targets (its reduction sets
            :math:`c`).
        params: a pytree of floating tensors.
        *args: passed to ``model_fn`` as is.
        fisher: ``"type-2"`` (default), ``"mc"`` or ``"empirical"``.
        generator: for ``"mc"``: a ``torch.Generator`` for the sampled targets (never the
            global RNG). Dynamo cannot trace generators: pass ``noise`` in compiled code.
        noise: for ``"mc"``, instead of ``generator``: uniform draws in [0, 1) of shape
            ``(mc_samples, *loss_fn.noise_shape(outputs))``.
        mc_samples: targets drawn per sample (``"mc"`` only).
        separate_bias: give each bias its own block instead of folding it into its weight's.
        chunk_size: output-space columns pulled back per vectorised pass (``None``: as many
            as fit 4 MiB of output gradients, at least one; an int ``>= K`` pulls back all
            columns at once).

    Returns:
        A :class:`KFAC`: per-block sums, counts and the layout, with ``.A`` / ``.G`` (the
        factors), ``.matvec``, ``.solve``, ``.dense``, ``.eigendecompose``, ``.covered`` and
        ``.uncovered``.

    Cost:
        Two forward passes of ``model_fn`` (one finds the layers; under ``torch.compile``
        its unused work is dropped) and ``K`` backward passes in ``ceil(K / chunk_size)``
        vectorised pulls, ``K`` the number of columns; then per block
        :math:`O(M d^2 + K M o^2)` for the factors. Memory: while the columns are pulled
        back, the forward pass's saved tensors and one chunk of output gradients (their sums
        are formed as each chunk arrives); then, with the forward pass freed, the layers'
        inputs and a few samples' unfolded patches (at most 4 MiB); throughout,
        :math:`O(d^2 + o^2)` per block for the factors themselves.

    Example:
        One linear layer with summed squared error: K-FAC is the GGN itself.

        >>> import torch, hessfunc
        >>> from hessfunc.losses import MSELoss
        >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
        >>> f64 = torch.float64
        >>> p = {"w": torch.ones(2, 2, dtype=f64), "b": torch.zeros(2, dtype=f64)}
        >>> model = lambda p, X: torch.nn.functional.linear(X, p["w"], p["b"])
        >>> loss = MSELoss(torch.zeros(3, 2, dtype=torch.float64), reduction="sum")
        >>> K = hessfunc.kfac(model, loss, p, X)
        >>> K
        KFAC(linear[['w']+['b']])
        >>> torch.allclose(K.dense(), hessfunc.ggn_matrix(model, loss, p, X))
        True
    """
    where = "hessfunc.kfac(model_fn, loss_fn, params, *args)"
    _kron.check(
        where, model_fn, loss_fn, params, fisher, generator, noise, mc_samples, separate_bias,
        chunk_size,
    )  # fmt: skip
    p = _kron.collect(
        where, model_fn, loss_fn, params, args, fisher=fisher, generator=generator, noise=noise,
        mc_samples=mc_samples, separate_bias=separate_bias, chunk_size=chunk_size,
    )  # fmt: skip
    return factor_sums(p)[0]._replace(options=_kron.options(fisher, loss_fn))
