"""The robust rules (coordinate-wise median and trimmed mean) and server-side norm bounding: their arithmetic on small
arrays, that one outlier site cannot move them, and that a job gets them only where they can serve (plaintext, in
place of the plain weighted mean)."""

from __future__ import annotations

import numpy as np
import pytest

from fedoap.server.rules import (ROBUST_RULES, CoordinateMedian, EncryptedSum, FedAWARule, FedLWSRule, FedNovaRule,
                                 NoAggregation, NormBounded, TrimmedMean, UpdateRejected, WeightedMean, check_rule,
                                 rule_for_job)
from fedoap.server.rules.trimmed_mean import trimmed_count

REFERENCE = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


def _site(w, b):
    return {"w": np.asarray(w, np.float32).reshape(2, 2), "b": np.asarray(b, np.float32)}


def _combine(rule, updates, weights=None):
    for i, update in enumerate(updates):
        rule.add(f"s{i}", update, (weights or [1] * len(updates))[i])
    return rule.result()


def test_the_median_is_coordinate_wise_and_ignores_the_weights():
    updates = [_site([1, 5, 0, 2], [1, 1, 1]), _site([2, 4, 9, 2], [2, 2, 2]), _site([3, 3, 1, 7], [9, 9, 9])]
    out = _combine(CoordinateMedian(REFERENCE), updates, weights=[1000, 1, 1])
    np.testing.assert_array_equal(out["w"], np.array([[2, 4], [1, 2]], np.float32))
    np.testing.assert_array_equal(out["b"], np.full(3, 2, np.float32))
    assert out["w"].dtype == np.float32
    # an even count averages the two middle values
    even = _combine(CoordinateMedian(REFERENCE), updates + [_site([4, 2, 1, 2], [100, 100, 100])])
    np.testing.assert_array_equal(even["w"], np.array([[2.5, 3.5], [1, 2]], np.float32))
    np.testing.assert_array_equal(even["b"], np.full(3, 5.5, np.float32))


@pytest.mark.parametrize("n, fraction, cut", [(3, 0.1, 1), (5, 0.2, 1), (10, 0.1, 1), (30, 0.1, 3), (2, 0.4, 0),
                                              (4, 0.1, 1), (4, 0.49, 1), (7, 0.0, 0), (1, 0.3, 0)])
def test_the_trimmed_count(n, fraction, cut):
    assert trimmed_count(n, fraction) == cut


def test_the_trimmed_mean_cuts_both_ends_per_coordinate():
    values = [1.0, 2.0, 3.0, 4.0, 1e9]
    rule = TrimmedMean(REFERENCE, trim_fraction=0.2)  # ceil(0.2 * 5) = 1 per end
    out = _combine(rule, [_site([v, -v, v, 0], [v, v, v]) for v in values])
    np.testing.assert_allclose(out["w"], np.array([[3, -3], [3, 0]], np.float32))  # mean of (2, 3, 4), per side
    np.testing.assert_allclose(out["b"], np.full(3, 3, np.float32))
    assert rule.summary() == {"trimmed_per_end": 1}
    plain = _combine(TrimmedMean(REFERENCE, trim_fraction=0.0), [_site([v] * 4, [v] * 3) for v in (1.0, 2.0, 6.0)])
    np.testing.assert_allclose(plain["b"], np.full(3, 3.0))  # no cut: the unweighted mean


@pytest.mark.parametrize("bad", [0.5, -0.1, float("nan"), True, "0.1", None])
def test_the_trim_fraction_is_checked(bad):
    with pytest.raises(ValueError, match="trim_fraction must be a number in"):
        TrimmedMean.check_args(trim_fraction=bad)
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(REFERENCE, trim_fraction=bad)
    with pytest.raises(ValueError, match="takes no arguments"):
        CoordinateMedian.check_args(trim_fraction=0.1)


@pytest.mark.parametrize("rule_class", [CoordinateMedian, TrimmedMean])
@pytest.mark.parametrize("outlier", [1e30, -1e30, 1e9, 0.0, 5.0])
def test_one_outlier_site_cannot_move_a_robust_rule_outside_the_honest_range(rule_class, outlier):
    rng = np.random.default_rng(0)
    honest = [_site(rng.uniform(0, 1, 4), rng.uniform(0, 1, 3)) for _ in range(4)]
    liar = _site([outlier] * 4, [outlier] * 3)
    out = _combine(rule_class(REFERENCE), honest + [liar], weights=[1, 1, 1, 1, 10**6])
    for key in REFERENCE:
        stacked = np.stack([h[key] for h in honest])
        assert (out[key] >= stacked.min(axis=0) - 1e-6).all() and (out[key] <= stacked.max(axis=0) + 1e-6).all()
    # the weighted mean, by contrast, is the liar's
    mean = _combine(WeightedMean(REFERENCE), honest + [liar], weights=[1, 1, 1, 1, 10**6])
    if abs(outlier) >= 1e9:
        assert not (np.abs(mean["b"]) <= 1).all()


def test_robust_rules_check_what_every_rule_checks():
    rule = CoordinateMedian(REFERENCE)
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        rule.add("a", _site([np.nan] * 4, [0] * 3), 1)
    with pytest.raises(UpdateRejected, match="positive"):
        rule.add("a", _site([0] * 4, [0] * 3), 0)
    assert rule.add("a", {**_site([0] * 4, [0] * 3), "head": np.ones(1)}, 1) == ["head"]
    with pytest.raises(ValueError, match="no client update"):
        TrimmedMean(REFERENCE).result()


