"""Does data loading keep up with training? Images/s of decode + augment beside the model's.

    .venv/bin/python benchmarks/data_loading.py            # about 1.5 minutes on 2 CPU cores

The images are the built-in shapes set generated at COCO's size (640 x 640 PNGs, written once
into --root), and a JPEG copy of it in COCO's layout (quality 90), since COCO's images are JPEGs.
The loader is the one ``main.py`` trains with (``main.build_loaders``: seeded augmentation,
DETR collate with padding), with the default training transforms (random flip, shorter side
640..800, longer side at most 1333, normalization) and the default --num_workers and --batch_size,
then with no workers (the rate of one core). The model's rate is a training step of
PVT-Small + DETR (the fast path, see benchmarks/speed.py) on a batch from the same loader.
Timing starts after the first batch, so worker start-up is excluded.
"""

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from timing import run_times
from torchvision.io import decode_image, encode_jpeg

import datasets
from engine import run_model
from models import build_criterion, build_detector
from models.config import ModelConfig
from options import get_args_parser
from training import build_loaders, build_optimizer, resolve_args
from util.cpu import configure_malloc
from util.dist import DistInfo


def shapes_args(root: Path, images: int) -> argparse.Namespace:
    flags = ["--dataset_file", "shapes", "--coco_path", str(root), "--shapes_size", "640"]
    flags += ["--shapes_train", str(images), "--shapes_val", "2"]
    return get_args_parser().parse_args(flags)


def jpeg_copy(png_root: Path, jpeg_root: Path) -> Path:
    """A generated set's splits as JPEG files in COCO's layout (written once)."""
    if (jpeg_root / "annotations" / "instances_train2017.json").exists():
        return jpeg_root
    partial = jpeg_root.with_name(jpeg_root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        annotations = json.loads((png_root / "annotations" / f"instances_{split}.json").read_text())
        (partial / split).mkdir()
        for image in annotations["images"]:
            jpeg_name = Path(image["file_name"]).with_suffix(".jpg").name
            pixels = decode_image(str(png_root / split / image["file_name"]))
            (partial / split / jpeg_name).write_bytes(encode_jpeg(pixels, quality=90).numpy())
            image["file_name"] = jpeg_name
        (partial / "annotations" / f"instances_{split}.json").write_text(json.dumps(annotations))
    partial.rename(jpeg_root)
    return jpeg_root


def loader_rate(args: argparse.Namespace, batches: int) -> tuple[float, torch.Tensor]:
    """(images/s over ``batches`` batches after the first, one batch of images)."""
    train_set = datasets.build_dataset("train", args)
    args = resolve_args(args, train_set)
    loader, _ = build_loaders(args, train_set, train_set, DistInfo())
    iterator = iter(loader)
    first = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * args.batch_size / (time.perf_counter() - start), first


def model_rate(batch, runs: int) -> tuple[float, str]:
    """Images/s of a PVT-Small + DETR training step on ``batch``, and the padded input size."""
    images, mask, targets = batch
    torch.manual_seed(0)
    model, criterion = build_detector(ModelConfig()), build_criterion(ModelConfig())
    optimizer = build_optimizer(model, get_args_parser().parse_args([]))

    def step():
        losses = criterion(run_model(model, images, mask, None), targets)
        loss = criterion.weighted_total(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = statistics.median(run_times(step, runs, warmup=2))
    return images.shape[0] / seconds, "x".join(map(str, images.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/shapes_640", help="where the sets are written")
    parser.add_argument("--images", type=int, default=200, help="training images generated")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per loader")
    parser.add_argument("--model_runs", type=int, default=3, help="training steps timed")
    options = parser.parse_args()
    configure_malloc()
    root = Path(options.root)
    defaults = get_args_parser().parse_args([])
    png = shapes_args(root, options.images)
    datasets.build_dataset("train", png)  # generates the set on first use
    jpeg_root = jpeg_copy(root, root.with_name(root.name + "_jpeg"))
    jpeg = get_args_parser().parse_args(["--dataset_file", "coco", "--coco_path", str(jpeg_root)])
    lines = [
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{options.images} images of 640x640, default training transforms, batch "
        f"{defaults.batch_size}, {options.batches} batches timed after the first",
        "",
        "| what | workers | images/s |",
        "| --- | ---: | ---: |",
    ]
    batch = None
    for name, args in (("JPEG (COCO-like)", jpeg), ("PNG (built-in set)", png)):
        for workers in (defaults.num_workers, 0):
            args.num_workers = workers
            rate, first = loader_rate(args, options.batches)
            batch = batch or first
            lines.append(f"| decode + augment + collate, {name} | {workers} | {rate:.1f} |")
    rate, shape = model_rate(batch, options.model_runs)
    lines.append(f"| PVT-Small + DETR training step (fast path, fp32), input {shape} | - | "
                 f"{rate:.2f} |")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
