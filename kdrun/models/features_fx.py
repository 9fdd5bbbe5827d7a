"""Feature taps through torch.fx: torchvision models (and timm models without forward_intermediates).

torchvision's ``create_feature_extractor`` rewrites the model's traced graph so that one call
returns the chosen nodes: here the stage maps, the classifier's input and the logits. Which
nodes those are is read off the eval-mode graph, probed once with a dummy batch:

- logits: what the graph returns;
- classifier: the last Linear before it (else the last 1x1 conv, as in SqueezeNet); its input
  is the embedding (pooled here if it is still a map);
- stages: walking back from the classifier past pooling/flatten/dropout gives the last map;
  up to it, the outputs of the model's blocks (modules, split into their children where they
  change the map size more than once), the last one at each spatial size. Only nodes every
  path from the input passes through count, not the insides of residual or concat blocks.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from kdrun.errors import KdrunError
from kdrun.models.features_common import (
    FeatureTaps,
    as_vector,
    dummy_batch,
    eval_mode,
    layer_not_found,
    one_line,
    reduction_factor,
)

# Layers between the last feature map and the classifier that only pool, reshape or drop.
_HEAD_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity)
_HEAD_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, F.dropout, torch.mean}
_HEAD_METHODS = {"flatten", "mean", "view", "reshape", "squeeze"}


@dataclass
class _Traced:
    """A model's eval-mode graph, its nodes' torchvision names and, once probed, output shapes."""

    model: nn.Module
    graph: fx.Graph
    names: dict[fx.Node, str]                                   # in execution order
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)  # tensor outputs only

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None


@dataclass
class _Plan:
    maps: list[str]            # nodes to return, shallow to deep
    names: list[str]           # what the user sees (shortest module name of each node)
    nhwc: list[bool]           # maps to permute to (B, C, H, W) (torchvision's Swin is channels-last)
    embedding: str             # node of the classifier's input (or of the last map, pooled)
    embedding_nhwc: bool
    logits: str


def _tracer_kwargs(extra: dict | None) -> dict:
    # create_feature_extractor adds torchvision's defaults (its ops as leaves) to what it is
    # given; trace with the same settings so that node names agree.
    from torchvision.models.feature_extraction import _set_default_tracer_kwargs

    return _set_default_tracer_kwargs(dict(extra or {}))


def _trace(model: nn.Module, model_name: str, role: str, tracer_kwargs: dict | None,
           x: Tensor | None = None) -> _Traced:
    tracer = NodePathTracer(**_tracer_kwargs(tracer_kwargs))
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as error:
            raise KdrunError(f"cannot trace {role} '{model_name}' with torch.fx to tap its features "
                             f"({one_line(error)}): pick a timm model or another {role}") from error
        traced = _Traced(model, graph, dict(tracer.node_to_qualname))
        if x is not None:
            try:
                with torch.no_grad():
                    ShapeProp(fx.GraphModule(tracer.root, graph)).propagate(x)
            except Exception as error:
                raise KdrunError(f"{role} '{model_name}' cannot run on {'x'.join(map(str, x.shape[1:]))} inputs "
                                 f"({one_line(error)}): use larger images or another {role} model") from error
    for node in graph.nodes:
        if isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            traced.shapes[node] = tuple(node.meta["tensor_meta"].shape)
    return traced


def fx_layer_names(model: nn.Module, tracer_kwargs: dict | None = None) -> list[str]:
    """The graph node names create_feature_extractor accepts (a module name works too)."""
    traced = _trace(model, type(model).__name__, "model", tracer_kwargs)
    return [name for node, name in traced.names.items() if node.op != "placeholder"]


def _spatial(shape: tuple[int, ...] | None, hw: tuple[int, int]) -> bool | None:
    """None if ``shape`` is not an image-like map; else whether it is channels-last."""
    if shape is None or len(shape) != 4:
        return None

    def plausible(h: int, w: int) -> bool:
        return h <= hw[0] and w <= hw[1] and reduction_factor(hw[0], h) == reduction_factor(hw[1], w)

    if plausible(shape[2], shape[3]):
        return False
    return True if plausible(shape[1], shape[2]) else None


def _size(shape: tuple[int, ...], nhwc: bool) -> tuple[int, int]:
    return (shape[1], shape[2]) if nhwc else (shape[2], shape[3])


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _classifier(traced: _Traced, logits: fx.Node) -> fx.Node | None:
    """The last Linear feeding the logits; without one, the last 1x1 convolution."""
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    upstream = sorted(_ancestors(logits), key=order.__getitem__, reverse=True)
    for node in upstream:
        if isinstance(traced.module(node), nn.Linear) or (node.op == "call_function" and node.target is F.linear):
            return node
    for node in upstream:
        module = traced.module(node)
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            return node
    return None


def _is_head_op(traced: _Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module(node), _HEAD_MODULES)
    if node.op == "call_function":
        return node.target in _HEAD_FUNCTIONS
    return node.op == "call_method" and node.target in _HEAD_METHODS


def _last_map(traced: _Traced, start: fx.Node, hw: tuple[int, int]) -> fx.Node | None:
    """Walk back from the classifier's input, past pooling and the like, to the last map."""
    node: object = start
    while isinstance(node, fx.Node):
        if not _is_head_op(traced, node) and _spatial(traced.shapes.get(node), hw) is not None:
            return node
        node = node.all_input_nodes[0] if node.all_input_nodes else None
    return None


