"""Trusting a trained model: Grad-CAM (explain), feature embeddings (embed), robustness to
perturbations, and evaluation on another hospital's image folder with a class map."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from medmamba.cli import main
from medmamba.data import parse_class_map
from medmamba.errors import CheckpointError, ConfigError
from medmamba.evaluation import load_checkpoint
from medmamba.explain import default_target_layer, heatmaps
from medmamba.registry import create_model
from medmamba.robustness import PERTURBATIONS, Perturbed


def _train(medmnist_root, out: Path, *extra: str, dataset: str = "breastmnist") -> Path:
    assert main(["train", "--config", "configs/quick.yaml", "--set", f"data.name={dataset}",
                 "--set", f"data.root={medmnist_root}", "--set", "train.epochs=1", "--output-dir", str(out),
                 *extra]) == 0
    return out / "best.pt"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


@pytest.fixture(scope="module")
def breast_medmamba(medmnist_root, tmp_path_factory, store) -> Path:
    """MedMamba-T trained for one epoch on BreastMNIST, its run in ``store``."""
    return _train(medmnist_root, tmp_path_factory.mktemp("mm"), "--tracking-uri", store)


@pytest.fixture(scope="module")
def breast_resnet(medmnist_root, tmp_path_factory) -> Path:
    return _train(medmnist_root, tmp_path_factory.mktemp("rn"), "--set", "model.name=resnet18", "--no-mlflow")


def _runs(uri: str, kind: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("medmamba-evaluate")
    return client.search_runs([experiment.experiment_id], f"tags.kind = '{kind}'") if experiment else []


def _report(store: str, out: Path) -> str:
    """`medmamba report` over the evaluation experiment; its Markdown."""
    assert main(["report", "--tracking-uri", store, "--experiment", "medmamba-evaluate", "--output-dir", str(out),
                 "--no-mlflow"]) == 0
    return (out / "report.md").read_text()


# ------------------------------------------------------------------------------------ explain
@pytest.mark.integration
@pytest.mark.parametrize("which", ["breast_medmamba", "breast_resnet"])
def test_explain_writes_heatmaps_of_the_drawn_images_for_ours_and_a_timm_model(which, request, medmnist_root,
                                                                               tmp_path, store):
    checkpoint = request.getfixturevalue(which)
    out = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(checkpoint), "--num-images", "5", "--output-dir", str(out),
                 "--data-root", str(medmnist_root), "--tracking-uri", store]) == 0
    saved = np.load(out / "heatmaps.npz")
    assert saved["heatmaps"].shape == (5, 28, 28) and saved["heatmaps_gradcampp"].shape == (5, 28, 28)
    assert np.array_equal(saved["heatmaps"], saved["heatmaps_gradcam"])
    assert 0 <= saved["heatmaps"].min() and saved["heatmaps"].max() <= 1
    assert saved["heatmaps"].reshape(5, -1).std(axis=1).min() > 0  # not blank: the layer has a spatial map
    # the images, labels and predictions are those of the test split at the saved indices
    loaded = load_checkpoint(checkpoint, {"root": str(medmnist_root)})
    test = loaded.data.test
    assert len(set(saved["indices"].tolist())) == 5 and saved["indices"].max() < len(test)
    assert saved["labels"].tolist() == [test[int(i)][1] for i in saved["indices"]]
    with torch.no_grad():
        logits = loaded.model(torch.stack([test[int(i)][0] for i in saved["indices"]]))
    assert saved["predictions"].tolist() == logits.argmax(1).tolist()
    np.testing.assert_allclose(saved["probabilities"], torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert saved["class_names"].tolist() == ["malignant", "normal, benign"]
    assert (out / "gradcam_01.png").stat().st_size > 10_000
    if which == "breast_medmamba":  # 28 px: MedMamba's last stages are 1 x 1; the default is a finer one
        assert str(saved["target_layer"]) == "stages.0"
        run = next(r for r in _runs(store, "explain") if r.data.params["checkpoint"] == str(checkpoint))
        assert run.info.status == "FINISHED" and run.data.tags["trained_on"] == "breastmnist"
        assert run.data.tags["source_run_id"] == torch.load(checkpoint, weights_only=True)["run_id"]
        artifacts = {f.path for f in MlflowClient(store).list_artifacts(run.info.run_id, "explain")}
        assert artifacts == {"explain/gradcam_01.png", "explain/heatmaps.npz"}


@pytest.mark.integration
def test_explain_image_files_needs_no_dataset(breast_resnet, medmnist_root, tmp_path, capsys):
    """Chosen files are explained with the checkpoint's own class names; no data is read."""
    files = []
    for i, value in enumerate((40, 200)):
        files.append(tmp_path / f"scan{i}.png")
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(files[-1])
    assert main(["explain", "--checkpoint", str(breast_resnet), "--images", *map(str, files), "--method",
                 "layercam", "--data-root", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "x"),
                 "--no-mlflow"]) == 0
    saved = np.load(tmp_path / "x" / "heatmaps.npz")
    assert saved["paths"].tolist() == [str(f) for f in files] and "labels" not in saved
    assert saved["heatmaps"].shape == (2, 28, 28) and "heatmaps_layercam" in saved
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert main(["explain", "--checkpoint", str(breast_resnet), "--images", str(files[0]), str(tmp_path / "scan9.png"),
                 "--output-dir", str(tmp_path / "y"), "--tracking-uri", store]) == 2
    assert capsys.readouterr().err == f"medmamba explain: error: --images: no such file: {tmp_path / 'scan9.png'}\n"
    assert not (tmp_path / "mlruns.db").exists()  # checked before any MLflow run opened


