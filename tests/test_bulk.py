"""Dataset jobs (`python -m client embed ... -o OUT`): interrupted at several points and resumed, the
output equals an uninterrupted run row for row; refusals; the failures file; --retry-failed."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from client.cli import main
from client.connection import RetryPolicy
from client.consolidate import failures_path
from client.shards import JobState, parts_folder, read_ids
from tests import images
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close

ROOT = Path(__file__).resolve().parent.parent
BROKEN = {"b/broken.png": b"not a png", "c/empty.jpg": b"", "a/truncated.jpg": images.jpeg(64, 64, seed=1)[:200]}


def run(*argv: str) -> tuple[int, str, str]:
    """`main(argv)` in-process; the exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def make_dataset(root: Path, count: int) -> dict[str, bytes]:
    """`count` distinct small PNGs in three subfolders, the BROKEN files, and two files that are not images."""
    written = {}
    for index in range(count):
        image_id = f"{'abc'[index % 3]}/img{index:04d}.png"
        written[image_id] = images.png(32, 24, seed=index)
    written.update(BROKEN)
    for image_id, data in written.items():
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        (root / image_id).write_bytes(data)
    (root / "README.md").write_text("not an image")
    (root / "a" / "labels.csv").write_text("id,label\n")
    return written


def read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    return table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def read_npy(path: Path) -> tuple[list[str], np.ndarray]:
    return path.with_suffix(".ids.txt").read_text().splitlines(), np.load(path)


def failures(out: Path) -> dict[str, str]:
    lines = failures_path(out).read_text().splitlines()
    return {entry["id"]: entry["code"] for entry in map(json.loads, lines)}


_SHARD_ROWS: dict[tuple[Path, int], int] = {}


def committed(out: Path) -> int:
    """Rows in the job's committed shards (each read once: a shard never changes once committed)."""
    total = 0
    for shard in JobState(parts_folder(out)).shards() if parts_folder(out).exists() else []:
        key = (shard, shard.stat().st_ino)
        if key not in _SHARD_ROWS:
            _SHARD_ROWS[key] = len(read_ids(shard))
        total += _SHARD_ROWS[key]
    return total


