"""`python -m client`: embed a dataset with running servers or a RunPod endpoint; ask a server what it runs.

    python -m client embed photos/ shards/*.tar --server localhost:50051 -o photos.parquet
    python -m client embed --resume -o photos.parquet          # same inputs and options as recorded
    python -m client embed photos/ --runpod-endpoint ID -o photos.npy
    python -m client embed photos/ --server localhost:50051 --patch-tokens float16 -o tokens.npy
    python -m client info --server localhost:50051

With -o, results are committed to shards in OUT.parts/ as they arrive and
OUT is assembled, in input order, when every input is done; running the same
command again resumes (see client/job.py). Exit status: 0 every image
embedded; 1 some images failed (OUT has the others; the failed ones are in
OUT's failures file and on stderr); 2 bad usage (no such file, a job that
cannot be resumed as asked); 3 the job stopped (no server reachable within
--retry-for, a request refused): what was done is kept for a resume;
130 interrupted (likewise kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from client import manifest as manifests
from client.async_client import POOLINGS
from client.backends import RUNPOD_NO_TOKENS, Backend, GrpcBackend, RunPodBackend, TokenAsk
from client.connection import RetryPolicy
from client.errors import EmbedClientError
from client.job import EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, Job, JobOptions
from client.manifest import ManifestMismatch
from client.output import SUFFIXES
from client.progress import Waiting
from client.runpod_client import DEFAULT_BASE_URL
from client.shards import parts_folder
from client.sources import InputError, Inputs
from client.sync_client import EmbedClient


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="DINOv2 embedding service client.")
    commands = parser.add_subparsers(dest="command", required=True)

    def connection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--server", action="append", metavar="HOST:PORT",
                         help="server address; repeat for several (requests go round-robin); "
                              "a dns:///name:port target balances over its addresses [localhost:50051]")  # fmt: skip
        sub.add_argument("--api-key", help="gRPC: sent as 'authorization: Bearer KEY' [env DINOV2_API_KEY]; "
                                           "RunPod: the RunPod API key [env RUNPOD_API_KEY]")  # fmt: skip
        sub.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
        sub.add_argument("--tls-ca", type=Path, metavar="PEM", help="root certificate file for TLS (implies --tls)")
        sub.add_argument("--timeout", type=float,
                         help="seconds the server may take to answer one request once it has it (the time a request "
                              "waits behind the job's own is not counted) [60; RunPod: an HTTP call, 120]")  # fmt: skip

    def job(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("paths", nargs="*", metavar="PATH",
                         help="image files, folders (recursive), globs, tar archives (.tar, .tar.gz)")  # fmt: skip
        sub.add_argument("--from-list", type=Path, metavar="FILE", help="a text file of paths, one per line")
        sub.add_argument("-o", "--output", type=Path, metavar="OUT",
                         help="OUT.npy (ids in OUT.ids.txt), OUT.parquet or OUT.npz, resumable (state in "
                              "OUT.parts/); JSON lines on stdout without it")  # fmt: skip
        sub.add_argument("--pooling", choices=list(POOLINGS), help="[cls]")
        sub.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="L2-normalize each embedding")
        sub.add_argument("--patch-tokens", metavar="{float32,float16}",
                         help="write each image's patch tokens (CLS and registers excluded) in this dtype "
                              "instead of its pooled embedding: OUT.npy [N, rows, cols, dim] or OUT.parquet; "
                              "gRPC only")  # fmt: skip
        sub.add_argument("--normalize-tokens", action=argparse.BooleanOptionalAction,
                         help="L2-normalize each patch token")  # fmt: skip
        sub.add_argument("--batch-size", type=int,
                         help="images per request [32, or the server's limit when lower; RunPod 16]")  # fmt: skip
        sub.add_argument("--window", type=int,
                         help="most requests in flight; fewer while the server is busy [8, fewer when their patch "
                              "tokens would pass 512 MiB; RunPod 4]")  # fmt: skip
        sub.add_argument("--resume", action="store_true",
                         help="continue the job at OUT (its recorded inputs and options unless given); "
                              "running the same command again does the same")  # fmt: skip
        sub.add_argument("--overwrite", action="store_true", help="start again: drop OUT and its job state")
        sub.add_argument("--retry-failed", action="store_true", help="try the images that failed before again")
        sub.add_argument("--shard-size", type=int, default=1024, metavar="ROWS",
                         help="rows per committed shard (also committed every 10 s) [1024]")  # fmt: skip
        sub.add_argument("--retry-for", type=float, default=120.0, metavar="SECONDS",
                         help="keep retrying a request refused as UNAVAILABLE or RESOURCE_EXHAUSTED "
                              "(a server away or restarting) for this long [120]")  # fmt: skip
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr [on a terminal; else a line every --log-every]")  # fmt: skip
        sub.add_argument("--log-every", type=float, default=10.0, metavar="SECONDS", help="[10]")

    embed = commands.add_parser("embed", help="embed images (a whole dataset) and write the embeddings")
    job(embed)
    connection(embed)
    embed.add_argument("--runpod-endpoint", metavar="ID", help="embed with this RunPod endpoint instead of gRPC")
    embed.add_argument("--base-url", help=f"RunPod API [{DEFAULT_BASE_URL}]; e.g. http://127.0.0.1:8000 for a "
                                          "local 'runpod_handler.py --rp_serve_api' (then no endpoint id)")  # fmt: skip

    info = commands.add_parser("info", help="print what the server runs (model, size, limits) as JSON")
    connection(info)

    runpod = commands.add_parser("runpod", help="embed with a RunPod endpoint (same as embed --runpod-endpoint)")
    job(runpod)
    connection(runpod)
    runpod.add_argument("--endpoint-id", dest="runpod_endpoint", metavar="ID",
                        help="the endpoint's id (not needed with a --base-url that serves /runsync)")  # fmt: skip
    runpod.add_argument("--base-url", help=f"RunPod API [{DEFAULT_BASE_URL}]")
    return parser


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Runs one command; returns the exit status (see the module docstring)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args, stdout, stderr)
        options = _options(args, stderr)
        waiting = Waiting(stderr, _where(args), args.log_every)
        backend = _backend_factory(args, waiting)
    except (InputError, ManifestMismatch, ValueError) as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_USAGE
    except EmbedClientError as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_JOB_FAILED
    return Job(options, backend, stdout, stderr, waiting).run()


def _where(args: argparse.Namespace) -> str:
    """What the job waits for when requests are refused, for its messages."""
    endpoint, base_url = getattr(args, "runpod_endpoint", None), getattr(args, "base_url", None)
    if args.command == "runpod" or endpoint or base_url:
        return f"RunPod endpoint {endpoint}" if endpoint else f"RunPod API {base_url}"
    return "server " + ", ".join(args.server or ["localhost:50051"])


def _options(args: argparse.Namespace, stderr: IO[str]) -> JobOptions:
    """The job as asked, with a `--resume` without inputs taking them (and its options) from the manifest."""
    out: Path | None = args.output
    if out is not None and out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"cannot write {out.name!r}: the output must end in {', '.join(SUFFIXES)}")
    if out is not None and out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("writing .parquet needs pyarrow (pip install pyarrow); or write .npy or .npz") from None
    inputs = Inputs(tuple(args.paths), args.from_list)
    pooling, normalize = args.pooling, args.normalize
    token_dtype, normalize_tokens = args.patch_tokens, args.normalize_tokens
    if args.resume and out is None:
        raise ValueError("--resume needs -o OUT, the output of the job to resume")
    if args.resume and not args.paths and args.from_list is None:
        recorded = manifests.read(parts_folder(out) / "manifest.json")  # type: ignore[arg-type]
        if recorded is None:
            raise ValueError(f"nothing to resume: {parts_folder(out)}/manifest.json does not exist")  # type: ignore[arg-type]
        inputs = Inputs(recorded.inputs, Path(recorded.from_list) if recorded.from_list else None)
        pooling = pooling or recorded.identity.pooling
        normalize = recorded.identity.normalize if normalize is None else normalize
        token_dtype = token_dtype or recorded.identity.patch_tokens or None
        normalize_tokens = recorded.identity.normalize_tokens if normalize_tokens is None else normalize_tokens
    inputs.check()
    for name in ("batch_size", "window", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.retry_for < 0:
        raise ValueError("--retry-for must not be negative")
    if args.overwrite and (args.resume or args.retry_failed):
        raise ValueError("--overwrite starts again: it goes with neither --resume nor --retry-failed")
    progress = "off" if args.progress is False else "bar" if args.progress or stderr.isatty() else "log"
    return JobOptions(
        inputs=inputs, out=out, pooling=pooling or "cls", normalize=bool(normalize), resume=args.resume,
        overwrite=args.overwrite, retry_failed=args.retry_failed, shard_rows=args.shard_size,
        progress=progress, log_every_s=args.log_every, tokens=_tokens(args, token_dtype, normalize_tokens),
    )  # fmt: skip


def _tokens(args: argparse.Namespace, dtype: str | None, normalize: bool | None) -> TokenAsk | None:
    """The patch tokens asked for, if any; refuses the pooled embedding's options beside them."""
    if dtype is None:
        if args.normalize_tokens:
            raise ValueError("--normalize-tokens goes with --patch-tokens float32|float16")
        return None
    if args.pooling or args.normalize:
        raise ValueError("--pooling and --normalize shape the pooled embedding, which a --patch-tokens job does not "
                         "write; give --normalize-tokens to L2-normalize each token")  # fmt: skip
    return TokenAsk(dtype, bool(normalize))


