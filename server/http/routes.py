"""The HTTP routes: each reads its body, calls `EmbedService.embed` as the gRPC servicer does, answers JSON.

    POST /v1/embed        the JSON job of server/json_jobs.py (+ timeout_ms), or a multipart form;
                          answers {"embedding"} or {"embeddings", "errors"} (per-image errors)
    POST /v1/embeddings   OpenAI's shape (server/http/openai.py)
    GET  /v1/info         the model and the limits, as gRPC's Info
    GET  /health          200 {"status": "SERVING"}, else 503 {"status": "NOT_SERVING"} (also /healthz)

Failures are raised (`HttpError`, engine errors) and answered by
server/http/guards.py in one JSON shape. Bodies are read and parsed by
server/http/receive.py (in a receive slot, off the event loop); answers are
built off the loop and written while the request still counts in the
engine's bytes in flight (`EmbedService.embedding`), so that an answer of
patch tokens (about 2.7 times their size as base64 and JSON) is bounded with
its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from server.http import openai
from server.http.bodies import EmbedBody, embed_body, json_only
from server.http.json_body import job_object
from server.http.receive import Body, BodyReader
from server.http.status import json_response, refusal, to_json
from server.info import served_model_name
from server.json_jobs import Slot, answer_bytes, batch_output, decode_images, images_of, merged, single_output
from server.service import EmbedOptions, EmbedService, ImageResult

log = logging.getLogger(__name__)


async def _no_early_continue(request: web.Request) -> None:
    """aiohttp's expect handler, which would answer `100 Continue` before any check: `BodyReader` answers
    it once the key, the declared size and a receive slot allow the body."""
    return None


class Routes:
    """The handlers of one engine's HTTP API."""

    def __init__(self, service: EmbedService, bodies: BodyReader) -> None:
        self._service = service
        self._settings = service.settings
        self._bodies = bodies
        self._model_name = served_model_name(service.settings)

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/embed", self.embed, expect_handler=_no_early_continue)
        app.router.add_post("/v1/embeddings", self.embeddings, expect_handler=_no_early_continue)
        app.router.add_get("/v1/info", self.info)
        for path in ("/health", "/healthz"):
            app.router.add_get(path, self.health)

    async def embed(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/embed`: an `image` that fails is the request's error; `images` answer per image."""
        body, arrived = await self._bodies.receive(request, self._parse_embed)
        async with self._embedded(body.slots, body.options, body.timeout_ms, arrived) as results:
            if not body.single:
                return await _answer(request, batch_output(results, body.options))
            if results[0].error is not None:
                raise refusal(results[0].error, "image: ")
            return await _answer(request, single_output(results[0], body.options))

    def _parse_embed(self, body: Body) -> EmbedBody:
        return embed_body(body, self._settings.max_images_per_request, self._settings.max_image_bytes)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/embeddings`: OpenAI's shape; any failed image fails the request (see server/http/openai.py)."""
        (parsed, slots), arrived = await self._bodies.receive(request, self._parse_openai)
        async with self._embedded(slots, parsed.options, parsed.timeout_ms, arrived) as results:
            refused = openai.failure(results, parsed.single)
            if refused is not None:
                raise refused
            return await _answer(request, openai.response(results, self._model_name, parsed.encoding))

    def _parse_openai(self, body: Body) -> tuple[openai.EmbeddingsRequest, list[Slot]]:
        settings = self._settings
        options = [key for key in openai.KEYS if key != "input"]
        value = job_object(json_only(body), ("input",), options, settings.max_images_per_request)
        parsed = openai.parse_request(value, settings.max_images_per_request, self._service.info.embedding_dim)
        return parsed, decode_images(parsed.inputs, settings.max_image_bytes)

    @contextlib.asynccontextmanager
    async def _embedded(
        self, slots: Sequence[Slot], options: EmbedOptions, timeout_ms: float | None, arrived: float
    ) -> AsyncIterator[list[ImageResult]]:
        """Every image's answer, the images that decoded embedded in one engine call (admitted as gRPC's
        `Embed` is), held in the bytes in flight with their JSON answer until the block ends."""
        datas = images_of(slots)
        if not datas:
            yield list(slots)  # type: ignore[arg-type]
            return
        deadline = None if timeout_ms is None else arrived + timeout_ms / 1000.0
        service = self._service
        each = answer_bytes(options, service.info.embedding_dim, service.patch_token_bytes(options))
        async with service.embedding(datas, options, deadline, answer_bytes=each) as embedded:
            results = merged(slots, embedded)
            for index, result in enumerate(results):
                if result.error is not None:
                    log.debug("image %d failed: %s", index, result.error)
            yield results

    async def info(self, request: web.Request) -> web.Response:
        """`GET /v1/info`: the fields of gRPC's `InfoResponse`."""
        return json_response(vars(self._service.info))

    async def health(self, request: web.Request) -> web.Response:
        """`GET /health`: SERVING once warmed up and while the inference worker is healthy and not draining."""
        if self._service.serving:
            return json_response({"status": "SERVING"})
        return json_response({"status": "NOT_SERVING"}, status=503)


async def _answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """A 200 JSON answer, made off the event loop and written before the caller's hold on memory ends."""
    response = web.Response(body=await asyncio.to_thread(to_json, body), content_type="application/json")
    await response.prepare(request)
    await response.write_eof()
    return response
