"""The federated task: sites' data, the model, and local training/evaluation with the shared loop.

Sites are either natural (``data.root/<site>/<class>/*``: one image folder per hospital, each
with its own split) or simulated from one dataset with a flwr-datasets partitioner (IID,
Dirichlet label skew, quantity skew) over the official train + val splits, each site's share
split into its own train/val/test by ``data.split_ratios``. The server's global test set is the
official test split (simulated) or the union of the sites' test splits (natural).
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from medmamba.config import Config, config_from_dict
from medmamba.data import (IMAGE_SUFFIXES, Datasets, build_datasets, is_hidden, labels_of, make_loader,
                           stratified_split, subfolders)
from medmamba.errors import ConfigError, DataError
from medmamba.evaluation import load_checkpoint, predict_metrics, run_checkpoint
from medmamba.metrics import METRIC_KEYS
from medmamba.runtime import resolve_device, seed_everything
from medmamba.train import (Callback, Trainer, compile_failures, for_training, make_optimizer, train_one_epoch,
                            train_precision)

log = logging.getLogger(__name__)


def _partitioner(cfg: Config):
    from flwr_datasets.partitioner import DirichletPartitioner, ExponentialPartitioner, IidPartitioner

    fed = cfg.federated
    if fed.partition == "iid":
        return IidPartitioner(num_partitions=fed.num_sites)
    if fed.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=fed.num_sites, partition_by="label", alpha=fed.alpha,
                                    min_partition_size=2, self_balancing=False, seed=cfg.data.seed)
    return ExponentialPartitioner(num_partitions=fed.num_sites)  # quantity skew: sizes grow as e^site


def _site_split(pool: Dataset, indices: np.ndarray, labels: np.ndarray, cfg: Config, name: str,
                data: Datasets) -> Datasets:
    train_r, val_r, test_r = cfg.data.split_ratios
    if len(indices) < 3:
        raise DataError(f"site {name} received {len(indices)} examples; it needs at least 3 for train/val/test "
                        "(raise federated.alpha or lower federated.num_sites)")
    y = labels[indices]
    counts = np.bincount(y, minlength=data.num_classes)
    missing = [data.class_names[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        log.warning("site %s has no examples of %s", name, missing)
    rest, test = stratified_split(indices, test_r, y, cfg.data.seed)
    train, val = stratified_split(rest, val_r / (train_r + val_r), labels[rest], cfg.data.seed)
    return replace(data, train=Subset(pool, sorted(train)), val=Subset(pool, sorted(val)),
                   test=Subset(pool, sorted(test)), name=name, checksum="")


def site_names(cfg: Config) -> list[str]:
    """The sites that train: every site but ``federated.holdout_site``."""
    names = all_site_names(cfg)
    holdout = cfg.federated.holdout_site
    if holdout is None:
        return names
    if holdout not in names:
        raise ConfigError(f"config key federated.holdout_site: no site {holdout!r}; the sites are {', '.join(names)}")
    if len(names) - 1 < cfg.federated.min_clients:
        raise ConfigError(f"holding {holdout} out leaves {len(names) - 1} sites, fewer than federated.min_clients="
                          f"{cfg.federated.min_clients}")
    return [n for n in names if n != holdout]


def all_site_names(cfg: Config) -> list[str]:
    """Every site's name: natural partition: the folders under data.root; else site_0, site_1, ..."""
    fed = cfg.federated
    if fed.partition == "deployed":
        raise ConfigError("a deployed federation's sites are its SuperNodes: their names come from their node config")
    if fed.partition != "natural":
        return [f"site_{i}" for i in range(fed.num_sites)]
    if cfg.data.name != "folder" or not cfg.data.root:
        raise ConfigError("federated.partition=natural needs data.name=folder and data.root with one folder per site")
    root = Path(cfg.data.root).expanduser()
    sites = subfolders(root) if root.is_dir() else []
    if not sites:
        raise DataError(f"{root}: expected one folder per site (root/<site>/<class>/*)")
    if any(f.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(f.name) for site in sites for f in site.iterdir()):
        raise DataError(f"{root} holds images in {', '.join(p.name for p in sites)}, so it is one dataset's class "
                        "folders, not sites: partition natural reads root/<site>/<class>/*; to split one dataset "
                        "into simulated sites, use federated.partition iid, dirichlet or quantity")
    names = [p.name for p in sites]
    if len(names) < fed.min_clients:
        raise ConfigError(f"{root} has {len(names)} site folders but federated.min_clients is {fed.min_clients}")
    return names


def site_classes(site: Path) -> set[str]:
    """The class folder names of one site's folder (with or without train/val/test folders)."""
    parents = [site / s for s in ("train", "val", "test") if (site / s).is_dir()] or [site]
    return {c.name for parent in parents for c in parent.iterdir() if c.is_dir()}


def _natural_classes(root: Path) -> list[str]:
    """Every class folder name of every site."""
    return sorted(set().union(*(site_classes(p) for p in root.iterdir() if p.is_dir())))


