"""Identities of exact curvature as Hypothesis properties over generated models and pytrees."""

import torch
from conftest import assert_close, tol
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree
from hessfunc.testing import directions_like, models, tree_problems


def _check_identities(problem, u, v):
    f, params, args = problem
    Hv = hessfunc.hvp(f, params, v, *args)
    # the other AD mode
    assert_close(hessfunc.hvp(f, params, v, *args, mode="rev-rev"), Hv)
    # the dense matrix (chunked) times v
    H = hessfunc.hessian_matrix(f, params, *args, chunk_size=7)
    flat_hv = hessfunc.ravel(Hv)[0]
    torch.testing.assert_close(flat_hv, H @ hessfunc.ravel(v)[0], **tol("exact", flat_hv.dtype))
    # symmetry <u, Hv> = <Hu, v>
    Hu = hessfunc.hvp(f, params, u, *args)
    torch.testing.assert_close(_tree.vdot(u, Hv), _tree.vdot(Hu, v), **tol("exact", flat_hv.dtype))
    # linearity: H(2u - v) = 2Hu - Hv
    w = _tree.axpy(2.0, u, _tree.scale(-1.0, v))
    assert_close(hessfunc.hvp(f, params, w, *args), _tree.axpy(2.0, Hu, _tree.scale(-1.0, Hv)))


@given(data=st.data(), problem=models())
def test_identities_on_generated_models(data, problem):
    u = data.draw(directions_like(problem.params))
    v = data.draw(directions_like(problem.params))
    _check_identities(problem, u, v)


@given(data=st.data(), problem=tree_problems())
def test_identities_on_generated_pytrees(data, problem):
    u = data.draw(directions_like(problem.params))
    v = data.draw(directions_like(problem.params))
    _check_identities(problem, u, v)


@given(data=st.data(), problem=models(kinds=("mlp",)))
def test_block_hessian_agrees_with_the_matrix(data, problem):
    f, params, args = problem
    blocks = hessfunc.hessian(f)(params, *args)
    H = hessfunc.hessian_matrix(f, params, *args)
    assert_close(blocks, _tree.blocks_from_matrix(H, params))
    assert_close(H, H.T)
