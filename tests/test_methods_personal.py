"""The defining rules of MOON, FedRoD and Ditto: MOON's contrastive term and its global/previous models, FedRoD's
detached personal head whose logits add to the generic ones, Ditto's personal model with a proximal term."""

import copy
import math

import numpy as np
import pytest
import torch

from fedoap.data import SliceSet
from fedoap.losses import BCEDiceLoss
from fedoap.methods import METHODS, Ditto, FedAvg, FedRoD, MOON, get_method
from fedoap.methods.fedrod import balanced_logits
from fedoap.methods.moon import model_contrastive_loss, representation
from fedoap.networks import FedOAPNet
from fedoap.networks.ditto_pair import DittoPair
from fedoap.networks.fedrod_net import FedRoDNet
from fedoap.privacy.dp import DPSGDConfig
from fedoap.training import LocalTrainer, TrainConfig

TINY = {"channels": [2, 4, 4, 8], "bottleneck_channels": 8}


def tiny_split(n: int = 6, size: int = 32, seed: int = 0) -> SliceSet:
    g = np.random.default_rng(seed)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = (g.random((n, 1, size, size)) > 0.7).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


def tiny_trainer(method, dp=None, **config) -> LocalTrainer:
    torch.manual_seed(0)
    model = method.build_model(dict(TINY))
    split = tiny_split()
    return LocalTrainer(model, method, split, split, TrainConfig(batch_size=2, augment=False, **config), dp=dp)


def batch(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    split = tiny_split(n=n, seed=seed)
    return torch.from_numpy(split.images), torch.from_numpy(split.labels)


def perturbed(params: dict, scale: float = 0.05, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in params.items()}


def test_the_three_methods_are_registered_and_refuse_dp_sgd_with_a_readable_reason():
    dp = DPSGDConfig(noise_multiplier=1.0)
    for name, words in (("moon", "model-contrastive term"), ("fedrod", "two heads with two losses"),
                        ("ditto", "personal model next to the global one")):
        assert METHODS[name].name == name and METHODS[name].__doc__
        with pytest.raises(ValueError, match=f"method '{name}' .*{words}.*; use client-level DP of the update"):
            tiny_trainer(get_method(name), dp=dp)


# -- MOON --------------------------------------------------------------------------------------------------------------
def test_moon_contrastive_term_on_hand_made_features_equals_the_formula():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    z_prev = torch.tensor([[0.0, 3.0], [1.0, -1.0]])
    t = 0.5
    # per row: cos(z, z_glob), cos(z, z_prev)
    sims = [(1 / math.sqrt(2), 0.0), (1.0, -1 / math.sqrt(2))]
    expected = np.mean([-math.log(math.exp(g / t) / (math.exp(g / t) + math.exp(p / t))) for g, p in sims])
    loss = model_contrastive_loss(z, z_glob, z_prev, temperature=t)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # nearer the global representation than the previous one: lower; the other way round: higher
    assert float(model_contrastive_loss(z, z_prev, z_glob, temperature=t)) > float(loss)
    assert float(model_contrastive_loss(z, z, -z, temperature=t)) < float(loss)
    # equal similarities: log 2
    assert float(model_contrastive_loss(z, z_glob, z_glob, temperature=t)) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="temperature"):
        model_contrastive_loss(z, z_glob, z_prev, temperature=0.0)


def test_moon_representation_is_the_flattened_head_input_by_default():
    torch.manual_seed(0)
    model = FedOAPNet(**TINY)
    images, _ = batch()
    seen = {}
    model.head.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    output, z = representation(model, images)
    torch.testing.assert_close(output, model(images))
    torch.testing.assert_close(z, seen["x"].flatten(1))
    _, pooled = representation(model, images, pooling="mean")
    torch.testing.assert_close(pooled, seen["x"].mean(dim=(2, 3)))
    assert not model.adapter._forward_hooks  # the capture hook is removed
    with pytest.raises(ValueError, match="no module named 'nope'"):
        representation(model, images, module_name="nope")


