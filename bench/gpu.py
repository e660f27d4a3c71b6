"""`make bench-gpu`: one command, one table, on a GPU machine (torch, torchvision, pytest,
pytest-xdist; no pip, no network). Each row is printed as soon as it is measured, then the whole
table at the end. It reports
  1. the GPU recipe (configs/cifar10-jpg-gpu.yaml), one process per seed: test accuracy, training
     seconds (the epochs' synchronised clocks: each epoch ends by reading its meters from the device;
     the whitening init and the final test pass with the recipe's TTA are outside them, while
     airbench's total_time_seconds includes both), timed after one untimed warm-up epoch in the same
     process as airbench94 times its runs after a warm-up run (--no-warmup: cold), the warm-up's
     seconds, and whole-process seconds (warm-up included); steps and steps/s; and seed 0 once
     more with the non-finite guard read on the host after every step ("recipe sync": the loop as
     it was before the guard moved onto the device, which read two values a step), so steps/s
     with and without a per-step sync stand side by side (--no-sync-row: not run);
  2. airbench94 on the same data when its script is given by path (never vendored here): it
     runs in a folder holding cifar10/train.pt and test.pt written from --cifar, so it needs no download;
  3. the lessons' DataLoader loop against deepfit on cnn_bn CIFAR-10 (bench/train.py), images/s
     over all epochs (the issue's measure) and over the last alone (a steady state: the first
     epoch's one-time costs, such as CUDA graphs' capture, left out), each with its ratio
     (--no-lessons: not run);
  4. what train.deterministic costs: cnn_bn (deepfit's side of 3) and the recipe's seed 0 trained
     again with it, each in its own process, and the cost in % of step time (--no-determinism: not run);
  5. what train.cuda_graphs gives (the whole step recorded as one CUDA graph, where the optimizer
     is fused): cnn_bn (deepfit's side of 3) and the recipe's seed 0 trained with it, and again
     with the model's forward and backward alone graphed ("model graphs": what recording the
     whole step adds), each in its own process, cnn_bn's images/s against the lessons' loop and
     both against their rows without graphs (--no-graphs: not run), the recipe once more for each --variant given (its overrides, e.g.
     train.precision=fp16,train.cuda_graphs=true; seed 0, or seeds 0..N-1 and their mean with
     --variant-seeds N), its steps/s against seed 0's, and deepfit's cnn_bn once more for each
     --cnn-variant given, its images/s against the lessons' loop;
  6. with --profile: one epoch of the recipe and of cnn_bn, each with and
     without train.cuda_graphs, under torch.profiler (bench/gpuprofile.py): wall and device time
     per step, the device's busy share, launches per step and the three longest kernels;
  7. last, the non-slow test suite on the device (DEEPFIT_TEST_DEVICE): passed / failed / seconds,
     in what is left of --budget (--suite-log keeps its whole output; '--suite' alone: not run).

    PYTHONPATH=src python3 bench/gpu.py --cifar PATH/cifar10-jpg.zip [--airbench PATH/airbench94.py]

`--device cpu` with small --set overrides runs every part at toy size (tests/test_bench.py does, on
tiny data)."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: make `bench` and `deepfit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.common import REPO, child_env, machine, save_json

if TYPE_CHECKING:
    from deepfit.config import Config

RECIPE = REPO / "configs" / "cifar10-jpg-gpu.yaml"


@dataclass
class Row:
    """One line of the table."""

    part: str  # suite, recipe, airbench94, cnn_bn
    what: str  # e.g. "seed 0", "lessons' loop"
    figures: dict[str, float | str] = field(default_factory=dict)


def device_env(device: str) -> dict[str, str]:
    """The environment of the processes this starts: deepfit from src/, the chosen device."""
    return child_env(DEEPFIT_TEST_DEVICE=device, DEEPFIT_DEVICE=device)


# --- 7. the suite ----------------------------------------------------------------------------


def run_suite(targets: Sequence[str], device: str, *, workers: int, timeout: float, log: Path | None = None) -> Row:
    """pytest -m 'not slow' on `device`; pytest-xdist spreads it over `workers` when installed,
    each with an equal share of the cores for its CPU threads. `log`: the whole output goes there."""
    command = [sys.executable, "-m", "pytest", *targets, "-m", "not slow", "-q", "-p", "no:cacheprovider", "--durations=10"]
    env = device_env(device)
    if workers > 1 and has_module("xdist"):
        command += ["-n", str(workers)]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, code = done.stdout, done.stderr, str(done.returncode)
    except subprocess.TimeoutExpired as stopped:
        out, err, code = as_text(stopped.stdout), as_text(stopped.stderr), "timeout"
    seconds = time.perf_counter() - started
    if log is not None:
        log.write_text(out + err)
    # the counts from the end of pytest's stdout: warnings printed on stderr (xdist's workers) must not push them out
    return Row("suite", f"pytest on {device}", {**pytest_counts(out[-3000:]), "seconds": seconds, "exit": code})


def pytest_counts(output: str) -> dict[str, float | str]:
    """passed/failed/error/skipped counts from pytest's summary line."""
    found = {kind: 0.0 for kind in ("passed", "failed", "errors", "skipped")}
    for number, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output):
        found["errors" if kind.startswith("error") else kind] = float(number)
    return dict(found)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- 1. the recipe, one process per seed ------------------------------------------------------


