"""The training and evaluation loops: plain PyTorch over any nn.Module and any iterable of
(x, y) batches. No files, no prints; loss and accuracy are summed on the device and read once
per epoch, so the loop never waits on the host per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from deepfit.errors import NonFiniteError
from deepfit.runtime import autocast

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOptions:
    """How one optimizer step is taken; defaults are the plain fp32 loop."""

    scheduler: LRScheduler | None = None  # stepped after every optimizer step
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (CUDA)
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast, None for fp32
    clip_grad: float = 0.0  # max gradient norm, 0 for no clipping
    accumulate: int = 1  # batches per optimizer step
    check_finite: bool = True  # stop on a NaN/inf loss or gradient


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: Optimizer,
    loss_fn: LossFn,
    *,
    options: StepOptions | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns mean train loss and accuracy over the images seen."""
    opts = options or StepOptions()
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, last = 0, len(batches) if hasattr(batches, "__len__") else -1  # type: ignore[arg-type]
    for i, (x, y) in enumerate(batches):
        with autocast(device, opts.autocast_dtype):
            logits = model(x)
            loss = loss_fn(logits, y)
        if opts.check_finite and not torch.isfinite(loss):
            raise NonFiniteError(f"the loss became {loss.item()} at batch {i + 1}; lower the learning rate or enable --train.clip-grad")
        backward(loss / opts.accumulate, opts.scaler)
        if (i + 1) % opts.accumulate == 0 or i + 1 == last:
            optimizer_step(model, optimizer, opts)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).sum()  # mixed targets (B, K): their larger share
        seen += len(y)
        if on_step is not None:
            on_step()
    return {"loss": float(loss_sum) / max(seen, 1), "acc": float(correct) / max(seen, 1)}


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(model: nn.Module, optimizer: Optimizer, opts: StepOptions) -> None:
    """Unscale, check and clip the gradients, step, clear them, advance the schedule."""
    if opts.scaler is not None:
        opts.scaler.unscale_(optimizer)
    if opts.clip_grad > 0 or opts.check_finite:
        norm = grad_norm(model, opts.clip_grad)
        if opts.check_finite and opts.scaler is None and not torch.isfinite(norm):
            raise NonFiniteError(f"a gradient became non-finite (norm {norm.item()}); lower the learning rate or enable --train.clip-grad")
    if opts.scaler is not None:
        opts.scaler.step(optimizer)
        opts.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if opts.scheduler is not None:
        opts.scheduler.step()


def grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """The total gradient norm, clipped to `clip` when > 0. Without clipping only the norm is
    computed: clip_grad_norm_(inf) would also multiply every gradient by 1.0, which measured
    half of the guard's cost on a small MLP (bench/guard.py)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


@torch.inference_mode()
def predict_logits(
    model: nn.Module, batches: Batches, *, autocast_dtype: torch.dtype | None = None, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (N, K) in float32 and labels (N,) for `batches`, on the CPU.
    tta: average the logits of each image and its left-right mirror (test-time flip augmentation)."""
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device, autocast_dtype):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(3)).float())  # x: (B, C, H, W), flip W
            outputs.append(logits)
        targets.append(y)
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs).cpu(), torch.cat(targets).cpu()


def evaluate(model: nn.Module, batches: Batches, loss_fn: LossFn, *, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean loss and accuracy of `model` over `batches`, without gradients."""
    logits, labels = predict_logits(model, batches, autocast_dtype=autocast_dtype)
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": float(loss_fn(logits, labels)), "acc": float((logits.argmax(1) == labels).float().mean())}
