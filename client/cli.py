"""`python -m client`: embed files and folders with a running service, or with a RunPod endpoint.

    python -m client embed photos/ --server localhost:50051 -o photos.npy
    python -m client info --server localhost:50051
    python -m client runpod --endpoint-id ID cat.jpg dog.png -o pets.npz

Exit status: 0 every image embedded; 1 some images failed (the others are
written, the failed ones listed on stderr); 2 bad usage (unknown option, no
such file); 3 the job failed as a whole (no server reachable, refused), and
nothing was written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from google.protobuf import json_format
from tqdm import tqdm

from client.async_client import POOLINGS
from client.errors import EmbedClientError, ItemResult
from client.inputs import InputError, InputFile, collect, duplicate_ids
from client.output import Writer, ids_path, open_writer
from client.runpod_client import DEFAULT_BASE_URL, RunPodClient
from client.sync_client import EmbedClient

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_JOB_FAILED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="DINOv2 embedding service client.")
    commands = parser.add_subparsers(dest="command", required=True)

    def connection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--server", action="append", metavar="HOST:PORT",
                         help="server address; repeat for several (requests go round-robin); "
                              "a dns:///name:port target balances over its addresses [localhost:50051]")  # fmt: skip
        sub.add_argument("--api-key", help="sent as 'authorization: Bearer KEY' [env DINOV2_API_KEY]")
        sub.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
        sub.add_argument("--tls-ca", type=Path, metavar="PEM", help="root certificate file for TLS (implies --tls)")
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds per request, retries included [60]")

    def job(sub: argparse.ArgumentParser, batch_size: int, window: int) -> None:
        sub.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
        sub.add_argument("-o", "--output", type=Path, metavar="OUT",
                         help="OUT.npy (ids in OUT.ids.txt), OUT.npz or OUT.parquet; "
                              "JSON lines on stdout without it")  # fmt: skip
        sub.add_argument("--pooling", choices=list(POOLINGS), default="cls", help="[cls]")
        sub.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
        sub.add_argument("--batch-size", type=int, default=batch_size, help=f"images per request [{batch_size}]")
        sub.add_argument("--window", type=int, default=window, help=f"requests in flight [{window}]")
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr [on when stderr is a terminal]")  # fmt: skip

    embed = commands.add_parser("embed", help="embed images with a gRPC server and write the embeddings")
    job(embed, batch_size=32, window=8)
    connection(embed)

    info = commands.add_parser("info", help="print what the server runs (model, size, limits) as JSON")
    connection(info)

    runpod = commands.add_parser("runpod", help="embed images with a RunPod serverless endpoint")
    job(runpod, batch_size=16, window=4)
    runpod.add_argument("--endpoint-id", help="the endpoint's id (not needed with a --base-url that serves /runsync)")
    runpod.add_argument("--api-key", help="RunPod API key [env RUNPOD_API_KEY]")
    runpod.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"RunPod API [{DEFAULT_BASE_URL}]; e.g. http://127.0.0.1:8000 for a local "
                             "'runpod_handler.py --rp_serve_api' (give no --endpoint-id then)")  # fmt: skip
    runpod.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP call [120]")
    return parser


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Runs one command; returns the exit status (see the module docstring)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args, stdout)
        files = collect(args.paths)
    except InputError as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_USAGE
    except EmbedClientError as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_JOB_FAILED
    for duplicate in duplicate_ids(files)[:5]:
        print(f"warning: id {duplicate!r} names more than one file", file=stderr)
    if args.batch_size < 1 or args.window < 1:
        print("error: --batch-size and --window must be at least 1", file=stderr)
        return EXIT_USAGE
    if args.command == "runpod" and not args.endpoint_id and args.base_url == DEFAULT_BASE_URL:
        print("error: give --endpoint-id (or a --base-url that serves /runsync itself)", file=stderr)
        return EXIT_USAGE
    try:
        writer = open_writer(args.output, stdout)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_USAGE
    progress = args.progress if args.progress is not None else stderr.isatty()
    sources = [(file.id, file.path) for file in files]
    if args.command == "runpod":
        runpod = RunPodClient(args.endpoint_id, args.api_key or os.environ.get("RUNPOD_API_KEY"),
                              base_url=args.base_url, timeout=args.timeout, batch_size=args.batch_size,
                              window=args.window)  # fmt: skip
        with runpod:
            batches = runpod.embed_batches(sources, pooling=args.pooling, normalize=args.normalize)
            return _write(batches, files, writer, args.output, progress, stderr)
    with _grpc_client(args) as client:
        batches = client.embed_batches(sources, pooling=args.pooling, normalize=args.normalize)
        return _write(batches, files, writer, args.output, progress, stderr)


def _grpc_client(args: argparse.Namespace) -> EmbedClient:
    return EmbedClient(
        args.server or ["localhost:50051"], timeout=args.timeout, tls=args.tls, tls_ca=args.tls_ca,
        api_key=args.api_key or os.environ.get("DINOV2_API_KEY"),
        batch_size=getattr(args, "batch_size", 32), window=getattr(args, "window", 8),
    )  # fmt: skip


def _info(args: argparse.Namespace, stdout: IO[str]) -> int:
    with _grpc_client(args) as client:
        info = client.info()
    fields = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(fields, indent=2), file=stdout)
    return EXIT_OK


def _write(batches: Iterator[list[ItemResult]], files: list[InputFile], writer: Writer, out: Path | None,
           progress: bool, stderr: IO[str]) -> int:  # fmt: skip
    """Writes good rows as they come, shows progress, then a summary and the failures; returns the exit status."""
    started = time.monotonic()
    failures: list[ItemResult] = []
    written, dim = 0, 0
    sized = _terminal_has_size(stderr)  # a pty of size 0x0 (script, some CI runners) would hide the bar
    bar = tqdm(total=len(files), unit="img", disable=not progress, file=stderr, dynamic_ncols=sized,
               ncols=None if sized else 80, nrows=None if sized else 20)  # fmt: skip
    try:
        for batch in batches:
            good = [r for r in batch if r.embedding is not None]
            failures.extend(r for r in batch if r.error is not None)
            if good:
                rows = np.stack([r.embedding for r in good])  # type: ignore[misc]
                writer.add([r.id for r in good], rows)
                written, dim = written + len(good), rows.shape[1]
            bar.update(len(batch))
            if failures:
                bar.set_postfix(failed=len(failures), refresh=False)
        writer.close()
    except EmbedClientError as exc:
        writer.abort()
        bar.close()
        print(f"error: {exc}; nothing written", file=stderr)
        return EXIT_JOB_FAILED
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    elapsed = time.monotonic() - started
    where = "" if out is None else f" -> {out}" + (f" (ids in {ids_path(out)})" if out.suffix == ".npy" else "")
    print(f"embedded {written} of {len(files)} images (dim {dim}) in {elapsed:.2f} s, "
          f"{len(files) / max(elapsed, 1e-9):.1f} images/s{where}", file=stderr)  # fmt: skip
    if failures:
        print(f"{len(failures)} image(s) failed:", file=stderr)
        for failure in failures:
            print(f"  {failure.id}: {failure.error}", file=stderr)
        return EXIT_ITEMS_FAILED
    return EXIT_OK


def _terminal_has_size(stream: IO[str]) -> bool:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return size.columns > 0 and size.lines > 0
