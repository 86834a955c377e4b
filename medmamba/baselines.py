"""Baselines: any timm architecture, built for this task (classes, channels, image size).

Models are created without pretrained weights (no network at run time; ``model.pretrained``
loads a local file instead, see ``registry.load_pretrained``). Per family:
- fixed-input models (ViT, Swin, ...; timm's ``fixed_input_size``) are built for the data's size;
  a ViT whose patch does not divide the size pads the image to the next multiple
  (``dynamic_img_pad``) instead of dropping the remainder;
- ResNets at 32 px and below get MedMNIST v2's small-image stem (a 3x3 stride-1 convolution and
  no max-pool), as in that paper's "ResNet-18 (28)" rows;
- every other family runs unchanged; a model that cannot run at a size fails when built, with
  the smallest size at which it runs.
"""
from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

SMALL_STEM_MAX_SIZE = 32  # ResNets at this size or below use MedMNIST v2's 3x3 stride-1 stem


def _timm():
    import timm  # imported on first use: it costs a second that `medmamba info medmamba_t` does not need

    return timm


def is_timm_model(name: str) -> bool:
    return _timm().is_model(name)


def close_matches(name: str, ours: list[str]) -> list[str]:
    """Registered and timm model names that look like ``name``."""
    return difflib.get_close_matches(name, ours + _timm().list_models(), n=5, cutoff=0.6)


def _small_stem(model: nn.Module, in_chans: int) -> None:
    """MedMNIST v2's ResNet for 28 px: conv1 3x3 stride 1 (same width), no max-pool. Deep-stem
    variants (resnet18d, ...) keep their stem convolutions with the first at stride 1."""
    if isinstance(model.conv1, nn.Conv2d):
        width = model.conv1.out_channels
        model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()


@torch.no_grad()
def _runs_at(model: nn.Module, in_chans: int, size: int) -> Exception | None:
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_chans, size, size))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run at this size"
        return exc
    finally:
        model.train(was_training)


def _build(name: str, size: int | None, **kwargs) -> nn.Module:
    timm = _timm()
    cfg = timm.get_pretrained_cfg(name)
    if size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = size
    model = timm.create_model(name, pretrained=False, **kwargs)
    patch = getattr(model, "patch_embed", None)
    step = getattr(patch, "patch_size", (1,))[0]
    if "img_size" in kwargs and size % step:
        padded = -(-size // step) * step
        try:  # ViTs: pad each image to the next multiple of the patch (positions for the padded grid)
            model = timm.create_model(name, pretrained=False, **{**kwargs, "img_size": padded},
                                      dynamic_img_pad=True)
            model.patch_embed.strict_img_size = False  # it takes size px and pads them to padded px
            log.info("%s: %d px is not a multiple of its %d px patch; images are zero-padded to %d px",
                     name, size, step, padded)
        except TypeError:  # a family without padding (Swin) drops the remainder
            log.warning("%s: %d px is not a multiple of its %d px patch; the last %d px of each side are "
                        "not seen", name, size, step, size % step)
    if size is not None and size <= SMALL_STEM_MAX_SIZE and type(model).__name__ == "ResNet":
        _small_stem(model, kwargs.get("in_chans", 3))
    return model


def create_timm_model(name: str, num_classes: int, in_chans: int = 3, img_size: int | None = None,
                      drop_path_rate: float = 0.0) -> nn.Module:
    """timm's ``name`` with a fresh ``num_classes`` head, checked to run at ``img_size`` px."""
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate)
    try:
        model = _build(name, img_size, **kwargs)
    except TypeError as exc:  # an option this family does not take
        raise ConfigError(f"model {name}: {exc}") from exc
    error = _runs_at(model, in_chans, img_size) if img_size is not None else None
    if error is not None:
        fits = next((s for s in (32, 64, 96, 128, 160, 192, 224)
                     if s > img_size and _runs_at(_build(name, s, **kwargs), in_chans, s) is None), None)
        need = f"it runs at {fits} px" if fits else "it runs at none of 32-224 px"
        raise ConfigError(f"model {name} cannot run on {img_size} px images ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0]}); {need}: set data.size accordingly")
    return model


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier head, re-initialised when fine-tuning."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)
