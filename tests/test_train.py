"""The training loop on real data: checkpoints, metrics, resume, early stopping, NaN, MLflow."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import Dataset, Subset

from medmamba import create_model
from medmamba.config import load_config
from medmamba.data import build_datasets
from medmamba.metrics import METRIC_KEYS
from medmamba.tracking import Tracker
from medmamba.train import MlflowLogger, Trainer


def _cfg(medmnist_root, *overrides):
    return load_config(None, [
        "model.name=medmamba_t", "data.name=breastmnist", f"data.root={medmnist_root}", "data.size=28",
        "train.batch_size=64", "optim.lr=0.001", "sched.milestones=[7]", *overrides,
    ])


@pytest.fixture(scope="module")
def breast(medmnist_root):
    return build_datasets(_cfg(medmnist_root).data)


@pytest.fixture(scope="module")
def breast_192(breast):
    """BreastMNIST with only its first 192 training images (3 batches): for the loop's mechanics
    (resume, RNG state, MLflow runs), which do not need a full epoch of learning."""
    return dataclasses.replace(breast, train=Subset(breast.train, range(192)))


@pytest.mark.integration
def test_breastmnist_learns_and_logs(mlflow_uri, medmnist_root, breast, tmp_path):
    """MedMamba-T at 28 px on CPU learns in 10 epochs (the training loss falls tenfold, the best
    validation AUC reaches 0.80, test AUC 0.75: test AUC ranged 0.77-0.80+ across CPU types, the
    rounding of their kernels alone changing the trajectory); outputs and MLflow records are complete."""
    cfg = _cfg(medmnist_root, "train.epochs=10")
    trainer = Trainer(cfg, breast, tmp_path / "run", callbacks=[MlflowLogger(Tracker(mlflow_uri, "test-train"))],
                      progress=False)
    metrics = trainer.fit()
    losses = [row["train_loss"] for row in trainer.history]
    assert losses[-1] < losses[0] / 10 and trainer.best >= 0.80 and metrics["auc"] >= 0.75, (losses, trainer.best, metrics)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(METRIC_KEYS) | {"per_class", "confusion_matrix"} <= saved.keys()
    assert sum(map(sum, saved["confusion_matrix"])) == 156
    model = create_model("medmamba_t", num_classes=2, checkpoint=tmp_path / "run" / "best.pt")
    assert sum(p.numel() for p in model.parameters()) > 1e7

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-train").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["dataset_md5"] == breast.checksum
    assert run.data.tags["positive_class"] == "malignant"
    assert run.data.metrics["test_auc"] == pytest.approx(metrics["auc"])
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 10
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "metrics.json", "config.yaml", "history.json", "confusion_matrix.png", "roc.png", "training_curves.png"}
    assert client.search_logged_models([run.info.experiment_id])  # the model, via mlflow.pytorch


@pytest.mark.integration
def test_resume_continues_the_same_run(mlflow_uri, medmnist_root, breast_192, tmp_path):
    first = Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path,
                    callbacks=[MlflowLogger(Tracker(mlflow_uri, "r"))], progress=False)
    first.fit()
    second = Trainer(_cfg(medmnist_root, "train.epochs=2"), breast_192, tmp_path,
                     callbacks=[MlflowLogger(Tracker(mlflow_uri, "r"))], progress=False)
    second.fit(resume=True)
    assert [row["epoch"] for row in second.history] == [1, 2] and second.run_id == first.run_id
    client = MlflowClient(mlflow_uri)
    assert len(client.search_runs([client.get_experiment_by_name("r").experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(first.run_id, "train_loss")] == [1, 2]


@pytest.mark.integration
def test_early_stopping(medmnist_root, breast, tmp_path):
    # A learning rate too small to learn: only BatchNorm statistics move, val loss soon stalls.
    cfg = _cfg(medmnist_root, "train.epochs=8", "optim.lr=1e-30", "train.early_stopping_patience=2",
               "model.name=mobilenetv3_small_050", "model.drop_path_rate=0.0", "train.monitor=loss")
    trainer = Trainer(cfg, breast, tmp_path, progress=False)
    trainer.fit()
    losses = [row["val_loss"] for row in trainer.history]
    assert len(trainer.history) == trainer.best_epoch + 2 < 8  # stopped 2 epochs after the best
    assert min(losses) == losses[trainer.best_epoch - 1]


class _NaNImages(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((3, 28, 28), math.nan), i % 2


def test_nan_loss_stops_with_a_clear_error_and_a_failed_run(mlflow_uri, medmnist_root, breast_192, tmp_path):
    data = dataclasses.replace(breast_192, train=_NaNImages(), name="nan", checksum="x")
    with pytest.raises(FloatingPointError, match="training loss became nan at epoch 1, step 0"):
        Trainer(_cfg(medmnist_root, "train.epochs=1"), data, tmp_path,
                callbacks=[MlflowLogger(Tracker(mlflow_uri, "nan"))], progress=False).fit()
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    # it died before its first checkpoint: a resume (a matrix cell's, say) continues that MLflow run
    again = Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path,
                    callbacks=[MlflowLogger(Tracker(mlflow_uri, "nan"))], progress=False)
    again.fit(resume=True)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert again.run_id == run.info.run_id and run.info.status == "FINISHED"


def test_num_classes_must_match_the_data(medmnist_root, breast, tmp_path):
    with pytest.raises(ValueError, match="model.num_classes is 3 but breastmnist has 2 classes"):
        Trainer(_cfg(medmnist_root, "model.num_classes=3"), breast, tmp_path, progress=False)


def test_unavailable_device_is_named(medmnist_root, breast, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="train.device is 'cuda' but CUDA is not available"):
        Trainer(_cfg(medmnist_root, "train.device=cuda"), breast, tmp_path, progress=False)
    from medmamba.evaluation import load_checkpoint

    model = create_model("medmamba_t", num_classes=2, img_size=28)
    checkpoint = {"model": model.state_dict(), "config": _cfg(medmnist_root).to_dict(), "classes": ["a", "b"]}
    with pytest.raises(ValueError, match=r"^device is 'cuda:1' but CUDA is not available$"):  # evaluate --device
        load_checkpoint(checkpoint, device="cuda:1")


def test_a_gpu_index_the_machine_does_not_have_is_named(monkeypatch):
    """cuda:3 on a one-GPU machine (CUDA's presence and count as a one-GPU machine reports them)."""
    from medmamba.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^train.device is 'cuda:3' but this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_a_batch_size_of_one_is_refused_before_a_model_is_built(medmnist_root, breast, tmp_path):
    with pytest.raises(ValueError, match="train.batch_size is 1: training needs at least 2 images per batch"):
        Trainer(_cfg(medmnist_root, "train.batch_size=1"), breast, tmp_path, progress=False)


def test_a_final_training_batch_of_one_is_dropped_but_never_in_evaluation():
    from torch.utils.data import TensorDataset

    from medmamba.data import make_loader

    data = TensorDataset(torch.zeros(65, 3, 28, 28), torch.zeros(65, dtype=torch.long))
    assert [len(y) for _, y in make_loader(data, 64, shuffle=True)] == [64]  # BatchNorm needs 2 per channel
    assert [len(y) for _, y in make_loader(data, 64, shuffle=False)] == [64, 1]
    assert [len(y) for _, y in make_loader(TensorDataset(torch.zeros(66, 1), torch.zeros(66)), 64, True)] == [64, 2]


@pytest.mark.integration
def test_a_resumed_run_continues_the_uninterrupted_one(medmnist_root, breast_192, tmp_path):
    """Every RNG (the data order included) is restored: epoch 2 after a resume is epoch 2 of a run
    that never stopped."""
    straight = Trainer(_cfg(medmnist_root, "train.epochs=2"), breast_192, tmp_path / "straight", progress=False)
    straight.fit(test=False)
    Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path / "resumed", progress=False).fit(test=False)
    resumed = Trainer(_cfg(medmnist_root, "train.epochs=2"), breast_192, tmp_path / "resumed", progress=False)
    resumed.fit(resume=True, test=False)
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], rel=1e-6)
    assert resumed.history[1]["val_auc"] == pytest.approx(straight.history[1]["val_auc"], rel=1e-6)


