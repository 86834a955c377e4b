"""Experiment matrices on a real Ray cluster, and `medmamba report` over their MLflow runs."""
from __future__ import annotations

import csv
import json
import math
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import child_runs, start_medmamba
from medmamba.cli import main
from medmamba.comparison import (Cell, ReportError, Result, aggregate, details, published, read_results, table6,
                                 unified_metrics)
from medmamba.config import load_config
from medmamba.errors import ConfigError, DataError
from medmamba.orchestrator.matrix import cell_name, cells, run_matrix

ROOT = Path(__file__).resolve().parents[1]


def test_a_matrix_is_the_cross_product_of_its_axes_checked_before_anything_runs():
    cfg = load_config(ROOT / "configs/matrix_quick.yaml")
    grid = cells(cfg)
    assert grid == [{"model.name": m, "train.seed": s} for m in ("medmamba_t", "resnet18") for s in (0, 1)]
    assert cell_name(grid[1]) == "model.name=medmamba_t,train.seed=1"
    assert len(cells(load_config(ROOT / "configs/matrix_paper_medmnist.yaml"))) == 5 * 10 * 3
    with pytest.raises(ConfigError, match="matrix cell model.name=medmamba_t,train.seed=0,optim.name=adagrad: config key optim.name"):
        cells(load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.optim.name=[adam,adagrad]"]))
    with pytest.raises(ConfigError, match="unknown model 'resnet_18'"):
        cells(load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.model.name=[resnet_18]"]))
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrate'"):
        load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.optim.lrate=[0.1]"])
    with pytest.raises(ConfigError, match="a matrix axis is a non-empty list"):
        load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.train.seed=3"])
    with pytest.raises(ConfigError, match="a matrix axis lists each value once; 1 is repeated"):
        load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.train.seed=[0, 1, 1]"])  # not 2 replicates of seed 1
    with pytest.raises(ConfigError, match="no matrix section"):
        cells(load_config(ROOT / "configs/quick.yaml"))


def test_a_list_valued_axis_is_plain_config_values_named_and_grouped():
    from medmamba.orchestrator.matrix import cell_config, summarise

    cfg = load_config(ROOT / "configs/matrix_quick.yaml", ["matrix.sched.milestones=[[1], [2, 3]]", "train.epochs=4"])
    grid = cells(cfg)  # milestones in epochs, as the config key takes them (a sweep searches fractions)
    assert cell_config(cfg, grid[1]).sched.milestones == [2, 3]
    assert cell_name(grid[1]) == "model.name=medmamba_t,train.seed=0,sched.milestones=2-3"
    rows = [{**params, "status": "done", "test_auc": 0.5 + 0.1 * params["train.seed"]} for params in grid]
    summary = summarise(rows, list(cfg.matrix))
    assert [(r["model.name"], r["sched.milestones"], r["finished"]) for r in summary] == [
        ("medmamba_t", [1], 2), ("medmamba_t", [2, 3], 2), ("resnet18", [1], 2), ("resnet18", [2, 3], 2)]
    assert summary[1]["auc_mean"] == pytest.approx(0.55)


def test_metric_names_are_unified_across_run_kinds():
    assert unified_metrics({"test_auc": 0.9, "val_auc": 0.8, "global/accuracy": 0.7, "global/f1_macro": 0.5,
                            "test_loss": float("nan"), "best_val_auc": 1.0}) == \
        {"auc": 0.9, "accuracy": 0.7, "f1_macro": 0.5}


def test_table_6_marks_the_best_of_each_column_and_published_rows_keep_their_source():
    cells_ = {("medmamba_t", "breastmnist", "28", "auc"): Cell([0.8, 0.9], ["a", "b"]),
              ("resnet18", "breastmnist", "28", "auc"): Cell([0.88], ["c"]),
              ("resnet18", "breastmnist", "28", "accuracy"): Cell([0.8], ["c"])}
    table = table6(cells_, {"28"})
    assert table.header == ["model", "breastmnist AUC", "breastmnist OA"]
    assert table.rows == [["medmamba_t", "0.850 ± 0.071 (2)", "–"], ["resnet18", "0.880 (1)", "0.800 (1)"]]
    assert table.bold == {(1, 1), (1, 2)} and "**0.880 (1)**" in table.markdown()
    assert r"\textbf{0.880 (1)}" in table.latex() and r"0.850 $\pm$ 0.071 (2)" in table.latex()
    rows = published()
    r18 = [r for r in rows if (r["model"], r["dataset"], r["size"], r["metric"]) == ("resnet18", "breastmnist", "28", "auc")]
    assert [r["value"] for r in r18] == [0.901] and "MedMNIST v2" in r18[0]["source"]
    assert {r["table"] for r in rows} == {"Table 6", "Tables 3-5", "Table 7"}


def test_the_details_table_shows_a_binary_tasks_positive_class_and_macro_metrics_otherwise():
    """Macro Se and Sp of a binary task are both the balanced accuracy: its table shows the class tagged
    by the runs (MedMNIST's binary sets by name for runs logged before the tag)."""
    metrics = {"precision": 0.6, "sensitivity": 0.5, "specificity": 0.9, "f1": 0.55, "precision_macro": 0.7,
               "sensitivity_macro": 0.7, "specificity_macro": 0.7, "f1_macro": 0.7, "accuracy": 0.8, "auc": 0.85}
    results = [Result("a", "medmamba_t", "hospital", "28", "train", metrics, tags={"positive_class": "tumour"}),
               Result("b", "medmamba_t", "breastmnist", "28", "train", metrics),
               Result("c", "medmamba_t", "pathmnist", "28", "train", metrics)]
    scores = aggregate(results)
    hospital, breast, path = (details(scores, results, d, {"28"}) for d in ("hospital", "breastmnist", "pathmnist"))
    assert "of class 'tumour'" in hospital.title and "of class 'malignant'" in breast.title
    assert hospital.rows[0][3:] == breast.rows[0][3:] == [f"{v:.3f} (1)" for v in (0.6, 0.5, 0.9, 0.55, 0.8, 0.85)]
    assert "macro P, Se, Sp and F1" in path.title
    assert path.rows[0][3:7] == ["0.700 (1)"] * 4
    mixed = results[:1] + [Result("d", "medmamba_t", "hospital", "28", "train", metrics, tags={"positive_class": "cyst"})]
    table = details(aggregate(mixed), mixed, "hospital", {"28"})
    assert "macro P, Se, Sp and F1 (its runs name different positive classes: cyst, tumour)" in table.title
    assert table.rows[0][3:7] == ["0.700 ± 0.000 (2)"] * 4


def test_cells_whose_data_cannot_load_stop_the_matrix_before_any_cell_starts(ray_cluster, medmnist_root, tmp_path):
    """Before: the data.size=29 cells failed one by one after the others had trained (148 s); now 18 s."""
    cfg = load_config(ROOT / "configs/matrix_quick.yaml", [f"data.root={medmnist_root}", "matrix.data.size=[28, 29]",
                                                          "mlflow.enabled=false"])
    with pytest.raises(DataError, match=r"MedMNIST has sizes \(28, 64, 128, 224\); data.size is 29"):
        run_matrix(cfg, tmp_path / "matrix")
    assert not (tmp_path / "matrix/ray").exists()


def test_a_matrix_survives_a_killed_driver_and_a_failing_cell_then_reports(mlflow_uri, ray_cluster, medmnist_root,
                                                                           tmp_path, capsys):
    """4 cells (MedMamba-T with 2 seeds, and ConvNeXt-T, which cannot run at 28 px); the driver is
    killed once a cell finished; --resume trains only what is left; the failed cells are reported
    and do not stop the others; `medmamba report` then tabulates the MLflow runs."""
    out = tmp_path / "matrix"
    args = ["matrix", "--config", str(ROOT / "configs/matrix_quick.yaml"), "--set", f"data.root={medmnist_root}",
            "--set", "train.epochs=1", "--set", "matrix.model.name=[medmamba_t,convnext_tiny]",
            "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = start_medmamba(args, env=ray_cluster["env"])
    def killable() -> bool:  # a cell finished, and (most often) another one started
        started = {p.parent for p in out.glob("cells/*/mlflow_run.json")}
        finished = {p.parent for p in out.glob("cells/*/cell.json")}
        return bool(finished) and (bool(started - finished) or time.time() > deadline - 240)

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not killable():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    assert finished, "no cell finished before the kill"

    assert main(args + ["--resume"]) == 1  # the two ConvNeXt cells fail at 28 px
    printed = capsys.readouterr().out
    assert "failed cell: model.name=convnext_tiny, train.seed=0: " in printed and "it runs at 32 px" in printed
    assert "2 of 4 cells finished" in printed
    for name, mtime in finished.items():  # finished cells were not trained again
        assert (out / "cells" / name / "cell.json").stat().st_mtime_ns == mtime
    with open(out / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.name"], r["train.seed"], r["status"]) for r in rows] == [
        ("medmamba_t", "0", "done"), ("medmamba_t", "1", "done"),
        ("convnext_tiny", "0", "failed"), ("convnext_tiny", "1", "failed")]

    client = MlflowClient(mlflow_uri)
    parent_id = json.loads((out / "matrix.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cells_failed"] == "2"
    assert parent.data.tags["cells_unfinished"] == "0"
    children = child_runs(client, parent_id)
    assert sorted(c.data.tags["matrix_cell"] for c in children) == sorted(cell_name(
        {"model.name": "medmamba_t", "train.seed": s}) for s in (0, 1))  # one run per trained cell, none twice
    assert all(c.info.status == "FINISHED" and c.data.tags["model.name"] == "medmamba_t" for c in children)
    nested, _ = read_results(client, [], parent_run_id=parent_id)  # in the parent's experiment
    assert sorted(r.run_id for r in nested) == sorted(c.info.run_id for c in children)
    aucs = [c.data.metrics["test_auc"] for c in children]
    assert parent.data.metrics["medmamba_t/test_auc_mean"] == pytest.approx(statistics.fmean(aucs))
    assert parent.data.metrics["medmamba_t/test_auc_std"] == pytest.approx(statistics.stdev(aucs))
    with pytest.raises(ConfigError, match="already holds a matrix"):  # never overwritten silently
        run_matrix(load_config(ROOT / "configs/matrix_quick.yaml", [f"data.root={medmnist_root}"]), out)
    with pytest.raises(ConfigError, match=r"matrix.json was made with another config: optim.lr=0.01 \(was 0.001\)"):
        run_matrix(load_config(ROOT / "configs/matrix_quick.yaml", [f"data.root={medmnist_root}", "train.epochs=1",
                                                                  "optim.lr=0.01"]), out, resume=True)

    # the report: every number equals the runs' own metrics read back with MlflowClient
    assert main(["report", "--tracking-uri", mlflow_uri, "--experiment", "medmamba-matrix",
                 "--output-dir", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv") as f:
        report = {(r["model"], r["dataset"], r["size"], r["metric"]): r for r in csv.DictReader(f)}
    for metric in ("auc", "accuracy", "f1_macro", "sensitivity"):
        row = report[("medmamba_t", "breastmnist", "28", metric)]
        values = [c.data.metrics[f"test_{metric}"] for c in children]
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values)) and row["n"] == "2"
        assert set(row["run_ids"].split()) == {c.info.run_id for c in children}
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "breastmnist AUC" in markdown and "medmamba_t" in markdown and "2 runs finished with test metrics" in markdown
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    assert (tmp_path / "report" / "report.tex").read_text().count(r"\begin{tabular}") >= 2
    (report_run,) = client.search_runs([client.get_experiment_by_name("medmamba-reports").experiment_id])
    assert report_run.data.tags["kind"] == "report"
    assert {"report.html", "report.csv", "report.md"} <= {a.path for a in client.list_artifacts(report_run.info.run_id)}

    # a report over nothing, or over an unknown experiment, says so
    with pytest.raises(ReportError, match=r"no MLflow experiment named 'nope' \(experiments: .*medmamba-matrix"):
        read_results(client, ["nope"])
    with pytest.raises(ReportError, match="nothing to report in medmamba-reports: 0 runs selected"):
        read_results(client, ["medmamba-reports"])


def _logged_runs(uri: str) -> MlflowClient:
    """Finished runs as training logs them (params, tags, test metrics), without training."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("logged")
    for model, seed, auc, accuracy, params, gflops in (("medmamba_t", 0, 0.80, 0.81, 14_456_453, 0.04),
                                                        ("medmamba_t", 1, 0.84, 0.83, 14_456_453, 0.04),
                                                        ("resnet18", 0, 0.90, 0.85, 11_169_858, 0.56)):
        run = client.create_run(experiment, tags={"model": model, "parameters": str(params), "gflops": str(gflops)})
        for key, value in (("model.name", model), ("data.name", "breastmnist"), ("data.size", "28"),
                           ("train.seed", str(seed))):
            client.log_param(run.info.run_id, key, value)
        for key, value in (("test_auc", auc), ("test_accuracy", accuracy), ("val_auc", 0.5)):
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    client.create_run(experiment, tags={"model": "resnet50"})  # still running: left out, counted
    return client


def test_the_report_compares_with_published_rows_and_renders_in_a_browser(mlflow_uri, tmp_path):
    import shutil

    _logged_runs(mlflow_uri)
    out = tmp_path / "report"
    assert main(["report", "--tracking-uri", mlflow_uri, "--experiment", "logged", "--output-dir", str(out),
                 "--no-mlflow"]) == 0
    markdown = (out / "report.md").read_text()
    assert "3 runs finished with test metrics; left out: 1 unfinished" in markdown
    assert "| medmamba_t | 0.820 ± 0.028 (2) | 0.820 ± 0.014 (2) |" in markdown
    assert "| resnet18 | **0.900 (1)** | **0.850 (1)** |" in markdown
    assert "| resnet18 | 11.17 | 0.56 |" in markdown  # parameters and GFLOPs from the runs' tags
    with open(out / "deltas.csv") as f:
        deltas = {(r["model"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(deltas[("resnet18", "auc")]["published"]) == 0.901  # MedMNIST v2's ResNet-18 (28)
    assert float(deltas[("resnet18", "auc")]["delta"]) == pytest.approx(0.90 - 0.901)
    assert float(deltas[("resnet18", "accuracy")]["delta"]) == pytest.approx(0.85 - 0.863)
    assert (out / "accuracy_vs_gflops.png").stat().st_size > 0
    page = (out / "report.html").read_text()  # numbers stay on one line (nowrap), a source's words wrap
    assert "<td>0.820 ± 0.028 (2)</td>" in page and "<td class='text'>MedMNIST v2 (Yang" in page
    assert "<th class=text>source</th>" in page and "<th>delta</th>" in page  # a header aligns as its column

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium) for the browser check")
    shot = tmp_path / "report.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           f"--screenshot={shot}", "--window-size=1200,1000", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "Failed to load" not in proc.stderr
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table>") == 3 and "<img" in dom  # Table 6, the dataset's table, the deltas; the plot
    measured = tmp_path / "measured.html"  # the page, plus a script that records how wide it lays out
    measured.write_text(page.replace("</body>", "<script>document.body.dataset.width = "
                                                "document.documentElement.scrollWidth</script></body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=600,800",
                          "--dump-dom", measured.as_uri()], capture_output=True, text=True, timeout=120).stdout
    width = int(dom.split('data-width="')[1].split('"')[0])
    assert width <= 600, f"the page is {width} px wide in a 600 px window"  # (its tables alone: 819 px)


def test_sweeps_and_federated_runs_get_their_own_summaries(mlflow_uri, tmp_path):
    from medmamba.comparison import federated_table, site_matrix_tables, sweep_table

    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("mixed")
    sweep = client.create_run(experiment, run_name="sweep-1", tags={
        "kind": "sweep", "best_trial": "t3", "best.optim.lr": "0.001", "best.optim.name": "adam"})
    fed = client.create_run(experiment, tags={"kind": "federated", "strategy": "fedbn", "partition": "natural"})
    loso = client.create_run(experiment, run_name="loso-c", tags={
        "kind": "federated", "strategy": "fedavg", "partition": "natural", "holdout_site": "hospital_c"})
    for run, metrics in ((sweep, {"best_val_auc": 0.91, "test_auc": 0.88, "test_accuracy": 0.8}),
                         (fed, {"global/auc": 0.70, "test_auc": 0.86, "site/hospital_a/test_auc": 0.9,
                                "site/hospital_b/test_auc": 0.75, "centralized/auc": 0.90}),
                         (loso, {"test_auc": 0.8, "privacy/epsilon": 3.25, "site_matrix/federated/hospital_a/auc": 0.7,
                                 "site_matrix/local/hospital_a/hospital_a/auc": 0.9,
                                 "site_matrix/local/hospital_a/hospital_b/auc": 0.6})):
        for key, value in (("model.name", "medmamba_t"), ("data.name", "pneumoniamnist"), ("data.size", "28")):
            client.log_param(run.info.run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    results, _ = read_results(client, ["mixed"])
    assert {r.run_id: r.metrics["auc"] for r in results} == {  # best.pt's test
        sweep.info.run_id: 0.88, fed.info.run_id: 0.86, loso.info.run_id: 0.8}
    assert sweep_table(results).rows == [["sweep-1", "medmamba_t", "pneumoniamnist", "t3",
                                          "optim.lr=0.001, optim.name=adam", "val_auc 0.910", "0.880", "0.800"]]
    assert federated_table(results).rows == [
        ["fedavg", "natural", "hospital_c", "pneumoniamnist", "medmamba_t", "1", "0.800", "–", "–", "–", "3.25"],
        ["fedbn", "natural", "–", "pneumoniamnist", "medmamba_t", "1", "0.860", "0.750 (hospital_b)", "0.900",
         "-0.040", "–"]]
    (matrix,) = site_matrix_tables(results)
    assert matrix.title.startswith("Federated run loso-c") and matrix.header == ["model", "hospital_a", "hospital_b"]
    assert matrix.rows == [["federated", "0.700", "–"], ["local/hospital_a", "0.900", "0.600"]]


def test_a_matrix_stopped_by_sigterm_ends_its_runs_killed(mlflow_uri, ray_cluster, medmnist_root, tmp_path):
    """SIGTERM to the matrix's driver once a cell has finished while another runs (a scheduler's stop):
    exit 143; the matrix's run and the cells Ray stopped end KILLED, none is left RUNNING (the
    cells' runs are opened in Ray workers, which Ray ends without a word); finished cells stay
    FINISHED."""
    out = tmp_path / "matrix"
    args = ["matrix", "--config", str(ROOT / "configs/matrix_quick.yaml"), "--set", f"data.root={medmnist_root}",
            "--set", "train.epochs=2", "--output-dir", str(out), "--tracking-uri", mlflow_uri]
    proc = start_medmamba(args, env=ray_cluster["env"], stderr=subprocess.PIPE, text=True)

    def cells_by_state() -> tuple[set[Path], set[Path]]:  # (finished, started and not finished)
        started = {p.parent for p in out.glob("cells/*/mlflow_run.json")}
        finished = {p.parent for p in out.glob("cells/*/cell.json")}
        return finished, started - finished

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not all(cells_by_state()):
        time.sleep(0.1)
    _, running = cells_by_state()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "medmamba matrix: terminated (SIGTERM)" in err, err[-3000:]
    client = MlflowClient(mlflow_uri)
    parent_id = json.loads((out / "matrix.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    finished, _ = cells_by_state()
    statuses = {c.info.run_id: c.info.status for c in child_runs(client, parent_id)}
    run_of = lambda cell: json.loads((cell / "mlflow_run.json").read_text())["run_id"]  # noqa: E731
    assert finished and running, "no cell had finished while another ran when the signal came"
    assert all(statuses[run_of(cell)] == "FINISHED" for cell in finished)
    assert all(statuses[run_of(cell)] == "KILLED" for cell in running - finished)
    assert "RUNNING" not in statuses.values(), statuses


def test_a_cell_that_errored_is_failed_and_one_the_stopped_matrix_never_ended_is_unfinished(tmp_path, capsys):
    from medmamba.orchestrator.matrix import _cell_row
    from medmamba.reports import print_table

    params = {"model.name": "resnet18", "train.seed": 0}
    failed = _cell_row(tmp_path, params, {cell_name(params): "ConfigError: it runs at 32 px"})
    assert (failed["status"], failed["error"]) == ("failed", "ConfigError: it runs at 32 px")
    unfinished = _cell_row(tmp_path, params, {})
    assert (unfinished["status"], unfinished["error"]) == ("unfinished", "did not finish")
    print_table([unfinished], "matrix", ["model.name", "status", "test_auc"])  # no metric: a dash, not nan
    assert "│ resnet18   │ unfinished │ –        │" in capsys.readouterr().out


def test_k_fold_as_a_matrix_over_data_fold_summarises_mean_and_std_over_the_folds():
    from medmamba.orchestrator.matrix import _metric_prefix, summarise

    rows = [{"data.fold": f, "status": "done", "test_auc": auc, "test_accuracy": 0.8}
            for f, auc in enumerate((0.9, 0.8, 0.7))] + [{"data.fold": 3, "status": "failed"}]
    (summary,) = summarise(rows, ["data.fold"])
    assert summary["cells"] == 4 and summary["finished"] == 3
    assert summary["auc_mean"] == pytest.approx(0.8) and summary["auc_std"] == pytest.approx(0.1)
    assert _metric_prefix({}) == ""  # logged as test_auc_mean, test_auc_std on the matrix's run
    by_model = summarise([{"model.name": "a", "train.seed": 0, "status": "done", "test_auc": 0.5}], ["model.name", "train.seed"])
    assert math.isnan(by_model[0]["auc_std"]) and _metric_prefix({"model.name": "a"}) == "a/"


def test_an_evaluation_on_another_dataset_is_a_cross_dataset_row(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    trained = client.create_run(client.create_experiment("train"), tags={"parameters": "14456453", "gflops": "0.04"})
    for key, value in (("model.name", "medmamba_s"), ("data.name", "pneumoniamnist"), ("data.size", "28")):
        client.log_param(trained.info.run_id, key, value)
    client.set_terminated(trained.info.run_id)
    evaluations = client.create_experiment("medmamba-evaluate")
    for dataset, auc in (("cpn_xray", 0.98), ("pneumoniamnist", 0.95)):
        run = client.create_run(evaluations, tags={"source_run_id": trained.info.run_id, "dataset": dataset,
                                                   "model": "medmamba_s"})
        client.log_param(run.info.run_id, "split", "test")
        client.log_metric(run.info.run_id, "test_auc", auc)
        client.set_terminated(run.info.run_id)
    results, _ = read_results(client, ["medmamba-evaluate"])
    assert sorted((r.dataset, r.model, r.size, r.kind, r.metrics["auc"], r.params) for r in results) == [
        ("cpn_xray (trained on pneumoniamnist)", "medmamba_s", "28", "evaluate", 0.98, 14456453.0),
        ("pneumoniamnist", "medmamba_s", "28", "evaluate", 0.95, 14456453.0)]


def test_report_selections_that_name_nothing_are_one_line_errors(mlflow_uri, tmp_path, capsys):
    client = _logged_runs(mlflow_uri)
    experiment = client.get_experiment_by_name("logged").experiment_id
    bare = client.create_run(experiment)  # finished, but no test metrics: left out and counted
    client.log_metric(bare.info.run_id, "val_auc", 0.7)
    client.set_terminated(bare.info.run_id)
    _, counts = read_results(client, ["logged"])
    assert counts == {"selected": 5, "unfinished": 1, "without_metrics": 1}
    capsys.readouterr()  # (MLflow's messages while the store was made)
    for args, message in ((["--experiment", "logged", "--tag", "model"], "--tag 'model' is not KEY=VALUE"),
                          ([], "say which runs to report: --experiment NAME, --run-id ID and/or --parent-run ID"),
                          (["--parent-run", "0f" * 16], f"--parent-run {'0f' * 16}: no such MLflow run in sqlite:"),
                          (["--experiment", "logged", "--parent-run", "0f" * 16], f"--parent-run {'0f' * 16}: no such"),
                          (["--run-id", "0f" * 16], f"--run-id {'0f' * 16}: no such MLflow run in sqlite:"),
                          (["--experiment", "logged", "--tag", "model=vit"], "nothing to report in logged: 0 runs")):
        assert main(["report", "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / "r"), "--no-mlflow", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
