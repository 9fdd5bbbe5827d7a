"""The model presets shipped in conf/model/ (short names such as `mobilenetv3`), one set for the teacher,
student and assistant groups."""
from __future__ import annotations

from kdrun.paths import model_preset, preset_names

__all__ = ["model_preset", "preset_names"]
