"""The embed stage: an actor class of Ray Data's actor pool, one `ModelRunner` per actor (and GPU).

Per batch it does what the gRPC service does per image (server/service.py):
`ModelRunner.embed` on the batch's pixels, then `pool` per image. Rows that
failed to decode pass through with their error; a forward pass that fails
fails its batch's images (`INTERNAL`, as the service's `InferenceFailed`).
"""

from __future__ import annotations

import logging

import numpy as np

from offline.stages import INTERNAL, Fault
from server.config import Settings
from server.model import ModelRunner, Pooling, pool

log = logging.getLogger(__name__)


class EmbedActor:
    """One actor of the embed stage: a `ModelRunner` loaded once, batches of pixels in, embeddings out.

    `threads` sets PyTorch's thread count on the runner's compute thread: Ray
    starts workers with OMP_NUM_THREADS = the actor's logical CPUs (1), which
    on a CPU-only node would leave the other cores idle.
    """

    def __init__(
        self, settings: Settings, pooling: str, normalize: bool, threads: int = 0, fault: Fault | None = None
    ) -> None:
        if threads > 0:
            import torch

            from server.runtime import shared_compute_thread

            shared_compute_thread().run(torch.set_num_threads, threads)
        self.runner = ModelRunner.load(settings)
        self.runner.warmup()
        self.pooling = Pooling(pooling)
        self.normalize = normalize
        self.dim = self.runner.embedding_dim * (2 if self.pooling is Pooling.CLS_MEAN else 1)
        self.fault = fault
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = np.array(batch["error_code"], dtype=object)
        errors = np.array(batch["error"], dtype=object)
        embeddings = np.zeros((len(codes), self.dim), np.float32)
        ok = np.flatnonzero(codes == "")
        if ok.size:
            try:
                out = self.runner.embed(np.ascontiguousarray(batch["pixels"][ok], dtype=np.uint8))
            except Exception as exc:  # the service's InferenceFailed: this batch's images fail, the job goes on
                log.exception("forward pass failed on a batch of %d images", ok.size)
                codes[ok], errors[ok] = INTERNAL, f"inference failed on this image's batch: {type(exc).__name__}"
            else:
                for row, index in enumerate(ok):
                    embeddings[index] = pool(out.cls[row], out.mean[row], self.pooling, self.normalize)
        self.batches += 1
        if self.fault is not None:
            self.fault.maybe_die("embed", self.batches)
        return {"id": batch["id"], "embedding": embeddings, "error_code": codes, "error": errors}
