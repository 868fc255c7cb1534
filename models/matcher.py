"""Hungarian matching between DETR's predictions and the ground-truth objects of each image."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from models.classification import ClassHead, SoftmaxClassification
from util.boxes import cxcywh_to_xyxy


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets that minimizes the matching cost.

    cost = cost_class * class cost + cost_bbox * L1(cxcywh boxes) + cost_giou * (-GIoU), the
    class cost that of ``class_head`` (DETR's softmax: minus the probability of the target class).
    The cost is computed for the whole batch at once; the assignment is solved per image with
    ``scipy.optimize.linear_sum_assignment``. Queries left unmatched are "no object".
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_head: ClassHead | None = None,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0; set at least one of the three")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_head = class_head or SoftmaxClassification()

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match the predictions of each image to its targets.

        Args:
            outputs: "pred_logits" [B, Q, C] class logits (C = K + 1 for DETR's softmax head, the
                last column no-object),
                "pred_boxes" [B, Q, 4] normalized (cx, cy, w, h).
            targets: B dicts with "labels" [n_i] int64 in [0, K) and "boxes" [n_i, 4] normalized
                (cx, cy, w, h); n_i may be 0. An optional "image_id" names the image in errors.

        Returns:
            B pairs (query_indices, target_indices), int64 tensors on the CPU of length
            min(Q, n_i): query ``query_indices[j]`` is matched to target ``target_indices[j]``.
        """
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries = logits.shape[:2]
        _check_predictions(logits, pred_boxes)
        _check_targets(targets, num_classes=self.class_head.num_classes(logits.shape[-1]))
        boxes = pred_boxes.flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()

        cost = (
            self.cost_class * self.class_head.matching_cost(logits.flatten(0, 1), tgt_ids)
            + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            + self.cost_giou
            * -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices
        ]


def _check_predictions(logits: Tensor, boxes: Tensor) -> None:
    if not torch.isfinite(logits).all() or not torch.isfinite(boxes).all():
        raise ValueError(
            "HungarianMatcher: the predictions contain NaN or inf; training has diverged. "
            "Lower the learning rate, keep gradient clipping on (--clip_max_norm) or resume "
            "from an earlier checkpoint."
        )
    if (boxes[..., 2:] < 0).any():
        raise ValueError(
            "HungarianMatcher: predicted boxes have negative width or height; pred_boxes must be "
            "normalized (cx, cy, w, h), e.g. the sigmoid output of the box head."
        )


def _check_targets(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    """One check over the whole batch; the loop that names the image runs only on failure."""
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    bad_labels = (labels < 0) | (labels >= num_classes)
    bad_boxes = ~torch.isfinite(boxes).all(-1) | (boxes[:, 2:] <= 0).any(-1)
    if not (bad_labels | bad_boxes).any():
        return
    for i, target in enumerate(targets):
        where = f"image_id {int(target['image_id'])}" if "image_id" in target else f"image {i}"
        labels, boxes = target["labels"], target["boxes"]
        if ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(
                f"{where}: target labels {labels.tolist()} outside [0, {num_classes}); "
                "num_classes must be the largest category id + 1"
            )
        if not torch.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
            raise ValueError(
                f"{where}: target boxes must be finite normalized (cx, cy, w, h) with positive "
                f"width and height, got {boxes.tolist()}; drop degenerate boxes in the dataset"
            )
