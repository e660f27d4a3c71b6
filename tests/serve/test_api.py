"""`deepfit serve` (torch backend) as a real process: predictions equal `deepfit predict` for every
way of sending images, the model description, concurrent requests sharing forward passes, each
kind of bad input answered with its JSON error, and the page's self-containedness."""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import SIDE, Server, bomb_png
from tests.serve.oracle import assert_same, predict_cli


@pytest.fixture(scope="module")
def expected(serve_run: Path, test_pngs: list[Path]) -> list[dict[str, Any]]:
    return predict_cli(serve_run, test_pngs, topk=3)


def post(server: Server, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/predict", timeout=60, **kwargs)


def test_raw_multipart_and_json_bodies_equal_deepfit_predict(
    torch_server: Server, test_pngs: list[Path], expected: list[dict[str, Any]]
) -> None:
    raw = []
    for path in test_pngs:
        kind = "image/jpeg" if path.suffix == ".jpg" else "application/octet-stream"
        response = post(torch_server, content=path.read_bytes(), headers={"Content-Type": kind}, params={"topk": 3})
        assert response.status_code == 200, response.text
        raw += response.json()["predictions"]
    assert_same(raw, expected)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in test_pngs[:8]]
    multipart = post(torch_server, files=files, data={"topk": "3"})
    assert multipart.status_code == 200, multipart.text
    assert_same(multipart.json()["predictions"], expected[:8])
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in test_pngs[8:]]
    encoded[0] = "data:image/png;base64," + encoded[0]
    as_json = post(torch_server, json={"images": encoded, "topk": 3})
    assert as_json.status_code == 200, as_json.text
    assert_same(as_json.json()["predictions"], expected[8:])


def test_model_description_health_and_openapi(torch_server: Server, serve_run: Path) -> None:
    info = httpx.get(f"{torch_server.url}/v1/model").json()
    assert info["classes"][0] == "T-shirt/top" and info["num_classes"] == 10
    assert info["input_shape"] == [1, SIDE, SIDE] and info["architecture"] == "cnn_bn" and info["backend"] == "torch"
    last_row = serve_run.joinpath("metrics.csv").read_text().splitlines()[-1].split(",")
    assert info["metrics"]["epoch"] == 1 and info["metrics"]["val_acc"] == pytest.approx(float(last_row[4]))
    assert httpx.get(f"{torch_server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{torch_server.url}/readyz").json()["status"] == "ready"
    paths = httpx.get(f"{torch_server.url}/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(paths)


def test_concurrent_requests_share_forward_passes(torch_server: Server, test_pngs: list[Path], expected: list[dict[str, Any]]) -> None:
    before = httpx.get(f"{torch_server.url}/v1/stats").json()
    body = test_pngs[0].read_bytes()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(12) as pool:
        send = lambda _: client.post(f"{torch_server.url}/v1/predict?topk=3", content=body, headers={"Content-Type": "image/png"})  # noqa: E731
        responses = list(pool.map(send, range(36)))
    after = httpx.get(f"{torch_server.url}/v1/stats").json()
    assert all(r.status_code == 200 for r in responses)
    for response in responses:
        assert_same(response.json()["predictions"], expected[:1])
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == 36 and batches < 36  # some passes carried several requests' images
    assert after["largest_batch"] > 1


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("not an image", {"content": b"hello, not an image", "headers": {"Content-Type": "image/png"}}, 400, "not a usable image"),
    ("empty body", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
    ("wrong type", {"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported Content-Type"),
    ("no type", {"content": b"x"}, 415, "unsupported Content-Type"),
    ("malformed JSON", {"content": b'{"images": [', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("JSON not an object", {"json": [1, 2]}, 400, "JSON body must be an object"),
    ("no images key", {"json": {"image": ["AAAA"]}}, 400, 'JSON without an "images" list'),
    ("rows sent to an image model", {"json": {"rows": [{"a": 1}]}}, 400, '"rows" are for a regression run'),
    ("images not a list", {"json": {"images": "AAAA"}}, 400, '"images" must be a list of base64 strings, not str'),
    ("bad base64", {"json": {"images": ["***"]}}, 400, "not valid base64"),
    ("base64 not a string", {"json": {"images": [3]}}, 400, "must be a base64 string"),
    ("unknown key", {"json": {"images": [], "extra": 1}}, 400, "unknown JSON key"),
    ("no images", {"json": {"images": []}}, 400, "no image"),
    ("bad topk", {"json": {"images": ["AAAA"], "topk": "many"}}, 400, "topk"),
    ("zero topk", {"content": b"x", "headers": {"Content-Type": "image/png"}, "params": {"topk": "0"}}, 400, "topk"),
    ("too many images", {"files": [("file", ("a.png", b"x", "image/png"))] * 9}, 413, "limit is 8"),
    ("too large", {"content": b"\0" * 600_000, "headers": {"Content-Type": "image/png"}}, 413, "over the limit"),
    ("huge dimensions", {"content": bomb_png(50_000, 50_000), "headers": {"Content-Type": "image/png"}}, 413, "50000x50000"),
    ("text in file field", {"data": {"file": "text"}, "files": [("other", ("a", b"x"))]}, 400, "must be a file upload"),
    ("unknown form field", {"files": [("picture", ("a.png", b"x", "image/png"))]}, 400, "unknown form field"),
    ("broken multipart", {"content": b"--xx\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=xx"}}, 400, ""),
]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_each_bad_input_gets_a_json_error(
    torch_server: Server, name: str, request_kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = post(torch_server, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "Traceback" not in error


def test_a_bad_image_among_good_ones_is_named(torch_server: Server, test_pngs: list[Path]) -> None:
    files = [
        ("file", ("good.png", test_pngs[0].read_bytes(), "image/png")),
        ("file", ("bad.png", test_pngs[0].read_bytes()[:60], "image/png")),
    ]
    response = post(torch_server, files=files)
    assert response.status_code == 400 and response.json()["error"].startswith("image 1: not a usable image")
    assert post(torch_server, content=test_pngs[0].read_bytes(), headers={"Content-Type": "image/png"}).status_code == 200


def test_unknown_routes_and_methods_are_json(torch_server: Server) -> None:
    missing = httpx.get(f"{torch_server.url}/v2/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = httpx.get(f"{torch_server.url}/v1/predict")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_the_page_and_its_files_are_served_with_no_external_resource(torch_server: Server) -> None:
    page = httpx.get(f"{torch_server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    local = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert local and all(ref.startswith("/") for ref in local), local  # nothing from another host
    for ref in local:
        if ref.startswith("/static/"):
            asset = httpx.get(f"{torch_server.url}{ref}")
            assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text
    assert json.loads(httpx.get(f"{torch_server.url}/static/nothing.js").text)["error"].startswith("no static file")
