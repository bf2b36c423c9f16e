"""Model folders with random weights, for tests, examples and benchmarks.

No weights can be downloaded on the development and CI machines, so every
test builds its model here: the published DINOv2 shapes (same cost as the
real thing) or a tiny one, saved with `save_pretrained` beside the Hub's own
`preprocessor_config.json` (shortest edge 256 + center crop 224), so that the
service's 224x224 override is really exercised.

    python -m server.random_model tiny /tmp/dinov2-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The published configs of facebook/dinov2-*; "tiny" is for tests only. "null" is a near-free
# model for measuring everything but the model (bench --host-path): one layer of width 16 over
# 4x4 patches of 56 pixels at 224, about 2 MFLOP per image.
SIZES: dict[str, dict[str, object]] = {
    "null": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1, "patch_size": 56, "image_size": 224},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
}

HUB_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def build_model_dir(path: str | Path, size: str = "tiny", seed: int = 0, registers: int = 0) -> Path:
    """Writes a random-weight DINOv2 of a published size to `path`; returns the path.

    registers > 0 makes it a DINOv2 with that many register tokens
    (model_type dinov2_with_registers; the published ones have 4).
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    path = Path(path)
    shape = {"image_size": 518, "patch_size": 14, "mlp_ratio": 4, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}
    torch.manual_seed(seed)
    if registers > 0:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **{**shape, **SIZES[size]})
        Dinov2WithRegistersModel(config).save_pretrained(path)
    else:
        Dinov2Model(Dinov2Config(**{**shape, **SIZES[size]})).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=list(SIZES))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registers", type=int, default=0, help="register tokens (0: plain DINOv2)")
    args = parser.parse_args()
    print(build_model_dir(args.path, args.size, args.seed, args.registers))


if __name__ == "__main__":
    main()
