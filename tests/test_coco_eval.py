"""CocoEvaluator against pycocotools run directly, across two processes, and on the
faster_coco_eval backend."""

import contextlib
import io
import logging
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets
import options
import training
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


# ---------------------------------------------------------------- backends

SIDES = (4.0, 12.0, 32.0, 50.0, 96.0, 150.0, 300.0)  # 32 and 96: areas on the range bounds
CATEGORIES = (1, 3, 7)
EMPTY_IMAGES = (5, 11)


def _synthetic_coco() -> COCO:
    """12 images of 640 x 480, categories 1, 3 and 7: up to 6 boxes each, from 4 x 4 to
    300 x 300 (area exactly 32**2 and 96**2 included), a crowd box in every third image, and
    images 5 and 11 without any box."""
    g = torch.Generator().manual_seed(0)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"} for i in range(1, 13)]
    annotations = []
    for i in range(1, 13):
        count = 0 if i in EMPTY_IMAGES else int(torch.randint(1, 7, (), generator=g))
        for k in range(count):
            w, h = (SIDES[int(j)] for j in torch.randint(len(SIDES), (2,), generator=g))
            h = w if k == 0 else h  # squares of area 32**2 and 96**2 occur
            x, y = (torch.rand(2, generator=g) * torch.tensor([640 - w, 480 - h])).tolist()
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i,
                "category_id": CATEGORIES[int(torch.randint(3, (), generator=g))],
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": int(i % 3 == 0 and k == 0),
            })  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORIES],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _synthetic_results(coco: COCO, image_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per image: each box moved by up to 4 px, 3 boxes inside the first one (on a crowd box:
    ignored, not false), 4 boxes anywhere (150 in image 2: past maxDets 100), a fifth of all
    labels random, scores in tenths (ties); none in image 4."""
    g = torch.Generator().manual_seed(1)
    categories = torch.tensor(CATEGORIES)
    results = {}
    for i in image_ids:
        anns = coco.imgToAnns[i]
        xywh = torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        moved = xywh + (torch.rand(xywh.shape, generator=g) * 2 - 1) * 4
        inside = xywh[:1].repeat(3, 1) * torch.tensor([1, 1, 0.4, 0.4]) + torch.tensor([2, 2, 0, 0])
        anywhere = torch.rand(150 if i == 2 else 4, 4, generator=g) * torch.tensor(
            [500, 350, 140, 130]
        )
        xywh = torch.cat([moved, inside, anywhere])
        random_labels = categories[torch.randint(len(categories), (len(xywh),), generator=g)]
        labels = torch.cat(
            [labels, labels[:1].repeat(3), random_labels[len(labels) + len(inside) :]]
        )
        wrong = torch.rand(len(labels), generator=g) < 0.2
        keep = 0 if i == 4 else len(xywh)
        results[i] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)[:keep],
            "labels": torch.where(wrong, random_labels, labels)[:keep],
            "scores": ((torch.rand(len(labels), generator=g) * 10).round() / 10)[:keep],
        }
    return results


@pytest.mark.parametrize("image_ids", [range(1, 13), (1, 2, 3, 4, 5, 6, 9)], ids=["all", "some"])
def test_faster_coco_eval_gives_the_pycocotools_stats(image_ids):
    """Crowd boxes, empty images, images without predictions, images left out, boxes on the area
    range bounds, score ties and more than 100 detections: the same 12 numbers."""
    pytest.importorskip("faster_coco_eval")
    coco = _synthetic_coco()
    results = _synthetic_results(coco, list(image_ids))
    stats = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        evaluator = CocoEvaluator(coco, backend=backend)
        evaluator.update(results)
        stats[backend] = evaluator.summarize()
        assert evaluator.backend == backend
    expected = stats["pycocotools"]
    assert all(0 < value < 1 for value in expected.values()), expected
    assert stats["faster_coco_eval"] == pytest.approx(expected, rel=0, abs=1e-12)


def test_auto_picks_faster_coco_eval_when_installed(coco_gt):
    pytest.importorskip("faster_coco_eval")
    assert CocoEvaluator(coco_gt).backend == "faster_coco_eval"


def test_without_faster_coco_eval_auto_falls_back_and_asking_for_it_says_how_to_install(
    coco_gt, monkeypatch
):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # its import now fails
    assert CocoEvaluator(coco_gt).backend == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        CocoEvaluator(coco_gt, backend="faster_coco_eval")
    with pytest.raises(ValueError, match="pycocotools"):
        CocoEvaluator(coco_gt, backend="pycocotool")


def test_coco_backend_flag_reaches_every_evaluator(coco_gt, monkeypatch, caplog):
    monkeypatch.setattr(datasets, "get_coco_api", lambda _: coco_gt)
    argv = ["--coco_backend", "pycocotools", "--eval_nms_iou", "0.7"]
    args = options.get_args_parser().parse_args(argv)
    with caplog.at_level(logging.INFO, logger="training"):
        evaluators = training.build_evaluators(args, val_set=None)()
    assert {name: e.backend for name, e in evaluators.items()} == {
        "coco": "pycocotools",
        "coco_nms": "pycocotools",
    }
    assert "COCO evaluation with pycocotools" in caplog.text
    assert options.get_args_parser().parse_args([]).coco_backend == "auto"
