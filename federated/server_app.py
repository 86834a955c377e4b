"""The Flower ServerApp: rounds of a strategy, the global model on the held-out test set, per-site
metrics, a checkpoint and a report after every round, everything logged to MLflow.

The strategy comes from ``federated.strategy``: FedAvg, FedProx (``federated.mu``) or FedBN
(FedAvg on the server; each site keeps its BatchNorm layers, see client_app). With
``federated.dp_clipping_norm`` it is wrapped in Flower's client-side fixed-clipping differential
privacy. Failed sites are dropped from a round (their error, naming the site, is logged and kept
in the report) as long as one site answers.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx

from medmamba.config import Config, check_resumable
from medmamba.data import make_loader
from medmamba.errors import FederationError
from medmamba.evaluation import evaluate_checkpoint, load_checkpoint, predict_metrics
from medmamba.metrics import METRIC_KEYS, is_better
from medmamba.registry import build_model, read_checkpoint
from medmamba.reports import plot_federated_curves
from medmamba.tracking import Tracker, git_commit, mlflow_run

from .task import device_for, pooled_datasets, site_names

log = logging.getLogger(__name__)

STATE_FILE = "federated_state.pt"  # the global model and the report after the last completed round
REPORT_FILE = "federated_report.json"
SITE_KEYS = ("train_loss",) + tuple(f"{s}_{k}" for s in ("val", "test") for k in METRIC_KEYS)


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric over the sites that have it (NaN, e.g. an AUC on a
    site with one class, is left out rather than spreading to the mean)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key in (weight_key, "site") or not math.isfinite(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


class RoundRecorder:
    """What the strategy heard from each site in each round, and which sites failed."""

    def __init__(self, names: list[str]):
        self.names = names
        self.sites: dict[int, dict[str, dict[str, float]]] = {}
        self.failures: dict[int, list[str]] = {}
        self.validation: dict[int, dict[str, float]] = {}  # the sites' example-weighted mean metrics
        self.node_sites: dict[int, str] = {}  # Flower node id -> site name, learnt from the sites' replies

    def record(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.failures.setdefault(server_round, []).append(self._describe_error(msg))
                log.warning("round %d: %s", server_round, self.failures[server_round][-1])
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            name = self.names[int(metrics["site"])]
            self.node_sites[msg.metadata.src_node_id] = name
            row = self.sites.setdefault(server_round, {}).setdefault(name, {})
            row.update({k: float(v) for k, v in metrics.items() if k in SITE_KEYS})
        return replies

    def _describe_error(self, msg: Message) -> str:
        reason = msg.error.reason
        for i, name in enumerate(self.names):  # the client's SiteError names its index
            marker = f"site {i} failed"
            if marker in reason:
                first, *rest = reason.split(marker, 1)[1].splitlines()
                details = [line.strip() for line in itertools.takewhile(
                    lambda line: line.startswith("  ") and "raise " not in line, rest)][:5]
                return " ".join([f"site {name} failed{first}", *details])
        last = reason.strip().splitlines()[-1] if reason.strip() else "no reason"
        node = msg.metadata.src_node_id  # e.g. a site process that died: named by what it sent before
        who = f"site {self.node_sites[node]}" if node in self.node_sites else f"node {node} (site unknown)"
        return f"{who} failed: {last}"

    def check_quorum(self, server_round: int, replies: list[Message], needed: int) -> None:
        """FederationError unless ``needed`` sites trained in this round (federated.min_clients)."""
        trained = sum(not msg.has_error() for msg in replies)
        if trained < needed:
            failures = "; ".join(self.failures.get(server_round, [])) or "no other reply"
            raise FederationError(f"round {server_round}: {trained} of {len(replies)} sites trained, fewer than "
                                  f"federated.min_clients={needed}; {failures}")


def _recording(base: type) -> type:
    class Recording(base):
        recorder: RoundRecorder

        def aggregate_train(self, server_round, replies):
            replies = self.recorder.record(server_round, replies)
            self.recorder.check_quorum(server_round, replies, self.min_train_nodes)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            aggregated = super().aggregate_evaluate(server_round, self.recorder.record(server_round, replies))
            self.recorder.validation[server_round] = dict(aggregated or {})
            return aggregated

    Recording.__name__ = base.__name__
    return Recording


def make_strategy(cfg: Config, recorder: RoundRecorder, num_sites: int):
    fed = cfg.federated
    common = dict(fraction_train=fed.fraction_fit, fraction_evaluate=1.0, min_train_nodes=fed.min_clients,
                  min_evaluate_nodes=fed.min_clients, min_available_nodes=fed.min_clients,
                  train_metrics_aggr_fn=weighted_mean, evaluate_metrics_aggr_fn=weighted_mean)
    if fed.strategy == "fedprox":
        strategy = _recording(FedProx)(proximal_mu=fed.mu, **common)
    else:  # fedavg; fedbn aggregates like FedAvg, its difference is on the clients
        strategy = _recording(FedAvg)(**common)
    strategy.recorder = recorder
    if fed.dp_clipping_norm is not None:
        sampled = max(fed.min_clients, int(num_sites * fed.fraction_fit))
        return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=fed.dp_noise_multiplier,
                                                          clipping_norm=fed.dp_clipping_norm,
                                                          num_sampled_clients=sampled)
    return strategy


class FederatedRun:
    """The server side of one experiment: evaluation, checkpoints, report and MLflow.

    After every round the global model is evaluated on the global test set and saved as
    ``final.pt``; the round whose global model has the best federated validation metric (the
    sites' example-weighted mean of ``val_<train.monitor>``, measured on their own validation
    splits: no test data chooses it) is kept as ``best.pt``.
    """

    def __init__(self, cfg: Config, output_dir: Path, tracker: Tracker | None, resume: bool):
        self.cfg, self.out, self.tracker = cfg, Path(output_dir), tracker
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = site_names(cfg)
        self.recorder = RoundRecorder(self.names)
        self.data = pooled_datasets(cfg)
        self.device = device_for(cfg)
        self.test_loader = make_loader(self.data.test, cfg.train.batch_size, shuffle=False)
        state_path = self.out / STATE_FILE
        resuming = resume and state_path.is_file()
        self.model = build_model(cfg.model, self.data.num_classes, cfg.data.size,
                                 pretrained=not resuming).to(self.device)  # the round-1 global model
        self.rounds: list[dict] = []
        self.best: dict | None = None  # {"round", "metric", "value"} of best.pt
        self.run_id = None
        if resuming:
            state = read_checkpoint(state_path)
            if "config" in state:  # (state files before this check have none)
                check_resumable(state["config"], cfg, state_path)
            self.model.load_state_dict(state["model"])
            self.rounds, self.run_id, self.best = state["rounds"], state["run_id"], state["best"]
            log.info("resuming after round %d", len(self.rounds))
        self.done = len(self.rounds)

    @property
    def monitor(self) -> str:
        return f"val_{self.cfg.train.monitor}"

    def tracking(self):
        """The federation's MLflow run (``mlflow_run``), continued after a resume."""
        fed = self.cfg.federated
        tags = {"kind": "federated", "git_commit": git_commit(), "sites": ",".join(self.names),
                "strategy": fed.strategy, "partition": fed.partition}
        params = {**self.cfg.flat(), "federated.differential_privacy": fed.dp_clipping_norm is not None}
        return mlflow_run(self.tracker, self.cfg.mlflow.run_name, params, tags, run_id=self.run_id)

    def global_metrics(self, arrays: ArrayRecord) -> dict:
        # FedBN: the sites send no BatchNorm layers, the global model keeps its initial ones
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=self.cfg.federated.strategy != "fedbn")
        return predict_metrics(self.model, self.test_loader, self.device, self.data.class_names,
                               self.data.positive_class)[0]

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's server-side evaluation hook, called before round 1 and after every round
        (after the sites' own evaluation of that round)."""
        metrics = self.global_metrics(arrays)
        scalars = {k: float(metrics[k]) for k in METRIC_KEYS}
        if server_round == 0:
            if self.done == 0 and self.tracker:
                self.tracker.log_metrics({f"global/{k}": v for k, v in scalars.items()}, step=0)
            return MetricRecord(scalars)
        number = self.done + server_round
        validation = self.recorder.validation.get(server_round, {})
        row = {"round": number, "global": scalars, "sites": self.recorder.sites.get(server_round, {}),
               "failures": self.recorder.failures.get(server_round, []),
               "validation": {k: v for k, v in validation.items() if k.startswith("val_")}}
        self.rounds.append(row)
        value = validation.get(self.monitor, math.nan)
        improved = is_better(self.cfg.train.monitor, value, self.best["value"] if self.best else None)
        if improved:
            self.best = {"round": number, "metric": f"federated {self.monitor}", "value": value}
        self._save(number, scalars, improved)
        if self.tracker:
            self.tracker.log_metrics({f"global/{k}": v for k, v in scalars.items()}, step=number)
            self.tracker.log_metrics({f"federated/{k}": v for k, v in row["validation"].items()}, step=number)
            for name, site in row["sites"].items():
                self.tracker.log_metrics({f"site/{name}/{k}": v for k, v in site.items()}, step=number)
        return MetricRecord(scalars)

    def _save(self, number: int, test: dict, improved: bool) -> None:
        """final.pt (this round's global model, loadable by `medmamba evaluate`), best.pt when it
        improved, the resumable state and the report; each file replaced atomically."""
        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        checkpoint = {"model": model, "config": self.cfg.to_dict(), "class_names": self.data.class_names,
                      "round": number, "test": test, "run_id": self.run_id, "experiment": self.cfg.mlflow.experiment}
        _atomic(torch.save, checkpoint, self.out / "final.pt")
        if improved:
            _atomic(torch.save, {**checkpoint, "val": self.best}, self.out / "best.pt")
        _atomic(torch.save, {"model": model, "rounds": self.rounds, "run_id": self.run_id, "best": self.best,
                             "config": self.cfg.to_dict()}, self.out / STATE_FILE)
        self.write_report()

    def write_report(self, centralized: dict | None = None) -> dict:
        report = {"sites": self.names, "class_names": self.data.class_names, "config": self.cfg.to_dict(),
                  "rounds": self.rounds}
        if self.rounds:
            last = self.rounds[-1]
            report["final"] = {"file": "final.pt", "round": last["round"], "test": last["global"]}
        if self.best:
            best = self.rounds[self.best["round"] - 1]
            report["best"] = {"file": "best.pt", **self.best, "test": best["global"]}
        if centralized is not None:
            report["centralized"] = centralized
        _atomic(lambda obj, path: Path(path).write_text(json.dumps(obj, indent=2, default=float)), report,
                self.out / REPORT_FILE)
        return report

    def run(self, grid: Grid) -> None:
        remaining = self.cfg.federated.rounds - self.done
        if remaining <= 0:
            return
        strategy = make_strategy(self.cfg, self.recorder, len(self.names))
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        config = ConfigRecord({"round-offset": self.done})
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=remaining, train_config=config,
                       evaluate_fn=self.evaluate_fn, timeout=self.cfg.federated.round_timeout)
        if not self.rounds or len(self.rounds) < self.cfg.federated.rounds:
            raise RuntimeError("the federation stopped before its last round")

    def finish(self, centralized: dict | None) -> dict:
        """The final report files and MLflow artifacts: the best round's global model on the global
        test set (metrics.json and figures, as a training run writes them), per-site x round
        table, curves, comparison with the centralised baseline."""
        if self.best is None:  # no site ever reported validation metrics: the final round stands in
            shutil.copy2(self.out / "final.pt", self.out / "best.pt")
            last = self.rounds[-1]["round"]
            self.best = {"round": last, "metric": "none (no federated validation): the final round", "value": None}
        best = load_checkpoint(self.out / "best.pt", device=self.cfg.train.device, data=self.data)
        evaluation = evaluate_checkpoint(best, "test", self.out, self.cfg.train.batch_size)
        report = self.write_report(centralized)
        table = self.out / "federated_rounds.csv"
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["round", "site", *SITE_KEYS])
            writer.writeheader()
            for row in self.rounds:
                writer.writerow({"round": row["round"], "site": "global",
                                 **{f"test_{k}": v for k, v in row["global"].items()}})
                writer.writerows({"round": row["round"], "site": name, **site} for name, site in row["sites"].items())
        curves = plot_federated_curves(self.rounds, self.names, centralized, self.out / "federated_curves.png")
        if self.tracker:
            self.tracker.set_tags({"best_round": self.best["round"]})
            self.tracker.log_evaluation("test", evaluation.metrics, evaluation.files)
            if centralized:
                self.tracker.log_metrics({f"centralized/{k}": v for k, v in centralized.items()
                                          if k in METRIC_KEYS})
            for path in (self.out / REPORT_FILE, table, curves):
                self.tracker.log_artifact(path)
        return report


def _atomic(write, obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(obj, tmp)
    os.replace(tmp, path)


def make_server_app(run: FederatedRun, errors: list[BaseException]) -> ServerApp:
    """A ServerApp whose main runs ``run`` (exceptions are kept in ``errors`` for the caller)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run.run(grid)
        except BaseException as exc:  # the simulation engine would only log it
            errors.append(exc)
            raise

    return app

