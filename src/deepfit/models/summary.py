"""`deepfit models summary`: each layer's output shape and parameter count, from forward hooks
on the leaf modules during one pass of a dummy batch, and the totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfit.errors import ConfigError


@dataclass
class LayerRow:
    name: str  # qualified module name, e.g. features.0
    kind: str  # class name, e.g. Conv2d
    output_shape: tuple[int, ...]  # per image, without the batch dimension
    params: int  # parameters the layer owns (counted at its first call only)


@dataclass
class ModelSummary:
    input_shape: tuple[int, ...]  # one item: CxHxW for an image, (F,) for a table row or a node
    rows: list[LayerRow]
    total: int  # all parameters of the model
    trainable: int  # those with requires_grad

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.rows[-1].output_shape if self.rows else ()


def summarize_model(model: nn.Module, input_shape: tuple[int, ...], *, extra_inputs: tuple[Any, ...] = ()) -> ModelSummary:
    """Run a batch of two zero items (eval mode, no gradients) and record every leaf module call;
    `extra_inputs` follow the batch in the call (a node model's edge_index)."""
    rows: list[LayerRow] = []
    seen: set[str] = set()
    leaves = [(name or "(model)", m) for name, m in model.named_modules() if owns_parameters(m) or not list(m.children())]
    handles = [m.register_forward_hook(recorder(name, rows, seen)) for name, m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape), *extra_inputs)  # (2, C, H, W): 2, not 1, so shape errors show
    except RuntimeError as err:  # torch's shape errors
        shown = "x".join(map(str, input_shape))
        raise ConfigError(f"{type(model).__name__} cannot take {shown} input: {' '.join(str(err).split())[:200]}") from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(input_shape, rows, total, trainable)


def owns_parameters(module: nn.Module) -> bool:
    """A module with parameters of its own besides its children's (PyG's GCNConv: its bias) gets a
    row of its own, after its children's, so the rows add up to the total."""
    return any(True for _ in module.parameters(recurse=False))


def training_bytes(arch: Any, input_shape: tuple[int, int, int], num_classes: int, batch_size: int) -> int | None:
    """About what training the registered model `arch` takes: parameters four times (weights,
    gradients and an optimizer's two moments) and every leaf module's output per item (what the
    backward pass keeps). Measured on a copy built on the meta device: shapes, no memory. None
    for a model that cannot be built or run there (a user's class that reads values, say)."""
    try:
        return meta_training_bytes(arch, input_shape, num_classes, batch_size)
    except Exception:  # any failure of someone's model on meta tensors: no estimate, no check
        return None


def meta_training_bytes(arch: Any, input_shape: tuple[int, int, int], num_classes: int, batch_size: int) -> int:
    import dataclasses

    from deepfit.models import build_model

    bare = dataclasses.replace(arch, weights=None, init_from=None)  # nothing to download or read
    with torch.device("meta"):
        model = build_model(bare, input_shape=input_shape, num_classes=num_classes)
    outputs = [0]

    def count(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel() * output.element_size()

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.empty(2, *input_shape, device="meta"))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * parameters + batch_size * outputs[0] // 2


def recorder(name: str, rows: list[LayerRow], seen: set[str]) -> Any:
    """A forward hook appending one row per call; a reused module (ResNet's relu) owns its
    parameters once."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        params = 0 if name in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(name)
        shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
        rows.append(LayerRow(name, type(module).__name__, shape, params))

    return hook


def format_summary(summary: ModelSummary, title: str) -> str:
    """A plain-text table: layer, type, output shape (per image), parameters; then the totals."""
    header = ("layer", "type", "output shape", "params")
    lines = [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.params:,}") for r in summary.rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    shape = "x".join(map(str, summary.input_shape))
    what = "" if len(summary.input_shape) == 3 else " features"
    out = [f"{title}: input {shape}{what}", fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    out.append(f"total parameters: {summary.total:,} (trainable {summary.trainable:,})")
    return "\n".join(out)
