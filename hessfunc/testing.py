r"""Hypothesis strategies for property tests of curvature code (requires ``hypothesis``).

This module imports ``hypothesis`` at the top; ``import hessfunc`` never imports it, so only
test suites that ask for it need the dependency. Every strategy builds its tensors from a drawn
integer seed through a local ``torch.Generator``: drawing never touches the global RNG, examples
shrink well (Hypothesis shrinks the seed and the shapes, not millions of floats), and a failing
example is reproducible from its printout.

Strategies:
    * :func:`pytrees` -- parameter pytrees: nested dicts, lists and tuples of tensors of mixed
      shapes, 0-d leaves included.
    * :func:`directions_like` -- a pytree matching a given one (optionally batched).
    * :func:`losses` -- :class:`Loss` ``(name, fn, target)`` for logits of shape ``(N, C)``.
    * :func:`models` -- small functional models (MLP, CNN, attention block) with a loss, as a
      :class:`Problem` ``(f, params, args)``.
    * :func:`tree_problems` -- a smooth coupled objective over any pytree from :func:`pytrees`.

Example:
    A property test of your own model, checking its Hessian-vector products against finite
    differences of its gradient for every loss and many data sets::

        import torch
        from hypothesis import given, strategies as st
        from hessfunc.checking.check import check_hvp
        from hessfunc.products.module import from_module
        from hessfunc.testing import losses

        apply, params = from_module(MyNet().double().eval())  # logits of shape (N, C)

        @given(loss=losses(), seed=st.integers(0, 2**16), n=st.integers(1, 8))
        def test_my_net_hvp(loss, seed, n):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, 10, generator=g, dtype=torch.float64)
            y = loss.target((n, 3), torch.float64, g)
            check_hvp(lambda p, x, y: loss.fn(apply(p, x), y), params, x, y, generator=g)

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from ._base import _tree
from ._base._types import PyTree

__all__ = [
    "Loss",
    "Problem",
    "directions_like",
    "losses",
    "models",
    "pytrees",
    "tree_problems",
]

_SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


class Problem(NamedTuple):
    """A differentiable problem: ``f(params, *args) -> scalar``."""

    f: Callable[..., torch.Tensor]
    params: PyTree
    args: tuple


class Loss(NamedTuple):
    """A loss on logits ``out`` of shape ``(N, C)``.

    ``fn(out, target) -> scalar``; ``target(out_shape, dtype, generator) -> tensor`` draws a
    valid target for that shape (class indices, probabilities, reals or counts).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: Callable[[tuple[int, ...], torch.dtype, torch.Generator], torch.Tensor]


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


# ----------------------------------------------------------------------------- pytrees


def _leaf(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def pytrees(
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64,),
    max_leaves: int = 5,
    max_ndim: int = 3,
    max_side: int = 3,
) -> st.SearchStrategy[PyTree]:
    r"""Parameter pytrees: nested dicts, lists and tuples of standard-normal tensors.

    A tree may be a bare tensor; leaves have 0 to ``max_ndim`` axes of length 1 to ``max_side``
    (0-d leaves included) and a dtype drawn from ``dtypes`` (pass several for mixed-precision
    trees). Dict keys are short lowercase strings, in insertion order.

    Args:
        dtypes: floating dtypes to draw each leaf's dtype from.
        max_leaves: upper bound on the number of leaves (at least one leaf is drawn).
        max_ndim: most axes per leaf.
        max_side: longest axis.

    Returns:
        A strategy of pytrees with at least one leaf.

    Cost:
        Drawing builds ``max_leaves`` small tensors at most; no autograd.

    Example:
        >>> from hypothesis import given
        >>> from hessfunc._base import _tree
        >>> @given(pytrees(max_leaves=3))
        ... def test(tree):
        ...     assert 1 <= len(_tree.tree_leaves(tree)) <= 3
        >>> test()

    """
    leaf = st.builds(
        _leaf,
        st.lists(st.integers(1, max_side), max_size=max_ndim),
        st.sampled_from(list(dtypes)),
        _SEEDS,
    )
    keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


