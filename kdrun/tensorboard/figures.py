"""Figures for TensorBoard: soft targets of a few images, and reliability diagrams.

matplotlib is imported inside the functions (and only when figures are on): a run with
`tb_figures=0` never loads it. Figures are drawn with matplotlib's object API on an Agg canvas,
never through pyplot, so no GUI backend or global figure state is involved.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

TOP_CLASSES = 10     # bars per soft-target panel
LABEL_CHARS = 3      # class names are cut to this many characters under the bars (upright, 10 pt)
# Sized for TensorBoard's image cards: ~110 dpi, 10-11 pt text, little blank margin (constrained layout).
DPI = 110
FONT = 10
TITLE_FONT = 11


def figure_to_array(figure) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels of a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def displayable(image: torch.Tensor, mean, std) -> np.ndarray:
    """A normalized (C, H, W) image back on the 0..1 scale, as (H, W) or (H, W, 3) for imshow."""
    channels = image.shape[0]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = (image.float().cpu() * std_t + mean_t).clamp(0, 1)
    if channels == 1:
        return pixels[0].numpy()
    return pixels[:3].permute(1, 2, 0).numpy() if channels >= 3 else pixels[0].numpy()


class SoftTargetFigure:
    """One image, then three bar panels over the teacher's top classes: the teacher at T=1, its soft
    targets at T, and the student's probabilities at T. The true class's bars are orange; the title says
    the run's T and alpha (`alpha`, when given), so image cards of different jobs tell themselves apart.

    Drawn in full once; each epoch only the student's bars and title are drawn again over a saved
    copy of the rest (matplotlib's blitting), which costs milliseconds instead of a whole figure.
    """

    def __init__(self, image: np.ndarray, label: int, class_names: list[str], teacher_t1: torch.Tensor,
                 teacher_soft: torch.Tensor, T: float, alpha: Optional[float] = None):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        k = min(TOP_CLASSES, teacher_t1.numel())
        self.classes = teacher_t1.topk(k).indices.tolist()
        self.T = T
        names = [class_names[c][:LABEL_CHARS] for c in self.classes]
        colors = ["tab:orange" if c == label else "tab:blue" for c in self.classes]
        # About a TensorBoard card wide (~500 px): the image, then the three panels stacked, sharing one
        # row of class names, so that each bar gets ~35 px and each name stays upright.
        figure = Figure(figsize=(4.6, 4.3), dpi=DPI, layout="constrained")
        figure.suptitle(run_title(T, alpha), fontsize=TITLE_FONT)
        self.canvas = FigureCanvasAgg(figure)
        grid = figure.add_gridspec(3, 2, width_ratios=[1, 3.3])
        image_axes = figure.add_subplot(grid[0, 0])
        image_axes.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        image_axes.set_title(f"label: {class_names[label][:LABEL_CHARS * 2]}", fontsize=FONT)
        image_axes.axis("off")
        key = image_axes.text(0.5, -0.08, "orange:\nthe true class", transform=image_axes.transAxes, ha="center",
                              va="top", fontsize=FONT - 1, color="tab:orange")
        key.set_in_layout(False)  # in the empty cell under the image, not a reason to space the rows apart
        axes = [image_axes]
        panels = [(teacher_t1, "teacher, T=1"), (teacher_soft, f"soft targets, T={T:g}"),
                  (torch.zeros_like(teacher_t1), self._student_title(100))]  # room for 3 digits
        for row, (probs, title) in enumerate(panels):
            ax = figure.add_subplot(grid[row, 1], sharex=axes[1] if row else None)
            axes.append(ax)
            self.bars = ax.bar(range(k), probs[self.classes].tolist(), color=colors)
            ax.set_ylim(0, 1)
            ax.set_title(title, fontsize=FONT)
            ax.set_yticks([0, 0.5, 1])
            ax.tick_params(labelsize=FONT - 1, labelbottom=row == len(panels) - 1)  # names once, under the last
        axes[3].set_xticks(range(k), names, fontsize=FONT)
        self.student_axes = axes[3]
        self.canvas.draw()                 # the constrained layout, with room for the student's title ...
        figure.set_layout_engine("none")   # ... then frozen: later epochs redraw only bars and title
        for artist in (*self.bars, self.student_axes.title):
            artist.set_animated(True)  # left out of the full drawing, drawn each epoch
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(figure.bbox)

    def _student_title(self, epoch: int) -> str:
        return f"student, T={self.T:g} (epoch {epoch})"

    def render(self, student_soft: torch.Tensor, epoch: int) -> np.ndarray:
        """RGB pixels (H, W, 3) with the student's probabilities of this epoch."""
        self.canvas.restore_region(self.background)
        for bar, value in zip(self.bars, student_soft[self.classes].tolist()):
            bar.set_height(value)
            self.student_axes.draw_artist(bar)
        self.student_axes.title.set_text(self._student_title(epoch))
        self.student_axes.draw_artist(self.student_axes.title)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and sample count.

    Bins as torchmetrics' calibration error cuts them ([b_i, b_i+1), confidence 1.0 in the last), so
    sum(count * |accuracy - confidence|) / N equals the ECE reported in metrics.json.
    """
    probs = logits.float().softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    boundaries = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"confidence": (conf_sum / safe).numpy(), "accuracy": (acc_sum / safe).numpy(),
            "count": count.numpy().astype(int), "edges": boundaries.numpy()}


def run_title(T: float, alpha: Optional[float]) -> str:
    return f"T={T:g}" if alpha is None else f"T={T:g}, alpha={alpha:g}"


def reliability_figure(models: dict[str, tuple[torch.Tensor, torch.Tensor]], n_bins: int, title: str = ""):
    """One column per model (name -> (logits, labels)): accuracy per confidence bin against the diagonal,
    and under it the number of test images in each bin (empty bins say nothing about calibration).
    Two columns are about a TensorBoard card wide (~560 px)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.55 * len(models) + 0.2, 4.0), dpi=DPI, layout="constrained")
    if title:
        figure.suptitle(title, fontsize=TITLE_FONT)
    grid = figure.subplots(2, len(models), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for ax, counts_ax, (name, (logits, labels)) in zip(grid[0], grid[1], models.items()):
        bins = reliability_bins(logits, labels, n_bins)
        filled = bins["count"] > 0
        ece = float((bins["count"] * np.abs(bins["accuracy"] - bins["confidence"])).sum() / bins["count"].sum())
        width = 1.0 / n_bins
        left = bins["edges"][:-1][filled]
        ax.bar(left, bins["accuracy"][filled], width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy")
        accuracy, confidence = bins["accuracy"][filled], bins["confidence"][filled]
        ax.bar(left, abs(confidence - accuracy), bottom=np.minimum(accuracy, confidence), width=width,
               align="edge", color="none", edgecolor="tab:red", hatch="///", linewidth=0.5,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy", fontsize=FONT)
        ax.set_title(f"{name}: ECE {100 * ece:.2f}%", fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
        counts_ax.bar(bins["edges"][:-1], bins["count"], width=width, align="edge", color="grey")
        counts_ax.set_xlabel("confidence", fontsize=FONT)
        counts_ax.set_ylabel("images", fontsize=FONT)
        counts_ax.tick_params(labelsize=FONT - 1)
    handles, labels = grid[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=FONT - 1, frameon=False)
    return figure
