"""Federated learning: real Flower simulations on CPU with the real datasets, MLflow read back."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from mlflow.tracking import MlflowClient

from conftest import hospitals, start_medmamba, tracked
from medmamba.cli import main
from medmamba.config import load_config
from medmamba.data import labels_of
from medmamba.errors import ConfigError
from medmamba.federated import client_app
from medmamba.federated.client_app import SiteError, only_parameters_and_metrics
from medmamba.federated.simulation import run_federated
from medmamba.federated.task import build_site, is_batchnorm_key, local_train, pooled_datasets, site_names
from medmamba.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root, *extra):
    return load_config(ROOT / "configs/federated_quick.yaml", [f"data.root={root}", *extra])


# --- sites ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_simulated_sites_split_the_pool_without_overlap(medmnist_root, partition):
    cfg = _cfg(medmnist_root, f"federated.partition={partition}")
    sites = [build_site(cfg, i) for i in range(3)]
    indices = [np.concatenate([s.train.indices, s.val.indices, s.test.indices]) for s in sites]
    everything = np.concatenate(indices)
    assert len(everything) == len(set(everything.tolist())) == 4708 + 524  # PneumoniaMNIST train + val
    pooled = pooled_datasets(cfg)
    test, classes = pooled.test, pooled.class_names
    assert len(test) == 624 and classes == ["normal", "pneumonia"]
    sizes = [len(i) for i in indices]
    shares = [np.bincount(labels_of(s.train), minlength=2)[1] / len(s.train) for s in sites]
    if partition == "quantity":
        assert sizes[0] < sizes[1] < sizes[2]
    if partition == "iid":
        assert max(shares) - min(shares) < 0.05 and max(sizes) - min(sizes) <= 3
    if partition == "dirichlet":  # label skew
        assert max(shares) - min(shares) > 0.2
    again = build_site(cfg, 1)
    assert list(again.train.indices) == list(sites[1].train.indices)  # deterministic


def test_natural_sites_share_one_class_list(mednist_root, tmp_path, caplog):
    cfg = _cfg(hospitals(mednist_root, tmp_path), "data.name=folder", "federated.partition=natural", "data.size=28")
    assert site_names(cfg) == ["hospital_a", "hospital_b", "hospital_c"]
    a, c = build_site(cfg, 0), build_site(cfg, 2)
    assert a.class_names == c.class_names and len(c.class_names) == 6
    assert "HeadCT" not in {c.class_names[y] for y in labels_of(c.train)}
    assert "hospital_c has no images of ['HeadCT']" in caplog.text
    test = pooled_datasets(cfg).test
    assert len(test) == sum(len(build_site(cfg, i).test) for i in range(3))


def test_natural_sites_are_checked_before_anything_trains(mednist_root, tmp_path):
    from medmamba.errors import DataError

    sets = ["data.name=folder", "federated.partition=natural", "data.size=28"]
    with pytest.raises(ConfigError, match="needs data.name=folder"):
        site_names(load_config(ROOT / "configs/federated_quick.yaml", ["federated.partition=natural"]))
    with pytest.raises(DataError, match="expected one folder per site"):
        site_names(_cfg(tmp_path / "nowhere", *sets))
    root = hospitals(mednist_root, tmp_path)
    with pytest.raises(ConfigError, match="has 3 site folders but federated.min_clients is 4"):
        site_names(_cfg(root, *sets, "federated.min_clients=4"))
    assert len(site_names(_cfg(root, *sets, "federated.min_clients=3", "federated.num_sites=1"))) == 3
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not sites (nor __MACOSX)
    (root / "__MACOSX").mkdir()
    assert site_names(_cfg(root, *sets)) == ["hospital_a", "hospital_b", "hospital_c"]
    with pytest.raises(DataError, match=r"mednist_sample holds images in AbdomenCT, BreastMRI, .*, so it is one "
                                        r"dataset's class folders, not sites"):  # was 'no site could be read'
        site_names(_cfg(mednist_root, *sets))
    (root / "hospital_a" / "Ultrasound").mkdir()  # a class no other site has, and no images
    (root / "hospital_b" / "Ultrasound").mkdir()
    (root / "hospital_b" / "Ultrasound" / "x.jpeg").symlink_to(next((mednist_root / "CXR").iterdir()))
    site = build_site(_cfg(root, *sets), 1)
    assert "Ultrasound" in site.class_names and len(site.class_names) == 7


@pytest.mark.parametrize("override, message", [
    ("federated.min_clients=4", "min_clients is 4 but there are only 3 sites"),
    ("federated.alpha=0", "federated.alpha: must be > 0"),
    ("federated.strategy=fedsgd", "expected fedavg, fedprox, fedbn, fedadam, fedyogi, fedadagrad or fedavgm"),
    ("federated.partition=pathological", "expected natural, iid, dirichlet, quantity or deployed"),
    ("federated.dp_clipping_norm=0", "federated.dp_clipping_norm: must be > 0"),
    ("federated.server_momentum=1", "federated.server_momentum: must be in"),
])
def test_bad_federated_configs_are_refused(medmnist_root, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _cfg(medmnist_root, override)


def test_a_site_larger_than_this_machine_is_refused_before_the_simulation_starts(medmnist_root, tmp_path,
                                                                                  monkeypatch):
    """Flower logged 'ActorPool is empty' and its ServerApp waited for the sites (5 min, killed)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    for extra, asked in ((f"federated.client_cpus={cpus + 1}", f"{cpus + 1} CPUs and 0 GPUs"),
                         ("federated.client_gpus=64", "1 CPUs and 64 GPUs")):
        with pytest.raises(ConfigError, match=f"one site .* asks for {asked} but this machine has {cpus} CPUs"):
            run_federated(_cfg(medmnist_root, "federated.client_cpus=1", extra), tmp_path / "fed")
    assert not (tmp_path / "fed").exists()


