"""The medmamba command: train, evaluate, bad input, and a real MLflow tracking server."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from medmamba.cli import main


def _start_mlflow_server(root, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with a SQLite store in root, answering /health."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited during start-up")
            time.sleep(0.2)
    _stop(proc)
    pytest.fail("mlflow server did not start within 90 s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server and the processes it started (its session) by PID."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, _migrated_store):
    port, root = free_port(), tmp_path_factory.mktemp("mlflow")
    shutil.copy(_migrated_store, root / "db.sqlite")  # (the server need not migrate a new store)
    proc = _start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def _train_args(medmnist_root, out, *extra):
    return ["train", "--config", "configs/quick.yaml", "--set", "data.name=breastmnist",
            "--set", f"data.root={medmnist_root}", "--set", "train.epochs=1", "--output-dir", str(out), *extra]


def test_train_to_a_tracking_server_then_evaluate(medmnist_root, mlflow_server, tmp_path, capsys):
    assert main(_train_args(medmnist_root, tmp_path / "run", "--tracking-uri", mlflow_server)) == 0
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert run.info.status == "FINISHED" and "test_auc" in run.data.metrics
    assert "accuracy" in capsys.readouterr().out

    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--split", "test",
                 "--output-dir", str(tmp_path / "eval"), "--no-mlflow"]) == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated.keys() <= trained.keys() | {"best_epoch"}
    assert evaluated["auc"] == pytest.approx(trained["auc"]) and evaluated["confusion_matrix"] == trained["confusion_matrix"]


def test_a_checkpoint_finds_its_image_folder_from_any_working_directory(mednist_root, tmp_path, monkeypatch, capsys):
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml")
    for c in ("CXR", "Hand"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for f in sorted((mednist_root / c).iterdir())[:10]:
            shutil.copy(f, tmp_path / "images" / c / f.name)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", recipe, "--set", "data.name=folder", "--set", "data.root=images",
                 "--set", "train.epochs=1", "--output-dir", "run", "--no-mlflow"]) == 0
    monkeypatch.chdir(tmp_path / "run")  # the config saved with the checkpoint holds the folder's absolute path
    evaluate = ["evaluate", "--checkpoint", "best.pt", "--output-dir", "eval", "--no-mlflow"]
    assert main(evaluate) == 0
    (tmp_path / "images").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(evaluate) == 2
    assert capsys.readouterr().err.strip() == (f"medmamba evaluate: error: the checkpoint's image folder "
                                               f"{tmp_path / 'images'} does not exist here: give the images' "
                                               "folder with --data-root")
    assert main(evaluate + ["--data-root", str(tmp_path / "moved")]) == 0


def test_unreachable_tracking_server_fails_before_training(medmnist_root, tmp_path, capsys):
    start = time.time()
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(_train_args(medmnist_root, tmp_path / "run", "--tracking-uri", uri)) == 2
    assert f"MLflow tracking server {uri} is unreachable" in capsys.readouterr().err
    assert time.time() - start < 30 and not (tmp_path / "run" / "last.pt").exists()


def test_a_folder_or_missing_store_is_named_before_anything_runs(medmnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(_train_args(medmnist_root, tmp_path / "run", "--tracking-uri", str(tmp_path / "mlruns"))) == 2
    assert f"tracking URI {tmp_path / 'mlruns'} names a folder, MLflow's file store" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()
    assert main(_train_args(medmnist_root, tmp_path / "run", "--tracking-uri", "sqllite:///runs.db")) == 2  # a typo
    assert capsys.readouterr().err == ("medmamba train: error: tracking URI sqllite:///runs.db: MLflow has no store "
                                       "for sqllite://; give sqlite:///PATH.db, an http(s) server or a database URL "
                                       "(postgresql://, mysql://, mssql://)\n")  # was MLflow's traceback
    if importlib.util.find_spec("psycopg2") is None:  # a database whose driver is missing: was a traceback too
        assert main(["report", "--tracking-uri", "postgresql+psycopg2://mlflow@127.0.0.1/runs", "--experiment", "x",
                     "--output-dir", str(tmp_path / "report")]) == 2
        assert "needs the database driver 'psycopg2', which is not installed here" in capsys.readouterr().err
    missing = tmp_path / "typo.db"  # reading runs never creates an empty store
    assert main(["report", "--tracking-uri", f"sqlite:///{missing}", "--experiment", "x", "--output-dir",
                 str(tmp_path / "report")]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err and not missing.exists()


def test_a_finished_or_running_output_dir_is_never_overwritten(medmnist_root, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    assert main(_train_args(medmnist_root, out, "--no-mlflow")) == 0
    saved = (out / "last.pt").read_bytes()
    assert main(_train_args(medmnist_root, out, "--no-mlflow")) == 2
    assert f"{out} already holds a training run (last.pt); continue it with --resume" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == saved
    with open(out / ".medmamba.lock", "a+") as lock:  # another command's, running there now
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("pid 4242")
        lock.flush()
        assert main(_train_args(medmnist_root, out, "--no-mlflow", "--resume")) == 2
        assert f"--output-dir {out} is in use by another medmamba command (pid 4242)" in capsys.readouterr().err
    assert main(_train_args(medmnist_root, out, "--no-mlflow", "--resume")) == 0  # a finished run stays finished
    assert (out / "last.pt").read_bytes() == saved


def test_bad_config_and_data_exit_2_with_the_reason(medmnist_root, tmp_path, capsys):
    assert main(_train_args(medmnist_root, tmp_path, "--set", "optim.lrr=1", "--no-mlflow")) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(_train_args(medmnist_root, tmp_path, "--set", "data.name=cifar10", "--no-mlflow")) == 2
    assert "unknown dataset 'cifar10'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--output-dir", str(tmp_path)]) == 2


@pytest.mark.integration
def test_kfold_on_an_image_folder_reports_mean_and_std(mednist_root, tmp_path, capsys):
    args = ["train", "--config", "configs/quick.yaml", "--set", "data.name=folder", "--set", f"data.root={mednist_root}",
            "--set", "data.num_folds=3", "--set", "train.epochs=1", "--set", "data.size=28",
            "--output-dir", str(tmp_path), "--kfold", "--no-mlflow"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "kfold_metrics.json").read_text())
    assert len(summary["folds"]) == 3 and all((tmp_path / f"fold_{k}" / "best.pt").is_file() for k in range(3))
    accs = [f["accuracy"] for f in summary["folds"]]
    assert summary["mean"]["accuracy"] == pytest.approx(sum(accs) / 3)
    assert summary["std"]["accuracy"] >= 0 and "± " in capsys.readouterr().out


@pytest.mark.integration
def test_a_stopped_then_killed_run_resumes_from_its_last_checkpoint(mlflow_uri, medmnist_root, tmp_path, caplog):
    """SIGTERM once a checkpoint is on disk (a scheduler's or `ray job stop`'s stop): exit 143, the
    MLflow run KILLED, not left RUNNING; a --resume, SIGKILLed once it has checkpointed a further
    epoch; a --resume again: the finished epochs are kept, the same MLflow run finishes, and the
    CLI says where it resumed from. Six epochs leave each signal room to land mid-run, however
    quickly a machine trains."""
    import signal

    import torch

    def epochs_done() -> int:
        return torch.load(out / "last.pt", weights_only=False, mmap=True)["epoch"] if (out / "last.pt").is_file() else 0

    out, uri = tmp_path / "run", mlflow_uri
    args = _train_args(medmnist_root, out, "--tracking-uri", uri)
    args[args.index("train.epochs=1")] = "train.epochs=6"
    client = MlflowClient(uri)
    done = 0
    for signum, extra in ((signal.SIGTERM, []), (signal.SIGKILL, ["--resume"])):
        proc = subprocess.Popen([sys.executable, "-m", "medmamba.cli", *args, *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and epochs_done() <= done:
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert done < epochs_done() < 6, f"{signum!r}: the run ended before it, or wrote no checkpoint: {err[-2000:]}"
        done = epochs_done()
        (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
        if signum == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, err
            assert "medmamba train: terminated (SIGTERM) (run the same command with --resume to continue)" in err
            assert run.info.status == "KILLED"
        else:
            assert proc.returncode == -signal.SIGKILL and run.info.status == "RUNNING"
    assert main(args + ["--resume"]) == 0
    assert f"resumed from {out / 'last.pt'} after epoch {done}" in caplog.text
    state = torch.load(out / "last.pt", weights_only=False)
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3, 4, 5, 6]
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == state["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.integration
def test_resume_logs_checkpointed_epochs_that_mlflow_never_received(mlflow_uri, medmnist_root, tmp_path):
    """Epochs in last.pt but not in MLflow (a kill between the two writes) are logged on resume."""
    out, uri = tmp_path / "run", mlflow_uri
    assert main(_train_args(medmnist_root, out, "--no-mlflow")) == 0
    args = _train_args(medmnist_root, out, "--tracking-uri", uri, "--resume")
    args[args.index("train.epochs=1")] = "train.epochs=2"
    assert main(args) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


def test_evaluate_reports_an_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "junk.pt"), "--output-dir", str(tmp_path)]) == 2
    assert "junk.pt is not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_builds_the_checkpoints_model_and_links_its_training_run(mlflow_uri, medmnist_root, tmp_path):
    """A model trained with a non-default model key evaluates; --split val logs val_* metrics, in
    a run tagged with the training run named in the checkpoint."""
    import torch

    assert main(_train_args(medmnist_root, tmp_path / "run", "--set", "model.d_state=8", "--tracking-uri", mlflow_uri)) == 0
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    client = MlflowClient(mlflow_uri)
    (trained,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
    assert best["run_id"] == trained.info.run_id and best["experiment"] == "medmamba-quick"
    assert best["model"]["stages.0.blocks.0.ssm.A_log"].shape[-1] == 8

    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--split", "val",
                 "--output-dir", str(tmp_path / "eval"), "--tracking-uri", mlflow_uri]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name("medmamba-evaluate").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val_auc" in run.data.metrics and not any(k.startswith("test_") for k in run.data.metrics)
    assert run.data.tags["source_run_id"] == trained.info.run_id
    assert run.data.tags["source_experiment"] == "medmamba-quick"
    assert sum(map(sum, json.loads((tmp_path / "eval" / "metrics.json").read_text())["confusion_matrix"])) == 78


def test_a_sweeps_best_trial_is_tested_with_its_own_model_keys(medmnist_root, tmp_path):
    """The sweep's test pass builds the best trial's model from its checkpoint (model.d_state=8)."""
    from ray import tune

    from medmamba.config import load_config
    from medmamba.data import build_datasets
    from medmamba.orchestrator.sweep import _test_best
    from medmamba.train import Trainer

    cfg = load_config("configs/quick.yaml", ["data.name=breastmnist", f"data.root={medmnist_root}",
                                             "train.epochs=1", "model.d_state=8"])
    Trainer(cfg, build_datasets(cfg.data), tmp_path / "trial", progress=False).fit(test=False)
    base = load_config("configs/quick.yaml", ["data.name=breastmnist", f"data.root={medmnist_root}"])
    metrics = _test_best(base, tune.Checkpoint.from_directory(tmp_path / "trial"), tmp_path, None, None)
    assert 0 <= metrics["auc"] <= 1 and (tmp_path / "metrics.json").is_file()


@pytest.mark.integration
def test_ctrl_c_prints_one_line_with_the_resume_command(medmnist_root, tmp_path):
    import signal

    out = tmp_path / "run"
    args = _train_args(medmnist_root, out, "--no-mlflow")
    args[args.index("train.epochs=1")] = "train.epochs=50"
    # SIGINT as a terminal sends it, even where this test runs in the background (where it is ignored)
    proc = subprocess.Popen([sys.executable, "-m", "medmamba.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not (out / "config.yaml").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == ("medmamba train: interrupted (run the same command with --resume "
                                            "to continue)")


def test_a_bad_device_is_a_one_line_error(medmnist_root, tmp_path, capsys):
    assert main(_train_args(medmnist_root, tmp_path, "--set", "train.device=tpu7", "--no-mlflow")) == 2
    assert "train.device is 'tpu7': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_runs_started_together_share_a_new_sqlite_store(tmp_path):
    """The first use of the embedded store is safe when several processes start at once."""
    probe = ("import sys; from medmamba.tracking import Tracker; "
             "t = Tracker(sys.argv[1], 'together'); t.start(None, {}, {}); t.end()")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    procs = [subprocess.Popen([sys.executable, "-c", probe, uri], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), errors
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("together").experiment_id])) == 3


def test_bad_inputs_are_one_line_errors(medmnist_root, tmp_path, capsys):
    import torch

    def error(args) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    afile = tmp_path / "afile"
    afile.write_text("")
    assert "data.root " + str(afile) + " is a file; expected a folder" in error(
        _train_args(afile, tmp_path / "a", "--no-mlflow"))
    assert "cannot be written" in error(_train_args(medmnist_root, afile / "out", "--no-mlflow"))
    assert "config key ray.num_workers: must be >= 1, got 0" in error(
        _train_args(medmnist_root, tmp_path / "w", "--workers", "0", "--no-mlflow"))
    truncated = tmp_path / "npz"
    truncated.mkdir()
    data = (medmnist_root / "breastmnist.npz").read_bytes()
    (truncated / "breastmnist.npz").write_bytes(data[: len(data) // 2])
    assert "breastmnist.npz is not a readable breastmnist file" in error(
        _train_args(truncated, tmp_path / "b", "--set", "data.allow_md5_mismatch=true", "--no-mlflow"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    assert "weights_only=False" not in error(["evaluate", "--checkpoint", str(junk), "--output-dir",
                                              str(tmp_path / "c"), "--no-mlflow"])
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    assert "holds no state dict" in error(["evaluate", "--checkpoint", str(tmp_path / "empty.pt"),
                                           "--output-dir", str(tmp_path / "d"), "--no-mlflow"])
    assert "cannot split breastmnist into 50 dirichlet sites" in error(
        ["federate", "--config", "configs/federated_quick.yaml", "--set", f"data.root={medmnist_root}",
         "--set", "data.name=breastmnist", "--set", "federated.num_sites=50", "--set", "federated.alpha=0.01",
         "--output-dir", str(tmp_path / "e"), "--no-mlflow"])
    # none of the failed commands left its new output folder behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty.pt", "junk.pt", "npz"]


def test_a_failed_command_removes_only_the_output_folders_it_created(tmp_path, capsys):
    missing = str(tmp_path / "none.pt")
    assert main(["evaluate", "--checkpoint", missing, "--output-dir", str(tmp_path / "new" / "eval")]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    assert main(["evaluate", "--checkpoint", missing, "--output-dir", str(tmp_path / "old" / "eval")]) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "old"] and not any((tmp_path / "old").iterdir())
    (tmp_path / "old" / "notes.txt").write_text("mine")
    assert main(["evaluate", "--checkpoint", missing, "--output-dir", str(tmp_path / "old")]) == 2
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["notes.txt"]
    assert capsys.readouterr().err.count("checkpoint not found") == 3


def test_resume_in_another_directory_names_the_missing_mlflow_run(tmp_path):
    """The default SQLite store is relative to the working directory: a resume from elsewhere says so."""
    from medmamba.errors import TrackingError
    from medmamba.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/elsewhere.db", "gone")
    with pytest.raises(TrackingError, match="MLflow run 0123abc .* is not in sqlite:///.*elsewhere.db; resume from"):
        tracker.start(None, {}, {}, run_id="0123abc")


@pytest.mark.slow  # (CI time; 1.4 min)
def test_training_goes_on_while_the_tracking_server_is_down_and_resume_catches_up(medmnist_root, tmp_path):
    """The server dies after epoch 1: training finishes, one warning says so, and a --resume once
    it is back delivers every epoch and the test results to the same run."""
    port, root = free_port(), tmp_path / "mlflow"
    root.mkdir()
    server = _start_mlflow_server(root, port)
    uri = f"http://127.0.0.1:{port}"
    args = _train_args(medmnist_root, tmp_path / "run", "--tracking-uri", uri)
    args[args.index("train.epochs=1")] = "train.epochs=2"
    proc = subprocess.Popen([sys.executable, "-m", "medmamba.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        experiment = client.get_experiment_by_name("medmamba-quick")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        time.sleep(0.5)
    _stop(server)  # after epoch 1 reached MLflow
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("is unreachable") == 1, err[-3000:]  # said once, when it went away
    assert "is still unreachable" in err and "run the same command with --resume once it answers" in err

    server = _start_mlflow_server(root, port)
    try:
        assert main(args + ["--resume"]) == 0
        (run,) = client.search_runs([client.get_experiment_by_name("medmamba-quick").experiment_id])
        assert run.info.status == "FINISHED" and "test_auc" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    finally:
        _stop(server)
