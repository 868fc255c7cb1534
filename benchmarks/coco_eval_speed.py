"""Time COCO box evaluation, pycocotools against faster_coco_eval, as one Markdown table.

    .venv/bin/python benchmarks/coco_eval_speed.py                # 5000 images, 500k detections
    .venv/bin/python benchmarks/coco_eval_speed.py --images 500   # a tenth of that

The set is synthetic and built in memory from --seed: --images images of 640 x 480, on average
--boxes ground-truth boxes each (Poisson, so some images have none) of --categories categories,
sides from 4 to 400 px (log-uniform: small, medium and large objects), 1% of them crowd boxes;
and --detections detections per image, as DETR gives, the first ones the image's boxes moved by
about 5% of their size (a tenth with a random label, scores 0.3 to 1), the rest anywhere (scores
0 to 0.5).

Rows: loadRes, the result set that COCOeval reads (CocoEvaluator uses pycocotools' COCO.loadRes
with both backends; faster_coco_eval's own COCO.loadRes is timed for comparison), and evaluate +
accumulate + summarize on every image through ``datasets.coco_eval.run_cocoeval``, the code
``CocoEvaluator.summarize`` runs, with each backend's COCOeval on the same result set. Seconds are
the median wall time of --runs calls, each after ``gc.collect()`` and none a warm-up (one call is
what an evaluation pays). CPU seconds are those of the whole process: above the wall seconds,
more than one thread ran (faster_coco_eval's C++ step starts its own threads, which
OMP_NUM_THREADS does not limit).
"""

import argparse
import contextlib
import datetime
import gc
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from datasets.coco_eval import STAT_NAMES, cocoeval_backend, run_cocoeval

WIDTH, HEIGHT = 640, 480


def ground_truth(rng: np.random.Generator, options: argparse.Namespace) -> dict:
    """A COCO instances dict (images, annotations, categories)."""
    counts = rng.poisson(options.boxes, options.images)
    n = int(counts.sum())
    sides = np.exp(rng.uniform(np.log(4), np.log(400), (n, 2)))
    corners = rng.random((n, 2)) * (np.array([WIDTH, HEIGHT]) - sides)
    annotations = [
        {"id": k + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
         "area": w * h, "iscrowd": crowd}
        for k, (image_id, category, (x, y), (w, h), crowd) in enumerate(zip(
            np.repeat(np.arange(1, options.images + 1), counts).tolist(),
            rng.integers(1, options.categories + 1, n).tolist(),
            corners.tolist(),
            sides.tolist(),
            (rng.random(n) < 0.01).astype(int).tolist(),
            strict=True,
        ))
    ]  # fmt: skip
    return {
        "images": [
            {"id": i, "width": WIDTH, "height": HEIGHT, "file_name": f"{i:012}.jpg"}
            for i in range(1, options.images + 1)
        ],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, options.categories + 1)],
    }


def detections(rng: np.random.Generator, gt: dict, options: argparse.Namespace) -> list[dict]:
    """--detections per image, in the format of COCO.loadRes (xywh boxes, scores)."""
    per_image = options.detections
    counts = np.bincount([a["image_id"] for a in gt["annotations"]], minlength=options.images + 1)
    gt_boxes = np.array([a["bbox"] for a in gt["annotations"]]).reshape(-1, 4)
    gt_labels = np.array([a["category_id"] for a in gt["annotations"]], dtype=int)
    image_ids = np.repeat(np.arange(1, options.images + 1), per_image)
    slot = np.tile(np.arange(per_image), options.images)
    copy = slot < counts[image_ids]  # the slot-th box of its image, moved
    source = (np.cumsum(counts) - counts)[image_ids][copy] + slot[copy]

    sides = np.exp(rng.uniform(np.log(4), np.log(400), (len(slot), 2)))
    boxes = np.concatenate([rng.random((len(slot), 2)) * ([WIDTH, HEIGHT] - sides), sides], 1)
    size = np.tile(gt_boxes[source, 2:], 2)  # w, h, w, h
    boxes[copy] = gt_boxes[source] + rng.normal(0, 0.05, (len(source), 4)) * size
    boxes[:, 2:] = boxes[:, 2:].clip(min=1)
    labels = rng.integers(1, options.categories + 1, len(slot))
    labels[copy] = np.where(rng.random(len(source)) < 0.9, gt_labels[source], labels[copy])
    scores = rng.random(len(slot)) * 0.5
    scores[copy] = 0.3 + 0.7 * rng.random(len(source))
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            image_ids.tolist(), labels.tolist(), boxes.tolist(), scores.tolist(), strict=True
        )
    ]


