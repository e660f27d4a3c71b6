"""Serving fixtures: a tiny trained run (session-wide) and real `deepfit serve` processes on free
ports of 127.0.0.1, always stopped (SIGTERM, then SIGKILL of their process group)."""

from __future__ import annotations

import gzip
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deepfit.cli import main
from tests.conftest import write_tiny_idx

SIDE = 16  # the tiny dataset's image side
START_TIMEOUT_S = 240  # a loaded 2-core machine needs a while to import torch and warm up


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn_bn trained for one epoch on tiny Fashion-MNIST-format data: class names with '/'."""
    root = tmp_path_factory.mktemp("serve")
    data = write_tiny_idx(root / "idx", train=200, test=40, side=SIDE, seed=3)
    args = ["train", "--data", "fashion-mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--model", "cnn_bn"]
    assert main([*args, "--data.batch-size", "16", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def test_pngs(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny test split as PNG files, plus a colour JPEG and a large RGBA PNG (converted and resized)."""
    folder = tmp_path_factory.mktemp("pngs")
    raw = gzip.decompress((serve_run.parent / "idx" / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, SIDE, SIDE)
    paths = []
    for i, image in enumerate(images[:12]):
        Image.fromarray(image, mode="L").save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    rgb = np.repeat(np.kron(images[12], np.ones((3, 3), dtype=np.uint8))[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(folder / "colour.jpg", quality=90)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(folder / "rgba.png")
    return [*paths, folder / "colour.jpg", folder / "rgba.png"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `python -m deepfit.cli serve` child process in its own session (process group)."""

    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "deepfit.cli", "serve", str(run), "--port", str(self.port), *args]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode


def started(run: Path, tmp_path_factory: pytest.TempPathFactory, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(run, *args, env=env, log=tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# the shared torch server: small limits so the limit tests stay cheap, a 20 ms batch window
LIMIT_ARGS = ("--max-wait-ms", "20", "--max-images", "8", "--max-body-mb", "0.5", "--max-pixels", "1000000", "--threads", "1")


@pytest.fixture(scope="session")
def torch_server(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from started(serve_run, tmp_path_factory, *LIMIT_ARGS)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (CRC correct), followed by a tiny image's data."""
    good = png_bytes(np.zeros((2, 2), dtype=np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return good[:8] + chunk + good[33:]


KEY = "table-secret"  # the table server's API key
CITIES = ("north", "south", "east")


@pytest.fixture(scope="session")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear model of price from area, rooms and a one-hot city column, trained for 30 epochs."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(5)
    lines = ["area,rooms,city,note,price"]
    for i in range(120):
        area, rooms, city = rng.uniform(30, 200), int(rng.integers(1, 6)), CITIES[i % 3]
        price = 3 * area + 10 * rooms + 40 * CITIES.index(city) + rng.normal(0, 5)
        lines.append(f"{area:.1f},{rooms},{city},free text {i},{price:.2f}")
    (root / "houses.csv").write_text("\n".join(lines) + "\n")
    args = ["train", "--data", str(root / "houses.csv"), "--target", "price", "--features", "area,rooms,city"]
    assert main([*args, "--data.categorical", "onehot", "--epochs", "30", "--no-progress", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def table_server(table_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from started(table_run, tmp_path_factory, "--max-rows", "50", "--api-key", KEY)
