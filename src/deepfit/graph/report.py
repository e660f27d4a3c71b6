"""`deepfit report RUN` for a node run: one self-contained HTML page (figures embedded as base64
PNGs): the summary, the metrics per epoch, the evaluation report and every node figure."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from deepfit.errors import DeepfitError
from deepfit.graph.figures import NODE_FIGURES, node_figure
from deepfit.graph.trained import TrainedNodeModel, load_node_model, run_folder
from deepfit.outfiles import REPORT_SUFFIXES, require_output
from deepfit.plots import figure_png

CAPTIONS = {
    "curves": "Training curves",
    "embeddings": "Hidden node embeddings, PCA, coloured by class",
    "graph": "The graph, nodes coloured by predicted class",
    "inputs": "The inputs: adjacency matrix and feature matrix",
}
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.8rem}"
    "figure img{max-width:100%;border:1px solid #eee}.note{color:#777;font-style:italic}"
)


def write_node_report(run: str | Path, *, out: str | Path | None = None) -> Path:
    trained = load_node_model(run)
    folder = run_folder(Path(run)) or trained.path.parent
    path = Path(out) if out is not None else folder / "report.html"
    require_output(path, what="a report", suffixes=REPORT_SUFFIXES)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_node_report(trained, folder), encoding="utf-8")
    return path


def render_node_report(trained: TrainedNodeModel, folder: Path) -> str:
    title = f"deepfit report: {folder.name}"
    sections = [
        f"<h1>{esc(title)}</h1>",
        summary(trained),
        "<h2>Metrics per epoch</h2>" + table([{k: fmt(v) for k, v in row.items()} for row in trained.state["history"]]),
        evaluation(folder / "report.json"),
        figures(trained),
        f"<h2>Config</h2><pre>{esc(yaml.safe_dump(trained.config.to_dict(), sort_keys=False))}</pre>",
    ]
    head = f"<meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
    return f"<!DOCTYPE html>\n<html lang='en'><head>{head}</head><body>\n" + "\n".join(sections) + "\n</body></html>\n"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(trained: TrainedNodeModel) -> str:
    g = trained.graph
    rows = [
        ("task", "node classification"),
        ("graph", f"{g.name}: {g.num_nodes} nodes, {g.edge_index.shape[1] // 2} edges, {g.num_features} features"),
        ("split", f"{int(g.train_mask.sum())} train, {int(g.val_mask.sum())} val, {int(g.test_mask.sum())} test nodes"),
        ("model", trained.config.model.name),
        ("classes", f"{len(g.classes)}: {', '.join(g.classes)}"),
        ("parameters", f"{sum(p.numel() for p in trained.model.parameters()):,}"),
    ]
    return table([{"": k, "value": v} for k, v in rows])


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='note'>(empty)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def evaluation(path: Path) -> str:
    if not path.is_file():
        return "<h2>Evaluation</h2><p class='note'>no report.json yet: run <code>deepfit evaluate</code> on this run</p>"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        scalars = [{"metric": k, "value": fmt(v)} for k, v in report.items() if not isinstance(v, (list, dict))]
        per_class = [{k: fmt(v) for k, v in row.items()} for row in report.get("per_class", [])]
    except (OSError, ValueError, AttributeError, TypeError) as err:
        return f"<h2>Evaluation</h2><p class='note'>report.json could not be read: {esc(err)}</p>"
    return "<h2>Evaluation</h2>" + table(scalars) + "<h3>per class</h3>" + table(per_class)


def figures(trained: TrainedNodeModel) -> str:
    parts = ["<h2>Figures</h2>"]
    for kind in NODE_FIGURES:
        caption = esc(CAPTIONS[kind])
        try:
            png = figure_png(node_figure(kind, list(trained.state["history"]), trained.model, trained.graph))
        except DeepfitError as err:
            parts.append(f"<p class='note'>{caption}: not shown ({esc(err)})</p>")
            continue
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<figure id='{kind}'><figcaption>{caption}</figcaption><img alt='{kind}' src='{uri}'></figure>")
    return "\n".join(parts)
