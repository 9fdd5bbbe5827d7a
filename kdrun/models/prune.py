"""Structured channel pruning with Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023, arXiv:2301.12900): whole output channels of convolutions and linear layers are removed, and every
layer that depends on them (BatchNorm, the next layer's inputs, residual additions, concatenations) shrinks
with them, so the result is a smaller dense model that any runtime runs faster.

Every layer loses the same fraction of its channels (`ratio`; Torch-Pruning's local pruning keeps
floor(C * (1 - ratio)) of C), chosen by the magnitude of their weights. The shapes of the pruned model thus
depend on the architecture and the ratio alone, never on the weights: a pruned checkpoint is loaded by pruning
a freshly built model of the same architecture by the same ratio, then loading its state dict.
The classifier keeps its outputs (the classes) and the stem its inputs (the image channels).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from kdrun.errors import KdrunError

IMPORTANCE = {"l2": 2, "l1": 1}   # prune.importance -> the norm of Torch-Pruning's MagnitudeImportance
PRUNED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)   # the layers whose output channels are counted


def torch_pruning():
    """The library, or one line that says how to install it."""
    try:
        import torch_pruning as tp
    except ImportError as error:
        raise KdrunError("prune.ratio needs Torch-Pruning, which is not installed: pip install 'kdrun[prune]' "
                         "(or pip install torch-pruning)") from error
    return tp


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class PruneReport:
    """What pruning removed: parameters, and output channels of the counted layers."""
    params_before: int
    params_after: int
    channels_before: int      # output channels of the counted layers (PRUNED_TYPES, classifier excluded)
    channels_after: int

    @property
    def channel_ratio(self) -> float:
        """The fraction of channels removed: what prune.ratio asked for, up to floor rounding per layer."""
        return 1.0 - self.channels_after / self.channels_before if self.channels_before else 0.0


def classifier_of(model: nn.Module, num_classes: int) -> nn.Module:
    """The layer that outputs the logits: the last convolution or linear layer with num_classes outputs."""
    found = [m for m in model.modules() if isinstance(m, PRUNED_TYPES) and _outputs(m) == num_classes]
    if not found:
        raise KdrunError(f"prune.ratio: no layer of the model outputs its {num_classes} classes, so the classifier "
                         "cannot be kept whole; prune a classification model (conv or linear classifier)")
    return found[-1]


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def counted_channels(model: nn.Module, skip: Sequence[nn.Module] = ()) -> int:
    """Output channels of the model's convolutions and linear layers, leaving out `skip` (the classifier)."""
    return sum(_outputs(m) for m in model.modules() if isinstance(m, PRUNED_TYPES) and not any(m is s for s in skip))


def prune_model(model: nn.Module, ratio: float, example: torch.Tensor, num_classes: int, label: str,
                importance: str = "l2", ignored: Sequence[str] = ()) -> PruneReport:
    """Remove `ratio` of the channels of every layer of `model` in place (the classifier and the layers named
    in `ignored` keep theirs); `example` is an input batch Torch-Pruning traces the model with. A model it
    cannot prune, or that no longer runs once pruned, is a one-line KdrunError that names the layer."""
    tp = torch_pruning()
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        layers = ", ".join(n for n, m in modules.items() if isinstance(m, PRUNED_TYPES))
        raise KdrunError(f"prune.ignored_layers names '{unknown[0]}', which {label} does not have; pass names of "
                         f"its layers, e.g. {layers[:120]}")
    keep = [classifier_of(model, num_classes), *(modules[name] for name in ignored)]
    params_before, channels_before = _params(model), counted_channels(model, keep[:1])
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():   # "unwrapped parameters detected": check_runs tells if they break it
            warnings.simplefilter("ignore")
            norm = tp.importance.MagnitudeImportance(p=IMPORTANCE[importance])
            # local pruning: every layer loses `ratio` of its channels, so the shapes never depend on the weights
            pruner = tp.pruner.MetaPruner(model, example, importance=norm, pruning_ratio=ratio, ignored_layers=keep,
                                          global_pruning=False)
            pruner.step()
    except Exception as error:   # tracing or pruning failed inside the library
        raise KdrunError(f"prune.ratio={ratio}: Torch-Pruning cannot prune {label} ({type(error).__name__}: "
                         f"{_first_line(error)}); keep the failing layers whole with prune.ignored_layers=[NAME], or "
                         "prune another model") from error
    check_runs(model, example, ratio, label)
    model.train(was_training)
    return PruneReport(params_before, _params(model), channels_before, counted_channels(model, keep[:1]))


def check_runs(model: nn.Module, example: torch.Tensor, ratio: float, label: str) -> None:
    """A forward and backward pass of the pruned model. A layer Torch-Pruning does not know keeps its weights'
    old shapes while the layer feeding it shrinks: the error names both, and keeping the feeding one whole
    (prune.ignored_layers) is the fix."""
    with _tracked(model) as ran:
        try:
            model(example).sum().backward()
        except Exception as error:
            name, layer = ran.stack[-1] if ran.stack else ("?", model)
            feeding = ran.last_pruned or name
            raise KdrunError(f"prune.ratio={ratio}: {label} no longer runs once pruned: layer '{name}' "
                             f"({type(layer).__name__}) fails ({_first_line(error)}), a layer Torch-Pruning cannot "
                             f"prune; keep the layer feeding it whole with prune.ignored_layers=[{feeding}], or "
                             "prune another model") from error
    model.zero_grad(set_to_none=True)


@dataclass
class _Ran:
    stack: list          # (name, module) of the layers running now, innermost last
    last_pruned: str = ""   # the last convolution or linear layer that finished


@contextlib.contextmanager
def _tracked(model: nn.Module) -> Iterator[_Ran]:
    ran = _Ran([])

    def entered(name: str):
        def hook(module, args) -> None:
            ran.stack.append((name, module))
        return hook

    def left(module, args, output) -> None:   # returns None: the output stays as it is
        name, _ = ran.stack.pop()
        if isinstance(module, PRUNED_TYPES):
            ran.last_pruned = name

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(entered(name)), module.register_forward_hook(left)]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
