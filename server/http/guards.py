"""What every HTTP request passes through before and after its route: ids, errors, metrics, key, call bounds.

`Observer` (outermost) gives the request an id (the caller's X-Request-Id, or
a new one; logged and sent back), turns every failure into the JSON error
shape of server/http/status.py, counts the answer in
`dinov2_requests_total{method="HTTP <route>", code="<status>"}` and counts the
requests in progress, which a drain waits for. `Guard` then asks for the API
key and counts the call against the bounds it shares with gRPC (per caller
and in all, server/callers.py). Health routes pass both untouched: load
balancers and kubelets probe without the key and are never refused.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from server import errors
from server.callers import CALLER, CallLimits
from server.http.connections import request_begun
from server.http.status import CLIENT_CLOSED, INTERNAL_MESSAGE, HttpError, bounded, error_response, refusal
from server.json_jobs import shown
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.proxies import Proxies, normalized_address

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/health", "/healthz"})
"""Neither keyed, nor counted against the call bounds, nor in the request metrics."""
REQUEST_ID_HEADER = "X-Request-Id"


def _route(request: web.Request) -> str:
    """The metrics label of a request's route: its path template, or "unknown" (never the caller's path)."""
    resource = request.match_info.route.resource
    return "unknown" if resource is None or request.match_info.http_exception else resource.canonical


def _aiohttp_error(request: web.Request, exc: web.HTTPException) -> HttpError:
    """aiohttp's own refusals as JSON: 404 naming the routes there are, 405 the methods a route takes."""
    routes = sorted({f"{r.method} {r.resource.canonical}" for r in request.app.router.routes()
                     if r.resource is not None and r.method != "HEAD"})  # fmt: skip
    said = f"{request.method} {shown(request.path)}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods - {"HEAD"}))
        return HttpError(405, "UNIMPLEMENTED", f"{said} is not allowed: use {allowed}", {"Allow": exc.headers["Allow"]})
    if isinstance(exc, web.HTTPNotFound):
        return HttpError(404, "NOT_FOUND", f"no route {said}; the routes are {', '.join(routes)}")
    return HttpError(exc.status, "INVALID_ARGUMENT", f"{exc.reason}: {exc.text or ''}".strip(": "))


class Observer:
    """The outermost middleware: request id, JSON errors, metrics, and the count of requests in progress."""

    __middleware_version__ = 1  # aiohttp's mark of a new-style middleware

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.in_progress = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_begun(request, True)
        REQUEST_ID.set(request.headers.get(REQUEST_ID_HEADER, "")[:64] or uuid.uuid4().hex[:16])
        route = None if request.path in OPEN_PATHS else f"HTTP {_route(request)}"
        self.in_progress += 1
        self.idle.clear()
        try:
            response = await self._answer(request, handler)
        except asyncio.CancelledError:  # the caller left (handler cancellation): nobody to answer
            if route is not None:
                self._metrics.requests.labels(route, str(CLIENT_CLOSED)).inc()
            raise
        finally:
            request_begun(request, False)
            self.in_progress -= 1
            if self.in_progress == 0:
                self.idle.set()
        if route is not None:
            self._metrics.requests.labels(route, str(response.status)).inc()
        return response

    @staticmethod
    async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        """The route's answer, or the JSON error it failed with (made inside `except`: nothing keeps the
        exception, whose traceback holds the request's frames and image bytes)."""
        try:
            return await handler(request)
        except ConnectionResetError:  # the caller left while its body was read: an answer nobody receives
            return web.Response(status=CLIENT_CLOSED)
        except HttpError as exc:
            refused = HttpError(exc.status, exc.code, exc.message, exc.headers, exc.param)
        except errors.EmbedError as exc:
            refused = refusal(exc)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, a body over client_max_size
            refused = _aiohttp_error(request, exc)
        except Exception:
            log.exception("%s %s failed", request.method, request.path[:100])
            return error_response(HttpError(500, "INTERNAL", INTERNAL_MESSAGE), request.path)
        log.info("request refused: %d %s: %s", refused.status, refused.code, bounded(refused.message))
        return error_response(refused, request.path)

    @staticmethod
    async def stamp(request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Every answer carries the request id (aiohttp's on_response_prepare: also answers written by a route)."""
        response.headers[REQUEST_ID_HEADER] = REQUEST_ID.get()


class Guard:
    """The inner middleware: the API key (when set), then the call bounds shared with gRPC."""

    __middleware_version__ = 1

    def __init__(
        self, api_key: str | None, calls: CallLimits, on_refused: Callable[[], None], proxies: Proxies
    ) -> None:
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._calls = calls
        self._on_refused = on_refused
        self._proxies = proxies

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.match_info.http_exception is not None:
            return await handler(request)
        self._authorize(request)
        forwarded = request.headers.getall("X-Forwarded-For", [])
        caller = self._proxies.caller(normalized_address(request.remote or "unknown"), forwarded)
        CALLER.set(caller)
        refused = self._calls.enter(caller)
        if refused is not None:
            self._on_refused()
            raise HttpError(429, "RESOURCE_EXHAUSTED", refused)
        try:
            return await handler(request)
        finally:
            self._calls.leave(caller)

    def _authorize(self, request: web.Request) -> None:
        """Exactly one `Authorization: Bearer <key>`, compared in constant time; two are refused whatever
        they hold (which one counts would be up to each proxy on the way)."""
        if self._expected is None:
            return
        given = request.headers.getall("Authorization", [])  # aiohttp decodes bytes that are not UTF-8 as surrogates
        if len(given) == 1 and hmac.compare_digest(given[0].encode("utf-8", "surrogateescape"), self._expected):
            return
        if len(given) > 1:
            message = f"{len(given)} Authorization headers: send exactly one 'Authorization: Bearer <key>'"
        else:
            message = "missing or wrong API key: send exactly one header 'Authorization: Bearer <key>'"
        raise HttpError(401, "UNAUTHENTICATED", message, {"WWW-Authenticate": "Bearer"})
