"""The ``medmamba`` command line."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from .config import absolute_paths, check_new_output, load_config, set_key, validate
from .errors import ConfigError, MedMambaError, Terminated
from .flops import complexity
from .kernels import auto_backend
from .registry import create_model, list_models
from .runtime import resolve_device

# Data, metrics, training and MLflow are imported inside the commands that use them: importing
# medmnist, scikit-learn and mlflow costs seconds that `medmamba info` does not need.

EVALUATE_EXPERIMENT = "medmamba-evaluate"  # evaluation runs, each tagged with the run that trained its checkpoint


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (images, classes, channels, pixels)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _info(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, img_size=args.img_size)
    c = complexity(model, args.img_size, args.in_chans)
    print(f"{args.model}  img {args.img_size}px  {args.num_classes} classes  {args.in_chans} channels")
    print(f"  parameters                      {c.params / 1e6:8.2f} M")
    print(f"  GFLOPs, paper (conv + linear)   {c.paper_macs / 1e9:8.1f} G   ({c.paper_macs / 1e9:.3f})")
    parts = {"einsum": c.einsum_macs, "scan": c.scan_macs} if c.scan_macs else {"attention etc.": c.other_macs}
    print(f"  GFLOPs, full (all products)     {c.full_macs / 1e9:8.2f} G"
          f"   ({', '.join(f'{k} {v / 1e9:.2f} G' for k, v in parts.items())})")
    if c.scan_macs:  # the kernel its scans run on where training here runs (a CPU's is built on first use)
        device = resolve_device()  # train.device's default: the GPU if there is one
        name, why = auto_backend(device)
        print(f"  {'selective scan on ' + device.type:<32}{name}: {why}")
    return 0


def _run_config(args: argparse.Namespace):
    """The command's config: the file and --set overrides, then --tracking-uri / --no-mlflow;
    data.root absolute, so the checkpoints' configs find the data from any folder."""
    cfg = absolute_paths(load_config(args.config, args.set))
    if args.tracking_uri:
        cfg.mlflow.tracking_uri = args.tracking_uri
    if args.no_mlflow:
        cfg.mlflow.enabled = False
    return cfg


def _train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    check_new_output(args.output_dir, "training run", ("last.pt", "ray_run.json"), args.resume)  # one process's, Ray Train's
    if args.kfold:
        return _cross_validate(cfg, args)
    if args.workers is not None:
        return _train_distributed(cfg, args)
    from .data import build_datasets
    from .train import Trainer, tracking_callbacks

    callbacks = tracking_callbacks(cfg)  # an unreachable tracking server fails here, before the data loads
    metrics = Trainer(cfg, build_datasets(cfg.data), args.output_dir, callbacks=callbacks).fit(resume=args.resume)
    print_metrics(metrics, f"test metrics of the best checkpoint ({args.output_dir}/best.pt)")
    return 0


def _train_distributed(cfg, args: argparse.Namespace) -> int:
    from medmamba.orchestrator.train import train_distributed

    set_key(cfg, "ray.num_workers", args.workers)  # (checked as the config key would be)
    if args.gpus_per_worker is not None:
        set_key(cfg, "ray.gpus_per_worker", args.gpus_per_worker)
    validate(cfg)
    metrics = train_distributed(cfg, args.output_dir, resume=args.resume)
    print_metrics(metrics, f"test metrics of the best checkpoint ({args.output_dir}/best.pt), "
                           f"{cfg.ray.num_workers} Ray Train workers")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from medmamba.orchestrator.sweep import run_sweep

    cfg = _run_config(args)
    summary = run_sweep(cfg, args.output_dir, resume=args.resume)
    print(f"best {cfg.tune.metric} {summary['best_value']:.4f} with {summary['best_params']}; "
          f"config: {args.output_dir}/best_config.yaml")
    print_metrics(summary["test_metrics"], f"test metrics of the best trial ({args.output_dir}/best.pt)")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from medmamba.orchestrator.matrix import run_matrix

    cfg = _run_config(args)
    result = run_matrix(cfg, args.output_dir, resume=args.resume)
    failed = [row for row in result["cells"] if row["status"] != "done"]
    for row in failed:
        print(f"{row['status']} cell: {', '.join(f'{k}={row[k]}' for k in cfg.matrix)}: {row['error']}")
    print(f"{len(result['cells']) - len(failed)} of {len(result['cells'])} cells finished; per cell: "
          f"{args.output_dir}/matrix.csv, mean ± std per group: {args.output_dir}/summary.csv")
    return 1 if failed else 0


