"""FedMEPD as a method on the generic engine: owner-only encoder averaging, the per-filter personalization rule on a
hand-computed case, the server's anchors (shapes, EMA), missing modalities through the trainer, the baselines, the
task switch and the combinations the configuration refuses."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedoap.config import RunConfig
from fedoap.data import DataValidationError
from fedoap.data.brats import generate_brats_site, load_brats_splits
from fedoap.eval.regions import region_scores
from fedoap.methods import METHODS, VOLUME_METHODS, get_method
from fedoap.methods.fedmepd_rules import class_prototypes, cluster_means, ema
from fedoap.server.rules import FedMEPDServerRule, NoAggregation, OwnerMean, UpdateRejected, WeightedMean
from fedoap.site.session import VolumeTrainer
from fedoap.training import TrainConfig

CHANNELS = (2, 4)


def tiny_method(**args):
    return get_method("fedmepd", channels=list(CHANNELS), anchors_per_class=2, **args)


def tiny_net(method):
    torch.manual_seed(0)
    return method.build_model({})


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    generate_brats_site(root / "half", "0011", 3, seed=1, size=16, depth=16)
    generate_brats_site(root / "server", "1111", 3, seed=2, size=16, depth=16)
    generate_brats_site(root / "two", "1111", 2, seed=3, size=16, depth=16)
    return root


# -- owner-only averaging ------------------------------------------------------------------------------------------
def test_the_server_averages_each_encoder_over_the_sites_that_sent_it_only():
    reference = {"encoders.flair.w": np.zeros(2), "encoders.t1.w": np.full(2, 7.0), "decoder.w": np.zeros(2)}
    rule = OwnerMean(reference)
    rule.add("a", {"encoders.flair.w": np.ones(2), "decoder.w": np.ones(2)}, weight=1)
    rule.add("b", {"encoders.flair.w": np.full(2, 4.0), "decoder.w": np.full(2, 5.0)}, weight=3)
    rule.add("c", {"decoder.w": np.full(2, 9.0)}, weight=4)
    out = rule.result()
    np.testing.assert_allclose(out["encoders.flair.w"], (1 * 1 + 3 * 4) / 4)  # a and b only, not c's weight
    np.testing.assert_allclose(out["decoder.w"], (1 + 15 + 36) / 8)  # everybody
    np.testing.assert_allclose(out["encoders.t1.w"], 7.0)  # nobody has t1: the broadcast value stays
    with pytest.raises(UpdateRejected, match="none of the shared"):
        rule.add("d", {"other": np.ones(1)}, weight=1)
    with pytest.raises(UpdateRejected, match="shape"):
        rule.add("e", {"decoder.w": np.ones(3)}, weight=1)


def test_a_site_sends_the_encoders_of_its_modalities_and_the_decoder_never_the_anchors():
    method = tiny_method()
    net = tiny_net(method)
    method.begin_training(net, SimpleNamespace(present=np.array([True, True, False, False])))
    shared = {k: v.clone() for k, v in net.state_dict().items() if k in method.shared_keys(net)}
    payload = method.shared_payload(net, shared)
    assert {k.split(".")[1] for k in payload if k.startswith("encoders.")} == {"flair", "t1ce"}
    assert set(net.decoder_keys) <= set(payload) and not any(k.startswith(("anchors.", "attention.")) for k in payload)
    assert any(k.startswith("anchors.scale_") for k in method.shared_keys(net))  # broadcast to the site
    assert not any(k.startswith("attention.") for k in method.shared_keys(net))  # local


# -- the filter rule -----------------------------------------------------------------------------------------------
def _shift(state, key, filt, delta):
    state = {k: v.clone() for k, v in state.items()}
    state[key][filt] += delta
    return state


def test_a_filter_whose_cosine_stays_negative_for_patience_rounds_becomes_personal():
    """Hand-computed: the site moves head filters 0 and 1 by +1 each round; the server moves filter 0 by -1 (cosine
    -1) and filter 1 by +1 (cosine +1). With patience 2, filter 0 is personal after the second counted round, filter 1
    never; everything else has a zero update (cosine 0, non-negative)."""
    method = tiny_method(patience=2)
    net = tiny_net(method)
    method.begin_training(net, SimpleNamespace(present=np.ones(4, bool)))
    keys = [k for k in method.shared_keys(net) if k.startswith("decoder.")]
    w, b = "decoder.head.weight", "decoder.head.bias"
    glob = {k: v.clone() for k, v in net.state_dict().items() if k in keys}

    def receive(g):  # what the trainer's load_shared does: load, then begin_round
        net.load_state_dict(g, strict=False)
        method.begin_round(net, g)

    def train():  # the site's round: +1 on filters 0 and 1 of the head (weight and bias)
        state = net.state_dict()
        for key in (w, b):
            state = _shift(state, key, 0, 1.0)
            state = _shift(state, key, 1, 1.0)
        net.load_state_dict(state)
        method.end_round(net)

    receive(glob)
    for rnd in range(2):
        train()
        for key in (w, b):
            glob = _shift(glob, key, 0, -1.0)
            glob = _shift(glob, key, 1, 1.0)
        receive(glob)
        assert method.rule.counters["decoder.head"][:2].tolist() == [rnd + 1, 0]
    assert method.personal_filters()["decoder.head"] == 1 and method.rule.personal["decoder.head"][0]
    after = method._after
    state = net.state_dict()
    torch.testing.assert_close(state[w][0], after[w][0])  # personal: the site's own values
    torch.testing.assert_close(state[w][1], glob[w][1])  # shared: the server's
    torch.testing.assert_close(state[b][2], glob[b][2])
    # what the site sends of its personal filter is the last global value (no update); the rest is its own
    train()
    shared = {k: v.clone() for k, v in net.state_dict().items() if k in method.shared_keys(net)}
    payload = method.shared_payload(net, shared)
    torch.testing.assert_close(payload[w][0], glob[w][0])
    torch.testing.assert_close(payload[w][1], shared[w][1])
    # the state survives a resume
    again = tiny_method(patience=2)
    again.load_site_state(net, method.site_state(net))
    assert again.personal_filters() == method.personal_filters() and again.rounds_seen == method.rounds_seen


def test_without_partial_personalization_no_filter_is_ever_kept():
    method = tiny_method(patience=1, personalize_filters=False)
    net = tiny_net(method)
    method.begin_training(net, SimpleNamespace(present=np.ones(4, bool)))
    glob = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("decoder.")}
    for _ in range(3):
        net.load_state_dict(glob, strict=False)
        method.begin_round(net, glob)
        method.end_round(net)
        glob = _shift(glob, "decoder.head.weight", 0, -1.0)
    assert method.personal_filters() == {}


# -- the server's anchors ------------------------------------------------------------------------------------------
def test_the_server_trains_on_its_full_modal_set_and_its_anchors_follow_an_ema(brats):
    method = tiny_method(server_data=str(brats / "server"), anchor_momentum=0.5, server_size=16)
    net = tiny_net(method)
    shared = method.shared_keys(net)
    reference = {k: v.clone() for k, v in net.state_dict().items() if k in shared}
    rule = FedMEPDServerRule(reference, **method.server_rule_args())
    rule.add("a", {k: v for k, v in reference.items() if not k.startswith("anchors.")}, weight=1)
    first = rule.result()
    for s, c in enumerate(CHANNELS):  # background + 3 regions, 2 clusters, the scale's width
        assert first[f"anchors.scale_{s}"].shape == (4, 2, c) and np.abs(first[f"anchors.scale_{s}"]).sum() > 0
    assert not np.allclose(first["decoder.head.weight"], reference["decoder.head.weight"].numpy())  # it trained
    previous = [torch.from_numpy(first[f"anchors.scale_{s}"]) for s in range(len(CHANNELS))]
    rule.reset({k: torch.from_numpy(v) for k, v in first.items()})
    rule.add("a", {k: torch.from_numpy(v) for k, v in first.items() if not k.startswith("anchors.")}, weight=1)
    second = rule.result()
    with torch.no_grad():
        features = rule.net.features(rule.images)
    for s, feat in enumerate(features):
        protos, present = class_prototypes(feat, rule.regions)
        for c in range(4):
            points = protos[present[:, c], c]
            if not len(points):
                continue
            means = cluster_means(points, rule._assignments[s][c], 2, fallback=previous[s][c])
            np.testing.assert_allclose(second[f"anchors.scale_{s}"][c], ema(previous[s][c], means, 0.5).numpy(),
                                       rtol=1e-4, atol=1e-5)
    # a site marks the anchors set once they arrive, and its forward then attends to them
    site_net = tiny_net(method)
    received = {k: torch.from_numpy(v) for k, v in second.items()}
    site_net.load_state_dict(received, strict=False)
    method.begin_round(site_net, received)
    assert site_net.anchors_initialized


def test_the_server_rule_refuses_bad_arguments_and_a_set_without_every_modality(brats):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        FedMEPDServerRule.check_args(epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        FedMEPDServerRule.check_args(momentum=2.0)
    method = tiny_method()
    net = tiny_net(method)
    reference = {k: v for k, v in net.state_dict().items() if k in method.shared_keys(net)}
    with pytest.raises(ValueError, match="all four modalities"):
        FedMEPDServerRule(reference, server_data=str(brats / "half"), channels=list(CHANNELS), anchors_per_class=2)


# -- missing modalities through the trainer ---------------------------------------------------------------------------
def test_a_site_without_flair_and_t1ce_trains_and_scores_per_region_and_never_touches_their_encoders(brats):
    data = load_brats_splits(brats / "half", size=16, seed=0)
    assert data.modalities == ("t1", "t2") and data.train.images[:, :2].max() == 0
    method = tiny_method()
    trainer = VolumeTrainer(tiny_net(method), method, data.train, data.val,
                            TrainConfig(batch_size=1, finetune_epochs=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_round()
    after = trainer.model.state_dict()
    for key in before:
        if key.startswith(("encoders.flair.", "encoders.t1ce.")):
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoders.t1."))
    sent = trainer.shared_params()
    assert {k.split(".")[1] for k in sent if k.startswith("encoders.")} == {"t1", "t2"}
    pred = trainer.predict(data.test.images)
    assert pred.shape == (len(data.test), 3, 16, 16, 16)
    summary = trainer.evaluate(data.test).summary()
    assert {"dice_wt", "dice_tc", "dice_et", "hd95_wt"} <= set(summary) and 0 <= summary["dice"] <= 1
    assert trainer.finetune()["best_epoch"] in (0, 1)


def test_region_scores_by_hand():
    target = np.zeros((1, 3, 8, 8, 8), bool)
    target[0, :, 2:4, 2:4, 2:4] = True
    pred = target.copy()
    pred[0, 2] = False  # ET missed
    scores = region_scores(pred, target)
    np.testing.assert_allclose(scores.dice, [[1.0, 1.0, 0.0]])
    assert scores.hd95[0, 0] == 0 and scores.hd95[0, 2] == pytest.approx(np.sqrt(3 * 64))  # the diagonal
    with pytest.raises(ValueError, match="must both be"):
        region_scores(pred[:, :2], target[:, :2])


def test_the_loader_refuses_too_few_cases_and_a_missing_folder(brats, tmp_path):
    with pytest.raises(DataValidationError, match="at least 3"):
        load_brats_splits(brats / "two", size=16)
    with pytest.raises(DataValidationError):
        load_brats_splits(tmp_path / "nosuch", size=16)


# -- baselines, ablations, the task switch and what the configuration refuses -----------------------------------------
def test_the_baselines_run_on_the_same_network():
    fedavg, split, local = (tiny_method(baseline=b) for b in ("fedavg", "split", "local"))
    net = tiny_net(fedavg)
    assert fedavg.server_rule is WeightedMean and set(fedavg.shared_keys(net)) == set(net.shared_keys)
    assert "decoder.head.weight" not in split.shared_keys(net) and split.server_rule is WeightedMean
    assert local.server_rule is NoAggregation and local.shared_keys(net) == []
    assert tiny_method().server_rule is FedMEPDServerRule
    assert tiny_method(anchors=False).model_spec({})["args"]["anchor_attention"] is False
    with pytest.raises(ValueError, match="baseline must be one of"):
        tiny_method(baseline="fedprox")


def test_the_task_switch_and_the_refused_combinations():
    brats = {"task": "brats-missing-modality", "volume_size": 16}
    assert "fedmepd" in VOLUME_METHODS and "fedmepd" not in METHODS
    config = RunConfig.from_options(method="fedmepd", **brats)
    assert config.training.volumetric and config.data.set_fields() == []
    with pytest.raises(ValueError, match="--task organ-slices: method 'fedmepd' does not serve it"):
        RunConfig.from_options(method="fedmepd")
    with pytest.raises(ValueError, match="--task brats-missing-modality: method 'fedavg' does not serve it"):
        RunConfig.from_options(method="fedavg", **brats)
    with pytest.raises(ValueError, match="--he: method 'fedmepd' combines updates by 'fedmepd', which needs the "
                                         "global model in clear.*training step"):
        RunConfig.from_options(method="fedmepd", he=True, **brats)
    with pytest.raises(ValueError, match="--secagg: method 'fedmepd'"):
        RunConfig.from_options(method="fedmepd", secagg=True, **brats)
    with pytest.raises(ValueError, match="--dp-sgd-noise: method 'fedmepd'"):
        RunConfig.from_options(method="fedmepd", dp_sgd_noise=1.0, **brats)
    with pytest.raises(ValueError, match="volume_size|volume-size"):
        RunConfig.from_options(method="fedmepd", task="brats-missing-modality", volume_size=12)
    # the FedAvg baseline is a weighted mean: it runs under HE, as client-level DP runs with FedMEPD itself
    RunConfig.from_options(method="fedmepd", method_args={"baseline": "fedavg"}, he=True, **brats)
    RunConfig.from_options(method="fedmepd", dp_update_clip=1.0, dp_update_noise=0.5, **brats)


def test_the_intake_lets_a_partial_update_through_only_for_a_rule_that_takes_one():
    from fedoap.server.intake import _Malformed, checked_params

    shapes = {"encoders.flair.w": (2,), "decoder.w": (2,)}
    update = {"decoder.w": torch.ones(2)}
    assert set(checked_params(update, shapes, encrypted=False, partial=OwnerMean.partial_updates)) == {"decoder.w"}
    with pytest.raises(_Malformed, match="lacks 1 shared parameter"):
        checked_params(update, shapes, encrypted=False, partial=WeightedMean.partial_updates)
    with pytest.raises(_Malformed, match="shape"):
        checked_params({"decoder.w": torch.ones(3)}, shapes, encrypted=False, partial=True)
