"""`deepfit evaluate`: how good a trained model is and where it fails, from its checkpoint alone.
Accuracy, top-k accuracy, per-class precision/recall/F1/support, macro and weighted averages,
the confusion matrix and the most-confused class pairs; written to report.json and
plots/confusion.png in the run folder (or next to a bare checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from deepfit import metrics
from deepfit.columns import display_width, pad
from deepfit.data import DataBundle, ImageSet, build_data, load_images
from deepfit.data.decode import resize
from deepfit.engine import predict_logits
from deepfit.errors import DataError, DeepfitError
from deepfit.runtime import select_device
from deepfit.trained import TrainedModel, load_trained_model, run_folder

SPLITS = ("test", "val", "all")
PAIRS_SHOWN = 10  # most-confused class pairs kept in the report


class EvaluationError(DeepfitError):
    """An evaluation that cannot be done as asked (no such split, flips not allowed, ...)."""


@dataclass
class ClassScores:
    name: str
    precision: float  # of the images predicted as this class, the share that are it (0 when none)
    recall: float  # of the images of this class, the share predicted as it (0 when none)
    f1: float  # harmonic mean of precision and recall (0 when both are 0)
    support: int  # images of this class in the split


@dataclass
class ConfusedPair:
    true: str
    predicted: str
    count: int  # images of class `true` predicted as `predicted`
    share: float  # count / support of `true`


@dataclass
class EvaluationReport:
    checkpoint: str
    data: str
    split: str
    images: int
    tta: str  # test-time augmentation: none, flip, shift or flip-shift
    loss: float  # mean cross-entropy of the (averaged, with tta) logits
    accuracy: float
    topk: int  # k of topk_accuracy, capped at the class count
    topk_accuracy: float
    macro: ClassScores  # unweighted mean over classes; support = all images
    weighted: ClassScores  # mean weighted by support
    per_class: list[ClassScores]
    confusion: list[list[int]]  # (K, K): rows are true classes, columns predicted
    most_confused: list[ConfusedPair]
    classes: list[str] = field(default_factory=list)
    resized: str = ""  # "28x28 to 8x8": another --data source's images, resized from the size they came in to the model's

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["averages"] = {"macro": raw.pop("macro"), "weighted": raw.pop("weighted")}
        for scores in raw["averages"].values():
            scores.pop("name")
        return raw


@dataclass
class Evaluation:
    report: EvaluationReport
    report_path: Path | None  # report.json written, None when not asked to write
    figure_path: Path | None  # confusion.png written
    labels: np.ndarray  # (N,) true class index of each image, in split order
    predictions: np.ndarray  # (N,) predicted class index
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad files left out (skip_bad)


def evaluate_checkpoint(
    path: str | Path,
    *,
    data: str | os.PathLike[str] | None = None,
    split: str | None = None,
    tta: str | None = None,
    device: str = "auto",
    write: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
) -> Evaluation:
    """Evaluate a run folder or checkpoint on its own data (or `data`, a source name or path, its
    files in `data_dir` as in training) and its `split` (default: test; where the run's own data
    has none, its validation split; all of a `data` that has none, such as a folder of class
    folders); with `write`, save report.json and plots/confusion.png beside it. Unreadable image
    files stop it unless `skip_bad` (or the run's own data.skip_bad) leaves them out; the result
    lists them."""
    data, data_dir = (os.fspath(p) if p is not None else None for p in (data, data_dir))  # a Path as its text
    if split is not None and split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    trained = load_trained_model(path, device=select_device(device))
    mode = trained.tta_mode(tta)
    images, source, skipped, split, resized, own_split = evaluation_images(trained, data, split, data_dir=data_dir, skip_bad=skip_bad)
    batches = trained.batches(images.images, images.labels, batch_size=trained.config.data.eval_batch_size)
    logits, labels = predict_logits(trained.model, batches, tta=mode)
    report = build_report(logits, labels, trained, source=source, split=split, tta=mode)
    report.resized = resized
    result = Evaluation(report, None, None, labels.numpy(), logits.argmax(1).numpy(), skipped)
    if write:
        label = evaluation_label(trained, Path(path), data=data, split=split, tta=mode, own_split=own_split)
        result.report_path, result.figure_path = output_paths(trained.path, Path(path), label)
        write_report_json(report, result.report_path)
        from deepfit.plots import plot_confusion, save_figure  # matplotlib only when a figure is drawn

        save_figure(plot_confusion(np.array(report.confusion), trained.classes), result.figure_path)
    return result


class ScoredImages(NamedTuple):
    images: ImageSet
    source: str  # the data's name or path
    skipped: list[tuple[str, str]]  # its bad files left out: (path, reason)
    split: str
    resized: str  # "28x28 to 8x8" when another source's images were resized to the model's input; "" when not
    own_split: str  # the run's own evaluation's split: test, or val where its data has no test split


def evaluation_images(
    trained: TrainedModel, data: str | None, split: str | None, *, data_dir: str | None = None, skip_bad: bool = False
) -> ScoredImages:
    """The images to score, the name of their source, its bad files left out and the split scored:
    the run's own data by default (its seeded splits rebuild exactly), else `data` decoded to the
    model's input shape; `data_dir` says where a named dataset's files are (as --data-dir in
    training). No `split`: test; where there is none, the run's own validation split (what its
    training scored), or all of another `data`."""
    config = dataclasses.replace(trained.config.data, skip_bad=trained.config.data.skip_bad or skip_bad)
    c, h, w = trained.input_shape
    other = data if data != config.name else None
    if other is not None:  # folders decode square at image_size: a non-square model's size is reached below
        config = dataclasses.replace(config, name=other, dir=None, image_size=h if h == w else None, channels=c, image_shape=f"{c}x{h}x{w}")
    if data_dir is not None:
        config = dataclasses.replace(config, dir=str(Path(data_dir).expanduser().resolve()))
    bundle = build_data(config, seed=trained.config.train.seed)
    no_test = bundle.test is None or len(bundle.test) == 0  # a folder without test/: training scored val
    own_split = "val" if no_test and other is None else "test"
    split = split or ("all" if no_test and other is not None else own_split)
    chosen = pick_split(bundle, split, config.name, skip_bad=config.skip_bad)
    resized_from = next((size for size in bundle.sizes if size != f"{h}x{w}"), "")  # files decoded to the model's size
    if other is not None and tuple(chosen.images.shape[1:]) != trained.input_shape and chosen.images.shape[1] == c:
        resized_from = "x".join(map(str, chosen.images.shape[2:]))
        chosen = ImageSet(torch.stack([resize(image, (h, w)) for image in chosen.images]), chosen.labels)
    check_shape(chosen, trained, config.name)
    images = relabel(chosen, bundle.classes, trained.classes, config.name)
    resized = f"{resized_from} to {h}x{w}" if other is not None and resized_from else ""
    return ScoredImages(images, config.name, list(bundle.skipped), split, resized, own_split)


def pick_split(bundle: DataBundle, split: str, source: str, *, skip_bad: bool = False) -> ImageSet:
    if split == "all":
        parts = [load_images(s, skip_bad=skip_bad) for s in (bundle.train, bundle.val, bundle.test) if s is not None]
        return ImageSet(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]))
    chosen = bundle.test if split == "test" else bundle.val
    if chosen is None or len(chosen) == 0:
        have = [name for name, s in (("test", bundle.test), ("val", bundle.val)) if s is not None and len(s)]
        hint = f"; it has {', '.join(have)}" if have else ""
        raise EvaluationError(f"{source} has no {split} split{hint}; choose --split {'|'.join([*have, 'all'])}")
    return load_images(chosen, skip_bad=skip_bad)  # a split too large for the memory budget is decoded here, once


def check_shape(images: ImageSet, trained: TrainedModel, source: str) -> None:
    found = tuple(int(d) for d in images.images.shape[1:])
    if found != trained.input_shape:
        raise DataError(f"{source} images are {'x'.join(map(str, found))}, the model expects {'x'.join(map(str, trained.input_shape))}")


def relabel(images: ImageSet, source_classes: list[str], model_classes: list[str], source: str) -> ImageSet:
    """Map the source's label indices onto the model's class order, by class name."""
    if list(source_classes) == list(model_classes):
        return images
    unknown = [name for name in source_classes if name not in model_classes]
    if unknown:
        raise DataError(f"{source} has classes the model does not know: {', '.join(unknown[:10])}; the model's: {', '.join(model_classes)}")
    mapping = torch.tensor([model_classes.index(name) for name in source_classes], dtype=torch.long)
    return ImageSet(images.images, mapping[images.labels])


def build_report(
    logits: torch.Tensor, labels: torch.Tensor, trained: TrainedModel, *, source: str, split: str, tta: str
) -> EvaluationReport:
    num_classes = trained.num_classes
    preds = logits.argmax(1)
    matrix = confusion_matrix(preds, labels, num_classes)
    per_class = class_scores(matrix, trained.classes)
    k = min(trained.config.train.topk, num_classes)
    return EvaluationReport(
        checkpoint=str(trained.path), data=source, split=split, images=int(labels.numel()), tta=tta,
        loss=float(torch.nn.functional.cross_entropy(logits, labels)) if labels.numel() else math.nan,
        accuracy=float(np.trace(matrix)) / max(int(matrix.sum()), 1),
        topk=k, topk_accuracy=topk_accuracy(logits, labels, k),
        macro=average(per_class, weighted=False), weighted=average(per_class, weighted=True),
        per_class=per_class, confusion=matrix.tolist(), most_confused=most_confused(matrix, trained.classes),
        classes=list(trained.classes),
    )  # fmt: skip


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class, as numpy."""
    return metrics.confusion_matrix(preds, labels, num_classes).numpy()


