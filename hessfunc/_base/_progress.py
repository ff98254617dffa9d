"""Optional progress bars (tqdm) for long eager loops: data passes and dense chunks.

A bar is drawn only on rank 0 of an initialised ``torch.distributed`` group, never inside
``torch.compile`` (a bar is a side effect, and Dynamo would break the graph on it), and only when
asked for or, by default, when someone can see it: a terminal on stderr or a notebook kernel.
``HESSFUNC_PROGRESS=1`` or ``=0`` in the environment overrides the default. tqdm is an optional
dependency (``pip install "hessfunc[progress]"``), imported on first use.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch

_FALSE = ("", "0", "false", "no", "off")


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wanted(where: str, progress: bool | None) -> bool:
    """Whether to draw a bar; raises when one is asked for explicitly and tqdm is missing."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"{where}: progress must be None, True or False, got {progress!r}.")
    if progress is False or torch.compiler.is_compiling() or not _rank_zero():
        return False
    if progress is None:
        env = os.environ.get("HESSFUNC_PROGRESS")
        auto = _interactive() if env is None else env.strip().lower() not in _FALSE
        return auto and _have_tqdm()
    if not _have_tqdm():
        raise ImportError(
            f"{where}: progress=True needs tqdm, which is not installed. Install it with "
            "pip install 'hessfunc[progress]' (or pip install tqdm), or pass progress=None."
        )
    return True


def _bar_class() -> Any:
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def track(
    iterable: Iterable[Any],
    *,
    where: str,
    desc: str,
    progress: bool | None = None,
    total: int | None = None,
) -> Iterable[Any]:
    """``iterable`` itself, or wrapped in a progress bar when :func:`wanted` says so.

    Decided (and ``progress`` validated) at the call, not on first iteration. With
    ``progress=None`` the bar waits a second before it appears, so short loops stay quiet.
    """
    if not wanted(where, progress):
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    delay = 1.0 if progress is None else 0.0
    return _bar_class()(iterable, desc=desc, total=total, leave=False, delay=delay)
