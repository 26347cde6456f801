"""The committed NVFlare jobs (jobs/) are exactly what `fedoap export-jobs` generates, carry no code and no data path,
carry their options as one run configuration file, and use only classes the shipped site allow-list admits."""

import filecmp
import json
import os
from pathlib import Path

import pytest

from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

from fedoap.config import RUN_CONFIG_FILE, RunConfig
from fedoap.site.executor import CLIENT_SCRIPT, resolve_client_script
from fedoap.deploy.jobs import JOB_TRAINING, JOBS, export_jobs

ROOT = Path(__file__).resolve().parents[1]
JOBS_DIR = ROOT / "jobs"
ALLOW_LIST = json.loads((ROOT / "poc_workspace" / "local" / "resources.json").read_text())["class_allow_list"]
REGENERATE = ("jobs/ differs from what the recipes generate; regenerate it with `fedoap export-jobs` "
              "(from the repository root)")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs")
    export_jobs(out)
    return out


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_committed_jobs_equal_the_generated_ones_byte_for_byte(generated):
    committed = [n for n in _tree(JOBS_DIR) if n != "README.md"]
    assert committed == _tree(generated), REGENERATE
    _, mismatch, errors = filecmp.cmpfiles(JOBS_DIR, generated, committed, shallow=False)
    assert not mismatch and not errors, f"{REGENERATE}: {mismatch or errors}"


def _components(node):
    """Every {"path": ...} component in a config, nested ones (the persistor's model) included."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_carries_no_code_no_data_path_and_only_allowed_classes(name):
    job = JOBS_DIR / name
    assert not (job / "app" / "custom").exists()  # not bring-your-own-code: the sites' installed package runs
    text = "".join(p.read_text() for p in job.rglob("*.json"))
    home = os.path.expanduser("~")
    assert str(ROOT) not in text and (len(home) <= 1 or home not in text)
    for config in ("config_fed_server.json", "config_fed_client.json"):
        for path in _components(json.loads((job / "app" / "config" / config).read_text())):
            assert any(ComponentPathAuthorizer._path_matches_prefix(path, p) for p in ALLOW_LIST), \
                f"{name}/{config}: {path} is not on poc_workspace/local/resources.json's class_allow_list"

    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    (executor,) = client["executors"]
    assert executor["executor"]["path"] == "fedoap.site.executor.FedOAPExecutor"
    exec_args = executor["executor"]["args"]
    assert exec_args == {}  # no script path, script arguments, command or mode: the executor fixes them
    parsed = RunConfig.load(job / "app" / "config" / RUN_CONFIG_FILE)  # the job's options, one file
    assert parsed.data.set_fields() == []  # each site's own configuration says where its data is
    assert parsed == RunConfig(training=JOB_TRAINING).override(**JOBS[name].options)
    assert parsed.method.name == JOBS[name].options["method"] and parsed.privacy.he == JOBS[name].options.get("he",
                                                                                                            False)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["name"] == name and "scope" not in meta  # the site's default scope applies
    assert next(iter(meta)) == "name"  # a scalar first: `nvflare job submit` mangles a file that starts with an object


def test_script_of_the_installed_package_is_found_on_the_site(tmp_path):
    import fedoap.site.client

    assert resolve_client_script() == fedoap.site.client.__file__
    assert resolve_client_script(str(tmp_path)) == fedoap.site.client.__file__  # no copy in the job: the installed one
    (tmp_path / "fedoap" / "site").mkdir(parents=True)
    (tmp_path / "fedoap" / "site" / "client.py").write_text("")
    # a bring-your-own-code job's copy stays relative: NVFlare runs the one under the job's custom folder
    assert resolve_client_script(str(tmp_path)) == CLIENT_SCRIPT


def test_byoc_export_carries_the_whole_package(tmp_path):
    (job,) = export_jobs(tmp_path, ["fedoap"], byoc=True)
    package = job / "app" / "custom" / "fedoap"
    assert (package / "__init__.py").is_file() and (package / "site" / "client.py").is_file()
    assert (package / "methods" / "__init__.py").is_file() and not list(package.rglob("__pycache__"))
    for config in ("config_fed_client.json", RUN_CONFIG_FILE):
        assert filecmp.cmp(job / "app" / "config" / config, JOBS_DIR / "fedoap" / "app" / "config" / config,
                           shallow=False)
