"""Reading an FX graph: which nodes are the logits, the classifier's input and the stage maps.

Works on the eval-mode graph traced with torchvision's NodePathTracer (so node names are those
``create_feature_extractor`` takes), with each node's output shape probed once:

- logits: what the graph returns;
- classifier: the last Linear before it (else the last 1x1 conv, as in SqueezeNet); its input
  is the embedding (pooled later if it is still a map);
- last map: walking back from the classifier's input to the global pooling, its input;
- stages: up to the last map, the outputs of the model's blocks (modules, split into their
  children where they change the map size more than once), the last one at each map size.
  Only nodes every path from the input passes through count: not the insides of residual or
  concatenating blocks, nor squeeze-excitation branches.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from kdrun.errors import KdrunError
from kdrun.models.features_common import layer_not_found, reduction_factor

# Global pooling between the last feature map and the classifier.
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.amax}
_POOL_METHODS = {"mean", "amax"}


@dataclass
class Traced:
    """A model's eval-mode graph, its nodes' torchvision names and the probed outputs."""

    model: nn.Module
    graph: fx.Graph
    names: dict[fx.Node, str]                                          # in execution order
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)  # single-tensor outputs
    has_tensors: set[fx.Node] = field(default_factory=set)             # also tuples of tensors (chunk)

    def __post_init__(self) -> None:
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def downstream(self) -> set[fx.Node]:
        """Nodes computed from the input through tensors (not from shapes, not parameters)."""
        inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        seen, todo = set(inputs), list(inputs)
        while todo:
            for user in todo.pop().users:
                if user in self.has_tensors and user not in seen:
                    seen.add(user)
                    todo.append(user)
        return seen


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and notes what each node returns (ShapeProp prints tracebacks)."""

    def __init__(self, module: fx.GraphModule, traced: Traced) -> None:
        super().__init__(module)
        self.traced = traced

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, Tensor):
            self.traced.shapes[node] = tuple(result.shape)
            self.traced.has_tensors.add(node)
        elif isinstance(result, (tuple, list)) and any(isinstance(r, Tensor) for r in result):
            self.traced.has_tensors.add(node)
        return result


@dataclass
class Plan:
    """What the extractor returns and how to read it."""

    maps: list[str]            # nodes to return, shallow to deep
    names: list[str]           # what the user sees
    nhwc: list[bool]           # maps to permute to (B, C, H, W) (torchvision's Swin is channels-last)
    embedding: str             # node of the classifier's input (else of the last map, pooled)
    embedding_nhwc: bool
    logits: str
    classifier: str | None = None  # module name of a Linear classifier fed by the embedding, else None


def spatial(shape: tuple[int, ...] | None, hw: tuple[int, int]) -> bool | None:
    """None if ``shape`` is not an image-like map of an ``hw`` input; else whether it is channels-last."""
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


def classifier_node(traced: Traced, logits: fx.Node) -> fx.Node | None:
    """The last Linear feeding the logits; without one, the last 1x1 convolution."""
    upstream = sorted(_ancestors(logits), key=traced.order.__getitem__, reverse=True)
    for node in upstream:
        if isinstance(traced.module(node), nn.Linear) or (node.op == "call_function" and node.target is F.linear):
            return node
    for node in upstream:
        module = traced.module(node)
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            return node
    return None


