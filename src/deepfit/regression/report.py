"""`deepfit report` for regression runs: one self-contained HTML page (figures embedded as
base64 PNG, no network): the run summary, the metrics per epoch, the evaluation (report.json)
when `deepfit evaluate` wrote one, the four figures and the config."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from deepfit.history import read_metrics_csv
from deepfit.outfiles import REPORT_SUFFIXES, require_output
from deepfit.regression.views import FIGURE_KINDS, load_regression_run, make_regression_figure

TITLES = {
    "curves": "Loss and validation R² per epoch",
    "predicted": "Predicted against actual, with the identity line",
    "residuals": "Residuals",
    "feature": "One feature against the target, with the model's fitted line",
}
STYLE = """body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: .9rem; } th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; } pre { background: #f7f7f7; padding: .8rem; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-weight: 600; } .note { color: #777; font-style: italic; }"""


def write_regression_report(run: str | Path, *, out: str | Path | None = None) -> Path:
    """Write the run's report (default RUN/report.html) and return its path."""
    from deepfit.plots import figure_png

    trained, data, run_dir = load_regression_run(run)
    path = Path(out) if out is not None else run_dir / "report.html"
    require_output(path, what="a report", suffixes=REPORT_SUFFIXES)
    history = read_metrics_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else trained.history
    summary = {
        "data": trained.config.data.name,
        "target": trained.target,
        "features": ", ".join(trained.schema.feature_names()),
        "model": trained.config.model.name,
        "parameters": f"{sum(p.numel() for p in trained.model.parameters()):,}",
        "rows (train / val / test)": " / ".join(str(len(s)) if s is not None else "0" for s in (data.train, data.val, data.test)),
    }
    figures = []
    for kind in FIGURE_KINDS:
        if kind == "curves" and not history:
            continue
        png = base64.b64encode(figure_png(make_regression_figure(kind, trained.model, data, history))).decode("ascii")
        figures.append(
            f"<figure id='{kind}'><figcaption>{esc(TITLES[kind])}</figcaption><img alt='{kind}' src='data:image/png;base64,{png}'></figure>"
        )
    body = [
        f"<h1>deepfit report: {esc(run_dir.name)} (regression)</h1>",
        table([{"": k, "value": v} for k, v in summary.items()]),
        "<h2>Metrics per epoch</h2>" + table([{k: number(v) for k, v in row.items()} for row in history]),
        "<h2>Evaluation</h2>" + evaluation(run_dir / "report.json"),
        "<h2>Figures</h2>" + "\n".join(figures),
        f"<h2>Config</h2><pre>{esc(yaml.safe_dump(trained.config.to_dict(), sort_keys=False))}</pre>",
    ]
    page = f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(run_dir.name)}</title><style>{STYLE}</style></head>\n<body>\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page + "\n".join(body) + "\n</body></html>\n", encoding="utf-8")
    return path


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: float) -> str:
    return "" if isinstance(value, float) and math.isnan(value) else f"{value:.6g}"


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='note'>(none)</p>"
    columns = [key for key in rows[0] if any(row.get(key) not in ("", None) for row in rows)]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def evaluation(path: Path) -> str:
    if not path.is_file():
        return "<p class='note'>no report.json yet: run <code>deepfit evaluate</code> on this run</p>"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"<p class='note'>report.json could not be read: {esc(err)}</p>"
    if not isinstance(report, dict):
        return f"<pre>{esc(json.dumps(report))}</pre>"
    return table([{"metric": k, "value": number(v) if isinstance(v, float) else "n/a" if v is None else v} for k, v in report.items()])