def _cut_maps(traced: _Traced, last: fx.Node, hw: tuple[int, int]) -> dict[fx.Node, tuple[int, int]]:
    """Maps (node -> size) that every path from the input to ``last`` passes through: block
    outputs, not the insides of residual or concatenating blocks."""
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    inputs = [n for n in traced.graph.nodes if n.op == "placeholder"]
    downstream, todo = set(inputs), list(inputs)
    while todo:  # tensors computed from the input (not shapes, not parameters)
        for user in todo.pop().users:
            if user in traced.shapes and user not in downstream:
                downstream.add(user)
                todo.append(user)
    relevant = sorted(_ancestors(last) & downstream, key=order.__getitem__)
    # In execution order, a node lies on every path iff no edge jumps over it.
    cuts, reach = {}, -1
    for node in relevant:
        nhwc = _spatial(traced.shapes[node], hw)
        if reach <= order[node] and node.op != "placeholder" and nhwc is not None:
            cuts[node] = _size(traced.shapes[node], nhwc)
        reach = max([reach] + [order[u] for u in node.users if u in downstream])
    return cuts


def _stage_ends(traced: _Traced, last: fx.Node, hw: tuple[int, int]) -> list[fx.Node]:
    """The outputs of the model's blocks, the last one at each map size (up to ``last``)."""
    cuts = _cut_maps(traced, last, hw)
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    nodes = [(n, name) for n, name in traced.names.items() if order[n] <= order[last] and n.op != "placeholder"]
    units = _block_outputs(nodes, 0, hw, cuts)
    sizes = [cuts[n] for n in units]
    return [n for i, n in enumerate(units) if i + 1 == len(units) or sizes[i + 1] != sizes[i]]


def _block_outputs(nodes: list[tuple[fx.Node, str]], depth: int, in_size: tuple[int, int],
                   cuts: dict[fx.Node, tuple[int, int]]) -> list[fx.Node]:
    """Output nodes of the modules at ``depth`` (top-level children first). A module that
    changes the map size more than once (MobileNet's ``features``) is split into its children;
    one that changes it once (a strided block) stays whole, so a stage ends at a block's
    output, not inside the block that downsamples next."""
    outputs: list[fx.Node] = []
    for _, group_iter in itertools.groupby(nodes, key=lambda item: item[1].split(".")[: depth + 1]):
        group = list(group_iter)
        inner = [n for n, _ in group if n in cuts]
        deeper = any(name.count(".") > depth for _, name in group)
        if len({cuts[n] for n in inner} - {in_size}) > 1 and deeper:
            outputs += _block_outputs(group, depth + 1, in_size, cuts)
        elif group[-1][0] in cuts:
            outputs.append(group[-1][0])
        if inner:
            in_size = cuts[inner[-1]]
    return outputs


def _short_names(traced: _Traced) -> dict[fx.Node, str]:
    """Each node's shortest module name whose last node it is ('layer1' for layer1.1.relu_1),
    which create_feature_extractor resolves back to the same node."""
    last: dict[str, fx.Node] = {}
    for node, name in traced.names.items():
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            last[".".join(parts[:k])] = node
    short: dict[fx.Node, str] = {}
    for prefix, node in last.items():
        if node not in short or len(prefix) < len(short[node]):
            short[node] = prefix
    return short


