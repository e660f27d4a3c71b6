"""Inference from a checkpoint alone: `Predictor.from_checkpoint(path).predict(inputs)` for paths,
PIL images, numpy arrays and tensors, and `predict_paths` for files, folders, globs, the images of
a .zip and CSV pixel rows (what `deepfit predict` runs). Images are prepared exactly as in
training: decoded to the checkpoint's channels and H x W, then normalised by the same BatchLoader code."""

from __future__ import annotations

import glob
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.columns import display_width, pad
from deepfit.engine import predict_logits
from deepfit.errors import DataError, DeepfitError
from deepfit.runtime import select_device, set_threads
from deepfit.trained import TrainedModel, load_trained_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm")
CSV_SUFFIX = ".csv"
ARCHIVE_SUFFIX = ".zip"
ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]  # (items, description, total) -> items
PROGRESS_MIN = 100  # fewer files than this get no progress bar
CHUNK = 2048  # decoded images held before they are classified


class PredictError(DeepfitError):
    """An input that cannot be turned into an image for the model."""


@dataclass
class Prediction:
    path: str | None  # the file (CSV rows: "file.csv:N", N counted from 1), None for in-memory input
    label: str  # the most likely class
    index: int  # its position in the checkpoint's class list
    probability: float  # its softmax probability
    topk: list[tuple[str, float]]  # the k most likely (label, probability), most likely first

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "index": self.index,
            "probability": self.probability,
            "topk": [{"label": label, "probability": p} for label, p in self.topk],
        }


@dataclass
class Failure:
    path: str
    reason: str


@dataclass
class PathPredictions:
    predictions: list[Prediction]
    failures: list[Failure] = field(default_factory=list)  # inputs that could not be read, with why


