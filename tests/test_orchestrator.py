"""Ray Train and Ray Tune on a real local Ray cluster, logged to a real MLflow store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import child_runs, tracked
from medmamba.cli import main
from medmamba.config import load_config
from medmamba.errors import ConfigError, DataError, MedMambaError
from medmamba.metrics import MACRO_KEYS, METRIC_KEYS
from medmamba.data import build_datasets
from medmamba.orchestrator.sweep import MlflowTrials, apply_params, run_sweep, search_space
from medmamba.orchestrator.train import EpochReport, train_distributed
from medmamba.tracking import Tracker
from medmamba.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _sweep_cfg(medmnist_root, *extra):
    return load_config(ROOT / "configs/sweep_quick.yaml",
                       [f"data.root={medmnist_root}", "tune.num_samples=4", "train.epochs=2", *extra])


# --- the search space, checked before anything starts (no Ray needed) ---------------------------

@pytest.mark.parametrize("space, message", [
    ({}, "tune.space is empty"),
    ({"optim.name": {"choice": ["adam", "adagrad"]}}, "can draw 'adagrad'"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, "0 < low < high"),
    ({"optim.lr": {"uniform": [1e-2, 1e-3]}}, "low < high"),
    ({"optim.lr": {"normal": [0, 1]}}, "unknown kind 'normal'"),
    ({"train.batch_size": {"randint": [1.5, 8]}}, "randint takes whole numbers [low, high), got [1.5, 8]"),
    ({"optim.lr": [1e-3, 1e-2]}, "expected one of"),
    ({"optim.lrate": {"choice": [1e-3]}}, "unknown config key 'optim.lrate'"),
    ({"sched.milestones": {"choice": ["0.5", "1.5"]}}, "fractions of train.epochs in (0, 1]"),
    ({"sched.gamma": {"choice": []}}, "non-empty list"),
    ({"model.name": {"choice": ["resnet18", "resnet_18"]}}, "can draw 'resnet_18', which the config refuses: "
                                                            "unknown model 'resnet_18'"),
])
def test_a_bad_search_space_is_refused_with_the_key(space, message):
    cfg = load_config(ROOT / "configs/sweep_quick.yaml")
    cfg.tune.space = space
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search_space(cfg)


def test_milestone_fractions_become_epochs_and_other_keys_are_set():
    cfg = load_config(ROOT / "configs/sweep_quick.yaml", ["train.epochs=10"])
    new = apply_params(cfg, {"sched.milestones": "0.5,0.75", "optim.name": "sgd", "train.batch_size": 32})
    assert new.sched.milestones == [5, 8] and new.optim.name == "sgd" and new.train.batch_size == 32
    assert cfg.sched.milestones == [2] and cfg.optim.name == "adamw"  # the base is not changed
    assert set(search_space(cfg)) == {"optim.name", "optim.lr", "sched.milestones", "sched.gamma",
                                      "optim.weight_decay"}


def test_the_sweep_config_extends_the_quick_recipe():
    quick, sweep = load_config(ROOT / "configs/quick.yaml"), load_config(ROOT / "configs/sweep_quick.yaml")
    assert sweep.model == quick.model and sweep.optim == quick.optim and sweep.sched == quick.sched
    assert sweep.data.name == "breastmnist" and sweep.tune.num_samples >= 4


# --- what a restored trial reports (no Ray needed) ------------------------------------------------

class RecordedReport(EpochReport):
    def __init__(self, out):
        super().__init__(out)
        self.sent = []

    def report(self, trainer, metrics):
        assert (self.out / "last.pt").is_file()  # the checkpoint is on disk before its report
        self.sent.append(metrics["epoch"])


def test_a_run_resumed_with_no_epoch_left_reports_its_last_epoch_once(medmnist_root, tmp_path):
    """A Tune trial restored after its driver died between the trial's last report and Tune's
    record of it re-runs a finished training: it must still report (Tune refuses a trial that
    returns without its metric) and only once."""
    cfg = _sweep_cfg(medmnist_root, "train.epochs=1", "model.name=mobilenetv3_small_050")
    data, reports = build_datasets(cfg.data), []
    for epochs, resume in [(1, False), (1, True), (2, True)]:
        reports.append(RecordedReport(tmp_path))
        cfg.train.epochs = epochs
        Trainer(cfg, data, tmp_path, callbacks=[reports[-1]], progress=False).fit(resume=resume, test=False)
    assert [r.sent for r in reports] == [[1], [1], [2]]


def test_trial_runs_do_not_log_an_epoch_that_a_restored_trial_reports_again(mlflow_uri, tmp_path):
    parent = Tracker(mlflow_uri, "sweep")
    parent.start("sweep", {}, {})
    trial = SimpleNamespace(trial_id="t1", config={"optim.lr": 1e-3})
    result = lambda epoch: {"epoch": epoch, "training_iteration": epoch, "train_loss": 1 / epoch, "val_auc": 0.5}
    callback = MlflowTrials(mlflow_uri, "sweep", parent.run_id, ["optim.lr"])
    for epoch in (1, 2):
        callback.on_trial_result(0, [], trial, result(epoch))
    restored = pickle.loads(pickle.dumps(callback))  # as Tune restores its callbacks with the experiment
    for epoch in (2, 3):
        restored.on_trial_result(0, [], trial, result(epoch))
    run = child_runs(MlflowClient(mlflow_uri), parent.run_id)[0]
    assert [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "val_auc")] == [1, 2, 3]
    assert run.data.params == {"optim.lr": "0.001"} and run.data.tags["trial_id"] == "t1"


# --- Ray Tune -------------------------------------------------------------------------------------

def test_a_sweep_stops_trials_early_and_logs_nested_mlflow_runs(mlflow_uri, ray_cluster, medmnist_root, tmp_path,
                                                                capsys):
    out = tmp_path / "sweep"
    cfg = _sweep_cfg(medmnist_root)  # the model is a dimension too: ours against a timm baseline
    cfg.tune.space["model.name"] = {"choice": ["medmamba_t", "mobilenetv3_small_050"]}  # (ResNets at 28 px: 5x slower)
    summary = run_sweep(tracked(cfg, mlflow_uri), out)
    board = summary["leaderboard"]
    assert len(board) == 4 and all(row["status"] != "error" for row in board)
    assert any(row["status"] == "stopped early" and row["epochs"] == 1 for row in board)  # ASHA
    assert board[0]["val_auc"] == max(row["val_auc"] for row in board) == summary["best_value"]
    best = load_config(out / "best_config.yaml")  # a config `medmamba train` accepts
    assert best.optim.name == summary["best_params"]["optim.name"]
    assert best.optim.lr == pytest.approx(summary["best_params"]["optim.lr"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion_matrix"])) == 156  # BreastMNIST's whole test split
    assert metrics["auc"] == pytest.approx(summary["test_metrics"]["auc"])
    for name in ("leaderboard.csv", "optuna_history.png", "optuna_importances.png", "optuna_parallel.png"):
        assert (out / name).stat().st_size > 0, name

    client = MlflowClient(mlflow_uri)
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == board[0]["trial"]
    assert parent.data.metrics["test_auc"] == pytest.approx(metrics["auc"])
    assert {"leaderboard.csv", "best_config.yaml", "optuna_history.png"} <= {
        a.path for a in client.list_artifacts(parent_id)}
    children = child_runs(client, parent_id)
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(row["trial"] for row in board)
    for child in children:
        row = next(r for r in board if r["trial"] == child.data.tags["trial_id"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_auc")]
        assert steps == list(range(1, row["epochs"] + 1)) and child.info.status == "FINISHED"
        assert float(child.data.params["optim.lr"]) == pytest.approx(row["optim.lr"])
        assert child.data.params["model.name"] == row["model.name"]
    assert {row["model.name"] for row in board} == {"medmamba_t", "mobilenetv3_small_050"}
    assert best.model.name == summary["best_params"]["model.name"]
    assert [c.data.tags.get("best_trial") for c in children].count("true") == 1

    # the best trial's checkpoint is a normal one
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data-root", str(medmnist_root),
                 "--output-dir", str(tmp_path / "eval"), "--no-mlflow"]) == 0
    evaluated = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert evaluated["auc"] == pytest.approx(metrics["auc"], abs=1e-6)

    with pytest.raises(ConfigError, match="already holds a sweep"):  # never overwritten silently
        run_sweep(tracked(_sweep_cfg(medmnist_root), mlflow_uri), out)


def test_a_sweep_stopped_by_sigterm_ends_its_runs_killed(mlflow_uri, ray_cluster, medmnist_root, tmp_path):
    """SIGTERM to the sweep's driver once a trial finished (a scheduler's stop, `ray job stop`):
    exit 143, not Ray's abort (134); the sweep's run and the trials Ray stopped end KILLED, none
    is left RUNNING; the finished trials stay FINISHED."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "medmamba.cli", "tune", "--config", str(ROOT / "configs/sweep_quick.yaml"),
            "--set", f"data.root={medmnist_root}", "--set", "tune.num_samples=4", "--set", "train.epochs=3",
            "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ray_cluster["env"])
    client, deadline, done = MlflowClient(mlflow_uri), time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and not done:
        if (out / "sweep.json").is_file():
            parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
            done = [c for c in child_runs(client, parent_id) if c.info.status == "FINISHED"]
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert done, "no trial finished before the signal"
    assert proc.returncode == 128 + signal.SIGTERM and "medmamba tune: terminated (SIGTERM)" in err, err[-3000:]
    assert client.get_run(parent_id).info.status == "KILLED"
    statuses = {c.info.run_id: c.info.status for c in child_runs(client, parent_id)}
    assert "RUNNING" not in statuses.values() and all(statuses[c.info.run_id] == "FINISHED" for c in done)


