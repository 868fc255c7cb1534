"""Data side: shapes generation, COCO loading, transforms, collate, and errors on bad input."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import datasets
import datasets.shapes as shapes_module
from datasets.coco import CocoDetection, UnreadableImage
from datasets.collate import collate_fn
from datasets.shapes import SHAPE_NAMES, ShapesSpec, ensure_shapes
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transforms, train_transforms

TINY = ShapesSpec(
    num_train=12,
    num_val=8,
    image_size=48,
    num_classes=3,
    min_objects=2,
    max_objects=3,
    min_scale=0.2,
    max_scale=0.35,
    empty_fraction=0.25,
    seed=3,
)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", TINY)


def _args(root: Path, *extra: str, num_classes: int | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    datasets.add_dataset_args(parser)
    flags = ["--coco_path", str(root), "--scales", "64", "--max_size", "200", "--eval_size", "64"]
    spec = ["--shapes_train", "12", "--shapes_val", "8", "--shapes_size", "48"]
    spec += ["--shapes_classes", "3", "--shapes_min_objects", "2", "--shapes_max_objects", "3"]
    spec += ["--shapes_min_scale", "0.2", "--shapes_max_scale", "0.35", "--shapes_empty", "0.25"]
    spec += ["--shapes_seed", "3"]
    return argparse.Namespace(
        **vars(parser.parse_args([*flags, *spec, *extra])), num_classes=num_classes
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load_json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _write_coco(root: Path, images: dict[int, np.ndarray], annotations: list[dict]) -> Path:
    """A COCO-layout val split: images {id: HxW(x C) array} saved as PNG, given annotations."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for image_id, pixels in images.items():
        Image.fromarray(pixels).save(root / "val2017" / f"{image_id}.png")
        h, w = pixels.shape[:2]
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
    for i, ann in enumerate(annotations):
        ann.setdefault("id", i + 1)
    coco = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file


def _dataset(ann_file: Path, **kwargs) -> CocoDetection:
    return CocoDetection(img_folder=ann_file.parent.parent / "val2017", ann_file=ann_file, **kwargs)


# ---- shapes generation ------------------------------------------------------------------------


def test_shapes_generation_is_deterministic_from_the_seed(shapes_root, tmp_path):
    again = ensure_shapes(tmp_path / "again", TINY)
    assert _files(again) == _files(shapes_root)
    other_seed = ensure_shapes(tmp_path / "other", dataclasses.replace(TINY, seed=4))
    assert _files(other_seed) != _files(shapes_root)


def test_build_dataset_generates_the_shapes_set_the_flags_describe(shapes_root, tmp_path):
    dataset = datasets.build_dataset("train", _args(tmp_path / "fresh"))
    assert len(dataset) == TINY.num_train
    assert _files(tmp_path / "fresh") == _files(shapes_root)


def test_shapes_set_is_multi_class_multi_object_with_empty_images(shapes_root):
    coco = _load_json(shapes_root, "train")
    names = [c["name"] for c in coco["categories"]]
    assert names == list(SHAPE_NAMES[:3]) and [c["id"] for c in coco["categories"]] == [1, 2, 3]
    per_image = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 48 and y + h <= 48
    counts = [len(anns) for anns in per_image.values()]
    assert counts.count(0) == 3  # round(0.25 * 12)
    assert max(counts) >= 2 and len({a["category_id"] for a in coco["annotations"]}) == 3


def test_shapes_boxes_are_tight_around_the_drawn_shape(shapes_root):
    coco = _load_json(shapes_root, "val")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    squares = [a for a in coco["annotations"] if a["category_id"] == 1]  # squares fill their box
    assert squares
    for ann in squares:
        path = shapes_root / "val2017" / files[ann["image_id"]]
        pixels = np.asarray(Image.open(path), dtype=float)
        x, y, w, h = ann["bbox"]
        box = pixels[y : y + h, x : x + w]
        colour = box.reshape(-1, 3).mean(0)
        for line in (box[0], box[-1], box[:, 0], box[:, -1]):
            assert np.linalg.norm(line.mean(0) - colour) < 12
        outside = []
        if y > 0:
            outside.append(pixels[y - 1, x : x + w])
        if y + h < TINY.image_size:
            outside.append(pixels[y + h, x : x + w])
        if x > 0:
            outside.append(pixels[y : y + h, x - 1])
        if x + w < TINY.image_size:
            outside.append(pixels[y : y + h, x + w])
        for line in outside:
            assert np.linalg.norm(line.mean(0) - colour) > 40


def test_shapes_spec_mismatch_names_folder_and_difference(shapes_root):
    with pytest.raises(ValueError, match=r"seed: on disk 3, requested 5") as info:
        ensure_shapes(shapes_root, dataclasses.replace(TINY, seed=5))
    assert str(shapes_root) in str(info.value)


