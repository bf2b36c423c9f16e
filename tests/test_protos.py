"""The generated code checked in under protos/ must match protos/*.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/dinov2/v1/embed.proto"
GENERATED = ["embed_pb2.py", "embed_pb2.pyi", "embed_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    (tmp_path / "protos/dinov2/v1").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    args = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(tmp_path / PROTO)]  # fmt: skip
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "protos/dinov2/v1" / name).read_text()
        checked_in = (ROOT / "protos/dinov2/v1" / name).read_text()
        assert fresh == checked_in, f"protos/dinov2/v1/{name} is stale: run the command in protos/README.md"
