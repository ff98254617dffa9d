r"""K-FAC as an optimizer: Kronecker-factored preconditioning with an exact quadratic model.

Every step, with :math:`h(\theta) = L(\theta) + \tfrac{\eta}{2}\lVert\theta\rVert^2` the batch
loss plus ``weight_decay`` :math:`\eta` (an L2 term of the objective):

1. the gradient :math:`g = \nabla h` and, every ``update_every`` steps, the batch's K-FAC
   factors :math:`A, G` of every covered layer (:func:`hessfunc.kfac`), folded into running
   averages :math:`\bar A \leftarrow \epsilon \bar A + (1 - \epsilon) A` (``ema`` is
   :math:`\epsilon`; the first step takes the batch's factors alone);
2. every ``invert_every`` steps the eigendecompositions of :math:`\bar A, \bar G`;
3. the preconditioned direction :math:`\Delta = -(\bar G \otimes \bar A + (\lambda + \eta)
   I)^{-1} g` per block, **Tikhonov damping on K**, applied exactly in the factors'
   eigenbasis (the :meth:`hessfunc.KFAC.solve` ``"exact"`` method, not the factored
   ``"pi"`` one); the eigendecompositions do not depend on :math:`\lambda`, so a new damping
   takes effect at once, without a new inversion. Leaves no block covers
   (:attr:`hessfunc.KFAC.uncovered`: embeddings, normalisation scales, ...) get the same rule
   with :math:`K = 0` there: :math:`\Delta = -g / (\lambda + \eta)`, a damped gradient step
   whose length the quadratic model below then sets;
4. the update :math:`d = \alpha \Delta + \mu \delta`, :math:`\delta` the previous update. With
   ``lr=None`` and ``momentum=None``, :math:`(\alpha, \mu)` minimise the damped quadratic model

   .. math:: q(d) = g^\top d + \tfrac12 d^\top (C + \lambda I) d, \qquad C = J^\top H_\ell J
      + \eta I,

   the exact GGN :math:`C` (not K-FAC) along :math:`\Delta` and :math:`\delta` (a 2x2 linear
   system; 1x1 on the first step, where :math:`\delta = 0`), as kfac-jax does. A number given
   for ``lr`` or ``momentum`` is used as it is (the other one, if ``None``, is still chosen
   by the model);
5. with ``adapt_damping``, the Levenberg-Marquardt rule: the reduction ratio
   :math:`\rho = (h(\theta + d) - h(\theta)) / (q_0(d))`, with :math:`q_0` the *undamped*
   model (:math:`\lambda = 0`), multiplies :math:`\lambda` by :math:`\omega = 19/20` when
   :math:`\rho > 3/4` and divides it by :math:`\omega` when :math:`\rho < 1/4` (Martens &
   Grosse 2015, section 6.5), clamped to :math:`[10^{-8}, 10^{8}]`. It costs one more forward
   pass (the loss at :math:`\theta + d` on the same batch).

The optimizer follows the conventions of :mod:`hessfunc.optim._base`: the state is a nested
dict of tensors (``torch.load(weights_only=True)`` restores it), ``step.update_every`` is
``update_every`` and the step takes ``refresh=`` (a Python bool: rebuild the factors on this
step; ``None`` reads the state's counter, eagerly), and with ``fisher="mc"``
``step.draw_noise(params, state, *batch, generator=)`` draws what a refreshing step would.

Compilation: ``torch.compile(opt.step, fullgraph=True)``, driven with ``refresh=(t %
update_every == 0)`` from a Python counter ``t`` (as :class:`hessfunc.optim.ModuleOptimizer`
does), builds **three graphs**: one for the first step (the state of ``init`` holds no factors
yet: the layers are found from the first batch), one for refreshing steps and one for the steps
in between, which skip the factor collection entirely (two graphs with ``update_every=1``; a
state that already went through one eager step needs no first-step graph). None is rebuilt when
the step count, damping or data change (fixed shapes). The inversion every ``invert_every`` steps
is a ``torch.cond`` on the step count inside both later graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch.func import grad_and_value, jvp

from .._base import _checks, _context, _tree
from .._base._types import PyTree
from ..kron import _kron
from ..kron._kron import FISHERS, Fisher
from ..kron._layers import Layout, Recorder, plan
from ..kron.kfac import factor_sums
from ..losses import Loss
from . import _base

__all__ = ["KFACInfo", "kfac"]

_NAME = "kfac"
_FACTORS = ("A", "G", "A_values", "A_vectors", "G_values", "G_vectors")
_FIELDS = ("count", "damping", "velocity", *_FACTORS)

_OMEGA = 19.0 / 20.0
_MIN_DAMPING, _MAX_DAMPING = 1e-8, 1e8


class KFACInfo(NamedTuple):
    """What one step saw and chose (0-d tensors)."""

    loss: torch.Tensor
    """The batch loss at the incoming parameters (without the weight-decay term)."""
    damping: torch.Tensor
    r"""The damping :math:`\lambda` this step used (before adaptation)."""
    lr: torch.Tensor
    r"""The step size :math:`\alpha` along the preconditioned direction."""
    momentum: torch.Tensor
    r"""The weight :math:`\mu` of the previous update."""
    rho: torch.Tensor
    """Reduction ratio (actual over predicted decrease); NaN without ``adapt_damping``."""
    predicted: torch.Tensor
    r"""The undamped quadratic model's change :math:`q_0(d)` (negative: a predicted decrease)."""