def run_recipe(
    cifar: Path,
    seed: int,
    device: str,
    overrides: Sequence[str],
    timeout: float,
    *,
    warmup: bool = True,
    sync: bool = False,
    part: str = "recipe",
    model_graphs: bool = False,
) -> Row:
    """One whole `deepfit train` of the recipe in its own process (bench/gpu.py --one-recipe);
    sync: with a host read of the guard after every step; model_graphs: train.cuda_graphs graphs
    the model alone."""
    command = ["--one-recipe", "--cifar", str(cifar), "--seed", str(seed), "--device", device]
    command += [*[f"--set={o}" for o in overrides], *([] if warmup else ["--no-warmup"]), *(["--sync-every-step"] if sync else [])]
    command += ["--model-graphs"] if model_graphs else []
    return run_child(part, f"seed {seed}", command, device, timeout)


def run_child(part: str, what: str, arguments: Sequence[str], device: str, timeout: float) -> Row:
    """bench/gpu.py `arguments` in a process of its own, in a temporary folder (its run folders go
    there as --out): the figures of the JSON line it prints last, and its whole-process seconds."""
    with tempfile.TemporaryDirectory(prefix="deepfit-gpu-") as tmp:
        command = [sys.executable, str(Path(__file__).resolve()), *arguments, "--out", f"{tmp}/run"]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=tmp, env=device_env(device), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row(part, what, {"error": f"not done within {timeout:.0f} s"})
        wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return Row(part, what, {"error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "no result"})
    figures = {**json.loads(lines[-1]), "process_s": wall}
    warned = graphs_warning(done.stderr)
    return Row(part, what, figures | ({"warning": warned} if warned else {}))


GRAPHS_WARNINGS = (
    "train.cuda_graphs:",  # a capture that fell back to eager: the row would look like a measurement of graphs
    "AccumulateGrad node's stream does not match",  # torch: gradients made on one stream, accumulated on another (a sync)
)


def graphs_warning(stderr: str) -> str | None:
    """The first warning a child printed that bears on a graphs row (GRAPHS_WARNINGS), if any."""
    found = next((line for line in stderr.splitlines() if any(w in line for w in GRAPHS_WARNINGS)), None)
    return found.split("Warning: ", 1)[-1].strip()[:160] if found else None


def one_recipe(cifar: Path, seed: int, device: str, out: str, overrides: Sequence[str], *, warmup: bool = True, sync: bool = False) -> None:
    """In the child process: train the recipe, print one JSON line (accuracy, training seconds,
    steps and steps/s). With `warmup`, one untimed epoch first in the same process, as airbench94
    times its runs after a warm-up run: the device's start-up, cuDNN's kernel choice for each shape
    and the decoded-image cache are then not on the training clock. warmup_s says what it cost;
    process_s includes it. `sync`: the guard is read on the host after every step (its window of
    one batch), as the loop read its checks before they moved onto the device."""
    import dataclasses

    from deepfit.checkpoint import load_checkpoint
    from deepfit.engine import FiniteGuard
    from deepfit.fit import fit

    if sync:
        FiniteGuard.WINDOW = 1  # the loop reads the guard every min(check_every, WINDOW) batches

    config = child_config("recipe", cifar, device, out, [f"train.seed={seed}", *overrides])
    warmup_s = 0.0
    if warmup:
        started = time.perf_counter()
        fit(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=1, tta="none", out=f"{out}-warmup")))
        warmup_s = time.perf_counter() - started
    result = fit(config)
    seconds = [row["seconds"] for row in result.history]
    steps = int(load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["step"])
    figures = {"test_acc": result.metrics.get("test_acc", float("nan")), "train_s": sum(seconds), "epochs": len(seconds)}
    figures |= {"steps": steps, "steps_per_s": steps / max(sum(seconds), 1e-9)}
    print(json.dumps({**figures, "warmup_s": warmup_s} if warmup else figures))