def _resolve(traced: _Traced, layers: Sequence[str], model_name: str, role: str) -> dict[fx.Node, str]:
    """Node -> user's name for each given layer (a node name or a module name, as
    create_feature_extractor takes them), in execution order."""
    available = [name for node, name in traced.names.items() if node.op != "placeholder"]
    chosen: dict[fx.Node, str] = {}
    for layer in map(str, layers):
        matches = [n for n, name in traced.names.items() if name == layer or name.startswith(layer + ".")]
        if not matches or matches[-1].op == "placeholder":
            raise layer_not_found(role, layer, model_name, available)
        node = matches[-1]  # a module's output is its last node
        shape = traced.shapes.get(node)
        if shape is None or len(shape) != 4:
            what = f"a tensor of shape {shape}" if shape else "no tensor"
            raise KdrunError(f"{role} layer '{layer}' of {model_name} gives {what}, not a (B, C, H, W) map: "
                             "pick a convolutional layer")
        chosen.setdefault(node, layer)
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    return {node: chosen[node] for node in sorted(chosen, key=order.__getitem__)}


def _plan(traced: _Traced, model_name: str, role: str, hw: tuple[int, int], layers: Sequence[str] | None) -> _Plan:
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node) or output not in traced.shapes:
        raise KdrunError(f"{role} '{model_name}' does not return one logits tensor in eval mode: "
                         "feature distillation needs a plain classifier")
    classifier = _classifier(traced, output)
    clf_input = classifier.all_input_nodes[0] if classifier is not None else None
    last = _last_map(traced, clf_input if clf_input is not None else output, hw)
    if layers is None:
        short = _short_names(traced)
        named = {node: short[node] for node in (_stage_ends(traced, last, hw) if last is not None else [])}
    else:
        named = _resolve(traced, layers, model_name, role)
    # No classifier found: the embedding is the last map, pooled.
    embedding = clf_input if clf_input is not None else (last if last is not None else output)
    return _Plan(
        maps=[traced.names[n] for n in named],
        names=list(named.values()),
        nhwc=[bool(_spatial(traced.shapes[n], hw)) for n in named],
        embedding=traced.names[embedding],
        embedding_nhwc=bool(_spatial(traced.shapes.get(embedding), hw)),
        logits=traced.names[output],
    )


class FxTaps(FeatureTaps):
    """One call of a create_feature_extractor graph returns maps, embedding and logits."""

    def __init__(self, model: nn.Module, model_name: str, role: str, plan: _Plan, extractor: fx.GraphModule) -> None:
        super().__init__(model, model_name, plan.names, role)
        self._spec = plan
        # The extractor reuses the model's modules and parameters; registering it as a submodule
        # would list every parameter twice in state_dict, so it is kept out of the module tree.
        object.__setattr__(self, "_extractor", extractor)
        graphs = (extractor.train_graph, extractor.eval_graph)
        self._attr_targets = sorted({n.target for g in graphs for n in g.nodes if n.op == "get_attr"})

    def _sync(self) -> None:
        """Follow the model's mode and tensors: the extractor is not in the module tree, so
        .train() and .to() reach its shared modules but not its own graph choice, nor tensors
        it copied from modules FX traced through (e.g. Swin's relative_position_index)."""
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
        maps = [out[n].permute(0, 3, 1, 2) if nhwc else out[n] for n, nhwc in zip(self._spec.maps, self._spec.nhwc)]
        embedding = out[self._spec.embedding]
        if self._spec.embedding_nhwc:
            embedding = embedding.permute(0, 3, 1, 2)
        return out[self._spec.logits], maps, as_vector(embedding)


def build_fx_taps(model: nn.Module, model_name: str, input_shape: tuple[int, int, int],
                  layers: Sequence[str] | None, role: str, tracer_kwargs: dict | None = None) -> FxTaps:
    traced = _trace(model, model_name, role, tracer_kwargs, dummy_batch(model, input_shape))
    plan = _plan(traced, model_name, role, (input_shape[1], input_shape[2]), layers)
    nodes = list(dict.fromkeys([*plan.maps, plan.embedding, plan.logits]))
    with eval_mode(model):  # it leaves the model in train or eval as a whole; keep per-module modes
        try:
            extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=_tracer_kwargs(tracer_kwargs),
                                                 suppress_diff_warning=True)
        except ValueError as error:  # a node of the eval graph missing from the train graph
            raise KdrunError(f"cannot tap {role} '{model_name}' in training mode ({one_line(error)}): "
                             f"pick other {role} layers") from error
    return FxTaps(model, model_name, role, plan, extractor)
