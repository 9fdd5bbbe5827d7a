"""Every preset of every config group composes, and the typed schema holds."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config.schema import register_configs, validate
from kdrun.paths import conf_dir, group_options

register_configs()
GROUPS = ["teacher", "student", "dataset", "distill", "optim", "sched", "experiment"]


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_preset_composes(group, option):
    cfg = compose_with(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "dataset":
        assert cfg.dataset.name == option
    if group in ("teacher", "student"):
        from kdrun.models import check_model_name
        check_model_name(cfg[group].name)
    if option != "imagefolder":  # imagefolder needs dataset.root from the user
        validate(cfg)


# The model presets the issue named, and the timm model each one stands for.
MODEL_PRESETS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                 "mobilenetv3": "mobilenetv3_large_100", "mobilenetv3_small": "mobilenetv3_small_100",
                 "efficientnet_b0": "efficientnet_b0"}
# The dataset presets the issue named, and the dataset config each one composes to.
TORCHVISION_SET = {"root": "data", "download": False, "augment": True}  # files under ./data, never downloaded unasked
EMBEDDED_SET = {"test_fraction": 0.2, "split_seed": 0}                  # a fixed, seeded 80/20 split
# Every dataset also carries the held-out validation share (kdrun/data/validation.py), off by default.
VALIDATION = {"val_split": 0.0, "val_split_seed": 0}
DATASET_PRESETS = {name: {**preset, **VALIDATION} for name, preset in {
    "mnist5k": {"name": "mnist5k", **EMBEDDED_SET},
    "digits": {"name": "digits", **EMBEDDED_SET},
    "cifar10": {"name": "cifar10", **TORCHVISION_SET},
    "cifar100": {"name": "cifar100", **TORCHVISION_SET},
    "mnist": {"name": "mnist", **TORCHVISION_SET},
    "fashion_mnist": {"name": "fashion_mnist", **TORCHVISION_SET},
    "imagefolder": {"name": "imagefolder", "root": None, "train_dir": "train", "val_dir": "val", "image_size": 224,
                    "augment": True, "in_chans": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                    "num_workers": 2, "pack": False, "pack_dir": "outputs/cache/packed"},
    "synthetic": {"name": "synthetic", "num_classes": 10, "train_size": 256, "test_size": 64, "image_size": 32,
                  "in_chans": 3, "seed": 0},
}.items()}


def test_presets_named_in_the_issue_exist():
    """Each preset composes to the model or dataset it names, and changes nothing else of the config."""
    import timm

    default = OmegaConf.to_container(compose_with(), resolve=True)
    for preset, model in MODEL_PRESETS.items():
        cfg = OmegaConf.to_container(compose_with(f"teacher={preset}", f"student={preset}"), resolve=True)
        for role in ("teacher", "student"):
            assert cfg[role] == {**default[role], "name": model}, (role, preset)
            assert cfg[role]["pretrained"] is False and cfg[role]["checkpoint"] is None  # trained from scratch
        assert timm.is_model(model), model  # a model timm builds, not a name kdrun would reject
        assert {k: v for k, v in cfg.items() if k not in ("teacher", "student")} == \
            {k: v for k, v in default.items() if k not in ("teacher", "student")}, preset
    assert len({model for model in MODEL_PRESETS.values()}) == len(MODEL_PRESETS)
    for preset, dataset in DATASET_PRESETS.items():
        cfg = OmegaConf.to_container(compose_with(f"dataset={preset}"), resolve=True)
        assert cfg["dataset"] == dataset, preset
        assert {k: v for k, v in cfg.items() if k != "dataset"} == \
            {k: v for k, v in default.items() if k != "dataset"}, preset


def test_kd_weights_follow_top_level_t_and_alpha():
    cfg = compose_with("T=3", "alpha=0.25")
    terms = OmegaConf.to_container(cfg.distill.terms, resolve=True)
    assert terms["kd"]["T"] == 3.0 and terms["kd"]["weight"] == 0.25
    assert terms["ce"]["weight"] == pytest.approx(0.75)


def test_defaults_are_the_documented_ones():
    cfg = compose_with()
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == ("resnet50", "mobilenetv3_large_100", "mnist5k")
    assert cfg.device == "auto" and cfg.baseline is True and cfg.resume is False


@pytest.mark.parametrize("experiment", [e for e in group_options("experiment") if e.startswith("cifar100_")])
def test_cifar100_experiments_carry_the_papers_recipe(experiment):
    cfg = compose_with(f"experiment={experiment}", "T=2")
    assert cfg.dataset.name == "cifar100" and cfg.epochs == 240 and cfg.batch_size == 64
    assert cfg.optim.name == "sgd" and cfg.optim.weight_decay == 5e-4 and cfg.optim.momentum == 0.9
    assert cfg.sched.name == "multistep" and list(cfg.sched.milestones) == [150, 180, 210] and cfg.sched.gamma == 0.1
    small_student = any(k in cfg.student.name for k in ("mobilenet", "shufflenet"))
    assert cfg.lr == (0.01 if small_student else 0.05)
    assert cfg.T == 2.0  # command-line values still win over the recipe
    assert cfg.teacher.name.startswith("cifar:") and cfg.student.name.startswith("cifar:")


# The ImageNet pairs of the distillation tables, and the models kdrun builds for them (timm's names).
IMAGENET_PAIRS = {"imagenet_resnet34_resnet18": ("resnet34", "resnet18"),
                  "imagenet_resnet50_mobilenetv1": ("resnet50", "mobilenetv1_100")}


def test_the_imagenet_experiments_are_the_two_standard_pairs():
    assert sorted(e for e in group_options("experiment") if e.startswith("imagenet_")) == sorted(IMAGENET_PAIRS)


@pytest.mark.parametrize("experiment", sorted(IMAGENET_PAIRS))
def test_imagenet_experiments_carry_the_papers_recipe(experiment, tmp_path):
    """SGD 0.1 (momentum 0.9, no Nesterov), batch 256, 100 epochs, x0.1 at 30/60/90, wd 1e-4, 224 px, KD at T 1."""
    from kdrun.models import check_model_name

    (tmp_path / "teacher.pth").touch()
    cfg = compose_with(f"experiment={experiment}", f"dataset.root={tmp_path}", f"teacher.checkpoint={tmp_path}/teacher.pth")
    validate(cfg)
    assert cfg.dataset.name == "imagefolder" and cfg.dataset.image_size == 224 and cfg.dataset.augment is True
    assert cfg.epochs == 100 and cfg.batch_size == 256 and cfg.lr == 0.1
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.nesterov is False
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.sched.name == "multistep" and list(cfg.sched.milestones) == [30, 60, 90] and cfg.sched.gamma == 0.1
    assert (cfg.T, cfg.alpha) == (1.0, 0.5)
    terms = OmegaConf.to_container(cfg.distill.terms, resolve=True)
    assert terms["kd"]["T"] == 1.0 and terms["kd"]["weight"] == 0.5 and terms["ce"]["weight"] == 0.5
    assert (cfg.teacher.name, cfg.student.name) == IMAGENET_PAIRS[experiment]
    assert cfg.teacher.checkpoint == f"{tmp_path}/teacher.pth"  # the command line names the teacher's weights
    for role in ("teacher", "student"):
        check_model_name(cfg[role].name, role)
    assert compose_with(f"experiment={experiment}", "lr=0.2", "batch_size=512").lr == 0.2  # the command line wins


@pytest.mark.parametrize("teacher", ["resnet34", "resnet50"])
def test_torchvisions_released_teacher_weights_fit_the_imagenet_teachers(teacher, tmp_path):
    """The experiment files point teacher.checkpoint at torchvision's weight files: a state dict in
    torchvision's layout loads into kdrun's (timm's) model of the same name, every tensor in place."""
    import torch
    import torchvision

    from kdrun.engine.checkpoint import load_model_weights
    from kdrun.models import create_model

    reference = torchvision.models.get_model(teacher, weights=None, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "teacher.pth")
    model = create_model(teacher, num_classes=1000, in_chans=3)
    load_model_weights(model, tmp_path / "teacher.pth", "teacher.checkpoint", teacher, 1000)
    loaded = model.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded[key], tensor), key


