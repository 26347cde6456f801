"""A deployed site reads its data location from its own configuration file, and says which file and key are wrong."""

import json

import pytest

from fedoap.config import DataOptions
from fedoap.site import session as client_script
from fedoap.site.site_config import (SITE_CONFIG_ENV, SiteConfigError, find_site_config, load_site_config,
                                   write_site_config)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv(SITE_CONFIG_ENV, raising=False)
    (tmp_path / "data" / "brain").mkdir(parents=True)
    (tmp_path / "data" / "lung").mkdir()
    (tmp_path / "ws" / "local").mkdir(parents=True)
    return tmp_path


def _write(site, content) -> None:
    (site / "ws" / "local" / "fedoap_site.json").write_text(json.dumps(content))


def _args(**kw) -> DataOptions:
    return DataOptions(**{k: str(v) for k, v in kw.items()})


def test_a_job_without_a_data_path_reads_the_site_configuration(site):
    _write(site, {"data_dir": str(site / "data" / "brain"), "unseen_dir": "../../data/lung"})  # relative: to the file
    data, unseen = client_script.site_data_dirs(_args(), "brain", str(site / "ws"))
    assert data == (site / "data" / "brain").resolve() and unseen == (site / "data" / "lung").resolve()
    # the simulator passes --data-root and never reads a site file
    data, unseen = client_script.site_data_dirs(_args(data_root=site / "data"), "brain", str(site / "nowhere"))
    assert data == site / "data" / "brain" and unseen is None


def test_a_site_without_configuration_fails_naming_the_file(site):
    expected = site / "ws" / "local" / "fedoap_site.json"
    with pytest.raises(SiteConfigError, match=str(expected)):
        client_script.site_data_dirs(_args(), "brain", str(site / "ws"))


@pytest.mark.parametrize("content, message", [
    ({}, "missing key 'data_dir'"),
    ({"data_dir": "/no/such/folder"}, "'data_dir' is '/no/such/folder'"),
    ({"data_dir": 3}, "'data_dir' must be a non-empty string"),
    ({"data_dir": "../../data/brain", "unseen_dir": "/no/lung"}, "'unseen_dir'"),
    ({"data_dir": "../../data/brain", "data_root": "x"}, r"unknown key\(s\) \['data_root'\]"),
    (["data_dir"], "expected a JSON object"),
])
def test_invalid_configuration_names_the_file_and_the_key(site, content, message):
    _write(site, content)
    path = find_site_config(site / "ws")
    with pytest.raises(SiteConfigError, match=message) as err:
        load_site_config(path)
    assert str(path) in str(err.value)


def test_environment_override_and_writer(site, monkeypatch):
    written = write_site_config(site / "other", site / "data" / "brain")
    assert json.loads(written.read_text()) == {"data_dir": str((site / "data" / "brain").resolve())}
    monkeypatch.setenv(SITE_CONFIG_ENV, str(written))
    assert find_site_config(site / "ws") == written
    monkeypatch.setenv(SITE_CONFIG_ENV, str(site / "missing.json"))
    with pytest.raises(SiteConfigError, match=f"missing.json.*\\${SITE_CONFIG_ENV}"):
        find_site_config(site / "ws")
    with pytest.raises(SiteConfigError, match="is not a folder"):
        write_site_config(site / "other", site / "data" / "liver")