def _quadrant_images(root: Path, count: int, size: int = 64, patch: int = 28) -> None:
    """Grey images with one bright square whose quadrant is the class (the square's corner in
    the file name): nothing but where the patch lies tells the classes apart."""
    rng = np.random.default_rng(0)
    names = ["top_left", "top_right", "bottom_left", "bottom_right"]
    for i in range(count):
        q = i % 4
        image = np.clip(rng.normal(0.25, 0.05, (size, size)), 0, 1)
        x = rng.integers(0, size // 2 - patch + 1) + size // 2 * (q % 2)
        y = rng.integers(0, size // 2 - patch + 1) + size // 2 * (q // 2)
        image[y:y + patch, x:x + patch] = 1.0
        (root / names[q]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / names[q] / f"{i:04d}_{x}_{y}.png")


@pytest.mark.integration
def test_gradcam_peaks_inside_the_patch_that_decides_the_class(tmp_path):
    """MedMamba-T trained on quadrant images: the default layer's Grad-CAM and Grad-CAM++ peaks
    lie inside the bright square on at least 80% of the test images (95% and 98% measured after
    3 epochs; 93% and 94% after 5)."""
    _quadrant_images(tmp_path / "data", 320)
    assert main(["train", "--set", "data.name=folder", "--set", f"data.root={tmp_path / 'data'}",
                 "--set", "data.size=64", "--set", "train.epochs=3", "--set", "train.batch_size=32",
                 "--set", "train.monitor=loss", "--set", "sched.milestones=[100]",
                 "--output-dir", str(tmp_path / "run"), "--no-mlflow"]) == 0
    loaded = load_checkpoint(tmp_path / "run" / "best.pt")
    test = loaded.data.test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = [label for _, label in test.samples]
    assert default_target_layer(loaded.model, 64) == "stages.1"  # 4 x 4 at 64 px; stages 2-3 are 2 x 2
    for method in ("gradcam", "gradcam++"):
        maps = heatmaps(loaded.model, images, labels, method)
        inside = 0
        for (path, _), heatmap in zip(test.samples, maps):
            x, y = map(int, path.stem.split("_")[1:])
            row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
            inside += y <= row < y + 28 and x <= col < x + 28
        assert inside / len(test) >= 0.8, (method, inside, len(test))


# ------------------------------------------------------------------------------------ embed
@pytest.mark.integration
def test_embed_projects_the_features_and_logs_their_silhouette(breast_medmamba, medmnist_root, tmp_path, store,
                                                               capsys):
    from sklearn.metrics import silhouette_score

    from medmamba.data import make_loader
    from medmamba.embed import features

    out = tmp_path / "embed"
    assert main(["embed", "--checkpoint", str(breast_medmamba), "--output-dir", str(out),
                 "--data-root", str(medmnist_root), "--tracking-uri", store]) == 0
    rows = list(csv.DictReader((out / "embedding.csv").open()))
    assert len(rows) == 156 and {r["class"] for r in rows} == {"malignant", "normal, benign"}
    assert all(np.isfinite(float(r["tsne_x"])) and np.isfinite(float(r["tsne_y"])) for r in rows)
    loaded = load_checkpoint(breast_medmamba, {"root": str(medmnist_root)})
    feats, labels = features(loaded.model, make_loader(loaded.data.test, 64, shuffle=False), loaded.device)
    assert feats.shape == (156, 768)  # MedMamba-T's pooled features, before the head
    expected = silhouette_score(feats, labels)
    assert [int(r["label"]) for r in rows] == labels.tolist()
    (run,) = _runs(store, "embed")
    assert run.data.metrics["silhouette"] == pytest.approx(expected, abs=1e-5)
    assert f"{expected:.4f}" in capsys.readouterr().out
    report = _report(store, tmp_path / "report")
    assert "### Feature embeddings" in report
    assert f"| medmamba_t | breastmnist | {run.data.metrics['silhouette']:.3f} (1) |" in report


@pytest.mark.integration
def test_embed_by_site_colours_a_federations_sites(breast_medmamba, medmnist_root, tmp_path):
    """A federated checkpoint (natural sites: one image folder per hospital) is embedded per site."""
    loaded = load_checkpoint(breast_medmamba, {"root": str(medmnist_root)})
    test = loaded.data.test
    for i in range(60):
        image, label = test[i]
        folder = tmp_path / "sites" / ("hospital_a" if i % 3 else "hospital_b") / loaded.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image[0] * 0.5 + 0.5) * 255).round().byte().numpy()).save(folder / f"{i}.png")
    state = torch.load(breast_medmamba, weights_only=True)
    state["config"]["data"].update(name="folder", root=str(tmp_path / "sites"))
    state["config"]["federated"]["partition"] = "natural"
    torch.save(state, tmp_path / "trained.pt")
    assert main(["embed", "--checkpoint", str(tmp_path / "trained.pt"), "--by-site", "--output-dir",
                 str(tmp_path / "x"), "--no-mlflow"]) == 2  # was embedded as sites its config never had
    state["round"] = 3  # as a federation's best.pt holds it
    torch.save(state, tmp_path / "federated.pt")
    assert main(["embed", "--checkpoint", str(tmp_path / "federated.pt"), "--by-site", "--split", "all",
                 "--output-dir", str(tmp_path / "e"), "--no-mlflow"]) == 0
    rows = list(csv.DictReader((tmp_path / "e" / "embedding.csv").open()))
    assert {r["group"]: 0 for r in rows}.keys() == {"hospital_a", "hospital_b"}
    assert sum(r["group"] == "hospital_a" for r in rows) == 40 and len(rows) == 60


