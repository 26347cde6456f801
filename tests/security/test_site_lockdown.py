"""Attacks of a job submitter on a site: run foreign code, read foreign folders, bring code without the right.

Each test mounts the attack against the real objects a site runs (NVFlare's ComponentPathAuthorizer with the shipped
allow-list, fedoap's executor and app validator on a real exported job folder, NVFlare's Workspace and FLContext at
the executor's start, NVFlare's Authorizer with the shipped authorization.json) and asserts that it fails.
``tests/test_poc_e2e.py`` submits the same kinds of jobs to a running POC and checks that each is refused at
deployment.
"""

import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.sec.authz import Authorizer, AuthzContext, Person
from nvflare.security.security import COMMAND_CATEGORIES

from fedoap.config import RUN_CONFIG_FILE
from fedoap.site.app_validator import EXECUTOR_PATH, FedOAPAppValidator
from fedoap.site.executor import CLIENT_SCRIPT, FedOAPExecutor, refused_args, run_config_refusal
from fedoap.methods import METHODS, get_method

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "poc_workspace" / "local"
RESOURCES = json.loads((LOCAL / "resources.json").read_text())
ALLOW_LIST = RESOURCES["class_allow_list"]

#: what a job without bring-your-own-code rights tried against the first version (issue 9), as executor arguments:
#: another script, a command, another execution mode, script arguments of its own (the only way options reached the
#: client script then, and the way a site's secrets could be pulled into them)
EXECUTOR_ATTACKS = {
    "foreign script": {"task_script_path": "timeit.py", "task_script_args": "-s import os;os.system('id')"},
    "external command": {"execution_mode": "external_process", "command": "python -c 'import os'"},
    "attach mode": {"execution_mode": "attach", "attach_id": "x"},
    "script arguments": {"task_script_args": "--run-config /etc/passwd"},
    "script arguments with a site secret": {"task_script_args": "--method ${secret:AWS_SECRET_ACCESS_KEY}"},
}
#: the same attacks through the job's run configuration (app/config/fedoap_run.json): the site's data folders, its
#: secrets, an option the configuration does not know
RUN_CONFIG_ATTACKS = {
    "data root": {"data": {"data_root": "/etc"}},
    "unseen dir": {"data": {"unseen_dir": "/home"}},
    "pooled sites": {"data": {"data_root": "/", "pool_sites": ["a", "b"]}},
    "site secret": {"method": {"name": "fedoap", "args": {"partition": "${secret:AWS_SECRET_ACCESS_KEY}"}}},
    "unknown option": {"training": {"data_root": "/etc"}},
}
DATA_ATTACKS = ("data root", "unseen dir", "pooled sites")


def _allowed(path: str) -> bool:
    return any(ComponentPathAuthorizer._path_matches_prefix(path, p) for p in ALLOW_LIST)


def test_allow_list_names_exact_fedoap_classes_never_a_prefix():
    ours = [p for p in ALLOW_LIST if p.startswith("fedoap")]
    assert ours and RESOURCES["class_list_enforcement_mode"] == "enforce"
    for entry in ours:
        assert not entry.endswith("."), f"{entry} is a prefix"
        module, _, name = entry.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name)), f"{entry} is not a class"
    # the attack of the first version: any class of the package, e.g. a pass-through executor, is not admitted
    assert not _allowed("fedoap.site.client.main") and not _allowed("fedoap.evil.Executor")
    assert not _allowed(f"{ClientAPIExecutor.__module__}.{ClientAPIExecutor.__name__}")
    assert not _allowed("nvflare.app_common.executors.client_api_executor.ClientAPIExecutor")


def test_every_class_a_fedoap_job_needs_is_allowed():
    paths = {EXECUTOR_PATH, "fedoap.server.controller.SharedParamsFedAvg", "fedoap.site.policy.SiteDPPolicy",
             RESOURCES["app_validator"]["path"]}
    paths |= {get_method(name).model_spec({})["class_path"] for name in METHODS}
    for job_config in (ROOT / "jobs").rglob("config_fed_*.json"):
        text = json.loads(job_config.read_text())
        stack = [text]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                paths |= {node[k] for k in ("path", "class_path") if isinstance(node.get(k), str)}
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    assert all(_allowed(p) for p in paths), sorted(p for p in paths if not _allowed(p))


