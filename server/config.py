"""Service configuration: one typed object, built once from flags and environment.

Every field is a command-line flag (`--max-batch-size`) and an environment
variable (`MAX_BATCH_SIZE`; the model is `MODEL_ID`, as on RunPod). A flag beats
the environment, the environment beats the default. Nothing else in the
package reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server import batch_size
from server.geometry import PREPROCESS
from server.proxies import proxy_networks

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_AUTO_DECODE_WORKERS = 4
RESIZE_PLACES = ("auto", "workers", "device")


def int_or_auto(raw: object) -> int | str:
    """A flag or variable that takes a positive int or the word auto."""
    text = str(raw).strip().lower()
    return "auto" if text == "auto" else int(text)


def _opt(default: Any, help: str, env: str | None = None, secret: bool = False, **extra: Any) -> Any:
    return field(default=default, repr=not secret, metadata={"help": help, "env": env, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything the engine and its transports can be told."""

    model: str = _opt("facebook/dinov2-small", "Hub id or local folder of a DINOv2 model.", env="MODEL_ID")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of the model.")
    served_model_name: str | None = _opt(
        None,
        'The model\'s name in answers (the "model" of POST /v1/embeddings), for callers who cannot know a local '
        "folder's path.",
        shown_default="--model when it is a Hub id, else its folder's name",
    )
    dtype: str = _opt("auto", "Compute dtype; auto = float32 on CPU, bfloat16 (else float16) on CUDA.", choices=DTYPES)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    image_size: int | None = _opt(
        None,
        "Side N of the model's N x N input, a multiple of the patch size (14): tokens grow with N^2 (448 is 4x "
        "the patches of 224).",
        parse=int,
        kind_name="int",
        shown_default="224 with --preprocess card, the checkpoint's crop size with checkpoint",
    )
    preprocess: str = _opt(
        "card",
        "card: the grayscale image resized to N x N. checkpoint: the checkpoint's preprocessor_config.json (for "
        "DINOv2: shortest edge 256, center crop 224; at another N, crop N and shortest edge N x 256/224).",
        choices=PREPROCESS,
    )
    host: str = _opt("0.0.0.0", "Address the gRPC server (and the HTTP one) listens on.")
    port: int = _opt(50051, "gRPC port (0 picks a free one).")
    http_port: int | None = _opt(
        None,
        "HTTP/JSON port (POST /v1/embed, /v1/embeddings; 0 picks a free one); no HTTP server unless set.",
        parse=int,
        kind_name="int",
    )
    max_batch_size: int | str = _opt(
        "auto",
        "Most images in one forward pass; auto = 16 on CPU, measured at start on a GPU.",
        parse=int_or_auto,
        kind_name="int or auto",
    )
    max_wait_ms: float = _opt(5.0, "Longest an image waits for a batch to fill.")
    backlog_wait_ms: float = _opt(
        50.0,
        "Longest an image waits for a batch to fill when enough images to fill it are being decoded "
        "(the host is the bottleneck: a full batch costs it less per image).",
    )
    max_queue_images: int = _opt(1024, "Images accepted but not yet answered; beyond it RESOURCE_EXHAUSTED.")
    max_queue_s: float = _opt(
        30.0,
        "Longest a request may wait behind the work already accepted, at the measured speed; one that would wait "
        "longer is refused RESOURCE_EXHAUSTED (and a RunPod job waits at most this long for room).",
    )
    max_images_per_request: int = _opt(256, "Most images in one EmbedRequest.")
    max_image_bytes: int = _opt(32 * 1024 * 1024, "Largest encoded image, in bytes.")
    max_image_pixels: int = _opt(50_000_000, "Largest decoded image, in pixels (width x height).")
    max_request_bytes: int = _opt(128 * 1024 * 1024, "Largest gRPC message or HTTP request body, in bytes.")
    max_inflight_bytes: int = _opt(
        512 * 1024 * 1024, "Encoded image bytes accepted and not yet answered; beyond it RESOURCE_EXHAUSTED."
    )
    max_decode_pixels: int = _opt(
        200_000_000, "Full-size pixels being decoded at once over all workers; beyond it an image waits its turn."
    )
    max_concurrent_rpcs: int = _opt(
        2048, "Calls handled at once, gRPC and HTTP together, health checks not counted; beyond it RESOURCE_EXHAUSTED."
    )
    max_calls_per_caller: int = _opt(
        256, "Calls one caller (a peer address) has open at once, idle streams included; beyond it RESOURCE_EXHAUSTED."
    )
    max_receiving_requests: int = _opt(
        4, "Request bodies read at once (gRPC Embed and HTTP together); other callers' bodies wait, unread."
    )
    max_receiving_per_caller: int = _opt(
        2, "Of the max_receiving_requests bodies read at once, how many one caller may have; its others wait."
    )
    receive_timeout_s: float = _opt(30.0, "Longest a request body may take to arrive once its read began.")
    min_receive_rate: int = _opt(
        65536,
        "Slowest an HTTP body may arrive, in bytes per second since its read began, once receive_grace_s has passed; "
        "a slower one is cut (408) and its receive slot freed.",
    )
    receive_grace_s: float = _opt(5.0, "How long an HTTP body may arrive at any pace before min_receive_rate applies.")
    header_timeout_s: float = _opt(
        10.0,
        "Longest a connection may take over a request's headers once it has begun them (and over a TLS handshake); "
        "then it is closed (HTTP 408). Also gRPC's handshake timeout.",
    )
    keepalive_timeout_s: float = _opt(75.0, "Longest an HTTP connection may stay idle between requests.")
    max_connections_per_address: int = _opt(
        256, "HTTP connections one address may hold open at once (trusted proxies not counted); beyond it 429."
    )
    trusted_proxies: str = _opt(
        "",
        "Comma-separated addresses or networks (CIDR) of proxies whose X-Forwarded-For (HTTP header, gRPC metadata) "
        "names the caller; for anyone else the caller is the peer address.",
    )
    preprocess_workers: int = _opt(
        0, "Decode and resize workers (0 = one per CPU this process may use; in threads, at most 4)."
    )
    decode_in: str = _opt(
        "processes",
        "Decode in worker processes (parallel over the CPUs; a decoder crash costs one image) or threads.",
        choices=("processes", "threads"),
    )
    resize_on: str = _opt(
        "auto",
        "Where the bicubic resize to the model's size runs, bit-exact either way: in the decode workers, or on the "
        "model's device in batches (server/resize.py); auto = device on CUDA, workers on CPU.",
        choices=RESIZE_PLACES,
    )
    decode: str = _opt(
        "exact",
        "exact: the reference's pixels. fast: a JPEG of at least 4x the model's size a side is decoded at a reduced "
        "DCT scale (no less than 2x the model's size a side), straight to grayscale: much less CPU for large "
        "photographs, embeddings close but not identical (BENCHMARKS.md); other images decode exactly.",
        choices=("exact", "fast"),
    )
    decode_timeout_s: float = _opt(
        30.0,
        "An image a decode worker process takes longer over fails INVALID_ARGUMENT and its process is replaced "
        "(waiting for the pixel budget does not count; threads cannot be stopped).",
    )
    stream_window: int = _opt(16, "Requests of one EmbedStream processed at once.")
    grace_s: float = _opt(30.0, "On SIGTERM, how long in-flight work may take to finish.")
    metrics_port: int = _opt(9090, "Prometheus metrics port (-1 disables, 0 picks a free one).")
    log_level: str = _opt("INFO", "Logging level.")
    runpod_concurrency: int = _opt(64, "RunPod jobs one worker runs at once (runpod_handler.py only).")
    runpod_job_timeout_s: float = _opt(
        600.0, "A RunPod job's images not embedded within this many seconds fail DEADLINE_EXCEEDED."
    )
    log_format: str = _opt("text", "Log lines as text or json.", choices=("text", "json"))
    api_key: str | None = _opt(
        None, "Require 'authorization: Bearer <key>' on every call (gRPC or HTTP) but health.", secret=True
    )
    tls_cert: str | None = _opt(None, "PEM certificate file; with --tls-key, serve TLS (gRPC and HTTP).")
    tls_key: str | None = _opt(None, "PEM private key file of --tls-cert.")
    probe_interval_s: float = _opt(2.0, "While the model fails, how often a probe forward pass is tried.")
    compile: str = _opt("off", "torch.compile the model: on or off (minutes more to start).", choices=("off", "on"))
    forward_timeout_s: float = _opt(
        120.0, "A forward pass slower than this fails its images (UNAVAILABLE) and turns health NOT_SERVING."
    )
    idle_trim_s: float = _opt(
        1.0, "After this long with the work in flight down to a quarter of its peak, freed memory goes back to the OS."
    )
    hub_timeout_s: float = _opt(5.0, "How long the start waits for the Hugging Face Hub to answer before giving up.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_batch_size", batch_size.parse(self.max_batch_size))
        positive = ("max_queue_images", "max_images_per_request", "max_image_bytes",
                    "max_image_pixels", "max_request_bytes", "max_inflight_bytes", "max_decode_pixels",
                    "max_concurrent_rpcs", "max_calls_per_caller", "max_receiving_requests", "max_receiving_per_caller",
                    "min_receive_rate", "max_connections_per_address", "stream_window",
                    "runpod_concurrency")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.preprocess_workers < 0:
            raise ValueError(f"preprocess_workers must not be negative, not {self.preprocess_workers}")
        if min(self.max_wait_ms, self.backlog_wait_ms, self.grace_s) < 0 or self.probe_interval_s <= 0:
            raise ValueError(
                "max_wait_ms, backlog_wait_ms and grace_s must not be negative, probe_interval_s must be positive"
            )
        timeouts = (self.forward_timeout_s, self.receive_timeout_s, self.max_queue_s, self.runpod_job_timeout_s,
                    self.decode_timeout_s, self.header_timeout_s, self.keepalive_timeout_s)  # fmt: skip
        if min(timeouts) <= 0:
            raise ValueError(
                "forward_timeout_s, receive_timeout_s, max_queue_s, runpod_job_timeout_s, decode_timeout_s, "
                "header_timeout_s and keepalive_timeout_s must be positive"
            )
        if self.receive_grace_s < 0:
            raise ValueError(f"receive_grace_s must not be negative, not {self.receive_grace_s}")
        proxy_networks(self.trusted_proxies)  # a ValueError naming the entry that is not an address or network
        if self.idle_trim_s < 0:
            raise ValueError(f"idle_trim_s must not be negative, not {self.idle_trim_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be from 0 to 65535 (0 picks a free one), not {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be from 0 to 65535 (0 picks a free one), not {self.http_port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be from 0 to 65535, or -1 to disable, not {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.resize_on not in RESIZE_PLACES or self.decode not in ("exact", "fast"):
            raise ValueError(f"resize_on must be auto, workers or device, not {self.resize_on!r}; "
                             f"decode must be exact or fast, not {self.decode!r}")  # fmt: skip
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, not {self.image_size}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be card or checkpoint, not {self.preprocess!r}")
        if self.hub_timeout_s <= 0:
            raise ValueError(f"hub_timeout_s must be positive, not {self.hub_timeout_s}")

    @property
    def address(self) -> str:
        """`host:port` as gRPC takes it (an IPv6 host in brackets: `[::]:50051`)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def decode_workers(self) -> int:
        """`preprocess_workers`, or when it is 0 one per CPU this process may run on; in threads
        at most `MAX_AUTO_DECODE_WORKERS`: Pillow's per-image Python work holds the GIL, and on a
        16-CPU machine 16 decode threads answered fewer images than 4 (BENCHMARKS.md)."""
        if self.preprocess_workers:
            return self.preprocess_workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, cpus if self.decode_in == "processes" else min(cpus, MAX_AUTO_DECODE_WORKERS))


def _env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or f.name.upper()


def _kind(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    return f.metadata.get("parse") or {"int": int, "float": float}.get(str(f.type), str)


def _kind_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("kind_name") or getattr(_kind(f), "__name__", "value")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="DINOv2 image-embedding gRPC server. Every flag can also be set "
        "by the environment variable named in brackets.",
    )
    for f in dataclasses.fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_kind(f),
            default=None,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} [{_env_name(f)}; default {f.metadata.get('shown_default', f.default)}]",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Builds the settings from flags, then environment, then defaults."""
    args = vars(_parser().parse_args(argv))
    environ = environ if environ is not None else {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = args[f.name]
        if raw is None and _env_name(f) in environ:
            raw = environ[_env_name(f)]
        if raw is None:
            continue
        kind = _kind(f)
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise SystemExit(f"error: {_env_name(f)}={raw!r} is not a valid {_kind_name(f)}") from None
        choices = f.metadata.get("choices")
        if choices and values[f.name] not in choices:
            raise SystemExit(f"error: {_env_name(f)} must be one of {', '.join(choices)}, not {raw!r}")
    try:
        return Settings(**values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
