"""The one protocol every server rule follows (:class:`ServerRule`), and the checks every plaintext update passes
before a rule computes with it (:class:`UpdateRejected` says why one did not).

A rule is the arithmetic of the server, kept apart from the workflow as NVFlare keeps its ``ModelAggregator`` apart from
``ScatterAndGather``: the controller builds one rule object per job, calls :meth:`ServerRule.reset` at the start of
every round, :meth:`ServerRule.add` for every site's update, and :meth:`ServerRule.result` when some update was
accepted. The object lives as long as the job, so what a rule carries from round to round (FedAWA's learned logits)
stays in it; :meth:`ServerRule.state` and :meth:`ServerRule.load_state` read and restore that as JSON values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

__all__ = ["ServerRule", "UpdateRejected", "REFERENCES", "is_positive_number"]

#: what a rule needs of the round's broadcast: ``"initial"``: nothing but the keys and shapes fixed when the rule was
#: built (so it also serves when the broadcast is ciphertext); ``"broadcast"``: the round's global shared parameters
#: in clear, which it computes with (FedNova, FedAWA, FedLWS)
REFERENCES = ("initial", "broadcast")


class UpdateRejected(ValueError):
    """A client update that must not enter the aggregate; the message is the reason that gets logged."""


def is_positive_number(value: object) -> bool:
    """A finite number > 0 (a bool is not a number here)."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(
        np.isfinite(value) and value > 0)


class ServerRule(ABC):
    """How the server combines the shared parameters the sites send in one round.

    Built once per job with the reference shared parameters (the plaintext initialization: it fixes the key set and
    every shape) and the rule's own arguments, checked in ``__init__`` (:meth:`check_args`, which a method also calls
    to fail before any site starts). Per round: :meth:`reset` with the round's broadcast, :meth:`add` per site,
    :attr:`count`, :meth:`result`, and :meth:`summary` for the history.

    Class attributes say what the workflow may do with a rule without knowing which one it is:

    Attributes:
        name: the rule's name in the history and in messages.
        linear: the result is ``sum_k w_k x_k / sum_k w_k`` of the updates as sent, with ``w_k`` the reported
            weights, so the server can compute it on ciphertexts (:class:`~fedoap.server.rules.EncryptedSum` adds,
            the sites divide after decrypting).
        reference: what the rule needs of the round's broadcast, one of :data:`REFERENCES`.
        shares: False for the rule of a method that shares nothing (its reference is empty, it accepts nothing).
        encrypted: :meth:`result` is ciphertext, which the server keeps as ciphertext only.
        hides_updates: every update arrives hidden (ciphertext, or masked under secure aggregation): the server can
            check its layout, never its values, and cannot clip its weight (it is inside the update).
        uses_steps: :meth:`add` computes with the step count (FedNova), so the workflow must bound the claimed steps
            before the rule sees them.
        partial_updates: a site may send only some of the shared keys (FedMEPD: the encoders of the modalities it
            has); the workflow then checks the keys sent, and the rule decides what a key nobody sent becomes.

    Args:
        reference: the global shared parameters the job starts from (by state-dict key).

    Raises:
        ValueError: an empty reference for a rule that shares (nothing to aggregate), or a non-empty one for a rule
            that does not.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = False
    reference: ClassVar[str] = "initial"
    shares: ClassVar[bool] = True
    encrypted: ClassVar[bool] = False
    hides_updates: ClassVar[bool] = False
    uses_steps: ClassVar[bool] = False
    partial_updates: ClassVar[bool] = False

    def __init__(self, reference: Mapping[str, object]) -> None:
        if self.shares and not reference:
            raise ValueError("the shared parameter set is empty: nothing to aggregate")
        if not self.shares and reference:
            raise ValueError(f"server rule {self.name!r} shares nothing, but {len(reference)} shared key(s) were given")
        self.shapes = {k: tuple(np.shape(v)) for k, v in reference.items()}
        self.contributors: list[str] = []
        self.reset(reference)

    @classmethod
    def check_args(cls, **args: Any) -> None:
        """Check the rule's own arguments without building it (a method calls this in its ``__init__``).

        Raises:
            ValueError: an invalid argument, named; by default a rule takes none.
        """
        if args:
            raise ValueError(f"server rule {cls.name!r} takes no arguments, got {sorted(args)}")

    def reset(self, reference: Mapping[str, Any]) -> None:
        """Start a round: forget the previous round's updates, keep what the rule carries across rounds.

        Args:
            reference: the parameters broadcast this round. A rule with ``reference = "initial"`` uses only the keys
                and shapes fixed when it was built (under HE the broadcast is ciphertext); a ``"broadcast"`` rule
                reads the global parameters it computes with (:meth:`_global_of`).
        """
        self.contributors = []

    @abstractmethod
    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's update, sent after ``steps`` local steps with aggregation weight ``weight``.

        Returns:
            The keys the site sent that are not shared: dropped, never aggregated.

        Raises:
            UpdateRejected: the update is left out of the round (the reason names the site).
        """

    @property
    def count(self) -> int:
        """How many updates this round accepted."""
        return len(self.contributors)

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """The round's aggregate: the new global shared parameters.

        Raises:
            ValueError: when no update was accepted.
        """

    def summary(self) -> dict[str, Any]:
        """What the rule decided in the round (FedAWA's weights, FedLWS's factors), recorded in the controller's
        history after :meth:`result`; empty by default (nothing recorded)."""
        return {}

    def state(self) -> dict[str, Any]:
        """What the rule carries to the next round, as JSON values; empty by default (a rule without state)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (a resumed job).

        Raises:
            ValueError: a state this rule cannot take; by default any non-empty one.
        """
        if state:
            raise ValueError(f"server rule {self.name!r} carries no state across rounds, got {dict(state)!r}")

    # -- the checks every plaintext rule shares ------------------------------------------------------------------------
    def _checked(
        self, site: str, params: Mapping[str, object], weight: float
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """The update's shared arrays as float64, and the non-shared keys it sent.

        Raises:
            UpdateRejected: a weight that is not a positive number, a missing shared key, a wrong shape, NaN or Inf.
        """
        if not is_positive_number(weight):
            raise UpdateRejected(f"{site}: aggregation weight must be a positive number, got {weight!r}")
        dropped = sorted(k for k in params if k not in self.shapes)
        missing = sorted(k for k in self.shapes if k not in params)
        if missing:
            raise UpdateRejected(f"{site}: update lacks {len(missing)} shared parameter(s), e.g. {missing[0]!r}")
        arrays = {}
        for key, shape in self.shapes.items():
            value = np.asarray(params[key], dtype=np.float64)
            if value.shape != shape:
                raise UpdateRejected(f"{site}: {key!r} has shape {value.shape}, expected {shape}")
            if not np.isfinite(value).all():
                raise UpdateRejected(f"{site}: {key!r} contains NaN or Inf")
            arrays[key] = value
        return arrays, dropped

    def _global_of(self, reference: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The round's global shared parameters as float64 arrays (for a ``"broadcast"`` rule).

        Raises:
            ValueError: keys or shapes other than the rule's, NaN or Inf.
        """
        if set(reference) != set(self.shapes):
            raise ValueError("the round's global parameters do not hold exactly the shared keys")
        arrays = {k: np.asarray(reference[k], dtype=np.float64) for k in self.shapes}
        if any(v.shape != self.shapes[k] for k, v in arrays.items()):
            raise ValueError("the round's global parameters do not have the shared shapes")
        if not all(np.isfinite(v).all() for v in arrays.values()):
            raise ValueError("the global parameters contain NaN or Inf")
        return arrays