# -- norm bounding ---------------------------------------------------------------------------------------------------
def test_norm_bounding_scales_a_large_update_down_around_the_broadcast():
    reference = {"w": np.zeros(2, np.float32)}
    rule = NormBounded(WeightedMean(reference), reference, bound=1.0)
    rule.reset({"w": np.array([1.0, 1.0], np.float32)})  # the round's broadcast: the update is params - (1, 1)
    rule.add("big", {"w": np.array([4.0, 5.0])}, weight=1)  # update (3, 4), norm 5: scaled to (0.6, 0.8)
    rule.add("small", {"w": np.array([1.0, 1.5])}, weight=1)  # update (0, 0.5): unchanged
    np.testing.assert_allclose(rule.result()["w"], [(1.6 + 1.0) / 2, (1.8 + 1.5) / 2], rtol=1e-6)
    assert rule.summary() == {"update_norm_clipped": {"big": pytest.approx(5.0)}}
    assert rule.count == 2 and rule.contributors == ["big", "small"]
    rule.reset({"w": np.zeros(2, np.float32)})
    assert rule.count == 0 and rule.summary() == {}


def test_norm_bounding_limits_a_liar_s_pull_whatever_its_weight():
    reference = {"w": np.zeros(3, np.float32)}
    rule = NormBounded(WeightedMean(reference), reference, bound=0.1)
    rule.add("honest", {"w": np.full(3, 0.01)}, weight=10)
    rule.add("liar", {"w": np.full(3, 1e6)}, weight=10**6)
    assert np.linalg.norm(rule.result()["w"]) <= 0.1 + 1e-6
    median = NormBounded(CoordinateMedian(reference), reference, bound=0.1)
    for site, value in (("a", 0.01), ("b", 0.02), ("liar", 1e6)):
        median.add(site, {"w": np.full(3, value)}, weight=1)
    assert median.result()["w"].max() <= 0.02 + 1e-7


def test_norm_bounding_checks_its_arguments():
    with pytest.raises(ValueError, match="bound must be a finite number > 0"):
        NormBounded(WeightedMean(REFERENCE), REFERENCE, bound=0)
    with pytest.raises(ValueError, match="inner must be a plaintext rule"):
        NormBounded(NoAggregation({}), REFERENCE, bound=1)
    assert NormBounded(FedNovaRule(REFERENCE), REFERENCE, bound=1).uses_steps


# -- which job gets which rule ---------------------------------------------------------------------------------------
def test_rule_for_job_replaces_the_weighted_mean_and_wraps_it():
    assert type(rule_for_job(WeightedMean, {}, REFERENCE, robust_rule="median")) is CoordinateMedian
    trimmed = rule_for_job(WeightedMean, {}, REFERENCE, robust_rule="trimmed_mean", robust_args={"trim_fraction": 0.3})
    assert type(trimmed) is TrimmedMean and trimmed.trim_fraction == 0.3
    bounded = rule_for_job(WeightedMean, {}, REFERENCE, robust_rule="median", update_norm_bound=2.0)
    assert type(bounded) is NormBounded and type(bounded.inner) is CoordinateMedian and bounded.bound == 2.0
    assert bounded.name == "median+norm_bound" and NormBounded.name == "norm_bounded"
    assert type(rule_for_job(WeightedMean, {}, REFERENCE)) is WeightedMean  # nothing asked: the method's rule
    assert set(ROBUST_RULES) == {"median", "trimmed_mean"}


@pytest.mark.parametrize("rule, options, he, message", [
    (FedNovaRule, {"robust_rule": "median"}, False, "robust_rule replaces the plain weighted mean only; .*'fednova'"),
    (FedAWARule, {"robust_rule": "trimmed_mean"}, False, "'fedawa'"),
    (FedLWSRule, {"update_norm_bound": 1.0}, False, "update_norm_bound replaces the plain weighted mean only"),
    (NoAggregation, {"robust_rule": "median"}, False, "'none'"),
    (WeightedMean, {"robust_rule": "median"}, True, "robust_rule needs every update in clear"),
    (WeightedMean, {"update_norm_bound": 1.0}, True, "update_norm_bound needs every update in clear"),
    (WeightedMean, {"robust_rule": "krum"}, False, "robust_rule must be one of"),
    (WeightedMean, {"robust_rule": "trimmed_mean", "robust_args": {"trim_fraction": 0.7}}, False, "trim_fraction"),
    (WeightedMean, {"robust_args": {"trim_fraction": 0.2}}, False, "without a robust_rule"),
    (WeightedMean, {"update_norm_bound": float("inf")}, False, "update_norm_bound must be a finite number"),
    (CoordinateMedian, {}, True, "'median' needs the global model in clear"),  # a robust rule is not linear
])
def test_robust_rules_are_refused_where_they_cannot_serve(rule, options, he, message):
    keys = [] if rule is NoAggregation else list(REFERENCE)
    with pytest.raises(ValueError, match=message):
        check_rule(rule, {}, keys, he, **options)


def test_under_he_rule_for_job_refuses_robustness():
    import tenseal as ts
    from fedoap.privacy.he import create_contexts

    server = ts.context_from(create_contexts()[0])
    assert type(rule_for_job(WeightedMean, {}, REFERENCE, server)) is EncryptedSum
    with pytest.raises(ValueError, match="homomorphic encryption hides it"):
        rule_for_job(WeightedMean, {}, REFERENCE, server, robust_rule="trimmed_mean")
    with pytest.raises(ValueError, match="homomorphic encryption hides it"):
        rule_for_job(WeightedMean, {}, REFERENCE, server, update_norm_bound=1.0)
