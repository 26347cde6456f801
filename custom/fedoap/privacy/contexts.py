"""Where a site finds its TenSEAL context: site configuration, never a job argument, never the provisioner's kit.

A deployed client site reads ``<workspace root>/local/client_context.tenseal`` (secret key, mode 0600) and the server
``<workspace root>/local/server_context.tenseal`` (no secret key); NVFlare runs both with their workspace root as
working folder. The sites' own key ceremony writes these files (:mod:`fedoap.privacy.he_keys`: ``fedoap he-keys init``
on one site, ``join`` on the others, ``install-public`` on the server; ``fedoap poc-configure`` runs it in POC).

``startup/`` is never read. What lies there came from whoever provisioned the kits: NVFlare's ``HEBuilder`` makes one
secret key on the provisioning machine and copies it into every client's kit, so the coordinator could decrypt every
update. In a simulated federation there are no kits: ``fedoap he-keys simulation DIR`` writes both files and
``FEDOAP_HE_CONTEXT_DIR`` points every process at that folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

__all__ = ["HE_CONTEXT_DIR_ENV", "context_file_name", "local_context_path", "find_context_file"]

HE_CONTEXT_DIR_ENV = "FEDOAP_HE_CONTEXT_DIR"
_LOCAL = "local"
_HOW_TO_MAKE = {
    "client": "run the sites' key ceremony: 'fedoap he-keys init SITE_KIT --bundle B --public P --passphrase-file F' "
              "on one site, 'fedoap he-keys join SITE_KIT --bundle B --passphrase-file F' on every other "
              "('fedoap poc-configure' does both in a POC)",
    "server": "the server admin installs the public context from the site that ran 'fedoap he-keys init': "
              "'fedoap he-keys install-public SERVER_KIT --public P' ('fedoap poc-configure' does it in a POC)",
}


def context_file_name(role: Literal["server", "client"]) -> str:
    """The file name of that role's context (NVFlare's names, so a reader knows what each holds)."""
    from fedoap.privacy.he import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE

    names = {"server": SERVER_CONTEXT_FILE, "client": CLIENT_CONTEXT_FILE}
    if role not in names:
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")
    return names[role]


def local_context_path(role: Literal["server", "client"], workspace_root: str | os.PathLike) -> Path:
    """``<workspace_root>/local/<role>_context.tenseal``: where the key ceremony puts a deployed site's context."""
    return Path(workspace_root) / _LOCAL / context_file_name(role)


def _check_owner_only(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"{path} holds the HE secret key but other users may read it (mode {mode:04o}): "
                         f"run 'chmod 600 {path}'")


def find_context_file(role: Literal["server", "client"], workspace_root: str | os.PathLike) -> Path:
    """The context file of a site: ``<workspace_root>/local/<role>_context.tenseal`` (deployed), then
    ``$FEDOAP_HE_CONTEXT_DIR/<role>_context.tenseal`` (simulation). Never ``startup/``.

    Raises:
        FileNotFoundError: neither exists; the message lists where it looked and which command writes the file.
        ValueError: a client context (secret key) that other users may read.
    """
    name = context_file_name(role)
    candidates = [local_context_path(role, workspace_root)]
    if os.environ.get(HE_CONTEXT_DIR_ENV):
        candidates.append(Path(os.environ[HE_CONTEXT_DIR_ENV]) / name)
    for path in candidates:
        if path.is_file():
            if role == "client":
                _check_owner_only(path)
            return path
    looked = ", ".join(str(p) for p in candidates)
    stale = Path(workspace_root) / "startup" / name
    ignored = (f"; {stale} is ignored: it was made by whoever provisioned the kit (NVFlare's HEBuilder), who holds "
               "the same key" if stale.is_file() else "")
    raise FileNotFoundError(
        f"homomorphic encryption is on but no {name} was found (looked in: {looked}); {_HOW_TO_MAKE[role]}; for a "
        f"simulated federation run 'fedoap he-keys simulation DIR' and set {HE_CONTEXT_DIR_ENV}=DIR{ignored}"
    )
