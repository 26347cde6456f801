"""The server workflow of personalized FL: broadcast and aggregate only the shared parameters, then ask every site to
personalize and report.

Each round the controller sends the global shared parameters, receives each site's shared parameters with its
aggregation weight, drops (and logs) any key outside the shared set, rejects (and logs) an update with a missing key,
a wrong shape or a non-finite value, combines the rest by the method's server rule (FedAvg's weighted mean, McMahan
et al., AISTATS 2017, restricted to the shared set as in FedOAP, arXiv 2511.18847, unless the method names another)
and saves the aggregate. After the last
round it sends the task ``personalize``: sites fine-tune locally and return their evaluation metrics (no
parameters). The round history and the final metrics are written to ``fedoap_history.json`` in the server's run
folder after every round, so an interrupted run still leaves its history behind.

The aggregation weight of a site is what it reports under the meta key ``aggregation_weight`` (its sample count, or
its step count for a method that weighs by steps, FedGS), or else its sample count ``n_samples``.

How the shared parameters are combined is not the workflow's business: the method names a rule class
(``fedoap.server.rules``: weighted mean, FedNova, FedAWA, FedLWS, or the null rule of a method that shares nothing),
:func:`fedoap.server.rules.rule_for_job` builds the one rule object that serves the job (under HE the encrypted sum,
for a linear rule only), and every round goes through the same protocol: ``reset`` with the broadcast, ``add`` per
site, ``result`` when something was accepted, ``summary`` into the history. With the null rule the rounds still pace
the sites' training and collect their metrics, but the server broadcasts an empty parameter set and saves no
checkpoint.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from typing import Any, Mapping, Optional

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from fedoap.jsonio import write_json
from fedoap.methods import get_method
from fedoap.protocol import (AGGREGATION_WEIGHT_KEY, HISTORY_FILE, NUM_SAMPLES_KEY, NUM_STEPS_KEY, PERSONALIZE_TASK,
                             SITE_STATISTICS_KEY, TRAIN_TASK)
from fedoap.server.rules import ServerRule, UpdateRejected, check_rule, rule_for_job

__all__ = ["SharedParamsFedAvg", "ENCRYPTED_CHECKPOINT", "encrypted_checkpoint_bytes", "load_encrypted_checkpoint",
           "payload_bytes"]

#: the server's checkpoint under HE (ciphertext only), in its app folder: safetensors, no pickle
ENCRYPTED_CHECKPOINT = "FL_global_model_encrypted.safetensors"
#: recorded in the encrypted checkpoint's safetensors metadata, with the round
ENCRYPTED_CHECKPOINT_FORMAT = "fedoap-he-checkpoint/1"


def payload_bytes(params: Mapping[str, Any]) -> int:
    """Bytes of the parameter arrays of one update (what a client uploaded)."""
    return int(sum(np.asarray(v).nbytes for v in params.values()))


def _count_numbers(value: Any) -> int:
    """How many numbers a (nested) JSON-like value holds."""
    if isinstance(value, dict):
        return sum(_count_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_numbers(v) for v in value)
    return int(isinstance(value, (int, float)) and not isinstance(value, bool))


def encrypted_checkpoint_bytes(aggregate: dict[str, Any], rnd: int) -> bytes:
    """The HE aggregate (the uint8/float64 transport arrays of ``fedoap.privacy.he.to_params``) as safetensors, with
    the format and the round in its metadata: loading it never unpickles anything."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
              for k, v in aggregate.items()}
    return save(arrays, metadata={"format": ENCRYPTED_CHECKPOINT_FORMAT, "round": str(int(rnd))})


