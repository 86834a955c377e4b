"""The ``medmamba`` command line."""
from __future__ import annotations

import argparse
import sys

import logging
from pathlib import Path

from .config import load_config, validate
from .errors import ConfigError, MedMambaError
from .flops import complexity
from .registry import create_model, list_models

# Data, metrics, training and MLflow are imported inside the commands that use them: importing
# medmnist, scikit-learn and mlflow costs seconds that `medmamba info` does not need.

EVALUATE_EXPERIMENT = "medmamba-evaluate"  # evaluation runs, each tagged with the run that trained its checkpoint


def _info(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, img_size=args.img_size)
    c = complexity(model, args.img_size, args.in_chans)
    print(f"{args.model}  img {args.img_size}px  {args.num_classes} classes  {args.in_chans} channels")
    print(f"  parameters                      {c.params / 1e6:8.2f} M")
    print(f"  GFLOPs, paper (conv + linear)   {c.paper_macs / 1e9:8.1f} G   ({c.paper_macs / 1e9:.3f})")
    parts = {"einsum": c.einsum_macs, "scan": c.scan_macs} if c.scan_macs else {"attention etc.": c.other_macs}
    print(f"  GFLOPs, full (all products)     {c.full_macs / 1e9:8.2f} G"
          f"   ({', '.join(f'{k} {v / 1e9:.2f} G' for k, v in parts.items())})")
    return 0


def _run_config(args: argparse.Namespace):
    """The command's config: the file and --set overrides, then --tracking-uri / --no-mlflow."""
    cfg = load_config(args.config, args.set)
    if args.tracking_uri:
        cfg.mlflow.tracking_uri = args.tracking_uri
    if args.no_mlflow:
        cfg.mlflow.enabled = False
    return cfg


def _train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
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

    cfg.ray.num_workers = args.workers
    if args.gpus_per_worker is not None:
        cfg.ray.gpus_per_worker = args.gpus_per_worker
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
        print(f"failed cell: {', '.join(f'{k}={row[k]}' for k in cfg.matrix)}: {row['error']}")
    print(f"{len(result['cells']) - len(failed)} of {len(result['cells'])} cells finished; per cell: "
          f"{args.output_dir}/matrix.csv, mean ± std per group: {args.output_dir}/summary.csv")
    return 1 if failed else 0


def _federate(args: argparse.Namespace) -> int:
    from medmamba.federated.simulation import run_federated

    cfg = _run_config(args)
    report = run_federated(cfg, args.output_dir, resume=args.resume)
    best = report["best"]
    print_metrics(best["test"], f"global model of round {best['round']} (the best by federated validation "
                                f"{best['metric']}) on the global test set ({args.output_dir}/best.pt)")
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


def _evaluate(args: argparse.Namespace) -> int:
    from .config import MlflowConfig
    from .evaluation import evaluate_checkpoint
    from .registry import read_checkpoint
    from .tracking import mlflow_run, open_tracker

    tracker = open_tracker(MlflowConfig(enabled=not args.no_mlflow, tracking_uri=args.tracking_uri,
                                        experiment=EVALUATE_EXPERIMENT))
    state = read_checkpoint(args.checkpoint)  # read once: its config and its weights
    overrides = {k: v for k, v in (("name", args.dataset), ("root", args.data_root), ("size", args.size)) if v}
    source = {"source_run_id": state.get("run_id"), "source_experiment": state.get("experiment")}
    with mlflow_run(tracker, None, {"checkpoint": args.checkpoint, "split": args.split},
                    {k: v for k, v in source.items() if v}):
        ev = evaluate_checkpoint(state, args.split, args.output_dir, data_overrides=overrides, device=args.device,
                                 batch_size=args.batch_size, model_name=args.model)
        if tracker:
            tracker.set_tags({"dataset": ev.data.name, "dataset_md5": ev.data.checksum, "model": ev.model.name})
            tracker.log_evaluation(args.split, ev.metrics, ev.files)
    print_metrics(ev.metrics, f"{ev.data.name} {args.split} split")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from .comparison import read_results, write_report
    from .config import MlflowConfig
    from .tracking import check_reachable, mlflow_run, open_tracker, resolve_uri

    if not (args.experiment or args.run_id):
        raise ConfigError("say which runs to report: --experiment NAME and/or --run-id ID")
    tags = dict(parse_tag(t) for t in args.tag)
    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri)
    results, counts = read_results(MlflowClient(uri), args.experiment, args.run_id, args.parent_run, tags)
    title = args.title or f"MedMamba report: {', '.join(args.experiment + args.run_id)}"
    files = write_report(results, counts, args.output_dir, title)
    tracker = open_tracker(MlflowConfig(enabled=not args.no_mlflow, tracking_uri=uri,
                                        experiment=args.report_experiment))
    with mlflow_run(tracker, None, {"experiments": ",".join(args.experiment), "runs": len(results)},
                    {"kind": "report", **{f"filter.{k}": v for k, v in tags.items()}}):
        for file in files if tracker else []:
            tracker.log_artifact(file)
    print((args.output_dir / "report.md").read_text())
    print(f"{len(results)} runs; files in {args.output_dir} (report.html, report.md, report.tex, report.csv)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmamba", description="MedMamba: models, training, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters and FLOPs of a model (ours or any timm architecture)")
    info.add_argument("model", help=f"{', '.join(list_models())}, or a timm name such as resnet18")
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
    _run_command(sub, "matrix", "train every combination of the config's matrix: axes on Ray (one run per cell)",
                 "matrix config (configs/matrix_*.yaml)",
                 "skip finished cells and continue the others").set_defaults(func=_matrix)
    _run_command(sub, "federate", "a Flower simulation of multi-hospital training",
                 "federated config (configs/federated_*.yaml)",
                 "continue after the last completed round").set_defaults(func=_federate)

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


def _check_output_dir(path: Path | None) -> None:
    """ConfigError unless ``path`` is (or can become) a writable folder."""
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".medmamba-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output-dir {path} cannot be written ({exc.strerror or exc}); choose another folder") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_output_dir(getattr(args, "output_dir", None))
        return args.func(args)
    except (MedMambaError, FileNotFoundError) as exc:
        print(f"medmamba {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " (run the same command with --resume to continue)" if hasattr(args, "resume") else ""
        print(f"medmamba {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
