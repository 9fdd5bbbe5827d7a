"""Where kdrun's packaged configs live, installed or not, and what their groups hold."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

_PACKAGE = Path(__file__).resolve().parent

# The model presets are one set, conf/model/NAME.yaml, and each is an option of these three groups
# (kdrun.config.schema.register_configs() puts them into Hydra's ConfigStore under each group).
PRESET_DIR = "model"
MODEL_GROUPS = ("teacher", "student", "assistant")


def conf_dir() -> Path:
    """kdrun/conf inside an installed wheel; the repository's top-level conf/ in a checkout."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kdrun's configs are missing: no config.yaml in {_PACKAGE / 'conf'} "
                            f"or {_PACKAGE.parent / 'conf'}; reinstall kdrun")


def group_dir(group: str) -> Path:
    """The folder of a group's option files: conf/model/ for teacher, student and assistant."""
    return conf_dir() / (PRESET_DIR if group in MODEL_GROUPS else group)


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. group_options('dataset') -> ['cifar10', ...];
    group_options('teacher') -> the model presets."""
    return sorted(p.stem for p in group_dir(group).glob("*.yaml"))


def config_groups() -> list[str]:
    """The groups users pick options of (GROUP=OPTION): conf/'s folders but hydra/ (Hydra's own) and model/
    (whose presets are the options of teacher, student and assistant)."""
    folders = {p.name for p in conf_dir().iterdir() if p.is_dir()} - {"hydra", PRESET_DIR}
    return sorted(folders | set(MODEL_GROUPS))


def preset_names() -> list[str]:
    """The model presets (conf/model/), e.g. resnet50, mobilenetv3."""
    return group_options(PRESET_DIR)


def model_preset(name: str) -> Optional[dict[str, Any]]:
    """A model preset's config as a plain dict (e.g. model_preset('mobilenetv3') -> {'name':
    'mobilenetv3_large_100'}), or None when `name` is no preset (then it may be a model name)."""
    path = conf_dir() / PRESET_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
