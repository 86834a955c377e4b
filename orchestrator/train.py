"""Data-parallel training with Ray Train: the single-process ``Trainer`` in every worker.

``train_loop_per_worker`` is the whole worker program: Ray has already joined the workers in a
torch.distributed group (gloo on CPU, NCCL on GPU), so ``Trainer`` wraps the model in DDP, shards
the data and gathers validation predictions. Rank 0 logs to MLflow and hands its output
directory to Ray as the checkpoint of each epoch; a restarted worker group (``FailureConfig``)
resumes from the latest one. The driver copies the final checkpoint to ``--output-dir``, so the
result looks exactly like a single-process run: best.pt, last.pt, metrics.json, figures.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device

from medmamba.config import Config, absolute_paths, config_from_dict
from medmamba.data import build_datasets
from medmamba.metrics import METRIC_KEYS
from medmamba.runtime import init_ray
from medmamba.tracking import mlflow_run, open_tracker
from medmamba.train import Callback, MlflowLogger, Trainer

from .cluster import check_data, check_resources, restore_into

RUN_FILE = "ray_run.json"  # the Ray run name and storage of an output directory, for --resume


class EpochReport(Callback):
    """Reports each epoch with the output directory as its checkpoint, once its files are on
    disk. A run resumed with no epoch left to train reports its last epoch once more, so that
    whoever waits on the reports (a Tune trial restored after its driver died) still gets one."""

    def __init__(self, out: Path):
        self.out, self.reported = out, False

    def report(self, trainer: Trainer, metrics: dict) -> None:
        raise NotImplementedError

    def _send(self, trainer: Trainer, metrics: dict) -> None:
        trainer.checkpoints.wait()
        self.report(trainer, metrics)
        self.reported = True

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self._send(trainer, row)

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if status == "FINISHED" and not self.reported and trainer.history:
            self._send(trainer, dict(trainer.history[-1]))


class RayTrainReport(EpochReport):
    """Ray Train's reports (every rank: Ray synchronises on them; rank 0's directory is the
    checkpoint), and the test metrics after the epochs."""

    def report(self, trainer: Trainer, metrics: dict) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(self.out) if trainer.is_main else None)

    def on_test_end(self, trainer: Trainer, metrics: dict, files: list[Path]) -> None:
        self._send(trainer, {"epoch": trainer.epoch, **{f"test_{k}": v for k, v in metrics.items() if k in METRIC_KEYS}})


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: restore the latest checkpoint if any, then ``Trainer.fit``. Rank 0
    logs to the MLflow run the driver started (``config["run_id"]``; None: no MLflow, as in a
    sweep's trial, which the sweep's driver logs); ``config["test"]`` False skips the test pass."""
    cfg = config_from_dict(config["config"])
    rank = ray.train.get_context().get_world_rank()
    if ray.get_gpu_ids():  # the GPU Ray gave this worker (ray.gpus_per_worker, or a sweep's tune.gpus_per_trial)
        cfg.train.device = str(get_device())
    with tempfile.TemporaryDirectory(prefix="medmamba-worker-") as tmp:
        out = Path(tmp)
        resumed = restore_into(ray.train.get_checkpoint(), out)
        callbacks: list[Callback] = [RayTrainReport(out)]
        tracker = open_tracker(cfg.mlflow) if rank == 0 and config["run_id"] else None
        if tracker:
            callbacks.append(MlflowLogger(tracker, run_id=config["run_id"]))
        Trainer(cfg, build_datasets(cfg.data), out, callbacks=callbacks, progress=rank == 0).fit(
            resume=resumed, test=config.get("test", True))


def train_distributed(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` on ``cfg.ray.num_workers`` Ray Train workers; returns the test metrics.

    With ``resume`` the run recorded in ``output_dir`` continues from its latest checkpoint. One
    MLflow run (``cfg.mlflow``) holds every attempt of the worker group.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    absolute_paths(cfg)
    tracker = open_tracker(cfg.mlflow)  # fails fast when unreachable
    r = cfg.ray
    init_ray(r.address)
    check_resources(r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker,
                    f"ray.num_workers={r.num_workers} workers", r.autoscaling)
    check_data(cfg.data)
    run_file = out / RUN_FILE
    if resume and run_file.is_file():
        run = json.loads(run_file.read_text())
    else:  # a fresh, unique name: Ray resumes any run whose name it finds in the storage path
        run = {"name": f"train-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": r.storage_path or str(out / "ray")}
    with mlflow_run(tracker, cfg.mlflow.run_name, tags={"kind": "ray-train", "workers": r.num_workers},
                    run_id=run.get("mlflow_run_id")) as run_id:
        run["mlflow_run_id"] = run_id
        run_file.write_text(json.dumps(run))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "run_id": run_id},
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}),
            run_config=RunConfig(name=run["name"], storage_path=run["storage_path"],
                                 failure_config=FailureConfig(max_failures=r.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as final:
            for item in Path(final).iterdir():
                if item.is_file():
                    shutil.copy2(item, out / item.name)
    return json.loads((out / "metrics.json").read_text())