@st.composite
def _directions(draw: Any, params: PyTree, batch: int | None, kind: str) -> PyTree:
    g = torch.Generator().manual_seed(draw(_SEEDS))
    return _tree.random_like(params, g, kind=kind, batch=batch)


def directions_like(
    params: PyTree, *, batch: int | None = None, kind: str = "normal"
) -> st.SearchStrategy[PyTree]:
    r"""Random pytrees with the structure, shapes, dtypes and device of ``params``.

    Args:
        params: the pytree to match.
        batch: ``None`` for one direction; an int ``k`` for a batch (every leaf gets a leading
            axis of size ``k``, the layout of ``hessfunc.hvps``).
        kind: ``"normal"`` (standard normal entries) or ``"rademacher"`` (entries :math:`\pm 1`).

    Returns:
        A strategy of pytrees like ``params``.

    Cost:
        One tensor per leaf of ``params`` per draw.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> p = {"w": torch.zeros(2, 3), "b": torch.zeros(())}
        >>> @given(directions_like(p, batch=4, kind="rademacher"))
        ... def test(v):
        ...     assert v["w"].shape == (4, 2, 3) and bool((v["b"].abs() == 1).all())
        >>> test()

    """
    if kind not in ("normal", "rademacher"):
        raise ValueError(
            "hessfunc.testing.directions_like: kind must be 'normal' or 'rademacher', "
            f"got {kind!r}."
        )
    return _directions(params, batch, kind)


# ----------------------------------------------------------------------------- losses


def _normal_target(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _class_target(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, shape[-1], shape[:-1], generator=g)


def _prob_target(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), -1).to(dtype)


def _unit_target(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def _count_target(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return (3 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def _log_cosh(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = out - y
    return (d + F.softplus(-2 * d) - math.log(2.0)).mean()


SMOOTH_LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("mse", F.mse_loss, _normal_target),
        Loss("cross_entropy", F.cross_entropy, _class_target),
        Loss("soft_cross_entropy", F.cross_entropy, _prob_target),
        Loss("bce_logits", F.binary_cross_entropy_with_logits, _unit_target),
        Loss("poisson_nll", F.poisson_nll_loss, _count_target),
        Loss("log_cosh", _log_cosh, _normal_target),
    )
}
"""Losses with derivatives of every order (safe for finite differences at any point)."""

KINKED_LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("l1", F.l1_loss, _normal_target),
        Loss("huber", lambda o, y: F.huber_loss(o, y, delta=0.5), _normal_target),
        Loss("smooth_l1", lambda o, y: F.smooth_l1_loss(o, y, beta=0.5), _normal_target),
    )
}
"""Losses whose first or second derivative jumps (finite differences fail near the kinks)."""


def losses(*, smooth: bool = True) -> st.SearchStrategy[Loss]:
    r"""Losses on logits of shape ``(N, C)``, each with a target sampler.

    Args:
        smooth: ``True`` (default) for losses that are infinitely differentiable in the logits
            (:data:`SMOOTH_LOSSES`: mse, cross-entropy with class or probability targets, BCE with
            logits, Poisson NLL, log-cosh); ``False`` adds l1, Huber and smooth-l1, whose
            derivatives jump.

    Returns:
        A strategy of :class:`Loss` ``(name, fn, target)``.

    Cost:
        None at draw time.

    Example:
        >>> import torch
        >>> loss = SMOOTH_LOSSES["mse"]
        >>> g = torch.Generator().manual_seed(0)
        >>> y = loss.target((2, 3), torch.float64, g)
        >>> float(loss.fn(y, y))
        0.0

    """
    table = dict(SMOOTH_LOSSES)
    if not smooth:
        table.update(KINKED_LOSSES)
    return st.sampled_from(list(table.values()))


# ----------------------------------------------------------------------------- models

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}


def _weight(
    g: torch.Generator, shape: tuple[int, ...], fan_in: int, dtype: torch.dtype
) -> torch.Tensor:
    return (torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)).to(dtype)


