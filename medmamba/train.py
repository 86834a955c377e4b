"""Training and evaluation: one loop serving the CLI, Ray Train workers and Flower clients.

``train_one_epoch`` and ``evaluate`` are the building blocks; ``Trainer.fit`` runs the whole
recipe of a config: epochs with MultiStepLR, validation each epoch, the best checkpoint by a
validation metric, early stopping, a resumable ``last.pt``, the final test metrics of the best
checkpoint in ``metrics.json``, and MLflow logging.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .config import Config, OptimConfig, SchedConfig, save_config
from .data import Datasets
from .errors import ConfigError
from .flops import count_params
from .metrics import METRIC_KEYS, classification_metrics
from .registry import create_model
from .reports import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from .tracking import Tracker, git_commit

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer; its fused implementation where torch has one (CPU and CUDA):
    one kernel for all parameters instead of several small ops per tensor (4x faster here)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                sampler=None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    training = shuffle or sampler is not None
    # a final training batch of one example breaks BatchNorm on 1x1 maps (28 px inputs): drop it
    drop_last = training and len(sampler if sampler is not None else dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=drop_last,
                      persistent_workers=num_workers > 0)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None, epoch: int = 0,
                    progress: bool = True, proximal: tuple[float, list[torch.Tensor]] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``proximal=(mu, reference_params)`` adds FedProx's (mu / 2) ||w - w_ref||^2 to the loss.
    Raises FloatingPointError when the loss stops being finite.
    """
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if progress else True)  # None: off without a TTY
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=scaler is not None):
            loss = F.cross_entropy(model(x), y)
        if proximal is not None:
            mu, ref = proximal
            loss = loss + mu / 2 * sum((p - r).pow(2).sum() for p, r in zip(model.parameters(), ref))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, step {step}; "
                                     "lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    if world()[1] > 1:  # the mean over every rank's examples
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, class probabilities, mean cross-entropy) over ``loader``.

    Under torch.distributed each rank passes its shard of the data and all ranks receive the
    predictions of the whole set, so metrics such as AUC are computed over every example.
    """
    model.eval()
    labels, probs, total = [], [], 0.0
    for x, y in loader:
        logits = model(x.to(device)).float()
        total += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        labels.append(y.numpy())
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    num_classes = probs[0].shape[1] if probs else 0
    parts = [(np.concatenate(labels) if labels else np.zeros(0, np.int64),
              np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32), total)]
    if world()[1] > 1:
        gathered: list = [None] * world()[1]
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    y_all = np.concatenate([p[0] for p in parts])
    probs_all = np.concatenate([p[1] for p in parts if len(p[0])])
    return y_all, probs_all, sum(p[2] for p in parts) / max(len(y_all), 1)


def predict_metrics(model: nn.Module, loader: DataLoader, device: torch.device,
                    class_names: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the paper's metrics, labels, class probabilities) of ``model`` on ``loader``."""
    labels, probs, loss = predict(model, loader, device)
    return classification_metrics(labels, probs, loss=loss, class_names=class_names), labels, probs


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, class_names: list[str]) -> dict:
    """The paper's metrics of ``model`` on ``loader``."""
    return predict_metrics(model, loader, device, class_names)[0]


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if metric == "loss" else new > best


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


