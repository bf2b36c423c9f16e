"""`--resize-on` and `--decode fast` through the whole server: placements give the reference's
embeddings, full-size pixels count against the pixel budget until resized, fast mode is opt-in."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from protos.dinov2.v1 import embed_pb2 as pb
from server.config import load_settings
from server.decode.budget import PixelBudget
from server.model import Pooling
from server.resize import placement
from tests.conftest import Reference, assert_close, wait_for

NAMES = ["png_rgb", "jpeg_cmyk", "png_16bit", "gif_animated", "tiny_1x1", "tall_15x900", "exact_224", "webp"]


def request(datas: list[bytes]) -> pb.EmbedRequest:
    return pb.EmbedRequest(images=[pb.Image(data=d, id=str(i)) for i, d in enumerate(datas)], pooling=pb.POOLING_CLS)


@pytest.mark.parametrize("decode_in", ["processes", "threads"])
def test_a_server_resizing_on_the_device_answers_the_reference(
    make_server, reference: Reference, corpus: dict[str, bytes], decode_in: str
) -> None:
    running = make_server(resize_on="device", decode_in=decode_in, preprocess_workers=2)
    assert running.server.service.resize_on == "device"
    response = running.stub.Embed(request([corpus[n] for n in NAMES]), timeout=120)
    for name, item in zip(NAMES, response.embeddings, strict=True):
        assert not item.HasField("error"), name
        assert_close(np.array(item.values, dtype=np.float32), reference.embed(corpus[name], Pooling.CLS), name)
    budget = running.server.service._decoder._full_size
    assert budget is not None
    wait_for(lambda: budget.held == 0, timeout=30)  # every full-size image freed, and its pixels given back


def test_auto_resizes_in_the_workers_on_a_cpu_and_on_the_device_on_cuda() -> None:
    assert placement("auto", torch.device("cpu")) == "workers"
    assert placement("auto", torch.device("cuda")) == "device"
    assert placement("device", torch.device("cpu")) == "device"


@pytest.mark.parametrize(("argv", "env"), [(["--resize-on", "gpu"], {}), (["--decode", "turbo"], {})])
def test_an_unknown_placement_or_mode_is_a_usage_error(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(argv, env)
    assert info.value.code == 2  # argparse: one line naming the flag and its choices


def test_an_unknown_placement_in_the_environment_names_the_variable() -> None:
    with pytest.raises(SystemExit, match="RESIZE_ON must be one of auto, workers, device, not 'gpu'"):
        load_settings([], {"RESIZE_ON": "gpu"})


def test_full_size_images_hold_the_budget_until_freed() -> None:
    budget = PixelBudget(1000)
    images = [np.zeros((20, 30), dtype=np.uint8), np.zeros((10, 10), dtype=np.uint8)]
    budget.hold_while_alive(images)
    assert budget.held == 700
    del images[0]
    gc.collect()
    assert budget.held == 100
    images.clear()
    assert budget.held == 0
