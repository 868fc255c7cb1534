"""DETR's outputs -> detections in the original images' pixels."""

import torch
from torch import Tensor, nn

from models.classification import ClassHead, SoftmaxClassification
from util.boxes import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """DETR's output -> per-image scores, labels and absolute (x0, y0, x1, y1) boxes, the
    detections of the class-head convention ``class_head`` (default DETR's softmax: one per
    query, scored by its best real class; focal: the best (query, class) pairs)."""

    def __init__(self, class_head: ClassHead | None = None):
        super().__init__()
        self.class_head = class_head or SoftmaxClassification()

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: "pred_logits" [B, Q, C] (C = K + 1 with DETR's no-object), "pred_boxes"
        [B, Q, 4] normalized cxcywh; orig_sizes: [B, 2] (height, width) of the original images.

        Returns B dicts of N detections (DETR's softmax: N = Q, one per query; focal: the N
        best (query, class) pairs): "scores" [N] (class probability, no-object excluded),
        "labels" [N] int64 category ids, "boxes" [N, 4] absolute xyxy in the original image,
        "queries" [N] int64 the query each detection comes from.
        """
        out = self.batched(outputs, orig_sizes)
        keys = ("scores", "labels", "boxes", "queries")
        per_image = zip(*(out[k] for k in keys), strict=True)
        return [dict(zip(keys, one, strict=True)) for one in per_image]

    def batched(self, outputs: dict, orig_sizes: Tensor) -> dict[str, Tensor]:
        """:meth:`forward`'s detections as batch tensors: "scores", "labels", "queries" [B, N],
        "boxes" [B, N, 4] (the form a graph export with a dynamic batch size can return)."""
        # float32 even under autocast: bfloat16 would put boxes pixels off in a large image.
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"PostProcess: orig_sizes must be [B, 2] = [{logits.shape[0]}, 2] (height, width),"
                f" got {list(orig_sizes.shape)}"
            )
        scores, labels, boxes, queries = self.class_head.detections(logits, boxes)
        height, width = orig_sizes.float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = cxcywh_to_xyxy(boxes) * scale
        return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries}
