"""Draw a model's detections on images (``main.py --render``, ``predict.py --render``)."""

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from tools.plot import draw_detections


def render_predictions(
    model: nn.Module,
    postprocessor: nn.Module,
    dataset,
    count: int,
    out_dir: str | Path,
    device: torch.device,
    score_threshold: float = 0.5,
    min_side: int = 512,
) -> list[Path]:
    """Write ``<image file stem>.png`` for the first ``count`` images of a COCO-style dataset:
    the drawings of :func:`draw_predictions`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, drawn in draw_predictions(
        model, postprocessor, dataset, count, device, score_threshold, min_side
    ).items():
        path = out_dir / f"{stem}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    return written


@torch.no_grad()
def draw_predictions(
    model: nn.Module,
    postprocessor: nn.Module,
    dataset,
    count: int,
    device: torch.device,
    score_threshold: float = 0.5,
    min_side: int = 512,
) -> dict[str, Tensor]:
    """``{image file stem: uint8 [3, H', W']}``: the detections of the first ``count`` images of
    a COCO-style dataset drawn on them.

    ``dataset[i]`` gives the model's input; the drawing is on the original image (decoded by
    the dataset, so with its conversions) with boxes scored at least ``score_threshold``. Small
    images are drawn ``min_side // shorter side`` times larger (a 64 px image 8 times, a 200 px
    one twice; nearest neighbour), so that their captions can be read.
    """
    model.eval()
    names = {c["id"]: c["name"] for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    drawings = {}
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        outputs = model([image.to(device)])  # padded as the model pads a list
        result = postprocessor(outputs, target["orig_size"][None].to(device))[0]
        info = dataset.coco.loadImgs(int(target["image_id"]))[0]
        original = dataset.load_image(info["id"]).as_subclass(torch.Tensor)
        scale = max(1, min_side // min(original.shape[1:]))
        drawn = draw_scaled(original, result, names, score_threshold, scale)
        drawings[Path(info["file_name"]).stem] = drawn
    return drawings


def write_detections_png(
    image: Tensor,
    result: dict[str, Tensor],
    names: dict[int, str],
    path: str | Path,
    score_threshold: float = 0.5,
    scale: int = 1,
) -> None:
    """Draw one image's detections scored at least ``score_threshold`` and write a PNG.

    ``image`` is uint8 [3, H, W]; ``result`` is one PostProcess dict ("scores", "labels",
    "boxes" absolute xyxy in that image); captions are ``names[label]`` (the id when unnamed)
    and the score. ``scale`` enlarges the image (nearest neighbour) before drawing, so captions
    stay legible on small images; the PNG is [scale * H, scale * W].
    """
    drawn = draw_scaled(image, result, names, score_threshold, scale)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)


def draw_scaled(
    image: Tensor,
    result: dict[str, Tensor],
    names: dict[int, str],
    score_threshold: float = 0.5,
    scale: int = 1,
) -> Tensor:
    """The uint8 [3, scale * H, scale * W] drawing of :func:`write_detections_png`."""
    keep = (result["scores"] >= score_threshold).cpu()
    scores, labels, boxes = (result[k].cpu()[keep] for k in ("scores", "labels", "boxes"))
    if scale != 1:
        image = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return draw_detections(image, boxes * scale, labels, scores, names)
