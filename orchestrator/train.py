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
from medmamba.tracking import Tracker, resolve_uri
from medmamba.train import Trainer

from .cluster import check_resources, init_ray, restore_into

RUN_FILE = "ray_run.json"  # the Ray run name and storage of an output directory, for --resume


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: restore the latest checkpoint if any, then ``Trainer.fit``."""
    cfg = config_from_dict(config["config"])
    rank = ray.train.get_context().get_world_rank()
    if cfg.ray.gpus_per_worker > 0:
        cfg.train.device = str(get_device())
    with tempfile.TemporaryDirectory(prefix="medmamba-worker-") as tmp:
        out = Path(tmp)
        resumed = restore_into(ray.train.get_checkpoint(), out)
        tracker = None
        if rank == 0 and config["tracking_uri"]:
            tracker = Tracker(config["tracking_uri"], cfg.mlflow.experiment)

        def report(metrics: dict) -> None:
            # every rank reports (Ray synchronises on it); rank 0's directory is the checkpoint
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(out) if rank == 0 else None)

        trainer = Trainer(cfg, build_datasets(cfg.data), out, tracker=tracker, progress=rank == 0,
                          on_report=report)
        trainer.run_id = config["run_id"]  # the driver's run: a group restarted from scratch logs to it too
        trainer.fit(resume=resumed)


def train_distributed(cfg: Config, output_dir: str | Path, tracking_uri: str | None = None,
                      resume: bool = False) -> dict:
    """Train ``cfg`` on ``cfg.ray.num_workers`` Ray Train workers; returns the test metrics.

    ``tracking_uri=None`` turns MLflow off. With ``resume`` the run recorded in ``output_dir``
    continues from its latest checkpoint.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    absolute_paths(cfg)
    r = cfg.ray
    init_ray(r.address)
    check_resources(r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker,
                    f"ray.num_workers={r.num_workers} workers", r.autoscaling)
    run_file = out / RUN_FILE
    if resume and run_file.is_file():
        run = json.loads(run_file.read_text())
    else:  # a fresh, unique name: Ray resumes any run whose name it finds in the storage path
        run = {"name": f"train-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": r.storage_path or str(out / "ray")}
        run_file.write_text(json.dumps(run))
    if tracking_uri is not None:  # fails fast when unreachable; one run for every attempt of the worker group
        tracking_uri = resolve_uri(tracking_uri)
        run["mlflow_run_id"] = Tracker(tracking_uri, cfg.mlflow.experiment).start(
            cfg.mlflow.run_name, {}, {"kind": "ray-train", "workers": r.num_workers}, run_id=run.get("mlflow_run_id"))
        run_file.write_text(json.dumps(run))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": tracking_uri, "run_id": run.get("mlflow_run_id")},
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
