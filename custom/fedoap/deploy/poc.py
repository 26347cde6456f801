"""Install the site-local files of a federation into a prepared NVFlare POC workspace.

``nvflare poc prepare -i poc_workspace/project.yml`` writes one startup kit per participant, with NVFlare's defaults in
each ``local/`` folder; NVFlare has no command that puts a site's own policies there. :func:`configure_poc` does, for
every participant of the workspace's project:

* each client site gets what :func:`configure_site` installs into one site's kit (also the command for a provisioned
  site, ``fedoap site-configure``): ``local/privacy.json`` (its privacy scopes, each with the mandatory DP filter and
  a budget), ``local/resources.json`` (NVFlare's client resources with fedoap's exact classes on the class allow-list,
  so jobs that run the installed package need no bring-your-own-code right, and fedoap's app validator, which refuses
  jobs that try to run anything else), ``local/authorization.json`` (nobody may bring code), ``local/fedoap_site.json``
  (its data folder, ``<data>/<site name>``, and the unseen organ's) and an AES-GCM key for what the site writes at
  rest (``local/fedoap_at_rest.key``, 0600);
* the server keeps its own resources (POC points their storage into the workspace) with the same class allow-list;
* the HE keys: the project files have no ``HEBuilder`` (the coordinator who provisions holds no HE key), so
  :func:`run_poc_key_ceremony` runs the sites' key ceremony (:mod:`fedoap.privacy.he_keys`) on their behalf, as they
  all live on this machine: the first client site makes the key, the others join from the sealed bundle, the server
  gets the public context. Every run makes a new key for every participant;
* secure aggregation's identities: :func:`run_poc_secagg_keys` makes each client site's identity key in its own
  ``local/`` and gives every participant the roster of their public keys (``fedoap secagg-keys``).

Sites read these files when they start: configure before ``nvflare poc start`` (or restart the POC).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import yaml

from fedoap.site.site_config import write_site_config

__all__ = ["POLICY_DIR", "SITE_POLICY_FILES", "configure_poc", "configure_site", "find_prod_dir",
           "run_poc_key_ceremony", "run_poc_secagg_keys"]

#: the project's site policies: privacy.json, resources.json and authorization.json
POLICY_DIR = Path(__file__).resolve().parents[3] / "poc_workspace" / "local"
_ALLOW_LIST_KEYS = ("class_allow_list", "class_list_enforcement_mode")
#: the policy files a client site copies into its ``local/`` folder
SITE_POLICY_FILES = ("privacy.json", "resources.json", "authorization.json")


def configure_site(kit: str | os.PathLike, data_dir: str | os.PathLike, unseen_dir: Optional[str | os.PathLike] = None,
                   policy_dir: str | os.PathLike = POLICY_DIR) -> dict[str, str]:
    """Install a client site's own files into its startup kit's ``local/`` folder: the policies
    (:data:`SITE_POLICY_FILES`), its data location and, unless it has one, its at-rest key.

    Returns:
        file kind -> path written.

    Raises:
        FileNotFoundError: ``kit`` is not a client site's kit (no ``startup/fed_client.json``) or a policy is missing.
        fedoap.site.site_config.SiteConfigError: a data folder does not exist.
    """
    from fedoap.privacy.at_rest import create_key, site_key_path

    kit, policy_dir = Path(kit), Path(policy_dir)
    if not (kit / "startup" / "fed_client.json").is_file():
        raise FileNotFoundError(f"{kit} is not a client site's startup kit (no startup/fed_client.json)")
    sources = [policy_dir / name for name in SITE_POLICY_FILES]
    for path in sources:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    written = {}
    for path in sources:
        shutil.copyfile(path, kit / "local" / path.name)
        written[path.stem] = str(kit / "local" / path.name)
    written["site_config"] = str(write_site_config(kit, data_dir, unseen_dir))
    key = site_key_path(kit)
    if not key.exists():
        create_key(key)
    written["at_rest_key"] = str(key)
    return written


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


def run_poc_key_ceremony(prod: str | os.PathLike, clients: Sequence[str], server: str) -> dict[str, Path]:
    """The sites' HE key ceremony for a POC, where every participant's kit is on this machine.

    ``clients[0]`` runs ``init``, every other client ``join``s from the bundle, and the server installs the public
    context. The passphrase is random and never written anywhere; the bundle and the public context exist only in a
    temporary folder removed afterwards. Existing keys are replaced (a new key for everyone).

    Returns:
        participant name -> the context file written into its ``local/``.

    Raises:
        ValueError: no client site, or a name that is not that participant's kit.
    """
    from fedoap.privacy.he_keys import init_site, install_public, join_site

    if not clients:
        raise ValueError("the POC project has no client site to make the HE key")
    prod = Path(prod)
    passphrase = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="fedoap_he_ceremony_") as tmp:
        made = init_site(prod / clients[0], Path(tmp) / "he_key.bundle", Path(tmp) / "server_context.tenseal",
                         passphrase, overwrite=True)
        written = {clients[0]: made.secret_context}
        for name in clients[1:]:
            written[name], _ = join_site(prod / name, made.bundle, passphrase, overwrite=True)
        written[server] = install_public(prod / server, made.public_context, overwrite=True)
    return written


def configure_poc(workspace: str | os.PathLike, data: str | os.PathLike, unseen: Optional[str] = None,
                  policy_dir: str | os.PathLike = POLICY_DIR) -> dict[str, dict[str, str]]:
    """Install privacy policies, class allow-lists, data locations and HE contexts into every participant's ``local/``.

    Args:
        workspace: the POC workspace (``$NVFLARE_POC_WORKSPACE``).
        data: folder with one MSD-layout sub-folder per client site name.
        unseen: name of the sub-folder of ``data`` with the unseen organ (None: none).
        policy_dir: folder with the client sites' :data:`SITE_POLICY_FILES`.

    Returns:
        participant name -> {file kind: path written}.

    Raises:
        FileNotFoundError: no prepared POC, or a policy file is missing.
        fedoap.site.site_config.SiteConfigError: a site's data folder does not exist.
        ValueError: the project provisions HE keys with NVFlare's HEBuilder, has no client site, or not exactly one
            server.
    """
    prod, project = find_prod_dir(workspace)
    he_builders = [b["path"] for b in project.get("builders", []) if b.get("path", "").endswith(".HEBuilder")]
    if he_builders:
        raise ValueError(f"{Path(workspace) / 'project.yml'} provisions HE keys with {he_builders[0]}, which gives "
                         "the provisioner the secret key of every site: remove it from the project file (and do not "
                         "pass --he to 'nvflare poc prepare'); poc-configure runs the sites' own key ceremony")
    servers = [p["name"] for p in project["participants"] if p["type"] == "server"]
    if len(servers) != 1:
        raise ValueError(f"{Path(workspace) / 'project.yml'} must have exactly one server participant, has {servers}")
    resources = Path(policy_dir) / "resources.json"
    if not resources.is_file():
        raise FileNotFoundError(f"{resources} not found")
    allow = json.loads(resources.read_text())
    data = Path(data).resolve()
    unseen_dir = data / unseen if unseen else None
    written: dict[str, dict[str, str]] = {}
    for participant in project["participants"]:
        name, kind = participant["name"], participant["type"]
        local = prod / name / "local"
        if kind == "client":
            written[name] = configure_site(prod / name, data / name, unseen_dir, policy_dir)
        elif kind == "server":
            written[name] = {"resources": str(_merge_allow_list(local, allow))}
    clients = [p["name"] for p in project["participants"] if p["type"] == "client"]
    for name, path in run_poc_key_ceremony(prod, clients, servers[0]).items():
        written[name]["he_context"] = str(path)
    for name, paths in run_poc_secagg_keys(prod, clients, servers[0]).items():
        written[name].update(paths)
    return written


def run_poc_secagg_keys(prod: str | os.PathLike, clients: Sequence[str], server: str) -> dict[str, dict[str, str]]:
    """Secure aggregation's identities for a POC, where every participant's kit is on this machine: each client site
    makes its own identity key (``fedoap secagg-keys init``) and every participant, the server included, gets the
    roster of their public keys (``fedoap secagg-keys roster``). Existing identities are replaced.

    Returns:
        participant name -> {file kind: path written}.
    """
    from fedoap.privacy.secagg_keys import init_identity, parse_entries, write_roster

    prod = Path(prod)
    written: dict[str, dict[str, str]] = {}
    lines = []
    for name in clients:
        path, line = init_identity(prod / name, name, overwrite=True)
        written[name] = {"secagg_identity": str(path)}
        lines.append(line)
    entries = parse_entries(lines)
    for name in [*clients, server]:
        written.setdefault(name, {})["secagg_roster"] = str(write_roster(prod / name, entries))
    return written
