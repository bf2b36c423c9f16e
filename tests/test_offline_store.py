"""The offline job's OUT_DIR without Ray: parts, the ledger of what is done, the lock."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from offline import lock as locks
from offline import store as stores
from offline.ledger import DigestSet, Ledger
from offline.lock import Locked, LockLost, OutLock, check_token
from offline.store import Store, StoreError

VEC = np.arange(4, dtype=np.float32)


def _write(store: Store, ids: list[str], codes: list[str] | None = None) -> str:
    codes = codes or [""] * len(ids)
    return store.write_part(ids, np.vstack([VEC] * len(ids)), codes, ["bad" if c else "" for c in codes])


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def test_a_read_error_stops_the_job_and_removes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path / "out"))
    _write(store, ["a", "b"])
    failing = _write(store, ["c"])
    _write(store, ["a"])  # a repeat that finish would remove
    before = _files(tmp_path / "out")
    real = pq.read_table

    def flaky(path: str, **kwargs: object) -> object:
        if path.endswith(failing.rsplit("/", 1)[1]):
            raise OSError("Input/output error (a passing NFS hiccup)")
        return real(path, **kwargs)

    monkeypatch.setattr(stores.pq, "read_table", flaky)
    with pytest.raises(StoreError, match="nothing was removed") as raised:
        store.finish(store.scan())
    assert failing.rsplit("/", 1)[1] in str(raised.value) and "Input/output error" in str(raised.value)
    assert _files(tmp_path / "out") == before

    monkeypatch.setattr(stores.pq, "read_table", real)
    tally = store.finish(store.scan())
    assert tally.rows == 3 and tally.duplicates_removed == 1


def test_only_a_part_whose_size_contradicts_its_name_is_removed(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    kept = _write(store, ["a", "b"])
    torn = _write(store, ["c"])
    path = tmp_path / "out" / torn
    path.write_bytes(path.read_bytes()[:-10])  # what a half-written part looks like
    ledger = store.scan()
    assert ledger.torn == 1 and not path.exists() and (tmp_path / "out" / kept).exists()
    assert list(ledger.done(retry_failed=False).holds_ids(["a", "b", "c"])) == [True, True, False]
    (tmp_path / "out" / "data" / ".part-x.parquet.123.tmp").write_bytes(b"a dead writer's leftovers")
    assert store.remove_temporaries() == 1 and len(_files(tmp_path / "out")) == 1


def test_finish_keeps_the_first_success_else_the_first_failure_for_every_id(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = Store(str(tmp_path / "out"))
    expected: dict[str, tuple[int, str]] = {}  # id -> (order of the kept row, code)
    order = 0
    for _ in range(12):
        ids = [f"img{rng.randrange(40):03d}.jpg" for _ in range(rng.randrange(1, 9))]
        codes = [rng.choice(["", "", "INVALID_ARGUMENT", "INTERNAL"]) for _ in ids]
        _write(store, ids, codes)
        for image_id, code in zip(ids, codes, strict=True):
            held = expected.get(image_id)
            if held is None or (held[1] and not code):
                expected[image_id] = (order, code)
            order += 1
    tally = store.finish(store.scan())
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert sorted((r["id"], r["error_code"] or "") for r in rows) == sorted((i, c) for i, (_, c) in expected.items())
    assert tally.rows == len(expected) == len(rows)
    assert tally.failed == sum(1 for _, c in expected.values() if c)
    assert {i for i, _ in tally.failures} <= {i for i, (_, c) in expected.items() if c}
    assert store.finish(store.scan()).duplicates_removed == 0  # a second pass finds nothing to do


def test_a_rerun_retries_failed_forward_passes_and_bad_images_only_when_asked(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    _write(store, ["ok.jpg", "bad.jpg", "oom.jpg"], ["", "INVALID_ARGUMENT", "INTERNAL"])
    ledger = store.scan()
    ids = ["ok.jpg", "bad.jpg", "oom.jpg", "new.jpg"]
    assert list(ledger.done(retry_failed=False).holds_ids(ids)) == [True, True, False, False]
    assert list(ledger.done(retry_failed=True).holds_ids(ids)) == [True, False, False, False]


def test_a_digest_set_answers_membership_like_a_set() -> None:
    ids = [f"shards/{n:06d}.tar/{m:06d}.jpg" for n in range(30) for m in range(50)]
    done = DigestSet.of(ids[::3])
    assert list(done.holds_ids(ids)) == [n % 3 == 0 for n in range(len(ids))]
    assert ids[0] in done and ids[1] not in done and len(done) == len(ids[::3])
    assert not DigestSet.of([]).holds_ids(["a"]).any()
    assert len(Ledger().done(retry_failed=False)) == 0


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    with OutLock(store) as first:
        with pytest.raises(Locked, match=r"is in use by run \w+ of process \d+ on .*: wait for it to end"):
            OutLock(Store(str(tmp_path / "out"))).acquire()
        check_token(store, first.token)
    second = OutLock(store)
    second.acquire()  # released by the first (as it is when its process dies: the kernel drops the flock)
    try:
        with pytest.raises(LockLost, match="another run took"):
            check_token(store, first.token)  # a stray write task of the first run commits nothing
    finally:
        second.release()


def test_a_lease_on_an_object_store_is_refused_while_fresh_and_taken_over_when_stale(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    holder = {"run": "a" * 32, "host": "node-7", "pid": 4242, "renewed": time.time()}
    store.write_atomic(locks.LOCK, json.dumps(holder).encode())
    with pytest.raises(Locked, match="run aaaaaaaa of process 4242 on node-7"):
        OutLock(store, lease=True).acquire()
    holder["renewed"] = time.time() - locks.STALE_S - 1
    store.write_atomic(locks.LOCK, json.dumps(holder).encode())
    with OutLock(store, lease=True) as taker:
        assert json.loads((tmp_path / "out" / locks.LOCK).read_text())["run"] == taker.token
        with pytest.raises(LockLost):
            check_token(store, "a" * 32)
    assert not (tmp_path / "out" / locks.LOCK).exists()  # a run that ended leaves no lease behind
    with OutLock(store, lease=True):
        pass