@pytest.fixture
def cuda_tagged_saves():
    """torch.save records every storage as on cuda:0, as a checkpoint written on a GPU does."""
    import torch.serialization as ts

    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda obj, location: None)
    ts._package_registry.insert(0, entry)
    try:
        yield
    finally:
        ts._package_registry.remove(entry)


@pytest.mark.integration
def test_resume_state_written_on_a_gpu_loads_on_the_cpu(medmnist_root, breast_192, tmp_path, cuda_tagged_saves, caplog):
    """last.pt is read on the CPU with weights_only=True whatever device wrote it, and the CUDA RNG
    states in it are restored only where there is CUDA (here: a warning)."""
    from medmamba.runtime import rng_state

    first = Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path, progress=False)
    first.fit(test=False)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    state["rng"]["cuda"] = [rng_state()["torch"]]  # a GPU run's CUDA generator state
    torch.save(state, tmp_path / "last.pt")  # every storage tagged cuda:0 (the fixture)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "last.pt", weights_only=True)  # a load that does not map to the CPU fails here
    second = Trainer(_cfg(medmnist_root, "train.epochs=2"), breast_192, tmp_path, progress=False)
    second.fit(resume=True, test=False)
    assert [row["epoch"] for row in second.history] == [1, 2]
    assert "RNG states of 1 CUDA devices, this process has 0" in caplog.text


