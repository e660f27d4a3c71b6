"""Node classification on Planetoid Cora (issue 16): deepfit's gcn and mlp over several seeds,
test accuracy mean and standard deviation, and the wall time of the training epochs, beside the
plain PyTorch Geometric loop with the same settings (Kipf & Welling: 2 x GCNConv, 16 hidden,
dropout 0.5, Adam lr 0.01, weight decay 5e-4 on the first layer, 200 epochs, test accuracy at the
best validation accuracy). Run: python bench/graph.py [--seeds 10] [--threads 1] [--work DIR]."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.common import DATASETS
from deepfit.config import set_value
from deepfit.graph import build_graph, fit_node, node_defaults


def deepfit_run(model: str, seed: int, threads: int, work: Path) -> tuple[float, float]:
    """(test accuracy, seconds of training epochs) of one deepfit run."""
    config = node_defaults()
    settings = {"data.name": "cora", "data.dir": str(DATASETS / "planetoid"), "model.name": model, "train.seed": seed,
                "train.threads": threads, "train.out": str(work / f"{model}-{seed}")}  # fmt: skip
    for key, value in settings.items():
        set_value(config, key, value)
    result = fit_node(config)
    return result.metrics["test_acc"], result.train_seconds


def baseline_run(seed: int) -> tuple[float, float]:
    """The PyG example loop (examples/gcn.py's shape), dense features, test accuracy at best val."""
    from torch_geometric.nn import GCNConv

    graph = build_graph("cora", data_dir=str(DATASETS / "planetoid"))
    torch.manual_seed(seed)
    conv1, conv2 = GCNConv(graph.num_features, 16, cached=True), GCNConv(16, len(graph.classes), cached=True)
    optimizer = torch.optim.Adam([{"params": conv1.parameters(), "weight_decay": 5e-4}, {"params": conv2.parameters()}], lr=0.01)
    x, edges, y = graph.features, graph.edge_index, graph.labels

    def forward(training: bool) -> torch.Tensor:
        h = F.relu(conv1(F.dropout(x, 0.5, training), edges))
        return conv2(F.dropout(h, 0.5, training), edges)

    best_val, test_at_best, started = -1.0, 0.0, time.monotonic()
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(forward(True)[graph.train_mask], y[graph.train_mask]).backward()
        optimizer.step()
        with torch.no_grad():
            pred = forward(False).argmax(1)
        val = float((pred[graph.val_mask] == y[graph.val_mask]).float().mean())
        if val > best_val:
            best_val, test_at_best = val, float((pred[graph.test_mask] == y[graph.test_mask]).float().mean())
    return test_at_best, time.monotonic() - started


def summary(name: str, runs: list[tuple[float, float]]) -> str:
    accs = [acc for acc, _ in runs]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    seconds = sorted(s for _, s in runs)
    return (f"{name:<22} test acc {statistics.mean(accs):.2%} +- {spread:.2%} over {len(accs)} seed(s) "
            f"(min {min(accs):.2%}, max {max(accs):.2%}); training s median {statistics.median(seconds):.2f}, "
            f"min {seconds[0]:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 measured faster on the shared 2 cores)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="deepfit-graph-"))
    rows = {"deepfit gcn": [deepfit_run("gcn", s, args.threads, work) for s in range(args.seeds)]}
    for seed, (acc, seconds) in enumerate(rows["deepfit gcn"]):
        print(f"gcn seed {seed}: {acc:.2%} in {seconds:.2f} s", flush=True)
    rows["deepfit mlp"] = [deepfit_run("mlp", s, args.threads, work) for s in range(args.seeds)]
    if not args.skip_baseline:
        rows["plain PyG loop (gcn)"] = [baseline_run(s) for s in range(min(args.seeds, 3))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), runs in {work}")
    for name, runs in rows.items():
        print(summary(name, runs))


if __name__ == "__main__":
    main()
