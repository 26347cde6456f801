"""Attack: regenerate the DP randomness from what the server knows (issue 9).

The first version drew the client-level update noise from ``torch.Generator().manual_seed(seed * 7919 +
crc32(site))`` and DP-SGD's Poisson batches and gradient noise from generators seeded with the job's ``--seed``.
The server knows the job's seed and every site's name, so it could replay the noise, subtract it from the released
update and read the clipped update in clear, and replay which images each step sampled. These tests mount those
attacks with everything the server knows and assert that they now recover nothing beyond what the noise allows,
while non-private training stays bit-reproducible from the seed. Real torch and Opacus, no mocks.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from fedoap.data import SliceSet
from fedoap.methods.fedoap import FedOAP
from fedoap.networks import FedOAPNet
from fedoap.privacy.dp import DPSGDConfig, clip_and_noise
from fedoap.privacy.secure_random import secure_normal
from fedoap.training import LocalTrainer, TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

JOB_SEED, SITE = 3, "brain"
CLIP, SIGMA = 0.5, 0.2


def old_site_generator(job_seed: int, site: str) -> torch.Generator:
    """How the first version seeded a site's update noise (``fl/client.py`` then ``SitePrivacy``)."""
    return torch.Generator().manual_seed(job_seed * 7919 + zlib.crc32(site.encode()))


def seeded_clip_and_noise(update, clip_norm, noise_multiplier, generator):
    """The first version's noising, reproduced as the positive control of the attack."""
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
    scale = min(1.0, clip_norm / norm)
    std = noise_multiplier * clip_norm
    return {k: (v.double() * scale).float() + std * torch.randn(v.shape, generator=generator)
            for k, v in update.items()}


def server_guesses(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """Every noise the server can regenerate from the job's arguments: the old per-site generator, torch's global
    generator seeded with the job's seed, and a generator seeded with the job's seed alone."""
    std = SIGMA * CLIP
    guesses = {}
    for name, make in {
        "site generator": lambda: old_site_generator(JOB_SEED, SITE),
        "job seed": lambda: torch.Generator().manual_seed(JOB_SEED),
        "global generator": lambda: torch.manual_seed(JOB_SEED),
    }.items():
        g = make()
        guesses[name] = {k: std * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    return guesses


def site_update() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A site's update whose norm is above the clip bound, and its clipped version (what the server wants)."""
    g = torch.Generator().manual_seed(123)
    update = {"enc.weight": 0.01 * torch.randn(200, 500, generator=g), "enc.bias": 0.01 * torch.randn(500, generator=g)}
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
    assert norm > CLIP
    clipped = {k: (v.double() * CLIP / norm).float() for k, v in update.items()}
    return update, clipped


def residual_std(estimate: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([(estimate[k].double() - truth[k].double()).flatten() for k in truth]).std())


def test_subtracting_the_regenerated_noise_recovers_nothing():
    update, clipped = site_update()
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    std = SIGMA * CLIP

    # positive control: against the first version the attack recovers the clipped update to float precision
    old_release = seeded_clip_and_noise(update, CLIP, SIGMA, old_site_generator(JOB_SEED, SITE))
    regenerated = server_guesses(shapes)["site generator"]
    broken = {k: old_release[k] - regenerated[k] for k in old_release}
    assert residual_std(broken, clipped) < 1e-6 * std

    # now: the release, and everything the server can regenerate from the job's arguments
    release, public = clip_and_noise(update, CLIP, SIGMA)
    assert set(public) == {"noise_std"}  # no pre-clip norm, no clip factor to undo the clipping with
    assert residual_std(release, clipped) == pytest.approx(std, rel=0.02)  # the release itself: error sigma * C
    for name, guess in server_guesses(shapes).items():
        estimate = {k: release[k] - guess[k] for k in release}
        # subtracting independent noise adds its variance: sqrt(2) sigma C, never below sigma C
        assert residual_std(estimate, clipped) == pytest.approx(math.sqrt(2) * std, rel=0.02), name
        noise = torch.cat([(release[k] - clipped[k]).flatten() for k in release]).double()
        replay = torch.cat([guess[k].flatten() for k in release]).double()
        assert abs(float(torch.corrcoef(torch.stack([noise, replay]))[0, 1])) < 0.02, name


def test_secure_normal_is_normal_with_the_requested_std():
    std = 0.37
    x = secure_normal((200_000,), std, dtype=torch.float64).numpy()
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size)
    assert x.std() == pytest.approx(std, rel=0.01)
    assert stats.kstest(x / std, "norm").pvalue > 1e-5
    y = secure_normal((200_000,), std, dtype=torch.float64).numpy()
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.02  # a fresh key per call: independent draws
    assert secure_normal((3, 4), 1.0).dtype == torch.float32 and secure_normal((3, 4), 1.0).shape == (3, 4)


def test_secure_normal_draws_whatever_bytes_the_os_gives(monkeypatch):
    """The OS's bytes key the stream and fill its nonce, never its block counter: with the worst bytes (all 0xff,
    which as a counter leaves one 64-byte block before it wraps) a draw of a million values still comes out, normal.
    A counter taken from the OS made a draw fail with probability blocks / 2**32 (DP-SGD jobs stopped at random
    steps)."""
    import fedoap.privacy.secure_random as secure_random

    monkeypatch.setattr(secure_random.os, "urandom", lambda n: b"\xff" * n)
    x = secure_normal((1_000_000,), 1.0, dtype=torch.float64).numpy()
    assert np.isfinite(x).all() and x.std() == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ValueError, match="exceed one stream"):
        secure_normal((1 << 34,), 1.0)  # refused before anything is allocated