def test_resume_refuses_a_state_file_that_is_not_tensors_and_plain_data(medmnist_root, breast, tmp_path):
    from medmamba.errors import CheckpointError

    trainer = Trainer(_cfg(medmnist_root, "train.epochs=1"), breast, tmp_path, progress=False)
    torch.save({"model": {}, "payload": _NaNImages()}, tmp_path / "last.pt")  # an arbitrary pickled object
    with pytest.raises(CheckpointError, match="last.pt is not a readable checkpoint"):
        trainer.fit(resume=True)


def test_resume_never_retrains_over_a_finished_run_whose_last_pt_was_removed(medmnist_root, breast_192, tmp_path):
    from medmamba.errors import CheckpointError

    Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path, progress=False).fit()
    (tmp_path / "last.pt").unlink()  # e.g. to save space: it holds the optimizer state too
    best = (tmp_path / "best.pt").read_bytes()
    longer = Trainer(_cfg(medmnist_root, "train.epochs=2"), breast_192, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="holds a finished run without last.pt, its resume state, so it cannot "
                                              "continue"):
        longer.fit(resume=True)  # it trained from scratch and overwrote best.pt
    assert (tmp_path / "best.pt").read_bytes() == best


def test_resume_refuses_a_changed_config_and_names_the_keys(medmnist_root, breast_192, tmp_path):
    from medmamba.errors import ConfigError

    Trainer(_cfg(medmnist_root, "train.epochs=1"), breast_192, tmp_path, progress=False).fit(test=False)
    changed = Trainer(_cfg(medmnist_root, "train.epochs=2", "optim.lr=0.05", "model.d_state=8"), breast_192, tmp_path,
                      progress=False)
    with pytest.raises(ConfigError, match=r"was made with another config: model.d_state=8 \(was None\); "
                                          r"optim.lr=0.05 \(was 0.001\)\. Only train.epochs"):
        changed.fit(resume=True)
    longer = Trainer(_cfg(medmnist_root, "train.epochs=2", "data.num_workers=1"), breast_192, tmp_path, progress=False)
    longer.fit(resume=True, test=False)  # more epochs (and other workers) continue the run
    assert [row["epoch"] for row in longer.history] == [1, 2]


def test_resume_refuses_images_that_changed_since_the_run_started(mednist_root, tmp_path):
    from medmamba.errors import DataError

    root = tmp_path / "images"
    for c in ("CXR", "Hand"):
        (root / c).mkdir(parents=True)
        for f in sorted((mednist_root / c).iterdir())[:10]:
            shutil.copy(f, root / c / f.name)
    cfg = load_config(None, ["data.name=folder", f"data.root={root}", "data.size=28", "train.epochs=1",
                             "train.batch_size=4"])
    Trainer(cfg, build_datasets(cfg.data), tmp_path / "run", progress=False).fit(test=False)
    shutil.copytree(root, tmp_path / "moved")  # the same images elsewhere: resumable
    moved = load_config(None, ["data.name=folder", f"data.root={tmp_path / 'moved'}", "data.size=28",
                               "train.epochs=2", "train.batch_size=4"])
    Trainer(moved, build_datasets(moved.data), tmp_path / "run", progress=False).fit(resume=True, test=False)
    shutil.copy(mednist_root / "CXR" / "000010.jpeg", tmp_path / "moved" / "CXR")  # the split is another now
    moved.train.epochs = 3
    with pytest.raises(DataError, match=r"run/last.pt was trained on other images than folder:moved holds now "
                                        r"\(data checksum \w{8} then, \w{8} now: files or splits changed\)"):
        Trainer(moved, build_datasets(moved.data), tmp_path / "run", progress=False).fit(resume=True, test=False)


