"""The training problem seen by a Laplace approximation: subset, likelihood, data passes.

Everything here works on the *subset* of parameter leaves the posterior covers, as one raveled
vector ``theta`` of length ``n`` (ravel order of the subset leaves, which is their order in
``params``). The other leaves stay fixed at their values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.func import jacrev, vmap

from .. import data
from .._base import _context, _tree
from ..kron._layers import Call, Recorder
from ..losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss

WHERE = "hessfunc.laplace.fit(model_fn, loss_fn, params, batches)"

CLASSIFICATION = "classification"
BINARY = "binary"
REGRESSION = "regression"


def likelihood_of(where: str, loss: Any) -> str:
    """The likelihood a loss object is the negative log of, or a clear refusal."""
    if isinstance(loss, CrossEntropyLoss):
        if loss.label_smoothing != 0.0:
            raise ValueError(
                f"{where}: CrossEntropyLoss with label_smoothing={loss.label_smoothing} is not "
                "the negative log-likelihood of a categorical model; the Laplace evidence needs "
                "label_smoothing=0."
            )
        return CLASSIFICATION
    if isinstance(loss, BCEWithLogitsLoss):
        return BINARY
    if isinstance(loss, MSELoss):
        return REGRESSION
    if isinstance(loss, Loss):
        raise ValueError(
            f"{where}: a Laplace posterior needs a likelihood whose Gauss-Newton matrix is its "
            f"Fisher: CrossEntropyLoss, BCEWithLogitsLoss or MSELoss; got {type(loss).__name__} "
            "(NLLLoss has a zero Gauss-Newton matrix; GaussianNLLLoss is not supported)."
        )
    raise TypeError(
        f"{where}: loss_fn(*batch) must return a hessfunc.losses object (CrossEntropyLoss, "
        f"BCEWithLogitsLoss or MSELoss), got {type(loss).__name__}."
    )


def summed(loss: Loss) -> Loss:
    """The same loss with ``reduction="sum"``: the summed negative log-likelihood's object."""
    return loss if loss.reduction == "sum" else replace(loss, reduction="sum")


@dataclass(frozen=True, eq=False)
class Problem:
    """The subset, its raveled model function and the data, with the passes over it."""

    model_fn: Callable[..., Any]
    loss_fn: Callable[..., Loss]
    params: Any
    batches: Any  # a re-iterable of batch tuples
    index: tuple[int, ...]  # which leaves of params are in the subset, in params order
    names: tuple[str, ...]  # their dotted names
    sizes: tuple[int, ...]  # their numels
    theta: torch.Tensor  # the subset raveled, (n,)
    likelihood: str
    reduce: Any = None  # e.g. hessfunc.distributed.AllReduce(): sums over processes

    @property
    def n(self) -> int:
        return self.theta.numel()

    def sub_tree(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The subset leaves as a tuple, from a raveled vector."""
        leaves = _tree.tree_leaves(self.params)
        parts = torch.split(theta, list(self.sizes))
        return tuple(
            p.reshape(leaves[i].shape).to(leaves[i].dtype)
            for p, i in zip(parts, self.index, strict=True)
        )

    def merged(self, sub: tuple[torch.Tensor, ...]) -> Any:
        """``params`` with the subset leaves replaced by ``sub``."""
        leaves, spec = _tree.tree_flatten(self.params)
        leaves = list(leaves)
        for i, t in zip(self.index, sub, strict=True):
            leaves[i] = t
        return _tree.tree_unflatten(spec, leaves)

    def model_tree(self, sub: tuple[torch.Tensor, ...], *batch: Any) -> torch.Tensor:
        return self.model_fn(self.merged(sub), *batch)

    def model_flat(self, theta: torch.Tensor, *batch: Any) -> torch.Tensor:
        return self.model_tree(self.sub_tree(theta), *batch)

    def sum_loss(self, *batch: Any) -> Loss:
        return summed(self.loss_fn(*batch))

    def sum_over(self, fn: Callable[..., Any]) -> Any:
        return data.sum_over(fn, self.batches, reduce=self.reduce, progress=False)

    def matvec(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> GGN_sum v`` over the dataset (the summed loss), on raveled vectors."""
        from ..products.ggn import ggn_vp

        theta = self.theta

        def product(v: torch.Tensor, *batch: Any) -> torch.Tensor:
            return ggn_vp(self.model_flat, self.sum_loss(*batch), theta, v, *batch)

        return data.linear_operator(product, self.batches, reduce=self.reduce, progress=False)

    def jacobians(self, inputs: tuple, chunk_size: int | None = None) -> torch.Tensor:
        """Per-sample Jacobians ``(m, C, n)`` of the outputs at ``inputs`` (samples on axis 0).

        Every sample runs through ``model_fn`` as a batch of one (as ``per_sample_grads``).
        """
        theta = self.theta

        def one(th: torch.Tensor, *xs: Any) -> torch.Tensor:
            return self.model_flat(th, *(x.unsqueeze(0) for x in xs))[0].reshape(-1)

        jac = vmap(jacrev(one), in_dims=(None, *([0] * len(inputs))), chunk_size=chunk_size)
        return jac(theta, *inputs)


def check_batches(where: str, batches: Any) -> Any:
    """A re-iterable of batch tuples (a one-shot iterator is read into a list once).

    A list or a ``DataLoader`` is kept as it is and iterated once per pass over the data.
    """
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{where}: batches must be a list (or other iterable) of batch tuples such as "
            f"[(X, y), ...], got {type(batches).__name__}."
        )
    if iter(batches) is batches:  # an iterator: the structures need several passes
        batches = list(batches)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError(f"{where}: batches is empty; pass the training data, e.g. [(X, y)].")
    if not isinstance(first, (tuple, list)) or not first:
        raise TypeError(
            f"{where}: every batch must be a non-empty tuple of arguments for model_fn and "
            f"loss_fn, e.g. (X, y); got {type(first).__name__}."
        )
    return batches