@pytest.mark.parametrize("name", sorted(EXECUTOR_ATTACKS))
def test_executor_refuses_every_argument_but_its_own(name):
    with pytest.raises(ValueError, match="runs only fedoap's own client script"):
        FedOAPExecutor(**EXECUTOR_ATTACKS[name])
    assert refused_args(EXECUTOR_ATTACKS[name])


def test_executor_runs_only_the_package_client_script_in_process():
    executor = FedOAPExecutor()
    assert executor._task_script_path == CLIENT_SCRIPT and executor._execution_mode == "in_process"
    assert executor._command is None and executor._task_script_args == ""


def _run_config(folder: Path, changes: dict) -> Path:
    """The shipped fedoap job's run configuration with ``changes`` merged into its groups."""
    document = json.loads((ROOT / "jobs" / "fedoap" / "app" / "config" / RUN_CONFIG_FILE).read_text())
    for group, values in changes.items():
        document.setdefault(group, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_CONFIG_FILE
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("name", sorted(RUN_CONFIG_ATTACKS))
def test_data_folders_and_secrets_in_the_run_config_are_refused_outside_the_simulator(tmp_path, name):
    path = _run_config(tmp_path, RUN_CONFIG_ATTACKS[name])
    reason = run_config_refusal(str(path), simulate=False)
    assert reason and ("site's own configuration" in reason or "secrets" in reason or "unknown option" in reason)
    if name in DATA_ATTACKS:  # the simulator's own jobs name the data folders of the user who runs it
        assert run_config_refusal(str(path), simulate=True) is None
    else:
        assert run_config_refusal(str(path), simulate=True) == reason
    assert run_config_refusal(str(_run_config(tmp_path / "plain", {})), simulate=False) is None
    assert "no readable run configuration" in run_config_refusal(str(tmp_path / "missing.json"))


def _site(tmp_path: Path, job_id: str, run_config_changes: dict | None) -> FLContext:
    """A site's workspace (NVFlare's own Workspace) with a deployed job whose app carries the run configuration."""
    for folder in ("startup", "local"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(tmp_path), site_name="hospital-a")
    if run_config_changes is not None:
        _run_config(Path(workspace.get_app_config_dir(job_id)), run_config_changes)
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.CURRENT_JOB_ID, job_id, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.SIMULATE_MODE, False, private=True, sticky=False)
    return fl_ctx


def test_executor_hands_the_script_only_the_checked_run_config(tmp_path):
    fl_ctx = _site(tmp_path, "job-1", {})
    arguments = FedOAPExecutor().script_arguments(fl_ctx)
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    assert arguments == f"--run-config {Path(workspace.get_app_config_dir('job-1')) / RUN_CONFIG_FILE}"


@pytest.mark.parametrize("name", [*sorted(RUN_CONFIG_ATTACKS), "no run config"])
def test_executor_refuses_each_run_config_attack_when_the_job_starts(tmp_path, name):
    fl_ctx = _site(tmp_path, "job-2", RUN_CONFIG_ATTACKS.get(name))
    with pytest.raises(ValueError, match="site's own configuration|secrets|unknown option|no readable run config"):
        FedOAPExecutor().script_arguments(fl_ctx)


def _job(tmp_path: Path, executor_args: dict, run_config_changes: dict | None = None) -> Path:
    app = tmp_path / "job" / "app"
    shutil.copytree(ROOT / "jobs" / "fedoap" / "app", app)
    config_file = app / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    config["executors"][0]["executor"]["args"].update(executor_args)
    config_file.write_text(json.dumps(config))
    if run_config_changes:
        _run_config(app / "config", run_config_changes)
    return app


