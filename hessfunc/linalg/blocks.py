r"""Per-layer curvature: any estimator applied to the diagonal blocks of an operator.

Parameters are grouped into blocks by name, by default by module: ``"body.0.weight"`` and
``"body.0.bias"`` form block ``"body.0"`` (the layer). The diagonal block :math:`A_{bb}` of a
curvature matrix :math:`A` (Hessian, GGN, Fisher) acts on a vector :math:`v_b` of block
:math:`b` as :math:`A_{bb} v_b = P_b A P_b^\top v_b`: put :math:`v_b` in the full parameter
space with zeros elsewhere, apply the full product, keep block :math:`b` of the result. Nothing
about the model changes; the full product is computed (and the other blocks' output discarded),
so one block product costs one full product.

Two ways to get per-layer numbers, with different costs:

* :func:`blockwise` runs any estimator (``eigsh``, ``hutchpp_trace``, ``slq``, ...) on every
  block operator: ``L`` blocks cost ``L`` times the estimator's matvecs. It is the only way to
  get per-layer *eigenvalues* and densities.
* :func:`block_trace` gets every block's trace from one set of full-space Hutchinson probes,
  because :math:`\mathbb E[v_b^\top (Av)_b] = \operatorname{tr} A_{bb}`: ``m`` matvecs for all
  blocks together. Its samples also carry the off-diagonal blocks :math:`A_{bc}` as noise, so
  per matvec it wins unless those are more than about ``L`` times larger than the block's own
  off-diagonal part (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from .._base import _checks, _operator, _tree
from .._base._types import PyTree
from .estimators import TraceEstimate

__all__ = ["block_trace", "blockwise"]

Blocks = Literal["module", "leaf"] | Callable[[str], str]


def _groups(where: str, like: PyTree, blocks: Any) -> dict[str, list[int]]:
    """Block name -> indices of its leaves (in ravel order), blocks in order of first leaf."""
    if blocks == "leaf":
        key: Callable[[str], str] = lambda name: name  # noqa: E731
    elif blocks == "module":
        key = lambda name: name.rsplit(".", 1)[0] if "." in name else name  # noqa: E731
    elif callable(blocks):
        key = blocks
    else:
        raise ValueError(
            f"{where}: blocks must be 'module', 'leaf' or a callable leaf name -> block name, "
            f"got {blocks!r}."
        )
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(_tree.leaf_names(like)):
        group = key(name)
        if not isinstance(group, str):
            raise TypeError(
                f"{where}: blocks({name!r}) returned {type(group).__name__}; the callable must "
                "map each leaf name to a block name (a str)."
            )
        groups.setdefault(group, []).append(i)
    return groups


def blockwise(
    estimator: Callable[..., Any],
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    x: PyTree,
    *args: Any,
    blocks: Blocks = "module",
    **kwargs: Any,
) -> dict[str, Any]:
    r"""Run ``estimator`` on every diagonal block of the operator ``matvec``.

    For every block :math:`b`, calls ``estimator(matvec_b, x_b, *args, **kwargs)`` where
    ``matvec_b`` applies :math:`A_{bb}` and ``x_b`` holds block :math:`b`'s leaves of ``x`` (a
    start vector or a batch of probes). Block vectors are dicts from leaf name (as in
    ``params``) to tensor, so a per-layer eigenvector reads like a piece of ``params``.

    Args:
        estimator: any function ``(matvec, x, *args, **kwargs)``: :func:`hessfunc.eigsh`,
            :func:`hessfunc.power_iteration`, :func:`hessfunc.hutchpp_trace`,
            :func:`hessfunc.slq`, ... or your own.
        matvec: ``v -> A v`` over pytrees like ``like``, or a :func:`hessfunc.batched_matvec`
            (each block then gets a batched product too).
        like: a pytree like one vector (e.g. ``params``); fixes the blocks and their shapes.
        x: the estimator's random input, a pytree like ``like``, optionally with a leading axis
            on every leaf (probes).
        *args: passed to ``estimator`` after ``x`` (e.g. ``k`` for ``eigsh``).
        blocks: ``"module"`` (default): a leaf named ``"a.b.weight"`` joins block ``"a.b"``
            (a name without ``"."`` is its own block); ``"leaf"``: every leaf is a block; or a
            callable mapping each leaf name (nested keys joined by ``"."``) to a block name.
        **kwargs: passed to ``estimator`` (e.g. ``num_iters=``).

    Returns:
        A dict from block name (in parameter order) to the estimator's result for that block.

    Cost:
        For every block, the estimator's cost with each matvec a full product: ``L`` blocks
        cost ``L`` times the matvecs of one call. Memory as one call of the estimator on the
        largest block, plus one full vector of zeros per product.

    Example:
        The top eigenvalue of each diagonal block of a dense matrix (the coupling between
        blocks is ignored):

        >>> import torch, hessfunc
        >>> z = lambda n: torch.zeros(n, dtype=torch.float64)
        >>> like = {"l1.weight": z(2), "l1.bias": z(1), "l2.weight": z(2)}
        >>> B = torch.arange(25.0, dtype=torch.float64).reshape(5, 5).cos()
        >>> A = B @ B.T
        >>> flat, unravel = hessfunc.ravel(like)
        >>> mv = lambda v: unravel(A @ hessfunc.ravel(v)[0])
        >>> v0 = unravel(torch.ones(5, dtype=torch.float64))
        >>> top = hessfunc.blockwise(hessfunc.eigsh, mv, like, v0, 1)  # num_iters: block size
        >>> list(top)
        ['l1', 'l2']
        >>> torch.allclose(top["l1"].eigenvalues, torch.linalg.eigvalsh(A[:3, :3])[-1:])
        True
        >>> torch.allclose(top["l2"].eigenvalues, torch.linalg.eigvalsh(A[3:, 3:])[-1:])
        True
    """
    where = "hessfunc.blockwise(estimator, matvec, like, x, *args)"
    if not callable(estimator):
        raise TypeError(f"{where}: estimator must be callable, got {type(estimator).__name__}.")
    _checks.check_params(where, like, name="like")
    like_leaves, spec = _tree.tree_flatten(like)
    _checks.check_paths(where, _tree.tree_paths(like), x, "x", "like")  # by name, not position
    x_leaves = _tree.tree_leaves(x)
    names = _tree.leaf_names(like)
    if len(x_leaves) != len(like_leaves):
        raise ValueError(
            f"{where}: x must have the leaves of like (optionally with a leading axis); got "
            f"{len(x_leaves)} leaves for {len(like_leaves)}."
        )
    for name, p, t in zip(names, like_leaves, x_leaves, strict=True):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[t.dim() - p.dim() :]) != tuple(p.shape):
            raise ValueError(
                f"{where}: x[{name!r}] must have shape {tuple(p.shape)}, optionally after a "
                f"leading axis; got {tuple(getattr(t, 'shape', ()))}."
            )
    batched = isinstance(matvec, _operator.BatchedMatvec)
    results: dict[str, Any] = {}
    unchecked = [True]  # the first product is matched to like by name (_checks.check_tree)
    for group, idx in _groups(where, like, blocks).items():
        keys = [names[i] for i in idx]

        def matvec_b(v: dict[str, torch.Tensor], idx=idx, keys=keys) -> dict[str, torch.Tensor]:
            # a batched product gets a batch: the zeros then carry the batch axis too
            lead = v[keys[0]].shape[:1] if batched else ()
            full = [leaf.new_zeros(lead + leaf.shape) for leaf in like_leaves]
            for i, key in zip(idx, keys, strict=True):
                full[i] = v[key]
            product = matvec.matmat if batched else matvec
            tree = product(_tree.tree_unflatten(spec, full))
            if unchecked[0]:
                _checks.check_tree(where, like, tree, "matvec(v)", "like", batched=batched)
                unchecked[0] = False
            out = _tree.tree_leaves(tree)
            if len(out) != len(full):
                raise ValueError(
                    f"{where}: matvec must return a pytree like its input; got {len(out)} "
                    f"leaves for {len(full)}."
                )
            return {key: out[i] for i, key in zip(idx, keys, strict=True)}

        block_mv = _operator.BatchedMatvec(matvec_b) if batched else matvec_b
        x_b = {key: x_leaves[i] for i, key in zip(idx, keys, strict=True)}
        results[group] = estimator(block_mv, x_b, *args, **kwargs)
    return results


def block_trace(
    matvec: Callable[[PyTree], PyTree],
    probes: PyTree,
    *,
    blocks: Blocks = "module",
    chunk_size: int | None = None,
) -> dict[str, TraceEstimate]:
    r"""The trace of every diagonal block from one set of full-space Hutchinson probes.

    With :math:`v` over all parameters, :math:`\mathbb E[v_b^\top (A v)_b] =
    \operatorname{tr} A_{bb}`, so one product per probe serves every block at once. The block
    traces sum to Hutchinson's estimate of the full trace (same probes).

    Variance, Rademacher probes, per probe: :math:`2\sum_{i \ne j \in b} A_{ij}^2 +
    \sum_{c \ne b} \|A_{bc}\|_F^2`; the second term (the coupling to other blocks) is what
    running :func:`hessfunc.hutchinson_trace` on the block operator through
    :func:`blockwise` avoids, at ``L`` times the matvecs for ``L`` blocks. At equal matvecs this
    function is the better choice unless the coupling exceeds about ``L`` times the block's own
    off-diagonal mass. For decaying block spectra, ``blockwise(hessfunc.xtrace, ...)`` can beat
    both.

    Args:
        matvec: ``v -> A v`` over pytrees like one probe.
        probes: ``m`` vectors (pytree leaves with a leading axis ``m``).
        blocks: how leaves group into blocks, as in :func:`blockwise`.
        chunk_size: probes pushed through ``vmap(matvec)`` at once (``None``: all ``m``).

    Returns:
        A dict from block name to :class:`hessfunc.TraceEstimate`.

    Cost:
        ``m`` matvecs for all blocks together, in ``ceil(m / chunk_size)`` vectorised calls;
        memory of ``2m`` vectors.

    Example:
        >>> import torch, hessfunc
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> z = lambda n: torch.zeros(n, dtype=torch.float64)
        >>> like = {"a.w": z(3), "b.w": z(1)}
        >>> flat, unravel = hessfunc.ravel(like)
        >>> mv = lambda v: unravel(A @ hessfunc.ravel(v)[0])
        >>> probes = hessfunc.random_probes(like, 4, generator=torch.Generator().manual_seed(0))
        >>> {k: float(t.estimate) for k, t in hessfunc.block_trace(mv, probes).items()}
        {'a': 6.0, 'b': 4.0}
    """
    where = "hessfunc.block_trace(matvec, probes)"
    op, V = _operator.rows_operator(where, matvec, probes, chunk_size)
    products = V * op.apply(V)
    one = _tree.tree_map(lambda t: t[0], probes)
    slices = _tree.leaf_slices(one)
    out: dict[str, TraceEstimate] = {}
    for group, idx in _groups(where, one, blocks).items():
        samples = sum(products[:, slices[i][0] : slices[i][1]].sum(1) for i in idx)
        out[group] = TraceEstimate(*_operator.mean_and_error(samples))
    return out
