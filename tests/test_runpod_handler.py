"""The RunPod handler: contracts, validation, errors, parity with gRPC, --test_input, the local API server."""

from __future__ import annotations

import ast
import asyncio
import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runpod_handler
from protos.dinov2.v1 import embed_pb2 as pb
from runpod_handler import CODE_OF, Worker
from server import errors
from server.config import Settings
from server.model import ModelRunner, Pooling
from tests import images
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close, wait_for
from tests.runpod_api import LocalRunPodApi

ROOT = Path(__file__).resolve().parent.parent
GOOD = images.png(seed=4)
PHOTO = images.jpeg(640, 480, seed=3)  # about 150 KB, as a phone photo scaled down
JOB_OK = {"method": "RunPodJob", "code": "OK"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vec(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.fixture(scope="module")
def worker(settings: Settings, runner: ModelRunner) -> Iterator[Worker]:
    started = Worker(settings, runner)
    yield started
    started.close()


@pytest.fixture
def make_worker(settings: Settings, runner: ModelRunner) -> Iterator[Any]:
    """Workers with changed settings, closed after the test."""
    started: list[Worker] = []

    def make(runner_: Any = None, **changes: Any) -> Worker:
        started.append(Worker(dataclasses.replace(settings, **changes), runner_ or runner))
        return started[-1]

    yield make
    for one in started:
        one.close()


async def run(worker: Worker, job_input: Any) -> dict[str, Any]:
    return await worker.handler({"id": "test-job", "input": job_input})


# ------------------------------------------------------------------ contracts


async def test_seed_contract_equals_reference_cls(worker: Worker, reference: Reference) -> None:
    output = await run(worker, {"image": b64(GOOD)})
    assert list(output) == ["embedding"]
    assert len(output["embedding"]) == 32
    assert_close(vec(output["embedding"]), reference.embed(GOOD, Pooling.CLS), "seed contract")


async def test_batch_contract_bad_items_fail_alone(worker: Worker, reference: Reference) -> None:
    other = images.jpeg(100, 80, seed=5)
    datas = [b64(GOOD), b64(b"not an image"), "%%% not base64 %%%", b64(b""), b64(other)]
    output = await run(worker, {"images": datas})
    assert set(output) == {"embeddings", "errors"}
    embeddings = output["embeddings"]
    assert embeddings[1:4] == [None, None, None]
    assert_close(vec(embeddings[0]), reference.embed(GOOD), "item 0")
    assert_close(vec(embeddings[4]), reference.embed(other), "item 4")
    assert [(e["index"], e["code"]) for e in output["errors"]] == [(i, "INVALID_ARGUMENT") for i in (1, 2, 3)]
    messages = [e["message"] for e in output["errors"]]
    assert "not a decodable image" in messages[0]
    assert "not valid base64" in messages[1]
    assert "empty image" in messages[2]


async def test_batch_without_failures_has_empty_errors(worker: Worker) -> None:
    output = await run(worker, {"images": [b64(GOOD), b64(GOOD)]})
    assert output["errors"] == [] and len(output["embeddings"]) == 2


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls_mean", "CLS_MEAN"])
@pytest.mark.parametrize("normalize", [False, True])
async def test_pooling_and_normalize_equal_reference(
    worker: Worker, reference: Reference, pooling: str, normalize: bool
) -> None:
    expected = reference.embed(GOOD, Pooling(pooling.lower()), normalize)
    single = await run(worker, {"image": b64(GOOD), "pooling": pooling, "normalize": normalize})
    batch = await run(worker, {"images": [b64(GOOD)], "pooling": pooling, "normalize": normalize})
    assert_close(vec(single["embedding"]), expected, f"{pooling} single")
    assert_close(vec(batch["embeddings"][0]), expected, f"{pooling} batch")
    if normalize:
        assert abs(float(np.linalg.norm(vec(single["embedding"]))) - 1) < 1e-5


async def test_null_options_mean_defaults(worker: Worker, reference: Reference) -> None:
    output = await run(worker, {"image": b64(GOOD), "images": None, "pooling": None, "normalize": None})
    assert_close(vec(output["embedding"]), reference.embed(GOOD), "null options")


async def test_data_url_prefix_is_accepted(worker: Worker, reference: Reference) -> None:
    output = await run(worker, {"image": "data:image/png;base64," + b64(GOOD)})
    assert_close(vec(output["embedding"]), reference.embed(GOOD), "data URL")
    bad = await run(worker, {"image": "data:image/png," + b64(GOOD)})
    assert bad == {"error": 'INVALID_ARGUMENT: image: a data URL must look like "data:image/png;base64,<base64 data>"'}


async def test_equals_the_grpc_server(worker: Worker, server: RunningServer) -> None:
    datas = [GOOD, images.jpeg(64, 64, seed=7)]
    for pooling, normalize in [(pb.POOLING_CLS, False), (pb.POOLING_CLS_MEAN, True)]:
        request = pb.EmbedRequest(images=[pb.Image(data=d) for d in datas], pooling=pooling, normalize=normalize)
        answer = server.stub.Embed(request, timeout=30)
        name = "cls" if pooling == pb.POOLING_CLS else "cls_mean"
        output = await run(worker, {"images": [b64(d) for d in datas], "pooling": name, "normalize": normalize})
        single = await run(worker, {"image": b64(datas[0]), "pooling": name, "normalize": normalize})
        for index, item in enumerate(answer.embeddings):
            assert_close(vec(output["embeddings"][index]), vec(list(item.values)), f"{name} item {index}")
        assert_close(vec(single["embedding"]), vec(list(answer.embeddings[0].values)), f"{name} single")


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ("just a string", 'input must be an object with "image" or "images", not a string'),
        ({}, 'input needs exactly one of "image"'),
        ({"image": "x", "images": ["x"]}, 'input needs exactly one of "image"'),
        ({"image": "x", "normalise": True}, "unknown input key(s) 'normalise'; accepted: image, images"),
        ({"image": 42}, "image must be a base64 string, not a number"),
        ({"images": "x"}, '"images" must be a list of base64 strings, not a string'),
        ({"images": []}, '"images" is empty'),
        ({"images": ["x", {"data": "x"}]}, "images[1] must be a base64 string, not an object"),
        ({"images": ["x"] * 300}, '"images" has 300 items, over the limit of 256 per job'),
        ({"image": "x", "pooling": "max"}, "\"pooling\" must be one of cls, mean, cls_mean, not 'max'"),
        ({"image": "x", "pooling": 1}, '"pooling" must be one of cls, mean, cls_mean, not a number'),
        ({"image": "x", "normalize": "true"}, '"normalize" must be true or false, not a string'),
        ({"image": "x", "normalize": 1}, '"normalize" must be true or false, not a number'),
    ],
)
async def test_invalid_input_fails_before_any_work(worker: Worker, job_input: Any, message: str) -> None:
    before = worker.service.metrics.value("dinov2_images_total", {"outcome": "ok"})
    output = await run(worker, job_input)
    assert list(output) == ["error"]
    assert output["error"].startswith("INVALID_ARGUMENT: ")
    assert message in output["error"]
    assert worker.service.metrics.value("dinov2_images_total", {"outcome": "ok"}) == before


