"""`RunPodClient`: the same images-in, embeddings-out calls against a RunPod serverless endpoint.

Each request is one `/runsync` job (`POST {base_url}/v2/{endpoint_id}/runsync`,
`Authorization: Bearer KEY`, body `{"input": {"images": [base64...], "pooling",
"normalize"}}`). A job RunPod has not finished within its wait is polled at
`/v2/{endpoint_id}/status/{job_id}`. Without an endpoint id, `base_url` itself
serves `/runsync`, as the local test server `python runpod_handler.py
--rp_serve_api` does. Requests stay under RunPod's payload cap (20 MB for
/runsync) by splitting on encoded size; up to `window` jobs run at once,
fewer while the endpoint answers RESOURCE_EXHAUSTED (client/window.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pybase64
import requests

from client.async_client import POOLINGS, stack
from client.connection import BUSY_CODES, ITEM_RETRY_CODES, RetryPolicy
from client.errors import EmbedClientError, ItemError, ItemResult
from client.images import Item, encode_many, take
from client.sender import Budget
from client.tokens import from_json, host_dtype, stack_tokens, token_options
from client.window import AdaptiveWindow, ThreadGate

DEFAULT_BASE_URL = "https://api.runpod.ai"
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # base64 text per job; RunPod caps /runsync bodies at 20 MB
_RETRY_HTTP = frozenset({429, 500, 502, 503, 504})
_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
_UNKNOWN, _INVALID_ARGUMENT, _INTERNAL, _UNAVAILABLE = 2, 3, 13, 14


class RunPodError(EmbedClientError):
    """A RunPod job failed as a whole: HTTP error, FAILED status, or an answer of the wrong shape.

    `code` is the google.rpc.Code number when the handler named one (its
    errors read "CODE: message"), else 2 UNKNOWN; `message` is the rest.
    """

    def __init__(self, message: str, code: int = _UNKNOWN, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = message if detail is None else detail


def _job_error(job_id: str, status: str, error: Any) -> RunPodError:
    """The handler's "CODE: message" error (or whatever RunPod says) as a `RunPodError`."""
    text = str(error)
    name, colon, rest = text.partition(": ")
    if colon and name in _CODES:
        return RunPodError(f"RunPod job {job_id} {status}: {text}", _CODES[name], rest)
    return RunPodError(f"RunPod job {job_id} {status}: {text}")