# --- typed groups: wrong keys and types are rejected when the config is composed --------------------------

README_COMMANDS = [
    ["teacher=resnet50", "student=mobilenetv3", "T=3"],
    ["student.name=convnext_atto"],  # what `student=convnext_atto` becomes (kdrun.cli.argv)
    ["teacher.name=resnet18", "teacher.pretrained=true"],
    ["dataset=imagefolder", "dataset.root=/data/imagenette", "teacher=resnet50", "student=resnet18"],
    ["dataset=cifar10", "dataset.download=true", "dataset.root=data"],
    ["paradigm=online", "paradigm.peers=3"],
    ["paradigm=online", "paradigm.peers=[resnet18,mobilenetv3]", "paradigm.T=1", "paradigm.kl_weight=1"],
    ["paradigm=self", "paradigm.generations=3", "paradigm.ensemble=true"],
    ["paradigm=multi_teacher", "teachers=[resnet50,efficientnet_b0]", "paradigm.weighting=confidence"],
    ["paradigm=multi_teacher", "teachers=[resnet50,resnet34]", "paradigm.weighting=fixed", "paradigm.weights=[0.7,0.3]"],
    ["paradigm=assistant", "teacher=resnet50", "assistant=resnet18", "student=mobilenetv3"],
    ["paradigm=assistant", "assistant.name=resnet10t", "assistant.epochs=2", "assistant.lr=0.01"],
    ["optim=sgd", "lr=0.05", "sched=multistep"],
    ["sched=constant", "sched.warmup_epochs=1"],
    ["+recipe=cifar100"],
    ["distill=dkd", "distill.terms.dkd.beta=2", "distill.terms.dkd.alpha=1", "T=1"],
    ["distill=cc", "+distill.terms.kd={type: kd, weight: 0.9, T: 4}"],
    ["distill.logit_standardize=true", "T=2"],
    ["distill=mlkd", "distill.terms.mlkd.temperatures=[1,2,4]", "distill.terms.mlkd.class_weight=0.5"],
    ["distill=fitnets", "+distill.student_layers=[stages.0]", "+distill.teacher_layers=[layer1]"],
    ["distill=crd", "distill.terms.kd.weight=1"],
    ["dataset=cifar10", "dataset.augment=false", "teacher.cache=true"],
    ["+dataset.num_workers=4"],
]


