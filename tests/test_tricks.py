"""Training tricks (issue 17): the weight average (train.ema), mixup/cutmix (data.mix) and the
balanced sampler, each against an oracle, and a run with all of them on resumes exactly."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfit.checkpoint import load_checkpoint, save_checkpoint
from deepfit.config import Config, set_value
from deepfit.data.balance import balanced_sample_weights
from deepfit.data.loader import EpochOrder
from deepfit.data.mix import Mix, beta_draw, mix_batch
from deepfit.ema import WeightAverage
from deepfit.export import export_checkpoint
from deepfit.fit import fit


def small_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))


def test_weight_average_follows_the_formula_on_parameters_and_buffers() -> None:
    model = small_net()
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 1, 12, 12))  # training mode: BatchNorm running stats and counter move
        decay = min(0.9, (1 + n) / (10 + n))
        for key, value in model.state_dict().items():
            expected[key] = value.double() if not value.is_floating_point() else decay * expected[key] + (1 - decay) * value.double()
        average.update(model)
    for key, value in average.module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert average.updates == 4 and not average.module.training


def test_mixup_and_cutmix_against_their_definition() -> None:
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for mode in ("mixup", "cutmix"):
        generator = torch.Generator().manual_seed(3)
        replay = torch.Generator().manual_seed(3)
        mixed, targets = mix_batch(x, y, Mix(mode, 0.4, num_classes=3), generator)
        lam = beta_draw(0.4, replay)
        partner = torch.randperm(6, generator=replay)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        if mode == "mixup":
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[partner])
            share = lam
        else:
            from_self = (mixed == x).float().mean().item()  # the pixels each image kept (partners differ a.s.)
            assert ((mixed == x) | (mixed == x[partner])).all()
            share = from_self
        expected = torch.nn.functional.one_hot(y, 3) * share + torch.nn.functional.one_hot(y[partner], 3) * (1 - share)
        torch.testing.assert_close(targets, expected.float(), atol=1e-6, rtol=0)


def test_balanced_sampler_draws_classes_equally_often() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = EpochOrder(len(labels), batch_size=100, shuffle=True, seed=0, order_device=torch.device("cpu"))
    order.sample_weights = balanced_sample_weights(labels, 3)
    drawn = torch.cat([labels[order.draw_order()] for _ in range(20)])
    shares = torch.bincount(drawn, minlength=3).float() / len(drawn)
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def tricks_config(tiny_idx: Path, out: Path) -> Config:
    config = Config()
    values = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "data.mix": "both", "data.mix-alpha": "0.5",
        "data.sampler": "balanced", "train.ema": "0.9", "train.epochs": "2", "train.progress": "false", "train.out": str(out),
        "train.seed": "3", "train.checkpoint-every": "3", "train.keep-last": "100", "model.name": "cnn_bn",
        "train.deterministic": "true",  # resumed == straight: on CUDA only with deterministic kernels
    }  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    return config


def state_hash(path: Path) -> str:
    state = load_checkpoint(path)
    digest = hashlib.sha256()
    for part in (state["model"], state["ema"]["raw"], state["optimizer"]["state"]):
        for key in sorted(part, key=str):
            tensors = part[key].values() if isinstance(part[key], dict) else [part[key]]
            for tensor in tensors:
                digest.update(torch.as_tensor(tensor).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resume_hash(tiny_idx: Path, checkpoint: Path, folder: Path, edit: Any = None) -> str:
    (folder / "checkpoints").mkdir(parents=True)
    state = load_checkpoint(checkpoint)
    if edit is not None:
        edit(state)
    save_checkpoint(state, folder / "checkpoints" / "last.pt")
    fit(tricks_config(tiny_idx, folder), resume=folder)
    return state_hash(folder / "checkpoints" / "last.pt")


def test_ema_mix_and_sampler_resume_exactly(tiny_idx: Path, tmp_path: Path) -> None:
    """Resumed mid-epoch, the run ends with the same average, weights and optimizer state; a
    checkpoint whose average was reset ends elsewhere (the average is really restored)."""
    full = tmp_path / "full"
    result = fit(tricks_config(tiny_idx, full))
    expected = state_hash(full / "checkpoints" / "last.pt")
    step = full / "checkpoints" / "step-00000009.pt"  # epoch 2 of 7 batches, mid-epoch
    assert resume_hash(tiny_idx, step, tmp_path / "resumed") == expected

    def reset_average(state: dict[str, Any]) -> None:
        state["model"] = copy.deepcopy(state["ema"]["raw"])

    assert resume_hash(tiny_idx, step, tmp_path / "reset", reset_average) != expected
    # the average, not the raw weights, is what the run measured, saved and exports
    last = load_checkpoint(full / "checkpoints" / "last.pt")
    raw_differs = any(not torch.equal(last["model"][k], last["ema"]["raw"][k]) for k in last["model"] if "weight" in k)
    assert raw_differs
    stands_for = load_checkpoint(full / "checkpoints" / result.weights)  # the run stands for best.pt (restore_best)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value.cpu(), stands_for["model"][key]), key
    shutil.copy(full / "checkpoints" / "last.pt", full / "checkpoints" / "best.pt")
    assert export_checkpoint(full, format="torchscript").max_abs_diff < 1e-4
