"""A dataset job: every input embedded exactly once, durably, resumable, in input order.

    python -m client embed photos/ shards/*.tar --server HOST:PORT -o photos.parquet

The inputs are listed lazily in their deterministic order (client/sources.py);
each distinct id gets the next position (a repeated id is embedded once, at
its first place). Ids that already have a row in the job's shards (or failed
before, unless `--retry-failed`) are skipped; the others stream through the
backend, a bounded number of requests in flight, while results are committed
to shards as they arrive (client/shards.py). When the listing is exhausted,
the shards are consolidated into OUT in position order (client/consolidate.py)
and the failures into OUT's failures file. Without OUT, JSON lines go to
stdout as they come, and nothing is kept for a resume. A job may write each
image's patch tokens instead of its pooled embedding (`JobOptions.tokens`):
the same machinery, with a row of [rows, cols, D] (client/output.py `Layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container
from pathlib import Path
from typing import IO, Any

from client import manifest as manifests
from client.backends import Backend
from client.consolidate import consolidate, failures_path, write_failures
from client.errors import EmbedClientError, ItemError, ItemResult, UsageError, fix_before_rerun
from client.job_options import JobError, JobOptions, layout, row_of, sizes
from client.listing import Listing, Skip, pairs
from client.manifest import Identity, Manifest, ManifestMismatch
from client.output import JsonLinesWriter, Layout, ids_path
from client.progress import Progress, Waiting
from client.shards import JobLocked, JobState, ShardWriter, parts_folder
from client.sources import InputCounter, Inputs

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_JOB_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _check_writable(out: Path) -> None:
    """Refuses an OUT that cannot be written because a part of its path is a file, or it is a folder."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder; -o takes a file name (.npy, .npz or .parquet)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot write {out}: {parent} is a file, not a folder; name another OUT")
            return


