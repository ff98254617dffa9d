r"""A ``torch.optim``-style driver for ``nn.Module`` users, over any optimizer of the contract.

This is the one place in hessfunc that changes a module, on purpose: :meth:`ModuleOptimizer.step`
writes the new parameters into the module's trainable parameters in place (under
``torch.no_grad``, so ``.grad``, ``requires_grad`` and the training flag are untouched). Every
other function of hessfunc leaves modules alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .._base import _tree
from ._base import Optimizer

__all__ = ["ModuleOptimizer"]

WHERE = "hessfunc.optim.ModuleOptimizer(module, optimizer)"


class ModuleOptimizer:
    r"""Drive an :class:`~hessfunc.optim.Optimizer` on a module's parameters, ``torch.optim``-style.

    The parameters are the module's trainable ones (``requires_grad=True``) as a dict in
    ``named_parameters()`` order, the structure :func:`hessfunc.from_module` gives, so build the
    optimizer with that ``apply`` as ``model_fn``. Each :meth:`step` calls ``optimizer.step`` on
    them and copies the result into the module in place.

    **Schedule and randomness.** A Python counter ``t`` (kept here, saved in
    :meth:`state_dict`) picks the refresh, ``refresh=(t % step.update_every == 0)``, for
    optimizers whose step has that attribute. For random optimizers (a step with
    ``draw_noise``) ``generator`` is required; eager steps pass it, compiled steps pass the
    uniform draws ``step.draw_noise(...)`` makes from it (on refreshing steps only, so both draw
    the same numbers in the same order and give the same parameters).

    **Compiling.** ``compile=True`` runs the step through ``torch.compile(step,
    fullgraph=True, **compile_options)``: at most two graphs (with and without the refresh) and
    no recompilation after both have run, for batches of fixed shapes.

    Args:
        module: the ``nn.Module`` whose parameters are trained.
        optimizer: an :class:`~hessfunc.optim.Optimizer`.
        generator: a ``torch.Generator`` for random optimizers.
        compile: compile the step with ``fullgraph=True``.
        compile_options: passed to ``torch.compile``.

    Example:
        >>> import torch, hessfunc
        >>> torch.manual_seed(0) and None
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> apply, params = hessfunc.from_module(lin)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> opt = hessfunc.optim.hessian_free(lambda p, X, y: apply(p, X),
        ...     lambda X, y: hessfunc.losses.MSELoss(y), damping=0.0, maxiter=2)
        >>> driver = hessfunc.optim.ModuleOptimizer(lin, opt)
        >>> info = driver.step(X, y)
        >>> [round(w, 10) for w in lin.weight.data[0].tolist()]  # the least-squares solution
        [1.0, 2.0]
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        *,
        generator: torch.Generator | None = None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{WHERE}: module must be an nn.Module, got {type(module).__name__}.")
        if not (
            isinstance(optimizer, tuple)
            and len(optimizer) == 2
            and callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "step", None))
        ):
            raise TypeError(
                f"{WHERE}: optimizer must be a hessfunc.optim.Optimizer (init, step), e.g. "
                f"hessfunc.optim.sophia(...); got {type(optimizer).__name__}."
            )
        self._random = hasattr(optimizer.step, "draw_noise")
        if self._random and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"{WHERE}: this optimizer draws random numbers: pass "
                "generator=torch.Generator().manual_seed(seed) (the global RNG is never used)."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{WHERE}: generator must be a torch.Generator or None.")
        self.module = module
        self.optimizer = optimizer
        self.generator = generator
        self.every: int | None = getattr(optimizer.step, "update_every", None)
        self._compiled = compile
        self._step: Callable[..., Any] = (
            torch.compile(optimizer.step, fullgraph=True, **(compile_options or {}))
            if compile
            else optimizer.step
        )
        self.t = 0
        self.state = optimizer.init(self._params())

    def _params(self) -> dict[str, torch.Tensor]:
        params = {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"{WHERE}: the module has no trainable parameters.")
        return params

    def step(self, *batch: Any) -> NamedTuple:
        """One optimizer step on ``batch``; the module's parameters are updated in place.

        Returns:
            The optimizer's ``info`` (its first field is the loss before the step).
        """
        params = self._params()
        kwargs: dict[str, Any] = {}
        refresh = True
        if self.every is not None:
            refresh = self.t % self.every == 0
            kwargs["refresh"] = refresh
        if self._random and refresh:
            if self._compiled:
                kwargs["noise"] = self.optimizer.step.draw_noise(
                    params, self.state, *batch, generator=self.generator
                )
            else:
                kwargs["generator"] = self.generator
        new, self.state, info = self._step(params, self.state, *batch, **kwargs)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if name in new:
                    p.copy_(new[name])
        self.t += 1
        return info

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, the step counter and the generator's state (copies)."""
        return {
            "state": _tree.tree_map(torch.clone, self.state),
            "t": self.t,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the run then continues bit for bit."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "t", "generator"}:
            raise ValueError(
                f"{WHERE}.load_state_dict: expected the dict of ModuleOptimizer.state_dict() "
                "with keys 'state', 't', 'generator'."
            )
        params = self._params()
        ref = self.optimizer.init(params)
        if _tree.tree_structure(ref) != _tree.tree_structure(state_dict["state"]):
            raise ValueError(
                f"{WHERE}.load_state_dict: the saved state has another structure than this "
                "optimizer's state for this module (another optimizer or other parameters)."
            )
        self.state = _tree.tree_map(torch.clone, state_dict["state"])
        self.t = int(state_dict["t"])
        if state_dict["generator"] is not None:
            if self.generator is None:
                raise ValueError(
                    f"{WHERE}.load_state_dict: the saved run had a generator; construct the "
                    "ModuleOptimizer with one."
                )
            self.generator.set_state(state_dict["generator"])
