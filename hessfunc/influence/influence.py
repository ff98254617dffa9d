r"""Influence functions: which training samples moved a test prediction, and by how much.

For a model fitted by minimising the mean training loss :math:`L(\theta) = \frac1N \sum_j
\ell_j(\theta) + R(\theta)` (``loss(params, *train)``, regulariser included), removing training
sample ``j`` and refitting moves the minimiser by, to first order in :math:`1/N`,

.. math:: \theta_{-j} - \theta \approx \frac1N H^{-1} g_j, \qquad
   g_j = \nabla_\theta \big(\ell_j + R\big)(\theta), \quad H = \nabla^2 L(\theta),

(Koh & Liang 2017: the refit's gradient at :math:`\theta` is :math:`-g_j/(N - 1)`, and one Newton
step from there) and so the loss of test sample ``t`` by

.. math:: \mathcal I_{tj} = \frac1N\, \nabla \ell_t(\theta)^\top (H + \lambda I)^{-1} g_j .

Positive: removing ``j`` raises ``t``'s loss (``j`` helped ``t``); negative: ``j`` hurt it.
:math:`g_j` is the gradient of ``loss`` on sample ``j`` alone, which holds the regulariser once,
exactly as the leave-one-out refit needs.

**Positive definiteness.** The formula is the change of a refit only where
:math:`H + \lambda I` is positive definite: at a minimum of a convex loss (logistic or ridge
regression), it is. For a non-convex model, at a point that is not an exact minimum or in a
flat or negatively curved direction, an eigenvalue :math:`\mu_i + \lambda \le 0` turns the
contribution :math:`(u_i^\top \nabla\ell_t)(u_i^\top g_j) / (N(\mu_i + \lambda))` around (the
"inverse" pushes uphill) and one near zero blows it up; the scores are then dominated by
a few directions that say nothing about the refit. The fix is damping: a :math:`\lambda` above
the most negative eigenvalue (find it with :func:`hessfunc.eigsh` and ``which="SA"``; 1e-3 to
1e-2 times the largest is common), or a positive semi-definite curvature such as the
Gauss-Newton matrix through ``curvature=``. A damped score estimates the change of a refit
kept near :math:`\theta` by a proximal term :math:`\frac\lambda2 \|\theta' - \theta\|^2`, not of
the full refit. Every solver reports what it can see of this (CG: a direction of non-positive
curvature; LiSSA: divergence; low rank and dense: an eigenvalue), and eager calls warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch.func import vmap

from .._base import _checks, _memory, _tree
from .._base._types import Mode, PyTree
from ..linalg.inverse import _check_damping
from ..products.fisher import per_sample_grads
from ..products.hessian import hessian_matrix, rows_over_basis
from ..products.hvp import hvp
from ._influence_solvers import SOLVERS, WHERE, Problem, user_solver

__all__ = ["influence"]

Solver = Literal["cg", "lissa", "low_rank", "dense", "kfac", "ekfac"]


MESSAGES = {
    "negative_curvature": (
        "CG met a direction of non-positive curvature: H + damping*I is not positive definite "
        "(a non-convex model away from a minimum, or too little damping). CG stops moving "
        "along such a direction, so the scores are not those of the formula."
    ),
    "unconverged": (
        "CG did not reach its tolerance within maxiter iterations; raise "
        "solver_options['maxiter'], or the damping (fewer iterations for a better-conditioned "
        "system)."
    ),
    "diverged": (
        "the Neumann series (LiSSA) diverged and the affected scores are nan: scale is below "
        "half the largest eigenvalue of H + damping*I, or H + damping*I has a negative "
        "eigenvalue. Take scale >= (largest eigenvalue) + damping (hessfunc.eigsh finds it)."
    ),
    "not_positive_definite": (
        "H + damping*I has an eigenvalue <= 0 (a non-convex model away from a minimum, or too "
        "little damping): the scores along such directions have their sign turned around and "
        "are amplified by 1 / |eigenvalue + damping|."
    ),
}
FIX = (
    " Raise damping above the most negative eigenvalue of H (hessfunc.eigsh(..., which='SA')), "
    "or pass a positive semi-definite curvature (Gauss-Newton) through curvature=."
)


def _batch_size(name: str, data: Any) -> int:
    if not isinstance(data, (tuple, list)) or not data:
        raise TypeError(
            f"{WHERE}: {name} must be a non-empty tuple of batched arguments for loss, e.g. "
            f"(X_{name}, y_{name}), samples along axis 0; got {type(data).__name__}."
        )
    sizes = set()
    for k, arg in enumerate(data):
        leaves = _tree.tree_leaves(arg)
        if not leaves:
            raise ValueError(f"{WHERE}: {name}[{k}] holds no tensor.")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                what = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf)
                raise ValueError(
                    f"{WHERE}: every leaf of {name} must be a tensor with the samples along "
                    f"axis 0; {name}[{k}] has a leaf {what}. Close over shared arguments in "
                    "loss instead."
                )
            sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{WHERE}: the arguments in {name} disagree on the number of samples: {sorted(sizes)}."
        )
    size = sizes.pop()
    if size == 0:
        raise ValueError(
            f"{WHERE}: {name} holds no sample (axis 0 has size 0); influence needs at least one "
            f"{'training' if name == 'train' else 'test'} sample. Check the slice or filter "
            f"that built {name}."
        )
    return size


def _slice(data: tuple, start: int, stop: int) -> tuple:
    return tuple(_tree.tree_map(lambda t: t[start:stop], a) for a in data)


def _spans(size: int, chunk: int | None) -> Iterator[tuple[int, int]]:
    step = size if chunk is None else chunk
    for start in range(0, size, step):
        yield start, min(start + step, size)


def _problem(
    loss: Callable[..., torch.Tensor],
    params: PyTree,
    train: tuple,
    num_train: int,
    curvature: Any,
    chunk_size: int | None,
    mode: Mode,
) -> Problem:
    if curvature == "hessian":

        def batch_matvec(v: PyTree, *batch: Any) -> PyTree:
            return hvp(loss, params, v, *batch, mode=mode)

    elif callable(curvature):
        unchecked = [True]

        def batch_matvec(v: PyTree, *batch: Any) -> PyTree:
            out = curvature(params, v, *batch)
            if unchecked[0]:  # matched to params by name once (see _checks.check_tree)
                _checks.check_tree(WHERE, params, out, "curvature(params, v, *batch)")
                unchecked[0] = False
            return out

    else:
        raise ValueError(
            f"{WHERE}: curvature must be 'hessian' or a callable (params, v, *batch) -> C v "
            f"of the mean loss on batch (regulariser included), got {curvature!r}; for "
            "Gauss-Newton pass lambda p, v, X, y: hessfunc.ggn_vp(model_fn, "
            "hessfunc.losses.CrossEntropyLoss(y), p, v, X) plus the regulariser's term."
        )
    spans = list(_spans(num_train, chunk_size))

    def matvec(v: PyTree) -> PyTree:
        # the mean over chunks weighted by their sizes: exact for a mean loss plus a regulariser
        total = None
        for start, stop in spans:
            part = batch_matvec(v, *_slice(train, start, stop))
            part = part if len(spans) == 1 else _tree.scale((stop - start) / num_train, part)
            total = part if total is None else _tree.add(total, part)
        return total

    flat, unravel = _tree.ravel(params)
    n = flat.numel()

    def dense(basis_chunk: int | None, max_bytes: int | None) -> torch.Tensor:
        total = None
        for start, stop in spans:
            part_data = _slice(train, start, stop)
            if curvature == "hessian":
                part = hessian_matrix(
                    loss, params, *part_data, mode=mode, chunk_size=basis_chunk,
                    max_bytes=max_bytes,
                )  # fmt: skip
            else:
                _memory.guard(WHERE, n, flat.dtype, flat.device, basis_chunk, max_bytes)

                def row(e: torch.Tensor, part_data: tuple = part_data) -> torch.Tensor:
                    return _tree.ravel(batch_matvec(unravel(e), *part_data))[0].to(flat.dtype)

                part = rows_over_basis(WHERE, vmap(row), flat, basis_chunk)
            part = part if len(spans) == 1 else part * ((stop - start) / num_train)
            total = part if total is None else total + part
        return total

    def batches() -> list[tuple]:
        return [_slice(train, start, stop) for start, stop in spans]

    return Problem(params, matvec, batch_matvec, dense, n, batches)


def influence(
    loss: Callable[..., torch.Tensor],
    params: PyTree,
    train: tuple,
    test: tuple,
    *,
    damping: float | torch.Tensor = 0.0,
    solver: Solver | Any = "cg",
    solver_options: Mapping[str, Any] | None = None,
    curvature: Literal["hessian"] | Callable[..., PyTree] = "hessian",
    test_loss: Callable[..., torch.Tensor] | None = None,
    chunk_size: int | None = None,
    test_chunk_size: int | None = None,
    mode: Mode = "fwd-rev",
) -> torch.Tensor:
    r"""Influence of every training sample on every test sample's loss (leave-one-out, linearised).

    Entry ``[t, j]`` of the result is :math:`\frac1N \nabla\ell_t(\theta)^\top (C + \lambda
    I)^{-1} g_j`: the first-order estimate of how much test sample ``t``'s loss changes when
    training sample ``j`` is removed and the model refit (see the module docstring for the
    derivation and for what positive definiteness means here). Positive: removing ``j`` raises
    ``t``'s loss. ``C`` is the Hessian of the mean training loss at ``params`` (which should be
    a minimum, fitted to a small gradient norm), or the curvature you pass.

    The inverse is applied once per test sample (to its gradient), never per training sample:
    test samples are taken ``test_chunk_size`` at a time, their gradients solved together (one
    ``vmap``-ed solve, so each matvec is one batched product), and the solutions kept. Then the
    training samples pass once, ``chunk_size`` at a time, each chunk's per-sample gradients
    dotted with every solution and dropped.

    Solvers (``solver_options`` in brackets, defaults after ``=``):

    * ``"cg"`` [``maxiter=min(n, 100)``, ``tol=1e-6``]: :func:`hessfunc.cg`; the default.
      Relative error of a solution at most :math:`\kappa \cdot` ``tol``, :math:`\kappa` the
      condition number of :math:`C + \lambda I`. Eager calls warn when ``tol`` was not met.
    * ``"lissa"`` [``scale`` (required), ``num_iters=1000``, ``batches=None``]:
      :func:`hessfunc.lissa` on the full training curvature, ``num_iters`` steps; or with
      ``batches``, a re-iterable of training minibatch tuples, one stochastic step each.
      Relative error :math:`(1 - (\mu_{\min} + \lambda)/s)^{T+1}` on a fixed operator.
    * ``"low_rank"`` [``rank`` (required), ``num_iters=None``, ``v0=None``]:
      :func:`hessfunc.low_rank_inverse` built once, then one cheap solve per test sample.
      Needs ``damping > 0``; relative error at most :math:`\mu_{r+1}/\lambda` for a
      positive semi-definite curvature, :math:`\max_{i>r} |\mu_i|/\lambda` otherwise (more
      for unconverged eigenpairs).
    * ``"dense"`` [``chunk_size=None``, ``max_bytes=None``, passed to the dense build]: the
      dense curvature (:func:`hessfunc.hessian_matrix` for the Hessian) and its
      eigendecomposition: exact, :math:`O(n^2)` memory and :math:`O(n^3)` time; the reference.
    * ``"kfac"`` / ``"ekfac"`` [``model_fn``, ``loss_fn`` (both required), ``fisher="type-2"``,
      ``generator=None``, ``mc_samples=1``, ``separate_bias=False``, ``chunk_size=None``]:
      :math:`C` is the K-FAC (:func:`hessfunc.kfac`) or EK-FAC (:func:`hessfunc.ekfac`) of the
      training set, built once over the training chunks (``chunk_size`` samples at a time,
      merged exactly: ``KFAC.add``, and for EK-FAC a second pass for the moments in the merged
      basis), eigendecomposed once, then solved exactly for each test sample, with no model
      pass. ``model_fn(params, *batch) -> outputs`` and ``loss_fn(*batch) ->`` a
      :mod:`hessfunc.losses` object with ``reduction="mean"`` take a training batch as ``loss``
      does: with ``apply, params = hessfunc.from_module(net)`` and ``train = (X, y)``, pass
      ``{"model_fn": lambda p, X, y: apply(p, X), "loss_fn": lambda X, y:
      CrossEntropyLoss(y)}``. The other options are :func:`hessfunc.kfac`'s (``chunk_size``:
      output-space columns per vectorised backward pass; ``generator`` for ``fisher="mc"``).
      **What it approximates**: the Gauss-Newton matrix (``"type-2"``; a Fisher for ``"mc"``
      and ``"empirical"``) of the data term ``loss_fn`` builds, layer by layer, not the Hessian
      of ``loss``; exact for one linear layer with MSE. **A regulariser in** ``loss`` **is not
      in the factors**, and nothing is added for it: add its curvature to ``damping`` yourself
      (``damping = λ + 2α`` for :math:`\alpha \|\theta\|^2` on every leaf; on some leaves
      only, the others are then damped by :math:`2\alpha` too). Leaves that no layer covers
      (``.uncovered`` of :func:`hessfunc.kfac` on a batch) have zero curvature in the factors
      and are divided by the damping, so these solvers need ``damping > 0``. A ``KFAC`` or
      ``EKFAC`` built beforehand can be passed as ``solver`` itself (``K.eigendecompose()``,
      so that the factors are decomposed once).
    * an object with ``.solve(b, damping)`` returning :math:`(C + \lambda I)^{-1} b` (a
      :class:`hessfunc.LowRankInverse` built beforehand, or any factorisation of your own),
      or a callable ``b -> x`` with its damping built in (then leave ``damping=0``). They are
      applied one test sample at a time unless ``test_chunk_size`` is given, then through
      ``vmap``.

    When :math:`C + \lambda I` is not positive definite, eager calls warn (``RuntimeWarning``,
    naming the fix); compiled calls cannot, so check a compiled pipeline eagerly once.

    Args:
        loss: ``loss(params, *batch) -> scalar``: the **mean** loss over the batch plus any
            regulariser (the objective that was minimised). Called on all of ``train`` for the
            curvature and on one sample at a time (a batch of one) for the gradients.
        params: the fitted parameters, a pytree of floating tensors.
        train: a tuple of the training arguments of ``loss``, samples along axis 0 (``N``).
        test: a tuple of test arguments, samples along axis 0 (``n_test``).
        damping: :math:`\lambda \ge 0` (a number or a 0-d tensor).
        solver: ``"cg"``, ``"lissa"``, ``"low_rank"``, ``"dense"``, ``"kfac"``, ``"ekfac"``, or
            an object or callable as above.
        solver_options: the chosen solver's options (a dict; see the list above).
        curvature: ``"hessian"`` (default) or a callable ``(params, v, *batch) -> C v`` for the
            mean loss on ``batch``, regulariser included, e.g. a Gauss-Newton product plus
            ``weight_decay * v``.
        test_loss: ``test_loss(params, *test_sample) -> scalar``, the quantity whose change is
            predicted (default ``loss``; pass the loss without the regulariser to predict the
            change of the test loss alone, or any scalar of the prediction, such as a logit).
        chunk_size: training samples per pass through the model (per-sample gradients and,
            weighted by size, curvature products); ``None``: all ``N`` at once.
        test_chunk_size: test samples solved together (``None``: all of them, for the built-in
            solvers; one at a time for a solver you pass).
        mode: AD mode of the Hessian products (see :func:`hessfunc.hvp`).

    Returns:
        An ``(n_test, N)`` tensor in the parameters' (promoted) dtype.

    Cost:
        ``n_test + N`` gradients (per sample, vectorised), plus the solver: CG ``maxiter``
        curvature products per test block (each a ``vmap`` over the block, over all ``N``
        training samples), LiSSA ``num_iters`` per block, low rank ``num_iters`` once, dense
        ``n`` once plus an :math:`O(n^3)` eigendecomposition. K-FAC: one pass over the
        training set (two forwards and ``K`` vectorised backwards per chunk, ``K`` the
        output-space columns: classes for ``"type-2"`` cross-entropy) and two eigendecompositions
        of :math:`o \times o` and :math:`d \times d` factors per layer; EK-FAC: the same plus a
        second pass for the moments (one pass in all when the training set is one chunk); then
        :math:`O(o\,d\,(o + d))` per layer and test sample, no model pass. Memory:
        ``n_test + chunk_size`` parameter-sized vectors (solutions, one chunk of training
        gradients), plus the solver's working set for one block (CG: four vectors per test
        sample in it; low rank: ``rank`` vectors; dense: :math:`2n^2`; K-FAC and EK-FAC: the
        factors, :math:`O(o^2 + d^2)` per layer, and one chunk's layer inputs and output
        gradients while building).

    Example:
        Ridge regression, where the Hessian is :math:`\frac2N X^\top X + 2\alpha I` and the
        refit of an exact minimum is again exact to first order:

        >>> import torch, hessfunc
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 2.5], dtype=torch.float64)
        >>> loss = lambda w, X, y: ((X @ w - y) ** 2).mean() + 0.1 * (w**2).sum()
        >>> H = 2 * X.T @ X / 3 + 0.2 * torch.eye(2, dtype=torch.float64)
        >>> w = torch.linalg.solve(H, 2 * X.T @ y / 3)  # the exact minimiser
        >>> scores = hessfunc.influence(loss, w, (X, y), (X[:1], y[:1]))
        >>> g = lambda x, t: 2 * (x @ w - t) * x + 0.2 * w  # gradient of one sample's loss
        >>> expected = torch.stack([g(X[0], y[0]) @ torch.linalg.solve(H, g(X[j], y[j])) / 3
        ...                         for j in range(3)])
        >>> torch.allclose(scores[0], expected)
        True
    """
    _checks.check_params(WHERE, params)
    _checks.check_mode(WHERE, mode)
    _checks.check_chunk_size(WHERE, chunk_size)
    if test_chunk_size is not None and (
        isinstance(test_chunk_size, bool)
        or not isinstance(test_chunk_size, int)
        or test_chunk_size < 1
    ):
        raise ValueError(
            f"{WHERE}: test_chunk_size must be None or a positive int, got {test_chunk_size!r}."
        )
    _check_damping(WHERE, damping)
    if not callable(loss):
        raise TypeError(f"{WHERE}: loss must be callable as loss(params, *batch) -> scalar.")
    if test_loss is not None and not callable(test_loss):
        raise TypeError(f"{WHERE}: test_loss must be None or callable like loss.")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(
            f"{WHERE}: solver_options must be a dict of the solver's options, e.g. "
            f"{{'maxiter': 50}}; got {type(solver_options).__name__}."
        )
    num_train = _batch_size("train", train)
    num_test = _batch_size("test", test)
    train, test = tuple(train), tuple(test)
    problem = _problem(loss, params, train, num_train, curvature, chunk_size, mode)

    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"{WHERE}: unknown solver={solver!r}; expected one of {sorted(SOLVERS)}, an "
                "object with .solve(b, damping), or a callable b -> x."
            )
        if solver in ("kfac", "ekfac") and not (
            isinstance(curvature, str) and curvature == "hessian"
        ):
            raise ValueError(
                f"{WHERE}: curvature= does not apply to solver={solver!r}, whose factors are the "
                "curvature (of the loss that solver_options['loss_fn'] builds); drop curvature=, "
                "or use solver='cg' or 'dense' with it."
            )
        built = SOLVERS[solver](problem, damping, dict(solver_options or {}))
        block_size = test_chunk_size
    else:
        if solver_options:
            raise ValueError(
                f"{WHERE}: solver_options apply to the built-in solvers only; configure your "
                "solver object itself."
            )
        built = user_solver(solver, damping)
        block_size = 1 if test_chunk_size is None else test_chunk_size

    # 1. one inverse product per test sample, a block at a time
    grad_test = test_loss if test_loss is not None else loss
    solutions, flags = [], {}
    for start, stop in _spans(num_test, block_size):
        G = per_sample_grads(grad_test, params, *_slice(test, start, stop))
        rows, block_flags = built.block(G)
        solutions.append(rows)
        for name, flag in block_flags.items():
            flags[name] = flag if name not in flags else flags[name] | flag
    S = torch.cat(solutions) if len(solutions) > 1 else solutions[0]

    # 2. one pass over the training samples: a chunk of per-sample gradients at a time
    columns = []
    for start, stop in _spans(num_train, chunk_size):
        G = _tree.ravel_rows(per_sample_grads(loss, params, *_slice(train, start, stop)))
        columns.append(S @ G.to(S.dtype).T)
    scores = (torch.cat(columns, 1) if len(columns) > 1 else columns[0]) / num_train

    if not torch.compiler.is_compiling():
        raised = {name for name, flag in flags.items() if bool(flag)}
        if "negative_curvature" in raised:
            raised.discard("unconverged")  # CG stopped because of it: one cause, one warning
        for name in flags:
            if name in raised:
                fix = FIX if name != "unconverged" else ""
                warnings.warn(f"{WHERE}: {MESSAGES[name]}{fix}", RuntimeWarning, stacklevel=2)
    return scores
