"""Every preset of every config group composes, and the typed schema holds."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config import register_configs, validate
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
DATASET_PRESETS = {
    "mnist5k": {"name": "mnist5k", **EMBEDDED_SET},
    "digits": {"name": "digits", **EMBEDDED_SET},
    "cifar10": {"name": "cifar10", **TORCHVISION_SET},
    "cifar100": {"name": "cifar100", **TORCHVISION_SET},
    "mnist": {"name": "mnist", **TORCHVISION_SET},
    "fashion_mnist": {"name": "fashion_mnist", **TORCHVISION_SET},
    "imagefolder": {"name": "imagefolder", "root": None, "train_dir": "train", "val_dir": "val", "image_size": 224,
                    "augment": True, "in_chans": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                    "num_workers": 2},
    "synthetic": {"name": "synthetic", "num_classes": 10, "train_size": 256, "test_size": 64, "image_size": 32,
                  "in_chans": 3, "seed": 0},
}


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


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_cifar100_experiments_carry_the_papers_recipe(experiment):
    cfg = compose_with(f"experiment={experiment}", "T=2")
    assert cfg.dataset.name == "cifar100" and cfg.epochs == 240 and cfg.batch_size == 64
    assert cfg.optim.name == "sgd" and cfg.optim.weight_decay == 5e-4 and cfg.optim.momentum == 0.9
    assert cfg.sched.name == "multistep" and list(cfg.sched.milestones) == [150, 180, 210] and cfg.sched.gamma == 0.1
    small_student = any(k in cfg.student.name for k in ("mobilenet", "shufflenet"))
    assert cfg.lr == (0.01 if small_student else 0.05)
    assert cfg.T == 2.0  # command-line values still win over the recipe
    assert cfg.teacher.name.startswith("cifar:") and cfg.student.name.startswith("cifar:")
