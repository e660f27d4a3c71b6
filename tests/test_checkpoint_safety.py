"""A checkpoint never runs code: hostile pickles are refused by weights_only loading, also when
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks torch to unpickle everything, and nothing they would do happens."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from deepfit.checkpoint import CheckpointError, check_torch_version, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tests.conftest import run_deepfit


class Reduce:
    """Pickles as `func(*args)`: what an attacker writes into a .pt file."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


class Touching:
    """A custom class whose unpickling (__setstate__) would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["marker"]).write_text("ran")


def payloads(marker: Path) -> dict[str, Any]:
    """Five ways to run code on load; each would create `marker`."""
    m = str(marker)
    return {
        "os.system": Reduce(os.system, f"touch {m}"),
        "eval": Reduce(builtins.eval, f"open({m!r}, 'w').write('ran')"),
        "subprocess": Reduce(subprocess.call, ["touch", m]),
        # a legitimate-looking checkpoint with exec hidden two levels down in the weights
        "nested reduce": {"kind": "deepfit-checkpoint", "model": {"w": torch.zeros(2), "b": [Reduce(builtins.exec, f"open({m!r}, 'w')")]}},
        "custom class": {"model": Touching(m)},
    }


def write_payload(payload: Any, path: Path, fmt: str) -> Path:
    if fmt == "zip":  # what torch.save writes
        torch.save(payload, path)
    else:  # a bare pickle stream (torch's legacy format)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


def test_the_payloads_really_run_code_when_unpickled(tmp_path: Path) -> None:
    """The oracle: without weights_only each payload does create its marker."""
    for name, payload in payloads(tmp_path / "marker").items():
        marker = tmp_path / "marker"
        marker.unlink(missing_ok=True)
        path = write_payload(payload, tmp_path / "evil.pt", "zip")
        torch.load(path, weights_only=False)
        assert marker.exists(), name


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
@pytest.mark.parametrize("fmt", ["zip", "pickle"])
@pytest.mark.parametrize("name", ["os.system", "eval", "subprocess", "nested reduce", "custom class"])
def test_malicious_checkpoints_are_refused_without_side_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fmt: str, force_unsafe: bool
) -> None:
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = write_payload(payloads(marker)[name], tmp_path / "evil.pt", fmt)
    with pytest.raises(CheckpointError, match="refused by safe loading") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_resume_from_a_malicious_run_is_refused_in_a_real_process(tmp_path: Path) -> None:
    """End to end, with the override variable set in the environment of `deepfit train --resume`."""
    marker = tmp_path / "marker"
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    write_payload(payloads(marker)["os.system"], run / "last.pt", "zip")
    result = run_deepfit(["train", "--resume", str(tmp_path / "run")], cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert result.returncode == 2, result.stderr
    assert "refused by safe loading" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_both_override_variables_give_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        load_checkpoint(tmp_path / "x.pt")


@pytest.mark.parametrize("version", ["2.9.1", "2.5.0+cu121", "1.13.1", "garbage"])
def test_old_torch_is_refused_with_a_clear_message(version: str) -> None:
    with pytest.raises(CheckpointError, match=r"torch >= 2\.10"):
        check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.14.1", "2.15.0.dev20260101+cpu", "3.0.0"])
def test_supported_torch_passes(version: str) -> None:
    check_torch_version(version)
    check_torch_version()  # the installed one


def test_rng_states_survive_safe_loading(tmp_path: Path) -> None:
    """RNG states are tensors and plain numbers, so weights_only=True reads them back."""
    import random

    import numpy as np

    state = {"kind": "deepfit-checkpoint", "format_version": 1, "config": {}, "classes": [], "input_shape": [1, 2, 2]}
    state |= {"mean": [0.0], "std": [1.0], "model": {}, "rng": rng_state()}
    save_checkpoint(state, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]
