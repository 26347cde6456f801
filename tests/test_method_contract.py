"""The contract every registered method keeps, checked for each entry of ``fedoap.methods.METHODS`` (a new method is
checked as soon as it is registered): it builds with its default arguments, trains a round, shares a subset of its
state that leaves out what it declares local, its update survives a round trip through its server rule, its declared
DP-SGD and HE capabilities are what the trainer and the run configuration do, its recipe exports, and it learns a
trivial segmentation task.

Tiny on purpose (width 4, 32 x 32 discs, a handful of images, no NVFlare process): about a minute on one core.
"""

import json
import re

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fedoap.config import RunConfig
from fedoap.data import SliceSet
from fedoap.deploy.recipe import FedOAPRecipe
from fedoap.methods import METHODS, FedAvg
from fedoap.methods.ditto import PERSONAL_PREFIX as DITTO_PERSONAL
from fedoap.methods.fedbn import NORM_TYPES
from fedoap.methods.fedrod import PERSONAL_PREFIX as FEDROD_PERSONAL
from fedoap.networks.fedoap_net import LOCAL_ONLY_PREFIXES, SHARED_PARTITIONS
from fedoap.networks.site_normalized_net import INPUT_STATISTICS_KEYS
from fedoap.privacy.dp import DPSGDConfig
from fedoap.training import LocalTrainer, TrainConfig

import discs

NAMES = list(METHODS)
MODEL_ARGS = {"channels": [4, 8, 8, 8], "bottleneck_channels": 8}
SIZE = 32  # the smallest input FedOAPNet takes (2 x 2 attention tokens)


def disc_split(n: int, seed: int) -> SliceSet:
    """``n`` images of one bright disc (radius 4-7 px); every image has a lesion, so predicting nothing scores Dice 0
    and predicting everything ~0.2."""
    return discs.disc_split(n, seed, size=SIZE, prefix=f"s{seed}-")


def site(name: str, train: SliceSet, val: SliceSet, dp=None, **config) -> LocalTrainer:
    """A site's trainer for method ``name`` (default arguments); its model is seeded, as the server and every site seed
    theirs, so the local parts start where the shared ones do."""
    method = METHODS[name]()
    torch.manual_seed(0)
    model = method.build_model(MODEL_ARGS)
    settings = {"batch_size": 4, "lr": 1e-2, "augment": False, "local_epochs": 1, "finetune_epochs": 0, **config}
    return LocalTrainer(model, method, train, val, TrainConfig(**settings), dp=dp)


def finite(tensors) -> bool:
    return all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in tensors.values())


# -- what each method declares it keeps on the site --------------------------------------------------------------------
def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _module_keys(model, module_types, only=None) -> set[str]:
    """State-dict keys of the parameters and persistent buffers of every module of ``module_types`` (``only``: just
    these attribute names)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, module_types):
            for attr in module.state_dict(keep_vars=True):
                if only is None or attr in only:
                    keys.add(f"{name}.{attr}" if name else attr)
    return keys


#: what a personalized method keeps on the site, from its own declaration (README "what stays on the site"), computed
#: independently of its ``shared_keys``
KEEPS_LOCAL = {
    # the partition's shared prefixes are listed positively; the paper's personal path is local under every partition
    "fedoap": lambda m, model: {k for k in model.state_dict() if not _under(k, SHARED_PARTITIONS[m.partition])},
    "fedbn": lambda m, model: _module_keys(model, NORM_TYPES),  # every normalization layer
    "siobn": lambda m, model: _module_keys(model, _BatchNorm, ("running_mean", "running_var", "num_batches_tracked")),
    "fedrod": lambda m, model: {k for k in model.state_dict() if k.startswith(FEDROD_PERSONAL)},  # personal head
    "ditto": lambda m, model: {k for k in model.state_dict() if k.startswith(DITTO_PERSONAL)},  # personal model
    "fedrdn": lambda m, model: set(INPUT_STATISTICS_KEYS) & set(model.state_dict()),  # own input statistics
}


def declared_local(method, model) -> set[str]:
    """The state-dict keys ``method`` says stay on the site: everything for a method whose rule shares nothing; its
    entry of :data:`KEEPS_LOCAL`, or its ``personal_prefixes`` (FedPer, FedRep, FedDP); nothing for FedAvg's sharing."""
    keys = set(model.state_dict())
    if not method.server_rule.shares:
        return keys
    if method.name in KEEPS_LOCAL:
        return KEEPS_LOCAL[method.name](method, model)
    if getattr(method, "personal_prefixes", None):
        return {k for k in keys if _under(k, method.personal_prefixes)}
    if type(method).shared_keys is FedAvg.shared_keys:
        return set()
    pytest.fail(f"method {method.name!r} chooses its own shared keys: declare what it keeps on the site in KEEPS_LOCAL")


