"""One job's requests on their way: through the job's window, over its lanes, retried as the policy allows.

Each try of a request takes a slot of the job's `AdaptiveWindow` (client/window.py),
so a busy server sees fewer requests from this job, retries included. A refusal
(UNAVAILABLE, RESOURCE_EXHAUSTED) or a stream that stopped answering
(DEADLINE_EXCEEDED) is tried again after the policy's backoff, on the next lane.
Images the server answered DEADLINE_EXCEEDED (they waited too long in its
queue) and, up to `item_retries` times, INTERNAL (their batch's forward pass
failed) are sent again in a smaller request.

A request's retry budget (`RetryPolicy.max_attempts` or `retry_for_s`) counts
from the job's last answer: while the server answers some of the job's
requests, it is there and only busy, and the others wait their turn; a job
stops only once the server has answered nothing for that long.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from client.connection import BUSY_CODES, ITEM_RETRY_CODES, RetryPolicy
from client.errors import EmbedRequestError, ItemError, ItemResult
from client.images import Item
from client.streams import Lanes, StreamBroken
from client.tokens import from_wire
from client.window import AdaptiveWindow, AsyncGate
from protos.dinov2.v1 import embed_pb2

_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]


class Budget:
    """One request's retries: tries, or seconds, since the job's last answer (never since its first try)."""

    def __init__(self, policy: RetryPolicy, window: AdaptiveWindow) -> None:
        self.policy = policy
        self.window = window
        self.tries = 0  # all refused tries, for the backoff
        self.first_try = time.monotonic()
        self._since, self._since_tries, self._answers = self.first_try, 0, window.answers

    def allows(self, code: int, message: str) -> bool:
        """Whether a try refused with `code` may be tried again."""
        if self.window.answers != self._answers:  # the job got answers since: the server is there
            self._since, self._since_tries, self._answers = time.monotonic(), 0, self.window.answers
        return self.policy.should_retry(code, message, self._since_tries, time.monotonic() - self._since)

    def pause(self, code: int, message: str) -> float:
        """The backoff before the next try (told to the policy's `on_retry`)."""
        pause = self.policy.pause(code, message, self.tries, self.first_try)
        self.tries += 1
        self._since_tries += 1
        return pause


class Sender:
    """Sends the requests of one job; `run` answers one request's items, in order."""

    def __init__(self, lanes: Lanes, gate: AsyncGate, retry: RetryPolicy, template: embed_pb2.EmbedRequest) -> None:
        self.lanes = lanes
        self.gate = gate
        self.retry = retry
        self.template = template

    async def run(self, priority: int, items: list[Item]) -> list[ItemResult]:
        """One request: sends the items that have bytes (again, those the server asks to), merges the
        answers with client-side failures. `priority`: the request's place in the job (earlier goes first)."""
        budget = Budget(self.retry, self.gate.window)
        answers: dict[int, embed_pb2.Embedding] = {}
        pending = [item for item in items if item.error is None]
        internal_tries = 0
        while pending:
            answers.update(await self._answers(priority, pending, budget))
            failed = [item for item in pending if _code(answers[item.index]) in ITEM_RETRY_CODES]
            expired = [item for item in pending if _code(answers[item.index]) == _DEADLINE_EXCEEDED]
            pending = []
            if failed and internal_tries < self.retry.item_retries:
                pending, pause = failed, self.retry.backoff(internal_tries)
                internal_tries += 1
            if expired:
                message = answers[expired[0].index].error.message
                if not budget.allows(_DEADLINE_EXCEEDED, message):
                    ids = tuple(item.id for item in expired)
                    raise EmbedRequestError(_DEADLINE_EXCEEDED, f"{message} (every try)", ids, budget.tries + 1)
                pending, pause = pending + expired, budget.pause(_DEADLINE_EXCEEDED, message)
            if pending:
                await asyncio.sleep(pause)
        return [_result(item, answers.get(item.index)) for item in items]

    async def _answers(self, priority: int, items: list[Item], budget: Budget) -> dict[int, embed_pb2.Embedding]:
        """Sends `items` as one request; the server's answer for each, by input index."""
        request = embed_pb2.EmbedRequest()
        request.CopyFrom(self.template)
        request.images.extend(embed_pb2.Image(data=item.data, id=item.id) for item in items)
        ids = tuple(item.id for item in items)
        response = await self._send(priority, request, ids, budget)
        if len(response.embeddings) != len(items):
            message = f"server answered {len(response.embeddings)} embeddings for {len(items)} images"
            raise EmbedRequestError(_INTERNAL, message, ids)
        return {item.index: answer for item, answer in zip(items, response.embeddings, strict=True)}

    async def _send(
        self, priority: int, request: embed_pb2.EmbedRequest, ids: tuple[str, ...], budget: Budget
    ) -> embed_pb2.EmbedResponse:
        """Sends until answered, retrying refusals the policy allows on the next lane."""
        failed_lane = None
        while True:
            async with self.gate.slot(priority) as sent_at:
                lane = self.lanes.pick(avoid=failed_lane)
                try:
                    response = await (await lane.send(request))
                except StreamBroken as exc:
                    code, message = exc.code, exc.message
                else:
                    if not response.HasField("error"):
                        lane.succeeded()
                        self._count(response, sent_at)
                        return response
                    code, message = response.error.code, response.error.message
                if code in BUSY_CODES:
                    self.gate.busy(sent_at)
            if not budget.allows(code, message):
                raise EmbedRequestError(code, message, ids, budget.tries + 1)
            lane.failed(self.retry)
            failed_lane = lane
            await asyncio.sleep(budget.pause(code, message))

    def _count(self, response: embed_pb2.EmbedResponse, sent_at: float) -> None:
        """An answer moves the window: down when images waited past their deadline, up when some were answered."""
        expired = sum(1 for answer in response.embeddings if _code(answer) == _DEADLINE_EXCEEDED)
        if expired:
            self.gate.busy(sent_at)
        if expired < len(response.embeddings):
            self.gate.answered()

    async def close(self) -> None:
        await self.lanes.close()


def _code(answer: embed_pb2.Embedding) -> int:
    return answer.error.code if answer.HasField("error") else 0


def _result(item: Item, answer: embed_pb2.Embedding | None) -> ItemResult:
    if answer is None:
        return ItemResult(item.index, item.id, error=item.error)
    if answer.HasField("error"):
        return ItemResult(item.index, item.id, error=ItemError(answer.error.code, answer.error.message))
    embedding = np.asarray(answer.values, dtype=np.float32)
    if not answer.HasField("patch_tokens"):
        return ItemResult(item.index, item.id, embedding=embedding)
    try:
        tokens = from_wire(answer.patch_tokens)
    except ValueError as exc:
        error = ItemError(_INTERNAL, f"server sent unreadable patch tokens: {exc}")
        return ItemResult(item.index, item.id, error=error)
    return ItemResult(item.index, item.id, embedding=embedding, patch_tokens=tokens)
