"""`deepfit serve` command-line errors: one line, exit code 2, no port bound; and the CLI's
start-up does not import the serving stack."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere"], "nowhere: no such run folder or checkpoint"),
        (["RUN", "--max-batch", "0"], "--max-batch must be at least 1"),
        (["RUN", "--max-body-mb", "-1"], "--max-body-mb must be positive"),
        (["RUN", "--port", "70000"], "--port 70000 is not a TCP port"),
        (["RUN", "--threads", "-1"], "--threads must be 0 (the library's default) or a number of threads"),
        (["RUN", "--backend", "onnx", "--device", "cuda"], "--backend onnx runs on the CPU"),
        (["BROKEN"], "BROKEN"),
        (["RUN", "--tta", "flip"], "--tta flip is not allowed for fashion-mnist"),
        (["RUN", "--max-rows", "5"], "--max-rows: table-serving option; "),
    ],
)
def test_bad_serve_arguments_are_one_line_and_exit_2(cli, serve_run: Path, tmp_path: Path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "BROKEN").write_bytes(b"not a checkpoint")
    args = [str(serve_run) if a == "RUN" else a for a in args]
    result = cli("serve", *args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_a_node_run_is_refused_in_one_line_naming_what_lists_its_predictions(cli) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch_geometric", reason="node runs need the graph extra (PyTorch Geometric)")
    trained = cli("train", "--data", "karate", "--epochs", "2", "--out", "karate", "--no-progress")
    assert trained.code == 0, trained.err
    result = cli("serve", "karate", "--port", "0")
    (line,) = result.err.strip().splitlines()
    assert result.code == 2 and "holds a node model" in line and "listed by deepfit predict karate" in line
    assert "serving" not in result.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "onnx"], "--backend onnx serves image models"),
        (["--device", "cuda"], "a regression model is served on the CPU"),
        (["--tta", "flip"], "--tta is test-time augmentation of images"),
        (["--max-rows", "0"], "--max-rows must be at least 1"),
        (["--max-batch", "8", "--topk", "2"], "--max-batch, --topk: image-serving options; reg holds a regression model"),
    ],
)
def test_image_only_options_are_refused_for_a_regression_run(cli, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    rows = "\n".join(f"{x},{2 * x + 1}" for x in range(40))
    Path("line.csv").write_text(f"x,y\n{rows}\n")
    trained = cli("train", "--data", "line.csv", "--target", "y", "--epochs", "1", "--out", "reg", "--no-progress")
    assert trained.code == 0, trained.err
    result = cli("serve", "reg", "--port", "0", *args)
    (line,) = result.err.strip().splitlines()
    assert result.code == 2 and message in line and "Traceback" not in result.err
    assert "serving" not in result.out


def test_a_port_in_use_or_a_foreign_host_is_one_line_before_the_model_loads(cli, serve_run: Path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, reason in (("127.0.0.1", "ddress already in use"), ("999.1.1.1", "")):
            result = cli("serve", str(serve_run), "--host", host, "--port", str(port))
            (line,) = result.err.strip().splitlines()
            assert result.code == 2 and f"deepfit: error: cannot serve on {host}:{port}: " in line and reason in line, line
            assert "serving" not in result.out  # no address announced that nothing listens on


def test_port_0_serves_on_a_free_port_and_announces_that_one(serve_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="deepfit serve needs the serve extra (FastAPI, uvicorn)")
    command = [sys.executable, "-m", "deepfit.cli", "serve", str(serve_run), "--port", "0", "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=(tmp_path / "err.log").open("wb"), text=True, start_new_session=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "serving RUN (torch) on http://127.0.0.1:PORT/  API docs: ..."; before: port 0
        match = re.search(r" on http://127\.0\.0\.1:(\d+)/ ", line)
        assert match is not None and int(match.group(1)) != 0, line + (tmp_path / "err.log").read_text()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{match.group(1)}/readyz", timeout=2).status_code == 200:
                    break
            assert server.poll() is None, (tmp_path / "err.log").read_text()
            time.sleep(0.3)
        else:
            raise AssertionError("the announced port never answered")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_the_cli_does_not_import_fastapi_or_uvicorn_at_start_up() -> None:
    code = (
        "import sys, deepfit.cli as c; c.build_parser(); print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