# -- it builds and trains ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_builds_with_default_arguments_the_same_network_from_the_same_seed(name):
    method = METHODS[name]()
    assert method.name == name
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(method.build_model(MODEL_ARGS))
    spec = method.model_spec(MODEL_ARGS)
    assert f"{type(models[0]).__module__}.{type(models[0]).__name__}" == spec["class_path"]
    for (k, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), f"{name}: {k} differs between two builds from one seed (sites would start apart)"
    models[0].eval()
    with torch.no_grad():
        out = models[0](torch.rand(2, 1, SIZE, SIZE))
    assert out.shape == (2, 1, SIZE, SIZE) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_shared_keys_are_state_dict_keys_and_leave_out_what_the_method_keeps_local(name):
    method = METHODS[name]()
    model = method.build_model(MODEL_ARGS)
    state, shared = set(model.state_dict()), method.shared_keys(model)
    assert len(shared) == len(set(shared)) and set(shared) <= state
    assert bool(shared) == method.server_rule.shares, f"{name}: shares {len(shared)} keys under {method.server_rule}"
    local = declared_local(method, model)
    assert set(shared) == state - local
    if method.server_rule.shares and type(method).shared_keys is not FedAvg.shared_keys:
        assert local, f"{name} chooses its own shared keys but keeps nothing on the site"
    if name == "fedoap":  # the paper's personal path (query branch and projection, adapter, head) never leaves
        for prefix in LOCAL_ONLY_PREFIXES:
            assert any(_under(k, [prefix]) for k in local) and not any(_under(k, [prefix]) for k in shared)


_ROUNDS: dict[str, tuple] = {}


def two_sites_after_one_round(name: str):
    """Two sites (different discs) start from the same global model, load it as the client script does, and train one
    round; cached per method (the round trip reuses it). Returns the first site's initial state, the reference (the
    global shared parameters), the sites, their payloads and their round statistics."""
    if name not in _ROUNDS:
        sites = [site(name, disc_split(6, seed), disc_split(2, seed + 10)) for seed in (1, 2)]
        reference = sites[0].shared_params()
        start = {k: v.clone() for k, v in sites[0].model.state_dict().items()}
        payloads, stats = [], []
        for trainer in sites:
            trainer.load_shared(reference)
            stats.append(trainer.train_round())
            payloads.append(trainer.shared_params())
        _ROUNDS[name] = (start, reference, sites, payloads, stats)
    return _ROUNDS[name]