@pytest.mark.parametrize("overrides", README_COMMANDS, ids=" ".join)
def test_documented_commands_compose_and_validate(overrides):
    cfg = compose_with(*overrides)
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


@pytest.mark.parametrize(("overrides", "schema"), [
    (["dataset.augmnet=false"], "EmbeddedDataset"),
    (["dataset=cifar10", "dataset.image_size=32"], "TorchvisionDataset"),
    (["optim.momentum=0.9"], "AdamWConfig"),
    (["sched.milestones=[10]"], "SchedConfig"),
    (["paradigm=online", "paradigm.generations=2"], "OnlineParadigm"),
    (["distill=at", "distill.logit_standardize=true"], "DistillMethod"),
    (["distill.temperature=3"], "LogitStandardizedMethod"),
])
def test_a_key_the_groups_schema_lacks_is_rejected_at_compose_time(overrides, schema):
    from hydra.errors import ConfigCompositionException

    from kdrun.config.messages import compose_error_line

    with pytest.raises(ConfigCompositionException) as raised:
        compose_with(*overrides)
    assert f"not in '{schema}'" in str(raised.value.__cause__)
    key = overrides[-1].split("=")[0]
    line = compose_error_line(raised.value)
    assert line.startswith(f"unknown key {key} for ") and "accepted keys are" in line and "\n" not in line


