"""predict vs evaluate on Fashion-MNIST, image by image, and how fast predict is.

Writes the 10,000 Fashion-MNIST test images as PNG files in class folders (a temp dir), runs
`deepfit predict` on that folder (the CLI, in-process, --format json) and `deepfit evaluate` on the
IDX test set, and checks that every file gets the prediction its IDX image got. Then times predict
on the folder (images/s, reading + decoding + model) and one image from a warm Predictor (median
of 100 calls).

    .venv/bin/python bench/predict.py --checkpoint RUN_OR_CHECKPOINT [--data-dir DIR] [--keep DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, machine, save_json
from deepfit.cli import main
from deepfit.evaluation import evaluate_checkpoint
from deepfit.predict import Predictor


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw[4 + 4 * dims :], dtype=np.uint8).reshape(shape)


def folder_name(index: int, name: str) -> str:
    return f"{index}-{name.replace('/', '_')}"  # "T-shirt/top" cannot be a folder name


def write_pngs(data_dir: Path, classes: list[str], out: Path) -> dict[str, int]:
    """<out>/<label>-<class>/<idx index>.png for every test image; returns file -> IDX index."""
    images = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")
    index = {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / folder_name(int(label), classes[int(label)])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray(image, mode="L").save(path)
        index[str(path)] = i
    return index


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def compare(checkpoint: str, folder: Path, index: dict[str, int]) -> dict[str, object]:
    evaluation = evaluate_checkpoint(checkpoint, write=False)
    started = time.perf_counter()
    code, out, err = run_cli("predict", checkpoint, str(folder), "--format", "json", "--no-progress")
    seconds = time.perf_counter() - started
    assert code == 0, err
    predictions = json.loads(out)
    by_index = {index[p["path"]]: p["index"] for p in predictions}
    files_true = {index[p["path"]]: int(Path(p["path"]).parent.name.split("-", 1)[0]) for p in predictions}
    predicted = np.array([by_index[i] for i in range(len(by_index))])
    truth = np.array([files_true[i] for i in range(len(files_true))])
    return {
        "images": len(predictions),
        "predict_accuracy": float(np.mean(predicted == truth)),
        "evaluate_accuracy": evaluation.report.accuracy,
        "labels_agree": bool(np.array_equal(truth, evaluation.labels)),
        "disagreeing_images": int(np.sum(predicted != evaluation.predictions)),
        "cli_predict_seconds": seconds,
        "cli_predict_images_per_s": len(predictions) / seconds,
    }


def throughput(checkpoint: str, folder: Path, repeats: int, threads: int = 0) -> dict[str, object]:
    """images/s of Predictor.predict_paths on the folder (listing, reading, decoding, model), per repeat."""
    predictor = Predictor.from_checkpoint(checkpoint, threads=threads)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = len(predictor.predict_paths([str(folder)]).predictions)
        rates.append(count / (time.perf_counter() - started))
    suffix = f"_{threads}thread" if threads else ""
    return {f"predict_paths_images_per_s{suffix}": rates, f"predict_paths_images_per_s_median{suffix}": statistics.median(rates)}


def latency(checkpoint: str, image: Path, repeats: int = 100, threads: int = 0) -> dict[str, float]:
    """Median and p90 ms of Predictor.predict on one file path, after warm-up calls."""
    predictor = Predictor.from_checkpoint(checkpoint, threads=threads)
    pixels = np.asarray(Image.open(image))
    for _ in range(10):
        predictor.predict(str(image))
    times_path, times_array = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(str(image))
        times_path.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        predictor.predict(pixels)
        times_array.append((time.perf_counter() - started) * 1000)
    times_path.sort()
    suffix = f"_{threads}thread" if threads else ""
    return {
        f"latency_path_median_ms{suffix}": statistics.median(times_path),
        f"latency_path_p90_ms{suffix}": times_path[int(0.9 * len(times_path))],
        f"latency_array_median_ms{suffix}": statistics.median(times_array),
    }


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a Fashion-MNIST run folder or checkpoint")
    parser.add_argument("--data-dir", default=str(DATASETS / "fashion-mnist"))
    parser.add_argument("--keep", help="write the PNG folder here instead of a temp dir")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs over the folder")
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="deepfit-pngs-") as tmp:
        folder = Path(args.keep or tmp)
        started = time.perf_counter()
        index = write_pngs(Path(args.data_dir), predictor.classes, folder)
        written = time.perf_counter() - started
        figures = compare(args.checkpoint, folder, index)
        threads = torch.get_num_threads()
        figures.update(throughput(args.checkpoint, folder, args.repeats))
        figures.update(throughput(args.checkpoint, folder, args.repeats, threads=1))
        torch.set_num_threads(threads)
        figures.update(latency(args.checkpoint, next(iter(index))))  # torch's default threads
        figures.update(latency(args.checkpoint, next(iter(index)), threads=1))
        torch.set_num_threads(threads)
    figures["png_write_seconds"] = written
    print(json.dumps(figures, indent=2))
    print(f"saved {save_json({'machine': machine(), 'checkpoint': args.checkpoint, 'figures': figures}, 'predict')}")


if __name__ == "__main__":
    main_bench()