class RunPodClient:
    """Embeds images with a deployed RunPod endpoint running `runpod_handler.py`.

    `endpoint_id` and `api_key` identify the endpoint (RunPod's console shows
    both); `base_url` defaults to RunPod's API. `timeout` bounds each HTTP call;
    `batch_size` images per job, `window` jobs in flight.
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        api_key: str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 120.0,
        batch_size: int = 16,
        window: int = 4,
        retry: RetryPolicy | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.endpoint_id = endpoint_id
        self.timeout = timeout
        self.batch_size = batch_size
        self.window = window
        self.retry = retry or RetryPolicy()
        self.max_payload_bytes = max_payload_bytes
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _url(self, path: str) -> str:
        prefix = f"{self.base_url}/v2/{self.endpoint_id}" if self.endpoint_id else self.base_url
        return f"{prefix}/{path}"

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One HTTP call with retries for connection errors, 429 and 5xx; returns the JSON body."""
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                response = self._session.request(method, self._url(path), json=body, timeout=self.timeout)
                if response.status_code not in _RETRY_HTTP:
                    break
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if not self.retry.may_try_again(attempt, time.monotonic() - started):
                raise RunPodError(f"{method} {self._url(path)} failed after {attempt + 1} attempts: {problem}")
            time.sleep(self.retry.pause(_UNAVAILABLE, f"{self._url(path)}: {problem}", attempt, started))
            attempt += 1
        if response.status_code in (401, 403):
            raise RunPodError(f"RunPod refused the API key (HTTP {response.status_code}); check --api-key")
        if response.status_code >= 400:
            raise RunPodError(f"{method} {self._url(path)}: HTTP {response.status_code}: {response.text[:500]}")
        try:
            return response.json()
        except ValueError:
            raise RunPodError(
                f"{self._url(path)} answered something that is not JSON: {response.text[:200]!r}"
            ) from None

    def run(self, job_input: dict[str, Any]) -> Any:
        """Runs one job through /runsync (polling /status while RunPod still works on it); returns its output."""
        answer = self._request("POST", "runsync", {"input": job_input})
        while answer.get("status") in ("IN_QUEUE", "IN_PROGRESS") and answer.get("id"):
            time.sleep(1.0)
            answer = self._request("GET", f"status/{answer['id']}")
        job_id, status = str(answer.get("id", "?")), str(answer.get("status") or "has no status")
        if status != "COMPLETED":
            raise _job_error(job_id, status, answer.get("error"))
        output = answer.get("output")
        if isinstance(output, dict) and output.get("error"):
            raise _job_error(job_id, "FAILED", output["error"])
        return output

    def _run_retrying(self, job_input: dict[str, Any], gate: ThreadGate, priority: int) -> Any:
        """`run` in a slot of the window, tried again with backoff while the worker answers UNAVAILABLE
        or RESOURCE_EXHAUSTED, until the retry budget (counted from the last answer) runs out."""
        budget = Budget(self.retry, gate.window)
        while True:
            with gate.slot(priority) as sent_at:
                try:
                    output = self.run(job_input)
                except RunPodError as exc:
                    error = exc
                    if exc.code in BUSY_CODES:
                        gate.busy(sent_at)
                else:
                    gate.answered()
                    return output
            if not budget.allows(error.code, error.detail):
                raise error
            time.sleep(budget.pause(error.code, error.detail))

    def embed(self, images: Iterable[Any], *, ids: Sequence[str] | None = None, pooling: str = "cls",
              normalize: bool = False) -> np.ndarray:  # fmt: skip
        """float32 [N, D] in input order; raises `EmbedItemsError` naming failed images (like `EmbedClient`)."""
        if ids is not None:
            images = list(zip(ids, images, strict=True))
        return stack([r for batch in self.embed_batches(images, pooling=pooling, normalize=normalize) for r in batch])

    def patch_tokens(self, images: Iterable[Any], *, ids: Sequence[str] | None = None, dtype: str = "float16",
                     normalize: bool = False) -> np.ndarray:  # fmt: skip
        """Every image's patch tokens, [N, rows, cols, dim] in input order (see `EmbedClient.patch_tokens`)."""
        if ids is not None:
            images = list(zip(ids, images, strict=True))
        batches = self.embed_batches(images, patch_tokens=dtype, normalize_tokens=normalize)
        return stack_tokens([r for batch in batches for r in batch], (0, 0, 0), host_dtype(dtype))

    def embed_iter(
        self, images: Iterable[Any], *, pooling: str = "cls", normalize: bool = False,
        patch_tokens: str | None = None, normalize_tokens: bool = False,
    ) -> Iterator[ItemResult]:  # fmt: skip
        """`ItemResult`s in input order; failed images carry `error`; `patch_tokens` (a dtype) adds their tokens."""
        for batch in self.embed_batches(images, pooling=pooling, normalize=normalize, patch_tokens=patch_tokens,
                                        normalize_tokens=normalize_tokens):  # fmt: skip
            yield from batch

    def embed_batches(self, images: Iterable[Any], *, pooling: str = "cls", normalize: bool = False,
                      patch_tokens: str | None = None, normalize_tokens: bool = False,
                      ) -> Iterator[list[ItemResult]]:  # fmt: skip
        """One list of results per job, in input order, with up to `window` jobs running."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        tokens = None
        if patch_tokens is not None:
            token_options(patch_tokens, normalize_tokens)  # refuses an unknown dtype before any job
            tokens = {"dtype": patch_tokens, "normalize": normalize_tokens}
        iterator = iter(images)
        start = 0
        pending: deque[Future[list[ItemResult]]] = deque()
        gate = ThreadGate(AdaptiveWindow(self.window, self.retry.on_window))
        with ThreadPoolExecutor(self.window, thread_name_prefix="runpod") as pool:
            try:
                while True:
                    while len(pending) < self.window:
                        items = encode_many(take(iterator, self.batch_size), start)
                        if not items:
                            break
                        start += len(items)
                        for job in self._split(items):
                            send = _Send(gate, job[0].index, pooling, normalize, tokens)
                            pending.append(pool.submit(self._embed_job, job, send))
                    if not pending:
                        return
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _split(self, items: list[Item]) -> Iterator[list[Item]]:
        current: list[Item] = []
        size = 0
        for item in items:
            encoded = 4 * ((len(item.data) + 2) // 3)
            if current and size + encoded > self.max_payload_bytes:
                yield current
                current, size = [], 0
            current.append(item)
            size += encoded
        if current:
            yield current

    def _embed_job(self, items: list[Item], send: _Send) -> list[ItemResult]:
        """One job for the items that have bytes; client-side failures keep their error.

        Images whose batch's forward pass failed (INTERNAL) go again in a new
        job, up to `item_retries` times, after the policy's backoff.
        """
        answers: dict[int, ItemResult] = {}
        sendable = [item for item in items if item.error is None]
        for attempt in range(1 + self.retry.item_retries):
            if attempt:
                time.sleep(self.retry.backoff(attempt - 1))
            answers.update((r.index, r) for r in self._embed_sendable(sendable, send))
            sendable = [item for item in sendable if _retryable(answers[item.index])]
            if not sendable:
                break
        return [answers.get(item.index) or ItemResult(item.index, item.id, error=item.error) for item in items]

    def _embed_sendable(self, items: list[Item], send: _Send) -> list[ItemResult]:
        if not items:
            return []
        job = {"images": [pybase64.b64encode_as_string(item.data) for item in items],
               "pooling": send.pooling, "normalize": send.normalize}  # fmt: skip
        if send.tokens is not None:
            job["patch_tokens"] = send.tokens
        try:
            output = self._run_retrying(job, send.gate, send.priority)
        except RunPodError as exc:
            # The handler fails a job whose every image failed, naming at most a few: one job per
            # image then says exactly why each failed (a lone image's job fails with its reason).
            if exc.code != _INVALID_ARGUMENT:
                raise
            if len(items) > 1:
                return [r for item in items for r in self._embed_sendable([item], send)]
            reason = exc.detail.split("images[0]: ", 1)[-1]
            name, colon, rest = reason.partition(": ")
            code, message = (_CODES[name], rest) if colon and name in _CODES else (exc.code, reason)
            return [ItemResult(items[0].index, items[0].id, error=ItemError(code, message))]
        parsed = parse_output(output, len(items))
        return [dataclasses.replace(r, index=item.index, id=item.id) for item, r in zip(items, parsed, strict=True)]


@dataclass(frozen=True)
class _Send:
    """How one request's jobs go: the window's gate, the request's place (earlier first), the options."""

    gate: ThreadGate
    priority: int
    pooling: str
    normalize: bool
    tokens: dict[str, Any] | None = None


