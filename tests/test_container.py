"""The container without a Docker engine: lint the Dockerfile, then run its own download
step, its default command (RunPod worker) and its gRPC command on a local tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import load_settings
from server.healthcheck import main_process_is_runpod_worker
from server.info import served_model_name
from tests.test_app import wait_ready

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def build_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults: what a `docker build` without --build-arg uses."""
    declared = (rest.partition("=") for keyword, rest in instructions() if keyword == "ARG")
    return {name: default for name, _, default in declared}


def runtime_env(model_dir: Path) -> dict[str, str]:
    """The image's final ENV (build arguments at their defaults), with the baked model folder replaced by
    `model_dir`."""
    env: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            pairs = (pair.split("=", 1) for pair in shlex.split(rest))
            env.update({name: string.Template(value).substitute(build_args()) for name, value in pairs})
    env["MODEL_ID"] = str(model_dir)
    env.pop("HF_HOME", None)
    return env


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_bakes_weights_and_runs_offline() -> None:
    kinds = [k for k, _ in instructions()]
    assert kinds[0] == "FROM" and "USER" in kinds and "HEALTHCHECK" in kinds
    env = runtime_env(Path("/opt/model"))
    assert env["HF_HUB_OFFLINE"] == "1" and env["MODEL_ID"] == "/opt/model"
    # answers name the baked folder as the Hub id it was downloaded from, not as /opt/model
    assert served_model_name(load_settings([], env)) == build_args()["MODEL"] == "facebook/dinov2-small"
    copies = [rest for k, rest in instructions() if k in ("COPY", "RUN")]
    deps = next(i for i, c in enumerate(copies) if "requirements.txt" in c and c.startswith("pip"))
    source = next(i for i, c in enumerate(copies) if c.startswith("server/ "))
    assert deps < source, "dependencies must be installed before the source is copied"


@pytest.fixture(scope="module")
def baked_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the Dockerfile's own download step, with the tiny model as MODEL."""
    step = next(rest for k, rest in instructions() if k == "RUN" and "server.download" in rest)
    out = tmp_path_factory.mktemp("baked") / "model"
    command = step.replace("${MODEL}", str(model_dir)).replace("${MODEL_REVISION}", "main")
    command = command.replace("/opt/model", str(out)).replace("--revision main", "")
    proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_download_step_writes_a_loadable_folder_with_the_hub_processor(baked_model: Path) -> None:
    assert (baked_model / "config.json").exists()
    assert (baked_model / "model.safetensors").exists()
    processor = json.loads((baked_model / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 256} and processor["do_center_crop"] is True


def test_default_command_runs_the_runpod_worker_on_test_input(baked_model: Path) -> None:
    argv = json.loads(next(rest for k, rest in instructions() if k == "CMD"))
    assert argv[-1] == "runpod_handler.py"
    env = {**os.environ, **runtime_env(baked_model), "METRICS_PORT": "-1"}
    proc = subprocess.run(
        [sys.executable if a == "python" else a for a in argv], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'embedding': [" in proc.stdout + proc.stderr


def test_grpc_command_serves_and_its_healthcheck_passes(baked_model: Path) -> None:
    env = {**os.environ, **runtime_env(baked_model), "PORT": "0", "METRICS_PORT": "-1", "HOST": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        port, _ = wait_ready(proc)
        healthcheck = next(rest for k, rest in instructions() if k == "HEALTHCHECK")
        argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
        check = subprocess.run(argv, cwd=ROOT, env={**env, "PORT": str(port)}, capture_output=True, text=True)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        check = subprocess.run(argv, cwd=ROOT, env={**env, "PORT": str(port)}, capture_output=True, text=True)
        assert check.returncode == 1
    finally:
        proc.kill()
        proc.wait()


def test_healthcheck_recognises_the_runpod_worker(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"python\x00-u\x00runpod_handler.py\x00")
    assert main_process_is_runpod_worker(cmdline)
    cmdline.write_bytes(b"python\x00-m\x00server\x00")
    assert not main_process_is_runpod_worker(cmdline)


def test_kubernetes_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = sorted((ROOT / "deploy/k8s").glob("*.yaml"))
    docs = {doc["kind"]: doc for path in manifests for doc in yaml.safe_load_all(path.read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "server"]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "dinov2.v1.Embed"}
    assert "grpc" in container["livenessProbe"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {var["name"]: var["value"] for var in container["env"]}
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(96)), raising=False)  # a large node
    settings = load_settings([], env)  # what the pod's server would run with there
    # as many decode workers as the pod's CPUs allow, not the node's
    assert 0 < settings.decode_workers < int(container["resources"]["requests"]["cpu"])
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