def test_a_run_that_died_before_its_first_checkpoint_resumes_into_the_same_mlflow_run(mlflow_uri, medmnist_root,
                                                                                       breast_192, tmp_path):
    broken = dataclasses.replace(breast_192, train=_NaNImages())
    cfg = _cfg(medmnist_root, "train.epochs=1")
    with pytest.raises(FloatingPointError):
        Trainer(cfg, broken, tmp_path / "run", callbacks=[MlflowLogger(Tracker(mlflow_uri, "early"))], progress=False).fit()
    assert not (tmp_path / "run" / "last.pt").exists()
    Trainer(cfg, breast_192, tmp_path / "run", callbacks=[MlflowLogger(Tracker(mlflow_uri, "early"))], progress=False).fit(
        resume=True, test=False)
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_default_run_names_differ_even_after_the_same_seed(mlflow_uri, tmp_path):
    import random

    tracker = Tracker(mlflow_uri, "names")
    names = []
    for _ in range(2):
        random.seed(0)  # as every run seeds Python's random before its MLflow run starts
        names.append(tracker.client.get_run(tracker.start(None, {}, {})).info.run_name)
    assert names[0] != names[1]


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path):
    import subprocess

    from medmamba.errors import CheckpointError
    from medmamba.train import _atomic_save

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        _atomic_save({"w": torch.zeros(10)}, disk / "last.pt")
        with pytest.raises(CheckpointError, match=f"no space left on device writing {disk / 'last.pt'}"):
            _atomic_save({"w": torch.zeros(2**21)}, disk / "last.pt")  # 8 MiB on a 4 MiB disk
        assert sorted(p.name for p in disk.iterdir()) == ["last.pt"]
        assert torch.load(disk / "last.pt", weights_only=True)["w"].shape == (10,)  # the previous one intact
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_cpu_run_has_each_epochs_checkpoint_on_disk_before_the_next_epoch(medmnist_root, breast_192, tmp_path):
    """On the CPU, a kill loses at most the epoch in progress: a background writer, kept from the
    cores training uses, would still be writing last.pt an epoch later."""
    from medmamba.train import Callback

    seen = []

    class OnDisk(Callback):
        def on_epoch_end(self, trainer, row):
            state = torch.load(trainer.out / "last.pt", weights_only=False, mmap=True)
            seen.append((row["epoch"], trainer.checkpoints.persisted, state["epoch"]))

    cfg = _cfg(medmnist_root, "train.epochs=2", "model.name=mobilenetv3_small_050", "model.drop_path_rate=0.0")
    Trainer(cfg, breast_192, tmp_path, callbacks=[OnDisk()], progress=False).fit(test=False)
    assert seen == [(1, 1, 1), (2, 2, 2)]


def test_the_background_checkpoint_writer_writes_in_order_and_reraises_a_failed_write(tmp_path):
    from medmamba.errors import CheckpointError
    from medmamba.train import CheckpointWriter

    writer = CheckpointWriter(background=True)
    for epoch in (1, 2):
        weights = {"w": torch.full((4,), float(epoch))}
        writer.submit(epoch, [(weights, tmp_path / "last.pt")])
        weights["w"].zero_()  # training goes on: the writer holds its own copy
    writer.wait()
    assert writer.persisted == 2 and torch.load(tmp_path / "last.pt")["w"].tolist() == [2.0] * 4
    writer.submit(3, [({"w": torch.zeros(1)}, tmp_path / "gone" / "last.pt")])
    with pytest.raises(CheckpointError, match="gone/last.pt"):
        writer.wait()
    assert writer.persisted == 2


