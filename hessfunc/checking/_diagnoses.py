"""The checkers' diagnoses: which check failed, and the likely cause in words.

:mod:`hessfunc.checking.check` measures; this module turns the measured errors into the
message of its ``AssertionError`` / ``CheckReport``. The causes name what can make each check
fail, including backward formulas that are not the derivative of their forward
(pseudo-gradients) and a loss computed in a less precise dtype than the parameters, which would
otherwise read as a wrong derivative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._base import _checks
from .._base._types import PyTree

_FD_NOTE = (
    "To rule out the finite differences themselves, rerun with order=4 or another step (e.g. "
    "10x and 0.1x the reported step): an error that changes by orders of magnitude with the step "
    "is finite-difference error (f not smooth near params, e.g. ReLU or max-pool kinks, or a "
    "step too small for the dtype), while a real bug gives an error that stays put."
)

_CAUSES = {
    "grad": (
        "the gradient of f disagrees with finite differences of f itself: the backward formula "
        "of an op in f is not the derivative of its forward (a pseudo-gradient: a custom "
        "autograd.Function with a surrogate backward such as a straight-through estimator, a "
        "hook that changes gradients, or nn.Embedding's padding_idx, whose row torch zeroes on "
        "purpose and hessfunc holds constant: check with padding_idx=None to compare), or f is "
        "not a deterministic, smooth function of params (dropout, randomness, in-place state, "
        "or a kink at params)."
    ),
    "hvp": (
        "the HVP disagrees with finite differences of the gradient while the gradient itself is "
        "right: the backward of an op in f is probably not differentiable (a custom "
        "autograd.Function whose backward uses non-differentiable ops or .detach()), or a "
        "second-derivative rule of an op is wrong."
    ),
    "fwd-rev": (
        "mode='fwd-rev' disagrees with finite differences while mode='rev-rev' agrees: the "
        "forward-mode (jvp) rule of an op in f is wrong (a custom autograd.Function's jvp "
        "staticmethod, or a forward-over-reverse formula of a fused kernel); use mode='rev-rev'."
    ),
    "rev-rev": (
        "mode='rev-rev' disagrees with finite differences while mode='fwd-rev' agrees: the "
        "double-backward of an op in f is wrong (a custom autograd.Function's backward that "
        "is not differentiable, while its jvp is right); use mode='fwd-rev'."
    ),
    "symmetry": (
        "<u, Hv> != <Hu, v>: the computed Hessian operator is not symmetric, so a "
        "second-derivative rule in f is wrong, an op's backward is not the derivative of its "
        "forward (a custom autograd.Function with a surrogate gradient: differentiating the "
        "surrogate gives no symmetric matrix, and the two modes then differ too), or f is not "
        "twice continuously differentiable at params."
    ),
    "precision": (
        "f returns its value in {out} while params are {params}: the loss is computed in lower "
        "precision (a cast such as logits.float(), which transformers' causal-LM losses apply), "
        "so the finite differences measure {out} rounding, not a derivative; this is not a wrong "
        "backward formula. Compute the loss in {params} (e.g. from the model's .logits) or "
        "check with the tolerances of {out} (rtol=, atol=)."
    ),
    "matrix-vs-hvp": (
        "the dense Hessian disagrees with the matrix-free product along the same direction: "
        "a bug in hessfunc or in an op's batching (vmap) rule; please report it."
    ),
    "raised": (
        "autodiff raised instead of returning a value; see the exception text. For missing "
        "forward-mode AD pass modes=('rev-rev',)."
    ),
}


def diagnose(
    where: str,
    errors: dict[str, float],
    raised: dict[str, str],
    rtol: float,
    lower: tuple[str, str] | None = None,
) -> str:
    failed = [name for name, e in errors.items() if not e <= rtol]
    if not failed:
        return ""
    lines = [f"{where} failed (rtol={rtol:g}):"]
    for name, e in errors.items():
        mark = "FAILED" if name in failed else "ok"
        extra = f" (raised {raised[name]})" if name in raised else ""
        lines.append(f"  {name}: max relative error {e:.3g} [{mark}]{extra}")
    second_all = [n for n in errors if n.startswith(("hvp[", "hessian["))]
    second = [n for n in failed if n in second_all]
    if lower is not None and not (second and all(n in raised for n in second)):
        cause = _CAUSES["precision"].format(out=lower[0], params=lower[1])
    elif "grad" in failed:
        cause = _CAUSES["grad"]
    elif second and all(n in raised for n in second):
        cause = _CAUSES["raised"]
    elif len(second) == 1 and len(second_all) > 1:
        cause = _CAUSES[second[0].split("[")[1].rstrip("]")]
    elif second:
        what = "HVP" if second[0].startswith("hvp[") else "Hessian"
        cause = _CAUSES["hvp"].replace("the HVP", f"the {what}", 1)
    elif "symmetry" in failed:
        cause = _CAUSES["symmetry"]
    else:
        cause = _CAUSES[failed[0]]
    lines.append(f"Likely cause: {cause}")
    lines.append(_FD_NOTE)
    return "\n".join(lines)


def lower_precision(f: Callable, params: PyTree, args: tuple) -> tuple[str, str] | None:
    """``(dtype of f's value, dtype of params)`` when the value is the less precise, else None.

    One evaluation of ``f``; the checkers run eagerly.
    """
    finest = _checks.most_precise(params)
    try:
        with torch.no_grad():
            out = f(params, *args)
    except Exception:  # noqa: BLE001 - the checks themselves report what f raises
        return None
    if finest is None or not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    if torch.finfo(out.dtype).eps > torch.finfo(finest).eps:
        return str(out.dtype).removeprefix("torch."), str(finest).removeprefix("torch.")
    return None
