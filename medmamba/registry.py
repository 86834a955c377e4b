"""Model registry: ``create_model("medmamba_t", num_classes=2, checkpoint=path)``, for our variants
(MedMamba T/S/B and the Table 7 ablations) and any timm architecture."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .baselines import classifier_prefixes, close_matches, create_timm_model, is_timm_model
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import ABLATIONS, VARIANTS, MedMamba, checkpoint_filter_fn

log = logging.getLogger(__name__)

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
    """The state dict in a checkpoint (a path, or what ``read_checkpoint`` returned): a bare state
    dict, or one held under ``state_dict`` or ``model`` (our training checkpoints). Names are as
    saved: ``create_model`` and ``load_pretrained`` convert them for the model at hand."""
    path = checkpoint if not isinstance(checkpoint, dict) else "the checkpoint"
    obj = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected tensors by name, or one under 'model'/'state_dict')")
    return obj


def _for_model(model: nn.Module, state: dict) -> dict:
    """``state`` with the names ``model`` uses (published MedMamba names converted)."""
    return checkpoint_filter_fn(state, model) if isinstance(model, MedMamba) else state


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    return ("head.",) if isinstance(model, MedMamba) else classifier_prefixes(model)


def check_model_name(name: str) -> None:
    """ConfigError, with the closest names, unless ``name`` is registered or a timm architecture."""
    if name not in _REGISTRY and not is_timm_model(name):
        near = close_matches(name, list_models())
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown model {name!r}: neither ours ({', '.join(list_models())}) nor a timm "
                          f"architecture (timm.list_models()){hint}")


def create_model(name: str, num_classes: int = 1000, checkpoint: str | Path | dict | None = None,
                 img_size: int | None = None, **kwargs) -> nn.Module:
    """Build a registered MedMamba model or any timm architecture (see ``baselines``) for
    ``img_size`` px images; with ``checkpoint`` (a path, or what ``read_checkpoint`` returned),
    load all of its weights (ours or the published format)."""
    check_model_name(name)
    if num_classes < 1 or kwargs.get("in_chans", 1) < 1:
        raise ConfigError(f"{name} needs at least 1 class and 1 input channel, got num_classes={num_classes}, "
                          f"in_chans={kwargs.get('in_chans', 3)}")
    if name in _REGISTRY:
        patch = kwargs.get("patch_size", 4)
        if img_size is not None and img_size < patch:
            raise ConfigError(f"{name} needs images of at least {patch} px (its patch embedding), got {img_size}")
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)  # MedMamba runs at any size from its patch up
    else:
        ours_only = sorted(set(kwargs) - {"in_chans", "drop_path_rate"})
        if ours_only:
            raise ConfigError(f"model.{ours_only[0]} applies to MedMamba models only, not to timm's {name}")
        model = create_timm_model(name, num_classes, img_size=img_size, **kwargs)
    if checkpoint is not None:
        state, own = _for_model(model, load_state_dict(checkpoint)), model.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [f"{k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
                     for k, v in state.items() if k in own and v.shape != own[k].shape]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            where = f"checkpoint {checkpoint}" if not isinstance(checkpoint, dict) else "the checkpoint"
            raise CheckpointError(f"{where} does not fit {name} with num_classes={num_classes}: "
                                  + "; ".join(problems[:5]) + more)
        model.load_state_dict(state, strict=True)
    return model


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_pretrained(model: nn.Module, checkpoint: str | Path) -> list[str]:
    """Fine-tuning: copy every weight of ``checkpoint`` (ours, the published MedMamba format or a
    timm state dict) whose name and shape fit ``model``, except the classifier head, which stays
    freshly initialised for this task's classes. Logs what was skipped and what is missing;
    returns the names loaded. A checkpoint of which no backbone weight fits is an error."""
    state, own = _for_model(model, load_state_dict(checkpoint)), model.state_dict()
    head = _head_prefixes(model)
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape and not k.startswith(head)}
    if not fits:
        shape = [k for k in state if k in own and state[k].shape != own[k].shape]
        why = (f"{len(shape)} names match but with other shapes, e.g. {shape[0]} {tuple(state[shape[0]].shape)} "
               f"vs {tuple(own[shape[0]].shape)}" if shape else f"no names match (its keys: {_listing(list(state), 3)})")
        raise CheckpointError(f"model.pretrained {checkpoint}: none of its {len(state)} weights fit "
                              f"{type(model).__name__} ({why})")
    model.load_state_dict(fits, strict=False)
    skipped = [k for k in state if k not in fits]
    missing = [k for k in own if k not in fits and not k.startswith(head)]
    log.info("fine-tuning from %s: %d of the model's %d tensors loaded; classifier %s re-initialised",
             checkpoint, len(fits), len(own), ", ".join(p + "*" for p in head))
    if skipped:
        log.info("  skipped from the checkpoint (%d): %s", len(skipped), _listing(skipped))
    if missing:
        log.warning("  not in the checkpoint, left as initialised (%d): %s", len(missing), _listing(missing))
    return list(fits)


def build_model(cfg: ModelConfig, num_classes: int, img_size: int | None = None,
                checkpoint: str | Path | dict | None = None, pretrained: bool = True,
                data_name: str = "the data") -> nn.Module:
    """The model of a ``model:`` config section, every key of it, for ``num_classes`` classes
    (``model.num_classes`` must agree when set) and ``img_size`` px images. With ``checkpoint``,
    all its weights; otherwise, with ``pretrained`` and ``model.pretrained`` set, the weights to
    fine-tune from. Training, evaluation, sweeps and federated sites all build their models here."""
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"model.num_classes is {cfg.num_classes} but {data_name} has {num_classes} classes")
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("name", "num_classes", "pretrained") and v is not None}
    model = create_model(cfg.name, num_classes=num_classes, checkpoint=checkpoint, img_size=img_size, **kwargs)
    if checkpoint is None and pretrained and cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


for _name, _cfg in {**VARIANTS, **ABLATIONS}.items():
    register_model(_name, lambda _cfg=_cfg, **kw: MedMamba(**{**_cfg, **kw}))
