"""Grad-CAM heatmaps of a trained model, ours or a timm baseline (the paper's Fig. 5).

The CAM methods come from pytorch-grad-cam: it has Grad-CAM and its variants (Grad-CAM++,
XGradCAM, LayerCAM) behind one interface, takes a reshape for layers whose output is not
(B, C, H, W), and returns heatmaps at the input's resolution; Captum has Grad-CAM alone.
The target layer defaults to the last stage of each model family whose map has at least 4 x 4
cells at the input's size (at MedMNIST's 28 px MedMamba's last stages are 1 x 1); MedMamba's
channels-last stages and Swin's are permuted to (B, C, H, W), a ViT's tokens (without its class
token) are laid back on their grid.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .errors import ConfigError
from .model import MedMamba

MIN_SIDE = 4  # the default layer's map is at least this many cells a side where the model has one
METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM}


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown CAM method {unknown[0] if unknown else None!r}; choose from {', '.join(METHODS)}")


def stage_layers(model: nn.Module) -> list[str]:
    """The names of the model family's stages, first to last (a ViT: its last block's input)."""
    if isinstance(model, MedMamba):
        return [f"stages.{i}" for i in range(len(model.stages))]
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):  # ViT family: the class token
        return [f"blocks.{len(model.blocks) - 1}.norm1"]  # reads the last block's input, not its output
    info = getattr(model, "feature_info", None)
    if info:
        return [stage["module"] for stage in info]
    raise ConfigError(f"no default Grad-CAM layer for {type(model).__name__}; name one with --target-layer")


@torch.no_grad()
def default_target_layer(model: nn.Module, size: int) -> str:
    """The last stage whose map is at least MIN_SIDE cells a side on ``size`` px inputs (else the
    finest one): at 28 px MedMamba's last stages are 1 x 1, which gives a blank heatmap."""
    names = stage_layers(model)
    if len(names) == 1:
        return names[0]
    sides: dict[str, int] = {}
    hooks = [target_module(model, name).register_forward_hook(
        lambda module, args, out, name=name: sides.__setitem__(name, to_nchw(model, name)(out).shape[-1]))
        for name in names]
    try:
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    fine = [name for name in names if sides.get(name, 0) >= MIN_SIDE]
    return fine[-1] if fine else max(names, key=lambda name: sides.get(name, 0))


def target_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name``, or a ConfigError naming the closest ones."""
    modules = dict(model.named_modules())
    if name not in modules:
        near = difflib.get_close_matches(name, [n for n in modules if n], n=5)
        raise ConfigError(f"the model has no layer {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
    return modules[name]


def to_nchw(model: nn.Module, name: str) -> Callable[[Tensor], Tensor]:
    """The reshape from layer ``name``'s output to (B, C, H, W)."""
    channels_last = (isinstance(model, MedMamba) and name.startswith("stages")) or \
        getattr(model, "output_fmt", "NCHW") == "NHWC"
    prefix = getattr(model, "num_prefix_tokens", 0)

    def reshape(t: Tensor) -> Tensor:
        if t.ndim == 3:  # tokens (B, N, C)
            t = t[:, prefix:]
            side = math.isqrt(t.shape[1])
            if side * side != t.shape[1]:
                raise ConfigError(f"layer {name} gives {t.shape[1]} tokens, not a square grid; choose another layer")
            return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
        if t.ndim != 4:
            raise ConfigError(f"layer {name} gives a {t.ndim}-D output; Grad-CAM needs a spatial map")
        return t.permute(0, 3, 1, 2) if channels_last else t

    return reshape


def heatmaps(model: nn.Module, images: Tensor, classes: list[int], method: str = "gradcam",
             layer: str | None = None, batch_size: int = 16) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1] of class ``classes[i]`` for ``images[i]`` (normalised model
    inputs on the model's device), at the input's resolution."""
    check_methods([method])
    name = layer or default_target_layer(model, images.shape[-1])
    cam_class = METHODS[method]
    with cam_class(model=model, target_layers=[target_module(model, name)],
                   reshape_transform=to_nchw(model, name)) as cam:
        maps = [cam(input_tensor=images[i:i + batch_size],
                    targets=[ClassifierOutputTarget(c) for c in classes[i:i + batch_size]])
                for i in range(0, len(images), batch_size)]
    return np.concatenate(maps).astype(np.float32)


def display_image(x: Tensor) -> np.ndarray:
    """A normalised input (3, H, W) in [-1, 1] as an (H, W, 3) float image in [0, 1]."""
    return (x.detach().cpu().float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_grid(images: Tensor, maps: dict[str, np.ndarray], labels: list[str], predictions: list[str],
              probabilities: list[float], path: Path) -> Path:
    """Rows of image | one overlay per method, titled with label, prediction and probability."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from .reports import pyplot, save_figure

    plt = pyplot()
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.4 * cols, 2.5 * len(images)), squeeze=False)
    for i, x in enumerate(images):
        rgb = display_image(x)
        axes[i][0].imshow(rgb)
        axes[i][0].set_title(f"label {labels[i]}\npred {predictions[i]} (p={probabilities[i]:.2f})", fontsize=8)
        for j, (method, m) in enumerate(maps.items(), start=1):
            axes[i][j].imshow(show_cam_on_image(rgb, m[i], use_rgb=True))
            axes[i][j].set_title(method, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    return save_figure(fig, path)


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([torch.softmax(model(images[i:i + batch_size]).float(), 1).cpu().numpy()
                           for i in range(0, len(images), batch_size)])


def explain(model: nn.Module, images: Tensor, labels: np.ndarray | None, class_names: list[str],
            output_dir: str | Path, methods: list[str] = ("gradcam", "gradcam++"), layer: str | None = None,
            target: str = "predicted", ids: dict[str, np.ndarray] | None = None, per_page: int = 8) -> list[Path]:
    """Heatmaps of ``images`` (normalised, on the model's device) by each CAM method for the
    predicted class (``target="label"``: the true one), written to ``output_dir``: grid PNGs of
    ``per_page`` images and heatmaps.npz (``heatmaps``: the first method's, N x H x W; one
    ``heatmaps_<method>`` per method; labels, predictions, probabilities, class names and ``ids``,
    e.g. the images' indices or paths). Returns the files."""
    if target not in ("predicted", "label") or (target == "label" and labels is None):
        raise ConfigError(f"target {target!r}: 'predicted', or 'label' for images with labels")
    check_methods(methods)
    model.eval()
    layer = layer or default_target_layer(model, images.shape[-1])
    probs = _predict(model, images, 16)
    predictions = probs.argmax(1)
    classes = (labels if target == "label" else predictions).tolist()
    maps = {m: heatmaps(model, images, classes, m, layer) for m in methods}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = lambda idx: [class_names[i] for i in idx]  # noqa: E731
    label_names = names(labels) if labels is not None else ["?"] * len(images)
    files = []
    for page, start in enumerate(range(0, len(images), per_page), start=1):
        part = slice(start, start + per_page)
        files.append(plot_grid(images[part], {m: v[part] for m, v in maps.items()}, label_names[part],
                               names(predictions[part]), probs[np.arange(len(probs)), predictions][part].tolist(),
                               out / f"gradcam_{page:02d}.png"))
    arrays = {"heatmaps": maps[methods[0]], **{f"heatmaps_{m.replace('++', 'pp')}": v for m, v in maps.items()},
              "predictions": predictions, "probabilities": probs, "class_names": np.array(class_names),
              "target_layer": np.array(layer), **(ids or {})}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez_compressed(out / "heatmaps.npz", **arrays)
    return files + [out / "heatmaps.npz"]
