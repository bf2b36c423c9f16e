"""One run of an offline job on Ray: check OUT_DIR, skip what is written, run the stages, leave one row per id.

The driver (this process) lists the inputs through Ray's reader, skipping
every id that already has a row; the stages of offline/stages.py do the rest
on the cluster's workers; the driver only counts the ids and errors the
write stage passes on. When the dataset is exhausted, `Store.finish` leaves
exactly one row per id. A run killed at any point (the driver SIGKILLed, a
worker or a node lost) keeps every part already renamed into OUT_DIR, and the
same command run again embeds only the ids without a row.

Exit status, as the client's: 0 every image embedded; 1 some images failed
(their rows carry the error); 2 bad usage (no such input, another job's
OUT_DIR); 3 the job stopped (Ray or the model failed): what is written stays.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import IO, Any

from offline import sources as inputs
from offline.embed import EmbedActor
from offline.manifest import Identity, Manifest, ManifestMismatch
from offline.stages import Fault, decode_batch, limits_of, write_batch
from offline.store import MANIFEST, Store, Tally
from server.config import Settings
from server.errors import ModelLoadError
from server.model import Pooling

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_JOB_FAILED = 0, 1, 2, 3


class UsageError(ValueError):
    """The job cannot start as asked (exit status 2)."""


@dataclass(frozen=True)
class Resources:
    """How the stages use the cluster. 0 = decide from the cluster: GPUs if it has any."""

    actors: int = 0  # embed actors (default: one per GPU, else 1)
    gpus_per_actor: float = -1  # -1: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    threads: int = 0  # PyTorch threads per CPU actor (0: the node's cores when no GPU, else PyTorch's default)
    batch_size: int = 16  # images per forward pass (the server's default)
    rows_per_part: int = 4096  # rows per Parquet part: the unit that a crash can lose


@dataclass(frozen=True)
class JobSpec:
    sources: tuple[str, ...]
    out: str
    settings: Settings
    pooling: str = "cls"
    normalize: bool = False
    overwrite: bool = False
    resources: Resources = field(default_factory=Resources)
    fault: Fault | None = None  # tests only


@dataclass(frozen=True)
class Described:
    """What the actors will run, as resolved where they run (a GPU node resolves auto to bfloat16)."""

    device: str
    dtype: str
    embedding_dim: int
    image_size: int


def _describe(settings: Settings) -> Described:
    from transformers import AutoConfig

    from server.model import resolve_device, resolve_dtype
    from server.preprocess import configured_processor, normalization_of

    device = resolve_device(settings.device)
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    try:
        config = AutoConfig.from_pretrained(settings.model, revision=settings.revision)
    except OSError as exc:
        raise ModelLoadError.cannot_load(settings.model, exc) from None
    image_size = normalization_of(configured_processor(settings.model, settings.revision)).image_size
    return Described(device.type, dtype, int(config.hidden_size), image_size)


class Job:
    """`run()` returns the exit status; it reports on `stderr` and leaves progress bars to Ray."""

    def __init__(self, spec: JobSpec, stderr: IO[str]) -> None:
        self.spec = spec
        self.stderr = stderr
        self.store = Store(spec.out)
        self.timeline: list[tuple[float, int]] = []  # (time.monotonic(), rows) as the write stage hands them on

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources as recorded and compared: `photos/` and `photos` are the same argument."""
        return tuple(s if inputs.is_uri(s) else os.path.normpath(s) for s in self.spec.sources)

    def say(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def run(self) -> int:
        import ray

        try:
            paths = inputs.expand(self.spec.sources)
            Pooling(self.spec.pooling)
        except (inputs.InputError, ValueError) as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        resources = self._resources()
        try:
            described = self._probe(resources)
            manifest = self._open(described)
        except (UsageError, ManifestMismatch) as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ModelLoadError):
                self.say(f"error: {exc.cause}")
                return EXIT_USAGE
            self.say(f"error: the job stopped before any work: {exc}")
            return EXIT_JOB_FAILED
        except (ray.exceptions.RayError, OSError) as exc:
            self.say(f"error: the job stopped before any work: {exc}")
            return EXIT_JOB_FAILED
        try:
            return self._run(paths, resources, described, manifest)
        except UsageError as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except ray.exceptions.RayError as exc:
            self.say(f"error: the job stopped: {exc}\nwhat is written stays in {self.spec.out}; "
                     "run the same command again to go on")  # fmt: skip
            return EXIT_JOB_FAILED

    # ------------------------------------------------------------------ before

    def _resources(self) -> Resources:
        import ray

        r = self.spec.resources
        gpus = int(ray.cluster_resources().get("GPU", 0))
        gpus_per_actor = r.gpus_per_actor if r.gpus_per_actor >= 0 else (1 if gpus else 0)
        actors = r.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
        threads = r.threads or (0 if gpus_per_actor else len(os.sched_getaffinity(0)))
        return Resources(actors, gpus_per_actor, r.cpus_per_actor, threads, r.batch_size, r.rows_per_part)

    def _probe(self, resources: Resources) -> Described:
        """Resolves device and dtype on a worker like the actors' (the driver may have no GPU)."""
        import ray

        probe = ray.remote(num_cpus=0, num_gpus=resources.gpus_per_actor)(_describe)
        return ray.get(probe.remote(self.spec.settings))

    def _identity(self, described: Described) -> Identity:
        settings = self.spec.settings
        dim = described.embedding_dim * (2 if self.spec.pooling == Pooling.CLS_MEAN.value else 1)
        return Identity(settings.model, settings.revision or "", described.dtype, described.embedding_dim,
                        self.spec.pooling, self.spec.normalize, dim)  # fmt: skip

    def _open(self, described: Described) -> Manifest:
        """The job's manifest: the one in OUT_DIR if it matches, a new one if OUT_DIR is new (or --overwrite)."""
        identity = self._identity(described)
        store, spec = self.store, self.spec
        text = store.read_text(MANIFEST)
        if spec.overwrite:
            store.clear()
        elif text is None and store.exists() and not store.is_empty():
            raise UsageError(f"{spec.out} exists and is not an offline job's folder (no {MANIFEST}); "
                             "give --overwrite to replace what is in it, or name another folder")  # fmt: skip
        elif text is not None:
            previous = Manifest.from_text(text, f"{spec.out}/{MANIFEST}")
            try:
                previous.check_resumable(identity, self.sources)
            except ManifestMismatch as exc:
                raise ManifestMismatch(f"cannot continue {spec.out}: {exc}; give --overwrite to start again, "
                                       "or write to another folder") from None  # fmt: skip
            return previous
        manifest = Manifest(identity, self.sources)
        store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
        return manifest

    # ------------------------------------------------------------------ the run

    def _run(self, paths: list[str], resources: Resources, described: Described, manifest: Manifest) -> int:
        started = time.monotonic()
        done = self.store.done_ids()
        if done:
            self.say(f"continuing {self.spec.out}: {len(done)} images written before")
        selector = inputs.Selector(paths, done)
        dataset = self._dataset(paths, selector, resources, described, done)
        embedded, failed = 0, 0
        if dataset is not None:
            if manifest.complete:  # new files under the same sources: not complete until this run ends
                manifest = manifest.with_updates(complete=False)
                self.store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                bad = int(sum(1 for code in batch["error_code"] if code))
                failed += bad
                embedded += len(batch["error_code"]) - bad
                self.timeline.append((time.monotonic(), len(batch["error_code"])))
        tally = self.store.finish()
        manifest = manifest.with_updates(complete=True, rows=tally.rows, failed=len(tally.failed))
        self.store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
        elapsed = time.monotonic() - started
        return self._summary(tally, manifest, elapsed, embedded, failed, len(done), selector)

    def _dataset(self, paths: list[str], selector: inputs.Selector, resources: Resources,
                 described: Described, done: set[str]) -> Any:  # fmt: skip
        """The lazy Ray Dataset of the stages, or None when every listed file is done."""
        import ray

        settings = self.spec.settings
        try:
            files = ray.data.read_binary_files(paths, include_paths=True, partition_filter=selector)
        except ValueError as exc:  # Ray found no files
            if selector.listed and not selector.kept:  # our filter left nothing: all done
                return None
            raise UsageError(str(exc)) from None
        actor_settings = _actor_settings(settings, described)
        archived = frozenset(i for i in done if _in_archive(i))
        decoded = files.map_batches(
            decode_batch,
            batch_size=16,
            fn_kwargs={"image_size": described.image_size, "limits": limits_of(settings), "done": archived},
            num_cpus=1,
            # What one decode worker may take (a Python worker, the largest image allowed in RGB and gray). Declaring
            # it also keeps Ray from fusing the decode tasks into the embed actors, where decoding would wait for
            # the model. Ray Data restarts a dead actor and retries its batches by default.
            memory=4 * settings.max_image_pixels + (256 << 20),
        )
        embedded = decoded.map_batches(
            EmbedActor,
            batch_size=resources.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs=dict(
                settings=actor_settings,
                pooling=self.spec.pooling,
                normalize=self.spec.normalize,
                threads=resources.threads,
                fault=self.spec.fault,
            ),
            compute=ray.data.ActorPoolStrategy(size=resources.actors),
            num_gpus=resources.gpus_per_actor,
            num_cpus=resources.cpus_per_actor,
        )
        return embedded.map_batches(
            write_batch,
            batch_size=resources.rows_per_part,
            batch_format="numpy",
            fn_kwargs={"store": self.store, "fault": self.spec.fault},
            num_cpus=0.25,
        )

    # ------------------------------------------------------------------ the summary

    def _summary(self, tally: Tally, manifest: Manifest, elapsed: float, embedded: int, failed: int,
                 before: int, selector: inputs.Selector) -> int:  # fmt: skip
        rows_ok = tally.rows - len(tally.failed)
        ran = embedded + failed
        self.say(f"embedded {rows_ok} of {tally.rows} images (dim {manifest.identity.dim}) in {elapsed:.2f} s, "
                 f"{ran / max(elapsed, 1e-9):.1f} images/s -> {self.spec.out}")  # fmt: skip
        details = [f"this run: {embedded} embedded, {failed} failed, {before} written before"]
        if selector.non_images:
            details.append(f"{selector.non_images} non-image files skipped")
        if tally.duplicates_removed:
            details.append(f"{tally.duplicates_removed} repeated rows of retried tasks removed")
        if tally.unreadable_parts:
            details.append(f"{tally.unreadable_parts} unreadable parts removed (their images are to be redone)")
        self.say("; ".join(details))
        if not tally.failed:
            return EXIT_OK
        self.say(f"{len(tally.failed)} image(s) failed (rows with an error in {self.spec.out}/data):")
        for image_id in sorted(tally.failed)[:20]:
            self.say(f"  {image_id}: {tally.failed[image_id]}")
        if len(tally.failed) > 20:
            self.say(f"  ... and {len(tally.failed) - 20} more")
        return EXIT_ITEMS_FAILED


def _actor_settings(settings: Settings, described: Described) -> Settings:
    """Every actor runs the dtype the manifest records, whatever its own node would pick for auto."""
    from dataclasses import replace

    return replace(settings, dtype=described.dtype, device=settings.device)


def _in_archive(image_id: str) -> bool:
    lowered = image_id.lower()
    return any(f"{suffix}/" in lowered for suffix in inputs.ARCHIVE_SUFFIXES)
