"""Run configuration: YAML files with ``--set a.b=value`` overrides, checked against a schema.

Every key has a default here; a YAML file and then the overrides replace them. Unknown keys and
values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric config value, where given: ``gt < value`` or ``ge <= value``, and
    ``value < lt`` or ``value <= le``."""
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, key: str, value: float) -> None:
        low, high = self.ge if self.gt is None else self.gt, self.le if self.lt is None else self.lt
        if ((self.gt is not None and value <= self.gt) or (self.ge is not None and value < self.ge)
                or (self.lt is not None and value >= self.lt) or (self.le is not None and value > self.le)):
            opening, closing = "[" if self.gt is None else "(", "]" if self.lt is None else ")"
            bounds = (f"in {opening}{low}, {high}{closing}" if high is not None
                      else f"{'>=' if self.gt is None else '>'} {low}")
            raise ConfigError(f"config key {key}: must be {bounds}, got {value}")


# Allowed values are declared once, on the fields: Literal types, and ``Annotated[..., Range(...)]``
# bounds; ``set_key`` checks them and names the key. ``Annotated[Literal[...], "a description"]``
# words the error.
MetricName = Annotated[Literal["accuracy", "precision", "sensitivity", "specificity", "f1", "auc", "loss"],
                       "a metric name"]


@dataclass
class ModelConfig:
    name: str = "medmamba_t"  # ours (medmamba_t/s/b, the Table 7 ablations) or any timm architecture
    num_classes: Annotated[int, Range(ge=2)] | None = None  # None: from the data
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.1
    d_state: Annotated[int, Range(ge=1)] | None = None  # MedMamba's SSM state size (None: 16)
    pretrained: str | None = None  # fine-tune from this checkpoint (ours, published MedMamba or timm); new head


@dataclass
class DataConfig:
    name: str = "pneumoniamnist"  # a MedMNIST 2D flag, or "folder"
    root: str | None = None  # MedMNIST: default ~/.medmnist; folder: required
    size: Annotated[int, Range(ge=4)] = 28  # image side in pixels (MedMNIST: 28, 64, 128 or 224); >= the 4 px patch
    seed: int = 0  # for the folder split and k-fold
    download: bool = True  # MedMNIST: download a missing file
    allow_md5_mismatch: bool = False  # MedMNIST: accept a local file whose MD5 differs
    split_ratios: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.3])  # folder: train/val/test
    num_folds: Annotated[int, Range(ge=2)] = 5  # folder: k for k-fold cross-validation
    fold: int | None = None  # folder: which fold is the test set (None: no k-fold)
    skip_corrupt: bool = False  # folder: skip unreadable images (logged) instead of failing
    # folder: the intensity range [low, high] of 16-bit and floating-point images that becomes 0-255
    # (clipped), as a CT or X-ray window, e.g. [0, 4095] for 12-bit data; None: 16-bit images from
    # their full 0-65535 range, floating-point ones from each image's min-max
    window: list[float] | None = None
    augment: Literal["none", "autoaugment"] = "none"  # none: the paper's setting; autoaugment: MedMamba-X
    # binary tasks: the class whose precision, sensitivity, specificity and F1 are the headline metrics
    # (None: pneumoniamnist "pneumonia", breastmnist "malignant", folders the second class in sorted order)
    positive_class: str | None = None
    num_workers: Annotated[int, Range(ge=0)] = 0  # DataLoader worker processes


