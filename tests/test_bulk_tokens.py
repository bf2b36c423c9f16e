"""Dataset jobs that write patch tokens (`python -m client embed ... --patch-tokens DTYPE -o OUT`): OUT equals
`EmbedClient.patch_tokens` for the same images, a killed job resumes to the same file, and what cannot be written
is refused with one line before anything is sent."""

from __future__ import annotations

import json
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from client import EmbedClient
from client.consolidate import consolidate
from client.manifest import Manifest
from client.output import Layout
from client.shards import JobState, ShardWriter, parts_folder, read_shard
from tests.conftest import ControlledRunner, RunningServer
from tests.test_bulk import BROKEN, committed, failures, held_past, make_dataset, model_of, run, start, wait_for


def expected_tokens(server: RunningServer, root: Path, ids: list[str], dtype: str, normalize: bool = False
                    ) -> np.ndarray:  # fmt: skip
    with EmbedClient(server.address) as client:
        return client.patch_tokens([root / i for i in ids], ids=ids, dtype=dtype, normalize=normalize)


def assert_same_tokens(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same shape and dtype, values equal up to one rounding of the dtype (the server batches each run's
    images differently, and float32 sums in another order can round a value to its neighbour)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    ulp = float(np.abs(expected).max()) * float(np.finfo(expected.dtype).eps)
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=0, atol=ulp)


def read_npy_tokens(out: Path) -> tuple[list[str], np.ndarray]:
    return out.with_suffix(".ids.txt").read_text().splitlines(), np.load(out, mmap_mode="r")


