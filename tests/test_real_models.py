"""Curvature of real models: tiny Hugging Face transformers configurations in float64.

Every product is checked against references that use the VALUE of the function only (second
differences of ``f`` along ``u``, ``v``, ``u + v``; of the model's outputs and the loss for the
GGN), against its own transpose (symmetry), and against the other AD mode. The models and the
references live in ``tests/real_models.py``; ``docs/guides/model_zoo.md`` describes both and
the numbers measured on them.

The default run checks a fast subset (``real_models.FAST``); ``pytest --full`` checks every
family. The whole module is skipped where transformers is not installed.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

import real_models as rm  # noqa: E402
from conftest import tol  # noqa: E402

import hessfunc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------

EXACT = tol("exact", torch.float64)
# u^T H v against its value-based reference, u and v random unit vectors: |error| <= VALUE_RTOL
# ||Hv|| + 2 (the reference's own error estimate). Relative to ||Hv||, not to |u^T H v|: for
# random u the bilinear form is about ||Hv|| / sqrt(n), and the rounding of f's value sets an
# absolute floor. A dropped term of relative size e in Hv moves u^T H v by about e ||Hv|| /
# sqrt(n): with n ~ 10^4 the check sees e down to about 1e-6. Measured on the healthy models:
# errors 6e-13 to 4e-11 of the norm, reference error estimates 3e-11 to 1e-9.
VALUE_RTOL = 1e-8
# Lanczos top eigenpair: relative residual ||Hu - lambda u|| / |lambda| after 40 steps
EIGSH_STEPS, EIGSH_RESIDUAL = 40, 1e-8


def _marks(name: str, *extra: pytest.MarkDecorator) -> list[pytest.MarkDecorator]:
    marks = list(extra)
    if name not in rm.FAST:
        marks.append(pytest.mark.full)
    return marks


def cases() -> list:
    """Every case, marked ``full`` outside the fast subset."""
    return [pytest.param(name, marks=_marks(name), id=name) for name in rm.CASES]


@functools.cache
def case(name: str) -> rm.RealCase:
    return rm.CASES[name]()


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# Hessian-vector products


@pytest.mark.parametrize("name", cases())
def test_hvp_modes_agree_and_are_symmetric(name):
    c = case(name)
    u, v = rm.directions(c.params, 1), rm.directions(c.params, 2)
    hu = {m: hessfunc.hvp(c.f, c.params, u, *c.args, mode=m) for m in ("fwd-rev", "rev-rev")}
    hv = {m: hessfunc.hvp(c.f, c.params, v, *c.args, mode=m) for m in ("fwd-rev", "rev-rev")}
    assert _rel(_flat(hv["fwd-rev"]), _flat(hv["rev-rev"])) <= EXACT["rtol"]
    for m in ("fwd-rev", "rev-rev"):
        uhv, hu_v = rm.vdot(u, hv[m]), rm.vdot(hu[m], v)
        assert abs(float(uhv - hu_v)) <= EXACT["rtol"] * float(_flat(hv[m]).norm()), m


@pytest.mark.parametrize("name", cases())
def test_hvp_matches_second_differences_of_the_value(name):
    c = case(name)
    u, v = rm.directions(c.params, 1), rm.directions(c.params, 2)
    # the lookups' padding rows held constant, as hessfunc reads them (rm.PaddingRowsFixed)
    ref, err = rm.second_difference(
        rm.fixed_padding(c.f, c.model, c.params), c.params, u, v, c.args
    )
    for m in ("fwd-rev", "rev-rev"):
        hv = hessfunc.hvp(c.f, c.params, v, *c.args, mode=m)
        scale = float(_flat(hv).norm())
        # the reference converged: its error estimate is far below what the test allows
        assert err <= 0.5 * VALUE_RTOL * scale
        assert abs(float(rm.vdot(u, hv) - ref)) <= VALUE_RTOL * scale + 2 * err, m


# ---------------------------------------------------------------------------------------------
# Gauss-Newton


def test_richardson_sees_rounding_that_scales_like_the_truncation():
    """A second difference whose numerator has shrunk to integers of ulps, in the ratio 4 : 1
    down the ladder, is constant there: neighbours agree exactly on a wrong value (DistilBERT's
    loss in logit space gave 73, 292, 1168, 4672 ulps for 73.005 ... 4672.34, 7e-5 off). With
    each rung's rounding bound the estimate comes from the rungs above the plateau."""
    c, ulp = 1.0878639458813677e-4, torch.finfo(torch.float64).eps
    steps = [rm.STEP0 / 2**k for k in range(rm.STEPS)]
    d = [torch.tensor(c + 3e-6 * h**2 + 1e-5 * h**4, dtype=torch.float64) for h in steps]
    d[12:] = [torch.tensor(c * (1 - 7e-5), dtype=torch.float64)] * (rm.STEPS - 12)  # plateau
    plateau, err = rm.richardson(d)
    assert err == 0.0 and abs(float(plateau) - c) > 1e-5 * c  # what the ladder alone concludes
    rounding = [16 * ulp * 1.1 / (4 * h * h) for h in steps]  # loss values about 1.1
    value, err = rm.richardson(d, rounding)
    assert abs(float(value) - c) <= 2 * err < 1e-5 * c


