"""Where kdrun's packaged configs live, installed or not."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """kdrun/conf inside an installed wheel; the repository's top-level conf/ in a checkout."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kdrun's configs are missing: no config.yaml in {_PACKAGE / 'conf'} "
                            f"or {_PACKAGE.parent / 'conf'}; reinstall kdrun")


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. group_options('dataset') -> ['cifar10', ...]."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
