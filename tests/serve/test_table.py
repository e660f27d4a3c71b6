"""`deepfit serve` for a regression run as a real process: JSON rows and CSV bodies answer exactly
what the checkpoint's model predicts (and what `deepfit predict` prints), the description names the
target, features and one-hot levels, every malformed request gets its JSON error, the API key holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from deepfit.cli import main
from deepfit.regression.trained import load_regression_model
from tests.serve.conftest import CITIES, KEY, Server


def post(server: Server, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/predict", timeout=60, headers=headers, **kwargs)


ROWS = [
    {"area": 120.5, "rooms": 3, "city": "south"},
    {"area": "64", "rooms": "2", "city": "north", "unused": "x"},  # text cells and extra columns are fine
    {"area": 199, "rooms": 5, "city": "east"},
]


def expected_values(run: Path, rows: list[dict[str, Any]]) -> list[float]:
    trained = load_regression_model(run)
    features = [trained.schema.encode({k: str(v) for k, v in row.items()}) for row in rows]
    return [float(v) for v in trained.predict(torch.tensor(features, dtype=torch.float64)).tolist()]


def test_json_and_csv_rows_equal_the_checkpoints_model_and_deepfit_predict(
    table_server: Server, table_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = expected_values(table_run, ROWS)
    as_json = post(table_server, json={"rows": ROWS})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == {"target": "price", "predictions": [{"value": v} for v in expected]}

    table = "area,rooms,city\n" + "\n".join(f"{r['area']},{r['rooms']},{r['city']}" for r in ROWS) + "\n"
    as_csv = post(table_server, content=table.encode(), headers={"Content-Type": "text/csv; charset=utf-8"})
    assert as_csv.status_code == 200, as_csv.text
    assert [p["value"] for p in as_csv.json()["predictions"]] == expected
    semicolons = table.replace(",", ";").replace("120.5", "120,5")  # as a spreadsheet in a European locale saves it
    as_semicolons = post(table_server, content=semicolons.encode(), headers={"Content-Type": "text/csv"})
    assert as_semicolons.status_code == 200, as_semicolons.text
    assert [p["value"] for p in as_semicolons.json()["predictions"]] == expected

    (tmp_path / "rows.csv").write_text(table)
    capsys.readouterr()
    assert main(["predict", str(table_run), str(tmp_path / "rows.csv"), "--format", "csv"]) == 0
    printed = [float(line.split(",")[1]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == pytest.approx(expected, rel=1e-5)  # predict prints 6 significant digits
    assert expected[0] != pytest.approx(expected[1])  # the rows differ, so the order is checked


def test_model_description_names_target_features_levels_and_scores(table_server: Server) -> None:
    info = httpx.get(f"{table_server.url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["task"] == "regression" and info["target"] == "price" and info["architecture"] == "linear"
    assert info["features"] == ["area", "rooms", "city"] and sorted(info["categories"]["city"]) == sorted(CITIES)
    assert info["metrics"]["epoch"] == 30 and "val_r2" in info["metrics"] and "val_acc" not in info["metrics"]
    assert info["max_rows"] == 50 and info["backend"] == "torch"
    assert httpx.get(f"{table_server.url}/readyz").json() == {"status": "ready", "backend": "torch"}
    page = httpx.get(f"{table_server.url}/").text
    assert "/static/table.js" in page and httpx.get(f"{table_server.url}/static/table.js").status_code == 200
    assert "predict price for table rows" in json.dumps(httpx.get(f"{table_server.url}/openapi.json").json())


BAD = {
    "no content type": ({"content": b"area\n1\n"}, 415, "unsupported Content-Type 'none'"),
    "not json": ({"content": b"{rows", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    "no rows key": ({"json": {"data": []}}, 400, 'JSON without a "rows" list'),
    "images sent to a table model": ({"json": {"images": ["AAAA"]}}, 400, '"images" are for an image classifier'),
    "empty rows": ({"json": {"rows": []}}, 400, "no rows"),
    "row not object": ({"json": {"rows": [[1, 2, "north"]]}}, 400, "row 0 is not an object"),
    "nested value": ({"json": {"rows": [{"area": [1], "rooms": 2, "city": "north"}]}}, 400, "column 'area' holds [1]"),
    "missing column": ({"json": {"rows": [{"area": 50, "rooms": 2}]}}, 400, "no column 'city'; the model needs area, rooms, city"),
    "null value": ({"json": {"rows": [ROWS[0], {"area": None, "rooms": 2, "city": "east"}]}}, 400, "row 1: missing value in column 'area'"),
    "unknown level": ({"json": {"rows": [{"area": 50, "rooms": 2, "city": "west"}]}}, 400, "'west', a value not seen in training"),
    "text number": ({"json": {"rows": [{"area": "big", "rooms": 2, "city": "east"}]}}, 400, "column 'area' has 'big', not a number"),
    "too many rows": ({"json": {"rows": [ROWS[0]] * 51}}, 413, "51 rows in one request; the limit is 50"),
    "ragged csv": (
        {"content": b"area,rooms,city\n50,2\n", "headers": {"Content-Type": "text/csv"}},
        400,
        "CSV line 2: 2 cells, the header has 3",
    ),
    "csv not utf-8": ({"content": b"area\n\xff\xfe\n", "headers": {"Content-Type": "text/csv"}}, 400, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_request_gets_its_json_error_and_the_server_goes_on(table_server: Server, case: str) -> None:
    kwargs, status, message = BAD[case]
    response = post(table_server, **kwargs)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert post(table_server, json={"rows": ROWS[:1]}).status_code == 200


def test_the_api_key_guards_the_api_but_not_the_page(table_server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{table_server.url}/v1/predict", json={"rows": ROWS}, headers=headers, timeout=60)
        assert response.status_code == 401 and "API key" in response.json()["error"]
    assert httpx.get(f"{table_server.url}/v1/model").status_code == 401
    assert httpx.get(f"{table_server.url}/").status_code == 200
    stats = httpx.get(f"{table_server.url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["requests"] >= 1 and stats["rows"] >= stats["requests"]
