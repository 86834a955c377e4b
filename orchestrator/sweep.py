"""Hyperparameter sweeps: Ray Tune with Optuna's TPE sampler and ASHA early stopping.

The search space is data (``tune.space`` in the config). Every trial runs the single-process
``Trainer`` with the trial's parameters applied to the base recipe and reports each epoch's
validation metrics (and its output directory as a checkpoint) to Tune; ASHA stops weak trials
early. With ``tune.workers_per_trial`` > 1 a trial is instead a Ray Train data-parallel run of
that many workers (Tune over Train V2), for models too large for one GPU's batch. The driver
logs one MLflow parent run per sweep and one nested child run per trial, then writes the
leaderboard, ``best_config.yaml``, Optuna's plots, and the best trial's test metrics. ``--resume`` restores the Tune experiment, Optuna's state included, and the MLflow runs.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medmamba.config import Config, absolute_paths, check_new_output, config_from_dict, save_config, with_values
from medmamba.data import build_datasets
from medmamba.errors import ConfigError, MedMambaError
from medmamba.evaluation import evaluate_checkpoint, load_checkpoint
from medmamba.registry import check_model_name, read_checkpoint
from medmamba.reports import print_table, write_csv
from medmamba.runtime import init_ray, release_freed_memory
from medmamba.tracking import Tracker, mlflow_run, open_tracker
from medmamba.train import Trainer

from .cluster import check_data, check_resources, error_line, restore_into
from .train import EpochReport, train_loop_per_worker

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"  # the parent MLflow run and the Tune experiment of an output directory
EXPERIMENT = "sweep"
TRIAL_RUNS = "trials"  # under the storage path: the Ray Train runs of trials with several workers
MILESTONES = "sched.milestones"  # searched as fractions of train.epochs


def _fractions(text: Any) -> list[float]:
    try:
        fractions = [float(part) for part in str(text).split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ConfigError(f"tune.space.{MILESTONES}: each choice is a comma-separated list of fractions of "
                          f"train.epochs in (0, 1], e.g. \"0.5,0.75\"; got {text!r}")
    return fractions


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with a trial's parameters set (milestone fractions turned into epochs)."""
    params = dict(params)
    if MILESTONES in params:
        epochs = int(params.get("train.epochs", cfg.train.epochs))
        params[MILESTONES] = sorted({min(epochs, max(1, round(f * epochs))) for f in _fractions(params[MILESTONES])})
    return with_values(cfg, params)


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``kind`` (choice, loguniform, uniform or randint) and its argument."""
    key: str
    kind: str
    arg: Any

    def tune_domain(self):
        if self.kind == "choice":
            return tune.choice(self.arg)
        if self.kind == "randint":
            return tune.randint(int(self.arg[0]), int(self.arg[1]))
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(*self.arg)

    def optuna_distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.arg)
        if self.kind == "randint":
            return optuna.distributions.IntDistribution(int(self.arg[0]), int(self.arg[1]) - 1)
        return optuna.distributions.FloatDistribution(*self.arg, log=self.kind == "loguniform")

    def extremes(self) -> list:
        """The values to check against the config schema: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.arg)
        return [int(self.arg[0]), int(self.arg[1]) - 1] if self.kind == "randint" else list(self.arg)


def _dimension(key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"tune.space.{key}: expected one of {{choice: [...]}}, {{loguniform: [low, high]}}, "
                          f"{{uniform: [low, high]}}, {{randint: [low, high]}}; got {spec!r}")
    (kind, arg), = spec.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"tune.space.{key}: choice takes a non-empty list, got {arg!r}")
        return Dimension(key, kind, arg)
    if kind not in ("loguniform", "uniform", "randint"):
        raise ConfigError(f"tune.space.{key}: unknown kind {kind!r}; use choice, loguniform, uniform or randint")
    if not (isinstance(arg, (list, tuple)) and len(arg) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in arg)):
        raise ConfigError(f"tune.space.{key}: {kind} takes [low, high], got {arg!r}")
    low, high = arg
    if kind == "randint" and not all(float(b).is_integer() for b in arg):
        raise ConfigError(f"tune.space.{key}: randint takes whole numbers [low, high), got {arg!r}")
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"tune.space.{key}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, "
                          f"got {arg!r}")
    return Dimension(key, kind, [low, high])