def read_parquet_tokens(out: Path) -> tuple[list[str], np.ndarray]:
    """The README's way: the flat lists reshaped by the schema's `patch_tokens` metadata."""
    table = pq.read_table(out)
    shape = json.loads(table.schema.metadata[b"patch_tokens"])
    values = table.column("patch_tokens").combine_chunks().flatten().to_numpy()
    return table.column("id").to_pylist(), values.reshape(-1, shape["rows"], shape["cols"], shape["dim"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """12 good images and the BROKEN files; the good ones' ids in listing order."""
    root = tmp_path_factory.mktemp("tokens") / "photos"
    written = make_dataset(root, 12)
    return root, sorted(set(written) - set(BROKEN))


def test_npy_tokens_equal_the_clients_patch_tokens(
    server: RunningServer, photos: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, good = photos
    out = tmp_path / "tokens.npy"
    code, stdout, stderr = run("embed", str(root), "--server", server.address, "--patch-tokens", "float16",
                               "-o", str(out))  # fmt: skip
    assert code == 1 and stdout == "", stderr  # 1: the broken files
    ids, tokens = read_npy_tokens(out)
    dim = tokens.shape[-1]
    assert ids == good and tokens.shape == (len(good), 16, 16, dim) and tokens.dtype == np.float16
    assert_same_tokens(np.asarray(tokens), expected_tokens(server, root, ids, "float16"))
    assert failures(out) == dict.fromkeys(sorted(BROKEN), "INVALID_ARGUMENT")
    assert f"embedded {len(good)} of {len(good) + 3} images (patch tokens 16x16x{dim} float16)" in stderr
    identity = json.loads((parts_folder(out) / "manifest.json").read_text())["identity"]
    assert (identity["patch_tokens"], identity["normalize_tokens"]) == ("float16", False)
    assert (identity["token_rows"], identity["token_cols"], identity["dim"]) == (16, 16, dim)


def test_parquet_tokens_equal_the_clients_normalized_float32_tokens(
    server: RunningServer, photos: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, good = photos
    out = tmp_path / "tokens.parquet"
    code, _, stderr = run("embed", str(root), "--server", server.address, "--patch-tokens", "float32",
                          "--normalize-tokens", "-o", str(out))  # fmt: skip
    assert code == 1, stderr
    schema = pq.read_schema(out)
    assert str(schema.field("patch_tokens").type.value_type) == "float"
    ids, tokens = read_parquet_tokens(out)
    assert ids == good and tokens.dtype == np.float32 and tokens.shape[:3] == (len(good), 16, 16)
    assert_same_tokens(tokens, expected_tokens(server, root, ids, "float32", normalize=True))
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)


def test_float16_parquet_is_arrow_halffloat(server: RunningServer, tmp_path: Path) -> None:
    root = tmp_path / "two"
    make_dataset(root, 2)
    out = tmp_path / "t.parquet"
    code, _, stderr = run("embed", str(root / "a" / "img0000.png"), "--server", server.address,
                          "--patch-tokens", "float16", "-o", str(out))  # fmt: skip
    assert code == 0, stderr
    assert str(pq.read_schema(out).field("patch_tokens").type.value_type) == "halffloat"
    ids, tokens = read_parquet_tokens(out)
    assert ids == ["img0000.png"] and tokens.dtype == np.float16
    assert_same_tokens(tokens, expected_tokens(server, root / "a", ids, "float16"))


@pytest.fixture(scope="module")
def slow_server(make_server_module: Any, runner: Any) -> RunningServer:
    controlled = ControlledRunner(runner)
    controlled.delay_s = 0.02
    return make_server_module(runner_=controlled)


def test_a_killed_token_job_resumes_to_the_same_file(
    slow_server: RunningServer, server: RunningServer, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    make_dataset(root, 60)
    whole = tmp_path / "whole.npy"
    code, _, stderr = run("embed", str(root), "--server", server.address, "--patch-tokens", "float16",
                          "-o", str(whole))  # fmt: skip
    assert code == 1, stderr
    out = tmp_path / "out.npy"
    argv = ("--server", slow_server.address, "--patch-tokens", "float16", "-o", str(out),
            "--batch-size", "4", "--window", "2", "--shard-size", "8")  # fmt: skip
    model = model_of(slow_server)
    held_past(model, 32)  # two shards of 8 and the batches after them, never the 60 images
    try:
        proc = start(str(root), *argv)
        wait_for(lambda: committed(out) >= 16, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        model.allow(float("inf"))
    before = committed(out)
    assert 16 <= before < 60 and not out.exists()
    ids, rows = read_shard(JobState(parts_folder(out)).shards()[0])
    assert len(ids) == 8 and rows.dtype == np.float16 and rows.shape[1:] == np.load(whole, mmap_mode="r").shape[1:]
    code, _, stderr = run("embed", "--resume", "-o", str(out), "--server", server.address)  # options as recorded
    assert code == 1 and f"{before} images done before" in stderr, stderr
    ids, tokens = read_npy_tokens(out)
    whole_ids, whole_tokens = read_npy_tokens(whole)
    assert ids == whole_ids and out.stat().st_size == whole.stat().st_size
    assert_same_tokens(np.asarray(tokens), np.asarray(whole_tokens))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "{root}", "--patch-tokens", "float16", "-o", "{tmp}/t.npz"],
         "patch tokens are not written to .npz: a .npz member cannot be memory-mapped"),
        (["embed", "{root}", "--patch-tokens", "float16"], "patch tokens are not written as JSON lines on stdout"),
        (["embed", "{root}", "--patch-tokens", "bfloat16", "-o", "{tmp}/t.npy"],
         "NumPy and Parquet have no bfloat16 type; give float16 (as small) or float32"),
        (["embed", "{root}", "--patch-tokens", "int8", "-o", "{tmp}/t.npy"], "takes float32 or float16, not 'int8'"),
        (["embed", "{root}", "--runpod-endpoint", "abc", "--patch-tokens", "float16", "-o", "{tmp}/t.npy"],
         "--patch-tokens needs gRPC servers (--server): a RunPod endpoint does not send patch tokens yet"),
        (["runpod", "{root}", "--endpoint-id", "abc", "--patch-tokens", "float16", "-o", "{tmp}/t.npy"],
         "a RunPod endpoint does not send patch tokens yet"),
        (["embed", "{root}", "--patch-tokens", "float16", "--pooling", "mean", "-o", "{tmp}/t.npy"],
         "--pooling and --normalize shape the pooled embedding"),
        (["embed", "{root}", "--normalize-tokens", "-o", "{tmp}/t.npy"], "--normalize-tokens goes with"),
    ],
)  # fmt: skip
def test_what_cannot_be_written_is_refused_with_one_line_before_anything_is_sent(
    argv: list[str], message: str, photos: tuple[Path, list[str]], tmp_path: Path
) -> None:
    unreachable = ["--server", "127.0.0.1:1"] if argv[0] == "embed" and "--runpod-endpoint" not in argv else []
    filled = [a.format(root=photos[0], tmp=tmp_path) for a in argv] + unreachable
    code, stdout, stderr = run(*filled)
    lines = stderr.splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_resuming_with_other_token_options_is_refused(server: RunningServer, tmp_path: Path) -> None:
    root = tmp_path / "few"
    make_dataset(root, 3)
    out = tmp_path / "t.npy"
    argv = ("embed", str(root), "--server", server.address, "-o", str(out))
    assert run(*argv, "--patch-tokens", "float16")[0] == 1
    stamp = out.stat().st_mtime_ns
    for extra, difference in [
        (("--patch-tokens", "float32"), "patch_tokens 'float16' vs 'float32'"),
        (("--patch-tokens", "float16", "--normalize-tokens"), "normalize_tokens False vs True"),
        ((), "patch_tokens 'float16' vs ''"),
    ]:
        code, _, stderr = run(*argv, *extra)
        assert code == 2 and "cannot resume" in stderr and difference in stderr and "--overwrite" in stderr, stderr
    code, _, stderr = run("embed", "--resume", "-o", str(out), "--server", server.address)
    assert code == 1 and "nothing new" in stderr and out.stat().st_mtime_ns == stamp, stderr
    code, _, stderr = run(*argv, "--patch-tokens", "float32", "--overwrite")
    assert code == 1 and np.load(out).dtype == np.float32, stderr


def test_shards_are_cut_by_bytes_and_consolidation_reads_a_bounded_number_of_rows(tmp_path: Path) -> None:
    """A shard is committed once it holds `shard_bytes`; consolidating with room for one row at a time and
    one shard in memory writes the same rows in position order."""
    layout = Layout((2, 3, 4), "float16")
    state = JobState(parts_folder(tmp_path / "t.npy"))
    state.open()
    writer = ShardWriter(state, shard_rows=1024, shard_bytes=3 * layout.row_bytes, dtype="float16")
    order = ["e", "b", "g", "a", "f", "c", "d"]
    for image_id in order:
        writer.add(image_id, np.full(layout.shape, ord(image_id), np.float16))
        if writer.due():
            writer.commit()
    writer.commit()
    result = consolidate(state.shards(), tmp_path / "t.npy", {k: i for i, k in enumerate("abcdefg")}, layout,
                         chunk_bytes=1, cache_bytes=1)  # fmt: skip
    lengths = [len(read_shard(shard)[0]) for shard in state.shards()]
    state.close()
    ids, tokens = read_npy_tokens(tmp_path / "t.npy")
    assert lengths == [3, 3, 1] and (result.rows, result.dim) == (7, 4)
    assert ids == list("abcdefg") and tokens.shape == (7, *layout.shape) and tokens.dtype == np.float16
    assert tokens[:, 0, 0, 0].tolist() == [float(ord(k)) for k in "abcdefg"]


def test_a_manifest_written_before_patch_tokens_reads_as_a_pooled_job() -> None:
    identity = {"model_id": "m", "revision": "", "dtype": "float32", "embedding_dim": 32, "pooling": "cls",
                "normalize": False, "dim": 32}  # fmt: skip
    manifest = Manifest.from_json({"identity": identity, "inputs": ["photos"], "from_list": None, "output": "o.npy",
                                   "format": 2})  # fmt: skip
    assert manifest.identity.patch_tokens == "" and manifest.identity.token_rows == 0


def test_consolidating_tokens_holds_its_byte_budgets_not_the_dataset(tmp_path: Path) -> None:
    """39 MB of tokens in 1 MiB shards, rows of two runs interleaved as a resume leaves them: assembled with
    1 MiB chunks and 2 MiB of shards read, the traced peak stays a few MiB."""
    layout = Layout((16, 16, 64), "float16")  # 32 KiB a row
    count = 1200
    state = JobState(parts_folder(tmp_path / "t.npy"))
    state.open()
    writer = ShardWriter(state, shard_rows=1024, shard_bytes=2**20, dtype="float16")
    for position in [*range(0, count, 2), *range(1, count, 2)]:  # a first run's rows, then the holes
        writer.add(f"{position:05d}", np.full(layout.shape, position % 2048, np.float16))
        if writer.due():
            writer.commit()
    writer.commit()
    positions = {f"{p:05d}": p for p in range(count)}
    tracemalloc.start()
    try:
        consolidate(state.shards(), tmp_path / "t.npy", positions, layout, chunk_bytes=2**20, cache_bytes=2 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        state.close()
    tokens = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert tokens.shape == (count, *layout.shape) and tokens[:, 0, 0, 0].tolist() == list(range(count))
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for {count * layout.row_bytes / 2**20:.0f} MiB of tokens"