def _number(where: str, name: str, value: Any, *, allow_none: bool, low: float, strict: bool):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a float, got {type(value).__name__}.")
    if value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}.")


def _positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be an int >= 1 (1: every step), got {value!r}.")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder of a leaf that holds no factor (shape ``(0,)``)."""
    return torch.zeros(0, dtype=like.dtype, device=like.device)


def _slots(layout: Layout) -> dict[int, list[int]]:
    """Per parameter leaf, the blocks whose factors it stores.

    A block's weight leaf, else its bias leaf; the experts of a stacked leaf share it,
    concatenated along the group axis.
    """
    slots: dict[int, list[int]] = {}
    for i, b in enumerate(layout.blocks):
        slots.setdefault(b.weight if b.weight is not None else b.bias, []).append(i)
    return slots


def _pack(params: PyTree, layout: Layout, per_block: list[torch.Tensor]) -> PyTree:
    """Per-block tensors as a tree shaped like ``params`` (placeholders elsewhere)."""
    leaves = _tree.tree_leaves(params)
    slots = _slots(layout)
    out = [
        torch.cat([per_block[i] for i in slots[j]]) if j in slots else _empty(x)
        for j, x in enumerate(leaves)
    ]
    return _tree.tree_unflatten(_tree.tree_structure(params), out)


def _unpack(tree: PyTree, layout: Layout) -> list[torch.Tensor]:
    """The inverse of :func:`_pack`: per block its tensor."""
    leaves = _tree.tree_leaves(tree)
    per_block: list[Any] = [None] * len(layout.blocks)
    for j, idx in _slots(layout).items():
        parts = torch.split(leaves[j], [layout.blocks[i].groups for i in idx])
        for i, part in zip(idx, parts, strict=True):
            per_block[i] = part
    return per_block