def test_moon_previous_model_is_the_site_model_at_the_end_of_the_previous_round():
    mu, t = 0.7, 0.5
    method = MOON(mu=mu, temperature=t)
    trainer = tiny_trainer(method, lr=1e-2)
    loss_fn = trainer.loss_fn
    images, labels = batch()

    first_global = trainer.shared_params()
    trainer.load_shared(first_global)
    # first round: no previous model yet, so the plain segmentation loss
    torch.testing.assert_close(method.step_loss(trainer.model, images, labels, loss_fn),
                               loss_fn(trainer.model(images), labels))
    trainer.train_round()
    end_of_round_1 = copy.deepcopy(trainer.model.state_dict())

    second_global = perturbed(trainer.shared_params())  # what the server sends next
    trainer.load_shared(second_global)
    trainer._epoch(trainer.loss_fn, trainer.optimizer, federated=True)  # the site trains on in round 2
    current = trainer.model.state_dict()
    assert any(not torch.equal(current[k], end_of_round_1[k]) for k in current)

    # the frozen copies are the round-1 end state and the round-2 global model, not the current model
    prev_state, glob_state = method._previous.state_dict(), method._global.state_dict()
    assert all(torch.equal(prev_state[k], end_of_round_1[k]) for k in prev_state)
    assert all(torch.equal(glob_state[k], second_global[k]) for k in glob_state)
    assert not any(p.requires_grad for p in method._previous.parameters())

    # the step loss is the segmentation loss plus mu * l_con with exactly those two models
    reference = {}
    for label, state in (("prev", end_of_round_1), ("glob", second_global)):
        net = FedOAPNet(**TINY)
        net.load_state_dict(state)
        reference[label] = representation(net, images)[1].detach()
    output, z = representation(trainer.model, images)
    expected = loss_fn(output, labels) + mu * model_contrastive_loss(z, reference["glob"], reference["prev"], t)
    torch.testing.assert_close(method.step_loss(trainer.model, images, labels, loss_fn), expected)


def test_moon_shares_like_fedavg_and_checks_its_arguments():
    model = MOON().build_model(TINY)
    assert MOON().shared_keys(model) == FedAvg().shared_keys(model)
    assert (MOON().mu, MOON().temperature) == (0.01, 0.5)  # FL-MedSegBench's values
    for kwargs in ({"mu": -1.0}, {"mu": float("nan")}, {"temperature": 0.0}, {"pooling": "max"},
                   {"feature_module": ""}):
        with pytest.raises(ValueError):
            MOON(**kwargs)


# -- FedRoD ------------------------------------------------------------------------------------------------------------
def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_fedrod_personal_head_learns_only_from_the_personal_loss_and_the_body_only_from_the_generic_loss():
    torch.manual_seed(0)
    model = FedRoDNet(**TINY)
    loss_fn = BCEDiceLoss()
    images, labels = batch()
    personal = list(model.personal_head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("personal_head.")]

    generic, personal_logits = model.generic_and_personal(images)
    loss_fn(generic, labels).backward()  # the generic loss
    assert all(p.grad is None for p in personal)
    assert all(p.grad is not None for p in rest)
    model.zero_grad(set_to_none=True)

    generic, personal_logits = model.generic_and_personal(images)
    loss_fn(generic.detach() + personal_logits, labels).backward()  # the personal loss
    assert all(p.grad is None for p in rest)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in personal)
    expected_personal = _grads(personal)
    model.zero_grad(set_to_none=True)

    generic, _ = model.generic_and_personal(images)
    loss_fn(generic, labels).backward()
    expected_rest = _grads(rest)
    model.zero_grad(set_to_none=True)

    # the method's step loss has exactly these gradients: nothing crosses between the two parts
    FedRoD().step_loss(model, images, labels, loss_fn).backward()
    for got, want in zip(_grads(rest) + _grads(personal), expected_rest + expected_personal):
        torch.testing.assert_close(got, want)


