"""The trainer's speed options (bf16 autocast, channels-last, torch.compile): they train, and change nothing of what
is saved or shared; DP-SGD refuses the ones Opacus cannot serve; ``fedoap bench train``'s comparison returns a row per
configuration.

torch.compile runs with ``backend="eager"`` here (Dynamo traces the network, no kernels are generated): the inductor
backend compiles C++ kernels on the CPU, minutes for this network on a small machine.
"""

import math

import numpy as np
import pytest
import torch
from fedoap.config import RunConfig, TrainingOptions
from fedoap.data import SliceSet
from fedoap.methods import get_method
from fedoap.privacy.dp import DPSGDConfig
from fedoap.training import LocalTrainer, TrainConfig

MODEL_ARGS = {"channels": [4, 8, 16, 32], "bottleneck_channels": 64}


def tiny_split(n: int = 8, size: int = 32, seed: int = 0) -> SliceSet:
    g = np.random.default_rng(seed)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = (g.random((n, 1, size, size)) > 0.7).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


def trainer(dp=None, **config) -> LocalTrainer:
    torch.manual_seed(0)
    method = get_method("fedoap")
    model = method.build_model(MODEL_ARGS)
    return LocalTrainer(model, method, tiny_split(), tiny_split(4, seed=1),
                        TrainConfig(batch_size=4, finetune_epochs=0, **config), dp=dp)


def signature(params) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in params.items()}


@pytest.fixture(scope="module")
def fp32_reference():
    site = trainer()
    stats = site.train_round()
    return stats, signature(site.shared_params()), list(site.model.state_dict())


@pytest.mark.parametrize("options", [
    {"precision": "bf16"},
    {"channels_last": True},
    {"precision": "bf16", "channels_last": True, "compile": True, "compile_backend": "eager"},
], ids=["bf16", "channels-last", "bf16+channels-last+compile"])
def test_speed_options_train_and_keep_what_is_shared(options, fp32_reference):
    ref_stats, ref_shared, ref_keys = fp32_reference
    site = trainer(**options)
    stats = site.train_round()
    assert math.isfinite(stats["train_loss"]) and stats["images_per_s"] > 0
    assert stats["train_loss"] == pytest.approx(ref_stats["train_loss"], rel=0.02)  # same model, data and order
    shared = site.shared_params()
    assert signature(shared) == ref_shared  # names, shapes, fp32 dtypes
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in shared.values())
    assert list(site.model.state_dict()) == ref_keys  # no "_orig_mod." from compile, nothing from channels-last
    assert type(site.model).__name__ == "FedOAPNet"  # compiled in place (nn.Module.compile), no OptimizedModule
    assert all(p.dtype == torch.float32 for p in site.model.parameters())
    state = site.state()
    assert list(state["model"]) == ref_keys
    site.load_shared(shared)  # the server's parameters go back in
    site.load_state(state)
    assert math.isfinite(site.train_round()["train_loss"])


def test_channels_last_converts_the_weights():
    site = trainer(channels_last=True)
    conv = next(p for p in site.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert site.evaluate(site.val_set).mean_dice() >= 0


@pytest.mark.parametrize("options, flag", [({"compile": True}, "--compile"), ({"precision": "bf16"}, "--precision bf16")])
def test_dp_sgd_refuses_what_opacus_cannot_do(options, flag):
    with pytest.raises(ValueError, match=f"^{flag}: ") as err:
        trainer(dp=DPSGDConfig(noise_multiplier=1.0), **options)
    assert "\n" not in str(err.value)
    # the torch-free check the run configuration can make before anything starts
    reason = TrainingOptions(**{k: v for k, v in options.items()}).dp_sgd_conflict()
    assert reason == str(err.value)


def test_dp_sgd_trains_in_channels_last():
    site = trainer(dp=DPSGDConfig(noise_multiplier=1.0), channels_last=True)
    stats = site.train_round()
    assert math.isfinite(stats["train_loss"]) and "privacy" in stats
    assert TrainingOptions(channels_last=True).dp_sgd_conflict() is None


def test_training_options_reach_the_trainer():
    options = TrainingOptions(precision="bf16", channels_last=True, compile=True)
    config = options.train_config()
    assert (config.precision, config.channels_last, config.compile) == ("bf16", True, True)
    with pytest.raises(ValueError, match="--precision must be one of"):
        TrainingOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_bench_speed_rows_compare_every_configuration():
    from fedoap.bench import SPEED_CONFIGS, dp_rows, speed_rows

    run = RunConfig.from_options(width=4, image_size=32, batch_size=4)
    train, val = tiny_split(8), tiny_split(4, seed=1)
    rows = speed_rows(run, train, val, epochs=1, compile_backend="eager")
    assert [r["config"] for r in rows] == list(SPEED_CONFIGS)
    for r in rows:
        assert "error" not in r, r
        assert r["trainer_images_per_s"] > 0 and r["plain_images_per_s"] > 0
        assert r["ratio_trainer_over_plain"] == pytest.approx(r["trainer_images_per_s"] / r["plain_images_per_s"])
        assert math.isfinite(r["final_train_loss"])
    dp = dp_rows(run, train, val, epochs=1)
    names = [r["config"] for r in dp]
    assert "dp-sgd trainer fp32" in names and "opacus loop (hooks)" in names
    assert "dp-sgd trainer, stock Opacus rules" in names  # the reference rows ran without our per-sample rules...
    from opacus.grad_sample import GradSampleModule

    from fedoap.privacy.grad_samplers import conv_transpose_grad_sample

    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.ConvTranspose2d] is conv_transpose_grad_sample  # ...and it is back
    for r in dp:
        if r["config"] != "opacus loop (ghost clipping)":  # ghost clipping is Opacus's to support or not
            assert r.get("images_per_s", 0) > 0, r
