"""Metrics on small hand-made predictions with known answers."""
import math

import pytest
import torch
from torch import nn

from kdrun.evaluation.cost import count_flops, count_parameters, measure_speed
from kdrun.evaluation.metrics import classification_metrics, fidelity_metrics


def test_accuracy_top5_and_nll_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))
    labels = torch.tensor([0, 2, 1, 2])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(2 / 4)          # samples 0 and 3 right
    assert m["top5"] == pytest.approx(1.0)            # 3 classes: top-k is every class
    expected_nll = -(math.log(0.7) + math.log(0.3) + math.log(0.3) + math.log(0.6)) / 4
    assert m["nll"] == pytest.approx(expected_nll, rel=1e-5)


def test_ece_by_hand():
    # Confidences 0.9, 0.9 (one right, one wrong) fall in bin (0.867, 0.933]; 0.6 (right) in (0.533, 0.6].
    # ECE = 2/3 * |0.5 - 0.9| + 1/3 * |1.0 - 0.6| = 0.26667 + 0.13333 = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    assert classification_metrics(probs.log(), labels)["ece"] == pytest.approx(0.4, abs=1e-5)


def test_identical_models_agree_fully_with_zero_kl():
    logits = torch.randn(16, 7)
    m = fidelity_metrics(logits, logits.clone(), T=4.0)
    assert m["agreement"] == 1.0 and m["kl_t1"] == pytest.approx(0.0, abs=1e-6)
    flipped = fidelity_metrics(-logits, logits, T=4.0)
    assert flipped["agreement"] == 0.0 and flipped["kl_t1"] > 0


def test_kl_at_t1_and_at_t_by_hand():
    # Sample 0: teacher (0.8, 0.2), student (0.4, 0.6): they disagree. Sample 1: identical, KL 0, agree.
    teacher = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    student = torch.log(torch.tensor([[0.4, 0.6], [0.3, 0.7]]))
    m = fidelity_metrics(student, teacher, T=2.0)
    assert m["agreement"] == pytest.approx(0.5)
    assert m["kl_t1"] == pytest.approx((0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)) / 2, rel=1e-5)
    # At T=2, softmax(log p / 2) is proportional to sqrt(p); no T^2 factor in the metric.
    t2 = [math.sqrt(0.8) / (math.sqrt(0.8) + math.sqrt(0.2)), math.sqrt(0.2) / (math.sqrt(0.8) + math.sqrt(0.2))]
    s2 = [math.sqrt(0.4) / (math.sqrt(0.4) + math.sqrt(0.6)), math.sqrt(0.6) / (math.sqrt(0.4) + math.sqrt(0.6))]
    assert m["kl_T"] == pytest.approx(sum(t * math.log(t / s) for t, s in zip(t2, s2)) / 2, rel=1e-5)


def test_flops_of_linear_and_conv_layers_follow_the_formula():
    linear = nn.Linear(20, 10)
    assert count_flops(linear, (20,), torch.device("cpu")) == 2 * 20 * 10
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # 2 * (C_in * k * k) * C_out * H_out * W_out
    assert count_flops(conv, (3, 16, 16), torch.device("cpu")) == 2 * 3 * 3 * 3 * 8 * 16 * 16
    assert count_parameters(conv) == 3 * 3 * 3 * 8 + 8


def test_speed_is_measured_and_bigger_models_are_slower():
    small, big = nn.Linear(64, 10), nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
    fast = measure_speed(small, (64,), 32, torch.device("cpu"))
    slow = measure_speed(big, (512,), 32, torch.device("cpu"))
    assert fast["latency_ms"] > 0 and fast["throughput"] > slow["throughput"]
