"""End-to-end deployment in NVFlare's POC mode, with real processes: prepare a 2-site POC from poc_workspace/ (mTLS
certificates; no HE key from the provisioning), install the sites' privacy policies, allow-lists and data locations
and run the sites' HE key ceremony (fedoap poc-configure), start it, submit the committed FedOAP job (and the HE and
secure aggregation jobs, exported with less training) with NVFlare's own CLI, wait, download and check the results,
and stop it, ending every process it started by PID.

Everything lives in a temporary folder: the POC workspace, the synthetic data and NVFlare's CLI configuration (HOME
points there, so ~/.nvflare is never touched); the server's ports are free ones, so a developer's POC is left alone.
Select it with ``pytest -m poc``; it runs in the default ``pytest`` too (about 2 minutes on 2 cores).
"""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedoap.cli import main as fedoap_main
from fedoap.data import generate_federation
from fedoap.server.controller import ENCRYPTED_CHECKPOINT, load_encrypted_checkpoint
from fedoap.protocol import HISTORY_FILE
from fedoap.config import RUN_CONFIG_FILE, RunConfig
from fedoap.deploy.jobs import JOB_TRAINING, export_jobs
from fedoap.config import TrainingOptions
from fedoap.site.outputs import find_site_outputs, load_detail
from fedoap.site.policy import SiteDPPolicy
from fedoap.site.privacy import PUBLIC_DECIMALS
from fedoap.privacy.at_rest import AtRestError, is_encrypted, load_key, site_key_path
from fedoap.privacy.ledger import PrivacyLedger, Release, epsilon_of, ledger_path
from fedoap.networks import FedOAPNet
from fedoap.privacy.he import HE_KEY_PREFIX

