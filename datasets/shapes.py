"""Built-in synthetic detection data: coloured shapes on random backgrounds, in COCO format.

`ensure_shapes(root, spec)` writes, once, the same layout as COCO 2017 so the COCO loader and
evaluator run on it unchanged:

    root/train2017/000000000001.png ...   root/val2017/...
    root/annotations/instances_train2017.json, instances_val2017.json
    root/spec.json                        the ShapesSpec the set was generated from

Every image is drawn from its own generator seeded with (seed, split, index), so the files are
identical byte for byte for a given spec. Objects are filled shapes (category names below, ids from
1) of random colour, size and position that do not overlap; their boxes are the tight pixel extent
of the drawn shape, as COCO [x, y, width, height].
"""

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
from PIL import Image

SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "cross", "ring", "hexagon", "frame")

# Shape masks over window coordinates u (left to right) and v (top to bottom), both in [-1, 1].
_MASKS = {
    "square": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1),
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "triangle": lambda u, v: np.abs(u) <= (v + 1) / 2,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "cross": lambda u, v: np.minimum(np.abs(u), np.abs(v)) <= 1 / 3,
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.3),
    "hexagon": lambda u, v: 2 * np.abs(u) + np.abs(v) <= 2,
    "frame": lambda u, v: np.maximum(np.abs(u), np.abs(v)) >= 0.6,
}
_GENERATOR_VERSION = 1
_SPLITS = ("train", "val")
_PLACEMENT_TRIES = 30
_MIN_CONTRAST = 100.0


def category_names(num_classes: int) -> dict[int, str]:
    """Category id -> name of a set with ``num_classes`` shape kinds (ids from 1, as in COCO)."""
    return dict(enumerate(SHAPE_NAMES[:num_classes], start=1))


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """What a shapes set holds. Sizes are in pixels; scales are fractions of the image side.

    num_train / num_val: image counts; image_size: side of the square images, or with
    max_image_size the smallest height and width (each image's height and width are then drawn
    from image_size..max_image_size, so batches need padding); num_classes: how
    many of SHAPE_NAMES are used; min_objects / max_objects: objects per image not picked as
    empty (fewer when they do not fit without overlap); min_scale / max_scale: object side range;
    empty_fraction: share of images without objects; seed: generator seed.
    """

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 128
    max_image_size: int | None = None
    num_classes: int = 4
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.15
    max_scale: float = 0.45
    empty_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "num_train >= 1": self.num_train >= 1,
            "num_val >= 1": self.num_val >= 1,
            "image_size >= 16": self.image_size >= 16,
            "max_image_size >= image_size": (self.max_image_size or self.image_size)
            >= self.image_size,
            f"1 <= num_classes <= {len(SHAPE_NAMES)}": 1 <= self.num_classes <= len(SHAPE_NAMES),
            "0 <= min_objects <= max_objects": 0 <= self.min_objects <= self.max_objects,
            "0 < min_scale <= max_scale <= 1": 0 < self.min_scale <= self.max_scale <= 1,
            "0 <= empty_fraction < 1": 0 <= self.empty_fraction < 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid shapes spec {self}: needs {', '.join(failed)}")


def ensure_shapes(root: Path, spec: ShapesSpec) -> Path:
    """Generate the set into `root` unless it is already there; return `root`.

    Generation goes to a temporary sibling folder that is renamed to `root` only when complete,
    so an interrupted run never looks finished (its `.<name>.partial-<host>-<pid>` folder can be
    deleted). Several processes may call this at once: the first rename wins, the others check
    the winner's spec. Raises ValueError if `root` exists but was made from another spec or is not
    a generated set.
    """
    root = Path(root)
    if root.exists():
        _check_existing(root, spec)
        return root
    partial = root.parent / f".{root.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for split in _SPLITS:
        _write_split(partial, split, spec)
    (partial / "spec.json").write_text(json.dumps(_spec_record(spec), indent=1))
    try:
        partial.rename(root)
    except OSError:
        shutil.rmtree(partial)
        if not root.exists():
            raise
        _check_existing(root, spec)
    return root


def _spec_record(spec: ShapesSpec) -> dict:
    return {"generator_version": _GENERATOR_VERSION, **dataclasses.asdict(spec)}


def _check_existing(root: Path, spec: ShapesSpec) -> None:
    spec_file = root / "spec.json"
    if not spec_file.is_file():
        raise ValueError(
            f"{root} exists but has no spec.json, so it is not a generated shapes set; delete it "
            "or pass another --coco_path"
        )
    on_disk = json.loads(spec_file.read_text())
    wanted = _spec_record(spec)
    diffs = [
        f"{key}: on disk {on_disk.get(key)!r}, requested {value!r}"
        for key, value in wanted.items()
        if on_disk.get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"shapes set {root} was generated with a different spec ({'; '.join(diffs)}); delete "
            "the folder, pass another --coco_path, or use the --shapes_* flags it was made with"
        )