class Predictor:
    """A trained model ready to classify images; build it with `Predictor.from_checkpoint`."""

    def __init__(self, trained: TrainedModel, *, batch_size: int = 256, tta: str | None = None) -> None:
        self.trained = trained
        self.batch_size = batch_size
        self.tta = trained.tta_mode(tta)  # default: the run's train.tta, as its test score and evaluate use

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "auto", batch_size: int = 256, threads: int = 0, model: torch.nn.Module | None = None,
        tta: str | None = None,
    ) -> Predictor:  # fmt: skip
        """threads > 0 sets torch's (process-wide) CPU threads: for one image at a time on a busy
        machine, 1 thread measured 0.6 ms against 60 ms with 2 (bench/predict.py). `model`: your
        own nn.Module for a run trained with one (its weights are loaded into it). `tta`: none,
        flip, shift or flip-shift (default: the run's own train.tta)."""
        set_threads(threads)
        return cls(load_trained_model(path, device=select_device(device), model=model), batch_size=batch_size, tta=tta)

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.trained.input_shape

    def predict(self, inputs: Any, *, topk: int = 5) -> list[Prediction]:
        """One prediction per image. `inputs`: a path, PIL image, array or tensor, or a list of them;
        a 4-D array/tensor is a batch. Arrays: uint8 0..255 or float 0..1; (H, W), (H, W, C) or
        (C, H, W) (numpy prefers channels-last, torch channels-first when both could fit)."""
        images, paths = [], []
        for item in as_items(inputs):
            images.append(self.to_pixels(item))
            paths.append(str(item) if isinstance(item, (str, Path)) else None)
        return self.classify(torch.stack(images) if images else self.empty(), paths, topk=topk)

    def predict_one(self, item: Any, *, topk: int = 5) -> Prediction:
        return self.predict([item], topk=topk)[0]

    def empty(self) -> torch.Tensor:
        return torch.empty(0, *self.input_shape, dtype=torch.uint8)

    def to_pixels(self, item: Any) -> torch.Tensor:
        """Any accepted input -> uint8 (C, H, W) in the model's channels and size."""
        c, h, w = self.input_shape
        if isinstance(item, (str, Path)):
            return decode(one_image_path(item), channels=c, size=(h, w))
        array = to_hwc_uint8(item)
        if array.shape == (h, w, c):
            return torch.from_numpy(array.transpose(2, 0, 1).copy())  # already the model's size
        return decode(png_bytes(array), channels=c, size=(h, w))  # the file path's conversion and resize

    def classify(self, images: torch.Tensor, paths: Sequence[str | None], *, topk: int = 5) -> list[Prediction]:
        """uint8 (N, C, H, W) at the model's shape -> predictions, in batches."""
        if images.shape[0] == 0:
            return []
        batches = self.trained.batches(images, batch_size=self.batch_size)
        logits, _ = predict_logits(self.trained.model, batches, tta=self.tta)
        return self.predictions(logits, paths, topk)

    def predictions(self, logits: torch.Tensor, paths: Sequence[str | None], topk: int) -> list[Prediction]:
        probabilities = torch.softmax(logits, dim=1)  # (N, K)
        k = max(1, min(topk, len(self.classes)))
        top_p, top_i = probabilities.topk(k, dim=1)
        index = logits.argmax(1)  # the same decision rule as evaluate
        results = []
        for row, path in enumerate(paths):
            i = int(index[row])
            pairs = [(self.classes[int(j)], float(p)) for j, p in zip(top_i[row], top_p[row], strict=True)]
            results.append(Prediction(path, self.classes[i], i, float(probabilities[row, i]), pairs))
        return results

    def predict_paths(self, items: Sequence[str], *, topk: int = 5, progress: ProgressFn | None = None) -> PathPredictions:
        """Files, folders (recursively), globs, .zip files of images and CSV files of pixel rows;
        unreadable ones (or members) become failures with the reason and the rest are still predicted."""
        files, failures = expand_paths(items)
        listed: Iterable[Path] = files
        if progress is not None and len(files) >= PROGRESS_MIN:
            listed = progress(files, "predicting", len(files))
        predictions: list[Prediction] = []
        images: list[torch.Tensor] = []
        names: list[str] = []
        for path in listed:
            for read in self.read_path(path):
                if isinstance(read, Failure):
                    failures.append(read)
                    continue
                images.append(read[0])
                names += read[1]
                if len(names) >= CHUNK:  # classify as we go: memory stays bounded for any folder size
                    predictions += self.classify(torch.cat(images), names, topk=topk)
                    images, names = [], []
        if names:
            predictions += self.classify(torch.cat(images), names, topk=topk)
        return PathPredictions(predictions, failures)

    def read_path(self, path: Path) -> Iterator[tuple[torch.Tensor, list[str]] | Failure]:
        """The images of one input with their names, or a Failure: an image file, a CSV's rows, or
        each image of a .zip (a member that cannot be read fails alone)."""
        if path.suffix.lower() == ARCHIVE_SUFFIX:
            yield from self.read_archive(path)
            return
        try:
            yield self.read_file(path)
        except DeepfitError as err:
            yield Failure(str(path), str(err).removeprefix(f"{path}: "))  # the path is said once

    def read_archive(self, path: Path) -> Iterator[tuple[torch.Tensor, list[str]] | Failure]:
        """Each image in a .zip, named zip/member, in the archive's order (hidden files and other
        files left out, as training's zip reader does)."""
        from deepfit.data.folder import list_files  # as image_decoder: the data package only when a zip is read

        c, h, w = self.input_shape
        try:
            listing = list_files(path)
        except DataError as err:
            yield Failure(str(path), str(err).removeprefix(f"{path} is "))
            return
        members = [name for name in listing.files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        if not members:
            yield Failure(str(path), f"no images found in this .zip ({', '.join(IMAGE_SUFFIXES)})")
        for name, blob in zip(members, listing.read(members), strict=True):
            try:
                yield decode(bytes(blob), channels=c, size=(h, w)).unsqueeze(0), [listing.display(name)]
            except DeepfitError as err:
                yield Failure(listing.display(name), str(err).removeprefix("image bytes: "))

    def read_file(self, path: Path) -> tuple[torch.Tensor, list[str]]:
        """(N, C, H, W) uint8 and a name per image: one for an image file, one per CSV row."""
        c, h, w = self.input_shape
        if path.suffix.lower() == CSV_SUFFIX:
            rows = read_csv_images(path, (c, h, w))
            if tuple(rows.shape[1:]) != (c, h, w):
                raise PredictError(f"{path}: rows are {'x'.join(map(str, rows.shape[1:]))}, the model expects {c}x{h}x{w}")
            return rows, [f"{path}:{n}" for n in range(1, rows.shape[0] + 1)]
        return decode(path, channels=c, size=(h, w)).unsqueeze(0), [str(path)]


def decode(source: Path | bytes, *, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file or encoded bytes -> uint8 (C, H, W) by the data package's decoder."""
    return torch.as_tensor(image_decoder()(source, channels=channels, size=size))


def image_decoder() -> Callable[..., Any]:
    """The data package's decode_image, imported when the first image is decoded (it brings torchvision)."""
    from deepfit.data.folder import decode_image

    return decode_image


def read_csv_images(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """CSV pixel rows -> uint8 (N, C, H, W) by the data package's reader (imported when a CSV is read)."""
    from deepfit.data.csv_rows import read_pixel_csv

    # "CxHxW", as data.image_shape; rows without a label column are the usual case for prediction
    return read_pixel_csv(path, image_shape="x".join(map(str, shape)), unlabelled_ok=True).images


def one_image_path(item: str | Path) -> Path:
    """`item` as the path of one image file; a folder, .zip, CSV or glob is refused with the call that reads it."""
    path = Path(item)
    many = path.is_dir() or path.suffix.lower() in (ARCHIVE_SUFFIX, CSV_SUFFIX) or (not path.exists() and glob.has_magic(str(item)))
    if many:
        raise PredictError(f"{item}: predict() reads one image per item; use predict_paths([...]) for folders, globs, .zip and CSV files")
    return path


def as_items(inputs: Any) -> list[Any]:
    """Split `inputs` into single images: lists/tuples item by item, 4-D arrays along the batch."""
    if isinstance(inputs, (list, tuple)):
        return [image for item in inputs for image in as_items(item)] if any(is_batch(i) for i in inputs) else list(inputs)
    if is_batch(inputs):
        return list(inputs)
    return [inputs]


def is_batch(item: Any) -> bool:
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4


def to_hwc_uint8(item: Any) -> np.ndarray:
    """A PIL image, numpy array or tensor -> uint8 (H, W, C) with C in 1, 3, 4."""
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
        channels_first = True
    elif isinstance(item, np.ndarray):
        array, channels_first = item, False
    elif hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image, whatever its mode
        array, channels_first = pil_array(item), False
    else:
        raise PredictError(f"cannot predict a {type(item).__name__}; pass a path, PIL image, numpy array or tensor")
    return to_uint8(hwc(array, channels_first=channels_first))


def pil_array(image: Any) -> np.ndarray:
    from deepfit.data.decode import eight_bit  # 16-bit grey by its top byte, as from a file

    image = eight_bit(image)
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return np.asarray(image)


def hwc(array: np.ndarray, *, channels_first: bool) -> np.ndarray:
    """(H, W) / (C, H, W) / (H, W, C) -> (H, W, C); the preferred layout wins when both fit."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise PredictError(f"an image array must have 2 or 3 dimensions, got shape {tuple(array.shape)}")
    first, last = array.shape[0] in (1, 3, 4), array.shape[2] in (1, 3, 4)
    if first and (channels_first or not last):
        return array.transpose(1, 2, 0)
    if last:
        return array
    raise PredictError(
        f"cannot tell the channels of an image array of shape {tuple(array.shape)}; use (H, W, C) or (C, H, W); pass a batch of gray images as (N, 1, H, W), (N, H, W, 1) or a list"
    )


def to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 stays; uint16 is read by its top byte; other integers are clipped to 0..255; floats
    must be in 0..1 (torchvision's ToTensor scale; a normalised image, negative or over 1, is
    refused rather than clipped) and are rounded to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:  # a 16-bit image (OpenCV, imageio): its top byte, as a 16-bit file is read
        return (array >> 8).astype(np.uint8)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise PredictError(f"cannot read image pixels of dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 255).astype(np.uint8)
    if not np.isfinite(array).all():
        raise PredictError("image array holds NaN or infinite values")
    low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if low < 0 or high > 1:
        raise PredictError(
            f"float image pixels must be in 0..1 (as ToTensor gives); these run {low:.3g}..{high:.3g}:"
            " pass the image before any Normalize (deepfit normalises with the checkpoint's mean and std)"
        )
    return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> lossless PNG bytes, so in-memory images share the files' decoder."""
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def expand_paths(items: Sequence[str]) -> tuple[list[Path], list[Failure]]:
    """Files as given; folders -> their image files, recursively, sorted; globs -> their matches.
    A name that matches nothing is a failure."""
    files: list[Path] = []
    failures: list[Failure] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            if not found:
                failures.append(Failure(item, f"no images found in this folder ({', '.join(IMAGE_SUFFIXES)})"))
        elif path.exists():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            files += matches
            if not matches:
                failures.append(Failure(item, "no file matches this pattern"))
        else:
            failures.append(Failure(item, "no such file or folder"))
    return files, failures


def format_table(predictions: Sequence[Prediction]) -> str:
    """path, label, probability and the rest of the top-k, one line per image."""
    width = max([display_width(p.path or "") for p in predictions] + [4])
    label_width = max([display_width(p.label) for p in predictions] + [16])
    lines = [f"{pad('path', width)}  {pad('label', label_width)} {'prob':>6}  top-k"]
    for p in predictions:
        rest = ", ".join(f"{label} {prob:.3f}" for label, prob in p.topk[1:])
        lines.append(f"{pad(p.path or '-', width)}  {pad(p.label, label_width)} {p.probability:6.3f}  {rest}")
    return "\n".join(lines)


def csv_rows(predictions: Sequence[Prediction]) -> list[list[str]]:
    """Header + one row per image: path, label, index, probability, then top{i}_label/_probability."""
    k = max((len(p.topk) for p in predictions), default=0)
    header = ["path", "label", "index", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    rows = [header]
    for p in predictions:
        row = [p.path or "", p.label, str(p.index), f"{p.probability:.6g}"]
        for label, prob in p.topk:
            row += [label, f"{prob:.6g}"]
        rows.append(row)
    return rows
