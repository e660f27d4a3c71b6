"""What the non-finite guard costs: the same training loop (engine.train_one_epoch) with
StepOptions(check_finite=True) and False, on the same synthetic batches, timed in alternating
rounds so machine load hits both alike. Reports the fastest round's seconds per step and the guard's
share of step time (the promise: at most 10%). On a shared machine the two loops' difference is
noisy, so the guard's own per-step work (FiniteGuard checking the loss and the gradients on the
device, timed alone over many repeats) is reported too, as a share of the unguarded step.

    .venv/bin/python bench/guard.py [--models lenet cnn_bn mlp] [--steps 60] [--rounds 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, save_json
from deepfit.config import ModelConfig
from deepfit.engine import FiniteGuard, StepOptions, train_one_epoch
from deepfit.models import build_model


def synthetic_batches(steps: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, 1, 28, 28) normal noise with random labels, already on the device."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
        for _ in range(steps)
    ]


def seconds_per_step(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], check: bool) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as deepfit builds it: the guard skips on the device
    loss_fn = torch.nn.CrossEntropyLoss()
    options = StepOptions(check_finite=check)
    device = batches[0][0].device
    synchronize(device)
    started = time.perf_counter()
    train_one_epoch(model, batches, optimizer, loss_fn, options=options)  # reads the meters once: a sync at the end
    synchronize(device)
    return (time.perf_counter() - started) / len(batches)


def measure(name: str, steps: int, rounds: int, batch: int, device: torch.device) -> dict[str, float | str]:
    model = build_model(ModelConfig(name=name), input_shape=(1, 28, 28), num_classes=10).to(device)
    batches = synthetic_batches(steps, batch, device)
    seconds_per_step(model, batches[:5], True)  # warm-up
    on, off = [], []
    for i in range(rounds):  # alternate the order so drift in machine load cancels
        for check in (True, False) if i % 2 == 0 else (False, True):
            (on if check else off).append(seconds_per_step(model, batches, check))
    t_on, t_off = min(on), min(off)  # the least load-polluted round of each (shared 2-core machine)
    t_guard = guard_seconds(model, batches[0])
    return {
        "model": name,
        "ms_per_step_guard_on": 1e3 * t_on,
        "ms_per_step_guard_off": 1e3 * t_off,
        "overhead_pct": 100 * (t_on - t_off) / t_off,
        "ms_guard_alone": 1e3 * t_guard,
        "guard_alone_pct": 100 * t_guard / t_off,
    }


def guard_seconds(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], repeats: int = 200) -> float:
    """What check_finite adds to a step, alone: the loss's and the gradients' checks on the device
    (the loop reads the guard once every StepOptions.check_every steps, not counted here)."""
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    guard = FiniteGuard(loss.device)
    synchronize(loss.device)
    started = time.perf_counter()
    for step in range(1, repeats + 1):
        guard.record_loss(step, loss)
        guard.record_gradients(step, model)
    synchronize(loss.device)
    seconds = (time.perf_counter() - started) / repeats
    guard.check()  # the benchmark's own steps were finite
    return seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "cnn_bn", "mlp"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [measure(name, args.steps, args.rounds, args.batch, device) for name in args.models]
    print(f"non-finite guard on {device}, batch {args.batch}, fastest of {args.rounds} rounds x {args.steps} steps")
    for row in rows:
        print(
            f"{row['model']:>8}: {row['ms_per_step_guard_off']:.2f} ms/step off, {row['ms_per_step_guard_on']:.2f} on, "
            f"overhead {row['overhead_pct']:+.1f}%; the guard's own work {row['ms_guard_alone']:.3f} ms = {row['guard_alone_pct']:.1f}%"
        )
    print(save_json({"machine": machine(), "device": str(device), "rows": rows}, f"guard-{device.type}"))


if __name__ == "__main__":
    main()
