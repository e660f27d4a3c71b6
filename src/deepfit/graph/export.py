"""`deepfit export` for node classifiers: (features (N, F) float32, edge_index (2, E) int64) ->
logits (N, K), node and edge counts dynamic, as ONNX (PyG's GCNConv exports through torch's
TorchScript-based ONNX exporter: gather, scatter-add and matmul) or TorchScript (traced). The file
carries the class names; each export runs the written file on the checkpoint's graph and on a
subgraph (half the edges) and compares it with PyTorch."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfit.errors import DeepfitError, first_line
from deepfit.exportfile import (
    CAUSE_CHARS,
    FORMATS,
    difference,
    export_path,
    load_torchscript,
    onnx_session,
    save_onnx,
    save_torchscript,
    staged_file,
)
from deepfit.graph.trained import TrainedNodeModel, build_model_for, load_node_model, run_folder

TOLERANCE = 1e-4  # largest absolute logit difference an export may show against PyTorch


class NodeExportError(DeepfitError):
    """A node model that could not be exported, or whose file does not compute what it does."""


@dataclass
class NodeExportResult:
    path: Path
    format: str
    max_abs_diff: float
    checks: tuple[str, ...]  # the graphs the written file was run on


def export_node_checkpoint(path: str | Path, *, format: str, out: str | Path | None = None) -> NodeExportResult:
    if format not in FORMATS:
        raise NodeExportError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    trained = load_node_model(path)
    model = uncached_model(trained)
    folder = run_folder(Path(path))
    target = Path(out) if out is not None else export_path(folder, trained.path, format)
    inputs = (trained.graph.features, trained.graph.edge_index)
    with staged_file(target, format=format, error=NodeExportError) as staging:
        (write_onnx if format == "onnx" else write_torchscript)(model, inputs, staging, metadata(trained))
        diff, checks = verify(model, trained, staging, format)
        if not diff <= TOLERANCE:
            raise NodeExportError(f"{format} export differs from the PyTorch model by {diff:.3g} (> {TOLERANCE:g}); {target} not written")
    return NodeExportResult(target, format, diff, checks)


def uncached_model(trained: TrainedNodeModel) -> nn.Module:
    """The model with cached=False: an exported graph must normalise the edges it is given."""
    model = build_model_for(trained.config, trained.graph, cached=False)
    model.load_state_dict(trained.model.state_dict())
    return model.eval()


def metadata(trained: TrainedNodeModel) -> dict[str, Any]:
    return {
        "deepfit_metadata_version": 1,
        "task": "node",
        "classes": list(trained.graph.classes),
        "num_features": trained.graph.num_features,
        "inputs": "features (N, F) float32; edge_index (2, E) int64, each undirected edge in both directions",
        "output": "logits (N, num_classes); softmax gives probabilities",
        "model": trained.config.model.name,
    }


def write_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, meta: dict[str, Any]) -> None:
    import onnx

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs, str(target), dynamo=False, input_names=["features", "edge_index"], output_names=["logits"],
                dynamic_axes={"features": {0: "nodes"}, "edge_index": {1: "edges"}, "logits": {0: "nodes"}}, opset_version=17,
            )  # fmt: skip
    except Exception as err:  # the exporter raises many types; all mean "this model cannot be exported"
        raise NodeExportError(f"ONNX export of the node model failed: {first_line(err, named=True, limit=CAUSE_CHARS)}") from None
    save_onnx(onnx.load(str(target)), meta, target)


def write_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, meta: dict[str, Any]) -> None:
    save_torchscript(model, inputs, target, meta, error=NodeExportError, what="the node model")


def verify(model: nn.Module, trained: TrainedNodeModel, target: Path, format: str) -> tuple[float, tuple[str, ...]]:
    """Largest |file - PyTorch| logit on the whole graph and on the graph with half its edges."""
    graph = trained.graph
    half = graph.edge_index[:, : graph.edge_index.shape[1] // 2]
    cases = {"the checkpoint's graph": graph.edge_index, "half of its edges": half}
    run = onnx_runner(target) if format == "onnx" else torchscript_runner(target)
    worst = 0.0
    for name, edges in cases.items():
        with torch.inference_mode():
            expected = model(graph.features, edges).numpy()
        inputs = (graph.features.numpy(), edges.numpy())
        worst = max(worst, difference(run, inputs, expected, error=NodeExportError, format=format, on=name))
    return worst, tuple(cases)


def onnx_runner(target: Path) -> Any:
    session = onnx_session(target, error=NodeExportError)
    names = {i.name for i in session.get_inputs()}  # the mlp ignores the edges: its file has no edge_index input

    def run(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
        feeds = {"features": features, "edge_index": edges}
        return np.asarray(session.run(None, {k: v for k, v in feeds.items() if k in names})[0])

    return run


def torchscript_runner(target: Path) -> Any:
    loaded = load_torchscript(target, error=NodeExportError)

    def run(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(loaded(torch.from_numpy(features), torch.from_numpy(edges)).numpy())

    return run