class Job:
    """One run of a job; `run()` returns the exit status and reports on `stderr`."""

    def __init__(
        self, options: JobOptions, backend: Callable[[], Backend], stdout: IO[str], stderr: IO[str],
        waiting: Waiting | None = None,
    ) -> None:  # fmt: skip
        self.options = options
        self.make_backend = backend
        self.waiting = waiting
        self.stdout, self.stderr = stdout, stderr
        self.failures: dict[str, ItemError] = {}
        self.embedded = 0
        self.layout = Layout()
        self.manifest: Manifest = None  # type: ignore[assignment]  # set once the job's state is open

    def say(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def run(self) -> int:
        if self.options.out is None:
            return self._run(None)
        state = JobState(parts_folder(self.options.out))
        try:
            return self._run(state)
        finally:
            state.close()

    def _run(self, state: JobState | None) -> int:
        try:
            previous = self._check(state)
            backend = self.make_backend()
        except (UsageError, ValueError) as exc:  # ManifestMismatch is a ValueError too
            self.say(f"error: {exc}")
            return EXIT_USAGE
        try:
            return self._with_backend(backend, state, previous)
        except (UsageError, ManifestMismatch, JobLocked) as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except OSError as exc:  # a full disk, a folder gone: what was committed stays committed
            self.say(f"error: the job stopped: {exc}")
            return EXIT_JOB_FAILED
        finally:
            backend.close()

    def _check(self, state: JobState | None) -> Manifest | None:
        """The job to resume, if any; refuses what would silently mix or clobber outputs."""
        out = self.options.out
        if state is None or out is None:
            return None
        _check_writable(out)
        previous = None if self.options.overwrite else manifests.read(state.manifest_path)
        if previous is None and self.options.resume:
            raise UsageError(f"nothing to resume: {state.manifest_path} does not exist")
        if previous is None and not self.options.overwrite and out.exists():
            raise UsageError(f"{out} exists and has no job state beside it ({state.folder}/); "
                             "give --overwrite to replace it")  # fmt: skip
        return previous

    def _with_backend(self, backend: Backend, state: JobState | None, previous: Manifest | None) -> int:
        options = self.options
        try:
            identity = backend.identity(options.pooling, options.normalize, options.tokens)
        except EmbedClientError as exc:
            self.say(f"error: {exc}; nothing written")
            return EXIT_JOB_FAILED
        if state is None:
            return self._stream(backend, identity)
        state.open()
        if options.overwrite:
            state.clear()
            for stale in _files_of(options.out):  # type: ignore[arg-type]
                stale.unlink(missing_ok=True)
        else:  # read again under the lock: another run may have begun the job since
            previous = manifests.read(state.manifest_path)
        job = Manifest(identity, options.inputs.arguments, _list_name(options.inputs), str(options.out))
        if previous is not None:
            hint = "; give --overwrite to start again, or write to another OUT"
            try:
                previous.check_resumable(identity, job.inputs, job.from_list)
            except ManifestMismatch as exc:
                raise ManifestMismatch(f"cannot resume {state.folder}/: {exc}{hint}") from None
            job = previous if previous.identity.dim or not identity.dim else previous.with_updates(identity=identity)
        self.manifest = job
        manifests.write(state.manifest_path, job)
        return self._durable(backend, state)

    # ------------------------------------------------------------------ durable (with OUT)

    def _save(self, state: JobState, **changes: Any) -> None:
        self.manifest = self.manifest.with_updates(**changes)
        manifests.write(state.manifest_path, self.manifest)

    def _durable(self, backend: Backend, state: JobState) -> int:
        options = self.options
        was_complete = self.manifest.complete
        out: Path = options.out  # type: ignore[assignment]
        done = state.done_ids()
        self.failures = state.failures(done)
        skip = Skip(done, None if options.retry_failed else self.failures)
        listing = Listing(skip)
        self.layout = layout(self.manifest.identity)
        writer = ShardWriter(state, options.shard_rows, options.shard_seconds, dtype=self.layout.dtype)
        if done:
            self.say(f"resuming {state.folder}/: {len(done)} images done before" +
                     (f", {len(self.failures)} failed" if self.failures else ""))  # fmt: skip

        def add(result: ItemResult) -> None:
            row = row_of(result, self.options.tokens)
            if not self.layout.row_bytes:  # a RunPod job learns its row size from the first row
                self.layout = Layout(row.shape, self.layout.dtype)
                self._save(state, identity=dataclasses.replace(self.manifest.identity, dim=row.shape[-1]))
            if row.shape != self.layout.shape:
                raise JobError(f"the service answered {sizes(row.shape)} values for {result.id!r}, but this job's "
                               f"rows have {sizes(self.layout.shape)}: did a server change model?")  # fmt: skip
            writer.add(result.id, row)
            self.failures.pop(result.id, None)

        def fail(result: ItemResult) -> None:
            writer.fail(result.id, result.error)  # type: ignore[arg-type]
            self.failures[result.id] = result.error  # type: ignore[assignment]

        def commit() -> None:
            if writer.pending and self.manifest.complete:  # OUT no longer holds everything committed
                self._save(state, complete=False)
            writer.commit()

        progress = Progress(self.stderr, options.progress, options.log_every_s, self.waiting)
        outcome = self._loop(backend, listing, skip, progress, add, fail, commit, writer.due, out)
        saved = len(done) + writer.committed_rows
        if outcome is not None:
            stop, fix = outcome
            saved_in = f"{saved} images are saved in {state.folder}/"
            if fix is None:
                self.say(f"{stop}; {saved_in}; run the same command again to resume")
            else:
                self.say(f"{stop}; {saved_in}; the same command would stop the same way: {fix}, then run it "
                         "again to resume")  # fmt: skip
            return EXIT_INTERRUPTED if stop == "interrupted" else EXIT_JOB_FAILED
        positions = listing.positions
        if not positions:
            if not done and not state.shards():
                state.clear()  # no job to resume: the same OUT stays free for other inputs
            return self._nothing_to_embed(listing)
        left_out = sum(1 for image_id in done if image_id not in positions)
        if not was_complete or writer.committed_rows or writer.committed_failures or left_out or not out.exists():
            result = consolidate(state.shards(), out, positions, self.layout)
            if result.dim and not self.layout.row_bytes:
                self.layout = Layout((result.dim,))
            failed = write_failures(out, self.failures, positions)
            self._save(state, complete=True, rows=result.rows, failed=failed)
            rows = result.rows
            if result.left_out:
                self.say(f"note: {result.left_out} rows of earlier runs are of images no longer among the "
                         "inputs; they are left out of the output")  # fmt: skip
        else:
            rows = self.manifest.rows
            self.say(f"nothing new: {out} is up to date")
        return self._summary(listing, progress, rows, out)

    def _loop(self, backend: Backend, listing: Listing, skip: Container[str], progress: Progress,
              add: Callable[[ItemResult], None], fail: Callable[[ItemResult], None],
              commit: Callable[[], None], due: Callable[[], bool], out: Path | None
              ) -> tuple[str, str | None] | None:  # fmt: skip
        """Runs the inputs through the backend; returns None when done, else why it stopped and what
        must change before a rerun gets further (None: nothing)."""
        counter = InputCounter(self.options.inputs, skip) if progress.mode != "off" else None
        if counter is not None:
            counter.start()
        selected = pairs(self.options.inputs, listing, out is not None and out.suffix.lower() == ".npy")
        batches = backend.embed_batches(selected, self.options.pooling, self.options.normalize, self.options.tokens)
        try:
            for batch in batches:
                failed = 0
                for result in batch:
                    if result.ok:
                        add(result)
                        self.embedded += 1
                    else:
                        fail(result)
                        failed += 1
                    if due():  # by result, not by request: a request of patch tokens can hold 100 MiB
                        commit()
                if counter is not None and counter.total is not None:
                    progress.set_total(counter.total)
                progress.update(len(batch), failed)
            commit()
            return None
        except KeyboardInterrupt:
            commit()
            return "interrupted", None
        except EmbedClientError as exc:
            commit()
            return f"error: the job stopped: {exc}", fix_before_rerun(exc)
        finally:
            if hasattr(batches, "close"):
                batches.close()
            if counter is not None:
                counter.stopped = True
            progress.close()

    # ------------------------------------------------------------------ JSON lines on stdout (no OUT)

    def _stream(self, backend: Backend, identity: Identity) -> int:
        writer = JsonLinesWriter(self.stdout)
        listing = Listing(set())
        self.layout = layout(identity)

        def add(result: ItemResult) -> None:
            self.layout = Layout((len(result.embedding),))  # type: ignore[arg-type]
            writer.add([result.id], result.embedding[None, :])  # type: ignore[index]

        def fail(result: ItemResult) -> None:
            self.failures[result.id] = result.error  # type: ignore[assignment]

        progress = Progress(self.stderr, self.options.progress, self.options.log_every_s, self.waiting)
        outcome = self._loop(backend, listing, set(), progress, add, fail, writer.close, lambda: False, None)
        if outcome is not None:
            stop, fix = outcome
            self.say(stop if fix is None else f"{stop}; {fix}")
            return EXIT_INTERRUPTED if stop == "interrupted" else EXIT_JOB_FAILED
        if not listing.positions:
            return self._nothing_to_embed(listing)
        return self._summary(listing, progress, self.embedded, None)

    def _nothing_to_embed(self, listing: Listing) -> int:
        """The inputs exist but hold no image (an archive or list of none): a usage error, as a glob of none is."""
        skipped = f" ({listing.tally.non_images} non-image files skipped)" if listing.tally.non_images else ""
        self.say(f"error: nothing to embed: the inputs hold no image files{skipped}; nothing written")
        return EXIT_USAGE

    # ------------------------------------------------------------------ the summary

    def _summary(self, listing: Listing, progress: Progress, rows: int, out: Path | None) -> int:
        elapsed = progress.elapsed
        total = len(listing.positions)
        ran = progress.done
        where = "" if out is None else f" -> {out}" + (f" (ids in {ids_path(out)})" if out.suffix == ".npy" else "")
        self.say(f"embedded {rows} of {total} images ({self.layout.describe()}) in {elapsed:.2f} s, "
                 f"{ran / max(elapsed, 1e-9):.1f} images/s{where}")  # fmt: skip
        details = [f"this run: {self.embedded} embedded, {progress.failed} failed, {listing.skipped} done before"]
        if listing.tally.non_images:
            details.append(f"{listing.tally.non_images} non-image files skipped")
        if listing.repeated:
            shown = ", ".join(repr(i) for i in listing.repeated_examples)
            details.append(f"{listing.repeated} inputs skipped as repeats of an earlier id ({shown})")
        self.say("; ".join(details))
        failed = [(listing.positions[i], i, e) for i, e in self.failures.items() if i in listing.positions]
        if not failed:
            return EXIT_OK
        failed.sort()
        listed = "" if out is None else f" (listed in {failures_path(out)})"
        self.say(f"{len(failed)} image(s) failed{listed}:")
        for _, image_id, error in failed[:20]:
            self.say(f"  {image_id}: {error}")
        if len(failed) > 20:
            self.say(f"  ... and {len(failed) - 20} more")
        return EXIT_ITEMS_FAILED


def _files_of(out: Path) -> tuple[Path, ...]:
    """The files a job writing `out` makes beside its state folder: its own, never another output's."""
    sidecar = (ids_path(out),) if out.suffix.lower() == ".npy" else ()
    return (out, *sidecar, failures_path(out))


def _list_name(inputs: Inputs) -> str | None:
    return None if inputs.from_list is None else str(inputs.from_list)