@pytest.mark.integration
def test_embed_and_robustness_take_a_timm_resnet(breast_resnet, medmnist_root, tmp_path):
    base = ["--checkpoint", str(breast_resnet), "--data-root", str(medmnist_root), "--no-mlflow"]
    assert main(["embed", *base, "--output-dir", str(tmp_path / "e"), "--max-images", "60"]) == 0
    assert len(list(csv.DictReader((tmp_path / "e" / "embedding.csv").open()))) == 60
    assert main(["robustness", *base, "--output-dir", str(tmp_path / "r"), "--perturbation", "jpeg",
                 "--perturbation", "scaling", "--severity", "5"]) == 0
    rows = list(csv.DictReader((tmp_path / "r" / "robustness.csv").open()))
    assert [(r["perturbation"], r["severity"], r["level"]) for r in rows] == [  # with the clean baseline
        ("jpeg", "0", "0"), ("jpeg", "5", "10"), ("scaling", "0", "0"), ("scaling", "5", "0.5")]
    assert rows[0]["auc"] == rows[2]["auc"]  # severity 0 is evaluated once
    summary = list(csv.DictReader((tmp_path / "r" / "robustness_summary.csv").open()))
    assert [float(r["auc_drop"]) for r in summary] == pytest.approx(
        [float(rows[0]["auc"]) - float(rows[1]["auc"]), float(rows[2]["auc"]) - float(rows[3]["auc"])])


