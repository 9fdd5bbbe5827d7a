"""MLKD's strong view: the batched augmentations, and the trainer's forward pass that feeds both views."""
import pytest
import torch
from torch import nn

from kdrun.data.strong_view import StrongView, color_jitter, random_grayscale, random_resized_crop
from kdrun.distill import build_loss
from kdrun.engine.forward import StepForward
from kdrun.errors import KdrunError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_whole_image_crop_is_the_image_and_a_smaller_crop_magnifies():
    torch.manual_seed(0)
    pixels = torch.rand(5, 3, 12, 16)
    assert torch.equal(random_resized_crop(pixels, scale=(1.0, 1.0), ratio=(16 / 12, 16 / 12)), pixels)
    # A vertical ramp cropped to at most a quarter of the area spans a smaller range of values.
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(4, 3, 12, 16).contiguous()
    cropped = random_resized_crop(ramp, scale=(0.1, 0.25), ratio=(1.0, 1.0))
    spans = cropped.amax(dim=(1, 2, 3)) - cropped.amin(dim=(1, 2, 3))
    assert cropped.shape == ramp.shape and (spans < 0.75).all()
    assert (cropped[:, :, :, 1:] >= cropped[:, :, :, :-1] - 1e-6).all()  # still a left-to-right ramp


def test_grayscale_and_jitter_probabilities():
    torch.manual_seed(0)
    pixels = torch.rand(6, 3, 8, 8)
    gray = random_grayscale(pixels, probability=1.0)
    expected = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    for channel in range(3):
        assert torch.allclose(gray[:, channel], expected, atol=1e-6)
    assert torch.equal(random_grayscale(pixels, probability=0.0), pixels)
    assert torch.equal(random_grayscale(pixels[:, :1], probability=1.0), pixels[:, :1])  # already gray
    assert torch.equal(color_jitter(pixels, probability=0.0), pixels)
    jittered = color_jitter(pixels, strength=0.4, probability=1.0)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, pixels)


def test_strong_view_keeps_shape_and_pixel_range_and_follows_the_seed():
    view = StrongView(MEAN, STD)
    torch.manual_seed(1)
    pixels = torch.rand(8, 3, 16, 16)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    torch.manual_seed(2)
    strong = view(images)
    torch.manual_seed(2)
    again = view(images)
    assert strong.shape == images.shape and torch.equal(strong, again)
    back = strong * std + mean
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5  # normalized from valid pixels
    assert not torch.allclose(strong, images)


class CountingTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)
        self.seen = []

    def forward(self, images):
        self.seen.append(images)
        return self.linear(images.flatten(1))


def test_step_forward_feeds_both_models_the_strong_view_and_trains_the_student_on_it():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    teacher = CountingTeacher().requires_grad_(False)
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    forward = StepForward(student, teacher, strong_view=StrongView(MEAN, STD))
    torch.manual_seed(3)
    ctx = forward(images, labels, torch.arange(6), 0)
    torch.manual_seed(3)
    strong = StrongView(MEAN, STD)(images)
    assert len(teacher.seen) == 2 and torch.equal(teacher.seen[0], images) and torch.equal(teacher.seen[1], strong)
    assert torch.allclose(ctx.teacher_logits_strong, teacher.linear(strong.flatten(1)))
    assert torch.allclose(ctx.student_logits_strong, student(strong))
    loss = build_loss({"terms": {"ce": {"type": "ce"}, "mlkd": {"type": "mlkd", "augment": True}}})
    total, _ = loss(ctx)
    total.backward()
    assert student[1].weight.grad.abs().sum() > 0 and teacher.linear.weight.grad is None


def test_strong_view_refuses_the_teacher_output_cache():
    student, teacher = nn.Linear(4, 2), nn.Linear(4, 2)
    with pytest.raises(KdrunError, match="augment=false"):
        StepForward(student, teacher, teacher_outputs=object(), strong_view=StrongView(MEAN, STD))
