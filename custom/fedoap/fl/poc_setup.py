"""Install the site-local files of a federation into a prepared NVFlare POC workspace.

``nvflare poc prepare -i poc_workspace/project.yml`` writes one startup kit per participant, with NVFlare's defaults in
each ``local/`` folder; NVFlare has no command that puts a site's own policies there. :func:`configure_poc` does, for
every participant of the workspace's project:

* each client site gets ``local/privacy.json`` (its privacy scopes, each with the mandatory DP filter),
  ``local/resources.json`` (NVFlare's client resources with ``fedoap.`` on the class allow-list, so jobs that run the
  installed package need no bring-your-own-code right) and ``local/fedoap_site.json`` (its data folder,
  ``<data>/<site name>``, and the unseen organ's);
* the server keeps its own resources (POC points their storage into the workspace) with the same class allow-list.

Sites read these files when they start: configure before ``nvflare poc start`` (or restart the POC).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from fedoap.fl.site_config import write_site_config

__all__ = ["POLICY_DIR", "configure_poc", "find_prod_dir"]

#: the project's site policies: privacy.json and resources.json
POLICY_DIR = Path(__file__).resolve().parents[3] / "poc_workspace" / "local"
_ALLOW_LIST_KEYS = ("class_allow_list", "class_list_enforcement_mode")


def find_prod_dir(workspace: str | os.PathLike) -> tuple[Path, dict]:
    """The newest ``<workspace>/<project>/prod_NN`` folder of a prepared POC and the project it was made from.

    Raises:
        FileNotFoundError: no prepared POC there.
    """
    workspace = Path(workspace)
    project_file = workspace / "project.yml"
    if not project_file.is_file():
        raise FileNotFoundError(f"{project_file} not found: run 'nvflare poc prepare -i poc_workspace/project.yml' "
                                f"with NVFLARE_POC_WORKSPACE={workspace} first")
    project = yaml.safe_load(project_file.read_text())
    prods = sorted((workspace / project["name"]).glob("prod_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not prods:
        raise FileNotFoundError(f"no {workspace / project['name']}/prod_NN folder: the POC was not provisioned")
    return prods[-1], project


def _merge_allow_list(local: Path, allow: dict) -> Path:
    """Write ``local/resources.json``: the participant's current resources with our class allow-list."""
    current = local / "resources.json"
    source = current if current.is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    resources.update({k: allow[k] for k in _ALLOW_LIST_KEYS if k in allow})
    current.write_text(json.dumps(resources, indent=2) + "\n")
    return current


def configure_poc(workspace: str | os.PathLike, data: str | os.PathLike, unseen: Optional[str] = None,
                  policy_dir: str | os.PathLike = POLICY_DIR) -> dict[str, dict[str, str]]:
    """Install privacy policies, class allow-lists and data locations into every participant's ``local/``.

    Args:
        workspace: the POC workspace (``$NVFLARE_POC_WORKSPACE``).
        data: folder with one MSD-layout sub-folder per client site name.
        unseen: name of the sub-folder of ``data`` with the unseen organ (None: none).
        policy_dir: folder with ``privacy.json`` and ``resources.json`` for the client sites.

    Returns:
        participant name -> {file kind: path written}.

    Raises:
        FileNotFoundError: no prepared POC, or a policy file is missing.
        fedoap.fl.site_config.SiteConfigError: a site's data folder does not exist.
    """
    prod, project = find_prod_dir(workspace)
    policy_dir = Path(policy_dir)
    privacy, resources = policy_dir / "privacy.json", policy_dir / "resources.json"
    for path in (privacy, resources):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    allow = json.loads(resources.read_text())
    data = Path(data).resolve()
    unseen_dir = data / unseen if unseen else None
    written: dict[str, dict[str, str]] = {}
    for participant in project["participants"]:
        name, kind = participant["name"], participant["type"]
        local = prod / name / "local"
        if kind == "client":
            shutil.copyfile(privacy, local / "privacy.json")
            shutil.copyfile(resources, local / "resources.json")
            site = write_site_config(prod / name, data / name, unseen_dir)
            written[name] = {"privacy": str(local / "privacy.json"), "resources": str(local / "resources.json"),
                             "site_config": str(site)}
        elif kind == "server":
            written[name] = {"resources": str(_merge_allow_list(local, allow))}
    return written