async def test_messages_never_carry_the_payload(worker: Worker) -> None:
    payload = "A" * 5000
    output = await run(worker, {"image": "x", payload: 1, "pooling": payload})
    assert len(output["error"]) < 300


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("%%%", "image: not valid base64"),
        (b64(GOOD)[:-2], "image: not valid base64 (Incorrect padding)"),
        (b64(GOOD)[:40] + "\n" + b64(GOOD)[40:], "without line breaks (base64 -w0)"),
        ("é" * 8, "image: not valid base64"),
        (b64(b"not an image"), "image: not a decodable image"),
        (b64(GOOD[:60]), "image: corrupt or truncated PNG image"),
    ],
)
async def test_a_bad_single_image_fails_the_job(worker: Worker, text: str, message: str) -> None:
    output = await run(worker, {"image": text})
    assert list(output) == ["error"]
    assert output["error"].startswith("INVALID_ARGUMENT: image: ")
    assert message in output["error"]


async def test_a_batch_where_every_image_fails_fails_the_job(worker: Worker) -> None:
    output = await run(worker, {"images": [b64(b"nope")] * 7})
    assert list(output) == ["error"]
    error = output["error"]
    assert error.startswith("INVALID_ARGUMENT: all 7 images failed: images[0]: INVALID_ARGUMENT: not a decodable")
    assert "images[4]" in error and "images[5]" not in error and error.endswith("; and 2 more")


