"""A Client API script whose behaviour depends on the site's name, to test the controller's rules for real.

good-*: sends the shared key 'weight' filled with its number, weighted by that number, after that number of local
steps (NUM_STEPS_CURRENT_ROUND, FedNova's tau); 'good-3' also sends the non-shared key 'bias' (must be dropped). nan: sends NaN (must be rejected). shape: sends 'weight' transposed
(rejected; the element count stays the same because NVFlare's client reshapes the next task to the shapes it sent).
liar: sends 'weight' filled with 1000 claiming 1e308 samples and 1e-12 local steps (must be rejected: no claim
makes a site the global model). garbage: sends a string where the tensor belongs, a text metric and a text sample
count (must be rejected without stopping the job). An empty task (server rule "none": nothing shared): every site sends metrics and no parameter, except 'good-3',
which sends the key 'bias' (must be dropped). Every site also sends "statistics" ({"site": [its name length]}) in the
meta, and reports at personalization how many sites' statistics the server forwarded with the task (metrics are
numbers: the server refuses text but for an organ's name).
"""

import numpy as np
import torch

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

flare.init()
site = flare.get_site_name()
while flare.is_running():
    task = flare.receive()
    if flare.get_task_name() == "personalize":
        forwarded = (task.meta or {}).get("site_statistics", {})
        flare.send(FLModel(params={}, metrics={"test_dice": 0.5, "test_hd95": 1.0,
                                               "statistics_seen": len(forwarded)}))
        continue
    if not task.params:
        params = {"bias": torch.full((2,), 99.0)} if site == "good-3" else {}
        flare.send(FLModel(params=params, params_type=ParamsType.FULL, metrics={"train_loss": 0.2, "val_dice": 0.4},
                           meta={"n_samples": 1, "NUM_STEPS_CURRENT_ROUND": 1,
                                 "site_statistics": {"n": [len(site)]}}))
        continue
    shape = np.asarray(task.params["weight"]).shape
    if site.startswith("good-"):
        value = float(site.split("-")[1])
        params = {"weight": torch.full(shape, value)}
        if site == "good-3":
            params["bias"] = torch.full((2,), 99.0)
        weight = steps = value
    elif site == "liar":
        params, weight, steps = {"weight": torch.full(shape, 1000.0)}, 1e308, 1e-12
    elif site == "garbage":
        flare.send(FLModel(params={"weight": "not a tensor"}, params_type=ParamsType.FULL,
                           metrics={"train_loss": "low", "n_samples": 7},
                           meta={"n_samples": "many", "NUM_STEPS_CURRENT_ROUND": "some"}))
        continue
    elif site == "nan":
        params, weight, steps = {"weight": torch.full(shape, float("nan"))}, 5, 1
    else:
        params, weight, steps = {"weight": torch.zeros(4, 2)}, 5, 1
    flare.send(FLModel(params=params, params_type=ParamsType.FULL, metrics={"train_loss": 0.1, "val_dice": 0.5},
                       meta={"n_samples": weight, "NUM_STEPS_CURRENT_ROUND": steps,
                             "site_statistics": {"n": [len(site)]}}))
