"""Where the model's square input comes from in an image: the resize (and crop) of `--preprocess`.

`card` (the default) resizes the whole image to N x N, whatever its aspect
ratio. `checkpoint` does what the checkpoint's preprocessor_config.json says,
as DINOv2's Hub processor does: the shortest edge to S (256), then the
center N x N (224). A `Geometry` holds those numbers, read from the
configured reference processor (`geometry_of`), and the arithmetic of
transformers' Pillow backend (`get_resize_output_image_size` and
`center_crop` of transformers/image_transforms.py), so that the decode
workers (server/preprocess.py) and the device resize (server/resize.py) cut
out the reference's pixels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import ModelLoadError

PREPROCESS = ("card", "checkpoint")
CARD_SIZE = 224
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, without importing Pillow here


@dataclass(frozen=True)
class Geometry:
    """A bicubic resize, then a center crop of `size` x `size` (none when `shortest_edge` is None).

    size: N, the side of the model's input.
    shortest_edge: None resizes straight to N x N (card); else the shortest
    edge is resized to this (the longer one keeping the aspect ratio) and the
    center N x N is kept.
    """

    size: int
    shortest_edge: int | None = None

    @property
    def resize_side(self) -> int:
        """The shortest side of every resized image: what `--decode fast` keeps a multiple of."""
        return self.shortest_edge or self.size

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) a width x height image is resized to, before the crop.

        transformers' `get_resize_output_image_size(default_to_square=False)`:
        the longer side is `int(S * long / short)`, in that order of float operations.
        """
        edge = self.shortest_edge
        if edge is None:
            return self.size, self.size
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the N x N center crop of a resized width x height image (transformers' `center_crop`)."""
        return (width - self.size) // 2, (height - self.size) // 2

    def scaled(self, size: int) -> Geometry:
        """The same recipe at another input size: the crop becomes `size`, the shortest edge keeps its ratio
        to the crop (256/224 -> 512 for 448), rounded half up, as DINOv2's evaluation transforms scale."""
        if self.shortest_edge is None:
            return Geometry(size)
        return Geometry(size, (2 * self.shortest_edge * size + self.size) // (2 * self.size))

    def describe(self) -> str:
        if self.shortest_edge is None:
            return f"resize to {self.size}x{self.size}"
        return f"shortest edge {self.shortest_edge}, center crop {self.size}x{self.size}"


def geometry_of(processor: object) -> Geometry:
    """Reads the resize and crop of a configured Pillow-backend processor; refuses what cannot be batched.

    Served: a bicubic resize to a square with no crop, or a bicubic resize of
    the shortest edge followed by a square center crop no larger than it.
    """
    size = dict(processor.size or {})  # type: ignore[attr-defined]
    crop = dict(processor.crop_size or {})  # type: ignore[attr-defined]
    do_crop = bool(processor.do_center_crop)  # type: ignore[attr-defined]
    resample = processor.resample  # type: ignore[attr-defined]
    square, edge, side = size.get("height") == size.get("width"), size.get("shortest_edge"), crop.get("height")
    problem = None
    if not processor.do_resize or resample is None or int(resample) != BICUBIC:  # type: ignore[attr-defined]
        problem = "it must resize, with bicubic resampling"
    elif not do_crop and set(size) == {"height", "width"} and square:
        return Geometry(int(size["height"]))
    elif not do_crop or not side or crop.get("width") != side:
        problem = "it must resize to a square, or center-crop a square"
    elif set(size) != {"shortest_edge"}:
        problem = "with a center crop, it must resize the shortest edge only"
    elif edge < side:
        problem = "its shortest edge must be at least the crop"
    else:
        return Geometry(int(side), int(edge))
    described = f"size {size}" + (f", center crop {crop}" if do_crop else ", no crop")
    raise ModelLoadError(
        f"unsupported image processor ({described}, resample {resample}): {problem}; use --preprocess card"
    )


def check_size(size: int, patch_size: int, what: str) -> None:
    """Refuses, with one line, an input size that is not a positive multiple of the model's patch size;
    `what` names where the size came from."""
    if size >= patch_size and size % patch_size == 0:
        return
    below = size // patch_size * patch_size
    nearest = f"sizes are {below} and {below + patch_size}" if below else f"size is {patch_size}"
    raise ModelLoadError(
        f"{what} is not a multiple of the model's patch size {patch_size}: the nearest valid {nearest}"
    )