pytestmark = [pytest.mark.poc, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NVFLARE = str(BIN / "nvflare")
SITES = ("brain", "breast")
#: small, but each site has enough training slices (about 100 each) for DP-SGD at the default scope's epsilon 8 per
#: slice at batch 16 to stay under its noise limit (40 slices is refused: fedoap.privacy.budget)
DATA = {"brain": ("brain", 12), "breast": ("breast", 150), "lung": ("lung", 3)}
JOB_TIMEOUT_S = 900
#: the HE and secure aggregation jobs run as the committed ones with less training (their checks are about what
#: crosses the wire, not Dice), so that the suite keeps its time; the FedOAP job runs as committed
SMALL_TRAINING = TrainingOptions(rounds=3, local_epochs=1, finetune_epochs=2, image_size=32, width=8, batch_size=16,
                                 threads=1)
#: the smallest personalized test Dice each site must reach in the shipped FedOAP job under the default scope
MIN_POC_DICE = 0.5


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (all bound at once, so the system hands out different ones)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _session_of(pid: int):
    """Session id of a live process (None if it is gone); /proc/<pid>/stat is "pid (comm) state ppid pgrp sid ..."."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[3])


def _session_pids(sid: int) -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _session_of(int(p.name)) == sid}


class Poc:
    """A POC started by this test: every process it runs is in one session, whose PIDs are recorded as they come."""

    def __init__(self, root: Path):
        self.root = root
        self.workspace = root / "ws"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("FEDOAP_SITE_CONFIG", "FEDOAP_HE_CONTEXT_DIR", "NVFLARE_HOME")}
        self.env.update(HOME=str(root / "home"), NVFLARE_POC_WORKSPACE=str(self.workspace),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # start.sh runs `python3`
        (root / "home").mkdir()
        self.sid = None
        self.pids: set[int] = set()
        self.prod = None
        self.stop_info = None

    def nvflare(self, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run([NVFLARE, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                cwd=self.root)
        self.record()
        return result

    def record(self) -> None:
        if self.sid is not None:
            self.pids |= _session_pids(self.sid)

    def start(self) -> None:
        with open(self.root / "poc_start.log", "w") as log:
            starter = subprocess.Popen([NVFLARE, "poc", "start"], env=self.env, cwd=self.root, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = starter.pid  # its session holds the server, the clients and every job process they spawn
        self.pids.add(starter.pid)
        try:
            rc = starter.wait(timeout=240)
        finally:
            self.record()
        assert rc == 0, (self.root / "poc_start.log").read_text()[-3000:]

    def submit(self, job: Path) -> str:
        result = self.nvflare("job", "submit", "-j", str(job))
        match = re.search(r"job_id:\s*(\S+)", result.stdout)
        assert result.returncode == 0 and match, result.stdout + result.stderr
        return match.group(1)

    def meta(self, job_id: str) -> dict:
        result = self.nvflare("--format", "json", "job", "meta", job_id, timeout=60)
        return json.loads(result.stdout)["data"]

    def wait(self, job_id: str) -> dict:
        deadline = time.time() + JOB_TIMEOUT_S
        while time.time() < deadline:
            meta = self.meta(job_id)
            if str(meta.get("status", "")).startswith("FINISHED"):
                return meta
            time.sleep(3)
        raise AssertionError(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s: {self.meta(job_id)}")

    def download(self, job_id: str) -> Path:
        """The server's workspace of a finished job (downloaded once)."""
        folder = self.root / "download" / job_id
        if not folder.exists():
            result = self.nvflare("job", "download", job_id, "-o", str(self.root / "download"))
            assert result.returncode == 0, result.stdout + result.stderr
        return folder / "workspace"

    def alive(self) -> set[int]:
        self.record()
        return {pid for pid in self.pids if _session_of(pid) == self.sid}

    def stop(self, grace: float = 60) -> dict:
        """`nvflare poc stop`, then end by PID whatever of the recorded processes is still there after ``grace``
        seconds (once)."""
        if self.sid is None or self.stop_info is not None:
            return self.stop_info or {"after_poc_stop": set(), "seconds": 0.0}
        tick = time.time()
        try:
            self.nvflare("poc", "stop", timeout=180)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + grace
        while self.alive() and time.time() < deadline:
            time.sleep(1)
        left = self.alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            targets = self.alive()
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if targets:
                time.sleep(5)
        self.stop_info = {"after_poc_stop": left, "seconds": time.time() - tick}
        return self.stop_info


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    started = time.time()
    root = tmp_path_factory.mktemp("poc_e2e")
    generate_federation(root / "data", sites=DATA, size=32)
    project = yaml.safe_load((ROOT / "poc_workspace" / "poc_project.yml").read_text())
    (server,) = [p for p in project["participants"] if p["type"] == "server"]
    server["fed_learn_port"], server["admin_port"] = _free_ports(2)
    assert [p["name"] for p in project["participants"] if p["type"] == "client"] == list(SITES)
    (root / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))

    poc = Poc(root)
    timings = {}
    tick = time.time()
    prepared = poc.nvflare("poc", "prepare", "-i", str(root / "project.yml"), "--force")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert fedoap_main(["poc-configure", str(poc.workspace), "--data", str(root / "data"), "--unseen", "lung"]) == 0
    (poc.prod,) = sorted((poc.workspace / project["name"]).glob("prod_*"))
    timings["prepare+configure"], tick = time.time() - tick, time.time()
    try:
        poc.start()
        timings["start"], tick = time.time() - tick, time.time()
        nosuch = root / "jobs" / "nosuch_scope"
        shutil.copytree(ROOT / "jobs" / "fedoap", nosuch)
        meta = json.loads((nosuch / "meta.json").read_text())
        (nosuch / "meta.json").write_text(json.dumps({**meta, "name": "nosuch_scope", "scope": "nosuch"}, indent=2))
        small = {path.name: path for path in export_jobs(root / "jobs" / "small", ["fedoap_he", "fedoap_secagg"],
                                                         training=SMALL_TRAINING)}
        # all at once (the server runs up to 4 jobs): the HE job, the secure aggregation job, the plain one (asks for
        # no DP, no scope), the bad one
        ids = {name: poc.submit(job) for name, job in
               (("fedoap_he", small["fedoap_he"]), ("fedoap_secagg", small["fedoap_secagg"]),
                ("fedoap", ROOT / "jobs" / "fedoap"), ("nosuch", nosuch))}
        # the attacks of a job submitter without bring-your-own-code rights, and a job that brings code
        attacks = {name: _attack_job(root / "jobs", name, args) for name, args in ATTACK_JOBS.items()}
        (attacks["byoc"],) = export_jobs(root / "jobs" / "byoc", ["fedoap"], byoc=True)
        ids.update({name: poc.submit(job) for name, job in attacks.items()})
        poc.results = {name: poc.wait(job_id) for name, job_id in ids.items()}
        poc.ids = ids
        timings["4 jobs"], tick = time.time() - tick, time.time()
        yield poc
    finally:
        stopped = poc.stop()
        timings["stop"] = stopped["seconds"]
        print(f"\n[poc e2e] {time.time() - started:.0f} s from data to stopped POC ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"); {len(poc.pids)} processes recorded"
              + (f"; ended by PID after `nvflare poc stop`: {sorted(stopped['after_poc_stop'])}"
                 if stopped["after_poc_stop"] else ""))


