"""The bad-input table: every error names the function and the fix, before any large work."""

import pytest
import torch

import hessfunc

W = {"w": torch.randn(3), "b": torch.randn(2)}
V = {"w": torch.randn(3), "b": torch.randn(2)}
X = torch.randn(4, 3)


def f(p, x):
    return (x @ p["w"]).pow(2).sum() + p["b"].pow(3).sum()


def nonscalar(p, x):
    return x @ p["w"]


CASES = {
    "non-scalar f": (
        lambda: hessfunc.hvp(nonscalar, W, V, X),
        ValueError,
        r"hessfunc.hvp.*scalar.*\(4,\).*\.sum\(\)",
    ),
    "non-scalar f (matrix)": (
        lambda: hessfunc.hessian_matrix(nonscalar, W, X),
        ValueError,
        r"hessian_matrix.*scalar",
    ),
    "non-tensor f": (
        lambda: hessfunc.hvp(lambda p, x: (f(p, x), 1), W, V, X),
        TypeError,
        r"hessfunc.hvp.*aux",
    ),
    "integer f": (
        lambda: hessfunc.hvp(lambda p, x: f(p, x).long(), W, V, X),
        (TypeError, RuntimeError),
        r"floating|integer|differentiable",
    ),
    "v structure": (
        lambda: hessfunc.hvp(f, W, {"w": V["w"]}, X),
        ValueError,
        r"hessfunc.hvp.*structure of params",
    ),
    "v shape": (
        lambda: hessfunc.hvp(f, W, {"w": torch.zeros(4), "b": V["b"]}, X),
        ValueError,
        r"v\['w'\] has shape \(4,\)",
    ),
    "v dtype": (
        lambda: hessfunc.hvp(f, W, {"w": V["w"].float(), "b": V["b"]}, X),
        TypeError,
        r"dtype.*cast v",
    ),
    "v device": (
        lambda: hessfunc.hvp(f, W, {"w": V["w"].to("meta"), "b": V["b"]}, X),
        ValueError,
        r"v\['w'\] is on meta.*\.to\(device\)",
    ),
    "params mixed devices": (
        lambda: hessfunc.hvp(f, {"w": W["w"].to("meta"), "b": W["b"]}, V, X),
        ValueError,
        r"one device",
    ),
    "integer leaf": (
        lambda: hessfunc.hvp(f, {"w": W["w"], "b": torch.arange(2)}, V, X),
        TypeError,
        r"params\['b'\].*int64.*floating",
    ),
    "bool leaf": (
        lambda: hessfunc.hessian_matrix(f, {"w": W["w"], "b": torch.ones(2, dtype=torch.bool)}, X),
        TypeError,
        r"torch.bool",
    ),
    "non-tensor leaf": (
        lambda: hessfunc.hvp(f, {"w": W["w"], "b": 2.0}, V, X),
        TypeError,
        r"must be a torch.Tensor.*\*args",
    ),
    "empty pytree": (lambda: hessfunc.hvp(f, {}, {}, X), ValueError, r"hessfunc.hvp.*empty pytree"),
    "empty pytree (matrix)": (
        lambda: hessfunc.hessian_matrix(f, {}, X),
        ValueError,
        r"empty pytree",
    ),
    "unknown mode": (
        lambda: hessfunc.hvp(f, W, V, X, mode="rev-fwd"),
        ValueError,
        r"hessfunc.hvp.*mode='rev-fwd'.*'fwd-rev'",
    ),
    "unknown mode (hessian)": (
        lambda: hessfunc.hessian(f, mode="fwd"),
        ValueError,
        r"hessfunc.hessian.*mode",
    ),
    "bad chunk_size": (
        lambda: hessfunc.hvps(f, W, {k: t[None] for k, t in V.items()}, X, chunk_size=0),
        ValueError,
        r"chunk_size",
    ),
    "hvps unbatched vs": (
        lambda: hessfunc.hvps(f, W, V, X),
        ValueError,
        r"hessfunc.hvps.*leading batch axis",
    ),
    "hvps ragged batch": (
        lambda: hessfunc.hvps(f, W, {"w": torch.zeros(2, 3), "b": torch.zeros(3, 2)}, X),
        ValueError,
        r"same leading batch size",
    ),
    "over budget": (
        lambda: hessfunc.hessian_matrix(f, torch.zeros(10**6), X),
        MemoryError,
        r"GiB.*hessfunc.hvp",
    ),
    "argnums out of range": (
        lambda: hessfunc.hessian(f, argnums=2)(W, X),
        IndexError,
        r"argnums=2 is out of range for 2",
    ),
    "argnums type": (
        lambda: hessfunc.hessian(f, argnums=1.0),
        TypeError,
        r"argnums must be an int",
    ),
    "argnums repeated": (
        lambda: hessfunc.hessian(f, argnums=(0, -2))(W, X),
        ValueError,
        r"names an argument twice",
    ),
    "argnums selects integers": (
        lambda: hessfunc.hessian(f, argnums=1)(W, torch.arange(3)),
        TypeError,
        r"int64",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name):
    call, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        call()
