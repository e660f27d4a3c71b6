"""Class imbalance: per-class loss weights ("balanced" or a file), per-image sampling weights
that draw every class equally often, and the warning `data info` gives for skewed folders."""

from __future__ import annotations

from pathlib import Path

import torch

from deepfit.errors import ConfigError

IMBALANCE_RATIO = 5.0  # data info warns when the largest class has more than this many times the smallest's images


def class_counts_of(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (K,) int64."""
    return torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes]


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n_images / (n_classes * n_class) per class, as scikit-learn's "balanced": a class with the
    average count weighs 1. A class absent from the split gets weight 0 (it cannot be learned)."""
    counts = class_counts_of(labels, num_classes).to(torch.float32)
    weights = len(labels) / (num_classes * counts)
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def build_class_weights(spec: str, labels: torch.Tensor, classes: list[str]) -> torch.Tensor:
    """loss.class_weights: "balanced", or a file of weights (K,) float32."""
    if spec == "balanced":
        return balanced_class_weights(labels, len(classes))
    return read_class_weights(Path(spec), classes)


def read_class_weights(path: Path, classes: list[str]) -> torch.Tensor:
    """One weight per line in class order (`0.5`), or `class,weight` lines in any order; # comments."""
    try:
        lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"loss.class_weights: cannot read {path} ({getattr(err, 'strerror', None) or err}); use balanced or a file"
        ) from None
    entries = [line for line in lines if line]
    named = all("," in line for line in entries)
    weights = named_weights(entries, classes, path) if named else ordered_weights(entries, classes, path)
    if any(w < 0 or w != w for w in weights):
        raise ConfigError(f"loss.class_weights {path}: weights must be non-negative numbers")
    return torch.tensor(weights, dtype=torch.float32)


def parse_weight(text: str, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"loss.class_weights {path}: {text!r} is not a number") from None


def ordered_weights(entries: list[str], classes: list[str], path: Path) -> list[float]:
    if len(entries) != len(classes):
        raise ConfigError(f"loss.class_weights {path}: {len(entries)} weights for {len(classes)} classes ({', '.join(classes)})")
    return [parse_weight(entry, path) for entry in entries]


def named_weights(entries: list[str], classes: list[str], path: Path) -> list[float]:
    table = {}
    for entry in entries:
        name, _, value = entry.rpartition(",")
        table[name.strip()] = parse_weight(value.strip(), path)
    unknown = sorted(set(table) - set(classes))
    missing = [name for name in classes if name not in table]
    if unknown or missing:
        raise ConfigError(f"loss.class_weights {path}: unknown classes {unknown or '-'}, missing classes {missing or '-'}")
    return [table[name] for name in classes]


def balanced_sample_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image weights (N,) float64 so that each class present is drawn equally often."""
    counts = class_counts_of(labels, num_classes).to(torch.float64)
    return (1.0 / counts.clamp_min(1))[labels.cpu()]


def imbalance_warning(counts: list[int], classes: list[str]) -> str | None:
    """A line for `data info` when the largest class has more than IMBALANCE_RATIO times the smallest's images."""
    present = [(n, name) for n, name in zip(counts, classes, strict=True) if n > 0]
    if len(present) < 2:
        return None
    (small, small_name), (large, large_name) = min(present), max(present)
    if large <= IMBALANCE_RATIO * small:
        return None
    return (
        f"warning: imbalanced classes: {large_name} has {large:,} training images, {large / small:.1f}x the {small:,} of {small_name};"
        " consider --loss.class-weights balanced or --data.sampler balanced"
    )
