"""A node classifier rebuilt from its checkpoint alone. The checkpoint holds the graph itself
(features as sparse COO indices and values, edges, labels, split masks, node ids), so evaluate,
predict, export, show and report never need the data files again; Cora's graph costs about 1 MB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfit.checkpoint import load_checkpoint, load_model_state
from deepfit.config import Config, config_from_dict
from deepfit.errors import CheckpointError, ConfigError
from deepfit.graph.models import build_node_model
from deepfit.graph.sources import Graph


def graph_state(graph: Graph) -> dict[str, Any]:
    """A Graph as plain tensors and lists (readable by weights_only loading)."""
    sparse = graph.features.to_sparse().coalesce()  # bag-of-words features are ~1% non-zero
    return {
        "name": graph.name,
        "feature_indices": sparse.indices(),
        "feature_values": sparse.values(),
        "feature_shape": list(graph.features.shape),
        "edge_index": graph.edge_index,
        "labels": graph.labels,
        "train_mask": graph.train_mask,
        "val_mask": graph.val_mask,
        "test_mask": graph.test_mask,
        "node_ids": list(graph.node_ids),
    }


def graph_from_state(state: dict[str, Any], classes: list[str]) -> Graph:
    shape = [int(n) for n in state["feature_shape"]]
    features = torch.sparse_coo_tensor(state["feature_indices"], state["feature_values"], shape, check_invariants=True).to_dense()
    graph = Graph(
        str(state["name"]), features, state["edge_index"].long(), state["labels"].long(),
        state["train_mask"].bool(), state["val_mask"].bool(), state["test_mask"].bool(),
        classes, [str(node) for node in state["node_ids"]],
    )  # fmt: skip
    check_graph(graph)
    return graph


def check_graph(graph: Graph) -> None:
    """Shapes that must agree before any tensor is indexed with another."""
    n = graph.num_nodes
    sizes = [len(graph.labels), len(graph.train_mask), len(graph.val_mask), len(graph.test_mask), len(graph.node_ids)]
    if any(size != n for size in sizes):
        raise ValueError(f"the graph's node tensors disagree on the node count ({n} features rows, {sizes})")
    if graph.edge_index.dim() != 2 or graph.edge_index.shape[0] != 2:
        raise ValueError("edge_index must be (2, E)")
    if graph.edge_index.numel() and (int(graph.edge_index.min()) < 0 or int(graph.edge_index.max()) >= n):
        raise ValueError("edge_index refers to nodes outside the graph")
    if int(graph.labels.max()) >= len(graph.classes):
        raise ValueError("labels refer to classes outside the class list")


@dataclass
class TrainedNodeModel:
    """A node model in eval mode (CPU) with the graph it was trained on."""

    path: Path  # the checkpoint file that was read
    model: nn.Module
    graph: Graph
    config: Config
    state: dict[str, Any]  # the checkpoint itself (epoch, history, ...)

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """(N, K) logits of every node."""
        return self.model(self.graph.features, self.graph.edge_index)

    @torch.inference_mode()
    def embeddings(self) -> torch.Tensor:
        """(N, H) last hidden layer of every node."""
        return self.model.embed(self.graph.features, self.graph.edge_index)  # type: ignore[operator]


def load_node_model(path: str | Path) -> TrainedNodeModel:
    """Rebuild a node checkpoint's model and graph; every problem is one CheckpointError line."""
    path = Path(path)
    state = load_checkpoint(path)
    file = resolved_file(path)
    try:
        config = config_from_dict(state["config"])
        classes = [str(name) for name in state["classes"]]
        graph = graph_from_state(state["graph"], classes)
        model = build_model_for(config, graph)
    except (ConfigError, TypeError, ValueError, KeyError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{file}: cannot rebuild its node model and graph: {err}") from None
    load_model_state(model, state["model"], file)
    return TrainedNodeModel(file, model.eval(), graph, config, state)


def build_model_for(config: Config, graph: Graph, *, cached: bool = False) -> nn.Module:
    return build_node_model(
        config.model.name, in_features=graph.num_features, num_classes=len(graph.classes),
        hidden=list(config.model.hidden), dropout=config.model.dropout, cached=cached,
    )  # fmt: skip


def resolved_file(path: Path) -> Path:
    """The file load_checkpoint read: the path itself, or a run folder's best.pt, else last.pt."""
    if path.is_file():
        return path
    best = path / "checkpoints" / "best.pt"
    return best if best.is_file() else path / "checkpoints" / "last.pt"


def run_folder(path: Path) -> Path | None:
    """The run folder of a checkpoint (runs/<name>/checkpoints/x.pt), or None for a bare file."""
    if path.is_dir():
        return path
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None
