"""A site that lies or sends garbage can neither take the global model over nor stop the job: every malformed field and
every lie the adversarial review found goes through the server's intake (``fedoap.server.intake.RoundIntake``) next
to two honest sites, with real ``FLModel`` results, real rules and a real TenSEAL context.

Against the first version each of these either made the liar the global model (a claimed weight of 1e9), made the
aggregate infinite for everyone (1e308, FedNova's 1e-12 steps), let a site overwrite what the server records about it
(a metric named ``n_samples``) or raised out of the controller and aborted the job (a string tensor, a bytes metric,
an HE header with infinite sizes, random ciphertext bytes).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedoap.config import RobustnessOptions
from fedoap.privacy.he import (HE_KEY_PREFIX, create_contexts, decrypt_average, encrypt_update, from_params,
                               to_params)
from fedoap.protocol import NUM_STEPS_KEY, SITE_STATISTICS_KEY
from fedoap.server.intake import IntakeLimits, RoundIntake
from fedoap.server.rules import EncryptedSum, FedNovaRule, ServerRule, WeightedMean

REFERENCE = {"enc.w": np.zeros((2, 3), np.float32), "enc.b": np.zeros(2, np.float32)}
#: the two honest sites: (value of every parameter, weight = samples, steps)
HONEST = {"a": (1.0, 10, 20), "b": (3.0, 30, 24)}
#: what the liar would send if it were honest
LIAR = ("liar", 2.0, 20, 22)
DEFAULTS = RobustnessOptions()


def _params(value: float, dtype=np.float32) -> dict:
    return {k: np.full(v.shape, value, dtype) for k, v in REFERENCE.items()}


def _result(site, params, weight, steps, metrics=None, meta=None) -> FLModel:
    base = {"client_name": site, "n_samples": weight, "aggregation_weight": weight, NUM_STEPS_KEY: steps}
    return FLModel(params=params, params_type=ParamsType.FULL,
                   metrics={"train_loss": 0.1, "val_dice": 0.5} if metrics is None else metrics,
                   meta={**base, **(meta or {})})


def _honest():
    return [_result(s, _params(v), n, t) for s, (v, n, t) in HONEST.items()]


def _liar(**change) -> FLModel:
    """The liar's result; ``weight`` changes the claimed aggregation weight only (its sample count stays)."""
    site, value, weight, steps = LIAR
    meta = {"n_samples": weight, **change.pop("meta", {})}
    return _result(site, change.pop("params", _params(value)), change.pop("weight", weight),
                   change.pop("steps", steps), meta=meta, **change)


def _intake(**kwargs) -> RoundIntake:
    lines: list[str] = []
    intake = RoundIntake(DEFAULTS, num_rounds=1, progress=lines.append, warn=lines.append, **kwargs)
    intake.lines = lines  # type: ignore[attr-defined]
    return intake


def _reference_aggregate(rule_class, results) -> dict:
    """What ``rule_class`` makes of ``(params, weight, steps)`` alone, outside the intake."""
    rule = rule_class(REFERENCE)
    for site, params, weight, steps in results:
        rule.add(site, params, weight, steps=steps)
    return rule.result()


def _honest_only(rule_class) -> dict:
    return _reference_aggregate(rule_class, [(s, _params(v), n, t) for s, (v, n, t) in HONEST.items()])


def _assert_close(aggregate, expected):
    assert set(aggregate) == set(expected)
    for key in expected:
        assert np.isfinite(np.asarray(aggregate[key])).all()
        np.testing.assert_allclose(np.asarray(aggregate[key]), np.asarray(expected[key]), rtol=1e-6)


class _Hostile:
    """An object that raises whatever is asked of it (a value no deserializer should ever produce)."""

    def __getattr__(self, name):
        raise RuntimeError("hostile")

    def __len__(self):
        raise RuntimeError("hostile")


def _with(result: FLModel, **attributes) -> FLModel:
    for name, value in attributes.items():
        setattr(result, name, value)
    return result


