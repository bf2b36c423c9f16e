"""server/info.py: the name answers give the served model."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings, load_settings
from server.info import served_model_name


def test_a_hub_id_is_its_own_name() -> None:
    assert served_model_name(Settings(model="facebook/dinov2-small")) == "facebook/dinov2-small"


@pytest.mark.parametrize("suffix", ["", "/", "/."])
def test_a_local_folder_is_named_by_its_last_part_not_its_path(tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / "models" / "dinov2-small"
    folder.mkdir(parents=True)
    assert served_model_name(Settings(model=f"{folder}{suffix}")) == "dinov2-small"


def test_a_name_that_is_set_wins_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    settings = load_settings(["--model", str(tmp_path)], {"SERVED_MODEL_NAME": "dinov2-small"})
    assert served_model_name(settings) == "dinov2-small"
    settings = load_settings(["--served-model-name", "mine"], {"SERVED_MODEL_NAME": "dinov2-small"})
    assert served_model_name(settings) == "mine"
    assert served_model_name(Settings(model=str(tmp_path), served_model_name="")) == tmp_path.name  # empty: unset
