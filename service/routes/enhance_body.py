"""POST /enhance's body -> (validated fields, image bytes): multipart/form-data or JSON with base64.

Both read at most the upload limit (plus the small fields) before refusing with 413. A JSON
body's parsing and its base64 decoding run in a worker thread: megabytes of text would
otherwise hold the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service import problems
from service.schemas import FIELD_NAMES, EnhanceFields, EnhanceJSON

_FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries + the small fields
_MAX_FIELD_BYTES = 1024


async def read_limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body, chunk by chunk; PayloadTooLarge as soon as more than ``limit`` bytes arrived."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise problems.PayloadTooLarge(f"the request body exceeds {limit} bytes")
        yield chunk


async def parse_body(request: Request, max_upload_bytes: int) -> tuple[EnhanceFields, bytes]:
    """The fields and the image of an /enhance request, told apart by its Content-Type."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await parse_multipart(request, max_upload_bytes)
    if media in ("application/json", ""):
        if media == "" and not request.headers.get("content-length", "").strip("0"):
            raise problems.InvalidField("the request needs a body: multipart/form-data with an `image` "
                                        "file, or JSON with `image` as base64")
        return await parse_json(request, max_upload_bytes)
    raise problems.UnsupportedMediaType(
        f"send multipart/form-data (an `image` file + fields) or application/json, not {media!r}")


async def parse_multipart(request: Request, max_upload_bytes: int) -> tuple[EnhanceFields, bytes]:
    limit = max_upload_bytes + _FORM_OVERHEAD_BYTES
    parser = MultiPartParser(request.headers, read_limited(request, limit), max_files=1,
                             max_fields=len(FIELD_NAMES), max_part_size=_MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise problems.BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        values: dict[str, Any] = {}
        image: bytes | None = None
        for name, value in form.multi_items():
            if name in values or (name == "image" and image is not None):
                raise problems.InvalidField(f"field {name!r} is given twice")
            if name == "image":
                if not isinstance(value, UploadFile):
                    raise problems.InvalidField("`image` must be a file part (filename=...)")
                image = await value.read()
            elif isinstance(value, UploadFile):
                raise problems.InvalidField(f"unexpected file part {name!r}; only `image` is a file")
            elif value != "":  # an empty form field means "default", as browsers send it
                values[name] = value
    finally:
        await form.close()
    fields = EnhanceFields.model_validate(values)
    if image is None:
        raise problems.InvalidField("the `image` file part is missing", errors=[
            {"loc": ["body", "image"], "msg": "Field required", "type": "missing"}])
    return fields, image


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise problems.BadRequest("the body is not valid JSON") from None


def _decode_base64(text: str) -> bytes:
    """The bytes of base64 ``text`` (a data: URL prefix and white space allowed); 422 if invalid."""
    text = text.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise problems.InvalidField("`image` is not valid base64", errors=[
            {"loc": ["body", "image"], "msg": "not valid base64", "type": "value_error"}]) from None


async def parse_json(request: Request, max_upload_bytes: int) -> tuple[EnhanceFields, bytes]:
    limit = (max_upload_bytes * 4) // 3 + 4 + _FORM_OVERHEAD_BYTES
    body = b"".join([chunk async for chunk in read_limited(request, limit)])
    payload = await asyncio.to_thread(_load_json, body)
    if not isinstance(payload, dict):
        raise problems.InvalidField("the JSON body must be an object with `image` and the fields")
    parsed = EnhanceJSON.model_validate(payload)
    image = await asyncio.to_thread(_decode_base64, parsed.image)
    return EnhanceFields.model_validate(parsed.model_dump(exclude={"image"}, exclude_unset=True)), image
