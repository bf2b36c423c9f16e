"""Where the model comes from and what it is: fast, one-line refusals; DINOv2 (with or without registers) served."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import Settings
from server.errors import ModelLoadError
from server.model import ModelRunner
from server.preprocess import ImageLimits, configured_processor, decode
from server.random_model import HUB_PREPROCESSOR_CONFIG, build_model_dir
from server.source import ModelSource, check_supported, locate
from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def hub_env(home: Path, port: int) -> dict[str, str]:
    """The environment of a machine whose Hub is unreachable and whose cache is `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}


def run_server(model: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m server --model MODEL`; 60 s is far above the fast refusal and far below the retry path's 98 s."""
    return subprocess.run(
        [sys.executable, "-m", "server", "--model", model, "--port", "0", "--metrics-port", "-1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def only_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The run ended with exit 1 and one `error:` line, at most one line before it, no traceback."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines and lines[-1].startswith("error: ") and len(lines) <= 2, "\n".join(lines)
    return lines[-1]


def test_unreachable_hub_id_ends_the_start_with_one_line(tmp_path: Path, closed_port: int) -> None:
    proc = run_server("dinov2-tiny", hub_env(tmp_path, closed_port))
    line = only_line(proc)
    assert "'dinov2-tiny'" in line and f"127.0.0.1:{closed_port}" in line and "cannot be reached" in line
    assert "not in the cache" in line and "local folder" in line
    assert "Retrying" not in proc.stderr


def test_cached_hub_model_loads_without_the_hub(tmp_path: Path, closed_port: int) -> None:
    """A Hub id in the local cache loads while the Hub is down, without huggingface_hub's retries."""
    repo = tmp_path / "hub" / "models--acme--dinov2-tiny"
    commit = "0" * 40
    build_model_dir(repo / "snapshots" / commit, "tiny")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from server.config import Settings; from server.model import ModelRunner; "
        "print('dim', ModelRunner.load(Settings(model='acme/dinov2-tiny')).embedding_dim)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=hub_env(tmp_path, closed_port),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dim 32" in proc.stdout
    assert "Retrying" not in proc.stderr


def test_local_folder_is_used_as_it_is(model_dir: Path) -> None:
    assert locate(str(model_dir), None, 1.0) == ModelSource(str(model_dir), None, local_files_only=False)


@pytest.mark.parametrize(
    ("name", "says"),
    [("/no/such/folder", "there is no such folder"), ("a/b/c", "not a Hub id"), ("config.json", "it is a file")],
)
def test_what_is_neither_folder_nor_hub_id_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=says):
        locate(name, None, 1.0)


def vit_dir(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ViTModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG))
    return path


def test_vit_folder_is_refused_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    line = only_line(run_server(str(vit_dir(tmp_path / "vit")), {**env, "HF_HUB_OFFLINE": "1"}))
    assert "model_type is 'vit'" in line and "dinov2 or dinov2_with_registers" in line


@pytest.mark.parametrize("family", ["bert", "clip_vision_model", "vit_mae", "siglip_vision_model", "not_a_model"])
def test_config_of_another_family_is_refused(tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig

    if family == "not_a_model":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": family, "hidden_size": 32}))
    else:
        config = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
        config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"model_type is '{family}'; this server runs DINOv2 only"):
        check_supported(ModelSource(str(tmp_path)))


def test_dinov2_with_registers_is_served_with_parity(tmp_path: Path, corpus: dict[str, bytes]) -> None:
    """The registers variant: CLS = the reference's pooler_output, mean over the patch tokens only."""
    from PIL import Image
    from transformers import AutoModel

    folder = build_model_dir(tmp_path / "registers", "tiny", registers=4)
    check_supported(ModelSource(str(folder)))
    runner = ModelRunner.load(Settings(model=str(folder)))
    processor = configured_processor(str(folder), None)
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    names = ["png_rgb", "jpeg_gray", "webp"]
    limits = ImageLimits(max_bytes=1 << 26, max_pixels=50_000_000)
    out = runner.embed(np.stack([decode(corpus[n], limits, runner.image_size) for n in names]))
    for i, name in enumerate(names):
        pixels = processor(Image.open(io.BytesIO(corpus[name])).convert("L"), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            ref = model(pixel_values=pixels)
        assert ref.last_hidden_state.shape[1] == 1 + 4 + 256
        assert_close(out.cls[i], ref.pooler_output[0].numpy(), f"cls {name}")
        assert_close(out.mean[i], ref.last_hidden_state[0, 5:].mean(dim=0).numpy(), f"mean {name}")
