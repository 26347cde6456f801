"""Live training curves through NVFlare's experiment tracking, with nothing tracked that the site does not already send.

Each site streams its numeric metrics per round through NVFlare's Client API tracking writer
(``nvflare.client.tracking.SummaryWriter``): the job's ``ConvertToFedEvent`` turns them into federated events, and the
server's receiver (:func:`add_tracking`: TensorBoard's ``TBAnalyticsReceiver`` or ``MLflowReceiver``) writes them per
site: TensorBoard event files in ``<server run folder>/tb_events/<site>/`` (in the simulator
``<out>/workspace/<method>/server/simulate_job/tb_events/<site>/``).

Privacy. Analytics events travel as federated events, beside the task result and not through the site's task-result
filters (its privacy policy). So what a site tracks is taken only from the metrics of a result it sends
(``Reply.metrics``, already reduced to what its privacy settings publish, ``fedoap.site.privacy.public_metrics``): their
finite numbers (:func:`tracked_scalars`), under the same names, at the task's round, i.e. a subset of what the server
records for that site and round in its history. And a training round's metrics are tracked only once the site has its
next task (:class:`SiteTracker`): NVFlare hands a site no further task after one of its result filters refused a result
(the site's DP policy refuses an update without the DP it requires, or past its privacy budget, with
``UnsafeJobError``, which ends the job on that site), so metrics of a result the site's policy kept back never leave.
The final personalization result carries metrics only, which the site's DP policy always releases; it is tracked when
sent (there is no next task), under ``personalized/<name>`` at step ``rounds``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Protocol

__all__ = ["PERSONALIZED_PREFIX", "TB_FOLDER", "SiteTracker", "add_tracking", "tracked_scalars"]

#: the tag prefix of the personalization's metrics (the fine-tuned model's), apart from the rounds' curves
PERSONALIZED_PREFIX = "personalized/"
#: the folder of the server's TensorBoard event files, under its run folder (``TBAnalyticsReceiver``'s default)
TB_FOLDER = "tb_events"


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar: float, global_step: Optional[int] = None, **kwargs: Any) -> None: ...


def tracked_scalars(metrics: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """What may be tracked of a result's metrics: its finite numbers by name (no text, flag, None, NaN or infinity,
    which have no point on a curve), nothing else."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class SiteTracker:
    """A site's tracking of the results it sends (see the module docstring): a training result's metrics when the
    next task shows it was released (:meth:`task_received`), a metrics-only result's (the personalization) at once.

    Args:
        writer: the Client API's tracking writer (``nvflare.client.tracking.SummaryWriter``); None: tracking off.
    """

    def __init__(self, writer: Optional[ScalarWriter] = None) -> None:
        self.writer = writer
        self._held: Optional[tuple[int, dict[str, float]]] = None

    def task_received(self) -> None:
        """The site has its next task: NVFlare released its previous result (it gives no task after a refusal)."""
        held, self._held = self._held, None
        if held is not None:
            self._write(*held)

    def result(self, step: Optional[int], metrics: Optional[Mapping[str, Any]], metrics_only: bool) -> None:
        """A result the site sends: its metrics at ``step`` (the task's round; None: not tracked). A training result
        (``metrics_only`` False) waits for :meth:`task_received`; a metrics-only one is written now, under
        :data:`PERSONALIZED_PREFIX`."""
        if self.writer is None or step is None:
            return
        scalars = tracked_scalars(metrics)
        if not scalars:
            return
        if metrics_only:
            self._write(int(step), {PERSONALIZED_PREFIX + k: v for k, v in scalars.items()})
        else:
            self._held = (int(step), scalars)

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)


def add_tracking(recipe: Any, tracking: str) -> None:
    """Add the server's receiver of ``tracking`` ("tensorboard", "mlflow"; "none": nothing) to a recipe, through
    NVFlare's ``add_experiment_tracking`` with its defaults (the sites need nothing more: the job's client app already
    converts their analytics events to federated ones): TensorBoard event files in :data:`TB_FOLDER` of the server's
    run folder; MLflow's experiment ``<job name>-experiment`` in a SQLite store (``mlflow.db``) in the server's job
    result folder.

    Raises:
        ValueError: the backend's package is not installed here (``TrainingOptions.require_tracking``'s message).
    """
    if tracking == "none":
        return
    from nvflare.recipe.utils import add_experiment_tracking

    from fedoap.config import TrainingOptions

    TrainingOptions(tracking=tracking).require_tracking()  # our one line, before NVFlare's import of the receiver
    add_experiment_tracking(recipe, tracking)
