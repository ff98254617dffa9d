"""Optimizers built on hessfunc's curvature products (pure ``init`` / ``step`` pairs)."""

from .kfac import kfac as kfac

__all__ = ["kfac"]