def test_app_validator_admits_the_shipped_jobs():
    for job in sorted((ROOT / "jobs").iterdir()):
        if (job / "app").is_dir():
            assert FedOAPAppValidator().validate(str(job / "app")) == ("", {}), job.name


@pytest.mark.parametrize("name", sorted(EXECUTOR_ATTACKS))
def test_app_validator_refuses_each_executor_attack_at_deployment(tmp_path, name):
    error, _ = FedOAPAppValidator().validate(str(_job(tmp_path, EXECUTOR_ATTACKS[name])))
    assert error.startswith("fedoap site policy:") and "runs only fedoap's own client script" in error, error


@pytest.mark.parametrize("name", sorted(RUN_CONFIG_ATTACKS))
def test_app_validator_refuses_each_run_config_attack_at_deployment(tmp_path, name):
    error, _ = FedOAPAppValidator().validate(str(_job(tmp_path, {}, RUN_CONFIG_ATTACKS[name])))
    assert error.startswith("fedoap site policy:"), error


def test_app_validator_answers_without_importing_torch_or_the_methods(tmp_path):
    """The site's parent process runs the validator while NVFlare's deployment timeout (10 s) runs: it checks the run
    configuration without building the method (the executor builds and checks it when the job starts)."""
    import subprocess
    import sys

    code = ("import sys; from fedoap.site.app_validator import FedOAPAppValidator; "
            "error = FedOAPAppValidator().validate(sys.argv[1])[0]; "
            "print(error == '', 'torch' in sys.modules, 'fedoap.methods' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "jobs" / "fedoap_he" / "app")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["True", "False", "False"]
    # deployed into a site's workspace, with the shipped privacy budgets to check the job against
    app = tmp_path / "job-1" / "app_brain"
    shutil.copytree(ROOT / "jobs" / "fedoap_he" / "app", app)
    (tmp_path / "local").mkdir()
    shutil.copyfile(ROOT / "poc_workspace" / "local" / "privacy.json", tmp_path / "local" / "privacy.json")
    out = subprocess.run([sys.executable, "-c", code, str(app)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "False"]


def test_app_validator_refuses_a_job_without_its_run_config(tmp_path):
    app = _job(tmp_path, {})
    (app / "config" / RUN_CONFIG_FILE).unlink()
    error, _ = FedOAPAppValidator().validate(str(app))
    assert error.startswith("fedoap site policy:") and RUN_CONFIG_FILE in error


def test_app_validator_refuses_a_client_config_it_cannot_read(tmp_path):
    app = _job(tmp_path, {})
    config = app / "config" / "config_fed_client.json"
    # the same executor in another config format would escape a JSON-only check: refused as a whole
    config.rename(config.with_suffix(".conf"))
    error, _ = FedOAPAppValidator().validate(str(app))
    assert "one JSON file" in error


def test_site_authorization_denies_bring_your_own_code_to_every_role():
    authorizer = Authorizer("hospital_a", COMMAND_CATEGORIES)
    assert not authorizer.load_policy(json.loads((LOCAL / "authorization.json").read_text()))
    for role in ("project_admin", "org_admin", "lead", "member"):
        for org in ("hospital_a", "coordinator"):
            user = Person("someone@x.org", org, role)
            allowed, _ = authorizer.authorize(AuthzContext(right="byoc", user=user, submitter=user))
            assert not allowed, (role, org)
    # the coordinator's admin cannot read a site's files with shell commands (cat, head, grep: patient outputs)
    admin = Person("admin@coordinator.org", "coordinator", "project_admin")
    assert not authorizer.authorize(AuthzContext(right="shell_commands", user=admin, submitter=admin))[0]
    # only project admins and leads submit jobs
    for role, expected in (("project_admin", True), ("lead", True), ("org_admin", False), ("member", False)):
        user = Person("u@x.org", "hospital_b", role)
        assert authorizer.authorize(AuthzContext(right="submit_job", user=user, submitter=user))[0] is expected
