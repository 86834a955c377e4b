"""The ``medmamba`` command line."""
from __future__ import annotations

import argparse
import sys

import logging
from pathlib import Path

from .config import DataConfig, load_config, validate
from .errors import MedMambaError
from .flops import complexity
from .registry import create_model, list_models

# Data, metrics, training and MLflow are imported inside the commands that use them: importing
# medmnist, scikit-learn and mlflow costs seconds that `medmamba info` does not need.


def _info(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    c = complexity(model, args.img_size, args.in_chans)
    print(f"{args.model}  img {args.img_size}px  {args.num_classes} classes  {args.in_chans} channels")
    print(f"  parameters                      {c.params / 1e6:8.2f} M")
    print(f"  GFLOPs, paper (conv + linear)   {c.paper_macs / 1e9:8.1f} G   ({c.paper_macs / 1e9:.3f})")
    print(f"  GFLOPs, full (+ einsum + scan)  {c.full_macs / 1e9:8.2f} G"
          f"   (einsum {c.einsum_macs / 1e9:.2f} G, scan {c.scan_macs / 1e9:.2f} G)")
    return 0


def _tracker(uri: str | None, experiment: str):
    from .tracking import Tracker  # mlflow is slow to import; only runs that log need it

    return Tracker(uri, experiment)


def _train(args: argparse.Namespace) -> int:
    from .data import build_datasets
    from .train import Trainer

    cfg = load_config(args.config, args.set)
    if args.tracking_uri:
        cfg.mlflow.tracking_uri = args.tracking_uri
    if args.kfold:
        return _cross_validate(cfg, args)
    if args.workers is not None:
        return _train_distributed(cfg, args)
    tracker = None if args.no_mlflow else _tracker(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    data = build_datasets(cfg.data)
    metrics = Trainer(cfg, data, args.output_dir, tracker=tracker).fit(resume=args.resume)
    print_metrics(metrics, f"test metrics of the best checkpoint ({args.output_dir}/best.pt)")
    return 0


def _train_distributed(cfg, args: argparse.Namespace) -> int:
    from medmamba.orchestrator.train import train_distributed

    from .tracking import resolve_uri

    cfg.ray.num_workers = args.workers
    if args.gpus_per_worker is not None:
        cfg.ray.gpus_per_worker = args.gpus_per_worker
    validate(cfg)
    uri = None if args.no_mlflow else resolve_uri(cfg.mlflow.tracking_uri)
    metrics = train_distributed(cfg, args.output_dir, uri, resume=args.resume)
    print_metrics(metrics, f"test metrics of the best checkpoint ({args.output_dir}/best.pt), "
                           f"{cfg.ray.num_workers} Ray Train workers")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from medmamba.orchestrator.sweep import run_sweep

    from .tracking import resolve_uri

    cfg = load_config(args.config, args.set)
    uri = None if args.no_mlflow else resolve_uri(args.tracking_uri or cfg.mlflow.tracking_uri)
    summary = run_sweep(cfg, args.output_dir, uri, resume=args.resume)
    print(f"best {cfg.tune.metric} {summary['best_value']:.4f} with {summary['best_params']}; "
          f"config: {args.output_dir}/best_config.yaml")
    print_metrics(summary["test_metrics"], f"test metrics of the best trial ({args.output_dir}/best.pt)")
    return 0


def _federate(args: argparse.Namespace) -> int:
    from medmamba.federated.simulation import run_federated

    from .tracking import resolve_uri

    cfg = load_config(args.config, args.set)
    uri = None if args.no_mlflow else resolve_uri(args.tracking_uri or cfg.mlflow.tracking_uri)
    report = run_federated(cfg, args.output_dir, uri, resume=args.resume)
    last = report["rounds"][-1]
    print_metrics(last["global"], f"global model after round {last['round']} on the global test set "
                                  f"({args.output_dir}/best.pt)")
    if "centralized" in report:
        print_metrics(report["centralized"], "centralised training on the pooled sites, same test set")
    for failure in (f for row in report["rounds"] for f in row["failures"]):
        print(f"failure: {failure}")
    return 0


def _cross_validate(cfg, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .train import cross_validate

    factory = None if args.no_mlflow else (lambda: _tracker(cfg.mlflow.tracking_uri, cfg.mlflow.experiment))
    summary = cross_validate(cfg, args.output_dir, factory, resume=args.resume)
    table = Table(title=f"{cfg.data.num_folds}-fold cross-validation, test metrics (mean ± std)")
    for key in summary["mean"]:
        table.add_column(key)
    table.add_row(*(f"{summary['mean'][k]:.4f} ± {summary['std'][k]:.4f}" for k in summary["mean"]))
    Console().print(table)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data import build_datasets
    from .registry import read_checkpoint
    from .train import make_loader, predict_metrics, resolve_device, write_report

    state = read_checkpoint(args.checkpoint)  # read once: its config and its weights
    saved = state.get("config", {})
    data_cfg = DataConfig(**{**saved.get("data", {}), "augment": "none"})
    data_cfg.name = args.dataset or data_cfg.name
    data_cfg.root = args.data_root or data_cfg.root
    data_cfg.size = args.size or data_cfg.size
    data = build_datasets(data_cfg)
    model_name = saved.get("model", {}).get("name", args.model)
    model = create_model(model_name, num_classes=data.num_classes, checkpoint=state)
    device = resolve_device(args.device)
    loader = make_loader(getattr(data, args.split), args.batch_size, shuffle=False)
    metrics, labels, probs = predict_metrics(model.to(device), loader, device, data.class_names)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracker = None
    if not args.no_mlflow:
        tracker = _tracker(args.tracking_uri, "medmamba-evaluate")
        tracker.start(None, {"checkpoint": args.checkpoint, "dataset": data.name, "split": args.split},
                      {"dataset_md5": data.checksum, "model": model_name})
    write_report(metrics, labels, probs, data.class_names, out, tracker)
    if tracker:
        tracker.end()
    print_metrics(metrics, f"{data.name} {args.split} split")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmamba", description="MedMamba: models, training, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters and FLOPs of a model variant")
    info.add_argument("model", choices=list_models())
    info.add_argument("--img-size", type=int, default=224)
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--in-chans", type=int, default=3)
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
    _run_command(sub, "federate", "a Flower simulation of multi-hospital training",
                 "federated config (configs/federated_*.yaml)",
                 "continue after the last completed round").set_defaults(func=_federate)

    ev = sub.add_parser("evaluate", help="the paper's metrics of a checkpoint on a dataset split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--dataset", help="MedMNIST flag or 'folder' (default: the checkpoint's)")
    ev.add_argument("--data-root")
    ev.add_argument("--size", type=int)
    ev.add_argument("--model", default="medmamba_t", help="model name when the checkpoint has no config")
    ev.add_argument("--split", choices=["train", "val", "test"], default="test")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output-dir", type=Path, required=True)
    ev.add_argument("--tracking-uri")
    ev.add_argument("--no-mlflow", action="store_true")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (MedMambaError, FileNotFoundError) as exc:
        print(f"medmamba {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