def start(*argv: str) -> subprocess.Popen[str]:
    """The job as a process that a SIGINT interrupts, also where this test run ignores SIGINT (a shell
    starts a background job so, and an ignored signal stays ignored across exec; a handler does not)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "client", "embed", *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before the interrupt point: {proc.communicate()}"
        assert time.monotonic() < deadline, "the interrupt point never came"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("bulk") / "photos"
    return root, make_dataset(root, 300)


@pytest.fixture(scope="module")
def slow_server(make_server_module: Any, runner: Any) -> RunningServer:
    """The tiny model, each forward pass 40 ms slower: a job of 300 images takes a few seconds."""
    controlled = ControlledRunner(runner)
    controlled.delay_s = 0.04
    return make_server_module(runner_=controlled)


def model_of(server: RunningServer) -> ControlledRunner:
    return server.server.service.runner  # type: ignore[return-value]


def held_past(model: ControlledRunner, images: int) -> None:
    """Lets `images` more images through the model; the batches after wait in it until `allow(inf)`.

    A job interrupted at a point before that cannot have finished first, however slow the machine.
    """
    model.allow(model.images_seen + images)


@pytest.fixture(scope="module")
def uninterrupted(server: RunningServer, dataset: tuple[Path, dict[str, bytes]],
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:  # fmt: skip
    out = tmp_path_factory.mktemp("whole") / "whole.parquet"
    code, _, stderr = run("embed", str(dataset[0]), "--server", server.address, "-o", str(out))
    assert code == 1, stderr
    return read_parquet(out)


def test_an_uninterrupted_run_has_one_row_per_good_image_in_listing_order(
    uninterrupted: tuple[list[str], np.ndarray], dataset: tuple[Path, dict[str, bytes]], reference: Reference
) -> None:
    ids, rows = uninterrupted
    good = sorted(set(dataset[1]) - set(BROKEN))  # folders walked sorted: a/..., b/..., c/...
    assert ids == good
    for image_id in ids[::37]:
        assert_close(rows[ids.index(image_id)], reference.embed(dataset[1][image_id]), image_id)


def test_sigkill_three_times_then_resume_equals_an_uninterrupted_run(
    slow_server: RunningServer, server: RunningServer, dataset: tuple[Path, dict[str, bytes]],
    uninterrupted: tuple[list[str], np.ndarray], tmp_path: Path,
) -> None:  # fmt: skip
    out = tmp_path / "out.parquet"
    argv = (str(dataset[0]), "--server", slow_server.address, "-o", str(out),
            "--batch-size", "8", "--window", "2", "--shard-size", "16")  # fmt: skip
    model = model_of(slow_server)
    try:
        for fraction in (0, 1 / 3, 2 / 3):  # as soon as the job has begun, then a third and two thirds in
            # Enough to commit the shards up to the point (a shard, the killed job's batch left in the model
            # and a batch more), never the whole job: 200 + 48 < 300.
            target = round(fraction * 300)
            held_past(model, target - committed(out) + 48)
            proc = start(*argv)
            wait_for(lambda t=target: (parts_folder(out) / "manifest.json").exists() and committed(out) >= t, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        model.allow(float("inf"))
    before = committed(out)
    assert 200 <= before < 300 and not out.exists()
    code, _, stderr = run("embed", str(dataset[0]), "--server", server.address, "-o", str(out))
    assert code == 1, stderr
    assert f"{before} images done before" in stderr and "embedded 300 of 303 images" in stderr
    ids, rows = read_parquet(out)
    assert ids == uninterrupted[0] and len(set(ids)) == len(ids)
    assert_close(rows, uninterrupted[1], "resumed after three SIGKILLs")
    assert failures(out) == dict.fromkeys(sorted(BROKEN), "INVALID_ARGUMENT")


def test_sigint_keeps_what_arrived_and_exits_130(
    slow_server: RunningServer, dataset: tuple[Path, dict[str, bytes]], uninterrupted: tuple[list[str], np.ndarray],
    tmp_path: Path,
) -> None:  # fmt: skip
    out = tmp_path / "out.npy"
    argv = (str(dataset[0]), "--server", slow_server.address, "-o", str(out),
            "--batch-size", "8", "--window", "2", "--shard-size", "64")  # fmt: skip
    model = model_of(slow_server)
    held_past(model, 128 + 48)  # two shards of 64 (and batches left in the model), never the whole job
    try:
        proc = start(*argv)
        wait_for(lambda: committed(out) >= 128, proc)
        seen = committed(out)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        model.allow(float("inf"))
    assert proc.returncode == 130, stderr
    saved = committed(out)  # what had arrived since the last shard is committed on the way out
    assert seen <= saved < 300 and f"interrupted; {saved} images are saved in {parts_folder(out)}/" in stderr
    code, _, stderr = run("embed", "--resume", "-o", str(out), "--server", slow_server.address, "--batch-size", "32")
    assert code == 1 and f"{saved} images done before" in stderr, stderr
    ids, rows = read_npy(out)
    assert ids == uninterrupted[0]
    assert_close(rows, uninterrupted[1], "resumed after SIGINT")


def test_running_a_finished_job_again_changes_nothing_and_new_files_are_added_in_order(
    server: RunningServer, tmp_path: Path, reference: Reference
) -> None:
    root = tmp_path / "grows"
    written = make_dataset(root, 12)
    out = tmp_path / "o.parquet"
    argv = ("embed", str(root), "--server", server.address, "-o", str(out))
    assert run(*argv)[0] == 1
    first = read_parquet(out)
    stamp = out.stat().st_mtime_ns
    code, _, stderr = run(*argv)
    assert code == 1 and "this run: 0 embedded, 0 failed, 15 done before" in stderr
    assert out.stat().st_mtime_ns == stamp and read_parquet(out)[0] == first[0]
    (root / "a" / "img0000b.png").write_bytes(images.png(32, 24, seed=99))  # sorts between img0000 and img0003
    code, _, stderr = run(*argv)
    ids, rows = read_parquet(out)
    assert code == 1 and "this run: 1 embedded" in stderr
    assert ids == sorted([*set(written) - set(BROKEN), "a/img0000b.png"])
    assert_close(rows[1], reference.embed(images.png(32, 24, seed=99)), "added later")


def test_resuming_with_another_model_or_options_is_refused_until_overwrite(
    server: RunningServer, make_server: Any, tmp_path: Path
) -> None:
    root = tmp_path / "few"
    make_dataset(root, 3)
    out = tmp_path / "o.npy"
    assert run("embed", str(root), "--server", server.address, "-o", str(out))[0] == 1
    other = make_server(model="facebook/dinov2-other")
    code, _, stderr = run("embed", str(root), "--server", other.address, "-o", str(out))
    assert code == 2 and "cannot resume" in stderr and "facebook/dinov2-other" in stderr, stderr
    assert "--overwrite" in stderr
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(out), "--pooling", "mean")
    assert code == 2 and "pooling 'cls' vs 'mean'" in stderr, stderr
    cropping = make_server(preprocess="checkpoint")  # what its Info says is what the manifest compares
    code, _, stderr = run("embed", str(root), "--server", cropping.address, "-o", str(out))
    assert code == 2 and "preprocess 'card' vs 'checkpoint'" in stderr, stderr
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(out), "--normalize")
    assert code == 2 and "normalize False vs True" in stderr, stderr
    code, _, stderr = run("embed", str(root / "a"), "--server", server.address, "-o", str(out))
    assert code == 2 and "other inputs" in stderr, stderr
    code, _, stderr = run("embed", str(root), "--server", other.address, "-o", str(out), "--overwrite")
    assert code == 1 and "embedded 3 of 6 images" in stderr, stderr
    manifest = json.loads((parts_folder(out) / "manifest.json").read_text())
    assert manifest["identity"]["model_id"] == "facebook/dinov2-other" and manifest["complete"]


def test_an_existing_output_without_job_state_is_not_clobbered(server: RunningServer, tmp_path: Path) -> None:
    root = tmp_path / "few"
    make_dataset(root, 2)
    out = tmp_path / "o.npy"
    out.write_bytes(b"someone's data")
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(out))
    assert code == 2 and "has no job state" in stderr and out.read_bytes() == b"someone's data"
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(out), "--resume")
    assert code == 2 and "nothing to resume" in stderr


def test_one_job_per_output_at_a_time(server: RunningServer, tmp_path: Path) -> None:
    root = tmp_path / "few"
    make_dataset(root, 2)
    out = tmp_path / "o.npy"
    holder = JobState(parts_folder(out))
    holder.open()
    try:
        code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(out))
    finally:
        holder.close()
    assert code == 2 and "another process is writing" in stderr


def test_failures_file_lists_exactly_the_bad_inputs_and_retry_failed_tries_them_again(
    server: RunningServer, tmp_path: Path, reference: Reference
) -> None:
    root = tmp_path / "bad"
    written = make_dataset(root, 4)
    listing = tmp_path / "list.txt"
    good = str(root / "a" / "img0000.png")
    listing.write_text(f"{good}\n{root / 'missing.png'}\n\n{root / 'b' / 'broken.png'}\n")
    out = tmp_path / "o.npz"
    code, _, stderr = run("embed", "--from-list", str(listing), "--server", server.address, "-o", str(out))
    assert code == 1
    assert failures(out) == {str(root / "missing.png"): "NOT_FOUND", str(root / "b" / "broken.png"): "INVALID_ARGUMENT"}
    assert "2 image(s) failed (listed in" in stderr
    (root / "b" / "broken.png").write_bytes(images.png(32, 24, seed=7))  # repaired
    code, _, stderr = run("embed", "--from-list", str(listing), "--server", server.address, "-o", str(out))
    assert code == 1 and "this run: 0 embedded, 0 failed, 3 done before" in stderr  # not retried by default
    code, _, stderr = run("embed", "--from-list", str(listing), "--server", server.address, "-o", str(out),
                          "--retry-failed")  # fmt: skip
    assert code == 1 and "this run: 1 embedded, 1 failed, 1 done before" in stderr, stderr
    assert failures(out) == {str(root / "missing.png"): "NOT_FOUND"}
    with np.load(out) as saved:
        assert saved["ids"].tolist() == [good, str(root / "b" / "broken.png")]
        assert_close(saved["embeddings"][0], reference.embed(written["a/img0000.png"]), "listed file")
        assert_close(saved["embeddings"][1], reference.embed(images.png(32, 24, seed=7)), "repaired file")
    (root / "missing.png").write_bytes(images.png(32, 24, seed=8))
    code, _, stderr = run("embed", "--from-list", str(listing), "--server", server.address, "-o", str(out),
                          "--retry-failed")  # fmt: skip
    assert code == 0 and not failures_path(out).exists(), stderr


def test_each_output_has_its_own_failures_file(server: RunningServer, tmp_path: Path) -> None:
    """The root README's pair of commands: a parquet job, then an npy job of the same name, then overwrites."""
    root = tmp_path / "photos"
    make_dataset(root, 4)
    parquet, npy = tmp_path / "photos.parquet", tmp_path / "photos.npy"
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(parquet))
    assert code == 1 and len(failures(parquet)) == 3, stderr
    assert failures_path(parquet).name == "photos.parquet.failures.jsonl"
    code, _, stderr = run("embed", str(root / "a" / "img0000.png"), "--server", server.address, "-o", str(npy))
    assert code == 0, stderr
    assert len(failures(parquet)) == 3 and not failures_path(npy).exists()
    code, _, stderr = run("embed", str(root), "--server", server.address, "-o", str(parquet), "--overwrite")
    assert code == 1 and len(failures(parquet)) == 3
    assert read_npy(npy)[0] == ["img0000.png"]  # the npy job's ids file is its own


def test_plain_progress_lines_when_not_on_a_terminal(server: RunningServer, tmp_path: Path) -> None:
    root = tmp_path / "few"
    make_dataset(root, 6)
    argv = ("embed", str(root), "--server", server.address, "-o", str(tmp_path / "o.npy"), "--batch-size", "2")
    code, _, stderr = run(*argv, "--log-every", "0")
    lines = [line for line in stderr.splitlines() if "images/s" in line and "/9 images" in line]
    assert code == 1 and lines and "%" in lines[-1] and "ETA" in lines[-1]
    assert "%|" not in stderr  # no bar


def test_a_job_retries_for_seconds_not_tries() -> None:
    policy = RetryPolicy(retry_for_s=120)
    assert policy.should_retry(14, "server restarting", attempt=50, elapsed_s=119.0)  # 50 tries, still in budget
    assert not policy.should_retry(14, "server restarting", attempt=1, elapsed_s=120.5)
    assert not policy.should_retry(3, "bad request", attempt=0, elapsed_s=0.0)  # only UNAVAILABLE, RESOURCE_EXHAUSTED
    assert not RetryPolicy().should_retry(14, "away", attempt=7)  # the library's default still counts tries