def lm_damping(damping: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    r"""The Levenberg-Marquardt update of the damping for a reduction ratio ``rho``.

    Args:
        damping: the current :math:`\lambda` (0-d tensor).
        rho: the reduction ratio; NaN counts as a failed step.

    Returns:
        :math:`\omega\lambda` if :math:`\rho > 3/4`, :math:`\lambda/\omega` if :math:`\rho < 1/4`
        or NaN, else :math:`\lambda`; :math:`\omega = 19/20`, clamped to :math:`[10^{-8},
        10^8]`.

    Example:
        >>> import torch
        >>> from hessfunc.optim.kfac import lm_damping
        >>> lm_damping(torch.tensor(1.0), torch.tensor(0.9)).item()
        0.95
    """
    up = (rho < 0.25) | torch.isnan(rho)
    new = torch.where(rho > 0.75, damping * _OMEGA, torch.where(up, damping / _OMEGA, damping))
    return new.clamp(_MIN_DAMPING, _MAX_DAMPING)


def _precondition(layout, eig_a, eig_g, g: PyTree, lam: torch.Tensor) -> PyTree:
    r""":math:`(\bar G \otimes \bar A + \lambda I)^{-1} g` per block, :math:`g / \lambda` else."""

    def block(i: int, m: torch.Tensor) -> torch.Tensor:
        la, qa = eig_a[i]
        lg, qg = eig_g[i]
        denom = lg.unsqueeze(-1) * la.unsqueeze(-2) + lam
        return qg @ ((qg.mT @ m @ qa) / denom) @ qa.mT

    return _kron.blockwise("hessfunc.optim.kfac", layout, g, "g", block, lambda x: x / lam)


def _solve_2x2(m11, m12, m22, b1, b2, lr, momentum):
    """Minimise ``a b1 + u b2 + (a^2 m11 + 2 a u m12 + u^2 m22) / 2`` over the free ones."""
    # m22 = 0 exactly when the previous update is zero (first step): then u = 0.
    safe22 = torch.where(m22 > 0, m22, torch.ones_like(m22))
    if lr is None and momentum is None:
        det = m11 * safe22 - m12 * m12
        a = (-b1 * safe22 + m12 * b2) / det
        u = (-b2 * m11 + m12 * b1) / det
        a = torch.where(m22 > 0, a, -b1 / m11)
        u = torch.where(m22 > 0, u, torch.zeros_like(u))
        return a, u
    if lr is None:
        u = torch.full_like(m11, momentum)
        return -(b1 + u * m12) / m11, u
    a = torch.full_like(m11, lr)
    if momentum is None:
        u = torch.where(m22 > 0, -(b2 + a * m12) / safe22, torch.zeros_like(m22))
        return a, u
    return a, torch.full_like(m11, momentum)


def kfac(
    model_fn: Callable[..., torch.Tensor],
    loss_fn: Callable[..., Loss],
    *,
    lr: float | None = None,
    momentum: float | None = None,
    damping: float = 1e-3,
    adapt_damping: bool = True,
    update_every: int = 1,
    invert_every: int = 10,
    ema: float = 0.95,
    fisher: Fisher = "type-2",
    weight_decay: float = 0.0,
) -> _base.Optimizer:
    r"""K-FAC optimizer with step size and momentum from the exact quadratic model.

    See the module docstring for the algorithm; in short: Tikhonov-damped K-FAC
    preconditioning (:math:`(K + (\lambda + \eta) I)^{-1}`, exact in the factors'
    eigenbasis), step size and momentum minimising the damped exact-GGN quadratic model along
    the preconditioned direction and the previous update, and Levenberg-Marquardt damping.

    Args:
        model_fn: ``model_fn(params, *batch) -> outputs`` (samples on axis 0).
        loss_fn: ``loss_fn(*batch) -> loss``, a :mod:`hessfunc.losses` object holding the
            batch's targets.
        lr: a fixed step size :math:`\alpha > 0`, or ``None`` (default): from the quadratic
            model.
        momentum: a fixed weight :math:`\mu \ge 0` of the previous update, or ``None``
            (default): from the quadratic model.
        damping: the initial :math:`\lambda > 0`.
        adapt_damping: adapt :math:`\lambda` by the Levenberg-Marquardt rule (one more
            forward pass per step).
        update_every: fold the batch's factors into the running ones every this many steps
            (``step.update_every``; a compiled loop passes ``refresh=(t % update_every == 0)``).
        invert_every: eigendecompose the running factors every this many steps.
        ema: weight :math:`\epsilon \in [0, 1)` of the old factors (0: the batch's alone).
        fisher: ``"type-2"``, ``"mc"`` or ``"empirical"`` (as in :func:`hessfunc.kfac`);
            ``"mc"`` takes ``generator`` or ``noise`` in ``step``.
        weight_decay: :math:`\eta \ge 0`, an L2 term :math:`\tfrac{\eta}{2}\lVert\theta
            \rVert^2` added to the objective (and to the curvature).

    Returns:
        An :class:`~hessfunc.optim.Optimizer` ``(init, step)``: ``init(params) -> state``;
        ``step(params, state, *batch, generator=None, noise=None, refresh=None) -> (params,
        state, info)``, new parameters (the inputs are not modified), the new state and a
        :class:`KFACInfo`. The state is ``{"kfac": {...}}``: ``count`` and ``damping`` (0-d),
        ``velocity`` (the previous update, like ``params``) and the factor trees ``A``, ``G``,
        ``A_values``, ``A_vectors``, ``G_values``, ``G_vectors``, each shaped like ``params``
        in structure: a block's tensors sit at its weight leaf (its bias leaf if it has no
        weight), every other leaf holds an empty ``(0,)`` tensor (all of them before the first
        step). ``step.update_every`` is ``update_every``; with ``fisher="mc"``,
        ``step.draw_noise(params, state, *batch, generator=)`` draws what a refreshing step
        would.

    Cost:
        Per step one gradient, two forward passes with one tangent each (the quadratic
        model), one more forward pass with ``adapt_damping``, the factor collection of
        :func:`hessfunc.kfac` on refreshing steps only (eager and compiled) and per block
        four small matrix products; on inversion steps two symmetric eigendecompositions per
        block. Memory: per block :math:`\bar A, \bar G` and their eigenvectors, plus one copy
        of the parameters.

    Example:
        On linear least squares K-FAC is the Hessian, so one undamped step with ``lr=1`` is
        Newton's step and lands on the solution:

        >>> import torch, hessfunc.optim
        >>> from hessfunc.losses import MSELoss
        >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
        >>> Y = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
        >>> model = lambda p, X, Y: torch.nn.functional.linear(X, p["w"])
        >>> opt = hessfunc.optim.kfac(model, lambda X, Y: MSELoss(Y), lr=1.0, momentum=0.0,
        ...                           damping=1e-12, adapt_damping=False)
        >>> p = {"w": torch.zeros(1, 2, dtype=torch.float64)}
        >>> p, state, info = opt.step(p, opt.init(p), X, Y)
        >>> torch.allclose(p["w"].T, torch.linalg.lstsq(X, Y).solution)
        True
    """
    where = "hessfunc.optim.kfac(model_fn, loss_fn)"
    where_init = "hessfunc.optim.kfac(...).init(params)"
    if not callable(model_fn):
        raise TypeError(f"{where}: model_fn must be callable as model_fn(params, *batch).")
    if isinstance(loss_fn, Loss) or not callable(loss_fn):
        raise TypeError(
            f"{where}: loss_fn must be a function of the batch that returns a hessfunc.losses "
            f"object, e.g. lambda X, Y: hessfunc.losses.MSELoss(Y); got {type(loss_fn).__name__}."
        )
    _number(where, "lr", lr, allow_none=True, low=0.0, strict=True)
    _number(where, "momentum", momentum, allow_none=True, low=0.0, strict=False)
    _number(where, "damping", damping, allow_none=False, low=0.0, strict=True)
    _number(where, "weight_decay", weight_decay, allow_none=False, low=0.0, strict=False)
    _number(where, "ema", ema, allow_none=False, low=0.0, strict=False)
    if ema >= 1:
        raise ValueError(f"{where}: ema must be < 1 (the weight of the old factors), got {ema}.")
    _positive_int(where, "update_every", update_every)
    _positive_int(where, "invert_every", invert_every)
    if not isinstance(adapt_damping, bool):
        raise TypeError(f"{where}: adapt_damping must be a bool, got {adapt_damping!r}.")
    if fisher not in FISHERS:
        raise ValueError(
            f"{where}: unknown fisher={fisher!r}; expected 'type-2', 'mc' or 'empirical'."
        )
    step_where = "hessfunc.optim.kfac(...).step(params, state, *batch)"

    def init(params: PyTree) -> dict[str, dict[str, Any]]:
        """A fresh state: no factors yet (the first step finds the layers), zero velocity."""
        _checks.check_params(where_init, params)
        empty = _tree.tree_map(_empty, params)
        return {
            _NAME: {
                "count": _base.counter(params),
                "damping": _base.scalar(params, float(damping)),
                "velocity": _tree.zeros_like(params),
                **{name: empty for name in _FACTORS},
            }
        }

    def check_state(state: Any, params: PyTree) -> Mapping[str, Any]:
        """The base's checks on count, damping and velocity; the factor trees' structure."""
        inner = state.get(_NAME) if isinstance(state, Mapping) and set(state) == {_NAME} else None
        if isinstance(inner, Mapping) and set(inner) != set(_FIELDS):
            raise TypeError(
                f"{step_where}: state[{_NAME!r}] has fields {sorted(inner)}, expected "
                f"{sorted(_FIELDS)}: it was made by another version or configuration of the "
                "optimizer. Re-create it with .init(params)."
            )
        view = state
        if isinstance(inner, Mapping):
            view = {_NAME: {key: inner[key] for key in ("count", "damping", "velocity")}}
        _base.check_state(step_where, _NAME, view, params, ("velocity",), ("count", "damping"))
        spec = _tree.tree_structure(params)
        for key in _FACTORS:
            if _tree.tree_structure(inner[key]) != spec:
                raise ValueError(
                    f"{step_where}: state[{_NAME!r}][{key!r}] does not have the structure of "
                    "params: the state belongs to another parameter structure. Create it with "
                    ".init(params) for these parameters."
                )
        return inner

    def find_layout(params: PyTree, batch: tuple) -> Layout:
        """The layers of ``model_fn`` from one recorded forward pass.

        Under compile the pass is dead code: only the Python-level layout is kept.
        """
        leaves = _tree.tree_leaves(params)
        calls: list[Any] = []
        others: dict[int, str] = {}
        with _context.attention_fastpath_off(), Recorder(leaves, calls, others):
            model_fn(params, *batch)
        return plan(step_where, calls, others, leaves, _tree.tree_paths(params), False)[0]

    def objective(p: PyTree, batch: tuple, loss: Loss) -> torch.Tensor:
        value = loss(model_fn(p, *batch))
        if weight_decay:
            value = value + 0.5 * weight_decay * _tree.vdot(p, p)
        return value

    def draw_noise(
        params: PyTree, state: PyTree, *batch: Any, generator: torch.Generator
    ) -> torch.Tensor:
        """The uniform draws a refreshing ``step(..., generator=generator)`` would make."""
        loss = loss_fn(*batch)
        if not isinstance(loss, Loss):
            raise TypeError(
                f"{step_where}: loss_fn(*batch) must return a hessfunc.losses object (e.g. "
                f"hessfunc.losses.CrossEntropyLoss(targets)), got {type(loss).__name__}."
            )
        with torch.no_grad():
            out = model_fn(params, *batch)
        shape = (1, *loss.noise_shape(out))
        u = torch.rand(shape, generator=generator, dtype=out.dtype, device=generator.device)
        return u.to(out.device)

    def step(
        params: PyTree,
        state: PyTree,
        *batch: Any,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        refresh: bool | None = None,
    ) -> tuple[PyTree, PyTree, KFACInfo]:
        inner = check_state(state, params)
        loss = loss_fn(*batch)
        if not isinstance(loss, Loss):
            raise TypeError(
                f"{step_where}: loss_fn(*batch) must return a hessfunc.losses object (e.g. "
                f"hessfunc.losses.CrossEntropyLoss(targets)), got {type(loss).__name__}."
            )
        count = inner["count"]
        lam = inner["damping"]
        update = _base.should_refresh(step_where, refresh, count, update_every)
        first = all(x.numel() == 0 for x in _tree.tree_leaves(inner["A"]))
        collect = first or update
        if fisher != "mc" and (generator is not None or noise is not None):
            raise ValueError(
                f"{step_where}: generator and noise are only used with fisher='mc'; got "
                f"fisher={fisher!r}."
            )
        if fisher == "mc" and collect:  # steps that keep the factors draw nothing
            _kron.check(
                step_where, model_fn, loss, params, fisher, generator, noise, 1, False, None
            )

        # 1. the layers, and on refreshing steps the batch's factors folded into the averages
        if collect:
            p = _kron.collect(
                step_where, model_fn, loss, params, batch, fisher=fisher, generator=generator,
                noise=noise, mc_samples=1, separate_bias=False, chunk_size=None,
            )  # fmt: skip
            layout = p.layout
        else:
            layout = find_layout(params, batch)
        if not layout.blocks:
            raise ValueError(
                f"{step_where}: no leaf of params is the weight or bias of a layer inside "
                "model_fn, so there is nothing to factor; K-FAC needs layer weights."
            )
        slots = _slots(layout)
        if not first:
            for j, x in enumerate(_tree.tree_leaves(inner["A"])):
                want = (
                    sum(layout.blocks[i].groups for i in slots[j]) if j in slots else 0,
                    layout.blocks[slots[j][0]].size if j in slots else None,
                )
                got = (x.shape[0], x.shape[-1] if j in slots and x.dim() == 3 else None)
                if x.dim() not in (1, 3) or got != want:
                    raise ValueError(
                        f"{step_where}: the state's factors do not match the layers of model_fn "
                        "(another model or structure); call init(params) for this model."
                    )
            A_old, G_old = _unpack(inner["A"], layout), _unpack(inner["G"], layout)
        if first:
            K = factor_sums(p)[0]
            A, G = list(K.A), list(K.G)
        elif update:
            K = factor_sums(p)[0]
            A = [o + (1.0 - ema) * (n - o) for o, n in zip(A_old, K.A, strict=True)]
            G = [o + (1.0 - ema) * (n - o) for o, n in zip(G_old, K.G, strict=True)]
        else:
            A, G = A_old, G_old

        # 2. inversion every invert_every steps (a torch.cond on the step count)
        def invert(A, G, *_):  # noqa: N803
            ea = [torch.linalg.eigh(a) for a in A]
            eg = [torch.linalg.eigh(g) for g in G]
            return (
                [x.contiguous() for x, _ in ea], [q.contiguous() for _, q in ea],
                [x.contiguous() for x, _ in eg], [q.contiguous() for _, q in eg],
            )  # fmt: skip

        def keep(A, G, va, qa, vg, qg):  # noqa: N803
            return (
                [x.clone() for x in va],
                [x.clone() for x in qa],
                [x.clone() for x in vg],
                [x.clone() for x in qg],
            )

        if first:
            va, qa, vg, qg = invert(A, G)
        else:
            old = [_unpack(inner[k], layout) for k in _FACTORS[2:]]
            va, qa, vg, qg = torch.cond(count % invert_every == 0, invert, keep, (A, G, *old))
        eig_a = list(zip(va, qa, strict=True))
        eig_g = list(zip(vg, qg, strict=True))

        # 3. gradient and preconditioned direction
        grads, value = grad_and_value(lambda q: loss(model_fn(q, *batch)))(params)
        h0 = value
        if weight_decay:
            grads = _tree.axpy(weight_decay, params, grads)
            h0 = value + 0.5 * weight_decay * _tree.vdot(params, params)
        shift = lam + weight_decay
        direction = _tree.scale(-1.0, _precondition(layout, eig_a, eig_g, grads, shift))

        # 4. exact quadratic model along (direction, previous update)
        prev = inner["velocity"]
        # Two jvp calls, not one vmap over the stacked directions: on torch 2.13 (CPU inductor)
        # the vmapped form compiled to a step whose returned update was silently wrong for
        # some leaves while the new parameters were right (seen on the 6-layer autoencoder of
        # benchmarks/bench_optim.py; no upstream report found, same family as pytorch#146536).
        # tests/test_optim_kfac.py::test_compiled_autoencoder_state (--full) guards it.
        out, jd = jvp(lambda q: model_fn(q, *batch), (params,), (direction,))
        _, jp = jvp(lambda q: model_fn(q, *batch), (params,), (prev,))
        hd, hp = loss.hvp(out, jd), loss.hvp(out, jp)
        c11 = (jd * hd).sum() + weight_decay * _tree.vdot(direction, direction)
        c12 = (jd * hp).sum() + weight_decay * _tree.vdot(direction, prev)
        c22 = (jp * hp).sum() + weight_decay * _tree.vdot(prev, prev)
        n11, n12 = _tree.vdot(direction, direction), _tree.vdot(direction, prev)
        n22 = _tree.vdot(prev, prev)
        b1, b2 = _tree.vdot(grads, direction), _tree.vdot(grads, prev)
        alpha, mu = _solve_2x2(
            c11 + lam * n11, c12 + lam * n12, c22 + lam * n22, b1, b2, lr, momentum
        )
        update_vec = _tree.tree_map(lambda d, v: alpha * d + mu * v, direction, prev)
        new_params = _tree.add(params, update_vec)
        predicted = (
            alpha * b1 + mu * b2
            + 0.5 * (alpha * alpha * c11 + 2 * alpha * mu * c12 + mu * mu * c22)
        )  # fmt: skip

        # 5. Levenberg-Marquardt damping from the reduction ratio
        if adapt_damping:
            h1 = objective(new_params, batch, loss)
            safe = torch.where(predicted < 0, predicted, -torch.ones_like(predicted))
            rho = torch.where(predicted < 0, (h1 - h0) / safe, torch.full_like(h0, torch.nan))
            new_lam = lm_damping(lam, rho)
        else:
            rho = torch.full_like(h0, torch.nan)
            new_lam = lam

        packed = {
            key: _pack(params, layout, vals)
            for key, vals in zip(_FACTORS, (A, G, va, qa, vg, qg), strict=True)
        }
        new_state = {
            _NAME: {"count": count + 1, "damping": new_lam, "velocity": update_vec, **packed}
        }
        info = KFACInfo(
            loss=value.detach(), damping=lam, lr=alpha, momentum=mu, rho=rho, predicted=predicted
        )
        return new_params, new_state, info

    marked = _base.mark(
        step, update_every=update_every, draw_noise=draw_noise if fisher == "mc" else None
    )
    return _base.Optimizer(init, marked)