async def test_oversize_base64_is_refused_before_decoding(make_worker: Any) -> None:
    small = make_worker(max_image_bytes=1000, max_images_per_request=2)
    big = images.png(64, 64, seed=1)
    assert len(big) > 1000
    output = await run(small, {"images": [b64(big), b64(images.png(8, 8))]})
    assert output["embeddings"][0] is None and output["embeddings"][1] is not None
    assert "over the 1336 that hold the image limit of 1000 bytes" in output["errors"][0]["message"]
    too_many = await run(small, {"images": [b64(GOOD)] * 3})
    assert too_many == {"error": 'INVALID_ARGUMENT: "images" has 3 items, over the limit of 2 per job'}


async def test_input_over_the_runpod_payload_limit(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runpod_handler, "MAX_INPUT_CHARS", 1000)
    output = await run(worker, {"images": [b64(GOOD)]})
    assert output["error"].startswith("INVALID_ARGUMENT: input carries")
    assert "20 MB on /runsync, 10 MB on /run" in output["error"]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.Overloaded("server is at capacity"), "RESOURCE_EXHAUSTED: server is at capacity"),
        (errors.Unavailable("server is draining"), "UNAVAILABLE: server is draining"),
        (errors.InvalidRequest("request has no images"), "INVALID_ARGUMENT: request has no images"),
    ],
)
async def test_engine_refusals_map_to_codes(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, exc: errors.EmbedError, expected: str
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(worker.service, "embed", refuse)
    assert await run(worker, {"image": b64(GOOD)}) == {"error": expected}
    assert await run(worker, {"images": [b64(GOOD)]}) == {"error": expected}


async def test_unexpected_failures_are_logged_not_leaked(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(worker.service, "embed", broken)
    output = await run(worker, {"image": b64(GOOD)})
    assert output == {"error": "INTERNAL: the worker failed on this job; the details are in its log"}
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text


def test_every_engine_error_has_a_code() -> None:
    assert set(errors.EmbedError.__subclasses__()) <= set(CODE_OF)


# ---------------------------------------------------------------- concurrency


def test_runpod_config_is_async_with_a_concurrency_modifier(worker: Worker, settings: Settings) -> None:
    config = worker.runpod_config()
    assert asyncio.iscoroutinefunction(config["handler"])
    assert config["concurrency_modifier"](1) == settings.runpod_concurrency == 64


async def test_concurrent_jobs_share_batches(worker: Worker, reference: Reference) -> None:
    metrics = worker.service.metrics
    batches = metrics.value("dinov2_batch_size_count")
    datas = [images.png(seed=s) for s in range(12)]
    outputs = await asyncio.gather(*(run(worker, {"image": b64(d)}) for d in datas))
    for index, (data, output) in enumerate(zip(datas, outputs, strict=True)):
        assert_close(vec(output["embedding"]), reference.embed(data), f"job {index}")
    assert metrics.value("dinov2_batch_size_count") - batches < len(datas)


async def test_jobs_over_the_queue_bound_wait_instead_of_failing(make_worker: Any) -> None:
    small = make_worker(max_queue_images=4)
    jobs = [run(small, {"images": [b64(images.png(seed=s))] * 3}) for s in range(4)]
    outputs = await asyncio.gather(*jobs)
    assert all(o.get("errors") == [] for o in outputs), outputs
    assert [[len(e) for e in o["embeddings"]] for o in outputs] == [[32] * 3] * 4, outputs


async def test_a_job_that_finds_no_room_within_max_queue_s_fails_resource_exhausted(
    make_worker: Any, runner: ModelRunner
) -> None:
    controlled = ControlledRunner(runner)
    small = make_worker(controlled, max_queue_images=4, max_queue_s=0.5)
    controlled.allow(controlled.images_seen)  # the first job's images wait in the model
    try:
        first = asyncio.ensure_future(run(small, {"images": [b64(GOOD)] * 4}))
        await asyncio.to_thread(wait_for, lambda: small.service.metrics.value("dinov2_in_flight_images") == 4)
        second = await run(small, {"images": [b64(GOOD)] * 2})
    finally:
        controlled.allow(float("inf"))
    assert re.fullmatch(r"RESOURCE_EXHAUSTED: no capacity for 2 images within [\d.]+ s .*", second["error"]), second
    assert (await first)["errors"] == []


async def test_a_job_not_done_by_its_timeout_fails_deadline_exceeded(make_worker: Any, runner: ModelRunner) -> None:
    controlled = ControlledRunner(runner)
    slow = make_worker(controlled, runpod_job_timeout_s=0.5)
    controlled.allow(controlled.images_seen)  # the model never answers in time
    try:
        output = await run(slow, {"image": b64(GOOD)})
    finally:
        controlled.allow(float("inf"))
    # which of the two the image gets depends on whether its batch reached the model before the deadline
    assert output in (
        {"error": "DEADLINE_EXCEEDED: image: deadline passed before this image was embedded"},
        {"error": "DEADLINE_EXCEEDED: image: deadline passed while the image was queued"},
    )


# ------------------------------------------------------------ --test_input


@dataclasses.dataclass(frozen=True)
class Script:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def scripted(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Script]:
    """`python runpod_handler.py` runs, started together: each is mostly interpreter start-up."""
    home = tmp_path_factory.mktemp("hf-home")
    job = tmp_path_factory.mktemp("job")  # the README's route for a photo: test_input.json in a job folder
    (job / "test_input.json").write_text(json.dumps({"input": {"images": [b64(PHOTO)], "pooling": "mean"}}))
    runs = {
        "test_input.json": ([], {}, ROOT),
        "broken": (["--test_input", json.dumps({"input": {"image": b64(b"not an image")}})], {}, ROOT),
        "no model": ([], {"MODEL_ID": str(home / "nowhere"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}, ROOT),
        "photo job": ([], {}, job),
    }
    base = {**os.environ, "MODEL_ID": str(model_dir), "METRICS_PORT": "-1", "RUNPOD_LOG_LEVEL": "INFO"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "runpod_handler.py"), *args],
            cwd=cwd,
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env, cwd) in runs.items()
    }
    with ThreadPoolExecutor(len(procs)) as pool:
        outputs = dict(zip(procs, pool.map(lambda p: p.communicate(timeout=120), procs.values()), strict=True))
    return {name: Script(procs[name].returncode, *outputs[name]) for name in procs}


