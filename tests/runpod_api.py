"""runpod's local API server (`python runpod_handler.py --rp_serve_api`) on a free loopback port, for tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


class LocalRunPodApi:
    """The worker as RunPod's local API server; `metrics=True` also serves its /metrics on a free port."""

    def __init__(self, model_dir: Path, metrics: bool = False, **env: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "MODEL_ID": str(model_dir), "HOST": "127.0.0.1", "RUNPOD_LOG_LEVEL": "INFO",
                   "METRICS_PORT": "0" if metrics else "-1", **env}  # fmt: skip
        args = ["--rp_serve_api", "--rp_api_port", str(self.port), "--rp_api_host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [sys.executable, "runpod_handler.py", *args],
            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.metrics_port: int | None = None
        self._wants_metrics = metrics
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("RunPod API server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line):
                self.metrics_port = int(match.group(1))
            if "Uvicorn running on" in line and (self.metrics_port or not self._wants_metrics):
                self._ready.set()
        self._ready.set()

    def runsync(self, job_input: Any) -> dict[str, Any]:
        body = json.dumps({"input": job_input}).encode()
        request = urllib.request.Request(f"{self.url}/runsync", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from the worker's /metrics endpoint (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == (labels or {}):
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
