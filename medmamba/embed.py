"""Feature embeddings: what a model's classifier sees, projected to 2-D (the paper's Fig. 6).

Features are timm's pre-logits (``forward_head(forward_features(x), pre_logits=True)``; MedMamba
follows the same convention), projected with scikit-learn's t-SNE or, when umap-learn is
installed, UMAP. The silhouette score of the classes is computed in the full feature space, so
it compares models without depending on the projection.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from torch import nn
from torch.utils.data import DataLoader

from .errors import CheckpointError, ConfigError

PROJECTIONS = ("tsne", "umap")


@torch.no_grad()
def features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features N x D before the classifier, labels N) over ``loader``."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise CheckpointError(f"{type(model).__name__} has no forward_features/forward_head, so its features "
                              "before the classifier cannot be read")
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.flatten(1).float().cpu().numpy())
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels)


def silhouette(feats: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette score of the classes in feature space (Euclidean), in [-1, 1]; NaN with one class."""
    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return float("nan")
    return float(silhouette_score(feats, labels))


def check_projections(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in PROJECTIONS]
    if unknown or not methods:
        raise ConfigError(f"unknown projection {unknown[0] if unknown else None!r}; choose from {', '.join(PROJECTIONS)}")


def project(feats: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of ``feats`` by t-SNE or UMAP, seeded."""
    check_projections([method])
    if method == "tsne":
        perplexity = min(30.0, max(2.0, (len(feats) - 1) / 3))  # t-SNE needs perplexity < N
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
    try:
        import umap
    except ImportError:
        raise ConfigError("UMAP needs umap-learn: pip install umap-learn (or medmamba[analysis])") from None
    return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(feats) - 1)).fit_transform(feats)


def plot_embedding(coords: np.ndarray, groups: dict[str, list[str]], path: Path, title: str) -> Path:
    """One scatter per colouring (e.g. ``{"class": [...], "site": [...]}``), side by side."""
    from .reports import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 5), squeeze=False)
    for ax, (by, values) in zip(axes[0], groups.items()):
        values = np.asarray(values)
        for value in sorted(set(values)):
            mask = values == value
            ax.scatter(coords[mask, 0], coords[mask, 1], s=8, alpha=0.7, label=f"{value} ({mask.sum()})")
        ax.set(title=f"{title}: by {by}", xticks=[], yticks=[])
        ax.legend(fontsize="small", markerscale=2)
    return save_figure(fig, path)


def embed(parts: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str], output_dir: str | Path,
          methods: list[str] = ("tsne",), seed: int = 0, title: str = "features") -> tuple[dict, list[Path]]:
    """Project the features of ``parts`` ({group: (features, labels)}: one group, or one per site)
    with each method; write ``embedding_<method>.png`` (coloured by class, and by site when there
    are several groups), ``embedding.csv`` (group, label, class and coordinates per point) and
    return ({"silhouette": ..., per site "silhouette/<site>": ..., "points": N}, files)."""
    feats = np.concatenate([f for f, _ in parts.values()])
    labels = np.concatenate([y for _, y in parts.values()])
    site = [name for name, (f, _) in parts.items() for _ in range(len(f))]
    if len(feats) < 4:
        raise ConfigError(f"{len(feats)} images: an embedding needs at least 4")
    summary = {"silhouette": silhouette(feats, labels), "points": len(feats)}
    if len(parts) > 1:
        summary.update({f"silhouette/{name}": silhouette(f, y) for name, (f, y) in parts.items()})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = [class_names[i] for i in labels]
    groups = {"class": classes, **({"site": site} if len(parts) > 1 else {})}
    coords = {m: project(feats, m, seed) for m in methods}
    files = [plot_embedding(c, groups, out / f"embedding_{m}.png", f"{title} ({m})") for m, c in coords.items()]
    with open(out / "embedding.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "label", "class"] + [f"{m}_{axis}" for m in coords for axis in "xy"])
        for i in range(len(feats)):
            writer.writerow([site[i], int(labels[i]), classes[i]] + [f"{c[i, k]:.5f}" for c in coords.values()
                                                                     for k in (0, 1)])
    return summary, files + [out / "embedding.csv"]
