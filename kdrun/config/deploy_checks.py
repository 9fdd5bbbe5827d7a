"""Checks of what a run ships (export=, quantize=), before torch loads."""
from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from kdrun.errors import KdrunError
from kdrun.registry import did_you_mean

EXPORT_FORMATS = ("onnx", "program", "torchscript")
QUANTIZATIONS = ("none", "int8")


def export_formats(setting) -> list[str]:
    """`export=onnx`, `export=[onnx,program]`, or none (null, `none` or an empty list: []), as a list of names."""
    names = [str(n) for n in ([setting] if isinstance(setting, str) else list(setting or []))]
    return [] if len(names) == 1 and names[0].lower() in ("none", "") else names


def check_deploy(cfg: DictConfig) -> None:
    setting = cfg.get("export")
    if setting is not None and not isinstance(setting, (str, ListConfig, list)):
        raise KdrunError(f"export={setting} must be a format or a list of them: export=onnx or export=[onnx,program]")
    for name in export_formats(setting):
        if name not in EXPORT_FORMATS:
            raise KdrunError(f"export={name} is not an export format: choose from {', '.join(EXPORT_FORMATS)} "
                             f"(or a list: export=[onnx,program]){did_you_mean(str(name), EXPORT_FORMATS)}")
    quantize = cfg.quantize
    if quantize.name not in QUANTIZATIONS:
        raise KdrunError(f"quantize.name={quantize.name} is not a quantization: choose quantize=int8 or quantize=none"
                         f"{did_you_mean(str(quantize.name), QUANTIZATIONS)}")
    if quantize.calibration < 1:
        raise KdrunError(f"quantize.calibration={quantize.calibration} must be >= 1 training images, "
                         "e.g. quantize.calibration=512")
