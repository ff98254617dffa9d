"""Memory estimates and the guard that refuses a dense matrix too large to hold."""

from __future__ import annotations

import os

import torch

# Share of the currently available memory a dense result may take by default. Half leaves room
# for the model, its activations and the vectorised tangents that build the matrix.
DEFAULT_SHARE = 0.5


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` right now (CPU: ``MemAvailable``; CUDA: ``mem_get_info``)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # unknown platform: assume a modest machine


def dense_bytes(n: int, itemsize: int, chunk_size: int | None) -> int:
    """Bytes to build an ``(n, n)`` matrix from ``n`` vectorised products.

    Without chunking the basis (``n x n``) and the result (``n x n``) coexist; with chunks of
    ``c`` directions the result is preallocated and each chunk adds a ``c x n`` basis and a
    ``c x n`` block of products.
    """
    if chunk_size is None or chunk_size >= n:
        return 2 * n * n * itemsize
    return (n * n + 2 * chunk_size * n) * itemsize


def _gib(b: float) -> str:
    return f"{b / 2**30:.3g} GiB"


def check_budget(
    where: str, need: int, device: torch.device, max_bytes: int | None, what: str, advice: str
) -> None:
    """Raise ``MemoryError`` when ``need`` bytes exceed the budget, before anything is allocated.

    The budget is ``max_bytes`` when given, else :data:`DEFAULT_SHARE` of the memory available
    on ``device`` now. Inside ``torch.compile`` the free memory cannot be read (file I/O and CUDA
    queries are not traceable), so only an explicit ``max_bytes`` is enforced there; the sizes
    are static, so that check runs once, at trace time.

    Args:
        where: the public call, for the message.
        need: the bytes the dense build takes.
        device: where it would be allocated.
        max_bytes: an explicit budget, or ``None`` for the default share of free memory.
        what: what needs the memory, e.g. ``"a dense 10 x 10 torch.float64 matrix"``.
        advice: the way out, one or more sentences.
    """
    if max_bytes is None and torch.compiler.is_compiling():
        return
    if max_bytes is None:
        budget = int(DEFAULT_SHARE * available_bytes(device))
        budget_txt = f"{_gib(budget)}, half of the memory available on {device}"
    else:
        budget, budget_txt = int(max_bytes), f"max_bytes={_gib(max_bytes)}"
    if need > budget:
        raise MemoryError(
            f"{where}: {what} needs about {_gib(need)}, over the budget of {budget_txt}. {advice}"
        )


def guard(
    where: str,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: int | None,
    max_bytes: int | None,
) -> None:
    """Refuse (before allocating anything) a dense ``(n, n)`` build over the memory budget."""
    need = dense_bytes(n, torch.empty((), dtype=dtype).element_size(), chunk_size)
    check_budget(
        where, need, device, max_bytes, f"a dense {n} x {n} {dtype} matrix",
        "Use the matrix-free products instead (hessfunc.hvp, hessfunc.hvps: about 2 gradients "
        "each, memory of one gradient), pass a small chunk_size to drop the n x n basis, or "
        "raise max_bytes if you know it fits.",
    )  # fmt: skip
