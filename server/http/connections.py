"""The HTTP port's connections: a cap per address, and a time limit on request headers.

aiohttp keeps a connection whose request headers never complete for its
keep-alive time (about an hour by default): 300 half-sent requests held 300
file descriptors and their buffered header lines. Here each connection is
wrapped (`Connections` is the listening socket's protocol factory):

- one address holds at most `max_connections_per_address` connections
  (trusted proxies are not counted); one more is answered 429 and closed;
- once a connection has sent any byte of a request, its headers must be
  complete within `header_timeout_s` (the `Observer` middleware marks the
  request as begun), or it is answered 408 and closed; a TLS handshake has
  the same time;
- an idle connection is closed after `keepalive_timeout_s` (aiohttp's own
  keep-alive, set by the caller of `Connections`).

Header lines and their number are bounded by aiohttp itself (8190 bytes a
line, 128 headers: a longer request is answered 400).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

from server.proxies import Proxies, normalized_address

log = logging.getLogger(__name__)

_LINGER_S = 1.0  # a refused connection's unread request is drained this long before the socket closes


def raw_answer(status: int, reason: str, body: bytes, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for a connection that never reached a handler."""
    headers = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
               "Connection: close"]  # fmt: skip
    if retry_after:
        headers.append("Retry-After: 1")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class Connections:
    """The protocol factory of the HTTP port: wraps each of aiohttp's connections in a `_Connection`."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        per_address: int,
        header_timeout_s: float,
        proxies: Proxies,
        refusals: tuple[bytes, bytes],
    ) -> None:
        """`refusals`: the whole answers to a connection over its address's cap, and to late headers."""
        self._factory = factory
        self.per_address = per_address
        self.header_timeout_s = header_timeout_s
        self._proxies = proxies
        self.too_many, self.too_slow = refusals
        self.by_address: collections.Counter[str] = collections.Counter()

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self, self._factory())

    def admit(self, address: str) -> bool:
        """Counts a new connection from `address`; False (nothing counted) when it is over the cap."""
        if self._proxies.trusts(address):
            return True
        if self.by_address[address] >= self.per_address:
            return False
        self.by_address[address] += 1
        return True

    def leave(self, address: str) -> None:
        if address in self.by_address:
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


def request_begun(request: web.BaseRequest, begun: bool) -> None:
    """Marks the connection of `request` as inside a request (its headers are complete) or out of one."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, _Connection):
        protocol.in_request(begun)


class _Connection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, the cap and the header time limit around it."""

    def __init__(self, connections: Connections, inner: asyncio.Protocol) -> None:
        self._connections = connections
        self._inner = inner
        self._address: str | None = None  # set once admitted: counted against its address's cap
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._refused = False  # answered by this wrapper: what the caller still sends is dropped
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        address = normalized_address(str(peer[0])) if isinstance(peer, tuple) and peer else "unknown"
        if not self._connections.admit(address):
            log.info("HTTP connection from %s refused: %d open, its bound", address, self._connections.per_address)
            self._refuse(self._connections.too_many)
            return
        self._address = address
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._inner.data_received(data)
        if not self._busy and self._headers_due is None:
            loop = asyncio.get_running_loop()
            self._headers_due = loop.call_later(self._connections.header_timeout_s, self._headers_late)

    def eof_received(self) -> bool | None:
        return None if self._address is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None
        if self._address is None:
            return
        self._connections.leave(self._address)
        self._address = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._address is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._address is not None:
            self._inner.resume_writing()

    def in_request(self, begun: bool) -> None:
        self._busy = begun
        if begun:
            self._cancel_timer()

    def _headers_late(self) -> None:
        self._headers_due = None
        if self._busy or self._transport is None or self._transport.is_closing():
            return
        log.info("HTTP connection from %s closed: request headers not complete within %g s (header_timeout_s)",
                 self._address, self._connections.header_timeout_s)  # fmt: skip
        self._refuse(self._connections.too_slow)

    def _refuse(self, answer: bytes) -> None:
        """Answers `answer` and closes; the request's unread bytes are drained a moment first, so that
        the caller reads the answer rather than a reset."""
        self._refused = True
        transport = self._transport
        assert transport is not None
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
        else:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None


class GuardedSite(web.BaseSite):
    """aiohttp's `SockSite`, with `Connections` between the listening socket and aiohttp, and the TLS
    handshake bounded by the header time limit."""

    __slots__ = ("_connections", "_name", "_sock")

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, connections: Connections, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._connections = connections
        host, port = sock.getsockname()[:2]
        self._name = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        handshake = self._connections.header_timeout_s if self._ssl_context else None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=handshake,
        )  # fmt: skip