@pytest.mark.parametrize("name", cases())
def test_ggn_vp_matches_values_modes_and_symmetry(name):
    c = case(name)
    u, v = rm.directions(c.params, 1), rm.directions(c.params, 2)
    gv = {
        m: hessfunc.ggn_vp(c.model_fn, c.loss, c.params, v, *c.args, mode=m)
        for m in ("fwd-rev", "rev-rev")
    }
    gu = hessfunc.ggn_vp(c.model_fn, c.loss, c.params, u, *c.args)
    assert _rel(_flat(gv["fwd-rev"]), _flat(gv["rev-rev"])) <= EXACT["rtol"]
    ugv = rm.vdot(u, gv["fwd-rev"])
    assert abs(float(ugv - rm.vdot(gu, v))) <= EXACT["rtol"] * float(_flat(gv["fwd-rev"]).norm())
    # positive semi-definite (cross-entropy is convex in the logits)
    assert float(rm.vdot(v, gv["fwd-rev"])) >= -EXACT["atol"]
    ref, err = rm.ggn_form(c, u, v, fixed_padding=True)
    scale = float(_flat(gv["fwd-rev"]).norm())
    assert err <= 0.5 * VALUE_RTOL * scale
    assert abs(float(ugv - ref)) <= VALUE_RTOL * scale + 2 * err


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_ggn_vp_through_a_model_output(mode):
    """``model_fn`` returns the model's own ``ModelOutput`` (a pytree with ``.logits``); the
    loss reads ``.logits``: the same GGN as through the logits alone."""
    c = case("gpt2")  # no upcasts: the raw model is the float64 model_fn
    v = rm.directions(c.params, 2)

    def loss_fn(out):
        logits = out.logits[:, :-1]
        return c.loss(logits.reshape(-1, logits.shape[-1]))

    got = hessfunc.ggn_vp(c.raw_fn, loss_fn, c.params, v, *c.args, mode=mode)
    want = hessfunc.ggn_vp(c.model_fn, c.loss, c.params, v, *c.args)
    assert _rel(_flat(got), _flat(want)) <= EXACT["rtol"]


# ---------------------------------------------------------------------------------------------
# the Hessian as an operator: the top eigenpair by Lanczos


@pytest.mark.parametrize("name", cases())
def test_eigsh_top_eigenpair(name):
    c = case(name)
    H = hessfunc.hessian_operator(c.f, c.params, *c.args)
    u, v = rm.directions(c.params, 1), rm.directions(c.params, 2)
    # the operator is the symmetric Hessian: <u, Hv> = <Hu, v>, and H v as hvp computes it
    hv = H(v)
    assert abs(float(rm.vdot(u, hv) - rm.vdot(H(u), v))) <= EXACT["rtol"] * float(_flat(hv).norm())
    assert _rel(_flat(hv), _flat(hessfunc.hvp(c.f, c.params, v, *c.args))) <= EXACT["rtol"]

    res = hessfunc.eigsh(H, rm.directions(c.params, 3), 1, num_iters=EIGSH_STEPS)
    lam = res.eigenvalues[0]
    top = {k: x[0] for k, x in res.eigenvectors.items()}
    assert abs(float(_flat(top).norm()) - 1.0) <= EXACT["rtol"]
    # the residual from an independent product (fwd-rev hvp), and the one eigsh reports
    r = float((_flat(hessfunc.hvp(c.f, c.params, top, *c.args)) - lam * _flat(top)).norm())
    assert r <= EIGSH_RESIDUAL * abs(float(lam))
    assert abs(r - float(res.residual_norms[0])) <= 1e-6 * abs(float(lam))
    # the eigenvalue is the curvature of the value of f along the eigenvector (the ResNet's
    # ReLUs put kinks within 1e-4 along it: its reference converges at smaller steps, to ~1e-7)
    ref, err = rm.second_difference(c.f, c.params, top, top, c.args)
    assert err <= 1e-6 * abs(float(lam))
    assert abs(float(lam - ref)) <= 1e-6 * abs(float(lam)) + 2 * err
    # and it is the top: no random direction has a larger Rayleigh quotient
    assert float(lam) > 0.0
    assert float(rm.vdot(v, hv)) <= float(lam)