# -- every malformed field and every lie, in clear ---------------------------------------------------------------------
PLAIN_CASES = {
    # the claimed weight
    "weight 1e9 (the liar would be the global model)": (WeightedMean, lambda: _liar(weight=1e9), "largest"),
    "weight 1e308 (the aggregate would be inf)": (WeightedMean, lambda: _liar(weight=1e308), "largest"),
    "weight inf": (WeightedMean, lambda: _liar(weight=math.inf), "positive number"),
    "weight NaN": (WeightedMean, lambda: _liar(weight=math.nan), "positive number"),
    "weight 0": (WeightedMean, lambda: _liar(weight=0), "positive number"),
    "weight -20": (WeightedMean, lambda: _liar(weight=-20), "positive number"),
    "weight as text": (WeightedMean, lambda: _liar(meta={"aggregation_weight": "20"}), "positive number"),
    "weight as a bool": (WeightedMean, lambda: _liar(meta={"aggregation_weight": True}), "positive number"),
    "weight as a list": (WeightedMean, lambda: _liar(meta={"aggregation_weight": [20]}), "positive number"),
    "no weight at all": (WeightedMean, lambda: _with(_liar(), meta={"client_name": "liar"}), "positive number"),
    "sample count 2.5": (WeightedMean, lambda: _liar(meta={"n_samples": 2.5}), "sample count"),
    "sample count 1e9": (WeightedMean, lambda: _liar(meta={"n_samples": 10**9}), "sample count"),
    "sample count as bytes": (WeightedMean, lambda: _liar(meta={"n_samples": b"20"}), "sample count"),
    "sample count of 5000 digits": (WeightedMean, lambda: _liar(meta={"n_samples": 10**5000}), "integer of 16610 bits"),
    # FedNova's step count
    "FedNova steps 1e-12 (x 1e12)": (FedNovaRule, lambda: _liar(steps=1e-12), "number of local steps"),
    "FedNova steps 0.5": (FedNovaRule, lambda: _liar(steps=0.5), "number of local steps"),
    "FedNova steps 1e12": (FedNovaRule, lambda: _liar(steps=1e12), "number of local steps"),
    "FedNova steps 0": (FedNovaRule, lambda: _liar(steps=0), "number of local steps"),
    "FedNova steps NaN": (FedNovaRule, lambda: _liar(steps=math.nan), "number of local steps"),
    "FedNova steps as text": (FedNovaRule, lambda: _liar(steps="11"), "number of local steps"),
    "FedNova no steps": (FedNovaRule, lambda: _liar(steps=None), "number of local steps"),
    "FedNova steps 1 (others 20, 24: x 22)": (FedNovaRule, lambda: _liar(steps=1), "median of the sites' step"),
    "FedNova steps 1000 (others 20, 24)": (FedNovaRule, lambda: _liar(steps=1000), "median of the sites' step"),
    "FedNova steps 1e6 (others 20, 24)": (FedNovaRule, lambda: _liar(steps=10**6), "median of the sites' step"),
    "steps as text, weighted mean": (WeightedMean, lambda: _liar(steps="11"), "number of local steps"),
    # the parameters
    "a string where a tensor belongs": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.w": "2.0"}),
                                        "not a tensor"),
    "a list where a tensor belongs": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": [2.0, 2.0]}),
                                      "not a tensor"),
    "bytes where a tensor belongs": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": b"\x00" * 8}),
                                     "not a tensor"),
    "an object array": (WeightedMean,
                        lambda: _liar(params={**_params(2.0), "enc.b": np.array([{}, {}], dtype=object)}), "dtype"),
    "a text array": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": np.array(["2", "2"])}), "dtype"),
    "a complex tensor": (WeightedMean,
                         lambda: _liar(params={**_params(2.0), "enc.b": torch.ones(2, dtype=torch.complex64)}),
                         "dtype"),
    "a bool tensor": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": torch.ones(2, dtype=torch.bool)}),
                      "dtype"),
    "a sparse tensor": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": torch.ones(2).to_sparse()}),
                        "dense"),
    "NaN parameters": (WeightedMean, lambda: _liar(params=_params(np.nan)), "NaN or Inf"),
    "Inf parameters": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.b": np.array([1, np.inf], np.float32)}),
                       "NaN or Inf"),
    "a wrong shape": (WeightedMean, lambda: _liar(params={**_params(2.0), "enc.w": np.full((3, 2), 2.0, np.float32)}),
                      "has shape (3, 2), expected (2, 3)"),
    "a missing shared key": (WeightedMean, lambda: _liar(params={"enc.w": np.full((2, 3), 2.0, np.float32)}),
                             "lacks 1 shared parameter"),
    "a key that is not a string": (WeightedMean, lambda: _liar(params={**_params(2.0), 7: np.ones(1)}),
                                   "must be a string"),
    "parameters that are not a dict": (WeightedMean, lambda: _with(_liar(), params=[np.ones(3)]), "must be a dict"),
    "parameters that raise when read": (WeightedMean, lambda: _with(_liar(), params={"enc.w": _Hostile()}),
                                        "not a tensor"),
    # the metrics
    "a text metric": (WeightedMean, lambda: _liar(metrics={"val_dice": "0.99"}), "is text"),
    "a bytes metric": (WeightedMean, lambda: _liar(metrics={"val_dice": b"\x00" * 64}), "not a number"),
    "a nested metric": (WeightedMean, lambda: _liar(metrics={"val_dice": {"deep": [1, 2]}}), "not a number"),
    "a list metric": (WeightedMean, lambda: _liar(metrics={"val_dice": [0.5]}), "not a number"),
    "a tensor metric": (WeightedMean, lambda: _liar(metrics={"val_dice": torch.ones(10**3)}), "not a number"),
    "a bool metric": (WeightedMean, lambda: _liar(metrics={"val_dice": True}), "not a number"),
    "a huge integer metric": (WeightedMean, lambda: _liar(metrics={"images": 10**400}), "out of range"),
    "a metric named n_samples": (WeightedMean, lambda: _liar(metrics={"n_samples": 10**6}), "server records"),
    "a metric named bytes_uploaded": (WeightedMean, lambda: _liar(metrics={"bytes_uploaded": 0}), "server records"),
    "a metric named rejected": (WeightedMean, lambda: _liar(metrics={"rejected": None}), "server records"),
    "a metric named aggregation_weight": (WeightedMean, lambda: _liar(metrics={"aggregation_weight": 1.0}),
                                          "server records"),
    "a metric named weight_clipped": (WeightedMean, lambda: _liar(metrics={"weight_clipped": None}),
                                      "server records"),
    "a metric name of 10k characters": (WeightedMean, lambda: _liar(metrics={"x" * 10_000: 1.0}), "longer than"),
    "a metric name that is not printable": (WeightedMean, lambda: _liar(metrics={"val\x1b[2Jdice": 1.0}),
                                            "not printable"),
    "a metric name that is not a string": (WeightedMean, lambda: _liar(metrics={3: 1.0}), "must be a string"),
    "an organ of 1k characters": (WeightedMean, lambda: _liar(metrics={"organ": "x" * 1000}), "longer than"),
    "metrics that are not a dict": (WeightedMean, lambda: _with(_liar(), metrics=[("val_dice", 1.0)]),
                                    "must be a dict"),
    "meta that is not a dict": (WeightedMean, lambda: _with(_liar(), meta=None), "?2: meta must be a dict"),
    "a result that is not a model": (WeightedMean, lambda: _Hostile(), "?2: unreadable result"),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_a_lying_or_malformed_site_is_rejected_and_the_honest_ones_aggregate(case):
    rule_class, make_liar, reason = PLAIN_CASES[case]
    rule = rule_class(REFERENCE)
    intake = _intake()
    outcome = intake.collect(0, rule, REFERENCE, [*_honest(), make_liar()])
    sites = outcome.record["sites"]
    liar = next(s for s in sites if s not in HONEST)
    assert reason in sites[liar]["rejected"], sites[liar]["rejected"]
    assert all("rejected" not in sites[s] for s in HONEST)
    assert outcome.record["accepted"] == 2 and rule.contributors == list(HONEST)
    _assert_close(outcome.aggregate, _honest_only(rule_class))
    # the server's own fields are the server's: a metric never stands in for one
    assert all(isinstance(sites[s]["bytes_uploaded"], int) for s in sites)
    if "n_samples" in case or "bytes_uploaded" in case:
        assert sites[liar]["n_samples"] == LIAR[2] and sites[liar]["bytes_uploaded"] == 8 * 4
    json.dumps(outcome.record, default=str)  # the history stays JSON
    assert any("rejected update" in line for line in intake.lines)  # logged


