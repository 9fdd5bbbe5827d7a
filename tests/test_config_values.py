"""The numbers a run hands to torch, checked from the config alone (kdrun/config/values.py): every float finite,
loss weights >= 0, temperatures > 0, the optimizer's, schedule's and loader's values; and Hydra's options of its
own groups (`hydra/launcher=nope`) named in one line."""
import pytest
from hydra import compose, initialize_config_dir

from kdrun.config.schema import register_configs, validate
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(KdrunError) as raised:
        validate(compose_with(*overrides))
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize(("overrides", "message"), [
    # a float anywhere, named as typed (not as the method file's ${T}), with the schema's default when there is one
    (["T=inf"], "T=inf is not a finite number: pass a finite value, e.g. T=4.0"),
    (["T=nan"], "T=nan is not a finite number"),
    (["alpha=-inf"], "alpha=-inf is not a finite number"),
    (["student.lr=inf"], "student.lr=inf is not a finite number: pass a finite value"),
    (["optim=sgd", "optim.momentum=nan"], "optim.momentum=nan is not a finite number: pass a finite value, e.g. "
                                          "optim.momentum=0.9"),
    (["optim.betas=[0.9,inf]"], "optim.betas[1]=inf is not a finite number"),
    (["sched=multistep", "sched.gamma=inf"], "sched.gamma=inf"),
    (["sched.warmup_epochs=inf"], "sched.warmup_epochs=inf"),
    (["teacher.cache_max_mb=inf"], "teacher.cache_max_mb=inf"),
    (["distill=dkd", "distill.terms.dkd.beta=inf"], "distill.terms.dkd.beta=inf"),
    (["distill=mlkd", "distill.terms.mlkd.temperatures=[2,nan]"], "distill.terms.mlkd.temperatures[1]=nan"),
    (["paradigm=online", "paradigm.kl_weight=inf"], "paradigm.kl_weight=inf"),
    (["paradigm=multi_teacher", "teachers=[a,b]", "paradigm.weighting=fixed", "paradigm.weights=[1,nan]"],
     "paradigm.weights[1]=nan"),
    (["dataset=imagefolder", "dataset.root=x", "dataset.mean=[0.5,nan,0.5]"], "dataset.mean[1]=nan"),
    (["+teacher.kwargs.drop_rate=inf"], "teacher.kwargs.drop_rate=inf"),
    # loss terms: weights >= 0, temperatures > 0
    (["distill.terms.ce.weight=-0.1"], "distill.terms.ce.weight=-0.1 is negative"),
    (["distill=rkd", "distill.terms.rkd.angle_weight=-1"], "distill.terms.rkd.angle_weight=-1 is negative"),
    (["distill=dist", "distill.terms.dist.gamma=-1"], "distill.terms.dist.gamma=-1 is negative"),
    (["distill=crd", "distill.terms.crd.nce_t=0"], "distill.terms.crd.nce_t=0 must be > 0"),
    (["distill=mlkd", "distill.terms.mlkd.temperatures=[2,-1]"], "must list numbers > 0"),
    (["distill=dkd", "distill.terms.dkd.warmup_epochs=-2"], "distill.terms.dkd.warmup_epochs=-2 must be >= 0"),
    (["+distill.terms.extra={type: kd, weight: -1}"], "distill.terms.extra.weight=-1 is negative"),
    # optimizer, schedule, loader
    (["optim=sgd", "optim.momentum=1"], "optim.momentum=1.0 must be within [0, 1)"),
    (["optim=sgd", "optim.momentum=0"], "optim.nesterov=true needs optim.momentum > 0"),
    (["optim.weight_decay=-0.01"], "optim.weight_decay=-0.01 must be >= 0"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers within [0, 1)"),
    (["sched=multistep", "sched.gamma=0"], "sched.gamma=0.0 must be > 0"),
    (["dataset=imagefolder", "dataset.root=x", "dataset.num_workers=-2"], "dataset.num_workers=-2 must be a whole"),
    (["+dataset.num_workers=true"], "dataset.num_workers=True must be a whole number >= 0"),
    (["seed=100000000000000"], "seed=100000000000000 must be < 100000000000000"),
])
def test_values_torch_would_refuse_or_misuse_are_one_line(overrides, message):
    assert message in refused(*overrides)


@pytest.mark.parametrize("overrides", [
    ["optim=sgd", "optim.momentum=0", "optim.nesterov=false", "optim.weight_decay=0"],
    ["distill.terms.kd.weight=0", "distill.terms.ce.weight=1"],   # a weight of 0 turns a term off
    ["sched=multistep", "sched.milestones=[0,2]", "sched.gamma=2"],
    ["sched.warmup_epochs=0.5"],
    ["+dataset.num_workers=0"],
    ["seed=99999999999999"],
    ["T=1e-3", "lr=1e-12"],
])
def test_values_at_the_edges_are_accepted(overrides):
    validate(compose_with(*overrides))


def test_unknown_option_of_a_hydra_group_is_one_line():
    from hydra.errors import MissingConfigException

    from kdrun.config.messages import compose_error_line

    with pytest.raises(MissingConfigException) as raised:
        compose_with("hydra/launcher=nope")
    line = compose_error_line(raised.value)
    assert line.startswith("unknown hydra/launcher 'nope': choose one of basic") and "(hydra/launcher=NAME)" in line
