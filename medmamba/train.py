"""Training: one loop serving the CLI, Ray Train workers, Ray Tune trials and Flower clients.

``train_one_epoch`` is the building block; ``Trainer.fit`` runs the whole recipe of a config:
epochs with MultiStepLR, validation each epoch, the best checkpoint by a validation metric, a
resumable ``last.pt``, and the test pass of the best checkpoint (``evaluation.evaluate_model``).
What differs between the entry points plugs in as callbacks: MLflow logging (``MlflowLogger``),
early stopping (``EarlyStopping``, from ``train.early_stopping_patience``), reporting to Ray
Train or Tune (in ``medmamba.orchestrator``).

Checkpoints are written atomically by ``CheckpointWriter``: when training on a GPU, on a background
thread (after a kill, a resume loses at most the epoch in progress and the one being written); on
the CPU, before the next epoch starts (a resume loses at most the epoch in progress).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torch.utils._pytree import tree_map
from tqdm import tqdm

from .config import Config, OptimConfig, SchedConfig, TrainConfig, check_resumable, save_config
from .data import Datasets, make_loader
from .evaluation import evaluate_model, predict_metrics, shard
from .flops import complexity
from .model import MedMamba
from .metrics import METRIC_KEYS, is_better
from .errors import CheckpointError, ConfigError, DataError, Terminated, TrainingError
from .registry import build_model, load_pretrained, read_checkpoint
from .runtime import autocast_dtype, resolve_device, rng_state, seed_everything, set_rng_state, world
from .tracking import Tracker, finishing, git_commit, open_tracker

log = logging.getLogger(__name__)


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


CHECK_EVERY = 32  # steps between the loss checks that wait for the device


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None, epoch: int = 0,
                    progress: bool = True, proximal: tuple[float, list[torch.Tensor]] | None = None,
                    amp: torch.dtype | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``amp``: the autocast dtype (None: fp32); fp16 needs ``scaler``. ``proximal=(mu,
    reference_params)`` adds FedProx's (mu / 2) ||w - w_ref||^2 to the loss. The loss is summed
    on the device and checked every CHECK_EVERY steps (no host sync per step); raises
    TrainingError (a FloatingPointError) naming the first step whose loss was not finite.
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    bad_value = torch.zeros((), device=device)
    count = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if progress else True)  # None: off without a TTY

    def check(step: int) -> None:
        if first_bad.item() >= 0:
            raise TrainingError(f"training loss became {bad_value.item()} at epoch {epoch}, step {first_bad.item()}; "
                                "lower optim.lr or check the data")
        if not bar.disable:
            bar.set_postfix(loss=f"{total.item() / max(count, 1):.4f}")

    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        if proximal is not None:
            mu, ref = proximal
            loss = loss + mu / 2 * sum((p - r).pow(2).sum() for p, r in zip(model.parameters(), ref))
        finite = torch.isfinite(loss.detach())
        newly_bad = ~finite & (first_bad < 0)
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_value = torch.where(newly_bad, loss.detach().float(), bad_value)
        if step % CHECK_EVERY == 0:
            check(step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.detach().double() * len(y)
        count += len(y)
    check(-1)
    if world()[1] > 1:  # the mean over every rank's examples
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        return (sums[0] / sums[1].clamp(min=1)).item()
    return total.item() / max(count, 1)


def train_precision(t: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``train.amp``'s autocast dtype on ``device`` (None: fp32) and, for fp16, its GradScaler."""
    amp = autocast_dtype(t.amp, device)
    return amp, torch.amp.GradScaler("cuda") if amp == torch.float16 else None


