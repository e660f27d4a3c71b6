"""The benchmark harness runs end to end on tiny synthetic IDX data, so it cannot rot."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from bench import common, guard, recipes, run, train
from bench import data as data_bench

from tests.conftest import write_tiny_idx


@pytest.fixture
def tiny_datasets(tmp_path: Path) -> Path:
    for name in ("fashion-mnist", "mnist"):
        write_tiny_idx(tmp_path / "datasets" / name, train=96, test=32, side=28)
    return tmp_path / "datasets"


def test_torchvision_layout_is_uncompressed_idx(tiny_datasets: Path, tmp_path: Path) -> None:
    from torchvision import datasets

    root = common.make_torchvision_root("fashion-mnist", tiny_datasets / "fashion-mnist", tmp_path / "tv")
    train_set = datasets.FashionMNIST(str(root), train=True)
    assert len(train_set) == 96 and train_set[0][0].size == (28, 28)


def test_training_bench_compares_baseline_and_deepfit(tiny_datasets: Path) -> None:
    results, skipped = train.run_cases(["lenet-fashion", "cnn_bn-cifar10"], tiny_datasets)
    assert [r.impl for r in results] == ["baseline", "deepfit"]
    base, ours = results
    assert ours.ratio == pytest.approx(ours.images_per_s / base.images_per_s)
    for r in results:
        assert r.images_per_s > 0 and 0.0 <= r.test_acc <= 1.0 and r.wall_s >= r.seconds_per_epoch
    assert "cnn_bn-cifar10" in skipped  # no zip in the tiny folder: reported, not fatal
    assert base.last_images_per_s is None and ours.last_images_per_s is None  # 1 epoch: no steady state apart from it


def test_two_epochs_give_each_side_its_last_epochs_rate(tiny_datasets: Path) -> None:
    results, _ = train.run_cases(["lenet-fashion"], tiny_datasets, epochs=2)
    for r in results:
        assert r.last_images_per_s is not None and r.last_images_per_s > 0
    assert train.last_epoch_rate(100, [4.0, 0.5]) == 200.0 and train.last_epoch_rate(100, [4.0]) is None


def test_the_lessons_rows_carry_the_last_epochs_rate_and_ratio(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench import gpu
    from bench.common import Result

    rows = [Result("cnn_bn cifar10", "baseline", 8000.0, 6.0, 0.6, 20.0), Result("cnn_bn cifar10", "deepfit", 40000.0, 1.2, 0.6, 9.0, 5.0)]
    rows[0].last_images_per_s, rows[1].last_images_per_s = 9000.0, 108000.0
    monkeypatch.setattr(train, "run_cases", lambda names, datasets, epochs: (rows, {}))
    lessons, ours = gpu.run_lessons(write_tiny_cifar_zip(tmp_path / "c.zip", per_class=1), "cpu", 2)
    assert lessons.figures["last_epoch_ratio"] == pytest.approx(1.0) and ours.figures["last_epoch_ratio"] == pytest.approx(12.0)
    assert ours.figures["ratio"] == 5.0 and "last_epoch_ratio 12.00x" in gpu.format_row(ours)
    gains = {r.what: r.figures["ratio"] for r in gpu.graphs_gain([lessons, gpu.Row("cnn_bn", "deepfit, graphs", dict(ours.figures))])}
    assert gains == {"cnn_bn vs lessons": pytest.approx(5.0), "cnn_bn vs lessons, last ep": pytest.approx(12.0)}


def test_make_bench_entry_prints_table_and_writes_json(
    tiny_datasets: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    code = run.main(["--datasets", str(tiny_datasets), "--cases", "lenet-fashion", "--no-data"])
    out = capsys.readouterr().out
    assert code == 0 and "lenet fashion-mnist" in out and "images/s" in out
    (saved,) = (tmp_path / "results").glob("bench-*.json")
    payload = json.loads(saved.read_text())
    assert {r["impl"] for r in payload["train"]} == {"baseline", "deepfit"}


def write_tiny_cifar_zip(path: Path, *, per_class: int = 6) -> Path:
    """The layout of cifar10-jpg.zip (stored JPEGs under train/<class>/ and test/<class>/), tiny."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            for label in ("cat", "dog", "ship"):
                for i in range(per_class):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
                    archive.writestr(f"{split}/{label}/{i:04d}.jpg", buffer.getvalue())
    return path


