"""Live training curves through NVFlare's experiment tracking: one real simulator run whose TensorBoard event files
hold exactly what the server's history records of each site, the recipe's switch, the one-line refusal of a missing
backend, and the rule that nothing is tracked but the numbers of a result the site released."""

import json
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from fedoap.cli import main
from fedoap.config import RunConfig
from fedoap.deploy.recipe import FedOAPRecipe
from fedoap.protocol import HISTORY_FILE
from fedoap.site.privacy import public_metrics
from fedoap.tracking import PERSONALIZED_PREFIX, TB_FOLDER, SiteTracker, tracked_scalars

ROUNDS = 2
SITES = ("brain", "liver")
ARGS = ["--clients", ",".join(SITES), "--unseen", "none", "--rounds", str(ROUNDS), "--local-epochs", "1",
        "--finetune-epochs", "0", "--image-size", "32", "--width", "4", "--batch-size", "8", "--seed", "5",
        "--cases", "brain=3,liver=3", "--synthetic-size", "32"]
TB_RECEIVER = "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver"
#: what the server records of a site beside the site's metrics (from the result's meta and size): never tracked
SERVER_FIELDS = {"bytes_uploaded", "n_samples", "steps", "aggregation_weight"}


def _f32(value: float) -> np.float32:
    """A value as a TensorBoard event file stores it."""
    return np.float32(value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small simulation with TensorBoard tracking: its results, the server's history and each site's scalars
    ({tag: {step: value}}) read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path_factory.mktemp("tracked")
    assert main(["simulate", *ARGS, "--tracking", "tensorboard", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    server_run = Path(results["workspace"]) / "server" / "simulate_job"
    history = json.loads((server_run / HISTORY_FILE).read_text())
    scalars = {}
    for site in SITES:
        folder = server_run / TB_FOLDER / site
        assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
        events = EventAccumulator(str(folder))
        events.Reload()
        scalars[site] = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return out, results, history, scalars


def test_the_curves_are_the_history_of_each_site(run):
    """Validation Dice per round is results.json's, train loss the server history's, to float32; the final
    personalization's metrics sit at step = rounds."""
    _, results, history, scalars = run
    for site in SITES:
        tracked = scalars[site]
        assert sorted(tracked["val_dice"]) == list(range(ROUNDS))
        assert [_f32(tracked["val_dice"][r]) for r in range(ROUNDS)] == \
            [_f32(v) for v in results["val_dice_per_round"][site]]
        assert [_f32(tracked["train_loss"][r]) for r in range(ROUNDS)] == \
            [_f32(record["sites"][site]["train_loss"]) for record in history["rounds"]]
        final = history["personalized"][site]
        for key in ("val_dice", "test_dice"):
            (step, value), = tracked[PERSONALIZED_PREFIX + key].items()
            assert step == ROUNDS and _f32(value) == _f32(final[key])


def test_everything_tracked_is_in_the_history_for_that_site_and_round(run):
    """Nothing reaches the tracking receiver that the server's history does not record of the same site and round
    (and every number the site sent is there: the tracked set is exactly the site's numeric metrics)."""
    _, _, history, scalars = run
    for site in SITES:
        recorded = {}  # (tag, step) -> value, from the history only
        for record in history["rounds"]:
            entry = {k: v for k, v in record["sites"][site].items() if k not in SERVER_FIELDS}
            recorded.update({(k, record["round"]): v for k, v in tracked_scalars(entry).items()})
        recorded.update({(PERSONALIZED_PREFIX + k, ROUNDS): v
                         for k, v in tracked_scalars(history["personalized"][site]).items()})
        tracked = {(tag, step): value for tag, steps in scalars[site].items() for step, value in steps.items()}
        assert set(tracked) <= set(recorded), set(tracked) - set(recorded)
        assert set(tracked) == set(recorded)
        for key, value in tracked.items():
            assert _f32(value) == _f32(recorded[key]), key


def test_tracking_none_adds_no_receiver_and_the_default_adds_tensorboards(tmp_path):
    def server_components(tracking):
        name = f"job-{tracking}"
        config = RunConfig.from_options(width=4, rounds=1, tracking=tracking)
        FedOAPRecipe(name=name, min_clients=2, config=config).export(str(tmp_path))
        app = tmp_path / name / "app" / "config"
        assert RunConfig.load(app / "fedoap_run.json").training.tracking == tracking  # the sites know it too
        return [c["path"] for c in json.loads((app / "config_fed_server.json").read_text())["components"]]

    assert RunConfig().training.tracking == "tensorboard"
    assert TB_RECEIVER in server_components("tensorboard")
    assert not any("tracking" in path for path in server_components("none"))


def test_the_shipped_jobs_track_with_tensorboard():
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    for server in jobs.glob("*/app/config/config_fed_server.json"):
        assert TB_RECEIVER in [c["path"] for c in json.loads(server.read_text())["components"]], server


@pytest.mark.skipif(find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_mlflow_without_the_package_is_one_line_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["simulate", *ARGS, "--tracking", "mlflow", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("fedoap: error: --tracking mlflow: the mlflow package is not installed on this machine "
                   "(pip install mlflow, or --tracking none)\n")
    assert not out.exists()
    with pytest.raises(ValueError, match="--tracking mlflow: the mlflow package is not installed"):
        FedOAPRecipe(min_clients=2, config=RunConfig.from_options(width=4, tracking="mlflow"))


def test_a_bad_tracking_value_is_refused():
    with pytest.raises(ValueError, match=r"--tracking must be one of \['tensorboard', 'mlflow', 'none'\]"):
        RunConfig.from_options(tracking="wandb")


# -- what a site tracks --------------------------------------------------------------------------------------------
class _Writer:
    def __init__(self):
        self.written = []

    def add_scalar(self, tag, scalar, global_step=None, **kwargs):
        self.written.append((tag, scalar, global_step))


ROUND_METRICS = {"train_loss": 0.7, "val_dice": 0.61234, "test_dice": 0.5, "test_hd95": float("nan"),
                 "images_per_s": 12.5, "dp_sgd_unit": "slice", "dp_sgd_epsilon": 3.2, "flag": True, "none": None}


@pytest.mark.parametrize("private", [False, True])
def test_a_site_tracks_only_numbers_of_the_metrics_it_sent(private):
    """The tracked keys are a subset of the result's metrics (under DP without the training loss, which the site does
    not send, and at the rounded values it sends); text, flags, None and NaN are not tracked."""
    sent = public_metrics(ROUND_METRICS, private)
    writer = _Writer()
    tracker = SiteTracker(writer)
    tracker.result(3, sent, metrics_only=False)
    tracker.task_received()
    tags = {tag for tag, _, _ in writer.written}
    assert tags <= set(sent)
    assert tags == {"val_dice", "test_dice", "images_per_s", "dp_sgd_epsilon"} | ({"train_loss"} if not private
                                                                                    else set())
    for tag, value, step in writer.written:
        assert step == 3 and value == sent[tag] and not math.isnan(value)
    if private:
        assert dict((t, v) for t, v, _ in writer.written)["val_dice"] == 0.61


def test_a_training_result_is_tracked_only_once_the_site_has_its_next_task():
    """NVFlare gives a site no further task after its result filters refused a result, so a training result waits for
    the next task; the personalization (metrics only) is tracked at once, apart from the rounds' curves."""
    writer = _Writer()
    tracker = SiteTracker(writer)
    tracker.task_received()  # the first task: nothing held
    tracker.result(0, {"val_dice": 0.2}, metrics_only=False)
    assert writer.written == []  # refused by a filter, it would stay here: the job ends on the site
    tracker.task_received()
    assert writer.written == [("val_dice", 0.2, 0)]
    tracker.task_received()  # written once
    tracker.result(2, {"test_dice": 0.4, "organ": "brain"}, metrics_only=True)
    assert writer.written[1:] == [(PERSONALIZED_PREFIX + "test_dice", 0.4, 2)]


def test_tracking_off_writes_nothing():
    tracker = SiteTracker(None)
    tracker.result(0, {"val_dice": 0.2}, metrics_only=False)
    tracker.task_received()
    tracker.result(1, {"val_dice": 0.2}, metrics_only=True)  # no writer: nothing to call