def class_scores(matrix: np.ndarray, classes: list[str]) -> list[ClassScores]:
    """Precision, recall and F1 per class; 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    hits = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)  # column sums
    support = matrix.sum(axis=1)  # row sums
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return [ClassScores(name, float(precision[i]), float(recall[i]), float(f1[i]), int(support[i])) for i, name in enumerate(classes)]


def average(scores: list[ClassScores], *, weighted: bool) -> ClassScores:
    support = np.array([s.support for s in scores], dtype=np.float64)
    weights = support if weighted else np.ones_like(support)
    total = weights.sum()

    def mean(values: list[float]) -> float:
        return float(np.dot(values, weights) / total) if total > 0 else 0.0

    name = "weighted avg" if weighted else "macro avg"
    return ClassScores(
        name, mean([s.precision for s in scores]), mean([s.recall for s in scores]), mean([s.f1 for s in scores]), int(support.sum())
    )


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if labels.numel() == 0:
        return math.nan
    top = logits.topk(k, dim=1).indices  # (N, k)
    return float((top == labels.view(-1, 1)).any(dim=1).float().mean())


def most_confused(matrix: np.ndarray, classes: list[str], limit: int = PAIRS_SHOWN) -> list[ConfusedPair]:
    """Off-diagonal cells with mistakes, largest count first (ties: class order)."""
    support = matrix.sum(axis=1)
    cells = [(int(matrix[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes)) if t != p and matrix[t, p] > 0]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [ConfusedPair(classes[t], classes[p], count, count / int(support[t])) for count, t, p in cells[:limit]]


def evaluation_label(trained: TrainedModel, given: Path, *, data: str | None, split: str, tta: str, own_split: str = "test") -> str:
    """'' for the run's own evaluation (the weights the run stands for, its own data, `own_split`:
    test, or val where it has none, its own train.tta); otherwise what differs, e.g. 'val',
    'tta-flip', 'data-photos', 'last-val'. Other evaluations are written beside the run's own under this name, never over it."""
    parts = []
    if given.is_file() and run_folder(given) is not None and trained.path.name != resolved_name(trained.path):
        parts.append(trained.path.stem)  # an explicit checkpoint other than the one the run stands for
    if data is not None and data != trained.config.data.name:
        parts.append("data-" + Path(data.rstrip("/")).name.split(".")[0])
    if split != own_split:
        parts.append(split)
    if tta != trained.config.train.tta:
        parts.append(f"tta-{tta}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def resolved_name(checkpoint: Path) -> str:
    """The file name a run folder stands for: best.pt, else last.pt."""
    return "best.pt" if (checkpoint.parent / "best.pt").is_file() else "last.pt"


def output_paths(checkpoint: Path, given: Path, label: str = "") -> tuple[Path, Path]:
    """report.json and plots/confusion.png in the run folder (report-LABEL.json and
    plots/confusion-LABEL.png for other evaluations); beside a bare checkpoint, named after it."""
    suffix = f"-{label}" if label else ""
    run_dir = run_folder(given) or run_folder(checkpoint)
    if run_dir is not None:
        return run_dir / f"report{suffix}.json", run_dir / "plots" / f"confusion{suffix}.png"
    stem = checkpoint.with_suffix("")
    return stem.with_name(f"{stem.name}.report{suffix}.json"), stem.with_name(f"{stem.name}.confusion{suffix}.png")


def write_report_json(report: EvaluationReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8")


def format_report(report: EvaluationReport) -> str:
    """The readable table `deepfit evaluate` prints."""
    width = max([display_width(s.name) for s in report.per_class] + [12])
    resized = f", resized from {report.resized} (the model's input size)" if report.resized else ""
    lines = [
        f"{report.data} {report.split} split: {report.images} images{resized}{f' (test-time {report.tta})' if report.tta != 'none' else ''}",
        f"accuracy {report.accuracy:.2%}   top-{report.topk} {report.topk_accuracy:.2%}   loss {report.loss:.4f}",
        "",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for s in [*report.per_class, report.macro, report.weighted]:
        if s is report.macro:
            lines.append("")
        lines.append(f"{pad(s.name, width)}  {s.precision:9.4f}  {s.recall:6.4f}  {s.f1:6.4f}  {s.support:7d}")
    if report.most_confused:
        lines += ["", "most confused (true -> predicted):"]
        lines += [f"  {p.true} -> {p.predicted}: {p.count} ({p.share:.1%} of {p.true})" for p in report.most_confused[:5]]
    return "\n".join(lines)
