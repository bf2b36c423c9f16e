"""An independent client in another language (Node.js, @grpc/grpc-js) against protos/ only."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from server.model import Pooling
from tests import images
from tests.conftest import Reference, RunningServer, assert_close

HERE = Path(__file__).resolve().parent / "interop"
POOLINGS = {"POOLING_CLS": Pooling.CLS, "POOLING_MEAN": Pooling.MEAN, "POOLING_CLS_MEAN": Pooling.CLS_MEAN}

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (HERE / "node_modules").is_dir(),
    reason="needs node and `npm ci --prefix tests/interop` (.ci/run does both)",
)


def test_node_client_gets_reference_embeddings_errors_order_and_health(
    server: RunningServer, reference: Reference, corpus: dict[str, bytes], tmp_path: Path
) -> None:
    items = {
        "png": corpus["png_rgb"], "bad-text": b"this is not an image", "jpeg": corpus["jpeg_gray"],
        "empty": b"", "webp": corpus["webp"], "truncated": images.png()[:70], "cmyk": corpus["jpeg_cmyk"],
    }  # fmt: skip
    listing = []
    for name, data in items.items():
        (tmp_path / name).write_bytes(data)
        listing.append({"id": name, "path": str(tmp_path / name)})
    (tmp_path / "list.json").write_text(json.dumps(listing))
    proc = subprocess.run(
        ["node", str(HERE / "embed_client.mjs"), server.address, str(tmp_path / "list.json")],
        capture_output=True, text=True, timeout=120, cwd=HERE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    bad = {"bad-text", "empty", "truncated"}

    assert result["info"]["embeddingDim"] == 32
    for pooling_name, pooling in POOLINGS.items():
        answers = result["unary"][pooling_name]["embeddings"]
        assert [a["id"] for a in answers] == list(items)
        for answer in answers:
            if answer["id"] in bad:
                assert answer["error"]["code"] == 3 and answer["error"]["message"]
                assert answer["values"] == []
            else:
                assert answer["error"] is None
                expected = reference.embed(items[answer["id"]], pooling)
                assert_close(np.array(answer["values"], np.float32), expected, f"{pooling_name} {answer['id']}")

    stream = result["stream"]
    assert len(stream) == len(items) + 1
    assert [s["embeddings"][0]["id"] for s in stream[:-1]] == list(items)
    for response in stream[:-1]:
        answer = response["embeddings"][0]
        if answer["id"] in bad:
            assert answer["error"]["code"] == 3
        else:
            assert_close(np.array(answer["values"], np.float32), reference.embed(items[answer["id"]]), answer["id"])
    assert stream[-1]["error"]["code"] == 3 and "no images" in stream[-1]["error"]["message"]
    assert result["health"] == "SERVING"