def timed(fn: Callable[[object], object], runs: int, make_input: Callable[[], object]):
    """(median wall s, median CPU s, last result) of ``runs`` calls ``fn(make_input())``, the
    ``make_input()`` untimed."""
    walls, cpus = [], []
    for _ in range(runs):
        argument = make_input()
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(argument)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def quiet(fn: Callable, *args):
    """``fn(*args)`` with pycocotools' progress prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def header(options: argparse.Namespace, gt: dict, n_detections: int) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    crowd = sum(a["iscrowd"] for a in gt["annotations"])
    return [
        f"{datetime.date.today()}, {platform.machine()} {cpu}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"pycocotools {version('pycocotools')}, faster-coco-eval {version('faster-coco-eval')}, "
        f"median of {options.runs} run(s), no warm-up",
        f"{options.images} images, {options.categories} categories, "
        f"{len(gt['annotations'])} ground-truth boxes ({crowd} crowd), {n_detections} "
        f"detections ({options.detections} per image), seed {options.seed}",
        "",
    ]


def time_load_res(
    coco_gt: COCO, faster_gt, results: list[dict], runs: int
) -> tuple[list[dict], COCO]:
    """(rows, pycocotools' result set): the COCO.loadRes of ``coco_gt`` (pycocotools) and of
    ``faster_gt`` (faster_coco_eval's COCO on the same dataset)."""
    rows, loaded = [], {}
    for name, gt in (("pycocotools", coco_gt), ("faster_coco_eval", faster_gt)):
        wall, cpu, loaded[name] = timed(
            lambda dets, gt=gt: quiet(gt.loadRes, dets),
            runs,
            lambda: [dict(d) for d in results],  # loadRes adds keys: each call its own copies
        )
        rows.append({"step": "loadRes", "backend": name, "wall": wall, "cpu": cpu})
    same = [loaded[name].dataset["annotations"] for name in loaded]
    rows[-1]["same"] = "yes" if same[0] == same[1] else "no"
    return rows, loaded["pycocotools"]


def time_evaluation(
    backends: dict[str, Callable], coco_gt: COCO, coco_dt: COCO, runs: int
) -> tuple[list[dict], list[float]]:
    """(rows, pycocotools' stats): each backend's COCOeval through run_cocoeval, all images."""
    rows, stats = [], {}
    image_ids = sorted(coco_gt.getImgIds())
    for name, cocoeval in backends.items():
        wall, cpu, (stats[name], _) = timed(
            lambda dt, cocoeval=cocoeval: run_cocoeval(cocoeval, coco_gt, dt, image_ids),
            runs,
            lambda: coco_dt,
        )
        step = "evaluate + accumulate + summarize"
        rows.append({"step": step, "backend": name, "wall": wall, "cpu": cpu})
        print(f"done: {name}, {wall:.1f} s", file=sys.stderr, flush=True)
    pairs = zip(stats["pycocotools"], stats["faster_coco_eval"], strict=True)
    diff = max(abs(a - b) for a, b in pairs)
    rows[-1]["same"] = f"{'yes' if diff <= 1e-12 else 'no'} (max diff {diff:.1e})"
    return rows, stats["pycocotools"]


def table(rows: list[dict]) -> list[str]:
    reference = {r["step"]: r["wall"] for r in rows if r["backend"] == "pycocotools"}
    lines = [
        "| step | backend | seconds | CPU seconds | speed-up vs pycocotools | same result |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['backend']} | {r['wall']:.2f} | {r['cpu']:.2f} | "
            f"{reference[r['step']] / r['wall']:.2f}x | {r.get('same', '(reference)')} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--boxes", type=float, default=7.0, help="mean ground-truth boxes/image")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=1, help="timed calls per row (median)")
    options = parser.parse_args()
    try:
        backends = {name: cocoeval_backend(name)[1] for name in ("pycocotools", "faster_coco_eval")}
        from faster_coco_eval import COCO as FasterCOCO
    except ImportError as error:
        raise SystemExit(str(error)) from None

    rng = np.random.default_rng(options.seed)
    gt = ground_truth(rng, options)
    results = detections(rng, gt, options)
    coco_gt = COCO()
    coco_gt.dataset = gt
    quiet(coco_gt.createIndex)
    load_rows, coco_dt = time_load_res(coco_gt, quiet(FasterCOCO, gt), results, options.runs)
    eval_rows, stats = time_evaluation(backends, coco_gt, coco_dt, options.runs)
    values = ", ".join(f"{k} {v:.3f}" for k, v in zip(STAT_NAMES, stats, strict=True))
    lines = header(options, gt, len(results)) + table(load_rows + eval_rows)
    print("\n".join([*lines, "", f"stats: {values}"]))


if __name__ == "__main__":
    main()
