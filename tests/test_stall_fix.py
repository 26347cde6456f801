"""Options against the stall of the local parts in short runs (issue 14): the run's Dice reduction reaches every
method's losses, and FedOAP's warm start of the local query path copies exactly the key/value path, once."""

from __future__ import annotations

import pytest
import torch
from fedoap.config import RunConfig
from fedoap.losses import BCEDiceLoss
from fedoap.methods import METHODS
from fedoap.methods.fedoap import FedOAP

SMALL = {"channels": (4, 4, 8, 8), "bottleneck_channels": 8}


def _dice_losses(loss: torch.nn.Module) -> list[BCEDiceLoss]:
    return [m for m in loss.modules() if isinstance(m, BCEDiceLoss)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dice_reduction_reaches_every_methods_losses(name):
    default = RunConfig.from_options(method=name)
    image = RunConfig.from_options(method=name, dice_reduction="image")
    for loss in (image.method.instance.train_loss(), image.method.instance.finetune_loss()):
        found = _dice_losses(loss)
        assert found and all(d.dice_reduction == "image" and d.dice.batch is False for d in found)
    for loss in (default.method.instance.train_loss(), default.method.instance.finetune_loss()):
        assert all(d.dice_reduction == "batch" for d in _dice_losses(loss))


def test_dice_reduction_does_not_change_a_shared_method_object():
    base = RunConfig()
    image = base.override(dice_reduction="image")
    assert base.method.instance.dice_reduction == "batch"
    assert image.method.instance.dice_reduction == "image"
    assert image.method.instance is not base.method.instance
    assert RunConfig.from_json(image.to_json()).method.instance.dice_reduction == "image"  # as a site reads it


def _model(method: FedOAP) -> torch.nn.Module:
    torch.manual_seed(0)
    return method.build_model(SMALL)


def _received(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].clone() + 0.5 for k in model.shared_keys}  # a "global" model that differs from the init


def test_warm_start_copies_exactly_the_key_value_path_once():
    method = FedOAP(warm_start_query=True)
    model = _model(method)
    pairs = method.warm_start_keys(model)
    state = model.state_dict()
    expected = {k for k in state if k.startswith(("query_branch.", "dca.to_q."))}
    assert set(pairs) == expected and expected
    assert all(s == "kv_branch" + t[len("query_branch"):] or s == "dca.to_k" + t[len("dca.to_q"):]
               for t, s in pairs.items())
    assert all(s in model.shared_keys for s in pairs.values())
    before = {k: v.clone() for k, v in state.items()}
    received = _received(model)
    model.load_shared_state_dict(received)
    method.begin_round(model, received)
    after = model.state_dict()
    for key, value in after.items():
        if key in pairs:  # the query path now equals the received key/value path
            assert torch.equal(value, received[pairs[key]]), key
            assert not torch.equal(value, before[key])
        elif key in received:
            assert torch.equal(value, received[key]), key
        else:  # every other local parameter (adapter, head) is untouched
            assert torch.equal(value, before[key]), key
    # round 2 (and the fine-tuning's load): never again
    trained = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(trained)
    second = _received(model)
    model.load_shared_state_dict(second)
    method.begin_round(model, second)
    for key in pairs:
        assert torch.equal(model.state_dict()[key], trained[key]), key


def test_warm_start_is_off_by_default_and_survives_a_resume():
    method = FedOAP()
    model = _model(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.begin_round(model, _received(model))
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in FedOAP.warm_start_keys(model))
    assert method.site_state(model) == {}

    started = FedOAP(warm_start_query=True)
    started.begin_round(model, _received(model))
    resumed = FedOAP(warm_start_query=True)
    resumed.load_site_state(model, started.site_state(model))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    resumed.begin_round(model, _received(model))
    assert all(torch.equal(model.state_dict()[k], kept[k]) for k in FedOAP.warm_start_keys(model))
    with pytest.raises(ValueError, match="warm_started"):
        resumed.load_site_state(model, {})


