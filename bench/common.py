"""Shared pieces of the benchmarks: dataset layouts the baselines expect, result rows, the table."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATASETS = Path(os.environ.get("DEEPFIT_DATASETS", REPO.parent / "shared" / "datasets"))


def deepfit_command() -> list[str]:
    """`deepfit` as a user starts it: the console script beside this Python, or `python -m deepfit`
    where the package is not installed (PYTHONPATH=src on the GPU machines); run it with child_env()."""
    script = Path(sys.executable).with_name("deepfit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepfit"]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository's src/ and root first on an absolute PYTHONPATH, for
    the processes a benchmark starts in other folders; `extra` variables added."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# torchvision's folder name under <root>/ for each IDX dataset (it reads <root>/<folder>/raw/)
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Result:
    """One implementation's figures on one benchmark case."""

    case: str  # e.g. "lenet fashion-mnist"
    impl: str  # "baseline" or "deepfit"
    images_per_s: float  # training images per second of epoch time
    seconds_per_epoch: float  # mean wall seconds of one training epoch
    test_acc: float  # 0..1 on the test split after training
    wall_s: float  # whole case: data loading + training + test evaluation
    ratio: float = 1.0  # images_per_s / the baseline's images_per_s
    last_images_per_s: float | None = None  # the last epoch's alone, with 2 or more: the first epoch's one-time costs left out
    notes: dict[str, Any] = field(default_factory=dict)


def make_torchvision_root(name: str, source: Path, root: Path) -> Path:
    """Lay out `source`'s IDX files (.gz or plain) as torchvision's <root>/<Folder>/raw/ uncompressed."""
    raw = root / TORCHVISION_FOLDERS[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in IDX_STEMS:
        target = raw / stem
        if target.exists():
            continue
        if (source / stem).exists():
            shutil.copyfile(source / stem, target)
        else:
            with gzip.open(source / f"{stem}.gz", "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return root


def extract_zip(path: Path, into: Path) -> Path:
    """Unpack an image-folder zip (train/, test/ inside, perhaps under one top folder); returns the folder holding train/."""
    with zipfile.ZipFile(path) as archive:
        archive.extractall(into)
    for candidate in [into, *sorted(p for p in into.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir():
            return candidate
    raise FileNotFoundError(f"{path} holds no train/ folder")


class Stopwatch:
    """Wall seconds since creation; `lap()` returns and restarts."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return seconds


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_table(results: list[Result]) -> str:
    header = f"{'case':30s} {'impl':9s} {'images/s':>9s} {'s/epoch':>8s} {'test acc':>9s} {'wall s':>7s} {'ratio':>6s}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.case:30s} {r.impl:9s} {r.images_per_s:9.0f} {r.seconds_per_epoch:8.2f} {r.test_acc * 100:8.2f}% {r.wall_s:7.1f} {r.ratio:5.2f}x"
        )
    return "\n".join(lines)


def save_json(payload: dict[str, Any], name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def as_dicts(results: list[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def doc_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring's first line as the description, the rest (usage,
    what it measures) shown verbatim after the options."""
    lines = (doc or "").splitlines()
    return argparse.ArgumentParser(
        description=lines[0] if lines else None, epilog="\n".join(lines[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
