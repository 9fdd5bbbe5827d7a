"""Checks of what a run ships (export=, quantize=), before torch loads."""
from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from kdrun.errors import KdrunError
from kdrun.registry import did_you_mean

EXPORT_FORMATS = ("onnx", "program", "torchscript")
QUANTIZATIONS = ("none", "int8", "qat")


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
        raise KdrunError(f"quantize.name={quantize.name} is not a quantization: choose quantize=int8, quantize=qat "
                         f"or quantize=none"
                         f"{did_you_mean(str(quantize.name), QUANTIZATIONS)}")
    if quantize.calibration < 1:
        raise KdrunError(f"quantize.calibration={quantize.calibration} must be >= 1 training images, "
                         "e.g. quantize.calibration=512")
    if quantize.name == "qat":
        check_qat(cfg)


def check_qat(cfg: DictConfig) -> None:
    """quantize=qat fine-tunes the distilled student of an offline run, fake-quantized in fp32, in one process."""
    quantize, paradigm = cfg.quantize, str(cfg.paradigm.name)
    if paradigm != "offline":
        raise KdrunError(f"quantize=qat distils the fake-quantized student from the teacher of paradigm=offline; "
                         f"paradigm={paradigm} ships another model: use quantize=int8 (post-training) for it")
    if cfg.precision != "fp32":
        raise KdrunError(f"quantize=qat trains with fake quantization in fp32, not under autocast: pass "
                         f"precision=fp32 (precision={cfg.precision} works with quantize=int8)")
    if cfg.compile:
        raise KdrunError("quantize=qat trains a torch.export graph that torch.compile does not take here: "
                         "pass compile=false")
    if int(quantize.get("epochs", 1)) < 1:
        raise KdrunError(f"quantize.epochs={quantize.epochs} must be >= 1 epochs of quantization-aware "
                         f"distillation, e.g. quantize.epochs=2")
    if not float(quantize.get("lr_scale", 1.0)) > 0:
        raise KdrunError(f"quantize.lr_scale={quantize.lr_scale} must be > 0 (the QAT epochs' lr is the "
                         f"student's lr times it), e.g. quantize.lr_scale=0.1")
