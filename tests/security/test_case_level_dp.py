"""Case-level DP-SGD: a patient's volume gives many slices, and slice-level DP protects a slice, not a patient.

The attack on slice-level DP-SGD: a patient with ``k`` slices is ``k`` records, and several of them land in one
step's batch, so the accountant's epsilon says nothing about the patient (only group privacy over ``k`` does).
With ``unit="case"`` cases are Poisson-sampled and each sampled case gives one slice: these tests check every step
of real training for it, that the rate the accountant composes is the case rate, that epsilon is Opacus's for that
history, and that the trainer reports the per-patient number next to the per-slice one. Real Opacus, no mocks.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats
from torch import nn

from fedoap.data import SliceSet
from fedoap.methods.fedoap import FedOAP
from fedoap.networks import FedOAPNet
from fedoap.privacy.dp import DPSGD, DPSGDConfig, group_epsilon
from fedoap.training import LocalTrainer, TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

#: 12 cases of 1 to 8 slices (53 slices), interleaved as a loader could hand them out
SLICES_PER_CASE = [1, 8, 3, 5, 2, 8, 4, 6, 1, 7, 3, 5]
CASE_IDS = [f"case{c}" for c, k in enumerate(SLICES_PER_CASE) for _ in range(k)]
CASE_IDS = [CASE_IDS[i] for i in np.random.default_rng(0).permutation(len(CASE_IDS))]


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def private_loop(unit: str, epochs: int, batch_size: int = 4) -> tuple[DPSGD, list[list[int]]]:
    """Real DP-SGD steps of a tiny network on 8 x 8 images; returns the object and every step's batch."""
    n = len(CASE_IDS)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 8, 8, generator=g)
    labels = (torch.rand(n, 1, 8, 8, generator=g) > 0.8).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.ReLU(), nn.Conv2d(2, 1, 1))
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0, unit=unit), n_train=n, batch_size=batch_size, case_ids=CASE_IDS)
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.05))
    loss_fn = nn.BCEWithLogitsLoss()
    batches = []
    for _ in range(epochs):
        for idx in dp.batches(optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[idx]), labels[idx]).backward()
            optimizer.step()
            batches.append(idx.tolist())
    return dp, batches


def test_slice_level_batches_hold_several_slices_of_one_patient():
    dp, batches = private_loop("slice", epochs=4)  # q = 1/14 over 53 slices
    assert dp.n_units == 53 and dp.sample_rate == 1 / 14
    repeats = sum(max(Counter(CASE_IDS[i] for i in b).values()) > 1 for b in batches)
    assert repeats > 0  # a patient is several records of one step: the per-slice epsilon is not per patient
    assert dp.max_slices_per_case == 8
    assert dp.case_epsilon() > 8 * dp.epsilon() > 0


def test_case_level_steps_hold_at_most_one_slice_per_case_sampled_at_the_case_rate():
    epochs = 75
    dp, batches = private_loop("case", epochs=epochs)  # q = 1/3 over 12 cases
    assert dp.n_units == dp.n_cases == 12 and dp.sample_rate == 1 / 3 and dp.steps_per_epoch == 3
    assert dp.expected_batch_size == 4
    for b in batches:
        cases = [CASE_IDS[i] for i in b]
        assert len(cases) == len(set(cases)), "two slices of one patient in one step"
    draws = epochs * dp.steps_per_epoch
    assert dp.steps == draws  # every draw accounted, empty ones (noise-only steps) included
    # sampling is over cases: each case is in a draw with probability q whatever its number of slices
    per_case = Counter(CASE_IDS[i] for b in batches for i in b)
    for case, count in per_case.items():
        assert abs(count - draws * dp.sample_rate) < 5 * math.sqrt(draws * dp.sample_rate * (1 - dp.sample_rate)), case
    # and the slice of a sampled case is uniform among its slices (chi-square over the 8-slice cases)
    for case in ("case1", "case5"):
        slices = [i for i, c in enumerate(CASE_IDS) if c == case]
        counts = Counter(i for b in batches for i in b if CASE_IDS[i] == case)
        assert stats.chisquare([counts[i] for i in slices]).pvalue > 1e-6


def test_case_level_epsilon_is_opacus_for_the_case_rate_history():
    dp, _ = private_loop("case", epochs=4)
    assert dp.engine.accountant.history == [(1.0, 1 / 3, 12)]  # the rate composed is the case rate
    for delta in (1e-5, 1e-3):
        assert dp.epsilon(delta) == pytest.approx(rdp_epsilon(1.0, 1 / 3, 12, delta), rel=1e-12)
    assert dp.case_epsilon() == dp.epsilon()


def test_group_epsilon_is_the_group_privacy_bound():
    history = [(1.5, 0.1, 40)]
    single = rdp_epsilon(1.5, 0.1, 40, 1e-5)
    assert group_epsilon(history, 1, 1e-5) == pytest.approx(single, rel=1e-9)
    previous = single
    for k in (2, 4, 8):
        eps = group_epsilon(history, k, 1e-5)
        assert eps >= k * single * (1 - 1e-9)  # k * eps0(delta0) with delta0 <= delta
        assert eps > previous
        previous = eps
    assert group_epsilon([], 4, 1e-5) == 0.0
    assert group_epsilon([(0.0, 0.1, 3)], 4, 1e-5) == math.inf
    with pytest.raises(ValueError, match="group_size"):
        group_epsilon(history, 0, 1e-5)


def tiny_trainer(unit: str) -> LocalTrainer:
    n = len(CASE_IDS)
    g = np.random.default_rng(0)
    split = SliceSet(images=g.random((n, 1, 32, 32), dtype=np.float32),
                     labels=(g.random((n, 1, 32, 32)) > 0.8).astype(np.float32), case_ids=CASE_IDS)
    torch.manual_seed(0)
    model = FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8)
    return LocalTrainer(model, FedOAP(), split, split, TrainConfig(batch_size=8, augment=False, finetune_epochs=0),
                        dp=DPSGDConfig(noise_multiplier=1.2, unit=unit))


@pytest.mark.parametrize("unit", ["slice", "case"])
def test_the_trainer_reports_the_per_patient_epsilon_and_the_ledger_entries(unit):
    trainer = tiny_trainer(unit)
    assert trainer.dp.n_units == (12 if unit == "case" else 53)
    first = trainer.train_round()["privacy"]
    second = trainer.train_round()["privacy"]
    q = 1 / 2 if unit == "case" else 1 / 7
    assert trainer.steps_per_round == int(1 / q)
    assert second["dp_sgd_unit"] == unit and second["max_slices_per_case"] == 8
    assert second["dp_sgd_sample_rate"] == q and second["dp_sgd_noise_multiplier"] == 1.2
    assert first["dp_sgd_round_steps"] == second["dp_sgd_round_steps"] == int(1 / q)
    assert second["dp_sgd_steps"] == 2 * int(1 / q) and second["dp_sgd_delta"] == 1e-5
    assert second["dp_sgd_epsilon"] == pytest.approx(rdp_epsilon(1.2, q, 2 * int(1 / q), 1e-5), rel=1e-12)
    if unit == "case":
        assert second["dp_sgd_epsilon_per_case"] == second["dp_sgd_epsilon"]
    else:
        expected = group_epsilon([(1.2, q, 2 * int(1 / q))], 8, 1e-5)
        assert second["dp_sgd_epsilon_per_case"] == pytest.approx(expected, rel=1e-12)
        assert second["dp_sgd_epsilon_per_case"] > 8 * second["dp_sgd_epsilon"]
