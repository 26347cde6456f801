"""The server workflow of personalized FL: broadcast and average only the shared parameters, then ask every site to
personalize and report.

Each round the controller sends the global shared parameters, receives each site's shared parameters with its
training-sample count, drops (and logs) any key outside the shared set, rejects (and logs) an update with a missing
key, a wrong shape or a non-finite value, averages the rest weighted by sample counts (FedAvg, McMahan et al.,
AISTATS 2017, restricted to the shared set as in FedOAP, arXiv 2511.18847) and saves the aggregate. After the last
round it sends the task ``personalize``: sites fine-tune locally and return their evaluation metrics (no
parameters). The round history and the final metrics are written to ``fedoap_history.json`` in the server's run
folder after every round, so an interrupted run still leaves its history behind.

The aggregation weight of a site is what it reports under the meta key ``aggregation_weight`` (its sample count, or
its step count for a method that weighs by steps, FedGS), or else its sample count ``n_samples``.

Server rules (the method's ``server_rule``): ``"weighted_mean"`` as above; ``"fednova"``, FedNova's normalized
averaging (Wang et al., NeurIPS 2020: ``x - tau_eff * sum_k p_k (x - x_k) / tau_k``, with ``tau_k`` the site's
``NUM_STEPS_CURRENT_ROUND``; it needs the global model in clear, so not under HE); ``"fedawa"`` (weights learned from
the client vectors, carried from round to round) and ``"fedlws"`` (layer-wise shrinking of the mean), both in clear
too; ``"none"`` for a method that shares nothing (local-only training): the rounds still pace the sites' training
and collect their metrics, but the server broadcasts an empty parameter set, aggregates nothing and saves no
checkpoint. The arithmetic of each rule lives in ``fedoap.server.aggregation`` (and the modules its ``SERVER_RULES`` name).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from typing import Any, Optional

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from fedoap.server.aggregation import PLAINTEXT_RULES, SERVER_RULES as AGGREGATION_RULES, UpdateRejected, make_aggregator
from fedoap.server.aggregation import payload_bytes
from fedoap.jsonio import write_json
from fedoap.protocol import (AGGREGATION_WEIGHT_KEY, HISTORY_FILE, NUM_SAMPLES_KEY, NUM_STEPS_KEY, PERSONALIZE_TASK,
                             SITE_STATISTICS_KEY, TRAIN_TASK)

__all__ = ["SharedParamsFedAvg", "SERVER_RULES", "ENCRYPTED_CHECKPOINT", "encrypted_checkpoint_bytes",
           "load_encrypted_checkpoint"]

#: the server's checkpoint under HE (ciphertext only), in its app folder: safetensors, no pickle
ENCRYPTED_CHECKPOINT = "FL_global_model_encrypted.safetensors"
#: recorded in the encrypted checkpoint's safetensors metadata, with the round
ENCRYPTED_CHECKPOINT_FORMAT = "fedoap-he-checkpoint/1"
#: server rules this controller implements: those of ``fedoap.server.aggregation.SERVER_RULES`` (weighted mean,
#: FedNova, ...), or ``"none"`` (nothing shared)
SERVER_RULES = (*AGGREGATION_RULES, "none")


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
    """Weighted FedAvg (or FedNova) over an explicit list of shared parameters.

    Args:
        num_rounds: federated rounds before personalization.
        min_clients: sites that must answer each round.
        shared_keys: state-dict keys that are broadcast and averaged (a list of names, stored unchanged so that the
            job exports faithfully); every other key stays on the sites.
        method: name of the federated method (recorded in the history).
        server_rule: how the shared parameters are combined, one of :data:`SERVER_RULES` (the method's
            ``server_rule``): ``"weighted_mean"`` and ``"fednova"`` need a non-empty ``shared_keys``; ``"none"``
            (local-only training) needs an empty one, and then the server broadcasts ``{}``, aggregates nothing and
            saves no checkpoint.
        personalize: after the last round, send ``personalize`` and collect each site's final metrics.
        he: sites send CKKS ciphertexts of their weighted shared parameters (by samples, or steps for FedGS; rule
            ``"weighted_mean"`` only); the server only adds them with its TenSEAL context (no secret key, found in
            its ``local/`` folder, from the sites' key ceremony, or ``$FEDOAP_HE_CONTEXT_DIR``), broadcasts the encrypted sum and saves only ciphertext
            for the shared part (``ENCRYPTED_CHECKPOINT``).
        task_timeout: seconds to wait for a round (0: no limit).
        persistor_id: id of the persistor component that holds the global checkpoint.
        rule_args: constructor arguments of the server rule's aggregator (the method's ``server_rule_args``).

    Raises:
        ValueError: an unknown server rule, a shared set that does not fit the rule, HE with the rule ``"none"`` or
            with a rule that needs the global model in clear (``"fednova"``), or a non-positive number of rounds or
            clients.
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        min_clients: int,
        shared_keys: list[str],
        method: str = "fedoap",
        server_rule: str = "weighted_mean",
        personalize: bool = True,
        he: bool = False,
        task_timeout: int = 0,
        persistor_id: str = "persistor",
        rule_args: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(persistor_id=persistor_id)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if server_rule not in SERVER_RULES:
            raise ValueError(f"server_rule must be one of {SERVER_RULES}, got {server_rule!r}")
        if server_rule == "none":
            if shared_keys:
                raise ValueError(f"server rule 'none' shares nothing, but {len(shared_keys)} shared key(s) were given")
            if he:
                raise ValueError("server rule 'none' shares nothing: there is nothing to encrypt")
        elif not shared_keys:
            raise ValueError("shared_keys is empty: a federation with nothing shared is local training "
                             "(server_rule='none')")
        if he and server_rule in PLAINTEXT_RULES:
            raise ValueError(f"server rule {server_rule!r} needs the global model in clear on the server; "
                             "homomorphic encryption supports only 'weighted_mean'")
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.shared_keys = shared_keys
        self.method = method
        self.server_rule = server_rule
        self.personalize = personalize
        self.he = he
        self.task_timeout = task_timeout
        self.persistor_id = persistor_id
        self.rule_args = rule_args
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
            new_aggregator = self._aggregator_factory(initial_shared)
        except (FileNotFoundError, ValueError) as err:
            self.panic(str(err))
            return
        self._history = {"method": self.method, "server_rule": self.server_rule, "he": self.he, "rounds": [],
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
            aggregator = new_aggregator(broadcast) if new_aggregator is not None else None
            record = self._aggregate_round(rnd, aggregator, results)
            if aggregator is not None and aggregator.count:
                broadcast = aggregator.result()
                if hasattr(aggregator, "summary"):  # what a learned rule decided (FedAWA's weights, FedLWS's gammas)
                    record["aggregation"] = aggregator.summary()
                self._save(model, broadcast, rnd)
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

    def _aggregator_factory(self, initial_shared: dict[str, Any]):
        """A function of the round's broadcast that returns the round's aggregator: plaintext weighted mean, FedNova
        (which needs the broadcast global model), or (HE) a ciphertext sum with the server context; None under the
        rule ``"none"`` (nothing to aggregate)."""
        if self.server_rule == "none":
            return None
        if not self.he:
            rule, rule_args = self.server_rule, dict(self.rule_args or {})
            last: list[Any] = []  # the previous round's aggregator: a stateful rule (FedAWA) carries its state on

            def new_round(broadcast):
                aggregator = make_aggregator(rule, broadcast, initial_shared, rule_args,
                                             previous=last[0] if last else None)
                last[:] = [aggregator]
                return aggregator

            return new_round
        from fedoap.server.encrypted_aggregation import EncryptedSumAggregator
        from fedoap.privacy.contexts import find_context_file
        from fedoap.privacy.he import load_context

        workspace_root = self.fl_ctx.get_engine().get_workspace().get_root_dir()
        context = load_context(find_context_file("server", workspace_root))
        if context.has_secret_key():
            raise ValueError("the server's TenSEAL context holds a secret key: refusing to run HE with it")
        # the broadcast is ciphertext after round 0: the plaintext initialization fixes keys and shapes
        return lambda broadcast: EncryptedSumAggregator(initial_shared, context)

    def _save(self, model: FLModel, aggregate: dict[str, Any], rnd: int) -> None:
        """Persist the round's aggregate: through the persistor in clear, or (HE) as ciphertext only."""
        model.current_round = rnd
        if self.he:  # owner-only, atomic, no pickle
            from fedoap.privacy.at_rest import write_private

            write_private(os.path.join(self.get_app_dir(), ENCRYPTED_CHECKPOINT),
                          encrypted_checkpoint_bytes(aggregate, rnd))
            return
        model.params.update({k: torch.as_tensor(v) for k, v in aggregate.items()})
        self.save_model(model)

    def _aggregate_round(self, rnd: int, aggregator, results: list[FLModel]) -> dict[str, Any]:
        """Add every site's update to ``aggregator`` and record what happened; with no aggregator (rule ``"none"``)
        record the sites' metrics only, and drop (and log) whatever a site sent."""
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
                if aggregator is None:
                    dropped = sorted(params)
                elif self.he:
                    dropped = aggregator.add(site, params, weight)
                else:
                    dropped = aggregator.add(site, params, weight, steps=steps)
            except UpdateRejected as err:
                self._warn(f"round {rnd + 1}: rejected update: {err}")
                entry["rejected"] = str(err)
            else:
                if dropped:
                    self._warn(f"round {rnd + 1}: {site} sent {len(dropped)} non-shared key(s), dropped: {dropped}")
                    entry["dropped_keys"] = dropped
            sites[site] = entry
        accepted = aggregator.count if aggregator is not None else 0
        if aggregator is not None and not accepted:
            self._warn(f"round {rnd + 1}: no update accepted; the global model is unchanged")
        parts = [
            f"{site} loss {s.get('train_loss', float('nan')):.3f} val Dice {s.get('val_dice', float('nan')):.3f}"
            for site, s in sorted(sites.items())
        ]
        status = f"{accepted}/{len(results)} accepted" if aggregator is not None else f"{len(results)} local"
        self._progress(f"round {rnd + 1}/{self.num_rounds} ({status}): " + "; ".join(parts))
        return {"round": rnd, "accepted": accepted, "sites": sites}
