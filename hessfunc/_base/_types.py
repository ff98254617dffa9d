from __future__ import annotations

from typing import Any, Literal

Mode = Literal["fwd-rev", "rev-rev"]
PyTree = Any
