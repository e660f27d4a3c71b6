"""Process-wide knobs of deepfit.runtime that fit() sets: the CPU allocator, cuDNN's autotuner."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepfit
from deepfit import runtime
from deepfit.errors import ConfigError
from deepfit.evaluation import evaluate_checkpoint
from deepfit.predict import Predictor
from tests.test_fit_api import tiny_config

# A training step's pattern: tensors of 48, 24 and 12 MB (glibc maps blocks above 32 MB afresh,
# and trims its heap's top), their doubles, all freed; minor page faults per step, before and
# after keep_freed_memory().
FAULTS = """
import json, resource, torch
from deepfit.runtime import keep_freed_memory

def faults(steps):
    counts = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(size << 20) for size in (12, 6, 3, 12)]
        ys = [x * 2 for x in xs]
        del xs, ys
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults(6)[2:]
kept = keep_freed_memory()
after = faults(8)[2:]  # the heap grows in the first steps
print(json.dumps({"kept": kept, "default": default, "after": after, "again": keep_freed_memory()}))
"""

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc (Linux)"
)


@glibc_only
def test_freed_memory_is_reused_without_page_faults() -> None:
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["kept"] is True and figures["again"] is True  # the settings took, and a second call is harmless
    default, after = sum(figures["default"]) / 4, sum(figures["after"]) / 6
    assert default > 12_000  # at least the 48 MB blocks fault in afresh each step (12k pages of 4 KB each)
    assert after < default / 5  # the freed blocks come back from the heap, mostly without a fault


def test_fit_evaluate_and_predict_on_the_cpu_keep_freed_memory(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("kept") or True)
    run = deepfit.fit(tiny_config(tiny_idx, tmp_path, **{"train.device": "cpu", "train.epochs": "1"})).run_dir
    assert calls == ["kept"]
    evaluate_checkpoint(run, device="cpu", write=False)
    Predictor.from_checkpoint(run, device="cpu")
    assert calls == ["kept"] * 3
    assert runtime.keep_freed_memory_on(torch.device("meta")) is False and calls == ["kept"] * 3  # not for other devices


@pytest.mark.parametrize("enabled", [True, False])
def test_fit_sets_cudnn_benchmark(enabled: bool, tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not enabled)  # restored after the test
    config = tiny_config(tiny_idx, tmp_path, **{"train.cudnn_benchmark": str(enabled).lower(), "train.epochs": "1"})
    deepfit.fit(config)
    assert torch.backends.cudnn.benchmark is enabled


def test_cudnn_benchmark_and_deterministic_are_refused_together(tiny_idx: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_idx, tmp_path, **{"train.cudnn_benchmark": "true", "train.deterministic": "true"})
    with pytest.raises(ConfigError, match=r"train\.cudnn_benchmark .* train\.deterministic"):
        deepfit.fit(config)
    assert not (tmp_path / "run").exists()
