"""
Bounded work per request: every body is read against a byte cap before anything
parses it, and what is costly (inflating, counting, parsing) runs in a worker thread,
never on the event loop.

- :func:`read_body`: the body as sent, read from the stream up to a cap (413
  ``too_large`` past it, before the rest is read).
- :func:`inflate`: a gzip body inflated piece by piece, never past a cap.
- :func:`check_items`: a JSON text's values counted (commas, brackets and braces:
  C-speed ``bytes.count``, an upper bound) before any parser builds them, so that a
  body of millions of ``{}`` or ``[]``, even under a key nobody reads, costs neither
  memory nor time.
- :func:`read_json`: the three, then ``loads``, for every JSON body but the push's.
- :func:`read_form`: a dashboard form, small fields, few of them, no files.
- :func:`int_param`: an integer in the query, range-checked (SQLite holds 64 bits).

The figures are in ``shared/protocol.py`` (``MAX_*``), with the wire types they bound.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from shared.errors import ProtocolError
from shared.protocol import INT64_MAX, MAX_JSON_BODY_BYTES, loads

log = logging.getLogger("fieldsync.hub")

# A dashboard form. Signing in (anyone may try): two small fields. Signed in: a
# resolution's value may be a long text, as long as the admin API's JSON body allows.
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 16
MAX_FORM_FIELD_BYTES = 16 * 1024
SIGNED_IN_FORM: Final = {"max_bytes": MAX_JSON_BODY_BYTES, "max_field_bytes": MAX_JSON_BODY_BYTES}

_INFLATE_STEP = 1024 * 1024  # bytes inflated at a time


class TooLargeError(ProtocolError):
    code = "too_large"


class CutOffError(ProtocolError):
    """The office went away mid-request: a bad link, not something for admins to fix."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body as sent, at most ``limit`` bytes (TooLargeError past it, at once)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"the request body is over the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"the request body is over the {limit} byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        # A bad link: the office sends it again. Nothing was applied.
        log.info(
            "%s %s: the client went away before its request arrived whole",
            request.method,
            request.url.path,
        )
        raise CutOffError("the request was cut off before it arrived whole") from None
    return b"".join(chunks)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from its Content-Encoding (gzip or identity), at most ``limit``
    bytes once inflated: inflated a step at a time, so a bomb stops at the cap."""
    encoding = encoding.lower()
    if encoding == "identity":
        return body
    if encoding != "gzip":
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pieces: list[bytes] = []
    size = 0
    pending = body
    try:
        while True:
            piece = inflater.decompress(pending, _INFLATE_STEP)
            size += len(piece)
            if size > limit:
                raise TooLargeError(f"the request body inflates past the {limit} byte limit")
            pieces.append(piece)
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and not piece):
                break
    except zlib.error as exc:
        raise ProtocolError(f"the gzip body is corrupt: {exc}") from None
    if not inflater.eof:
        raise ProtocolError("the gzip body is cut short")
    return b"".join(pieces)


def check_items(body: bytes, limit: int) -> None:
    """Refuse a JSON text that may hold more than ``limit`` values.

    Every value but the first follows a comma or opens a container, so this counts
    at most what a parser would build (commas inside strings count too: a body this
    refuses is at worst one of many long texts, which an office sends in smaller
    batches after a 413).
    """
    found = body.count(b",") + body.count(b"[") + body.count(b"{")
    if found > limit:
        raise TooLargeError(
            f"the request body holds more than {limit} JSON values; send fewer per request"
        )


def parse_json(body: bytes) -> Any:
    """``loads``, a refusal worded for the client."""
    try:
        return loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request body is not valid JSON: {exc}") from None


def read_small_json(body: bytes, encoding: str, limit: int = MAX_JSON_BODY_BYTES) -> Any:
    """A JSON body read whole (``read_body``), inflated and parsed within ``limit``."""
    body = inflate(body, encoding, limit)
    check_items(body, limit // 2)  # two bytes a value at least: "0,"
    return parse_json(body)


async def read_json(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> Any:
    """A JSON body of at most ``limit`` bytes (inflated), parsed in a worker thread."""
    body = await read_body(request, limit)
    encoding = request.headers.get("content-encoding", "identity")
    return await run_in_threadpool(read_small_json, body, encoding, limit)


async def read_form(
    request: Request,
    *,
    max_bytes: int = MAX_FORM_BYTES,
    max_fields: int = MAX_FORM_FIELDS,
    max_field_bytes: int = MAX_FORM_FIELD_BYTES,
) -> FormData:
    """A dashboard form: its body read against ``max_bytes`` first, then parsed with
    at most ``max_fields`` fields of ``max_field_bytes`` each and no file parts.

    An HTTPException (413, or 400 for a form over the field limits): the dashboard
    shows it as an error page.
    """
    try:
        body = await read_body(request, max_bytes)
    except TooLargeError:
        raise HTTPException(413, f"This form is over the {max_bytes} byte limit.") from None
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, receive)
    return await replayed.form(max_files=0, max_fields=max_fields, max_part_size=max_field_bytes)


def int_param(request: Request, name: str, default: int, low: int, high: int = INT64_MAX) -> int:
    """The query parameter ``name``, a whole number from ``low`` to ``high``."""
    text = request.query_params.get(name)
    if text is None:
        return default
    text = text.strip()
    # int() of a long string of digits is quadratic; 20 characters hold any int64.
    if len(text) > 20 or not text.lstrip("-").isdigit():
        raise ProtocolError(f"{name} must be a whole number from {low} to {high}")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"{name} must be a whole number from {low} to {high}")
    return value
