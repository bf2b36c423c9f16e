"""The Ray Data path (offline/) on a local Ray: equal to the gRPC service, resumable, exactly one row per id.

One local Ray (2 CPUs, small object store) serves the module; the SIGKILL test
runs the CLI in a process of its own, which starts its own Ray.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline.job import EXIT_ITEMS_FAILED, EXIT_USAGE, Job, JobSpec, Resources
from offline.lock import OutLock
from offline.manifest import Identity, Manifest
from offline.stages import Fault
from offline.store import Store
from protos.dinov2.v1 import embed_pb2
from server.config import Settings
from server.random_model import build_model_dir
from tests import images, processes
from tests.conftest import RunningServer

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
GOOD, BROKEN = 300, 3
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's config variable, in its own case


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """300 good images (250 loose PNGs in folders, 50 JPEGs in a tar shard) and 3 broken ones, by id."""
    root = tmp_path_factory.mktemp("offline-images")
    by_id: dict[str, bytes] = {}
    for n in range(250):
        path = root / f"set{n % 3}" / f"img{n:03d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(images.png(40 + n % 50, 30 + n % 40, seed=n))
        by_id[path.relative_to(root).as_posix()] = path.read_bytes()
    shard = root / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        members = [(f"sample{n:03d}.jpg", images.jpeg(64, 48, seed=1000 + n)) for n in range(50)]
        members.append(("sample999.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            by_id[f"{shard.name}/{name}"] = data
    for name, data in {"truncated.png": images.png(64, 48)[:60], "text.jpg": b"hello, not an image"}.items():
        path = root / "broken" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        by_id[f"broken/{name}"] = data
    (root / "broken" / "notes.txt").write_text("not an image: skipped")
    return root, by_id


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Ray starts its workers at nice 15: beside two busy loops at nice 0 they got a few percent of
    # the CPUs and these tests timed out. Here they run at the test's own priority (the CLI's Ray of
    # the SIGKILL test too, through the environment); `python -m offline` keeps Ray's default.
    previous = os.environ.get(WORKER_NICENESS)
    os.environ[WORKER_NICENESS] = "0"
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 << 20)  # fmt: skip
            break
        except RuntimeError:
            # Seen once on this machine: Ray forks its GCS server and runs Python in the child before exec; when
            # another thread of this (multi-threaded) pytest process held a lock at the fork, the child hangs
            # and ray.init times out. The hung child is a copy of this process: end it, start again.
            processes.end_forked_copies()
            if attempt == 2:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    if previous is None:
        del os.environ[WORKER_NICENESS]
    else:
        os.environ[WORKER_NICENESS] = previous
    assert processes.wait_gone(processes.ray_children(os.getpid()), within_s=15), "ray.shutdown() left processes behind"


def _spec(source: Path, out: Path, model: Path, **changes: object) -> JobSpec:
    resources = Resources(batch_size=8, rows_per_part=32)
    values: dict[str, object] = {"sources": (str(source),), "out": str(out),
                                 "settings": Settings(model=str(model)), "resources": resources}  # fmt: skip
    values.update(changes)
    return JobSpec(**values)  # type: ignore[arg-type]


def _run(spec: JobSpec) -> tuple[int, str]:
    stderr = io.StringIO()
    status = Job(spec, stderr).run()
    return status, stderr.getvalue()


def _rows(out: Path) -> pa.Table:
    return pq.read_table(out / "data")


def _server_embeddings(server: RunningServer, by_id: dict[str, bytes]) -> dict[str, np.ndarray | str]:
    """What the gRPC service answers for each image: its float32 values, or its error message."""
    answers: dict[str, np.ndarray | str] = {}
    ids = sorted(by_id)
    for start in range(0, len(ids), 64):
        chunk = ids[start : start + 64]
        request = embed_pb2.EmbedRequest(images=[embed_pb2.Image(data=by_id[i], id=i) for i in chunk])
        for answer in server.stub.Embed(request, timeout=120).embeddings:
            answers[answer.id] = answer.error.message if answer.HasField("error") else np.array(answer.values, "f4")
    return answers


@pytest.fixture(scope="module")
def first_run(local_ray: None, dataset: tuple[Path, dict[str, bytes]], model_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:  # fmt: skip
    out = tmp_path_factory.mktemp("offline-out") / "out"
    status, report = _run(_spec(dataset[0], out, model_dir))
    return out, status, report


def test_embeddings_equal_the_grpc_servers_bit_for_bit_and_broken_images_are_rows_with_errors(
    first_run: tuple[Path, int, str], dataset: tuple[Path, dict[str, bytes]], server: RunningServer
) -> None:
    out, status, report = first_run
    by_id = dataset[1]
    assert status == EXIT_ITEMS_FAILED, report
    assert f"embedded {GOOD} of {GOOD + BROKEN} images (dim 32)" in report
    assert "1 non-image files skipped" in report
    table = _rows(out)
    assert sorted(table.column("id").to_pylist()) == sorted(by_id)
    expected = _server_embeddings(server, by_id)
    failed = {}
    for row in table.to_pylist():
        answer = expected[row["id"]]
        if row["error_code"] is not None:
            failed[row["id"]] = row["error"]
            assert row["embedding"] is None and row["error_code"] == "INVALID_ARGUMENT"
            assert row["error"] == answer, row["id"]  # the service's own message for the same bytes
        else:
            # Bit for bit: float32 on this CPU gives the same bits whatever the batch an image is in
            # (measured for batches of 1 to 32), so Ray's batches and the server's need not match.
            assert isinstance(answer, np.ndarray), f"{row['id']}: server failed it: {answer}"
            np.testing.assert_array_equal(np.array(row["embedding"], "f4"), answer, err_msg=row["id"])
    names = {Path(i).name for i in failed}
    assert names == {"truncated.png", "text.jpg", "sample999.jpg"}
    for name in names:
        assert name in report  # the summary names each failure


def test_a_second_run_skips_everything_and_another_model_is_refused(
    first_run: tuple[Path, int, str], dataset: tuple[Path, dict[str, bytes]], model_dir: Path, tmp_path: Path
) -> None:
    out = first_run[0]
    before = _snapshot(out)
    status, report = _run(_spec(dataset[0], out, model_dir))
    assert status == EXIT_ITEMS_FAILED, report
    assert "this run: 0 embedded, 0 failed" in report and _snapshot(out) == before
    manifest = (out / "manifest.json").read_text()

    other = build_model_dir(tmp_path / "other-model", "tiny")
    status, report = _run(_spec(dataset[0], out, other))
    assert status == EXIT_USAGE
    assert "cannot continue" in report and "model_id" in report and "--overwrite" in report
    status, report = _run(_spec(dataset[0], out, model_dir, pooling="cls_mean"))
    assert status == EXIT_USAGE and "pooling 'cls' vs 'cls_mean'" in report
    status, report = _run(_spec(dataset[0], out, model_dir, settings=Settings(model=str(model_dir), image_size=448)))
    assert status == EXIT_USAGE and "image_size 224 vs 448" in report, report
    assert _snapshot(out) == before and (out / "manifest.json").read_text() == manifest


def test_the_checkpoints_crop_at_448_gives_the_references_embeddings(
    local_ray: None, model_dir: Path, tmp_path: Path
) -> None:
    from server.model import Pooling
    from tests.conftest import Reference, assert_close

    (tmp_path / "photos").mkdir()
    for n, (w, h) in enumerate([(640, 480), (300, 900), (224, 224), (50, 40)]):
        (tmp_path / "photos" / f"{n}.png").write_bytes(images.png(w, h, seed=n))
    settings = Settings(model=str(model_dir), image_size=448, preprocess="checkpoint")
    status, report = _run(_spec(tmp_path / "photos", tmp_path / "out", model_dir, settings=settings))
    assert status == 0, report
    identity = Manifest.from_text((tmp_path / "out" / "manifest.json").read_text(), "manifest").identity
    assert (identity.image_size, identity.preprocess) == (448, "checkpoint")
    reference = Reference(model_dir, 448, "checkpoint")
    rows = _rows(tmp_path / "out").to_pylist()
    assert sorted(row["id"] for row in rows) == [f"{n}.png" for n in range(4)]  # one row per photo
    for row in rows:
        expected = reference.embed((tmp_path / "photos" / row["id"]).read_bytes(), Pooling.CLS)
        assert_close(np.array(row["embedding"], "f4"), expected, row["id"])


def test_a_missing_model_or_an_empty_folder_is_a_usage_error(local_ray: None, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(images.png())
    status, report = _run(_spec(tmp_path / "one", tmp_path / "out", tmp_path / "no-such-model"))
    assert status == EXIT_USAGE and "cannot load model" in report, report
    status, report = _run(_spec(tmp_path / "empty", tmp_path / "out2", model_dir))
    assert status == EXIT_USAGE and "No files found" in report, report
    off_grid = Settings(model=str(model_dir), image_size=500)
    status, report = _run(_spec(tmp_path / "one", tmp_path / "out3", model_dir, settings=off_grid))
    assert status == EXIT_USAGE and "--image-size 500 is not a multiple of the model's patch size 14" in report
    assert not (tmp_path / "out3").exists()


def test_an_embed_actor_killed_mid_job_still_leaves_one_row_per_id(
    local_ray: None, dataset: tuple[Path, dict[str, bytes]], model_dir: Path,
    first_run: tuple[Path, int, str], tmp_path: Path,
) -> None:  # fmt: skip
    marker = tmp_path / "actor-died"
    spec = _spec(dataset[0], tmp_path / "out", model_dir, fault=Fault("embed", after=5, marker=str(marker)))
    status, report = _run(spec)
    assert marker.exists(), "the fault never fired: the test proves nothing"
    assert status == EXIT_ITEMS_FAILED, report
    table = _rows(tmp_path / "out")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == GOOD + BROKEN
    clean = {r["id"]: r["embedding"] for r in _rows(first_run[0]).to_pylist()}
    assert {r["id"]: r["embedding"] for r in table.to_pylist()} == clean


def test_a_write_task_killed_after_writing_is_retried_harmlessly(
    local_ray: None, dataset: tuple[Path, dict[str, bytes]], model_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "writer-died"
    spec = _spec(dataset[0] / "set0", tmp_path / "out", model_dir, fault=Fault("write", after=1, marker=str(marker)))
    status, report = _run(spec)
    assert marker.exists() and status == 0, report
    ids = _rows(tmp_path / "out").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 84


def test_driver_sigkilled_half_way_then_run_again_finishes_without_redoing_or_repeating(
    local_ray: None, dataset: tuple[Path, dict[str, bytes]], model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "offline", "embed", str(dataset[0]), "-o", str(out), "--model", str(model_dir),
               "--num-cpus", "2", "--batch-size", "8", "--rows-per-part", "32"]  # fmt: skip
    driver = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len(_parts(out)) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the job ended before it could be killed half-way"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        processes.kill_session(driver.pid)  # its Ray's workers can still finish a part: count only once they are gone
        killed_at = _snapshot(out)
        rows_then = sum(pq.read_metadata(p).num_rows for p in _parts(out))
        assert 0 < rows_then < GOOD + BROKEN
    finally:
        processes.kill_session(driver.pid)

    status, report = _run(_spec(dataset[0], out, model_dir))
    assert status == EXIT_ITEMS_FAILED, report
    ran = GOOD + BROKEN - rows_then
    assert f"{rows_then} written before" in report, report
    assert any(f"this run: {ran - bad} embedded, {bad} failed" in report for bad in range(BROKEN + 1)), report
    ids = _rows(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == GOOD + BROKEN
    after = _snapshot(out)
    assert all(after.get(name) == stamp for name, stamp in killed_at.items()), "finished parts were rewritten"


def test_same_names_in_two_folders_stay_apart_and_a_rerun_retries_what_it_should(
    local_ray: None, model_dir: Path, tmp_path: Path
) -> None:
    for split, seed in (("train", 0), ("val", 50)):
        (tmp_path / split).mkdir()
        for n in range(3):
            (tmp_path / split / f"{n}.png").write_bytes(images.png(40, 30, seed=seed + n))
    (tmp_path / "val" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    # A start that failed left a manifest of another model and no row: it does not block this run.
    failed_start = Manifest(Identity("some/vit", "", "float32", 768, "cls", False, 768), ("elsewhere",))
    Store(str(out)).write_atomic("manifest.json", failed_start.to_text().encode())
    spec = _spec(tmp_path / "train", out, model_dir, sources=(str(tmp_path / "train"), str(tmp_path / "val")))
    status, report = _run(spec)
    assert status == EXIT_ITEMS_FAILED, report
    assert "no row was written under its manifest (some/vit (float32, card 224, pooling cls)); starting again" in report
    rows = {r["id"]: r for r in _rows(out).to_pylist()}
    assert sorted(rows) == ["train/0.png", "train/1.png", "train/2.png", "val/0.png", "val/1.png", "val/2.png",
                            "val/bad.png"]  # fmt: skip
    assert rows["train/0.png"]["embedding"] != rows["val/0.png"]["embedding"]

    # A forward pass that failed (INTERNAL) is tried again by a plain rerun; a bad image only with retry_failed.
    table = _rows(out)
    codes = [
        "INTERNAL" if i == "train/1.png" else c
        for i, c in zip(table["id"].to_pylist(), table["error_code"].to_pylist(), strict=True)
    ]
    for part in _parts(out):
        part.unlink()
    Store(str(out)).write_part(table["id"].to_pylist(), np.zeros((len(codes), 32), np.float32),
                               [c or "" for c in codes], ["x" if c else "" for c in codes])  # fmt: skip
    status, report = _run(spec)
    assert status == EXIT_ITEMS_FAILED and "this run: 1 embedded, 0 failed" in report, report
    assert "--retry-failed tries them again" in report
    status, report = _run(dataclasses.replace(spec, retry_failed=True))
    assert status == EXIT_ITEMS_FAILED and "this run: 0 embedded, 1 failed" in report, report
    after = {r["id"]: r for r in _rows(out).to_pylist()}
    assert after["train/1.png"]["error_code"] is None and after["train/1.png"]["embedding"] == rows["train/1.png"][
        "embedding"]  # fmt: skip
    assert len(after) == 7

    with OutLock(Store(str(out))):
        status, report = _run(spec)
    assert status == EXIT_USAGE and f"{out} is in use by run" in report, report


def test_a_wrong_model_writes_nothing_and_a_local_ray_ignores_ray_address(model_dir: Path, tmp_path: Path) -> None:
    from tests.test_source import vit_dir

    (tmp_path / "photos").mkdir()
    for n in range(3):
        (tmp_path / "photos" / f"{n}.png").write_bytes(images.png(seed=n))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "offline", "embed", str(tmp_path / "photos"), "-o", str(out), "--num-cpus", "2"]
    wrong = subprocess.run([*command, "--model", str(vit_dir(tmp_path / "vit"))], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert wrong.returncode == EXIT_USAGE
    assert wrong.stderr.strip().splitlines() == [wrong.stderr.strip()] and "model_type is 'vit'" in wrong.stderr
    assert not out.exists()

    # A RAY_ADDRESS of a cluster that is not there: joining it would fail; a local Ray of its own does not.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", WORKER_NICENESS: "0"}
    right = subprocess.Popen([*command, "--model", str(model_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        _, stderr = right.communicate(timeout=600)
    finally:
        right.kill()
        processes.kill_session(right.pid)
    assert right.returncode == 0, stderr
    lines = stderr.strip().splitlines()
    assert lines[-2].startswith("embedded 3 of 3 images") and lines[-1].startswith("this run: 3 embedded"), lines
    assert len(lines) <= 3, lines  # the summary, and at most Ray's own line about its log level


# ---------------------------------------------------------------------- helpers


def _parts(out: Path) -> list[Path]:
    return sorted((out / "data").glob("part-*.parquet"))


def _snapshot(out: Path) -> dict[str, int]:
    """Each part's name and modification time: a rewritten part shows."""
    return {p.name: p.stat().st_mtime_ns for p in _parts(out)}
