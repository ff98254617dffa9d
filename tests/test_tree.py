from typing import NamedTuple

import optree
import pytest
import torch
from conftest import version
from hypothesis import given
from hypothesis import strategies as st

import hessfunc
from hessfunc._base import _tree


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


def test_dicts_ravel_in_insertion_order():
    tree = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([3.0])}
    flat, _ = hessfunc.ravel(tree)
    assert flat.tolist() == [1.0, 2.0, 3.0]


def test_ravel_follows_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    _, params = hessfunc.from_module(model)
    flat, _ = hessfunc.ravel(params)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, expected)


def test_nested_roundtrip_restores_structure_shapes_dtypes():
    tree = {
        "z": (torch.randn(2, 3), [torch.tensor(5.0, dtype=torch.float32)]),
        "a": Pair(torch.randn(4, dtype=torch.float32), torch.randn(1, 1)),
    }
    flat, unravel = hessfunc.ravel(tree)
    assert flat.dtype == torch.float64 and flat.shape == (2 * 3 + 1 + 4 + 1,)
    back = unravel(flat)
    assert isinstance(back["a"], Pair) and isinstance(back["z"], tuple)
    for x, y in zip(_tree.tree_leaves(tree), _tree.tree_leaves(back), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def test_unravel_rejects_wrong_length_and_ravel_rejects_non_tensors():
    _, unravel = hessfunc.ravel({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="vmap"):
        unravel(torch.zeros(4))
    with pytest.raises(TypeError, match=r"hessfunc.ravel.*\['w'\]"):
        hessfunc.ravel({"w": 1.0})


def test_unravel_composes_with_vmap():
    tree = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}
    _, unravel = hessfunc.ravel(tree)
    batch = torch.arange(14.0).reshape(2, 7)
    out = torch.func.vmap(unravel)(batch)
    assert out["w"].shape == (2, 2, 2) and torch.equal(
        out["b"][1], torch.tensor([11.0, 12.0, 13.0])
    )


def test_blocks_from_matrix_layout():
    tree = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    M = torch.arange(64.0).reshape(8, 8)
    blocks = _tree.blocks_from_matrix(M, tree)
    assert blocks["w"]["b"].shape == (2, 3, 2)
    assert torch.equal(blocks["w"]["b"].reshape(6, 2), M[:6, 6:])
    assert torch.equal(blocks["b"]["w"].reshape(2, 6), M[6:, :6])


leaf_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
trees = st.recursive(
    leaf_shapes.map(lambda s: torch.randn(s)),
    lambda kids: st.one_of(
        st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=3).map(tuple),
    ),
    max_leaves=6,
)


@given(trees)
def test_roundtrip_property(tree):
    flat, unravel = hessfunc.ravel(tree)
    leaves = _tree.tree_leaves(tree)
    assert flat.numel() == sum(x.numel() for x in leaves)
    back = unravel(flat)
    assert _tree.tree_structure(back) == _tree.tree_structure(tree)
    for x, y in zip(leaves, _tree.tree_leaves(back), strict=True):
        assert torch.equal(x, y)
    # tree arithmetic agrees with the flat view
    assert torch.allclose(_tree.vdot(tree, tree), flat @ flat)


@pytest.mark.compile
@pytest.mark.xfail(
    version(torch.__version__) < (2, 13) and version(optree.__version__) >= (0, 20),
    reason="optree 0.20 compares sys.version_info with a tuple when it looks up a list or tuple "
    "node, which torch 2.11's dynamo cannot trace; use optree < 0.20 with torch < 2.13",
    strict=True,
)
def test_ravel_order_is_the_same_under_compile_and_unravel_crosses_the_boundary():
    tree = {"b": torch.ones(2), "a": (torch.zeros(3), torch.full((), 5.0))}
    compiled = torch.compile(lambda t: hessfunc.ravel(t)[0] * 2, fullgraph=True)
    assert compiled(tree).tolist() == [2.0, 2.0, 0.0, 0.0, 0.0, 10.0]
    # an unravel made outside the compiled region works inside it
    flat, unravel = hessfunc.ravel(tree)
    inside = torch.compile(lambda z: unravel(3 * z), fullgraph=True)(flat)
    assert list(inside) == ["b", "a"] and inside["a"][1].shape == ()
    assert inside["a"][1].item() == 15.0
