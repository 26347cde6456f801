"""Attacks of a job submitter on a site: run foreign code, read foreign folders, bring code without the right.

Each test mounts the attack against the real objects a site runs (NVFlare's ComponentPathAuthorizer with the shipped
allow-list, fedoap's executor and app validator on a real exported job folder, NVFlare's Authorizer with the shipped
authorization.json) and asserts that it fails. ``tests/test_poc_e2e.py`` submits the same jobs to a running POC and
checks that each is refused at deployment.
"""

import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.sec.authz import Authorizer, AuthzContext, Person
from nvflare.security.security import COMMAND_CATEGORIES

from fedoap.site.app_validator import EXECUTOR_PATH, FedOAPAppValidator
from fedoap.site.executor import CLIENT_SCRIPT, FedOAPExecutor, job_data_options, refused_args
from fedoap.methods import METHODS, get_method

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "poc_workspace" / "local"
RESOURCES = json.loads((LOCAL / "resources.json").read_text())
ALLOW_LIST = RESOURCES["class_allow_list"]

#: what a job without bring-your-own-code rights tried against the first version (issue 9): its executor arguments
ATTACKS = {
    "foreign script": {"task_script_path": "timeit.py", "task_script_args": "-s import os;os.system('id')"},
    "external command": {"execution_mode": "external_process", "command": "python -c 'import os'"},
    "attach mode": {"execution_mode": "attach", "attach_id": "x"},
    "data root": {"task_script_args": "--method fedoap --data-root /etc"},
    "data root with =": {"task_script_args": "--method fedoap --data-root=/"},
    "unseen dir": {"task_script_args": "--unseen-dir /home"},
    "pooled sites": {"task_script_args": "--pool-sites a,b"},
    "site secret": {"task_script_args": "--method ${secret:AWS_SECRET_ACCESS_KEY}"},
}


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


@pytest.mark.parametrize("name", [n for n in ATTACKS if "task_script_args" not in ATTACKS[n] or len(ATTACKS[n]) > 1])
def test_executor_refuses_every_argument_but_its_own(name):
    with pytest.raises(ValueError, match="runs only fedoap's own client script"):
        FedOAPExecutor(**ATTACKS[name])


def test_executor_runs_only_the_package_client_script_in_process():
    executor = FedOAPExecutor(task_script_args="--method fedoap")
    assert executor._task_script_path == CLIENT_SCRIPT and executor._execution_mode == "in_process"
    assert executor._command is None


@pytest.mark.parametrize("name", ["data root", "data root with =", "unseen dir", "pooled sites", "site secret"])
def test_data_folders_and_secrets_are_refused_outside_the_simulator(name):
    args = ATTACKS[name]
    reason = refused_args(args, simulate=False)
    assert reason and ("site's own configuration" in reason or "secrets" in reason)
    if "secret" not in name:  # the simulator's own jobs name the data folders of the user who runs it
        assert refused_args(args, simulate=True) is None
    assert job_data_options("--method fedoap --seed 0") == []


def _job_with_executor_args(tmp_path: Path, args: dict) -> Path:
    app = tmp_path / "job" / "app"
    shutil.copytree(ROOT / "jobs" / "fedoap" / "app", app)
    config_file = app / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    config["executors"][0]["executor"]["args"].update(args)
    config_file.write_text(json.dumps(config))
    return app


def test_app_validator_admits_the_shipped_jobs():
    for job in sorted((ROOT / "jobs").iterdir()):
        if (job / "app").is_dir():
            assert FedOAPAppValidator().validate(str(job / "app")) == ("", {}), job.name


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_app_validator_refuses_each_attack_at_deployment(tmp_path, name):
    app = _job_with_executor_args(tmp_path, ATTACKS[name])
    error, _ = FedOAPAppValidator().validate(str(app))
    assert error.startswith("fedoap site policy:"), error


def test_app_validator_refuses_a_client_config_it_cannot_read(tmp_path):
    app = _job_with_executor_args(tmp_path, {})
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