def test_guard_bench_times_the_loop_with_and_without_the_guard_and_its_own_work() -> None:
    row = guard.measure("mlp", steps=3, rounds=2, batch=8, device=torch.device("cpu"))
    assert row["ms_per_step_guard_on"] > 0 and row["ms_per_step_guard_off"] > 0 and row["ms_guard_alone"] > 0  # type: ignore[operator]
    assert row["overhead_pct"] == pytest.approx(100 * (row["ms_per_step_guard_on"] / row["ms_per_step_guard_off"] - 1))  # type: ignore[operator]


def test_data_bench_compares_the_lessons_loader_with_deepfits(tiny_datasets: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    write_tiny_cifar_zip(tiny_datasets / "cifar10-jpg.zip")
    assert data_bench.main(["--datasets", str(tiny_datasets), "--repeat", "1", "--no-save"]) == 0
    out = capsys.readouterr().out
    rows, figures = data_bench.run_dataset("cifar10", tiny_datasets / "cifar10-jpg.zip", repeat=1)
    assert [r.impl for r in rows] == ["baseline", "deepfit first run", "deepfit cached", "deepfit stream"]
    assert all(r.images == 18 for r in rows) and rows[0].ratio == 1.0
    assert rows[2].ratio == pytest.approx(rows[2].images_per_s / rows[0].images_per_s)
    assert figures["files"] == 36 and figures["first_decode_s"] > 0 and figures["cache_load_s"] > 0
    assert "fashion-mnist" in out and "deepfit cached" in out and "first decode of 36 files" in out


FAKE_AIRBENCH = """
import os, sys
if not (os.path.isfile("cifar10/train.pt") and os.path.isfile("cifar10/test.pt")):  # where airbench94 looks, else downloads
    sys.exit("no cifar10/train.pt and test.pt in " + os.getcwd())
print("---------------------------------------------------------------------------------------")
print("|  run  |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |")
for run, (acc, seconds) in enumerate([(0.904, 2.21), (0.906, 2.19)]):
    print(f"|  {run}  |  0  |  1.2  |  0.5  |  0.6  |     |  0.5  |")
    print(f"|  {run}  |  eval  |     |     |  0.9  |  {acc}  |  {seconds}  |")
"""

TINY_SUITE = """
def test_one():
    assert 1 + 1 == 2

def test_two():
    assert "deepfit"

def test_three():
    assert 1 == 2
"""


@pytest.mark.slow  # four processes that import torch: about 40 s of CPU on the 2-core machine
def test_gpu_bench_runs_every_part_at_toy_size_on_cpu(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from bench import gpu

    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip")
    (tmp_path / "airbench94.py").write_text(FAKE_AIRBENCH)
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_tiny.py").write_text(TINY_SUITE)
    argv = ["--cifar", str(cifar), "--device", "cpu", "--seeds", "1", "--lesson-epochs", "1", "--workers", "1", "--no-save"]
    argv += ["--suite", str(tmp_path / "suite"), "--airbench", str(tmp_path / "airbench94.py")]
    argv += [
        "--set",
        "train.epochs=1",
        "--set",
        "data.batch_size=16",
        "--set",
        "train.precision=32",
        "--timeout",
        "900",
        "--airbench-seconds",
        "300",
        "--variant",
        "train.epochs=2,train.lookahead=0",
        "--variant-seeds",
        "2",
        "--cnn-variant",
        "train.cudnn_benchmark=true",
        "--profile",
    ]
    assert gpu.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"suite\s+pytest on cpu\s+passed 2, failed 1, errors 0, skipped 0, seconds", out), out
    assert re.search(
        r"recipe\s+seed 0\s+test_acc \d+\.\d\d%, train_s \d+\.\d\d, epochs 1, steps 1, steps_per_s \d+\.\d\d, warmup_s", out
    ), out
    assert re.search(r"recipe sync\s+seed 0\s+test_acc \d+\.\d\d%, train_s \d+\.\d\d, epochs 1, steps 1, steps_per_s", out), out
    assert re.search(r"airbench94\s+run 1\s+test_acc 90\.60%, train_s 2\.19", out), out
    assert re.search(r"airbench94\s+mean of 2\s+test_acc 90\.50%, train_s 2\.20", out), out
    assert re.search(r"cnn_bn\s+lessons' loop\s+images_per_s \d", out) and re.search(r"cnn_bn\s+deepfit\s+.*ratio \d+\.\d\dx", out), out
    assert re.search(r"cnn_bn\s+deepfit, deterministic\s+images_per_s \d", out), out
    assert re.search(r"recipe determ\s+seed 0\s+test_acc \d+\.\d\d%, train_s", out), out
    assert re.search(r"determ\s+recipe cost\s+step_time_pct [+-]\d+\.\d%", out), out
    assert re.search(r"determ\s+cnn_bn cost\s+step_time_pct [+-]\d+\.\d%", out), out
    assert re.search(r"cnn_bn\s+deepfit, graphs\s+images_per_s \d", out), out
    assert re.search(r"recipe graphs\s+seed 0\s+test_acc \d+\.\d\d%, train_s", out), out
    assert re.search(r"cnn_bn\s+deepfit, model graphs\s+images_per_s \d", out), out
    assert re.search(r"recipe model graphs\s+seed 0\s+test_acc \d+\.\d\d%, train_s", out), out
    assert re.search(
        r"variant\s+train.epochs=2,train.lookahead=0 s1\s+test_acc \d+\.\d\d%, train_s [\d.]+, epochs 2, steps 2, .*ratio \d+\.\d\dx", out
    ), out
    assert re.search(r"variant\s+train.epochs=2,train.lookahead=0 mean of 2\s+test_acc \d+\.\d\d%, train_s [\d.]+, process_s", out), out
    assert re.search(r"cnn_bn\s+train.cudnn_benchmark=\s+images_per_s \d.*ratio \d+\.\d\dx", out), out
    for what in ("recipe", "recipe, graphs", "cnn_bn", "cnn_bn, graphs"):
        assert re.search(rf"profile\s+{what}\s+steps \d+, wall_ms_per_step [\d.]+, top \w+ \d+%", out), out
    for pair in ("cnn_bn vs lessons", "cnn_bn vs eager", "cnn_bn vs model graphs", "recipe vs eager", "recipe vs model graphs"):
        assert re.search(rf"graphs\s+{pair}\s+ratio \d+\.\d\dx", out), out
    first, table = out.split("\n\npart", 1)  # each row as it was measured, then the table: the same rows
    assert [line for line in first.splitlines() if line.startswith("suite")] == [
        line for line in table.splitlines() if line.startswith("suite")
    ]


def test_graphs_gain_is_the_rate_with_graphs_over_the_rate_without() -> None:
    from bench.gpu import Row, graphs_gain

    rows = [
        Row("recipe", "seed 0", {"steps_per_s": 200.0}),
        Row("recipe graphs", "seed 0", {"steps_per_s": 250.0}),
        Row("cnn_bn", "lessons' loop", {"images_per_s": 8000.0}),
        Row("cnn_bn", "deepfit, plain", {"error": "no result"}),
        Row("cnn_bn", "deepfit, graphs", {"images_per_s": 96000.0}),
        Row("cnn_bn", "deepfit, model graphs", {"images_per_s": 60000.0}),
        Row("recipe model graphs", "seed 0", {"steps_per_s": 230.0}),
    ]
    gains = {row.what: row.figures["ratio"] for row in graphs_gain(rows)}  # the eager cnn_bn run has no figure
    assert gains == {
        "cnn_bn vs lessons": pytest.approx(12.0),
        "cnn_bn vs model graphs": pytest.approx(1.6),
        "recipe vs eager": pytest.approx(1.25),
        "recipe vs model graphs": pytest.approx(250 / 230),
    }


def test_determinism_cost_is_the_step_time_it_adds() -> None:
    from bench.gpu import Row, determinism_cost

    rows = [
        Row("recipe", "seed 0", {"steps_per_s": 240.0}),
        Row("recipe", "seed 1", {"steps_per_s": 1.0}),  # only seed 0 has a deterministic twin
        Row("recipe determ", "seed 0", {"steps_per_s": 200.0}),
        Row("cnn_bn", "deepfit, plain", {"images_per_s": 30000.0}),
        Row("cnn_bn", "deepfit, deterministic", {"error": "no result"}),
    ]
    (cost,) = determinism_cost(rows)  # the cnn_bn pair has no figure to compare
    assert (cost.what, cost.figures["step_time_pct"]) == ("recipe cost", pytest.approx(20.0))


@pytest.mark.parametrize("setting", ["", "train.deterministic=true", "train.cuda_graphs=true"])
def test_the_cnn_bn_child_trains_deepfits_side_with_the_settings_it_is_given(
    setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import importlib

    from bench import gpu

    from deepfit.runtime import set_deterministic

    fit_module = importlib.import_module("deepfit.fit")
    seen = []
    real_fit = fit_module.fit

    def recording_fit(config, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(config)
        return real_fit(config, **kwargs)

    monkeypatch.setattr(fit_module, "fit", recording_fit)
    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip", per_class=4)
    try:
        gpu.one_cnn_bn(cifar, "cpu", str(tmp_path / "run"), 1, [setting] if setting else [])
    finally:
        set_deterministic(False)  # the child process's switch, not left on for later tests
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["images_per_s"] > 0 and 0 <= figures["test_acc"] <= 1 and "last_epoch_images_per_s" not in figures  # 1 epoch
    (config,) = seen
    assert (config.model.name, config.optim.name, config.data.batch_size) == ("cnn_bn", "adam", 128)
    assert config.train.deterministic is (setting == "train.deterministic=true") and config.train.out == str(tmp_path / "run")
    assert config.train.cuda_graphs is (setting == "train.cuda_graphs=true")
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_a_model_graphs_child_graphs_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu

    import deepfit.fitparts as fitparts
    from deepfit.config import Config
    from deepfit.cudagraphs import GraphedForward, GraphedStep

    monkeypatch.setattr(fitparts, "steps_can_be_graphed", fitparts.steps_can_be_graphed)  # put back after the test
    config = Config()
    config.train.cuda_graphs = True
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    graphs = functools.partial(fitparts.cuda_graphs, config, model, torch.device("cuda"), ranks=1, optimizer=optimizer, scheduler=None)
    assert isinstance(graphs(), GraphedStep)
    gpu.graph_model_only()
    assert isinstance(graphs(), GraphedForward)


def test_gpu_bench_takes_the_zip_relative_to_where_it_is_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from bench import gpu

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".device").mkdir()
    (tmp_path / ".device" / "cifar10-jpg.zip").write_bytes(b"")
    assert gpu.parse_args(["--cifar", ".device/cifar10-jpg.zip"]).cifar == tmp_path / ".device" / "cifar10-jpg.zip"
    with pytest.raises(SystemExit):
        gpu.parse_args(["--cifar", "missing.zip"])
    assert "--cifar missing.zip is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("warmup", [True, False])
def test_a_recipe_run_is_timed_after_an_untimed_warmup_epoch(warmup: bool, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """As airbench94 times its runs after a warm-up run: one epoch in the same process, in its own
    folder, its seconds reported apart; --no-warmup times the run cold."""
    from bench import gpu

    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip", per_class=4)
    overrides = ["train.epochs=2", "data.batch_size=8", "train.precision=32", "train.tta=none"]
    gpu.one_recipe(cifar, 0, "cpu", str(tmp_path / "run"), overrides, warmup=warmup)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["epochs"] == 2 and figures["train_s"] > 0  # the timed run is the whole recipe, not the warm-up
    assert figures["steps"] == 2 and figures["steps_per_s"] == pytest.approx(2 / figures["train_s"])  # 12 images: 1 full batch of 8
    assert ("warmup_s" in figures and figures["warmup_s"] > 0) is warmup
    assert (tmp_path / "run-warmup" / "metrics.csv").is_file() is warmup
    assert not warmup or len((tmp_path / "run-warmup" / "metrics.csv").read_text().splitlines()) == 2  # header + 1 epoch


@pytest.mark.parametrize("sync", [False, True])
def test_the_sync_row_reads_the_guard_on_the_host_after_every_step(
    sync: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from bench import gpu

    from deepfit.engine import FiniteGuard
    from tests.test_host_reads import HostReads, counting_host_copies

    monkeypatch.setattr(FiniteGuard, "WINDOW", FiniteGuard.WINDOW)  # one_recipe(sync=True) narrows it: restored after
    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip", per_class=8)  # 24 images: 6 steps of 4 an epoch
    overrides = ["train.epochs=2", "data.batch_size=4", "train.precision=32", "train.tta=none"]
    counter = HostReads()
    counting_host_copies(counter, monkeypatch)
    with counter:
        gpu.one_recipe(cifar, 0, "cpu", str(tmp_path / "run"), overrides, warmup=False, sync=sync)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 12
    guard_reads = counter.reads["tolist"]
    assert guard_reads >= 12 if sync else guard_reads < 12


def test_airbench_gets_the_same_images_in_its_own_file_layout(tmp_path: Path) -> None:
    """airbench94 reads cifar10/{train,test}.pt (NHWC uint8, labels, class names) with torch.load's
    safe loading: the files hold exactly what deepfit decodes from the zip."""
    import torch
    from bench import gpu

    from deepfit.config import DataConfig
    from deepfit.data import load_source

    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip", per_class=4)
    folder = gpu.airbench_data(cifar, tmp_path / "work")
    ours = load_source(DataConfig(name=str(cifar)), seed=0)
    for split, images in (("train", ours.train), ("test", ours.test)):
        assert images is not None
        data = torch.load(folder / "cifar10" / f"{split}.pt", weights_only=True)
        assert data["images"].shape == (12, 32, 32, 3) and data["images"].dtype == torch.uint8
        assert torch.equal(data["images"], images.images.permute(0, 2, 3, 1))
        assert torch.equal(data["labels"], images.labels) and data["classes"] == ["cat", "dog", "ship"]


def test_airbench_stopped_at_its_time_limit_keeps_the_runs_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """airbench94.py trains 25 times; bench/gpu.py gives it a time limit and counts the runs
    printed by then (its output unbuffered, so they are not lost with the killed process)."""
    from bench import gpu

    one_run_then_hang = FAKE_AIRBENCH.replace("[(0.904, 2.21), (0.906, 2.19)]", "[(0.903, 2.25)]") + "import time\ntime.sleep(600)\n"
    (tmp_path / "airbench94.py").write_text(one_run_then_hang)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # a pipe then buffers its table, unless bench/gpu.py unbuffers it
    rows = gpu.run_airbench(tmp_path / "airbench94.py", write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip"), "cpu", seconds=5)
    assert [r.figures for r in rows[:1]] == [{"test_acc": 0.903, "train_s": 2.25}]
    assert rows[1].what == "whole process" and rows[1].figures["runs"] == 1.0 and rows[1].figures["stopped"] == "at the 5 s limit"
    assert 5 <= float(rows[1].figures["process_s"]) < 60


def test_gpu_bench_reads_the_suite_and_airbench_from_their_processes(tmp_path: Path) -> None:
    """The two parts that need no torch in their child processes, quick: a tiny suite with one
    failure, and an airbench stand-in printing airbench94's table."""
    from bench import gpu

    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_tiny.py").write_text(TINY_SUITE)
    plugin = "import os\ndef pytest_unconfigure(config):\n    os.write(2, b'a warning of a plugin\\n' * 400)\n"
    (tmp_path / "suite" / "conftest.py").write_text(plugin)  # stderr after pytest's summary, as xdist's workers print
    suite = gpu.run_suite([str(tmp_path / "suite")], "cpu", workers=1, timeout=300, log=tmp_path / "suite.log")
    assert (suite.figures["passed"], suite.figures["failed"], suite.figures["exit"]) == (2.0, 1.0, "1")  # not hidden by stderr
    log = (tmp_path / "suite.log").read_text()
    assert "1 failed, 2 passed" in log and log.count("a warning of a plugin") == 400 and "assert 1 == 2" in log
    (tmp_path / "airbench94.py").write_text(FAKE_AIRBENCH)
    rows = gpu.run_airbench(tmp_path / "airbench94.py", write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip"), "cpu", seconds=300)
    assert [r.figures.get("test_acc") for r in rows[:2]] == [0.904, 0.906]
    mean = gpu.summary(rows, "airbench94")
    assert mean is not None and mean.figures["test_acc"] == pytest.approx(0.905) and mean.figures["train_s"] == pytest.approx(2.2)
    assert re.search(r"^airbench94\s+mean of 2\s+test_acc 90.50%", gpu.format_rows([mean]), re.M)


def test_pytest_summary_counts() -> None:
    from bench.gpu import pytest_counts

    counts = pytest_counts("== 3 failed, 1402 passed, 12 skipped, 2 errors in 280.1s ==")
    assert counts == {"passed": 1402.0, "failed": 3.0, "errors": 2.0, "skipped": 12.0}


def serve_bench_args(tiny_datasets: Path, tmp_path: Path) -> list[str]:
    from deepfit.cli import main

    run_dir = tmp_path / "fmnist-run"
    args = ["train", "--data", "fashion-mnist", "--data-dir", str(tiny_datasets / "fashion-mnist"), "--model", "cnn_bn"]
    assert main([*args, "--epochs", "1", "--no-progress", "--out", str(run_dir)]) == 0
    data = ["--data-dir", str(tiny_datasets / "fashion-mnist"), "--images", "12", "--seconds", "1", "--connections", "2"]
    return ["--checkpoint", str(run_dir), *data, "--client", "httpx", "--no-save"]


def test_serve_bench_smoke_agrees_with_predict_and_measures_load(tiny_datasets: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for name in ("fastapi", "uvicorn", "httpx"):  # the serve extra; a bare GPU machine has none
        pytest.importorskip(name)
    from bench import serve as serve_bench

    code = serve_bench.main([*serve_bench_args(tiny_datasets, tmp_path), "--agreement-backends", "torch", "--no-litserve"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "agreement with deepfit predict, torch: 0 disagreements in 12 images" in out
    (line,) = [row for row in out.splitlines() if row.startswith("deepfit serve (torch)")]
    assert float(line.split()[5]) > 0  # requests/s


def test_table_serve_bench_smoke_answers_the_peers_values(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for name in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(name)
    from bench import serve_table

    from deepfit.cli import main

    assert main(["train", "--data", "line", "--epochs", "5", "--no-progress", "--out", str(tmp_path / "line")]) == 0
    capsys.readouterr()
    code = serve_table.main(["--checkpoint", str(tmp_path / "line"), "--rows", "1,40", "--repeats", "3", "--no-save"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines[1:]] == ["1", "40"]
    assert all(line.split()[-1] == "yes" for line in lines[1:])  # deepfit and the peer answered the same values


@pytest.mark.slow
def test_serve_bench_smoke_with_litserve_and_onnx(tiny_datasets: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("litserve")
    from bench import serve as serve_bench

    assert serve_bench.main(serve_bench_args(tiny_datasets, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "onnx: 0 disagreements" in out and "litserve" in out and "x LitServe's" in out


def test_recipes_bench_runs_each_seed_as_its_own_process(tiny_datasets: Path) -> None:
    recipe = recipes.Recipe("mnist-99.yaml", "mnist", target_acc=0.0, budget_s=600.0)
    row = recipes.measure("tiny", recipe, tiny_datasets, repeats=2, extra=["--epochs", "2"], first_seed=1)
    runs = row["runs"]
    assert isinstance(runs, list) and len(runs) == 2 and all(wall > 0 and 0.0 <= acc <= 1.0 for wall, acc in runs)
    assert row["extra"] == ["--epochs", "2"] and row["met"] is True
    table = recipes.format_rows([row])
    assert row["seeds"] == [1, 2] and "seed 1: " in table and "seed 2: " in table and "(target missed)" not in table


@pytest.mark.parametrize("what", ["recipe", "cnn_bn"])
def test_the_profile_child_reports_one_epoch_of_two(what: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from bench import gpu

    cifar = write_tiny_cifar_zip(tmp_path / "cifar10-jpg.zip", per_class=4)
    overrides = ["data.batch_size=4", "train.precision=32"] if what == "recipe" else []
    gpu.one_profile(what, cifar, "cpu", str(tmp_path / "run"), overrides)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    epochs = [line for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:] if line]
    assert len(epochs) == 2  # one of them profiled
    steps = 12 // 4 if what == "recipe" else 1  # 12 training images: batches of 4 (recipe), one batch of up to 128 (cnn_bn)
    assert figures["steps"] == steps and figures["wall_ms_per_step"] > 0
    assert "device_ms_per_step" not in figures  # the CPU has no device activity to report
    top = figures["top"].split("; ")
    assert len(top) == 3 and all(re.fullmatch(r"\w+ \d+%", item) for item in top), top


def test_device_time_counts_kernels_not_the_annotation_spans_over_them() -> None:
    """On CUDA the profiler also puts record_function ranges (Optimizer.step#Adam.step) on the
    device's timeline, spanning the kernels they launched: counting them too reported cnn_bn's
    device time a step 13% high on the H200, with the span as its 'longest kernel'."""
    from types import SimpleNamespace

    from bench.gpuprofile import event_figures

    def event(name: str, us: float, *, annotation: bool = False) -> SimpleNamespace:
        span = SimpleNamespace(elapsed_us=lambda: us)
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA, time_range=span, is_user_annotation=annotation)

    events = [event("void at::native::conv_kernel<float>()", 600.0), event("multi_tensor_apply_kernel", 200.0)]
    events.append(event("Optimizer.step#Adam.step", 150.0, annotation=True))
    figures = event_figures(events, wall=0.004, steps=2, cuda=True)
    assert figures["device_ms_per_step"] == pytest.approx(0.4) and figures["busy_pct"] == pytest.approx(20.0)
    assert figures["top"] == "conv_kernel 75%; multi_tensor_apply_kernel 25%"


def test_profile_names_are_short_and_shares_add_up() -> None:
    from bench.gpuprofile import short, top_three

    kernel = "void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16, float>(c10::BFloat16 const*, long)"
    assert short(kernel) == "max_pool_backward_nhwc"
    assert short("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize") == "sm90_xmma_fprop_implicit_gemm_bf16bf16_b"
    assert top_three({"a": 50.0, "b": 30.0, "c": 15.0, "d": 5.0}, 100.0) == "a 50%; b 30%; c 15%"


def test_a_graphs_row_says_when_its_capture_fell_back_to_eager() -> None:
    from bench.gpu import graphs_warning

    stderr = (
        "some torch notice\n"
        "/x/deepfit/engine.py:140: UserWarning: train.cuda_graphs: Sequential could not be captured (CUDA error: x); training eagerly\n"
        "  logits = forward(x)\n"
    )
    assert graphs_warning(stderr) == "train.cuda_graphs: Sequential could not be captured (CUDA error: x); training eagerly"
    assert graphs_warning("a warning about something else\n") is None
    stream = "/t/graph.py:869: UserWarning: The AccumulateGrad node's stream does not match the stream of the node that produced"
    assert graphs_warning(stream).startswith("The AccumulateGrad node's stream does not match")  # type: ignore[union-attr]
