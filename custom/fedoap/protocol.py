"""The vocabulary the server and the sites share: task names, the meta keys of what travels with a task or a result,
and the server's history file. No logic: both sides import it, it imports nothing of theirs."""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLMetaKey

__all__ = ["TRAIN_TASK", "PERSONALIZE_TASK", "SECAGG_ADVERTISE_TASK", "SECAGG_SHARE_TASK", "SECAGG_UNMASK_TASK",
           "SECAGG_TASKS", "SECAGG_KEY", "SECAGG_REFUSED_KEY", "NUM_SAMPLES_KEY", "AGGREGATION_WEIGHT_KEY", "NUM_STEPS_KEY",
           "SITE_STATISTICS_KEY", "DP_STAMP_KEY", "SITE_DP_POLICY_KEY", "SITE_DP_BUDGET_KEY", "HISTORY_FILE"]

#: task of every federated round: train on the broadcast shared parameters, send the shared update
TRAIN_TASK = "train"
#: last task: fine-tune on the final shared parameters, evaluate, keep the model on the site, send metrics only
PERSONALIZE_TASK = "personalize"
#: secure aggregation, before every round's training: the site's fresh round keys, signed by its identity key
SECAGG_ADVERTISE_TASK = "secagg_advertise"
#: secure aggregation: the sites' signed keys in; each site's key shares out, encrypted to each holder
SECAGG_SHARE_TASK = "secagg_share"
#: secure aggregation, after training: which sites sent and which dropped in; the shares that remove the masks out
SECAGG_UNMASK_TASK = "secagg_unmask"
#: the tasks of the secure aggregation protocol
SECAGG_TASKS = (SECAGG_ADVERTISE_TASK, SECAGG_SHARE_TASK, SECAGG_UNMASK_TASK)
#: task and result meta: the secure aggregation protocol's message (key material only, ``fedoap.privacy.secagg``)
SECAGG_KEY = "fedoap_secagg"
#: result meta: why a site refused a step of secure aggregation (one line; the site stays in the job)
SECAGG_REFUSED_KEY = "fedoap_secagg_refused"

#: result meta: the site's number of training samples (the aggregation weight unless it reports one)
NUM_SAMPLES_KEY = "n_samples"
#: result meta: the site's aggregation weight (samples, or steps for FedGS); n_samples if absent
AGGREGATION_WEIGHT_KEY = "aggregation_weight"
#: result meta (NVFlare's Client API): the number of local steps of the round (FedNova's tau_k)
NUM_STEPS_KEY = FLMetaKey.NUM_STEPS_CURRENT_ROUND
#: result meta: the statistics a site's method shares in clear (FedRDN, FedDP); task meta: every site's latest ones
SITE_STATISTICS_KEY = "site_statistics"
#: result meta: the client-level DP the released update went through ({"clip_norm", "noise_multiplier", "delta",
#: "releases"[, "dp_sgd"]}), checked and charged by the site's policy filter before it leaves
DP_STAMP_KEY = "fedoap_update_dp"
#: task meta, written by the site's own policy filter: its mandatory client-level DP
SITE_DP_POLICY_KEY = "fedoap_site_dp_policy"
#: task meta, written by the site's own policy filter: its privacy budgets and what is left of them
SITE_DP_BUDGET_KEY = "fedoap_site_dp_budget"

#: the server's record of a job (rounds, per-site metrics, personalized results), in its run folder
HISTORY_FILE = "fedoap_history.json"
