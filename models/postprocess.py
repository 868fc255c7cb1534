"""DETR's outputs -> detections in the original images' pixels."""

import torch
from torch import Tensor, nn

from util.boxes import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """DETR's output -> per-image scores, labels and absolute (x0, y0, x1, y1) boxes."""

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: "pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4] normalized cxcywh;
        orig_sizes: [B, 2] (height, width) of the original images.

        Returns B dicts: "scores" [Q] (best class probability, no-object excluded),
        "labels" [Q] int64 category ids, "boxes" [Q, 4] absolute xyxy in the original image.
        """
        out = self.batched(outputs, orig_sizes)
        return [
            {"scores": s, "labels": lb, "boxes": b}
            for s, lb, b in zip(out["scores"], out["labels"], out["boxes"], strict=True)
        ]

    def batched(self, outputs: dict, orig_sizes: Tensor) -> dict[str, Tensor]:
        """:meth:`forward`'s detections as batch tensors: "scores" [B, Q], "labels" [B, Q],
        "boxes" [B, Q, 4] (the form a graph export with a dynamic batch size can return)."""
        # float32 even under autocast: bfloat16 would put boxes pixels off in a large image.
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"PostProcess: orig_sizes must be [B, 2] = [{logits.shape[0]}, 2] (height, width),"
                f" got {list(orig_sizes.shape)}"
            )
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        height, width = orig_sizes.float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        return {"scores": scores, "labels": labels, "boxes": cxcywh_to_xyxy(boxes) * scale}
