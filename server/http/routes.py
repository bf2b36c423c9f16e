"""The HTTP routes: each reads its body, calls `EmbedService.embed` as the gRPC servicer does, answers JSON.

    POST /v1/embed        the JSON job of server/json_jobs.py (+ timeout_ms), or a multipart form;
                          answers {"embedding"} or {"embeddings", "errors"} (per-image errors)
    POST /v1/embeddings   OpenAI's shape (server/http/openai.py)
    GET  /v1/info         the model and the limits, as gRPC's Info
    GET  /health          200 {"status": "SERVING"}, else 503 {"status": "NOT_SERVING"} (also /healthz)

Failures are raised (`HttpError`, engine errors) and answered by
server/http/guards.py in one JSON shape. Bodies are parsed (JSON, base64) and
answers written off the event loop, one thread hop each way per request: a
request of 32 photos is 30 ms of parsing on this machine, and 256 embeddings of
1,536 values take 0.3 s to write, time the loop owes every other caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from server.http import openai
from server.http.bodies import BodyReader, EmbedBody, Part, embed_body, parse_json
from server.http.status import json_response, refusal, to_json
from server.info import served_model_name
from server.json_jobs import Slot, batch_output, decode_images, embed_slots, single_output
from server.service import EmbedOptions, EmbedService, ImageResult

log = logging.getLogger(__name__)


class Routes:
    """The handlers of one engine's HTTP API."""

    def __init__(self, service: EmbedService, bodies: BodyReader) -> None:
        self._service = service
        self._settings = service.settings
        self._bodies = bodies
        self._model_name = served_model_name(service.settings)

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/embed", self.embed)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/info", self.info)
        for path in ("/health", "/healthz"):
            app.router.add_get(path, self.health)

    async def embed(self, request: web.Request) -> web.Response:
        """`POST /v1/embed`: an `image` that fails is the request's error; `images` answer per image."""
        body, arrived = await self._embed_body(request)
        results = await self._embed(body.slots, body.options, body.timeout_ms, arrived)
        if body.single:
            if results[0].error is not None:
                raise refusal(results[0].error, "image: ")
            return await _answer(single_output(results[0], body.options))
        return await _answer(batch_output(results, body.options))

    async def _embed_body(self, request: web.Request) -> tuple[EmbedBody, float]:
        """The parsed body and when it had arrived; the raw body is not kept while the images are embedded."""
        raw = await self._bodies.receive(request)
        arrived = time.monotonic()
        settings = self._settings
        body = await asyncio.to_thread(embed_body, raw, settings.max_images_per_request, settings.max_image_bytes)
        return body, arrived

    async def embeddings(self, request: web.Request) -> web.Response:
        """`POST /v1/embeddings`: OpenAI's shape; any failed image fails the request (see server/http/openai.py)."""
        parsed, slots, arrived = await self._openai_body(request)
        results = await self._embed(slots, parsed.options, parsed.timeout_ms, arrived)
        refused = openai.failure(results, parsed.single)
        if refused is not None:
            raise refused
        return await _answer(openai.response(results, self._model_name, parsed.encoding))

    async def _openai_body(self, request: web.Request) -> tuple[openai.EmbeddingsRequest, list[Slot], float]:
        raw = await self._bodies.receive(request)
        arrived = time.monotonic()
        parsed, slots = await asyncio.to_thread(self._parse_openai, raw)
        return parsed, slots, arrived

    def _parse_openai(self, raw: bytes | list[Part]) -> tuple[openai.EmbeddingsRequest, list[Slot]]:
        settings = self._settings
        value = parse_json(raw)
        parsed = openai.parse_request(value, settings.max_images_per_request, self._service.info.embedding_dim)
        return parsed, decode_images(parsed.inputs, settings.max_image_bytes)

    async def _embed(
        self, slots: Sequence[Slot], options: EmbedOptions, timeout_ms: float | None, arrived: float
    ) -> list[ImageResult]:
        """Embeds the images that decoded, in one engine call that admits them as gRPC's `Embed` does."""
        deadline = None if timeout_ms is None else arrived + timeout_ms / 1000.0
        results = await embed_slots(slots, lambda datas: self._service.embed(datas, options, deadline))
        for index, result in enumerate(results):
            if result.error is not None:
                log.debug("image %d failed: %s", index, result.error)
        return results

    async def info(self, request: web.Request) -> web.Response:
        """`GET /v1/info`: the fields of gRPC's `InfoResponse`."""
        return json_response(vars(self._service.info))

    async def health(self, request: web.Request) -> web.Response:
        """`GET /health`: SERVING once warmed up and while the inference worker is healthy and not draining."""
        if self._service.serving:
            return json_response({"status": "SERVING"})
        return json_response({"status": "NOT_SERVING"}, status=503)


async def _answer(body: dict[str, Any]) -> web.Response:
    """A 200 JSON answer, written off the event loop."""
    return web.Response(body=await asyncio.to_thread(to_json, body), content_type="application/json")
