"""`python -m offline embed`: a dataset embedded by the service's engine inside Ray Data.

    python -m offline embed photos/ shards/*.tar -o out/ --model facebook/dinov2-small
    python -m offline embed s3://bucket/images/ -o s3://bucket/embeddings/ --address auto

OUT_DIR gets `manifest.json` and `data/part-*.parquet` (columns id, embedding,
error_code, error: one row per image, a failed image's row has an error and no
embedding). Running the same command again embeds only what has no row yet.
Exit status: 0 all embedded; 1 some images failed; 2 bad usage; 3 the job stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from offline.job import EXIT_JOB_FAILED, EXIT_USAGE, Job, JobSpec, Resources
from server.config import DTYPES, Settings

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
    sub.add_argument("--pooling", default="cls", choices=POOLINGS, help="[%(default)s]")
    sub.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    sub.add_argument("--overwrite", action="store_true", help="start again: remove what OUT_DIR holds")
    sub.add_argument("--address", help="Ray cluster to join: auto, ray://HOST:10001, ... [a local Ray]")
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
    try:
        import ray
    except ImportError:
        print("error: python -m offline needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return EXIT_USAGE
    if args.batch_size < 1 or args.rows_per_part < 1:
        print("error: --batch-size and --rows-per-part must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    settings = Settings(model=args.model, revision=args.revision, dtype=args.dtype,
                        compile="on" if args.compile else "off")  # fmt: skip
    resources = Resources(actors=args.actors, gpus_per_actor=args.gpus_per_actor, threads=args.threads,
                          batch_size=args.batch_size, rows_per_part=args.rows_per_part)  # fmt: skip
    spec = JobSpec(tuple(args.sources), args.out, settings, args.pooling, args.normalize, args.overwrite, resources)
    try:
        ray.init(address=args.address, num_cpus=args.num_cpus if args.address is None else None,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"error: cannot start or join Ray ({args.address or 'local'}): {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    try:
        return Job(spec, sys.stderr).run()
    finally:
        ray.shutdown()
