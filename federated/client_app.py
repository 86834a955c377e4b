"""The Flower ClientApp: one hospital. It describes its data (counts only), trains the global model
on its own data and tests it, and sends back parameters and metrics, nothing else.

``app`` is configured by the messages and the node: the server sends the study's config (JSON under
``medmamba-config`` in every message's config record) and the federation's class list; the node
says which site it is: a SuperNode started with ``--node-config 'site-name="..." data-root="..."'``
reads that folder only (a deployed federation), a simulated node is its partition. The same app runs
in ``medmamba federate``, under ``flwr run`` on the simulation engine and on real SuperNodes.

``only_parameters_and_metrics`` is a client mod that checks every outgoing reply: model arrays
whose names and shapes are the model's, numeric metrics, and the site's name (and why it cannot take part) in a query reply.
Images, labels and file paths cannot leave the site through it. ``privacy`` applies the study's
differential privacy at the site.
"""
from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from torch import nn

from medmamba.config import Config, config_from_dict
from medmamba.registry import build_model

from .task import device_for, is_batchnorm_key, local_evaluate, local_train, node_site, node_site_name, site_statistics

CONFIG_KEY = "medmamba-config"  # the study's Config as JSON, in every message's config record
CLASSES_KEY = "class-names"  # the federation's class list as JSON (train and evaluate messages)
STUDY_KEY = "study-id"  # names this study's files at the site (kept across a resume)
STATE_DIR_KEY = "site-state-dir"  # simulation: where sites keep their state (a SuperNode: its node config state-dir)
LOCAL_BN = "local-batchnorm"  # FedBN: this site's BatchNorm state, kept in the node's Context and on disk


class SiteError(RuntimeError):
    """A site failed; the message names it (the server logs it and goes on without the site)."""


@functools.lru_cache(maxsize=4)
def _parse(text: str) -> Config:
    return config_from_dict(json.loads(text))


def study_config(msg: Message) -> Config:
    """The study's config, as the server sent it."""
    return _parse(str(msg.content["config"][CONFIG_KEY]))


def _class_names(msg: Message) -> list[str]:
    return json.loads(str(msg.content["config"][CLASSES_KEY]))


@contextmanager
def _named_failure(name: str, step: str):
    try:
        yield
    except Exception as exc:
        raise SiteError(f"site {name} failed to {step}: {type(exc).__name__}: {exc}") from exc


def batchnorm_file(msg: Message, context: Context, name: str) -> Path:
    """FedBN: where this site keeps its BatchNorm layers for this study, so that they survive a
    restart of the site or a resume of the study (a SuperNode's node config ``state-dir``, default
    ~/.medmamba/sites; in simulation the server's output folder)."""
    config = msg.content["config"]
    root = context.node_config.get("state-dir") or config.get(STATE_DIR_KEY) or "~/.medmamba/sites"
    return Path(str(root)).expanduser() / str(config[STUDY_KEY]) / f"{name}-batchnorm.pt"


def _local_model(msg: Message, context: Context, cfg: Config, num_classes: int, name: str) -> nn.Module:
    """The global model from ``msg``. Under FedBN the message carries no BatchNorm layers (after
    round 1): this site's own are used (from memory, else from its file), or fresh ones before the
    site has trained."""
    model = build_model(cfg.model, num_classes, cfg.data.size, pretrained=False)
    received = msg.content["arrays"].to_torch_state_dict()
    if cfg.federated.strategy == "fedbn":
        state = model.state_dict()
        state.update(received)
        path = batchnorm_file(msg, context, name)
        if LOCAL_BN in context.state:
            state.update(context.state[LOCAL_BN].to_torch_state_dict())
        elif path.is_file():
            state.update(torch.load(path, weights_only=True))
        received = state
    model.load_state_dict(received)
    return model.to(device_for(cfg))


