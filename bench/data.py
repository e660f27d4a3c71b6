"""Data-delivery benchmark: one epoch of normalised training batches (batch 128, shuffled, CPU)
from the lessons' loader against deepfit's, in one process on the same data.

Baseline: a torchvision dataset with ToTensor + Normalize in DataLoader(batch_size=128,
shuffle=True, num_workers=2). Fashion-MNIST: torchvision.datasets.FashionMNIST (the IDX files laid
out uncompressed first, untimed). CIFAR-10 JPEG zip: torchvision.datasets.ImageFolder on the zip
extracted to a temp folder first (untimed; ImageFolder cannot read a zip).
deepfit: build_data (the first run decodes into a cold temp cache, the cached run loads it) then
one BatchLoader epoch; for the zip also the streaming pipeline (2 workers, decode per batch).
images/s counts the whole run (building the dataset + the epoch); ratio = deepfit / baseline.

    .venv/bin/python bench/data.py [--datasets DIR] [--only fashion-mnist,cifar10] [--repeat N] [--no-save]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `deepfit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, Stopwatch, extract_zip, machine, make_torchvision_root, save_json
from deepfit.config import DataConfig
from deepfit.data import DataBundle, build_data, build_loader, load_source

BATCH = 128
LESSON_STATS = {"fashion-mnist": ((0.2860,), (0.3530,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
TARGETS = {"cached_ratio": 20.0, "first_decode_images_per_s": 10_000.0, "cache_load_s": 0.5}


@dataclass
class Row:
    """One way of delivering one epoch of one dataset."""

    dataset: str
    impl: str  # baseline, deepfit first run, deepfit cached, deepfit stream
    images: int  # training images in the epoch
    build_s: float  # constructing the dataset: torchvision init, decode + cache write, cache load
    epoch_s: float  # iterating every batch once
    ratio: float = 1.0  # images_per_s / the baseline's
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / (self.build_s + self.epoch_s)

    @property
    def epoch_images_per_s(self) -> float:
        return self.images / self.epoch_s


def drain(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Iterate an epoch; the count of images proves every batch was produced."""
    return sum(len(y) for _, y in batches)


def best(rows: list[Row]) -> Row:
    """The fastest repeat (the machine is shared: slower repeats measure the neighbours)."""
    return min(rows, key=lambda r: r.build_s + r.epoch_s)


def baseline_dataset(name: str, source: Path, workdir: Path) -> torch.utils.data.Dataset[Any]:
    from torchvision import datasets, transforms

    mean, std = LESSON_STATS["cifar10" if name == "cifar10" else name]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    if name == "cifar10":
        return datasets.ImageFolder(str(extract_zip(source, workdir / "cifar10") / "train"), transform)
    return datasets.FashionMNIST(str(make_torchvision_root(name, source, workdir / "torchvision")), train=True, transform=transform)


def run_baseline(name: str, source: Path, workdir: Path) -> Row:
    from torch.utils.data import DataLoader

    baseline_dataset(name, source, workdir)  # lay the files out before the clock starts
    clock = Stopwatch()
    dataset = baseline_dataset(name, source, workdir)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    build = clock.lap()
    images = drain(loader)
    return Row(name, "baseline", images, build, clock.lap())


def deepfit_config(name: str, source: Path, cache: Path, pipeline: str = "memory") -> DataConfig:
    config = DataConfig(val_fraction=0.0, batch_size=BATCH, cache_dir=str(cache), pipeline=pipeline)  # type: ignore[arg-type]
    if name == "cifar10":
        config.name = str(source)
    else:
        config.name, config.dir = name, str(source)
    return config


def deepfit_epoch(bundle: DataBundle, num_workers: int = 2) -> int:
    loader = build_loader(
        bundle.train, batch_size=BATCH, mean=bundle.mean, std=bundle.std, device=torch.device("cpu"), shuffle=True, num_workers=num_workers
    )
    return drain(loader)


def run_deepfit(name: str, source: Path, cache: Path, impl: str, pipeline: str = "memory") -> Row:
    clock = Stopwatch()
    bundle = build_data(deepfit_config(name, source, cache, pipeline))
    build = clock.lap()
    images = deepfit_epoch(bundle)
    return Row(name, impl, images, build, clock.lap())


