"""`deepfit serve` under load, side by side with a plain LitServe server on the same checkpoint.

1. Writes Fashion-MNIST test images as PNG files (--images, default 1,000).
2. For each backend (torch, onnx): starts `deepfit serve` on a free port, posts every PNG (single-
   image requests, 8 at a time, so they are batched) and counts disagreements with
   `deepfit predict --format json` on the same files (label, or a probability off by > 1e-4).
3. Load: `hey` (Debian package `hey`; else an async httpx client, reported) with --connections
   (16) for --seconds (30), every request the same multipart upload of one test PNG, against
   `deepfit serve` (--load-backend, default torch) and then against bench/litserve_app.py
   (LitServe, same checkpoint, batch size and wait). Prints requests/s, p50/p95/p99 latency and
   non-200 answers for each, and deepfit's throughput as a multiple of LitServe's.

    python bench/serve.py --checkpoint RUN [--data-dir DIR] [--seconds 30] [--connections 16]
           [--images 1000] [--load-backend torch|onnx] [--threads 1] [--workers 1] [--max-batch 32] [--max-wait-ms 5]
           [--no-litserve] [--no-save]

RUN is a Fashion-MNIST cnn_bn run folder (or checkpoint); make one with
`deepfit train --data fashion-mnist --model cnn_bn --epochs 2 --out runs/fmnist-cnn_bn`.
Run it on a quiet machine: the load generator and both servers share its cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, doc_parser, machine, save_json
from bench.serve_load import Load, agreement, deepfit_server, format_loads, litserve_server, run_load, write_pngs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="Fashion-MNIST run folder or checkpoint (cnn_bn for the issue's figures)")
    parser.add_argument(
        "--data-dir", default=str(DATASETS / "fashion-mnist"), help="folder of the Fashion-MNIST IDX files (test split used)"
    )
    parser.add_argument("--images", type=int, default=1000, help="test PNGs for the agreement check (default 1000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load duration per server (default 30)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections of the load (default 16)")
    parser.add_argument("--load-backend", default="torch", choices=["torch", "onnx"], help="deepfit backend under load (default torch)")
    parser.add_argument("--agreement-backends", default="torch,onnx", help="backends checked against deepfit predict ('' for none)")
    parser.add_argument("--threads", type=int, default=1, help="model CPU threads in every server (default 1)")
    parser.add_argument("--max-batch", type=int, default=32, help="batch limit of both servers (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batch wait of both servers (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="deepfit serve processes (default 1; LitServe runs its own two)")
    parser.add_argument("--client", default="auto", choices=["auto", "hey", "httpx"], help="load generator (auto: hey when installed)")
    parser.add_argument("--no-litserve", action="store_true", help="skip the LitServe side")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/serve-*.json")
    return parser.parse_args(argv)


def report_agreement(backend: str, url: str, checkpoint: str, pngs: list[Path]) -> dict[str, Any]:
    check = agreement(url, checkpoint, pngs)
    print(f"agreement with deepfit predict, {backend}: {check['disagreements']} disagreements in {check['images']} images", flush=True)
    return check


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = [
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
    ]
    payload: dict[str, Any] = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="deepfit-bench-serve-") as scratch:
        pngs = write_pngs(Path(args.data_dir), Path(scratch) / "pngs", args.images)
        print(f"{len(pngs)} Fashion-MNIST test PNGs written", flush=True)
        checks: dict[str, Any] = {}
        loads: list[Load] = []
        backends = [b for b in args.agreement_backends.split(",") if b and b != args.load_backend]
        for backend in backends:
            with deepfit_server(args.checkpoint, backend, limits, Path(scratch)) as url:
                checks[backend] = report_agreement(backend, url, args.checkpoint, pngs)
        with deepfit_server(args.checkpoint, args.load_backend, limits, Path(scratch)) as url:
            if args.load_backend in args.agreement_backends.split(","):
                checks[args.load_backend] = report_agreement(args.load_backend, url, args.checkpoint, pngs)
            loads.append(
                run_load(f"deepfit serve ({args.load_backend})", url, pngs[0], args.seconds, args.connections, args.client, Path(scratch))
            )
        if not args.no_litserve:
            with litserve_server(args.checkpoint, args, Path(scratch)) as url:
                loads.append(run_load("litserve", url, pngs[0], args.seconds, args.connections, args.client, Path(scratch)))
    print(format_loads(loads))
    payload.update({"agreement": checks, "load": [load.to_dict() for load in loads]})
    if not args.no_save:
        print(f"saved {save_json(payload, 'serve')}")
    else:
        print(json.dumps(payload["load"]))
    failed = any(c["disagreements"] for c in checks.values()) or any(load.requests == 0 for load in loads)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
