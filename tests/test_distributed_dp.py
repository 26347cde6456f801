"""Distributed client-level DP (``--dp-update-distributed``): under secure aggregation or HE each site adds only its
share of the Gaussian noise, so the sum the server sees carries the promised ``sigma * C``. Checked on the real
site boundary (``SitePrivacy``) and noise source: the sum of the sites' noise has the promised std, a site never
releases its share in clear, both reported epsilons equal Opacus's accountant for the stated mechanism, a site's
policy (local DP) keeps all of the noise on each release, and the options that cannot keep the promise are refused."""

import math

import numpy as np
import pytest
import torch

from fedoap.config import RunConfig
from fedoap.privacy.dp import UpdateDPConfig, update_dp_epsilon
from fedoap.site.privacy import SitePrivacy, stricter

SIGMA, CLIP, DELTA = 1.2, 1.0, 1e-5
N_VALUES = 400_000


def _released_noise(privacy: SitePrivacy) -> np.ndarray:
    """The noise one site's release carries: a zero update (local equals global), released through the masker
    (which sees the noised update times the weight, before it is masked)."""
    seen = []
    zeros = {"w": torch.zeros(N_VALUES)}

    def masker(values: np.ndarray) -> np.ndarray:
        seen.append(values.copy())
        return np.zeros(values.size, dtype=np.uint32)

    privacy.outgoing(zeros, zeros, 1.0, masker=masker)
    return seen[0]


@pytest.mark.parametrize("n_sites, shares", [(2, 2), (3, 3), (3, 2), (5, 3)])
def test_the_sum_of_the_sites_noise_has_the_promised_std(n_sites, shares):
    dp = UpdateDPConfig(clip_norm=CLIP, noise_multiplier=SIGMA, delta=DELTA, shares=shares)
    total = sum(_released_noise(SitePrivacy(update_dp=dp)) for _ in range(n_sites))
    promised = SIGMA * CLIP * math.sqrt(n_sites / shares)  # n sites, each 1/shares of the variance
    assert np.std(total) == pytest.approx(promised, rel=0.02)
    one = _released_noise(SitePrivacy(update_dp=dp))
    assert np.std(one) == pytest.approx(SIGMA * CLIP / math.sqrt(shares), rel=0.02)
    # any `shares` of them: the promised sigma * C against the server
    assert np.std(sum(_released_noise(SitePrivacy(update_dp=dp)) for _ in range(shares))) == pytest.approx(
        SIGMA * CLIP, rel=0.02)


def test_a_share_of_the_noise_is_never_released_in_clear():
    dp = UpdateDPConfig(clip_norm=CLIP, noise_multiplier=SIGMA, delta=DELTA, shares=3)
    zeros = {"w": torch.zeros(10)}
    with pytest.raises(ValueError, match="secure aggregation or HE is off, so the update is not released"):
        SitePrivacy(update_dp=dp).outgoing(zeros, zeros, 1.0)


def test_both_epsilons_equal_the_accountant_and_the_stamp_states_the_sites_own_noise():
    dp = UpdateDPConfig(clip_norm=CLIP, noise_multiplier=SIGMA, delta=DELTA, shares=4)
    privacy = SitePrivacy(update_dp=dp)
    zeros = {"w": torch.zeros(10)}
    for rounds in (1, 2, 3):
        _, metrics = privacy.outgoing(zeros, zeros, 1.0, masker=lambda v: np.zeros(v.size, dtype=np.uint32))
        assert metrics["dp_update_epsilon"] == pytest.approx(update_dp_epsilon(SIGMA, rounds, DELTA), rel=1e-9)
        assert metrics["dp_update_epsilon_coalition"] == pytest.approx(
            update_dp_epsilon(SIGMA / 2, rounds, DELTA), rel=1e-9)  # only this site's share: sigma / sqrt(4)
        assert metrics["dp_update_epsilon_coalition"] > metrics["dp_update_epsilon"]
    # the site's ledger is charged for what its own release went through: its share
    assert privacy.stamp()["noise_multiplier"] == pytest.approx(SIGMA / 2)


def test_a_sites_policy_keeps_all_of_the_noise_on_each_release():
    job = UpdateDPConfig(clip_norm=CLIP, noise_multiplier=SIGMA, delta=DELTA, shares=3)
    site_policy = UpdateDPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    combined = stricter(job, site_policy)
    assert combined.shares == 1 and combined.site_noise_multiplier == SIGMA


@pytest.mark.parametrize("options, message", [
    ({"dp_update_distributed": True}, "--dp-update-distributed needs client-level DP"),
    ({"dp_update_distributed": True, "dp_update_clip": 1.0, "dp_update_noise": 1.0},
     "--dp-update-distributed needs --secagg or --he"),
    ({"dp_update_distributed": True, "dp_update_clip": 1.0, "dp_update_noise": 1.0, "secagg": True},
     "--dp-update-distributed: give --min-responses m >= 2"),
])
def test_options_that_cannot_keep_the_promise_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_options(method="fedavg", **options)


def test_the_shares_come_from_min_responses():
    config = RunConfig.from_options(method="fedavg", secagg=True, dp_update_clip=1.0, dp_update_noise=2.0,
                                    dp_update_distributed=True, min_responses=3)
    assert config.update_dp().shares == 3 and config.update_dp().site_noise_multiplier == pytest.approx(2 / 3 ** 0.5)
    local = RunConfig.from_options(method="fedavg", secagg=True, dp_update_clip=1.0, dp_update_noise=2.0)
    assert local.update_dp().shares == 1
