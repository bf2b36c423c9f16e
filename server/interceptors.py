"""gRPC server interceptors: request ids for logs, and the optional API key.

Both wrap the method handler once per RPC, so the servicer stays unaware of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# What a send on a call that gRPC core has already ended raises (grpc.aio exports only its base class,
# InternalError, which covers more than this).
from grpc._cython.cygrpc import ExecuteBatchError

from server.logs import REQUEST_ID

HandlerFn = Callable[..., Any]

HEALTH_METHODS = ("/grpc.health.v1.Health/",)
"""Open to every caller: load balancers and kubelets probe without the key, and are never refused."""
_REQUEST_ID_KEY = "x-request-id"


def _ignore_body(raw: bytes) -> None:
    return None


def rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[HandlerFn, bool], HandlerFn], parse: bool = True
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour function replaced by wrap(behaviour, streams_out).

    With `parse=False` request bodies are not parsed at all (a refused call costs no parsing).
    A streaming behaviour is an async generator, or a coroutine that writes itself (Health.Watch).
    """
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attribute, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, attribute), handler.response_streaming),
        request_deserializer=handler.request_deserializer if parse else _ignore_body,
        response_serializer=handler.response_serializer,
    )


async def _send(operation: Awaitable[None]) -> None:
    """Awaits a send on the call; if core has already ended the call, ends the handler as cancelled.

    Core ends a call on its own when the client cancels, the deadline passes or a request
    is compressed (refused UNIMPLEMENTED). A send after that fails with ExecuteBatchError,
    which grpc.aio logs as an ERROR with a traceback unless it has noticed the end first,
    a race; CancelledError is what it raises itself when it has, and logs at DEBUG.
    """
    try:
        await operation
    except ExecuteBatchError:
        raise asyncio.CancelledError("gRPC core had ended the call") from None


async def write_out(responses: Any, context: grpc.aio.ServicerContext) -> None:
    """Writes a streaming behaviour's responses with `context.write`, or awaits a behaviour that
    writes them itself (Health.Watch, or another interceptor's wrapper); a write on a call the
    client already left ends it as cancelled, quietly (`_send`)."""
    if inspect.isawaitable(responses):
        await responses
        return
    async with contextlib.aclosing(responses):
        async for response in responses:
            await _send(context.write(response))


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Gives every RPC an id (the caller's `x-request-id`, or a new one), logged and sent back.

    Streamed responses are written here (`write_out`), not by grpc.aio from a generator:
    a write that fails because the client cancelled is then ours to end quietly (`_send`),
    and the handler's generators are closed when the call ends, not when collected.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get(_REQUEST_ID_KEY)
        request_id = str(given)[:64] if given else uuid.uuid4().hex[:16]

        def wrap(behaviour: HandlerFn, streams_out: bool) -> HandlerFn:
            if streams_out:

                async def stream_with_id(request: Any, context: grpc.aio.ServicerContext) -> None:
                    REQUEST_ID.set(request_id)
                    await _send(context.send_initial_metadata(((_REQUEST_ID_KEY, request_id),)))
                    await write_out(behaviour(request, context), context)

                return stream_with_id

            async def unary_with_id(request: Any, context: grpc.aio.ServicerContext) -> Any:
                REQUEST_ID.set(request_id)
                await _send(context.send_initial_metadata(((_REQUEST_ID_KEY, request_id),)))
                return await behaviour(request, context)

            return unary_with_id

        return rewrap(handler, wrap)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without exactly one `authorization: Bearer <key>` (constant-time compare); health is exempt.

    Two `authorization` entries are refused, whatever they hold: which one counts would be up to
    each proxy and library on the way (a dict keeps the last), so a call could pass here with a
    key that something in front of the server never checked.
    """

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_METHODS):
            return handler
        given = [str(value).encode() for key, value in details.invocation_metadata or () if key == "authorization"]
        if len(given) == 1 and hmac.compare_digest(given[0], self._expected):
            return handler
        if len(given) > 1:
            message = f"{len(given)} 'authorization' metadata entries: send exactly one 'authorization: Bearer <key>'"
        else:
            message = "missing or wrong API key: send exactly one metadata entry 'authorization: Bearer <key>'"

        def wrap(behaviour: HandlerFn, streams_out: bool) -> HandlerFn:
            if streams_out:

                async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                    yield  # pragma: no cover - makes this an async generator

                return refuse_stream

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return refuse

        return rewrap(handler, wrap, parse=False)
