"""Intermediate features of any teacher or student, for feature-based distillation.

:func:`build_feature_taps` wraps a model so that ONE forward pass returns its logits, its
feature maps and its embedding (the classifier's input), using what each library offers
rather than forward hooks:

- kdrun's CIFAR nets: their ``forward_with_features`` (stem and stage outputs);
- timm models: ``forward_intermediates`` (the ``feature_info`` stages) and ``forward_head``
  (see :mod:`kdrun.models.features_timm`);
- torchvision models, and timm models without ``forward_intermediates``: torchvision's
  ``create_feature_extractor`` on the FX graph (see :mod:`kdrun.models.features_fx`).

:func:`match_stages` then pairs the student's maps with the teacher's.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdrun.errors import KdrunError
from kdrun.models.cifar_common import CifarNet
from kdrun.models.cifar_preact import bn_before_relu, forward_pre_relu, has_pre_relu_maps
from kdrun.models.features_common import FeatureTaps, TapOutput, pick_indices
from kdrun.models.features_fx import build_fx_taps, fx_layer_names
from kdrun.models.features_timm import (
    TimmTaps,
    has_forward_intermediates,
    timm_indices,
    timm_stage_names,
    timm_tracer_kwargs,
)

__all__ = ["FeatureTaps", "TapOutput", "build_feature_taps", "list_feature_layers", "match_stages"]


class CifarTaps(FeatureTaps):
    """kdrun's CIFAR nets compute logits, stem/stage maps and embedding in one method."""

    def __init__(self, model: CifarNet, model_name: str, indices: list[int], names: Sequence[str], role: str,
                 pre_relu: bool = False) -> None:
        super().__init__(model, model_name, names, role)
        self._indices = indices
        self.pre_relu = pre_relu  # the maps before the activation (kdrun.models.cifar_preact), for OFD
        if pre_relu:
            self.names = [f"{name} (pre-ReLU)" for name in self.names]

    def _tap(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        if self.pre_relu:
            logits, maps, embedding = forward_pre_relu(self.model, x)
        else:
            logits, maps, embedding = self.model.forward_with_features(x)
        return logits, [maps[i] for i in self._indices], embedding

    def bn_before_relu(self) -> list[nn.BatchNorm2d] | None:
        """The BatchNorm feeding each tapped map's ReLU, where the maps are pre-ReLU."""
        return [bn_before_relu(self.model)[i] for i in self._indices] if self.pre_relu else None


def _cifar_names(model: CifarNet) -> list[str]:
    return ["stem", *(f"stages.{i}" for i in range(len(model.stages)))]


def build_feature_taps(model: nn.Module, model_name: str, input_shape: tuple[int, int, int],
                       layers: Sequence[str] | None = None, role: str = "student", pre_relu: bool = False
                       ) -> FeatureTaps:
    """Wrap ``model`` so that one forward returns (logits, feature maps, embedding).

    Args:
        model: a model from :func:`kdrun.models.factory.create_model`.
        model_name: its name, for messages.
        input_shape: (C, H, W) of the dataset; one dummy batch of it is run (no_grad, eval
            mode, each module's mode restored after) to measure channels and reductions.
        layers: None for the model's natural stages (timm's feature_info stages; for
            torchvision the block outputs after which the spatial size changes; for the CIFAR
            nets the stem and each stage). Else exactly those: timm feature_info module names
            or their indices, torchvision graph node or module names, CIFAR ``stem``,
            ``stages.i`` or indices. The maps come shallow to deep whatever the given order.
        role: "student" or "teacher", for messages.
        pre_relu: the maps before the activation where the model offers them (kdrun's CIFAR ResNets
            and WRNs, see :mod:`kdrun.models.cifar_preact`); the taps' ``pre_relu`` says whether it does.

    Raises:
        KdrunError: a layer that does not exist (listing those that do), a layer that is not a
            (B, C, H, W) map, or a model that cannot run on ``input_shape`` or be traced.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if layers is not None and len(layers) == 0:
        raise KdrunError(f"{role} layers is an empty list: name at least one layer, or leave it unset "
                         "for the model's natural stages")
    if isinstance(model, CifarNet):
        names = _cifar_names(model)
        indices = list(range(len(names))) if layers is None else pick_indices(names, layers, model_name, role)
        taps: FeatureTaps = CifarTaps(model, model_name, indices, [names[i] for i in indices], role,
                                      pre_relu and has_pre_relu_maps(model))
    elif has_forward_intermediates(model):
        indices, names = timm_indices(model, model_name, layers, role)
        taps = TimmTaps(model, model_name, indices, names, role)
    else:
        taps = _fx_taps(model, model_name, input_shape, layers, role)
    return taps.measure(input_shape)


def _fx_taps(model: nn.Module, model_name: str, input_shape: tuple[int, int, int],
             layers: Sequence[str] | None, role: str) -> FeatureTaps:
    if not _is_timm(model):
        return build_fx_taps(model, model_name, input_shape, layers, role)
    # A timm model without forward_intermediates: FX with timm's tracer settings, tapping its
    # feature_info stages by default (module names, which create_feature_extractor accepts).
    stages = timm_stage_names(model)
    if layers is None and stages:
        try:
            return build_fx_taps(model, model_name, input_shape, stages, role, timm_tracer_kwargs())
        except KdrunError:  # feature_info names a module FX traced away: find the stages as for torchvision
            pass
    return build_fx_taps(model, model_name, input_shape, layers, role, timm_tracer_kwargs())


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def list_feature_layers(model: nn.Module, model_name: str) -> list[str]:
    """The names :func:`build_feature_taps` accepts in ``layers`` for this model.

    timm: feature_info module names (their indices work too); torchvision: graph node names
    (module names work too); CIFAR nets: ``stem``, ``stages.0``, ...
    """
    if isinstance(model, CifarNet):
        return _cifar_names(model)
    if has_forward_intermediates(model):
        return timm_stage_names(model)
    return fx_layer_names(model, timm_tracer_kwargs() if _is_timm(model) else None)


def match_stages(student: FeatureTaps, teacher: FeatureTaps, max_pairs: int | None = None
                 ) -> tuple[list[int], list[int]]:
    """Pair student and teacher maps; returns (student indices, teacher indices), shallow to deep.

    Maps of equal spatial reduction are paired, each reduction at most once; where one side has
    several maps at a reduction, its deepest. With ``max_pairs``, the deepest pairs are kept.

    If no reduction is shared (e.g. a ViT whose maps are all 1/16 against a CNN probed on tiny
    images), maps are paired by relative depth instead: ``n = min(len(s), len(t), max_pairs)``
    evenly spaced maps of each side, always including the deepest. Such pairs differ in size,
    so the distillation adapters must resize.
    """
    deepest_s = _deepest_per_reduction(student.reductions)
    deepest_t = _deepest_per_reduction(teacher.reductions)
    shared = sorted(set(deepest_s) & set(deepest_t), key=lambda r: deepest_s[r])
    if max_pairs is not None:
        shared = shared[len(shared) - max_pairs:] if max_pairs > 0 else []
    if shared:
        return [deepest_s[r] for r in shared], [deepest_t[r] for r in shared]
    count = min(len(student.reductions), len(teacher.reductions))
    if max_pairs is not None:
        count = min(count, max(max_pairs, 0))
    return _spread(len(student.reductions), count), _spread(len(teacher.reductions), count)


def _deepest_per_reduction(reductions: Sequence[int]) -> dict[int, int]:
    return {r: i for i, r in enumerate(reductions)}  # later (deeper) indices overwrite


def _spread(length: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of ``range(length)``, ending with the last."""
    return [-(-(k + 1) * length // count) - 1 for k in range(count)]