def test_umap_projects_when_umap_learn_is_installed_and_says_how_to_get_it_otherwise(monkeypatch):
    import sys

    from medmamba.embed import project

    points = np.random.default_rng(0).normal(size=(40, 8))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
        with pytest.raises(ConfigError, match="pip install umap-learn"):
            project(points, "umap")
    pytest.importorskip("umap")
    assert project(points, "umap").shape == (40, 2)


def test_features_of_a_model_without_a_feature_api_is_a_clear_error():
    from medmamba.embed import features

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(CheckpointError, match="no forward_features/forward_head"):
        features(model, [(torch.zeros(1, 3, 2, 2), torch.zeros(1))], torch.device("cpu"))


def test_medmamba_pre_logits_are_the_pooled_features():
    model = create_model("medmamba_t", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, 768)
        torch.testing.assert_close(model.head(feats), model(x))


# ------------------------------------------------------------------------------------ robustness
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_grows_with_severity_and_repeats_with_its_seed(name, medmnist_root):
    from medmamba.config import DataConfig
    from medmamba.data import build_datasets

    test = torch.utils.data.Subset(build_datasets(DataConfig(name="breastmnist", root=str(medmnist_root))).test,
                                   range(24))
    clean = torch.stack([x for x, _ in test])
    errors = []
    for severity in (1, 3, 5):
        perturbed = torch.stack([x for x, _ in Perturbed(test, name, severity, seed=0)])
        assert perturbed.shape == clean.shape and perturbed.min() >= -1 and perturbed.max() <= 1
        errors.append(float((perturbed - clean).abs().mean()))
    assert 0 < errors[0] < errors[1] < errors[2], errors
    again = torch.stack([x for x, _ in Perturbed(test, name, 5, seed=0)])
    torch.testing.assert_close(again, perturbed, rtol=0, atol=0)