# --- 2. airbench94, given by path ---------------------------------------------------------------


def run_airbench(script: Path, cifar: Path, device: str, seconds: float) -> list[Row]:
    """Run the given airbench script as it is (airbench94.py trains 25 times) for at most `seconds`,
    in a folder where it finds the same CIFAR-10 JPEGs deepfit trains on (airbench_data): the runs
    it finished by then count. Reads its printed table (tta_val_acc and total_time_seconds of each
    run's eval row)."""
    with tempfile.TemporaryDirectory(prefix="deepfit-airbench-") as tmp:
        folder = airbench_data(cifar, Path(tmp))
        command, env = [sys.executable, str(script.resolve())], {**device_env(device), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=seconds)
            output, error, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as stopped:  # the table it printed so far (unbuffered)
            output, error, code = as_text(stopped.stdout), as_text(stopped.stderr), None
        wall = time.perf_counter() - started
    runs = airbench_runs(output)
    if not runs:
        why = f"no run finished within {seconds:.0f} s" if code is None else (error.strip().splitlines() or ["failed"])[-1][:200]
        return [Row("airbench94", str(script.name), {"error": why})]
    rows = [Row("airbench94", f"run {i}", {"test_acc": acc, "train_s": train_s}) for i, (acc, train_s) in enumerate(runs)]
    whole: dict[str, float | str] = {"process_s": wall, "runs": float(len(runs))}
    if code is None:
        whole["stopped"] = f"at the {seconds:.0f} s limit"
    return [*rows, Row("airbench94", "whole process", whole)]


def as_text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def airbench_data(cifar: Path, folder: Path) -> Path:
    """airbench94's loader reads cifar10/train.pt and cifar10/test.pt from its working folder
    ({'images': (N, 32, 32, 3) uint8, 'labels': (N,) int64, 'classes': names}) and downloads
    CIFAR-10 where they are missing: write them from the JPEG zip, decoded as deepfit decodes it,
    so both train on the same images, offline. Returns `folder`."""
    import torch

    from deepfit.config import DataConfig
    from deepfit.data import load_source

    source = load_source(DataConfig(name=str(cifar)), seed=0)
    if source.test is None:
        raise SystemExit(f"bench/gpu.py: {cifar} has no test/ split for airbench94")
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, images in (("train", source.train), ("test", source.test)):
        payload = {"images": images.images.permute(0, 2, 3, 1).contiguous(), "labels": images.labels, "classes": source.classes}
        torch.save(payload, folder / "cifar10" / f"{split}.pt")
    return folder


