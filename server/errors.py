"""The engine's typed errors.

Every failure a caller can cause, or can be told about, is one of these. The
transports map them to their own codes in one place each: gRPC in
`server/grpc_service.py`, the JSON job shape of RunPod and HTTP in
`server/json_jobs.py`, HTTP statuses in `server/http/status.py`. Messages are written
for the caller: they name the problem and never carry image bytes.
"""

from pathlib import Path


class EmbedError(Exception):
    """Base of all errors the engine reports to callers."""


class InvalidImage(EmbedError):
    """One image cannot be embedded: not an image, corrupt, empty or too large."""


class InvalidRequest(EmbedError):
    """The request as a whole is malformed: no images, too many, unknown pooling.

    `param`, when one request field is at fault, names it ("pooling",
    "timeout_ms"): OpenAI's error shape reports it (server/http/status.py).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(EmbedError):
    """The server cannot take this work now (full, or too far behind to answer in time); retry later.

    `reason` names the bound that refused it, for the metrics: images, bytes,
    queue_time, deadline, wait (a waiting job's deadline passed) or calls.
    `retry_after_s`, when known, is how long until the same request would be
    taken (HTTP's Retry-After).
    """

    def __init__(self, message: str, reason: str = "images", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Unavailable(EmbedError):
    """The engine is draining or not started; the caller should go elsewhere or retry."""


class DeadlineExceeded(EmbedError):
    """The caller's deadline passed before the image reached the model."""


class Cancelled(EmbedError):
    """The caller went away before the image reached the model."""


class InferenceFailed(EmbedError):
    """The model failed on a batch; only that batch's images are affected."""


class ModelLoadError(Exception):
    """The model or its processor cannot be loaded; ends the start with this message."""

    @classmethod
    def not_found(cls, model: str, reason: str) -> "ModelLoadError":
        """A Hub id that is neither in the local cache nor fetchable, `reason` saying why."""
        return cls(
            f"cannot load model {model!r}: it is not a local folder; {reason}. Without network, point --model "
            "(or MODEL_ID) at a local folder holding config.json, the weights and preprocessor_config.json"
        )

    @classmethod
    def cannot_load(cls, model: str, exc: BaseException) -> "ModelLoadError":
        if Path(model).exists():
            text = str(exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
        else:
            reason = "it is not a local folder, and the Hub copy is neither cached nor downloadable"
        return cls(
            f"cannot load model {model!r}: {reason}. Without network, point --model (or MODEL_ID) "
            "at a local folder holding config.json, the weights and preprocessor_config.json"
        )


class Internal(EmbedError):
    """An unexpected failure on one image's path; that image fails alone (the cause is logged, not sent)."""


class StartupError(Exception):
    """The server cannot start as configured (a port in use, say); ends the start with this message."""


def detached(exc: EmbedError) -> EmbedError:
    """The same error with no traceback and no chained cause.

    An exception raised while decoding keeps, through its traceback and its
    `__context__`, the frames that held the image's pixels; a refused image
    must free them at once, so results carry this copy (a type and a message).
    """
    return type(exc)(str(exc))
