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


def test_presets_named_in_the_issue_exist():
    for preset in ("resnet18", "resnet34", "resnet50", "mobilenetv3", "mobilenetv3_small", "efficientnet_b0"):
        assert preset in group_options("teacher") and preset in group_options("student")
    assert set(group_options("dataset")) >= {"mnist5k", "digits", "cifar10", "cifar100", "mnist", "fashion_mnist",
                                              "imagefolder", "synthetic"}


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
