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
from medmamba.config import Config, absolute_paths
from medmamba.tracking import open_tracker
from medmamba.train import Trainer

from .client_app import make_client_app
from .server_app import FederatedRun, make_server_app
from .task import pooled_datasets

log = logging.getLogger(__name__)


def centralized_baseline(cfg: Config, output_dir: Path) -> dict:
    """The model trained on the pooled sites' train/val splits for rounds x local_epochs epochs,
    tested on the federation's global test set; returns its test metrics."""
    epochs = cfg.federated.rounds * cfg.federated.local_epochs
    pooled_cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    return Trainer(pooled_cfg, pooled_datasets(cfg), output_dir, progress=False).fit()


def run_federated(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Run (or with ``resume``, continue) the federated experiment of ``cfg`` into ``output_dir``;
    returns the report (also in output_dir/federated_report.json). MLflow: ``cfg.mlflow``."""
    out = Path(output_dir).resolve()
    absolute_paths(cfg)
    run = FederatedRun(cfg, out, open_tracker(cfg.mlflow), resume)
    errors: list[BaseException] = []
    fed = cfg.federated
    with run.tracking() as run.run_id:
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
        return run.finish(centralized)
