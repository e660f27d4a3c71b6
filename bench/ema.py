"""What train.ema costs per optimizer step: one WeightAverage.update (a fused lerp over every
floating-point parameter and buffer) timed alone over many repeats, beside the seconds of one
training step of the same model on synthetic batches, fastest of several rounds.

    .venv/bin/python bench/ema.py [--models fastnet_small cnn_bn] [--batch 256] [--steps 30] [--rounds 5] [--device cpu]
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
from deepfit.ema import WeightAverage
from deepfit.engine import StepOptions, train_one_epoch
from deepfit.models import build_model


def step_seconds(model: torch.nn.Module, batch: int, steps: int, rounds: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
        for _ in range(steps)
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        train_one_epoch(model, batches, optimizer, torch.nn.CrossEntropyLoss(), options=StepOptions())
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def update_seconds(model: torch.nn.Module, repeats: int, rounds: int) -> float:
    average = WeightAverage(model, 0.999)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            average.update(model)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fastnet_small", "cnn_bn"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for name in args.models:
        model = build_model(ModelConfig(name=name), input_shape=(1, 28, 28), num_classes=10).to(device)
        step = step_seconds(model, args.batch, args.steps, args.rounds, device)
        update = update_seconds(model, 200, args.rounds)
        results.append({"model": name, "step_ms": step * 1e3, "ema_update_ms": update * 1e3, "share_of_step": update / step})
        print(f"{name:>14}: step {step * 1e3:.2f} ms, ema update {update * 1e3:.3f} ms = {update / step:.1%} of a step")
    print(save_json({"machine": machine(), "batch": args.batch, "results": results}, "ema"))


if __name__ == "__main__":
    main()
