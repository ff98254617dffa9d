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
   (:attr:`hessfunc.KFAC.uncovered`: embeddings, normalisation scales, ...) get a diagonal
   block instead: :math:`\Delta_u = -g_u / (\bar d_u + \lambda + \eta)`, with :math:`\bar d`
   a running average (the same ``ema``, refreshed on the same steps as the factors) of an
   unbiased estimate of the curvature's diagonal on those leaves: the Gauss-Newton-Bartlett
   estimate :math:`\hat g \odot \hat g / c` (:func:`hessfunc.gnb_diag`: the gradient at labels
   drawn from the model, squared, over the loss's reduction factor :math:`c`) for ``"type-2"``
   and ``"mc"`` (``"mc"`` reuses the factor build's draws; ``"type-2"`` then needs
   ``generator`` or ``noise`` on refreshing steps), the squared batch gradient over :math:`c`
   for ``"empirical"`` (:mod:`hessfunc.optim._kfac_diag`); the quadratic model below still
   sets the step length;
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
   pass (the loss at :math:`\theta + d` on the same batch);
6. with ``reject_steps`` (default), a step that raised the batch objective, :math:`h(\theta +
   d) > h(\theta)` or NaN, is undone (as kfac-jax's ``use_step_rejection``): the parameters and
   the previous update stay, and the damping, after the rule of 5., is doubled (so a run that
   left the model's region of trust gets back into it within a few steps instead of the tens
   that :math:`1/\omega` per step takes). ``torch.where`` on the update: no branch, it compiles.

The pieces live beside this module, one object each: the running factors and their
preconditioner in :mod:`hessfunc.optim._kfac_factors`, the diagonal of the uncovered leaves in
:mod:`hessfunc.optim._kfac_diag`, the quadratic model in
:mod:`hessfunc.optim._qmodel`, the damping rule in :mod:`hessfunc.optim._lm`.

The optimizer follows the conventions of :mod:`hessfunc.optim._base`: the state is a nested
dict of tensors (``torch.load(weights_only=True)`` restores it), ``step.update_every`` is
``update_every`` and the step takes ``refresh=`` (a Python bool: rebuild the factors on this
step; ``None`` reads the state's counter, eagerly), and with ``fisher="mc"`` or ``"type-2"``
``step.draw_noise(params, state, *batch, generator=)`` draws what a refreshing step would (one
uniform draw per output element: the labels of the factors and of the diagonal estimate).

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
from torch.func import vjp

from .._base import _checks, _context, _tree
from .._base._types import PyTree
from ..kron import _kron
from ..kron._kron import FISHERS, Fisher
from ..kron._layers import Layout, Recorder, plan
from ..kron.kfac import factor_sums
from ..losses import Loss
from . import _base, _kfac_diag, _kfac_factors
from ._kfac_factors import FACTORS as _FACTORS
from ._lm import MAX_DAMPING, lm_damping, reduction_ratio
from ._qmodel import quadratic_step

__all__ = ["KFACInfo", "kfac"]

_NAME = "kfac"
_REJECT = 2.0  # the damping's extra factor after an undone step
_FIELDS = ("count", "damping", "velocity", "diag", *_FACTORS)


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
    rejected: torch.Tensor
    """Whether the step was undone (``reject_steps``; always false without it)."""


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
    reject_steps: bool = True,
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
            ``"mc"`` takes ``generator`` or ``noise`` in ``step`` on refreshing steps, and so
            does ``"type-2"`` when some leaf is no layer's weight (the labels of its
            diagonal estimate).
        weight_decay: :math:`\eta \ge 0`, an L2 term :math:`\tfrac{\eta}{2}\lVert\theta
            \rVert^2` added to the objective (and to the curvature).
        reject_steps: undo a step that raised the batch objective (or made it NaN): the
            parameters and the previous update stay as they were and the damping, after the
            Levenberg-Marquardt rule, doubles (within :math:`[10^{-8}, 10^8]`). Traced as
            ``torch.where`` on the update, so it compiles; it costs the forward pass that
            ``adapt_damping`` already runs (one more without it).

    Returns:
        An :class:`~hessfunc.optim.Optimizer` ``(init, step)``: ``init(params) -> state``;
        ``step(params, state, *batch, generator=None, noise=None, refresh=None) -> (params,
        state, info)``, new parameters (the inputs are not modified), the new state and a
        :class:`KFACInfo`. The state is ``{"kfac": {...}}``: ``count`` and ``damping`` (0-d),
        ``velocity`` (the previous update, like ``params``), ``diag`` (the running diagonal
        :math:`\bar d` at each uncovered leaf, its shape) and the factor trees ``A``, ``G``,
        ``A_values``, ``A_vectors``, ``G_values``, ``G_vectors``, each shaped like ``params``
        in structure: a block's tensors sit at its weight leaf (its bias leaf if it has no
        weight), every other leaf holds an empty ``(0,)`` tensor (all of them before the first
        step). ``step.update_every`` is ``update_every``; with ``fisher="mc"`` or
        ``"type-2"``, ``step.draw_noise(params, state, *batch, generator=)`` draws what a
        refreshing step would.

    Cost:
        Per step one gradient (a forward and a backward pass) whose pullback, transposed, also
        gives the quadratic model's two Jacobian-vector products (two more backward-sized
        passes, no new forward pass), one more forward pass with ``adapt_damping`` or
        ``reject_steps``, on refreshing steps one more backward pass for the uncovered leaves'
        diagonal (``"type-2"``, ``"mc"``; none when every leaf is covered), the
        factor collection of :func:`hessfunc.kfac` on refreshing steps only (eager and
        compiled) and per block four small matrix products; on inversion steps two symmetric
        eigendecompositions per block. Memory: per block :math:`\bar A, \bar G` and their
        eigenvectors, plus one copy of the parameters.

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
    if not isinstance(reject_steps, bool):
        raise TypeError(f"{where}: reject_steps must be a bool, got {reject_steps!r}.")
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
        empty = _tree.tree_map(_kfac_factors.empty, params)
        return {
            _NAME: {
                "count": _base.counter(params),
                "damping": _base.scalar(params, float(damping)),
                "velocity": _tree.zeros_like(params),
                "diag": empty,
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
        for key in ("diag", *_FACTORS):
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
        if fisher == "empirical" and (generator is not None or noise is not None):
            raise ValueError(
                f"{step_where}: generator and noise are only used with fisher='mc' or "
                "'type-2' (the labels of the uncovered leaves' diagonal); got "
                "fisher='empirical'."
            )
        if fisher == "mc" and collect:  # steps that keep the factors draw nothing
            _kron.check(
                step_where, model_fn, loss, params, fisher, generator, noise, 1, False, None
            )
        elif fisher == "type-2" and collect and (generator is not None or noise is not None):
            _base.check_random(step_where, True, generator, noise, "fisher='type-2'")

        # the gradient; the forward pass's pullback also gives the quadratic model's
        # Jacobian-vector products (step 4) and the uncovered leaves' diagonal estimate, a
        # second derivative: kernels with right double backwards (math attention, composite
        # norms; see _context)
        with _context.second_order_kernels():
            out, pullback = vjp(lambda q: model_fn(q, *batch), params)
            value, loss_pullback = vjp(loss, out)
            loss_grads = pullback(loss_pullback(torch.ones_like(value))[0])[0]
        # the uniform draws of a refreshing step: the factor build's labels ("mc") and the
        # uncovered leaves' diagonal estimate share them (the same numbers kron.collect draws)
        if fisher != "empirical" and collect and noise is None and generator is not None:
            shape = (1, *loss.noise_shape(out))
            noise = torch.rand(shape, generator=generator, dtype=out.dtype, device=generator.device)
            noise = noise.to(out.device)
        if noise is not None and tuple(noise.shape) != (1, *loss.noise_shape(out)):
            raise ValueError(
                f"{step_where}: noise has shape {tuple(noise.shape)}; expected (1, "
                f"*loss_fn(*batch).noise_shape(outputs)) = {(1, *loss.noise_shape(out))}, as "
                "step.draw_noise(...) makes it."
            )

        # 1. the layers, and on refreshing steps the batch's factors folded into the averages
        if collect:
            p = _kron.collect(
                step_where, model_fn, loss, params, batch, fisher=fisher, generator=None,
                noise=noise if fisher == "mc" else None, mc_samples=1, separate_bias=False,
                chunk_size=None,
            )  # fmt: skip
            layout = p.layout
        else:
            layout = find_layout(params, batch)
        if not layout.blocks:
            raise ValueError(
                f"{step_where}: no leaf of params is the weight or bias of a layer inside "
                "model_fn, so there is nothing to factor; K-FAC needs layer weights."
            )
        idx = _kfac_diag.uncovered(layout)
        factors = _kfac_factors
        if not first:
            factors.check_layout(step_where, inner["A"], layout)
            _kfac_diag.check(step_where, inner["diag"], params, idx)
        if fisher == "type-2" and collect and idx and noise is None:
            raise ValueError(
                f"{step_where}: leaves no layer covers ({', '.join(layout.uncovered_paths)}) "
                "get a diagonal curvature estimated at labels drawn from the model: pass "
                "generator=torch.Generator().manual_seed(...) or noise=step.draw_noise(params, "
                "state, *batch, generator=g) on refreshing steps."
            )
        if not first:
            A_old, G_old = factors.unpack(inner["A"], layout), factors.unpack(inner["G"], layout)
        if first:
            K = factor_sums(p)[0]
            A, G = list(K.A), list(K.G)
        elif update:
            K = factor_sums(p)[0]
            A, G = factors.average(A_old, K.A, ema), factors.average(G_old, K.G, ema)
        else:
            A, G = A_old, G_old
        # the uncovered leaves' diagonal, on the same steps and with the same ema
        estimate = None
        if collect and idx:
            with _context.second_order_kernels():
                estimate = _kfac_diag.estimate(
                    step_where, fisher, loss, out, pullback, loss_grads, noise, idx
                )
        diag = _kfac_diag.average(params, None if first else inner["diag"], estimate, idx, ema)

        # 2. inversion every invert_every steps (a torch.cond on the step count)
        old = None if first else [factors.unpack(inner[k], layout) for k in _FACTORS[2:]]
        va, qa, vg, qg = factors.eigen(A, G, old, None if first else count % invert_every == 0)
        eig_a = list(zip(va, qa, strict=True))
        eig_g = list(zip(vg, qg, strict=True))

        # 3. preconditioned direction: K-FAC on the blocks, the damped diagonal elsewhere
        grads, h0 = loss_grads, value
        if weight_decay:
            grads = _tree.axpy(weight_decay, params, grads)
            h0 = value + 0.5 * weight_decay * _tree.vdot(params, params)
        shift = lam + weight_decay
        solved = factors.precondition("hessfunc.optim.kfac", layout, eig_a, eig_g, grads, shift)
        solved = _kfac_diag.apply(solved, grads, diag, idx, shift)
        direction = _tree.scale(-1.0, solved)

        # 4. exact quadratic model along (direction, previous update)
        chosen = quadratic_step(
            out, pullback, loss, grads, direction, inner["velocity"], lam, weight_decay, lr,
            momentum,
        )  # fmt: skip
        new_params = _tree.add(params, chosen.update)

        # 5. Levenberg-Marquardt damping from the reduction ratio
        if adapt_damping or reject_steps:
            h1 = objective(new_params, batch, loss)
        if adapt_damping:
            rho = reduction_ratio(h0, h1, chosen.predicted)
            new_lam = lm_damping(lam, rho)
        else:
            rho = torch.full_like(h0, torch.nan)
            new_lam = lam
        velocity = chosen.update
        if reject_steps:  # a step that raised the batch objective (or gave NaN) is undone
            rejected = torch.isnan(h1) | (h1 > h0)
            new_params = _tree.tree_map(
                lambda new, old: torch.where(rejected, old, new), new_params, params
            )
            velocity = _tree.tree_map(
                lambda new, old: torch.where(rejected, old, new), velocity, inner["velocity"]
            )
            new_lam = torch.where(rejected, new_lam * _REJECT, new_lam).clamp(max=MAX_DAMPING)
        else:
            rejected = torch.zeros_like(h0, dtype=torch.bool)

        packed = {
            key: factors.pack(params, layout, vals)
            for key, vals in zip(_FACTORS, (A, G, va, qa, vg, qg), strict=True)
        }
        new_state = {
            _NAME: {
                "count": count + 1,
                "damping": new_lam,
                "velocity": velocity,
                "diag": diag,
                **packed,
            }
        }
        info = KFACInfo(
            loss=value.detach(), damping=lam, lr=chosen.lr, momentum=chosen.momentum, rho=rho,
            predicted=chosen.predicted, rejected=rejected,
        )  # fmt: skip
        return new_params, new_state, info

    marked = _base.mark(
        step, update_every=update_every, draw_noise=draw_noise if fisher != "empirical" else None
    )
    return _base.Optimizer(init, marked)