def job_result(stdout: str) -> dict[str, Any]:
    match = re.search(r"Job result: (\{.*\})$", stdout, re.MULTILINE)
    assert match, stdout
    return ast.literal_eval(match.group(1))


def test_test_input_json_runs_and_matches_reference(scripted: dict[str, Script], reference: Reference) -> None:
    """`python runpod_handler.py` with no flags runs the root test_input.json, as RunPod documents."""
    run = scripted["test_input.json"]
    assert run.returncode == 0, run.stdout + run.stderr
    image = base64.b64decode(json.loads((ROOT / "test_input.json").read_text())["input"]["image"])
    assert image.startswith(b"\x89PNG")
    assert_close(vec(job_result(run.stdout)["output"]["embedding"]), reference.embed(image), "test_input.json")


def test_a_photo_job_runs_from_its_job_folder(scripted: dict[str, Script], reference: Reference) -> None:
    """A photo's base64 is over Linux's 128 KiB per argument, too long for --test_input; a job folder takes it."""
    assert len(b64(PHOTO)) > 128 * 1024
    run = scripted["photo job"]
    assert run.returncode == 0, run.stdout + run.stderr
    output = job_result(run.stdout)["output"]
    assert output["errors"] == []
    assert_close(vec(output["embeddings"][0]), reference.embed(PHOTO, Pooling.MEAN), "photo job")


