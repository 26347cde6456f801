"""A site's local state survives a crash: the state file's format and safety (encrypted, owner-only, atomic, no
pickle, the newest three rounds), every method's trainer continuing exactly, and a resumed session's round equal to
an uninterrupted one's (without NVFlare: the session is fed what the server would send)."""

import copy
import logging
import math
import os
import pickle
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fedoap.config import RunConfig
from fedoap.data import SliceSet, generate_site
from fedoap.methods import METHODS
from fedoap.privacy.at_rest import create_key, save_private, site_key_path
from fedoap.privacy.dp import DPSGDConfig
from fedoap.protocol import PERSONALIZE_TASK, TRAIN_TASK
from fedoap.resume import SITE_STATE_PREFIX
from fedoap.site import checkpoint
from fedoap.site.checkpoint import (KEEP_ROUNDS, decode_state, encode_state, global_rng_state, load_site_state,
                                    save_site_state, saved_rounds, set_global_rng_state, state_path)
from fedoap.site.session import SITE_RESULTS_DIR, SiteSession
from discs import disc_split
from fedoap.training import LocalTrainer, TrainConfig

KEY = bytes(range(32))
MARKER = torch.arange(4096, dtype=torch.float32) * 0.5 + 123.25  # bytes no ciphertext may contain


# -- the format ------------------------------------------------------------------------------------------------------
def test_encode_decode_keeps_what_pickle_would():
    state = {
        "model": {"w": torch.randn(3, 4), "step": torch.tensor(7.0), "empty": torch.zeros(0, 2),
                  "gen": torch.Generator().manual_seed(1).get_state()},
        "optimizer": {"state": {0: {"step": torch.tensor(2.0)}, 5: {}},
                      "param_groups": [{"betas": (0.9, 0.999), "params": [0, 5], "foreach": None, "amsgrad": False}]},
        "history": [(1.0, 0.25, 10), (2.0, 1.0, 1)],
        "floats": [math.inf, -math.inf, 1.5e-300],
        "tricky": {"__tensor__": "not a tensor"},
        "nested": [[1, "a", None, True]],
    }
    back = decode_state(encode_state(state), "here")
    assert back["optimizer"]["state"].keys() == {0, 5}
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["history"] == [(1.0, 0.25, 10), (2.0, 1.0, 1)] and isinstance(back["history"][0], tuple)
    assert back["floats"][:2] == [math.inf, -math.inf] and back["floats"][2] == 1.5e-300
    assert back["tricky"] == {"__tensor__": "not a tensor"} and back["nested"] == [[1, "a", None, True]]
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v)
    nan = decode_state(encode_state({"x": math.nan}), "here")["x"]
    assert math.isnan(nan)


def test_a_value_that_needs_pickle_is_refused():
    with pytest.raises(ValueError, match=r"state\.bad: a object cannot be stored"):
        encode_state({"bad": object()})


def test_state_file_is_encrypted_owner_only_and_atomic(tmp_path):
    path = save_site_state(tmp_path / "fedoap", 4, {"marker": MARKER, "note": "site state"}, key=KEY)
    assert path == tmp_path / "fedoap" / f"{SITE_STATE_PREFIX}4.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = path.read_bytes()
    assert MARKER.numpy().tobytes()[:64] not in raw and b"fedoap_state" not in raw and b"site state" not in raw
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left
    rnd, state = load_site_state(path.parent, 10, key=KEY)
    assert rnd == 4 and torch.equal(state["marker"], MARKER) and state["note"] == "site state"


def test_only_the_newest_rounds_are_kept_and_the_newest_up_to_a_round_is_loaded(tmp_path):
    for rnd in range(6):
        save_site_state(tmp_path, rnd, {"round": rnd}, key=KEY)
    assert saved_rounds(tmp_path) == [6 - KEEP_ROUNDS + i for i in range(KEEP_ROUNDS)] == [3, 4, 5]
    assert load_site_state(tmp_path, 4, key=KEY)[1] == {"round": 4}
    assert load_site_state(tmp_path, 99, key=KEY)[0] == 5
    assert load_site_state(tmp_path, 2, key=KEY) is None
    assert load_site_state(tmp_path / "missing", 5, key=KEY) is None


def test_a_tampered_file_is_refused_naming_it(tmp_path):
    path = save_site_state(tmp_path, 2, {"marker": MARKER}, key=KEY)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_site_state(tmp_path, 2, key=KEY)


def test_a_file_renamed_to_another_round_or_read_with_another_key_is_refused(tmp_path):
    path = save_site_state(tmp_path, 2, {"marker": MARKER}, key=KEY)
    moved = state_path(tmp_path, 3)
    path.rename(moved)
    with pytest.raises(ValueError, match=re.escape(str(moved))):
        load_site_state(tmp_path, 3, key=KEY)
    save_site_state(tmp_path, 5, {"x": 1}, key=KEY)
    with pytest.raises(ValueError, match=re.escape(str(state_path(tmp_path, 5)))):
        load_site_state(tmp_path, 5, key=bytes(32))


