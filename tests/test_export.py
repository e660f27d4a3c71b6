"""`deepfit export`: ONNX and TorchScript files of every registered model compute what the PyTorch
model computes (checked here again with onnxruntime / torch.jit.load, at batch sizes the export
never saw), carry classes and preprocessing, and the TorchScript file predicts in a Python
process that cannot import deepfit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from deepfit.checkpoint import FORMAT_VERSION, KIND, save_checkpoint
from deepfit.config import Config
from deepfit.export import export_checkpoint, read_onnx_metadata
from deepfit.exportfile import EXTRA_FILE, SUFFIXES
from deepfit.models import build_model, list_models

CLASSES = [f"class-{i}" for i in range(10)]
SHAPES = {"resnet18": (3, 32, 32), "airbench": (3, 32, 32)}  # others: one 28x28 channel


def write_checkpoint(path: Path, model_name: str = "lenet", *, input_shape: tuple[int, int, int] | None = None, seed: int = 0) -> Path:
    """A checkpoint like training writes, of a randomly initialised model whose BatchNorm layers
    hold non-trivial running statistics (a few train-mode forward passes)."""
    shape = input_shape or SHAPES.get(model_name, (1, 28, 28))
    torch.manual_seed(seed)
    config = Config()
    config.model.name = model_name
    model = build_model(config.model, input_shape=shape, num_classes=len(CLASSES))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape) * 1.5 + 0.3)
    mean = [0.1 * (c + 2) for c in range(shape[0])]
    std = [0.2 + 0.05 * c for c in range(shape[0])]
    state = {
        "kind": KIND, "format_version": FORMAT_VERSION, "config": config.to_dict(), "classes": CLASSES,
        "input_shape": list(shape), "mean": mean, "std": std, "flip_ok": True,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "epoch": 1, "step": 1, "best_metric": 0.5, "history": [],
    }  # fmt: skip
    save_checkpoint(state, path)
    return path


def pytorch_logits(checkpoint: Path, x: torch.Tensor) -> np.ndarray:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = Config()
    config.model.name = state["config"]["model"]["name"]
    model = build_model(config.model, input_shape=tuple(state["input_shape"]), num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return model.eval()(x).numpy()


def inputs(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(7))


EXPECTED_MODELS = ["lenet", "cnn_bn", "resnet18"]  # the issue names these; each must be registered
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.mark.parametrize("name", sorted(set(list_models()) | set(EXPECTED_MODELS)))
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_carries_metadata(name: str, fmt: str, tmp_path: Path) -> None:
    assert name in list_models(), f"model {name} is not registered"
    checkpoint = write_checkpoint(tmp_path / "model.pt", name)
    result = export_checkpoint(checkpoint, format=fmt)
    assert result.path.is_file() and result.max_abs_diff <= 1e-4
    shape = SHAPES.get(name, (1, 28, 28))
    x = inputs(shape, 3)  # a batch size the export did not trace with
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        onnx.checker.check_model(onnx.load(str(result.path)))
        meta = read_onnx_metadata(result.path)
    else:
        extra = {EXTRA_FILE: ""}
        loaded = torch.jit.load(str(result.path), _extra_files=extra)
        got = loaded(x).detach().numpy()
        meta = json.loads(extra[EXTRA_FILE])
    assert np.abs(got - pytorch_logits(checkpoint, x)).max() <= 1e-4
    assert meta["classes"] == CLASSES and meta["input_shape"] == list(shape)
    assert meta["mean"] == pytest.approx([0.1 * (c + 2) for c in range(shape[0])])
    assert meta["std"] == pytest.approx([0.2 + 0.05 * c for c in range(shape[0])])


def test_onnx_batch_dimension_is_dynamic(tmp_path: Path) -> None:
    result = export_checkpoint(write_checkpoint(tmp_path / "m.pt", "cnn_bn"), format="onnx")
    graph = onnx.load(str(result.path)).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param


def test_cli_export_prints_the_difference_and_default_paths(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    result = cli("export", str(checkpoint), "--format", "torchscript")
    assert result.code == 0, result.err
    assert "max abs difference" in result.out and (tmp_path / "model.torchscript.pt").is_file()
    result = cli("export", str(checkpoint), "--format", "onnx", "--out", "sub/x.onnx")
    assert result.code == 0 and (tmp_path / "sub" / "x.onnx").is_file()


def test_run_folder_exports_into_the_run(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = ("--data", "mnist", "--data-dir", str(tiny_idx), "--epochs", "1", "--no-progress", "--model", "lenet", "--out", "run")
    assert cli("train", *args).code == 0
    assert cli("export", "run", "--format", "onnx").code == 0
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()


def test_a_difference_above_tolerance_fails_and_removes_the_file(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import deepfit.export

    monkeypatch.setattr(deepfit.export, "TOLERANCE", 0.0)  # ONNX's float reordering exceeds 0 on lenet
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    result = cli("export", str(checkpoint), "--format", "onnx")
    assert result.code == 1
    line = result.err.strip()
    assert len(line.splitlines()) == 1 and "differs from the PyTorch model by" in line and "Traceback" not in line
    assert not (tmp_path / "model.onnx").exists()


def test_unknown_format_is_a_usage_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("export", str(write_checkpoint(tmp_path / "m.pt")), "--format", "tflite")
    assert result.code == 2 and "invalid choice" in result.err


CONSUMER = r"""
import json, sys
# No deepfit: any import of it, here or inside torch.jit.load, fails (whether it is installed
# in site-packages or editable from src/; dropping its sys.path entry dropped numpy and torch too
# where deepfit sits in site-packages beside them).
sys.modules["deepfit"] = None
try:
    import deepfit
    raise SystemExit("deepfit is importable")
