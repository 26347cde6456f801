"""Secure aggregation between real site sessions (data, training, the site's privacy boundary) and the server's masked
sum, driven through the protocol's tasks as the workflow drives them, without NVFlare's transport: the global model is
the weighted mean of the sites that sent; a site refuses, and stays in the job, when the server skips the key exchange
or swaps a key; the site's DP filter lets out only key material of the protocol's form, on its own tasks."""

from pathlib import Path

import numpy as np
import pytest
import torch

from nvflare.apis.filter import FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedoap.config import RunConfig
from fedoap.data import generate_site
from fedoap.privacy.dp import update_dp_epsilon
from fedoap.privacy.at_rest import create_key, site_key_path
from fedoap.privacy.secagg import ServerSecAgg
from fedoap.privacy.secagg_keys import SECAGG_DIR_ENV, load_roster, simulation_keys
from fedoap.protocol import (AGGREGATION_WEIGHT_KEY, SECAGG_ADVERTISE_TASK, SECAGG_KEY, SECAGG_REFUSED_KEY,
                             SECAGG_SHARE_TASK, SECAGG_UNMASK_TASK, TRAIN_TASK)
from fedoap.server.rules import MaskedSum
from fedoap.site.policy import SiteDPPolicy
from fedoap.site.session import SiteSession

SITES = ("brain", "breast", "liver")
JOB = "job-secagg"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secagg_sites")
    for i, site in enumerate(SITES):
        generate_site(root / "data" / site, site, n_cases=4, seed=i, size=32)
        create_key(site_key_path(root / "ws" / site))
    simulation_keys(root / "keys", SITES)
    return root


def _sessions(root: Path, **options):
    config = RunConfig.from_options(rounds=3, local_epochs=1, finetune_epochs=0, image_size=32, width=8, batch_size=4,
                                    seed=0, method="fedavg", data_root=str(root / "data"), secagg=True, **options)
    return config, {site: SiteSession(config, site, root / "ws" / site, JOB) for site in SITES}


@pytest.fixture()
def sessions(root, monkeypatch):
    monkeypatch.setenv(SECAGG_DIR_ENV, str(root / "keys"))
    return _sessions(root)


def _exchange(config, sessions, rnd, tamper=None):
    """The workflow's key exchange: advertisements in (checked by the server), relayed (``tamper`` may change them
    first), key shares in and routed; returns the server's round, what the training task carries and the replies."""
    roster = load_roster(Path("/nonexistent"))  # from $FEDOAP_SECAGG_DIR, as the simulator's server
    shared = next(iter(sessions.values())).trainer.shared_params()
    exchange = ServerSecAgg(JOB, rnd, roster, sum(v.numel() for v in shared.values()),
                            config.privacy.secagg_config())
    adverts = {s: sess.handle(SECAGG_ADVERTISE_TASK, {}, {}, rnd).meta for s, sess in sessions.items()}
    verified = dict(exchange.receive_keys({s: m[SECAGG_KEY] for s, m in adverts.items()}))
    relayed = tamper(verified) if tamper else verified
    replies = {s: sess.handle(SECAGG_SHARE_TASK, {}, {SECAGG_KEY: {"advertised": relayed}}, rnd)
               for s, sess in sessions.items()}
    shares = {s: r.meta[SECAGG_KEY] for s, r in replies.items() if SECAGG_KEY in r.meta}
    if len(shares) < 2:
        return exchange, None, replies
    routed = exchange.route_shares(shares)
    scale = sum(adverts[s][AGGREGATION_WEIGHT_KEY] for s in exchange.survivors)
    message = {"survivors": sorted(exchange.survivors), "scale": scale, "shares": routed}
    return exchange, message, replies


def test_the_masked_global_model_is_the_weighted_mean_of_the_sites_that_sent(sessions):
    config, sessions = sessions
    broadcast = {k: v.clone() for k, v in sessions["brain"].trainer.shared_params().items()}
    exchange, message, _ = _exchange(config, sessions, 0)
    rule = MaskedSum(broadcast, config.privacy.secagg_config())
    rule.reset(broadcast)
    asked = []

    def unmask(sent, dropped):
        asked.append((list(sent), list(dropped)))
        return {s: sessions[s].handle(SECAGG_UNMASK_TASK, {}, {SECAGG_KEY: {"sent": sent, "dropped": dropped}},
                                      0).meta[SECAGG_KEY] for s in sent}

    rule.begin(exchange, unmask, message["scale"])
    local, weights = {}, {}
    for site in ("brain", "breast"):  # liver shared its keys, then dropped out before training
        reply = sessions[site].handle(TRAIN_TASK, broadcast, {SECAGG_KEY: message}, 0)
        assert set(reply.params) == {"fedoap_secagg/masked"} and reply.params["fedoap_secagg/masked"].dtype == torch.int32
        local[site] = sessions[site].trainer.shared_params()
        weights[site] = reply.meta[AGGREGATION_WEIGHT_KEY]
        rule.add(site, reply.params, weights[site])
        masked = reply.params["fedoap_secagg/masked"].numpy().astype(np.float64)
        update = np.concatenate([(local[site][k] - broadcast[k]).numpy().ravel() for k in sorted(broadcast)])
        assert abs(np.corrcoef(masked, update)[0, 1]) < 0.05  # what the server received says nothing of the update
    result = rule.result()
    assert asked == [(["brain", "breast"], ["liver"])]
    total = sum(weights.values())
    for key in broadcast:
        expected = sum(weights[s] * local[s][key].double() for s in local) / total
        assert torch.allclose(result[key].double(), expected, atol=1e-6), key


