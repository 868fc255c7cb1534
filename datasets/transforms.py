"""Box-aware augmentation on `torchvision.transforms.v2`.

Every pipeline takes and returns `(image, target)` where `image` is a `tv_tensors.Image` and
`target["boxes"]` is a `tv_tensors.BoundingBoxes` in absolute pixels; the other target entries
(labels, ids, sizes) pass through untouched, except that `SanitizeBoundingBoxes` drops the labels
of the boxes it drops. The pipelines end with float conversion and ImageNet normalization.
"""

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomSizeCrop(T.Transform):
    """Crop a random window with height and width drawn from [min_size, max_size] pixels.

    Each side is capped at the image's side, so small images are cropped less or not at all.
    Boxes are shifted and clipped to the window; follow it with `SanitizeBoundingBoxes` to drop
    the boxes that end up empty. This is the crop of DETR's training recipe.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(
                f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}"
            )
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = T.query_size(flat_inputs)
        crop_h = _randint(min(self.min_size, height), min(self.max_size, height))
        crop_w = _randint(min(self.min_size, width), min(self.max_size, width))
        top = _randint(0, height - crop_h)
        left = _randint(0, width - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt, params: dict):
        return F.crop(inpt, **params)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's global generator (seeded per worker)."""
    return int(torch.randint(low, high + 1, ()).item())


def _normalize() -> T.Compose:
    return T.Compose(
        [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def train_transforms(*, aug: str, scales: list[int], max_size: int) -> T.Compose:
    """Training augmentation.

    aug="multiscale" (the PVT paper's recipe): random horizontal flip, then the shorter side is
    resized to a value drawn from `scales` with the longer side at most `max_size`.
    aug="crop" (DETR's recipe): after the flip, either that resize, or (with probability 0.5)
    shorter side to 400/500/600, a random 384..600 crop, then that resize.
    """
    resize = T.RandomShortestSize(min_size=list(scales), max_size=max_size)
    if aug == "crop":
        crop = T.Compose(
            [
                T.RandomShortestSize(min_size=[400, 500, 600]),
                RandomSizeCrop(384, 600),
                T.SanitizeBoundingBoxes(),
                T.RandomShortestSize(min_size=list(scales), max_size=max_size),
            ]
        )
        resize = T.RandomChoice([resize, crop])
    elif aug != "multiscale":
        raise ValueError(f"unknown augmentation {aug!r}; choose 'multiscale' or 'crop'")
    return T.Compose([T.RandomHorizontalFlip(), resize, _normalize()])


def eval_transforms(*, size: int, max_size: int) -> T.Compose:
    """Evaluation: shorter side to `size`, longer side at most `max_size`, then normalization.

    RandomShortestSize with a single size is deterministic; unlike Resize it accepts
    ``max_size == size`` (square images at a fixed size).
    """
    return T.Compose([T.RandomShortestSize(min_size=[size], max_size=max_size), _normalize()])
