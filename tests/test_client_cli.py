"""`python -m client`: embed folders and globs into .npy/.npz, info, exit codes, progress, and the RunPod command."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from client import EmbedClient
from client.cli import main
from client.runpod_client import RunPodClient
from server.config import Settings
from server.model import Pooling
from tests import images
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close, wait_for
from tests.runpod_api import LocalRunPodApi

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> tuple[int, str, str]:
    """`main(argv)` in-process; returns the exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def write_folder(root: Path, count: int) -> dict[str, bytes]:
    """`count` distinct images, a third of them in a subfolder, plus a file that is not an image."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    (root / "notes.txt").write_text("not an image, and not picked up")
    written = {}
    for index in range(count):
        image_id = f"sub/img{index:03d}.png" if index % 3 == 0 else f"img{index:03d}.png"
        written[image_id] = images.png(40, 30, seed=index)
        (root / image_id).write_bytes(written[image_id])
    return written


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("cli") / "photos"
    return root, write_folder(root, 200)


@pytest.fixture(scope="module")
def expected(big_folder: tuple[Path, dict[str, bytes]], reference: Reference) -> dict[str, np.ndarray]:
    return {image_id: reference.embed(data) for image_id, data in big_folder[1].items()}


@pytest.fixture
def small_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "small"
    return root, write_folder(root, 6)


def assert_rows(rows: np.ndarray, ids: list[str], expected: dict[str, np.ndarray]) -> None:
    assert rows.dtype == np.float32 and rows.shape == (len(ids), 32)
    for row, image_id in zip(rows, ids, strict=True):
        assert_close(row, expected[image_id], image_id)


def test_embed_a_folder_as_a_subprocess(
    server: RunningServer, big_folder: tuple[Path, dict[str, bytes]], expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    folder, written = big_folder
    out = tmp_path / "out.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "client", "embed", str(folder), "--server", server.address, "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = (tmp_path / "out.ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(written) and len(ids) == 200
    assert_rows(np.load(out), ids, expected)
    assert "embedded 200 of 200 images (dim 32)" in proc.stderr
    assert "%|" not in proc.stderr  # stderr is a pipe: no progress bar
    assert proc.stdout == ""


def test_a_broken_file_is_named_the_rest_written_and_the_exit_status_is_1(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], reference: Reference, tmp_path: Path
) -> None:
    folder, written = small_folder
    (folder / "sub" / "broken.jpg").write_bytes(b"this is no JPEG")
    out = tmp_path / "out.npz"
    code, _, stderr = run("embed", str(folder), "--server", server.address, "-o", str(out), "--batch-size", "2")
    assert code == 1
    assert re.search(r"sub/broken\.jpg: INVALID_ARGUMENT: not a decodable image", stderr), stderr
    assert "1 image(s) failed" in stderr and "embedded 6 of 7 images" in stderr
    with np.load(out) as saved:
        ids = saved["ids"].tolist()
        assert sorted(ids) == sorted(written)
        assert_rows(saved["embeddings"], ids, {k: reference.embed(v) for k, v in written.items()})


def test_progress_bar_only_when_asked_or_on_a_terminal(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, _ = small_folder
    base = ["embed", str(folder), "--server", server.address, "-o", str(tmp_path / "o.npy")]
    code, _, stderr = run(*base, "--progress")
    assert code == 0 and "6/6" in stderr and "img/s" in stderr
    for extra in ([], ["--no-progress"]):  # StringIO is no terminal: off by default
        code, _, stderr = run(*base, *extra)
        assert code == 0 and "img/s" not in stderr and "embedded 6 of 6" in stderr


def test_files_globs_and_folders_with_their_ids_as_json_lines(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], reference: Reference
) -> None:
    folder, written = small_folder
    single = str(folder / "img001.png")
    pattern = str(folder / "sub" / "*.png")
    code, stdout, _ = run("embed", single, pattern, str(folder / "sub"), "--server", server.address,
                          "--pooling", "cls_mean", "--normalize")  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in stdout.splitlines()]
    sub = sorted(k for k in written if k.startswith("sub/"))
    # Ids are relative to the arguments' common folder; the folder names the glob's files again: repeats.
    assert [line["id"] for line in lines] == ["img001.png", *sub]
    assert_close(np.array(lines[0]["embedding"], np.float32),
                 reference.embed(written["img001.png"], Pooling.CLS_MEAN, True), "json line")  # fmt: skip


def test_several_servers_share_the_job(
    make_server: Any, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    first, second = make_server(), make_server()
    folder, _ = small_folder
    code, _, _ = run("embed", str(folder), "--server", first.address, "--server", second.address,
                     "--batch-size", "1", "-o", str(tmp_path / "o.npy"))  # fmt: skip
    assert code == 0
    served = [s.metrics.value("dinov2_images_total", {"outcome": "ok"}) for s in (first, second)]
    assert sum(served) == 6 and min(served) > 0


def test_info_prints_json(server: RunningServer) -> None:
    code, stdout, _ = run("info", "--server", server.address)
    info = json.loads(stdout)
    assert code == 0 and info["embedding_dim"] == 32 and info["max_images_per_request"] == 256
    assert info["max_image_bytes"] == 32 * 1024 * 1024 and info["max_request_bytes"] == 128 * 1024 * 1024
    assert all(isinstance(info[name], int) for name in ("max_image_bytes", "max_image_pixels", "max_request_bytes"))


def test_a_folder_without_images_is_a_usage_error_and_writes_nothing(tmp_path: Path) -> None:
    empty, texts = tmp_path / "empty", tmp_path / "texts"
    empty.mkdir()
    (texts / "deep").mkdir(parents=True)
    (texts / "deep" / "notes.txt").write_text("no image here")
    for folder in (empty, texts):
        code, _, stderr = run("embed", str(folder), "--server", "127.0.0.1:1", "-o", str(tmp_path / "o.npy"))
        assert code == 2 and f"no image files in {folder}" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "texts"]


def test_an_archive_without_images_is_nothing_to_embed(server: RunningServer, tmp_path: Path) -> None:
    import tarfile

    archive = tmp_path / "notes.tar"
    with tarfile.open(archive, "w") as tar:
        note = tmp_path / "note.txt"
        note.write_text("no image")
        tar.add(note, "note.txt")
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(archive), "--server", server.address, "-o", str(out))
    assert code == 2 and "nothing to embed" in stderr and "1 non-image files skipped" in stderr, stderr
    assert not out.exists()
    code, stdout, stderr = run("embed", str(archive), "--server", server.address)
    assert code == 2 and "nothing to embed" in stderr and stdout == ""


def test_when_every_image_fails_the_output_keeps_the_embedding_size(server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(tmp_path / "bad.png"), "--server", server.address, "-o", str(out))
    assert code == 1 and "embedded 0 of 1 images (dim 32)" in stderr, stderr
    assert np.load(out).shape == (0, 32)


def test_a_server_that_is_down_is_named_at_once_with_the_retry_budget(
    small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The first line comes while the job still retries (it would go on for 60 s), not when it gives up."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "client", "embed", str(small_folder[0]), "--server", address, "--retry-for", "60",
             "-o", str(tmp_path / "o.npy")],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert proc.poll() is None, line  # still retrying
        finally:
            proc.kill()
            proc.wait()
    assert line.startswith(f"waiting for server {address}: UNAVAILABLE: "), line
    assert line.rstrip().endswith("retrying for up to 60 s (--retry-for)"), line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "{missing}"], "no such file or folder"),
        (["embed", "{folder}/*.nothing"], "no image files match"),
        (["embed", "{folder}", "-o", "{tmp}/out.csv"], "must end in .npy, .npz, .parquet"),
        (["embed", "{folder}", "--batch-size", "0"], "at least 1"),
        (["runpod", "{folder}"], "give --endpoint-id"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, _ = small_folder
    filled = [a.format(missing=tmp_path / "missing", folder=folder, tmp=tmp_path) for a in argv]
    code, _, stderr = run(*filled)
    assert code == 2 and message in stderr, stderr


def test_parquet_is_written_with_pyarrow(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq  # a test dependency

    folder, _ = small_folder
    out = tmp_path / "o.parquet"
    code, _, stderr = run("embed", str(folder), "--server", server.address, "-o", str(out))
    assert code == 0, stderr
    table = pq.read_table(out)
    assert table.num_rows == 6 and len(table.column("embedding")[0]) == 32


def test_parquet_without_pyarrow_exits_2_with_the_fix_and_writes_nothing(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("pyarrow", "pyarrow.parquet"):  # None in sys.modules: importing it raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    folder, _ = small_folder
    code, _, stderr = run("embed", str(folder), "--server", server.address, "-o", str(tmp_path / "o.parquet"))
    assert code == 2 and "writing .parquet needs pyarrow (pip install pyarrow)" in stderr, stderr
    assert list(tmp_path.iterdir()) == [folder]


def test_no_reachable_server_exits_3_and_writes_nothing(
    small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder, _ = small_folder
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(folder), "--server", f"127.0.0.1:{port}", "--timeout", "1", "--retry-for", "1",
                          "-o", str(out))  # fmt: skip
    assert code == 3 and "UNAVAILABLE" in stderr and "nothing written" in stderr
    assert list(tmp_path.iterdir()) == [folder]


# ------------------------------------------------------------------ RunPod


class FakeRunPod(BaseHTTPRequestHandler):
    """RunPod's hosted API as the client sees it: runsync answers IN_PROGRESS once, then status completes."""

    seen: ClassVar[list[tuple[str, str, str]]] = []
    count = 0

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        job = json.loads(self.rfile.read(length))["input"]
        FakeRunPod.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
        FakeRunPod.count = len(job["images"])
        self._answer({"id": "job-1", "status": "IN_PROGRESS"})

    def do_GET(self) -> None:
        FakeRunPod.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
        vectors = [[float(i)] * 4 for i in range(FakeRunPod.count)]
        self._answer({"id": "job-1", "status": "COMPLETED", "output": {"embeddings": vectors, "errors": []}})

    def log_message(self, *args: Any) -> None:
        pass


