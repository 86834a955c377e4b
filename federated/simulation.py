"""`medmamba federate`: the Flower simulation of a federation of hospitals, then the report.

The ServerApp and ClientApp are run by ``flwr.simulation.run_simulation`` on Flower's Ray backend,
one virtual node per site with ``federated.client_cpus``/``client_gpus`` each. With
``federated.centralized_baseline`` the same model is also trained on the pooled sites for
rounds x local_epochs epochs and evaluated on the same global test set.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from flwr.simulation import run_simulation
from torch.utils.data import ConcatDataset

from medmamba.config import Config, absolute_paths
from medmamba.data import Datasets
from medmamba.tracking import Tracker
from medmamba.train import Trainer

from .client_app import make_client_app
from .server_app import FederatedRun, make_server_app
from .task import build_site, global_test_set, site_names

log = logging.getLogger(__name__)


def centralized_baseline(cfg: Config, output_dir: Path) -> dict:
    """The model trained on the pooled sites' train/val splits for rounds x local_epochs epochs,
    tested on the federation's global test set; returns its test metrics."""
    names = site_names(cfg)
    sites = [build_site(cfg, i) for i in range(len(names))]
    test, classes = global_test_set(cfg)
    pooled = Datasets(ConcatDataset([s.train for s in sites]), ConcatDataset([s.val for s in sites]), test,
                      classes, name="pooled:" + ",".join(names), checksum="")
    epochs = cfg.federated.rounds * cfg.federated.local_epochs
    pooled_cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    return Trainer(pooled_cfg, pooled, output_dir, progress=False).fit()


def run_federated(cfg: Config, output_dir: str | Path, tracking_uri: str | None = None,
                  resume: bool = False) -> dict:
    """Run (or with ``resume``, continue) the federated experiment of ``cfg`` into ``output_dir``;
    returns the report (also in output_dir/federated_report.json)."""
    out = Path(output_dir).resolve()
    absolute_paths(cfg)
    tracker = Tracker(tracking_uri, cfg.mlflow.experiment) if tracking_uri is not None else None
    run = FederatedRun(cfg, out, tracker, resume)
    run.start_tracking()
    errors: list[BaseException] = []
    fed = cfg.federated
    try:
        if run.done < fed.rounds:
            run_simulation(server_app=make_server_app(run, errors), client_app=make_client_app(cfg.to_dict()),
                           num_supernodes=len(run.names),
                           backend_config={"client_resources": {"num_cpus": fed.client_cpus,
                                                                "num_gpus": fed.client_gpus}})
            if errors:
                raise errors[0]
            if len(run.rounds) < fed.rounds:
                raise RuntimeError(f"the simulation ended after {len(run.rounds)} of {fed.rounds} rounds; "
                                   "see the Flower log above")
        centralized = centralized_baseline(cfg, out / "centralized") if fed.centralized_baseline else None
        report = run.finish(centralized)
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        raise
    if tracker:
        tracker.end("FINISHED")
    return report