def test_a_weight_above_the_median_multiple_is_clipped_in_clear():
    rule = WeightedMean(REFERENCE)
    outcome = _intake().collect(0, rule, REFERENCE, [*_honest(), _liar(weight=1e6)])  # under the absolute maximum
    entry = outcome.record["sites"]["liar"]
    bound = DEFAULTS.weight_median_multiple * np.median([10, 30])  # 10 x the median of the others' claims: 200
    assert "rejected" not in entry and "median of the other sites' claims" in entry["weight_clipped"]
    assert entry["claimed_weight"] == 1e6 and entry["aggregation_weight"] == bound
    expected = _reference_aggregate(WeightedMean, [("a", _params(1.0), 10, None), ("b", _params(3.0), 30, None),
                                                   ("liar", _params(2.0), bound, None)])
    _assert_close(outcome.aggregate, expected)


def test_a_rule_that_fails_on_one_update_rejects_that_site_alone():
    class Brittle(WeightedMean):
        def add(self, site, params, weight, steps=None):
            if site == "liar":
                raise RuntimeError("an internal error a crafted update provokes")
            return super().add(site, params, weight, steps)

    rule = Brittle(REFERENCE)
    outcome = _intake().collect(0, rule, REFERENCE, [*_honest(), _liar()])
    assert "the server rule failed on this update: RuntimeError" in outcome.record["sites"]["liar"]["rejected"]
    _assert_close(outcome.aggregate, _honest_only(WeightedMean))


