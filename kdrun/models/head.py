"""A model split at its global pooling: what loss terms that look past the logits ask for.

:func:`build_head_split` wraps a teacher or student so that ONE forward pass returns

- ``logits`` (B, K), the model's own output;
- ``final_map`` (B, C, H, W), the map the global pooling reduces (SDD pools it region by region);
- ``embedding`` (B, D), the classifier's input, i.e. the pooled penultimate features (KD++'s ND loss);

and offers two pieces of the head as callables, so a term can run them on its own inputs:

- :meth:`HeadSplit.pooled_head`: the head after the global pooling, on pooled map vectors (N, C):
  ``pooled_head(final_map.mean((2, 3))) == logits``. SDD feeds it the regions of a multi-scale pooling.
- :meth:`HeadSplit.classifier`: the last linear layer, on embeddings (N, D):
  ``classifier(embedding) == logits``. E.g. the teacher's classifier on (projected) student features.

Every library is read with what it offers: kdrun's CIFAR nets by their ``head`` (pooling layers, then
one Linear), timm by ``forward_features`` / ``forward_head`` / ``get_classifier``, torchvision (and timm
models without those) by the FX graph (see :mod:`kdrun.models.features_fx_graph`). The pooled head runs
the model's own head on a 1x1 map, where global pooling is the identity; a build-time probe checks both
identities above on a dummy batch and refuses a model whose head is not "pool, then the rest".
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import create_feature_extractor

from kdrun.errors import KdrunError
from kdrun.models.cifar_common import CifarNet
from kdrun.models.features_common import as_vector, cannot_run, dummy_batch, eval_mode

__all__ = ["HeadOutput", "HeadSplit", "build_head_split"]


class HeadOutput(NamedTuple):
    logits: Tensor      # (B, K)
    final_map: Tensor   # (B, C, H, W): what the global pooling reduces
    embedding: Tensor   # (B, D): the classifier's input


class HeadSplit(nn.Module):
    """Wraps a model (registered as ``self.model``: parameters and state_dict are the model's own)."""

    def __init__(self, model: nn.Module, model_name: str, role: str) -> None:
        super().__init__()
        self.model, self.model_name, self.role = model, model_name, role
        self.map_channels = 0
        self.embedding_dim = 0
        self._classifier: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> HeadOutput:
        return HeadOutput(*self._split(x))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def pooled_head(self, pooled: Tensor) -> Tensor:
        """Logits from globally (or region-) pooled final-map vectors (N, C)."""
        raise NotImplementedError

    def classifier(self, embedding: Tensor) -> Tensor:
        """Logits from embeddings (N, D) through the model's last linear layer."""
        if self._classifier is None:
            raise KdrunError(f"the head of {self.role} '{self.model_name}' is not one linear layer on its "
                             f"embedding: pick another {self.role} model for this method")
        return self._classifier(embedding)

    def measure(self, input_shape: tuple[int, int, int]) -> HeadSplit:
        """Probe a dummy batch (eval mode, no gradients): the map is 4-D, and the pooled head and the
        classifier give back the logits."""
        x = dummy_batch(self.model, input_shape)
        with torch.no_grad(), eval_mode(self.model):
            try:
                logits, final, embedding = self._split(x)
            except KdrunError:
                raise
            except Exception as error:  # the model's own failure, e.g. a kernel larger than the map
                raise cannot_run(self.role, self.model_name, input_shape, error) from error
            if final.dim() != 4:
                raise KdrunError(f"{self.role} '{self.model_name}' ends in a tensor of shape {tuple(final.shape)}, "
                                 f"not a (B, C, H, W) map to pool: pick a convolutional {self.role}")
            try:
                pooled = self.pooled_head(final.mean((2, 3)))
            except Exception:
                pooled = None
            if not _same(pooled, logits):
                raise KdrunError(f"the head of {self.role} '{self.model_name}' is not a global average pooling "
                                 f"followed by layers on the pooled vector: pick another {self.role} model")
            if self._classifier is not None and not _same(_try(self._classifier, embedding), logits):
                self._classifier = None  # asked for later: one line then
        self.map_channels, self.embedding_dim = final.shape[1], embedding.shape[1]
        return self

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}"


