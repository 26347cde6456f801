"""How the server combines the sites' shared parameters: one class per rule, one protocol (:class:`ServerRule`), and
the one place that decides which rule object serves a job (:func:`rule_for_job`).

A method names its rule class (``FederatedMethod.server_rule``) and the rule's arguments
(``FederatedMethod.server_rule_args``); the controller builds the rule once per job from those. Under homomorphic
encryption the server cannot read the updates, so a linear rule is served by :class:`EncryptedSum` instead, and a
rule that needs plaintext is refused. A job may also ask for robustness against sites that lie (the run's
``robustness`` options): a robust rule (:data:`ROBUST_RULES`: the coordinate-wise median or trimmed mean) in place of
the weighted mean, and server-side bounding of every update's norm (:class:`NormBounded`); both need plaintext and
replace only the plain weighted mean (another method's rule has its own reasons to weigh updates as it does). Pure
arithmetic (NumPy, PyTorch, TenSEAL): no NVFlare, nothing of the sites. A new rule is one module here and one line
in :data:`RULES`.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Optional

from fedoap.checks import is_finite_number
from fedoap.server.rules.base import REFERENCES, ServerRule, UpdateRejected
from fedoap.server.rules.encrypted_sum import EncryptedSum
from fedoap.server.rules.fedawa import FedAWARule
from fedoap.server.rules.fedmepd import FedMEPDServerRule
from fedoap.server.rules.fedlws import FedLWSRule
from fedoap.server.rules.fednova import FedNovaRule
from fedoap.server.rules.masked_sum import MaskedSum
from fedoap.server.rules.median import CoordinateMedian
from fedoap.server.rules.none import NoAggregation
from fedoap.server.rules.owner_mean import OwnerMean
from fedoap.server.rules.norm_bound import NormBounded
from fedoap.server.rules.trimmed_mean import TrimmedMean
from fedoap.server.rules.weighted_mean import WeightedMean

__all__ = ["ServerRule", "UpdateRejected", "REFERENCES", "WeightedMean", "FedNovaRule", "FedAWARule", "FedLWSRule",
           "NoAggregation", "OwnerMean", "FedMEPDServerRule", "EncryptedSum", "MaskedSum", "CoordinateMedian",
           "TrimmedMean", "NormBounded", "RULES", "ROBUST_RULES", "check_rule", "check_robustness", "rule_for_job"]

#: every rule a method can name (the encrypted and masked sums are not named: they serve a linear rule under HE or
#: secure aggregation)
RULES: tuple[type[ServerRule], ...] = (WeightedMean, FedNovaRule, FedAWARule, FedLWSRule, NoAggregation,
                                       CoordinateMedian, TrimmedMean, OwnerMean, FedMEPDServerRule)
#: the robust rules a job may put in place of the weighted mean, by name ("" keeps the method's rule)
ROBUST_RULES: dict[str, type[ServerRule]] = {CoordinateMedian.name: CoordinateMedian, TrimmedMean.name: TrimmedMean}


def check_robustness(rule: Any, he: bool, robust_rule: str = "", robust_args: Optional[Mapping[str, Any]] = None,
                     update_norm_bound: float = 0.0) -> None:
    """Check that a robust rule and norm bounding can replace or wrap ``rule``.

    Raises:
        ValueError: an unknown robust rule or invalid arguments of it, a norm bound that is not a finite number >= 0,
            or either one asked for under HE (they need the updates in clear) or for a method whose rule is not the
            plain weighted mean (named).
    """
    if robust_rule not in ("", *ROBUST_RULES):
        raise ValueError(f"robust_rule must be one of {['', *ROBUST_RULES]}, got {robust_rule!r}")
    if robust_rule:
        ROBUST_RULES[robust_rule].check_args(**(robust_args or {}))
    elif robust_args:
        raise ValueError(f"robust_args {dict(robust_args)!r} given without a robust_rule")
    if not is_finite_number(update_norm_bound) or update_norm_bound < 0:
        raise ValueError(f"update_norm_bound must be a finite number >= 0 (0: off), got {update_norm_bound!r}")
    for option, on in (("robust_rule", bool(robust_rule)), ("update_norm_bound", update_norm_bound > 0)):
        if not on:
            continue
        if he:
            raise ValueError(f"{option} needs every update in clear on the server; homomorphic encryption hides it "
                             "(as does secure aggregation)")
        if rule is not WeightedMean:
            raise ValueError(f"{option} replaces the plain weighted mean only; this method's server rule is "
                             f"{getattr(rule, 'name', rule)!r}")


def check_rule(rule: Any, rule_args: Mapping[str, Any], shared_keys: Collection[str], he: bool, *,
               robust_rule: str = "", robust_args: Optional[Mapping[str, Any]] = None,
               update_norm_bound: float = 0.0) -> None:
    """Check, before a job runs, that ``rule`` with ``rule_args`` can serve ``shared_keys`` (with HE or not), and
    that the robustness asked for (see :func:`rule_for_job`) fits it.

    Raises:
        ValueError: ``rule`` is not a :class:`ServerRule` class; an invalid rule argument (named); an empty shared
            set for a rule that combines, a non-empty one for the null rule; HE with the null rule (nothing to
            encrypt) or with a rule that is not linear (it needs the global model in clear on the server); as
            :func:`check_robustness`.
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
        raise ValueError(f"server rule {rule.name!r} shares nothing: there is nothing to encrypt or mask")
    if he and not rule.linear:
        raise ValueError(f"server rule {rule.name!r} needs the global model in clear on the server; homomorphic "
                         f"encryption and secure aggregation support only linear rules "
                         f"({[r.name for r in RULES if r.linear]})")
    check_robustness(rule, he, robust_rule, robust_args, update_norm_bound)


