"""Using a trained node classifier from its checkpoint alone: evaluate (accuracy and a per-class
report on the test nodes, written to report.json) and predict (node ids -> classes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deepfit.errors import DeepfitError
from deepfit.graph.trained import TrainedNodeModel, load_node_model, run_folder

SPLITS = ("test", "val", "train", "all")


class NodeInputError(DeepfitError):
    """A split or node id that the checkpoint's graph does not have."""


@dataclass
class ClassScore:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class NodeReport:
    checkpoint: str
    graph: str
    split: str
    nodes: int
    accuracy: float
    loss: float  # cross-entropy on the split's nodes
    per_class: list[ClassScore]
    macro_f1: float


@dataclass
class NodeEvaluation:
    report: NodeReport
    report_path: Path


def evaluate_node_checkpoint(path: str | Path, *, split: str = "test") -> NodeEvaluation:
    """Score a node checkpoint (a run folder stands for best.pt) on its graph's `split` nodes and
    write report.json into the run (beside a bare checkpoint: <stem>.report.json)."""
    if split not in SPLITS:
        raise NodeInputError(f"unknown split {split!r} for a node run; valid: {', '.join(SPLITS)}")
    trained = load_node_model(path)
    nodes = trained.graph.split(split)
    if len(nodes) == 0:
        raise NodeInputError(f"{trained.graph.name} has no {split} nodes to evaluate (karate: its 32 test nodes)")
    report = build_node_report(trained, nodes, split)
    folder = run_folder(Path(path))
    target = folder / "report.json" if folder is not None else trained.path.with_name(f"{trained.path.stem}.report.json")
    target.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return NodeEvaluation(report, target)


def build_node_report(trained: TrainedNodeModel, nodes: torch.Tensor, split: str) -> NodeReport:
    from sklearn.metrics import precision_recall_fscore_support

    logits = trained.logits()[nodes]
    labels = trained.graph.labels[nodes]
    preds = logits.argmax(1)
    k = len(trained.graph.classes)
    precision, recall, f1, support = precision_recall_fscore_support(labels.numpy(), preds.numpy(), labels=list(range(k)), zero_division=0)
    per_class = [
        ClassScore(name, float(p), float(r), float(f), int(s))
        for name, p, r, f, s in zip(trained.graph.classes, precision, recall, f1, support, strict=True)
    ]
    return NodeReport(
        checkpoint=str(trained.path), graph=trained.graph.name, split=split, nodes=len(nodes),
        accuracy=float((preds == labels).float().mean()), loss=float(torch.nn.functional.cross_entropy(logits, labels)),
        per_class=per_class, macro_f1=float(f1.mean()),
    )  # fmt: skip


def format_node_report(report: NodeReport) -> str:
    """The report as the text `deepfit evaluate` prints."""
    width = max(len(score.name) for score in report.per_class)
    lines = [
        f"{report.graph}, {report.split} nodes: {report.nodes}",
        f"accuracy {report.accuracy:.2%}  loss {report.loss:.4f}  macro F1 {report.macro_f1:.4f}",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for s in report.per_class:
        lines.append(f"{s.name:<{width}}  {s.precision:9.4f}  {s.recall:6.4f}  {s.f1:6.4f}  {s.support:7d}")
    return "\n".join(lines)


@dataclass
class NodePrediction:
    node: str  # the node id as the user knows it
    label: str
    index: int
    probability: float
    topk: list[tuple[str, float]]
    true_label: str | None  # the known label, None for an unlabelled node
    split: str  # train, val, test or "" (unlabelled / unused)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "topk": [[name, p] for name, p in self.topk]}


@dataclass
class NodePredictions:
    predictions: list[NodePrediction]
    unknown: list[str]  # requested ids that are not nodes of the graph


def predict_nodes(path: str | Path, nodes: Sequence[str | int], *, topk: int = 3) -> NodePredictions:
    """Class probabilities of the named nodes ('all' names every node) of the checkpoint's graph.
    Node ids are text, as the command line and CSV files give them; numbers are read as their text
    (karate's node 0 is '0')."""
    trained = load_node_model(path)
    graph = trained.graph
    index = {node: i for i, node in enumerate(graph.node_ids)}
    named = [str(node) for node in nodes]
    wanted = graph.node_ids if named == ["all"] else named
    probabilities = torch.softmax(trained.logits(), dim=1)
    k = min(topk, len(graph.classes))
    found = [node for node in wanted if node in index]
    predictions = [node_prediction(trained, node, index[node], probabilities[index[node]], k) for node in found]
    return NodePredictions(predictions, [node for node in wanted if node not in index])


def node_prediction(trained: TrainedNodeModel, node: str, i: int, probs: torch.Tensor, k: int) -> NodePrediction:
    graph = trained.graph
    top = probs.topk(k)
    label = int(graph.labels[i])
    split = next((name for name in ("train", "val", "test") if bool(getattr(graph, f"{name}_mask")[i])), "")
    return NodePrediction(
        node, graph.classes[int(top.indices[0])], int(top.indices[0]), float(top.values[0]),
        [(graph.classes[int(j)], float(p)) for p, j in zip(top.values, top.indices, strict=True)],
        graph.classes[label] if label >= 0 else None, split,
    )  # fmt: skip


def format_node_table(predictions: list[NodePrediction]) -> str:
    width = max(len("node"), *(len(p.node) for p in predictions))
    lines = [f"{'node':<{width}}  {'label':<24} prob    true label (split)"]
    for p in predictions:
        truth = f"{p.true_label} ({p.split or 'unused'})" if p.true_label is not None else "unlabelled"
        lines.append(f"{p.node:<{width}}  {p.label:<24} {p.probability:.3f}  {truth}")
    return "\n".join(lines)
