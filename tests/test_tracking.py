"""Experiment trackers (--log): TensorBoard event files and the MLflow store, read back with their
own readers, hold the values of metrics.csv, also across a resume from a mid-epoch checkpoint;
an unreachable server is a warning; a missing package is exit 2; no tracker is imported unasked."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepfit.checkpoint import load_checkpoint
from deepfit.history import read_metrics_csv
from tests.conftest import REPO, CliResult

BATCHES = 7  # 108 training images of tiny_idx in batches of 16
TRAIN = ["train", "--data", "mnist", "--model", "mlp", "--epochs", "2", "--no-progress", "--data.batch-size", "16", "--seed", "1"]


def kill_after_step_9(run: Path) -> None:
    """As if the process died in epoch 2 after logging everything: its last checkpoint is step 9."""
    shutil.copy(run / "checkpoints" / "step-00000009.pt", run / "checkpoints" / "last.pt")


def epoch_columns(run: Path) -> dict[str, list[float]]:
    rows = read_metrics_csv(run / "metrics.csv")
    return {key: [row[key] for row in rows] for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")}


def test_tensorboard_holds_metrics_csv_across_a_resume(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [
        *TRAIN,
        "--data-dir",
        str(tiny_idx),
        "--log",
        "tensorboard",
        "--train.log-every",
        "2",
        "--checkpoint-every",
        "3",
        "--keep-last",
        "9",
    ]
    assert cli(*base, "--out", "run").code == 0
    run = tmp_path / "run"
    kill_after_step_9(run)
    assert cli("train", "--resume", "run", "--no-progress").code == 0
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for key, values in epoch_columns(run).items():
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [BATCHES, 2 * BATCHES], key  # each epoch once, at its global step
        assert [e.value for e in logged] == pytest.approx(values, rel=1e-5), key
    assert [e.step for e in events.Scalars("train_loss_step")] == [2, 4, 6, 8, 10, 12, 14]
    assert events.Scalars("test_acc")[0].value == pytest.approx(float(cli_metric(run, "test_acc")), abs=1e-4)
    assert {"test/confusion", "test/predictions"} <= set(events.Tags()["images"])
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.003) and start.hparams["model.name"].string_value == "mlp"


def cli_metric(run: Path, key: str) -> float:
    """The test metric as evaluate computes it from best.pt (the run measured the same weights)."""
    from deepfit.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(run / "checkpoints" / "last.pt").report.accuracy


def interrupt_at(batch: int):  # type: ignore[no-untyped-def]
    """A progress callback that sends SIGINT after the `batch`-th batch of the run (Ctrl-C)."""
    seen = [0]

    def progress(batches, description, total):  # type: ignore[no-untyped-def]
        for item in batches:
            yield item
            seen[0] += 1
            if seen[0] == batch:
                os.kill(os.getpid(), signal.SIGINT)

    return progress


@pytest.mark.slow  # MLflow's import and the creation of its sqlite store take ~20 s on the loaded 2-core machine
def test_mlflow_holds_metrics_csv_across_a_resume(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from deepfit.config import Config, set_value
    from deepfit.fit import fit
    from deepfit.interrupts import SignalStop

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, run = Config(), tmp_path / "run"
    values = {"data.name": "mnist", "data.dir": str(tiny_idx), "model.name": "mlp", "train.epochs": "3", "data.batch-size": "16",
              "train.log": "mlflow", "train.mlflow-uri": uri, "train.out": str(run), "train.progress": "false"}  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    with pytest.raises(SignalStop):
        fit(config, progress=interrupt_at(BATCHES + 3))  # Ctrl-C in epoch 2
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("deepfit").experiment_id])
    assert only.info.status == "KILLED" and [m.step for m in client.get_metric_history(only.info.run_id, "val_acc")] == [1]
    fit(config, resume=run)
    (only,) = client.search_runs([client.get_experiment_by_name("deepfit").experiment_id])
    assert only.info.status == "FINISHED" and only.data.tags["model"] == "mlp" and only.data.params["optim.lr"] == "0.003"
    for key, values in epoch_columns(run).items():
        history = sorted(client.get_metric_history(only.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3], key  # each epoch once: nothing lost or repeated by the resume
        assert [m.value for m in history] == pytest.approx(values, rel=1e-5), key
    artifacts = {a.path for a in client.list_artifacts(only.info.run_id)} | {
        a.path for a in client.list_artifacts(only.info.run_id, "plots")
    }
    assert {"best.pt", "plots/curves.png"} <= artifacts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_mlflow_server_is_a_warning(cli, tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result: CliResult = cli(
        *TRAIN, "--data-dir", str(tiny_idx), "--epochs", "1", "--log", "mlflow", "--train.mlflow-uri", uri, "--out", "run"
    )
    assert result.code == 0
    stopped = [line for line in result.err.splitlines() if "logging stopped" in line]
    assert len(stopped) == 1 and stopped[0].startswith("deepfit: warning: mlflow logging stopped (")  # one line on stderr
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and not math.isnan(rows[0]["val_acc"])


def test_missing_tracker_package_is_one_line_and_no_run_folder(
    cli, tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    result = cli(*TRAIN, "--data-dir", str(tiny_idx), "--log", "tensorboard,mlflow", "--out", "run")
    assert result.code == 2
    assert "pip install 'deepfit[track]'" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "run").exists()
    assert cli(*TRAIN, "--data-dir", str(tiny_idx), "--log", "wandb").code == 2


def test_no_tracker_is_imported_unless_asked() -> None:
    code = (
        "import sys, deepfit.cli, deepfit.tracking; "  # deepfit.fit imports trackers only through deepfit.tracking
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorboard', 'mlflow'}), 'torch.utils.tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600, check=True).stdout
    assert out.split() == ["[]", "False"]


def scalars(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()


def printed_metric(out: str, key: str) -> float:
    words = [word for line in out.splitlines() if line.startswith("test_") for word in line.split()]
    value = words[words.index(key) + 1]
    return float(value[:-1]) / 100 if value.endswith("%") else float(value)


def test_regression_and_node_runs_log_every_epoch_to_tensorboard_across_a_resume(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    args = ["--data", "line", "--data.batch-size", "16", "--log", "tensorboard", "--no-progress"]
    assert cli("train", *args, "--epochs", "3", "--out", "reg").code == 0
    resumed = cli("train", "--resume", "reg", "--epochs", "5", "--no-progress")  # train.log is kept in config.yaml
    assert resumed.code == 0, resumed.err
    rows = read_metrics_csv(tmp_path / "reg" / "metrics.csv")
    per_epoch = int(load_checkpoint(tmp_path / "reg" / "checkpoints" / "last.pt")["step"]) // 5
    events = scalars(tmp_path / "reg" / "tb")
    for key in ("train_loss", "train_r2", "val_rmse", "val_r2", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [per_epoch * n for n in range(1, 6)], key  # each epoch once, at its global step
        assert [e.value for e in logged] == pytest.approx([row[key] for row in rows], rel=1e-5), key
    assert events.Scalars("test_r2")[-1].value == pytest.approx(printed_metric(resumed.out, "test_r2"), abs=1e-3)

    pytest.importorskip("torch_geometric", reason="node runs need the graph extra (PyTorch Geometric)")
    node = cli("train", "--data", "karate", "--epochs", "12", "--log", "tensorboard", "--out", "node", "--no-progress")
    assert node.code == 0, node.err
    rows = read_metrics_csv(tmp_path / "node" / "metrics.csv")
    events = scalars(tmp_path / "node" / "tb")
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 13))  # step = epoch: one optimizer step each
    assert [e.value for e in events.Scalars("train_acc")] == pytest.approx([row["train_acc"] for row in rows], rel=1e-5)
    assert events.Scalars("test_acc")[-1].value == pytest.approx(printed_metric(node.out, "test_acc"), abs=1e-3)


@pytest.mark.slow  # MLflow's import and sqlite store, as above
def test_regression_and_node_runs_are_mlflow_runs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {"reg": ["--data", "line", "--epochs", "4"], "node": ["--data", "karate", "--epochs", "6"]}
    if importlib.util.find_spec("torch_geometric") is None:
        del runs["node"]
    for name, args in runs.items():
        result = cli("train", *args, "--log", "mlflow", "--train.mlflow-uri", uri, "--out", name, "--no-progress")
        assert result.code == 0, result.err
    client = MlflowClient(uri)
    found = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("deepfit").experiment_id])}
    assert set(found) == set(runs)
    for name, key, figure in (("reg", "val_r2", "predicted.png"), ("node", "train_acc", "embeddings.png")):
        if name not in found:
            continue
        run = found[name]
        assert run.info.status == "FINISHED" and run.data.tags["task"] == ("regression" if name == "reg" else "node")
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        expected = [row[key] for row in read_metrics_csv(tmp_path / name / "metrics.csv")]
        assert [m.value for m in history] == pytest.approx(expected, rel=1e-5) and len(history) == len(expected)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
            a.path for a in client.list_artifacts(run.info.run_id, "plots")
        }
        assert {"best.pt", f"plots/{figure}"} <= artifacts


def test_a_missing_tracker_package_stops_a_regression_run_before_its_folder(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    result = cli("train", "--data", "line", "--epochs", "2", "--log", "mlflow", "--out", "reg", "--no-progress")
    assert result.code == 2 and "pip install 'deepfit[track]'" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "reg").exists()