except ModuleNotFoundError:
    pass
import numpy as np
import torch
extra = {"deepfit.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
meta = json.loads(extra["deepfit.json"])
c, h, w = meta["input_shape"]
pixels = np.load(sys.argv[2])  # uint8 (N, C, H, W)
mean = np.array(meta["mean"], dtype=np.float32).reshape(1, c, 1, 1)
std = np.array(meta["std"], dtype=np.float32).reshape(1, c, 1, 1)
x = torch.from_numpy((pixels.astype(np.float32) / 255 - mean) / std)
logits = model(x).detach()
print(json.dumps({"labels": [meta["classes"][i] for i in logits.argmax(1).tolist()], "logits": logits.tolist()}))
"""


def test_torchscript_predicts_in_a_process_without_deepfit(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "model.pt", "cnn_bn")
    exported = export_checkpoint(checkpoint, format="torchscript").path
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(exported), str(tmp_path / "pixels.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    state = torch.load(checkpoint, weights_only=True)
    mean = torch.tensor(state["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(state["std"]).view(1, -1, 1, 1)
    expected = pytorch_logits(checkpoint, (torch.from_numpy(pixels).float() / 255 - mean) / std)
    assert np.abs(np.array(answer["logits"]) - expected).max() <= 1e-4
    assert answer["labels"] == [CLASSES[i] for i in expected.argmax(1)]


def test_a_failed_export_keeps_the_earlier_file_and_leaves_nothing_else(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import deepfit.export

    checkpoint = write_checkpoint(tmp_path / "model.pt")
    assert cli("export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "out" / "m.onnx")).code == 0
    before = (tmp_path / "out" / "m.onnx").read_bytes()

    def broken_runner(target: Path):  # type: ignore[no-untyped-def]
        def run(x: np.ndarray) -> np.ndarray:
            raise RuntimeError("unsupported operator")

        return run

    monkeypatch.setattr(deepfit.export, "onnx_runner", broken_runner)
    failed = cli("export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "out" / "m.onnx"))
    assert failed.code == 2 and "unsupported operator" in failed.err
    assert (tmp_path / "out" / "m.onnx").read_bytes() == before  # the earlier export, as it was
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx"]  # no half-written file beside it


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_an_export_to_a_place_that_cannot_be_written_is_one_line(cli, tmp_path: Path, format: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    taken = tmp_path / f"taken{SUFFIXES[format]}"
    taken.mkdir()
    for out in (tmp_path / "notes.txt" / "model.out", taken):
        result = cli("export", str(checkpoint), "--format", format, "--out", str(out))
        assert result.code == 2 and result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
        assert f"cannot write {out}" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "notes.txt", taken.name]
    assert not any(taken.iterdir())


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_an_export_never_replaces_a_checkpoint_nor_takes_the_other_formats_name(cli, tmp_path: Path, format: str) -> None:  # type: ignore[no-untyped-def]
    """`--out runs/x/checkpoints/best.pt` wrote the ONNX file over the very weights it exported."""
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    other = write_checkpoint(tmp_path / "other.torchscript.pt", seed=1)
    before = {path: path.read_bytes() for path in (checkpoint, other)}
    wrong = tmp_path / ("model.pth" if format == "onnx" else "model.onnx")
    said = {
        checkpoint: ".pt is not for an ONNX file; name it *.onnx"
        if format == "onnx"
        else "is a PyTorch checkpoint; an export does not replace weights",
        other: ".pt is not for an ONNX file; name it *.onnx"
        if format == "onnx"
        else "is a PyTorch checkpoint; an export does not replace weights",
        wrong: ".pth is not for an ONNX file" if format == "onnx" else ".onnx is not for a TorchScript file; name it *.torchscript.pt",
    }
    for out, message in said.items():
        result = cli("export", str(checkpoint), "--format", format, "--out", str(out))
        assert result.code == 2 and result.err.count("\n") == 1 and message in result.err, result.err
    assert {path: path.read_bytes() for path in before} == before and not wrong.exists()
    written = cli("export", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "again.pt"))
    assert written.code == 0, written.err
    again = cli("export", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "again.pt"))
    assert again.code == 0, again.err  # an earlier TorchScript export is replaced: it is not a checkpoint


def test_an_exported_file_that_cannot_run_is_one_line_and_removed(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import deepfit.export

    def broken_runner(target: Path):  # type: ignore[no-untyped-def]
        def run(x: np.ndarray) -> np.ndarray:
            raise RuntimeError("unsupported operator\nsecond line")

        return run

    monkeypatch.setattr(deepfit.export, "onnx_runner", broken_runner)
    result = cli("export", str(write_checkpoint(tmp_path / "model.pt")), "--format", "onnx")
    assert result.code == 2 and result.err.count("\n") == 1 and "unsupported operator" in result.err
    assert not (tmp_path / "model.onnx").exists()