@pytest.mark.parametrize("overrides", [
    ["dataset=cifar10", "dataset.augment=maybe"],
    ["dataset=synthetic", "dataset.image_size=big"],
    ["dataset.test_fraction=[0.2]"],
    ["optim=sgd", "optim.nesterov=sometimes"],
    ["sched=multistep", "sched.milestones=[a,b]"],
    ["paradigm=self", "paradigm.generations=2.5"],
    ["paradigm=self", "paradigm.ensemble=maybe"],
    ["paradigm=multi_teacher", "paradigm.weights=[heavy]"],
    ["distill.logit_standardize=maybe"],
    ["+distill.terms.extra=3"],
])
def test_a_wrong_type_is_rejected_at_compose_time(overrides):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_with(*overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    (["+dataset.augmnet=false"], "unknown key(s) dataset.augmnet for dataset mnist5k; accepted keys: name, "
                                 "num_workers, split_seed, test_fraction, val_split, val_split_seed"),
    (["+teacher.colour=red"], "unknown key(s) teacher.colour for teacher resnet50; accepted keys: cache"),
    (["paradigm=online", "++paradigm.peer=3"], "unknown key(s) paradigm.peer for paradigm online; accepted keys: "
                                               "T, kl_weight, name, peers; did you mean 'peers'?"),
    (["+optim.momentun=0.9"], "unknown key(s) optim.momentun for optim adamw"),
    (["dataset=synthetic", "++dataset.download=true"], "unknown key(s) dataset.download for dataset synthetic"),
])
def test_keys_added_past_the_schema_are_one_line_errors(overrides, message):
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError) as raised:
        validate(compose_with(*overrides))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_key_of_another_option_of_the_group_is_a_warning_for_sweeps():
    """kdrun -m paradigm=online,multi_teacher ++paradigm.weighting=confidence: one setting for every job."""
    from kdrun.config.paradigm_checks import unread_settings

    cfg = compose_with("paradigm=online", "++paradigm.weighting=confidence", "++optim.momentum=0.5")
    validate(cfg)
    notes = unread_settings(cfg)
    assert "paradigm.weighting is not a setting of paradigm=online and is ignored here" in notes
    assert "optim.momentum is not a setting of optim=adamw and is ignored here" in notes
    assert unread_settings(compose_with("paradigm=multi_teacher", "teachers=[a,b]",
                                        "++paradigm.weighting=confidence")) == []


def test_group_defaults_come_from_the_schemas():
    from kdrun.config.groups import SGDConfig, TorchvisionDataset, schema_defaults

    cfg = compose_with("dataset=cifar10", "optim=sgd")
    assert OmegaConf.to_container(cfg.dataset) == {"name": "cifar10", **schema_defaults(TorchvisionDataset)}
    assert OmegaConf.to_container(cfg.optim) == {"name": "sgd", **schema_defaults(SGDConfig)}
    assert cfg.dataset.root == "data" and cfg.dataset.download is False and cfg.optim.nesterov is True


def test_temperatures_keep_their_three_homes():
    cfg = compose_with("T=3", "paradigm=online", "paradigm.T=2")
    assert cfg.distill.terms.kd.T == 3.0 and cfg.paradigm.T == 2.0  # online's KL: its own T
    mlkd = compose_with("T=3", "distill=mlkd").distill.terms.mlkd
    assert list(mlkd.temperatures) == [2.0, 3.0, 4.0, 5.0, 6.0] and "T" not in mlkd


def test_typed_errors_end_as_one_line_on_the_command_line(tmp_path):
    """Compose-time errors answer before torch loads, as one line with exit code 2."""
    import subprocess
    import sys

    for args, expected in [(["dataset.augmnet=false"], "dataset.augmnet"),
                           (["paradigm=self", "paradigm.ensemble=maybe"], "paradigm.ensemble=maybe"),
                           (["+dataset.augmnet=false"], "unknown key(s) dataset.augmnet")]:
        proc = subprocess.run([sys.executable, "-m", "kdrun.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