def decode_figures(name: str, source: Path, workdir: Path) -> dict[str, float]:
    """The source decoded into a cold cache (files/s, listing to cache write), then that cache loaded (s)."""
    config = deepfit_config(name, source, workdir / "decode-cache")
    clock = Stopwatch()
    decoded = load_source(config, seed=0)
    decode_s = clock.lap()
    load_source(config, seed=0)
    load_s = clock.lap()
    files = len(decoded.train) + (len(decoded.test) if decoded.test is not None else 0)
    return {"files": files, "first_decode_s": decode_s, "first_decode_images_per_s": files / decode_s, "cache_load_s": load_s}


def run_dataset(name: str, source: Path, repeat: int) -> tuple[list[Row], dict[str, float]]:
    """Baseline, deepfit first run (cold cache each repeat), deepfit cached, and for the zip the stream."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="deepfit-bench-data-") as tmp:
        work = Path(tmp)
        base = best([run_baseline(name, source, work) for _ in range(repeat)])
        rows.append(base)
        rows.append(best([run_deepfit(name, source, work / f"cold-{i}", "deepfit first run") for i in range(repeat)]))
        rows.append(best([run_deepfit(name, source, work / "cold-0", "deepfit cached") for _ in range(repeat)]))
        if name == "cifar10":
            rows.append(best([run_deepfit(name, source, work / "cold-0", "deepfit stream", pipeline="stream") for _ in range(repeat)]))
        figures = decode_figures(name, source, work)
    for row in rows:
        row.ratio = row.images_per_s / base.images_per_s
        row.notes["epoch_ratio"] = row.epoch_images_per_s / base.epoch_images_per_s
    return rows, figures


def format_rows(rows: list[Row]) -> str:
    header = f"{'dataset':14s} {'impl':18s} {'images':>7s} {'build s':>8s} {'epoch s':>8s} {'images/s':>9s} {'ratio':>7s} {'epoch im/s':>11s} {'ratio':>7s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.dataset:14s} {r.impl:18s} {r.images:7d} {r.build_s:8.2f} {r.epoch_s:8.2f} {r.images_per_s:9.0f} {r.ratio:6.1f}x"
            f" {r.epoch_images_per_s:11.0f} {r.notes['epoch_ratio']:6.1f}x"
        )
    return "\n".join(lines)


def format_figures(name: str, figures: dict[str, float]) -> str:
    return (
        f"{name}: first decode of {figures['files']:,.0f} files {figures['first_decode_s']:.2f} s = {figures['first_decode_images_per_s']:,.0f} images/s"
        f" (target >= {TARGETS['first_decode_images_per_s']:,.0f} for the CIFAR-10 zip); cache load {figures['cache_load_s']:.3f} s"
        f" (target <= {TARGETS['cache_load_s']})"
    )


SOURCES = {"fashion-mnist": "fashion-mnist", "cifar10": "cifar10-jpg.zip"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="folder with fashion-mnist/ and cifar10-jpg.zip")
    parser.add_argument("--only", default=",".join(SOURCES), help=f"comma-separated, from {', '.join(SOURCES)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row; the fastest is kept (the CPU is shared)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads in this process (0: torch's default, all cores)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no bench/results/data-*.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    figures: dict[str, dict[str, float]] = {}
    for name in [n for n in args.only.split(",") if n]:
        source = args.datasets / SOURCES[name]
        if not source.exists():
            print(f"skipped {name}: {source} not found")
            continue
        found, figures[name] = run_dataset(name, source, args.repeat)
        rows += found
    print(
        f"one epoch of normalised batches (batch 128, shuffled, CPU, {torch.get_num_threads()} torch threads); images/s over build + epoch; ratio vs baseline"
    )
    print(format_rows(rows))
    for name, numbers in figures.items():
        print(format_figures(name, numbers))
    if not args.no_save:
        payload = {
            "machine": machine(),
            "rows": [asdict(r) | {"images_per_s": r.images_per_s} for r in rows],
            "decode": figures,
            "targets": TARGETS,
        }
        print(f"wrote {save_json(payload, 'data')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