def test_a_non_finite_aggregate_is_never_returned_and_the_round_keeps_the_previous_model():
    class Overflowing(WeightedMean):  # finite inputs whose float32 result overflows
        def result(self):
            return {k: np.full(shape, np.float32(3e38)) * np.float32(10) for k, shape in self.shapes.items()}

    with np.errstate(over="ignore"):
        outcome = _intake().collect(0, Overflowing(REFERENCE), REFERENCE, _honest())
    assert outcome.aggregate is None and "NaN or Inf" in outcome.record["aggregate_refused"]
    assert outcome.record["accepted"] == 2

    class Failing(WeightedMean):
        def result(self):
            raise MemoryError("out of memory")

    outcome = _intake().collect(0, Failing(REFERENCE), REFERENCE, _honest())
    assert outcome.aggregate is None and "MemoryError" in outcome.record["aggregate_refused"]


def test_fednova_with_an_honest_liar_normalizes_as_before():
    """A result that passes every check is FedNova's, unchanged: the bounds only remove what is out of range."""
    rule = FedNovaRule(REFERENCE)
    outcome = _intake().collect(0, rule, REFERENCE, [*_honest(), _liar()])
    expected = _reference_aggregate(FedNovaRule, [("a", _params(1.0), 10, 20), ("b", _params(3.0), 30, 24),
                                                  ("liar", _params(2.0), 20, 22)])
    _assert_close(outcome.aggregate, expected)
    assert outcome.record["sites"]["liar"]["steps"] == 22


def test_metrics_are_recorded_and_text_only_where_text_belongs():
    metrics = {"train_loss": np.float32(0.25), "val_dice": 0.5, "test_hd95": float("nan"), "dp_sgd_unit": "case",
               "dp_sgd_epsilon_per_case": None, "dp_sgd_steps": np.int64(7), "val_dice/brain": 0.4}
    outcome = _intake().collect(0, WeightedMean(REFERENCE), REFERENCE, [*_honest(), _liar(metrics=metrics)])
    entry = outcome.record["sites"]["liar"]
    assert "rejected" not in entry
    assert entry["train_loss"] == pytest.approx(0.25) and type(entry["train_loss"]) is float
    assert math.isnan(entry["test_hd95"]) and entry["dp_sgd_unit"] == "case" and entry["dp_sgd_steps"] == 7
    assert entry["dp_sgd_epsilon_per_case"] is None and entry["val_dice/brain"] == 0.4
    assert entry["n_samples"] == 20 and entry["aggregation_weight"] == 20 and entry["bytes_uploaded"] == 8 * 4


