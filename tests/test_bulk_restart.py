"""A server killed and restarted in the middle of a dataset job does not fail the job."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Reference, assert_close
from tests.test_bulk import BROKEN, committed, make_dataset, read_parquet, start, wait_for

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m server` on a fixed loopback port, so that it can come back on the same one."""

    def __init__(self, model_dir: Path, port: int) -> None:
        self.model_dir, self.port = model_dir, port
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        args = ["--model", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics-port", "-1", "--max-wait-ms", "50"]  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        ready = threading.Event()

        def read(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                if "engine ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, args=(self.proc,), daemon=True).start()
        if not ready.wait(120) or self.proc.poll() is not None:
            raise AssertionError("server did not start:\n" + "".join(self.lines[-20:]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class JobLog:
    """A running job's stderr, read as it comes; `retrying` is set once the job says it waits for its server."""

    def __init__(self, job: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.retrying = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(job,), daemon=True)
        self._reader.start()

    def _read(self, job: subprocess.Popen[str]) -> None:
        assert job.stderr is not None
        for line in job.stderr:
            self.lines.append(line)
            if line.startswith("waiting for"):
                self.retrying.set()

    def text(self) -> str:
        """All of it, once the job has ended."""
        self._reader.join(timeout=30)
        return "".join(self.lines)


@pytest.fixture
def server_process(model_dir: Path) -> Iterator[ServerProcess]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = ServerProcess(model_dir, port)
    process.start()
    yield process
    process.stop()


def test_a_server_killed_and_restarted_mid_job_does_not_fail_it(
    server_process: ServerProcess, tmp_path: Path, reference: Reference
) -> None:
    root = tmp_path / "photos"
    written = make_dataset(root, 400)
    out = tmp_path / "out.parquet"
    job = start(str(root), "--server", f"127.0.0.1:{server_process.port}", "-o", str(out),
                "--batch-size", "8", "--window", "2", "--shard-size", "16", "--retry-for", "60")  # fmt: skip
    log = JobLog(job)
    try:
        wait_for(lambda: committed(out) >= 100, job)
        server_process.kill()
        assert log.retrying.wait(60), "the job did not say it waits for its server:\n" + "".join(log.lines)
        assert job.poll() is None, "the job ended with its server"
        server_process.start()
        job.wait(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    stderr = log.text()
    assert job.returncode == 1, stderr  # 1: the three broken files; the job itself went through
    assert "embedded 400 of 403 images" in stderr
    ids, rows = read_parquet(out)
    assert ids == sorted(set(written) - set(BROKEN))
    for index in range(0, 400, 23):
        assert_close(rows[index], reference.embed(written[ids[index]]), ids[index])