@dataclass
class TrainConfig:
    epochs: Annotated[int, Range(ge=1)] = 100
    batch_size: Annotated[int, Range(ge=1)] = 128
    seed: int = 0
    deterministic: bool = False
    monitor: MetricName = "auc"  # validation metric for the best checkpoint and early stopping
    early_stopping_patience: Annotated[int, Range(ge=1)] | None = None  # epochs without improvement; None: off
    # mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 (CUDA or CPU); fp16 (CUDA, with a
    # GradScaler); off. true/false (older configs) mean auto/off.
    amp: Literal["auto", "bf16", "fp16", "off"] | bool = "auto"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # torch.compile the training step (one graph: the scans are custom ops); costs a compile of a
    # minute or more at the start; on a CPU it trained slower than eager (measured), on a GPU see
    # benchmarks/gpu_check.py
    compile: bool = False


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: Annotated[float, Range(gt=0)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9  # sgd only


@dataclass
class SchedConfig:
    milestones: list[int] = field(default_factory=lambda: [50, 75])  # MultiStepLR, in epochs
    gamma: Annotated[float, Range(ge=0)] = 0.1


@dataclass
class MlflowConfig:
    enabled: bool = True  # false (or --no-mlflow): no tracking
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    experiment: str = "medmamba"
    run_name: str | None = None


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`), else a local cluster
    storage_path: str | None = None  # Ray checkpoints and results; None: OUTPUT_DIR/ray (shared storage on multi-node)
    num_workers: Annotated[int, Range(ge=1)] = 1  # Ray Train data-parallel workers (`medmamba train --workers`)
    cpus_per_worker: Annotated[int, Range(ge=1)] = 1
    gpus_per_worker: Annotated[float, Range(ge=0)] = 0
    max_failures: Annotated[int, Range(ge=-1)] = 2  # -1: no limit; restarts of the worker group (Train) or of a trial (Tune) after a failure
    autoscaling: bool = False  # true: the cluster adds nodes on demand; skip the check against its current size


@dataclass
class TuneConfig:
    metric: Literal["val_auc", "val_accuracy", "val_f1", "val_loss", "train_loss"] = "val_auc"  # a per-epoch key
    mode: Literal["min", "max"] = "max"
    num_samples: Annotated[int, Range(ge=1)] = 16
    max_concurrent: Annotated[int, Range(ge=1)] = 2
    cpus_per_trial: Annotated[float, Range(ge=0)] = 1
    gpus_per_trial: Annotated[float, Range(ge=0)] = 0
    # > 1: each trial is a Ray Train data-parallel run of this many workers (Tune over Train V2), the
    # trial's CPUs and GPUs split evenly among them (e.g. gpus_per_trial: 4, workers_per_trial: 4)
    workers_per_trial: Annotated[int, Range(ge=1)] = 1
    grace_period: Annotated[int, Range(ge=1)] = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: Annotated[int, Range(ge=2)] = 2  # ASHA
    seed: int = 0  # Optuna's TPE sampler
    # {config key: {choice: [...]} | {loguniform: [low, high]} | {uniform: [low, high]} | {randint: [low, high]}};
    # sched.milestones takes choices of comma-separated fractions of train.epochs, e.g. "0.5,0.75"
    space: dict = field(default_factory=dict)


@dataclass
class FederatedConfig:
    # natural (data.root/<site>/<class>/*), iid, dirichlet (label skew), quantity, or deployed: real
    # SuperNodes, each reading the folder its node config names (data-root); the server holds no data
    partition: Literal["natural", "iid", "dirichlet", "quantity", "deployed"] = "iid"
    num_sites: Annotated[int, Range(ge=1)] = 3  # simulated partitions; natural: the number of site folders
    alpha: Annotated[float, Range(gt=0)] = 0.5  # dirichlet concentration: smaller is more skewed
    # fedbn: BatchNorm layers stay local; fedadam/fedyogi/fedadagrad: adaptive server optimisers (Reddi
    # et al. 2021); fedavgm: server momentum
    strategy: Literal["fedavg", "fedprox", "fedbn", "fedadam", "fedyogi", "fedadagrad", "fedavgm"] = "fedavg"
    mu: Annotated[float, Range(ge=0)] = 0.01  # fedprox proximal term
    server_lr: Annotated[float, Range(ge=0)] | None = None  # the server optimiser's step (None: Flower's default)
    server_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.0  # fedavgm
    beta_1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # fedadam, fedyogi
    beta_2: Annotated[float, Range(ge=0, lt=1)] = 0.99  # fedadam, fedyogi
    tau: Annotated[float, Range(ge=0)] = 1e-3  # adaptive strategies: the degree of adaptivity
    # leave-one-site-out (simulation): this site never trains; the global model is tested on all its images
    holdout_site: str | None = None
    rounds: Annotated[int, Range(ge=1)] = 3
    local_epochs: Annotated[int, Range(ge=1)] = 1
    fraction_fit: Annotated[float, Range(gt=0, le=1)] = 1.0  # share of the sites sampled to train each round
    min_clients: Annotated[int, Range(ge=1)] = 2  # sites that must train (and be available) each round
    client_cpus: Annotated[float, Range(ge=0)] = 1  # resources of one simulated site
    client_gpus: Annotated[float, Range(ge=0)] = 0
    # differential privacy, on when dp_clipping_norm is set: each site clips its update; "central": the
    # server adds Gaussian noise (dp_noise_multiplier x clipping norm) to the aggregate, so it protects
    # against whoever sees the global model but trusts the server; "local": each site adds noise before
    # anything leaves it (an (dp_epsilon, dp_delta) Gaussian mechanism per round), trusting no one
    dp_mode: Literal["central", "local"] = "central"
    dp_clipping_norm: Annotated[float, Range(gt=0)] | None = None
    dp_noise_multiplier: Annotated[float, Range(ge=0)] = 0.0  # central
    dp_epsilon: Annotated[float, Range(ge=0)] = 1.0  # local: per round
    dp_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5  # the delta at which the budget is reported
    centralized_baseline: bool = False  # also train on the pooled sites for rounds x local_epochs epochs
    # also train each site alone for rounds x local_epochs epochs and test every model at every site (simulation)
    local_baselines: bool = False
    round_timeout: Annotated[float, Range(ge=1)] = 3600  # seconds the server waits for a round's replies


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    # `medmamba matrix`: {config key: [values]}; every combination is one training run (a cell)
    matrix: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"optim.lr": 0.001, ...}: every key with its value, for logging as params."""
        return {f"{section}.{key}": value for section, keys in self.to_dict().items() for key, value in keys.items()}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """value if it fits annotation (ints are accepted for floats), else ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extras = typing.get_args(annotation)
        try:
            value = _check_type(key, value, inner)
        except ConfigError as exc:
            descriptions = [e for e in extras if isinstance(e, str)]
            if not descriptions:
                raise
            raise ConfigError(f"config key {key}: expected {descriptions[0]}: {str(exc).split('expected ', 1)[1]}") from None
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(key, value)
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            *rest, last = [str(a) for a in allowed]
            raise ConfigError(f"config key {key}: expected {', '.join(rest)} or {last}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is dict and not isinstance(value, dict):
        raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"config key {key}: must be a finite number, got {value}")
        return float(value)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"config key {key}: expected {annotation.__name__}, got {value!r}")
    return value


def set_key(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config key {key!r}; sections: {', '.join(sections)}")
    if not name:
        example = "matrix.train.seed=[0, 1]" if section == "matrix" else \
            f"{section}.{dataclasses.fields(getattr(cfg, section))[0].name}=..."
        raise ConfigError(f"{key!r} is a config section, not a key: set one of its keys, e.g. {example}")
    if section == "matrix":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"config key {key}: a matrix axis is a non-empty list of values, got {value!r}")
        twice = [v for i, v in enumerate(value) if v in value[:i]]
        if twice:  # two cells of one name would share a folder and pass for replicates
            raise ConfigError(f"config key {key}: a matrix axis lists each value once; {twice[0]!r} is repeated")
        set_key(Config(), name, value[0])  # an axis must name a config key
        cfg.matrix[name] = list(value)
        return
    target = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields:
        raise ConfigError(f"unknown config key {key!r}; {section} has: {', '.join(fields)}")
    hints = typing.get_type_hints(type(target), include_extras=True)
    setattr(target, name, _check_type(key, value, hints[name]))


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; ConfigError in one line naming ``where``, the line and the problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); values are read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value")
    value = _load_yaml(raw, f"override {text!r}") if raw.strip() else None
    if isinstance(value, str):  # YAML reads 1e-3 as a string; numbers are numbers here
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    """(key, value) pairs of a config file; a top-level ``base: other.yaml`` (relative to the file)
    is read first, so a sweep or federated config extends a training recipe."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    raw = _load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    pairs = []
    if "base" in raw:
        pairs = _read_yaml(path.parent / str(raw.pop("base")), seen + (path.resolve(),))
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        pairs += [(f"{section}.{key}", value) for key, value in values.items()]
    return pairs


def config_from_dict(raw: dict) -> Config:
    """The Config that ``Config.to_dict()`` wrote (e.g. in a checkpoint or a Ray task), checked."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A checked copy of ``cfg`` with ``values`` set by config key ('optim.lr': 3e-4, ...)."""
    new = config_from_dict(cfg.to_dict())
    for key, value in values.items():
        set_key(new, key, value)
    validate(new)
    return new


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (after its ``base``), then ``overrides`` ('a.b=value')."""
    cfg = Config()
    for key, value in _read_yaml(Path(path)) if path is not None else []:
        set_key(cfg, key, value)
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks across keys and of allowed values."""
    window = cfg.data.window
    if window is not None and (len(window) != 2 or not window[0] < window[1]):
        raise ConfigError(f"config key data.window: [low, high] with low < high, got {window}")
    if len(cfg.data.split_ratios) != 3 or abs(sum(cfg.data.split_ratios) - 1) > 1e-6 or min(cfg.data.split_ratios) < 0:
        raise ConfigError(f"config key data.split_ratios: three non-negative ratios summing to 1, got {cfg.data.split_ratios}")
    if cfg.data.fold is not None and not 0 <= cfg.data.fold < cfg.data.num_folds:
        raise ConfigError(f"config key data.fold: must be in [0, {cfg.data.num_folds}), got {cfg.data.fold}")
    t = cfg.tune
    if t.workers_per_trial > 1 and (t.gpus_per_trial % t.workers_per_trial or t.cpus_per_trial < t.workers_per_trial):
        raise ConfigError(f"config keys tune.workers_per_trial={t.workers_per_trial}: each worker needs at least one "
                          f"CPU and a whole number of GPUs; tune.cpus_per_trial is {t.cpus_per_trial:g} and "
                          f"tune.gpus_per_trial {t.gpus_per_trial:g}")
    fed = cfg.federated
    if fed.min_clients > fed.num_sites and fed.partition not in ("natural", "deployed"):  # (checked at run time)
        raise ConfigError(f"config key federated.min_clients is {fed.min_clients} but there are only "
                          f"{fed.num_sites} sites (federated.num_sites)")
    if fed.strategy == "fedbn" and fed.dp_clipping_norm is not None:
        raise ConfigError("config key federated.dp_clipping_norm cannot be used with federated.strategy=fedbn: "
                          "Flower's clipping pairs each sent array with a received one, and FedBN keeps the "
                          "BatchNorm layers at the sites")
    if fed.dp_clipping_norm is not None and fed.dp_mode == "local" and not fed.dp_epsilon > 0:
        raise ConfigError(f"config key federated.dp_epsilon: must be > 0 for local differential privacy, "
                          f"got {fed.dp_epsilon}")
    if fed.dp_clipping_norm is not None and not fed.dp_delta > 0:
        raise ConfigError(f"config key federated.dp_delta: must be > 0, got {fed.dp_delta}")
    if fed.partition == "deployed" and (fed.local_baselines or fed.centralized_baseline):
        raise ConfigError("config keys federated.local_baselines and centralized_baseline need the sites' data on "
                          "one machine: simulation only (a deployed hospital trains its local baseline itself)")
    if fed.holdout_site is not None and fed.partition == "deployed":
        raise ConfigError("config key federated.holdout_site: a deployed federation holds a hospital out by not "
                          "starting its SuperNode and testing on its data afterwards; leave-one-site-out runs in "
                          "simulation")
    if sorted(cfg.sched.milestones) != cfg.sched.milestones:
        raise ConfigError(f"config key sched.milestones: must increase, got {cfg.sched.milestones}")


# What a --resume may change: the length of the run, where and how it runs, and tracking.
RESUMABLE = ("train.epochs", "train.early_stopping_patience", "train.device", "train.amp", "train.compile",
             "data.root", "data.download", "data.num_workers", "federated.rounds", "federated.round_timeout",
             "federated.client_cpus", "federated.client_gpus", "mlflow.", "ray.", "tune.", "matrix.")


def check_new_output(out: Path, what: str, markers: tuple[str, ...], resume: bool) -> None:
    """ConfigError when ``out`` already holds a ``what`` (one of its ``markers`` files is there) and
    this is not a resume: a command never overwrites an earlier run's results."""
    held = [m for m in markers if (Path(out) / m).is_file()]
    if held and not resume:
        raise ConfigError(f"{out} already holds a {what} ({held[0]}); continue it with --resume or choose "
                          "another --output-dir")
    if resume and not held:  # killed before its first checkpoint, or a mistyped folder: say so
        log.warning("--resume: %s holds no %s to continue (no %s): starting it from the beginning", out, what,
                    " or ".join(markers))


def check_resumable(saved: dict, cfg: Config, what: str | Path) -> None:
    """ConfigError naming every key in which ``cfg`` differs from the config ``saved`` with a run
    (``what``), but for those a resume may change (``RESUMABLE``)."""
    old, new = config_from_dict(saved).flat(), cfg.flat()
    changed = [f"{k}={new[k]!r} (was {old[k]!r})" for k in new if new[k] != old[k] and not k.startswith(RESUMABLE)]
    if changed:
        raise ConfigError(f"--resume: {what} was made with another config: {'; '.join(changed)}. Only "
                          f"{', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in RESUMABLE)} may "
                          "change on resume; use a new --output-dir for a different run")


def absolute_paths(cfg: Config) -> Config:
    """Make ``data.root`` absolute in place (Ray workers, trials and Flower clients run in other
    working directories); returns ``cfg``."""
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
