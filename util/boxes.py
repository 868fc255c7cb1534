"""Box format conversions: the model and the targets use normalized (cx, cy, w, h); losses, IoU
and the post-processed output use (x0, y0, x1, y1). Heads that predict a box as an offset from
a reference add it in inverse-sigmoid space (:func:`inverse_sigmoid`)."""

import torch
from torch import Tensor
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1), in the same units."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h), in the same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) of x in [0, 1], both clamped at ``eps`` (1e-3: DAB-DETR's; Deformable
    DETR's is 1e-5)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))
