"""`deepfit serve --backend onnx` with an API key from the environment: predictions equal
`deepfit predict`, the key guards the API (not health or the page), and SIGTERM stops accepting,
answers the request in flight, then exits by the signal (143 in a shell)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import Server, started
from tests.serve.oracle import assert_same, predict_cli

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def onnx_server(serve_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from started(serve_run, tmp_path_factory, "--backend", "onnx", "--threads", "1", env={"DEEPFIT_API_KEY": KEY})


def test_onnx_predictions_equal_deepfit_predict(onnx_server: Server, serve_run: Path, test_pngs: list[Path]) -> None:
    expected = predict_cli(serve_run, test_pngs, topk=4)
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in test_pngs]
    response = httpx.post(f"{onnx_server.url}/v1/predict?topk=4", files=files, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert_same(response.json()["predictions"], expected)
    info = httpx.get(f"{onnx_server.url}/v1/model", headers=AUTH).json()
    assert info["backend"] == "onnx" and (serve_run / "export" / "model.onnx").is_file()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}], ids=["none", "wrong", "no-scheme"])
def test_the_api_key_is_required_on_the_api(onnx_server: Server, test_pngs: list[Path], headers: dict[str, str]) -> None:
    body = test_pngs[0].read_bytes()
    refused = httpx.post(f"{onnx_server.url}/v1/predict", content=body, headers={**headers, "Content-Type": "image/png"})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert httpx.get(f"{onnx_server.url}/v1/model", headers=headers).status_code == 401
    assert httpx.get(f"{onnx_server.url}/healthz").status_code == 200 and httpx.get(f"{onnx_server.url}/").status_code == 200


def test_sigterm_answers_the_request_in_flight_then_exits(onnx_server: Server, test_pngs: list[Path], serve_run: Path) -> None:
    """Runs last in this module: it stops the module's server."""
    body = test_pngs[1].read_bytes()
    release = threading.Event()
    result: dict[str, Any] = {}

    def slow_body() -> Iterator[bytes]:
        yield body[:20]  # the request is in flight: headers and part of the body are in
        release.wait(30)
        yield body[20:]

    def send() -> None:
        headers = {**AUTH, "Content-Type": "image/png", "Content-Length": str(len(body))}
        result["response"] = httpx.post(f"{onnx_server.url}/v1/predict?topk=2", content=slow_body(), headers=headers, timeout=60)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    onnx_server.process.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    with pytest.raises(httpx.ConnectError):  # no new connection is accepted any more
        httpx.get(f"{onnx_server.url}/healthz", timeout=5)
    assert onnx_server.process.poll() is None  # still answering the request in flight
    release.set()
    sender.join(60)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert_same(response.json()["predictions"], predict_cli(serve_run, [test_pngs[1]], topk=2))
    # uvicorn re-raises the signal once it has shut down, so a supervisor sees "terminated" (143)
    assert onnx_server.process.wait(timeout=30) == -signal.SIGTERM
