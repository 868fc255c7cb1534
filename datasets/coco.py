"""COCO-format detection data (COCO 2017 itself, or the built-in shapes set)."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import box_convert

from util.errors import one_line

_REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
_ID_HINT = "category ids must be integers >= 0"
_FORMAT_HINT = "expected a COCO instances file (a JSON object with images, annotations, categories)"


class UnreadableImage(OSError):
    """An image file that is missing, cannot be decoded, or does not have its annotated size.

    Raised by :meth:`CocoDetection.load_image` with a message naming the file and the image id.
    A DataLoader worker's exception reaches the main process rebuilt from its type and a message
    that holds the worker's traceback; :attr:`original` is the message as raised either way.
    """

    @property
    def original(self) -> str:
        """The message as the dataset raised it, without a DataLoader worker's traceback."""
        text = str(self)
        marker = f"{type(self).__name__}: "
        last = text.rstrip().rsplit("\n", 1)[-1]
        if text.startswith("Caught ") and marker in last:
            return last.split(marker, 1)[1]
        return text


class CocoDetection(torchvision.datasets.CocoDetection):
    """Detection images and boxes from a COCO instances file.

    Item `i` is `(image, target)`:
      image: the decoded image after `transforms` (the builders' pipelines give a float [3, H, W]
        tensor normalized with the ImageNet mean and std).
      target: "boxes" float [n, 4] normalized (cx, cy, w, h) in [0, 1] relative to the transformed
        image; "labels" int64 [n] category ids; "image_id" int64 scalar; "orig_size" int64 [2]
        (h, w) of the file; "size" int64 [2] (h, w) after the transforms.
    Crowd annotations and boxes with zero or negative width or height after clipping to the image
    are dropped; images left without boxes are kept (n = 0).

    Images are decoded with PIL into 8-bit RGB, so every image reaches the transforms as uint8
    [3, H, W]: grayscale and palette images are expanded to three channels, alpha is dropped
    (not composited), CMYK is converted, and 16-bit grayscale keeps its top 8 bits (value >> 8;
    Pillow itself reduces 16-bit colour PNGs to 8 bits). EXIF orientation is ignored, as in the
    COCO annotations.

    Args:
        img_folder: folder holding the files named by the images' `file_name`.
        ann_file: COCO instances JSON.
        transforms: called as `transforms(image, target)` with a `tv_tensors.Image` and a target
            whose "boxes" are `tv_tensors.BoundingBoxes` (absolute xyxy); None leaves them as is.
        num_classes: if given, every annotation's category id must lie in [0, num_classes).
    """

    def __init__(
        self,
        *,
        img_folder: Path,
        ann_file: Path,
        transforms: Callable | None,
        num_classes: int | None = None,
    ) -> None:
        img_folder, ann_file = Path(img_folder), Path(ann_file)
        if not img_folder.is_dir():
            raise FileNotFoundError(f"image folder {img_folder} does not exist")
        # torchvision's __init__ would parse the file with pycocotools before it can be checked;
        # build the same attributes from the checked file instead.
        torchvision.datasets.VisionDataset.__init__(self, str(img_folder), transforms=transforms)
        self.ann_file = ann_file
        self.coco = load_coco(ann_file)
        self.ids = sorted(self.coco.imgs)
        if num_classes is not None:
            check_category_ids(self.coco, num_classes=num_classes, ann_file=ann_file)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self._load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, _finish_target(image, target)

    def load_image(self, id: int) -> tv_tensors.Image:
        """The 8-bit RGB image of COCO image id ``id``, checked against its annotated size
        (:class:`UnreadableImage` otherwise)."""
        info = self.coco.imgs[id]
        path = Path(self.root) / info["file_name"]
        if not path.is_file():
            raise UnreadableImage(
                f"image file {path} (image id {id} in {self.ann_file}) is missing"
            )
        try:
            pixels = read_rgb8(path)
        except (OSError, ValueError) as e:
            message = one_line(f"cannot decode image file {path} (image id {id}): {e}")
            raise UnreadableImage(message) from e
        height, width = pixels.shape[1:]
        if (height, width) != (info["height"], info["width"]):
            raise UnreadableImage(
                f"image file {path} (image id {id}) is {height}x{width} (h x w) but "
                f"{self.ann_file} says {info['height']}x{info['width']}; fix the annotation file"
            )
        return tv_tensors.Image(pixels)

    def _load_target(self, id: int) -> dict[str, torch.Tensor]:
        info = self.coco.imgs[id]
        height, width = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns[id] if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(xywh, "xywh", "xyxy")
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                boxes[keep], format="XYXY", canvas_size=(height, width)
            ),
            "labels": labels[keep],
            "image_id": torch.tensor(id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }


