"""Where a deployed site's data lives: site configuration, never a path baked into a job.

An exported job names no data path. Each site keeps one small JSON file in its own workspace,
``<site workspace>/local/fedoap_site.json``::

    {"data_dir": "/data/brain", "unseen_dir": "/data/lung"}

``data_dir`` is the site's folder in the Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``); ``unseen_dir`` (optional) is an organ the federation never trains on, evaluated by the site's
personalized model. Relative paths are read relative to the file's folder. The site's workspace root is the working
folder of its NVFlare client processes (the parent of its ``startup/`` kit), the same place the HE context is found
(``fedoap.privacy.contexts``). ``$FEDOAP_SITE_CONFIG`` (the path of a JSON file) overrides the file for setups
without a site workspace. The simulator passes ``--data-root`` to the client script instead and never reads this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["SITE_CONFIG_FILE", "SITE_CONFIG_ENV", "SiteConfig", "SiteConfigError", "find_site_config",
           "load_site_config", "write_site_config"]

SITE_CONFIG_FILE = "fedoap_site.json"
SITE_CONFIG_ENV = "FEDOAP_SITE_CONFIG"
_REQUIRED = ("data_dir",)
_OPTIONAL = ("unseen_dir",)


class SiteConfigError(ValueError):
    """The site configuration is missing or invalid; the message names the file (and the key)."""


@dataclass(frozen=True)
class SiteConfig:
    """A site's data folders (absolute)."""

    data_dir: Path
    unseen_dir: Optional[Path] = None
    source: Optional[Path] = None  # the file it was read from


def find_site_config(workspace_root: str | os.PathLike) -> Path:
    """The site's configuration file: ``$FEDOAP_SITE_CONFIG`` if set, else ``<workspace_root>/local/fedoap_site.json``.

    Raises:
        SiteConfigError: the file does not exist; the message says where it looked and how to write it.
    """
    override = os.environ.get(SITE_CONFIG_ENV)
    path = Path(override) if override else Path(workspace_root) / "local" / SITE_CONFIG_FILE
    if not path.is_file():
        origin = f"${SITE_CONFIG_ENV}" if override else "the site workspace"
        raise SiteConfigError(
            f"no site configuration: {path} (from {origin}) does not exist. This job reads its data location from "
            f'site configuration: write {{"data_dir": "/path/to/this/site/msd_folder"}} there '
            f"(fedoap poc-configure does it for a POC), or set {SITE_CONFIG_ENV}=/path/to/{SITE_CONFIG_FILE}"
        )
    return path


def _folder(path: Path, key: str, value: object) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise SiteConfigError(f"{path}: {key!r} must be a non-empty string (a folder), got {value!r}")
    folder = Path(value).expanduser()
    if not folder.is_absolute():
        folder = path.parent / folder
    if not folder.is_dir():
        raise SiteConfigError(f"{path}: {key!r} is {value!r}, but {folder} is not a folder")
    return folder.resolve()


def load_site_config(path: str | os.PathLike) -> SiteConfig:
    """Read and validate a site configuration file.

    Raises:
        SiteConfigError: unreadable or not a JSON object, a missing or unknown key, or a folder that does not exist
            (the message names the file and the key).
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SiteConfigError(f"{path}: cannot read the site configuration ({err})") from err
    if not isinstance(content, dict):
        raise SiteConfigError(f"{path}: expected a JSON object like {{\"data_dir\": ...}}, "
                              f"got {type(content).__name__}")
    missing = [k for k in _REQUIRED if k not in content]
    if missing:
        raise SiteConfigError(f"{path}: missing key {missing[0]!r} (the site's MSD-layout data folder)")
    unknown = sorted(set(content) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_REQUIRED + _OPTIONAL)}")
    unseen = content.get("unseen_dir")
    return SiteConfig(
        data_dir=_folder(path, "data_dir", content["data_dir"]),
        unseen_dir=_folder(path, "unseen_dir", unseen) if unseen not in (None, "") else None,
        source=path.resolve(),
    )


def write_site_config(workspace_root: str | os.PathLike, data_dir: str | os.PathLike,
                      unseen_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<workspace_root>/local/fedoap_site.json`` (absolute paths) and return its path; validates it back.

    Raises:
        SiteConfigError: a folder does not exist.
    """
    path = Path(workspace_root) / "local" / SITE_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"data_dir": str(Path(data_dir).resolve())}
    if unseen_dir is not None:
        content["unseen_dir"] = str(Path(unseen_dir).resolve())
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    load_site_config(path)
    return path