# ---------------------------------------------------------------------------------------------
# K-FAC: which leaves the Kronecker blocks cover


def _kfac_cases() -> list:
    out = []
    for name in rm.CASES:
        out.append(pytest.param(name, marks=_marks(name), id=name))
    return out


@pytest.mark.parametrize("name", _kfac_cases())
def test_kfac_coverage(name):
    c = case(name)
    K = hessfunc.kfac(c.model_fn, c.loss, c.params, *c.args)
    covered = set(K.covered)
    uncovered = {path for path, _ in K.uncovered}
    every = {f"['{k}']" for k in c.params}
    # every leaf is either covered or listed with a reason, never both
    assert covered | uncovered == every
    assert not covered & uncovered
    named_uncovered = {f"['{k}']" for k in c.kfac_uncovered}
    assert {f"['{k}']" for k in c.kfac_covered} <= covered
    assert named_uncovered <= uncovered
    from transformers.pytorch_utils import Conv1D  # GPT-2's addmm projection, W stored (in, out)

    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    linear = {
        f"['{m}.{p}']"
        for m, mod in c.model.named_modules()
        if isinstance(mod, layers)
        for p, _ in mod.named_parameters(recurse=False)
    }
    assert linear & every  # every case has linear or convolution layers
    assert (linear & every) - named_uncovered <= covered
    # the approximation is a symmetric positive semi-definite operator
    u, v = rm.directions(c.params, 1), rm.directions(c.params, 2)
    kv = K.matvec(v)
    assert abs(float(rm.vdot(u, kv) - rm.vdot(K.matvec(u), v))) <= EXACT["rtol"] * float(
        _flat(kv).norm()
    )
    assert float(rm.vdot(v, kv)) >= -EXACT["atol"]


@pytest.mark.full
def test_kfac_covers_moe_experts():
    c = case("mixtral")
    K = hessfunc.kfac(c.model_fn, c.loss, c.params, *c.args)
    experts = {f"['{k}']" for k in c.params if ".experts." in k}
    assert experts
    assert experts <= set(K.covered)


# ---------------------------------------------------------------------------------------------
# float64 all the way: the upcasts the models make are found and neutralised


@pytest.mark.parametrize("name", cases())
def test_upcasts_are_neutralised(name):
    c = case(name)
    casts = rm.count_casts(c)
    # a family with upcasts makes some on every forward; one without makes none
    assert (casts > 0) == c.upcasts, casts
    if c.upcasts:
        # the raw model rounds through float32; the neutralised one does not
        with torch.no_grad():
            diff = _rel(c.model_fn(c.params, *c.args, neutral=False), c.model_fn(c.params, *c.args))
        assert 1e-12 < diff < 1e-5, diff


# ---------------------------------------------------------------------------------------------
# one compiled product per model kind: fullgraph, default inductor, equal to float64 eager.
# Compiling an HVP of one of these models took 30-60 s on the 2-core machine with a warm
# inductor cache and 3-4 minutes with a cold one (as on a fresh CI machine), so both run with
# --full only.


@pytest.mark.compile
@pytest.mark.parametrize(
    "name, mode",
    [
        pytest.param("resnet", "fwd-rev", id="resnet-fwd-rev", marks=pytest.mark.full),
        pytest.param("gpt2", "fwd-rev", id="gpt2-fwd-rev", marks=pytest.mark.full),
    ],
)
def test_compiled_hvp_equals_eager(name, mode):
    c = case(name)
    assert not c.upcasts  # a family without upcasts: nothing of the tests enters the graph
    torch._dynamo.reset()
    fn = lambda p, v, *a: hessfunc.hvp(c.f, p, v, *a, mode=mode)
    compiled = torch.compile(fn, fullgraph=True)
    v = rm.directions(c.params, 2)
    assert (
        _rel(_flat(compiled(c.params, v, *c.args)), _flat(fn(c.params, v, *c.args)))
        <= EXACT["rtol"]
    )
    # a new direction with the same shapes runs the same graph
    v = rm.directions(c.params, 5)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled(c.params, v, *c.args)
    assert _rel(_flat(got), _flat(fn(c.params, v, *c.args))) <= EXACT["rtol"]


def test_nothing_is_mutated():
    c = case("gpt2")
    before = {k: t.clone() for k, t in c.model.state_dict().items()}
    flags = [p.requires_grad for p in c.model.parameters()]
    v = rm.directions(c.params, 2)
    hessfunc.hvp(c.f, c.params, v, *c.args)
    hessfunc.ggn_vp(c.model_fn, c.loss, c.params, v, *c.args, mode="rev-rev")
    after = c.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in c.model.parameters()]
    assert not c.model.training
    assert all(p.grad is None for p in c.model.parameters())
