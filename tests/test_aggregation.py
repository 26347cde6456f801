"""The server's arithmetic and its rules: weighted mean (and FedNova's normalized mean) over shared keys, non-shared
keys dropped, bad updates rejected with a reason."""

import numpy as np
import pytest

from fedoap.server.aggregation import FedNovaAggregator, SharedParamsAggregator, UpdateRejected, payload_bytes

REF = {"enc.w": np.zeros((2, 3), np.float32), "enc.b": np.zeros(3, np.float32)}


def update(value, **extra):
    return {"enc.w": np.full((2, 3), value, np.float32), "enc.b": np.full(3, 2 * value, np.float32), **extra}


def test_weighted_mean_by_sample_count():
    agg = SharedParamsAggregator(REF)
    agg.add("a", update(1.0), weight=10)
    agg.add("b", update(4.0), weight=30)
    out = agg.result()
    np.testing.assert_allclose(out["enc.w"], np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    np.testing.assert_allclose(out["enc.b"], np.full(3, 2 * (10 * 1 + 30 * 4) / 40))
    assert out["enc.w"].dtype == np.float32
    assert agg.contributors == ["a", "b"]


def test_non_shared_keys_are_dropped_and_reported():
    agg = SharedParamsAggregator(REF)
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
    agg = SharedParamsAggregator(REF)
    agg.add("good", update(2.0), weight=1)
    with pytest.raises(UpdateRejected, match="bad") as err:
        agg.add("bad", params, weight=weight)
    assert reason in str(err.value)
    np.testing.assert_allclose(agg.result()["enc.w"], 2.0)  # the rejected update left no trace
    assert agg.count == 1


def test_no_accepted_update_is_an_error():
    with pytest.raises(ValueError, match="no client update"):
        SharedParamsAggregator(REF).result()
    with pytest.raises(ValueError, match="empty"):
        SharedParamsAggregator({})


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
    agg = FedNovaAggregator(GLOBAL)
    agg.add("a", site(0.0, 1.0), weight=10, steps=2)
    agg.add("b", site(-3.0, 2.0), weight=20, steps=4)
    agg.add("c", site(0.5, -1.0), weight=10, steps=1)
    out = agg.result()
    np.testing.assert_allclose(out["enc.w"], np.full((2, 3), -1.0625))
    np.testing.assert_allclose(out["enc.b"], np.full(3, 0.34375))
    assert out["enc.w"].dtype == np.float32 and agg.contributors == ["a", "b", "c"]
    # FedAvg on the same updates weighs the 4-step site by its extra steps: w = -1.375, b = 1.0
    avg = SharedParamsAggregator(GLOBAL)
    for name, (w, b), n in (("a", (0.0, 1.0), 10), ("b", (-3.0, 2.0), 20), ("c", (0.5, -1.0), 10)):
        avg.add(name, site(w, b), weight=n)
    np.testing.assert_allclose(avg.result()["enc.w"], -1.375)
    np.testing.assert_allclose(avg.result()["enc.b"], 1.0)


def test_fednova_with_equal_steps_is_the_weighted_mean():
    nova, avg = FedNovaAggregator(GLOBAL), SharedParamsAggregator(GLOBAL)
    for name, (w, b), n in (("a", (0.0, 1.0), 10), ("b", (-3.0, 2.0), 30)):
        nova.add(name, site(w, b), weight=n, steps=5)
        avg.add(name, site(w, b), weight=n)
    for key in GLOBAL:
        np.testing.assert_allclose(nova.result()[key], avg.result()[key], rtol=1e-6)


@pytest.mark.parametrize("steps", [None, 0, -1, float("nan"), float("inf"), "3", True])
def test_fednova_rejects_an_update_without_a_positive_step_count(steps):
    agg = FedNovaAggregator(GLOBAL)
    agg.add("good", site(0.0, 0.0), weight=1, steps=1)
    with pytest.raises(UpdateRejected, match="bad: FedNova needs the number of local steps"):
        agg.add("bad", site(5.0, 5.0), weight=1, steps=steps)
    np.testing.assert_allclose(agg.result()["enc.w"], 0.0)  # x - 1 * (1 - 0) / 1: only the good site
    assert agg.count == 1


def test_fednova_keeps_the_weighted_mean_rules():
    agg = FedNovaAggregator(GLOBAL)
    assert agg.add("a", site(0.0, 0.0, **{"head.w": np.ones(2)}), weight=1, steps=1) == ["head.w"]
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        agg.add("b", site(np.nan, 0.0), weight=1, steps=1)
    with pytest.raises(UpdateRejected, match="positive"):
        agg.add("c", site(0.0, 0.0), weight=0, steps=1)
    with pytest.raises(ValueError, match="no client update"):
        FedNovaAggregator(GLOBAL).result()
    with pytest.raises(ValueError, match="NaN or Inf"):
        FedNovaAggregator({"w": np.full(2, np.nan)})
