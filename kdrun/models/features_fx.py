"""Feature taps through torch.fx: torchvision models (and timm models without forward_intermediates).

torchvision's ``create_feature_extractor`` rewrites the model's traced graph so that one call
returns the chosen nodes: here the stage maps, the classifier's input and the logits. Which
nodes those are is read off the graph by :mod:`kdrun.models.features_fx_graph`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from kdrun.errors import KdrunError, one_line
from kdrun.models.features_common import FeatureTaps, as_vector, cannot_run, dummy_batch, eval_mode
from kdrun.models.features_fx_graph import Plan, ShapeRecorder, Traced, plan


def tracer_options(extra: dict | None) -> dict:
    # create_feature_extractor adds torchvision's defaults (its ops as leaf modules) to what it
    # is given; trace with the same settings so that node names agree.
    try:
        from torchvision.models.feature_extraction import _set_default_tracer_kwargs
    except ImportError:  # a torchvision that adds no defaults
        return dict(extra or {})
    return _set_default_tracer_kwargs(dict(extra or {}))


def trace_model(model: nn.Module, model_name: str, role: str, tracer_kwargs: dict | None,
           x: Tensor | None = None) -> Traced:
    """The eval-mode graph; with ``x``, also what each node returns for it."""
    tracer = NodePathTracer(**tracer_options(tracer_kwargs))
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as error:  # FX raises many types for untraceable code
            raise KdrunError(f"cannot trace {role} '{model_name}' with torch.fx to tap its features "
                             f"({one_line(error, limit=200)}): pick a timm model or another {role}") from error
        traced = Traced(model, graph, dict(tracer.node_to_qualname))
        if x is not None:
            try:
                with torch.no_grad():
                    ShapeRecorder(fx.GraphModule(tracer.root, graph), traced).run(x)
            except Exception as error:  # the model's own failure, e.g. a kernel larger than the map
                raise cannot_run(role, model_name, x.shape[1:], error) from error
    return traced


def fx_layer_names(model: nn.Module, tracer_kwargs: dict | None = None) -> list[str]:
    """The graph node names create_feature_extractor accepts (module names work too)."""
    traced = trace_model(model, type(model).__name__, "model", tracer_kwargs)
    return [name for node, name in traced.names.items() if node.op != "placeholder"]


class FxTaps(FeatureTaps):
    """One call of a create_feature_extractor graph returns maps, embedding and logits."""

    def __init__(self, model: nn.Module, model_name: str, role: str, spec: Plan, extractor: fx.GraphModule) -> None:
        super().__init__(model, model_name, spec.names, role)
        self._spec = spec
        # The extractor reuses the model's modules and parameters; registering it as a submodule
        # would list every parameter twice in state_dict, so it is kept out of the module tree.
        object.__setattr__(self, "_extractor", extractor)
        graphs = (extractor.train_graph, extractor.eval_graph)
        self._attr_targets = sorted({n.target for g in graphs for n in g.nodes if n.op == "get_attr"})

    def _sync(self) -> None:
        """Follow the model's mode and tensors: the extractor is outside the module tree, so
        .train() and .to() reach its shared modules but not its choice of graph, nor tensors it
        took from modules FX traced through (e.g. Swin's relative_position_index buffers)."""
        extractor, training = self._extractor, self.model.training
        if extractor.training != training:
            # Swap the graph only; the shared modules keep the modes the user gave them.
            extractor.graph = extractor.train_graph if training else extractor.eval_graph
            extractor.training = training
        for target in self._attr_targets:
            *path, attr = target.split(".")
            source, copy = self.model, extractor
            for part in path:
                source, copy = getattr(source, part), getattr(copy, part)
            if getattr(copy, attr) is not getattr(source, attr):
                setattr(copy, attr, getattr(source, attr))

    def _tap(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        self._sync()
        out = self._extractor(x)
        spec = self._spec
        maps = [out[node].permute(0, 3, 1, 2) if nhwc else out[node] for node, nhwc in zip(spec.maps, spec.nhwc)]
        embedding = out[spec.embedding]
        if spec.embedding_nhwc:
            embedding = embedding.permute(0, 3, 1, 2)
        return out[spec.logits], maps, as_vector(embedding)


def build_fx_taps(model: nn.Module, model_name: str, input_shape: tuple[int, int, int],
                  layers: Sequence[str] | None, role: str, tracer_kwargs: dict | None = None) -> FxTaps:
    traced = trace_model(model, model_name, role, tracer_kwargs, dummy_batch(model, input_shape))
    spec = plan(traced, model_name, role, (input_shape[1], input_shape[2]), layers)
    nodes = list(dict.fromkeys([*spec.maps, spec.embedding, spec.logits]))
    # It leaves the model wholly in train or eval mode; eval_mode restores each module's own.
    with eval_mode(model):
        try:
            extractor = create_feature_extractor(model, return_nodes=nodes, suppress_diff_warning=True,
                                                 tracer_kwargs=tracer_options(tracer_kwargs))
        except ValueError as error:  # a node of the eval graph that the train graph lacks
            raise KdrunError(f"cannot tap {role} '{model_name}' in training mode ({one_line(error, limit=200)}): "
                             f"pick other {role} layers") from error
    return FxTaps(model, model_name, role, spec, extractor)