@pytest.mark.integration
def test_robustness_severity_zero_is_evaluate_and_the_table_is_complete(breast_medmamba, medmnist_root, tmp_path,
                                                                         store):
    out = tmp_path / "rob"
    args = ["robustness", "--checkpoint", str(breast_medmamba), "--output-dir", str(out),
            "--data-root", str(medmnist_root)]
    assert main([*args, "--tracking-uri", store]) == 0
    assert main(["evaluate", "--checkpoint", str(breast_medmamba), "--output-dir", str(tmp_path / "ev"),
                 "--data-root", str(medmnist_root), "--no-mlflow"]) == 0
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert len(rows) == len(PERTURBATIONS) * 6
    scalar = [k for k, v in evaluated.items() if isinstance(v, (int, float))]
    assert set(scalar) <= set(rows[0]) and list(rows[0])[:2] == ["perturbation", "severity"]
    for row in (r for r in rows if r["severity"] == "0"):
        assert {k: float(row[k]) for k in scalar} == pytest.approx({k: evaluated[k] for k in scalar}, abs=1e-12)
    summary = {r["perturbation"]: r for r in csv.DictReader((out / "robustness_summary.csv").open())}
    worst = {r["perturbation"]: r for r in rows if r["severity"] == "5"}
    for name, row in summary.items():
        assert float(row["auc_drop"]) == pytest.approx(evaluated["auc"] - float(worst[name]["auc"]))
    # the same seed gives the same table; the run holds each curve by severity
    assert main([*args, "--output-dir", str(tmp_path / "again"), "--perturbation", "rotation",
                 "--perturbation", "gaussian_noise", "--severity", "5", "--no-mlflow"]) == 0
    again = list(csv.DictReader((tmp_path / "again" / "robustness.csv").open()))
    clean = {r["perturbation"]: r for r in rows if r["severity"] == "0"}  # always evaluated: the drops' base
    assert again == [clean["rotation"], worst["rotation"], clean["gaussian_noise"], worst["gaussian_noise"]]
    (run,) = _runs(store, "robustness")
    history = MlflowClient(store).get_metric_history(run.info.run_id, "rotation/auc")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]
    assert run.data.metrics["drop/rotation_auc"] == pytest.approx(float(summary["rotation"]["auc_drop"]))
    report = _report(store, tmp_path / "report").split("### Robustness: AUC drop")[1].split("###")[0]
    header, _, row = [line for line in report.splitlines() if line.startswith("|")]
    assert header.startswith("| model | dataset | blur | brightness |")
    assert row.startswith("| medmamba_t | breastmnist |")
    columns = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert columns["rotation"] == f"{float(summary['rotation']['auc_drop']):.3f} (1)"


# ------------------------------------------------------------------------------------ another dataset
def _external_folder(root: Path, medmnist_root, counts: dict[str, tuple[int, int]]) -> list[tuple[np.ndarray, int]]:
    """An image folder of BreastMNIST test images under other class names: ``counts`` maps a
    folder name to (label taken from, number of images). Returns each written (image, label)."""
    data = np.load(medmnist_root / "breastmnist.npz")
    images, labels = data["test_images"], data["test_labels"].ravel()
    written, used = [], set()
    for folder, (label, n) in counts.items():
        (root / folder).mkdir(parents=True)
        picks = [i for i in np.flatnonzero(labels == label) if i not in used][:n]
        used.update(picks)
        for i in picks:
            Image.fromarray(images[i]).save(root / folder / f"{i}.png")
            written.append((images[i], label))
    return written