# --- what leaves a site --------------------------------------------------------------------------

@pytest.fixture
def as_a_flower_node(monkeypatch):
    """Messages can be built outside a running Flower node once the process has a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _study(cfg, tmp_path=None, **extra) -> ConfigRecord:
    """The config record the server sends with every message."""
    return ConfigRecord({client_app.CONFIG_KEY: json.dumps(cfg.to_dict()), client_app.STUDY_KEY: "study",
                         client_app.CLASSES_KEY: json.dumps(["benign", "malignant"]),
                         client_app.STATE_DIR_KEY: str(tmp_path or "/nonexistent"), **extra})


def _train_message(cfg, model, tmp_path=None, arrays=None, server_round=1) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays if arrays is not None else model.state_dict()),
                          "config": _study(cfg, tmp_path, **{"server-round": server_round, "round-offset": 0})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_site_sends_only_parameters_and_numeric_metrics(medmnist_root, as_a_flower_node):
    cfg = _cfg(medmnist_root, "data.name=breastmnist", "federated.local_epochs=1")
    model = build_model(cfg.model, 2)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    reply = client_app.app(_train_message(cfg, model), context)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert list(content.array_records) == ["arrays"] and not content.config_records
    sent = content["arrays"].to_torch_state_dict()
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert any(not torch.equal(sent[k], v) for k, v in model.state_dict().items())  # it did train
    (metrics,) = content.metric_records.values()
    assert set(metrics) == {"train_loss", "num-examples"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    site = build_site(cfg, 0)
    assert metrics["num-examples"] == len(site.train)

    def leaky(msg, ctx):  # a reply that would carry file names out of the site
        return Message(content=RecordDict({"arrays": msg.content["arrays"],
                                           "config": ConfigRecord({"files": "a.png,b.png"})}), reply_to=msg)

    with pytest.raises(SiteError, match="only arrays and metrics may leave a site"):
        only_parameters_and_metrics(_train_message(cfg, model), context, leaky)


def test_a_site_trains_in_the_precision_train_amp_names(medmnist_root):
    """train.amp reaches the sites (they trained in fp32 whatever it said): bf16 autocast here."""
    cfg = _cfg(medmnist_root, "data.name=breastmnist", "train.amp=bf16")
    model = build_model(cfg.model, 2)
    dtypes = set()
    model.head.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    loss = local_train(model, build_site(cfg, 0), cfg, 1, torch.device("cpu"))
    assert dtypes == {torch.bfloat16} and np.isfinite(loss)
    assert model.head.weight.dtype == torch.float32


def test_batchnorm_keys_are_the_conv_branch_norms(medmnist_root):
    model = build_model(_cfg(medmnist_root).model, 2)
    keys = [k for k in model.state_dict() if is_batchnorm_key(model, k)]
    assert keys and all(any(s in k for s in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"))
                        for k in keys)
    assert not any(is_batchnorm_key(model, k) for k in model.state_dict() if "norm" in k and "ln" in k.lower())


# --- real simulations -----------------------------------------------------------------------------

@pytest.mark.integration
def test_fedavg_on_three_dirichlet_sites_learns_and_logs_every_site(mlflow_uri, medmnist_root, tmp_path):
    cfg = _cfg(medmnist_root, "data.name=breastmnist", "federated.centralized_baseline=false")
    report = run_federated(tracked(cfg, mlflow_uri), tmp_path / "fed")
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[2]["global"]["auc"] > rounds[0]["global"]["auc"]
    for row in rounds:
        assert set(row["sites"]) == {"site_0", "site_1", "site_2"} and not row["failures"]
        for site in row["sites"].values():
            assert {"train_loss", "val_accuracy", "val_auc", "test_accuracy", "test_auc", "test_f1",
                    "test_sensitivity", "test_specificity"} <= set(site)
    saved = json.loads((tmp_path / "fed/federated_report.json").read_text())
    assert json.dumps(saved["rounds"]) == json.dumps(rounds)
    for name in ("best.pt", "federated_rounds.csv", "federated_curves.png"):
        assert (tmp_path / "fed" / name).stat().st_size > 0

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/auc")] == [0, 1, 2, 3]
    for name in ("site_0", "site_1", "site_2"):  # (a site's AUC is undefined when its test split has one class)
        for key in ("train_loss", "val_accuracy", "test_accuracy", "test_f1"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, f"site/{name}/{key}")] == [1, 2, 3]
    assert {"federated_report.json", "federated_rounds.csv", "federated_curves.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}

    # the final global model is a normal checkpoint
    assert main(["evaluate", "--checkpoint", str(tmp_path / "fed/final.pt"), "--data-root", str(medmnist_root),
                 "--output-dir", str(tmp_path / "eval"), "--no-mlflow"]) == 0
    evaluated = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert evaluated["auc"] == pytest.approx(rounds[-1]["global"]["auc"], abs=1e-6)

    # best.pt is the round with the best federated validation AUC (the sites' weighted mean), not the last
    validation = [row["validation"]["val_auc"] for row in rounds]
    best = report["best"]
    assert best["round"] == 1 + validation.index(max(validation)) and best["metric"] == "federated val_auc"
    saved_best = torch.load(tmp_path / "fed/best.pt", weights_only=True)
    assert saved_best["round"] == best["round"] and saved_best["run_id"] == run.info.run_id
    assert report["final"] == {"file": "final.pt", "round": 3, "test": rounds[-1]["global"]}
    tested = json.loads((tmp_path / "fed/metrics.json").read_text())  # the best round on the global test set
    assert tested["auc"] == pytest.approx(rounds[best["round"] - 1]["global"]["auc"], abs=1e-6)
    assert run.data.tags["best_round"] == str(best["round"]) and "test_auc" in run.data.metrics

    with pytest.raises(ConfigError, match="already holds a federated study .*; continue it with --resume"):
        run_federated(tracked(cfg, mlflow_uri), tmp_path / "fed")  # a second study never overwrites the first


@pytest.mark.slow  # (CI time; FedBN's unit tests above run in CI)
@pytest.mark.parametrize("strategy", ["fedprox", "fedbn"])
def test_fedprox_and_fedbn_run_on_natural_hospitals(mednist_root, tmp_path, strategy):
    root = hospitals(mednist_root, tmp_path)
    cfg = load_config(ROOT / "configs/federated_quick.yaml",
                      ["data.name=folder", f"data.root={root}", "federated.partition=natural",
                       f"federated.strategy={strategy}", "federated.rounds=2", "federated.centralized_baseline=false",
                       "train.batch_size=32"])
    report = run_federated(tracked(cfg, None), tmp_path / "fed")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["rounds"][-1]["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert report["rounds"][-1]["global"]["accuracy"] > 1 / 6  # better than chance on 6 classes


def _federate_after_round_1(sets: list[str], out: Path) -> subprocess.Popen:
    """`medmamba federate` of configs/federated_quick.yaml with ``sets``, started in a process and
    returned once its first round is saved (or it ended, or 5 minutes passed)."""
    proc = subprocess.Popen([sys.executable, "-m", "medmamba.cli", "federate", "--config",
                             str(ROOT / "configs/federated_quick.yaml"), *[a for kv in sets for a in ("--set", kv)],
                             "--output-dir", str(out), "--no-mlflow"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "federated_state.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc


@pytest.mark.integration
@pytest.mark.slow  # (CI time: test_flower_deploy kills a site mid-study and checks the same naming)
def test_a_site_that_fails_in_round_2_is_logged_by_name_and_the_others_go_on(mednist_root, tmp_path):
    root = hospitals(mednist_root, tmp_path)
    out = tmp_path / "fed"
    sets = ["data.name=folder", f"data.root={root}", "federated.partition=natural", "federated.rounds=3",
            "federated.centralized_baseline=false", "train.batch_size=32"]
    victim = build_site(load_config(ROOT / "configs/federated_quick.yaml", sets), 1).train.samples[0][0]
    proc = _federate_after_round_1(sets, out)
    victim.unlink()  # after round 1 one of hospital_b's training images breaks on disk
    victim.write_bytes(b"not an image any more")
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    rounds = json.loads((out / "federated_report.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert not rounds[0]["failures"] and set(rounds[0]["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    failed = [f for r in rounds[1:] for f in r["failures"]]
    # (train or evaluate: the Ray actor that runs a site may change between rounds and re-read its folder)
    assert failed and all(f.startswith(("site hospital_b failed to train", "site hospital_b failed to evaluate"))
                          for f in failed)
    assert any(victim.name in f for f in failed)
    assert "failure: site hospital_b failed to" in output
    assert all({"hospital_a", "hospital_c"} <= set(r["sites"]) for r in rounds)


def test_fedbn_keeps_each_sites_batchnorm_and_shares_the_rest(medmnist_root, as_a_flower_node, tmp_path):
    from medmamba.federated.client_app import LOCAL_BN, _local_model, batchnorm_file

    cfg = _cfg(medmnist_root, "data.name=breastmnist", "federated.strategy=fedbn")
    model = build_model(cfg.model, 2)
    contexts = [Context(run_id=1, node_id=i, node_config={"partition-id": i, "num-partitions": 3},
                        state=RecordDict(), run_config={}) for i in (0, 1)]
    for context in contexts:
        assert not client_app.app(_train_message(cfg, model, tmp_path), context).has_error()
        assert LOCAL_BN in context.state
    new_global = _train_message(cfg, build_model(cfg.model, 2), tmp_path)  # the next round's global model
    a, b = (_local_model(new_global, c, cfg, 2, f"site_{i}").state_dict() for i, c in enumerate(contexts))
    bn = [k for k in a if is_batchnorm_key(model, k)]
    shared = [k for k in a if k not in bn]
    assert all(torch.equal(a[k], b[k]) for k in shared)
    assert any(not torch.equal(a[k], b[k]) for k in bn if a[k].is_floating_point())
    # a site process that restarts (a resumed study, a rebooted SuperNode) finds its layers on disk
    assert batchnorm_file(new_global, contexts[0], "site_0") == tmp_path / "study" / "site_0-batchnorm.pt"
    restarted = Context(run_id=2, node_id=0, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                        run_config={})
    again = _local_model(new_global, restarted, cfg, 2, "site_0").state_dict()
    assert all(torch.equal(again[k], a[k]) for k in bn)


@pytest.mark.slow  # (CI time; the privacy unit tests above and the pooled baseline of the LOSO test run in CI)
def test_differential_privacy_and_the_centralised_baseline(mlflow_uri, medmnist_root, tmp_path):
    cfg = _cfg(medmnist_root, "data.name=breastmnist", "federated.rounds=1", "federated.centralized_baseline=true",
               "federated.dp_clipping_norm=5.0", "federated.dp_noise_multiplier=0.1", "federated.partition=iid")
    report = run_federated(tracked(cfg, mlflow_uri), tmp_path / "fed")
    assert len(report["rounds"]) == 1 and len(report["rounds"][0]["sites"]) == 3
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.data.params["federated.dp_clipping_norm"] == "5.0"
    assert run.data.params["federated.dp_noise_multiplier"] == "0.1"
    assert run.data.params["federated.differential_privacy"] == "True"
    central = report["centralized"]  # the pooled sites trained for rounds x local_epochs = 1 epoch
    assert run.data.metrics["centralized/auc"] == pytest.approx(central["auc"]) and 0 <= central["auc"] <= 1
    assert json.loads((tmp_path / "fed/centralized/history.json").read_text())[-1]["epoch"] == 1
    assert sum(map(sum, central["confusion_matrix"])) == 156  # the same global test set


def _federate_then_sigterm(args: list[str], ready: Path, mlflow_uri: str) -> tuple[str, float]:
    """`medmamba federate ARGS`, sent SIGTERM once ``ready`` exists: its stderr and the seconds it
    took to end. It must exit 143, saying so, with its MLflow run KILLED."""
    proc = start_medmamba(args, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stopped = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a process that did not end, and the Ray processes it started
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.time() - stopped
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "medmamba federate: terminated (SIGTERM)" in err
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.info.status == "KILLED"
    return err, took


def test_a_federation_stopped_by_sigterm_ends_at_once_and_its_mlflow_run_is_killed(mlflow_uri, medmnist_root,
                                                                                    tmp_path):
    """SIGTERM to the driver after round 1 (a scheduler's stop, `ray job stop`): the process exits
    143 within seconds, not aborted by Ray's signal handler (134) nor hanging on Flower's threads
    that wait for results from the Ray it shut down; the MLflow run is KILLED and the rounds done
    are kept for --resume."""
    out = tmp_path / "fed"
    args = ["federate", "--config", str(ROOT / "configs/federated_quick.yaml"), "--set", f"data.root={medmnist_root}",
            "--set", "data.name=breastmnist", "--set", "federated.centralized_baseline=false",
            "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    _, took = _federate_then_sigterm(args, out / "federated_state.pt", mlflow_uri)
    assert took < 30
    assert 1 <= len(torch.load(out / "federated_state.pt", weights_only=False)["rounds"]) < 3


def test_a_federation_stopped_in_its_centralised_baseline_ends_that_epoch_then_resumes_it(mlflow_uri, medmnist_root,
                                                                                         tmp_path, caplog):
    """SIGTERM while the centralised baseline trains (in the ServerApp's thread, where no signal
    reaches): the baseline ends at its epoch's end, so the process exits 143 at once with the
    MLflow run KILLED; it used to finish the baseline and the study (the run FINISHED) or, with
    a longer baseline, leave the run RUNNING. A --resume continues the baseline where it stopped
    (it used to train it again from scratch) and finishes the study in the same run."""
    out = tmp_path / "fed"
    args = ["federate", "--config", str(ROOT / "configs/federated_quick.yaml"), "--set", f"data.root={medmnist_root}",
            "--set", "data.name=breastmnist", "--set", "federated.rounds=1", "--set", "federated.local_epochs=3",
            "--set", "federated.num_sites=2", "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    err, took = _federate_then_sigterm(args, out / "centralized/config.yaml", mlflow_uri)
    assert took < 20 and "did not end within" not in err, err[-3000:]
    assert "centralized" not in json.loads((out / "federated_report.json").read_text())  # the study never ended
    done = torch.load(out / "centralized/last.pt", weights_only=False)["epoch"]
    assert done < 3

    assert main(args + ["--resume"]) == 0
    assert f"resumed from {out / 'centralized/last.pt'} after epoch {done}" in caplog.text
    history = torch.load(out / "centralized/last.pt", weights_only=False)["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert "centralized" in json.loads((out / "federated_report.json").read_text())
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.info.status == "FINISHED" and "centralized/auc" in run.data.metrics


@pytest.mark.slow  # (CI time; 1.3 min)
def test_an_interrupted_federation_resumes_after_its_last_round(mlflow_uri, medmnist_root, tmp_path):
    out = tmp_path / "fed"
    args = ["federate", "--config", str(ROOT / "configs/federated_quick.yaml"), "--set", f"data.root={medmnist_root}",
            "--set", "data.name=breastmnist", "--set", "federated.centralized_baseline=false",
            "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = start_medmamba(args)
    deadline = time.time() + 300
    while not (out / "federated_state.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done = len(torch.load(out / "federated_state.pt", weights_only=False)["rounds"])
    assert 1 <= done < 3
    assert main(args + ["--resume"]) == 0
    report = json.loads((out / "federated_report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/auc")] == [0, 1, 2, 3]


@pytest.mark.parametrize("model_name", ["medmamba_t", "resnet18"])  # a timm ResNet's BatchNorm layers too
def test_fedbn_batchnorm_layers_never_leave_a_site(medmnist_root, as_a_flower_node, model_name, tmp_path):
    cfg = _cfg(medmnist_root, "data.name=breastmnist", "federated.strategy=fedbn", f"model.name={model_name}")
    app, model = client_app.app, build_model(cfg.model, 2, cfg.data.size)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    bn = {k for k in model.state_dict() if is_batchnorm_key(model, k)}
    reply = app(_train_message(cfg, model, tmp_path), context)
    sent = set(reply.content["arrays"].keys())
    assert bn and not sent & bn and sent == set(model.state_dict()) - bn
    # the next round's global model comes without BatchNorm layers: the site trains with its own
    shared = {k: v for k, v in build_model(cfg.model, 2, cfg.data.size).state_dict().items() if k not in bn}
    again = app(_train_message(cfg, model, tmp_path, arrays=shared, server_round=2), context)
    assert not again.has_error() and not set(again.content["arrays"].keys()) & bn
    if model_name == "resnet18":
        assert {"bn1.weight", "layer4.1.bn2.running_var"} <= bn
    with pytest.raises(ConfigError, match="cannot be used with federated.strategy=fedbn"):
        _cfg(medmnist_root, "federated.strategy=fedbn", "federated.dp_clipping_norm=1.0")


@pytest.mark.integration
def test_a_round_with_fewer_sites_than_min_clients_fails_the_run_and_names_the_site(mlflow_uri, mednist_root, tmp_path):
    from medmamba.errors import FederationError

    root = hospitals(mednist_root, tmp_path, corrupt_site="hospital_b")
    cfg = load_config(ROOT / "configs/federated_quick.yaml",
                      ["data.name=folder", f"data.root={root}", "federated.partition=natural", "federated.rounds=2",
                       "federated.min_clients=3", "federated.centralized_baseline=false", "train.batch_size=32"])
    with pytest.raises(FederationError, match="(?s)before round 1: 2 of 3 sites can take part, fewer than federated."
                                              "min_clients=3; site hospital_b failed to read its data: DataError: "
                                              "1 unreadable images .*broken.jpeg"):
        run_federated(tracked(cfg, mlflow_uri), tmp_path / "fed")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.info.status == "FAILED"


# --- strategies and differential privacy ----------------------------------------------------------

@pytest.mark.parametrize("strategy, expected", [
    ("fedadam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
    ("fedyogi", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
    ("fedadagrad", {"eta": 0.05, "tau": 1e-3}),
    ("fedavgm", {"server_learning_rate": 0.05, "server_momentum": 0.7}),
])
def test_server_optimiser_strategies_take_their_config_keys(medmnist_root, strategy, expected):
    from medmamba.federated.server_app import RoundRecorder, make_strategy

    cfg = _cfg(medmnist_root, f"federated.strategy={strategy}", "federated.server_lr=0.05",
               "federated.beta_1=0.8", "federated.beta_2=0.95", "federated.server_momentum=0.7")
    made = make_strategy(cfg, RoundRecorder(), 3)
    assert type(made).__name__.lower() == strategy
    assert {k: getattr(made, k) for k in expected} == pytest.approx(expected)
    assert made.min_train_nodes == cfg.federated.min_clients


def test_the_privacy_budget_follows_the_accountant(medmnist_root):
    import math

    from opacus.accountants import RDPAccountant

    from medmamba.federated.privacy import privacy_budget
    from medmamba.federated.server_app import RoundRecorder, make_strategy

    assert privacy_budget(_cfg(medmnist_root), 3, 1.0) is None
    central = _cfg(medmnist_root, "federated.dp_clipping_norm=1.0", "federated.dp_noise_multiplier=1.1")
    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.1, sample_rate=2 / 3)
    budget = privacy_budget(central, 5, 2 / 3)
    assert budget["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5)) and budget["mode"] == "central"
    assert "not against the coordinator's server" in budget["protects"]
    assert privacy_budget(central, 10, 2 / 3)["epsilon"] > budget["epsilon"] > privacy_budget(central, 5, 1 / 3)["epsilon"]
    assert type(make_strategy(central, RoundRecorder(), 3)).__name__ == "DifferentialPrivacyClientSideFixedClipping"
    no_noise = _cfg(medmnist_root, "federated.dp_clipping_norm=1.0")
    assert privacy_budget(no_noise, 1, 1.0)["epsilon"] == math.inf
    local = _cfg(medmnist_root, "federated.dp_clipping_norm=1.0", "federated.dp_mode=local", "federated.dp_epsilon=2")
    one = privacy_budget(local, 1, 0.1)  # (every round counts for a site that adds its own noise)
    assert one["noise_multiplier"] == pytest.approx(math.sqrt(2 * math.log(1.25 / 1e-5)) / 2) and one["sample_rate"] == 1
    assert one["epsilon"] <= 2  # one (2, 1e-5) Gaussian release: RDP accounting is no looser than the calibration
    assert privacy_budget(local, 20, 1.0)["epsilon"] < 20 * 2  # and tighter than adding up 20 rounds
    assert "the coordinator's server and the network included" in one["protects"]
    assert type(make_strategy(local, RoundRecorder(), 3)).__name__ == "FedAvg"  # no noise at the server


def test_local_differential_privacy_adds_the_calibrated_noise_at_the_site(medmnist_root, as_a_flower_node):
    import math

    sets = ["data.name=breastmnist", "federated.local_epochs=1"]
    plain = _cfg(medmnist_root, *sets)
    private = _cfg(medmnist_root, *sets, "federated.dp_clipping_norm=1000", "federated.dp_mode=local",
                   "federated.dp_epsilon=50")
    model = build_model(plain.model, 2)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    replies = [client_app.app(_train_message(cfg, model), context) for cfg in (plain, private)]
    a, b = (r.content["arrays"].to_torch_state_dict() for r in replies)
    noise = torch.cat([(b[k].double() - a[k].double()).flatten() for k in a if a[k].is_floating_point()])
    expected = 1000 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 50  # the update is far inside the clipping norm
    assert noise.std().item() == pytest.approx(expected, rel=0.02) and abs(noise.mean().item()) < expected / 100


# --- leave-one-site-out ---------------------------------------------------------------------------

def test_a_held_out_site_never_trains_and_is_the_test_set(mednist_root, tmp_path):
    root = hospitals(mednist_root, tmp_path)
    sets = ["data.name=folder", "federated.partition=natural", "data.size=28"]
    cfg = _cfg(root, *sets, "federated.holdout_site=hospital_c")
    assert site_names(cfg) == ["hospital_a", "hospital_b"]
    pooled = pooled_datasets(cfg)
    assert len(pooled.test) == 5 * 20  # every image of hospital_c (it has no HeadCT)
    assert len(pooled.train) + len(pooled.val) == sum(len(build_site(cfg, i).train) + len(build_site(cfg, i).val)
                                                      for i in range(2))
    with pytest.raises(ConfigError, match="no site 'hospital_z'; the sites are hospital_a, hospital_b, hospital_c"):
        site_names(_cfg(root, *sets, "federated.holdout_site=hospital_z"))
    with pytest.raises(ConfigError, match="leaves 2 sites, fewer than federated.min_clients=3"):
        site_names(_cfg(root, *sets, "federated.holdout_site=hospital_a", "federated.min_clients=3"))
    with pytest.raises(ConfigError, match="leave-one-site-out runs in simulation"):
        _cfg(root, "federated.partition=deployed", "federated.holdout_site=hospital_a",
             "federated.centralized_baseline=false")
    with pytest.raises(ConfigError, match="simulation only"):
        _cfg(root, "federated.partition=deployed", "federated.local_baselines=true")
    assert site_names(_cfg(tmp_path, "federated.holdout_site=site_1")) == ["site_0", "site_2"]  # (no data read)


@pytest.mark.integration
def test_leave_one_site_out_and_local_baselines_in_one_report(mlflow_uri, mednist_root, tmp_path):
    import csv

    root = hospitals(mednist_root, tmp_path)
    out, uri = tmp_path / "loso", mlflow_uri
    assert main(["federate", "--config", str(ROOT / "configs/federated_quick.yaml"), "--set", "data.name=folder",
                 "--set", f"data.root={root}", "--set", "federated.partition=natural", "--set", "federated.rounds=1",
                 "--set", "federated.local_baselines=true", "--set", "train.batch_size=32",
                 "--holdout-site", "hospital_c", "--output-dir", str(out), "--tracking-uri", uri]) == 0
    report = json.loads((out / "federated_report.json").read_text())
    # each site alone, the pooled model and the federated one, each at every training site's test split
    matrix = report["site_matrix"]
    assert set(matrix) == {"local:hospital_a", "local:hospital_b", "pooled", "federated"}
    assert all(set(row) == {"hospital_a", "hospital_b"} for row in matrix.values())
    assert matrix["federated"]["hospital_a"]["auc"] == report["rounds"][0]["sites"]["hospital_a"]["test_auc"]
    own = json.loads((out / "local/hospital_a/history.json").read_text())
    assert len(own) == 1  # the federation's budget: rounds x local_epochs = 1 epoch
    assert all(0 <= row[site]["accuracy"] <= 1 for row in matrix.values() for site in row)
    with (out / "federated_site_matrix.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and float(rows[0]["auc"]) == pytest.approx(matrix["local:hospital_a"]["hospital_a"]["auc"])
    assert report["sites"] == ["hospital_a", "hospital_b"] and set(report["rounds"][0]["sites"]) == set(report["sites"])
    assert report["global_test"] == "every image of the held-out site hospital_c"
    assert report["holdout"] == {"hospital_c": report["best"]["test"]}
    tested = json.loads((out / "metrics.json").read_text())  # best.pt on all of hospital_c's 100 images
    assert sum(map(sum, tested["confusion_matrix"])) == 100
    assert tested["accuracy"] == pytest.approx(report["holdout"]["hospital_c"]["accuracy"])

    # the site matrix goes to MLflow, and from there into `medmamba report`
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert run.data.metrics["site_matrix/local/hospital_a/hospital_b/accuracy"] == pytest.approx(
        matrix["local:hospital_a"]["hospital_b"]["accuracy"])
    assert main(["report", "--tracking-uri", uri, "--experiment", "medmamba-federated", "--output-dir",
                 str(tmp_path / "report"), "--no-mlflow"]) == 0
    tables = (tmp_path / "report/report.md").read_text()
    assert "| model | hospital_a | hospital_b |" in tables and "| local/hospital_b | " in tables
    federated = next(line for line in tables.splitlines() if line.startswith("| fedavg | natural |"))
    assert federated.startswith("| fedavg | natural | hospital_c | ")  # the held-out site is a column


def test_bad_deployment_inputs_are_clear_errors(medmnist_root, tmp_path):
    from medmamba.errors import DataError
    from medmamba.federated.server_app import study_from_run_config
    from medmamba.federated.task import node_site, node_site_name

    with pytest.raises(ConfigError, match="federated.dp_epsilon: must be > 0 for local differential privacy"):
        _cfg(medmnist_root, "federated.dp_clipping_norm=1", "federated.dp_mode=local", "federated.dp_epsilon=0")
    with pytest.raises(ConfigError, match="federated.dp_delta: must be > 0"):
        _cfg(medmnist_root, "federated.dp_clipping_norm=1", "federated.dp_delta=0")
    with pytest.raises(ConfigError, match="run config recipe='configs/nope.yaml': no such file"):
        study_from_run_config({"recipe": "configs/nope.yaml"})
    cfg, out, resume = study_from_run_config({"recipe": str(ROOT / "configs/federated_deploy.yaml"),
                                              "set": "federated.rounds=2 data.size=28", "output-dir": str(tmp_path)})
    assert (cfg.federated.rounds, cfg.data.size, out, resume) == (2, 28, tmp_path, False)
    deployed = load_config(ROOT / "configs/federated_deploy.yaml")
    with pytest.raises(ConfigError, match="a deployed SuperNode needs --node-config"):
        node_site_name(deployed, {"partition-id": 0})
    with pytest.raises(ConfigError, match="a deployed SuperNode needs --node-config"):
        node_site(deployed, {"site-name": "a"})
    with pytest.raises(DataError, match="site a: data-root .*nowhere is not a folder"):
        node_site(deployed, {"site-name": "a", "data-root": str(tmp_path / "nowhere")})


@pytest.mark.slow  # 1.3 min on 2 cores (CI time); `make test-all`
def test_a_killed_client_actor_is_replaced_and_later_rounds_have_every_site(mednist_root, tmp_path):
    """SIGKILL of a ClientApp actor in round 2: Ray restarts it and the site's training runs again, so
    rounds 2 and 3 have all three sites (Flower alone put the dead actor back in its pool: the sites
    sent to it failed every later round)."""
    import psutil

    root = hospitals(mednist_root, tmp_path)
    out = tmp_path / "fed"
    sets = ["data.name=folder", f"data.root={root}", "federated.partition=natural", "federated.rounds=3",
            "federated.centralized_baseline=false", "train.batch_size=32", "data.size=28"]
    proc = _federate_after_round_1(sets, out)

    def busy_actors() -> list[psutil.Process]:
        found = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ClientAppActor.run" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    deadline = time.time() + 300
    while not busy_actors() and time.time() < deadline and proc.poll() is None:  # round 2 has started
        time.sleep(0.1)
    victim = busy_actors()[0]
    victim.kill()
    victim.wait(10)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    rounds = json.loads((out / "federated_report.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    sites = {"hospital_a", "hospital_b", "hospital_c"}
    assert all(set(r["sites"]) == sites and not r["failures"] for r in rounds), rounds
