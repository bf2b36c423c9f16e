"""The reference processor is Pillow-based whatever is installed beside it.

transformers 5 picks its torchvision backend (another bicubic resize) when
torchvision can be imported; the service resizes with Pillow, so the
configured reference must too. torchvision does not import beside this
torch wheel, so a stub package stands in for it in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.preprocess import configured_processor

ROOT = Path(__file__).resolve().parent.parent

MODES = ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")
# Just enough of torchvision for transformers to import its torchvision backend.
STUB = {
    "__init__.py": '__version__ = "0.99.0"\n',
    "transforms/__init__.py": "import enum\n\n\nclass InterpolationMode(enum.Enum):\n"
    + "".join(f"    {name} = {name.lower()!r}\n" for name in MODES),
    "transforms/functional.py": "def __getattr__(name):\n    return lambda *args, **kwargs: None\n",
    "transforms/v2/__init__.py": "def __getattr__(name):\n    return lambda *args, **kwargs: None\n",
    "transforms/v2/functional.py": "def __getattr__(name):\n    return lambda *args, **kwargs: None\n",
    "io.py": "def __getattr__(name):\n    return lambda *args, **kwargs: None\n",
}

PROBE = """
import sys
from transformers import AutoImageProcessor
from transformers.image_processing_backends import PilBackend
from transformers.utils import is_torchvision_available
from server.preprocess import configured_processor
model = sys.argv[1]
print("torchvision available:", is_torchvision_available())
print("default backend:", type(AutoImageProcessor.from_pretrained(model)).__name__)
processor = configured_processor(model, None)
print("configured:", type(processor).__name__, isinstance(processor, PilBackend))
"""


def test_configured_processor_is_pillow_based(model_dir: Path) -> None:
    from transformers.image_processing_backends import PilBackend

    assert isinstance(configured_processor(str(model_dir), None), PilBackend)


def test_configured_processor_is_pillow_based_when_torchvision_imports(model_dir: Path, tmp_path: Path) -> None:
    for name, text in STUB.items():
        path = tmp_path / "torchvision" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    # The stub is real enough that transformers' own default is the torchvision backend ...
    assert "torchvision available: True" in proc.stdout
    assert "default backend: BitImageProcessor\n" in proc.stdout
    # ... and the configured reference stays on Pillow.
    assert "configured: BitImageProcessorPil True" in proc.stdout
