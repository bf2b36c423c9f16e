"""`--image-size` and `--preprocess`: the service equals the reference of each mode and size, pixel for pixel
and embedding for embedding, in both resize placements; sizes that are not a multiple of the patch are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protos.dinov2.v1 import embed_pb2 as pb
from server.config import Settings, load_settings
from server.errors import InvalidImage, ModelLoadError
from server.geometry import Geometry
from server.model import ModelRunner, Pooling, pool
from server.preprocess import ImageLimits, decode
from server.random_model import build_model_dir
from server.resize import resize_batch
from tests import images
from tests.conftest import Reference, assert_close

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)
# (--preprocess, --image-size, what is served): the checkpoint's 256/224 keeps its ratio at 448.
MODES = [("card", 224, Geometry(224)), ("card", 448, Geometry(448)), ("card", 518, Geometry(518)),
         ("checkpoint", None, Geometry(224, 256)), ("checkpoint", 448, Geometry(448, 512))]  # fmt: skip
NAMES = ["png_rgb", "jpeg_gray", "webp", "tiny_1x1", "wide_1000x20", "tall_15x900", "exact_224", "large_6000x4000"]


@dataclasses.dataclass(frozen=True)
class Served:
    runner: ModelRunner
    reference: Reference
    expected: Geometry


@pytest.fixture(scope="module", params=MODES, ids=[f"{mode}-{size or 'default'}" for mode, size, _ in MODES])
def served(request: pytest.FixtureRequest, settings: Settings, model_dir: Path) -> Served:
    preprocess, size, expected = request.param
    runner = ModelRunner.load(dataclasses.replace(settings, image_size=size, preprocess=preprocess))
    return Served(runner, Reference(model_dir, size, preprocess), expected)


def test_the_served_geometry_is_the_asked_one(served: Served) -> None:
    side = served.expected.size
    assert served.runner.norm.geometry == served.expected and served.runner.image_size == side
    pixel_values = served.reference.processor(Image.new("L", (300, 200)), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, side, side)


def test_decoded_pixels_are_the_reference_processors_in_both_placements(
    served: Served, corpus: dict[str, bytes]
) -> None:
    reference, geometry = served.reference, served.runner.norm.geometry
    for name, data in corpus.items():
        expected = reference.pixels(data)
        assert np.array_equal(expected[0], expected[2]), name  # grayscale, replicated
        in_workers = decode(data, LIMITS, geometry)
        on_device = resize_batch([decode(data, LIMITS, geometry, resize=False)], geometry, torch.device("cpu"))[0]
        np.testing.assert_array_equal(in_workers, expected[0], err_msg=name)
        np.testing.assert_array_equal(on_device.numpy(), expected[0], err_msg=name)


@pytest.mark.parametrize("resize_on", ["workers", "device"])
def test_embeddings_equal_the_reference(served: Served, corpus: dict[str, bytes], resize_on: str) -> None:
    runner, reference = served.runner, served.reference
    geometry, full_size = runner.norm.geometry, resize_on == "device"
    pixels = [decode(corpus[name], LIMITS, geometry, resize=not full_size) for name in NAMES]
    out = runner.embed(pixels, full_size=full_size)
    for i, name in enumerate(NAMES):
        both = pool(out.cls[i], out.mean[i], Pooling.CLS_MEAN, False)
        assert_close(both, reference.embed(corpus[name], Pooling.CLS_MEAN), f"{resize_on} {name}")


def test_a_registers_model_at_448_with_the_checkpoints_crop(tmp_path: Path, corpus: dict[str, bytes]) -> None:
    folder = build_model_dir(tmp_path / "registers", "tiny", registers=4)
    runner = ModelRunner.load(Settings(model=str(folder), image_size=448, preprocess="checkpoint"))
    reference = Reference(folder, 448, "checkpoint")
    assert reference.first_patch == 5 and runner.norm.geometry == Geometry(448, 512)
    names = ["png_rgb", "jpeg_gray", "tall_15x900"]
    out = runner.embed(np.stack([decode(corpus[n], LIMITS, runner.norm.geometry) for n in names]))
    for i, name in enumerate(names):
        assert_close(out.cls[i], reference.embed(corpus[name], Pooling.CLS), f"cls {name}")
        assert_close(out.mean[i], reference.embed(corpus[name], Pooling.MEAN), f"mean {name}")


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (
            500,
            "--image-size 500 is not a multiple of the model's patch size 14: the nearest valid sizes are 490 and 504",
        ),
        (10, "--image-size 10 is not a multiple of the model's patch size 14: the nearest valid size is 14"),
    ],
)
@pytest.mark.parametrize("preprocess", ["card", "checkpoint"])
def test_a_size_off_the_patch_grid_is_refused_in_one_line(
    model_dir: Path, size: int, message: str, preprocess: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        ModelRunner.load(Settings(model=str(model_dir), image_size=size, preprocess=preprocess))
    assert str(info.value) == message


def _with_processor(tmp_path: Path, model_dir: Path, **changes: object) -> Path:
    """A copy of the test model whose preprocessor_config.json has `changes`."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_checkpoint_crop_off_the_patch_grid_names_it(tmp_path: Path, model_dir: Path) -> None:
    folder = _with_processor(tmp_path, model_dir, crop_size={"height": 225, "width": 225})
    with pytest.raises(ModelLoadError, match=r"the checkpoint's crop size 225 .* sizes are 224 and 238"):
        ModelRunner.load(Settings(model=str(folder), preprocess="checkpoint"))
    assert ModelRunner.load(Settings(model=str(folder), preprocess="checkpoint", image_size=224)).image_size == 224