def test_runpod_client_uses_the_endpoint_url_the_key_and_polls_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("client.runpod_client.time.sleep", lambda seconds: None)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeRunPod)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with RunPodClient("ep-123", "rp-key", base_url=url) as client:
            vectors = client.embed([images.png(seed=1), images.png(seed=2)])
    finally:
        httpd.shutdown()
    assert vectors.shape == (2, 4) and vectors[1, 0] == 1.0
    assert FakeRunPod.seen == [("POST", "/v2/ep-123/runsync", "Bearer rp-key"),
                               ("GET", "/v2/ep-123/status/job-1", "Bearer rp-key")]  # fmt: skip


@pytest.fixture(scope="module")
def local_runpod(model_dir: Path) -> Iterator[LocalRunPodApi]:
    api = LocalRunPodApi(model_dir)
    yield api
    api.stop()


def test_runpod_command_against_the_local_api_server(
    local_runpod: LocalRunPodApi, small_folder: tuple[Path, dict[str, bytes]], reference: Reference, tmp_path: Path
) -> None:
    folder, written = small_folder
    out = tmp_path / "rp.npy"
    code, _, stderr = run("runpod", "--base-url", local_runpod.url, str(folder), "-o", str(out), "--batch-size", "4")
    assert code == 0, stderr
    ids = (tmp_path / "rp.ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(written)
    assert_rows(np.load(out), ids, {k: reference.embed(v) for k, v in written.items()})


def test_runpod_command_names_broken_files_even_when_a_whole_job_fails(
    local_runpod: LocalRunPodApi, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, written = small_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    # Both sort first, so they share a job of 2 that the handler fails as a whole.
    (broken / "a-bad.png").write_bytes(b"not a png")
    (broken / "b-bad.png").write_bytes(b"neither")
    code, stdout, stderr = run("runpod", "--base-url", local_runpod.url, str(broken), "--batch-size", "2")
    assert code == 1
    assert "a-bad.png: INVALID_ARGUMENT: not a decodable image" in stderr, stderr
    assert "b-bad.png: INVALID_ARGUMENT: not a decodable image" in stderr
    assert sorted(json.loads(line)["id"] for line in stdout.splitlines()) == sorted(written)


def test_runpod_client_equals_the_grpc_client(local_runpod: LocalRunPodApi, server: RunningServer) -> None:
    datas = [images.png(seed=s) for s in range(5)]
    with RunPodClient(base_url=local_runpod.url) as runpod, EmbedClient(server.address) as grpc_client:
        assert_close(runpod.embed(datas, pooling="mean", normalize=True),
                     grpc_client.embed(datas, pooling="mean", normalize=True), "runpod vs grpc")  # fmt: skip


def test_embed_with_a_runpod_base_url_is_resumable_and_equals_grpc(
    local_runpod: LocalRunPodApi, server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, written = small_folder
    out = tmp_path / "rp.parquet"
    argv = ("embed", str(folder), "--base-url", local_runpod.url, "-o", str(out), "--batch-size", "4")
    code, _, stderr = run(*argv)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "rp.parquet.parts" / "manifest.json").read_text())
    assert manifest["identity"]["model_id"] == f"runpod:{local_runpod.url}" and manifest["identity"]["dim"] == 32
    code, _, stderr = run(*argv)
    assert code == 0 and "this run: 0 embedded, 0 failed, 6 done before" in stderr, stderr
    code, _, stderr = run("embed", str(folder), "--server", server.address, "-o", str(out))
    assert code == 2 and "cannot resume" in stderr  # a gRPC server is not the RunPod endpoint the job began with
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert ids == sorted(written, key=lambda i: (i.startswith("sub/"), i))
    with EmbedClient(server.address) as grpc_client:
        expected = grpc_client.embed([folder / i for i in ids])
    assert_close(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), expected, "runpod job")


