"""Feature taps: logits, maps and embedding of timm, torchvision and CIFAR models from one pass."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.factory import create_model
from kdrun.models.features import build_feature_taps, list_feature_layers, match_stages

TIMM = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto"]
TORCHVISION = ["torchvision:resnet18", "torchvision:mobilenet_v3_small"]
CIFAR = ["cifar:resnet8", "cifar:wrn_16_2", "cifar:mobilenetv2"]
ALL = TIMM + TORCHVISION + CIFAR


def _model(name: str, in_chans: int = 3) -> nn.Module:
    return _cached_model(name, in_chans)  # one cache key whether in_chans is given or not


@functools.cache
def _cached_model(name: str, in_chans: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_chans=in_chans)


def _taps(name: str, shape=(3, 32, 32), layers=None, role="student"):
    return build_feature_taps(_model(name, shape[0]), name, shape, layers=layers, role=role)


def _batch(shape=(3, 32, 32)) -> torch.Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _check_shapes(taps, maps, embedding, shape) -> None:
    assert len(maps) == len(taps.names) == len(taps.reductions) == len(taps.channels) > 0
    for fmap, reduction, channels in zip(maps, taps.reductions, taps.channels):
        assert fmap.dim() == 4 and fmap.shape[1] == channels
        # A map of an input not divisible by its stride is rounded up (padded convs) or down.
        assert fmap.shape[2] in (-(-shape[1] // reduction), shape[1] // reduction)
    assert embedding.shape == (2, taps.embedding_dim)


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_one_pass_gives_the_real_logits_maps_and_classifier_input(name: str) -> None:
    model = _model(name).eval()
    taps = _taps(name)
    x = _batch()
    logits, maps, embedding = taps(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    _check_shapes(taps, maps, embedding, (3, 32, 32))
    classifier = _last_linear(model)
    assert taps.embedding_dim == classifier.in_features
    # The embedding is what the classifier reads: applying it gives the logits.
    torch.testing.assert_close(classifier(embedding), logits, rtol=1e-4, atol=1e-5)


def test_natural_stages() -> None:
    assert _taps("resnet18").names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert _taps("torchvision:resnet18").names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    tv_mobile = _taps("torchvision:mobilenet_v3_small")
    assert tv_mobile.names == ["features.0", "features.1", "features.3", "features.8", "features.12"]
    assert tv_mobile.reductions == [2, 4, 8, 16, 32]
    cifar = _taps("cifar:resnet8")
    assert cifar.names == ["stem", "stages.0", "stages.1", "stages.2"]
    assert cifar.reductions == _model("cifar:resnet8").feature_reductions
    assert cifar.channels == _model("cifar:resnet8").feature_channels


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                  "cifar:resnet8"])
@torch.no_grad()
def test_one_channel_input_of_odd_size(name: str) -> None:
    shape = (1, 28, 28)
    model = _model(name, 1).eval()
    taps = _taps(name, shape)
    x = _batch(shape)
    logits, maps, embedding = taps(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    _check_shapes(taps, maps, embedding, shape)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "torchvision:mobilenet_v3_small", "cifar:wrn_16_2"])
def test_gradients_flow_from_maps_to_the_first_layer(name: str) -> None:
    model = _model(name).train()
    taps = _taps(name)
    first = next(p for p in model.parameters() if p.dim() == 4)  # the stem convolution
    for index in (0, -1):
        model.zero_grad(set_to_none=True)
        _, maps, _ = taps(_batch())
        maps[index].square().mean().backward()
        assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "layers", "names", "channels"), [
    ("resnet18", ["layer4", "layer2"], ["layer2", "layer4"], [128, 512]),
    ("resnet18", ["1", "-1"], ["layer1", "layer4"], [64, 512]),
    ("torchvision:resnet18", ["layer3", "layer1.0.conv1"], ["layer1.0.conv1", "layer3"], [64, 256]),
    ("cifar:resnet8", ["stages.2", "stem"], ["stem", "stages.2"], [16, 64]),
    ("cifar:wrn_16_2", ["1"], ["stages.0"], [32]),
])
@torch.no_grad()
def test_explicit_layers(name: str, layers: list[str], names: list[str], channels: list[int]) -> None:
    _model(name).eval()
    taps = _taps(name, layers=layers)
    assert taps.names == names and taps.channels == channels
    # The same maps as the natural stages where those include them.
    x = _batch()
    default = _taps(name)
    _, chosen, _ = taps(x)
    _, natural, _ = default(x)
    for tapped_name, fmap in zip(taps.names, chosen):
        if tapped_name in default.names:
            torch.testing.assert_close(fmap, natural[default.names.index(tapped_name)])


@pytest.mark.parametrize(("name", "listed"), [
    ("resnet18", "layer1"), ("torchvision:resnet18", "layer1.0.conv1"), ("cifar:resnet8", "stages.0"),
])
def test_unknown_layer_is_a_one_line_error_listing_the_layers(name: str, listed: str) -> None:
    with pytest.raises(KdrunError) as error:
        _taps(name, layers=["layer9"], role="teacher")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"teacher layer 'layer9' not found in {name}; available: ")
    assert listed in message
    assert listed in list_feature_layers(_model(name), name)


def test_an_empty_layer_list_is_refused() -> None:
    with pytest.raises(KdrunError, match="empty"):
        _taps("resnet18", layers=[])


def test_a_layer_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(KdrunError, match="not a \\(B, C, H, W\\) map") as error:
        _taps("torchvision:resnet18", layers=["flatten"])
    assert "\n" not in str(error.value)


def test_match_stages_pairs_equal_reductions() -> None:
    teacher, student = _taps("resnet18", role="teacher"), _taps("mobilenetv3_small_100")
    s_idx, t_idx = match_stages(student, teacher)
    assert len(s_idx) == 5
    assert [student.reductions[i] for i in s_idx] == [teacher.reductions[j] for j in t_idx] == [2, 4, 8, 16, 32]
    assert s_idx == sorted(s_idx) and t_idx == sorted(t_idx)
    # The deepest pairs are kept first.
    assert match_stages(student, teacher, max_pairs=2) == ([3, 4], [3, 4])


def test_match_stages_takes_the_deepest_map_of_a_reduction() -> None:
    student, teacher = _taps("cifar:resnet8"), _taps("cifar:mobilenetv2", role="teacher")
    # resnet8: stem, stages at 1, 1, 2, 4; mobilenetv2: 2, 2, 4, 8, 16.
    assert match_stages(student, teacher) == ([2, 3], [1, 2])


def test_match_stages_without_shared_reductions_pairs_by_depth() -> None:
    student, teacher = SimpleNamespace(reductions=[2, 4, 8, 16, 32]), SimpleNamespace(reductions=[3, 6, 12])
    assert match_stages(student, teacher) == ([1, 3, 4], [0, 1, 2])
    assert match_stages(student, teacher, max_pairs=1) == ([4], [2])


@torch.no_grad()
def test_timm_model_without_forward_intermediates_goes_through_fx() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=3).eval()
    model.forward_intermediates = None  # as for a timm model that lacks it
    taps = build_feature_taps(model, "resnet18", (3, 32, 32))
    assert type(taps).__name__ == "FxTaps"
    assert taps.names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = _batch()
    logits, maps, embedding = taps(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    _check_shapes(taps, maps, embedding, (3, 32, 32))


def test_taps_keep_the_model_state_and_modes() -> None:
    model = create_model("torchvision:resnet18", num_classes=10, in_chans=3).train()
    model.bn1.eval()  # e.g. a frozen BatchNorm
    taps = build_feature_taps(model, "resnet18", (3, 32, 32))
    assert model.training and not model.bn1.training
    # The extractor shares the model's parameters without duplicating them.
    assert list(taps.state_dict()) == [f"model.{key}" for key in model.state_dict()]
    assert sum(p.numel() for p in taps.parameters()) == sum(p.numel() for p in model.parameters())


class _Shifted(nn.Module):
    """A plain nn.Module (neither timm nor torchvision) whose forward reads a buffer directly,
    which FX copies into the extractor as an attribute of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.register_buffer("shift", torch.zeros(1, 8, 1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x) + self.shift, 1), 1))


@torch.no_grad()
def test_fx_taps_follow_the_model_to_another_dtype() -> None:
    model = _Shifted().eval()
    taps = build_feature_taps(model, "shifted", (3, 16, 16))
    assert taps.names == ["add"] and taps.reductions == [2] and taps.embedding_dim == 8
    taps.to(torch.float64)
    model.shift.fill_(1.0)  # the model's new (float64) buffer, not the one the extractor copied
    x = _batch((3, 16, 16)).double()
    logits, maps, _ = taps(x)
    assert logits.dtype == maps[0].dtype == torch.float64
    torch.testing.assert_close(logits, model(x))
