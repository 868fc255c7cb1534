"""Pictures: training curves from ``log.txt`` files, and detections drawn on images."""

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import draw_bounding_boxes  # noqa: E402

# (title, key in the log's JSON lines); the first that a log has is drawn.
CURVES = (
    ("total loss", ("train_loss", "test_loss")),
    ("class loss", ("train_loss_ce", "test_loss_ce")),
    ("L1 box loss", ("train_loss_bbox", "test_loss_bbox")),
    ("GIoU loss", ("train_loss_giou", "test_loss_giou")),
    ("class error (%)", ("train_class_error", "test_class_error")),
    ("COCO AP / AP50", ("test_coco_AP", "test_coco_AP50")),
)


def read_log(path: str | Path) -> list[dict]:
    """The JSON lines of a run's ``log.txt``; a torn last line (a killed run) is skipped."""
    records = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON log line ({err})") from err
    return records


def plot_logs(logs: Sequence[str | Path], out_png: str | Path, names: Sequence[str] = ()) -> None:
    """Draw loss terms, class error and COCO AP per epoch, one line style per run, to a PNG.

    Train curves are solid, validation curves dashed; AP50 is dotted beside AP.
    """
    names = list(names) or [Path(log).parent.name or str(log) for log in logs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for log, name, color in zip(logs, names, plt.cm.tab10.colors, strict=False):
        records = read_log(log)
        for ax, (title, (train_key, test_key)) in zip(axes.flat, CURVES, strict=True):
            for key, style in ((train_key, "-"), (test_key, "--" if "AP" not in title else ":")):
                points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    epochs, values = zip(*points, strict=True)
                    ax.plot(epochs, values, style, color=color, label=f"{name} {key}")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Sequence[str],
    scores: Tensor,
) -> Tensor:
    """Boxes (absolute xyxy) with "name score" captions on a uint8 [3, H, W] image."""
    captions = [f"{name} {score:.2f}" for name, score in zip(labels, scores.tolist(), strict=True)]
    return draw_bounding_boxes(
        image, boxes.float().cpu(), labels=captions, colors="red", width=2
    ).to(torch.uint8)