def for_training(model: nn.Module, t: TrainConfig) -> nn.Module:
    """The module the training steps call: ``torch.compile(model)`` under ``train.compile``. The
    model itself stays eager, so evaluation, checkpoints and state-dict keys are as without.
    Shapes are static (a smaller last batch compiles once more): with dynamic ones, a process that
    had compiled MedMamba at another image size made the sizes symbolic, and inductor failed on
    them (PatchMerging's padding)."""
    if not t.compile:
        return model
    log.info("train.compile: the first training steps compile the model (a minute or more)")
    return torch.compile(model, dynamic=False)


@contextmanager
def compile_failures():
    """A failed ``train.compile`` (no C++ compiler for inductor on a CPU, no Triton on a GPU, ...)
    as a one-line ConfigError naming the way out, not torch's page of traceback."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", exc)
        reason = (str(inner).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"train.compile: torch.compile could not compile the model ({type(inner).__name__}: "
                          f"{reason}); set train.compile=false to train without it") from exc


def _atomic_save(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary file: a crash mid-write never leaves a
    truncated checkpoint, and a failed write (a full disk) leaves no partial file."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = "no space left on device" if _no_space(exc, path) else f"{type(exc).__name__}: {exc}"
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{reason} writing {path}") from exc


def _no_space(exc: BaseException, path: Path) -> bool:
    """Whether a failed write was a full disk (torch reports it as a RuntimeError of its zip writer)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        return False


def _snapshot(obj):
    """A copy of ``obj``'s tensors on the CPU, so training can go on while it is written."""
    return tree_map(lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v, obj)


