"""prune.ratio (README "Pruning"): structured channel pruning with Torch-Pruning, the pruned student's checkpoints
and stage-cache keys, its metrics.json keys, and its errors."""
import copy
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from kdrun.config.prune_checks import student_config
from kdrun.config.schema import register_configs, validate
from kdrun.data import build_dataset
from kdrun.engine.cache import stage_key
from kdrun.engine.checkpoint import load_model_weights, save_model
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.models.prune import prune_model
from kdrun.paths import conf_dir
from kdrun.stages.context import RunContext
from kdrun.stages.prune import remember_teacher, state_sha256
from kdrun.stages.roles import hard_label_role

pytest.importorskip("torch_pruning")
register_configs()
TINY = ["dataset=synthetic", "dataset.image_size=16", "dataset.train_size=64", "dataset.test_size=32",
        "teacher.name=cifar:resnet14", "student.name=cifar:resnet8", "epochs=1", "batch_size=32", "optim=sgd",
        "lr=0.05", "progress=false", "tb_figures=0"]


def conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_channels, m.out_channels) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --- the pruned model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_every_layer_keeps_the_requested_share_of_its_channels_and_still_trains(ratio):
    torch.manual_seed(0)
    model = create_model("cifar:resnet8", num_classes=10, in_chans=3)
    before = conv_widths(model)
    report = prune_model(model, ratio, torch.zeros(2, 3, 16, 16), 10, "student cifar:resnet8")
    after = conv_widths(model)
    # Torch-Pruning's local pruning keeps floor(C * (1 - ratio)) of a layer's C output channels
    for name, (_, out) in before.items():
        assert after[name][1] == math.floor(out * (1 - ratio)), name
    assert after["stem.0"][0] == 3                       # the image channels stay
    assert model.head[2].out_features == 10              # and the classes
    assert model.head[2].in_features == math.floor(64 * (1 - ratio))
    counted = sum(out for _, out in before.values())
    assert report.channels_before == counted and report.channels_after == sum(out for _, out in after.values())
    assert report.channel_ratio == pytest.approx(ratio)  # 16/32/64 channels: no rounding at these ratios
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    images = torch.randn(4, 3, 16, 16)
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_timm_model_prunes_to_the_ratio_and_runs():
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=7, in_chans=3)
    report = prune_model(model, 0.5, torch.zeros(2, 3, 32, 32), 7, "student test_efficientnet")
    assert abs(report.channel_ratio - 0.5) < 0.05   # floor per layer on odd widths
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def one_by_one_net(filters: list[list[float]]) -> nn.Module:
    """1x1 conv (4 filters over 4 input channels) -> BN -> ReLU -> pool -> linear(4 -> 3): only the conv's
    filters differ between channels (BN weight 1, bias 0; every linear column the same)."""
    conv = nn.Conv2d(4, 4, 1, bias=False)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(filters).view(4, 4, 1, 1))
        net[5].weight.fill_(0.5)
        net[5].bias.zero_()
    return net


@pytest.mark.parametrize("importance, kept", [("l2", [1, 2]), ("l1", [0, 1])])
def test_the_channels_of_the_largest_weight_norm_are_kept(importance, kept):
    # filter norms: 0 -> l1 4, l2 2; 1 -> l1 3, l2 3; 2 -> l1 2.5, l2 2.5; 3 -> l1 0.4, l2 0.2
    filters = [[1, 1, 1, 1], [3, 0, 0, 0], [2.5, 0, 0, 0], [0.1, 0.1, 0.1, 0.1]]
    net = one_by_one_net(filters)
    prune_model(net, 0.5, torch.zeros(2, 4, 3, 3), 3, "student net", importance=importance)
    assert torch.equal(net[0].weight.view(2, 4), torch.tensor(filters)[kept])   # in their original order
    assert net[5].weight.shape == (3, 2)


def test_pruned_shapes_depend_on_the_ratio_not_the_weights_and_the_same_weights_prune_alike():
    shapes, states = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("cifar:resnet8", num_classes=10, in_chans=3)
        twin = copy.deepcopy(model)
        for m in (model, twin):
            prune_model(m, 0.5, torch.zeros(2, 3, 16, 16), 10, "student")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
        shapes.append({k: v.shape for k, v in model.state_dict().items()})
        states.append(model.state_dict())
    assert shapes[0] == shapes[1]
    assert not torch.equal(states[0]["stem.0.weight"], states[1]["stem.0.weight"])