def test_warm_start_arguments_are_checked():
    with pytest.raises(ValueError, match="warm_start_query"):
        FedOAP(warm_start_query="yes")
    with pytest.raises(ValueError, match="cross_attention"):
        FedOAP(warm_start_query=True, cross_attention=False)
    config = RunConfig.from_options(method="fedoap", method_args={"warm_start_query": True})
    assert config.method.instance.warm_start_query is True


class _Split:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels


def test_head_prior_init_sets_the_mean_initial_logit_to_the_prior_once():
    import copy
    import math

    from fedoap.methods.fedoap import prior_init_head

    method = FedOAP(head_prior_init=True)
    model = _model(method)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 32, 32, generator=gen).numpy()
    labels = torch.zeros(6, 1, 32, 32)
    labels[:, :, 8:16, 8:16] = 1.0  # 64 / 1024 pixels: pi = 1/16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.begin_training(model, _Split(images, labels.numpy()))
    with torch.no_grad():
        z = model(torch.from_numpy(images))
    assert float(z.mean()) == pytest.approx(math.log((1 / 16) / (15 / 16)), abs=1e-4)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.bias"}  # nothing else moves, nothing shared
    assert "head.bias" not in model.shared_keys
    # once per model: a later trainer on the same model (or a deep copy) leaves it alone
    bias = model.head.bias.detach().clone()
    method.begin_training(model, _Split(images, labels.numpy()))
    twin = copy.deepcopy(model)
    method.begin_training(twin, _Split(images, labels.numpy()))
    assert torch.equal(model.head.bias, bias) and torch.equal(twin.head.bias, bias)
    # an empty mask is clipped to the smallest prior; the authors' behaviour (False) leaves the head as initialized
    fresh = _model(method)
    prior_init_head(fresh, images, torch.zeros_like(labels).numpy())
    with torch.no_grad():
        assert float(fresh(torch.from_numpy(images)).mean()) == pytest.approx(math.log(1e-4 / (1 - 1e-4)), abs=1e-3)
    off = FedOAP(head_prior_init=False)
    plain = _model(off)
    head = plain.head.bias.detach().clone()
    off.begin_training(plain, _Split(images, labels.numpy()))
    assert torch.equal(plain.head.bias, head)
    with pytest.raises(ValueError, match="head_prior_init"):
        FedOAP(head_prior_init=1)


def test_the_head_prior_is_on_by_default_except_under_dp_sgd():
    """The default (None) won over 3 seeds of the medium benchmark; under DP-SGD, which refuses it when asked for,
    the run configuration turns the default off instead; the authors' behaviour is one argument away."""
    plain = RunConfig.from_options()
    assert plain.method.args == {} and plain.method.instance.uses_head_prior
    private = RunConfig.from_options(dp_sgd_noise=1.0)
    assert private.method.args == {} and not private.method.instance.uses_head_prior
    assert private.method.instance.dp_sgd_conflict is None
    assert not RunConfig.from_options(method_args={"head_prior_init": False}).method.instance.uses_head_prior
    # the switch follows the run: a private configuration made from a plain one, and back
    assert not plain.override(dp_sgd_noise=1.0).method.instance.uses_head_prior
    assert private.override(dp_sgd_noise=0.0).method.instance.uses_head_prior
    images = torch.randn(4, 1, 32, 32).numpy()
    labels = torch.zeros(4, 1, 32, 32)
    labels[:, :, :4, :4] = 1.0
    for config, moved in ((plain, True), (private, False)):
        model = config.build_model()
        head = model.head.bias.detach().clone()
        config.method.instance.begin_training(model, _Split(images, labels.numpy()))
        assert (not torch.equal(model.head.bias, head)) is moved


def test_head_prior_init_is_refused_with_dp_sgd():
    assert FedOAP().dp_sgd_conflict is None
    assert "head_prior_init" in FedOAP(head_prior_init=True).dp_sgd_conflict
    with pytest.raises(ValueError, match="head_prior_init"):
        RunConfig.from_options(method_args={"head_prior_init": True}, dp_sgd_noise=1.0)
