"""The generic hooks every method builds on (step loss, per-step phase, end of round), the server-rule registry, and
the centralized reference's pooled data."""

import numpy as np
import pytest
import torch

from fedoap.data import SiteData, SliceSet
from fedoap.server.rules import RULES, FedNovaRule, NoAggregation, WeightedMean, rule_for_job
from fedoap.methods.centralized import pool_sites, unpool_history
from fedoap.config import RunConfig
from fedoap.methods import Centralized, FedAvg, get_method
from fedoap.training import LocalTrainer, TrainConfig

TINY = {"channels": [2, 4, 4, 8], "bottleneck_channels": 8}


def split(n: int, seed: int = 0, size: int = 32) -> SliceSet:
    g = np.random.default_rng(seed)
    return SliceSet(images=g.random((n, 1, size, size), dtype=np.float32),
                    labels=(g.random((n, 1, size, size)) > 0.7).astype(np.float32),
                    case_ids=[f"c{i}" for i in range(n)])


class Recording(FedAvg):
    """FedAvg that records every hook call and doubles its step loss."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def begin_step(self, model, step, steps_per_round):
        self.calls.append(("step", step, steps_per_round))

    def step_loss(self, model, images, labels, loss_fn):
        self.calls.append(("loss", images.shape[0]))
        return 2.0 * loss_fn(model(images), labels)

    def end_round(self, model):
        self.calls.append(("end",))


def test_round_hooks_are_called_per_step_in_rounds_only():
    method = Recording()
    torch.manual_seed(0)
    trainer = LocalTrainer(method.build_model(TINY), method, split(10), split(4, 1),
                           TrainConfig(batch_size=4, local_epochs=2, finetune_epochs=1, augment=False))
    assert trainer.steps_per_round == 2 * 3
    stats = trainer.train_round()
    steps = [c for c in method.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(6)) and {c[2] for c in steps} == {6}
    assert [c[1] for c in method.calls if c[0] == "loss"] == [4, 4, 2, 4, 4, 2]
    assert method.calls[-1] == ("end",) and stats["steps"] == 6
    method.calls.clear()
    trainer.finetune()  # fine-tuning: plain loss on model(images), no round hook
    assert method.calls == []


def test_the_step_loss_is_what_the_optimizer_minimizes():
    """Twice the loss with AdamW is the same step as the loss itself (scale invariance), but the reported loss is
    doubled: the trainer uses the method's step loss, not its own."""
    plain, doubled = FedAvg(), Recording()
    losses = []
    for method in (plain, doubled):
        torch.manual_seed(0)
        trainer = LocalTrainer(method.build_model(TINY), method, split(8), split(4, 1),
                               TrainConfig(batch_size=8, local_epochs=1, augment=False))
        losses.append(trainer.train_round()["train_loss"])
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


def test_a_method_with_its_own_step_loss_refuses_dp_sgd():
    assert "step loss" in Recording().dp_sgd_conflict
    assert FedAvg().dp_sgd_conflict is None


def test_server_rules_are_classes_a_method_names():
    assert {WeightedMean, FedNovaRule} <= set(RULES) and WeightedMean.linear and not FedNovaRule.linear
    agg = rule_for_job(WeightedMean, {}, {"w": np.zeros(2)})
    assert isinstance(agg, WeightedMean)
    agg.add("a", {"w": np.full(2, 3.0)}, weight=1, steps=7)  # steps is accepted and ignored by the weighted mean
    np.testing.assert_allclose(agg.result()["w"], 3.0)
    with pytest.raises(ValueError, match="server_rule must be a ServerRule class"):
        rule_for_job("median", {}, {})


# -- the centralized reference ---------------------------------------------------------------------------------------
def test_centralized_pools_every_split_and_shares_nothing():
    a = SiteData("a", "brain", "MRI", split(5), split(2, 1), split(3, 2))
    b = SiteData("b", "liver", "CT", split(4, 3), split(1, 4), split(2, 5))
    pooled = pool_sites([a, b])
    assert (len(pooled.train), len(pooled.val), len(pooled.test)) == (9, 3, 5)
    np.testing.assert_array_equal(pooled.train.images[5:], b.train.images)
    assert pooled.train.case_ids[0] == "a/c0" and pooled.train.case_ids[-1] == "b/c3"
    method = get_method("centralized")
    assert isinstance(method, Centralized) and method.pooled and method.server_rule is NoAggregation
    assert method.shared_keys(method.build_model(TINY)) == []
    assert "centralized reference" in method.dp_sgd_conflict
    with pytest.raises(ValueError, match="homomorphic encryption"):
        RunConfig.from_options(method="centralized", he=True)


def test_centralized_history_is_reported_per_site():
    history = {"rounds": [{"round": 0, "sites": {"pooled": {"train_loss": 0.5, "val_dice": 0.3, "val_dice/a": 0.2,
                                                             "val_dice/b": 0.4, "test_dice/a": 0.1,
                                                             "test_dice/b": 0.6, "bytes_uploaded": 0}}}]}
    per_site = unpool_history(history, ["a", "b"])["rounds"][0]["sites"]
    assert per_site["a"] == {"train_loss": 0.5, "val_dice": 0.2, "test_dice": 0.1, "bytes_uploaded": 0}
    assert per_site["b"]["val_dice"] == 0.4 and per_site["b"]["test_dice"] == 0.6
    assert "pooled" in history["rounds"][0]["sites"]  # the server's own record is left as it was
