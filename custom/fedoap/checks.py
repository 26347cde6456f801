"""Argument checks shared by every layer (server rules, DP, the privacy ledger): imports nothing of the package."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_finite_number"]


def is_finite_number(value: object) -> bool:
    """A real number that is finite and not a bool (``True`` is an int to Python, never a setting here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