def test_fedrod_forward_is_generic_plus_personal_logits():
    torch.manual_seed(0)
    model = FedRoDNet(**TINY)
    with torch.no_grad():
        model.personal_head.weight.add_(0.3)
    images, _ = batch()
    generic, personal = model.generic_and_personal(images)
    assert personal.abs().sum() > 0
    torch.testing.assert_close(model(images), generic + personal)
    torch.testing.assert_close(generic, FedOAPNet.forward(model, images))
    zeros = FedRoDNet(personal_init="zeros", **TINY)
    torch.testing.assert_close(zeros(images), zeros.generic_and_personal(images)[0])
    copied = FedRoDNet(**TINY)
    assert torch.equal(copied.personal_head.weight, copied.head.weight)


def test_fedrod_never_shares_the_personal_head():
    method = get_method("fedrod")
    trainer = tiny_trainer(method, lr=1e-2)
    keys = set(trainer.model.state_dict())
    personal = {k for k in keys if k.startswith("personal_head.")}
    assert personal == {"personal_head.weight", "personal_head.bias"}
    assert set(method.shared_keys(trainer.model)) == keys - personal
    assert {"head.weight", "adapter.conv_1.conv.weight"} <= set(method.shared_keys(trainer.model))

    trainer.load_shared(trainer.shared_params())
    trainer.train_round()
    sent = trainer.shared_params()
    assert not personal & set(sent)
    head_after_round = trainer.model.personal_head.weight.detach().clone()
    trainer.load_shared(perturbed(sent))  # the server's update leaves the personal head alone
    assert torch.equal(trainer.model.personal_head.weight, head_after_round)
    with pytest.raises(ValueError, match="not a shared parameter"):
        trainer.load_shared({"personal_head.weight": head_after_round})


def test_fedrod_balanced_generic_loss_shifts_the_logits_by_the_log_prior_ratio():
    torch.manual_seed(0)
    model = FedRoDNet(**TINY)
    loss_fn = BCEDiceLoss()
    images, labels = batch()
    method = FedRoD(generic_loss="balanced")
    got = method.step_loss(model, images, labels, loss_fn)
    fg = float(labels.sum())
    bg = labels.numel() - fg
    assert method.pixel_counts == [fg, bg]
    generic, personal = model.generic_and_personal(images)
    shift = math.log((fg + 1) / (bg + 1))
    torch.testing.assert_close(balanced_logits(generic, fg, bg), generic + shift)
    torch.testing.assert_close(got, loss_fn(generic + shift, labels) + loss_fn(generic.detach() + personal, labels))
    plain = FedRoD().step_loss(model, images, labels, loss_fn)
    assert not torch.allclose(plain, got)
    for kwargs in ({"generic_loss": "softmax"}, {"personal_init": "random"}):
        with pytest.raises(ValueError):
            FedRoD(**kwargs)
    with pytest.raises(ValueError, match="FedRoDNet"):
        FedRoD().step_loss(FedOAPNet(**TINY), images, labels, loss_fn)


# -- Ditto -------------------------------------------------------------------------------------------------------------
def _global_as_received(pair: DittoPair, seed: int = 5) -> dict:
    return perturbed({f"global_model.{k}": v.detach().clone() for k, v in pair.global_model.state_dict().items()},
                     seed=seed)


def test_ditto_proximal_gradient_is_lambda_times_personal_minus_global():
    lam = 0.4
    torch.manual_seed(0)
    pair = DittoPair(**TINY)
    method = Ditto(lam=lam)
    received = _global_as_received(pair)
    method.begin_round(pair, received)  # first round: the personal model starts from the received global model
    for key, value in received.items():
        torch.testing.assert_close(pair.state_dict()["personal." + key[len("global_model."):]], value)
    with torch.no_grad():
        for p in pair.personal.parameters():
            p.add_(torch.randn_like(p))
    method.proximal_term(pair).backward()
    for name, p in pair.personal.named_parameters():
        torch.testing.assert_close(p.grad, lam * (p.detach() - received[f"global_model.{name}"]))
    assert all(p.grad is None for p in pair.global_model.parameters())
    # the term is half lambda times the squared distance
    pair.zero_grad()
    squared = sum(float((p.detach() - received[f"global_model.{n}"]).pow(2).sum())
                  for n, p in pair.personal.named_parameters())
    assert float(method.proximal_term(pair).detach()) == pytest.approx(0.5 * lam * squared, rel=1e-5)


