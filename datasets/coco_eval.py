"""COCO box evaluation (AP and AR) with pycocotools or faster_coco_eval, gathered across processes.

faster_coco_eval (``pip install faster-coco-eval``) replaces pycocotools' Python per-image matching
and accumulation with C++; everything else, the ground truth and the result set included, stays
pycocotools' ``COCO``. The 12 stats agree with pycocotools' to within 1e-12, in practice to the
last bit or so: its precision is tp / (tp + fp) where pycocotools divides by tp + fp + eps, which
differs in the last bit when tp + fp is 1.
"""

import contextlib
import functools
import io
import logging
from collections.abc import Callable

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
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")


def cocoeval_backend(backend: str = "auto") -> tuple[str, Callable[..., COCOeval]]:
    """(name, COCOeval constructor) of ``backend``: "pycocotools", "faster_coco_eval", or "auto"
    (the latter when it imports, else the former). Both take (coco_gt, coco_dt, "bbox") with
    pycocotools ``COCO`` objects and print the summary table (faster_coco_eval's adds AR at IoU
    0.50 and 0.75).
    """
    if backend not in BACKENDS:
        raise ValueError(f"COCO evaluation backend {backend!r}: pass one of {', '.join(BACKENDS)}")
    if backend == "pycocotools":
        return backend, COCOeval
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError as error:
        if backend == "auto":
            return "pycocotools", COCOeval
        raise ImportError(
            "COCO evaluation backend faster_coco_eval is not installed: pip install "
            "faster-coco-eval (or pip install -e '.[fast]'), or use the pycocotools backend"
        ) from error
    # Its default prints through its own logger; print() puts the table where pycocotools' goes.
    return "faster_coco_eval", functools.partial(COCOeval_faster, print_function=print)


def run_cocoeval(
    cocoeval: Callable[..., COCOeval], coco_gt: COCO, coco_dt: COCO, image_ids: list[int]
) -> tuple[list[float], str]:
    """(the 12 stats of STAT_NAMES, the printed table) of ``cocoeval`` (a class from
    ``cocoeval_backend``) scoring the boxes of ``coco_dt`` against ``coco_gt`` on ``image_ids``:
    evaluate, accumulate and summarize."""
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval = cocoeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(value) for value in coco_eval.stats], table.getvalue()


class CocoEvaluator:
    """Collects detections per image and scores them against `coco_gt` with COCOeval("bbox").

    Only the images passed to `update` are evaluated (all of `coco_gt`'s images if none were).
    Passing the same image again, here or in another process, replaces its detections, so the
    duplicates a DistributedSampler adds to even out ranks count once.

    With `nms_iou`, class-wise non-maximum suppression at that IoU is applied to each image's
    detections before scoring. Set predictions need none; this measures that claim.

    ``backend``: "pycocotools", "faster_coco_eval" (the same numbers, faster; an ImportError if
    it is not installed) or "auto" (faster_coco_eval when installed); ``self.backend`` is the one
    used.
    """

    def __init__(self, coco_gt: COCO, nms_iou: float | None = None, backend: str = "auto") -> None:
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        self.coco_gt = coco_gt
        self.nms_iou = nms_iou
        self.backend, self._cocoeval = cocoeval_backend(backend)
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
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self._detections_as_coco()
        stats, table = run_cocoeval(self._cocoeval, self.coco_gt, coco_dt, image_ids)
        logger.info(
            "COCO box evaluation on %d images (%s)\n%s", len(image_ids), self.backend, table
        )
        return dict(zip(STAT_NAMES, stats, strict=True))

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