class CheckpointWriter:
    """Writes an epoch's checkpoint files, each atomically. With ``background``, on a thread, one
    epoch at a time (submitting waits for the previous epoch); else before ``submit`` returns.
    ``persisted`` is the last epoch on disk.

    Background writing pays off only while the CPU idles (the GPU trains). On a CPU-bound run the
    writer must not take the cores from training, so it would lag a whole epoch behind it, for no
    gain: a save is a few percent of an epoch (benchmarks/checkpoint.py)."""

    def __init__(self, background: bool = True):
        self.background = background
        self.persisted = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, epoch: int, files: list[tuple[dict, Path]]) -> None:
        self.wait()
        if not self.background:
            self._save(epoch, files)
            return
        files = [(_snapshot(obj), path) for obj, path in files]
        self._thread = threading.Thread(target=self._write, args=(epoch, files), name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def _save(self, epoch: int, files: list[tuple[dict, Path]]) -> None:
        for obj, path in files:
            _atomic_save(obj, path)
        self.persisted = epoch

    def _write(self, epoch: int, files: list[tuple[dict, Path]]) -> None:
        """The background thread's work."""
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # training keeps the cores
        try:
            self._save(epoch, files)
        except BaseException as exc:  # raised in the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the submitted files are on disk; re-raise a failed write."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Callback:
    """What an entry point plugs into ``Trainer.fit``. ``on_epoch_end`` receives the epoch's
    history row once its checkpoint is submitted (``trainer.checkpoints.wait()`` to have it on
    disk); ``on_fit_end`` the run status: FINISHED, FAILED or KILLED."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...

    def on_test_end(self, trainer: Trainer, metrics: dict, files: list[Path]) -> None: ...

    def on_fit_end(self, trainer: Trainer, status: str) -> None: ...


class EarlyStopping(Callback):
    """Stop when validation ``train.monitor`` has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def _check(self, trainer: Trainer) -> None:
        if trainer.epoch - trainer.best_epoch >= self.patience:
            log.info("early stopping: no better val %s for %d epochs", trainer.cfg.train.monitor, self.patience)
            trainer.should_stop = True

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.epoch:  # a resumed run that had already stopped stays stopped
            self._check(trainer)

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self._check(trainer)


class StopWhenSet(Callback):
    """End the run at the first epoch end after ``event`` is set, as Ctrl-C would (``Terminated``:
    checkpoints kept, the run KILLED): a stop for a Trainer in a thread that signals cannot reach.
    Put it after the other callbacks, which then see that epoch's end first."""

    def __init__(self, event: threading.Event):
        self.event = event

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.event.is_set():
            raise Terminated()


class MlflowLogger(Callback):
    """Logs the run to MLflow: config as params, tags, each epoch once its checkpoint is on disk
    (so a resume never logs an epoch twice), the test metrics, report files and the model. A
    resumed run continues its MLflow run (its id is in last.pt); ``run_id`` names a run to
    continue when the trainer has none (a Ray Train worker group restarted from scratch)."""

    def __init__(self, tracker: Tracker, run_id: str | None = None, tags: dict[str, Any] | None = None):
        self.tracker, self.run_id, self.tags = tracker, run_id, dict(tags or {})
        self.pending: list[dict] = []
        self.logged: set[int] = set()

    def on_fit_start(self, trainer: Trainer) -> None:
        cfg, data = trainer.cfg, trainer.data
        cost = complexity(trainer.model, cfg.data.size)
        tags = {"git_commit": git_commit(), "dataset": data.name, "dataset_md5": data.checksum,
                "model": cfg.model.name, "parameters": cost.params,
                "gflops": f"{cost.paper_macs / 1e9:.4f}", "gflops_full": f"{cost.full_macs / 1e9:.4f}",
                "model_source": "medmamba" if isinstance(trainer.model, MedMamba) else "timm", **self.tags}
        if data.num_classes == 2:  # its P, Se, Sp and F1 are this class's (see metrics.py)
            tags["positive_class"] = data.class_names[data.positive_class]
        run_file = trainer.out / RUN_FILE  # a kill before the first checkpoint must not start a second run
        known = json.loads(run_file.read_text())["run_id"] if run_file.is_file() and trainer.resuming else None
        trainer.run_id = self.tracker.start(cfg.mlflow.run_name, cfg.flat(), tags,
                                            run_id=trainer.run_id or self.run_id or known)
        trainer.experiment = cfg.mlflow.experiment
        if trainer.is_main:
            run_file.write_text(json.dumps({"run_id": trainer.run_id, "experiment": trainer.experiment}))
        # epochs in last.pt that a kill between checkpoint and MLflow call left unlogged
        self.logged = self.tracker.logged_steps("train_loss")
        self.pending = list(trainer.history)
        self._log_persisted(trainer.checkpoints.persisted)

    def _log_persisted(self, persisted: int) -> None:
        while self.pending and self.pending[0]["epoch"] <= persisted:
            row = self.pending.pop(0)
            if row["epoch"] not in self.logged:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
                self.logged.add(row["epoch"])

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self.pending.append(row)
        self._log_persisted(trainer.checkpoints.persisted)

    def on_test_end(self, trainer: Trainer, metrics: dict, files: list[Path]) -> None:
        self.tracker.log_evaluation("test", metrics, files + [trainer.out / "config.yaml"])
        self.tracker.log_model(trainer.model)

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self._log_persisted(trainer.checkpoints.persisted)
        self.tracker.end(status)


RUN_FILE = "mlflow_run.json"  # the MLflow run of an output directory, written when the run starts


def tracking_callbacks(cfg: Config, tags: dict[str, Any] | None = None) -> list[Callback]:
    """``[MlflowLogger]`` (its run also tagged with ``tags``) for a config whose ``mlflow.enabled``
    is true, else ``[]``."""
    tracker = open_tracker(cfg.mlflow)
    return [MlflowLogger(tracker, tags=tags)] if tracker else []


class Trainer:
    """Runs a config's recipe on ``data``, writing checkpoints and metrics under ``output_dir``.

    Inside a torch.distributed process group (Ray Train workers) the model is wrapped in DDP,
    each rank trains on its DistributedSampler shard of the train set (``train.batch_size`` stays
    the global batch) and evaluates its shard of val/test; metrics are computed on the gathered
    predictions of the whole split. Every rank keeps its own checkpoints (for resuming).
    """

    def __init__(self, cfg: Config, data: Datasets, output_dir: str | Path, callbacks: list[Callback] = (),
                 progress: bool = True):
        self.cfg, self.data, self.progress = cfg, data, progress
        t, (rank, size) = cfg.train, world()
        self.batch_size = math.ceil(t.batch_size / size)
        if self.batch_size < 2:  # a training batch of one image cannot be batch-normalised
            raise ConfigError(f"train.batch_size is {t.batch_size}: training needs at least 2 images per batch"
                              + (f" on each of its {size} workers" if size > 1 else "") + " (batch normalisation)")
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        # model.pretrained is loaded by fit(), unless it resumes
        self.model = build_model(cfg.model, data.num_classes, cfg.data.size, pretrained=False,
                                 data_name=data.name).to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.sched)
        self.amp, self.scaler = train_precision(cfg.train, self.device)
        self.sampler = None
        self.train_model: nn.Module = self.model
        if size > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.sampler = DistributedSampler(data.train, num_replicas=size, rank=rank, shuffle=True, seed=t.seed)
        self.train_model = for_training(self.train_model, t)
        self.train_loader = make_loader(data.train, self.batch_size, True, t.seed, cfg.data.num_workers,
                                        sampler=self.sampler)
        self.val_loader = make_loader(shard(data.val), self.batch_size, False, num_workers=cfg.data.num_workers)
        self.callbacks = list(callbacks)
        if t.early_stopping_patience is not None:
            self.callbacks.append(EarlyStopping(t.early_stopping_patience))
        self.checkpoints = CheckpointWriter(background=self.device.type != "cpu")
        self.is_main = rank == 0
        self.epoch, self.best, self.best_epoch, self.history = 0, None, 0, []
        self.run_id: str | None = None  # the MLflow run, kept in every checkpoint
        self.experiment: str | None = None
        self.should_stop = False
        self.resuming = False  # fit(resume=True): continue what output_dir holds

    def _resume_state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history,
            "run_id": self.run_id, "experiment": self.experiment, "config": self.cfg.to_dict(),
            "class_names": self.data.class_names, "data_checksum": self.data.checksum,
            "rng": rng_state(self.train_loader.generator),
        }

    def _restore(self, path: Path) -> None:
        """Continue from ``last.pt``: read on the CPU (tensors and plain data only, whatever device
        wrote it), then loaded into the model and optimizer on the training device."""
        state = read_checkpoint(path)
        check_resumable(state["config"], self.cfg, path)
        then = state.get("data_checksum", self.data.checksum)  # (not kept before 2026-12-04)
        if then != self.data.checksum:
            raise DataError(f"--resume: {path} was trained on other images than {self.data.name} holds now (data "
                            f"checksum {then[:8]} then, {self.data.checksum[:8]} now: files or splits changed); "
                            "resume on the same images (data.root may move) or start a new --output-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.history, self.run_id, self.experiment = state["history"], state["run_id"], state.get("experiment")
        set_rng_state(state["rng"], self.train_loader.generator)
        self.checkpoints.persisted = self.epoch
        log.info("resumed from %s after epoch %d", path, self.epoch)

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def fit(self, resume: bool = False, test: bool = True) -> dict:
        """Train, keep the best checkpoint, and return the best checkpoint's test metrics
        (with ``test=False``: the last epoch's history row, and no test pass)."""
        last = self.out / "last.pt"
        self.resuming = resume
        if resume and last.is_file():
            self._restore(last)
        elif resume and (self.out / "metrics.json").is_file():  # finished, its resume state removed
            raise CheckpointError(f"--resume: {self.out} holds a finished run without last.pt, its resume state, so "
                                  "it cannot continue (training again would overwrite its best.pt); start a new "
                                  "--output-dir, with model.pretrained=<its best.pt> to fine-tune from it")
        elif self.cfg.model.pretrained:
            load_pretrained(self.model, self.cfg.model.pretrained)
        if self.is_main:
            save_config(self.cfg, self.out / "config.yaml")
        with finishing(lambda status: self._emit("on_fit_end", status)):
            self._emit("on_fit_start")
            try:
                self._train_epochs(last)
            finally:
                self.checkpoints.wait()
            return self._test() if test else dict(self.history[-1] if self.history else {})

    def _train_epochs(self, last: Path) -> None:
        cfg, monitor = self.cfg, self.cfg.train.monitor
        while self.epoch < cfg.train.epochs and not self.should_stop:
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
            with compile_failures():
                train_loss = train_one_epoch(self.train_model, self.train_loader, self.optimizer, self.device,
                                             self.scaler, self.epoch, self.progress, amp=self.amp)
            self.scheduler.step()
            if self.sampler is not None:  # BatchNorm statistics drift apart per rank: use rank 0's everywhere
                for buffer in self.model.buffers():
                    dist.broadcast(buffer, src=0)
            val = predict_metrics(self.model, self.val_loader, self.device, self.data.class_names,
                                  self.data.positive_class)[0]
            row = {"epoch": self.epoch, "lr": lr, "train_loss": train_loss,
                   **{f"val_{k}": v for k, v in val.items() if k in ("accuracy", "auc", "f1", "loss")}}
            self.history.append(row)
            files = []
            improved = is_better(monitor, val[monitor], self.best)
            if improved:
                self.best, self.best_epoch = val[monitor], self.epoch
                files.append(({"model": self.model.state_dict(), "config": cfg.to_dict(),
                               "class_names": self.data.class_names, "epoch": self.epoch, "val": val,
                               "run_id": self.run_id, "experiment": self.experiment}, self.out / "best.pt"))
            self.checkpoints.submit(self.epoch, files + [(self._resume_state(), last)])
            self._emit("on_epoch_end", dict(row))
            (log.debug if self.progress else log.info)(  # with progress, the line below says it
                "epoch %d  lr %.2e  train_loss %.4f  val_%s %.4f%s", self.epoch, lr, train_loss, monitor, val[monitor],
                "  (best)" if improved else "")
            if self.progress:
                print(f"epoch {self.epoch:3d}  lr {lr:.2e}  train_loss {train_loss:.4f}  "
                      f"val_acc {val['accuracy']:.4f}  val_auc {val['auc']:.4f}" + ("  *" if improved else ""))

    def _test(self) -> dict:
        best = self.out / "best.pt"
        if best.is_file():
            self.model.load_state_dict(read_checkpoint(best)["model"])
        metrics, files = evaluate_model(self.model, self.data, "test", self.out, self.device, self.batch_size,
                                        self.history, extra={"best_epoch": self.best_epoch})
        self._emit("on_test_end", metrics, files)
        return metrics


def cross_validate(cfg: Config, output_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train one model per fold (``data.fold`` = 0 .. num_folds - 1) into ``output_dir/fold_k`` and
    write ``kfold_metrics.json``: every fold's test metrics and their mean and std (as the paper
    reports its 5-fold results)."""
    from dataclasses import replace

    from .data import build_datasets

    out, folds = Path(output_dir), []
    for k in range(cfg.data.num_folds):
        fold_cfg = replace(cfg, data=replace(cfg.data, fold=k))
        trainer = Trainer(fold_cfg, build_datasets(fold_cfg.data), out / f"fold_{k}",
                          callbacks=tracking_callbacks(fold_cfg), progress=progress)
        folds.append(trainer.fit(resume=resume))
    summary = {
        "folds": [{k: m[k] for k in METRIC_KEYS} for m in folds],
        "mean": {k: float(np.mean([m[k] for m in folds])) for k in METRIC_KEYS},
        "std": {k: float(np.std([m[k] for m in folds], ddof=1)) if len(folds) > 1 else 0.0 for k in METRIC_KEYS},
    }
    (out / "kfold_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
