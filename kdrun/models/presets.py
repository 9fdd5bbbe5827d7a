"""The teacher/student presets shipped in conf/ (short names such as `mobilenetv3`)."""
from __future__ import annotations

from kdrun.paths import group_options


def preset_names() -> list[str]:
    return sorted(set(group_options("teacher")) | set(group_options("student")))
