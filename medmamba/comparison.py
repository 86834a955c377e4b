"""``medmamba report``: paper-style comparison tables and plots from runs in MLflow.

Runs of every kind are read under the metric names of metrics.json: a training run's (or a
sweep's best trial's, or ``medmamba evaluate``'s) ``test_auc`` and a federated run's final
``global/auc`` are both ``auc``. An evaluation on another dataset than the checkpoint was
trained on is a row of its own, "Y (trained on X)". ``medmamba embed`` and ``robustness`` runs
add tables of their silhouette scores and drops under perturbation.
Runs are read as they were logged; nothing in MLflow is rewritten. Runs that differ only in
seed or fold (same model, dataset and image size) are aggregated: mean, sample standard
deviation (n - 1; 0 for one run) and count, with the ids of the runs behind every number.
Published results (``published.csv``: the MedMamba paper's Tables 3-7 and MedMNIST v2's ResNet
rows, each row with its source) give the deltas a reproduction is judged by.
"""
from __future__ import annotations

import base64
import csv
import html
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .data import MEDMNIST_POSITIVE
from .errors import MedMambaError
from .metrics import MACRO_KEYS, METRIC_KEYS
from .reports import MISSING, write_csv

PUBLISHED = Path(__file__).with_name("published.csv")
METRICS = METRIC_KEYS + MACRO_KEYS
TABLE6 = (("auc", "AUC"), ("accuracy", "OA"))
# Tables 3-5: the paper's P, Se, Sp and F1 are macro averages over classes. For a binary task the
# macro Se and Sp are both the balanced accuracy, so there the table shows the positive class's.
DETAILS = (("precision_macro", "P"), ("sensitivity_macro", "Se"), ("specificity_macro", "Sp"),
           ("f1_macro", "F1"), ("accuracy", "OA"), ("auc", "AUC"))
BINARY_DETAILS = (("precision", "P"), ("sensitivity", "Se"), ("specificity", "Sp"), ("f1", "F1")) + DETAILS[4:]
SKIPPED_KINDS = ("matrix", "report", "explain")  # runs that summarise others, or hold images, not numbers
ROBUSTNESS_DROP = "drop/"  # `medmamba robustness` logs drop/<perturbation>_<metric>
SITE_MATRIX = "site_matrix/"  # a federated run logs site_matrix/<model>/<tested at site>/<metric>


class ReportError(MedMambaError):
    """Nothing to report, or a selection that names nothing."""


@dataclass
class Result:
    """The unified test metrics of one run."""
    run_id: str
    model: str
    dataset: str
    size: str
    kind: str
    metrics: dict[str, float]
    params: float | None = None  # parameters, as tagged by the training run
    gflops: float | None = None  # conv + linear GFLOPs, as tagged by the training run
    name: str = ""  # the MLflow run name
    tags: dict[str, str] = field(default_factory=dict)
    logged: dict[str, float] = field(default_factory=dict)  # every metric as logged (last values)


@dataclass
class Cell:
    """One (model, dataset, size, metric) over its runs."""
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); NaN for one run, which has none."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def text(self) -> str:
        return mean_std(self.mean, self.std, len(self.values))


def runs_text(n: int) -> str:
    """"1 run", "2 runs"."""
    return f"{n} run" + ("" if n == 1 else "s")


def mean_std(mean: float, std: float, n: int) -> str:
    """"0.850 ± 0.071 (2)"; one run: "0.880 (1)"."""
    return f"{mean:.3f} ± {std:.3f} ({n})" if n > 1 else f"{mean:.3f} ({n})"


