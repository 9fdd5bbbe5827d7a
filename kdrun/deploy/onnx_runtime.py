"""An ONNX file run by ONNX Runtime behind nn.Module's call, so that the run's evaluation (`predict`) and
its interleaved timing treat an exported or quantized model exactly as they treat the PyTorch student."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdrun.errors import KdrunError


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise KdrunError("export=onnx and quantize=int8 check the model with ONNX Runtime: "
                         "pip install \"kdrun[deploy]\"") from error
    return ort


class OnnxRuntimeModel(nn.Module):
    """Images in, logits out, through an ONNX Runtime session on the CPU with `threads` threads (the run
    times every model with the same count)."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        ort = onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3   # errors only: the session's warnings are not the user's business
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().contiguous().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(images.device)
