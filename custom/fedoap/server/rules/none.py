"""The null rule, for a method that shares nothing: local-only training and the centralized reference.

The rounds still pace the sites' training and collect their metrics, but the server broadcasts an empty parameter
set, accepts no update (whatever a site sends is dropped) and has no aggregate to save.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from fedoap.server.rules.base import ServerRule

__all__ = ["NoAggregation"]


class NoAggregation(ServerRule):
    """Combines nothing: every key a site sends is dropped, :attr:`count` stays 0, :meth:`result` is the empty set.

    Args:
        reference: the shared parameters, which must be empty.

    Raises:
        ValueError: a non-empty reference.
    """

    name = "none"
    shares = False

    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Drop the whole update; returns its keys (the site should have sent none)."""
        return sorted(params)

    def result(self) -> dict[str, Any]:
        """The empty aggregate: nothing is shared."""
        return {}