#: what a job submitter tried against the first version (another script, a command, its own script arguments) and
#: through the job's run configuration (the site's data folders, its secrets): executor arguments and run
#: configuration changes of each attack job
ATTACK_JOBS = {
    "foreign_script": ({"task_script_path": "timeit.py", "task_script_args": "-n 1 pass"}, {}),
    "external_command": ({"execution_mode": "external_process", "command": "python -m timeit pass"}, {}),
    "script_args": ({"task_script_args": "--run-config /etc/hostname"}, {}),
    "data_root": ({}, {"data": {"data_root": "/"}, "training": {"rounds": 1}}),
    "site_secret": ({}, {"method": {"name": "fedoap", "args": {"partition": "${secret:HOME}"}}}),
}


def _attack_job(parent: Path, name: str, attack: tuple) -> Path:
    from fedoap.config import RUN_CONFIG_FILE

    executor_args, run_config_changes = attack
    job = parent / name
    shutil.copytree(ROOT / "jobs" / "fedoap", job)
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "name": name}, indent=2))
    config_file = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    config["executors"][0]["executor"]["args"].update(executor_args)
    config_file.write_text(json.dumps(config, indent=2))
    run_config_file = job / "app" / "config" / RUN_CONFIG_FILE
    run_config = json.loads(run_config_file.read_text())
    for group, values in run_config_changes.items():
        run_config[group].update(values)
    run_config_file.write_text(json.dumps(run_config, indent=2))
    return job


def _site_results(poc, job: str) -> dict:
    """Each site's detailed results, read with the site's own at-rest key (they are encrypted on the site)."""
    results = {}
    for site in SITES:
        paths = find_site_outputs(poc.prod / site / poc.ids[job] / "fedoap")
        results[site] = load_detail(paths.detail, key=load_key(site_key_path(poc.prod / site)))
    return results


def test_he_job_personalizes_every_site(poc):
    assert poc.results["fedoap_he"]["status"] == "FINISHED:COMPLETED", poc.results["fedoap_he"]
    history = json.loads((poc.download(poc.ids["fedoap_he"]) / HISTORY_FILE).read_text())
    assert history["he"] is True and sorted(history["personalized"]) == list(SITES)
    for site, detail in _site_results(poc, "fedoap_he").items():  # written on the site, never sent
        dice = detail["metrics"]["test_dice"]
        assert isinstance(dice, float) and 0.0 <= dice <= 1.0
        # sent rounded under the site's DP policy
        assert history["personalized"][site]["test_dice"] == pytest.approx(dice, abs=0.5 * 10 ** -PUBLIC_DECIMALS)
        assert 0.0 <= detail["metrics"]["unseen_dice"] <= 1.0  # the unseen organ from the site's configuration


def test_server_holds_only_ciphertext_of_the_shared_part(poc):
    server = poc.download(poc.ids["fedoap_he"])
    saved = load_encrypted_checkpoint(server / "app_server" / ENCRYPTED_CHECKPOINT)
    assert saved["encrypted_shared"] and all(k.startswith(HE_KEY_PREFIX) for k in saved["encrypted_shared"])
    assert not list(server.rglob("FL_global_model.pt")) and not list(server.rglob("*best*.pt"))
    net = FedOAPNet(**SMALL_TRAINING.model_args())
    plaintext = sum(net.state_dict()[k].numel() * 4 for k in net.shared_keys)
    history = json.loads((server / HISTORY_FILE).read_text())
    for record in history["rounds"]:
        assert record["accepted"] == len(SITES)
        for site in SITES:  # what arrived was ciphertext: larger than the float32 shared parameters
            assert plaintext < record["sites"][site]["bytes_uploaded"] <= 8 * plaintext


