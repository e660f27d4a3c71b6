"""Node-classification figures: the hidden embeddings projected to 2-D (PCA) and coloured by class,
a small graph drawn with each node coloured by its predicted class, and the lesson's view of the
inputs (adjacency matrix and feature matrix). Functions return Figures; save_run_figures writes
the ones a finished run gets (curves through deepfit.plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from deepfit.errors import DeepfitError
from deepfit.graph.sources import Graph
from deepfit.history import Row
from deepfit.optional import import_optional
from deepfit.plots import plot_curves, save_figure

NODE_FIGURES = ("curves", "embeddings", "graph", "inputs")
DRAW_LIMIT = 200  # graphs with more nodes are not drawn node by node (an unreadable hairball)
MATRIX_LIMIT = 100  # nodes (rows) shown in the adjacency/feature pictures
UNLABELLED_COLOUR = (0.75, 0.75, 0.75, 1.0)


class NodeFigureError(DeepfitError):
    """A figure this node run cannot show (unknown kind, graph too large to draw)."""


def class_colours(count: int) -> list[tuple[float, float, float, float]]:
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


@torch.inference_mode()
def node_outputs(model: nn.Module, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, H), predicted class (N,)) of every node, model in eval mode, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    x, edges = graph.features.to(device), graph.edge_index.to(device)
    return model.embed(x, edges).float().cpu(), model(x, edges).argmax(1).cpu()  # type: ignore[operator]


def project_2d(embeddings: torch.Tensor) -> np.ndarray:
    """PCA to two components (torch.pca_lowrank centres the data); (N, H) -> (N, 2)."""
    if embeddings.shape[1] < 2:
        return np.column_stack([embeddings[:, 0].numpy(), np.zeros(len(embeddings))])
    _, _, v = torch.pca_lowrank(embeddings, q=2, center=True)
    return ((embeddings - embeddings.mean(0)) @ v[:, :2]).numpy()


def plot_embeddings(embeddings: torch.Tensor, graph: Graph, *, title: str = "Hidden node embeddings (PCA)") -> Figure:
    """Each node at its projected hidden embedding, coloured by its true class (grey: unlabelled);
    training nodes outlined in black."""
    points = project_2d(embeddings)
    colours = class_colours(len(graph.classes))
    fig, ax = plt.subplots(figsize=(8, 6.5), layout="constrained")
    labels = graph.labels.numpy()
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(points[unlabelled, 0], points[unlabelled, 1], s=10, color=UNLABELLED_COLOUR, label="unlabelled")
    for k, name in enumerate(graph.classes):
        chosen = labels == k
        ax.scatter(points[chosen, 0], points[chosen, 1], s=12, color=colours[k], label=name)
    train = graph.train_mask.numpy()
    ax.scatter(points[train, 0], points[train, 1], s=40, facecolors="none", edgecolors="black", linewidths=0.9, label="training node")
    ax.set_title(f"{title}: {graph.name}, {graph.num_nodes} nodes")
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    return fig


def plot_graph(graph: Graph, predicted: torch.Tensor) -> Figure:
    """The graph (spring layout, seeded) with each node coloured by its predicted class; training
    nodes drawn larger, wrongly predicted labelled nodes ringed in red."""
    if graph.num_nodes > DRAW_LIMIT:
        raise NodeFigureError(f"{graph.name} has {graph.num_nodes} nodes; the graph drawing is for graphs of up to {DRAW_LIMIT}")
    nx = import_optional("networkx", extra="graph", purpose="drawing the graph")
    g = nx.Graph()
    g.add_nodes_from(range(graph.num_nodes))
    g.add_edges_from(graph.edge_index.T.tolist())
    layout = nx.spring_layout(g, seed=0)
    colours = class_colours(len(graph.classes))
    labels, train = graph.labels, graph.train_mask
    wrong = (labels >= 0) & (labels != predicted)
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    nx.draw_networkx_edges(g, layout, ax=ax, alpha=0.35)
    nx.draw_networkx_nodes(
        g, layout, ax=ax, node_color=[colours[int(k)] for k in predicted],
        node_size=[380 if bool(t) else 220 for t in train], edgecolors=["red" if bool(w) else "black" for w in wrong],
        linewidths=[2.5 if bool(w) else (1.8 if bool(t) else 0.5) for w, t in zip(wrong, train, strict=True)],
    )  # fmt: skip
    nx.draw_networkx_labels(g, layout, ax=ax, labels=dict(enumerate(graph.node_ids)), font_size=7)
    for k, name in enumerate(graph.classes):
        ax.scatter([], [], color=colours[k], label=f"predicted {name}")
    ax.scatter([], [], facecolors="none", edgecolors="red", linewidths=2, label=f"wrong ({int(wrong.sum())})")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{graph.name}: nodes coloured by predicted class (large: the {int(train.sum())} training nodes)")
    ax.axis("off")
    return fig


def neighbourhood(graph: Graph, limit: int) -> list[int]:
    """All nodes of a small graph in their own order; for a larger one, `limit` nodes reached
    breadth-first from the best-connected node (so the picture has edges in it), sorted by class
    so that edges inside a class gather in blocks on the diagonal."""
    if graph.num_nodes <= limit:
        return list(range(graph.num_nodes))
    neighbours: list[list[int]] = [[] for _ in range(graph.num_nodes)]
    for source, target in graph.edge_index.T.tolist():
        neighbours[source].append(target)
    start = max(range(graph.num_nodes), key=lambda node: len(neighbours[node]))
    chosen: list[int] = []
    queue, seen = [start], {start}
    while queue and len(chosen) < limit:
        node = queue.pop(0)
        chosen.append(node)
        for other in neighbours[node]:
            if other not in seen:
                seen.add(other)
                queue.append(other)
    return sorted(chosen, key=lambda node: (int(graph.labels[node]), node))


def plot_inputs(graph: Graph, *, limit: int = MATRIX_LIMIT) -> Figure:
    """The lesson's view of a graph's inputs: the adjacency matrix A (N x N) and the feature
    matrix X (N x F); for a larger graph, a neighbourhood of `limit` nodes."""
    nodes = neighbourhood(graph, limit)
    n, position = len(nodes), {node: i for i, node in enumerate(nodes)}
    adjacency = np.zeros((n, n))
    for source, target in graph.edge_index.T.tolist():
        if source in position and target in position:
            adjacency[position[source], position[target]] = 1.0
    features = graph.features[nodes].numpy()
    used = np.flatnonzero(features.any(0)) if features.shape[1] > 4 * limit else np.arange(features.shape[1])
    features = features[:, used]  # a wide bag of words: only the columns these nodes use
    part = "" if n == graph.num_nodes else f" of {graph.num_nodes}: a neighbourhood, sorted by class"
    fig, (ax_a, ax_x) = plt.subplots(1, 2, figsize=(13, 6), layout="constrained", gridspec_kw={"width_ratios": [1, 1.3]})
    ax_a.imshow(adjacency, cmap="Greys", interpolation="nearest")
    ax_a.set_title(f"Adjacency matrix A ({n} x {n} nodes{part})", fontsize=10)
    ax_a.set_xlabel("node")
    ax_a.set_ylabel("node")
    image = ax_x.imshow(features, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax_x, fraction=0.046, pad=0.04)
    ax_x.set_title(f"Feature matrix X ({n} nodes x {features.shape[1]} of {graph.num_features} features)", fontsize=10)
    ax_x.set_xlabel("feature" if len(used) == graph.num_features else "feature (the columns these nodes use)")
    ax_x.set_ylabel("node")
    return fig


def node_figure(kind: str, history: list[Row], model: nn.Module, graph: Graph) -> Figure:
    if kind not in NODE_FIGURES:
        raise NodeFigureError(f"unknown figure {kind!r} for a node run; valid: {', '.join(NODE_FIGURES)}")
    if kind == "curves":
        if not history:
            raise NodeFigureError("the run has no finished epoch to draw curves of")
        return plot_curves(history)
    if kind == "inputs":
        return plot_inputs(graph)
    embeddings, predicted = node_outputs(model, graph)
    return plot_embeddings(embeddings, graph) if kind == "embeddings" else plot_graph(graph, predicted)


def save_run_figures(run_dir: Path, history: list[Row], model: nn.Module, graph: Graph) -> list[Path]:
    """curves, embeddings and inputs; the graph drawing too when the graph is small enough."""
    kinds = [kind for kind in NODE_FIGURES if kind != "graph" or graph.num_nodes <= DRAW_LIMIT]
    return [save_figure(node_figure(kind, history, model, graph), run_dir / "plots" / f"{kind}.png") for kind in kinds if history]