def test_interrupted_generation_is_not_taken_for_a_complete_set(tmp_path, monkeypatch):
    real_write = shapes_module._write_split

    def killed_during_val(root, split, spec):
        if split == "val":
            raise KeyboardInterrupt
        real_write(root, split, spec)

    monkeypatch.setattr(shapes_module, "_write_split", killed_during_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path / "set", TINY)
    assert not (tmp_path / "set").exists()
    monkeypatch.setattr(shapes_module, "_write_split", real_write)
    root = ensure_shapes(tmp_path / "set", TINY)
    assert len(_load_json(root, "val")["images"]) == TINY.num_val


def test_folder_that_is_not_a_generated_set_is_refused(tmp_path):
    (tmp_path / "set").mkdir()
    with pytest.raises(ValueError, match="no spec.json"):
        ensure_shapes(tmp_path / "set", TINY)


# ---- loaded targets ---------------------------------------------------------------------------


def test_eval_targets_match_the_json_boxes(shapes_root):
    dataset = datasets.build_dataset("val", _args(shapes_root))
    coco = _load_json(shapes_root, "val")
    assert len(dataset) == TINY.num_val and datasets.num_classes_of(Subset(dataset, [0])) == 4
    assert datasets.get_coco_api(Subset(dataset, [0])).cats[1]["name"] == "square"
    for image, target in dataset:
        image_id = int(target["image_id"])
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert target["size"].tolist() == [64, 64] and target["orig_size"].tolist() == [48, 48]
        boxes = target["boxes"]
        assert boxes.shape == (len(anns), 4) and ((boxes >= 0) & (boxes <= 1)).all()
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1) * 48
        expected = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(xywh, expected, atol=1e-3, rtol=0)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_images_are_normalized_with_imagenet_statistics(tmp_path):
    ann_file = _write_coco(tmp_path, {1: np.full((8, 8, 3), 255, np.uint8)}, [])
    image, _ = _dataset(ann_file, transforms=eval_transforms(size=8, max_size=16))[0]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected)


def test_training_flip_mirrors_image_and_boxes(shapes_root):
    dataset = datasets.build_dataset("val", _args(shapes_root))
    index = next(i for i in range(len(dataset)) if len(dataset[i][1]["boxes"]))
    reference_image, reference = dataset[index]
    dataset.transforms = train_transforms(aug="multiscale", scales=[64], max_size=200)
    torch.manual_seed(1)
    flipped_count = 0
    for _ in range(8):
        image, target = dataset[index]
        flipped = not torch.allclose(image, reference_image)
        mirrored = reference["boxes"].clone()
        mirrored[:, 0] = 1 - mirrored[:, 0]
        torch.testing.assert_close(target["boxes"], mirrored if flipped else reference["boxes"])
        if flipped:
            torch.testing.assert_close(image, reference_image.flip(-1))
        flipped_count += flipped
    assert 0 < flipped_count < 8


def test_multiscale_resize_keeps_shorter_side_in_scales_and_longer_side_capped(tmp_path):
    ann = {"image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 5.0]}
    ann_file = _write_coco(tmp_path, {1: np.zeros((20, 60, 3), np.uint8)}, [ann])
    dataset = _dataset(
        ann_file, transforms=train_transforms(aug="multiscale", scales=[30, 40], max_size=100)
    )
    torch.manual_seed(0)
    sizes = {tuple(dataset[0][1]["size"].tolist()) for _ in range(12)}
    assert sizes == {(30, 90), (33, 100)}  # 40 would make the longer side 120 > 100


def test_crop_recipe_gives_valid_normalized_boxes(shapes_root):
    dataset = datasets.build_dataset("train", _args(shapes_root, "--aug", "crop"))
    torch.manual_seed(0)
    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert len(target["labels"]) == len(boxes)
        assert target["size"].tolist() == list(image.shape[-2:])
        assert min(image.shape[-2:]) in (63, 64)  # torchvision truncates the scaled side


def test_crowd_and_degenerate_boxes_are_dropped_and_empty_images_kept(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 4]},  # kept
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 4]},  # zero width
        {"image_id": 1, "category_id": 1, "bbox": [40, 2, 5, 5]},  # right of the image
        {"image_id": 1, "category_id": 1, "bbox": [25, 10, 10, 20]},  # clipped to 25..30 x 10..20
    ]
    images = {1: np.zeros((20, 30, 3), np.uint8), 2: np.zeros((10, 10, 3), np.uint8)}
    dataset = _dataset(_write_coco(tmp_path, images, anns), transforms=None)
    assert len(dataset) == 2
    boxes = dataset[0][1]["boxes"] * torch.tensor([30, 20, 30, 20])
    torch.testing.assert_close(boxes, torch.tensor([[4.5, 4.0, 5.0, 4.0], [27.5, 15.0, 5.0, 10.0]]))
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


