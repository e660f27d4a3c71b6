"""Turning an HTTP request into encoded images: multipart files under `file`, a raw image body, or
JSON `{"images": [base64, ...]}`. Every problem becomes an ApiError with the status it earns
(400 malformed, 413 too large, 415 wrong type) and a message naming it; nothing is decoded here."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

RAW_TYPES = ("application/octet-stream",)  # besides image/*
FILE_FIELD = "file"


class ApiError(Exception):
    """A request the API refuses: HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    images: list[bytes]  # encoded image files, in request order
    topk: int | None  # asked for in the body (JSON key or form field), None when not


@dataclass(frozen=True)
class Limits:
    max_body: int  # bytes one request body may have
    max_images: int  # images one request may carry


async def read_body(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its Content-Length) is over `limit`."""
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number") from None
        if length > limit:
            raise ApiError(413, f"request body of {length:,} bytes is over the limit of {limit:,} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def parse_upload(content_type: str | None, body: bytes, headers: Any, limits: Limits) -> Upload:
    """The images of a request, by its Content-Type."""
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        upload = await parse_multipart(body, headers, limits)
    elif kind == "application/json":
        upload = parse_json(body)
    elif kind.startswith("image/") or kind in RAW_TYPES:
        upload = Upload([body], None)
    else:
        shown = kind or "none"
        raise ApiError(
            415,
            f"unsupported Content-Type {shown[:80]!r}: send multipart/form-data (field 'file'), image/*, application/octet-stream or application/json",
        )
    return check_count(upload, limits.max_images)


def check_count(upload: Upload, max_images: int) -> Upload:
    if not upload.images:
        raise ApiError(
            400,
            "no image in the request: send one or more files under the form field 'file', an image body or JSON {\"images\": [base64, ...]}",
        )
    if len(upload.images) > max_images:
        raise ApiError(413, f"{len(upload.images)} images in one request; the limit is {max_images}")
    empty = [i for i, data in enumerate(upload.images) if not data]
    if empty:
        raise ApiError(400, f"image {empty[0]} of the request is empty (0 bytes)")
    return upload


async def parse_multipart(body: bytes, headers: Any, limits: Limits) -> Upload:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    # the body is already bounded by max_body; the parser's own caps bound the parts' count
    parser = MultiPartParser(headers, stream(), max_files=limits.max_images + 1, max_fields=16, max_part_size=limits.max_body)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if "Too many files" in str(err):
            raise ApiError(413, f"more than {limits.max_images} images in one request; the limit is {limits.max_images}") from None
        raise ApiError(400, f"malformed multipart body: {str(err)[:200]}") from None
    except (ValueError, KeyError) as err:
        raise ApiError(400, f"malformed multipart body: {str(err)[:200]}") from None
    try:
        images = []
        for value in form.getlist(FILE_FIELD):
            if isinstance(value, str):
                raise ApiError(400, f"form field {FILE_FIELD!r} must be a file upload, not text")
            images.append(await value.read())
        topk = form.get("topk")
        others = sorted({key for key in form if key not in (FILE_FIELD, "topk")})
    finally:
        await form.close()
    if others:
        raise ApiError(400, f"unknown form field(s) {', '.join(repr(k[:40]) for k in others[:5])}; images go under {FILE_FIELD!r}")
    return Upload(images, parse_topk(topk) if isinstance(topk, str) else None)


def parse_json(body: bytes) -> Upload:
    if not body:
        raise ApiError(400, "empty JSON body")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"malformed JSON: {str(err)[:200]}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, 'JSON body must be an object {"images": [base64, ...], "topk": K}')
    if "images" not in payload:
        rows = '; "rows" are for a regression run, and this one classifies images' if "rows" in payload else ""
        raise ApiError(400, f'JSON without an "images" list: send {{"images": [base64, ...], "topk": K}}{rows}')
    if not isinstance(payload["images"], list):
        raise ApiError(400, f'"images" must be a list of base64 strings, not {type(payload["images"]).__name__}')
    unknown = sorted(set(payload) - {"images", "topk"})
    if unknown:
        raise ApiError(400, f"unknown JSON key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")
    images = [decode_base64(i, value) for i, value in enumerate(payload["images"])]
    topk = payload.get("topk")
    return Upload(images, None if topk is None else parse_topk(topk))


def decode_base64(index: int, value: object) -> bytes:
    """Standard base64, optionally as a data URL (data:image/png;base64,...)."""
    if not isinstance(value, str):
        raise ApiError(400, f"images[{index}] must be a base64 string, not {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"images[{index}] is not valid base64") from None


def parse_topk(value: object) -> int:
    """topk from a query, form field or JSON value: a whole number >= 1."""
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        topk = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ApiError(400, f"topk must be a whole number >= 1, got {str(value)[:40]!r}") from None
    if topk < 1:
        raise ApiError(400, f"topk must be a whole number >= 1, got {topk}")
    return topk
