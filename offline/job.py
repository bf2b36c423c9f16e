"""One run of an offline job on Ray: check OUT_DIR, skip what is written, run the stages, leave one row per id.

Before Ray starts, the driver checks the inputs, the model (it exists and is
a DINOv2) and OUT_DIR, so that a mistake costs a second and writes nothing.
It then holds OUT_DIR's lock (offline/lock.py) for the whole run, lists the
inputs through Ray's reader, skipping every id that already has a row (kept
as digests: offline/ledger.py); the stages of offline/stages.py do the rest
on the cluster's workers; the driver only counts the ids and errors the
write stage passes on. When the dataset is exhausted, `Store.finish` leaves
exactly one row per id. A run killed at any point (the driver SIGKILLed, a
worker or a node lost) keeps every part already renamed into OUT_DIR, and the
same command run again embeds only the ids without a row.

Exit status, as the client's: 0 every image embedded; 1 some images failed
(their rows carry the error); 2 bad usage (no such input, not a DINOv2,
another job's OUT_DIR, OUT_DIR in use); 3 the job stopped (Ray, the model or
the storage failed): what is written stays.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from offline import sources as inputs
from offline.embed import EmbedActor
from offline.ledger import DigestSet
from offline.lock import Locked, OutLock
from offline.manifest import Identity, Manifest, ManifestMismatch
from offline.stages import Fault, decode_batch, limits_of, write_batch
from offline.store import MANIFEST, Store, StoreError, Tally
from server.config import Settings
from server.errors import ModelLoadError
from server.geometry import Geometry
from server.model import Pooling
from server.preprocess import Normalization, model_input
from server.source import check_supported, locate

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
    retry_failed: bool = False  # failed rows are tried again (INTERNAL ones always are)
    resources: Resources = field(default_factory=Resources)
    fault: Fault | None = None  # tests only


@dataclass(frozen=True)
class Described:
    """What the actors will run, as resolved where they run (a GPU node resolves auto to bfloat16)."""

    device: str
    dtype: str
    embedding_dim: int
    geometry: Geometry  # the served input: --image-size and --preprocess resolved


def _describe(settings: Settings) -> Described:
    from transformers import AutoConfig

    from server.model import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    try:
        config = AutoConfig.from_pretrained(settings.model, revision=settings.revision)
    except OSError as exc:
        raise ModelLoadError.cannot_load(settings.model, exc) from None
    norm = _model_input(settings, int(config.patch_size))
    return Described(device.type, dtype, int(config.hidden_size), norm.geometry)


def _model_input(settings: Settings, patch_size: int) -> Normalization:
    """The input the actors will serve; an --image-size off the patch grid is refused here, in one line."""
    return model_input(settings.model, settings.revision, False, settings.image_size, settings.preprocess, patch_size)


class Job:
    """`run()` returns the exit status; it reports on `stderr` and leaves progress bars to Ray."""

    def __init__(self, spec: JobSpec, stderr: IO[str]) -> None:
        self.spec = spec
        self.stderr = stderr
        self.store = Store(spec.out)
        self.out = spec.out.rstrip("/") or spec.out  # as shown to the user
        self.timeline: list[tuple[float, int]] = []  # (time.monotonic(), rows) as the write stage hands them on

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources as recorded and compared: `photos/` and `photos` are the same argument."""
        return tuple(s if inputs.is_uri(s) else os.path.normpath(s) for s in self.spec.sources)

    def say(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def run(self, connect: Callable[[], None] = lambda: None) -> int:
        """Checks everything it can without Ray, then `connect()`s (starts or joins Ray) and runs."""
        import ray

        try:
            paths, root = self._check()
        except (inputs.InputError, UsageError, ModelLoadError, ValueError) as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except OSError as exc:
            self.say(f"error: cannot read {self.out}: {exc}")
            return EXIT_JOB_FAILED
        try:
            connect()
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self.say(f"error: cannot start or join Ray: {_first_line(exc)}")
            return EXIT_JOB_FAILED
        try:
            resources = self._resources()
            described = self._probe(resources)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ModelLoadError):
                self.say(f"error: {exc.cause}")
                return EXIT_USAGE
            self.say(f"error: the job stopped before any work: {_first_line(exc)}")
            return EXIT_JOB_FAILED
        except (ray.exceptions.RayError, OSError) as exc:
            self.say(f"error: the job stopped before any work: {_first_line(exc)}")
            return EXIT_JOB_FAILED
        try:
            with OutLock(self.store) as lock:
                manifest = self._open(described)
                return self._run(paths, root, resources, described, manifest, lock.token)
        except (UsageError, ManifestMismatch, Locked) as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except StoreError as exc:
            self.say(f"error: {exc}")
            return EXIT_JOB_FAILED
        except (ray.exceptions.RayError, OSError) as exc:
            self.say(f"error: the job stopped: {_first_line(exc)}\nwhat is written stays in {self.out}; "
                     "run the same command again to go on")  # fmt: skip
            return EXIT_JOB_FAILED

    # ------------------------------------------------------------------ before

    def _check(self) -> tuple[list[str], str]:
        """The inputs, the folder ids are relative to, the model and OUT_DIR, checked before Ray starts."""
        paths = inputs.expand(self.spec.sources)
        root = inputs.root_of(paths)
        Pooling(self.spec.pooling)
        settings = self.spec.settings
        config = check_supported(locate(settings.model, settings.revision, settings.hub_timeout_s))
        _model_input(settings, int(config.get("patch_size", 14)))
        self._foreign_folder()
        return paths, root

    def _foreign_folder(self) -> None:
        store = self.store
        if not self.spec.overwrite and store.read_text(MANIFEST) is None and store.exists() and not store.is_empty():
            raise UsageError(f"{self.out} exists and is not an offline job's folder (no {MANIFEST}); "
                             "give --overwrite to replace what is in it, or name another folder")  # fmt: skip

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
                        self.spec.pooling, self.spec.normalize, dim, described.geometry.size,
                        settings.preprocess)  # fmt: skip

    def _open(self, described: Described) -> Manifest:
        """The job's manifest (under the lock): the one in OUT_DIR if it matches, else a new one.

        A manifest that differs is replaced only with `--overwrite`, or when no row was written under it
        (a start that failed): nothing would be mixed.
        """
        identity = self._identity(described)
        store, spec = self.store, self.spec
        self._foreign_folder()
        text = store.read_text(MANIFEST)
        if spec.overwrite:
            store.clear()
        elif text is not None:
            previous = Manifest.from_text(text, f"{self.out}/{MANIFEST}")
            try:
                previous.check_resumable(identity, self.sources)
            except ManifestMismatch as exc:
                if store.parts():
                    raise ManifestMismatch(f"cannot continue {self.out}: {exc}; give --overwrite to start again, "
                                           "or write to another folder") from None  # fmt: skip
                self.say(f"{self.out}: no row was written under its manifest ({previous.identity.describe()}); "
                         "starting again")  # fmt: skip
            else:
                return previous
        manifest = Manifest(identity, self.sources)
        store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
        return manifest

    # ------------------------------------------------------------------ the run

    def _run(self, paths: list[str], root: str, resources: Resources, described: Described,
             manifest: Manifest, run: str) -> int:  # fmt: skip
        started = time.monotonic()
        self.store.remove_temporaries()
        ledger = self.store.scan()
        done, torn = ledger.done(self.spec.retry_failed), ledger.torn  # 16 bytes a done id: all the run holds
        del ledger
        if len(done):
            self.say(f"continuing {self.out}: {len(done)} images written before")
        selector = inputs.Selector(paths, done, root)
        dataset = self._dataset(paths, root, selector, resources, described, done, run)
        embedded, failed, before = 0, 0, len(done)
        del done
        if dataset is not None:
            if manifest.complete:  # new files under the same sources: not complete until this run ends
                manifest = manifest.with_updates(complete=False)
                self.store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                bad = int(sum(1 for code in batch["error_code"] if code))
                failed += bad
                embedded += len(batch["error_code"]) - bad
                self.timeline.append((time.monotonic(), len(batch["error_code"])))
        del dataset
        selector.done = DigestSet.of([])  # the ledger of `finish` takes its place
        tally = self.store.finish(self.store.scan())
        manifest = manifest.with_updates(complete=True, rows=tally.rows, failed=tally.failed)
        self.store.write_atomic(MANIFEST, manifest.to_text().encode("utf-8"))
        elapsed = time.monotonic() - started
        tally = replace(tally, torn_parts=tally.torn_parts + torn)
        return self._summary(tally, manifest, elapsed, embedded, failed, before, selector)

    def _dataset(self, paths: list[str], root: str, selector: inputs.Selector, resources: Resources,
                 described: Described, done: DigestSet, run: str) -> Any:  # fmt: skip
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
        decoded = files.map_batches(
            decode_batch,
            batch_size=16,
            fn_kwargs={"geometry": described.geometry, "limits": limits_of(settings), "done": done, "root": root},
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
            fn_kwargs={"store": self.store, "run": run, "fault": self.spec.fault},
            num_cpus=0.25,
        )

    # ------------------------------------------------------------------ the summary

    def _summary(self, tally: Tally, manifest: Manifest, elapsed: float, embedded: int, failed: int,
                 before: int, selector: inputs.Selector) -> int:  # fmt: skip
        rows_ok = tally.rows - tally.failed
        ran = embedded + failed
        rate = f", {ran / max(elapsed, 1e-9):.1f} images/s" if ran else ""
        self.say(f"embedded {rows_ok} of {tally.rows} images (dim {manifest.identity.dim}) in {elapsed:.2f} s"
                 f"{rate} -> {self.out}")  # fmt: skip
        details = [f"this run: {embedded} embedded, {failed} failed, {before} written before"]
        if selector.non_images:
            details.append(f"{selector.non_images} non-image files skipped")
        if tally.duplicates_removed:
            details.append(f"{tally.duplicates_removed} repeated rows of retried tasks removed")
        if tally.torn_parts:
            details.append(f"{tally.torn_parts} incomplete parts removed (their images were embedded again)")
        self.say("; ".join(details))
        if not tally.failed:
            return EXIT_OK
        self.say(f"{tally.failed} image(s) failed (rows with an error in {self.out}/data; "
                 "--retry-failed tries them again):")  # fmt: skip
        for image_id, error in sorted(tally.failures):
            self.say(f"  {image_id}: {error}")
        if tally.failed > len(tally.failures):
            self.say(f"  ... and {tally.failed - len(tally.failures)} more")
        return EXIT_ITEMS_FAILED


def _actor_settings(settings: Settings, described: Described) -> Settings:
    """Every actor runs the dtype the manifest records, whatever its own node would pick for auto."""
    return replace(settings, dtype=described.dtype, device=settings.device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
