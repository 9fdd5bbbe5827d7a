"""One factory for teachers and students: timm first, torchvision second, kdrun's CIFAR nets third.

A name may carry a source prefix to pick one explicitly: `timm:vgg13`, `torchvision:vgg13`,
`cifar:vgg13` (timm and torchvision both have an ImageNet vgg13; the CIFAR tables use another).
"""
from __future__ import annotations

import difflib
import functools
import os
import socket
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.cifar import CIFAR_MODELS, create_cifar_model
from kdrun.registry import Registry

# Model sources, tried in the order of their `priority` for a name without a prefix. Each registers its
# create function with `has` (is this one of mine?), `names` (all of mine, for close-match suggestions) and
# `label` (how messages name it).
SOURCES = Registry("model source", "a prefix SOURCE:NAME, e.g. cifar:vgg13")
SOURCE_ALIASES = {"tv": "torchvision"}


@functools.lru_cache(maxsize=1)
def _torchvision_classifiers() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


@SOURCES.register("timm", priority=0, label="timm", has=timm.is_model, names=timm.list_models)
def _create_timm(bare: str, num_classes: int, in_chans: int, pretrained: bool, role: str,
                 image_size: tuple[int, int] | None, **kwargs) -> nn.Module:
    build = functools.partial(_timm_pretrained, bare, num_classes, in_chans, role) if pretrained else \
        functools.partial(timm.create_model, bare, num_classes=num_classes, in_chans=in_chans)
    model = build(**kwargs)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size and fixed is not None and tuple(fixed) != tuple(image_size) and "img_size" not in kwargs:
        model = build(img_size=tuple(image_size), **kwargs)  # timm resamples pretrained position embeddings
    return model


@SOURCES.register("torchvision", priority=1, label="torchvision", has=lambda name: name in _torchvision_classifiers(),
                  names=lambda: sorted(_torchvision_classifiers()))
def _create_torchvision(bare: str, num_classes: int, in_chans: int, pretrained: bool, role: str,
                        image_size: tuple[int, int] | None, **kwargs) -> nn.Module:
    _no_pretrained(bare, "torchvision", pretrained, role)
    model = torchvision.models.get_model(bare, weights=None, num_classes=num_classes, **kwargs)
    fixed = getattr(model, "image_size", None)
    if image_size and isinstance(fixed, int) and fixed != image_size[0] and "image_size" not in kwargs:
        model = torchvision.models.get_model(bare, weights=None, num_classes=num_classes,
                                             image_size=image_size[0], **kwargs)
    return _adapt_input_channels(model, in_chans) if in_chans != 3 else model


@SOURCES.register("cifar", priority=2, label="kdrun CIFAR", has=lambda name: name in CIFAR_MODELS,
                  names=lambda: sorted(CIFAR_MODELS))
def _create_cifar(bare: str, num_classes: int, in_chans: int, pretrained: bool, role: str,
                  image_size: tuple[int, int] | None, **kwargs) -> nn.Module:
    _no_pretrained(bare, "cifar", pretrained, role)
    return create_cifar_model(bare, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _no_pretrained(name: str, source: str, pretrained: bool, role: str) -> None:
    if pretrained:
        raise KdrunError(f"{role}.pretrained=true needs a timm model, '{name}' is a {source} model: "
                         f"load weights with {role}.checkpoint=PATH instead")


def _by_priority() -> list[str]:
    return sorted(SOURCES, key=lambda source: SOURCES.info(source)["priority"])


def resolve_source(name: str, role: str = "model") -> tuple[str, str]:
    """Return (source, bare name) for a model name, or raise with close matches."""
    if ":" in name:
        source, bare = name.split(":", 1)
        source = SOURCE_ALIASES.get(source, source)
        if source not in SOURCES:
            raise KdrunError(SOURCES.unknown(source, where=f"'{name}'"))
        if not SOURCES.info(source)["has"](bare):
            raise KdrunError(f"unknown {role} {source} model '{bare}'{_suggestion(bare)}")
        return source, bare
    for source in _by_priority():
        if SOURCES.info(source)["has"](name):
            return source, name
    raise KdrunError(f"unknown {role} model '{name}'{_suggestion(name)}")


def _suggestion(name: str) -> str:
    from kdrun.models.presets import preset_names  # the config presets, e.g. mobilenetv3

    # kdrun's own presets first: `resnet5O` should suggest the preset resnet50 before timm's resnet56.
    presets = preset_names()
    known = set().union(*(SOURCES.info(source)["names"]() for source in SOURCES))
    others = sorted(known - set(presets))
    close = difflib.get_close_matches(name, presets, n=2, cutoff=0.75)
    close += [c for c in difflib.get_close_matches(name, others, n=3, cutoff=0.6) if c not in close]
    close = close[:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    *first, last = [SOURCES.info(source)["label"] for source in _by_priority()]
    return f"{hint} Any {', '.join(first)} or {last} model name works (e.g. student.name=resnet18)"


def check_model_name(name: str, role: str = "model") -> None:
    resolve_source(name, role)


def create_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False,
                 role: str = "model", image_size: tuple[int, int] | None = None, **kwargs) -> nn.Module:
    """Build `name` for the dataset; `image_size` (H, W) rebuilds vision transformers made for a fixed
    input size (ViT, DeiT, ...) at the dataset's size, as their constructors allow."""
    source, bare = resolve_source(name, role)
    return SOURCES[source](bare, num_classes, in_chans, pretrained, role, image_size, **kwargs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_pretrained(name: str, num_classes: int, in_chans: int, role: str, **kwargs) -> nn.Module:
    import huggingface_hub.constants as hub

    # Offline, the hub client retries for about a minute; use the local cache only instead.
    offline_before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = offline_before or not _hub_reachable()
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as error:  # the hub raises many types (OSError, HTTP errors, missing tags)
        reason = "the hub is unreachable (offline?)" if hub.HF_HUB_OFFLINE else type(error).__name__
        raise KdrunError(f"could not get pretrained weights for {role} '{name}': {reason} and they are not "
                         f"in the local cache; pass {role}.checkpoint=PATH to load your own weights, or "
                         f"{role}.pretrained=false to train it here") from error
    finally:
        hub.HF_HUB_OFFLINE = offline_before


def _adapt_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """torchvision models take 3 channels; swap their first conv for one with `in_chans`."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, child.bias is not None)
                setattr(parent, child_name, new)
                return model
    raise KdrunError(f"cannot adapt {type(model).__name__} to {in_chans} input channels: "
                     "use a timm model (it takes in_chans) or a 3-channel dataset")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