def test_ditto_step_loss_separates_the_global_copy_from_the_personal_model():
    lam = 0.3
    torch.manual_seed(0)
    pair = DittoPair(**TINY)
    method = Ditto(lam=lam)
    method.begin_round(pair, _global_as_received(pair))
    with torch.no_grad():
        for p in pair.personal.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss_fn = BCEDiceLoss()
    images, labels = batch()

    loss_fn(pair.personal(images), labels).backward()  # the personal loss reaches no global parameter
    assert all(p.grad is None for p in pair.global_model.parameters())
    pair.zero_grad(set_to_none=True)

    loss_fn(pair.global_model(images), labels).backward()
    expected_global = _grads(pair.global_model.parameters())
    pair.zero_grad(set_to_none=True)
    (loss_fn(pair.personal(images), labels) + method.proximal_term(pair)).backward()
    expected_personal = _grads(pair.personal.parameters())
    pair.zero_grad(set_to_none=True)

    method.step_loss(pair, images, labels, loss_fn).backward()
    for got, want in zip(_grads(pair.global_model.parameters()) + _grads(pair.personal.parameters()),
                         expected_global + expected_personal):
        torch.testing.assert_close(got, want)


def test_ditto_shares_only_the_global_copy_and_predicts_with_the_personal_model():
    method = get_method("ditto")
    trainer = tiny_trainer(method, lr=1e-2)
    pair = trainer.model
    keys = set(pair.state_dict())
    shared = set(trainer.shared_keys)
    assert shared == {k for k in keys if k.startswith("global_model.")}
    assert shared and not any(k.startswith("personal.") for k in shared)
    assert {k[len("global_model."):] for k in shared} == {k[len("personal."):] for k in keys - shared}

    received = _global_as_received(pair)
    trainer.load_shared(received)
    trainer.train_round()
    assert set(trainer.shared_params()) == shared
    # both models trained, and they now differ: forward is the personal model's
    state = pair.state_dict()
    assert any(not torch.equal(state[k], received[k]) for k in shared)
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(pair(images), pair.personal(images))
        assert not torch.allclose(pair(images), pair.global_model(images))
    # a later round's global model is only the proximal anchor: it is not copied into the personal model again
    personal_before = {k: v.clone() for k, v in pair.personal.state_dict().items()}
    trainer.load_shared(_global_as_received(pair, seed=9))
    assert all(torch.equal(v, personal_before[k]) for k, v in pair.personal.state_dict().items())


def test_a_strong_ditto_lambda_keeps_the_personal_model_at_the_global_model():
    distances = {}
    for lam in (0.0, 1e6):
        trainer = tiny_trainer(Ditto(lam=lam), lr=1e-2)
        received = _global_as_received(trainer.model)
        trainer.load_shared(received)
        trainer.train_round()
        distances[lam] = sum(float((p.detach() - received[f"global_model.{n}"]).pow(2).sum())
                             for n, p in trainer.model.personal.named_parameters()) ** 0.5
    assert distances[0.0] > 0 and distances[1e6] < 0.5 * distances[0.0]


def test_ditto_arguments_and_personal_initialization():
    assert Ditto().lam == 1e-3  # FL-MedSegBench's value
    for bad in (-1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="lam"):
            Ditto(lam=bad)
    with pytest.raises(ValueError, match="personal_init"):
        Ditto(personal_init="zeros")
    torch.manual_seed(0)
    copied = DittoPair(**TINY)
    assert all(torch.equal(a, b) for a, b in zip(copied.global_model.state_dict().values(),
                                                  copied.personal.state_dict().values()))
    independent = DittoPair(personal_init="independent", **TINY)
    assert not torch.equal(independent.global_model.head.weight, independent.personal.head.weight)
    method = Ditto(personal_init="independent")
    before = independent.personal.head.weight.detach().clone()
    method.begin_round(independent, _global_as_received(independent))
    assert torch.equal(independent.personal.head.weight, before)  # no copy with "independent"
    with pytest.raises(ValueError, match="DittoPair"):
        method.step_loss(FedOAPNet(**TINY), *batch(), BCEDiceLoss())
