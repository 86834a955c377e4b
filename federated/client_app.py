"""The Flower ClientApp: one hospital. It trains the global model on its own data and reports
parameters and metrics, nothing else.

``only_parameters_and_metrics`` is a client mod that checks every outgoing reply: model arrays
whose names and shapes are the model's, and numeric metrics. Images, labels and file paths
cannot leave the site through it.
"""
from __future__ import annotations

from contextlib import contextmanager

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from medmamba.config import Config, config_from_dict
from medmamba.data import Datasets
from medmamba.registry import build_model

from .task import build_site, device_for, is_batchnorm_key, local_evaluate, local_train

LOCAL_BN = "local-batchnorm"  # FedBN: this site's BatchNorm state, kept in the node's Context


def _site_index(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _local_model(msg: Message, context: Context, cfg: Config, num_classes: int) -> nn.Module:
    """The global model from ``msg``. Under FedBN the message carries no BatchNorm layers (after
    round 1): this site's own are used, or fresh ones before the site has trained."""
    model = build_model(cfg.model, num_classes, cfg.data.size, pretrained=False)
    received = msg.content["arrays"].to_torch_state_dict()
    if cfg.federated.strategy == "fedbn":
        state = model.state_dict()
        state.update(received)
        if LOCAL_BN in context.state:
            state.update(context.state[LOCAL_BN].to_torch_state_dict())
        received = state
    model.load_state_dict(received)
    return model.to(device_for(cfg))


class SiteError(RuntimeError):
    """A site failed; the message names it (the server logs it and goes on without the site)."""


@contextmanager
def _named_failure(index: int, step: str):
    try:
        yield
    except Exception as exc:
        raise SiteError(f"site {index} failed to {step}: {type(exc).__name__}: {exc}") from exc


def _site_and_model(msg: Message, context: Context, cfg: Config) -> tuple[Datasets, nn.Module]:
    site = build_site(cfg, _site_index(context))
    return site, _local_model(msg, context, cfg, len(site.class_names))


def only_parameters_and_metrics(msg: Message, context: Context, call_next) -> Message:
    """Client mod: refuse to send a reply that carries anything but model arrays and metrics."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    if content.config_records:
        raise SiteError(f"reply carries config records {list(content.config_records)}; only arrays and metrics may leave a site")
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


def make_client_app(cfg_dict: dict) -> ClientApp:
    """The ClientApp for ``cfg_dict`` (a ``Config.to_dict()``)."""
    cfg = config_from_dict(cfg_dict)
    mods = [only_parameters_and_metrics]
    if cfg.federated.dp_clipping_norm is not None:
        from flwr.client.mod import fixedclipping_mod

        mods.append(fixedclipping_mod)  # clips this site's update before it leaves (server adds noise)
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        index = _site_index(context)
        with _named_failure(index, "train"):
            site, model = _site_and_model(msg, context, cfg)
            config = msg.content["config"]
            server_round = int(config["server-round"]) + int(config.get("round-offset", 0))  # after a resume
            mu = float(config.get("proximal-mu", 0.0))  # set by the FedProx strategy
            loss = local_train(model, site, cfg, server_round, device_for(cfg), mu)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if cfg.federated.strategy == "fedbn":  # BatchNorm layers stay here, on the wire too
            local = {k: state.pop(k) for k in list(state) if is_batchnorm_key(model, k)}
            context.state[LOCAL_BN] = ArrayRecord(local)
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(site.train), "site": index})
        return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        index = _site_index(context)
        with _named_failure(index, "evaluate"):
            site, model = _site_and_model(msg, context, cfg)
            metrics = local_evaluate(model, site, cfg, device_for(cfg))
        record = MetricRecord({**metrics, "num-examples": len(site.test), "site": index})
        return Message(content=RecordDict({"metrics": record}), reply_to=msg)

    return app
