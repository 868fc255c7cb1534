"""Pictures: training curves from ``log.txt`` files, and detections drawn on images."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
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
    keeps one colour in every image. Captions sit on a patch of their box's colour where they
    overlap no other caption (:func:`place_captions`), so that they stay readable when boxes
    overlap.
    """
    if len(boxes) == 0:  # torchvision warns on an empty set of boxes
        return image
    palette = matplotlib.colormaps["tab10"].colors
    ids, captions, colors = class_ids.tolist(), [], []
    for class_id, score in zip(ids, scores.tolist(), strict=True):
        captions.append(f"{names.get(class_id, str(class_id))} {score:.2f}")
        colors.append(tuple(int(255 * c) for c in palette[class_id % len(palette)]))
    drawn = draw_bounding_boxes(image, boxes.float().cpu(), colors=colors, width=2)
    picture = Image.fromarray(drawn.permute(1, 2, 0).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    sizes = []
    for caption in captions:
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        sizes.append((right - left + 2 * CAPTION_MARGIN, bottom - top + 2 * CAPTION_MARGIN))
    order = scores.argsort(descending=True).tolist()  # the surest boxes choose first
    places = place_captions(boxes.float().cpu()[order].tolist(), [sizes[i] for i in order],
                            picture.size)  # fmt: skip
    for i, (x, y) in zip(order, places, strict=True):
        width, height = sizes[i]
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill=colors[i])
        text = (255, 255, 255) if sum(colors[i]) < 384 else (0, 0, 0)
        left, top, _, _ = draw.textbbox((0, 0), captions[i], font=font)
        draw.text((x + CAPTION_MARGIN - left, y + CAPTION_MARGIN - top), captions[i], fill=text,
                  font=font)  # fmt: skip
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


# Pixels between a caption's text and the edge of its patch.
CAPTION_MARGIN = 1


def place_captions(
    boxes: Sequence[Sequence[float]],
    sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
) -> list[tuple[int, int]]:
    """The top-left corner of each box's caption patch (``sizes``: width, height in pixels),
    in the order given (the first chooses first), for boxes xyxy in an image of ``image_size``
    (width, height).

    A caption takes the first place, among just above its box's top-left corner, inside it
    there, just below its bottom-left corner and inside it there, that lies in the image and
    overlaps no caption placed before it; where none does, the first such place in the image
    moved down (then up) until it overlaps none, or the box's top-left corner when the image
    has no room left.
    """
    width, height = image_size
    placed: list[tuple[int, int, int, int]] = []
    places = []
    for (x0, y0, _, y1), (w, h) in zip(boxes, sizes, strict=True):
        x = int(min(max(x0, 0), max(width - w, 0)))
        candidates = [(x, int(y0) - h), (x, int(y0)), (x, int(y1)), (x, int(y1) - h)]
        inside = [(cx, cy) for cx, cy in candidates if 0 <= cy <= height - h]
        free = [c for c in inside if not _overlaps((*c, w, h), placed)]
        if free:
            place = free[0]
        else:
            start = inside[0] if inside else (x, int(min(max(y0, 0), max(height - h, 0))))
            shifted = [(start[0], y) for y in range(start[1], height - h + 1)]
            shifted += [(start[0], y) for y in range(start[1] - 1, -1, -1)]
            place = next((c for c in shifted if not _overlaps((*c, w, h), placed)), start)
        placed.append((*place, w, h))
        places.append(place)
    return places


def _overlaps(rect: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = rect
    return any(
        x < ox + ow and ox < x + w and y < oy + oh and oy < y + h for ox, oy, ow, oh in others
    )