def _write_split(root: Path, split: str, spec: ShapesSpec) -> None:
    """Draw one split's images into root/<split>2017 and its COCO json into root/annotations."""
    count = spec.num_train if split == "train" else spec.num_val
    split_index = _SPLITS.index(split)
    empty_rng = np.random.default_rng([spec.seed, split_index])
    empty = set(empty_rng.choice(count, round(spec.empty_fraction * count), replace=False).tolist())
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        rng = np.random.default_rng([spec.seed, split_index, index])
        height, width = _image_size(spec, split_index, index)
        pixels, objects = _draw_image(rng, spec, height, width, with_objects=index not in empty)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category_id, bbox in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, category_id, bbox))
    categories = [
        {"id": i, "name": name, "supercategory": "shape"}
        for i, name in category_names(spec.num_classes).items()
    ]
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))


def _annotation(ann_id: int, image_id: int, category_id: int, bbox: list[int]) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": 0,
    }


def _image_size(spec: ShapesSpec, split_index: int, index: int) -> tuple[int, int]:
    """(height, width) of one image: image_size square, or drawn (from a stream of its own, so
    that the drawing of fixed-size sets does not change) up to max_image_size."""
    if spec.max_image_size is None:
        return spec.image_size, spec.image_size
    rng = np.random.default_rng([spec.seed, split_index, index, 1])
    height, width = rng.integers(spec.image_size, spec.max_image_size + 1, size=2)
    return int(height), int(width)


def _draw_image(
    rng: np.random.Generator, spec: ShapesSpec, height: int, width: int, *, with_objects: bool
) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image: uint8 [height, width, 3] pixels and (category id, COCO xywh box) per object."""
    canvas = _background(rng, height, width)
    objects, windows = [], []
    count = rng.integers(spec.min_objects, spec.max_objects + 1) if with_objects else 0
    for _ in range(count):
        window = _place(rng, spec, windows, height, width)
        if window is None:
            continue
        category = int(rng.integers(spec.num_classes))
        bbox = _draw_shape(rng, canvas, window, SHAPE_NAMES[category])
        if bbox is not None:
            windows.append(window)
            objects.append((category + 1, bbox))
    canvas += rng.normal(0.0, 6.0, canvas.shape)
    return np.clip(canvas, 0, 255).round().astype(np.uint8), objects


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float [height, width, 3] linear gradient between two random colours in a random
    direction."""
    start, end = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    ramp = np.cos(angle) * xs[None, :] + np.sin(angle) * ys[:, None]
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    return start + ramp[..., None] * (end - start)


def _place(
    rng: np.random.Generator, spec: ShapesSpec, taken: list, height: int, width: int
) -> tuple | None:
    """A window (x0, y0, w, h) that overlaps none in `taken`, or None if none was found. Object
    sides are scales of the image's shorter side."""
    for _ in range(_PLACEMENT_TRIES):
        side = rng.uniform(spec.min_scale, spec.max_scale) * min(height, width)
        aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        w = int(np.clip(round(side * aspect), 4, width))
        h = int(np.clip(round(side / aspect), 4, height))
        x0, y0 = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
        if all(x0 >= a + c or a >= x0 + w or y0 >= b + d or b >= y0 + h for a, b, c, d in taken):
            return x0, y0, w, h
    return None


def _draw_shape(
    rng: np.random.Generator, canvas: np.ndarray, window: tuple, name: str
) -> list[int] | None:
    """Fill shape `name` inside `window` with a colour that stands out; return its tight xywh."""
    x0, y0, w, h = window
    u = (np.arange(w) + 0.5) / w * 2 - 1
    v = (np.arange(h) + 0.5) / h * 2 - 1
    mask = _MASKS[name](u[None, :], v[:, None])
    if not mask.any():
        return None
    patch = canvas[y0 : y0 + h, x0 : x0 + w]
    patch[mask] = _contrasting_colour(rng, patch.reshape(-1, 3).mean(0))
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return [
        x0 + int(cols[0]),
        y0 + int(rows[0]),
        int(cols[-1] - cols[0] + 1),
        int(rows[-1] - rows[0] + 1),
    ]


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least _MIN_CONTRAST away from `background` (else the farthest corner)."""
    for _ in range(10):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            return colour
    return np.where(background < 128, 255.0, 0.0)
