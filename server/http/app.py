"""The HTTP server: aiohttp on the gRPC server's event loop, over the same engine and the same bounds.

`EmbedServer` (server/app.py) starts it when `--http-port` is set. It shares
with gRPC the engine (`EmbedService`: admission, deadlines, batching), the
call bounds (one `CallLimits`: per caller and in all), the receive slots
(one semaphore: bodies read at once), the API key, the TLS files and the
metrics. On a drain it keeps listening, so that new work is answered 503
(and /health 503) while the requests in progress finish within the grace
period, then it closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from aiohttp import web

from server.callers import CallLimits
from server.config import Settings
from server.errors import StartupError
from server.http.bodies import BodyReader
from server.http.guards import Guard, Observer
from server.http.routes import Routes
from server.service import EmbedService

log = logging.getLogger(__name__)

_CLOSE_S = 1.0  # after the grace period: how long aiohttp gives the handlers still running before cancelling them


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
        self, settings: Settings, service: EmbedService, calls: CallLimits, receiving: asyncio.Semaphore
    ) -> None:
        self.settings = settings
        self.port: int | None = None
        self._observer = Observer(service.metrics)
        guard = Guard(settings.api_key, calls, service.metrics.refused.labels("calls").inc)
        self._app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[self._observer, guard])
        bodies = BodyReader(settings.max_request_bytes, receiving, settings.receive_timeout_s)
        Routes(service, bodies).add_to(self._app)
        self._runner: web.AppRunner | None = None

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
                self._app, access_log=None, handler_cancellation=True, auto_decompress=False, shutdown_timeout=_CLOSE_S
            )
            await self._runner.setup()
            await web.SockSite(self._runner, sock, ssl_context=context).start()
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        log.info("HTTP listening on %s:%d%s", self.settings.host, self.port, " (TLS)" if context else "")
        return self.port

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