@pytest.mark.parametrize("name", NAMES)
def test_one_round_of_local_training_reports_a_finite_loss_and_sends_its_shared_keys(name):
    start, reference, sites, payloads, stats = two_sites_after_one_round(name)
    for trainer, payload, s in zip(sites, payloads, stats):
        assert np.isfinite(s["train_loss"]) and s["steps"] == trainer.steps_per_round == 2
        assert s["aggregation_weight"] == (s["steps"] if trainer.method.weight_by == "steps" else s["n_samples"])
        assert sorted(payload) == sorted(trainer.shared_keys) and finite(payload)
        assert all(payload[k].shape == reference[k].shape for k in payload)
    moved = [k for k, v in sites[0].model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved, f"{name}: one round of training changed no weight"


# -- the server rule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_two_sites_updates_round_trip_through_the_server_rule(name):
    _, reference, sites, payloads, stats = two_sites_after_one_round(name)
    method = sites[0].method
    rule = method.server_rule(reference, **method.server_rule_args())
    for i, (payload, s) in enumerate(zip(payloads, stats)):  # a site sends only shared keys: nothing is dropped
        assert rule.add(f"site-{i}", payload, s["aggregation_weight"], steps=s["steps"]) == []
    if not rule.shares:
        assert rule.count == 0 and rule.result() == {} and sites[0].shared_keys == []
        return
    assert rule.count == 2
    result = rule.result()
    assert sorted(result) == sorted(sites[0].shared_keys) and finite(result)
    assert all(np.shape(result[k]) == tuple(reference[k].shape) for k in result)
    if rule.linear:  # what the declaration promises (and HE relies on): sum_k w_k x_k / sum_k w_k of the updates
        w = [s["aggregation_weight"] for s in stats]
        for k in result:
            mean = sum(wi * p[k].double() for wi, p in zip(w, payloads)) / sum(w)
            np.testing.assert_allclose(np.asarray(result[k], dtype=np.float64), mean.numpy(), rtol=1e-5, atol=1e-6)
    for trainer in sites:  # back at the site: the shared keys take the aggregate, the local ones stay
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.load_shared(result)
        after = trainer.model.state_dict()
        for k in after:
            expected = torch.as_tensor(np.asarray(result[k])).to(after[k].dtype) if k in result else before[k]
            assert torch.equal(after[k], expected), f"{name}: {k} after loading the aggregate"


@pytest.mark.parametrize("name", NAMES)
def test_a_round_in_which_no_site_moved_leaves_the_global_model_where_it_was(name):
    method = METHODS[name]()
    torch.manual_seed(0)
    model = method.build_model(MODEL_ARGS)
    state = model.state_dict()
    reference = {k: state[k].detach().clone() for k in method.shared_keys(model)}
    rule = method.server_rule(reference, **method.server_rule_args())
    for site_name, weight, steps in (("a", 3, 2), ("b", 1, 4)):
        rule.add(site_name, {k: v.clone() for k, v in reference.items()}, weight, steps=steps)
    result = rule.result()
    assert sorted(result) == sorted(reference)
    for k, v in reference.items():
        np.testing.assert_allclose(np.asarray(result[k], dtype=np.float64), v.double().numpy(), rtol=1e-6, atol=1e-7)


# -- declared privacy capabilities: what the trainer and the run configuration do --------------------------------------
def run_config(name: str, **privacy) -> RunConfig:
    return RunConfig.from_options(method=name, width=2, rounds=1, image_size=SIZE, **privacy)


@pytest.mark.parametrize("name", NAMES)
def test_dp_sgd_trains_exactly_the_methods_that_declare_no_conflict(name):
    conflict = METHODS[name]().dp_sgd_conflict
    dp = DPSGDConfig(max_grad_norm=1.0, noise_multiplier=1.0)
    data = disc_split(4, 1)
    if conflict:
        with pytest.raises(ValueError, match=re.escape(conflict)):
            site(name, data, data, dp=dp, batch_size=2)
        with pytest.raises(ValueError, match=re.escape(conflict)):
            FedOAPRecipe(config=run_config(name, dp_sgd_noise=1.0), min_clients=2)
        return
    stats = site(name, data, data, dp=dp, batch_size=2).train_round()
    assert np.isfinite(stats["train_loss"]) and 0 < stats["privacy"]["dp_sgd_epsilon"] < float("inf")
    assert FedOAPRecipe(config=run_config(name, dp_sgd_noise=1.0), min_clients=2).config.privacy.dp_sgd_on


@pytest.mark.parametrize("name", NAMES)
def test_he_is_refused_exactly_for_the_methods_whose_rule_or_statistics_need_plaintext(name):
    method = METHODS[name]()
    rule = method.server_rule
    # HE hides the update from the server: only a linear rule (a weighted sum) can run on it, a rule that shares
    # nothing has nothing to hide, and statistics sent in clear next to the update would not be hidden
    refused = not rule.shares or not rule.linear or method.shares_statistics
    if refused:
        with pytest.raises(ValueError, match=f"method {name!r}"):
            FedOAPRecipe(config=run_config(name, he=True), min_clients=2)
    else:
        assert FedOAPRecipe(config=run_config(name, he=True), min_clients=2).config.privacy.he


# -- the recipe ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_the_recipe_exports_a_job_with_the_method_network_and_shared_keys(name, tmp_path):
    config = run_config(name)
    recipe = FedOAPRecipe(config=config, name=f"contract-{name}", min_clients=2)
    recipe.export(str(tmp_path))
    method = config.method.instance
    app = tmp_path / f"contract-{name}" / "app" / "config"
    server = json.loads((app / "config_fed_server.json").read_text())
    (controller,) = server["workflows"]
    assert controller["args"]["shared_keys"] == method.shared_keys(config.build_model())
    (persistor,) = [c for c in server["components"] if c["id"] == "persistor"]
    assert persistor["args"]["model"]["path"] == method.model_spec(config.training.model_args())["class_path"]


# -- it learns ---------------------------------------------------------------------------------------------------------
#: a parameter group whose gradient at initialization is below this fraction of the largest group's does not train
#: (measured at width 4: FedAvg's weakest group, the attention's key projection, 6e-5; PN with PyTorch's default
#: convolution initialization 3e-13)
VANISHING = 1e-6


def _group(key: str) -> str:
    """A parameter's module group: its name up to the second dot (``encoder.down_1``, ``dca.to_q``, ``head.weight``)."""
    return ".".join(key.split(".")[:2])


@pytest.mark.parametrize("name", NAMES)
def test_the_round_loss_reaches_every_part_of_the_network_at_initialization(name):
    """The gradient of the method's own step loss, on the seeded initial network, is not vanishing anywhere: the
    failure mode of a network whose normalization starts as the identity (the README's PN row)."""
    method = METHODS[name]()
    torch.manual_seed(0)
    model = method.build_model(MODEL_ARGS)
    data = disc_split(4, 1)
    method.begin_training(model, data)
    model.train()
    method.step_loss(model, torch.from_numpy(data.images), torch.from_numpy(data.labels), method.train_loss()).backward()
    squares: dict[str, float] = {}
    for key, param in model.named_parameters():
        grad = 0.0 if param.grad is None else float(param.grad.pow(2).sum())
        squares[_group(key)] = squares.get(_group(key), 0.0) + grad
    norms = {group: value**0.5 for group, value in squares.items()}
    largest = max(norms.values())
    weak = {group: f"{value / largest:.1e}" for group, value in norms.items() if value < VANISHING * largest}
    assert not weak, f"{name}: vanishing gradients at initialization (relative to the largest group): {weak}"


#: validation Dice a method must reach on the disc task (chance: 0 for an empty prediction, ~0.2 for a full one;
#: FedAvg reaches 0.93 here, the slowest, FedRep and SioBN, 0.8)
LEARNS = 0.5


@pytest.mark.parametrize("name", NAMES)
def test_learns_to_segment_a_bright_disc(name):
    """Six rounds of one local epoch (four steps) in a federation of one site, through the method's server rule, then
    the method's fine-tuning (one epoch): validation Dice well above chance. The learning rate is ten times the
    default so that 28 steps suffice on 2 CPU cores; it can hide a slow start, which the test above checks."""
    trainer = site(name, disc_split(16, 1), disc_split(8, 2), finetune_epochs=1)
    method = trainer.method
    global_shared = trainer.shared_params()
    rule = method.server_rule(global_shared, **method.server_rule_args())
    for _ in range(6):
        trainer.load_shared(global_shared)
        stats = trainer.train_round()
        if rule.shares:
            rule.reset(global_shared)
            rule.add("site", trainer.shared_params(), stats["aggregation_weight"], steps=stats["steps"])
            global_shared = rule.result()
    trainer.load_shared(global_shared)
    dice = trainer.finetune()["best_val_dice"]
    assert dice >= LEARNS, f"{name}: validation Dice {dice:.3f} after 6 rounds and fine-tuning"