def test_a_slow_server_slows_the_job_down_and_every_image_is_embedded(
    make_server, runner, big_folder: tuple[Path, dict[str, bytes]], expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Every flag at its default against a server that cannot take the job's whole window in time."""
    controlled = ControlledRunner(runner)
    controlled.delay_s = 0.05  # per forward pass of up to 16: a window of 8 x 32 images is 0.8 s of work
    slow = make_server(controlled, max_batch_size=16, max_queue_s=0.3)
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(big_folder[0]), "--server", slow.address, "-o", str(out))
    assert code == 0, stderr
    ids = (tmp_path / "o.ids.txt").read_text().splitlines()
    assert_rows(np.load(out), ids, expected)
    assert len(ids) == 200
    assert slow.metrics.value("dinov2_refused_requests_total", {"reason": "queue_time"}) > 0  # it was too busy
    assert f"server {slow.address} is busy: sending " in stderr, stderr
    assert slow.metrics.value("dinov2_images_total", {"outcome": "DeadlineExceeded"}) == 0


def test_a_batch_size_over_the_servers_limit_is_a_usage_error_before_any_work(
    server: RunningServer, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(small_folder[0]), "--server", server.address, "--batch-size", "1000",
                          "-o", str(out))  # fmt: skip
    assert code == 2, stderr
    assert stderr.strip() == ("error: --batch-size 1000 is over the server's limit of 256 images per request: "
                              "give --batch-size 256 or less")  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob("o.npy.parts/*.npy"))