def airbench_runs(output: str) -> list[tuple[float, float]]:
    """(tta accuracy 0..1, training seconds) of each run in airbench's `print_columns` table."""
    header: list[str] | None = None
    runs = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "tta_val_acc" in cells:
            header = cells
        elif header is not None and len(cells) == len(header):
            row = dict(zip(header, cells, strict=True))
            if row.get("epoch") == "eval" and row.get("tta_val_acc"):
                runs.append((float(row["tta_val_acc"]), float(row.get("total_time_seconds") or "nan")))
    return runs


# --- 3. the lessons' loop vs deepfit --------------------------------------------------------------


def run_lessons(cifar: Path, device: str, epochs: int) -> list[Row]:
    """bench/train.py's cnn_bn-cifar10 case: the same model, Adam, batch 128, `epochs` epochs."""
    os.environ["DEEPFIT_DEVICE"] = device  # both sides pick the device through select_device("auto")
    from bench import train

    with tempfile.TemporaryDirectory(prefix="deepfit-gpu-data-") as tmp:
        datasets = Path(tmp)
        (datasets / "cifar10-jpg.zip").symlink_to(cifar.resolve())  # the layout bench/train.py reads
        results, skipped = train.run_cases(["cnn_bn-cifar10"], datasets, epochs=epochs)
    if skipped:
        return [Row("cnn_bn", "lessons vs deepfit", {"error": "; ".join(skipped.values())[:200]})]
    rows = []
    for r in results:
        figures: dict[str, float | str] = {"images_per_s": r.images_per_s, "test_acc": r.test_acc}
        if r.last_images_per_s is not None:
            figures["last_epoch_images_per_s"] = r.last_images_per_s
        rows.append(Row("cnn_bn", "lessons' loop" if r.impl == "baseline" else "deepfit", figures))
    for row in rows:
        versus_lessons(row, rows[0].figures)  # run_cases gives the baseline first
    return rows


def versus_lessons(row: Row, lessons: dict[str, float | str]) -> None:
    """Add to a cnn_bn row its images/s over the lessons' loop's: `ratio` over all epochs,
    `last_epoch_ratio` over the last alone, each where both rows have the figure."""
    for key, ratio in (("images_per_s", "ratio"), ("last_epoch_images_per_s", "last_epoch_ratio")):
        if key in row.figures and key in lessons:
            row.figures[ratio] = float(row.figures[key]) / float(lessons[key])


# --- 4. what train.deterministic costs -------------------------------------------------------------


DETERMINISTIC = ("train.deterministic=true", "train.cudnn_benchmark=false")  # the recipe's autotuner is ruled out with it


def one_cnn_bn(cifar: Path, device: str, out: str, epochs: int, overrides: Sequence[str] = ()) -> None:
    """In the child process: deepfit's side of the cnn_bn comparison (bench/train.py's config),
    with `overrides` (KEY=VALUE: train.deterministic=true, train.cuda_graphs=true); prints images/s
    over its epochs as one JSON line."""
    from bench.train import last_epoch_rate
    from deepfit.fit import fit

    result = fit(child_config("cnn_bn", cifar, device, out, overrides, epochs=epochs))
    seconds = [row["seconds"] for row in result.history]
    images = len(result.data.train)
    figures = {"images_per_s": images * len(seconds) / sum(seconds), "test_acc": result.metrics["test_acc"]}
    last = last_epoch_rate(images, seconds)
    print(json.dumps(figures | ({"last_epoch_images_per_s": last} if last is not None else {})))


def run_determinism(args: argparse.Namespace) -> list[Row]:
    """The recipe (seed 0) and cnn_bn trained with train.deterministic, each beside the same run
    without it, in processes of their own (cuBLAS reads its setting when CUDA starts)."""
    common = ["--cifar", str(args.cifar), "--device", args.device, "--lesson-epochs", str(args.lesson_epochs)]
    rows = [
        run_child("cnn_bn", "deepfit, plain", ["--one-cnn-bn", *common], args.device, args.timeout),
        run_child(
            "cnn_bn", "deepfit, deterministic", ["--one-cnn-bn", "--set=train.deterministic=true", *common], args.device, args.timeout
        ),
    ]
    overrides = [*args.set, *DETERMINISTIC]
    rows.append(run_recipe(args.cifar, 0, args.device, overrides, args.timeout, warmup=not args.no_warmup, part="recipe determ"))
    return rows