@pytest.mark.slow  # 1.5 min (one worker per trial) and 4 min (two); make test-all
@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker-trials", "two-worker-trials"])
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(mlflow_uri, ray_cluster, medmnist_root, tmp_path,
                                                                  workers):
    out = tmp_path / "sweep"
    per_trial = ["--set", "tune.workers_per_trial=2", "--set", "tune.cpus_per_trial=2"] if workers == 2 else []
    args = [sys.executable, "-m", "medmamba.cli", "tune", "--config", str(ROOT / "configs/sweep_quick.yaml"),
            "--set", f"data.root={medmnist_root}", "--set", "tune.num_samples=4", "--set", "train.epochs=2",
            "--set", "tune.max_concurrent=1", *per_trial, "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ray_cluster["env"])
    client, deadline, done = MlflowClient(mlflow_uri), time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        state = out / "sweep.json"
        if state.is_file():
            parent_id = json.loads(state.read_text())["parent_run_id"]
            done = [c for c in child_runs(client, parent_id) if c.info.status == "FINISHED"]
            if done:
                break
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done, "no trial finished before the kill"
    finished_before = {c.data.tags["trial_id"]: c.info.run_id for c in done}

    assert main(args[3:] + ["--resume"]) == 0
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = [c for c in child_runs(client, parent_id) if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(
        line.split(",")[0] for line in (out / "leaderboard.csv").read_text().splitlines()[1:])
    assert all(c.info.status == "KILLED" and c.data.tags["lost_in_interruption"] == "true"
               for c in child_runs(client, parent_id) if c.info.status != "FINISHED")
    for trial_id, run_id in finished_before.items():  # finished trials kept their run and did not re-run
        steps = [m.step for m in client.get_metric_history(run_id, "val_auc")]
        assert steps == sorted(set(steps)), f"trial {trial_id} logged an epoch twice"
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 4


def test_a_sweep_whose_every_trial_fails_names_the_trials_error(ray_cluster, medmnist_root, tmp_path):
    """Trials whose loss is NaN at once: the error is theirs, not 'no trial reported val_auc'."""
    cfg = _sweep_cfg(medmnist_root, "tune.space={optim.lr: {uniform: [1.0e+29, 1.0e+30]}}", "tune.num_samples=1",
                     "ray.max_failures=0", "train.epochs=1")  # one trial, no retries: 11 s, not 42
    with pytest.raises(MedMambaError, match=r"no trial reported val_auc: 1 of 1 trials failed, the first with "
                                            r".*TrainingError: training loss became nan"):
        run_sweep(tracked(cfg, None), tmp_path / "sweep")


def test_data_that_every_trial_would_miss_fails_before_any_starts(ray_cluster, medmnist_root, tmp_path):
    """On a one-node cluster the driver loads the data first: one error, not one a trial (and a
    download attempt each: 2 min 40 s for the 8 trials of sweep_quick.yaml offline, 19 s now);
    the data a searched data.* key can draw is checked too."""
    searched = _sweep_cfg(medmnist_root, "tune.space={data.size: {choice: [28, 29]}}", "tune.num_samples=2")
    with pytest.raises(DataError, match=r"MedMNIST has sizes \(28, 64, 128, 224\); data.size is 29"):
        run_sweep(tracked(searched, None), tmp_path / "sweep")
    assert not (tmp_path / "sweep/ray").exists()
    cfg = _sweep_cfg(tmp_path / "no-data", "data.download=false", "tune.num_samples=2", "train.epochs=1")
    with pytest.raises(DataError, match=r"no-data/breastmnist\.npz not found and data\.download is false"):
        run_sweep(tracked(cfg, None), tmp_path / "sweep")
    assert not (tmp_path / "sweep/ray").exists()
    with pytest.raises(DataError, match=r"no-data/pneumoniamnist\.npz not found"):
        train_distributed(tracked(load_config(ROOT / "configs/quick.yaml", [f"data.root={tmp_path / 'no-data'}",
                                                                               "data.download=false"]), None),
                          tmp_path / "ddp")
    assert not (tmp_path / "ddp/ray").exists()


@pytest.mark.parametrize("command, where", [("tune", "ray.address"), ("tune", "$RAY_ADDRESS"),
                                            ("federate", "$RAY_ADDRESS")])
def test_a_cluster_address_nothing_answers_at_is_one_line_at_once(medmnist_root, tmp_path, command, where):
    """ray.init retried such an address for minutes (over 200 s), printing only C++ warnings."""
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    recipe = {"tune": "sweep_quick.yaml", "federate": "federated_quick.yaml"}[command]
    args = [sys.executable, "-m", "medmamba.cli", command, "--config", str(ROOT / "configs" / recipe),
            "--set", f"data.root={medmnist_root}", "--output-dir", str(tmp_path / "out"), "--no-mlflow"]
    env = dict(os.environ, RAY_ADDRESS=address) if where == "$RAY_ADDRESS" else None
    if env is None:
        args += ["--set", f"ray.address={address}"]
    start = time.time()
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and time.time() - start < 60, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"medmamba {command}: error: {where} is {address}, but no Ray cluster answers there (Connection refused)")
    assert not (tmp_path / "out").exists()


def test_a_trial_larger_than_the_cluster_is_refused_before_it_starts(ray_cluster, medmnist_root, tmp_path):
    with pytest.raises(ConfigError, match="asks for 64 CPUs .* cluster has 2 CPUs"):
        run_sweep(tracked(_sweep_cfg(medmnist_root, "tune.cpus_per_trial=64"), None), tmp_path / "sweep")
    assert not (tmp_path / "sweep/ray").exists()


@pytest.mark.slow  # 1.7 min on 2 cores (CI time); `make test-all`
def test_a_sweep_whose_trials_each_train_on_two_ray_train_workers(mlflow_uri, ray_cluster, medmnist_root, tmp_path):
    from ray.util.state import list_actors

    def workers() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)}

    before = workers()
    out = tmp_path / "sweep"
    cfg = _sweep_cfg(medmnist_root, "tune.num_samples=2", "tune.workers_per_trial=2", "tune.cpus_per_trial=2",
                     "train.epochs=1")
    summary = run_sweep(tracked(cfg, mlflow_uri), out)
    board = summary["leaderboard"]
    assert [(row["status"], row["epochs"]) for row in board] == [("complete", 1)] * 2
    assert len(workers() - before) == 4  # two data-parallel workers per trial
    assert sorted(p.name for p in (out / "ray/trials").iterdir()) == sorted(row["trial"] for row in board)
    metrics = json.loads((out / "metrics.json").read_text())  # the best trial's best epoch, tested
    assert sum(map(sum, metrics["confusion_matrix"])) == 156

    client = MlflowClient(mlflow_uri)
    children = child_runs(client, json.loads((out / "sweep.json").read_text())["parent_run_id"])
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:  # rank 0's epoch, once
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_auc")] == [1]


