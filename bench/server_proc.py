"""The gRPC server as a subprocess (`python -m server ...`): start, wait until ready, read its peak RSS, stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"gRPC listening on (\S+):(\d+)")
HTTP_LISTENING = re.compile(r"HTTP listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on (http://\S+/metrics)")
READY = "engine ready"
# Sums and counts read from /metrics: where the server's time went.
SERVER_SAMPLES = (
    "dinov2_batch_size_sum",
    "dinov2_batch_size_count",
    "dinov2_inference_seconds_sum",
    "dinov2_preprocess_seconds_sum",
    "dinov2_preprocess_seconds_count",
    "dinov2_queue_seconds_sum",
)


class ServerProcess:
    """`with ServerProcess(args) as server:` -> server.address once the engine is warmed up."""

    def __init__(
        self, args: list[str], ready_timeout_s: float = 600.0, tree: Path = REPO, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.env = env  # variables added to this process's environment
        self.tree = tree  # the checkout whose `python -m server` runs (another commit's, to compare)
        self.ready_timeout_s = ready_timeout_s
        self.lines: list[str] = []
        self.port: int | None = None
        self.http_port: int | None = None  # with --http-port
        self.metrics_url: str | None = None
        self._ready = threading.Event()
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server", *self.args],
            cwd=self.tree,
            env={**os.environ, **self.env} if self.env else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read, name="server-log", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("server did not become ready:\n" + "\n".join(self.lines[-20:]))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peak_rss_bytes(self) -> int:
        """The server's peak resident memory so far (VmHWM), its decode worker processes' added.

        A sum of each process's own peak: at least the peak of the whole.
        """
        return sum(status_kb(pid, "VmHWM") for pid in process_tree(self.pid)) * 1024

    def reset_peak_rss(self) -> bool:
        """Restarts the peak (VmHWM) of the server and its decode workers at their RSS now, so that the next
        `peak_rss_bytes` is one load's, not the lifetime's; False where the kernel refused (clear_refs)."""
        try:
            for pid in process_tree(self.pid):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def open_fds(self) -> int:
        """The server process's open file descriptors now (its sockets among them); 0 once it has ended."""
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def rss_bytes(self) -> int:
        """The resident memory of the server and its decode worker processes now (VmRSS)."""
        return sum(status_kb(pid, "VmRSS") for pid in process_tree(self.pid)) * 1024

    def samples(self) -> dict[str, float]:
        """The SERVER_SAMPLES now (empty when the server has no metrics endpoint)."""
        if self.metrics_url is None:
            return {}
        found = self._scrape()
        return {name: float(found.get(name, 0.0)) for name in SERVER_SAMPLES}

    def metric(self, name: str) -> float:
        """One unlabelled sample of the server's metrics now (0 when it has none yet)."""
        assert self.metrics_url is not None, "start the server with --metrics-port 0"
        return float(self._scrape().get(name, 0.0))

    def _scrape(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        assert self.metrics_url is not None
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip())
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(2))
            if http := HTTP_LISTENING.search(line):
                self.http_port = int(http.group(2))
            metrics = METRICS.search(line)
            if metrics:
                self.metrics_url = metrics.group(1).replace("0.0.0.0", "127.0.0.1")
            if READY in line and self.port is not None:
                self._ready.set()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc), those that still run."""
    tree = [pid]
    for parent in tree:
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                tree.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue
    return tree


def server_breakdown(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """From the server's /metrics over one stream: batch sizes formed and how busy the forward thread was."""
    if not before:
        return {}
    delta = {k: after[k] - before[k] for k in before}
    forward_s = delta["dinov2_inference_seconds_sum"]
    images = delta["dinov2_batch_size_sum"]
    decoded = max(delta["dinov2_preprocess_seconds_count"], 1)
    return {
        "mean_batch_size": images / max(delta["dinov2_batch_size_count"], 1),
        "forward_busy": forward_s / seconds,
        "forward_images_per_s": images / forward_s if forward_s else 0.0,
        "decode_wait_ms": 1000 * delta["dinov2_preprocess_seconds_sum"] / decoded,
        "queue_ms": 1000 * delta["dinov2_queue_seconds_sum"] / max(images, 1),
    }


def thread_cpu_seconds(root: int) -> dict[tuple[int, int, str], float]:
    """CPU seconds (user + system) of every thread of `root` and its descendants, by (pid, tid, OS name)."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in process_tree(root):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds[(pid, int(task.name), name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def status_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process ended meanwhile
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")
