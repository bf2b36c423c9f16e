"""The decode worker process: it ends with its parent, whatever it waits for, and sees none of its secrets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from bench.server_proc import ServerProcess, process_tree
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server.decode import wire
from server.decode.budget import PixelBudget
from server.decode.setup import Setup, child_environment
from server.decode.worker import ProcessDecoder
from server.preprocess import ImageLimits
from tests import images, processes

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)
ROOT = Path(__file__).resolve().parent.parent


def large_png() -> bytes:
    return images.encode(Image.new("L", (3000, 2000), 50), "PNG")  # over SMALL_PIXELS: the child asks for budget


def test_a_child_waiting_for_the_budget_ends_when_its_parent_closes_the_pipe() -> None:
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), PixelBudget(100_000_000))
    child = decoder._child
    assert child is not None
    wire.write_frame(child.to_child, wire.CHUNK, *wire.encode_chunk([large_png()]), deadline=time.monotonic() + 30)
    assert wire.read_frame(child.from_child, 0, (wire.READY,))[0] == wire.READY
    assert wire.read_frame(child.from_child, 8, (wire.HOLD,))[0] == wire.HOLD  # it waits for a GRANT now
    os.close(child.to_child)
    child.to_child = os.open(os.devnull, os.O_WRONLY)  # for the decoder's own close
    assert child.process.wait(timeout=60) == 0
    decoder.close()


PARENT = """
import threading, time
from PIL import Image
from bench.server_proc import ServerProcess, process_tree
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server.decode import wire
from server.decode.budget import PixelBudget
from server.decode.setup import Setup
from server.decode.worker import ProcessDecoder
from server.preprocess import ImageLimits
from tests import images

decoder = ProcessDecoder(Setup(ImageLimits(1 << 26, 50_000_000), 224, idle_trim_s=0.2), PixelBudget(10**8))
child = decoder._child
large = images.encode(Image.new("L", (3000, 2000), 50), "PNG")
wire.write_frame(child.to_child, wire.CHUNK, *wire.encode_chunk([large]), deadline=time.monotonic() + 30)
assert wire.read_frame(child.from_child, 0, (wire.READY,))[0] == wire.READY
assert wire.read_frame(child.from_child, 8, (wire.HOLD,))[0] == wire.HOLD
print(decoder.pid, flush=True)  # the child waits for a grant that will never come
threading.Event().wait()
"""


@pytest.mark.parametrize("signal_", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_outlives_no_parent(signal_: signal.Signals) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert not processes.gone(child)
    finally:
        parent.send_signal(signal_)
        parent.wait(timeout=60)
    assert processes.wait_gone([child], within_s=30), f"decode worker {child} still runs after its parent died"


def test_a_child_gets_no_secret_of_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws")
    assert set(child_environment()) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH"}
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), PixelBudget(100_000_000))
    try:
        assert decoder.decode([images.png()])[0].shape == (224, 224)
        environ = Path(f"/proc/{decoder.pid}/environ").read_bytes()
    finally:
        decoder.close()
    assert b"s3cret" not in environ and b"AWS_SECRET" not in environ
    assert b"PATH=" in environ


def test_a_server_killed_while_it_decodes_leaves_no_worker_behind(model_dir: Path) -> None:
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--max-decode-pixels", "7000000"]  # fmt: skip  # one large image at a time: the others wait for budget
    with ServerProcess(args, ready_timeout_s=180) as server:
        workers = process_tree(server.pid)[1:]
        assert workers, "the server runs no decode worker process"
        request = pb.EmbedRequest(images=[pb.Image(data=large_png(), id=str(i)) for i in range(64)])
        call = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address)).Embed.future(request, timeout=300)
        deadline = time.monotonic() + 120
        while server.metric("dinov2_in_flight_images") < 64:
            assert time.monotonic() < deadline and not call.done(), "the request was not taken in"
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        assert server._proc is not None
        server._proc.wait(timeout=60)
    left = [pid for pid in workers if not processes.wait_gone([pid], within_s=30)]
    assert not left, f"decode workers {left} outlived the server"
