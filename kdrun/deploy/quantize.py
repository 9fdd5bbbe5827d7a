"""Post-training int8 quantization of the exported student with ONNX Runtime's static quantization.

Why ONNX Runtime rather than PyTorch's PT2E/torchao flow: it quantizes any model the ONNX export takes
(timm and torchvision CNNs alike, no model code to change), its artifact is the file that is deployed,
and its x86 int8 kernels run without extra packages. The model is rewritten in QDQ form (quantize /
dequantize pairs around each operator, what ORT fuses into int8 kernels): weights symmetric int8 per
output channel, activations uint8 with ranges calibrated (MinMax) on `calibration` training images.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from kdrun.data import DataBundle
from kdrun.errors import KdrunError, one_line

INT8_FILE = "student.int8.onnx"


class CalibrationImages:
    """ONNX Runtime's CalibrationDataReader: `count` training images in a seeded order, `batch` at a time."""

    def __init__(self, data: DataBundle, count: int, batch: int, seed: int, input_name: str = "images"):
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data.train), generator=generator)[:count]
        self.input_name = input_name
        self.batches = []
        for start in range(0, len(order), batch):
            images = torch.stack([data.train[int(i)][0] for i in order[start:start + batch]])
            self.batches.append(images.float().numpy())
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(onnx_path: Path, output: Path, data: DataBundle, calibration: int, seed: int,
                  model_name: str) -> Path:
    """`onnx_path` quantized to int8 into `output`, calibrated on `calibration` training images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    count = min(calibration, len(data.train))
    reader = CalibrationImages(data, count, batch=min(64, count), seed=seed)
    try:
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = Path(scratch) / "prepared.onnx"
            # shape inference and graph folding first, as ONNX Runtime's documentation advises
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            # reduce_range: 7-bit weights, so that u8 x s8 products summed in pairs fit int16 in the x86 int8
            # kernels of CPUs without VNNI (AVX2), which otherwise saturate (ONNX Runtime's advice for them)
            quantize_static(str(prepared), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as error:
        raise KdrunError(f"quantize=int8: student {model_name} could not be quantized by ONNX Runtime: "
                         f"{one_line(error)}; the training results and the fp32 export are kept: "
                         f"pass quantize=none") from error
    return output