class Trainer:
    """Runs a config's recipe on ``data``, writing checkpoints and metrics under ``output_dir``.

    Inside a torch.distributed process group (Ray Train workers) the model is wrapped in DDP,
    each rank trains on its DistributedSampler shard of the train set (``train.batch_size`` stays
    the global batch) and evaluates its shard of val/test; metrics are computed on the gathered
    predictions of the whole split. Every rank keeps its own checkpoints (for resuming); only the
    rank given a tracker logs. ``on_report(metrics)`` is called on every rank after each epoch's
    ``last.pt`` is written, and once more with the ``test_*`` metrics when ``fit(test=True)``.
    """

    def __init__(self, cfg: Config, data: Datasets, output_dir: str | Path, tracker: Tracker | None = None,
                 progress: bool = True, on_report: Callable[[dict], None] | None = None):
        self.cfg, self.data, self.tracker, self.progress, self.on_report = cfg, data, tracker, progress, on_report
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        num_classes = cfg.model.num_classes or data.num_classes
        if num_classes != data.num_classes:
            raise ConfigError(f"model.num_classes is {num_classes} but {data.name} has {data.num_classes} classes")
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.model = create_model(cfg.model.name, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate,
                                  d_state=cfg.model.d_state).to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.sched)
        use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        t, (rank, size) = cfg.train, world()
        self.sampler = None
        self.train_model: nn.Module = self.model
        if size > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.sampler = DistributedSampler(data.train, num_replicas=size, rank=rank, shuffle=True, seed=t.seed)
        batch = math.ceil(t.batch_size / size)

        def shard(dataset: Dataset) -> Dataset:
            return dataset if size == 1 else Subset(dataset, range(rank, len(dataset), size))

        self.loaders = {
            "train": make_loader(data.train, batch, True, t.seed, cfg.data.num_workers, sampler=self.sampler),
            "val": make_loader(shard(data.val), batch, False, num_workers=cfg.data.num_workers),
            "test": make_loader(shard(data.test), batch, False, num_workers=cfg.data.num_workers),
        }
        self.is_main = rank == 0
        self.epoch, self.best, self.best_epoch, self.history, self.run_id = 0, None, 0, [], None

    def _checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history,
            "run_id": self.run_id, "config": self.cfg.to_dict(), "rng": torch.get_rng_state(),
        }

    def _restore(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.history, self.run_id = state["history"], state["run_id"]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s after epoch %d", path, self.epoch)

    def fit(self, resume: bool = False, test: bool = True) -> dict:
        """Train, keep the best checkpoint, and return the best checkpoint's test metrics
        (with ``test=False``: the last epoch's history row, and no test pass)."""
        cfg, last = self.cfg, self.out / "last.pt"
        if resume and last.is_file():
            self._restore(last)
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
        if self.tracker:
            tags = {"git_commit": git_commit(), "dataset": self.data.name, "dataset_md5": self.data.checksum,
                    "model": cfg.model.name, "parameters": count_params(self.model)}
            self.run_id = self.tracker.start(cfg.mlflow.run_name, cfg.flat(), tags, run_id=self.run_id)
            self._backfill_metrics()
        try:
            self._train_epochs(last)
            metrics = self._test() if test else dict(self.history[-1] if self.history else {})
        except KeyboardInterrupt:
            if self.tracker:
                self.tracker.end("KILLED")
            raise
        except Exception:
            if self.tracker:
                self.tracker.end("FAILED")
            raise
        if self.tracker:
            self.tracker.end("FINISHED")
        return metrics

    def _backfill_metrics(self) -> None:
        """Log the restored epochs that a kill between checkpoint and MLflow call left unlogged,
        and remember which epochs the run holds (an attempt restarted before its checkpoint was
        registered, e.g. by Ray, must not log those epochs twice)."""
        self._logged = self.tracker.logged_steps("train_loss")
        for row in self.history:
            self._log_epoch(row)

    def _log_epoch(self, row: dict) -> None:
        if row["epoch"] in self._logged:
            return
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        self._logged.add(row["epoch"])

    def _train_epochs(self, last: Path) -> None:
        cfg, monitor = self.cfg, self.cfg.train.monitor
        patience = cfg.train.early_stopping_patience
        while self.epoch < cfg.train.epochs:
            if patience is not None and self.epoch - self.best_epoch >= patience:
                log.info("early stopping: no better val %s for %d epochs", monitor, patience)
                break
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
            train_loss = train_one_epoch(self.train_model, self.loaders["train"], self.optimizer, self.device,
                                         self.scaler, self.epoch, self.progress)
            self.scheduler.step()
            if self.sampler is not None:  # BatchNorm statistics drift apart per rank: use rank 0's everywhere
                for buffer in self.model.buffers():
                    dist.broadcast(buffer, src=0)
            val = evaluate(self.model, self.loaders["val"], self.device, self.data.class_names)
            row = {"epoch": self.epoch, "lr": lr, "train_loss": train_loss,
                   **{f"val_{k}": v for k, v in val.items() if k in ("accuracy", "auc", "f1", "loss")}}
            self.history.append(row)
            improved = _better(monitor, val[monitor], self.best)
            if improved:
                self.best, self.best_epoch = val[monitor], self.epoch
                _atomic_save({"model": self.model.state_dict(), "config": cfg.to_dict(),
                              "class_names": self.data.class_names, "epoch": self.epoch, "val": val},
                             self.out / "best.pt")
            _atomic_save(self._checkpoint(), last)
            if self.on_report:  # before MLflow: an epoch is logged only once its checkpoint is persisted
                self.on_report(dict(row))
            if self.tracker:
                self._log_epoch(row)
            log.info("epoch %d  lr %.2e  train_loss %.4f  val_%s %.4f%s", self.epoch, lr, train_loss, monitor,
                     val[monitor], "  (best)" if improved else "")
            if self.progress:
                print(f"epoch {self.epoch:3d}  lr {lr:.2e}  train_loss {train_loss:.4f}  "
                      f"val_acc {val['accuracy']:.4f}  val_auc {val['auc']:.4f}" + ("  *" if improved else ""))

    def _test(self) -> dict:
        best = self.out / "best.pt"
        if best.is_file():
            self.model.load_state_dict(torch.load(best, map_location=self.device, weights_only=True)["model"])
        metrics, labels, probs = predict_metrics(self.model, self.loaders["test"], self.device,
                                                 self.data.class_names)
        metrics["best_epoch"] = self.best_epoch
        if self.is_main:
            write_report(metrics, labels, probs, self.data.class_names, self.out, self.tracker, self.history)
        if self.tracker:
            self.tracker.log_model(self.model)
        if self.on_report:
            self.on_report({"epoch": self.epoch, **{f"test_{k}": v for k, v in metrics.items() if k in METRIC_KEYS}})
        return metrics


def cross_validate(cfg: Config, output_dir: str | Path, tracker_factory=None, resume: bool = False,
                   progress: bool = True) -> dict:
    """Train one model per fold (``data.fold`` = 0 .. num_folds - 1) into ``output_dir/fold_k`` and
    write ``kfold_metrics.json``: every fold's test metrics and their mean and std (as the paper
    reports its 5-fold results)."""
    from dataclasses import replace

    from .data import build_datasets

    out, folds = Path(output_dir), []
    for k in range(cfg.data.num_folds):
        fold_cfg = replace(cfg, data=replace(cfg.data, fold=k))
        tracker = tracker_factory() if tracker_factory else None
        trainer = Trainer(fold_cfg, build_datasets(fold_cfg.data), out / f"fold_{k}", tracker=tracker,
                          progress=progress)
        folds.append(trainer.fit(resume=resume))
    summary = {
        "folds": [{k: m[k] for k in METRIC_KEYS} for m in folds],
        "mean": {k: float(np.mean([m[k] for m in folds])) for k in METRIC_KEYS},
        "std": {k: float(np.std([m[k] for m in folds], ddof=1)) if len(folds) > 1 else 0.0 for k in METRIC_KEYS},
    }
    (out / "kfold_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_report(metrics: dict, labels: np.ndarray, probs: np.ndarray, class_names: list[str], out: Path,
                 tracker: Tracker | None, history: list[dict] | None = None) -> None:
    """metrics.json and the figures in ``out``; to MLflow as test_* metrics and artifacts."""
    out = Path(out)
    files = [out / "metrics.json"]
    files[0].write_text(json.dumps(metrics, indent=2))
    files.append(plot_confusion_matrix(metrics["confusion_matrix"], class_names, out / "confusion_matrix.png"))
    files.append(plot_roc_curves(labels, probs, class_names, out / "roc.png"))
    if history:
        (out / "history.json").write_text(json.dumps(history, indent=2))
        files += [out / "history.json", plot_training_curves(history, out / "training_curves.png")]
    if tracker:
        tracker.log_metrics(metrics, prefix="test_")
        for path in files + [out / "config.yaml"]:
            if path.is_file():
                tracker.log_artifact(path)
