"""COCO box evaluation (AP and AR) with pycocotools, gathered across processes."""

import contextlib
import io
import logging

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import batched_nms, box_convert

from util import dist as dist_util

logger = logging.getLogger(__name__)

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


class CocoEvaluator:
    """Collects detections per image and scores them against `coco_gt` with COCOeval("bbox").

    Only the images passed to `update` are evaluated (all of `coco_gt`'s images if none were).
    Passing the same image again, here or in another process, replaces its detections, so the
    duplicates a DistributedSampler adds to even out ranks count once.

    With `nms_iou`, class-wise non-maximum suppression at that IoU is applied to each image's
    detections before scoring. Set predictions need none; this measures that claim.
    """

    def __init__(self, coco_gt: COCO, nms_iou: float | None = None) -> None:
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        self.coco_gt = coco_gt
        self.nms_iou = nms_iou
        self.detections: dict[int, list[dict]] = {}

    def update(self, results: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add detections.

        results: image id -> {"scores" float [N], "labels" int [N] category ids, "boxes" float
            [N, 4] absolute (x0, y0, x1, y1) in the original image}. N may be 0.
        """
        for image_id, result in results.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground-truth annotations")
            if self.nms_iou is not None:
                result = class_wise_nms(result, self.nms_iou)
            boxes = box_convert(result["boxes"].detach().float().cpu(), "xyxy", "xywh")
            self.detections[image_id] = [
                {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
                for label, box, score in zip(
                    result["labels"].tolist(),
                    boxes.tolist(),
                    result["scores"].tolist(),
                    strict=True,
                )
            ]

    def synchronize(self) -> None:
        """Merge the detections of all processes (no-op unless torch.distributed is initialized)."""
        gathered = dist_util.all_gather(self.detections)
        self.detections = {k: v for part in gathered for k, v in part.items()}

    def summarize(self) -> dict[str, float]:
        """Run COCOeval; log its table and return {name: value} for STAT_NAMES.

        Values are in [0, 1]; pycocotools reports -1 where the evaluated images hold no ground
        truth of that kind (e.g. APs with no small objects).
        """
        image_ids = sorted(self.detections) or sorted(self.coco_gt.getImgIds())
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            coco_eval = COCOeval(self.coco_gt, self._detections_as_coco(), "bbox")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.info("COCO box evaluation on %d images\n%s", len(image_ids), table.getvalue())
        return {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats, strict=True)}

    def _detections_as_coco(self) -> COCO:
        detections = [d for image_id in sorted(self.detections) for d in self.detections[image_id]]
        if detections:
            return self.coco_gt.loadRes(detections)
        # loadRes cannot take an empty list; an empty result set has the ground truth's images.
        empty = COCO()
        empty.dataset = {
            "images": self.coco_gt.dataset["images"],
            "categories": self.coco_gt.dataset["categories"],
            "annotations": [],
        }
        empty.createIndex()
        return empty


def class_wise_nms(result: dict[str, torch.Tensor], iou: float) -> dict[str, torch.Tensor]:
    """The detections of one image that survive per-class NMS at `iou`, best score first.

    result: {"scores" [N], "labels" [N], "boxes" [N, 4] absolute xyxy}; returns the same keys.
    """
    keep = batched_nms(result["boxes"].float(), result["scores"].float(), result["labels"], iou)
    return {k: result[k][keep] for k in ("scores", "labels", "boxes")}