class _LateNaN(Dataset):
    """Finite images, then NaN ones from index 40 (batch 8: step 5)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((3, 28, 28), math.nan if i >= 40 else 0.1 * (i % 5)), i % 2


def test_a_loss_that_turns_nan_mid_epoch_names_its_first_step():
    from medmamba.data import make_loader
    from medmamba.train import train_one_epoch

    model = create_model("medmamba_t", num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match="training loss became nan at epoch 3, step 5"):
        train_one_epoch(model, make_loader(_LateNaN(), 8, shuffle=False), optimizer, torch.device("cpu"), epoch=3,
                        progress=False)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_autocast_trains_through_each_scan_path(backend, monkeypatch, breast):
    """train.amp=bf16 on a CPU: bf16 matmuls around the fp32 scan, finite losses, weights learn."""
    import functools

    import medmamba.model
    from medmamba.data import make_loader
    from medmamba.kernels import cross_selective_scan
    from medmamba.train import train_one_epoch

    monkeypatch.setattr(medmamba.model, "cross_selective_scan", functools.partial(cross_selective_scan,
                                                                                  backend=backend))
    torch.manual_seed(0)
    model = create_model("medmamba_t", num_classes=2)
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    subset = torch.utils.data.Subset(breast.train, range(32))
    loss = train_one_epoch(model, make_loader(subset, 16, shuffle=True), optimizer, torch.device("cpu"),
                           progress=False, amp=torch.bfloat16)
    assert math.isfinite(loss) and 0 < loss < 5
    assert not torch.equal(before, model.head.weight) and model.head.weight.dtype == torch.float32


def test_train_amp_picks_the_autocast_dtype_per_device():
    from medmamba.errors import ConfigError
    from medmamba.runtime import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype(True, cpu) is None  # fp32 by default on CPU
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype(False, cpu) is None
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"
    assert load_config(None, ["train.amp=false"]).train.amp is False  # older configs still load


def test_a_run_folder_stands_for_its_best_checkpoint_or_else_its_last(tmp_path):
    from medmamba.errors import CheckpointError
    from medmamba.evaluation import run_checkpoint

    with pytest.raises(CheckpointError, match="holds no best.pt or last.pt"):
        run_checkpoint(tmp_path)
    (tmp_path / "last.pt").touch()
    assert run_checkpoint(tmp_path) == tmp_path / "last.pt"  # no epoch had a finite validation metric
    (tmp_path / "best.pt").touch()
    assert run_checkpoint(tmp_path) == tmp_path / "best.pt"


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident size from /proc (Linux)")
def test_release_freed_memory_gives_a_finished_threads_freed_heap_back():
    """A reused Tune actor runs each cell in a new thread; what a cell frees stays in that thread's
    fragmented heap arena until released (a matrix worker grew 0.35 GB a cell)."""
    import threading

    from medmamba.runtime import release_freed_memory

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    kept = []

    def cell():  # 256 MB of 64 KB tensors (under malloc's mmap threshold): one in 8 outlives the thread
        blocks = [torch.ones(16384) for _ in range(4096)]
        kept.extend(blocks[::8])

    thread = threading.Thread(target=cell)
    thread.start()
    thread.join()
    held = resident()
    release_freed_memory()
    assert held - resident() > 150 * 2**20
    assert all(block[0] == 1 for block in kept)  # what is still referenced is untouched


def test_release_freed_memory_drops_earlier_runs_compiled_graphs():
    """A reused actor's next run compiles its own graphs: the earlier runs' do not count against
    dynamo's recompile limit (after 8, train.compile trained eagerly, with one warning in the log)."""
    from torch._dynamo.utils import counters

    from medmamba.runtime import release_freed_memory

    def step(x):
        return (x * 2).sum()

    compiled = torch.compile(step, backend="eager")
    for _ in range(2):
        compiled(torch.ones(3))
    before = counters["stats"]["unique_graphs"]
    compiled(torch.ones(3))
    assert counters["stats"]["unique_graphs"] == before  # cached
    release_freed_memory()
    compiled(torch.ones(3))
    assert counters["stats"]["unique_graphs"] == before + 1  # compiled afresh