def test_an_honest_round_records_what_the_controller_recorded():
    rule = WeightedMean(REFERENCE)
    extra = {**_params(2.0), "head.w": np.ones(3, np.float32)}  # a non-shared key: dropped, never aggregated
    outcome = _intake().collect(0, rule, REFERENCE, [*_honest(), _liar(params=extra)])
    record = outcome.record
    assert record["round"] == 0 and record["accepted"] == 3
    assert record["sites"]["liar"]["dropped_keys"] == ["head.w"]
    assert record["sites"]["a"] == {"bytes_uploaded": 32, "n_samples": 10, "steps": 20, "aggregation_weight": 10.0,
                                    "train_loss": 0.1, "val_dice": 0.5}
    expected = _reference_aggregate(WeightedMean, [("a", _params(1.0), 10, None), ("b", _params(3.0), 30, None),
                                                   ("liar", _params(2.0), 20, None)])
    _assert_close(outcome.aggregate, expected)


def test_the_default_bounds_never_touch_the_honest_default_federations():
    """The default multiple (10) leaves the synthetic federations alone: their training slices (70% of the cases;
    12 slices per 3D case) are at most ~2.4 times the median of the others' (30 unequal sites of ``bench scale``)."""
    from fedoap.bench_scale import scale_sites
    from fedoap.data import DEFAULT_SITES

    def training_slices(organ, cases):
        return round(0.7 * cases) * (1 if organ == "breast" else 12)

    federations = [{s: spec for s, spec in DEFAULT_SITES.items() if s != "lung"}, scale_sites(30),
                   scale_sites(30, seed=1)]
    for sites in federations:
        rule = FedNovaRule(REFERENCE)
        results = []
        for i, (site, (organ, cases)) in enumerate(sites.items()):
            n = training_slices(organ, cases)
            results.append(_result(site, _params(float(i % 3)), n, max(1, -(-n // 16))))  # steps at batch 16
        outcome = _intake().collect(0, rule, REFERENCE, results)
        assert outcome.record["accepted"] == len(sites)
        assert not any("weight_clipped" in e or "rejected" in e for e in outcome.record["sites"].values())


# -- statistics ----------------------------------------------------------------------------------------------------
def test_statistics_of_a_method_that_uses_none_are_ignored_and_never_forwarded():
    intake = _intake(shares_statistics=False)
    outcome = intake.collect(0, WeightedMean(REFERENCE), REFERENCE,
                             [*_honest(), _liar(meta={SITE_STATISTICS_KEY: {"mean": [0.5] * 100}})])
    entry = outcome.record["sites"]["liar"]
    assert "uses no site statistics" in entry["statistics_ignored"] and "rejected" not in entry
    assert entry["bytes_uploaded"] == 8 * 4 + 100 * 4  # what it sent, all the same
    assert intake.site_statistics == {} and intake.task_meta() == {}


@pytest.mark.parametrize("statistics, reason", [
    ({"mean": [0.5] * 101}, "more than 100"),
    ({"mean": [0.5, float("nan")]}, "finite numbers"),
    ({"mean": ["0.5"]}, "finite numbers"),
    ({"mean": [[0.5]]}, "finite numbers"),
    ({"mean": {"deep": [0.5]}}, "must be a list"),
    ({"mean": b"\x00" * 8}, "must be a list"),
    ({3: [0.5]}, "must be a string"),
    ([0.5, 0.5], "must be a dict"),
    ({"mean": np.ones((2, 2))}, "must be a list"),
])
def test_malformed_or_oversized_statistics_are_ignored(statistics, reason):
    limits = IntakeLimits(max_site_weight=1e7, weight_median_multiple=10, max_site_steps=1000,
                          max_statistics_values=100)
    intake = RoundIntake(limits, shares_statistics=True, warn=lambda line: None, progress=lambda line: None)
    good = {"mean": [0.1, 0.2], "std": np.array([1.0, 2.0])}
    results = [_result("a", _params(1.0), 10, 10, meta={SITE_STATISTICS_KEY: good}), _honest()[1],
               _liar(meta={SITE_STATISTICS_KEY: statistics})]
    outcome = intake.collect(0, WeightedMean(REFERENCE), REFERENCE, results)
    assert reason in outcome.record["sites"]["liar"]["statistics_ignored"]
    assert intake.site_statistics == {"a": {"mean": [0.1, 0.2], "std": [1.0, 2.0]}}  # plain lists of floats
    assert intake.task_meta() == {SITE_STATISTICS_KEY: intake.site_statistics}


def test_a_rejected_site_s_statistics_are_not_kept():
    intake = RoundIntake(DEFAULTS, shares_statistics=True, warn=lambda line: None, progress=lambda line: None)
    first = intake.collect(0, WeightedMean(REFERENCE), REFERENCE,
                           [*_honest(), _liar(meta={SITE_STATISTICS_KEY: {"mean": [1.0]}})])
    assert intake.site_statistics == {"liar": {"mean": [1.0]}} and "rejected" not in first.record["sites"]["liar"]
    intake.collect(1, WeightedMean(REFERENCE), REFERENCE,
                   [*_honest(), _liar(params=_params(np.nan), meta={SITE_STATISTICS_KEY: {"mean": [9.0]}})])
    assert intake.site_statistics == {"liar": {"mean": [1.0]}}  # the previous ones stay


# -- under HE: the server sees ciphertext only ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def he():
    import tenseal as ts

    server, client = create_contexts()
    return ts.context_from(server), ts.context_from(client)


def _sealed(value, weight, client) -> dict:
    return to_params(encrypt_update(_params(value), weight, client))


def _header(params) -> dict:
    return json.loads(bytes(params[HE_KEY_PREFIX + "header"]).decode())


def _with_header(params, **change) -> dict:
    header = {**_header(params), **change}
    text = json.dumps(header).encode()
    return {**params, HE_KEY_PREFIX + "header": np.frombuffer(text, np.uint8).copy()}


def _he_liar(he, **change):
    def make():
        site, value, weight, steps = LIAR
        sealed = _sealed(value, weight, he[1])
        params = change["params"](sealed) if "params" in change else sealed
        return _result(site, params, change.get("weight", weight), steps)
    return make


HE_CASES = {
    "an HE header with infinite sizes": (lambda s: _with_header(s, n_values=math.inf), "malformed encrypted update"),
    "an HE header with 1e15 chunks": (lambda s: _with_header(s, n_chunks=10**15), "expected ciphertext chunks"),
    "an HE header with a huge layout": (lambda s: _with_header(s, layout={"keys": ["enc.b", "enc.w"],
                                                                          "shapes": [[10**30], [2, 3]]},
                                                               n_values=10**30 + 6),
                                        "does not hold exactly the shared parameters"),
    "an HE header with an infinite shape": (lambda s: _with_header(s, layout={"keys": ["enc.w"],
                                                                              "shapes": [[math.inf]]}),
                                            "malformed encrypted update"),
    "an HE header that is not JSON": (lambda s: {**s, HE_KEY_PREFIX + "header": np.frombuffer(b"\xff{", np.uint8)},
                                      "malformed encrypted update"),
    "an update that claims to be a sum of five": (lambda s: _with_header(s, count=5), "sum 5 updates"),
    "random ciphertext bytes": (lambda s: {k: (np.frombuffer(np.random.default_rng(0).bytes(v.size), np.uint8).copy()
                                               if k.startswith(HE_KEY_PREFIX + "ct.") else v) for k, v in s.items()},
                                "do not add to the round's sum"),
    "a short random ciphertext": (lambda s: {k: (np.frombuffer(b"\x01" * 10, np.uint8).copy()
                                                 if k.startswith(HE_KEY_PREFIX + "ct.") else v)
                                             for k, v in s.items()}, "do not add to the round's sum"),
    "an oversized ciphertext": (lambda s: {k: (np.zeros(10**7, np.uint8) if k.startswith(HE_KEY_PREFIX + "ct.")
                                               else v) for k, v in s.items()}, "more than a ciphertext"),
    "a missing ciphertext chunk": (lambda s: {k: v for k, v in s.items() if not k.startswith(HE_KEY_PREFIX + "ct.")},
                                   "expected ciphertext chunks"),
    "a ciphertext of int16": (lambda s: {k: (v.astype(np.int16) if k.startswith(HE_KEY_PREFIX + "ct.") else v)
                                         for k, v in s.items()}, "1-D uint8"),
    "plaintext under HE": (lambda s: _params(2.0), "plaintext update while homomorphic encryption is on"),
    "a text value next to the ciphertext": (lambda s: {**s, "enc.w": "2.0"}, "not a tensor"),
    "a transport weight of 1e9": (lambda s: {**s, HE_KEY_PREFIX + "weight": np.array([1e9])},
                                  "differs from the sample count"),
}


@pytest.mark.parametrize("case", list(HE_CASES))
def test_under_he_a_malformed_update_is_rejected_and_the_honest_sum_decrypts(case, he):
    server, client = he
    mutate, reason = HE_CASES[case]
    honest = [_result(s, _sealed(v, n, client), n, t) for s, (v, n, t) in HONEST.items()]
    rule = EncryptedSum(REFERENCE, server)
    outcome = _intake().collect(1, rule, {}, [*honest, _he_liar(he, params=mutate)()])
    liar = outcome.record["sites"]["liar"]
    assert reason in liar["rejected"], liar["rejected"]
    assert outcome.record["accepted"] == 2 and rule.contributors == list(HONEST)
    # what the sites decrypt is the honest sites' weighted mean
    _assert_close({k: np.round(v, 3) for k, v in decrypt_average(from_params(outcome.aggregate), client).items()},
                  _honest_only(WeightedMean))


@pytest.mark.parametrize("weight, reason", [(1e9, "largest"), (1e6, "median of the other sites' claims")])
def test_under_he_a_weight_out_of_bounds_is_rejected_not_clipped(weight, reason, he):
    server, client = he
    honest = [_result(s, _sealed(v, n, client), n, t) for s, (v, n, t) in HONEST.items()]
    liar = _result("liar", to_params(encrypt_update(_params(2.0), 1.0, client)), weight, 11, meta={"n_samples": 20})
    liar.params[HE_KEY_PREFIX + "weight"] = np.array([weight])  # the clear weight inside matches the claim
    outcome = _intake().collect(1, EncryptedSum(REFERENCE, server), {}, [*honest, liar])
    assert reason in outcome.record["sites"]["liar"]["rejected"]
    assert "weight_clipped" not in outcome.record["sites"]["liar"]
    _assert_close({k: np.round(v, 3) for k, v in decrypt_average(from_params(outcome.aggregate), client).items()},
                  _honest_only(WeightedMean))


def test_under_he_an_honest_round_is_the_encrypted_weighted_mean(he):
    server, client = he
    results = [_result(s, _sealed(v, n, client), n, t) for s, (v, n, t) in HONEST.items()]
    results.append(_result("liar", _sealed(2.0, 20, client), 20, 11))
    outcome = _intake().collect(1, EncryptedSum(REFERENCE, server), {}, results)
    assert outcome.record["accepted"] == 3
    mean = decrypt_average(from_params(outcome.aggregate), client)
    np.testing.assert_allclose(mean["enc.w"], (10 * 1 + 30 * 3 + 20 * 2) / 60, atol=1e-3)


# -- personalization and the job's progress output -------------------------------------------------------------------
def test_personalized_metrics_are_checked_too():
    intake = _intake()
    results = [FLModel(params={}, metrics={"organ": "brain", "test_dice": 0.8, "test_hd95": float("nan")},
                       meta={"client_name": "a"}),
               FLModel(params={}, metrics={"organ": "liver", "test_dice": "0.99"}, meta={"client_name": "liar"})]
    personalized = intake.collect_personalized(results)
    assert personalized["a"]["organ"] == "brain" and personalized["a"]["test_dice"] == 0.8
    assert "is text" in personalized["liar"]["rejected"]
    assert "a: personalized test Dice 0.800, HD95 nan" in intake.lines
    class Exploding(dict):
        def items(self):
            raise RuntimeError("hostile")

    hostile = [_with(FLModel(meta={"client_name": "x"}), metrics=_Hostile()),
               _with(FLModel(meta={"client_name": "y"}), metrics=Exploding(a=1))]
    refused = intake.collect_personalized(hostile)
    assert "must be a dict" in refused["x"]["rejected"] and "unreadable: RuntimeError" in refused["y"]["rejected"]


def test_the_progress_line_survives_whatever_the_sites_sent():
    intake = _intake()
    intake.collect(0, WeightedMean(REFERENCE), REFERENCE, [*_honest(), _liar(metrics={"val_dice": "x"}), _Hostile()])
    (line,) = [line for line in intake.lines if line.startswith("round 1/1")]
    assert "(2/4 accepted)" in line and "a loss 0.100 val Dice 0.500" in line and "liar loss nan val Dice nan" in line


def test_a_second_answer_under_the_same_name_gets_an_entry_of_its_own():
    outcome = _intake().collect(0, WeightedMean(REFERENCE), REFERENCE, [*_honest(), _honest()[0]])
    assert set(outcome.record["sites"]) == {"a", "b", "a (answer 3)"}


def test_the_intake_limits_are_checked():
    with pytest.raises(ValueError, match="weight_median_multiple"):
        IntakeLimits(max_site_weight=1, weight_median_multiple=0.5, max_site_steps=1, max_statistics_values=1)
    with pytest.raises(ValueError, match="max_site_steps"):
        IntakeLimits(max_site_weight=1, weight_median_multiple=2, max_site_steps=0, max_statistics_values=1)
    with pytest.raises(ValueError, match="num_rounds"):
        RoundIntake(DEFAULTS, num_rounds=0)
    assert RoundIntake(DEFAULTS).limits == IntakeLimits.of(DEFAULTS)


def test_a_rule_the_intake_does_not_know_still_follows_the_protocol():
    """Any ServerRule works: the intake relies on the protocol only (shapes, shares, encrypted, uses_steps)."""
    assert issubclass(WeightedMean, ServerRule) and FedNovaRule.uses_steps and not WeightedMean.uses_steps


@pytest.mark.parametrize("liar_steps", [10**6, 1])
def test_with_two_sites_that_disagree_on_steps_neither_is_trusted(liar_steps):
    """Two claims that differ by more than k: nothing tells which one lies, so neither enters and the round keeps
    the previous model (with three or more sites the median of all the claims tells: the cases above)."""
    rule = FedNovaRule(REFERENCE)
    outcome = _intake().collect(0, rule, REFERENCE, [_result("a", _params(1.0), 10, 20), _liar(steps=liar_steps)])
    assert all("the median of the other site's step count" in e["rejected"] for e in outcome.record["sites"].values())
    assert outcome.aggregate is None and rule.count == 0
    outcome = _intake().collect(0, rule, REFERENCE, [_result("a", _params(1.0), 10, 20), _liar(steps=150)])
    assert outcome.record["accepted"] == 2  # within k of each other: both enter


def test_a_finite_but_huge_update_passes_every_check_and_only_a_robust_rule_or_a_norm_bound_stops_it():
    """Values of 1e30 are well-formed: the weighted mean becomes the liar's; the median, or a norm bound, does not."""
    from fedoap.server.rules import rule_for_job

    huge = _liar(params=_params(1e30))
    mean = _intake().collect(0, rule_for_job(WeightedMean, {}, REFERENCE), REFERENCE, [*_honest(), huge])
    assert mean.record["accepted"] == 3 and mean.aggregate["enc.w"].min() > 1e29  # accepted: nothing malformed
    for options in ({"robust_rule": "median"}, {"robust_rule": "trimmed_mean", "robust_args": {"trim_fraction": 0.1}},
                    {"update_norm_bound": 1.0}):
        rule = rule_for_job(WeightedMean, {}, REFERENCE, **options)
        outcome = _intake().collect(0, rule, REFERENCE, [*_honest(), _liar(params=_params(1e30))])
        assert outcome.record["accepted"] == 3, options
        assert all(np.abs(v).max() <= 3.0 for v in outcome.aggregate.values()), options


def test_under_the_null_rule_the_rounds_only_record_metrics():
    from fedoap.server.rules import NoAggregation

    rule = NoAggregation({})
    results = [FLModel(params={}, metrics={"train_loss": 0.2}, meta={"client_name": "a", "n_samples": 1}),
               FLModel(params={"bias": torch.full((2,), 99.0)}, metrics={"val_dice": 0.4},
                       meta={"client_name": "b"}),  # no weight at all: nothing is weighted
               FLModel(params={"bias": "99"}, meta={"client_name": "c", "n_samples": 1})]
    outcome = _intake().collect(0, rule, {}, results)
    sites = outcome.record["sites"]
    assert outcome.aggregate is None and outcome.record["accepted"] == 0
    assert sites["a"]["train_loss"] == 0.2 and sites["b"]["dropped_keys"] == ["bias"]
    assert sites["b"]["bytes_uploaded"] == 8 and "not a tensor" in sites["c"]["rejected"]
    assert "aggregate_refused" not in outcome.record