def unified_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's test metrics under metrics.json's names, whatever kind of run logged them. A
    federated run's ``test_*`` (its best.pt) take precedence over its last round's ``global/*``;
    ``all_*`` is an evaluation on every image of an external set (``--split all``)."""
    out = {}
    for prefix in ("global/", "all_", "test_"):
        for key, value in metrics.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name in METRICS and math.isfinite(value):
                out[name] = value
    return out


def _dataset(params: dict, tags: dict) -> str | None:
    name = params.get("data.name") or tags.get("dataset")
    return Path(params["data.root"]).name if name == "folder" and params.get("data.root") else name


def _result(run, source=None) -> Result | None:
    """The Result of ``run``; ``source``, for an evaluation run (``medmamba evaluate``), is the run
    that trained its checkpoint: its model, size and cost, and the dataset it was trained on,
    which labels a cross-dataset evaluation "Y (trained on X)"."""
    params, tags = run.data.params, run.data.tags
    metrics = unified_metrics(run.data.metrics)
    model = params.get("model.name") or tags.get("model")
    dataset, size = _dataset(params, tags), params.get("data.size", "")
    kind = tags.get("kind", "train")  # federated, sweep, evaluate, embed and robustness runs are tagged
    if kind == "embed":
        metrics = {k: v for k, v in run.data.metrics.items() if k == "silhouette" and math.isfinite(v)}
    elif kind == "robustness":
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(ROBUSTNESS_DROP)}
    cost = tags
    if source is not None:
        kind, cost = tags.get("kind", "evaluate"), source.data.tags
        model, size = source.data.params.get("model.name", model), source.data.params.get("data.size", size)
    if source is not None or "trained_on" in tags:  # the source run may be gone: its tag stays
        trained_on = _dataset(source.data.params, source.data.tags) if source is not None else tags["trained_on"]
        if trained_on and trained_on != dataset:
            dataset = f"{dataset} (trained on {trained_on})"
    if not (metrics and model and dataset):
        return None
    number = lambda key: float(cost[key]) if key in cost else None  # noqa: E731
    return Result(run.info.run_id, model, dataset, size, kind, metrics, number("parameters"), number("gflops"),
                  run.info.run_name or "", dict(tags), dict(run.data.metrics))


def _source(client, run):
    """The run that trained an evaluation run's checkpoint, when it is still in the store."""
    run_id = run.data.tags.get("source_run_id")
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted or in another store: the evaluation stands alone
        return None


def read_results(client, experiments: list[str], run_ids: list[str] = (), parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> tuple[list[Result], dict[str, int]]:
    """The finished runs of ``experiments`` (and/or ``run_ids``) that match the filters, with the
    counts of what was left out: ``{"selected", "unfinished", "without_metrics"}``. With
    ``parent_run_id`` and no experiment, the parent's experiment is searched."""
    if parent_run_id:  # a mistyped id is named as such, not reported as an empty selection
        parent = _run(client, parent_run_id, "--parent-run")
        experiments = experiments or [client.get_experiment(parent.info.experiment_id).name]
    ids = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ReportError(f"no MLflow experiment named {name!r} (experiments: {known})")
        ids.append(experiment.experiment_id)
    clauses = [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs = client.search_runs(ids, " and ".join(clauses), max_results=50000) if ids else []
    runs += [_run(client, run_id, "--run-id") for run_id in run_ids]
    counts = {"selected": len(runs), "unfinished": 0, "without_metrics": 0}
    results = []
    for run in runs:
        if run.data.tags.get("kind") in SKIPPED_KINDS:
            counts["selected"] -= 1
        elif run.info.status != "FINISHED":
            counts["unfinished"] += 1
        elif (result := _result(run, _source(client, run))) is None:
            counts["without_metrics"] += 1
        else:
            results.append(result)
    if not results:
        what = ", ".join(experiments + list(run_ids)) or "the selection"
        raise ReportError(f"nothing to report in {what}: {runs_text(counts['selected'])} selected, "
                          f"{counts['unfinished']} unfinished, {counts['without_metrics']} finished without test metrics")
    return results, counts


def _run(client, run_id: str, option: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ReportError(f"{option} {run_id}: no such MLflow run in {client.tracking_uri}") from exc


def aggregate(results: list[Result]) -> dict[tuple[str, str, str, str], Cell]:
    """{(model, dataset, size, metric): Cell} over the runs."""
    cells: dict[tuple[str, str, str, str], Cell] = {}
    for r in results:
        for metric, value in r.metrics.items():
            cell = cells.setdefault((r.model, r.dataset, r.size, metric), Cell())
            cell.values.append(value)
            cell.run_ids.append(r.run_id)
    return cells


def published(path: Path = PUBLISHED) -> list[dict]:
    with path.open() as f:
        return [{**row, "value": float(row["value"])} for row in csv.DictReader(f)]


def _label(model: str, size: str, sizes: set[str]) -> str:
    return f"{model} ({size})" if size and len(sizes) > 1 else model


@dataclass
class Table:
    """A report table: header, rows of cell texts, and which cells are the best of their column."""
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)

    def markdown(self) -> str:
        cell = lambda i, j, t: f"**{t}**" if (i, j) in self.bold else t  # noqa: E731
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(i, j, t) for j, t in enumerate(row)) + " |" for i, row in enumerate(self.rows)]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        esc = lambda t: t.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")  # noqa: E731
        cell = lambda i, j, t: rf"\textbf{{{esc(t)}}}" if (i, j) in self.bold else esc(t)  # noqa: E731
        body = [" & ".join(cell(i, j, t) for j, t in enumerate(row)) + r" \\" for i, row in enumerate(self.rows)]
        return "\n".join([rf"% {self.title}", r"\begin{tabular}{l" + "r" * (len(self.header) - 1) + "}",
                          r"\toprule", " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule", *body,
                          r"\bottomrule", r"\end{tabular}"]) + "\n"

    def html(self) -> str:
        is_text = lambda text: not re.match(rf"[-+{MISSING}]?\d", text)  # noqa: E731
        def cell(i: int, j: int, text: str) -> str:  # numbers stay on one line; words (a source) wrap
            kind = " class='text'" if is_text(text) else ""
            text = f"<b>{html.escape(text)}</b>" if (i, j) in self.bold else html.escape(text)
            return f"<td{kind}>{text}</td>"
        rows = "".join("<tr>" + "".join(cell(i, j, t) for j, t in enumerate(row)) + "</tr>" for i, row in enumerate(self.rows))
        words = [j == 0 or all(is_text(row[j]) for row in self.rows) for j in range(len(self.header))]  # left-aligned
        head = "".join(f"<th{' class=text' if w else ''}>{html.escape(h)}</th>" for h, w in zip(self.header, words))
        return (f"<h3>{html.escape(self.title)}</h3><div class=scroll><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")


def _mark_best(rows: list[list[str]], values: list[list[float | None]], first: int = 1) -> set[tuple[int, int]]:
    bold = set()
    for j in range(first, len(rows[0]) if rows else 0):
        column = [(v[j], i) for i, v in enumerate(values) if v[j] is not None]
        if column:
            best = max(value for value, _ in column)
            bold |= {(i, j) for value, i in column if value == best}
    return bold


def table6(cells: dict, sizes: set[str]) -> Table:
    """Rows: models; columns: datasets x (AUC, OA); each cell mean ± std (n); best per column bold."""
    datasets = sorted({k[1] for k in cells})
    models = sorted({(k[0], k[2]) for k in cells})
    header = ["model"] + [f"{d} {name}" for d in datasets for _, name in TABLE6]
    rows, values = [], []
    for model, size in models:
        found = [cells.get((model, d, size, metric)) for d in datasets for metric, _ in TABLE6]
        rows.append([_label(model, size, sizes)] + [c.text() if c else MISSING for c in found])
        values.append([None] + [c.mean if c else None for c in found])
    return Table("Test AUC and overall accuracy (OA) by dataset: mean ± std (runs); best per column in bold",
                 header, rows, _mark_best(rows, values))


def positive_classes(results: list[Result], dataset: str) -> set[str]:
    """The positive class of a binary ``dataset`` as its runs tag it (runs logged before the tag:
    MedMNIST's binary sets by name); empty for a multi-class one, several if the runs disagree."""
    tagged = {r.tags["positive_class"] for r in results if r.dataset == dataset and "positive_class" in r.tags}
    return tagged or ({MEDMNIST_POSITIVE[dataset]} if dataset in MEDMNIST_POSITIVE else set())


def details(cells: dict, results: list[Result], dataset: str, sizes: set[str]) -> Table:
    """Tables 3-5 for one dataset: parameters, GFLOPs, P, Se, Sp, F1 (macro; a binary task's
    positive class, unless its runs name different ones), OA and AUC."""
    models = sorted({(k[0], k[2]) for k in cells if k[1] == dataset})
    classes = positive_classes(results, dataset)
    positive = next(iter(classes)) if len(classes) == 1 else None
    columns = BINARY_DETAILS if positive else DETAILS
    which = f"P, Se, Sp and F1 of class {positive!r}" if positive else "macro P, Se, Sp and F1"
    if len(classes) > 1:  # one class's precision averaged with another's would mean nothing
        which += f" (its runs name different positive classes: {', '.join(sorted(classes))})"
    rows, values = [], []
    for model, size in models:
        tagged = [r for r in results if (r.model, r.dataset, r.size) == (model, dataset, size)]
        params = next((r.params for r in tagged if r.params), None)
        gflops = next((r.gflops for r in tagged if r.gflops is not None), None)
        found = [cells.get((model, dataset, size, metric)) for metric, _ in columns]
        rows.append([_label(model, size, sizes), f"{params / 1e6:.2f}" if params else MISSING,
                     f"{gflops:.2f}" if gflops is not None else MISSING] + [c.text() if c else MISSING for c in found])
        values.append([None, None, None] + [c.mean if c else None for c in found])
    return Table(f"{dataset}: parameters (M), GFLOPs (conv + linear), {which}, mean ± std (runs)",
                 ["model", "params M", "GFLOPs"] + [name for _, name in columns], rows, _mark_best(rows, values, 3))


def deltas(cells: dict, reference: list[dict]) -> tuple[Table, list[dict]]:
    """Our mean against every published value for the same model, dataset, size and metric."""
    rows = []
    for ref in reference:
        cell = cells.get((ref["model"], ref["dataset"], ref["size"], ref["metric"]))
        if cell:
            rows.append({"model": ref["model"], "dataset": ref["dataset"], "size": ref["size"], "metric": ref["metric"],
                         "ours": cell.mean, "std": cell.std, "n": len(cell.values), "published": ref["value"],
                         "delta": cell.mean - ref["value"], "source": f"{ref['source']}, {ref['table']}"})
    table = Table("Against published results (delta = ours - published)",
                  ["model", "dataset", "size", "metric", "ours", "published", "delta", "source"],
                  [[r["model"], r["dataset"], r["size"], r["metric"], mean_std(r["ours"], r["std"], r["n"]),
                    f"{r['published']:.3f}", f"{r['delta']:+.3f}", r["source"]] for r in rows])
    return table, rows


def sweep_table(results: list[Result]) -> Table | None:
    """The best trial of each sweep: its parameters, best validation value and test metrics."""
    sweeps = [r for r in results if r.kind == "sweep"]
    rows = []
    for r in sorted(sweeps, key=lambda r: r.name):
        best = ", ".join(f"{k[5:]}={v}" for k, v in sorted(r.tags.items()) if k.startswith("best."))
        validation = next((f"{k[5:]} {v:.3f}" for k, v in r.logged.items() if k.startswith("best_")), MISSING)
        rows.append([r.name, r.model, r.dataset, r.tags.get("best_trial", MISSING), best or MISSING, validation,
                     f"{r.metrics.get('auc', math.nan):.3f}", f"{r.metrics.get('accuracy', math.nan):.3f}"])
    return Table("Sweeps: the best trial of each", ["sweep", "model", "dataset", "best trial", "parameters",
                                                   "best validation", "test AUC", "test OA"], rows) if rows else None


def federated_table(results: list[Result]) -> Table | None:
    """Strategy x partition (x held-out site): global test AUC (best.pt), the worst site's own test
    AUC (last round), the centralised baseline on the pooled sites and the gap to it, and the
    privacy budget spent (epsilon, differential privacy only); mean over runs."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.kind == "federated":
            key = (r.tags.get("strategy", "?"), r.tags.get("partition", "?"), r.tags.get("holdout_site", MISSING),
                   r.dataset, r.model)
            groups.setdefault(key, []).append(r)
    rows = []
    mean = lambda xs: statistics.fmean(xs) if xs else math.nan  # noqa: E731
    fmt = lambda v: MISSING if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    for (strategy, partition, holdout, dataset, model), runs in sorted(groups.items()):
        glob = mean([r.metrics["auc"] for r in runs if "auc" in r.metrics])
        worst = mean([min(sites) for r in runs if (sites := list(_site_aucs(r).values()))])
        central = mean([r.logged["centralized/auc"] for r in runs if "centralized/auc" in r.logged])
        epsilon = mean([r.logged["privacy/epsilon"] for r in runs if "privacy/epsilon" in r.logged])
        site_aucs = _site_aucs(runs[0])
        worst_name = f" ({min(site_aucs, key=site_aucs.get)})" if len(runs) == 1 and site_aucs else ""
        rows.append([strategy, partition, holdout, dataset, model, str(len(runs)), fmt(glob), fmt(worst) + worst_name,
                     fmt(central), MISSING if math.isnan(central) else f"{glob - central:+.3f}",
                     MISSING if math.isnan(epsilon) else f"{epsilon:.2f}"])
    return Table("Federated runs: test AUC of the global model, its worst site, and the centralised baseline",
                 ["strategy", "partition", "held-out site", "dataset", "model", "runs", "global AUC",
                  "worst-site AUC", "centralised AUC", "gap", "privacy ε"], rows) if rows else None


def _site_aucs(r: Result) -> dict[str, float]:
    return {k.split("/")[1]: v for k, v in r.logged.items() if k.startswith("site/") and k.endswith("/test_auc")}


def site_matrix_tables(results: list[Result]) -> list[Table]:
    """For each federated run with local baselines: every model (each site's own, the pooled one,
    the federated one) tested at every site, AUC."""
    tables = []
    for r in results:
        cells = {}
        for key, value in r.logged.items():
            if key.startswith(SITE_MATRIX) and key.endswith("/auc"):
                model, _, site = key[len(SITE_MATRIX):-len("/auc")].rpartition("/")
                cells[model, site] = value
        if cells:
            sites, models = sorted({s for _, s in cells}), sorted({m for m, _ in cells})
            rows = [[model] + [f"{cells[model, site]:.3f}" if (model, site) in cells else MISSING for site in sites]
                    for model in models]
            tables.append(Table(f"Federated run {r.name or r.run_id}: test AUC of each model (rows) at each site",
                                ["model", *sites], rows))
    return tables


def analysis_tables(cells: dict, sizes: set[str]) -> list[Table]:
    """Feature embeddings (silhouette of the classes) and robustness (AUC and accuracy drop at
    the highest severity, per perturbation), mean ± std over runs, per model and dataset."""
    tables = []
    silhouettes = sorted((k, c) for k, c in cells.items() if k[3] == "silhouette")
    if silhouettes:
        tables.append(Table("Feature embeddings: silhouette score of the classes in feature space, mean ± std (runs)",
                            ["model", "dataset", "silhouette"],
                            [[_label(m, s, sizes), d, c.text()] for (m, d, s, _), c in silhouettes]))
    drops = {k: c for k, c in cells.items() if k[3].startswith(ROBUSTNESS_DROP)}
    for metric, name in (("auc", "AUC"), ("accuracy", "OA")):
        suffix = f"_{metric}"
        columns = sorted({k[3][len(ROBUSTNESS_DROP):-len(suffix)] for k in drops if k[3].endswith(suffix)})
        groups = sorted({(m, d, s) for m, d, s, _ in drops})
        if columns:
            rows = [[_label(m, s, sizes), d] + [c.text() if (c := drops.get((m, d, s, f"{ROBUSTNESS_DROP}{p}_{metric}")))
                                                else MISSING for p in columns] for m, d, s in groups]
            tables.append(Table(f"Robustness: {name} drop at the highest severity per perturbation, mean ± std (runs)",
                                ["model", "dataset"] + columns, rows))
    return tables


def plot_accuracy_vs_flops(results: list[Result], path: Path) -> Path | None:
    """Figure 4-style: mean overall accuracy against GFLOPs, marker area by parameters."""
    from .reports import pyplot

    plt = pyplot()
    points = {}
    for r in results:
        if r.gflops is not None and r.params and "accuracy" in r.metrics:
            points.setdefault((r.model, r.size), (r.gflops, r.params, []))[2].append(r.metrics["accuracy"])
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (model, size), (gflops, params, accuracies) in sorted(points.items()):
        ax.scatter(gflops, 100 * statistics.fmean(accuracies), s=params / 1e5, alpha=0.6)
        ax.annotate(f"{model} ({size} px)" if size else model, (gflops, 100 * statistics.fmean(accuracies)),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="GFLOPs (conv + linear)", ylabel="overall accuracy (%), mean over runs",
           title="accuracy against cost (marker area: parameters)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(results: list[Result], counts: dict[str, int], out: Path, title: str) -> list[Path]:
    """Write report.csv, the tables (Markdown, LaTeX, CSV), the plot and report.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cells, sizes = aggregate(results), {r.size for r in results}
    long = [{"model": m, "dataset": d, "size": s, "metric": metric, "mean": c.mean, "std": c.std,
             "n": len(c.values), "run_ids": " ".join(c.run_ids)} for (m, d, s, metric), c in sorted(cells.items())]
    delta_table, delta_rows = deltas(cells, published())
    scores = {k: c for k, c in cells.items() if k[3] in METRICS}  # test metrics; the rest is analysis
    tables = [table6(scores, sizes)] if scores else []
    tables += [details(scores, results, d, sizes) for d in sorted({k[1] for k in scores})]
    if delta_rows:
        tables.append(delta_table)
    tables += [t for t in (sweep_table(results), federated_table(results)) if t is not None]
    tables += site_matrix_tables(results)
    tables += analysis_tables(cells, sizes)
    files = [write_csv(long, out / "report.csv")]
    if delta_rows:
        files.append(write_csv(delta_rows, out / "deltas.csv"))
    summary = (f"{runs_text(len(results))} finished with test metrics; left out: {counts['unfinished']} unfinished, "
               f"{counts['without_metrics']} without test metrics")
    (out / "report.md").write_text(f"# {title}\n\n{summary}\n\n" + "\n".join(t.markdown() for t in tables))
    (out / "report.tex").write_text("\n".join(t.latex() for t in tables))
    files += [out / "report.md", out / "report.tex"]
    plot = plot_accuracy_vs_flops(results, out / "accuracy_vs_gflops.png")
    figure = (f'<img alt="accuracy against GFLOPs" src="data:image/png;base64,'
              f'{base64.b64encode(plot.read_bytes()).decode()}">' if plot else "")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
             # numbers such as "0.812 ± 0.027 (3)" on one line, words (a source) wrap
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}"
             "td:first-child,.text{text-align:left}td.text{white-space:normal}"
             # a table wider than the window scrolls by itself; the page and the plot fit the window
             ".scroll{overflow-x:auto}img{max-width:100%}")
    (out / "report.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"
        + "".join(t.html() for t in tables) + figure + "</body></html>")
    files.append(out / "report.html")
    return files + ([plot] if plot else [])
