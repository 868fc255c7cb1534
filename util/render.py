"""Draw a model's detections on dataset images (used by ``main.py --render``)."""

from pathlib import Path

import torch
from torch import nn
from torchvision.io import write_png

from util.plot import draw_detections


@torch.no_grad()
def render_predictions(
    model: nn.Module,
    postprocessor: nn.Module,
    dataset,
    count: int,
    out_dir: str | Path,
    device: torch.device,
    score_threshold: float = 0.5,
) -> list[Path]:
    """Write ``<image file stem>.png`` for the first ``count`` images of a COCO-style dataset.

    ``dataset[i]`` gives the model's input; the drawing is on the original image (decoded by
    the dataset, so with its conversions) with boxes scored at least ``score_threshold``.
    """
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    written = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        outputs = model(image[None].to(device), None)
        result = postprocessor(outputs, target["orig_size"][None].to(device))[0]
        keep = result["scores"] >= score_threshold
        info = dataset.coco.loadImgs(int(target["image_id"]))[0]
        original = dataset._load_image(info["id"]).as_subclass(torch.Tensor)
        labels = [names.get(int(label), str(int(label))) for label in result["labels"][keep]]
        drawn = draw_detections(original, result["boxes"][keep], labels, result["scores"][keep])
        path = out_dir / f"{Path(info['file_name']).stem}.png"
        write_png(drawn, str(path))
        written.append(path)
    return written
