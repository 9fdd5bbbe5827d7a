"""What every feature tap shares: the wrapper class, the one-off shape probe and the errors.

See :mod:`kdrun.models.features` for the public API; the library-specific taps live in
``features_timm`` (timm's ``forward_intermediates``) and ``features_fx`` (torchvision's FX
feature extraction).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdrun.errors import KdrunError, one_line

# Past this many names an error message lists the first and last few only.
_MAX_LISTED = 30


class TapOutput(NamedTuple):
    """What a :class:`FeatureTaps` returns: a plain tuple (logits, features, embedding)."""

    logits: Tensor           # (B, K), the model's own output
    features: list[Tensor]   # (B, C, H, W) maps, shallow to deep
    embedding: Tensor        # (B, D), the classifier's input


class FeatureTaps(nn.Module):
    """Wraps a model; ``forward(x)`` returns ``(logits, feature_maps, embedding)`` from ONE pass.

    ``embedding`` is the pooled penultimate features (the classifier's input). The wrapped
    model is registered as ``self.model``, so parameters, ``state_dict`` and ``.to()`` are
    the model's own.

    Attributes (filled by :meth:`measure`, which build_feature_taps calls):
        names: the tapped layer/stage names, shallow to deep.
        reductions: input size / map size of each tapped map (see :func:`reduction_factor`).
        channels: channels of each tapped map.
        embedding_dim: width of the embedding.
    """

    pre_relu = False  # whether the maps are taken before the activation (CifarTaps can, for OFD)

    def __init__(self, model: nn.Module, model_name: str, names: Sequence[str], role: str) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.role = role
        self.names = list(names)
        self.reductions: list[int] = []
        self.channels: list[int] = []
        self.embedding_dim = 0

    def bn_before_relu(self) -> list[nn.BatchNorm2d] | None:
        """The BatchNorm feeding each map's ReLU where the maps are pre-ReLU, else None."""
        return None

    def forward(self, x: Tensor) -> TapOutput:
        logits, maps, embedding = self._tap(x)
        return TapOutput(logits, maps, embedding)

    def _tap(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        raise NotImplementedError

    def _calibrate(self, x: Tensor) -> None:
        """Decide anything that needs a real forward (runs once, in eval mode, before measuring)."""

    def measure(self, input_shape: tuple[int, int, int]) -> FeatureTaps:
        """Fill reductions/channels/embedding_dim from one dummy batch of ``input_shape`` (C, H, W)."""
        x = dummy_batch(self.model, input_shape)
        with torch.no_grad(), eval_mode(self.model):
            try:
                self._calibrate(x)
                _, maps, embedding = self._tap(x)
            except KdrunError:
                raise
            except Exception as error:  # the model's own failure, e.g. a kernel larger than the map
                raise cannot_run(self.role, self.model_name, input_shape, error) from error
        for name, fmap in zip(self.names, maps):
            if fmap.dim() != 4:
                raise KdrunError(f"{self.role} layer '{name}' of {self.model_name} gives a tensor of shape "
                                 f"{tuple(fmap.shape)}, not a (B, C, H, W) map: pick a convolutional layer")
        self.channels = [fmap.shape[1] for fmap in maps]
        self.reductions = [reduction_factor(input_shape[1], fmap.shape[2]) for fmap in maps]
        self.embedding_dim = embedding.shape[1]
        return self

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, names={self.names}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; then every submodule gets its own earlier mode back
    (model.train(flag) would also unfreeze, e.g., BatchNorm layers a user keeps in eval)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def dummy_batch(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 2) -> Tensor:
    """A random batch on the model's device and dtype (2 samples: some ops squeeze a batch of 1)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape, generator=generator).to(device=device, dtype=dtype)


def reduction_factor(in_size: int, out_size: int) -> int:
    """How much smaller a map of ``out_size`` pixels is than an input of ``in_size``.

    The nominal stride when it explains the size (a stride-8 map of a 28-pixel input is 4 pixels
    with padded convolutions, 3 with floor pooling: both give 8), else the rounded ratio (14 for
    a patch-14 ViT). Two models probed with the same input thus agree for maps of equal size.
    """
    strides = [2 ** k for k in range(max(in_size, 1).bit_length() + 1)]
    for rounding in (lambda r: -(-in_size // r), lambda r: in_size // r):  # ceil, then floor
        for stride in strides:
            if rounding(stride) == out_size:
                return stride
    return max(1, round(in_size / max(out_size, 1)))


def as_vector(embedding: Tensor) -> Tensor:
    """(B, D) from a classifier input that may still be a map (B, C, H, W) or tokens (B, N, C)."""
    if embedding.dim() == 4:
        return embedding.mean((2, 3))
    if embedding.dim() == 3:
        return embedding.mean(1)
    return embedding.flatten(1)


def listing(names: Sequence[str]) -> str:
    """Comma-separated names, the middle left out when there are very many."""
    if not names:
        return "none"
    if len(names) <= _MAX_LISTED:
        return ", ".join(names)
    head, tail = names[: _MAX_LISTED - 8], names[-8:]
    return f"{', '.join(head)}, ..., {', '.join(tail)} ({len(names)} in all)"


def cannot_run(role: str, model_name: str, input_shape: Sequence[int], error: Exception) -> KdrunError:
    return KdrunError(f"{role} '{model_name}' cannot run on {'x'.join(map(str, input_shape))} inputs "
                      f"({one_line(error, limit=200)}): use larger images or another {role} model")


def layer_not_found(role: str, name: str, model_name: str, available: Sequence[str]) -> KdrunError:
    return KdrunError(f"{role} layer '{name}' not found in {model_name}; available: {listing(available)}")


def pick_indices(names: Sequence[str], layers: Sequence[str], model_name: str, role: str) -> list[int]:
    """Indices of ``layers`` (names, or indices as strings, negative from the end) in ``names``,
    sorted: the models return their maps in depth order whatever was asked."""
    chosen = set()
    for layer in map(str, layers):
        if layer in names:
            chosen.add(list(names).index(layer))
        elif re.fullmatch(r"-?\d+", layer) and -len(names) <= int(layer) < len(names):
            chosen.add(int(layer) % len(names))
        else:
            available = [*names, f"or an index 0-{len(names) - 1}"] if names else []
            raise layer_not_found(role, layer, model_name, available)
    return sorted(chosen)
