"""Graphs for node classification: the Planetoid Cora files, Zachary's karate club (embedded),
and user graphs from two CSV files. Each becomes a Graph: node features, undirected edges,
labels (-1 where unknown) and boolean train/val/test node masks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from deepfit.errors import DataError
from deepfit.optional import import_optional
from deepfit.registry import Registry
from deepfit.runtime import default_cache_dir

UNLABELLED = -1  # label of a node whose class is unknown (predicted, never trained or scored on)


@dataclass
class Graph:
    """One graph, transductive: every node's features are seen, only the masked labels are used."""

    name: str
    features: torch.Tensor  # (N, F) float32
    edge_index: torch.Tensor  # (2, E) int64, each undirected edge in both directions
    labels: torch.Tensor  # (N,) int64 class index, UNLABELLED where unknown
    train_mask: torch.Tensor  # (N,) bool: labels the loss sees
    val_mask: torch.Tensor  # (N,) bool: early stopping and best.pt
    test_mask: torch.Tensor  # (N,) bool: scored once, at the end
    classes: list[str]
    node_ids: list[str]  # each node's name as the user knows it (row order of features)

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def summary(self) -> str:
        """One line: size, features and the split, as train and `deepfit data info` say it."""
        return (f"graph {self.name}: {self.num_nodes} nodes, {self.edge_index.shape[1] // 2} edges, {self.num_features} features; "
                f"{int(self.train_mask.sum())} train, {int(self.val_mask.sum())} val, {int(self.test_mask.sum())} test nodes")  # fmt: skip

    def split(self, name: str) -> torch.Tensor:
        """Node indices of 'train', 'val', 'test' or 'all' (every labelled node)."""
        masks = {"train": self.train_mask, "val": self.val_mask, "test": self.test_mask, "all": self.labels >= 0}
        return masks[name].nonzero().flatten()


def import_pyg(module: str, *, purpose: str) -> ModuleType:
    """A PyTorch Geometric module (the `graph` extra), without the FutureWarning its import
    prints about torch.jit.script on every command."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
        return import_optional(module, extra="graph", purpose=purpose)


GraphBuilder = Callable[..., Graph]
GRAPHS: Registry[GraphBuilder] = Registry("graph dataset")

CORA_FILES = tuple(f"ind.cora.{part}" for part in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index"))


@GRAPHS.register("cora")
def build_cora(*, data_dir: str | None, cache_dir: str | None, **_: object) -> Graph:
    """Planetoid Cora with its public split (140 train, 500 val, 1000 test nodes), features
    row-normalised as in Kipf & Welling. PyG's reader unpickles the eight known raw files only;
    its processed/ folder is written to deepfit's cache, never beside the (read-only) data."""
    raw = find_cora_raw(data_dir)
    planetoid = import_pyg("torch_geometric.datasets", purpose="--data cora")
    root = planetoid_root(raw, cache_dir)
    with quiet_processing():
        data = planetoid.Planetoid(str(root), "Cora")[0]
    features = data.x / data.x.sum(1, keepdim=True).clamp(min=1.0)  # NormalizeFeatures: rows sum to 1
    node_ids = [str(i) for i in range(data.num_nodes)]
    return Graph("cora", features, data.edge_index, data.y, data.train_mask, data.val_mask, data.test_mask, list(CORA_CLASSES), node_ids)


# Planetoid stores one-hot labels without names; these follow from the class sizes, which all
# differ (351, 217, 418, 818, 426, 298, 180 nodes against the Cora paper's table).
CORA_CLASSES = (
    "Theory",
    "Reinforcement_Learning",
    "Genetic_Algorithms",
    "Neural_Networks",
    "Probabilistic_Methods",
    "Case_Based",
    "Rule_Learning",
)


