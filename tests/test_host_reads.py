"""No training step waits on the device (issue 11). A host read of a device value synchronises a
GPU: `.item()`, `float()`, `int()` and `bool()` dispatch aten._local_scalar_dense, `nonzero`,
`masked_select` and boolean indexing must learn their output's size, and `.tolist()` and
`.numpy()` (which the CPU serves without a dispatch) copy to the host. Counted here on the CPU
over whole runs: a run of many small batches makes no more of them than a run of the same data
in one batch an epoch, apart from the non-finite guard's one read every StepOptions.check_every
batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepfit.config import load_config
from deepfit.engine import StepOptions
from deepfit.fit import fit
from tests.test_configs import tiny_colour_bundle

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cifar10-jpg-gpu.yaml"
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "unique_dim"}
GUARD_READS = 1  # FiniteGuard.check reads its flag and counters in one .tolist()
IMAGES = 64


class HostReads(TorchDispatchMode):
    """Counts the ops that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def counting_host_copies(counter: HostReads, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tolist", "numpy"):
        method = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            counter.reads[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


def reads_of_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int, **train: Any) -> Counter[str]:
    config = load_config(RECIPE)  # the GPU recipe: whitened net, fused SGD, lookahead, linear schedule, alternate flips
    config.train.epochs, config.train.out, config.data.batch_size = 2, str(tmp_path / f"run-{batch_size}"), batch_size
    config.train.precision, config.data.eval_batch_size = "32", 64
    for key, value in train.items():
        setattr(config.train, key, value)
    counter = HostReads()
    with monkeypatch.context() as patches:
        # Batches of 2 at the recipe's step sizes in fp32 blow up on CUDA with TF32 convolutions
        # (PyTorch's default there): activations near 1e20 by batch 2 on an H200, NaN after
        # BatchNorm; a gentler lr failed too. With full fp32 the run trains there as on the CPU
        # (matrix products are full fp32 already: torch.backends.cuda.matmul.allow_tf32 is off).
        patches.setattr(torch.backends.cudnn, "allow_tf32", False)
        counting_host_copies(counter, patches)
        with counter:
            fit(config, data=tiny_colour_bundle(n=IMAGES))
    return counter.reads


@pytest.mark.parametrize("train", [{}, {"ema": 0.9, "tta": "none"}], ids=["recipe", "ema"])
def test_host_reads_do_not_grow_with_the_steps_of_an_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train: dict[str, Any]) -> None:
    one_batch = reads_of_a_run(tmp_path, monkeypatch, IMAGES, **train)
    many = reads_of_a_run(tmp_path, monkeypatch, 2, **train)  # 32 steps an epoch instead of 1
    guard_checks = 2 * (IMAGES // 2 // StepOptions.check_every)  # the guard's periodic reads in 2 epochs
    assert one_batch["tolist"] > 0 and one_batch["_local_scalar_dense"] > 0  # the counts see the run's reads
    assert many - one_batch == Counter({"tolist": GUARD_READS * guard_checks})