def test_test_input_with_a_broken_image_exits_non_zero(scripted: dict[str, Script]) -> None:
    run = scripted["broken"]
    assert run.returncode == 1, run.stdout + run.stderr
    assert "failed with error: INVALID_ARGUMENT: image: not a decodable image" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_a_missing_model_ends_the_start_with_one_line(scripted: dict[str, Script]) -> None:
    run = scripted["no model"]
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: cannot load model")
    assert "Traceback" not in run.stderr


# ------------------------------------------------------- local API server


@pytest.fixture(scope="module")
def api(model_dir: Path) -> Iterator[LocalRunPodApi]:
    server = LocalRunPodApi(model_dir, metrics=True, MAX_WAIT_MS="100")
    yield server
    server.stop()


def test_api_seed_contract(api: LocalRunPodApi, reference: Reference) -> None:
    answer = api.runsync({"image": b64(GOOD)})
    assert answer["status"] == "COMPLETED"
    assert_close(vec(answer["output"]["embedding"]), reference.embed(GOOD), "runsync seed")


def test_api_batch_contract(api: LocalRunPodApi, reference: Reference) -> None:
    answer = api.runsync({"images": [b64(GOOD), b64(b"broken")], "pooling": "mean", "normalize": True})
    assert answer["status"] == "COMPLETED"
    output = answer["output"]
    assert_close(vec(output["embeddings"][0]), reference.embed(GOOD, Pooling.MEAN, True), "runsync batch")
    assert output["embeddings"][1] is None
    assert output["errors"][0]["index"] == 1 and output["errors"][0]["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("job_input", "error"),
    [
        ({"image": b64(b"broken")}, "INVALID_ARGUMENT: image: not a decodable image"),
        ({"image": "%%%"}, "INVALID_ARGUMENT: image: not valid base64"),
        ({"images": [b64(GOOD)], "pooling": "max"}, 'INVALID_ARGUMENT: "pooling" must be one of'),
        ({"picture": b64(GOOD)}, "INVALID_ARGUMENT: unknown input key(s) 'picture'"),
    ],
)
def test_api_bad_jobs_are_failed(api: LocalRunPodApi, job_input: Any, error: str) -> None:
    answer = api.runsync(job_input)
    assert answer["status"] == "FAILED" and "output" not in answer
    assert answer["error"].startswith(error)


def test_api_concurrent_jobs_share_batches(api: LocalRunPodApi, reference: Reference) -> None:
    datas = [images.png(seed=s) for s in range(8)]
    batches, images_in_batches = api.metric("dinov2_batch_size_count"), api.metric("dinov2_batch_size_sum")
    ok = api.metric("dinov2_requests_total", JOB_OK)
    with ThreadPoolExecutor(len(datas)) as pool:
        answers = list(pool.map(lambda d: api.runsync({"image": b64(d)}), datas))
    for index, (data, answer) in enumerate(zip(datas, answers, strict=True)):
        assert answer["status"] == "COMPLETED"
        assert_close(vec(answer["output"]["embedding"]), reference.embed(data), f"job {index}")
    assert api.metric("dinov2_batch_size_sum") - images_in_batches == len(datas)
    assert api.metric("dinov2_batch_size_count") - batches < len(datas)  # some jobs shared a forward pass
    assert api.metric("dinov2_requests_total", JOB_OK) - ok == len(datas)