@pytest.mark.integration
def test_a_model_is_evaluated_on_another_hospitals_folder_with_a_class_map(breast_medmamba, medmnist_root,
                                                                           tmp_path, store, capsys):
    from medmamba.metrics import classification_metrics

    written = _external_folder(tmp_path / "hospital_b", medmnist_root,
                               {"Benign": (1, 40), "Malignant": (0, 30), "Unclear": (0, 12)})
    assert main(["evaluate", "--checkpoint", str(breast_medmamba), "--dataset", "folder",
                 "--data-root", str(tmp_path / "hospital_b"),
                 "--class-map", "Benign=normal, benign,Malignant=malignant",
                 "--split", "all", "--output-dir", str(tmp_path / "ev"), "--tracking-uri", store]) == 0
    assert "Unclear 12 images" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["unmapped_images"] == {"Unclear": 12}
    assert sum(map(sum, metrics["confusion_matrix"])) == 70
    # the same pixels through the model directly: identical metrics, malignant the positive class
    mapped = written[:70]
    loaded = load_checkpoint(breast_medmamba, {"root": str(medmnist_root)})
    x = torch.tensor(np.stack([img for img, _ in mapped]), dtype=torch.float32).div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(x[:, None].expand(-1, 3, -1, -1)), 1).numpy()
    expected = classification_metrics(np.array([y for _, y in mapped]), probs,
                                      class_names=["malignant", "normal, benign"], positive_class=0)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    (run,) = _runs(store, "evaluate")
    tags = run.data.tags
    assert tags["dataset"] == "folder:hospital_b" and tags["trained_on"] == "breastmnist"
    assert tags["class_map"] == "Benign=normal, benign,Malignant=malignant"
    assert tags["source_run_id"] == torch.load(breast_medmamba, weights_only=True)["run_id"]
    assert run.data.metrics["all_auc"] == pytest.approx(expected["auc"])
    report = _report(store, tmp_path / "report")
    assert "folder:hospital_b (trained on breastmnist) AUC" in report

    # a model class without images is reported, not a crash
    _external_folder(tmp_path / "only_normal", medmnist_root, {"Benign": (1, 10), "Other": (0, 5)})
    assert main(["evaluate", "--checkpoint", str(breast_medmamba), "--dataset", "folder", "--data-root",
                 str(tmp_path / "only_normal"), "--class-map", "Benign=normal, benign", "--split", "all",
                 "--output-dir", str(tmp_path / "ev2"), "--no-mlflow"]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["classes_without_images"] == ["malignant"]
    assert "model classes without images here: malignant" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ bad input
def test_class_maps_are_parsed_and_bad_ones_refused():
    assert parse_class_map("NORMAL=normal, PNEUMONIA=pneumonia,") == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    assert parse_class_map("Benign=normal, benign,Cancer=malignant") == {"Benign": "normal, benign",
                                                                          "Cancer": "malignant"}
    for text in ("", "NORMAL", "NORMAL=", "=normal", "a=b,=d"):
        with pytest.raises(ConfigError, match="SRC=DST"):
            parse_class_map(text)
    with pytest.raises(ConfigError, match="'CXR' is mapped twice; map each source class once"):
        parse_class_map("CXR=CXR,CXR=Hand")  # the last pair won, unsaid


@pytest.mark.integration
def test_bad_analysis_inputs_are_one_line_errors(breast_resnet, medmnist_root, tmp_path, capsys):
    folder = tmp_path / "ext"
    for name in ("Benign", "Malignant"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 50 * i, np.uint8)).save(folder / name / f"{i}.png")
    base = ["--checkpoint", str(breast_resnet), "--output-dir", str(tmp_path / "o"), "--no-mlflow",
            "--data-root", str(medmnist_root)]
    external = ["--checkpoint", str(breast_resnet), "--output-dir", str(tmp_path / "o"), "--no-mlflow",
                "--dataset", "folder", "--data-root", str(folder), "--split", "all"]
    cases = [
        (["robustness", *base, "--perturbation", "fog"], "unknown perturbation 'fog'"),
        (["robustness", *base, "--severity", "7"], "severity 7 is out of range"),
        (["explain", *base, "--method", "gradcam3"], "unknown CAM method 'gradcam3'"),
        (["explain", *base, "--target-layer", "layer9"], "no layer 'layer9'; did you mean"),
        (["embed", *base, "--method", "pca"], "unknown projection 'pca'"),
        (["evaluate", *external, "--class-map", "Benign"], "not a pair"),
        (["evaluate", *external, "--class-map", "Cancer=malignant"], "the class map names ['Cancer']"),
        (["evaluate", *external, "--class-map", "Malignant=tumour"], "maps onto ['tumour']"),
        (["evaluate", *external], "(map them onto the model's classes with --class-map"),
        (["evaluate", *base, "--class-map", "a=b"], "breastmnist is not a folder"),
        (["evaluate", *base, "--dataset", "pneumoniamnist"],
         "the model's classes are ['malignant', 'normal, benign'] and pneumoniamnist's are ['normal', 'pneumonia']"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    for args, message in [(["explain", *base, "--num-images", "0"], "argument --num-images: must be at least 1, got 0"),
                          (["evaluate", *base, "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
                          (["embed", *base, "--max-images", "-1"], "argument --max-images: must be at least 1, got -1")]:
        with pytest.raises(SystemExit) as exit_:  # argparse's own errors, before any data is read
            main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
    # a class name with a comma maps; the external set then evaluates
    assert main(["evaluate", *external, "--class-map", "Malignant=malignant,Benign=normal, benign"]) == 0
