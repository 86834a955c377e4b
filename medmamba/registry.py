"""Model registry: ``create_model("medmamba_t", num_classes=2, checkpoint=path)``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import VARIANTS, MedMamba, checkpoint_filter_fn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``create_model(name, **kwargs)`` call ``factory(**kwargs)``."""
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def read_checkpoint(path: str | Path) -> dict:
    """The object saved in a checkpoint file (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message advises weights_only=False: unsafe, so not repeated
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc):
            reason = "it holds objects other than tensors and plain data, or is not a torch checkpoint"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def load_state_dict(checkpoint: str | Path | dict) -> dict:
    """A state dict from a checkpoint (a path, or what ``read_checkpoint`` returned): a bare state
    dict, or a dict holding one under ``state_dict`` or ``model`` (our training checkpoints);
    published names are converted."""
    path = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
    obj = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected tensors by name, or one under 'model'/'state_dict')")
    return checkpoint_filter_fn(obj)


def create_model(name: str, num_classes: int = 1000, checkpoint: str | Path | dict | None = None,
                 **kwargs) -> nn.Module:
    """Build a registered model; with ``checkpoint`` (a path, or what ``read_checkpoint`` returned),
    load its weights (ours or the published format)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        state, own = load_state_dict(checkpoint), model.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [f"{k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
                     for k, v in state.items() if k in own and v.shape != own[k].shape]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            where = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
            raise CheckpointError(f"checkpoint {where} does not fit {name} with num_classes={num_classes}: "
                             + "; ".join(problems[:5]) + more)
        model.load_state_dict(state, strict=True)
    return model


def build_model(cfg: ModelConfig, num_classes: int, checkpoint: str | Path | dict | None = None,
                data_name: str = "the data") -> nn.Module:
    """The model of a ``model:`` config section, every key of it, for ``num_classes`` classes
    (``model.num_classes`` must agree when set); with ``checkpoint``, its weights. Training,
    evaluation, sweeps and federated sites all build their models here."""
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"model.num_classes is {cfg.num_classes} but {data_name} has {num_classes} classes")
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "num_classes")}
    return create_model(cfg.name, num_classes=num_classes, checkpoint=checkpoint, **kwargs)


for _name, _cfg in VARIANTS.items():
    register_model(_name, lambda _cfg=_cfg, **kw: MedMamba(**{**_cfg, **kw}))
