r"""Products over a whole dataset: sums, means by count, and the linear operator they define.

Every product in hessfunc sees one batch. Over a dataset split into batches :math:`B_1, \ldots,
B_m`, a loss summed over examples (or tokens) is the sum of the batch losses, so its gradient,
Hessian, Gauss-Newton and Fisher products are sums of the batch products, and the dataset mean
divides that sum by the total count:

.. math:: \bar H v = \frac{\sum_b H_b v}{\sum_b n_b}, \qquad
   H_b = \nabla^2_\theta \textstyle\sum_{i \in B_b} \ell_i .

hessfunc accumulates the unnormalised sums and counts, reduces them once (across processes, with
``reduce=``), and divides once. That is exact for a short last batch, for shards of different
sizes and for token losses that ignore positions (count ``(y != -100).sum()``), and it needs no
pass over the data to count it first. A uniform mean of batch means is not: it weights the
examples of a short batch more.

So ``fn`` returns the batch's *summed* product: use ``reduction="sum"`` losses (or multiply a
``"mean"`` loss by the batch's count).

Batches come from any re-iterable: a ``DataLoader``, a list of tuples. A tuple or list batch is
unpacked into ``fn(*batch)``; anything else (a dict, a NamedTuple, a single tensor) is passed as
one argument, ``fn(batch)``.

The loops run eagerly (one host synchronisation at the end, to check the count); compile the
per-batch product, not the loop. With ``reduce=hessfunc.distributed.AllReduce()`` the reduction
is one collective per product, outside every ``torch.func`` transform and compiled region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import vmap

from . import _passes
from ._base import _checks, _progress, _tree
from ._base._types import PyTree
from ._passes import Count, Reduce

__all__ = [
    "DatasetOperator",
    "DeterminismReport",
    "check_deterministic",
    "linear_operator",
    "mean_over",
    "sum_over",
]


def sum_over(
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    *,
    reduce: Reduce | None = None,
    like: PyTree | None = None,
    progress: bool | None = None,
) -> PyTree:
    r"""Sum a per-batch product over every batch: :math:`\sum_b \mathrm{fn}(B_b)`.

    Args:
        fn: ``fn(*batch) -> pytree of tensors`` (``fn(batch)`` for a dict or other non-tuple
            batch), e.g. ``lambda X, y: hessfunc.hvp(loss_sum, params, v, X, y)``. Every batch
            must give the same structure.
        batches: any iterable of batches: a ``DataLoader``, a list of tuples.
        reduce: applied once to the local sum before it is returned, e.g.
            :class:`hessfunc.distributed.AllReduce` to sum over processes. Any callable
            ``tree -> tree`` that sums a pytree of tensors over the participants works.
        like: a pytree shaped like ``fn``'s output (e.g. ``params``): when ``batches`` is empty
            the sum is its zeros. Needed with ``reduce`` when a process may get no batch at all.
        progress: show a progress bar (needs ``tqdm``); ``None``: only on an interactive
            terminal or notebook, on rank 0, after a second.

    Returns:
        A pytree like ``fn``'s output: the sum over batches (and over processes, with
        ``reduce``).

    Cost:
        One call of ``fn`` per batch and one ``reduce``; memory of two outputs of ``fn``.

    Example:
        The gradient of a summed loss over a dataset is the sum of the batch gradients:

        >>> import torch, hessfunc
        >>> X = torch.arange(5.0).reshape(5, 1)
        >>> grad = lambda X: torch.func.grad(lambda w: (X @ w).pow(2).sum())(torch.ones(1))
        >>> hessfunc.data.sum_over(grad, [(X[:2],), (X[2:],)])
        tensor([60.])
    """
    where = "hessfunc.data.sum_over(fn, batches)"
    _passes.check_callable(where, "fn", fn, "fn(*batch) -> pytree")
    _passes.check_batches(where, batches, reiterable=False)
    _passes.check_reduce(where, reduce)
    return _passes.sum_pass(where, fn, batches, reduce, like, progress)


def mean_over(
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    *,
    count: Count,
    reduce: Reduce | None = None,
    like: PyTree | None = None,
    progress: bool | None = None,
) -> PyTree:
    r"""The dataset mean of a summed product: :math:`\sum_b \mathrm{fn}(B_b) / \sum_b n_b`.

    ``fn`` returns the batch's *summed* product (a ``reduction="sum"`` loss) and ``count`` what
    it summed over, so the result is exact for any batch sizes, shard sizes and ignored tokens.

    Args:
        fn: ``fn(*batch) -> pytree``: the product of the loss *summed* over the batch.
        batches: any iterable of batches (see :func:`sum_over`).
        count: ``count(*batch) -> int | 0-d tensor``: the examples (``len(y)``) or counted
            tokens (``(y != -100).sum()``) in the batch; a tensor count costs no host sync.
        reduce: applied once to ``(sum, count)`` together, e.g.
            :class:`hessfunc.distributed.AllReduce` (one collective for both).
        like: zeros for an empty ``batches`` (see :func:`sum_over`).
        progress: progress bar, as in :func:`sum_over`.

    Returns:
        A pytree like ``fn``'s output: the total divided by the total count.

    Cost:
        One call of ``fn`` and of ``count`` per batch, one ``reduce``, one host synchronisation
        (to read the total count); memory of two outputs of ``fn``.

    Example:
        The mean over a ragged split (3 + 2 examples) equals the mean over all 5:

        >>> import torch, hessfunc
        >>> y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
        >>> hessfunc.data.mean_over(lambda y: y.sum(), [(y[:3],), (y[3:],)], count=len)
        tensor(3.)
    """
    where = "hessfunc.data.mean_over(fn, batches, count=...)"
    _passes.check_callable(where, "fn", fn, "fn(*batch) -> pytree")
    _passes.check_callable(where, "count", count, "count(*batch) -> int or 0-d tensor")
    _passes.check_batches(where, batches, reiterable=False)
    _passes.check_reduce(where, reduce)
    return _passes.mean_pass(where, fn, batches, count, reduce, like, progress)


@dataclass(frozen=True, eq=False)
class DatasetOperator:
    """A linear operator ``v -> product over the dataset``, made by :func:`linear_operator`.

    Calling it (or :meth:`matvec`) runs one pass over the batches; :meth:`matmat` applies it to
    ``k`` directions in one pass. It is a plain callable on pytrees, so it feeds
    :func:`hessfunc.cg` and any estimator taking a ``matvec``, and :func:`hessfunc.to_scipy`
    picks up its :meth:`matmat`.
    """

    product: Callable[..., PyTree]
    batches: Iterable[Any] = field(repr=False)
    count: Count | None = None
    reduce: Reduce | None = None
    batched: Callable[..., PyTree] | None = None
    progress: bool | None = None
    first_pass: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    """Batches seen by the first pass (``{"batches": n}`` once one ran): later passes must match."""

    def _over(self, method: str, fn: Callable[..., PyTree], like: PyTree) -> PyTree:
        where = f"hessfunc.data.linear_operator(product, batches).{method}"

        def seen(now: int) -> None:
            _passes.check_pass(
                where, self.batches, self.first_pass.get("batches"), now, self.reduce
            )
            self.first_pass.setdefault("batches", now)

        # the product of the first batch of every pass is matched to v by name (its later
        # batches must have the same structure, which the pass itself checks)
        name = "product(v, *batch)" if method == "matvec" else "the batched product"
        unchecked = [True]

        def checked(*batch: Any) -> PyTree:
            out = fn(*batch)
            if unchecked[0]:
                _checks.check_tree(where, like, out, name, "v" if method == "matvec" else "vs")
                unchecked[0] = False
            return out

        if self.count is None:
            return _passes.sum_pass(
                where, checked, self.batches, self.reduce, like, self.progress, seen
            )
        return _passes.mean_pass(
            where, checked, self.batches, self.count, self.reduce, like, self.progress, seen
        )

    def matvec(self, v: PyTree) -> PyTree:
        """The product with one direction ``v`` (a pytree like the parameters)."""
        return self._over("matvec", lambda *batch: self.product(v, *batch), v)

    def matmat(self, vs: PyTree) -> PyTree:
        """The product with ``k`` directions stacked along a leading axis, in one data pass.

        Uses ``batched(vs, *batch)`` when given, else ``torch.func.vmap`` of ``product``.
        """
        if self.batched is not None:
            return self._over("matmat", lambda *batch: self.batched(vs, *batch), vs)

        def one_batch(*batch: Any) -> PyTree:
            return vmap(lambda t: self.product(t, *batch))(vs)

        return self._over("matmat", one_batch, vs)

    def __call__(self, v: PyTree) -> PyTree:
        """Same as :meth:`matvec`."""
        return self.matvec(v)


def linear_operator(
    product: Callable[..., PyTree],
    batches: Iterable[Any],
    *,
    count: Count | None = None,
    reduce: Reduce | None = None,
    batched: Callable[..., PyTree] | None = None,
    progress: bool | None = None,
) -> DatasetOperator:
    r"""The dataset product as a linear operator ``v -> sum (or mean) over batches``.

    ``product(v, *batch)`` is the batch's summed product with direction ``v``, e.g.
    ``lambda v, X, y: hessfunc.hvp(loss_sum, params, v, X, y)``. Without ``count`` the operator
    is :func:`sum_over` of it, with ``count`` :func:`mean_over`. The result is an ordinary
    callable, so it goes straight into :func:`hessfunc.cg`, the estimators, or
    :func:`hessfunc.to_scipy` (for scipy's ``eigsh``). Run :func:`check_deterministic` once
    before an iterative method: every call is a fresh pass over the data.

    Args:
        product: ``product(v, *batch) -> pytree like v``, linear in ``v``.
        batches: a *re-iterable* (a ``DataLoader``, a list), since every product is a pass.
            Every pass must yield as many batches as the first (a stream read once, which is
            empty on the second pass, raises ``ValueError``); an empty first pass is refused
            unless ``reduce`` is given (a process without a shard).
        count: ``count(*batch)`` for the mean (see :func:`mean_over`); ``None`` for the sum.
        reduce: e.g. :class:`hessfunc.distributed.AllReduce`: one collective per product.
        batched: ``batched(vs, *batch)``: the product with ``k`` stacked directions, used by
            :meth:`DatasetOperator.matmat` (e.g. with ``hessfunc.hvps``); default ``vmap`` of
            ``product``.
        progress: progress bar per pass, as in :func:`sum_over`.

    Returns:
        A :class:`DatasetOperator`; ``op(v)`` is the product, ``op.matmat(vs)`` the batched one.

    Cost:
        Per call one pass over the batches: one ``product`` per batch and one ``reduce``.
        ``matmat`` with ``k`` directions: one pass of batched products. Memory of two results.

    Example:
        The Hessian of a mean squared error over a dataset split in two ragged batches is
        :math:`2 X^\top X / N`:

        >>> import torch, hessfunc
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> f = lambda w, X: (X @ w).pow(2).sum()
        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> op = hessfunc.data.linear_operator(
        ...     lambda v, X: hessfunc.hvp(f, w, v, X), [(X[:2],), (X[2:],)],
        ...     count=lambda X: len(X))
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> torch.allclose(op(v), 2 * X.T @ X @ v / 3)
        True
    """
    where = "hessfunc.data.linear_operator(product, batches)"
    _passes.check_callable(where, "product", product, "product(v, *batch) -> pytree like v")
    if count is not None:
        _passes.check_callable(where, "count", count, "count(*batch) -> int or 0-d tensor")
    if batched is not None:
        _passes.check_callable(where, "batched", batched, "batched(vs, *batch) -> pytree like vs")
    _passes.check_batches(where, batches, reiterable=True)
    _passes.check_reduce(where, reduce)
    _progress.wanted(where, progress)
    return DatasetOperator(product, batches, count, reduce, batched, progress)


# ----------------------------------------------------------------------------- determinism


class DeterminismReport(NamedTuple):
    r"""What :func:`check_deterministic` found.

    Attributes:
        ok: no problem found.
        difference: :math:`\|a - b\| / \sum_b \|\mathrm{fn}(B_b)\|` between the two
            passes' sums: the rounding level when the passes only reorder the same terms.
        rtol: the threshold ``difference`` was held to.
        problems: one sentence per problem, each with its fix.
        message: the diagnosis (empty when ``ok``).
    """

    ok: bool
    difference: float
    rtol: float
    problems: tuple[str, ...]
    message: str


RTOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-4}
"""Default ``rtol`` of :func:`check_deterministic` by the least precise dtype of the output."""


def check_deterministic(
    fn: Callable[..., PyTree],
    batches: Iterable[Any],
    *,
    module: nn.Module | Iterable[nn.Module] | None = None,
    reduce: Reduce | None = None,
    rtol: float | None = None,
    progress: bool | None = None,
    raise_on_fail: bool = True,
) -> DeterminismReport:
    r"""Check that a dataset product is one fixed function: two passes must agree.

    CG, Lanczos and the trace estimators assume every product applies the *same* matrix. Run
    this once before them. It makes two passes of :func:`sum_over` and compares them,
    relative to the magnitude of what was summed (:math:`\sum_b \|\mathrm{fn}(B_b)\|`), so a
    reordered sum (``shuffle=True`` without ``drop_last``) passes and any change of the data
    or of the function fails. It also inspects what it is given, because some problems do not
    show in two passes:

    - a ``DataLoader`` that shuffles with ``drop_last=True`` (each pass drops different
      examples), a ``DistributedSampler`` that pads or drops examples;
    - in ``module``: active dropout, and BatchNorm in training mode (batch statistics, and
      running statistics written on every forward);
    - ``module``'s buffers changed by the passes.

    Args:
        fn: the per-batch product, as for :func:`sum_over` (e.g. an HVP at a fixed random
            direction, or a gradient).
        batches: the re-iterable of batches the solver will use.
        module: the model (or several) behind ``fn``, to inspect; DDP and compiled wrappers are
            looked through.
        reduce: as for :func:`sum_over`; with ``AllReduce`` every rank reaches the same verdict
            on the values.
        rtol: threshold for the relative difference (default :data:`RTOL` by dtype: 1e-10 for
            float64, 1e-4 for float32 and lower).
        progress: progress bar, as in :func:`sum_over`.
        raise_on_fail: raise ``AssertionError`` with the diagnosis (default), or return the
            report either way.

    Returns:
        A :class:`DeterminismReport` ``(ok, difference, rtol, problems, message)``.

    Cost:
        Two passes over the data (two calls of ``fn`` per batch, two ``reduce``); memory of
        three outputs of ``fn`` and a copy of ``module``'s buffers.

    Example:
        >>> import torch, hessfunc
        >>> X = torch.randn(10, 3)
        >>> batches = [(X[:4],), (X[4:],)]
        >>> hessfunc.data.check_deterministic(lambda X: X.sum(0), batches).ok
        True
        >>> drop = torch.nn.Dropout(0.5)  # in training mode
        >>> report = hessfunc.data.check_deterministic(
        ...     lambda X: drop(X).sum(0), batches, module=drop, raise_on_fail=False)
        >>> report.ok, len(report.problems)
        (False, 2)
    """
    where = "hessfunc.data.check_deterministic(fn, batches)"
    _passes.check_callable(where, "fn", fn, "fn(*batch) -> pytree")
    _passes.check_batches(where, batches, reiterable=True)
    _passes.check_reduce(where, reduce)
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"{where}: rtol must be None or a positive float, got {rtol!r}.")
    problems = _passes.loader_problems(batches) + _passes.module_problems(module)
    before = _passes.buffer_copies(module)

    def one_pass(magnitude: bool) -> _passes.Pass:
        return _passes.accumulate(
            where, fn, batches, count=None, like=None, progress=progress, magnitude=magnitude
        )

    first, second = one_pass(True), one_pass(False)
    a, scale = first.total, first.magnitude
    b = second.total
    if reduce is not None:
        a, scale = reduce((a, scale))
        b = reduce(b)
    dtype = torch.float64
    for leaf in _tree.tree_leaves(a):
        if leaf.is_floating_point() and torch.finfo(leaf.dtype).eps > torch.finfo(dtype).eps:
            dtype = leaf.dtype
    rtol_ = float(rtol) if rtol is not None else RTOL.get(dtype, RTOL[torch.float32])
    if first.batches != second.batches:
        problems.append(
            f"the passes saw {first.batches} and {second.batches} batches: the loader yields a "
            "different number of batches each time."
        )
        difference = math.inf
    elif _tree.tree_structure(a) != _tree.tree_structure(b):
        problems.append("fn returned different structures in the two passes.")
        difference = math.inf
    else:
        diff = _tree.sub(b, a)
        gap = torch.sqrt(_tree.vdot(diff, diff).detach().to(torch.float64))
        difference = float(gap / scale) if float(scale) > 0 else float(gap)
        if not difference <= rtol_:
            problems.append(
                f"two passes differ by {difference:.3g} relative to the summed products "
                f"(rtol {rtol_:.1g}): something random or stateful runs in fn or in the "
                "loader. Fix the cause (eval mode, no shuffling with drop_last, a fixed "
                "generator for Monte-Carlo products)."
            )
    after = _passes.buffer_copies(module)
    changed = [k.split(":", 1)[1] for k, t in before.items() if not torch.equal(t, after[k])]
    if changed:
        problems.append(
            f"the passes changed module buffers ({', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}): the forward writes state, e.g. BatchNorm "
            "running statistics in training mode. Call module.eval()."
        )
    message = ""
    if problems:
        message = f"{where}: the dataset product is not deterministic:\n" + "\n".join(
            f"  - {p}" for p in problems
        )
    report = DeterminismReport(not problems, difference, rtol_, tuple(problems), message)
    if problems and raise_on_fail:
        raise AssertionError(message)
    return report