class Mix(nn.Module):
    """A layer Torch-Pruning does not know: it mixes channels with a (C, C) matrix of its own."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels))

    def forward(self, x):
        return torch.einsum("nchw,cd->ndhw", x, self.weight)


def mixing_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Mix(8), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_a_layer_torch_pruning_cannot_prune_is_named_with_the_fix():
    with pytest.raises(KdrunError) as raised:
        prune_model(mixing_net(), 0.5, torch.zeros(2, 3, 8, 8), 5, "student mixer")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("prune.ratio=0.5: student mixer no longer runs once pruned: layer '2' (Mix) fails")
    assert "prune.ignored_layers=[0]" in message   # the convolution feeding it
    # the fix works: the feeding convolution keeps its channels, the one after Mix is pruned
    net = mixing_net()
    prune_model(net, 0.5, torch.zeros(2, 3, 8, 8), 5, "student mixer", ignored=["0"])
    assert (net[0].out_channels, net[3].out_channels) == (8, 4)
    with pytest.raises(KdrunError, match=r"^prune.ignored_layers names 'conv9', which student mixer does not have"):
        prune_model(mixing_net(), 0.5, torch.zeros(2, 3, 8, 8), 5, "student mixer", ignored=["conv9"])


# --- settings, checked before anything trains ------------------------------------------------------------

def compose_tiny(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.mark.parametrize("overrides, start", [
    (["prune.ratio=1.5"], "prune.ratio=1.5 must be strictly between 0 and 1"),
    (["prune.ratio=0"], "prune.ratio=0.0 must be strictly between 0 and 1"),
    (["prune=teacher", "prune.source=assistant"], "prune.source=assistant must be teacher"),
    (["prune=teacher", "prune.importance=taylor"], "prune.importance=taylor must be l2 or l1"),
    (["prune=teacher", "paradigm=online"], "prune.ratio with paradigm=online: pruning builds the student"),
    (["prune=teacher", "student.checkpoint=s.pt"], "prune.source=teacher builds the student from the teacher's"),
    (["prune=teacher", "teacher.outputs=t.npz"], "prune.source=teacher prunes the teacher model, but teacher.outputs"),
    (["prune=distilled"], "prune.finetune_epochs fine-tunes a trained student once pruned: pass student.checkpoint"),
])
def test_bad_prune_settings_are_one_line_with_the_fix(tmp_path, overrides, start):
    with pytest.raises(KdrunError) as raised:
        validate(compose_tiny(tmp_path, *overrides))
    assert str(raised.value).startswith(start) and "\n" not in str(raised.value)


def test_prune_distilled_trains_the_student_for_its_finetune_epochs(tmp_path):
    from kdrun.config.schema import stage_epochs

    cfg = compose_tiny(tmp_path, "prune=distilled", "epochs=5", "student.checkpoint=s.pt")
    assert (cfg.prune.ratio, cfg.prune.source) == (0.5, "student")
    assert (stage_epochs(cfg, "student"), stage_epochs(cfg, "teacher")) == (2, 5)


# --- the run's pruned student: rebuilt the same way by every stage, checkpoints and cache keys ------------

def context(tmp_path: Path, *overrides: str) -> RunContext:
    cfg = student_config(compose_tiny(tmp_path, *overrides))
    return RunContext(cfg, build_dataset(cfg.dataset), torch.device("cpu"), tmp_path / "run", progress=False)


def trained_teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cifar:resnet14", num_classes=10, in_chans=3)


def test_the_student_is_the_trained_teacher_pruned_and_its_checkpoints_reload(tmp_path):
    ctx = context(tmp_path, "prune.ratio=0.5")
    assert ctx.cfg.student.name == "cifar:resnet14"   # prune.source=teacher: the teacher's architecture
    untrained = ctx.build_model("student")            # the preflight's: before the teacher is obtained
    teacher = trained_teacher(1)
    remember_teacher(ctx, teacher)
    student = ctx.build_model("student")
    assert {k: v.shape for k, v in student.state_dict().items()} == \
        {k: v.shape for k, v in untrained.state_dict().items()}
    kept = student.stem[0].weight
    assert kept.shape[0] == 8 and all(any(torch.equal(f, g) for g in teacher.stem[0].weight) for f in kept)
    # what a resumed stage or the stage cache does: build the student again, load its checkpoint
    path = tmp_path / "last.pt"
    save_model(path, student, ctx.meta("student"), "student")
    rebuilt = ctx.build_model("student")
    meta = load_model_weights(rebuilt, path, "checkpoint", "cifar:resnet14", 10)
    assert meta["pruning"] == {"ratio": 0.5, "source": "teacher", "importance": "l2", "ignored_layers": [],
                               "torch_pruning": meta["pruning"]["torch_pruning"]}
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(rebuilt.eval()(images), student.eval()(images))
    # the baseline's stage-cache key: the prune settings and the teacher's weights by content
    spec = hard_label_role(ctx, "baseline", "student").cache_spec
    assert spec["model"]["prune"]["ratio"] == 0.5
    assert spec["model"]["prune"]["teacher_sha256"] == state_sha256(teacher.state_dict())
    other = context(tmp_path, "prune.ratio=0.25")
    remember_teacher(other, teacher)
    retrained = context(tmp_path, "prune.ratio=0.5")
    remember_teacher(retrained, trained_teacher(2))
    keys = {stage_key(c_spec) for c_spec in
            (spec, hard_label_role(other, "baseline", "student").cache_spec,
             hard_label_role(retrained, "baseline", "student").cache_spec)}
    assert len(keys) == 3
    # a pruned checkpoint loads anywhere without the prune settings: its recorded ratio rebuilds its shapes
    plain = context(tmp_path, "student.name=cifar:resnet14", f"student.checkpoint={path}", "paradigm=baseline")
    loaded = plain.build_model("student")
    assert torch.equal(loaded.eval()(images), student.eval()(images))
    assert plain.meta("student")["pruning"]["ratio"] == 0.5   # and its own checkpoints say so too
    again = context(tmp_path, "student.name=cifar:resnet14", f"student.checkpoint={path}", "prune=student")
    with pytest.raises(KdrunError, match=r"is already pruned \(50% of its channels removed\) and prune.ratio"):
        again.build_model("student")


# --- the command line ----------------------------------------------------------------------------------

def test_a_prune_ratio_sweep_distils_pruned_teachers(kdrun, tmp_path, tiny_args, read_metrics):
    proc = kdrun("-m", *tiny_args, "epochs=1", "prune.ratio=0.25,0.5", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr
    from kdrun.engine.evaluate import predict

    test_split = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 320, "test_size": 64}).test
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.name[0].isdigit())
    assert [p.name for p in jobs] == ["0_prune.ratio=0.25", "1_prune.ratio=0.5"]
    assert proc.stderr.count("teacher: training") == 1 and proc.stderr.count("baseline: training") == 2
    for job, ratio in zip(jobs, (0.25, 0.5)):
        metrics = read_metrics(job)
        pruned, teacher, student = metrics["pruning"], metrics["teacher"], metrics["student"]
        assert (pruned["ratio"], pruned["source"], pruned["model"]) == (ratio, "teacher", "cifar:resnet14")
        assert student["name"] == "cifar:resnet14" and metrics["baseline"]["params"] == student["params"]
        assert pruned["channel_ratio"] == pytest.approx(ratio)   # resnet14: 16/32/64-channel layers
        assert (pruned["params_before"], pruned["flops_before"]) == (teacher["params"], teacher["flops"])
        assert (pruned["params_after"], pruned["flops_after"]) == (student["params"], student["flops"])
        assert pruned["params_ratio"] == pytest.approx(student["params"] / teacher["params"])
        assert pruned["flops_ratio"] == pytest.approx(student["flops"] / teacher["flops"])
        assert pruned["before"]["latency_ms"] > 0 and pruned["after"]["latency_ms"] > 0
        assert pruned["before"]["params"] == teacher["params"] and pruned["after"]["flops"] == student["flops"]
        assert pruned["library"].startswith("torch-pruning ")
        # the pruned weights before training: the cached teacher, pruned here the same way, on the test split
        teacher_model = create_model("cifar:resnet14", num_classes=10, in_chans=3)
        load_model_weights(teacher_model, tmp_path / teacher["path"], "teacher.checkpoint", "cifar:resnet14", 10)
        prune_model(teacher_model, ratio, torch.zeros(2, 3, 16, 16), 10, "teacher")
        logits, labels = predict(teacher_model, test_split, 64, torch.device("cpu"))
        assert pruned["pruned_top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-9)
        saved = torch.load(job / "checkpoints" / "best.pt", weights_only=True)
        assert saved["pruning"]["ratio"] == ratio and saved["model_name"] == "cifar:resnet14"
        assert f"pruning: teacher cifar:resnet14, {100 * ratio:g}% of each layer's channels removed" in \
            (job / "kdrun.log").read_text() + proc.stdout
    params = [read_metrics(job)["student"]["params"] for job in jobs]
    assert params[0] > params[1]
