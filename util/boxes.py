"""Box format conversions: the model and the targets use normalized (cx, cy, w, h); losses, IoU
and the post-processed output use (x0, y0, x1, y1)."""

from torch import Tensor
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1), in the same units."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h), in the same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")