def _mlp(
    draw: Any, g: torch.Generator, n: int, classes: int, dtype: torch.dtype
) -> tuple[Callable, PyTree, torch.Tensor, str]:
    widths = [draw(st.integers(1, 4))] + draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
    act_name = draw(st.sampled_from(sorted(_ACTIVATIONS)))
    act = _ACTIVATIONS[act_name]
    hidden = [
        (_weight(g, (a, b), a, dtype), _weight(g, (b,), a, dtype))
        for a, b in zip(widths[:-1], widths[1:], strict=True)
    ]
    head = {
        "weight": _weight(g, (widths[-1], classes), widths[-1], dtype),
        "bias": _weight(g, (classes,), 1, dtype),
    }
    params = {"hidden": hidden, "head": head}

    def model(p: PyTree, x: torch.Tensor) -> torch.Tensor:
        for w, b in p["hidden"]:
            x = act(x @ w + b)
        return x @ p["head"]["weight"] + p["head"]["bias"]

    x = _normal_target((n, widths[0]), dtype, g)
    return model, params, x, f"mlp[{'-'.join(map(str, widths))}-{classes},{act_name}]"


def _cnn(
    draw: Any, g: torch.Generator, n: int, classes: int, dtype: torch.dtype
) -> tuple[Callable, PyTree, torch.Tensor, str]:
    c_in, c_out, side = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([4, 6])),
    )
    feat = c_out * (side // 2) ** 2
    params = {
        "conv": {
            "weight": _weight(g, (c_out, c_in, 3, 3), 9 * c_in, dtype),
            "bias": _weight(g, (c_out,), 1, dtype),
        },
        "head": {
            "weight": _weight(g, (classes, feat), feat, dtype),
            "bias": _weight(g, (classes,), 1, dtype),
        },
    }

    def model(p: PyTree, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.conv2d(x, p["conv"]["weight"], p["conv"]["bias"], padding=1))
        h = F.avg_pool2d(h, 2).flatten(1)
        return F.linear(h, p["head"]["weight"], p["head"]["bias"])

    x = _normal_target((n, c_in, side, side), dtype, g)
    return model, params, x, f"cnn[{c_in}->{c_out},{side}x{side}->{classes}]"


def _attention(
    draw: Any, g: torch.Generator, n: int, classes: int, dtype: torch.dtype
) -> tuple[Callable, PyTree, torch.Tensor, str]:
    heads, head_dim, length = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
    )
    d = heads * head_dim
    params = {
        "norm": (1 + 0.1 * _weight(g, (d,), 1, dtype), 0.1 * _weight(g, (d,), 1, dtype)),
        "qkv": _weight(g, (d, 3 * d), d, dtype),
        "proj": _weight(g, (d, d), d, dtype),
        "head": _weight(g, (d, classes), d, dtype),
        "temperature": 1 + 0.1 * _weight(g, (), 1, dtype),
    }

    def model(p: PyTree, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (d,), *p["norm"])
        q, k, v = (h @ p["qkv"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim).transpose(-2, -3)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        a = a.transpose(-2, -3).reshape(x.shape)
        return p["temperature"] * ((x + a @ p["proj"]).mean(-2) @ p["head"])

    x = _normal_target((n, length, d), dtype, g)
    return model, params, x, f"attention[{heads}x{head_dim},L={length}->{classes}]"


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "attention": _attention}


