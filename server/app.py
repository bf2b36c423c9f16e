"""Assembles the running server: engine, gRPC servicer, health, reflection, metrics, and HTTP when asked.

`EmbedServer` is what `python -m server` runs and what the tests start
in-process on a free loopback port. The HTTP/JSON transport (server/http/,
on with `--http-port`) runs on the same event loop and shares the engine,
the call bounds and the receive slots with gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.callers import CallLimitInterceptor, CallLimits
from server.config import Settings
from server.errors import StartupError
from server.grpc_service import SERVICE_NAME, EmbedServicer, add_to_server
from server.http.app import HttpServer
from server.interceptors import ApiKeyInterceptor, RequestIdInterceptor
from server.metrics import Metrics
from server.model import ModelRunner
from server.proxies import Proxies
from server.receive_slots import ReceiveSlots
from server.runtime import freeze_startup_objects
from server.service import EmbedService

log = logging.getLogger(__name__)

_IDENTITY_ONLY = 1  # grpc.compression_enabled_algorithms_bitset: no gzip/deflate requests


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The server's gRPC channel arguments, each a bound on what a caller can make it do.

    Compressed requests are refused (UNIMPLEMENTED): a 130 KB gzip body can
    inflate to the whole message limit, and gRPC inflates before any check of
    ours. SO_REUSEPORT is off, so a second server on a busy port fails to start
    instead of silently taking half the connections. BDP probing is off so that
    a body nobody reads yet stays in its 64 KB flow-control window (see
    EmbedServicer.Embed). gRPC's own queue of calls not yet handed to Python
    cancels calls past 1,000 (CANCELLED, which clients do not retry); it is
    raised well past `max_concurrent_rpcs`, whose refusal is RESOURCE_EXHAUSTED
    (server/callers.py counts calls, per caller and in all, health not included).
    """
    pending = 16 * settings.max_concurrent_rpcs
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_request_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ("grpc.compression_enabled_algorithms_bitset", _IDENTITY_ONLY),
        ("grpc.server_handshake_timeout_ms", round(1000 * settings.header_timeout_s)),
    ]


def check_port_free(host: str, port: int, what: str) -> None:
    """Fails the start at once, before the model loads, when a port is taken (0 = any port)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"{what} port {port} is in use ({exc.strerror})") from None


class EmbedServer:
    """The engine behind a gRPC server (and an HTTP one); start it, serve, then stop it with a grace period."""

    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.service = EmbedService(settings, runner, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._health_updates: set[asyncio.Future[None]] = set()
        interceptors: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor()]
        if settings.api_key:
            interceptors.append(ApiKeyInterceptor(settings.api_key))
        self.calls = CallLimits(settings.max_calls_per_caller, settings.max_concurrent_rpcs)
        proxies = Proxies(settings.trusted_proxies)
        interceptors.append(CallLimitInterceptor(self.calls, self.metrics.refused.labels("calls").inc, proxies))
        self._server = grpc.aio.server(interceptors=interceptors, options=grpc_options(settings))
        receive_refused = self.metrics.refused.labels("receive").inc
        self.slots = ReceiveSlots(settings.max_receiving_requests, settings.max_receiving_per_caller, receive_refused)
        self._servicer = EmbedServicer(self.service, self.slots)
        self._http = (
            None if settings.http_port is None else HttpServer(settings, self.service, self.calls, self.slots, proxies)
        )
        add_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )

    async def start(self) -> int:
        """Listens (health NOT_SERVING), warms the model up, then reports SERVING; returns the gRPC port."""
        try:
            self.port = self._listen()
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise StartupError(f"port {self.settings.port} is in use (cannot listen on {self.settings.address})")
        try:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        except OSError as exc:
            raise StartupError(f"metrics port {self.settings.metrics_port} is in use ({exc.strerror})") from None
        self.service.add_health_listener(self._publish_health)
        await self._server.start()
        log.info("gRPC listening on %s:%d%s", self.settings.host, self.port, " (TLS)" if self.settings.tls_cert else "")
        if self._http is not None:
            self.http_port = await self._http.start()
        await self.service.start()
        return self.port

    def _listen(self) -> int:
        if self.settings.tls_cert and self.settings.tls_key:
            with open(self.settings.tls_key, "rb") as key, open(self.settings.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            return self._server.add_secure_port(self.settings.address, credentials)
        return self._server.add_insecure_port(self.settings.address)

    async def stop(self, grace: float | None = None) -> None:
        """Drains: new work gets UNAVAILABLE (HTTP 503), work in flight finishes within `grace` seconds.

        Streams end UNAVAILABLE once their answers in flight are sent: an idle
        stream would otherwise hold the drain for the whole grace period.
        """
        grace = self.settings.grace_s if grace is None else grace
        self.service.begin_drain()
        self._servicer.drain()
        await self.health.enter_graceful_shutdown()
        stops = [self._server.stop(grace)]
        if self._http is not None:
            stops.append(self._http.stop(grace))
        await asyncio.gather(*stops)
        await self.service.close()
        self.metrics.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    def _publish_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            task = asyncio.ensure_future(self.health.set(name, status))
            self._health_updates.add(task)
            task.add_done_callback(self._health_updates.discard)


async def serve(settings: Settings) -> None:
    """Loads the model, serves until SIGTERM or SIGINT, then drains and returns."""
    check_port_free(settings.host, settings.port, "gRPC")
    if settings.http_port is not None:
        check_port_free(settings.host, settings.http_port, "HTTP")
    if settings.metrics_port >= 0:
        check_port_free(settings.host, settings.metrics_port, "metrics")
    runner = await asyncio.to_thread(ModelRunner.load, settings)
    server = EmbedServer(settings, runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.debug("%d objects of the start frozen out of garbage collection", freeze_startup_objects())
    await server.start()
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", settings.grace_s)
    await server.stop()
    log.info("stopped")
