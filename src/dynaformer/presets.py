"""Config files: `--config` YAML files read into `model:` / `train:` sections, and the presets shipped with
the package (tiny-cpu, small, the study grids).

The presets are package data in `dynaformer/configs/`, so they are found after a plain `pip install` as well
as in a checkout, where the repository's `configs/` is a link to that folder.
"""

from __future__ import annotations

from pathlib import Path

from .configtools import from_dict, read_yaml_mapping
from .model import ModelConfig
from .train.config import split_sections

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def load_yaml_config(path: str | Path) -> dict[str, dict]:
    """A config file: `model:` and `train:` sections, or flat keys that name fields of either."""
    return split_sections(read_yaml_mapping(path, "--config"), f"--config '{path}'")


def preset_path(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped preset NAME (`small` → dynaformer/configs/small.yaml)."""
    path = Path(name_or_path)
    return PRESET_DIR / f"{name_or_path}.yaml" if not path.suffix else path


def preset(name_or_path: str | None, default: str = "small") -> ModelConfig:
    """The ModelConfig of a shipped preset (by name) or of a YAML file."""
    return from_dict(ModelConfig, load_yaml_config(preset_path(name_or_path or default))["model"], "model")
