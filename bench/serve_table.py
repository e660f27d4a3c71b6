"""`deepfit serve` for a regression run, side by side with the plain FastAPI route one would write
by hand on the same checkpoint (parse the JSON, encode the rows with the checkpoint's schema,
predict, answer; no checks of its own), both on uvicorn, one process each.

For each request size (--rows, default 1,100,10000) it posts the same JSON rows --repeats times
(default 30) over one keep-alive connection to each server in turn, and prints the median and p90
latency and rows/s of each, deepfit's median as a multiple of the peer's, and whether both
answered the same values (they must: same model, same schema).

    python bench/serve_table.py --checkpoint RUN [--rows 1,100,10000] [--repeats 30] [--no-save]

RUN is a regression run folder; make one with
`deepfit train --data diabetes --out runs/diabetes` (embedded data, no download).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import doc_parser, machine, save_json
from bench.serve_load import deepfit_server, free_port, server_process


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="regression run folder or checkpoint")
    parser.add_argument("--rows", default="1,100,10000", help="rows per request, comma-separated (default 1,100,10000)")
    parser.add_argument("--repeats", type=int, default=30, help="requests per size and server (default 30)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/serve-table-*.json")
    parser.add_argument("--peer-port", type=int, help=argparse.SUPPRESS)  # internal: run the peer server on this port
    return parser.parse_args(argv)


def peer_app(checkpoint: str) -> Any:
    """The hand-written server: one route, the model's own encode and predict."""
    import torch
    from fastapi import FastAPI

    from deepfit.regression.trained import load_regression_model

    trained = load_regression_model(checkpoint)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict[str, Any]) -> dict[str, Any]:
        features = [trained.schema.encode(row) for row in body["rows"]]
        values = trained.predict(torch.tensor(features, dtype=torch.float64)).tolist()
        return {"predictions": [{"value": v} for v in values]}

    return app


def rows_of(checkpoint: str, count: int) -> list[dict[str, Any]]:
    """`count` rows of plausible values: each numeric feature at its training mean plus a spread,
    each one-hot column cycling through its levels."""
    from deepfit.regression.trained import load_regression_model

    trained = load_regression_model(checkpoint)
    schema, scaling = trained.schema, trained.scaling
    names = schema.feature_names()
    rows = []
    for i in range(count):
        row: dict[str, Any] = {}
        for column in schema.columns:
            levels = schema.categories.get(column)
            if levels is not None:
                row[column] = levels[i % len(levels)]
            else:
                j = names.index(column)
                row[column] = round(scaling.mean[j] + scaling.std[j] * ((i % 7) - 3) / 3, 4)
        rows.append(row)
    return rows


def timed(url: str, body: dict[str, Any], repeats: int) -> tuple[list[float], list[float]]:
    """Latencies (s) of `repeats` posts after two warm-up ones, and the last answer's values."""
    import httpx

    with httpx.Client(timeout=120) as client:
        for _ in range(2):
            client.post(url, json=body).raise_for_status()
        latencies = []
        for _ in range(repeats):
            started = time.perf_counter()
            answer = client.post(url, json=body)
            latencies.append(time.perf_counter() - started)
            answer.raise_for_status()
    return latencies, [p["value"] for p in answer.json()["predictions"]]


def measure(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    sizes = [int(n) for n in args.rows.split(",")]
    bodies = {n: {"rows": rows_of(args.checkpoint, n)} for n in sizes}
    port = free_port()
    peer = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--peer-port", str(port)]
    results = []
    with (
        deepfit_server(args.checkpoint, "torch", ["--max-rows", str(max(sizes))], scratch) as deepfit_url,
        server_process(peer, f"http://127.0.0.1:{port}/health", scratch / "peer.log"),
    ):
        for n in sizes:
            ours, our_values = timed(deepfit_url, bodies[n], args.repeats)
            theirs, their_values = timed(f"http://127.0.0.1:{port}/predict", bodies[n], args.repeats)
            results.append(row(n, ours, theirs, our_values == their_values))
    return results


def row(n: int, ours: list[float], theirs: list[float], same: bool) -> dict[str, Any]:
    def p90(values: list[float]) -> float:
        return sorted(values)[int(0.9 * (len(values) - 1))]

    return {
        "rows": n, "deepfit_median_ms": 1000 * statistics.median(ours), "deepfit_p90_ms": 1000 * p90(ours),
        "peer_median_ms": 1000 * statistics.median(theirs), "peer_p90_ms": 1000 * p90(theirs),
        "deepfit_rows_per_s": n / statistics.median(ours), "ratio": statistics.median(ours) / statistics.median(theirs),
        "same_values": same,
    }  # fmt: skip


def format_rows(results: list[dict[str, Any]]) -> str:
    lines = [f"{'rows':>6}  {'deepfit p50':>11}  {'p90':>8}  {'peer p50':>9}  {'p90':>8}  {'deepfit rows/s':>14}  {'x peer':>6}  same"]
    for r in results:
        lines.append(
            f"{r['rows']:>6}  {r['deepfit_median_ms']:>8.2f} ms  {r['deepfit_p90_ms']:>5.2f} ms  {r['peer_median_ms']:>6.2f} ms"
            f"  {r['peer_p90_ms']:>5.2f} ms  {r['deepfit_rows_per_s']:>14,.0f}  {r['ratio']:>6.2f}  {'yes' if r['same_values'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer_port is not None:
        import uvicorn

        uvicorn.run(peer_app(args.checkpoint), host="127.0.0.1", port=args.peer_port, log_level="warning", access_log=False)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        results = measure(args, Path(scratch))
    print(format_rows(results))
    if not args.no_save:
        print(save_json({"machine": machine(), "checkpoint": args.checkpoint, "repeats": args.repeats, "results": results}, "serve-table"))
    return 0 if all(r["same_values"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