def _federate(args: argparse.Namespace) -> int:
    from medmamba.federated.simulation import run_federated

    if args.holdout_site:
        args.set.append(f"federated.holdout_site={args.holdout_site}")
    cfg = _run_config(args)
    report = run_federated(cfg, args.output_dir, resume=args.resume)
    best = report["best"]
    print_metrics(best["test"], f"global model of round {best['round']} (the best by federated validation "
                                f"{best['metric']}) on {report['global_test']} ({args.output_dir}/best.pt)")
    last = report["rounds"][-1]
    print_metrics(last["global"], f"global model after the last round, {last['round']} ({args.output_dir}/final.pt)")
    if "centralized" in report:
        print_metrics(report["centralized"], "centralised training on the pooled sites, same test set")
    for failure in (f for row in report["rounds"] for f in row["failures"]):
        print(f"failure: {failure}")
    return 0


def _cross_validate(cfg, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .train import cross_validate

    summary = cross_validate(cfg, args.output_dir, resume=args.resume)
    table = Table(title=f"{cfg.data.num_folds}-fold cross-validation, test metrics (mean ± std)")
    for key in summary["mean"]:
        table.add_column(key)
    table.add_row(*(f"{summary['mean'][k]:.4f} ± {summary['std'][k]:.4f}" for k in summary["mean"]))
    Console().print(table)
    return 0


@contextlib.contextmanager
def _checkpoint_run(args: argparse.Namespace, kind: str, params: dict | None = None, with_data: bool = True,
                    federated: bool = False):
    """The checkpoint of ``args`` loaded with its data, inside one MLflow run of the evaluation
    experiment tagged with its kind, the datasets and the run that trained the checkpoint.
    ``federated``: refuse a checkpoint that no federation saved. Yields (Loaded, Tracker or None)."""
    from .config import MlflowConfig
    from .data import parse_class_map
    from .evaluation import load_checkpoint
    from .registry import read_checkpoint
    from .tracking import mlflow_run, open_tracker

    class_map = parse_class_map(args.class_map) if args.class_map else None
    tracker = open_tracker(MlflowConfig(enabled=not args.no_mlflow, tracking_uri=args.tracking_uri,
                                        experiment=EVALUATE_EXPERIMENT))
    state = read_checkpoint(args.checkpoint)  # read once: its config and its weights
    if federated and "round" not in state:  # (a federation's best.pt and final.pt name their round)
        raise ConfigError(f"{args.checkpoint} is not from a federation (medmamba federate), so it has no sites")
    overrides = {k: v for k, v in (("name", args.dataset), ("root", args.data_root), ("size", args.size)) if v}
    source = {"source_run_id": state.get("run_id"), "source_experiment": state.get("experiment")}
    with mlflow_run(tracker, None, {"checkpoint": args.checkpoint, "split": args.split, **(params or {})},
                    {"kind": kind, **{k: v for k, v in source.items() if v}}):
        loaded = load_checkpoint(state, overrides, args.device, args.model, class_map, args.split == "all", with_data)
        if tracker:
            tracker.set_tags({"model": loaded.model_cfg.name, **loaded.source,
                              **({"dataset": loaded.data.name, "dataset_md5": loaded.data.checksum} if loaded.data else {}),
                              **({"class_map": args.class_map} if args.class_map else {})})
        yield loaded, tracker


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoint

    with _checkpoint_run(args, "evaluate") as (loaded, tracker):
        ev = evaluate_checkpoint(loaded, args.split, args.output_dir, args.batch_size)
        if tracker:
            tracker.log_evaluation(args.split, ev.metrics, ev.files)
    if ev.data.unmapped:
        print(f"dropped (not in --class-map): {', '.join(f'{k} {v} images' for k, v in ev.data.unmapped.items())}")
    if ev.metrics.get("classes_without_images"):
        print(f"model classes without images here: {', '.join(ev.metrics['classes_without_images'])}")
    print_metrics(ev.metrics, f"{ev.data.name} {args.split} split")
    return 0


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .explain import check_methods, explain

    methods = args.method or ["gradcam", "gradcam++"]
    check_methods(methods)  # before any data is read
    missing = [path for path in args.images or [] if not Path(path).is_file()]
    if missing:  # before a checkpoint is loaded or an MLflow run opened
        raise ConfigError(f"--images: no such file: {', '.join(missing)}")
    with _checkpoint_run(args, "explain", {"methods": ",".join(methods)}, with_data=not args.images) as (loaded, tracker):
        if args.images:
            window = loaded.config.data.window if loaded.config else None  # the trained images' intensity window
            images, labels, ids = _image_files(args.images, loaded.size, window), None, {"paths": np.array(args.images)}
        else:
            dataset = getattr(loaded.data, args.split)
            picked = np.sort(np.random.default_rng(args.seed).choice(len(dataset), min(args.num_images, len(dataset)),
                                                                     replace=False))
            images = torch.stack([dataset[int(i)][0] for i in picked])
            labels, ids = np.array([dataset[int(i)][1] for i in picked]), {"indices": picked}
        files = explain(loaded.model, images.to(loaded.device), labels, loaded.class_names, args.output_dir,
                        methods, args.target_layer, args.target, ids)
        for file in files if tracker else []:
            tracker.log_artifact(file, "explain")
    print(f"{len(images)} images, {', '.join(methods)}: {', '.join(str(f) for f in files)}")
    return 0


def _image_files(paths: list[str], size: int, window: list[float] | None = None):
    """Image files as one batch of model inputs (the evaluation transform at ``size`` px, with
    ``data.window`` for 16-bit and floating-point images)."""
    import torch
    from PIL import Image

    from .data import image_transform
    from .errors import DataError

    transform, images = image_transform(size, window=window), []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(transform(im))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    return torch.stack(images)


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import make_loader
    from .embed import check_projections, embed, features

    methods = args.method or ["tsne"]
    check_projections(methods)  # before any data is read
    params = {"methods": ",".join(methods), "by_site": args.by_site}
    with _checkpoint_run(args, "embed", params, with_data=not args.by_site, federated=args.by_site) as (loaded,
                                                                                                     tracker):
        parts = {}
        for name, data in _embedding_groups(args, loaded):
            dataset = getattr(data, args.split)
            if args.max_images and len(dataset) > args.max_images:
                from torch.utils.data import Subset

                keep = np.random.default_rng(args.seed).choice(len(dataset), args.max_images, replace=False)
                dataset = Subset(dataset, np.sort(keep).tolist())
            parts[name] = features(loaded.model, make_loader(dataset, args.batch_size, shuffle=False), loaded.device)
        summary, files = embed(parts, loaded.class_names, args.output_dir, methods, args.seed,
                               f"{loaded.model_cfg.name} on {', '.join(parts)} {args.split}")
        if tracker:
            tracker.log_metrics(summary)
            for file in files:
                tracker.log_artifact(file, "embed")
    print(f"silhouette score of the classes in feature space: {summary['silhouette']:.4f} "
          f"({summary['points']} images); files: {', '.join(str(f) for f in files)}")
    return 0


def _embedding_groups(args: argparse.Namespace, loaded):
    """[(group name, Datasets)]: the data, or with --by-site each site of the checkpoint's federation."""
    if not args.by_site:
        return [(loaded.data.name, loaded.data)]
    from medmamba.federated.task import build_site, site_names

    if loaded.config is None:
        raise ConfigError("--by-site needs a checkpoint with its config (the federation's sites)")
    cfg = loaded.config
    if args.data_root:
        cfg.data.root = args.data_root
    return [(name, build_site(cfg, i)) for i, name in enumerate(site_names(cfg))]


def _robustness(args: argparse.Namespace) -> int:
    from .reports import print_table
    from .robustness import PERTURBATIONS, check, drops, evaluate_robustness, write_robustness

    perturbations, severities = args.perturbation or list(PERTURBATIONS), args.severity or [0, 1, 2, 3, 4, 5]
    check(perturbations, severities)  # before any data is read
    params = {"perturbations": ",".join(perturbations), "severities": ",".join(map(str, severities)), "seed": args.seed}
    with _checkpoint_run(args, "robustness", params) as (loaded, tracker):
        rows = evaluate_robustness(loaded.model, getattr(loaded.data, args.split), loaded.class_names, loaded.device,
                                   perturbations, severities, args.batch_size, args.seed, loaded.data.positive_class)
        files = write_robustness(rows, args.output_dir)
        summary = drops(rows)
        if tracker:
            for row in rows:
                tracker.log_metrics({f"{row['perturbation']}/{k}": v for k, v in row.items()
                                     if k not in ("perturbation", "severity", "level")}, step=row["severity"])
            tracker.log_metrics({f"drop/{row['perturbation']}_{m}": row[f"{m}_drop"] for row in summary
                                 for m in ("accuracy", "auc") if f"{m}_drop" in row})
            for file in files:
                tracker.log_artifact(file, "robustness")
    print_table(summary, f"{loaded.model_cfg.name} on {loaded.data.name} {args.split}: at the highest severity",
                ["perturbation", "max_severity", "accuracy_clean", "accuracy_worst", "accuracy_drop", "auc_clean",
                 "auc_worst", "auc_drop"])
    print(f"files: {', '.join(str(f) for f in files)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from .comparison import read_results, runs_text, write_report
    from .config import MlflowConfig
    from .tracking import check_store, mlflow_run, open_tracker, resolve_uri

    if not (args.experiment or args.run_id or args.parent_run):
        raise ConfigError("say which runs to report: --experiment NAME, --run-id ID and/or --parent-run ID")
    tags = dict(parse_tag(t) for t in args.tag)
    uri = resolve_uri(args.tracking_uri)
    check_store(uri, existing=True)
    results, counts = read_results(MlflowClient(uri), args.experiment, args.run_id, args.parent_run, tags)
    selection = args.experiment + args.run_id + ([f"runs under {args.parent_run}"] if args.parent_run else [])
    title = args.title or f"MedMamba report: {', '.join(selection)}"
    files = write_report(results, counts, args.output_dir, title)
    tracker = open_tracker(MlflowConfig(enabled=not args.no_mlflow, tracking_uri=uri,
                                        experiment=args.report_experiment))
    with mlflow_run(tracker, None, {"experiments": ",".join(args.experiment), "runs": len(results)},
                    {"kind": "report", **{f"filter.{k}": v for k, v in tags.items()}}):
        for file in files if tracker else []:
            tracker.log_artifact(file)
    print((args.output_dir / "report.md").read_text())
    print(f"{runs_text(len(results))}; files in {args.output_dir} (report.html, report.md, report.tex, report.csv)")
    return 0


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--tag {text!r} is not KEY=VALUE")
    return key, value


def print_metrics(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from .metrics import METRIC_KEYS

    table = Table(title=title)
    for key in METRIC_KEYS:
        table.add_column(key)
    table.add_row(*(f"{metrics[k]:.4f}" for k in METRIC_KEYS))
    Console().print(table)


def _run_command(sub, name: str, help: str, config_help: str, resume_help: str) -> argparse.ArgumentParser:
    """A command that runs a config: --config, --set, --output-dir, --resume and MLflow options."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("--config", type=Path, required=name != "train", help=config_help)
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    cmd.add_argument("--output-dir", type=Path, required=True)
    cmd.add_argument("--resume", action="store_true", help=resume_help)
    cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    cmd.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return cmd


def _checkpoint_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command that runs a checkpoint on a dataset split: the checkpoint, the data (its own or
    another, with a class map), the device and MLflow options."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("--checkpoint", required=True)
    cmd.add_argument("--dataset", help="MedMNIST flag or 'folder' (default: the checkpoint's)")
    cmd.add_argument("--data-root")
    cmd.add_argument("--size", type=_count)
    cmd.add_argument("--class-map", metavar="SRC=DST,...",
                     help="an image folder's class names onto the model's; folders it does not name are dropped")
    cmd.add_argument("--model", default="medmamba_t", help="model name when the checkpoint has no config")
    cmd.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                     help="all: every image (an external folder's images all become the test set)")
    cmd.add_argument("--batch-size", type=_count, default=128)
    cmd.add_argument("--device", default="auto")
    cmd.add_argument("--output-dir", type=Path, required=True)
    cmd.add_argument("--tracking-uri")
    cmd.add_argument("--no-mlflow", action="store_true")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmamba", description="MedMamba: models, training, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters and FLOPs of a model (ours or any timm architecture)")
    info.add_argument("model", help=f"{', '.join(list_models())}, or a timm name such as resnet18")
    info.add_argument("--size", "--img-size", dest="img_size", type=_count, default=224, help="image size in px")
    info.add_argument("--num-classes", type=_count, default=1000)
    info.add_argument("--in-chans", type=_count, default=3)
    info.set_defaults(func=_info)

    train = _run_command(sub, "train", "train a model on one process (CPU or one GPU)",
                         "YAML config (configs/*.yaml); defaults when omitted", "continue from OUTPUT_DIR/last.pt")
    train.add_argument("--kfold", action="store_true",
                       help="image folders: train every fold of data.num_folds and report mean ± std")
    train.add_argument("--workers", type=int, metavar="N",
                       help="data-parallel training on N Ray Train workers (ray.num_workers)")
    train.add_argument("--gpus-per-worker", type=float, metavar="G", help="GPUs per Ray Train worker")
    train.set_defaults(func=_train)
    _run_command(sub, "tune", "a Ray Tune + Optuna + ASHA sweep over the config's tune.space",
                 "sweep config (configs/sweep_*.yaml)", "continue the sweep in OUTPUT_DIR").set_defaults(func=_tune)
    _run_command(sub, "matrix", "train every combination of the config's matrix: axes on Ray (one run per cell)",
                 "matrix config (configs/matrix_*.yaml)",
                 "skip finished cells and continue the others").set_defaults(func=_matrix)
    federate = _run_command(sub, "federate", "a Flower simulation of multi-hospital training",
                            "federated config (configs/federated_*.yaml)", "continue after the last completed round")
    federate.add_argument("--holdout-site", metavar="NAME",
                          help="leave-one-site-out: NAME never trains; the global model is tested on all its images")
    federate.set_defaults(func=_federate)

    report = sub.add_parser("report", help="paper-style tables and plots comparing runs in MLflow")
    report.add_argument("--experiment", action="append", default=[], help="an MLflow experiment to read (repeatable)")
    report.add_argument("--run-id", action="append", default=[], help="a run to include (repeatable)")
    report.add_argument("--parent-run", help="only the runs nested under this one (a matrix or a sweep)")
    report.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag")
    report.add_argument("--title")
    report.add_argument("--output-dir", type=Path, required=True)
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    report.add_argument("--report-experiment", default="medmamba-reports", help="where the report run is logged")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the report as an MLflow run")
    report.set_defaults(func=_report)

    _checkpoint_command(sub, "evaluate", "the paper's metrics of a checkpoint on a dataset split").set_defaults(
        func=_evaluate)
    explain = _checkpoint_command(sub, "explain", "Grad-CAM heatmaps of a checkpoint on images of a split or files")
    explain.add_argument("--num-images", type=_count, default=8, help="images drawn from --split (seeded)")
    explain.add_argument("--images", nargs="+", metavar="FILE", help="explain these image files instead")
    explain.add_argument("--method", action="append", metavar="NAME",
                         help="gradcam, gradcam++, xgradcam or layercam (repeatable; default gradcam and gradcam++)")
    explain.add_argument("--target-layer", help="module name (default: the model family's last stage)")
    explain.add_argument("--target", choices=["predicted", "label"], default="predicted",
                         help="the class each heatmap explains")
    explain.add_argument("--seed", type=int, default=0)
    explain.set_defaults(func=_explain)
    embed = _checkpoint_command(sub, "embed", "features before the classifier in 2-D (t-SNE/UMAP), silhouette score")
    embed.add_argument("--method", action="append", metavar="NAME", help="tsne or umap (repeatable; default tsne)")
    embed.add_argument("--by-site", action="store_true", help="a federated checkpoint: every site's split, by site")
    embed.add_argument("--max-images", type=_count, help="a seeded sample of at most this many images per group")
    embed.add_argument("--seed", type=int, default=0)
    embed.set_defaults(func=_embed)
    robust = _checkpoint_command(sub, "robustness", "metrics of a checkpoint under image perturbations by severity")
    robust.add_argument("--perturbation", action="append", metavar="NAME", help="repeatable; default: all")
    robust.add_argument("--severity", action="append", type=int, metavar="S", help="0-5, repeatable; default: all")
    robust.add_argument("--seed", type=int, default=0)
    robust.set_defaults(func=_robustness)
    return parser


def _check_output_dir(path: Path | None) -> Path | None:
    """ConfigError unless ``path`` is (or can become) a writable folder. Returns the outermost
    folder this call created (None if ``path`` existed), for ``_drop_if_unused``."""
    if path is None:
        return None
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".medmamba-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output-dir {path} cannot be written ({exc.strerror or exc}); choose another folder") from None
    return created


def _drop_if_unused(created: Path | None, path: Path) -> None:
    """Remove the folders ``_check_output_dir`` created for a command that failed before writing
    anything there but its lock, so a mistyped command leaves no empty output folder behind."""
    if created is None or not path.is_dir() or any(p.name != ".medmamba.lock" for p in path.iterdir()):
        return
    try:
        (path / ".medmamba.lock").unlink(missing_ok=True)
        for folder in [path, *path.parents]:
            folder.rmdir()
            if folder == created:
                return
    except OSError:  # something else wrote there meanwhile: leave it
        pass


@contextlib.contextmanager
def _sole_run_in(path: Path) -> Iterator[None]:
    """Hold ``path/.medmamba.lock`` while a training command runs there: a second one on the same
    folder stops at once instead of overwriting the first one's checkpoints. The OS releases the
    lock when the process ends, however it ends."""
    with open(path / ".medmamba.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"--output-dir {path} is in use by another medmamba command ({lock.read().strip()}); "
                              "wait for it to end or choose another folder") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield


@contextlib.contextmanager
def _sigterm_interrupts(received: list[int]) -> Iterator[None]:
    """Inside, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, so that a
    stopped command ends as after Ctrl-C; Python's default would end the process where it stands,
    leaving its MLflow run RUNNING for good. The signal is noted in ``received``, which tells the
    two apart afterwards (Ray Tune ends on it and raises a KeyboardInterrupt of its own). The
    previous handler comes back on the way out."""
    def terminate(signum, frame):
        received.append(signum)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("medmamba").setLevel(logging.INFO)  # ours: a resume, early stopping, compiling; not the libraries'
    created, signals = None, []
    try:
        with _sigterm_interrupts(signals):
            created = _check_output_dir(getattr(args, "output_dir", None))
            with _sole_run_in(args.output_dir) if hasattr(args, "resume") else contextlib.nullcontext():
                return args.func(args)
    except (MedMambaError, FileNotFoundError) as exc:
        _drop_if_unused(created, getattr(args, "output_dir", None))
        print(f"medmamba {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " (run the same command with --resume to continue)" if hasattr(args, "resume") else ""
        how, code = ("terminated (SIGTERM)", 128 + signal.SIGTERM) if signals else ("interrupted", 130)
        print(f"medmamba {args.command}: {how}{again}", file=sys.stderr)
        return code


def entry() -> None:
    """The ``medmamba`` command: ``main``, then exit with its code. After Ctrl-C or SIGTERM, once
    the command has ended its runs, threads a library left waiting (Flower's simulation workers,
    blocked on a Ray it has shut down) do not keep the process alive: it exits at once."""
    code = main()
    if code in (130, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