def _retryable(result: ItemResult) -> bool:
    return result.error is not None and result.error.code in ITEM_RETRY_CODES


def parse_output(output: Any, count: int) -> list[ItemResult]:
    """Reads the handler's `{"embeddings": [...], "errors": [...]}` into one result per image.

    `embeddings[i]` is the i-th image's vector, or null when it failed; each
    entry of `errors` is `{"index", "code", "message"}` for a failed image
    (`code` a google.rpc.Code name such as "INVALID_ARGUMENT", or its number).
    """
    if not isinstance(output, dict) or not isinstance(output.get("embeddings"), list):
        raise RunPodError(f"RunPod output has no 'embeddings' list: {str(output)[:200]}")
    vectors = output["embeddings"]
    if len(vectors) != count:
        raise RunPodError(f"RunPod answered {len(vectors)} embeddings for {count} images")
    errors: dict[int, ItemError] = {}
    for entry in output.get("errors") or []:
        code = entry.get("code", _INTERNAL)
        number = _CODES.get(code, _UNKNOWN) if isinstance(code, str) else int(code)
        errors[int(entry["index"])] = ItemError(number, str(entry.get("message", "")))
    tokens = output.get("patch_tokens") or [None] * count
    results = []
    for index, (vector, entry) in enumerate(zip(vectors, tokens, strict=False)):
        if vector is None or index in errors:
            results.append(ItemResult(index, str(index), error=errors.get(index, ItemError(_INTERNAL, "no embedding"))))
            continue
        embedding = np.asarray(vector, dtype=np.float32)
        try:
            patches = from_json(entry) if entry is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            error = ItemError(_INTERNAL, f"RunPod sent unreadable patch tokens: {exc}")
            results.append(ItemResult(index, str(index), error=error))
            continue
        results.append(ItemResult(index, str(index), embedding=embedding, patch_tokens=patches))
    return results
