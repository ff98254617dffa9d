"""Two gloo ranks on this CPU: dataset products across processes, DDP, FSDP2, tensor parallel.

The ranks are started once for the module (about 4 s of start-up each time) and run every check
in ``tests/dist_checks.py``; each check becomes one test here. Reproduce outside pytest with
``python tests/dist_checks.py``.
"""

from __future__ import annotations

import dist_checks
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed+gloo"
)


@pytest.fixture(scope="module")
def results():
    return dist_checks.launch(world=2, timeout=240)


@pytest.mark.parametrize("name", list(dist_checks.CHECKS))
def test_two_ranks(results, name):
    failures = []
    for rank, ranked in enumerate(results):
        outcome = ranked.get(name, {"outcome": "not reached"})["outcome"]
        if outcome != "ok":
            exit_note = ranked.get("<exit>", {}).get("outcome", "")
            failures.append(f"rank {rank}: {outcome}\n{exit_note}")
    assert not failures, "\n".join(failures)


def test_both_ranks_exited_cleanly(results):
    exits = [r["<exit>"]["outcome"] for r in results if "<exit>" in r]
    assert not exits, "\n".join(exits)
