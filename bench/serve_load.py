"""The parts of bench/serve.py: test PNGs, server processes on free ports (always stopped), the
agreement check against `deepfit predict`, and the load generator (hey, or async httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "deepfitbenchboundary"
START_TIMEOUT_S = 300


@dataclass
class Load:
    server: str
    client: str  # hey or httpx
    seconds: float
    connections: int
    requests: int  # answered with 200
    errors: int  # any other answer or a failed connection
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_pngs(data_dir: Path, out: Path, count: int) -> list[Path]:
    """The first `count` Fashion-MNIST test images as 28x28 grey PNG files."""
    raw = gzip.decompress((data_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 28, 28)[:count]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(out / f"{i:05d}.png")
        paths.append(out / f"{i:05d}.png")
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(command: list[str], ready_url: str, log: Path) -> Iterator[None]:
    """Start `command` in its own process group, wait until `ready_url` answers 200, stop it after."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(process, ready_url, log)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def deepfit_server(checkpoint: str, backend: str, limits: list[str], scratch: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "deepfit.cli", "serve", checkpoint, "--port", str(port), "--backend", backend, *limits]
    with server_process(command, f"http://127.0.0.1:{port}/readyz", scratch / f"deepfit-{backend}-{port}.log"):
        yield f"http://127.0.0.1:{port}/v1/predict"


@contextlib.contextmanager
def litserve_server(checkpoint: str, args: Any, scratch: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, str(REPO / "bench" / "litserve_app.py"), checkpoint, str(port)]
    command += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--threads", str(args.threads)]
    with server_process(command, f"http://127.0.0.1:{port}/health", scratch / f"litserve-{port}.log"):
        yield f"http://127.0.0.1:{port}/predict"


def predict_cli(checkpoint: str, pngs: list[Path]) -> dict[str, dict[str, Any]]:
    """`deepfit predict --format json` on the files, in this process: path -> prediction."""
    from deepfit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", checkpoint, str(pngs[0].parent), "--format", "json", "--topk", "3", "--no-progress"])
    if code != 0:
        raise RuntimeError(f"deepfit predict exited with {code}")
    return {str(Path(p["path"]).resolve()): p for p in json.loads(out.getvalue())}


def agreement(url: str, checkpoint: str, pngs: list[Path]) -> dict[str, Any]:
    """Post every PNG alone (8 at a time, so the server batches them); compare with deepfit predict."""
    expected = predict_cli(checkpoint, pngs)
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
        send = lambda p: client.post(f"{url}?topk=3", content=p.read_bytes(), headers={"Content-Type": "image/png"})  # noqa: E731
        responses = list(pool.map(send, pngs))
    wrong = []
    for path, response in zip(pngs, responses, strict=True):
        want = expected[str(path.resolve())]
        got = (
            response.json()["predictions"][0]
            if response.status_code == 200
            else {"label": f"HTTP {response.status_code}", "probability": -1}
        )
        if got["label"] != want["label"] or abs(got["probability"] - want["probability"]) > 1e-4:
            wrong.append(path.name)
    return {"images": len(pngs), "disagreements": len(wrong), "examples": wrong[:5]}


def multipart_body(png: Path) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{png.name}"\r\nContent-Type: image/png\r\n\r\n'
    return head.encode() + png.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def run_load(name: str, url: str, png: Path, seconds: float, connections: int, client: str, scratch: Path) -> Load:
    """`connections` clients posting the same multipart upload of `png` for `seconds`."""
    body = multipart_body(png)
    warm_up(url, body)
    use_hey = client == "hey" or (client == "auto" and shutil.which("hey") is not None)
    if use_hey:
        latencies, errors = hey_load(url, body, seconds, connections, scratch)
    else:
        latencies, errors = asyncio.run(httpx_load(url, body, seconds, connections))
    return summarise(name, "hey" if use_hey else "httpx", seconds, connections, latencies, errors)


def headers() -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def warm_up(url: str, body: bytes) -> None:
    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            response = client.post(url, content=body, headers=headers())
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")


def hey_load(url: str, body: bytes, seconds: float, connections: int, scratch: Path) -> tuple[list[float], int]:
    """hey's per-request CSV: response-time (s) and status-code columns."""
    body_file = scratch / "body.bin"
    body_file.write_bytes(body)
    command = [
        "hey",
        "-z",
        f"{seconds}s",
        "-c",
        str(connections),
        "-m",
        "POST",
        "-T",
        headers()["Content-Type"],
        "-D",
        str(body_file),
        "-o",
        "csv",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=True)
    latencies, errors = [], 0
    for row in csv.DictReader(io.StringIO(result.stdout)):
        if row.get("status-code") == "200":
            latencies.append(float(row["response-time"]))
        else:
            errors += 1
    return latencies, errors


async def httpx_load(url: str, body: bytes, seconds: float, connections: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers())
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies, errors


def summarise(name: str, client: str, seconds: float, connections: int, latencies: list[float], errors: int) -> Load:
    ms = sorted(1000 * s for s in latencies) or [float("nan")]
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return Load(name, client, seconds, connections, len(latencies), errors, len(latencies) / seconds, cuts[49], cuts[94], cuts[98])


def format_loads(loads: list[Load]) -> str:
    header = f"{'server':24s} {'client':6s} {'conns':>5s} {'requests/s':>10s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'errors':>6s}"
    lines = [header, "-" * len(header)]
    for load in loads:
        lines.append(
            f"{load.server:24s} {load.client:6s} {load.connections:5d} {load.requests_per_s:10.1f} {load.p50_ms:8.1f} {load.p95_ms:8.1f} {load.p99_ms:8.1f} {load.errors:6d}"
        )
    if len(loads) == 2 and loads[1].requests_per_s > 0:
        lines.append(f"deepfit serve throughput = {loads[0].requests_per_s / loads[1].requests_per_s:.2f}x LitServe's")
    return "\n".join(lines)