def _try(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor | None:
    try:
        return fn(x)
    except Exception:
        return None


def _same(a: Tensor | None, b: Tensor) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _as_map(pooled: Tensor) -> Tensor:
    """(N, C) -> (N, C, 1, 1): global pooling of a 1x1 map is the identity, so the model's own head
    (pooling and all) runs on pooled vectors unchanged."""
    return pooled[:, :, None, None]


class CifarHead(HeadSplit):
    """kdrun's CIFAR nets: ``head`` is [layers on the map], global pooling, flatten, one Linear."""

    def __init__(self, model: CifarNet, model_name: str, role: str) -> None:
        super().__init__(model, model_name, role)
        self._pool = next(i for i, m in enumerate(model.head) if isinstance(m, nn.AdaptiveAvgPool2d))
        self._classifier = model.head[-1]

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        head = self.model.head
        final = head[: self._pool](self.model.forward_features_list(x)[-1])
        embedding = head[self._pool: -1](final)
        return head[-1](embedding), final, embedding

    def pooled_head(self, pooled: Tensor) -> Tensor:
        return self.model.head[self._pool:](_as_map(pooled))


class TimmHead(HeadSplit):
    """timm: ``forward_features`` gives the final map, ``forward_head`` the rest."""

    def __init__(self, model: nn.Module, model_name: str, role: str) -> None:
        super().__init__(model, model_name, role)
        classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
        self._classifier = classifier if isinstance(classifier, nn.Module) else None
        self._split_head = False

    def measure(self, input_shape: tuple[int, int, int]) -> HeadSplit:
        super().measure(input_shape)
        # Once the classifier is known to give the logits, the head runs once per step (BatchNorm in a
        # head, as MobileNetV4's, then updates once).
        self._split_head = self._classifier is not None
        return self

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        final = self.model.forward_features(x)
        embedding = as_vector(self.model.forward_head(final, pre_logits=True))
        logits = self._classifier(embedding) if self._split_head else self.model.forward_head(final)
        return logits, final, embedding

    def pooled_head(self, pooled: Tensor) -> Tensor:
        return self.model.forward_head(_as_map(pooled))


class FxHead(HeadSplit):
    """torchvision (and other traceable models): the graph returns final map, embedding and logits;
    the pooled head is the graph's tail from the final map on, as its own GraphModule."""

    def __init__(self, model: nn.Module, model_name: str, role: str, nodes: tuple[str, str, str],
                 extractor: fx.GraphModule, tail: fx.GraphModule, classifier: nn.Module | None) -> None:
        super().__init__(model, model_name, role)
        self._nodes = nodes
        # Both reuse the model's modules: kept out of the module tree so parameters are not listed twice.
        object.__setattr__(self, "_extractor", extractor)
        object.__setattr__(self, "_tail", tail)
        self._classifier = classifier

    def _sync(self) -> None:
        extractor, training = self._extractor, self.model.training
        if extractor.training != training:  # follow the model's mode: the graph, not the shared modules
            extractor.graph = extractor.train_graph if training else extractor.eval_graph
            extractor.training = training

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._sync()
        out = self._extractor(x)
        final, embedding, logits = (out[name] for name in self._nodes)
        return logits, final, as_vector(embedding)

    def pooled_head(self, pooled: Tensor) -> Tensor:
        return self._tail(_as_map(pooled))


def _graph_tail(traced, start: fx.Node) -> fx.GraphModule:
    """A GraphModule computing the graph's output from ``start`` alone (the nodes after it)."""
    graph, env = fx.Graph(), {}
    env[start] = graph.placeholder("final_map")
    after = False
    for node in traced.graph.nodes:
        if node is start:
            after = True
            continue
        if not after or node.op == "placeholder":
            continue
        missing = [n for n in node.all_input_nodes if n not in env]
        for parent in missing:
            if parent.op != "get_attr":  # the head reads more than the final map (a skip connection)
                raise KdrunError("head reads more than its final map")
            env[parent] = graph.node_copy(parent, lambda n: env[n])
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(traced.model, graph)


def _fx_head(model: nn.Module, model_name: str, input_shape: tuple[int, int, int], role: str) -> FxHead:
    from kdrun.models.features_fx import trace_model, tracer_options
    from kdrun.models.features_fx_graph import classifier_node, last_map_node

    traced = trace_model(model, model_name, role, None, dummy_batch(model, input_shape))
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    downstream = traced.downstream()
    classifier = classifier_node(traced, output)
    clf_input = next((p for p in classifier.all_input_nodes if p in downstream), None) if classifier else None
    last = last_map_node(traced, clf_input if clf_input is not None else output, input_shape[1:], downstream)
    if last is None or clf_input is None:
        raise KdrunError(f"cannot find the final feature map and classifier of {role} '{model_name}': "
                         f"pick a timm or torchvision CNN")
    nodes = (traced.names[last], traced.names[clf_input], traced.names[output])
    try:
        tail = _graph_tail(traced, last)
        with eval_mode(model):
            extractor = create_feature_extractor(model, return_nodes=list(dict.fromkeys(nodes)),
                                                 suppress_diff_warning=True, tracer_kwargs=tracer_options(None))
    except Exception as error:
        raise KdrunError(f"cannot split {role} '{model_name}' at its global pooling ({error}): "
                         f"pick another {role} model") from error
    module = traced.module(classifier)
    return FxHead(model, model_name, role, nodes, extractor, tail, module if isinstance(module, nn.Linear) else None)


def build_head_split(model: nn.Module, model_name: str, input_shape: tuple[int, int, int],
                     role: str = "student") -> HeadSplit:
    """Wrap ``model`` so that one forward returns (logits, final map, embedding); see the module doc."""
    input_shape = tuple(int(d) for d in input_shape)
    if isinstance(model, CifarNet):
        split: HeadSplit = CifarHead(model, model_name, role)
    elif all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head")):
        split = TimmHead(model, model_name, role)
    else:
        split = _fx_head(model, model_name, input_shape, role)
    return split.measure(input_shape)