def rule_for_job(
    rule: type[ServerRule],
    rule_args: Mapping[str, Any],
    reference: Mapping[str, Any],
    he_context: Optional[Any] = None,
    *,
    robust_rule: str = "",
    robust_args: Optional[Mapping[str, Any]] = None,
    update_norm_bound: float = 0.0,
    secagg: Optional[Any] = None,
) -> ServerRule:
    """The rule object that serves one job: ``rule(reference, **rule_args)`` in clear, or, given the server's HE
    context (no secret key), the :class:`EncryptedSum` that computes the linear ``rule`` on ciphertexts. With
    ``robust_rule`` the weighted mean is replaced by that robust rule, and with ``update_norm_bound > 0`` the rule is
    wrapped in :class:`NormBounded`.

    Args:
        rule: the method's rule class; rule_args: its arguments.
        reference: the global shared parameters the job starts from, in clear.
        he_context: the server's TenSEAL context under HE, else None.
        secagg: the job's ``fedoap.privacy.secagg.SecAggConfig`` under secure aggregation (the
            :class:`MaskedSum` that removes the masks of the linear ``rule``), else None.
        robust_rule: "" (the method's rule), or a name of :data:`ROBUST_RULES` ("median", "trimmed_mean");
            robust_args: its arguments (``{"trim_fraction": f}`` for the trimmed mean).
        update_norm_bound: the largest L2 norm of a site's update around the round's broadcast (0: no bound).

    Raises:
        ValueError: as :func:`check_rule`, or a reference the rule cannot take.
    """
    if he_context is not None and secagg is not None:
        raise ValueError("homomorphic encryption and secure aggregation both hide the updates: choose one")
    check_rule(rule, rule_args, list(reference), he=he_context is not None or secagg is not None,
               robust_rule=robust_rule, robust_args=robust_args, update_norm_bound=update_norm_bound)
    if he_context is not None:
        return EncryptedSum(reference, he_context)
    if secagg is not None:
        return MaskedSum(reference, secagg)
    built = ROBUST_RULES[robust_rule](reference, **(robust_args or {})) if robust_rule else rule(reference, **rule_args)
    if update_norm_bound > 0:
        return NormBounded(built, reference, update_norm_bound)
    return built
