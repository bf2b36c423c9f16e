"""A second caller address on one machine, without IPv6: 127.0.0.2, through a relay.

Linux routes all of 127/8 to loopback, but a connection to 127.0.0.2 still
comes from 127.0.0.1 (the route's preferred source), and a gRPC client cannot
bind its source address. So a second caller's channel goes to a `Relay`, which
dials the server from 127.0.0.2 and copies bytes both ways: the server sees
that caller as 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

SECOND_CALLER = "127.0.0.2"
_CHUNK = 1 << 16


class Relay:
    """Listens on 127.0.0.1 (a free port, `address` once started) and relays each connection
    to 127.0.0.1:`port`, dialled from `source`. Runs on the event loop that starts it."""

    def __init__(self, port: int, source: str = SECOND_CALLER) -> None:
        self._port = port
        self._source = source
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()  # one per connection
        self._copies: set[asyncio.Task[None]] = set()  # two per connection
        self._closing = False
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def close(self) -> None:
        """Stops listening and ends every relayed connection (the callers see it closed)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for copy in self._copies:
            copy.cancel()  # not the relays themselves: asyncio logs a connection handler cancelled
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()  # (from Python 3.12 it waits for the connections too)

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def _relay(self, caller_reader: asyncio.StreamReader, caller_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        writers = [caller_writer]
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self._port, local_addr=(self._source, 0)
            )
            writers.append(server_writer)
            if self._closing:  # closed while this one connected: no copies that close() would not see
                return
            copies = {
                asyncio.create_task(_copy(caller_reader, server_writer)),
                asyncio.create_task(_copy(server_reader, caller_writer)),
            }
            self._copies |= copies
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)  # either side closed: end both
            for copy in copies:
                copy.cancel()
            await asyncio.gather(*copies, return_exceptions=True)
            self._copies -= copies
        except OSError:
            pass  # the server is not there: the caller sees its connection closed
        finally:
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._relays.discard(task)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
