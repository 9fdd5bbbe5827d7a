"""Quantization-aware training with torchao's PT2E flow: the student (or its feature taps) captured by
torch.export, fake-quantized for training, then converted to int8 and exported to ONNX.

The quantizer is torchao's X86InductorQuantizer with its QAT config: weights int8 symmetric per output
channel, activations uint8 per tensor (the layout of quantize=int8's ONNX Runtime model, so the two int8
rows compare like for like), Conv+BatchNorm folded in training as the int8 model will run it. The
fake-quant modules (`activation_post_process_N`: scale, zero point, observed min/max) are submodules
of the graph, so they are in its state_dict, hence in every checkpoint, and a resume restores them.

The converted model is run by ONNX Runtime, not by torch: torch runs a converted PT2E graph as fp32
kernels between quantize/dequantize ops (slower than fp32) unless torch.compile lowers it, which takes
a C++ toolchain and minutes per model on a CPU; ONNX Runtime fuses the same QDQ pairs into its int8
kernels, as it does for quantize=int8's model.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from kdrun.deploy.export import export_program, failure_cause, quiet_logs, write_onnx
from kdrun.errors import KdrunError, one_line

QAT_FILE = "student.qat.onnx"
FAKE_QUANT_PREFIX = "activation_post_process_"   # the names prepare_qat_pt2e gives its fake-quant modules


class FakeQuantized(nn.Module):
    """A fake-quantized (or converted) graph of the student or of its feature taps, which return (logits, maps,
    embedding) for the feature terms; `logits_only`: the logits alone, as a model's forward gives them.

    The graph's ops do not depend on the mode (BatchNorm is folded, dropout was left out at capture), so
    train()/eval() switch what does: the observers, which follow the training batches and stay still while
    the model is evaluated (an evaluation never moves the quantization ranges)."""

    def __init__(self, graph: nn.Module, logits_only: bool = True):
        super().__init__()
        self.graph = graph
        self.logits_only = logits_only

    def forward(self, images: torch.Tensor):
        output = self.graph(images)
        return output[0] if self.logits_only and isinstance(output, (tuple, list)) else output

    def train(self, mode: bool = True) -> FakeQuantized:
        from torchao.quantization.pt2e import disable_observer, enable_observer

        self.training = mode  # not the graph's own train(): an exported graph refuses it
        self.graph.apply(enable_observer if mode else disable_observer)
        return self


def quiet_torchao():
    """torchao's first import makes torch log a deprecation of its own pytree registration, not the user's."""
    return quiet_logs(("torch.utils._pytree",), logging.ERROR)


def prepare_qat(model: nn.Module, example: torch.Tensor, model_name: str) -> nn.Module:
    """`model` (left as it is) captured by torch.export with a dynamic batch, its BatchNorms folded into the
    convolutions before them, fake-quantized for QAT: a GraphModule on the CPU.

    Captured in eval mode, as a fine-tune of trained weights: BatchNorm with its running statistics (frozen,
    then folded: training sees the convolutions the int8 model runs, as Krishnamoorthi 2018, arXiv:1806.08342,
    advises for the end of QAT) and no dropout. Folding first also spares torchao's Conv+BN QAT rewrite,
    which traces ~100 pattern graphs at each prepare, train/eval switch and convert (minutes on a CPU)."""
    with quiet_torchao():
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise KdrunError("quantize=qat trains with torchao's PT2E quantization: pip install \"kdrun[deploy]\" "
                             "(or pip install torchao)") from error
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
        from torchao.quantization.pt2e.utils import (
            _fuse_conv_bn_,  # what torchao's own prepare_pt2e folds with
        )

    captured = copy.deepcopy(model).cpu().float().eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.export.export(captured, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as error:
        raise KdrunError(f"quantize=qat: student {model_name} cannot be captured by torch.export for "
                         f"quantization-aware training: {failure_cause(error)}; pass quantize=int8 or a student "
                         f"without it") from error
    # reduce_range: activations in 0..127, so that u8 x s8 products summed in pairs fit int16 in the x86 int8
    # kernels of CPUs without VNNI (AVX2), which otherwise saturate and run another model than the trained one
    config = get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=True)
    quantizer = X86InductorQuantizer().set_global(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fuse_conv_bn_(graph)
            graph.delete_all_unused_submodules()  # the folded BatchNorms' parameters: no longer read
            prepared = prepare_qat_pt2e(graph, quantizer)
    except Exception as error:
        raise KdrunError(f"quantize=qat: student {model_name} cannot be fake-quantized by torchao's "
                         f"X86InductorQuantizer: {one_line(error)}; pass quantize=int8 (post-training "
                         f"quantization of the exported model) instead") from error
    for parameter in prepared.parameters():  # the folded weights are new tensors: trainable, as the others
        parameter.requires_grad_(True)
    return prepared


def fake_quant_keys(state: dict) -> list[str]:
    """The state_dict entries of the fake-quant modules (scales, zero points, observed ranges)."""
    return [key for key in state if any(part.startswith(FAKE_QUANT_PREFIX) for part in key.split("."))]


def convert_to_int8(student: FakeQuantized) -> torch.fx.GraphModule:
    """The trained fake-quantized student as an int8 (reference-quantized) graph of its logits, on the CPU."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(copy.deepcopy(student.graph).cpu())
    return logits_graph(converted)


def logits_graph(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`graph` returning its logits alone: the feature taps' graph loses its maps and embedding outputs (and
    what only they needed). Exported as it is, not wrapped: a wrapper's re-export loses the graph's weights."""
    output = next(node for node in graph.graph.nodes if node.op == "output")
    flat = output.args[0]
    if isinstance(flat, (tuple, list)) and len(flat) > 1:
        graph.graph._codegen = torch.fx.graph.CodeGen()  # plain inputs and one output, no pytree (un)flattening
        output.args = (flat[0],)
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return graph


def export_int8(student: FakeQuantized, example: torch.Tensor, path: Path, model_name: str) -> Path:
    """The converted student as an ONNX file in QDQ form (ONNX Runtime's int8 kernels run it)."""
    program = export_program(convert_to_int8(student), example, model_name, "onnx")
    write_onnx(program, example, path, model_name)
    return path
