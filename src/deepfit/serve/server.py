"""Running the app on uvicorn: one process holding the model, or `--workers N` processes each
loading it. uvicorn's own SIGTERM/SIGINT handling gives the graceful stop: the socket stops
accepting, requests in flight are answered, then the lifespan stops the batcher and it exits."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepfit.optional import import_optional
from deepfit.runtime import set_threads
from deepfit.serve.app import API_KEY_ENV, ServeOptions, create_app
from deepfit.serve.model import ServeError, load_served_model
from deepfit.serve.table import load_served_table

WORKER_ENV = "DEEPFIT_SERVE_WORKER"  # JSON settings handed to `--workers N` processes
GRACEFUL_S = 30  # longest wait for in-flight requests after SIGTERM


@dataclass(frozen=True)
class ServeSettings:
    """Everything `deepfit serve` was asked for."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "torch"
    device: str = "cpu"
    workers: int = 1
    threads: int = 0  # torch / onnxruntime CPU threads; 0 = the library default
    max_pixels: int = 40_000_000
    tta: str | None = None  # test-time augmentation; None: the run's own train.tta
    options: ServeOptions = dataclasses.field(default_factory=ServeOptions)


def check_settings(settings: ServeSettings) -> None:
    o = settings.options
    checks = [
        (1 <= settings.port <= 65535 or settings.port == 0, f"--port {settings.port} is not a TCP port"),
        (settings.workers >= 1, "--workers must be at least 1"),
        (settings.threads >= 0, "--threads must be 0 (the library's default) or a number of threads"),
        (o.max_batch >= 1, "--max-batch must be at least 1"),
        (o.max_wait_ms >= 0, "--max-wait-ms cannot be negative"),
        (o.max_body_mb > 0, "--max-body-mb must be positive"),
        (o.max_images >= 1, "--max-images must be at least 1"),
        (o.max_rows >= 1, "--max-rows must be at least 1"),
        (o.default_topk >= 1, "--topk must be at least 1"),
        (settings.max_pixels >= 1, "--max-pixels must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ServeError(message)


def check_address(host: str, port: int) -> int:
    """Bind (host, port) once and let go, as uvicorn will, so a port in use or a host that is not
    this machine's is one line before the model loads, not uvicorn's log line after the start-up
    banner. A port taken between this check and uvicorn's bind still fails there. Returns the
    port bound: for --port 0, the free one the system chose, which the server then takes."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's socket: a closing port's TIME_WAIT is no obstacle
            probe.bind(address)
            return int(probe.getsockname()[1])
    except OSError as err:  # socket.gaierror too
        raise ServeError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None


def with_env_key(settings: ServeSettings) -> ServeSettings:
    """--api-key, else $DEEPFIT_API_KEY (kept out of `ps` listings), else no key."""
    key = settings.options.api_key or os.environ.get(API_KEY_ENV) or None
    return dataclasses.replace(settings, options=dataclasses.replace(settings.options, api_key=key))


def served_task(checkpoint: str) -> str:
    """image or regression; a node model is refused here, in one line naming what lists its answers."""
    from deepfit.checkpoint import checkpoint_task, load_checkpoint

    task = checkpoint_task(load_checkpoint(checkpoint))
    if task not in ("image", "regression"):
        raise ServeError(
            f"{checkpoint} holds a {task} model: its predictions are for the nodes of the graph it was trained on,"
            f" listed by deepfit predict {checkpoint}; serve takes image and regression runs"
        )
    return task


def check_table_settings(settings: ServeSettings) -> None:
    """The image-only options, refused for a regression model rather than silently ignored."""
    refused = [
        (settings.backend != "torch", "--backend onnx serves image models; a regression model is served by PyTorch"),
        (settings.device not in ("cpu", "auto"), "a regression model is served on the CPU; leave --device at cpu"),
        (settings.tta is not None, "--tta is test-time augmentation of images; a regression model has none"),
    ]
    for bad, message in refused:
        if bad:
            raise ServeError(message)


def build_app(settings: ServeSettings) -> Any:
    if served_task(settings.checkpoint) == "regression":
        check_table_settings(settings)
        set_threads(settings.threads)
        return create_app(load_served_table(settings.checkpoint), settings.options)
    model = load_served_model(
        settings.checkpoint, backend=settings.backend, device=settings.device, threads=settings.threads, max_pixels=settings.max_pixels,
        tta=settings.tta,
    )  # fmt: skip
    return create_app(model, settings.options)


def serve(settings: ServeSettings, *, announce: Callable[[str], None] | None = None) -> None:
    """Load the model (errors surface here, before any port is bound), then serve until a signal.
    `announce` is told the address once the model is loaded."""
    check_settings(settings)
    settings = with_env_key(settings)
    if not Path(settings.checkpoint).exists():
        raise ServeError(f"{settings.checkpoint}: no such run folder or checkpoint")
    uvicorn = import_optional("uvicorn", extra="serve", purpose="deepfit serve")
    settings = dataclasses.replace(settings, port=check_address(settings.host, settings.port))  # --port 0: a free one, announced
    app = build_app(settings)  # also exports and verifies the ONNX file once for every worker
    if announce is not None:
        announce(f"http://{settings.host}:{settings.port}/")
    common = {"host": settings.host, "port": settings.port, "access_log": False, "timeout_graceful_shutdown": GRACEFUL_S}
    if settings.workers == 1:
        uvicorn.run(app, log_level="warning", **common)
        return
    os.environ[WORKER_ENV] = json.dumps(dataclasses.asdict(settings))
    uvicorn.run("deepfit.serve.server:worker_app", factory=True, workers=settings.workers, log_level="warning", **common)


def worker_app() -> Any:
    """The app of one `--workers N` process, from the settings the parent left in the environment."""
    raw = json.loads(os.environ[WORKER_ENV])
    options = ServeOptions(**raw.pop("options"))
    return build_app(ServeSettings(**raw, options=options))