def _is_global_pool(traced: Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module(node), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return node.op == "call_method" and node.target in _POOL_METHODS


def last_map_node(traced: Traced, start: fx.Node, hw: tuple[int, int], downstream: set[fx.Node]) -> fx.Node | None:
    """Walk back from the classifier's input: the input of the global pooling, or else (no
    pooling, e.g. SqueezeNet's conv classifier) the first map met."""
    chain, node = [], start
    while node is not None:
        chain.append(node)
        parents = [p for p in node.all_input_nodes if p in downstream]
        node = parents[0] if parents else None
    for node, parent in zip(chain, chain[1:]):
        if _is_global_pool(traced, node) and spatial(traced.shapes.get(parent), hw) is not None:
            return parent
    return next((n for n in chain if n.op != "placeholder" and not _is_passthrough(traced, n)
                 and spatial(traced.shapes.get(n), hw) is not None), None)


def _is_passthrough(traced: Traced, node: fx.Node) -> bool:
    """Dropout and the like: their output is their input (at eval), named after the head."""
    if node.op == "call_function":
        return node.target in (F.dropout, F.dropout2d)
    return isinstance(traced.module(node), (nn.Dropout, nn.Dropout2d, nn.Identity))


def _cut_maps(traced: Traced, last: fx.Node, hw: tuple[int, int], downstream: set[fx.Node]
              ) -> dict[fx.Node, tuple[int, int]]:
    """Maps (node -> size) that every path from the input to ``last`` passes through."""
    relevant = sorted(_ancestors(last) & downstream, key=traced.order.__getitem__)
    # In execution order, a node lies on every path iff no edge jumps over it.
    cuts, reach = {}, -1
    for node in relevant:
        nhwc = spatial(traced.shapes.get(node), hw)
        if reach <= traced.order[node] and node.op != "placeholder" and nhwc is not None:
            cuts[node] = _size(traced.shapes[node], nhwc)
        reach = max([reach] + [traced.order[u] for u in node.users if u in downstream])
    return cuts


def _block_outputs(nodes: list[tuple[fx.Node, str]], depth: int, in_size: tuple[int, int],
                   cuts: dict[fx.Node, tuple[int, int]]) -> list[tuple[fx.Node, str]]:
    """(output node, module name) of the modules at ``depth``. A module that changes the map
    size more than once (MobileNet's ``features``) is split into its children; one that changes
    it once (a strided block) stays whole, so that a stage ends at a block's output rather than
    inside the next block, before its strided conv."""
    outputs = []
    for key, group_iter in itertools.groupby(nodes, key=lambda item: item[1].split(".")[: depth + 1]):
        group = list(group_iter)
        inner = [n for n, _ in group if n in cuts]
        deeper = any(name.count(".") > depth for _, name in group)
        if len({cuts[n] for n in inner} - {in_size}) > 1 and deeper:
            outputs += _block_outputs(group, depth + 1, in_size, cuts)
        elif group[-1][0] in cuts:
            outputs.append((group[-1][0], ".".join(key)))
        if inner:
            in_size = cuts[inner[-1]]
    return outputs


def _stage_ends(traced: Traced, last: fx.Node, hw: tuple[int, int], downstream: set[fx.Node]) -> dict[fx.Node, str]:
    """Node -> name of the last block output at each map size, up to ``last``."""
    cuts = _cut_maps(traced, last, hw, downstream)
    nodes = [(n, name) for n, name in traced.names.items()
             if traced.order[n] <= traced.order[last] and n.op != "placeholder"]
    blocks = _block_outputs(nodes, 0, hw, cuts)
    ends = [b for i, b in enumerate(blocks) if i + 1 == len(blocks) or cuts[blocks[i + 1][0]] != cuts[b[0]]]
    # A module name stands for its module's last node; where the graph was cut short at the
    # last map, that may be a later node, so the node's own name is used.
    last_of = {}
    for node, name in traced.names.items():
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            last_of[".".join(parts[:k])] = node
    return {node: name if last_of.get(name) is node else traced.names[node] for node, name in ends}


def _resolve(traced: Traced, layers: Sequence[str], model_name: str, role: str) -> dict[fx.Node, str]:
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
            what = f"a tensor of shape {shape}" if shape else "no single tensor"
            raise KdrunError(f"{role} layer '{layer}' of {model_name} gives {what}, not a (B, C, H, W) map: "
                             "pick a convolutional layer")
        chosen.setdefault(node, layer)
    return {node: chosen[node] for node in sorted(chosen, key=traced.order.__getitem__)}


def plan(traced: Traced, model_name: str, role: str, hw: tuple[int, int], layers: Sequence[str] | None) -> Plan:
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node) or output not in traced.shapes:
        raise KdrunError(f"{role} '{model_name}' does not return one logits tensor in eval mode: "
                         "feature distillation needs a plain classifier")
    downstream = traced.downstream()
    classifier = classifier_node(traced, output)
    clf_input = next((p for p in classifier.all_input_nodes if p in downstream), None) if classifier else None
    last = last_map_node(traced, clf_input if clf_input is not None else output, hw, downstream)
    if layers is not None:
        named = _resolve(traced, layers, model_name, role)
    else:
        named = _stage_ends(traced, last, hw, downstream) if last is not None else {}
    # Without a classifier the embedding is the last map, pooled.
    embedding = clf_input if clf_input is not None else (last if last is not None else output)
    return Plan(
        maps=[traced.names[n] for n in named],
        names=list(named.values()),
        nhwc=[bool(spatial(traced.shapes[n], hw)) for n in named],
        embedding=traced.names[embedding],
        embedding_nhwc=bool(spatial(traced.shapes.get(embedding), hw)),
        logits=traced.names[output],
        classifier=_linear_module(traced, classifier) if clf_input is not None else None,
    )


def _linear_module(traced: Traced, node: fx.Node) -> str | None:
    """The module name of a Linear classifier node (its input is the embedding), None for anything else."""
    return str(node.target) if isinstance(traced.module(node), nn.Linear) else None