@functools.lru_cache(maxsize=2)
def _simulated(cfg_key: str) -> tuple[list[Datasets], Datasets]:
    from datasets import Dataset as HFDataset

    cfg = config_from_dict(json.loads(cfg_key))
    data = build_datasets(cfg.data)
    pool = ConcatDataset([data.train, data.val])
    labels = labels_of(pool)
    partitioner = _partitioner(cfg)
    partitioner.dataset = HFDataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    try:
        parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                 for i in range(cfg.federated.num_sites)]
    except ValueError as exc:  # e.g. a Dirichlet draw that cannot give every site enough examples
        raise DataError(f"cannot split {data.name} into {cfg.federated.num_sites} {cfg.federated.partition} sites: "
                        f"{exc} (lower federated.num_sites or raise federated.alpha)") from exc
    sites = [_site_split(pool, part, labels, cfg, f"site_{i}", data) for i, part in enumerate(parts)]
    return sites, data


def _key(cfg: Config) -> str:
    return json.dumps({"data": cfg.to_dict()["data"], "federated": cfg.to_dict()["federated"]}, sort_keys=True)


def build_site(cfg: Config, index: int) -> Datasets:
    """Training site ``index``'s train/val/test splits (cached per process: simulated sites are
    long-lived Ray actors). A natural site reads only its own folder."""
    return _named_site(cfg, site_names(cfg)[index])


def _named_site(cfg: Config, name: str) -> Datasets:
    if cfg.federated.partition != "natural":
        return _simulated(_key(cfg))[0][all_site_names(cfg).index(name)]
    return _natural_site(_key(cfg), name)


@functools.lru_cache(maxsize=8)
def _natural_site(cfg_key: str, name: str) -> Datasets:
    cfg = config_from_dict(json.loads(cfg_key))
    root = Path(cfg.data.root).expanduser()
    site = build_datasets(replace(cfg.data, root=str(root / name)), classes=_natural_classes(root))
    return replace(site, name=name)


def node_site_name(cfg: Config, node_config: dict) -> str:
    """The site a Flower node is: a SuperNode's ``site-name`` node config, or the simulation's partition."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if cfg.federated.partition == "deployed":
        raise ConfigError("a deployed SuperNode needs --node-config 'site-name=\"NAME\" data-root=\"FOLDER\"'")
    return site_names(cfg)[int(node_config["partition-id"])]


def node_site(cfg: Config, node_config: dict, classes: list[str] | None = None) -> Datasets:
    """The data of the site a Flower node is: a SuperNode reads the folder its ``data-root`` node config
    names and nothing else, with the federation's ``classes`` (None: its own, before the server has
    gathered every site's); a simulated node is its partition."""
    if "data-root" not in node_config:
        if cfg.federated.partition == "deployed":
            raise ConfigError("a deployed SuperNode needs --node-config 'site-name=\"NAME\" data-root=\"FOLDER\"'")
        return build_site(cfg, int(node_config["partition-id"]))
    return _deployed_site(_key(cfg), node_site_name(cfg, node_config), str(node_config["data-root"]),
                          tuple(classes) if classes else None)


@functools.lru_cache(maxsize=4)
def _deployed_site(cfg_key: str, name: str, root: str, classes: tuple[str, ...] | None) -> Datasets:
    cfg = config_from_dict(json.loads(cfg_key))
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"site {name}: data-root {path} is not a folder (root/<class>/* or root/<split>/<class>/*)")
    data = replace(cfg.data, name="folder", root=str(path))
    return replace(build_datasets(data, classes=list(classes or sorted(site_classes(path)))), name=name)


def site_statistics(site: Datasets) -> dict[str, int]:
    """Counts only, for the report: ``{"<split>/<class>": images}`` for every split and class."""
    counts = {}
    for split in ("train", "val", "test"):
        per_class = np.bincount(labels_of(getattr(site, split)), minlength=site.num_classes)
        counts.update({f"{split}/{c}": int(n) for c, n in zip(site.class_names, per_class)})
    return counts


def pooled_datasets(cfg: Config) -> Datasets:
    """The federation as one dataset: the training sites' train and val splits pooled (the
    centralised baseline trains on them) and the server's test set: every image of the held-out
    site (``federated.holdout_site``), else the official test split (simulated sites) or the union
    of the sites' test splits (natural sites; a site whose folder cannot be read is left out, with
    a warning)."""
    if cfg.federated.partition == "deployed":
        raise ConfigError("a deployed federation's server holds no data: its sites test the global model")
    names = site_names(cfg)
    if cfg.federated.holdout_site is not None:  # leave-one-site-out: the held-out hospital is the test set
        sites = [build_site(cfg, i) for i in range(len(names))]
        held = _named_site(cfg, cfg.federated.holdout_site)
        return replace(held, train=ConcatDataset([s.train for s in sites]), val=ConcatDataset([s.val for s in sites]),
                       test=ConcatDataset([held.train, held.val, held.test]), checksum="",
                       name="pooled:" + ",".join(names))
    if cfg.federated.partition != "natural":
        sites, data = _simulated(_key(cfg))
        test = data.test
    else:
        sites = []
        for i, name in enumerate(names):
            try:
                sites.append(build_site(cfg, i))
            except DataError as exc:
                log.warning("site %s is left out of the pooled data and the global test set: %s", name, exc)
        if not sites:
            raise DataError(f"no site under {cfg.data.root} could be read")
        data, test = replace(sites[0], checksum=""), ConcatDataset([s.test for s in sites])
    return replace(data, train=ConcatDataset([s.train for s in sites]), val=ConcatDataset([s.val for s in sites]),
                   test=test, name="pooled:" + ",".join(s.name for s in sites))


