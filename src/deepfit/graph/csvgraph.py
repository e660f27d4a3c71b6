"""User graphs from CSV: an edge list (header `source,target`, one undirected edge per row) and a
node table (header `id,label,feature...`; an empty label marks an unlabelled node; without feature
columns each node's feature is its one-hot identity). The labelled nodes are split by seed."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import torch

from deepfit.csvtext import csv_lines
from deepfit.errors import DataError
from deepfit.graph.sources import UNLABELLED, Graph

SWAPPED = " (the edge list and the node table look swapped: --data EDGES.csv --data.nodes NODES.csv)"


def resolve_csv_paths(name: str, nodes: str | None) -> tuple[Path, Path]:
    """(edges.csv, nodes.csv) from `--data FOLDER` (holding both) or `--data EDGES --data.nodes NODES`."""
    path = Path(name).expanduser()
    if path.is_dir():
        edges, table = path / "edges.csv", Path(nodes).expanduser() if nodes else path / "nodes.csv"
    elif path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"graph file {path} does not exist")
        if nodes is None:
            raise DataError(f"{name}: a node task's edge-list CSV needs its node table: --data.nodes NODES.csv (id,label,feature...)")
        edges, table = path, Path(nodes).expanduser()
    else:
        raise DataError(
            f"unknown graph {name!r}; valid: cora, karate, an edge-list .csv with --data.nodes, or a folder of edges.csv + nodes.csv"
        )
    for file in (edges, table):
        if not file.is_file():
            raise DataError(f"graph file {file} does not exist")
    return edges, table


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header (lower-cased, stripped) and the non-empty rows of a CSV file."""
    try:
        rows = [[cell.strip() for cell in row] for _, row in csv_lines(path.read_text(encoding="utf-8-sig"))]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read graph file {path}: {err}") from None
    if not rows:
        raise DataError(f"graph file {path} is empty")
    return [cell.lower() for cell in rows[0]], rows[1:]


def load_csv_graph(edges_path: Path, nodes_path: Path, *, val_fraction: float, test_fraction: float, seed: int) -> Graph:
    node_ids, labels, classes, features = read_node_table(nodes_path)
    index = {node: i for i, node in enumerate(node_ids)}
    edge_index = read_edges(edges_path, index)
    train, val, test = split_labelled(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, path=nodes_path)
    return Graph(edges_path.stem, features, edge_index, labels, train, val, test, classes, node_ids)


def read_node_table(path: Path) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """ids, labels (UNLABELLED where empty), sorted class names, features (N, F) float32."""
    header, rows = read_rows(path)
    if header[:2] != ["id", "label"]:
        swapped = SWAPPED if header[:2] == ["source", "target"] else ""
        raise DataError(
            f"{path}: the node table's header must start with id,label (then feature columns); got {','.join(header[:3])}{swapped}"
        )
    if not rows:
        raise DataError(f"{path}: the node table has no nodes")
    ids = [row[0] for row in rows]
    duplicates = sorted(node for node, count in Counter(ids).items() if count > 1)  # ids.count() per id took minutes on 100k ids
    if duplicates:
        raise DataError(f"{path}: node ids must be unique; repeated: {', '.join(duplicates[:5])}")
    names = [row[1] if len(row) > 1 else "" for row in rows]
    classes = sorted({name for name in names if name})
    if len(classes) < 2:
        raise DataError(f"{path}: node classification needs labelled nodes of at least 2 classes; found {len(classes)}")
    labels = torch.tensor([classes.index(name) if name else UNLABELLED for name in names])
    width = len(header) - 2
    features = parse_features(rows, width, path) if width else torch.eye(len(rows))
    return ids, labels, classes, features


def parse_features(rows: list[list[str]], width: int, path: Path) -> torch.Tensor:
    values = []
    for line, row in enumerate(rows, start=2):
        if len(row) != width + 2:
            raise DataError(f"{path} line {line}: {len(row)} columns, the header has {width + 2}")
        try:
            numbers = [float(cell) for cell in row[2:]]
        except ValueError:
            raise DataError(f"{path} line {line}: feature values must be numbers; got {','.join(row[2:])[:80]!r}") from None
        if not all(math.isfinite(x) for x in numbers):
            raise DataError(f"{path} line {line}: feature values must be finite")
        values.append(numbers)
    return torch.tensor(values, dtype=torch.float32)


def read_edges(path: Path, index: dict[str, int]) -> torch.Tensor:
    """(2, E) with both directions of every edge, self-loops dropped (the convolution adds its own)."""
    header, rows = read_rows(path)
    if header[:2] != ["source", "target"]:
        swapped = SWAPPED if header[:2] == ["id", "label"] else ""
        raise DataError(f"{path}: the edge list's header must be source,target; got {','.join(header[:3])}{swapped}")
    pairs = []
    for line, row in enumerate(rows, start=2):
        if len(row) < 2:
            raise DataError(f"{path} line {line}: an edge needs a source and a target")
        unknown = [node for node in row[:2] if node not in index]
        if unknown:
            raise DataError(f"{path} line {line}: node {unknown[0]!r} is not in the node table")
        if row[0] != row[1]:
            pairs.append((index[row[0]], index[row[1]]))
    edges = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    both = torch.cat([edges, edges.flip(0)], dim=1)
    return torch.unique(both, dim=1) if both.numel() else both  # an edge listed both ways is one edge


def split_labelled(
    labels: torch.Tensor, *, val_fraction: float, test_fraction: float, seed: int, path: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded masks over the labelled nodes: test_fraction for test, val_fraction for val, the rest trains."""
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= val_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataError(f"data.val_fraction ({val_fraction}) + data.node_test_fraction ({test_fraction}) must stay below 1")
    labelled = (labels >= 0).nonzero().flatten()
    order = labelled[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))]
    n_test, n_val = round(test_fraction * len(order)), round(val_fraction * len(order))
    if len(order) - n_test - n_val < 1:
        raise DataError(f"{path}: {len(order)} labelled node(s) leave none to train on; label more nodes or lower the fractions")
    masks = [torch.zeros(len(labels), dtype=torch.bool) for _ in range(3)]
    masks[2][order[:n_test]] = True
    masks[1][order[n_test : n_test + n_val]] = True
    masks[0][order[n_test + n_val :]] = True
    return masks[0], masks[1], masks[2]
