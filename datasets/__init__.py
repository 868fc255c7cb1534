"""Detection data: COCO 2017 or the built-in shapes set, behind one builder.

Both use the COCO 2017 layout under one root folder:
    <root>/train2017/, <root>/val2017/, <root>/annotations/instances_{train,val}2017.json
"""

import argparse
from pathlib import Path

from pycocotools.coco import COCO
from torch.utils.data import Dataset

from datasets.coco import CocoDetection, max_category_id
from datasets.shapes import ShapesSpec, ensure_shapes
from datasets.transforms import eval_transforms, train_transforms

SHAPES_DEFAULT_ROOT = Path("data/shapes")
_SPEC_DEFAULTS = ShapesSpec()


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags (dataset choice, augmentation sizes, synthetic set spec) to `parser`."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_file", choices=["coco", "shapes"], default="shapes")
    group.add_argument(
        "--coco_path",
        type=str,
        default=None,
        help=f"COCO 2017 root (required for coco); for shapes the folder the set is generated "
        f"into (default {SHAPES_DEFAULT_ROOT})",
    )
    group.add_argument(
        "--aug",
        choices=["multiscale", "crop"],
        default="multiscale",
        help="multiscale: flip + random shorter side (paper); crop: DETR's random-crop recipe too",
    )
    group.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=[640, 672, 704, 736, 768, 800],
        help="training shorter sides",
    )
    group.add_argument("--max_size", type=int, default=1333, help="longest side, train and eval")
    group.add_argument("--eval_size", type=int, default=800, help="evaluation shorter side")
    group.add_argument(
        "--size_divisibility",
        type=int,
        default=32,
        help="pad every batch to a multiple of this (the paper's 32); then an image's detections "
        "do not depend on its batch. 0: pad only to the largest image (the official DETR)",
    )
    _add_shapes_args(group)


def _add_shapes_args(group: argparse._ArgumentGroup) -> None:
    d = _SPEC_DEFAULTS
    group.add_argument("--shapes_train", type=int, default=d.num_train, help="training images")
    group.add_argument("--shapes_val", type=int, default=d.num_val, help="validation images")
    group.add_argument(
        "--shapes_size", type=int, default=d.image_size, help="image side (px), or the smallest"
    )
    group.add_argument(
        "--shapes_max_size",
        type=int,
        default=d.max_image_size,
        help="draw each image's height and width from --shapes_size to this (default: square "
        "images of --shapes_size)",
    )
    group.add_argument("--shapes_classes", type=int, default=d.num_classes, help="shape kinds")
    group.add_argument("--shapes_min_objects", type=int, default=d.min_objects)
    group.add_argument("--shapes_max_objects", type=int, default=d.max_objects)
    group.add_argument(
        "--shapes_min_scale", type=float, default=d.min_scale, help="object side / image side"
    )
    group.add_argument("--shapes_max_scale", type=float, default=d.max_scale)
    group.add_argument(
        "--shapes_empty", type=float, default=d.empty_fraction, help="fraction of empty images"
    )
    group.add_argument("--shapes_seed", type=int, default=d.seed)


def shapes_spec(args: argparse.Namespace) -> ShapesSpec:
    """The ShapesSpec described by the --shapes_* flags."""
    return ShapesSpec(
        num_train=args.shapes_train,
        num_val=args.shapes_val,
        image_size=args.shapes_size,
        max_image_size=args.shapes_max_size,
        num_classes=args.shapes_classes,
        min_objects=args.shapes_min_objects,
        max_objects=args.shapes_max_objects,
        min_scale=args.shapes_min_scale,
        max_scale=args.shapes_max_scale,
        empty_fraction=args.shapes_empty,
        seed=args.shapes_seed,
    )


def data_root(args: argparse.Namespace) -> Path:
    """The dataset root folder: --coco_path, or the default shapes folder."""
    if args.coco_path is not None:
        return Path(args.coco_path)
    if args.dataset_file == "shapes":
        return SHAPES_DEFAULT_ROOT
    raise ValueError("--dataset_file coco needs --coco_path (the folder holding train2017/ etc.)")


def build_dataset(split: str, args: argparse.Namespace) -> CocoDetection:
    """The `split` ('train' or 'val') dataset named by the flags; items as in CocoDetection.

    For shapes the set is generated first if its folder does not exist yet. Category ids are
    checked against args.num_classes when it is not None.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = data_root(args)
    if args.dataset_file == "shapes":
        ensure_shapes(root, shapes_spec(args))
    elif not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} does not exist or is not a folder")
    if split == "train":
        transforms = train_transforms(aug=args.aug, scales=args.scales, max_size=args.max_size)
    else:
        transforms = eval_transforms(size=args.eval_size, max_size=args.max_size)
    return CocoDetection(
        img_folder=root / f"{split}2017",
        ann_file=root / "annotations" / f"instances_{split}2017.json",
        transforms=transforms,
        num_classes=args.num_classes,
    )


def _unwrap(dataset: Dataset) -> CocoDetection:
    """The CocoDetection under wrappers that keep it as `.dataset` (Subset, SeededDataset)."""
    while not isinstance(dataset, CocoDetection) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise TypeError(f"expected a CocoDetection or a wrapper of one, got {type(dataset)}")
    return dataset


def get_coco_api(dataset: Dataset) -> COCO:
    """The pycocotools ground truth behind `dataset` (a CocoDetection, maybe wrapped)."""
    return _unwrap(dataset).coco


def num_classes_of(dataset: Dataset) -> int:
    """Largest category id (declared or used) + 1: the classifier's real-class count."""
    coco_dataset = _unwrap(dataset)
    return max_category_id(coco_dataset.coco, ann_file=coco_dataset.ann_file) + 1
