"""Shared test configuration: float64 by default, one tolerance table, Hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_default_dtype(torch.float64)

# One table of tolerances, keyed by dtype and by what is compared (see STYLE.md's observations:
# exact-vs-exact agrees to rounding; finite differences lose about half the digits).
TOL = {
    # exact vs exact: two AD modes, chunked vs unchunked, compiled vs eager, closed forms
    ("exact", torch.float64): dict(rtol=1e-10, atol=1e-10),
    ("exact", torch.float32): dict(rtol=1e-5, atol=1e-5),
    # two routes to the same finite sums of products (reordered or regrouped, no solve between)
    ("same-sums", torch.float64): dict(rtol=1e-12, atol=1e-12),
    # finite differences of exact gradients vs exact HVP
    ("fd", torch.float64): dict(rtol=1e-6, atol=1e-7),
    ("fd", torch.float32): dict(rtol=1e-2, atol=1e-3),
    # two finite-difference results that differ only in rounding (compiled vs eager, vmapped vs
    # looped, rescaled direction): rounding of the gradient amplified by 1/h ~ u^(-1/3)
    ("fd-vs-fd", torch.float64): dict(rtol=1e-8, atol=1e-9),
    ("fd-vs-fd", torch.float32): dict(rtol=1e-3, atol=1e-4),
    # the op and module sweeps (tests/sweep.py): an exact product vs a Richardson-extrapolated
    # difference on a step ladder, whose own error estimate is added to this tolerance ...
    ("fd-sweep", torch.float64): dict(rtol=1e-6, atol=1e-9),
    # ... and which counts as converged (else the sample is skipped) when its two best
    # estimates agree to this
    ("fd-converged", torch.float64): dict(rtol=1e-5, atol=1e-9),
    # ... and second differences of the VALUE (u^T H v from four values of the objective): they
    # lose one more factor of 1/h to rounding and see kinks and ties across the diagonals u +- v
    # that the smoothness test along v misses (max-pooling ties, a near-degenerate svd: relative
    # disagreements of 2e-6 to 1e-4 in the full sweep), while a pseudo-gradient is off by 1e-2
    # to 1 (a padding row, repeated max_unpool indices)
    ("fd-value", torch.float64): dict(rtol=1e-3, atol=1e-9),
    ("fd-value", torch.float32): dict(rtol=1e-2, atol=1e-3),
}


def version(text: str) -> tuple[int, int]:
    """``"2.11.0+cu130"`` -> ``(2, 11)``, for tests that mark upstream problems of one release."""
    return tuple(int(x) for x in text.split(".")[:2])


def tol(kind: str, dtype: torch.dtype) -> dict:
    return TOL[(kind, dtype)]


settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked 'full' (the whole compile zoo and the op/module sweeps)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``full`` run with ``pytest --full`` (or ``HESSFUNC_FULL=1``) only."""
    if config.getoption("--full") or os.environ.get("HESSFUNC_FULL"):
        return
    skip = pytest.mark.skip(reason="part of the full zoo/sweep: run with pytest --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its verdicts or timings do not depend on how many cores the machine has, and on a shared
    small machine two threads fighting other processes run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_close(actual, expected, kind: str = "exact", dtype: torch.dtype | None = None) -> None:
    """Leafwise ``torch.testing.assert_close`` with the table's tolerance for the dtype."""
    from hessfunc._base import _tree

    la, le = _tree.tree_leaves(actual), _tree.tree_leaves(expected)
    assert _tree.tree_structure(actual) == _tree.tree_structure(expected)
    for a, e in zip(la, le, strict=True):
        torch.testing.assert_close(a, e, **tol(kind, dtype or e.dtype))
