"""Tf-KD_reg (Yuan et al. CVPR 2020) against a reference formula written from the paper (float64, plain Python)."""
import math

import pytest
import torch
import yaml

from kdrun.distill import StepContext, build_loss
from kdrun.distill.tfkd import TfKDRegTerm
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

STUDENT = [[2.0, 1.0, 0.1, -1.0, 0.3], [0.5, 0.5, 2.5, 0.0, -0.7], [-1.0, 3.0, 0.0, 1.0, 0.2]]
TARGETS = [0, 2, 3]


def context(student=STUDENT, grad=False):
    s = torch.tensor(student, dtype=torch.float64, requires_grad=grad)
    return StepContext(s, torch.tensor(TARGETS), torch.arange(len(student)))


def tfkd_reference(student, targets, a, T):
    """T^2 * mean over samples of KL(p^d_T || softmax(s / T)); p^d_T(k) proportional to p^d(k)^(1/T)."""
    total = 0.0
    for row, label in zip(student, targets):
        K = len(row)
        virtual = [a if k == label else (1 - a) / (K - 1) for k in range(K)]
        powered = [p ** (1 / T) for p in virtual]
        teacher = [p / sum(powered) for p in powered]
        exps = [math.exp(v / T) for v in row]
        student_p = [e / sum(exps) for e in exps]
        total += sum(t * math.log(t / s) for t, s in zip(teacher, student_p))
    return T * T * total / len(student)


@pytest.mark.parametrize("a,T", [(0.99, 20.0), (0.9, 1.0), (0.95, 6.0)])
def test_tfkd_reg_matches_the_papers_loss(a, T):
    got = TfKDRegTerm(a=a, T=T)(context()).item()
    assert got == pytest.approx(tfkd_reference(STUDENT, TARGETS, a, T), rel=1e-12)


def test_tfkd_reg_is_zero_when_the_student_outputs_the_virtual_teacher():
    """At T=1 a student whose logits are log p^d matches the virtual teacher: loss and gradient vanish."""
    a, K = 0.9, 5
    logits = [[math.log(a if k == label else (1 - a) / (K - 1)) for k in range(K)] for label in TARGETS]
    ctx = context(logits, grad=True)
    loss = TfKDRegTerm(a=a, T=1.0)(ctx)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert ctx.student_logits.grad.abs().max().item() < 1e-12


def test_the_tfkd_method_needs_no_teacher_and_weighs_ce_and_the_term():
    """conf/distill/tfkd.yaml as shipped: CE 0.9 + 0.1 Tf-KD_reg (a 0.99, T 20), and no teacher to run."""
    from kdrun.distill.response import CrossEntropyTerm

    method = yaml.safe_load((conf_dir() / "distill" / "tfkd.yaml").read_text())
    loss = build_loss(method)
    assert not loss.needs_teacher
    ctx = context()
    ce = CrossEntropyTerm()(ctx).item()
    total, values = loss(ctx)
    assert set(values) == {"ce", "tfkd_reg"}
    assert total.item() == pytest.approx(0.9 * ce + 0.1 * tfkd_reference(STUDENT, TARGETS, 0.99, 20.0), rel=1e-12)


@pytest.mark.parametrize("options,message", [({"a": 1.0}, "tfkd_reg.a=1.0 must be between 0 and 1"),
                                             ({"T": 0.0}, "tfkd_reg.T=0.0 must be > 0")])
def test_tfkd_reg_refuses_bad_values(options, message):
    with pytest.raises(KdrunError, match=message):
        TfKDRegTerm(**options)