def search_space(cfg: Config) -> dict[str, Dimension]:
    """``cfg.tune.space`` parsed once; every value a dimension can draw is checked against the
    config schema first, so a bad space fails before any trial starts."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one key, e.g. optim.lr: {loguniform: [1.0e-5, 1.0e-2]}")
    dims = {key: _dimension(key, spec) for key, spec in cfg.tune.space.items()}
    for dim in dims.values():
        for value in dim.extremes():
            try:
                apply_params(cfg, {dim.key: value})
                if dim.key == "model.name":
                    check_model_name(value)
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{dim.key} can draw {value!r}, which the config refuses: {exc}") from exc
    return dims


def run_trial(params: dict, base: dict, storage: str) -> None:
    """One trial: the base recipe with ``params``; each epoch reported to Tune with a checkpoint."""
    cfg = apply_params(config_from_dict(base), params)
    if cfg.tune.workers_per_trial > 1:
        return _run_trial_on_workers(cfg, storage)
    release_freed_memory()  # what the actor's previous trial left (one-worker trials reuse their process)
    with tempfile.TemporaryDirectory(prefix="medmamba-trial-") as tmp:
        out = Path(tmp)
        resumed = restore_into(tune.get_checkpoint(), out)  # a retried or resumed trial continues

        Trainer(cfg, build_datasets(cfg.data), out, callbacks=[TuneReport(out)], progress=False).fit(
            resume=resumed, test=False)


def _run_trial_on_workers(cfg: Config, storage: str) -> None:
    """One trial as a Ray Train run of ``tune.workers_per_trial`` data-parallel workers (the
    worker program of ``medmamba train --workers``, without its MLflow run or test pass); rank 0's
    epochs reach Tune through ``TuneReportCallback``. The Train run is named after the trial, so a
    restarted or resumed trial continues from its latest checkpoint."""
    t, r = cfg.tune, cfg.ray
    n = t.workers_per_trial
    TorchTrainer(
        train_loop_per_worker, train_loop_config={"config": cfg.to_dict(), "run_id": None, "test": False},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=t.gpus_per_trial > 0,
                                     resources_per_worker={"CPU": t.cpus_per_trial / n, "GPU": t.gpus_per_trial / n}),
        run_config=RunConfig(name=tune.get_context().get_trial_id(), storage_path=f"{storage}/{TRIAL_RUNS}",
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1))).fit()


def trial_checkpoint(result: tune.Result) -> tune.Checkpoint:
    """A trial's latest checkpoint: Tune's own, or the Ray Train run's that its last report named."""
    return result.checkpoint or tune.Checkpoint(result.metrics[CHECKPOINT_PATH_KEY])


class TuneReport(EpochReport):
    """Each epoch reported to Tune with the trial's directory as its checkpoint."""

    def report(self, trainer: Trainer, metrics: dict) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(self.out))


