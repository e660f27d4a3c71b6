"""`deepfit report RUN`: one self-contained HTML page per run (figures embedded as base64 PNG
data URIs, no external files, no network): the config, the metrics table, every figure that
applies to the run and the evaluation report (report.json) when `deepfit evaluate` wrote one."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from deepfit.errors import DeepfitError
from deepfit.history import read_metrics_csv
from deepfit.inspect import FIGURE_KINDS, LoadedRun, load_run, make_figure
from deepfit.outfiles import REPORT_SUFFIXES, require_output
from deepfit.plots import figure_png

FIGURE_TITLES = {
    "curves": "Training curves",
    "samples": "Training samples",
    "predictions": "Predictions on the {split} split (predicted / true, mistakes in red)",
    "confusion": "Confusion matrix ({split} split)",
    "mistakes": "Top losses: most confident mistakes on the {split} split",
    "filters": "First convolution's filters",
    "features": "Feature maps of the first convolution",
    "gradcam": "Grad-CAM at the last convolution",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; background: #fff; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th { background: #f3f3f3; } table.summary td { text-align: left; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-weight: 600; margin-bottom: .3rem; } .note { color: #777; font-style: italic; }
"""

# Marks the page once every image has decoded and records script errors, so a headless browser
# (and the test that drives one) can tell that the page rendered completely.
CHECK_SCRIPT = """
window.deepfitErrors = [];
window.addEventListener("error", function (e) { window.deepfitErrors.push(String(e.message)); });
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  var body = document.body;
  body.setAttribute("data-images", images.length);
  body.setAttribute("data-images-loaded", loaded);
  body.setAttribute("data-errors", window.deepfitErrors.length);
  body.setAttribute("data-rendered", loaded === images.length && window.deepfitErrors.length === 0 ? "yes" : "no");
});
"""


def write_report(run: str | Path, *, out: str | Path | None = None) -> Path:
    """Write the run's report (default runs/<name>/report.html) and return its path."""
    loaded = load_run(run)
    path = Path(out) if out is not None else loaded.run_dir / "report.html"
    require_output(path, what="a report", suffixes=REPORT_SUFFIXES)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(loaded), encoding="utf-8")
    return path


