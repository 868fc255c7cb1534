"""An image's detections do not depend on the other images of its batch: alone or batched, at
any evaluation batch size, for PVT and ResNet-50 backbones, in the forward and the backward pass.

Batches are padded to a multiple of 32 (``--size_divisibility``, the model's own list input);
PVT then masks padded keys and resizes each image's positional embedding to its own grid, and
ResNet-50 zeroes its features beyond each image. Images of 97 x 131 to 256 x 320 pixels: none is
a multiple of 32, so every batch has padding inside the images' last 32-pixel cells too.
"""

import pytest
import torch

import datasets
import options
from datasets.coco_eval import CocoEvaluator
from engine import evaluate
from tests.conftest import NUM_CLASSES, build_tiny, run_main, saved_weights, tiny_argv
from training import build_loaders
from util.dist import DistInfo


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in ((97, 131), (256, 320), (150, 200))]


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-4) -> None:
    """fp32 agreement: differences within ``tolerance`` of the values' scale."""
    scale = max(a.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= tolerance * scale


BACKBONES = [("pvt_tiny", 2), ("pvt_tiny", 3), ("pvt_tiny", 4), ("resnet50", 4)]


@pytest.mark.parametrize(("backbone", "stage"), BACKBONES)
def test_an_image_detects_the_same_alone_and_in_any_batch(backbone, stage, device):
    model = build_tiny(backbone=backbone, feature_stage=stage)[0].eval().to(device)
    first, large, medium = (image.to(device) for image in images())
    with torch.no_grad():
        alone = model([first])
        for batch in ([first, large], [medium, first, large], [first, first]):
            outputs = model(batch)
            index = next(i for i, image in enumerate(batch) if image is first)
            for key in ("pred_logits", "pred_boxes"):
                assert_close_to_scale(outputs[key][index], alone[key][0])
            for aux, aux_alone in zip(outputs["aux_outputs"], alone["aux_outputs"], strict=True):
                assert_close_to_scale(aux["pred_logits"][index], aux_alone["pred_logits"][0])


@pytest.mark.parametrize(
    ("backbone", "stage"), [("pvt_tiny", 3), pytest.param("resnet50", 4, marks=pytest.mark.slow)]
)
def test_an_images_gradient_does_not_depend_on_its_batch_mates(backbone, stage, device):
    """The gradient of a loss on one image's outputs, alone and batched (dropout off)."""
    model = build_tiny(backbone=backbone, feature_stage=stage, dropout=0.0, drop_path=0.0)[0]
    model.to(device)
    first, large, _ = (image.to(device) for image in images())
    grads = []
    for batch in ([first], [large, first]):
        model.zero_grad(set_to_none=True)
        outputs = model(batch)
        index = len(batch) - 1
        (
            outputs["pred_logits"][index].square().sum() + outputs["pred_boxes"][index].sum()
        ).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("backbone") for n in grads[0])
    for name, grad in grads[0].items():
        assert_close_to_scale(grads[1][name], grad, 1e-3)


def test_a_batch_without_padding_takes_the_unmasked_path():
    """Images that fill the padded size run the official computation: no key padding mask."""
    model = build_tiny(feature_stage=3)[0].eval()
    seen = []
    for module in model.backbone.modules():
        if type(module).__name__ == "SpatialReductionAttention":
            module.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    with torch.no_grad():
        model([torch.randn(3, 64, 96), torch.randn(3, 64, 96)])
        assert seen and all(padding is None for padding in seen)
        seen.clear()
        model([torch.randn(3, 64, 96), torch.randn(3, 40, 96)])
    assert seen and all(padding is not None for padding in seen)


class Recorder(CocoEvaluator):
    """A COCO evaluator that also keeps every image's detections."""

    def update(self, results: dict) -> None:
        self.raw = getattr(self, "raw", {}) | {
            image_id: {k: v.clone() for k, v in r.items()} for image_id, r in results.items()
        }
        super().update(results)


@pytest.mark.slow
def test_coco_ap_is_the_same_at_every_evaluation_batch_size(tmp_path):
    """One trained checkpoint, validation images of 48..100 pixels a side, batches of 1, 2, 8."""
    sizes = ["--shapes_size", "48", "--shapes_max_size", "100", "--shapes_val", "8"]
    sizes += ["--scales", "48", "64", "--max_size", "100", "--eval_size", "64"]
    run_main(tiny_argv(tmp_path / "data", tmp_path / "run", *sizes, "--epochs", "3"))
    model = build_tiny()[0]
    model.load_state_dict(saved_weights(tmp_path / "run"))
    runs = []
    for batch_size in (1, 2, 8):
        flags = [*sizes, "--batch_size", str(batch_size), "--num_classes", str(NUM_CLASSES)]
        args = options.parse(tiny_argv(tmp_path / "data", tmp_path / "eval", *flags))
        val_set = datasets.build_dataset("val", args)
        _, loader = build_loaders(args, val_set, val_set, DistInfo())
        evaluator = Recorder(datasets.get_coco_api(val_set))
        _, criterion, postprocessors = build_tiny()
        stats = evaluate(
            model, criterion, postprocessors["bbox"], loader, {"coco": evaluator},
            torch.device("cpu"), progress=False,
        )  # fmt: skip
        runs.append((stats, evaluator.raw))
    sizes_seen = {(info["height"], info["width"]) for info in val_set.coco.imgs.values()}
    assert len(sizes_seen) > 1  # the images really differ in size
    (reference, detections), *others = runs
    for stats, other in others:
        for key in [k for k in reference if k.startswith("coco_")]:
            assert stats[key] == pytest.approx(reference[key], abs=1e-3), key
        assert other.keys() == detections.keys()
        for image_id, result in detections.items():
            assert torch.equal(other[image_id]["labels"], result["labels"])
            assert_close_to_scale(other[image_id]["scores"], result["scores"])
            assert_close_to_scale(other[image_id]["boxes"], result["boxes"])