def test_a_site_refuses_a_training_task_without_the_key_exchange_and_stays_in_the_job(sessions):
    config, sessions = sessions
    broadcast = sessions["brain"].trainer.shared_params()
    reply = sessions["brain"].handle(TRAIN_TASK, broadcast, {}, 0)  # the server skipped the exchange
    assert reply.params == {} and "without this round's key exchange" in reply.meta[SECAGG_REFUSED_KEY]
    exchange, message, _ = _exchange(config, sessions, 1)  # the next round goes on
    assert sorted(exchange.survivors) == list(SITES)
    assert set(sessions["brain"].handle(TRAIN_TASK, broadcast, {SECAGG_KEY: message}, 1).params) == {
        "fedoap_secagg/masked"}


def test_a_server_that_swaps_a_key_gets_no_shares(sessions):
    config, sessions = sessions

    def swap(advertised):  # the server puts its own mask key in for liver
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        own = X25519PrivateKey.generate().public_key().public_bytes_raw().hex()
        return {**advertised, "liver": {**advertised["liver"], "s_pk": own}}

    _, message, replies = _exchange(config, sessions, 0, tamper=swap)
    assert message is None  # no site shared a key: no round
    for site, reply in replies.items():
        assert SECAGG_KEY not in reply.meta, site
        assert "liver" in reply.meta[SECAGG_REFUSED_KEY], reply.meta
    assert "altered on its way" in replies["liver"].meta[SECAGG_REFUSED_KEY]


# -- what the site's DP filter lets out ------------------------------------------------------------------------------
def _ctx(task: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "strict", private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return ctx


def _result(params, meta):
    return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=dict(meta)))


def test_the_sites_filter_lets_out_key_material_on_the_protocols_own_tasks_only(sessions):
    _, sessions = sessions
    gate = SiteDPPolicy(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    gate.set_prop(FilterContextKey.CHAIN_TYPE, FilterChainType.TASK_RESULT_CHAIN)
    advert = sessions["brain"].handle(SECAGG_ADVERTISE_TASK, {}, {}, 0).meta
    assert gate.process(_result({}, advert), _ctx(SECAGG_ADVERTISE_TASK)) is not None
    refusal = {SECAGG_REFUSED_KEY: "a reason"}
    assert gate.process(_result({}, refusal), _ctx(SECAGG_SHARE_TASK)) is not None
    with pytest.raises(UnsafeJobError, match="in the result of task 'train'"):
        gate.process(_result({}, advert), _ctx(TRAIN_TASK))
    smuggled = {SECAGG_KEY: {**advert[SECAGG_KEY], "data": "00ff"}}  # a field that is not key material
    with pytest.raises(UnsafeJobError, match="not key material of the protocol's form"):
        gate.process(_result({}, smuggled), _ctx(SECAGG_ADVERTISE_TASK))
    with pytest.raises(UnsafeJobError, match="with parameters"):
        gate.process(_result({"w": torch.zeros(3)}, advert), _ctx(SECAGG_ADVERTISE_TASK))


@pytest.mark.parametrize("shares", [2, 3])
def test_distributed_dp_needs_as_many_sites_in_the_sum_as_the_noise_has_shares(root, monkeypatch, shares):
    """Each site adds 1/m of the noise variance (m = min_responses): with m = 2 the two sites that sent are unmasked
    (their noise adds up to sigma * C); with m = 3 they refuse to unmask a sum of two, and the round fails closed."""
    monkeypatch.setenv(SECAGG_DIR_ENV, str(root / "keys"))
    config, sessions = _sessions(root, dp_update_clip=1.0, dp_update_noise=1.0, dp_update_distributed=True,
                                 min_responses=shares)
    broadcast = {k: v.clone() for k, v in sessions["brain"].trainer.shared_params().items()}
    exchange, message, _ = _exchange(config, sessions, 0)
    rule = MaskedSum(broadcast, config.privacy.secagg_config())
    rule.reset(broadcast)
    refusals = {}

    def unmask(sent, dropped):
        replies = {s: sessions[s].handle(SECAGG_UNMASK_TASK, {}, {SECAGG_KEY: {"sent": sent, "dropped": dropped}},
                                         0).meta for s in sent}
        refusals.update({s: m[SECAGG_REFUSED_KEY] for s, m in replies.items() if SECAGG_REFUSED_KEY in m})
        return {s: m[SECAGG_KEY] for s, m in replies.items() if SECAGG_KEY in m}

    rule.begin(exchange, unmask, message["scale"])
    for site in ("brain", "breast"):  # liver dropped out after the key exchange
        reply = sessions[site].handle(TRAIN_TASK, broadcast, {SECAGG_KEY: message}, 0)
        assert reply.metrics["dp_update_epsilon"] == pytest.approx(update_dp_epsilon(1.0, 1, 1e-5))
        assert reply.metrics["dp_update_epsilon_coalition"] == pytest.approx(
            update_dp_epsilon(1.0 / shares ** 0.5, 1, 1e-5))
        rule.add(site, reply.params, reply.meta[AGGREGATION_WEIGHT_KEY])
    if shares == 2:
        assert set(rule.result()) == set(broadcast) and not refusals
    else:
        with pytest.raises(ValueError, match="fewer than t"):
            rule.result()
        assert set(refusals) == {"brain", "breast"}
        assert all("fewer than the 3 whose noise shares add up" in why for why in refusals.values())
