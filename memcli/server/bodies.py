"""Request bodies read within bounds: at most a size, then parsed by memcli's one bounded JSON parser
(nesting at most a depth, checked before parsing; no recursion). The wire types check the fields."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from memcli.wire import MAX_REQUEST_DEPTH, BadRequest, TooLarge

JSON_LIMIT = 4 * 1024**2  # request bodies other than inject uploads


def bounded_json(raw: bytes, depth: int, what: str, constants: bool = False) -> Any:
    """`raw` parsed by memcli's one bounded JSON parser; BadRequest naming `what` otherwise."""
    from memcli.base.jsonbound import JsonRefused, load_json

    try:
        return load_json(raw, depth, constants)
    except JsonRefused as err:
        raise BadRequest(f"{err.key if err.key else what} {err.reason}") from None


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise TooLarge(f"the request body is {int(length)} bytes; the limit is {limit}")
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise TooLarge(f"the request body is over the limit of {limit} bytes")
    return bytes(body)


async def read_json(request: Request) -> dict:
    """The request's JSON object, read within `JSON_LIMIT` bytes and parsed by the bounded parser
    (on a worker thread: a 4 MB body never holds up the event loop)."""
    body = await read_body(request, JSON_LIMIT)
    data = await asyncio.to_thread(bounded_json, body, MAX_REQUEST_DEPTH, "the request body", True)
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def check_pool_name(name: str) -> None:
    """The store's rules for a pool's name (InvalidPoolName: a 400)."""
    from memcli.store import validate_name

    validate_name(name)
