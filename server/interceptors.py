"""gRPC server interceptors: request ids for logs, and the optional API key.

Both wrap the method handler once per RPC, so the servicer stays unaware of them.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.logs import REQUEST_ID

HandlerFn = Callable[..., Any]

# Health stays open so load balancers and kubelets can probe without the key.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_REQUEST_ID_KEY = "x-request-id"


def _ignore_body(raw: bytes) -> None:
    return None


def _rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[HandlerFn, bool], HandlerFn], parse: bool = True
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour function replaced by wrap(behaviour, streams_out).

    With `parse=False` request bodies are not parsed at all (a refused call costs no parsing).
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


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Gives every RPC an id (the caller's `x-request-id`, or a new one), logged and sent back."""

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

                async def stream_with_id(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    REQUEST_ID.set(request_id)
                    await context.send_initial_metadata(((_REQUEST_ID_KEY, request_id),))
                    async for response in behaviour(request, context):
                        yield response

                return stream_with_id

            async def unary_with_id(request: Any, context: grpc.aio.ServicerContext) -> Any:
                REQUEST_ID.set(request_id)
                await context.send_initial_metadata(((_REQUEST_ID_KEY, request_id),))
                return await behaviour(request, context)

            return unary_with_id

        return _rewrap(handler, wrap)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without `authorization: Bearer <key>` (constant-time compare); health is exempt."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        given = str(dict(details.invocation_metadata or ()).get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler

        def wrap(behaviour: HandlerFn, streams_out: bool) -> HandlerFn:
            message = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"
            if streams_out:

                async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                    yield  # pragma: no cover - makes this an async generator

                return refuse_stream

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return refuse

        return _rewrap(handler, wrap, parse=False)