def is_batchnorm_key(model: nn.Module, key: str) -> bool:
    """Whether state-dict entry ``key`` belongs to a BatchNorm layer (kept local under FedBN)."""
    module_name = key.rsplit(".", 1)[0]
    return isinstance(dict(model.named_modules()).get(module_name), nn.modules.batchnorm._BatchNorm)


def round_lr(cfg: Config, server_round: int) -> float:
    """The MultiStepLR learning rate at the first epoch of ``server_round`` (milestones count epochs
    over all rounds, as in the pooled baseline with rounds x local_epochs epochs)."""
    epoch = (server_round - 1) * cfg.federated.local_epochs
    return cfg.optim.lr * cfg.sched.gamma ** sum(m <= epoch for m in cfg.sched.milestones)


def local_train(model: nn.Module, site: Datasets, cfg: Config, server_round: int, device: torch.device,
                proximal_mu: float = 0.0) -> float:
    """``federated.local_epochs`` epochs of the shared training loop on the site's train split, in
    ``train.amp``'s precision and compiled under ``train.compile``, as the Trainer trains."""
    seed_everything(cfg.train.seed + server_round)
    amp, scaler = train_precision(cfg.train, device)
    steps = for_training(model, cfg.train)
    optimizer = make_optimizer(model.parameters(), replace(cfg.optim, lr=round_lr(cfg, server_round)))
    loader = make_loader(site.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + server_round,
                         num_workers=cfg.data.num_workers)
    proximal = None
    if proximal_mu > 0:
        proximal = (proximal_mu, [p.detach().clone() for p in model.parameters()])
    loss = 0.0
    for epoch in range(cfg.federated.local_epochs):
        with compile_failures():
            loss = train_one_epoch(steps, loader, optimizer, device, scaler, epoch=epoch + 1, progress=False,
                                   proximal=proximal, amp=amp)
    return loss


def local_evaluate(model: nn.Module, site: Datasets, cfg: Config, device: torch.device) -> dict[str, float]:
    """The paper's metrics of ``model`` on the site's val and test splits, as val_* and test_*."""
    out = {}
    for split in ("val", "test"):
        loader = make_loader(getattr(site, split), cfg.train.batch_size, shuffle=False)
        metrics = predict_metrics(model, loader, device, site.class_names, site.positive_class)[0]
        out.update({f"{split}_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def device_for(cfg: Config) -> torch.device:
    return resolve_device(cfg.train.device)


def centralized_baseline(cfg: Config, output_dir: Path, callbacks: Sequence[Callback] = (),
                         resume: bool = False) -> dict:
    """The model trained on the pooled sites' train/val splits for rounds x local_epochs epochs
    (with ``resume``, continued from what ``output_dir`` holds), tested on the federation's global
    test set; returns its test metrics."""
    epochs = cfg.federated.rounds * cfg.federated.local_epochs
    pooled_cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    return Trainer(pooled_cfg, pooled_datasets(cfg), output_dir, callbacks, progress=False).fit(resume=resume)


def trained_model(output_dir: Path, cfg: Config) -> nn.Module:
    """The model a training run left in ``output_dir`` (``evaluation.run_checkpoint``) on cfg's device."""
    return load_checkpoint(run_checkpoint(output_dir), device=cfg.train.device, with_data=False).model


def test_on_sites(model: nn.Module, cfg: Config) -> dict[str, dict[str, float]]:
    """``model`` on every training site's test split: {site: {"auc", "accuracy", ...}}."""
    device = next(model.parameters()).device
    out = {}
    for i, name in enumerate(site_names(cfg)):
        site = build_site(cfg, i)
        metrics = predict_metrics(model, make_loader(site.test, cfg.train.batch_size, shuffle=False), device,
                                  site.class_names, site.positive_class)[0]
        out[name] = {k: float(metrics[k]) for k in METRIC_KEYS}
    return out


def local_baselines(cfg: Config, output_dir: Path, callbacks: Sequence[Callback] = (),
                    resume: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """Each training site's model trained on its own data alone for the federation's budget (rounds
    x local_epochs epochs; with ``resume``, continued from what ``output_dir`` holds) and tested on
    every site's test split: {trained at: {tested at: metrics}}."""
    local_cfg = replace(cfg, train=replace(cfg.train, epochs=cfg.federated.rounds * cfg.federated.local_epochs))
    matrix = {}
    for i, name in enumerate(site_names(cfg)):
        site = build_site(cfg, i)
        Trainer(local_cfg, site, output_dir / name, callbacks, progress=False).fit(resume=resume)
        matrix[name] = test_on_sites(trained_model(output_dir / name, cfg), cfg)
    return matrix
