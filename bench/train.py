"""Training benchmark: the lessons' plain-PyTorch loop (torchvision dataset, ToTensor + Normalize,
DataLoader(batch_size=128, shuffle=True, num_workers=2)) against deepfit.fit on the same model
class, data, optimizer, epochs and seed, in one process (on the CPU both under the allocator
setting fit() makes, runtime.keep_freed_memory, so the ratio measures the loops). Run: python bench/train.py [--help]."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` and `deepfit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, Result, Stopwatch, as_dicts, extract_zip, format_table, machine, make_torchvision_root, save_json
from deepfit.config import Config, ModelConfig
from deepfit.errors import DeepfitError
from deepfit.fit import fit
from deepfit.models import build_model
from deepfit.runtime import keep_freed_memory_on, select_device

# The lessons' Normalize constants: the usual published per-channel training-set mean and std.
LESSON_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class Case:
    model: str  # registered deepfit model, used by both sides
    dataset: str  # mnist, fashion-mnist or cifar10 (the JPEG zip)
    epochs: int = 1
    lr: float = 1e-3  # Adam, as in the lessons
    batch_size: int = 128
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.model} {self.dataset}"


CASES = {
    "lenet-fashion": Case("lenet", "fashion-mnist"),
    "cnn_bn-fashion": Case("cnn_bn", "fashion-mnist"),
    "cnn3-mnist": Case("cnn3", "mnist"),
    "cnn_bn-cifar10": Case("cnn_bn", "cifar10"),
}


def source_path(dataset: str, datasets: Path) -> Path:
    return datasets / ("cifar10-jpg.zip" if dataset == "cifar10" else dataset)


def baseline_datasets(case: Case, source: Path, workdir: Path) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """torchvision datasets exactly as the lessons build them (the file layout is prepared untimed)."""
    from torchvision import datasets, transforms

    mean, std = LESSON_STATS[case.dataset]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    if case.dataset == "cifar10":
        folder = extract_zip(source, workdir / "cifar10")
        return datasets.ImageFolder(str(folder / "train"), transform), datasets.ImageFolder(str(folder / "test"), transform)
    root = str(make_torchvision_root(case.dataset, source, workdir / "torchvision"))
    cls = datasets.MNIST if case.dataset == "mnist" else datasets.FashionMNIST
    return cls(root, train=True, transform=transform), cls(root, train=False, transform=transform)


def run_baseline(case: Case, source: Path, workdir: Path, device: torch.device) -> Result:
    """The loop the lessons write, top to bottom."""
    from torch.utils.data import DataLoader

    baseline_datasets(case, source, workdir)  # lay the files out before the clock starts
    clock = Stopwatch()
    train_set, test_set = baseline_datasets(case, source, workdir)
    train_loader = DataLoader(train_set, batch_size=case.batch_size, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=1000, shuffle=False, num_workers=2)
    torch.manual_seed(case.seed)
    shape = tuple(train_set[0][0].shape)
    model = build_model(ModelConfig(name=case.model), input_shape=shape, num_classes=len(train_set.classes)).to(device)  # type: ignore[arg-type,attr-defined]
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=case.lr)
    epoch_seconds = []
    for _ in range(case.epochs):
        epoch_clock = Stopwatch()
        model.train()
        running_loss = 0.0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        epoch_seconds.append(epoch_clock.lap())
    correct = 0
    model.eval()
    with torch.no_grad():
        for images, labels in test_loader:
            images, labels = images.to(device), labels.to(device)
            correct += int((model(images).argmax(1) == labels).sum().item())
    per_epoch = sum(epoch_seconds) / len(epoch_seconds)
    images = len(train_set)  # type: ignore[arg-type]
    result = Result(case.name, "baseline", images / per_epoch, per_epoch, correct / len(test_set), clock.lap())  # type: ignore[arg-type]
    result.last_images_per_s = last_epoch_rate(images, epoch_seconds)
    return result


def last_epoch_rate(images: int, epoch_seconds: Sequence[float]) -> float | None:
    """Images/s of the last epoch alone, where there are 2 or more: a steady state's rate, without
    the first epoch's one-time costs (cuDNN's start, CUDA graphs' capture, worker start-up)."""
    return images / epoch_seconds[-1] if len(epoch_seconds) >= 2 and epoch_seconds[-1] > 0 else None


def deepfit_config(case: Case, source: Path, workdir: Path) -> Config:
    """deepfit's defaults, except what must match the baseline: model, optimizer, lr, batch, epochs, seed."""
    config = Config()
    if case.dataset == "cifar10":
        config.data.name = str(source)
    else:
        config.data.name, config.data.dir = case.dataset, str(source)
    config.data.val_fraction = 0.0  # the baseline trains on the whole training split too
    config.data.batch_size = case.batch_size
    config.model.name = case.model
    config.optim.name, config.optim.lr = "adam", case.lr
    config.sched.name = "none"  # the baseline's constant learning rate
    config.train.epochs, config.train.seed = case.epochs, case.seed
    config.train.progress = False
    config.train.out = str(workdir / "deepfit-run")
    return config


def run_deepfit(case: Case, source: Path, workdir: Path) -> Result:
    clock = Stopwatch()
    result = fit(deepfit_config(case, source, workdir))
    wall = clock.lap()
    seconds = [row["seconds"] for row in result.history]
    per_epoch, images = sum(seconds) / len(seconds), len(result.data.train)
    ours = Result(case.name, "deepfit", images / per_epoch, per_epoch, result.metrics.get("test_acc", float("nan")), wall)
    ours.last_images_per_s = last_epoch_rate(images, seconds)
    return ours


def run_case(case: Case, datasets: Path, device: torch.device) -> list[Result]:
    """Baseline then deepfit on one case; the deepfit row carries the images/s ratio."""
    source = source_path(case.dataset, datasets)
    with tempfile.TemporaryDirectory(prefix="deepfit-bench-") as tmp:
        base = run_baseline(case, source, Path(tmp), device)
        ours = run_deepfit(case, source, Path(tmp))
    ours.ratio = ours.images_per_s / base.images_per_s
    return [base, ours]


def skip_reason(case: Case, datasets: Path) -> str | None:
    from deepfit.models import list_models

    if case.model not in list_models():
        return f"model {case.model} is not registered yet"
    if not source_path(case.dataset, datasets).exists():
        return f"{source_path(case.dataset, datasets)} not found"
    return None


def run_cases(names: Sequence[str], datasets: Path, *, epochs: int | None = None) -> tuple[list[Result], dict[str, str]]:
    """Every named case that can run; returns the rows and why the others were skipped."""
    device = select_device("auto")
    keep_freed_memory_on(device)  # fit() would switch it on for every later baseline: both loops get it from the start
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for name in names:
        case = CASES[name] if epochs is None else Case(**{**CASES[name].__dict__, "epochs": epochs})
        reason = skip_reason(case, datasets)
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            results.extend(run_case(case, datasets, device))
        except DeepfitError as err:  # e.g. the CIFAR zip reader is not there yet
            skipped[name] = str(err)
    return results, skipped


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="folder with mnist/, fashion-mnist/, cifar10-jpg.zip")
    parser.add_argument("--epochs", type=int, default=None, help="override every case's epochs")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/train-*.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results, skipped = run_cases([n for n in args.cases.split(",") if n], args.datasets, epochs=args.epochs)
    print(format_table(results))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if not args.no_save:
        print(f"wrote {save_json({'machine': machine(), 'train': as_dicts(results), 'skipped': skipped}, 'train')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
