"""Calls in progress, per caller: one caller cannot lock the others out (gRPC and HTTP calls together).

gRPC's own `maximum_concurrent_rpcs` is one count for the whole server, idle
streams and health checks included: a client that opened thousands of
streams and sent nothing made every other caller's calls, and the kubelet's
health checks, fail. Here each caller (its address, or the one a trusted
proxy names: server/proxies.py) has a bound of its own under the server-wide
one, and health checks are not counted at all (`CallLimitInterceptor`). The
caller of the call in progress is in `CALLER`, for the bounds further in
(the receive slots' share per caller).
"""

from __future__ import annotations

import collections
import contextvars
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.interceptors import HEALTH_METHODS, HandlerFn, rewrap, write_out
from server.proxies import Proxies, normalized_address

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="unknown")
"""The caller of the call in progress, as the call bounds counted it."""
FORWARDED_KEY = "x-forwarded-for"


def caller_of(peer: str) -> str:
    """The caller a gRPC peer string names: its address without the port.

    `ipv4:10.0.0.5:51234` -> `10.0.0.5`; `ipv6:[::1]:5000` -> `::1` (also
    percent-encoded); an IPv4 address mapped into IPv6 is the IPv4 one; any
    other kind of peer (`unix:...`) is itself.
    """
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return normalized_address(rest[1 : rest.find("]")] if rest.startswith("[") else rest.rpartition(":")[0])
    return peer


class CallLimits:
    """Counts calls in progress per caller and in all, against a bound for each."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self.open = 0
        self._by_caller: collections.Counter[str] = collections.Counter()

    def enter(self, caller: str) -> str | None:
        """Counts a new call of `caller`; returns None, or why it is refused (nothing counted then)."""
        if self._by_caller[caller] >= self.per_caller:
            return (
                f"too many calls from {caller} at once ({self.per_caller} is the bound per caller, idle streams "
                "included): send more requests per stream or per call instead of more calls, or retry with backoff"
            )
        if self.open >= self.total:
            return f"server is handling {self.total} calls, its bound; retry with backoff or on another server"
        self._by_caller[caller] += 1
        self.open += 1
        return None

    def leave(self, caller: str) -> None:
        self.open -= 1
        self._by_caller[caller] -= 1
        if self._by_caller[caller] <= 0:
            del self._by_caller[caller]

    def calls_of(self, caller: str) -> int:
        return self._by_caller[caller]


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call RESOURCE_EXHAUSTED when its caller, or the server, has too many open; health is exempt."""

    def __init__(
        self, limits: CallLimits, on_refused: Callable[[], None] = lambda: None, proxies: Proxies | None = None
    ) -> None:
        self._limits = limits
        self._on_refused = on_refused
        self._proxies = proxies or Proxies()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_METHODS):
            return handler
        limits = self._limits
        forwarded = [str(value) for key, value in details.invocation_metadata or () if key == FORWARDED_KEY]

        async def enter(context: grpc.aio.ServicerContext) -> str:
            caller = self._proxies.caller(caller_of(context.peer()), forwarded)
            CALLER.set(caller)
            refusal = limits.enter(caller)
            if refusal is not None:
                self._on_refused()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return caller

        def wrap(behaviour: HandlerFn, streams_out: bool) -> HandlerFn:
            if streams_out:

                async def limited_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                    caller = await enter(context)
                    try:
                        await write_out(behaviour(request, context), context)
                    finally:
                        limits.leave(caller)

                return limited_stream

            async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = await enter(context)
                try:
                    return await behaviour(request, context)
                finally:
                    limits.leave(caller)

            return limited

        return rewrap(handler, wrap)
