"""NVFlare Client API script of every method: a task loop over one :class:`fedoap.site.session.SiteSession`.

Its one argument is ``--run-config PATH``, the job's run configuration (``app/config/fedoap_run.json``, which
``fedoap.site.executor.FedOAPExecutor`` checked and passes), read and checked once (``fedoap.config.RunConfig``).
Run in-process (NVFlare's default), the script lives for the whole job, so the session (the site's data, local
parameters, optimizer state and DP accountant) stays in memory across rounds, and is saved after each round for a
job resumed after a crash (the task's round names it); what each task does is the session's.

With tracking on (``training.tracking``, not "none") the script also streams the numbers of the metrics each result
carries through NVFlare's tracking writer, and nothing else (:mod:`fedoap.tracking`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from fedoap.config import RunConfig
from fedoap.protocol import PERSONALIZE_TASK
from fedoap.site.session import SiteSession
from fedoap.tracking import SiteTracker

__all__ = ["build_parser", "main", "SESSION_READY"]

#: logged once the site's session is built (imports, data, model, trainer): where a site's start-up ends and its
#: first task's work begins (``fedoap bench overhead`` splits the first task there)
SESSION_READY = "fedoap site session ready"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--run-config", required=True, help="the job's run configuration (app/config/fedoap_run.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.client.tracking import SummaryWriter

    config = RunConfig.load(build_parser().parse_args(argv).run_config)
    if config.training.threads > 0:
        torch.set_num_threads(config.training.threads)
    flare.init()
    session = SiteSession(config, flare.get_site_name(), os.getcwd(), flare.get_job_id())
    logger.info("%s: %s", SESSION_READY, session.site)
    tracker = SiteTracker(None if config.training.tracking == "none" else SummaryWriter())
    while flare.is_running():
        task = flare.receive()
        tracker.task_received()  # the previous result was released: its metrics may be tracked now
        task_name = flare.get_task_name()
        reply = session.handle(task_name, task.params, task.meta, task.current_round)
        metrics_only = task_name == PERSONALIZE_TASK
        tracker.result(task.current_round, reply.metrics, metrics_only)  # the very metrics the result carries
        params_type = None if metrics_only else ParamsType.FULL
        flare.send(FLModel(params=reply.params, params_type=params_type, metrics=reply.metrics, meta=reply.meta))


if __name__ == "__main__":
    main(sys.argv[1:])