def render_report(run: LoadedRun) -> str:
    title = f"deepfit report: {run.run_dir.name}"
    sections = [
        f"<h1>{esc(title)}</h1>",
        summary_section(run),
        metrics_section(run.run_dir / "metrics.csv"),
        evaluation_section(run.run_dir / "report.json"),
        *other_evaluations(run.run_dir),
        figures_section(run),
        "<h2>Config</h2>",
        f"<pre>{esc(yaml.safe_dump(run.config.to_dict(), sort_keys=False))}</pre>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n<script>{CHECK_SCRIPT}</script>\n</head>\n"
        "<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def summary_section(run: LoadedRun) -> str:
    c, h, w = run.input_shape
    rows = [
        ("data", run.config.data.name),
        ("model", run.config.model.class_path or run.config.model.name),
        ("classes", f"{len(run.classes)}: {', '.join(run.classes)}"),
        ("input", f"{c}x{h}x{w}"),
        ("parameters", parameter_count(run)),
    ]
    return "<table class='summary'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def parameter_count(run: LoadedRun) -> str:
    if isinstance(run.built, DeepfitError):  # the user's own class, not named: its figures say how to name it
        return "not counted (the model was not rebuilt)"
    return f"{sum(p.numel() for p in run.built.parameters()):,}"


def metrics_section(path: Path) -> str:
    if not path.is_file():
        return "<h2>Metrics per epoch</h2><p class='note'>no metrics.csv in this run</p>"
    rows = read_metrics_csv(path)
    return "<h2>Metrics per epoch</h2>" + table_html([{k: format_metric(k, v) for k, v in row.items()} for row in rows])


def format_metric(key: str, value: float) -> str:
    if math.isnan(value):
        return ""
    if key == "epoch":
        return str(int(value))
    if key.endswith(SHARES) or key.rsplit("_", 1)[-1].startswith("top"):  # shares, shown as %
        return f"{value:.2%}"
    if key == "lr":
        return f"{value:.2e}"
    if key == "seconds":
        return f"{value:.1f}"
    return f"{value:.4f}"


SHARES = ("acc", "f1", "accuracy", "precision", "recall", "share")  # keys whose values are 0..1 shares, shown as percentages


def table_html(rows: list[dict[str, Any]]) -> str:
    """A table with the union of the rows' keys as columns, in first-seen order."""
    if not rows:
        return "<p class='note'>(empty)</p>"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(show_value(row.get(c, ''), key_of(row, c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_of(row: dict[str, Any], column: str) -> str:
    """The name a value is formatted by: its column, or in a metric/value table the metric's name."""
    return str(row.get("metric", row.get("name", column))) if column == "value" else column


def show_value(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        return format_metric(key, value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # class names as text
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def confusion_html(matrix: list[list[int]], classes: list[str]) -> str:
    """The confusion matrix as a table: rows are true classes, columns predicted."""
    names = classes if len(classes) == len(matrix) else [str(i) for i in range(len(matrix))]
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{esc(n)}</th>" + "".join(f"<td>{int(v)}</td>" for v in row) + "</tr>" for n, row in zip(names, matrix, strict=False)
    )
    return f"<table class='confusion'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


OWN_EVALUATION = "the run's own evaluation: its {split} split, the weights the run stands for (best.pt), no test-time flips"


def other_evaluations(run_dir: Path) -> list[str]:
    """The evaluations `deepfit evaluate` wrote beside the run's own (report-LABEL.json: another
    split, other data, test-time flips, another checkpoint), each headed by what it is."""
    return [
        evaluation_section(path, title=f"Evaluation: {path.stem.removeprefix('report-')}", note=f"not the run's own: {path.name}")
        for path in sorted(run_dir.glob("report-*.json"))
    ]


def evaluation_section(path: Path, title: str = "Evaluation", note: str = OWN_EVALUATION) -> str:
    """report.json from `deepfit evaluate`: scalars in one table, each list or mapping of records
    (per-class metrics, confusion pairs, ...) in a table of its own, anything else as JSON."""
    if not path.is_file():
        return f"<h2>{esc(title)}</h2><p class='note'>no report.json yet: run <code>deepfit evaluate</code> on this run</p>"
    heading = f"<h2>{esc(title)}</h2>"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{heading}<p class='note'>{esc(path.name)} could not be read: {esc(err)}</p>"
    if not isinstance(report, dict):
        return f"{heading}<pre>{esc(json.dumps(report, indent=2))}</pre>"
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool)) or v is None or k == "classes"}
    if note == OWN_EVALUATION:  # its split: val, for a run whose data has no test split
        note = note.format(split=report.get("split", "test"))
    parts = [heading, f"<p class='note'>{esc(note)}</p>", table_html([{"metric": k, "value": v} for k, v in scalars.items()])]
    for key, value in report.items():
        if key == "confusion" and isinstance(value, list):
            parts.append(f"<h3>confusion matrix</h3>{confusion_html(value, list(report.get('classes') or []))}")
        elif key not in scalars:
            parts.append(f"<h3>{esc(key.replace('_', ' '))}</h3>{nested_html(value)}")
    return "\n".join(parts)


def nested_html(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return table_html(value)
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return table_html([{"name": k, **v} for k, v in value.items()])
    if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        return table_html([{"name": k, "value": v} for k, v in value.items()])
    return f"<pre>{esc(json.dumps(value, indent=2))}</pre>"


def split_name(run: LoadedRun) -> str:
    """The split the evaluation figures show (val when the data has no test split)."""
    try:
        return run.eval_split()
    except DeepfitError:
        return "test"


def figures_section(run: LoadedRun) -> str:
    """Every figure kind that applies; a kind that does not (no convolution, no metrics) gets a note."""
    parts = ["<h2>Figures</h2>"]
    for kind in FIGURE_KINDS:
        caption = esc(FIGURE_TITLES.get(kind, kind).format(split=split_name(run)))
        try:
            png = figure_png(make_figure(run, kind))
        except DeepfitError as err:
            parts.append(f"<p class='note'>{caption}: not shown ({esc(err)})</p>")
            continue
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<figure id='{kind}'><figcaption>{caption}</figcaption><img alt='{kind}' src='{uri}'></figure>")
    return "\n".join(parts)
