"""Pictures: training curves from ``log.txt`` files, and detections drawn on images."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from util.logs import read_log

# (title, key in the log's JSON lines); the first that a log has is drawn.
CURVES = (
    ("total loss", ("train_loss", "test_loss")),
    ("class loss", ("train_loss_ce", "test_loss_ce")),
    ("L1 box loss", ("train_loss_bbox", "test_loss_bbox")),
    ("GIoU loss", ("train_loss_giou", "test_loss_giou")),
    ("class error (%)", ("train_class_error", "test_class_error")),
    ("COCO AP / AP50", ("test_coco_AP", "test_coco_AP50")),
)


def draw_logs(logs: Sequence[str | Path], names: Sequence[str] = ()) -> Figure:
    """A figure of loss terms, class error and COCO AP per epoch, one colour per run.

    Each panel shares its axes across runs; train curves are solid, validation curves dashed,
    AP50 dotted beside AP. ``names`` label the runs (default: each log's folder name).
    """
    names = list(names) or [Path(log).parent.name or str(log) for log in logs]
    if len(names) != len(logs):
        raise ValueError(f"got {len(names)} names for {len(logs)} logs; give one name per log")
    colors = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3, sharex=True)
    for i, (log, name) in enumerate(zip(logs, names, strict=True)):
        records = read_log(log)
        for ax, (title, (train_key, test_key)) in zip(axes.flat, CURVES, strict=True):
            for key, style in ((train_key, "-"), (test_key, "--" if "AP" not in title else ":")):
                points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    epochs, values = zip(*points, strict=True)
                    ax.plot(
                        epochs, values, style, color=colors[i % len(colors)], label=f"{name} {key}"
                    )
            ax.set_title(title)
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("epoch")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_logs(logs: Sequence[str | Path], out_png: str | Path, names: Sequence[str] = ()) -> None:
    """:func:`draw_logs` written to a PNG."""
    draw_logs(logs, names).savefig(out_png, dpi=80)


def draw_detections(
    image: Tensor, boxes: Tensor, class_ids: Tensor, scores: Tensor, names: dict[int, str]
) -> Tensor:
    """Boxes (absolute xyxy [n, 4]) with "name score" captions on a uint8 [3, H, W] image.

    ``names`` maps class ids to names (an unnamed id is shown as the number); each class id
    keeps one colour in every image.
    """
    if len(boxes) == 0:  # torchvision warns on an empty set of boxes
        return image
    palette = matplotlib.colormaps["tab10"].colors
    ids, captions, colors = class_ids.tolist(), [], []
    for class_id, score in zip(ids, scores.tolist(), strict=True):
        captions.append(f"{names.get(class_id, str(class_id))} {score:.2f}")
        colors.append(tuple(int(255 * c) for c in palette[class_id % len(palette)]))
    return draw_bounding_boxes(
        image, boxes.float().cpu(), labels=captions, colors=colors, width=2
    ).to(torch.uint8)
