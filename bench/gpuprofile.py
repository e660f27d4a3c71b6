"""bench/gpu.py --profile: where a training step's time goes, from one epoch under torch.profiler.

The second epoch of a run (the first pays for cuDNN's choices and the graphs' capture) is
profiled: its wall time per step, the device's kernel, copy and memset time per step and the share
of the wall time it fills, the launches the host made per step (kernels, graphs, memsets, copies),
and the three kernels that took longest. On the CPU there is no device activity: the top three are
the operators with the most time of their own, and the device figures are left out."""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cudaMemsetAsync",
    "cudaMemcpyAsync",
)
PROFILED_EPOCH = 2


def profiled_fit(fit_config: Any) -> dict[str, float | str]:
    """Train `fit_config` (2 epochs or more) with its second epoch profiled; that epoch's figures."""
    fit_module = importlib.import_module("deepfit.fit")
    real = fit_module.train_one_epoch
    figures: dict[str, float | str] = {}
    epochs = 0

    def profiling(model: torch.nn.Module, batches: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        nonlocal epochs
        epochs += 1
        if epochs != PROFILED_EPOCH:
            return real(model, batches, *args, **kwargs)
        steps = getattr(batches, "batches_per_epoch", None) or len(batches)  # a loader's len() is what is left of its epoch
        cuda = any(p.is_cuda for p in model.parameters())  # the run's device, not whether CUDA was ever started here
        figures.update(profile_epoch(lambda: real(model, batches, *args, **kwargs), steps=steps, cuda=cuda))
        return figures.pop("_result")  # type: ignore[return-value]

    fit_module.train_one_epoch = profiling
    try:
        fit_module.fit(fit_config)
    finally:
        fit_module.train_one_epoch = real
    if not figures:
        raise RuntimeError(f"the run ended before epoch {PROFILED_EPOCH}: nothing was profiled")
    return figures


def profile_epoch(epoch: Callable[[], Any], *, steps: int, cuda: bool) -> dict[str, Any]:
    """Run `epoch` under torch.profiler, with the device's activity where `cuda` (the epoch trains
    there); its figures per step, and its result as '_result'."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    synchronize(cuda)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        result = epoch()
        synchronize(cuda)
        wall = time.perf_counter() - started
    figures: dict[str, Any] = {"_result": result, "steps": float(steps), "wall_ms_per_step": 1000 * wall / max(steps, 1)}
    return figures | event_figures(prof.events(), wall, steps, cuda)


def event_figures(events: Any, wall: float, steps: int, cuda: bool) -> dict[str, float | str]:
    """Device time, launches and the top three from the profiler's events (times in us)."""
    per_step = max(steps, 1)
    figures: dict[str, float | str] = {}
    if cuda:
        # the device's kernels, copies and memsets; not the spans of record_function ranges that the
        # profiler also puts on the device's timeline (Optimizer.step#Adam.step), which overlap them
        device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        busy_us = sum(e.time_range.elapsed_us() for e in device)
        figures["device_ms_per_step"] = busy_us / 1000 / per_step
        figures["busy_pct"] = 100 * busy_us / 1e6 / max(wall, 1e-9)
        figures["launches_per_step"] = sum(e.name in LAUNCHES for e in events) / per_step
        figures["top"] = top_three(summed(device), busy_us)
    else:
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
        figures["top"] = top_three(summed(ops, own=True), sum(e.self_cpu_time_total for e in ops))
    return figures


def summed(events: list[Any], *, own: bool = False) -> dict[str, float]:
    """Microseconds per event name: the events' durations, or their own (self) CPU time."""
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        totals[e.name] += e.self_cpu_time_total if own else e.time_range.elapsed_us()
    return totals


def top_three(totals: dict[str, float], whole: float) -> str:
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:3]
    return "; ".join(f"{short(name)} {100 * us / max(whole, 1e-9):.0f}%" for name, us in ranked)


def short(name: str) -> str:
    """A kernel's name without its template arguments and namespaces, at most 40 characters."""
    base = name.replace("(anonymous namespace)::", "").split("<", 1)[0].split("(", 1)[0].strip()
    return base.rsplit("::", 1)[-1].removeprefix("void ")[:40] or name[:40]


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
