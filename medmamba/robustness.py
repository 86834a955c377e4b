"""Robustness of a trained model to clinical image perturbations (the paper's Fig. 7).

Each perturbation has five severities of fixed magnitude (below); the direction (rotation sign,
shift direction, zoom in or out, warmer or cooler) and the noise are drawn per image from a
generator seeded with (seed, image index), so a result does not depend on batch order and repeats
exactly. Perturbations act on the resized [0, 1] image, before the model's normalisation, with
torchvision's transforms v2 functionals. Severity 0 is the unperturbed split: its metrics are
``medmamba evaluate``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from .data import make_loader
from .errors import ConfigError
from .evaluation import predict_metrics

SEVERITIES = (1, 2, 3, 4, 5)


def _sign(rng: torch.Generator) -> int:
    return 1 if torch.rand((), generator=rng) < 0.5 else -1


def _rotation(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.rotate(x, _sign(rng) * level, interpolation=TF.InterpolationMode.BILINEAR)


def _translation(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    shift = [round(_sign(rng) * level * x.shape[-1]), round(_sign(rng) * level * x.shape[-2])]
    return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0])


def _scaling(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0 + _sign(rng) * level, shear=[0.0],
                     interpolation=TF.InterpolationMode.BILINEAR)


def _colour_temperature(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    s = _sign(rng) * level  # > 0 warmer (more red, less blue), < 0 cooler
    return (x * torch.tensor([1 + s, 1.0, 1 - s]).view(3, 1, 1)).clamp(0, 1)


def _brightness(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.adjust_brightness(x, 1.0 + _sign(rng) * level)


def _contrast(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.adjust_contrast(x, 1.0 + _sign(rng) * level)


def _gaussian_noise(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return (x + level * torch.randn(x.shape, generator=rng)).clamp(0, 1)


def _blur(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.gaussian_blur(x, kernel_size=2 * math.ceil(2 * level) + 1, sigma=level)


def _jpeg(x: Tensor, level: float, rng: torch.Generator) -> Tensor:
    return TF.jpeg((x * 255).round().to(torch.uint8), quality=int(level)).float() / 255


@dataclass(frozen=True)
class Perturbation:
    apply: Callable[[Tensor, float, torch.Generator], Tensor]
    levels: tuple[float, ...]  # the magnitude at severities 1..5
    unit: str


PERTURBATIONS = {
    "rotation": Perturbation(_rotation, (5, 10, 15, 20, 30), "degrees"),
    "translation": Perturbation(_translation, (0.04, 0.08, 0.12, 0.16, 0.2), "fraction of the side"),
    "scaling": Perturbation(_scaling, (0.1, 0.2, 0.3, 0.4, 0.5), "zoom 1 ± level"),
    "colour_temperature": Perturbation(_colour_temperature, (0.05, 0.1, 0.15, 0.2, 0.3), "red/blue gain ± level"),
    "brightness": Perturbation(_brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "factor 1 ± level"),
    "contrast": Perturbation(_contrast, (0.1, 0.2, 0.3, 0.4, 0.5), "factor 1 ± level"),
    "gaussian_noise": Perturbation(_gaussian_noise, (0.02, 0.04, 0.06, 0.08, 0.1), "sigma"),
    "blur": Perturbation(_blur, (0.5, 0.75, 1.0, 1.5, 2.0), "Gaussian sigma, pixels"),
    "jpeg": Perturbation(_jpeg, (80, 60, 40, 20, 10), "JPEG quality"),
}


class Perturbed(Dataset):
    """``base`` (normalised to [-1, 1]) with ``name`` applied at ``severity`` to every image."""

    def __init__(self, base: Dataset, name: str, severity: int, seed: int = 0):
        self.base, self.perturbation, self.severity, self.seed = base, PERTURBATIONS[name], severity, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = self.perturbation.apply(x * 0.5 + 0.5, self.perturbation.levels[self.severity - 1], rng)
        return (image.clamp(0, 1) - 0.5) / 0.5, y


def check(perturbations: list[str], severities: list[int]) -> None:
    """ConfigError for an unknown perturbation or a severity outside 0..5."""
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown or not perturbations:
        raise ConfigError(f"unknown perturbation {unknown[0] if unknown else None!r}; "
                          f"choose from {', '.join(PERTURBATIONS)}")
    bad = [s for s in severities if s not in (0, *SEVERITIES)]
    if bad or not severities:
        raise ConfigError(f"severity {bad[0] if bad else None!r} is out of range: severities are 0 (none) to 5")


def evaluate_robustness(model: nn.Module, dataset: Dataset, class_names: list[str], device: torch.device,
                        perturbations: list[str], severities: list[int], batch_size: int = 128, seed: int = 0,
                        positive_class: int = 1) -> list[dict]:
    """One row per perturbation and severity: ``perturbation``, ``severity``, ``level`` and the
    scalar metrics of metrics.json. Severity 0, the clean baseline that ``drops`` measures from,
    is always included: evaluated once and repeated for each perturbation."""
    check(perturbations, severities)
    severities = sorted({0, *severities})

    def metrics_of(data: Dataset) -> dict:
        m, _, _ = predict_metrics(model, make_loader(data, batch_size, shuffle=False), device, class_names,
                                  positive_class)
        return {k: v for k, v in m.items() if isinstance(v, (int, float))}

    clean = metrics_of(dataset)
    rows = []
    for name in perturbations:
        for severity in severities:
            level = PERTURBATIONS[name].levels[severity - 1] if severity else 0
            metrics = clean if severity == 0 else metrics_of(Perturbed(dataset, name, severity, seed))
            rows.append({"perturbation": name, "severity": severity, "level": level, **metrics})
    return rows


def drops(rows: list[dict], metrics: tuple[str, ...] = ("accuracy", "auc")) -> list[dict]:
    """Per perturbation: each metric unperturbed, at the highest severity, its drop there and its
    mean drop over the severities evaluated."""
    out = []
    for name in dict.fromkeys(r["perturbation"] for r in rows):
        mine = sorted((r for r in rows if r["perturbation"] == name), key=lambda r: r["severity"])
        base = next((r for r in mine if r["severity"] == 0), None)
        row = {"perturbation": name, "max_severity": mine[-1]["severity"]}
        for m in metrics:
            if base is not None:
                perturbed = [r[m] for r in mine if r["severity"] > 0]
                row.update({f"{m}_clean": base[m], f"{m}_worst": mine[-1][m], f"{m}_drop": base[m] - mine[-1][m],
                            f"{m}_mean_drop": base[m] - float(np.mean(perturbed)) if perturbed else 0.0})
        out.append(row)
    return out


def plot_curves(rows: list[dict], path: Path, metrics: tuple[str, ...] = ("accuracy", "auc")) -> Path:
    """Fig. 7-style curves: each metric against severity, one line per perturbation."""
    from .reports import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name in dict.fromkeys(r["perturbation"] for r in rows):
            mine = sorted((r for r in rows if r["perturbation"] == name), key=lambda r: r["severity"])
            ax.plot([r["severity"] for r in mine], [r[m] for r in mine], marker="o", label=name)
        ax.set(xlabel="severity", ylabel=m, title=f"{m} under perturbation", xticks=range(0, 6))
    axes[0][-1].legend(fontsize="small")
    return save_figure(fig, path)


def write_robustness(rows: list[dict], output_dir: str | Path) -> list[Path]:
    """robustness.csv, robustness_summary.csv (the drops) and robustness.png in ``output_dir``."""
    from .reports import write_csv

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_csv(rows, out / "robustness.csv"), write_csv(drops(rows), out / "robustness_summary.csv"),
            plot_curves(rows, out / "robustness.png")]