def determinism_cost(rows: list[Row]) -> list[Row]:
    """train.deterministic's cost in % of step time: rate without / rate with - 1, for the recipe
    (its seed-0 run, cuDNN's autotuner on, against the deterministic one) and cnn_bn."""
    pairs = (
        ("recipe", ("recipe", "seed 0"), ("recipe determ", "seed 0"), "steps_per_s"),
        ("cnn_bn", ("cnn_bn", "deepfit, plain"), ("cnn_bn", "deepfit, deterministic"), "images_per_s"),
    )
    return [Row("determ", f"{name} cost", {"step_time_pct": 100 * (ratio - 1)}) for name, ratio in rate_ratios(rows, pairs)]


Pair = tuple[str, tuple[str, str], tuple[str, str], str]  # name, (part, what) of the numerator and denominator rows, figure


def rate_ratios(rows: list[Row], pairs: Sequence[Pair]) -> list[tuple[str, float]]:
    """(name, numerator's figure / denominator's) for each pair whose two rows both have the figure."""
    found = {(r.part, r.what): r.figures for r in rows}
    return [
        (name, float(found[top][key]) / float(found[bottom][key]))
        for name, top, bottom, key in pairs
        if key in found.get(top, {}) and key in found.get(bottom, {})
    ]


# --- 5. what train.cuda_graphs gives --------------------------------------------------------------


def run_graphs(args: argparse.Namespace) -> list[Row]:
    """cnn_bn and the recipe (seed 0) trained with train.cuda_graphs, the whole step recorded and
    the model alone graphed, in processes of their own."""
    common = ["--cifar", str(args.cifar), "--device", args.device, "--lesson-epochs", str(args.lesson_epochs)]
    rows = []
    for model_only, label in ((False, "graphs"), (True, "model graphs")):
        flags = ["--set=train.cuda_graphs=true", *(["--model-graphs"] if model_only else []), *common]
        rows.append(run_child("cnn_bn", f"deepfit, {label}", ["--one-cnn-bn", *flags], args.device, args.timeout))
        overrides = [*args.set, "train.cuda_graphs=true"]
        row = run_recipe(
            args.cifar, 0, args.device, overrides, args.timeout, warmup=not args.no_warmup, part=f"recipe {label}", model_graphs=model_only
        )
        rows.append(row)
    return rows


def run_variants(args: argparse.Namespace, rows: list[Row], add: Callable[..., None]) -> None:
    """The recipe once per --variant (comma-separated overrides) and seed (0..--variant-seeds - 1),
    each in its own process, its steps/s over seed 0's in `rows` (what a setting would change,
    measured in the same call), and with more than one seed, each variant's mean; each row goes to
    `add` as it is measured."""
    seed0 = next((r.figures for r in rows if (r.part, r.what) == ("recipe", "seed 0")), {})
    for variant in args.variant:
        runs = []
        for seed in range(args.variant_seeds):
            row = run_recipe(args.cifar, seed, args.device, [*args.set, *variant.split(",")], args.timeout, warmup=not args.no_warmup)
            row.part, row.what = "variant", variant[:40] + (f" s{seed}" if args.variant_seeds > 1 else "")
            if "steps_per_s" in row.figures and "steps_per_s" in seed0:
                row.figures["ratio"] = float(row.figures["steps_per_s"]) / float(seed0["steps_per_s"])
            runs.append(row)
            add(row)
        mean = summary(runs, "variant") if args.variant_seeds > 1 else None
        if mean is not None:
            mean.what = f"{variant[:40]} {mean.what}"
            add(mean)


