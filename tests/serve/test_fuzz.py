"""1,200 malformed requests against one real server: random bytes, truncated and corrupted
PNG/JPEG/GIF, huge declared dimensions, wrong content types, broken JSON, base64 and multipart,
too many images, bad topk. Each gets a 4xx JSON error; afterwards good requests are still answered
like `deepfit predict`, and the server's memory stops growing (no per-request leak). And 450 bad
requests against a regression model's server: broken JSON and CSV, spoiled rows, too many rows."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import KEY, Server, bomb_png, png_bytes
from tests.serve.oracle import assert_same, predict_cli

Case = tuple[str, dict[str, Any]]  # (kind, httpx request arguments)
REQUESTS = 1200
LEAK_BOUND = 24 * 2**20  # bytes of RSS growth allowed over the second 800 requests (~100 MB of bodies)


def encoded(rng: np.random.Generator, kind: str) -> bytes:
    side = int(rng.integers(8, 48))
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def truncated_png(rng: np.random.Generator) -> bytes:
    data = encoded(rng, "PNG")
    end_of_stream = data.index(b"IEND") - 12  # before the zlib stream's checksum: always incomplete
    return data[: int(rng.integers(1, end_of_stream))]


def corrupted_png(rng: np.random.Generator) -> bytes:
    data = bytearray(encoded(rng, "PNG"))
    start = data.index(b"IDAT") + 4
    for i in rng.integers(start, start + 8, size=3):
        data[i] ^= 0xFF  # the chunk's CRC no longer matches
    return bytes(data)


def raw(data: bytes, kind: str = "image/png", **extra: Any) -> dict[str, Any]:
    return {"content": data, "headers": {"Content-Type": kind}, **extra}


def malformed(rng: np.random.Generator) -> list[Case]:
    """REQUESTS bad requests of 16 kinds, deterministic for the seed."""
    kinds: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("random bytes", lambda: raw(rng.bytes(int(rng.integers(1, 3000))))),
        ("large random body", lambda: raw(rng.bytes(int(rng.integers(100_000, 400_000))), "application/octet-stream")),
        ("truncated png", lambda: raw(truncated_png(rng))),
        ("truncated jpeg", lambda: raw((lambda d: d[: int(rng.integers(2, len(d) - 2))])(encoded(rng, "JPEG")), "image/jpeg")),
        ("truncated gif", lambda: raw((lambda d: d[: int(rng.integers(6, len(d) // 2))])(encoded(rng, "GIF")), "image/gif")),
        ("corrupted png", lambda: raw(corrupted_png(rng))),
        ("huge dimensions", lambda: raw(bomb_png(int(rng.integers(1001, 70_000)), int(rng.integers(1001, 70_000))))),
        ("wrong type", lambda: raw(encoded(rng, "PNG"), str(rng.choice(["text/plain", "application/xml", "video/mp4", "", "x/y; a=b"])))),
        (
            "broken json",
            lambda: raw(json.dumps({"images": ["AAAA"]}).encode()[: int(rng.integers(0, 18))] + rng.bytes(3), "application/json"),
        ),
        ("bad base64", lambda: {"json": {"images": [base64.b64encode(rng.bytes(40)).decode()[:-1] + "!"]}}),
        (
            "wrong json shape",
            lambda: {"json": [{"images": 1}, {"images": [None]}, {"images": [[]]}, {"x": 1}, "s", 3][int(rng.integers(0, 6))]},
        ),
        ("base64 of garbage", lambda: {"json": {"images": [base64.b64encode(rng.bytes(int(rng.integers(1, 500)))).decode()]}}),
        ("garbage multipart", lambda: raw(b"--b\r\n" + rng.bytes(int(rng.integers(1, 500))), "multipart/form-data; boundary=b")),
        ("multipart garbage file", lambda: {"files": [("file", ("x.png", rng.bytes(int(rng.integers(1, 900))), "image/png"))]}),
        ("too many images", lambda: {"files": [("file", ("x.png", b"x", "image/png"))] * int(rng.integers(9, 30))}),
        ("bad topk", lambda: raw(encoded(rng, "PNG"), params={"topk": str(rng.choice(["0", "-3", "x", "1.5", "", "9" * 5000]))})),
    ]
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1]()) for i in range(REQUESTS)]


def check(response: httpx.Response, kind: str) -> None:
    assert 400 <= response.status_code < 500, (kind, response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json"), kind
    error = response.json()["error"]
    assert isinstance(error, str) and error and "Traceback" not in error, kind


def send_all(server: Server, cases: list[Case]) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        responses = pool.map(lambda case: client.post("/v1/predict", **case[1]), cases)
        for (kind, _), response in zip(cases, responses, strict=True):
            check(response, kind)


def test_a_thousand_malformed_requests_get_json_errors_and_leave_the_server_well(
    torch_server: Server, serve_run: Path, test_pngs: list[Path]
) -> None:
    cases = malformed(np.random.default_rng(0))
    send_all(torch_server, cases[:400])
    settled = torch_server.rss_bytes()  # after the allocator has seen every kind of request
    send_all(torch_server, cases[400:])
    grown = torch_server.rss_bytes() - settled
    assert grown < LEAK_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over 800 bad requests"
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in test_pngs[:8]]
    response = httpx.post(f"{torch_server.url}/v1/predict?topk=3", files=files, timeout=60)
    assert response.status_code == 200
    assert_same(response.json()["predictions"], predict_cli(serve_run, test_pngs[:8], topk=3))


@pytest.mark.slow
def test_ten_thousand_malformed_requests(torch_server: Server) -> None:
    rng = np.random.default_rng(1)
    for _ in range(9):
        send_all(torch_server, malformed(rng))
    good = png_bytes(np.zeros((16, 16), dtype=np.uint8))
    assert httpx.post(f"{torch_server.url}/v1/predict", content=good, headers={"Content-Type": "image/png"}).status_code == 200


def malformed_rows(rng: np.random.Generator, count: int) -> list[Case]:
    """Bad requests for a regression model (area, rooms, one-hot city), deterministic for the seed."""
    good = {"area": 80.0, "rooms": 2, "city": "north"}

    spoils: list[Any] = [None, "", "x" * 300, [1], {"a": 1}, True]  # each is wrong in any column, as is no value at all

    def spoiled() -> dict[str, Any]:
        row: dict[str, Any] = dict(good)
        column, choice = str(rng.choice(list(good))), int(rng.integers(0, len(spoils) + 1))
        if choice == len(spoils):
            del row[column]
        else:
            row[column] = spoils[choice]
        return row

    kinds: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("random bytes as json", lambda: raw(rng.bytes(int(rng.integers(1, 2000))), "application/json")),
        ("random bytes as csv", lambda: raw(rng.bytes(int(rng.integers(1, 2000))) + b"\xff", "text/csv")),
        ("broken json", lambda: raw(json.dumps({"rows": [good]}).encode()[: int(rng.integers(1, 30))], "application/json")),
        (
            "wrong json shape",
            lambda: {"json": [{"rows": 1}, {"rows": [1]}, {"rows": "a"}, {"row": [good]}, [good], 3][int(rng.integers(0, 6))]},
        ),
        ("a spoiled row among good ones", lambda: {"json": {"rows": [good] * int(rng.integers(0, 5)) + [spoiled()]}}),
        ("ragged csv", lambda: raw(b"area,rooms,city\n80,2,north\n" + b"1," * int(rng.integers(3, 40)) + b"\n", "text/csv")),
        ("csv without the columns", lambda: raw(b"a,b\n" + b"1,2\n" * int(rng.integers(1, 20)), "text/csv")),
        ("wrong type", lambda: raw(json.dumps({"rows": [good]}).encode(), str(rng.choice(["image/png", "application/xml", "", "x/y"])))),
        ("too many rows", lambda: {"json": {"rows": [good] * int(rng.integers(51, 200))}}),
    ]
    return [(kinds[i % len(kinds)][0], kinds[i % len(kinds)][1]()) for i in range(count)]


def test_malformed_table_requests_get_json_errors_and_the_server_still_answers(table_server: Server) -> None:
    cases = [
        (kind, {**case, "headers": {**case.get("headers", {}), "Authorization": f"Bearer {KEY}"}})
        for kind, case in malformed_rows(np.random.default_rng(2), 450)
    ]
    send_all(table_server, cases)
    good = {"rows": [{"area": 80, "rooms": 2, "city": "north"}]}
    response = httpx.post(f"{table_server.url}/v1/predict", json=good, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200 and isinstance(response.json()["predictions"][0]["value"], float)
