"""The registries are the single source of names: conf/ agrees with them, and adding a loss needs no list.

Before torch loads, the CLI checks names against the conf/ groups (Hydra composes from them); after, kdrun
reads the registries. These tests keep the two equal, in both directions.
"""
import typing
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from kdrun.config.groups import SCHEMAS
from kdrun.config.schema import KdrunConfig, register_configs, validate
from kdrun.data import DATASETS
from kdrun.distill import TERMS, StepContext, build_loss, check_terms
from kdrun.errors import KdrunError
from kdrun.models.factory import SOURCES
from kdrun.paths import MODEL_GROUPS, conf_dir, group_options, model_preset, preset_names

register_configs()


def compose_with(*overrides: str, config_dir: Path = None):
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


def method_terms(method: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "distill" / f"{method}.yaml"))["terms"]


# --- loss terms <-> conf/distill ----------------------------------------------------------------------

def test_every_method_file_names_only_registered_terms():
    for method in group_options("distill"):
        for name, spec in method_terms(method).items():
            assert spec.get("type", name) in TERMS, (method, name, spec.get("type"))


def test_every_registered_term_is_used_by_a_method_file():
    used = {spec.get("type", name) for method in group_options("distill") for name, spec in method_terms(method).items()}
    assert set(TERMS.names()) <= used, set(TERMS.names()) - used
    assert {"ce", "kd", "dkd", "dist", "mlkd", "fitnets", "at", "nst", "vid", "reviewkd", "rkd", "pkt", "cc", "sp",
            "crd"} <= set(TERMS.names())


@pytest.mark.parametrize("method", group_options("distill"))
def test_every_method_file_passes_the_term_check(method):
    cfg = compose_with(f"distill={method}")
    validate(cfg)             # the checks before torch loads
    check_terms(cfg.distill)  # and the one the pipeline runs: every option of every term is an argument of its class


def test_term_families_are_views_of_the_registry():
    from kdrun.distill.feature import FEATURE_TERMS
    from kdrun.distill.relation import RELATION_TERMS

    assert set(FEATURE_TERMS) == {name for name in TERMS if TERMS.info(name)["family"] == "feature"}
    assert set(RELATION_TERMS) == {"rkd", "pkt", "cc", "sp", "crd"}
    assert set(TERMS) == set(FEATURE_TERMS) | set(RELATION_TERMS) | {
        name for name in TERMS if TERMS.info(name)["family"] in ("response", "head")}


# --- datasets <-> conf/dataset ------------------------------------------------------------------------

def test_every_dataset_file_names_a_registered_dataset_and_back():
    for option in group_options("dataset"):
        assert OmegaConf.load(conf_dir() / "dataset" / f"{option}.yaml").name == option
    assert group_options("dataset") == DATASETS.names()


@pytest.mark.parametrize("dataset", group_options("dataset"))
def test_every_dataset_file_names_its_builders_schema(dataset):
    cfg = compose_with(f"dataset={dataset}")
    assert OmegaConf.get_type(cfg.dataset) is DATASETS.info(dataset)["schema"]


# --- paradigms <-> conf/paradigm ------------------------------------------------------------------------

def test_every_paradigm_file_names_a_paradigm_and_back():
    # Written against kdrun.paradigms.PARADIGMS once it is a registry (with .names()); until then against the
    # tuple the pre-torch checks use (kdrun.config.paradigm_checks.PARADIGMS).
    import kdrun.paradigms
    from kdrun.config import paradigm_checks

    registry = kdrun.paradigms.PARADIGMS
    names = registry.names() if hasattr(registry, "names") else list(paradigm_checks.PARADIGMS)
    assert sorted(names) == group_options("paradigm")
    for option in group_options("paradigm"):
        assert OmegaConf.load(conf_dir() / "paradigm" / f"{option}.yaml").name == option


# --- model sources and presets ------------------------------------------------------------------------------