def test_secagg_job_masks_every_update_and_personalizes_every_site(poc):
    """The secure aggregation job: every round's updates arrived masked (one integer vector, about the float32 bytes
    of the shared part), the masks came off in the sum, the sites' identity keys stayed on the sites."""
    assert poc.results["fedoap_secagg"]["status"] == "FINISHED:COMPLETED", poc.results["fedoap_secagg"]
    server = poc.download(poc.ids["fedoap_secagg"])
    history = json.loads((server / HISTORY_FILE).read_text())
    assert history["secagg"] is True and history["server_rule"] == "masked_sum"
    assert sorted(history["personalized"]) == list(SITES) and history["completed_rounds"] == SMALL_TRAINING.rounds
    net = FedOAPNet(**SMALL_TRAINING.model_args())
    plaintext = sum(net.state_dict()[k].numel() * 4 for k in net.shared_keys)
    for record in history["rounds"]:
        assert record["accepted"] == len(SITES) and "aggregate_refused" not in record, record
        assert record["aggregation"]["secagg"] == {"masked": list(SITES), "unmasked_dropped": []}
        for site in SITES:
            assert plaintext <= record["sites"][site]["bytes_uploaded"] <= 1.1 * plaintext + 4096
    for site in SITES:
        identity = poc.prod / site / "local" / "secagg_identity.pem"
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert identity.read_bytes() not in b"".join(p.read_bytes() for p in server.rglob("*") if p.is_file())
        dice = _site_results(poc, "fedoap_secagg")[site]["metrics"]["test_dice"]
        assert 0.0 <= dice <= 1.0