def _backend_factory(args: argparse.Namespace, waiting: Waiting) -> Callable[[], Backend]:
    """A function making the backend the arguments name (made once the job's checks have passed)."""
    if args.command == "runpod" or args.runpod_endpoint or args.base_url:
        base_url = args.base_url or DEFAULT_BASE_URL
        if not args.runpod_endpoint and base_url == DEFAULT_BASE_URL:
            raise ValueError("give --endpoint-id / --runpod-endpoint (or a --base-url that serves /runsync itself)")
        if args.server:
            raise ValueError("give either --server or a RunPod endpoint, not both")
        if args.patch_tokens:
            raise ValueError(RUNPOD_NO_TOKENS)

        def runpod() -> Backend:
            return RunPodBackend(
                args.runpod_endpoint, args.api_key or os.environ.get("RUNPOD_API_KEY"), base_url=base_url,
                batch_size=args.batch_size or 16, window=args.window or 4, timeout=args.timeout or 120.0,
                retry_for_s=args.retry_for, on_retry=waiting, on_window=waiting.window_changed,
            )  # fmt: skip

        return runpod

    def grpc() -> Backend:
        return GrpcBackend(
            args.server or ["localhost:50051"], batch_size=args.batch_size, window=args.window,
            timeout=args.timeout or 60.0, retry_for_s=args.retry_for, tls=args.tls, tls_ca=args.tls_ca,
            api_key=args.api_key or os.environ.get("DINOV2_API_KEY"), on_retry=waiting,
            on_window=waiting.window_changed,
        )  # fmt: skip

    return grpc


def _info(args: argparse.Namespace, stdout: IO[str], stderr: IO[str]) -> int:
    client = EmbedClient(
        args.server or ["localhost:50051"], timeout=args.timeout or 60.0, tls=args.tls, tls_ca=args.tls_ca,
        api_key=args.api_key or os.environ.get("DINOV2_API_KEY"),
        retry=RetryPolicy(on_retry=Waiting(stderr, _where(args))),
    )  # fmt: skip
    with client:
        info = client.info()
    print(json.dumps(_as_dict(info), indent=2), file=stdout)
    return EXIT_OK


def _as_dict(message: Message) -> dict[str, Any]:
    """A message's fields as JSON values, 64-bit integers as numbers (proto3's JSON mapping makes them strings)."""
    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in message.DESCRIPTOR.fields:
        if field.cpp_type in wide and field.name in fields and not isinstance(fields[field.name], list):
            fields[field.name] = int(fields[field.name])
    return fields