def find_last_linear(
    where: str, model_fn: Callable[..., Any], params: Any, batch: tuple
) -> list[int]:
    """Leaf indices of the weight and bias of the last linear layer ``model_fn`` runs.

    The layers are those K-FAC records (:class:`hessfunc.kron._layers.Recorder`): ``F.linear``,
    and a 2-d leaf stored ``(in, out)`` applied as ``x @ W`` or ``torch.addmm(b, x, W)``;
    convolutions are not linear layers here.
    """
    leaves = _tree.tree_leaves(params)
    calls: list[Call] = []
    with torch.no_grad(), _context.attention_fastpath_off(), Recorder(leaves, calls, {}):
        model_fn(params, *batch)
    hits = [(c.weight, c.bias) for c in calls if c.dims == 0]
    if not hits:
        raise ValueError(
            f"{where}: subset='last_layer' found no linear layer (F.linear / nn.Linear, or "
            "x @ W / torch.addmm(b, x, W) with a 2-d leaf W) whose weight or bias is a leaf of "
            "params while model_fn ran; name the leaves instead, subset=['head.weight', "
            "'head.bias']."
        )
    w, b = hits[-1]
    return sorted(i for i in (w, b) if i is not None)


def build(
    where: str,
    model_fn: Callable[..., Any],
    loss_fn: Callable[..., Loss],
    params: Any,
    batches: Any,
    subset: Any,
    reduce: Any = None,
) -> Problem:
    leaves = _tree.tree_leaves(params)
    names = _tree.leaf_names(params)
    first = tuple(next(iter(batches)))
    if subset is None:
        index = list(range(len(leaves)))
    elif isinstance(subset, str):
        if subset != "last_layer":
            raise ValueError(
                f"{where}: subset must be None (all leaves), 'last_layer' or a list of leaf "
                f"names from {names}; got {subset!r}."
            )
        index = find_last_linear(where, model_fn, params, first)
    else:
        wanted = list(subset)
        unknown = [s for s in wanted if s not in names]
        if unknown or not wanted:
            raise ValueError(
                f"{where}: subset names no leaf of params: {unknown or wanted!r} not among {names}."
            )
        index = sorted({names.index(s) for s in wanted})
    sub = [leaves[i] for i in index]
    theta = torch.cat([t.detach().reshape(-1) for t in sub])
    likelihood = likelihood_of(where, loss_fn(*first))
    return Problem(
        model_fn,
        loss_fn,
        params,
        batches,
        tuple(index),
        tuple(names[i] for i in index),
        tuple(t.numel() for t in sub),
        theta,
        likelihood,
        reduce,
    )


def base_scale(likelihood: str) -> float:
    """``H = base_scale * GGN_sum``: 1/2 for MSE (the Gaussian's ``J^T J``), 1 otherwise."""
    return 0.5 if likelihood == REGRESSION else 1.0


def data_terms(problem: Problem) -> tuple[torch.Tensor, int, int]:
    """``(loss, samples, output elements)`` over the data, in laplace-torch's convention.

    ``loss`` is the summed negative log-likelihood without normaliser for classification and
    half the summed squared error for regression.
    """
    theta = problem.theta

    def one(*batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = problem.model_flat(theta, *batch)
            value = problem.sum_loss(*batch)(out) * base_scale(problem.likelihood)
        return value, torch.tensor(out.shape[0]), torch.tensor(out.numel())

    value, samples, elements = problem.sum_over(one)
    return value, int(samples), int(elements)


def gaussian_normaliser(elements: int, sigma: torch.Tensor) -> torch.Tensor:
    return elements * torch.log(sigma * math.sqrt(2 * math.pi))