def test_only_the_sites_hold_the_he_secret_key(poc):
    """The HE job ran on keys the sites made: no participant's startup/ holds a context, both sites hold the same
    secret (0600) in local/, and nothing the server or the coordinator's admin holds contains it."""
    import tenseal as ts

    assert not list(poc.prod.glob("*/startup/*.tenseal"))
    secrets = [(poc.prod / site / "local" / "client_context.tenseal") for site in SITES]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in secrets)
    (secret,) = {path.read_bytes() for path in secrets}
    assert ts.context_from(secret).is_private()
    public = poc.prod / "localhost" / "local" / "server_context.tenseal"
    assert not ts.context_from(public.read_bytes()).is_private()
    coordinator = [poc.prod / "localhost", poc.prod / "admin@coordinator.org", poc.download(poc.ids["fedoap_he"])]
    for path in (p for folder in coordinator for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert secret not in data, path
        if path.suffix == ".tenseal":
            assert not ts.context_from(data).is_private(), path


def _default_scope() -> tuple[str, SiteDPPolicy]:
    policy = json.loads((ROOT / "poc_workspace" / "local" / "privacy.json").read_text())
    default = next(s for s in policy["scopes"] if s["name"] == policy["default_scope"])
    return default["name"], SiteDPPolicy(**default["task_result_filters"][0]["args"])


def test_site_budget_gives_dp_sgd_to_jobs_that_ask_for_none(poc):
    """The default scope is a budget (epsilon 8 per slice per job): with 2 sites client-level DP would drown the
    update, so each site derives DP-SGD per slice calibrated to the budget over the job, and its result filter checks
    and charges every release."""
    _, site = _default_scope()
    for job in ("fedoap", "fedoap_he"):
        assert poc.results[job]["status"] == "FINISHED:COMPLETED", poc.results[job]
        run_config = RunConfig.load(ROOT / "jobs" / job / "app" / "config" / RUN_CONFIG_FILE)
        assert run_config.privacy.enabled() == {}  # the job asks for no DP
        history = json.loads((poc.download(poc.ids[job]) / HISTORY_FILE).read_text())
        for name in SITES:
            epsilons = [record["sites"][name]["dp_sgd_epsilon"] for record in history["rounds"]]
            assert epsilons == sorted(epsilons) and site.epsilon * 0.98 <= epsilons[-1] <= site.epsilon
            assert "dp_update_epsilon" not in history["rounds"][-1]["sites"][name]  # no client-level noise
            log = (poc.prod / name / poc.ids[job] / "log.txt").read_text()
            assert "gives this job DP-SGD per slice" in log
            assert log.count("site DP policy satisfied") == len(history["rounds"])


def test_shipped_job_learns_under_the_default_scope(poc):
    """What a user of the README's POC walkthrough gets: a personalized model that segments, under DP-SGD at
    epsilon 8 per slice (on this test's smaller data set; the README states the Dice on `fedoap generate-data`'s)."""
    history = json.loads((poc.download(poc.ids["fedoap"]) / HISTORY_FILE).read_text())
    dice = {site: history["personalized"][site]["test_dice"] for site in SITES}
    print(f"\n[poc e2e] fedoap under the default scope: personalized test Dice {dice}")
    assert min(dice.values()) >= MIN_POC_DICE, dice


def test_job_asking_for_an_unknown_scope_is_rejected(poc):
    meta = poc.results["nosuch"]
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    details = " ".join(meta.get("job_deploy_detail", []))
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: privacy scope 'nosuch' is not allowed" in details
    assert not (poc.prod / SITES[0] / poc.ids["nosuch"] / "fedoap").exists()  # it never ran


@pytest.mark.parametrize("name", [*ATTACK_JOBS, "byoc"])
def test_jobs_that_run_other_code_or_read_other_folders_are_refused_at_deployment(poc, name):
    meta = poc.results[name]
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    details = " ".join(meta.get("job_deploy_detail", []))
    reason = "BYOC not permitted" if name == "byoc" else "fedoap site policy:"
    for site in SITES:
        assert re.search(rf"{site}: .*{re.escape(reason)}", details), details
        assert not (poc.prod / site / poc.ids[name] / "fedoap").exists()  # nothing of it ran


def test_site_outputs_are_owner_only_and_encrypted_at_rest(poc):
    for site in SITES:
        paths = find_site_outputs(poc.prod / site / poc.ids["fedoap_he"] / "fedoap")
        for path in (paths.model, paths.overlays, paths.detail):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert is_encrypted(path.read_bytes()), path  # patient images and scores unreadable without the key
        with pytest.raises(AtRestError):
            load_detail(paths.detail, key=bytes(32))  # a wrong key


def test_privacy_ledger_adds_up_every_job_at_each_site(poc):
    scope, site_policy = _default_scope()
    for site in SITES:  # three jobs under the strict scope, charged to one ledger while running side by side
        ledger = PrivacyLedger(ledger_path(poc.prod / site))
        entries = ledger.entries(scope=scope, unit="slice")
        # the secure aggregation job's key exchange releases nothing
        assert len(entries) == JOB_TRAINING.rounds + 2 * SMALL_TRAINING.rounds
        for job in ("fedoap", "fedoap_he", "fedoap_secagg"):  # no job spent more than the per-job budget
            mine = [Release(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries
                    if e["job_id"] == poc.ids[job]]
            rounds = JOB_TRAINING.rounds if job == "fedoap" else SMALL_TRAINING.rounds
            assert len(mine) == rounds and epsilon_of(mine, site_policy.delta) <= site_policy.epsilon
        spent = ledger.spent(None, "slice", site_policy.delta)
        assert spent == pytest.approx(epsilon_of([Release(e["noise_multiplier"], e["sample_rate"], e["steps"])
                                                  for e in entries], site_policy.delta), rel=1e-9)
        assert spent <= site_policy.total_epsilon_dp_sgd


def test_stopping_ends_every_process_it_started(poc):
    stopped = poc.stop()  # `nvflare poc stop`, then SIGTERM/SIGKILL by PID for whatever of the recorded is left
    assert len(poc.pids) >= 6  # 3 sub_start loops, server, 2 clients (and the job processes seen while running)
    assert not poc.alive(), f"still running after stop: {sorted(poc.alive())}"
    if stopped["after_poc_stop"]:
        print(f"`nvflare poc stop` left {sorted(stopped['after_poc_stop'])}; ended by PID")
