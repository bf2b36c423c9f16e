"""`python -m offline embed`: a dataset embedded by the service's engine inside Ray Data.

    python -m offline embed photos/ shards/*.tar -o out/ --model facebook/dinov2-small
    python -m offline embed s3://bucket/images/ -o s3://bucket/embeddings/ --address auto

OUT_DIR gets `manifest.json` and `data/part-*.parquet` (columns id, embedding,
error_code, error: one row per image, a failed image's row has an error and no
embedding). Running the same command again embeds only what has no row yet (and
images whose forward pass failed; the others that failed with --retry-failed).
Exit status: 0 all embedded; 1 some images failed; 2 bad usage; 3 the job stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from offline.job import EXIT_USAGE, Job, JobSpec, Resources
from server.config import DTYPES, Settings
from server.geometry import PREPROCESS

POOLINGS = ("cls", "mean", "cls_mean")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("embed", help="embed a dataset into OUT_DIR (Parquet), resumable")
    sub.add_argument("sources", nargs="+", metavar="SOURCE",
                     help="image files, folders (recursive), local globs, tar/WebDataset shards, "
                          "or URIs Ray Data reads (s3://bucket/prefix/)")  # fmt: skip
    sub.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder or URI")
    sub.add_argument("--model", default=Settings.model, help="Hub id or local folder [%(default)s]")
    sub.add_argument("--revision", help="Hub revision of the model")
    sub.add_argument("--dtype", default="auto", choices=DTYPES,
                     help="auto = float32 on CPU, bfloat16 (else float16) on a GPU [%(default)s]")  # fmt: skip
    sub.add_argument("--image-size", type=int,
                     help="the model's N x N input, a multiple of the patch size (14) "
                          "[224 with card, the checkpoint's crop with checkpoint]")  # fmt: skip
    sub.add_argument("--preprocess", default="card", choices=PREPROCESS,
                     help="card: resized to N x N; checkpoint: the checkpoint's preprocessor_config.json "
                          "(shortest edge, center crop) [%(default)s]")  # fmt: skip
    sub.add_argument("--pooling", default="cls", choices=POOLINGS, help="[%(default)s]")
    sub.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    sub.add_argument("--overwrite", action="store_true", help="start again: remove what OUT_DIR holds")
    sub.add_argument("--retry-failed", action="store_true",
                     help="try the images that failed before again (failed forward passes always are)")  # fmt: skip
    sub.add_argument("--address", help="Ray cluster to join: auto, ray://HOST:10001, ... "
                                       "[a new local Ray, whatever RAY_ADDRESS says]")  # fmt: skip
    sub.add_argument("--num-cpus", type=int, help="local Ray only: CPUs it may use [all]")
    sub.add_argument("--actors", type=int, default=0, help="embed actors [one per GPU, else 1]")
    sub.add_argument("--gpus-per-actor", type=float, default=-1, help="[1 when the cluster has GPUs, else 0]")
    sub.add_argument("--threads", type=int, default=0, help="PyTorch threads per CPU-only actor [the node's cores]")
    sub.add_argument("--batch-size", type=int, default=16, help="images per forward pass [%(default)s]")
    sub.add_argument("--rows-per-part", type=int, default=4096, help="rows per Parquet part [%(default)s]")
    sub.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_ray(local=args.address is None)
    try:
        import ray
    except ImportError:
        print("error: python -m offline needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return EXIT_USAGE
    problem = _usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = Settings(model=args.model, revision=args.revision, dtype=args.dtype, image_size=args.image_size,
                        preprocess=args.preprocess, compile="on" if args.compile else "off")  # fmt: skip
    resources = Resources(actors=args.actors, gpus_per_actor=args.gpus_per_actor, threads=args.threads,
                          batch_size=args.batch_size, rows_per_part=args.rows_per_part)  # fmt: skip
    spec = JobSpec(tuple(args.sources), args.out, settings, args.pooling, args.normalize, args.overwrite,
                   args.retry_failed, resources)  # fmt: skip

    def connect() -> None:
        # "local" starts a Ray of our own: address=None would join whatever RAY_ADDRESS or the newest
        # local cluster names, another user's work included.
        local = args.address is None
        ray.init(address="local" if local else args.address, num_cpus=args.num_cpus if local else None,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
        ray.data.DataContext.get_current().print_on_execution_start = False

    try:
        return Job(spec, sys.stderr).run(connect)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _quiet_ray(local: bool) -> None:
    """Ray's messages that say nothing to the user of this command, off unless the environment asks for them.

    Ray Data's progress lines (INFO); the core worker's log lines on the driver (Ray's `E` lines that
    are warnings: a failure that matters reaches the job as an exception); and, for the local Ray this
    command starts, the notice that token authentication is on (it stays on: the mode is set explicitly).
    """
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.batch_size < 1 or args.rows_per_part < 1:
        return "--batch-size and --rows-per-part must be at least 1"
    if args.image_size is not None and args.image_size < 1:
        return "--image-size must be at least 1"
    if args.num_cpus is not None and args.address is not None:
        return "--num-cpus is for a local Ray; a cluster named by --address has its own CPUs"
    if args.overwrite and args.retry_failed:
        return "--overwrite starts again: it does not go with --retry-failed"
    return None