class MlflowTrials(tune.Callback):
    """One MLflow run per trial, nested under the sweep's parent run; found again after a resume."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, keys: list[str]):
        self.uri, self.experiment, self.parent, self.keys = uri, experiment, parent_run_id, keys
        self._trackers: dict[str, Tracker] = {}
        self._last_step: dict[str, int] = {}  # a trial's last logged epoch (a restored trial may repeat it)

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; clients stay behind
        return {**self.__dict__, "_trackers": {}, "_last_step": {}}

    def tracker(self, trial) -> Tracker:
        if trial.trial_id not in self._trackers:
            tracker = Tracker(self.uri, self.experiment)
            found = tracker.client.search_runs(
                [tracker.experiment_id],
                f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.trial_id = '{trial.trial_id}'")
            params = {k: trial.config[k] for k in self.keys if k in trial.config}
            tags = {"mlflow.parentRunId": self.parent, "trial_id": trial.trial_id}
            tracker.start(f"trial_{trial.trial_id}", params, tags, run_id=found[0].info.run_id if found else None)
            self._trackers[trial.trial_id] = tracker
            self._last_step[trial.trial_id] = max(tracker.logged_steps("train_loss"), default=0) if found else 0
        return self._trackers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.tracker(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = {k: v for k, v in result.items() if k in ("lr", "train_loss") or k.startswith("val_")}
        tracker, step = self.tracker(trial), int(result.get("epoch", result["training_iteration"]))
        if step > self._last_step[trial.trial_id]:
            tracker.log_metrics(row, step=step)
            self._last_step[trial.trial_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.tracker(trial).end("FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.tracker(trial).end("FAILED")


def _trial_id(result: tune.Result) -> str:
    return str(result.metrics.get("trial_id") or Path(result.path).name)


def leaderboard(results: tune.ResultGrid, cfg: Config) -> list[dict]:
    """One row per trial, best first: trial, its parameters, its best validation metric, epochs run."""
    metric, keys, rows = cfg.tune.metric, list(cfg.tune.space), []
    for result in results:
        df = result.metrics_dataframe
        reported = df is not None and metric in df and df[metric].notna().any()
        value = (df[metric].max() if cfg.tune.mode == "max" else df[metric].min()) if reported else math.nan
        epochs = int(df["epoch"].max()) if reported else 0
        status = "error" if result.error else ("stopped early" if epochs < cfg.train.epochs else "complete")
        rows.append({"trial": _trial_id(result), **{k: result.config.get(k) for k in keys},
                     metric: float(value), "epochs": epochs, "status": status})
    sign = -1 if cfg.tune.mode == "max" else 1
    return sorted(rows, key=lambda r: (math.isnan(r[metric]), sign * (0 if math.isnan(r[metric]) else r[metric])))


def _no_result(results: tune.ResultGrid, metric: str) -> MedMambaError:
    """The error of a sweep in which no trial reported ``metric``: the trials' own first error
    (every one failing the same way, e.g. data that cannot be downloaded) rather than the symptom."""
    errors = [result.error for result in results if result.error]
    if not errors:
        return MedMambaError(f"no trial reported {metric}: none finished an epoch")
    return MedMambaError(f"no trial reported {metric}: {len(errors)} of {len(results)} trials failed, the first "
                         f"with {error_line(errors[0])} (the trial errors are above)")


def _write_leaderboard(rows: list[dict], out: Path, title: str) -> Path:
    print_table(rows, title)
    return write_csv(rows, out / "leaderboard.csv")


def _optuna_plots(rows: list[dict], cfg: Config, space: dict[str, Dimension], out: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG, drawn by
    Optuna from the finished trials."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    metric, dists = cfg.tune.metric, {key: dim.optuna_distribution() for key, dim in space.items()}
    study = optuna.create_study(direction="maximize" if cfg.tune.mode == "max" else "minimize")
    for row in rows:
        if not math.isnan(row[metric]):
            study.add_trial(optuna.trial.create_trial(params={k: row[k] for k in dists}, distributions=dists,
                                                      value=row[metric]))
    paths = []
    for name, plot in (("optuna_history", ovm.plot_optimization_history),
                       ("optuna_importances", ovm.plot_param_importances),
                       ("optuna_parallel", ovm.plot_parallel_coordinate)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. too few finished trials for importances
            log.warning("no %s plot: %s", name, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / f"{name}.png")
    return paths


def _test_best(cfg: Config, checkpoint: tune.Checkpoint, out: Path, parent: Tracker | None,
               run_id: str | None) -> dict:
    """The best trial's best epoch on the test split, written like a training run's output; its
    best.pt names the trial's MLflow run."""
    with checkpoint.as_directory() as saved:
        state = read_checkpoint(Path(saved) / "best.pt")
    state.update(run_id=run_id, experiment=cfg.mlflow.experiment if run_id else None)
    torch.save(state, out / "best.pt")
    ev = evaluate_checkpoint(load_checkpoint(state, device=cfg.train.device), "test", out, cfg.train.batch_size)
    if parent:
        parent.log_evaluation("test", ev.metrics, ev.files)
    return ev.metrics