def run_cnn_variants(args: argparse.Namespace, rows: list[Row], add: Callable[..., None]) -> None:
    """deepfit's cnn_bn once per --cnn-variant (comma-separated overrides of its config), each in its
    own process, its images/s over the lessons' loop's in `rows`; each row goes to `add` as measured."""
    common = ["--cifar", str(args.cifar), "--device", args.device, "--lesson-epochs", str(args.lesson_epochs)]
    lessons = next((r.figures for r in rows if (r.part, r.what) == ("cnn_bn", "lessons' loop")), {})
    for variant in args.cnn_variant:
        sets = [f"--set={o}" for o in variant.split(",")]
        row = run_child("cnn_bn", variant[:22], ["--one-cnn-bn", *sets, *common], args.device, args.timeout)
        versus_lessons(row, lessons)
        add(row)


def run_profiles(args: argparse.Namespace) -> list[Row]:
    """Part 6: the recipe and cnn_bn, each with and without train.cuda_graphs, an epoch profiled."""
    common = ["--cifar", str(args.cifar), "--device", args.device, "--lesson-epochs", str(args.lesson_epochs)]
    rows = []
    for what in ("recipe", "cnn_bn"):
        overrides = [*args.set] if what == "recipe" else []
        for graphs in (False, True):
            sets = [f"--set={o}" for o in [*overrides, *(["train.cuda_graphs=true"] if graphs else [])]]
            label = f"{what}{', graphs' if graphs else ''}"
            rows.append(run_child("profile", label, ["--one-profile", what, *sets, *common], args.device, args.timeout))
    return rows


def one_profile(what: str, cifar: Path, device: str, out: str, overrides: Sequence[str]) -> None:
    """In the child process: 2 epochs of the recipe (without TTA) or of cnn_bn, the second profiled."""
    from bench import gpuprofile

    config = child_config(what, cifar, device, out, ["train.tta=none", *overrides] if what == "recipe" else overrides, epochs=2)
    config.train.epochs = 2  # whatever the recipe's overrides say
    print(json.dumps(gpuprofile.profiled_fit(config)))


def child_config(what: str, cifar: Path, device: str, out: str, overrides: Sequence[str], *, epochs: int = 2) -> Config:
    """The config a child process trains: the recipe, or bench/train.py's cnn_bn case for `epochs`,
    on `cifar`, `device` and `out`, with `overrides` (KEY=VALUE) applied last, in order."""
    import dataclasses

    from bench import train
    from deepfit.config import load_config, set_value

    if what == "recipe":
        config = load_config(RECIPE)
        config.data.name, config.train.progress = str(cifar), False
    else:
        config = train.deepfit_config(dataclasses.replace(train.CASES["cnn_bn-cifar10"], epochs=epochs), cifar, Path(out).parent)
    config.train.device, config.train.out = device, out
    for item in overrides:
        key, _, value = item.partition("=")
        set_value(config, key, value)
    return config


def graphs_gain(rows: list[Row]) -> list[Row]:
    """What train.cuda_graphs gives: cnn_bn's images/s with it over the lessons' loop (the issue's
    10x), over deepfit's child run without it and over the model-only graphs; the recipe's steps/s
    over its seed-0 run and over the model-only graphs."""
    pairs = (
        ("cnn_bn vs lessons", ("cnn_bn", "deepfit, graphs"), ("cnn_bn", "lessons' loop"), "images_per_s"),
        ("cnn_bn vs lessons, last ep", ("cnn_bn", "deepfit, graphs"), ("cnn_bn", "lessons' loop"), "last_epoch_images_per_s"),
        ("cnn_bn vs eager", ("cnn_bn", "deepfit, graphs"), ("cnn_bn", "deepfit, plain"), "images_per_s"),
        ("cnn_bn vs model graphs", ("cnn_bn", "deepfit, graphs"), ("cnn_bn", "deepfit, model graphs"), "images_per_s"),
        ("recipe vs eager", ("recipe graphs", "seed 0"), ("recipe", "seed 0"), "steps_per_s"),
        ("recipe vs model graphs", ("recipe graphs", "seed 0"), ("recipe model graphs", "seed 0"), "steps_per_s"),
    )
    return [Row("graphs", name, {"ratio": ratio}) for name, ratio in rate_ratios(rows, pairs)]


# --- the table ----------------------------------------------------------------------------------