def tiny_split(n: int, size: int = 32, slices_per_case: int = 1) -> SliceSet:
    g = np.random.default_rng(0)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = (g.random((n, 1, size, size)) > 0.8).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i // slices_per_case}" for i in range(n)])


def trainer(dp: DPSGDConfig | None, n: int = 24, batch_size: int = 4) -> LocalTrainer:
    split = tiny_split(n)
    torch.manual_seed(JOB_SEED)  # the job's seed, everywhere it could reach
    model = FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8)
    config = TrainConfig(batch_size=batch_size, augment=False, seed=JOB_SEED, finetune_epochs=0)
    return LocalTrainer(model, FedOAP(), split, split, config, dp=dp)


def test_dp_sgd_batches_cannot_be_replayed_from_the_job_seed():
    n, batch = 40, 4  # q = 1/10, 10 draws per epoch
    runs = [trainer(DPSGDConfig(noise_multiplier=1.0), n=n, batch_size=batch) for _ in range(2)]
    drawn = []
    for t in runs:
        before = t.generator.get_state()
        torch.manual_seed(JOB_SEED)
        batches = [idx.tolist() for _ in range(5) for idx in t.dp.batches(t.optimizer)]
        assert torch.equal(t.generator.get_state(), before)  # the trainer's seeded generator played no part
        drawn.append(batches)
    assert drawn[0] != drawn[1]  # same job seed, different Poisson batches

    # the server's replay: Opacus's sampler on the trainer's seeded generator (the first version)
    q = runs[0].dp.sample_rate
    g = torch.Generator().manual_seed(JOB_SEED)
    replayed = [set((torch.rand(n, generator=g) < q).nonzero().reshape(-1).tolist()) for _ in range(50)]
    predicted = [p for p in replayed if p]  # the trainer only sees non-empty draws
    actual = [set(b) for b in drawn[0]]
    # membership agreement of the predicted and actual batches, step by step: chance, not 1
    steps = list(zip(predicted, actual))
    agree = np.mean([(i in p) == (i in a) for p, a in steps for i in range(n)])
    chance = q * q + (1 - q) * (1 - q)
    assert agree < chance + 0.05
    hits = sum(len(p & a) for p, a in steps)
    assert hits <= 0.35 * sum(len(a) for a in actual)  # a replayed batch names about q of the real images


def test_two_dp_sgd_runs_with_the_same_seed_end_in_different_models():
    a, b = (trainer(DPSGDConfig(noise_multiplier=1.0)) for _ in range(2))
    stats_a, stats_b = a.train_round(), b.train_round()
    shared_a, shared_b = a.shared_params(), b.shared_params()
    assert all(not torch.equal(shared_a[k], shared_b[k]) for k in shared_a)
    assert stats_a["privacy"]["dp_sgd_round_steps"] == stats_b["privacy"]["dp_sgd_round_steps"] == 6


def test_non_private_training_stays_bit_reproducible():
    a, b = trainer(None), trainer(None)
    stats_a, stats_b = a.train_round(), b.train_round()
    assert stats_a["train_loss"] == stats_b["train_loss"] and "privacy" not in stats_a
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