def load_encrypted_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read :data:`ENCRYPTED_CHECKPOINT`: ``{"round": int, "encrypted_shared": {key: numpy array}}``, the arrays as
    ``fedoap.privacy.he.from_params`` takes them.

    Raises:
        ValueError: the file is not a safetensors file of this format (names the file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a safetensors checkpoint: {err}") from None
    if meta.get("format") != ENCRYPTED_CHECKPOINT_FORMAT or not str(meta.get("round", "")).isdigit():
        raise ValueError(f"{path} is not an encrypted checkpoint of format {ENCRYPTED_CHECKPOINT_FORMAT!r} "
                         f"(metadata {meta})")
    return {"round": int(meta["round"]), "encrypted_shared": arrays}


class SharedParamsFedAvg(ModelController):
    """Rounds of broadcast, local training and aggregation over an explicit list of shared parameters, then
    personalization; how the updates combine is the method's server rule (``fedoap.server.rules``).

    Args:
        num_rounds: federated rounds before personalization.
        min_clients: sites that must answer each round.
        shared_keys: state-dict keys that are broadcast and aggregated (a list of names, stored unchanged so that the
            job exports faithfully); every other key stays on the sites. Empty exactly for a method that shares
            nothing (its rule is the null rule: the server broadcasts ``{}`` and saves no checkpoint).
        method: name of the federated method (``fedoap.methods``; recorded in the history); method_args: its
            constructor arguments. The method names the server rule and its arguments.
        personalize: after the last round, send ``personalize`` and collect each site's final metrics.
        he: sites send CKKS ciphertexts of their weighted shared parameters (by samples, or steps for FedGS; a linear
            rule only); the server only adds them with its TenSEAL context (no secret key, found in its ``local/``
            folder, from the sites' key ceremony, or ``$FEDOAP_HE_CONTEXT_DIR``), broadcasts the encrypted sum and
            saves only ciphertext for the shared part (``ENCRYPTED_CHECKPOINT``).
        persistor_id: id of the persistor component that holds the global checkpoint.
        task_timeout: seconds to wait for a round (0: no limit).

    Raises:
        ValueError: an unknown method or invalid method arguments, a shared set that does not fit the method's rule
            (see :func:`fedoap.server.rules.check_rule`), HE with a rule that is not linear or shares nothing, or a
            non-positive number of rounds or clients.
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        min_clients: int,
        shared_keys: list[str],
        method: str,
        method_args: Optional[dict[str, Any]] = None,
        personalize: bool = True,
        he: bool = False,
        persistor_id: str = "persistor",
        task_timeout: int = 0,
    ) -> None:
        super().__init__(persistor_id=persistor_id)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        fl_method = get_method(method, **(method_args or {}))
        self._rule: type[ServerRule] = fl_method.server_rule
        self._rule_args = fl_method.server_rule_args()
        check_rule(self._rule, self._rule_args, shared_keys, he)
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.shared_keys = shared_keys
        self.method = method
        self.method_args = method_args
        self.personalize = personalize
        self.he = he
        self.persistor_id = persistor_id
        self.task_timeout = task_timeout
        self._history: dict[str, Any] = {}
        self._site_statistics: dict[str, Any] = {}

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _write_history(self) -> None:
        write_json(os.path.join(self.get_run_dir(), HISTORY_FILE), self._history)

    @staticmethod
    def _progress(line: str) -> None:
        print(f"[fedoap] {line}", flush=True)

    def _warn(self, line: str) -> None:
        """A rule was applied to a client's update: log it and show it in the progress output."""
        self.warning(line)
        self._progress(f"WARNING {line}")

    # -- workflow ----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        model = self.load_model()
        if model is None or not model.params:
            self.panic("the persistor returned no initial model")
            return
        missing = [k for k in self.shared_keys if k not in model.params]
        if missing:
            self.panic(f"{len(missing)} shared key(s) are not in the global model, e.g. {missing[0]!r}")
            return
        initial_shared = {k: model.params[k] for k in self.shared_keys}
        try:
            rule = self._job_rule(initial_shared)
        except (FileNotFoundError, ValueError) as err:
            self.panic(str(err))
            return
        self._history = {"method": self.method, "server_rule": self._rule.name, "he": self.he, "rounds": [],
                         "personalized": {}, "n_shared_keys": len(self.shared_keys)}
        start = time.time()
        # Round 0 broadcasts the public initialization in clear; with HE every later broadcast is the encrypted sum.
        broadcast = initial_shared
        for rnd in range(self.num_rounds):
            clients = self.sample_clients(self.min_clients)
            round_start = time.time()
            task = FLModel(params=broadcast, params_type=ParamsType.FULL, current_round=rnd, total_rounds=self.num_rounds,
                           meta=self._task_meta())
            results = self.send_model_and_wait(task_name=TRAIN_TASK, data=task, targets=clients, timeout=self.task_timeout)
            rule.reset(broadcast)
            record = self._aggregate_round(rnd, rule, results)
            if rule.count:
                broadcast = rule.result()
                summary = rule.summary()  # what a learned rule decided (FedAWA's weights, FedLWS's factors)
                if summary:
                    record["aggregation"] = summary
                self._save(model, broadcast, rnd, ciphertext=rule.encrypted)
            record["round_seconds"] = time.time() - round_start
            self._history["rounds"].append(record)
            self._history["wall_time_s"] = time.time() - start
            self._write_history()

        if self.personalize:
            self._progress(f"personalizing: local fine-tuning and evaluation on {len(clients)} site(s)")
            final = FLModel(params=broadcast, params_type=ParamsType.FULL, current_round=self.num_rounds,
                            total_rounds=self.num_rounds, meta=self._task_meta())
            results = self.send_model_and_wait(
                task_name=PERSONALIZE_TASK, data=final, targets=clients, timeout=self.task_timeout
            )
            for result in results:
                site = result.meta.get("client_name", "?")
                metrics = dict(result.metrics or {})
                self._history["personalized"][site] = metrics
                self._progress(
                    f"{site}: personalized test Dice {metrics.get('test_dice', float('nan')):.3f}, "
                    f"HD95 {metrics.get('test_hd95', float('nan')):.1f}"
                )
        self._history["wall_time_s"] = time.time() - start
        self._write_history()
        self._progress(f"done in {self._history['wall_time_s']:.0f} s")

    def _task_meta(self) -> dict[str, Any]:
        """What every task carries besides the parameters: the latest statistics of every site that shares some
        (FedRDN), forwarded as the sites sent them."""
        return {SITE_STATISTICS_KEY: dict(self._site_statistics)} if self._site_statistics else {}

    def _job_rule(self, initial_shared: dict[str, Any]) -> ServerRule:
        """The rule object that serves this job (:func:`fedoap.server.rules.rule_for_job`), built once; under HE with
        the server's TenSEAL context.

        Raises:
            FileNotFoundError: HE without the server's context file.
            ValueError: a context that holds a secret key, or a reference the rule cannot take.
        """
        return rule_for_job(self._rule, self._rule_args, initial_shared, self._he_context() if self.he else None)

    def _he_context(self) -> Any:
        """The server's TenSEAL context (no secret key: the server only adds ciphertexts)."""
        from fedoap.privacy.contexts import find_context_file
        from fedoap.privacy.he import load_context

        workspace_root = self.fl_ctx.get_engine().get_workspace().get_root_dir()
        context = load_context(find_context_file("server", workspace_root))
        if context.has_secret_key():
            raise ValueError("the server's TenSEAL context holds a secret key: refusing to run HE with it")
        return context

    def _save(self, model: FLModel, aggregate: dict[str, Any], rnd: int, ciphertext: bool) -> None:
        """Persist the round's aggregate: through the persistor in clear, or (ciphertext, HE) as ciphertext only."""
        model.current_round = rnd
        if ciphertext:  # owner-only, atomic, no pickle
            from fedoap.privacy.at_rest import write_private

            write_private(os.path.join(self.get_app_dir(), ENCRYPTED_CHECKPOINT),
                          encrypted_checkpoint_bytes(aggregate, rnd))
            return
        model.params.update({k: torch.as_tensor(v) for k, v in aggregate.items()})
        self.save_model(model)

    def _aggregate_round(self, rnd: int, rule: ServerRule, results: list[FLModel]) -> dict[str, Any]:
        """Add every site's update to ``rule`` (reset for this round) and record what happened: accepted, dropped
        keys, rejected with the reason; under the null rule the sites' metrics only (whatever a site sent is
        dropped)."""
        sites: dict[str, Any] = {}
        for result in results:
            meta = result.meta or {}
            site = meta.get("client_name", "?")
            params = result.params or {}
            weight = meta.get(AGGREGATION_WEIGHT_KEY, meta.get(NUM_SAMPLES_KEY, 0))
            steps = meta.get(NUM_STEPS_KEY)
            # what the site uploaded: its parameters, plus the statistics its method shares (as float32 values)
            statistics_bytes = 4 * _count_numbers(meta.get(SITE_STATISTICS_KEY))
            entry = {"bytes_uploaded": payload_bytes(params) + statistics_bytes, NUM_SAMPLES_KEY: meta.get(NUM_SAMPLES_KEY, 0),
                     "steps": steps, AGGREGATION_WEIGHT_KEY: weight, **(result.metrics or {})}
            statistics = meta.get(SITE_STATISTICS_KEY)
            if statistics is not None:
                self._site_statistics[site] = statistics
            try:
                dropped = rule.add(site, params, weight, steps=steps)
            except UpdateRejected as err:
                self._warn(f"round {rnd + 1}: rejected update: {err}")
                entry["rejected"] = str(err)
            else:
                if dropped:
                    self._warn(f"round {rnd + 1}: {site} sent {len(dropped)} non-shared key(s), dropped: {dropped}")
                    entry["dropped_keys"] = dropped
            sites[site] = entry
        accepted = rule.count
        if rule.shares and not accepted:
            self._warn(f"round {rnd + 1}: no update accepted; the global model is unchanged")
        parts = [
            f"{site} loss {s.get('train_loss', float('nan')):.3f} val Dice {s.get('val_dice', float('nan')):.3f}"
            for site, s in sorted(sites.items())
        ]
        status = f"{accepted}/{len(results)} accepted" if rule.shares else f"{len(results)} local"
        self._progress(f"round {rnd + 1}/{self.num_rounds} ({status}): " + "; ".join(parts))
        return {"round": rnd, "accepted": accepted, "sites": sites}
