"""optim=dot (kdrun/engine/dot.py): DOT's update rule checked against the paper's formula (Zhao, Cui, Song & Liang,
"DOT: A Distillation-Oriented Trainer", ICCV 2023, Eq. 4-5) on a tiny float64 model over several steps; plain
SGD when no distillation term exists; one-line errors where it cannot train; one CLI run with a feature method."""
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from kdrun.config.schema import register_configs, validate
from kdrun.distill import DistillLoss, build_loss, hard_label_loss
from kdrun.distill.context import StepContext
from kdrun.engine.dot import DistillationOrientedSGD, backward_and_step
from kdrun.engine.optim import build_optimizer
from kdrun.engine.speed import Speed
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir

register_configs()
LR, MOMENTUM, DELTA, DECAY = 0.05, 0.9, 0.075, 5e-4


def batches(steps: int = 6):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (10,), generator=gen),
             3 * torch.randn(10, 4, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def kd_loss(ce_weight: float = 0.4, kd_weight: float = 0.6) -> DistillLoss:
    return build_loss({"terms": {"ce": {"type": "ce", "weight": ce_weight},
                                 "kd": {"type": "kd", "weight": kd_weight, "T": 4.0}}})


def paper_reference(model: nn.Module, data) -> list[torch.Tensor]:
    """DOT by the paper: v_ce <- (mu - delta) v_ce + (g_ce + wd w), v_kd <- (mu + delta) v_kd + g_kd,
    w <- w - lr (v_ce + v_kd); each v starts as its first gradient. Written with plain tensors."""
    weights = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    v_ce = v_kd = None
    for x, y, t in data:
        h = torch.tanh(x @ weights[0].T + weights[1])
        z = h @ weights[2].T + weights[3]
        ce = 0.4 * F.cross_entropy(z, y)
        p_t, log_p_s = F.softmax(t / 4, dim=1), F.log_softmax(z / 4, dim=1)
        kd = 0.6 * 16 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
        g_ce = torch.autograd.grad(ce, weights, retain_graph=True)
        g_kd = torch.autograd.grad(kd, weights)
        with torch.no_grad():
            d_ce = [g + DECAY * w for g, w in zip(g_ce, weights)]
            v_ce = d_ce if v_ce is None else [(MOMENTUM - DELTA) * v + d for v, d in zip(v_ce, d_ce)]
            v_kd = list(g_kd) if v_kd is None else [(MOMENTUM + DELTA) * v + g for v, g in zip(v_kd, g_kd)]
            for w, a, b in zip(weights, v_ce, v_kd):
                w -= LR * (a + b)
    return [w.detach() for w in weights]


def train(model: nn.Module, loss: DistillLoss, optimizer, data) -> None:
    for x, y, t in data:
        _, parts = loss(StepContext(model(x), y, torch.arange(len(y)), t))
        backward_and_step(loss, parts, optimizer, Speed())


def test_dot_matches_the_papers_update_over_several_steps():
    model, data = student(), batches()
    expected = paper_reference(model, data)
    loss = kd_loss()
    optimizer = build_optimizer(model.parameters(), {"name": "dot", "momentum": MOMENTUM, "delta": DELTA,
                                                     "weight_decay": DECAY}, LR)
    assert isinstance(optimizer, DistillationOrientedSGD)
    train(model, loss, optimizer, data)
    moved = max((w - p).abs().max().item() for w, p in zip(expected, student().parameters()))
    assert moved > 1e-2   # the steps did move the weights
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-14)
    # delta=0 is no longer DOT: both momenta equal, so the update is SGD on the summed loss (buffers add up)
    model, sgd_model = student(), student()
    train(model, loss, DistillationOrientedSGD(model.parameters(), LR, MOMENTUM, 0.0, DECAY), data)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for x, y, t in data:
        total, _ = loss(StepContext(sgd_model(x), y, torch.arange(len(y)), t))
        sgd.zero_grad()
        total.backward()
        sgd.step()
    for got, want in zip(model.parameters(), sgd_model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_a_stage_without_distillation_terms_trains_as_sgd_with_momentum():
    model, reference, data = student(), student(), batches(4)
    loss = hard_label_loss().double()
    train(model, loss, DistillationOrientedSGD(model.parameters(), LR, MOMENTUM, DELTA, DECAY), data)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for x, y, _ in data:
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_a_distillation_only_parameter_keeps_one_buffer_at_the_plain_momentum():
    """An adapter the task loss never reaches: v <- mu v + g (+ wd w from its second step, as the authors' code)."""
    adapter = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    optimizer = DistillationOrientedSGD([adapter], LR, MOMENTUM, DELTA, DECAY)
    w, v = adapter.detach().clone(), None
    for step in range(3):
        (adapter ** 2).sum().mul(step + 1).backward()
        optimizer.keep_distill_grads()
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        g = 2 * (step + 1) * w
        v = g if v is None else MOMENTUM * v + g + DECAY * w
        w = w - LR * v
        torch.testing.assert_close(adapter.detach(), w, rtol=0, atol=1e-15)


def test_dot_refuses_what_it_cannot_train_in_one_line():
    model, (x, y, t) = student(), batches(1)[0]
    no_task = kd_loss(ce_weight=0.0)   # kd with alpha=1: the ce term is dropped
    _, parts = no_task(StepContext(model(x), y, torch.arange(10), t))
    with pytest.raises(KdrunError, match=r"optim=dot needs a cross-entropy \(task\) term .* \(terms: kd\): give it"):
        backward_and_step(no_task, parts, DistillationOrientedSGD(model.parameters(), LR), Speed())
    loss = kd_loss()
    _, parts = loss(StepContext(model(x), y, torch.arange(10), t))
    with pytest.raises(KdrunError, match="fp16 gradient scaler .* use precision=bf16"):
        backward_and_step(loss, parts, DistillationOrientedSGD(model.parameters(), LR), Speed(scaler=object()))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["optim=dot", "optim.delta=0.2"])
    with pytest.raises(KdrunError, match=r"optim.momentum=0.9 and optim.delta=0.2 must give") as raised:
        validate(cfg)
    assert "\n" not in str(raised.value)


def test_dot_trains_a_feature_method_through_the_cli(kdrun, read_metrics, tmp_path):
    """FitNets' adapter gets distillation gradients only (the teacher stage, with none, trains as SGD)."""
    proc = kdrun("distill=fitnets", "optim=dot", "lr=0.05", "teacher.name=cifar:resnet14", "student.name=cifar:resnet8",
                 "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=64", "dataset.test_size=32",
                 "epochs=1", "batch_size=32", "baseline=false", "progress=false", "tb_figures=0", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(tmp_path / "run")["status"] == "completed"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["state"]
    kinds = [frozenset(entry) for entry in state.values()]
    assert frozenset({"task_momentum", "distill_momentum"}) in kinds   # student weights: both losses
    assert frozenset({"distill_momentum"}) in kinds                    # the adapter: distillation alone
