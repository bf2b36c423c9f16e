"""`python -m server` as a user runs it: start, serve, clear start errors, SIGTERM drain (streams included)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server.config import Settings
from server.grpc_service import DRAINING
from server.model import ModelRunner
from tests import held_server, images
from tests.conftest import ControlledRunner, RunningServer, wait_for

ROOT = Path(__file__).resolve().parent.parent


def start_server(*args: str, env: dict[str, str] | None = None, module: str = "server") -> subprocess.Popen[str]:
    """`python -m server ARGS` (or `module`, such as tests.held_server, which takes orders on stdin)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=None if module == "server" else subprocess.PIPE,
    )  # fmt: skip


def wait_ready(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, list[str]]:
    """Reads the log until the engine is ready; returns the port and the lines read."""
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("server exited early:\n" + "".join(lines))
        lines.append(line)
        if match := re.search(r"gRPC listening on [\d.]+:(\d+)", line):
            port = int(match.group(1))
        if "engine ready" in line and port:
            return port, lines
    raise AssertionError("server did not get ready:\n" + "".join(lines))


def read_until(proc: subprocess.Popen[str], lines: list[str], text: str) -> None:
    """Reads the server's output into `lines` until a line holds `text`."""
    assert proc.stdout is not None
    while text not in (line := proc.stdout.readline()):
        if not line:
            raise AssertionError(f"server exited before {text!r}:\n" + "".join(lines))
        lines.append(line)
    lines.append(line)


def metric(lines: list[str], name: str) -> float:
    """A sample of the server's /metrics now (its address read from the log `lines`)."""
    url = next(m.group(1) for line in lines if (m := re.search(r"metrics on (http://\S+/metrics)", line)))
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def held_open(request: pb.EmbedRequest, release: threading.Event) -> Iterator[pb.EmbedRequest]:
    """A stream's requests: `request`, then nothing more, and no half-close until `release`."""
    yield request
    release.wait(120)


def one_image(seed: int) -> pb.EmbedRequest:
    return pb.EmbedRequest(images=[pb.Image(data=images.png(seed=seed))])


def test_unknown_hub_id_offline_ends_with_one_clear_line(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model", "facebook/dinov2-small"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "facebook/dinov2-small" in errors[0] and "--model" in errors[0] and "local folder" in errors[0]
    assert "Traceback" not in proc.stderr


def test_serves_then_drains_on_sigterm(model_dir: Path) -> None:
    """A call whose batch is in the model when SIGTERM arrives is answered; then the process ends with 0."""
    proc = start_server(
        "--model", str(model_dir), "--grace-s", "120", "--metrics-port", "0", module="tests.held_server"
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port, lines = wait_ready(proc)
        assert any("dtype float32 (asked auto), device cpu (asked auto)" in line for line in lines)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = embed_pb2_grpc.EmbedStub(channel)
        assert stub.Info(pb.InfoRequest(), timeout=10).embedding_dim == 32
        proc.stdin.write("hold\n")
        proc.stdin.flush()
        read_until(proc, lines, held_server.ARMED)  # from now on, forward passes wait until stdin closes
        request = pb.EmbedRequest(images=[pb.Image(data=images.png(seed=i)) for i in range(8)])
        result: dict[str, object] = {}

        def call() -> None:
            try:
                result["response"] = stub.Embed(request, timeout=60)
            except grpc.RpcError as exc:
                result["error"] = exc

        in_flight = threading.Thread(target=call)
        in_flight.start()
        read_until(proc, lines, held_server.HELD)  # the call's first batch is in the model, held there
        assert metric(lines, "dinov2_in_flight_images") == 8
        proc.send_signal(signal.SIGTERM)
        read_until(proc, lines, "signal received: draining")
        assert not result  # still in flight: its batch cannot leave the model before stdin closes
        proc.stdin.close()
        in_flight.join(timeout=60)
        response = result.get("response")
        assert isinstance(response, pb.EmbedResponse), result
        assert [len(e.values) for e in response.embeddings] == [32] * 8
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
        with pytest.raises(grpc.RpcError) as info:
            stub.Info(pb.InfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()


def test_sigterm_ends_an_idle_stream_at_once_not_after_the_grace_period(model_dir: Path) -> None:
    proc = start_server("--model", str(model_dir), "--grace-s", "120")
    release = threading.Event()
    try:
        port, _ = wait_ready(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = embed_pb2_grpc.EmbedStub(channel).EmbedStream(held_open(one_image(1), release), timeout=100)
            assert len(next(call).embeddings[0].values) == 32
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0  # the stream, open and idle, did not hold the drain for 120 s
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == DRAINING
    finally:
        release.set()
        proc.kill()
        proc.wait()


def test_a_draining_stream_sends_the_answer_in_flight_then_ends_unavailable(
    settings: Settings, runner: ModelRunner
) -> None:
    controlled = ControlledRunner(runner)
    running = RunningServer(dataclasses.replace(settings, max_wait_ms=0), controlled)
    release = threading.Event()
    stopping = None
    try:
        calls = controlled.calls
        controlled.allow(controlled.images_seen)  # the request's batch waits in the model
        call = running.stub.EmbedStream(held_open(one_image(2), release), timeout=100)
        wait_for(lambda: controlled.calls > calls)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(120), running.loop)
        wait_for(lambda: not running.server.service.serving)  # the drain began (the answer reaches the loop after)
        controlled.allow(float("inf"))
        assert len(next(call).embeddings[0].values) == 32
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == DRAINING
        stopping.result(timeout=60)  # the drain ended with the stream, not after 120 s
    finally:
        release.set()
        controlled.allow(float("inf"))
        if stopping is None:
            running.stop(grace=1.0)
        else:
            stopping.result(timeout=130)
            running.channel.close()
            running.end_loop()


@pytest.mark.parametrize("which", ["--port", "--metrics-port", "--http-port"])
def test_a_busy_port_ends_the_start_with_one_line(model_dir: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", which: str(port)}
        proc = subprocess.run(
            [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
             *(arg for pair in ports.items() for arg in pair)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"port {port} is in use" in lines[0], proc.stderr


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_a_port_out_of_range_is_refused(port: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "--port", port], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "port must be from 0 to 65535" in proc.stderr