def summary(rows: list[Row], part: str) -> Row | None:
    """Mean accuracy and seconds over the rows of `part` that have them."""
    done = [r.figures for r in rows if r.part == part and "test_acc" in r.figures and "train_s" in r.figures]
    if not done:
        return None
    figures: dict[str, float | str] = {"test_acc": statistics.mean(float(f["test_acc"]) for f in done)}
    figures["train_s"] = statistics.mean(float(f["train_s"]) for f in done)
    walls = [float(f["process_s"]) for f in done if "process_s" in f]
    if walls:
        figures["process_s"] = statistics.mean(walls)
    return Row(part, f"mean of {len(done)}", figures)


HEADER = f"{'part':13s} {'what':22s} figures\n" + "-" * 78


def format_rows(rows: list[Row]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def format_row(row: Row) -> str:
    cells = [f"{key} {format_value(key, value)}" for key, value in row.figures.items()]
    return f"{row.part:13s} {row.what:22s} " + ", ".join(cells)


def format_value(key: str, value: float | str) -> str:
    if isinstance(value, str):
        return value
    if key == "test_acc":
        return f"{100 * value:.2f}%"
    if key in ("passed", "failed", "errors", "skipped", "epochs", "runs", "steps", "launches_per_step"):
        return f"{value:.0f}"
    if key == "ratio" or key.endswith("_ratio"):
        return f"{value:.2f}x"
    if key.endswith("_pct"):
        return f"{value:+.1f}%" if key == "step_time_pct" else f"{value:.0f}%"
    return f"{value:.1f}" if key.endswith(("images_per_s", "steps_per_s")) and value > 1000 else f"{value:.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, required=True, help="cifar10-jpg.zip (train/ and test/ class folders)")
    parser.add_argument("--airbench", type=Path, help="path of airbench94.py, run as given on the same images (--cifar); omitted: not run")
    parser.add_argument(
        "--airbench-seconds",
        type=float,
        default=90,
        help="airbench94.py trains 25 times: the runs it finishes within this many seconds count",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("--seeds", type=int, default=3, help="recipe runs, seeds 0..N-1")
    parser.add_argument("--lesson-epochs", type=int, default=2, help="epochs of the cnn_bn comparison")
    parser.add_argument("--suite", nargs="*", default=["tests"], help="test paths to run ('--suite' alone: skip the suite)")
    parser.add_argument("--workers", type=int, default=14, help="pytest-xdist workers for the suite")
    parser.add_argument("--no-warmup", action="store_true", help="time each recipe run cold: no untimed epoch before it")
    parser.add_argument("--no-sync-row", action="store_true", help="skip the recipe run with a host read of the guard after every step")
    parser.add_argument("--sync-every-step", action="store_true", help=argparse.SUPPRESS)  # the child process of that row
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe config override, e.g. train.epochs=1 (a cnn_bn child's: of its config)",
    )
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed to the suite (and to each other process)")
    parser.add_argument(
        "--budget",
        type=float,
        default=450,
        help="seconds the whole command aims to end within: the suite, run last, gets what is left (60 s at least)",
    )
    parser.add_argument("--suite-log", type=Path, help="write the suite's whole output to this file")
    parser.add_argument("--no-lessons", action="store_true", help="skip the lessons' loop against deepfit on cnn_bn (part 3)")
    parser.add_argument("--no-determinism", action="store_true", help="skip the train.deterministic runs (recipe seed 0, cnn_bn)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the train.cuda_graphs runs (recipe seed 0, cnn_bn)")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="KEY=VALUE,...", help="also train the recipe's seed 0 with these overrides"
    )
    parser.add_argument("--variant-seeds", type=int, default=1, help="train each --variant with seeds 0..N-1 and report their mean")
    parser.add_argument(
        "--cnn-variant", action="append", default=[], metavar="KEY=VALUE,...", help="also train deepfit's cnn_bn with these overrides"
    )
    parser.add_argument("--profile", action="store_true", help="also profile an epoch of the recipe and cnn_bn, with and without graphs")
    parser.add_argument("--one-profile", choices=["recipe", "cnn_bn"], help=argparse.SUPPRESS)  # a child process of part 6
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/gpu-*.json")
    parser.add_argument("--one-recipe", action="store_true", help=argparse.SUPPRESS)  # the child process of part 1
    parser.add_argument("--one-cnn-bn", action="store_true", help=argparse.SUPPRESS)  # a child process of part 4
    parser.add_argument("--model-graphs", action="store_true", help=argparse.SUPPRESS)  # a child: train.cuda_graphs for the model alone
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/gpu-recipe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.cifar.is_file():
        parser.error(f"--cifar {args.cifar} is not a file")
    args.cifar = args.cifar.resolve()  # the recipe's processes run in their own folders
    return args


def graph_model_only() -> None:
    """In a child process: train.cuda_graphs graphs the model alone, as where the step cannot be
    recorded (the other side of "model graphs" rows)."""
    import deepfit.fitparts

    deepfit.fitparts.steps_can_be_graphed = lambda optimizer, scheduler: False  # type: ignore[assignment]


def run_as_child(args: argparse.Namespace) -> None:
    """One recipe run (part 1), cnn_bn run (parts 4, 5) or profiled run (part 6), in the process the parent started."""
    if args.model_graphs:
        graph_model_only()
    if args.one_profile:
        one_profile(args.one_profile, args.cifar, args.device, args.out, args.set)
    elif args.one_recipe:
        one_recipe(args.cifar, args.seed, args.device, args.out, args.set, warmup=not args.no_warmup, sync=args.sync_every_step)
    else:
        one_cnn_bn(args.cifar, args.device, args.out, args.lesson_epochs, args.set)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_recipe or args.one_cnn_bn or args.one_profile:
        run_as_child(args)
        return 0
    started = time.perf_counter()
    print(f"deepfit on {args.device} ({machine()['cuda'] or 'no CUDA'}, torch {machine()['torch']})")
    print(HEADER, flush=True)
    rows: list[Row] = []

    def add(*new: Row) -> None:  # each row printed as soon as it is measured: a cut-off run keeps them
        rows.extend(new)
        for row in new:
            print(format_row(row), flush=True)

    run_parts(args, rows, add)
    if args.suite:  # last: it gets what is left of --budget
        left = args.budget - (time.perf_counter() - started)
        add(run_suite(args.suite, args.device, workers=args.workers, timeout=min(args.timeout, max(left, 60.0)), log=args.suite_log))
    print(f"\n{format_rows(rows)}\n{time.perf_counter() - started:.0f} s in all")
    if not args.no_save:
        print(save_json({"machine": machine(), "rows": [r.__dict__ for r in rows]}, f"gpu-{args.device}"))
    return 0


def run_parts(args: argparse.Namespace, rows: list[Row], add: Callable[..., None]) -> None:
    """Parts 1 to 6, in order; `add` prints and keeps each row (`rows`) as it comes."""
    for seed in range(args.seeds):
        add(run_recipe(args.cifar, seed, args.device, args.set, args.timeout, warmup=not args.no_warmup))
    if not args.no_sync_row:
        add(run_recipe(args.cifar, 0, args.device, args.set, args.timeout, warmup=not args.no_warmup, sync=True, part="recipe sync"))
    if args.airbench is not None:
        add(*run_airbench(args.airbench, args.cifar, args.device, args.airbench_seconds))
    add(*[r for r in (summary(rows, "recipe"), summary(rows, "airbench94")) if r is not None])
    if not args.no_lessons:
        add(*run_lessons(args.cifar, args.device, args.lesson_epochs))
    if not args.no_determinism:
        add(*run_determinism(args))
        add(*determinism_cost(rows))
    if not args.no_graphs:
        add(*run_graphs(args))
        add(*graphs_gain(rows))
    run_variants(args, rows, add)
    run_cnn_variants(args, rows, add)
    if args.profile:
        add(*run_profiles(args))


if __name__ == "__main__":
    sys.exit(main())
