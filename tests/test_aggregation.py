"""The server's arithmetic and its rules: every rule follows one protocol; weighted mean (and FedNova's normalized
mean) over shared keys, non-shared keys dropped, bad updates rejected with a reason; which rule serves a job."""

import json

import numpy as np
import pytest

from fedoap.privacy.he import create_contexts, decrypt_average, encrypt_update, from_params, to_params
from fedoap.server.intake import payload_bytes
from fedoap.server.rules import (REFERENCES, RULES, EncryptedSum, FedAWARule, FedNovaRule, NoAggregation, ServerRule,
                                 UpdateRejected, WeightedMean, check_rule, rule_for_job)

REF = {"enc.w": np.zeros((2, 3), np.float32), "enc.b": np.zeros(3, np.float32)}


def update(value, **extra):
    return {"enc.w": np.full((2, 3), value, np.float32), "enc.b": np.full(3, 2 * value, np.float32), **extra}


def test_weighted_mean_by_sample_count():
    agg = WeightedMean(REF)
    agg.add("a", update(1.0), weight=10)
    agg.add("b", update(4.0), weight=30)
    out = agg.result()
    np.testing.assert_allclose(out["enc.w"], np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    np.testing.assert_allclose(out["enc.b"], np.full(3, 2 * (10 * 1 + 30 * 4) / 40))
    assert out["enc.w"].dtype == np.float32
    assert agg.contributors == ["a", "b"]


def test_non_shared_keys_are_dropped_and_reported():
    agg = WeightedMean(REF)
    dropped = agg.add("a", update(1.0, **{"head.w": np.ones(5), "adapter.x": np.ones(1)}), weight=1)
    assert dropped == ["adapter.x", "head.w"]
    assert set(agg.result()) == set(REF)


@pytest.mark.parametrize(
    "params, weight, reason",
    [
        (update(np.nan), 1, "NaN or Inf"),
        (update(np.inf), 1, "NaN or Inf"),
        ({"enc.w": np.zeros((3, 2)), "enc.b": np.zeros(3)}, 1, "has shape (3, 2), expected (2, 3)"),
        ({"enc.w": np.zeros((2, 3))}, 1, "lacks 1 shared parameter"),
        (update(1.0), 0, "positive"),
        (update(1.0), float("nan"), "positive"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(params, weight, reason):
    agg = WeightedMean(REF)
    agg.add("good", update(2.0), weight=1)
    with pytest.raises(UpdateRejected, match="bad") as err:
        agg.add("bad", params, weight=weight)
    assert reason in str(err.value)
    np.testing.assert_allclose(agg.result()["enc.w"], 2.0)  # the rejected update left no trace
    assert agg.count == 1


def test_no_accepted_update_is_an_error():
    with pytest.raises(ValueError, match="no client update"):
        WeightedMean(REF).result()
    with pytest.raises(ValueError, match="empty"):
        WeightedMean({})


def test_payload_bytes_counts_array_bytes():
    assert payload_bytes(update(1.0)) == (6 + 3) * 4


# -- FedNova ---------------------------------------------------------------------------------------------------------
GLOBAL = {"enc.w": np.full((2, 3), 1.0, np.float32), "enc.b": np.zeros(3, np.float32)}


def site(w, b, **extra):
    return {"enc.w": np.full((2, 3), w, np.float32), "enc.b": np.full(3, b, np.float32), **extra}


def test_fednova_on_a_hand_computed_example():
    # x = (w 1, b 0). Normalized updates d_k = (x - x_k) / tau_k:
    #   a: n 10, tau 2, x_a = (0, 1):   d_a = (0.5, -0.5)
    #   b: n 20, tau 4, x_b = (-3, 2):  d_b = (1.0, -0.5)
    #   c: n 10, tau 1, x_c = (0.5, -1): d_c = (0.5, 1.0)
    # p = (1/4, 1/2, 1/4); tau_eff = 2/4 + 4/2 + 1/4 = 2.75
    # sum p d: w 0.125 + 0.5 + 0.125 = 0.75; b -0.125 - 0.25 + 0.25 = -0.125
    # x <- x - 2.75 * sum p d: w 1 - 2.0625 = -1.0625; b 0 + 0.34375 = 0.34375
    agg = FedNovaRule(GLOBAL)
    agg.add("a", site(0.0, 1.0), weight=10, steps=2)
    agg.add("b", site(-3.0, 2.0), weight=20, steps=4)
    agg.add("c", site(0.5, -1.0), weight=10, steps=1)
    out = agg.result()
    np.testing.assert_allclose(out["enc.w"], np.full((2, 3), -1.0625))
    np.testing.assert_allclose(out["enc.b"], np.full(3, 0.34375))
    assert out["enc.w"].dtype == np.float32 and agg.contributors == ["a", "b", "c"]
    # FedAvg on the same updates weighs the 4-step site by its extra steps: w = -1.375, b = 1.0
    avg = WeightedMean(GLOBAL)
    for name, (w, b), n in (("a", (0.0, 1.0), 10), ("b", (-3.0, 2.0), 20), ("c", (0.5, -1.0), 10)):
        avg.add(name, site(w, b), weight=n)
    np.testing.assert_allclose(avg.result()["enc.w"], -1.375)
    np.testing.assert_allclose(avg.result()["enc.b"], 1.0)


def test_fednova_with_equal_steps_is_the_weighted_mean():
    nova, avg = FedNovaRule(GLOBAL), WeightedMean(GLOBAL)
    for name, (w, b), n in (("a", (0.0, 1.0), 10), ("b", (-3.0, 2.0), 30)):
        nova.add(name, site(w, b), weight=n, steps=5)
        avg.add(name, site(w, b), weight=n)
    for key in GLOBAL:
        np.testing.assert_allclose(nova.result()[key], avg.result()[key], rtol=1e-6)


@pytest.mark.parametrize("steps", [None, 0, -1, float("nan"), float("inf"), "3", True])
def test_fednova_rejects_an_update_without_a_positive_step_count(steps):
    agg = FedNovaRule(GLOBAL)
    agg.add("good", site(0.0, 0.0), weight=1, steps=1)
    with pytest.raises(UpdateRejected, match="bad: FedNova needs the number of local steps"):
        agg.add("bad", site(5.0, 5.0), weight=1, steps=steps)
    np.testing.assert_allclose(agg.result()["enc.w"], 0.0)  # x - 1 * (1 - 0) / 1: only the good site
    assert agg.count == 1


def test_fednova_keeps_the_weighted_mean_rules():
    agg = FedNovaRule(GLOBAL)
    assert agg.add("a", site(0.0, 0.0, **{"head.w": np.ones(2)}), weight=1, steps=1) == ["head.w"]
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        agg.add("b", site(np.nan, 0.0), weight=1, steps=1)
    with pytest.raises(UpdateRejected, match="positive"):
        agg.add("c", site(0.0, 0.0), weight=0, steps=1)
    with pytest.raises(ValueError, match="no client update"):
        FedNovaRule(GLOBAL).result()
    with pytest.raises(ValueError, match="NaN or Inf"):
        FedNovaRule({"w": np.full(2, np.nan)})


# -- the protocol every rule follows ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_contexts():
    import tenseal as ts

    server, client = create_contexts()
    return ts.context_from(server), ts.context_from(client)


def _build(rule_class, reference, he_contexts):
    if rule_class is EncryptedSum:
        return EncryptedSum(reference, he_contexts[0])
    return rule_class(reference)


def _sent(rule_class, params, weight, he_contexts):
    """What a site sends for ``params``: in clear, or (encrypted sum) ``weight * params`` as ciphertext."""
    if rule_class is EncryptedSum:
        return to_params(encrypt_update(params, weight, he_contexts[1]))
    return params


def _read(rule_class, aggregate, he_contexts):
    """The aggregate in clear: as it is, or (encrypted sum) decrypted and divided by the total weight by a site."""
    if rule_class is EncryptedSum:
        return decrypt_average(from_params(aggregate), he_contexts[1])
    return aggregate


@pytest.mark.parametrize("rule_class", [*RULES, EncryptedSum], ids=lambda c: c.__name__)
def test_every_rule_follows_the_protocol(rule_class, he_contexts):
    assert issubclass(rule_class, ServerRule) and rule_class.name and rule_class.reference in REFERENCES
    rule_class.check_args()  # the defaults are valid arguments
    reference = GLOBAL if rule_class.shares else {}
    rule = _build(rule_class, reference, he_contexts)
    assert rule.count == 0
    for rnd in range(2):  # two rounds of the same object: reset, add two updates, result
        extra = {"head.w": np.ones(2, np.float32)}
        dropped = []
        for name, (w, b), n, steps in (("a", (0.0, 1.0), 10, 2), ("b", (-3.0, 2.0), 30, 4)):
            dropped += rule.add(name, {**_sent(rule_class, site(w + rnd, b), n, he_contexts), **extra}, n,
                                steps=steps)
        assert "head.w" in dropped  # a non-shared key is dropped, whatever the rule
        out = _read(rule_class, rule.result(), he_contexts)
        assert set(out) == set(reference) and all(np.isfinite(np.asarray(v)).all() for v in out.values())
        assert rule.count == (2 if rule_class.shares else 0)
        json.dumps({"summary": rule.summary(), "state": rule.state()})  # both go into the history as JSON
        rule.reset(GLOBAL if rule_class.reference == "broadcast" else reference)
        assert rule.count == 0 and rule.contributors == []
    if rule_class.linear:  # a linear rule is the weighted mean of what was sent, so ciphertexts can compute it
        mean = WeightedMean(GLOBAL)
        for r in (rule, mean):
            r.reset(GLOBAL)
            for name, (w, b), n in (("a", (0.0, 1.0), 10), ("b", (-3.0, 2.0), 30)):
                r.add(name, _sent(type(r), site(w, b), n, he_contexts), n)
        out = _read(rule_class, rule.result(), he_contexts)
        for key, value in mean.result().items():
            np.testing.assert_allclose(out[key], value, rtol=1e-4, atol=1e-4)


def test_a_rule_without_state_refuses_one_and_the_null_rule_refuses_shared_keys():
    rule = WeightedMean(GLOBAL)
    assert rule.state() == {} and rule.summary() == {}
    rule.load_state({})
    with pytest.raises(ValueError, match="'weighted_mean' carries no state"):
        rule.load_state({"logits": {"a": 1.0}})
    with pytest.raises(ValueError, match="'weighted_mean' takes no arguments"):
        WeightedMean.check_args(beta=1.0)
    with pytest.raises(ValueError, match="'none' shares nothing, but 2 shared key"):
        NoAggregation(GLOBAL)
    assert NoAggregation({}).add("a", {"w": np.ones(1)}, weight=1) == ["w"]


def test_a_broadcast_rule_reads_each_round_s_global_parameters():
    rule = FedNovaRule(GLOBAL)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rule.reset({k: np.full_like(v, np.nan) for k, v in GLOBAL.items()})
    with pytest.raises(ValueError, match="exactly the shared keys"):
        rule.reset({"enc.w": GLOBAL["enc.w"]})
    with pytest.raises(ValueError, match="shared shapes"):
        rule.reset({"enc.w": np.zeros((3, 2)), "enc.b": np.zeros(3)})
    rule.reset({k: v + 1 for k, v in GLOBAL.items()})  # x = (2, 1): one site, one step, x_a = (0, 0): d = (2, 1)
    rule.add("a", site(0.0, 0.0), weight=1, steps=1)
    np.testing.assert_allclose(rule.result()["enc.w"], 0.0)


@pytest.mark.parametrize(
    "rule, args, keys, he, message",
    [
        ("fedawa-string", {}, ["w"], False, "server_rule must be a ServerRule class"),
        (FedAWARule, {"server_epochs": 0}, ["w"], False, "server_epochs"),
        (WeightedMean, {}, [], False, "shared_keys is empty"),
        (NoAggregation, {}, ["w"], False, "shares nothing, but 1 shared key"),
        (NoAggregation, {}, [], True, "nothing to encrypt"),
        (FedNovaRule, {}, ["w"], True, "'fednova' needs the global model in clear"),
        (FedAWARule, {}, ["w"], True, "'fedawa' needs the global model in clear"),
    ],
)
def test_check_rule_refuses_what_cannot_serve_a_job(rule, args, keys, he, message):
    with pytest.raises(ValueError, match=message):
        check_rule(rule, args, keys, he)


def test_one_factory_picks_the_rule_object_of_a_job(he_contexts):
    assert type(rule_for_job(FedNovaRule, {}, GLOBAL)) is FedNovaRule
    assert type(rule_for_job(NoAggregation, {}, {})) is NoAggregation
    assert rule_for_job(FedAWARule, {"server_lr": 0.5}, GLOBAL).server_lr == 0.5
    under_he = rule_for_job(WeightedMean, {}, GLOBAL, he_context=he_contexts[0])
    assert type(under_he) is EncryptedSum and under_he.encrypted
    with pytest.raises(ValueError, match="needs the global model in clear"):
        rule_for_job(FedNovaRule, {}, GLOBAL, he_context=he_contexts[0])
