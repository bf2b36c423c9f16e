"""The HTTP server: aiohttp on the gRPC server's event loop, over the same engine and the same bounds.

`EmbedServer` (server/app.py) starts it when `--http-port` is set. It shares
with gRPC the engine (`EmbedService`: admission, deadlines, batching), the
call bounds (one `CallLimits`: per caller and in all), the receive slots
(bodies read at once, per caller and in all), the trusted proxies, the API
key, the TLS files and the metrics. Its connections have bounds of their own
(server/http/connections.py: per address, header and keep-alive times). On a
drain it keeps listening, so that new work is answered 503 (and /health 503)
while the requests in progress finish within the grace period, then it closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.callers import CallLimits
from server.config import Settings
from server.errors import StartupError
from server.http.bodies import FORM_FIELDS
from server.http.connections import Connections, GuardedSite, raw_answer
from server.http.guards import Guard, Observer
from server.http.receive import BodyReader, Pace
from server.http.routes import Routes
from server.http.status import error_body
from server.proxies import Proxies
from server.receive_slots import ReceiveSlots
from server.service import EmbedService

log = logging.getLogger(__name__)

_CLOSE_S = 1.0  # after the grace period: how long aiohttp gives the handlers still running before cancelling them


class _ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line over 8190 bytes, a bad method) with a traceback
    at ERROR: a client's mistake, made here one INFO line without the traceback (the caller got its 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "HTTP request refused (%d): %s", (exc.code, str(exc.message)[:200])
            record.exc_info, record.levelno, record.levelname = None, logging.INFO, "INFO"
        return True


def quiet_client_mistakes() -> None:
    """Installs `_ClientMistakes` on aiohttp's server logger, once."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientMistakes) for f in logger.filters):
        logger.addFilter(_ClientMistakes())


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = a free port), or `StartupError` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a second server fails to start
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"HTTP port {port} is in use (cannot listen on {host}:{port}: {exc.strerror})") from None
    sock.setblocking(False)
    return sock


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class HttpServer:
    """The HTTP/JSON transport of one engine; `start` listens, `stop(grace)` drains and closes."""

    def __init__(
        self, settings: Settings, service: EmbedService, calls: CallLimits, slots: ReceiveSlots, proxies: Proxies
    ) -> None:
        self.settings = settings
        self.port: int | None = None
        self._proxies = proxies
        quiet_client_mistakes()
        self._observer = Observer(service.metrics)
        guard = Guard(settings.api_key, calls, service.metrics.refused.labels("calls").inc, proxies)
        self._app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[self._observer, guard])
        self._app.on_response_prepare.append(Observer.stamp)
        pace = Pace(settings.receive_timeout_s, settings.min_receive_rate, settings.receive_grace_s)
        max_parts = settings.max_images_per_request + len(FORM_FIELDS)
        bodies = BodyReader(settings.max_request_bytes, slots, pace, settings.max_queue_s, FORM_FIELDS, max_parts)
        bodies.on_body = service.body_received
        Routes(service, bodies).add_to(self._app)
        self._runner: web.AppRunner | None = None
        self.connections: Connections | None = None  # once started

    async def start(self) -> int:
        """Listens on `settings.host:http_port`; returns the port (the one picked when it is 0)."""
        assert self.settings.http_port is not None
        sock = listening_socket(self.settings.host, self.settings.http_port)
        cert, key = self.settings.tls_cert, self.settings.tls_key
        try:
            context = tls_context(cert, key) if cert and key else None
            # The handler of a caller that leaves is cancelled, and with it the request's work in the engine.
            # Bodies arrive as sent: a compressed one is refused, never inflated.
            self._runner = web.AppRunner(
                self._app, access_log=None, handler_cancellation=True, auto_decompress=False,
                shutdown_timeout=_CLOSE_S, keepalive_timeout=self.settings.keepalive_timeout_s,
            )  # fmt: skip
            await self._runner.setup()
            self.connections = self._connections()
            await GuardedSite(self._runner, sock, self.connections, context).start()
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        log.info("HTTP listening on %s:%d%s", self.settings.host, self.port, " (TLS)" if context else "")
        return self.port

    def _connections(self) -> Connections:
        settings = self.settings
        assert self._runner is not None and self._runner.server is not None
        too_many = raw_answer(
            429,
            "Too Many Requests",
            error_body(
                "RESOURCE_EXHAUSTED",
                (
                    f"too many connections from this address at once ({settings.max_connections_per_address}, "
                    "max_connections_per_address): reuse connections (keep-alive) or retry with backoff"
                ),
            ),
            retry_after=True,
        )
        too_slow = raw_answer(408, "Request Timeout", error_body("DEADLINE_EXCEEDED", (
            f"request headers not complete within {settings.header_timeout_s:g} s of their first byte "
            "(header_timeout_s)")))  # fmt: skip
        return Connections(self._runner.server, settings.max_connections_per_address, settings.header_timeout_s,
                           self._proxies, (too_many, too_slow))  # fmt: skip

    async def stop(self, grace: float) -> None:
        """Waits up to `grace` seconds for the requests in progress (new ones meanwhile are answered 503 by the
        draining engine), then closes the port and every connection."""
        if self._runner is None:
            return
        try:
            await asyncio.wait_for(self._observer.idle.wait(), grace)
        except TimeoutError:
            log.warning("%d HTTP requests still in progress after %.0f s: cancelled", self._observer.in_progress, grace)
        await self._runner.cleanup()
        self._runner = None