def _keep_batchnorm(msg: Message, context: Context, name: str, local: dict) -> None:
    context.state[LOCAL_BN] = ArrayRecord(local)
    path = batchnorm_file(msg, context, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(local, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def only_parameters_and_metrics(msg: Message, context: Context, call_next) -> Message:
    """Client mod: refuse to send a reply that carries anything but model arrays and metrics (and,
    answering a query, the site's name)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    allowed = {"site": {"name", "error"}} if msg.metadata.message_type == MessageType.QUERY else {}
    for name, record in content.config_records.items():
        if set(record) - allowed.get(name, set()) or not all(isinstance(v, str) for v in record.values()):
            raise SiteError(f"reply carries config record {name!r}; only arrays and metrics may leave a site")
    expected = {k: tuple(v.shape) for k, v in msg.content["arrays"].to_torch_state_dict().items()} \
        if "arrays" in msg.content.array_records else {}
    for name, record in content.array_records.items():
        shapes = {k: tuple(a.shape) for k, a in record.items()}
        if name != "arrays" or not shapes.items() <= expected.items():  # FedBN sends a subset
            raise SiteError(f"reply array record {name!r} is not the model's parameters")
    for record in content.metric_records.values():
        for key, value in record.items():
            if not isinstance(value, (int, float)):
                raise SiteError(f"metric {key!r} is not a number")
    return reply


def privacy(msg: Message, context: Context, call_next) -> Message:
    """Client mod: the study's differential privacy on a training reply. Central: clip the update
    here (Flower's fixed clipping; the server adds the noise). Local: clip and add Gaussian noise
    here, before the update leaves the site (Flower's LocalDpMod, one (epsilon, delta) release per round)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    fed = study_config(msg).federated
    if fed.dp_clipping_norm is None:
        return call_next(msg, context)
    if fed.dp_mode == "central":
        return fixedclipping_mod(msg, context, call_next)
    local = LocalDpMod(fed.dp_clipping_norm, sensitivity=fed.dp_clipping_norm, epsilon=fed.dp_epsilon,
                       delta=fed.dp_delta)
    return local(msg, context, call_next)


app = ClientApp(mods=[only_parameters_and_metrics, privacy])


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """The site's name and its images per split and class (counts only), or, when its data cannot
    be read, its name and why."""
    cfg = study_config(msg)
    name = node_site_name(cfg, context.node_config)
    try:
        counts = site_statistics(node_site(cfg, context.node_config))
    except Exception as exc:
        site = ConfigRecord({"name": name, "error": f"site {name} failed to read its data: {type(exc).__name__}: {exc}"})
        return Message(content=RecordDict({"site": site}), reply_to=msg)
    content = RecordDict({"site": ConfigRecord({"name": name}), "counts": MetricRecord(counts)})
    return Message(content=content, reply_to=msg)


@contextmanager
def _site_work(msg: Message, context: Context, step: str):
    """(config, site name, site data, the global model) for a train or evaluate message; whatever
    fails inside, here or in the caller's block, is a SiteError naming the site."""
    cfg = study_config(msg)
    name = node_site_name(cfg, context.node_config)
    with _named_failure(name, step):
        site = node_site(cfg, context.node_config, _class_names(msg))
        yield cfg, name, site, _local_model(msg, context, cfg, site.num_classes, name)


@app.train()
def train(msg: Message, context: Context) -> Message:
    with _site_work(msg, context, "train") as (cfg, name, site, model):
        config = msg.content["config"]
        server_round = int(config["server-round"]) + int(config.get("round-offset", 0))  # after a resume
        mu = float(config.get("proximal-mu", 0.0))  # set by the FedProx strategy
        loss = local_train(model, site, cfg, server_round, device_for(cfg), mu)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if cfg.federated.strategy == "fedbn":  # BatchNorm layers stay here, on the wire too
            _keep_batchnorm(msg, context, name, {k: state.pop(k) for k in list(state) if is_batchnorm_key(model, k)})
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(site.train)})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    with _site_work(msg, context, "evaluate") as (cfg, _, site, model):
        metrics = local_evaluate(model, site, cfg, device_for(cfg))
    return Message(content=RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(site.test)})}),
                   reply_to=msg)
