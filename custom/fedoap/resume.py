"""Where a resumed job finds what its interrupted predecessor left behind, on the server and on every site.

A job resumes from an earlier run of the same configuration (``RunConfig.robustness.resume_from``): in a deployment
that is the earlier job's id, and each participant looks in its own workspace, ``<workspace root>/<job id>/`` (the
server for its workflow state, a site for its local state); in a simulation, whose workspace NVFlare replaces at every
start, ``fedoap simulate --resume`` first moves each participant's run folder aside into one absolute folder with one
sub-folder per participant. The server's state and a site's state are each written atomically after every round, so
whatever moment the process died at, the last completed round is there whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = ["check_resume_from", "previous_run_dir", "SERVER_STATE_FILE", "SITE_STATE_PREFIX"]

#: the server's workflow state after its last completed round, in its run folder (safetensors, no pickle)
SERVER_STATE_FILE = "fedoap_server_state.safetensors"
#: a site's local state after a round ``r``: ``<run folder>/fedoap/<SITE_STATE_PREFIX><r>.bin`` (encrypted at rest)
SITE_STATE_PREFIX = "site_state_round_"

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_resume_from(value: str) -> str:
    """``value`` if it names a previous run: empty (no resume), an absolute folder (simulation) or a job id.

    Raises:
        ValueError: a relative path, or a job id with characters other than letters, digits, ``_``, ``.``, ``-``.
    """
    if not value or os.path.isabs(value):
        return value
    if not _JOB_ID.match(value) or value in (".", ".."):
        raise ValueError(f"resume_from must be an earlier job's id or an absolute folder, got {value!r}")
    return value


def previous_run_dir(resume_from: str, participant: str, workspace_root: str | os.PathLike) -> Optional[Path]:
    """The run folder an interrupted run of ``participant`` left: ``<resume_from>/<participant>`` for an absolute
    ``resume_from`` (simulation), else ``<workspace_root>/<resume_from>`` (an earlier job's id); None without
    resume."""
    if not resume_from:
        return None
    check_resume_from(resume_from)
    if os.path.isabs(resume_from):
        return Path(resume_from) / participant
    return Path(workspace_root) / resume_from