def test_workers_per_trial_must_each_get_a_cpu_and_whole_gpus(medmnist_root):
    with pytest.raises(ConfigError, match="tune.workers_per_trial=2: each worker needs at least one CPU"):
        _sweep_cfg(medmnist_root, "tune.workers_per_trial=2", "tune.cpus_per_trial=1")
    with pytest.raises(ConfigError, match="a whole number of GPUs"):
        _sweep_cfg(medmnist_root, "tune.workers_per_trial=2", "tune.cpus_per_trial=2", "tune.gpus_per_trial=1")


@pytest.mark.integration
def test_a_local_cluster_goes_away_with_its_killed_driver(tmp_path):
    """A driver that started its own Ray cluster (as `tune`, `matrix`, `train --workers` do),
    SIGKILLed: every process it started is gone within seconds (Ray's DashboardAgent and
    RuntimeEnvAgent used to listen on for a minute). Before that, its SIGTERM handler (the CLI's)
    still handles SIGTERM: Ray's own, which aborts the driver, is not left in its place."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver_code = ("import os, signal, time; from medmamba.runtime import init_ray; "
                   "signal.signal(signal.SIGTERM, lambda *_: print('handled', flush=True)); init_ray('local'); "
                   "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5); print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", driver_code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        assert proc.stdout.readline().strip() == "handled"
        assert proc.stdout.readline().strip() == "up"
        driver, deadline = psutil.Process(proc.pid), time.time() + 120
        agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        while time.time() < deadline:
            names = [" ".join(p.cmdline()) for p in driver.children(recursive=True) if p.is_running()]
            if all(any(name.startswith(agent) for name in names) for agent in agents):
                break
            time.sleep(0.5)
        time.sleep(2)  # the watcher notes the driver's descendants every second
        family = driver.children(recursive=True)
        watchers = [p for p in family if "reaper.py" in " ".join(p.cmdline())]
        assert len(family) >= 5 and len(watchers) == 1, [" ".join(p.cmdline())[:80] for p in family]
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"still running 15 s after the driver's death: {[' '.join(p.cmdline())[:80] for p in alive]}"


# --- Ray Train -----------------------------------------------------------------------------------

def _train_cfg(medmnist_root, *extra):
    return load_config(ROOT / "configs/quick.yaml", ["data.name=breastmnist", f"data.root={medmnist_root}",
                                                     "ray.num_workers=2", *extra])


@pytest.mark.slow  # 1 min on 2 cores (CI time); `make test-all`
def test_two_ray_train_workers_give_a_run_like_a_single_process_one(mlflow_uri, ray_cluster, medmnist_root, tmp_path):
    out = tmp_path / "ddp"
    metrics = train_distributed(tracked(_train_cfg(medmnist_root, "train.epochs=2"), mlflow_uri), out)
    for name in ("best.pt", "last.pt", "metrics.json", "history.json", "config.yaml", "roc.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) | set(MACRO_KEYS) | {"confusion_matrix", "per_class", "best_epoch", "positive_class"} \
        == set(saved)
    assert sum(map(sum, saved["confusion_matrix"])) == 156  # every test image once, gathered from 2 ranks
    assert saved["auc"] == pytest.approx(metrics["auc"]) and 0.5 < saved["auc"] <= 1
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.metrics["test_auc"] == pytest.approx(saved["auc"])

    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data-root", str(medmnist_root),
                 "--output-dir", str(tmp_path / "eval"), "--no-mlflow"]) == 0
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["auc"] == pytest.approx(saved["auc"], abs=1e-6)


def test_more_workers_than_the_cluster_has_are_refused(ray_cluster, medmnist_root, tmp_path):
    with pytest.raises(ConfigError, match="ray.num_workers=8 workers asks for 8 CPUs .* has 2 CPUs"):
        train_distributed(tracked(_train_cfg(medmnist_root, "ray.num_workers=8"), None), tmp_path / "ddp")
    assert main(["train", "--config", str(ROOT / "configs/quick.yaml"), "--workers", "2", "--gpus-per-worker", "1",
                 "--output-dir", str(tmp_path / "gpu"), "--no-mlflow"]) == 2  # no GPU in this cluster


@pytest.mark.slow  # (CI time; 1.2 min)
def test_a_killed_ray_train_worker_restarts_from_the_last_checkpoint(mlflow_uri, ray_cluster, medmnist_root, tmp_path):
    from ray.util.state import list_actors

    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "medmamba.cli", "train", "--config", str(ROOT / "configs/quick.yaml"),
            "--set", "data.name=breastmnist", "--set", f"data.root={medmnist_root}", "--set", "train.epochs=3",
            "--workers", "2", "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ray_cluster["env"])
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        if list((out / "ray").glob("*/checkpoint_manager_snapshot.json")):  # epoch 1's checkpoint is registered
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                killed = workers[-1]["pid"]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=400)
    assert killed is not None, "no worker to kill:\n" + output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    state = torch.load(out / "last.pt", weights_only=False)
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]


# --- a Ray job -----------------------------------------------------------------------------------

@pytest.mark.slow  # 2 min; the sweep itself runs in CI above
def test_ray_job_submit_runs_a_sweep_and_reports_its_outcome(ray_cluster, medmnist_root, tmp_path):
    out = tmp_path / "job"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
           "--working-dir", str(ROOT), "--", "medmamba", "tune", "--config", "configs/sweep_quick.yaml",
           "--set", f"data.root={medmnist_root}", "--set", "tune.num_samples=2", "--set", "train.epochs=1",
           "--output-dir", str(out), "--no-mlflow"]
    job = subprocess.run(cmd, capture_output=True, text=True, env=ray_cluster["env"], timeout=500)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "best val_auc" in job.stdout and "succeeded" in job.stdout
    assert (out / "best_config.yaml").is_file() and (out / "metrics.json").is_file()
    bad = subprocess.run(cmd[:7] + ["--", "medmamba", "tune", "--config", "configs/sweep_quick.yaml",
                                    "--set", "optim.name=adagrad", "--output-dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=ray_cluster["env"], timeout=300)
    assert bad.returncode != 0 and "optim.name" in bad.stdout + bad.stderr
