"""YAML configs with --set overrides: defaults, types, and errors that name the key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from medmamba.config import ConfigError, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: sgd\n  lr: 0.01\nsched:\n  milestones: [3, 6]\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.epochs=7", "model.num_classes=4", "data.fold=null"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7 and cfg.model.num_classes == 4 and cfg.data.fold is None
    assert cfg.sched.milestones == [3, 6] and cfg.sched.gamma == 0.1  # untouched keys keep defaults
    assert cfg.flat()["optim.lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; optim has: name, lr"),
    ("optimizer.lr=0.1", "unknown config key 'optimizer.lr'; sections: model, data"),
    ("train.epochs=ten", "config key train.epochs: expected int, got 'ten'"),
    ("sched.milestones=5", "config key sched.milestones: expected a list, got 5"),
    ("sched.milestones=[5, 2]", "config key sched.milestones: must increase"),
    ("optim.name=rmsprop", "config key optim.name: expected adam, adamw or sgd"),
    ("train.monitor=kappa", "config key train.monitor: expected a metric name"),
    ("data.split_ratios=[0.5, 0.5, 0.5]", "config key data.split_ratios"),
    ("optim.lr", "override 'optim.lr' is not key=value"),
    ("tune.num_samples=0", "config key tune.num_samples: must be >= 1, got 0"),  # (an empty sweep crashed)
    ("tune.reduction_factor=1", "config key tune.reduction_factor: must be >= 2, got 1"),
    ("optim.momentum=1", "config key optim.momentum: must be in [0, 1), got 1.0"),
    ("train.early_stopping_patience=0", "config key train.early_stopping_patience: must be >= 1, got 0"),
    ("federated.round_timeout=0", "config key federated.round_timeout: must be >= 1, got 0.0"),
    ("train=1", "'train' is a config section, not a key: set one of its keys, e.g. train.epochs="),
    ("matrix={}", "'matrix' is a config section, not a key: set one of its keys, e.g. matrix.train.seed=[0, 1]"),
    ("tune.metric=val_precision", "config key tune.metric: expected val_auc, val_accuracy, val_f1, val_loss or "
                                  "train_loss, got 'val_precision'"),  # (not reported per epoch: every trial ran)
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n\tepochs: 3\n")  # a tab: one line naming where and why, not YAML's four
    with pytest.raises(ConfigError, match=r"^\S*bad.yaml is not valid YAML, line 2, column 1: found character "
                                          r"'\\t' that cannot start any token$"):
        load_config(bad)
    bad.write_text("train:\n  epochs: 3\n  lr: 1\n  epochs: 30\n")  # plain YAML would train for 30
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML, line 4, column 3: key 'epochs' is given twice"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key 'train.seed' is given twice"):
        load_config(None, ["matrix={train.seed: [0], train.seed: [1]}"])
    bad.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="section 'optim' must be a mapping"):
        load_config(bad)


def test_override_values_are_yaml():
    assert parse_override("data.root=/a/b") == ("data.root", "/a/b")
    assert parse_override("train.amp=false") == ("train.amp", False)
    assert parse_override("sched.gamma=1e-2") == ("sched.gamma", 0.01)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "config key optim.lr: must be > 0"),
    ("train.epochs=0", "config key train.epochs: must be >= 1, got 0"),
    ("train.batch_size=0", "config key train.batch_size: must be >= 1, got 0"),
    ("data.augment=randaugment", "config key data.augment: expected none or autoaugment"),
    ("data.fold=5", r"config key data.fold: must be in \[0, 5\), got 5"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_base_files_extend_each_other_and_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 3\n  batch_size: 16\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (7, 16)  # the file wins over its base
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="'base' files include each other"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("tune.mode=maximum", "tune.mode: expected min or max"),
    ("ray.num_workers=0", "config key ray.num_workers: must be >= 1, got 0"),
    ("ray.gpus_per_worker=-1", "config key ray.gpus_per_worker: must be >= 0, got -1"),
    ("federated.fraction_fit=0", "federated.fraction_fit: must be in \\(0, 1\\]"),
    ("federated.rounds=0", "config key federated.rounds: must be >= 1, got 0"),
    ("federated.fraction_fit=1.5", r"config key federated.fraction_fit: must be in \(0, 1\], got 1.5"),
    ("tune.space=[1, 2]", "tune.space: expected a mapping"),
])
def test_bad_ray_tune_and_federated_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_absolute_paths_makes_the_data_root_independent_of_the_working_directory(tmp_path, monkeypatch):
    from medmamba.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(None, ["data.root=data/medmnist"]))
    assert cfg.data.root == str(tmp_path / "data/medmnist")
    assert absolute_paths(load_config(None)).data.root is None


@pytest.mark.parametrize("override, message", [
    ("model.d_state=0", "config key model.d_state: must be >= 1, got 0"),
    ("model.drop_path_rate=1.0", r"config key model.drop_path_rate: must be in \[0, 1\), got 1.0"),
    ("model.num_classes=1", "config key model.num_classes: must be >= 2, got 1"),
    ("data.size=0", "config key data.size: must be >= 4, got 0"),
    ("data.num_workers=-1", "config key data.num_workers: must be >= 0, got -1"),
    ("optim.lr=.inf", "config key optim.lr: must be a finite number, got inf"),
    ("sched.gamma=.nan", "config key sched.gamma: must be a finite number, got nan"),
])
def test_out_of_range_and_non_finite_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    assert load_config(None, ["model.num_classes=2", "model.drop_path_rate=0"]).model.num_classes == 2


def test_a_resume_with_nothing_to_continue_says_so(tmp_path, caplog):
    from medmamba.config import check_new_output

    check_new_output(tmp_path / "typo", "sweep", ("sweep_state.json",), resume=True)  # a mistyped folder trains anew
    assert "--resume: " + str(tmp_path / "typo") + " holds no sweep to continue (no sweep_state.json)" in caplog.text
    caplog.clear()
    (tmp_path / "sweep_state.json").write_text("{}")
    check_new_output(tmp_path, "sweep", ("sweep_state.json",), resume=True)
    assert caplog.text == ""
    with pytest.raises(ConfigError, match="already holds a sweep"):
        check_new_output(tmp_path, "sweep", ("sweep_state.json",), resume=False)