def read_rgb8(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 [3, H, W] RGB, as training sees it.

    Grayscale, palette and CMYK images become RGB, alpha is dropped, and 16/32-bit integer
    grayscale keeps its top 8 bits of 16. Raises OSError or ValueError for unreadable files.
    """
    with Image.open(path) as image:
        return torch.from_numpy(_to_rgb8(image)).permute(2, 0, 1)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """Decoded uint8 [H, W, 3]; 16/32-bit integer grayscale keeps its top 8 bits of 16."""
    if image.mode.startswith("I"):
        deep = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(deep >> 8, 0, 255).astype(np.uint8))
    return np.array(image.convert("RGB"))


def _finish_target(image: torch.Tensor, target: dict) -> dict[str, torch.Tensor]:
    """Absolute xyxy `BoundingBoxes` -> plain normalized cxcywh tensor; adds "size" (h, w)."""
    height, width = image.shape[-2:]
    boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return {
        **target,
        "boxes": boxes / scale,
        "size": torch.tensor([height, width], dtype=torch.int64),
    }


def load_coco(ann_file: Path) -> COCO:
    """Read and check a COCO instances file; errors name the file and the offending entry."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file} is not valid JSON ({e}); {_FORMAT_HINT}") from e
    check_coco_dict(data, ann_file=ann_file)
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def check_coco_dict(data: object, *, ann_file: Path) -> None:
    """Raise ValueError unless `data` has the lists, keys and ids the loader reads."""
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file} holds a JSON {type(data).__name__}; {_FORMAT_HINT}")
    for section, keys in _REQUIRED_KEYS.items():
        _check_entries(data.get(section), section=section, keys=keys, ann_file=ann_file)
    for i, category in enumerate(data["categories"]):
        if not _is_class_id(category["id"]):
            raise ValueError(f"{ann_file}: categories[{i}] has id {category['id']!r}; {_ID_HINT}")
    image_ids = {image["id"] for image in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{ann_file}: annotations[{i}] (image id {ann['image_id']})"
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{where} refers to an image id missing from 'images'")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise ValueError(f"{where} has bbox {ann['bbox']!r}; expected [x, y, width, height]")
        if not _is_class_id(ann["category_id"]):
            raise ValueError(f"{where} has category id {ann['category_id']!r}; {_ID_HINT}")


def _check_entries(entries: object, *, section: str, keys: tuple[str, ...], ann_file: Path) -> None:
    if not isinstance(entries, list):
        raise ValueError(f"{ann_file} has no '{section}' list; {_FORMAT_HINT}")
    for i, entry in enumerate(entries):
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{ann_file}: {section}[{i}] lacks {missing}; {_FORMAT_HINT}")


def _is_class_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_category_ids(coco: COCO, *, num_classes: int, ann_file: Path) -> None:
    """Raise ValueError naming an annotation whose category id is not below `num_classes`."""
    for ann in coco.dataset["annotations"]:
        if ann["category_id"] >= num_classes:
            raise ValueError(
                f"{ann_file}: category id {ann['category_id']} (used by image id {ann['image_id']})"
                f" is outside [0, {num_classes}) for num_classes={num_classes}; pass --num_classes "
                f"{max_category_id(coco, ann_file=ann_file) + 1} (largest category id + 1) or "
                "leave it unset"
            )


def max_category_id(coco: COCO, *, ann_file: Path) -> int:
    """Largest category id among the declared categories and the annotations."""
    ids = [cat["id"] for cat in coco.dataset["categories"]]
    ids += [ann["category_id"] for ann in coco.dataset["annotations"]]
    if not ids:
        raise ValueError(f"{ann_file} declares no categories and has no annotations")
    return max(ids)