# ---- collate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("divisibility", "size"), [(0, (6, 7)), (4, (8, 8)), (32, (32, 32))])
def test_collate_pads_to_the_largest_image_and_masks_padding(divisibility, size):
    a, b = torch.rand(3, 4, 7), torch.rand(3, 6, 5)
    targets = [{"image_id": torch.tensor(1)}, {"image_id": torch.tensor(2)}]
    images, mask, out_targets = collate_fn([(a, targets[0]), (b, targets[1])], divisibility)
    assert images.shape == (2, 3, *size) and mask.shape == (2, *size) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :7], a) and torch.equal(images[1, :, :6, :5], b)
    assert (images[0, :, 4:] == 0).all() and (images[1, :, :, 5:] == 0).all()
    assert mask[0, 4:].all() and mask[0, :, 7:].all() and not mask[0, :4, :7].any()
    assert mask[1, 6:].all() and mask[1, :, 5:].all() and not mask[1, :6, :5].any()
    assert out_targets == targets


# ---- bad input --------------------------------------------------------------------------------


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.build_dataset("val", _args(missing, "--dataset_file", "coco"))
    no_path = _args(missing, "--dataset_file", "coco")
    no_path.coco_path = None
    with pytest.raises(ValueError, match="--coco_path"):
        datasets.build_dataset("val", no_path)
    _write_coco(tmp_path / "set", {1: np.zeros((4, 4, 3), np.uint8)}, [])
    with pytest.raises(FileNotFoundError, match="train2017"):
        datasets.build_dataset("train", _args(tmp_path / "set", "--dataset_file", "coco"))
    (tmp_path / "set" / "train2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        datasets.build_dataset("train", _args(tmp_path / "set", "--dataset_file", "coco"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"images": [], "categories": []}', "no 'annotations' list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks"),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "1.png", "height": 4, "width": 4}],
                    "annotations": [{"image_id": 1, "category_id": "cat", "bbox": [0, 0, 1, 1]}],
                    "categories": [],
                }
            ),
            r"annotations\[0\] \(image id 1\) has category id 'cat'",
        ),
    ],
)
def test_annotation_file_that_is_not_coco_is_refused(tmp_path, content, message):
    ann_file = _write_coco(tmp_path, {}, [])
    ann_file.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        _dataset(ann_file, transforms=None)
    assert str(ann_file) in str(info.value)


def test_missing_or_undecodable_image_is_named_even_from_a_worker(tmp_path):
    ann_file = _write_coco(tmp_path, {7: np.zeros((4, 4, 3), np.uint8)}, [])
    dataset = _dataset(ann_file, transforms=None)
    (tmp_path / "val2017" / "7.png").write_bytes(b"this is not a png")
    with pytest.raises(UnreadableImage, match=r"cannot decode image file .*7\.png \(image id 7\)"):
        dataset[0]
    (tmp_path / "val2017" / "7.png").unlink()
    with pytest.raises(UnreadableImage) as raised:
        dataset[0]
    missing = raised.value.original
    assert re.fullmatch(
        r"image file .*7\.png \(image id 7 in .*instances_val2017.json\) is missing", missing
    )
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(UnreadableImage, match="DataLoader worker") as raised:
        next(iter(loader))
    assert raised.value.original == missing  # without the worker's traceback


def test_image_size_that_disagrees_with_the_json_is_named(tmp_path):
    ann_file = _write_coco(tmp_path, {3: np.zeros((4, 6, 3), np.uint8)}, [])
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(tmp_path / "val2017" / "3.png")
    with pytest.raises(UnreadableImage, match=r"3\.png \(image id 3\) is 6x4"):
        _dataset(ann_file, transforms=None)[0]


def test_grayscale_rgba_and_16_bit_images_become_8_bit_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgba = np.dstack([gray, gray // 2, gray // 4, np.full_like(gray, 7)])
    deep = gray.astype(np.uint16) * 257  # 16-bit with the same 8-bit values
    ann_file = _write_coco(tmp_path, {1: gray, 2: rgba}, [])
    Image.fromarray(deep).save(tmp_path / "val2017" / "3.png")
    coco = json.loads(ann_file.read_text())
    coco["images"].append({"id": 3, "file_name": "3.png", "height": 4, "width": 4})
    ann_file.write_text(json.dumps(coco))
    dataset = _dataset(ann_file, transforms=None)
    expected_gray = torch.from_numpy(gray).expand(3, 4, 4)
    images = [dataset[i][0] for i in range(3)]
    assert all(image.dtype == torch.uint8 and image.shape == (3, 4, 4) for image in images)
    assert torch.equal(images[0], expected_gray) and torch.equal(images[2], expected_gray)
    assert torch.equal(images[1], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))


def test_category_id_outside_num_classes_names_id_image_and_flag(shapes_root):
    with pytest.raises(
        ValueError, match=r"category id 3 \(used by image id \d+\).*--num_classes 4"
    ):
        datasets.build_dataset("val", _args(shapes_root, num_classes=3))
    assert len(datasets.build_dataset("val", _args(shapes_root, num_classes=4))) == TINY.num_val
