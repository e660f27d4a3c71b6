"""The FastAPI application: /v1/predict, /v1/model, /v1/stats, /healthz, /readyz and the web page,
for an image classifier (dynamic batching) or a regression model (table rows). Every error reaches the client as JSON `{"error": "..."}` with a 4xx/5xx status, never a
traceback; an optional API key guards /v1/*.

No `from __future__ import annotations` here: FastAPI reads the routes' `request: Request`
annotation at run time, and Request is imported inside create_app (fastapi is optional)."""

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfit.optional import import_optional
from deepfit.serve.batcher import Batcher
from deepfit.serve.model import ImageRejected, ServedModel
from deepfit.serve.table import ServedTable, parse_rows
from deepfit.serve.uploads import ApiError, Limits, parse_topk, parse_upload, read_body

API_KEY_ENV = "DEEPFIT_API_KEY"
STATIC_FILES = {
    "common.js": "text/javascript; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "table.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
log = logging.getLogger("deepfit.serve")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # images in one forward pass
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_body_mb: float = 10.0  # request body limit (413 above)
    max_images: int = 64  # images in one request (413 above)
    default_topk: int = 5  # when the request does not say
    max_rows: int = 10_000  # table rows in one request (413 above)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`

    @property
    def limits(self) -> Limits:
        return Limits(max_body=int(self.max_body_mb * 1024 * 1024), max_images=self.max_images)


class State:
    """What the routes share: the model, its batcher, and whether warm-up has finished."""

    def __init__(self, model: ServedModel, options: ServeOptions) -> None:
        self.model = model
        self.options = options
        self.batcher = Batcher(model.process, max_batch=options.max_batch, max_wait_s=options.max_wait_ms / 1000)
        self.ready = False

    async def warm_up(self) -> None:
        """One full and one single-image pass, so the first request pays no one-off costs."""
        blank = np.zeros(self.model.predictor.input_shape, dtype=np.uint8)
        from deepfit.predict import png_bytes

        image = png_bytes(blank.transpose(1, 2, 0))
        await self.batcher.run_now([image] * self.options.max_batch)
        await self.batcher.run_now([image])
        self.ready = True


def create_app(model: ServedModel | ServedTable, options: ServeOptions) -> Any:
    if isinstance(model, ServedTable):
        return create_table_app(model, options)
    fastapi = import_optional("fastapi", extra="serve", purpose="deepfit serve")
    import_optional("multipart", extra="serve", purpose="deepfit serve")  # python-multipart, for file uploads
    state = State(model, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.batcher.start()
        warming = asyncio.create_task(state.warm_up())
        yield
        warming.cancel()
        await state.batcher.stop()

    app = fastapi.FastAPI(
        title="deepfit serve",
        version="1",
        description=f"Image classification with {model.info['architecture']} ({model.info['run']}).",
        lifespan=lifespan,
    )
    app.state.deepfit = state
    add_error_handlers(app, fastapi)
    add_api_routes(app, state)
    add_health_routes(app, lambda: state.ready, model.backend)
    add_page_routes(app, fastapi, "index.html")
    return app


def create_table_app(model: ServedTable, options: ServeOptions) -> Any:
    """A regression model's app: nothing to warm up or batch, so it is ready at once."""
    fastapi = import_optional("fastapi", extra="serve", purpose="deepfit serve")
    info = model.info
    app = fastapi.FastAPI(
        title="deepfit serve",
        version="1",
        description=f"Regression of {info['target']} with {info['architecture']} ({info['run']}).",
    )
    add_error_handlers(app, fastapi)
    add_table_routes(app, model, options)
    add_health_routes(app, lambda: True, model.backend)
    add_page_routes(app, fastapi, "table.html")
    return app


def error_response(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def add_error_handlers(app: Any, fastapi: Any) -> None:
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Any, err: ApiError) -> Any:
        return error_response(err.status, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, err: HTTPException) -> Any:  # 404, 405 and friends
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request: Any, err: Any) -> Any:
        return error_response(400, "invalid request parameters")

    @app.exception_handler(Exception)
    async def unexpected(request: Any, err: Exception) -> Any:
        log.exception("unexpected error on %s", request.url.path)  # the traceback stays in the server's log
        return error_response(500, "internal error; the server log has the details")


def check_key(key: str | None, authorization: str | None) -> None:
    if not key:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")


def add_api_routes(app: Any, state: State) -> None:
    from fastapi import Request  # a local import keeps fastapi optional; the annotations below need the class

    @app.post("/v1/predict", summary="classify one or more images")
    async def predict(request: Request) -> Any:
        """Images as multipart files under the form field `file` (repeat it for several), a raw
        image body (`Content-Type: image/*` or `application/octet-stream`), or JSON
        `{"images": [base64, ...]}`; `topk` as a query parameter, form field or JSON key. Returns
        `{"predictions": [{label, index, probability, topk: [{label, probability}]}, ...]}`."""
        check_key(state.options.api_key, request.headers.get("authorization"))
        if not state.ready:
            raise ApiError(503, "the model is still warming up; retry shortly")
        with state.batcher.admit():
            return await classify(state, request)

    @app.get("/v1/model", summary="what is served: classes, input shape, architecture, final metrics")
    async def model_info(request: Request) -> Any:
        check_key(state.options.api_key, request.headers.get("authorization"))
        return {**state.model.info, "max_batch": state.options.max_batch, "max_images": state.options.max_images}

    @app.get("/v1/stats", summary="how requests were batched so far")
    async def stats(request: Request) -> Any:
        check_key(state.options.api_key, request.headers.get("authorization"))
        return state.batcher.stats.to_dict()


def add_table_routes(app: Any, model: ServedTable, options: ServeOptions) -> None:
    from fastapi import Request

    counts = {"requests": 0, "rows": 0}

    @app.post("/v1/predict", summary=f"predict {model.target} for table rows")
    async def predict(request: Request) -> Any:
        """Rows as JSON `{"rows": [{"column": value, ...}, ...]}` (null: a missing value) or a CSV
        body with its header row (`Content-Type: text/csv`); columns the model does not use are
        ignored. Returns `{"target": NAME, "predictions": [{"value": number}, ...]}` in row order."""
        check_key(options.api_key, request.headers.get("authorization"))
        body = await read_body(request.headers.get("content-length"), request.stream(), options.limits.max_body)
        rows = parse_rows(request.headers.get("content-type"), body, options.max_rows)
        values = await asyncio.to_thread(model.predict, rows)  # thousands of rows: off the event loop
        counts["requests"] += 1
        counts["rows"] += len(rows)
        return {"target": model.target, "predictions": [{"value": v if math.isfinite(v) else None} for v in values]}

    @app.get("/v1/model", summary="what is served: target, feature columns, categories, architecture, final metrics")
    async def model_info(request: Request) -> Any:
        check_key(options.api_key, request.headers.get("authorization"))
        return {**model.info, "max_rows": options.max_rows}

    @app.get("/v1/stats", summary="requests and rows answered so far")
    async def stats(request: Request) -> Any:
        check_key(options.api_key, request.headers.get("authorization"))
        return dict(counts)


def add_health_routes(app: Any, is_ready: Callable[[], bool], backend: str) -> None:
    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", summary="the model is loaded and warmed up")
    async def readyz() -> Any:
        if not is_ready():
            return error_response(503, "warming up")
        return {"status": "ready", "backend": backend}


async def classify(state: State, request: Any) -> dict[str, Any]:
    query_topk = request.query_params.get("topk")
    limits = state.options.limits
    body = await read_body(request.headers.get("content-length"), request.stream(), limits.max_body)
    upload = await parse_upload(request.headers.get("content-type"), body, request.headers, limits)
    topk = upload.topk or (parse_topk(query_topk) if query_topk is not None else state.options.default_topk)
    results = await state.batcher.submit(upload.images)
    return {"predictions": answer(state.model, results, topk)}


def answer(model: ServedModel, results: list[Any], topk: int) -> list[dict[str, Any]]:
    """Logits rows -> prediction dicts; the first failed image fails the request, named by position."""
    for index, result in enumerate(results):
        if isinstance(result, ImageRejected):
            prefix = f"image {index}: " if len(results) > 1 else ""
            raise ApiError(result.status, prefix + str(result))
        if isinstance(result, Exception):
            raise result
    predictions = model.predictions(np.stack(results), topk)
    return [{key: value for key, value in p.to_dict().items() if key != "path"} for p in predictions]


def add_page_routes(app: Any, fastapi: Any, page_name: str) -> None:
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return HTMLResponse(static_text(page_name))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Any:
        if name not in STATIC_FILES:
            raise ApiError(404, f"no static file {name[:80]!r}")
        return Response(static_text(name), media_type=STATIC_FILES[name])


def static_text(name: str) -> str:
    return importlib.resources.files("deepfit.serve").joinpath("static", name).read_text(encoding="utf-8")
