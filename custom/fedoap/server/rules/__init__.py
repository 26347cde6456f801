"""How the server combines the sites' shared parameters: one class per rule, one protocol (:class:`ServerRule`), and
the one place that decides which rule object serves a job (:func:`rule_for_job`).

A method names its rule class (``FederatedMethod.server_rule``) and the rule's arguments
(``FederatedMethod.server_rule_args``); the controller builds the rule once per job from those. Under homomorphic
encryption the server cannot read the updates, so a linear rule is served by :class:`EncryptedSum` instead, and a
rule that needs plaintext is refused. Pure arithmetic (NumPy, PyTorch, TenSEAL): no NVFlare, nothing of the sites.
A new rule is one module here and one line in :data:`RULES`.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Optional

from fedoap.server.rules.base import REFERENCES, ServerRule, UpdateRejected
from fedoap.server.rules.encrypted_sum import EncryptedSum
from fedoap.server.rules.fedawa import FedAWARule
from fedoap.server.rules.fedlws import FedLWSRule
from fedoap.server.rules.fednova import FedNovaRule
from fedoap.server.rules.none import NoAggregation
from fedoap.server.rules.weighted_mean import WeightedMean

__all__ = ["ServerRule", "UpdateRejected", "REFERENCES", "WeightedMean", "FedNovaRule", "FedAWARule", "FedLWSRule",
           "NoAggregation", "EncryptedSum", "RULES", "check_rule", "rule_for_job"]

#: every rule a method can name (the encrypted sum is not named: it serves a linear rule under HE)
RULES: tuple[type[ServerRule], ...] = (WeightedMean, FedNovaRule, FedAWARule, FedLWSRule, NoAggregation)


def check_rule(rule: Any, rule_args: Mapping[str, Any], shared_keys: Collection[str], he: bool) -> None:
    """Check, before a job runs, that ``rule`` with ``rule_args`` can serve ``shared_keys`` (with HE or not).

    Raises:
        ValueError: ``rule`` is not a :class:`ServerRule` class; an invalid rule argument (named); an empty shared
            set for a rule that combines, a non-empty one for the null rule; HE with the null rule (nothing to
            encrypt) or with a rule that is not linear (it needs the global model in clear on the server).
    """
    if not (isinstance(rule, type) and issubclass(rule, ServerRule)):
        raise ValueError(f"server_rule must be a ServerRule class of fedoap.server.rules, one of "
                         f"{[r.__name__ for r in RULES]}, got {rule!r}")
    rule.check_args(**rule_args)
    if rule.shares and not shared_keys:
        raise ValueError(f"shared_keys is empty: a federation with nothing shared is local training (server rule "
                         f"{NoAggregation.name!r}), not {rule.name!r}")
    if not rule.shares and shared_keys:
        raise ValueError(f"server rule {rule.name!r} shares nothing, but {len(shared_keys)} shared key(s) were given")
    if he and not rule.shares:
        raise ValueError(f"server rule {rule.name!r} shares nothing: there is nothing to encrypt")
    if he and not rule.linear:
        raise ValueError(f"server rule {rule.name!r} needs the global model in clear on the server; homomorphic "
                         f"encryption supports only linear rules ({[r.name for r in RULES if r.linear]})")


def rule_for_job(
    rule: type[ServerRule],
    rule_args: Mapping[str, Any],
    reference: Mapping[str, Any],
    he_context: Optional[Any] = None,
) -> ServerRule:
    """The rule object that serves one job: ``rule(reference, **rule_args)`` in clear, or, given the server's HE
    context (no secret key), the :class:`EncryptedSum` that computes the linear ``rule`` on ciphertexts.

    Args:
        rule: the method's rule class; rule_args: its arguments.
        reference: the global shared parameters the job starts from, in clear.
        he_context: the server's TenSEAL context under HE, else None.

    Raises:
        ValueError: as :func:`check_rule`, or a reference the rule cannot take.
    """
    check_rule(rule, rule_args, list(reference), he=he_context is not None)
    if he_context is None:
        return rule(reference, **rule_args)
    return EncryptedSum(reference, he_context)