def test_a_job_stopped_by_a_refusal_a_rerun_cannot_fix_says_what_to_change(
    make_server, small_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    strict = make_server(max_request_bytes=2000)  # smaller than one request of these images
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(small_folder[0]), "--server", strict.address, "-o", str(out))
    last = stderr.strip().splitlines()[-1]
    assert code == 3, stderr
    assert "RESOURCE_EXHAUSTED" in last and "run the same command again to resume" not in last, last
    assert last.endswith("the same command would stop the same way: send smaller requests (a lower --batch-size), "
                         "then run it again to resume"), last  # fmt: skip


def test_a_job_stopped_while_the_server_was_away_says_to_run_it_again(
    settings: Settings, runner, big_folder: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    controlled = ControlledRunner(runner)
    going = RunningServer(settings, controlled)  # stopped by the test itself
    controlled.allow(controlled.images_seen + 96)  # more than the job's whole first window, then it holds the rest
    out = tmp_path / "o.npy"
    outcome: list[tuple[int, str, str]] = []
    job = threading.Thread(target=lambda: outcome.append(
        run("embed", str(big_folder[0]), "--server", going.address, "--batch-size", "8", "--retry-for", "1",
            "-o", str(out))))  # fmt: skip
    job.start()
    try:
        wait_for(lambda: going.metrics.value("dinov2_images_total", {"outcome": "ok"}) >= 8)
        going.stop(grace=0.0)
    finally:
        controlled.allow(float("inf"))
    job.join(timeout=120)
    code, _, stderr = outcome[0]
    last = stderr.strip().splitlines()[-1]
    assert code == 3 and "the job stopped" in last and "UNAVAILABLE" in last, stderr
    assert re.search(r"; \d+ images are saved in .*; run the same command again to resume$", last), last
