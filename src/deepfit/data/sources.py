"""Named datasets as data: a table of files, class names and flip safety, plus where to find them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepfit.data.bundle import ImageSet, SourceData
from deepfit.data.idx import read_idx_images, read_idx_labels
from deepfit.errors import DataError

DATASETS_ENV = "DEEPFIT_DATASETS"  # a folder holding <name>/ sub-folders (mnist/, fashion-mnist/, ...)
SYSTEM_DIR = Path("/usr/share/datasets")  # where Debian's dataset-fashion-mnist installs
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-format dataset: the variants differ only by this row."""

    name: str
    torchvision_folder: str  # <root>/<this>/raw is where torchvision keeps the files
    classes: tuple[str, ...]
    flip_ok: bool


IDX_DATASETS = {
    "mnist": IdxDataset("mnist", "MNIST", tuple(str(d) for d in range(10)), flip_ok=False),
    "fashion-mnist": IdxDataset(
        "fashion-mnist",
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        flip_ok=False,  # every shoe faces left: test-time flips took a run from 89.44% to 79.00% (issue 12)
    ),
}


def load_digits_source(*, seed: int = 0, test_fraction: float = 0.2) -> SourceData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), with a fixed stratified test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the usual 0..255 uint8 range. (N, 8, 8) -> (N, 1, 8, 8)
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(10):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_mask[members[: round(len(members) * test_fraction)]] = True
    return SourceData(
        train=ImageSet(images[~test_mask], labels[~test_mask]),
        test=ImageSet(images[test_mask], labels[test_mask]),
        classes=[str(d) for d in range(10)],
        flip_ok=False,
        origin="scikit-learn load_digits (embedded)",
    )


def load_idx_source(name: str, *, data_dir: str | None, download: bool) -> SourceData:
    """MNIST or Fashion-MNIST from local IDX files, or torchvision's download when asked."""
    spec = IDX_DATASETS[name]
    folder = find_idx_folder(spec, data_dir)
    if folder is None and download:
        folder = download_idx(spec, data_dir)
    if folder is None:
        raise DataError(not_found_message(spec, data_dir))
    paths = {key: required_idx_path(folder, stem) for key, stem in IDX_FILES.items()}
    train = ImageSet(read_idx_images(paths["train_images"]), read_idx_labels(paths["train_labels"]))
    test = ImageSet(read_idx_images(paths["test_images"]), read_idx_labels(paths["test_labels"]))
    for split, images in (("train", train), ("test", test)):
        check_pairs(folder, split, images, len(spec.classes))
    return SourceData(train=train, test=test, classes=list(spec.classes), flip_ok=spec.flip_ok, origin=str(folder))


def check_pairs(folder: Path, split: str, images: ImageSet, num_classes: int) -> None:
    if images.images.shape[0] != images.labels.shape[0]:
        raise DataError(f"{folder}: {split} has {images.images.shape[0]} images but {images.labels.shape[0]} labels")
    if len(images) and (images.labels.min() < 0 or images.labels.max() >= num_classes):
        raise DataError(f"{folder}: {split} labels must be in 0..{num_classes - 1}")


def candidate_folders(spec: IdxDataset, data_dir: str | None) -> list[Path]:
    """Where to look, in order: --data-dir, $DEEPFIT_DATASETS/<name>, /usr/share/datasets/<name>."""
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"--data-dir {data_dir} does not exist or is not a folder")
        return [root, root / spec.name, root / spec.torchvision_folder / "raw"]
    found = []
    if os.environ.get(DATASETS_ENV):
        found.append(Path(os.environ[DATASETS_ENV]) / spec.name)
    found.append(SYSTEM_DIR / spec.name)
    return found


def find_idx_folder(spec: IdxDataset, data_dir: str | None) -> Path | None:
    """The first candidate folder holding any IDX file; a partial folder is reported, not skipped."""
    for folder in candidate_folders(spec, data_dir):
        present = [stem for stem in IDX_FILES.values() if idx_path(folder, stem)]
        if present and len(present) < len(IDX_FILES):
            missing = sorted(set(IDX_FILES.values()) - set(present))
            raise DataError(f"{folder} is missing {', '.join(m + '[.gz]' for m in missing)}")
        if present:
            return folder
    return None


def idx_path(folder: Path, stem: str) -> Path | None:
    """The plain or .gz IDX file `stem` in `folder`, if present."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def required_idx_path(folder: Path, stem: str) -> Path:
    path = idx_path(folder, stem)
    if path is None:
        raise DataError(f"{folder} has no {stem}[.gz]")
    return path


def not_found_message(spec: IdxDataset, data_dir: str | None) -> str:
    places = ", ".join(str(p) for p in candidate_folders(spec, data_dir))
    return f"{spec.name} IDX files not found (looked in {places}); pass --data-dir DIR, set ${DATASETS_ENV}, or add --download"


def download_idx(spec: IdxDataset, data_dir: str | None) -> Path:
    """torchvision's own download (needs the internet), into --data-dir or the deepfit cache."""
    from torchvision import datasets

    from deepfit.runtime import default_cache_dir

    root = Path(data_dir) if data_dir else Path(default_cache_dir()) / "datasets"
    cls = datasets.MNIST if spec.name == "mnist" else datasets.FashionMNIST
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as err:
        raise DataError(f"downloading {spec.name} failed: {err}") from None
    return root / spec.torchvision_folder / "raw"