def test_model_sources_are_registered_in_the_documented_order():
    assert sorted(SOURCES, key=lambda s: SOURCES.info(s)["priority"]) == ["timm", "torchvision", "cifar"]
    with pytest.raises(KdrunError, match="unknown model source 'tf' in 'tf:resnet18': choose one of cifar, timm"):
        from kdrun.models import check_model_name

        check_model_name("tf:resnet18")


def test_one_preset_set_serves_every_model_group():
    assert preset_names() == ["efficientnet_b0", "mobilenetv3", "mobilenetv3_small", "resnet18", "resnet34",
                              "resnet50"]
    for group in MODEL_GROUPS:
        assert group_options(group) == preset_names()
        assert not (conf_dir() / group).exists()
    assert model_preset("mobilenetv3") == {"name": "mobilenetv3_large_100"}
    assert model_preset("convnext_atto") is None and model_preset("../config") is None
    for name in preset_names():
        cfg = compose_with(f"teacher={name}", f"student={name}", f"assistant={name}")
        assert cfg.teacher.name == cfg.student.name == cfg.assistant.name == model_preset(name)["name"]


# --- the schemas in the ConfigStore ------------------------------------------------------------------------

@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_every_option_file_composes_to_its_groups_schema(group):
    base = typing.get_type_hints(KdrunConfig)[group]  # the top-level schema types the group by its base class
    for option in group_options(group):
        schema = OmegaConf.get_type(compose_with(f"{group}={option}")[group])
        assert schema in SCHEMAS[group].values() and issubclass(schema, base), (group, option, schema)


# --- adding a loss: one class and one YAML file ---------------------------------------------------------------

class ToyTerm(nn.Module):
    """A term defined outside kdrun: mean squared logit difference, times `scale`."""

    needs_teacher = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.scale * (ctx.student_logits - ctx.teacher_logits).pow(2).mean()


@pytest.fixture
def toy_term():
    TERMS.register("toy", family="response")(ToyTerm)
    yield ToyTerm
    del TERMS["toy"]


def test_a_registered_term_and_one_method_file_are_all_a_new_loss_needs(toy_term, tmp_path):
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "toy.yaml").write_text(
        "name: toy\nterms:\n  ce: {type: ce, weight: 1.0}\n  toy: {type: toy, weight: 0.5, scale: 3.0}\n")
    cfg = compose_with("distill=toy", "distill.terms.toy.scale=2.0", config_dir=tmp_path)
    validate(cfg)
    check_terms(cfg.distill)
    loss = build_loss(OmegaConf.to_container(cfg.distill, resolve=True))
    assert set(loss.terms) == {"ce", "toy"} and loss.needs_teacher and loss.terms["toy"].scale == 2.0
    student, teacher = torch.zeros(2, 3), torch.ones(2, 3)
    total, parts = loss(StepContext(student, torch.tensor([0, 1]), None, teacher_logits=teacher))
    assert parts["toy"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(parts["ce"].item() + 0.5 * 2.0)
    with pytest.raises(KdrunError) as raised:
        check_terms(compose_with("distill=toy", "+distill.terms.toy.scael=2", config_dir=tmp_path).distill)
    assert "distill.terms.toy.scael" in str(raised.value) and "scale" in str(raised.value)


# --- the term options check -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "pieces"), [
    (["+distill.terms.kd.Tt=3"], ["unknown option distill.terms.kd.Tt for loss term type 'kd'",
                                  "accepted keys are type, weight, T, logit_standardize", "did you mean 'T'?"]),
    (["distill=dkd", "+distill.terms.dkd.gama=2"], ["distill.terms.dkd.gama", "alpha, beta", "warmup_epochs"]),
    (["distill.terms.kd.type=kdd"], ["unknown loss term type 'kdd' in distill.terms.kd", "did you mean 'kd'?"]),
    (["distill.terms.kd.weight=heavy"], ["distill.terms.kd.weight='heavy' must be a number"]),
])
def test_bad_term_options_are_one_line_before_training(overrides, pieces):
    cfg = compose_with(*overrides)
    with pytest.raises(KdrunError) as raised:
        check_terms(cfg.distill)  # what kdrun.run.pipeline runs before any stage
    message = str(raised.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message, message
