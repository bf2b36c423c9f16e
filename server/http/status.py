"""HTTP statuses: engine errors to statuses in one table, and every error answer's JSON shape.

An error answer is `{"error": {"code": "<CODE>", "message": "<one line>"}}`:
the code is the gRPC name that RunPod's jobs use too (server/json_jobs.py),
the message names the problem and the fix. On OpenAI's route (`OPENAI_PATHS`)
it has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
the same code and message, so that OpenAI's clients read every refusal there,
the middlewares' too. Engine errors are mapped here and
nowhere else (`STATUS_OF`); the transport's own refusals (a wrong key, a body
too large, an unknown route) are an `HttpError` that carries its status.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server import errors
from server.json_jobs import code_of

CLIENT_CLOSED = 499
"""The caller left before its answer (nginx's number; never sent, only counted)."""

STATUS_OF: dict[type[errors.EmbedError], int] = {
    errors.InvalidImage: 422,
    errors.InvalidRequest: 400,
    errors.Overloaded: 429,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
    errors.Cancelled: CLIENT_CLOSED,
    errors.InferenceFailed: 500,
    errors.Internal: 500,
}

INTERNAL_MESSAGE = "the server failed on this request; the details are in its log"
MESSAGE_CHARS = 500
"""The longest error message answered or logged: a message never carries a payload back."""
RETRY_STATUSES = (429, 503)
"""Answered with Retry-After: the wait when it is known, else 1 s."""

OPENAI_PATHS = frozenset({"/v1/embeddings"})
"""Paths whose error answers take OpenAI's shape (server/http/openai.py)."""


class HttpError(Exception):
    """A refusal of the HTTP transport itself, with its status, code name, message and headers, and the
    request field at fault when there is one (`param`, as `errors.InvalidRequest` has it)."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.param = param


def status_of(exc: errors.EmbedError) -> int:
    return STATUS_OF.get(type(exc), 500)


def refusal(exc: errors.EmbedError, prefix: str = "") -> HttpError:
    """The HTTP answer to an engine error; an `Overloaded` that knows when to come back says so in Retry-After."""
    headers = {}
    if isinstance(exc, errors.Overloaded) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    param = exc.param if isinstance(exc, errors.InvalidRequest) else None
    return HttpError(status_of(exc), code_of(exc), f"{prefix}{exc}", headers, param)


def to_json(body: Any) -> bytes:
    """`body` as compact JSON (the embeddings of a request are most of the bytes: no spaces)."""
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=to_json(body), status=status, headers=headers, content_type="application/json")


def bounded(message: str) -> str:
    """`message`, cut to `MESSAGE_CHARS`."""
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."


def error_body(code: str, message: str) -> bytes:
    """The `/v1/embed` shape of an error answer (and of the connection's own refusals)."""
    return to_json({"error": {"code": code, "message": bounded(message)}})


def openai_type(status: int) -> str:
    """OpenAI's error `type` for a status, among those OpenAI's API answers: `server_error` for its own
    failures (500, 503), `requests` for its limit on requests (429), `invalid_request_error` for every
    mistake of the caller's (400, 401 for a wrong key, 404 for an unknown route)."""
    if status >= 500:
        return "server_error"
    return "requests" if status == 429 else "invalid_request_error"


def error_response(error: HttpError, path: str) -> web.Response:
    """The JSON answer to a refused request for `path`, in its route's shape; 429 and 503 say when to retry."""
    headers = dict(error.headers)
    if error.status in RETRY_STATUSES:
        headers.setdefault("Retry-After", "1")
    if path in OPENAI_PATHS:
        error_type, message = openai_type(error.status), bounded(error.message)
        body = to_json({"error": {"message": message, "type": error_type, "param": error.param, "code": error.code}})
    else:
        body = error_body(error.code, error.message)
    return web.Response(body=body, status=error.status, headers=headers, content_type="application/json")