def find_cora_raw(data_dir: str | None) -> Path:
    """The folder holding the eight ind.cora.* files: DIR/Cora/raw, DIR/raw or DIR itself, for
    --data-dir, then $DEEPFIT_DATASETS/planetoid and $DEEPFIT_DATASETS/cora."""
    bases = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get("DEEPFIT_DATASETS"):
        datasets = Path(os.environ["DEEPFIT_DATASETS"])
        bases += [datasets / "planetoid", datasets / "cora"]
    for base in bases:
        for candidate in (base / "Cora" / "raw", base / "raw", base):
            if all((candidate / name).is_file() for name in CORA_FILES):
                return candidate
    looked = f" (looked in {', '.join(str(b) for b in bases)})" if bases else ""
    raise DataError(
        f"cora: the Planetoid raw files ({', '.join(CORA_FILES)}) were not found{looked}; "
        "pass --data-dir DIR (the folder holding them, or its Cora/raw) or set $DEEPFIT_DATASETS"
    )


@contextlib.contextmanager
def quiet_processing() -> Iterator[None]:
    """PyG prints 'Processing...' and 'Done!' to stderr the first time it processes a dataset into
    deepfit's cache; everything else it writes there (its warnings) is passed on as written."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        rest = [line for line in captured.getvalue().splitlines(keepends=True) if line.strip() not in ("Processing...", "Done!")]
        sys.stderr.write("".join(rest))


def planetoid_root(raw: Path, cache_dir: str | None) -> Path:
    """A cache folder <cache>/planetoid-<fingerprint>/Cora/raw linking to the raw files, so PyG
    writes processed/ there; the fingerprint (names, sizes, mtimes) makes changed files reprocess."""
    stats = [(name, (raw / name).stat().st_size, (raw / name).stat().st_mtime_ns) for name in CORA_FILES]
    key = hashlib.sha256(repr((str(raw.resolve()), stats)).encode()).hexdigest()[:16]
    root = Path(cache_dir or default_cache_dir()) / f"planetoid-{key}"
    target = root / "Cora" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in CORA_FILES:
        link = target / name
        if not link.exists():
            try:
                link.symlink_to((raw / name).resolve())
            except OSError:  # no symlinks here (some filesystems): copy the small file instead
                shutil.copyfile(raw / name, link)
    return root


@GRAPHS.register("karate")
def build_karate(**_: object) -> Graph:
    """Zachary's karate club (34 members, 78 friendships; networkx ships it): the two factions
    after the split are the classes. As in Kipf's karate demo each node's feature is its one-hot
    identity; one labelled node per faction (0, the instructor Mr. Hi, and 33, the officer)
    trains, and the other 32 nodes are the test nodes. No validation nodes."""
    nx = import_optional("networkx", extra="graph", purpose="--data karate")
    g = nx.karate_club_graph()
    classes = ["Mr. Hi", "Officer"]
    labels = torch.tensor([classes.index(g.nodes[n]["club"]) for n in g.nodes])
    edges = torch.tensor(list(g.edges), dtype=torch.long).T
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)
    n = g.number_of_nodes()
    train = torch.zeros(n, dtype=torch.bool)
    train[[0, 33]] = True
    val = torch.zeros(n, dtype=torch.bool)
    return Graph("karate", torch.eye(n), edge_index, labels, train, val, ~train, classes, [str(i) for i in g.nodes])


def build_graph(name: str, *, data_dir: str | None = None, cache_dir: str | None = None, nodes: str | None = None,
                val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> Graph:  # fmt: skip
    """The registered graph `name`, or a user graph: `name` an edge-list CSV with `nodes` its
    node table, or a folder holding edges.csv and nodes.csv."""
    if name in GRAPHS:
        return GRAPHS.get(name)(data_dir=data_dir, cache_dir=cache_dir)
    from deepfit.graph.csvgraph import load_csv_graph, resolve_csv_paths

    edges, table = resolve_csv_paths(name, nodes)
    return load_csv_graph(edges, table, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def list_graphs() -> list[str]:
    return GRAPHS.names()
