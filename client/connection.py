"""How the client reaches servers: channel options, TLS, the API key, and the retry policy.

One channel per server address. Each request (one batch of images) goes to the
next channel in turn, so one job -- even one streaming job -- spreads across
every address given. A single `dns:///name:port` target gets gRPC's own
`round_robin` load balancing over the addresses the name resolves to.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from client.errors import over_message_limit
from client.window import WindowListener

DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
"""The server's default `max_request_bytes`; the channel's send and receive limit."""

RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE.value[0],
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
})  # fmt: skip
"""Whole requests refused with these codes are tried again: the server is away, draining, full, or
too far behind to answer in time; so are images answered DEADLINE_EXCEEDED (they waited too long in its queue)."""

BUSY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]})
"""Refusals and answers that say the server has more work than it can do in time: a job's window shrinks."""

ITEM_RETRY_CODES = frozenset({grpc.StatusCode.INTERNAL.value[0]})
"""An image that failed with these codes is sent again (`RetryPolicy.item_retries` times): the forward
pass of its batch failed, which says nothing about the image. Every other per-image error is final."""


@dataclass(frozen=True)
class Retrying:
    """A refused request about to be tried again, as told to `RetryPolicy.on_retry`."""

    code: int
    message: str
    attempt: int  # the try that was refused, from 0
    waited_s: float  # since the request's first try
    pause_s: float  # before the next try
    budget_s: float | None  # `retry_for_s`: how long it keeps trying; None when tries are counted


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter for requests refused with a retryable code.

    Try `n` (from 0) waits a random time between half and all of
    `min(max_backoff_s, initial_backoff_s * multiplier**n)` before the next;
    after `max_attempts` tries the request fails with the last error.

    `retry_for_s` budgets time instead of tries: a request is tried again, however
    many times, until that many seconds have passed (what a long job wants, so
    that a server restarting for a few seconds fails nothing). In a job, both
    budgets count from the job's last answer: while the server answers some of
    its requests, the others wait their turn.

    `item_retries`: how many more times an image that failed with INTERNAL (its
    batch's forward pass failed) is sent. `on_retry` is called before each
    pause of a refused request (from the client's own thread), so a caller can
    say what it is waiting for; `on_window` with `(size, most)` when the number
    of requests a job keeps in flight changes (client/window.py).
    """

    max_attempts: int = 8
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retry_for_s: float | None = None
    item_retries: int = 2
    on_retry: Callable[[Retrying], None] | None = field(default=None, compare=False, repr=False)
    on_window: WindowListener | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.retry_for_s is not None and self.retry_for_s < 0:
            raise ValueError("retry_for_s must not be negative")
        if self.item_retries < 0:
            raise ValueError("item_retries must not be negative")

    def pause(self, code: int, message: str, attempt: int, started: float) -> float:
        """The backoff after refused try `attempt` of a request first tried at `started`, told to `on_retry`."""
        pause = self.backoff(attempt)
        if self.on_retry is not None:
            waited = time.monotonic() - started
            self.on_retry(Retrying(code, message, attempt, waited, pause, self.retry_for_s))
        return pause

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return random.uniform(cap / 2, cap)

    def may_try_again(self, attempt: int, elapsed_s: float = 0.0) -> bool:
        """Whether the budget (tries, or seconds since the first try) allows another try after `attempt`."""
        if self.retry_for_s is not None:
            return elapsed_s < self.retry_for_s
        return attempt + 1 < self.max_attempts

    def should_retry(self, code: int, message: str, attempt: int, elapsed_s: float = 0.0) -> bool:
        """Retry overload and unavailability, but not a message over the size limit (it would fail again)."""
        if not self.may_try_again(attempt, elapsed_s) or code not in RETRYABLE_CODES:
            return False
        return not over_message_limit(message)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ConnectionOptions:
    """Everything about reaching the servers that is not about one call.

    `targets`: one or more `host:port` (or any gRPC target, e.g. `dns:///embed.internal:50051`).
    `tls`: use TLS with the system's root certificates; `tls_ca`: a PEM root certificate file
    (implies TLS). `api_key`: sent as `authorization: Bearer <key>` on every call.
    """

    targets: tuple[str, ...]
    tls: bool = False
    tls_ca: Path | None = None
    api_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    channel_options: tuple[tuple[str, int | str], ...] = ()

    @classmethod
    def build(
        cls,
        target: str | Sequence[str],
        *,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> ConnectionOptions:
        targets = (target,) if isinstance(target, str) else tuple(target)
        if not targets or not all(targets):
            raise ValueError("give at least one server address, e.g. 'localhost:50051'")
        return cls(
            targets=targets,
            tls=tls or tls_ca is not None,
            tls_ca=Path(tls_ca) if tls_ca is not None else None,
            api_key=api_key,
            max_message_bytes=max_message_bytes,
            retry=retry or RetryPolicy(),
            channel_options=tuple(channel_options),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def grpc_options(self, target: str) -> list[tuple[str, int | str]]:
        """Message limits, round-robin for DNS targets, and reconnect backoff kept within the retry
        policy's (gRPC's own grows to 2 minutes, so a server that comes back would go unnoticed)."""
        options: dict[str, int | str] = {
            "grpc.max_send_message_length": self.max_message_bytes,
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.initial_reconnect_backoff_ms": int(1000 * self.retry.initial_backoff_s),
            "grpc.min_reconnect_backoff_ms": int(1000 * self.retry.initial_backoff_s),
            "grpc.max_reconnect_backoff_ms": int(1000 * self.retry.max_backoff_s),
        }
        if target.startswith("dns:"):
            options["grpc.lb_policy_name"] = "round_robin"
        options.update(self.channel_options)
        return list(options.items())

    def open_channels(self) -> list[grpc.aio.Channel]:
        """One asyncio channel per target; call inside the event loop that will use them."""
        credentials = None
        if self.tls:
            root = self.tls_ca.read_bytes() if self.tls_ca is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
        channels = []
        for target in self.targets:
            if credentials is None:
                channels.append(grpc.aio.insecure_channel(target, options=self.grpc_options(target)))
            else:
                channels.append(grpc.aio.secure_channel(target, credentials, options=self.grpc_options(target)))
        return channels