def test_a_checkpoint_processor_that_cannot_be_batched_is_refused(tmp_path: Path, model_dir: Path) -> None:
    folder = _with_processor(tmp_path, model_dir, do_center_crop=False)
    with pytest.raises(ModelLoadError, match=r"unsupported image processor .* use --preprocess card"):
        ModelRunner.load(Settings(model=str(folder), preprocess="checkpoint"))
    assert ModelRunner.load(Settings(model=str(folder))).norm.geometry == Geometry(224)  # card overrides it


def test_flags_and_environment() -> None:
    assert Settings().image_size is None and Settings().preprocess == "card"
    env = load_settings([], {"IMAGE_SIZE": "448", "PREPROCESS": "checkpoint"})
    assert (env.image_size, env.preprocess) == (448, "checkpoint")
    assert load_settings(["--image-size", "518"], {"IMAGE_SIZE": "448"}).image_size == 518
    with pytest.raises(SystemExit, match="image_size must be at least 1, not 0"):
        load_settings(["--image-size", "0"], {})
    with pytest.raises(SystemExit, match="PREPROCESS must be one of card, checkpoint, not 'hub'"):
        load_settings([], {"PREPROCESS": "hub"})


def test_an_extreme_aspect_ratio_is_refused_under_checkpoint_in_both_placements() -> None:
    data = images.encode(images.rgb(2000, 1, 5), "PNG")  # shortest edge to 256: 512000 x 256 pixels
    checkpoint = Geometry(224, 256)
    for resize in (True, False):
        with pytest.raises(InvalidImage, match="makes it 512000x256 = 131072000 pixels, over the limit of 50000000"):
            decode(data, LIMITS, checkpoint, resize=resize)
    assert decode(data, LIMITS, Geometry(224)).shape == (224, 224)


def test_fast_decode_drafts_relative_to_the_shortest_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    asked: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):  # type: ignore[no-untyped-def]
        asked.append(size)
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    photo = images.jpeg(2400, 2400, seed=3)
    decode(photo, LIMITS, Geometry(224), fast=True)
    decode(photo, LIMITS, Geometry(224, 256), fast=True)
    assert asked == [(448, 448), (512, 512)]  # FAST_DRAFT_FACTOR x 224, then x 256
    mid = images.jpeg(1000, 1000, seed=4)  # at least 4 x 224 a side, not 4 x 256
    assert not np.array_equal(decode(mid, LIMITS, Geometry(224), fast=True), decode(mid, LIMITS, Geometry(224)))
    checkpoint = Geometry(224, 256)
    np.testing.assert_array_equal(decode(mid, LIMITS, checkpoint, fast=True), decode(mid, LIMITS, checkpoint))


def test_a_server_at_448_with_the_checkpoints_crop_says_so_and_answers_the_reference(
    make_server, settings: Settings, model_dir: Path, corpus: dict[str, bytes]
) -> None:
    changes = {"image_size": 448, "preprocess": "checkpoint"}
    runner = ModelRunner.load(dataclasses.replace(settings, **changes))
    reference = Reference(model_dir, 448, "checkpoint")
    names = ["png_rgb", "exact_224", "tall_15x900"]
    request = pb.EmbedRequest(images=[pb.Image(data=corpus[n], id=n) for n in names], pooling=pb.POOLING_CLS)
    for resize_on in ("workers", "device"):
        running = make_server(runner, resize_on=resize_on, preprocess_workers=1, **changes)
        info = running.stub.Info(pb.InfoRequest(), timeout=30)
        assert (info.image_size, info.preprocess) == (448, "checkpoint")
        for name, item in zip(names, running.stub.Embed(request, timeout=120).embeddings, strict=True):
            assert not item.HasField("error"), item.error.message
            assert_close(np.array(item.values, dtype=np.float32), reference.embed(corpus[name]), f"{resize_on} {name}")