@st.composite
def _models(
    draw: Any,
    kinds: Sequence[str],
    dtype: torch.dtype,
    loss_strategy: st.SearchStrategy,
    max_batch: int,
) -> Problem:
    kind = draw(st.sampled_from(list(kinds)))
    loss: Loss = draw(loss_strategy)
    n, classes = draw(st.integers(1, max_batch)), draw(st.integers(1, 3))
    if loss.name in ("cross_entropy", "soft_cross_entropy") and classes == 1:
        classes = 2
    g = torch.Generator().manual_seed(draw(_SEEDS))
    model, params, x, label = _BUILDERS[kind](draw, g, n, classes, dtype)
    target = loss.target((n, classes), dtype, g)

    def f(p: PyTree, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss.fn(model(p, x), target)

    return Problem(_named(f, f"{label}+{loss.name}"), params, (x, target))


def models(
    *,
    kinds: Sequence[str] = ("mlp", "cnn", "attention"),
    dtype: torch.dtype = torch.float64,
    loss: st.SearchStrategy[Loss] | None = None,
    max_batch: int = 4,
) -> st.SearchStrategy[Problem]:
    r"""Small functional models paired with a loss: :class:`Problem` ``(f, params, args)``.

    ``f(params, x, target) = loss(model(params, x), target)``. Models (sizes drawn):

    * ``"mlp"``: 1-2 hidden layers of width 1-5 with a smooth activation (tanh, GELU, softplus,
      sigmoid, SiLU); ``params = {"hidden": [(W, b), ...], "head": {"weight", "bias"}}``.
    * ``"cnn"``: 3x3 convolution, tanh, 2x2 average pooling, linear head.
    * ``"attention"``: pre-LayerNorm multi-head self-attention block
      (``F.scaled_dot_product_attention``) with a residual, mean pooling, a linear head and a 0-d
      ``temperature`` leaf.

    Every component is smooth (no ReLU or max-pooling kinks), so finite differences converge
    at every drawn point.

    Args:
        kinds: which model families to draw from.
        dtype: dtype of parameters and inputs.
        loss: a strategy of :class:`Loss` (default :func:`losses` ``()``, the smooth ones).
        max_batch: largest batch size ``N``.

    Returns:
        A strategy of :class:`Problem`; ``f`` is named after the model and loss (shown by
        Hypothesis when an example fails).

    Cost:
        Drawing builds a few hundred parameters at most; no autograd.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> @given(models(kinds=("attention",)))
        ... def test(problem):
        ...     f, params, args = problem
        ...     assert f(params, *args).shape == () and params["temperature"].dim() == 0
        >>> test()

    """
    unknown = set(kinds) - set(_BUILDERS)
    if not kinds or unknown:
        raise ValueError(
            "hessfunc.testing.models: kinds must be a non-empty subset of "
            f"{sorted(_BUILDERS)}, got {kinds!r}."
        )
    return _models(tuple(kinds), dtype, losses() if loss is None else loss, max_batch)


@st.composite
def _tree_problems(draw: Any, trees: st.SearchStrategy[PyTree]) -> Problem:
    params = draw(trees)
    g = torch.Generator().manual_seed(draw(_SEEDS))
    freq = _tree.random_like(params, g)
    mix = _tree.random_like(params, g)

    def f(p: PyTree, freq: PyTree, mix: PyTree) -> torch.Tensor:
        leaves_p, leaves_w, leaves_u = (_tree.tree_leaves(t) for t in (p, freq, mix))
        sep = sum(
            torch.sum(torch.sin(w * x)).double() for x, w in zip(leaves_p, leaves_w, strict=True)
        )
        coupling = sum(torch.sum(u * x).double() for x, u in zip(leaves_p, leaves_u, strict=True))
        return sep + 0.5 * torch.tanh(coupling) ** 2

    return Problem(_named(f, "sin+tanh_coupling"), params, (freq, mix))


def tree_problems(trees: st.SearchStrategy[PyTree] | None = None) -> st.SearchStrategy[Problem]:
    r"""A smooth objective that couples every leaf of a drawn pytree.

    .. math:: f(\theta; w, u) = \sum_i \sin(w_i \theta_i) + \tfrac12 \tanh(\langle u, \theta
              \rangle)^2,

    with ``w`` and ``u`` random pytrees like ``params`` passed through ``args``. The first term
    gives a diagonal Hessian, the second a dense rank-one-plus part across leaves, so products
    and matrices exercise every block. The value is returned in float64 whatever the leaf
    dtypes (mixed trees allowed).

    Args:
        trees: a strategy of parameter pytrees (default :func:`pytrees` ``()``).

    Returns:
        A strategy of :class:`Problem` ``(f, params, (w, u))``.

    Cost:
        One pass over the leaves per evaluation of ``f``.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> @given(tree_problems())
        ... def test(problem):
        ...     assert problem.f(problem.params, *problem.args).dtype == torch.float64
        >>> test()

    """
    return _tree_problems(pytrees() if trees is None else trees)
