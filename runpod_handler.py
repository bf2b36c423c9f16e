"""RunPod serverless worker: an async RunPod handler over the gRPC server's engine.

    MODEL_ID=/models/dinov2-small python runpod_handler.py

The model loads once, when the worker starts (RunPod's cold start). The
engine (`EmbedService`: decoding, dynamic batcher, model runner) runs on an
event-loop thread of its own, and each job is a thin call into it; RunPod
runs up to RUNPOD_CONCURRENCY jobs at once (`concurrency_modifier`), so the
images of concurrent jobs share model batches.

    {"image": "<base64>"}          -> {"embedding": [...]}
    {"images": ["<base64>", ...]}  -> {"embeddings": [[...] or null, ...],
                                       "errors": [{"index", "code", "message"}, ...]}

plus optional "pooling" (cls, mean, cls_mean) and "normalize" (bool): the
JSON job shape of server/json_jobs.py, which the HTTP transport speaks too, and
whose `CODE_OF` names engine errors. A job that produces nothing returns
{"error": "<CODE>: <message>"}, which RunPod records as FAILED; what is
RunPod's own is here: that failure rule and the bound on a request's size.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import runpod

from server import errors
from server.config import Settings, load_settings
from server.json_jobs import (
    CODE_OF,  # noqa: F401 - this transport's table of codes, read here by its tests
    JobInput,
    batch_output,
    code_of,
    decode_images,
    embed_slots,
    failures,
    parse_input,
    single_output,
)
from server.logs import REQUEST_ID, configure_logging
from server.model import ModelRunner
from server.runtime import freeze_startup_objects
from server.service import EmbedOptions, EmbedService, ImageResult

log = logging.getLogger("runpod_handler")

T = TypeVar("T")

INTERNAL_MESSAGE = "the worker failed on this job; the details are in its log"

# RunPod refuses request bodies over 20 MB on /runsync (10 MB on /run); only a
# local test server lets more through, and this makes it refuse them too.
MAX_INPUT_CHARS = 20 * 1024 * 1024
SUMMARY_ITEMS = 5  # per-image errors listed when every image of a batch failed


def parse_job(raw: Any, max_images: int) -> JobInput:
    """The shared JSON job input (server/json_jobs.py), within what a RunPod request can carry."""
    request = parse_input(raw, max_images)
    chars = sum(map(len, request.images))
    if chars > MAX_INPUT_CHARS:
        raise errors.InvalidRequest(
            f"input carries {chars} base64 characters, over the {MAX_INPUT_CHARS} a RunPod request can hold "
            "(20 MB on /runsync, 10 MB on /run); send fewer or smaller images per job"
        )
    return request


class Worker:
    """The engine of one worker process, on its own event-loop thread, and the RunPod handler over it.

    The engine has a loop of its own because RunPod runs handlers in loops it
    makes and ends itself (one per `--test_input` run, uvicorn's for
    `--rp_serve_api`, the job scaler's in production); the engine outlives them.
    """

    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()
        try:
            self.service: EmbedService = self._call(self._start_service(settings, runner))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def load(cls, settings: Settings) -> Worker:
        """The cold start: loads the model from settings.model, then starts and warms up the engine."""
        return cls(settings, ModelRunner.load(settings))

    @staticmethod
    async def _start_service(settings: Settings, runner: ModelRunner) -> EmbedService:
        service = EmbedService(settings, runner)
        await service.start()
        return service

    def runpod_config(self) -> dict[str, Any]:
        """What `runpod.serverless.start` takes."""
        return {"handler": self.handler, "concurrency_modifier": self.concurrency}

    def concurrency(self, current: int) -> int:
        """RunPod's concurrency_modifier: jobs this worker runs at once (RUNPOD_CONCURRENCY)."""
        return self.settings.runpod_concurrency

    async def handler(self, job: dict[str, Any]) -> dict[str, Any]:
        """The RunPod handler: a job's input in; embeddings, or a top-level "error", out."""
        REQUEST_ID.set(str(job.get("id", "-"))[:100])  # this job's task only: log lines carry the job id
        deadline = time.monotonic() + self.settings.runpod_job_timeout_s
        try:
            request = parse_job(job.get("input"), self.settings.max_images_per_request)
            return await self._answer(request, deadline)
        except errors.EmbedError as exc:
            return self._failed(code_of(exc), str(exc))
        except Exception:
            log.exception("job %s failed inside the worker", job.get("id"))
            return self._failed("INTERNAL", INTERNAL_MESSAGE)

    async def _answer(self, request: JobInput, deadline: float) -> dict[str, Any]:
        results = await self._embed_all(request, deadline)
        if request.single:
            error = results[0].error
            if error is not None:
                return self._failed(code_of(error), f"image: {error}")
            return self._done(single_output(results[0], request.options))
        failed = failures(results)
        if len(failed) == len(results):
            listed = "; ".join(f"images[{index}]: {code_of(exc)}: {exc}" for index, exc in failed[:SUMMARY_ITEMS])
            more = f"; and {len(failed) - SUMMARY_ITEMS} more" if len(failed) > SUMMARY_ITEMS else ""
            return self._failed(code_of(failed[0][1]), f"all {len(failed)} images failed: {listed}{more}")
        return self._done(batch_output(results, request.options))

    async def _embed_all(self, request: JobInput, deadline: float) -> list[ImageResult]:
        """Base64-decodes each image (a bad one fails alone) and embeds the others in one engine call."""
        slots = decode_images(request.images, self.settings.max_image_bytes)
        return await embed_slots(slots, lambda datas: self._in_engine(self._embed(datas, request.options, deadline)))

    async def _embed(self, datas: list[bytes], options: EmbedOptions, deadline: float) -> list[ImageResult]:
        """Runs on the engine's loop. A job this worker took has nowhere better to go: it waits for room,
        up to `max_queue_s` (then RESOURCE_EXHAUSTED); images not embedded by `deadline` fail DEADLINE_EXCEEDED."""
        return await self.service.embed(datas, options, deadline, wait=True)

    def _done(self, output: dict[str, Any]) -> dict[str, Any]:
        self.service.metrics.requests.labels("RunPodJob", "OK").inc()
        return output

    def _failed(self, code: str, message: str) -> dict[str, Any]:
        self.service.metrics.requests.labels("RunPodJob", code).inc()
        log.info("job failed: %s: %s", code, message)
        return {"error": f"{code}: {message}"}

    async def _in_engine(self, coro: Coroutine[Any, Any, T]) -> T:
        """Awaits a coroutine on the engine's loop; cancelling the job cancels it there too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Stops the engine (images still queued fail with UNAVAILABLE) and its loop."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.service.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def main() -> None:
    """Settings from the environment, the cold start, then RunPod's job loop.

    Settings come from the environment only (as on RunPod): runpod reads its
    own flags (--test_input, --rp_serve_api, ...) from sys.argv. With
    --test_input or test_input.json, runpod exits with status 1 when the job's
    output has an "error" and 0 otherwise.
    """
    settings = load_settings([], os.environ)
    configure_logging(settings.log_level, settings.log_format)
    try:
        worker = Worker.load(settings)
    except errors.ModelLoadError as exc:
        sys.exit(f"error: {exc}")
    freeze_startup_objects()
    metrics = worker.service.metrics
    try:
        metrics.serve(settings.host, settings.metrics_port)
    except OSError as exc:
        log.warning("metrics not served: cannot listen on %s:%d (%s)", settings.host, settings.metrics_port, exc)
    try:
        runpod.serverless.start(worker.runpod_config())
    finally:
        worker.close()
        metrics.close()


if __name__ == "__main__":
    main()