def run_sweep(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Run (or with ``resume``, continue) the sweep of ``cfg.tune`` into ``output_dir``; returns
    ``{"best_params", "best_value", "test_metrics", "leaderboard"}``. MLflow: ``cfg.mlflow``."""
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_new_output(out, "sweep", (STATE_FILE,), resume)  # before Ray starts
    t = cfg.tune
    space = search_space(cfg)
    absolute_paths(cfg)
    parent = open_tracker(cfg.mlflow)
    init_ray(cfg.ray.address)
    check_resources(t.cpus_per_trial, t.gpus_per_trial, "one trial (tune.cpus_per_trial, tune.gpus_per_trial)",
                    cfg.ray.autoscaling)
    check_data(cfg.data, *(apply_params(cfg, {d.key: value}).data for d in space.values() if d.key.startswith("data.")
                           for value in d.extremes()))  # what the trials may draw: every choice, a range's ends
    state_file = out / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state is None:
        state = {"storage_path": cfg.ray.storage_path or str(out / "ray"), "parent_run_id": None,
                 "name": f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"}
    with mlflow_run(parent, state["name"], cfg.flat(), {"kind": "sweep", "output_dir": out},
                    run_id=state["parent_run_id"]) as parent_run_id:
        state["parent_run_id"] = parent_run_id
        state_file.write_text(json.dumps(state))
        try:
            results = _fit(cfg, space, state, parent, resume)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Ray ends the running trials, which cannot end their runs
            if parent:
                parent.end_running_children()
            raise
        rows = leaderboard(results, cfg)
        if math.isnan(rows[0][t.metric]):
            raise _no_result(results, t.metric)
        best_row = rows[0]
        best = next(r for r in results if _trial_id(r) == best_row["trial"])
        best_params = {k: best.config[k] for k in space}
        save_config(apply_params(cfg, best_params), out / "best_config.yaml")
        files = [_write_leaderboard(rows, out, f"sweep: {len(rows)} trials, by best {t.metric}"),
                 out / "best_config.yaml", *_optuna_plots(rows, cfg, space, out)]
        trial_runs = {run.data.tags.get("trial_id"): run for run in parent.children()} if parent else {}
        best_run = trial_runs.get(best_row["trial"])
        test = _test_best(cfg, trial_checkpoint(best), out, parent, best_run.info.run_id if best_run else None)
        if parent:
            parent.set_tags({"best_trial": best_row["trial"], **{f"best.{k}": v for k, v in best_params.items()}})
            parent.log_metrics({f"best_{t.metric}": best_row[t.metric]})
            for file in files:
                parent.log_artifact(file)
            if best_run:
                parent.client.set_tag(best_run.info.run_id, "best_trial", "true")
            trials = {row["trial"] for row in rows}
            for trial_id, run in trial_runs.items():
                if trial_id not in trials and run.info.status in ("RUNNING", "KILLED"):
                    # a trial started just before an interruption that the restored experiment never saved
                    parent.client.set_tag(run.info.run_id, "lost_in_interruption", "true")
                    parent.client.set_terminated(run.info.run_id, "KILLED")
    return {"best_params": best_params, "best_value": best_row[t.metric], "test_metrics": test, "leaderboard": rows}


def _fit(cfg: Config, space: dict[str, Dimension], state: dict, parent: Tracker | None, resume: bool) -> tune.ResultGrid:
    """Run the Tune experiment of the sweep (restored with ``resume`` when Tune saved one)."""
    t, path = cfg.tune, f"{state['storage_path']}/{EXPERIMENT}"
    trainable = tune.with_parameters(run_trial, base=cfg.to_dict(), storage=state["storage_path"])
    concurrent = t.max_concurrent
    if t.workers_per_trial > 1:  # the trial only drives its Ray Train workers, which hold the CPUs and GPUs
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})  # (Ray wants a non-empty request)
        if not cfg.ray.autoscaling:  # as many trials at once as whole worker groups fit
            total = ray.cluster_resources()
            fits = [total.get("CPU", 0) // t.cpus_per_trial] + ([total.get("GPU", 0) // t.gpus_per_trial]
                                                                 if t.gpus_per_trial else [])
            concurrent = max(1, min(concurrent, int(min(fits))))
    else:
        trainable = tune.with_resources(trainable, {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial})
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True).fit()
    callbacks = [MlflowTrials(parent.uri, cfg.mlflow.experiment, state["parent_run_id"], list(space))] if parent else []
    return tune.Tuner(
        trainable, param_space={key: dim.tune_domain() for key, dim in space.items()},
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples, max_concurrent_trials=concurrent,
            reuse_actors=t.workers_per_trial == 1,  # no process start and imports per trial (a trial that
            # drove a Ray Train run cannot be reset for the next one)
            search_alg=OptunaSearch(seed=t.seed),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                                    reduction_factor=t.reduction_factor)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=state["storage_path"], callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1))).fit()
