"""CocoEvaluator against pycocotools run directly, and across two processes."""

import contextlib
import io
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.cocoeval import COCOeval

from datasets.coco import load_coco
from datasets.coco_eval import STAT_NAMES, CocoEvaluator
from datasets.shapes import ShapesSpec, ensure_shapes

SPEC = ShapesSpec(num_train=1, num_val=10, image_size=64, num_classes=3, max_objects=3, seed=1)


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", SPEC)
    return load_coco(root / "annotations" / "instances_val2017.json")


def _perfect_results(coco_gt) -> dict[int, dict[str, torch.Tensor]]:
    results = {}
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.imgToAnns[image_id]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        results[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "scores": torch.ones(len(anns)),
        }
    return results


def _noisy_results(coco_gt, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Ground truth moved by up to 3 px, random scores, a quarter of the labels wrong, plus one
    spurious box per image."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for image_id, perfect in _perfect_results(coco_gt).items():
        boxes = torch.cat([perfect["boxes"], torch.tensor([[5.0, 5.0, 15.0, 17.0]])])
        boxes += (torch.rand(boxes.shape, generator=generator) * 2 - 1) * 3
        labels = torch.cat([perfect["labels"], torch.tensor([1])])
        wrong = torch.rand(len(labels), generator=generator) < 0.25
        results[image_id] = {
            "boxes": boxes,
            "labels": torch.where(wrong, labels % SPEC.num_classes + 1, labels),
            "scores": torch.rand(len(labels), generator=generator),
        }
    return results


def _pycocotools_stats(coco_gt, results, restrict: bool = False) -> list[float]:
    """COCOeval on `results` as the pycocotools README runs it (optionally only on their images)."""
    detections = [
        {
            "image_id": i,
            "category_id": int(c),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(s),
        }
        for i, r in results.items()
        for (x0, y0, x1, y1), c, s in zip(
            r["boxes"].tolist(), r["labels"], r["scores"], strict=True
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        if restrict:
            coco_eval.params.imgIds = sorted(results)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats.tolist()


def test_ap_equals_pycocotools_on_the_same_predictions(coco_gt, caplog):
    results = _noisy_results(coco_gt, seed=0)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(results)
    with caplog.at_level(logging.INFO, logger="datasets.coco_eval"):
        stats = evaluator.summarize()
    assert list(stats) == list(STAT_NAMES)
    assert list(stats.values()) == pytest.approx(_pycocotools_stats(coco_gt, results))
    assert 0 < stats["AP"] < 1
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in caplog.text


def test_perfect_predictions_give_ap_one(coco_gt):
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(_perfect_results(coco_gt))
    stats = evaluator.summarize()
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)


def test_no_predictions_give_ap_zero(coco_gt):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({i: {**empty, "scores": torch.zeros(0)} for i in coco_gt.getImgIds()})
    assert evaluator.summarize()["AP"] == 0.0
    assert CocoEvaluator(coco_gt).summarize()["AP"] == 0.0


def test_only_updated_images_are_evaluated(coco_gt):
    results = _noisy_results(coco_gt, seed=1)
    first_half = dict(list(results.items())[: len(results) // 2])
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(first_half)
    stats = evaluator.summarize()
    assert list(stats.values()) == pytest.approx(
        _pycocotools_stats(coco_gt, first_half, restrict=True)
    )


def test_unknown_image_id_is_named(coco_gt):
    with pytest.raises(KeyError, match="image id 12345"):
        CocoEvaluator(coco_gt).update({12345: _perfect_results(coco_gt)[1]})


def _evaluate_on_rank(rank: int, store_file: str, out_file: str, coco_gt, results) -> None:
    store = dist.FileStore(store_file, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    image_ids = sorted(results)
    # Rank 1 also gets rank 0's last image, as a DistributedSampler pads uneven splits.
    mine = image_ids[: len(image_ids) // 2] if rank == 0 else image_ids[len(image_ids) // 2 - 1 :]
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({i: results[i] for i in mine})
    evaluator.synchronize()
    if rank == 0:
        torch.save(evaluator.summarize(), out_file)
    dist.destroy_process_group()


def test_synchronize_gathers_detections_from_all_processes(coco_gt, tmp_path):
    results = _noisy_results(coco_gt, seed=2)
    out_file = str(tmp_path / "stats.pt")
    args = (str(tmp_path / "store"), out_file, coco_gt, results)
    mp.start_processes(_evaluate_on_rank, args=args, nprocs=2, start_method="fork")
    stats = torch.load(out_file)
    assert list(stats.values()) == pytest.approx(_pycocotools_stats(coco_gt, results))