def test_a_plain_state_file_is_refused_where_an_encrypted_one_is_expected(tmp_path):
    path = save_site_state(tmp_path, 1, {"x": 1}, key=None)
    assert load_site_state(tmp_path, 1, key=None) == (1, {"x": 1})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_site_state(tmp_path, 1, key=KEY)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pickle ran",))


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_a_pickle_payload_is_refused_naming_the_file(tmp_path, key):
    path = state_path(tmp_path, 0)
    save_private(path, pickle.dumps({"state": _Boom()}), key=key, context=checkpoint._context(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a fedoap site state file")):
        load_site_state(tmp_path, 0, key=key)
    # a torch.save file (a zip of pickles) is no state file either
    buffer = __import__("io").BytesIO()
    torch.save({"round": 0, "state": {}}, buffer)
    save_private(path, buffer.getvalue(), key=key, context=checkpoint._context(path))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_site_state(tmp_path, 0, key=key)


def test_a_foreign_safetensors_file_or_a_wrong_round_is_refused(tmp_path):
    from safetensors.torch import save as save_safetensors

    path = state_path(tmp_path, 0)
    save_private(path, save_safetensors({"w": torch.ones(2)}), key=None)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a fedoap-site-state/1 file")):
        load_site_state(tmp_path, 0)
    save_private(path, encode_state({"round": 7, "state": {}}), key=None)
    with pytest.raises(ValueError, match=re.escape(f"{path}: holds the state of round 7")):
        load_site_state(tmp_path, 0)


def test_global_random_streams_round_trip():
    state = decode_state(encode_state(global_rng_state()), "rng")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_global_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# -- every method's trainer continues exactly ------------------------------------------------------------------------
MODEL_ARGS = {"channels": [4, 8, 8, 8], "bottleneck_channels": 8}
SIZE = 32


def _discs(n: int, seed: int) -> SliceSet:
    return disc_split(n, seed, size=SIZE, radius=(1.0, 7.0), slices_per_case=2)


TRAIN, VAL = _discs(8, 0), _discs(2, 1)
ARGS = {"fedrod": {"generic_loss": "balanced"}, "fedgs": {"reset_optimizer_state": False}}


def _trainer(name: str, dp=None) -> LocalTrainer:
    method = METHODS[name](**ARGS.get(name, {}))
    torch.manual_seed(0)
    model = method.build_model(MODEL_ARGS)
    config = TrainConfig(batch_size=3, lr=1e-2, augment=True, local_epochs=1, finetune_epochs=0, seed=5)
    return LocalTrainer(model, method, TRAIN, VAL, config, dp=dp)


def _round(trainer: LocalTrainer, global_shared: dict) -> dict:
    trainer.load_shared(global_shared)
    trainer.train_round()
    return trainer.shared_params()


def _statistics(trainer: LocalTrainer) -> dict:
    """Two sites' statistics as the server forwards them: FedRDN's intensity statistics, FedDP's query weights."""
    if trainer.method.name == "fedrdn":
        own = trainer.method.site_statistics(trainer.train_set)
        return {"site-a": own, "site-b": {k: [v * 1.5 + 0.1 for v in vals] for k, vals in own.items()}}
    local = trainer.method._local_state(trainer.model)
    return {"site-a": {k: v.flatten().tolist() for k, v in local.items()},
            "site-b": {k: (v.flatten() + 0.01).tolist() for k, v in local.items()}}


def _assert_same(a, b) -> None:
    """Equal nested states: tensors equal in value, everything else equal."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", list(METHODS))
def test_every_methods_trainer_continues_exactly(name):
    """Round 1 of a trainer restored from round 0's saved state (through the file format) equals round 1 of the
    trainer that never stopped, for every method: whatever lives in the trainer or the method across rounds is saved
    or rebuilt from what the server sends."""
    ongoing = _trainer(name)
    initial = ongoing.shared_params()
    if ongoing.method.shares_statistics:  # the pool FedRDN draws from, FedDP's other site: received before round 0
        ongoing.method.receive_statistics(ongoing.model, _statistics(ongoing))
    sent = _round(ongoing, initial)
    saved = decode_state(encode_state(ongoing.state()), "state")

    resumed = _trainer(name)
    resumed.load_state(saved)
    fresh = _trainer(name)  # the same round 1 without the saved state: must differ, or the test proves nothing
    if fresh.method.shares_statistics:
        fresh.method.receive_statistics(fresh.model, _statistics(fresh))
    out = [_round(t, sent) for t in (ongoing, resumed, fresh)]
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.model.state_dict(), ongoing.model.state_dict(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.optimizer.state_dict()["state"], ongoing.optimizer.state_dict()["state"],
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(resumed.generator.get_state(), ongoing.generator.get_state())
    _assert_same(resumed.method.site_state(resumed.model), ongoing.method.site_state(ongoing.model))
    differs = [k for k, v in fresh.model.state_dict().items() if not torch.equal(v, ongoing.model.state_dict()[k])]
    assert differs


def test_a_state_of_another_network_is_refused():
    saved = _trainer("fedavg").state()
    with pytest.raises(ValueError, match="does not fit this trainer"):
        _trainer("ditto").load_state(saved)


def test_dp_sgd_accountant_continues_and_a_state_without_it_is_refused():
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    ongoing = _trainer("fedavg", dp=dp)
    _round(ongoing, ongoing.shared_params())
    steps = ongoing.dp.steps
    assert steps > 0
    resumed = _trainer("fedavg", dp=dp)
    resumed.load_state(decode_state(encode_state(ongoing.state()), "state"))
    assert resumed.dp.steps == steps and resumed.dp.epsilon() == pytest.approx(ongoing.dp.epsilon())
    stats = (resumed.load_shared(resumed.shared_params()), resumed.train_round())[1]
    assert stats["privacy"]["dp_sgd_steps"] == steps + stats["privacy"]["dp_sgd_round_steps"]
    with pytest.raises(ValueError, match="trained without DP-SGD"):
        _trainer("fedavg", dp=dp).load_state(_trainer("fedavg").state())


# -- a resumed session ----------------------------------------------------------------------------------------------
SITE = "breast"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_site(root / SITE, "breast", n_cases=14, seed=3, size=32)
    return root


@pytest.fixture()
def workspace(tmp_path) -> Path:
    create_key(site_key_path(tmp_path))  # the site's outputs and states are encrypted at rest
    return tmp_path


def _config(data_root: Path, method: str, resume: str = "", **options) -> RunConfig:
    """A new configuration (and so a new method object) per session, as every site process has its own."""
    settings = dict(rounds=3, local_epochs=1, finetune_epochs=0, image_size=32, width=8, batch_size=4, seed=1,
                    method=method, data_root=str(data_root), **options)
    return RunConfig.from_options(**settings, resume_from=resume)


def _run(session: SiteSession, rounds, global_shared: dict) -> tuple[dict, list]:
    """Feed ``rounds`` train tasks as a one-site federation would: each reply's parameters are the next global."""
    replies = []
    for rnd in rounds:
        reply = session.handle(TRAIN_TASK, global_shared, {}, rnd)
        replies.append(reply)
        global_shared = {k: v.clone() for k, v in reply.params.items()}
    return global_shared, replies


def _local(session: SiteSession) -> dict:
    shared = set(session.trainer.shared_keys)
    return {k: v for k, v in session.trainer.model.state_dict().items() if k not in shared}


@pytest.mark.parametrize("method", ["fedoap", "ditto", "moon"])
def test_a_resumed_session_continues_as_an_uninterrupted_one(data_root, workspace, method, caplog):
    uninterrupted = SiteSession(_config(data_root, method), SITE, workspace, "job-a")
    initial = uninterrupted.trainer.shared_params()
    _, replies = _run(uninterrupted, range(3), initial)

    interrupted = SiteSession(_config(data_root, method), SITE, workspace, "job-b")
    global_shared, _ = _run(interrupted, range(2), initial)
    del interrupted  # the crash

    resumed = SiteSession(_config(data_root, method, resume="job-b"), SITE, workspace, "job-c")
    assert resumed.config.robustness.resume_from == "job-b"
    with caplog.at_level(logging.INFO, logger="fedoap.site.session"):
        _, (reply,) = _run(resumed, [2], global_shared)
    assert f"resumes from its state after round 1 ({workspace / 'job-b' / SITE_RESULTS_DIR}" in caplog.text
    torch.testing.assert_close(reply.params, replies[2].params, rtol=1e-6, atol=1e-7)
    assert _local(resumed) or method == "moon"  # MOON shares everything; its own state is the previous model
    torch.testing.assert_close(_local(resumed), _local(uninterrupted), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.trainer.model.state_dict(), uninterrupted.trainer.model.state_dict(),
                               rtol=1e-6, atol=1e-7)
    assert reply.metrics["val_dice"] == pytest.approx(replies[2].metrics["val_dice"], abs=1e-6)
    assert saved_rounds(workspace / "job-c" / SITE_RESULTS_DIR) == [2]
    assert saved_rounds(workspace / "job-a" / SITE_RESULTS_DIR) == [0, 1, 2]


def test_a_resumed_session_keeps_counting_dp(data_root, workspace, caplog):
    """DP-SGD's and client-level DP's accountants continue from the interrupted run (the noise comes from the OS, so
    the values differ: only the accounting is compared)."""
    options = dict(dp_sgd_noise=1.0, dp_update_clip=10.0, dp_update_noise=1.0)
    interrupted = SiteSession(_config(data_root, "fedoap", **options), SITE, workspace, "job-b")
    global_shared, replies = _run(interrupted, range(2), interrupted.trainer.shared_params())
    steps, releases = interrupted.trainer.dp.steps, interrupted.privacy.accountant.rounds
    assert steps > 0 and releases == 2

    resumed = SiteSession(_config(data_root, "fedoap", resume="job-b", **options), SITE, workspace, "job-c")
    _, (reply,) = _run(resumed, [2], global_shared)
    assert resumed.trainer.dp.steps == steps + reply.metrics["dp_sgd_round_steps"]
    assert reply.metrics["dp_sgd_steps"] == resumed.trainer.dp.steps
    assert resumed.privacy.accountant.rounds == 3
    assert reply.metrics["dp_sgd_epsilon"] > replies[-1].metrics["dp_sgd_epsilon"]
    assert reply.metrics["dp_update_epsilon"] > replies[-1].metrics["dp_update_epsilon"]

    # the interrupted site had trained and released round 2 when the server died without keeping it: the job resumes
    # at round 2 from the site's round-1 state, but round 2's privacy was spent and stays counted
    _run(interrupted, [2], global_shared)
    steps, releases = interrupted.trainer.dp.steps, interrupted.privacy.accountant.rounds
    again = SiteSession(_config(data_root, "fedoap", resume="job-b", **options), SITE, workspace, "job-e")
    with caplog.at_level(logging.INFO, logger="fedoap.site.session"):
        _, (reply,) = _run(again, [2], global_shared)
    assert "resumes from its state after round 1" in caplog.text
    assert "its state after round 2" in caplog.text and "counts in its DP accounting" in caplog.text
    assert again.trainer.dp.steps == steps + reply.metrics["dp_sgd_round_steps"]
    assert again.privacy.accountant.rounds == releases + 1 == 4

    # the same job resumed without DP-SGD's history cannot claim DP-SGD's epsilon
    plain = SiteSession(_config(data_root, "fedoap"), SITE, workspace, "job-plain")
    _run(plain, range(1), plain.trainer.shared_params())
    refused = SiteSession(_config(data_root, "fedoap", resume="job-plain", **options), SITE, workspace, "job-d")
    folder = re.escape(str(workspace / "job-plain" / SITE_RESULTS_DIR))
    with pytest.raises(ValueError, match=rf"{folder}.*trained without DP-SGD"):
        refused.handle(TRAIN_TASK, global_shared, {}, 1)


def test_a_site_without_saved_state_starts_fresh(data_root, workspace, caplog):
    session = SiteSession(_config(data_root, "fedoap", resume="job-gone"), SITE, workspace, "job-c")
    before = copy.deepcopy(session.trainer.model.state_dict())
    with caplog.at_level(logging.INFO, logger="fedoap.site.session"):
        session.handle(TRAIN_TASK, session.trainer.shared_params(), {}, 2)
    assert "no state of a round before 2" in caplog.text and "starts fresh" in caplog.text
    assert any(not torch.equal(v, before[k]) for k, v in session.trainer.model.state_dict().items())


def test_a_state_of_another_site_is_refused(data_root, workspace):
    other = SiteSession(_config(data_root, "fedoap"), SITE, workspace, "job-b")
    _run(other, range(1), other.trainer.shared_params())
    folder = workspace / "job-b" / SITE_RESULTS_DIR
    rnd, state = load_site_state(folder, 0, key=other.at_rest_key)
    save_site_state(folder, 0, {**state, "site": "liver"}, key=other.at_rest_key)
    resumed = SiteSession(_config(data_root, "fedoap", resume="job-b"), SITE, workspace, "job-c")
    with pytest.raises(ValueError, match=re.escape(f"{state_path(folder, 0)}: cannot resume from it: ") + ".*'liver'"):
        resumed.handle(TRAIN_TASK, other.trainer.shared_params(), {}, 1)


def test_the_personalize_task_of_a_resumed_job_starts_from_the_last_round(data_root, workspace):
    interrupted = SiteSession(_config(data_root, "fedoap"), SITE, workspace, "job-b")
    global_shared, _ = _run(interrupted, range(3), interrupted.trainer.shared_params())
    resumed = SiteSession(_config(data_root, "fedoap", resume="job-b"), SITE, workspace, "job-c")
    resumed.handle(PERSONALIZE_TASK, global_shared, {}, 3)
    # finetune_epochs=0: the personalized model is the last round's (local parts included) with the final global
    torch.testing.assert_close(_local(resumed), _local(interrupted), rtol=0, atol=0)
