"""The sampling points drawn for Deformable DETR are where the model sampled."""

import argparse

import pytest
import torch
from PIL import Image

import models.deformable
import predict
from models.postprocess import PostProcess
from tests.conftest import build_tiny, save_checkpoint, tiny_model_args
from tools.attention_maps import DetrAttention, attention_recorder
from tools.deformable_attention import (
    DeformableAttention,
    draw_decoder_samples,
    draw_encoder_samples,
)

DEFORMABLE = {"transformer": "deformable", "dropout": 0.0, "drop_path": 0.0}


def recorded_locations(monkeypatch) -> list[torch.Tensor]:
    """Every sampling_locations the sampling core is called with, in call order."""
    calls = []
    core = models.deformable.ms_deform_attn

    def recording(value, shapes, locations, weights):
        calls.append(locations.detach())
        return core(value, shapes, locations, weights)

    monkeypatch.setattr(models.deformable, "ms_deform_attn", recording)
    return calls


@pytest.mark.parametrize("box_refine", [False, True])
def test_on_an_unpadded_image_the_points_are_the_cores_locations(monkeypatch, box_refine):
    """128 x 128 px: every level's map covers the image exactly, so a location relative to its
    map is the point relative to the image."""
    model = build_tiny(**DEFORMABLE, box_refine=box_refine)[0].eval()
    calls = recorded_locations(monkeypatch)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    queries = torch.tensor([0, 3, 4])
    with torch.no_grad(), DeformableAttention(model) as attn:
        model(image)
    decoder = attn.decoder(0, queries)
    expected = calls[-1][0, queries]  # the last decoder layer's call comes last
    torch.testing.assert_close(decoder.xy, expected.flatten(1, 3), atol=1e-6, rtol=0)
    heads, levels, points = expected.shape[1:4]
    assert decoder.level.tolist() == [lvl for _ in range(heads) for lvl in range(levels)
                                      for _ in range(points)]  # fmt: skip
    encoder_call = calls[len(model.transformer.encoder.layers) - 1]
    cell = 2 * 16 + 5  # the finest map is 16 x 16: the cell at row 2, column 5
    encoder = attn.encoder(0, torch.tensor([[5.5 / 16, 2.5 / 16]]))
    torch.testing.assert_close(
        encoder.xy[0], encoder_call[0, cell].flatten(0, 2), atol=1e-6, rtol=0
    )
    sums = decoder.weight.unflatten(1, (heads, -1)).sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_an_images_points_do_not_depend_on_the_padding_of_its_batch():
    model = build_tiny(**DEFORMABLE)[0].eval()
    g = torch.Generator().manual_seed(1)
    small, large = torch.randn(3, 75, 101, generator=g), torch.randn(3, 130, 170, generator=g)
    queries = torch.arange(5)
    results = []
    for images, index in (([small], 0), ([large, small], 1)):
        with torch.no_grad(), DeformableAttention(model) as attn:
            model(images)
        results.append(
            (
                attn.decoder(index, queries),
                attn.encoder(index, torch.rand(3, 2, generator=torch.Generator().manual_seed(2))),
            )
        )
    for alone, batched in zip(*results, strict=True):
        torch.testing.assert_close(batched.xy, alone.xy, atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.weight, alone.weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.reference, alone.reference, atol=1e-4, rtol=0)


def test_the_reference_is_the_detections_centre_at_initialisation(tmp_path):
    """The box head starts at zero: the last layer's box is centred on its reference point,
    so the drawn reference must sit on the detection's centre."""
    model, _, post = build_tiny(**DEFORMABLE)
    model.eval()
    image = torch.randn(3, 75, 101, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), DeformableAttention(model) as attn:
        outputs = model([image])
    result = post["bbox"](outputs, torch.tensor([[75, 101]]))[0]
    assert isinstance(post["bbox"], PostProcess)
    queries = result["queries"][:4]
    samples = attn.decoder(0, queries)
    centres = (result["boxes"][:4, :2] + result["boxes"][:4, 2:]) / 2
    torch.testing.assert_close(
        samples.reference * torch.tensor([101, 75]), centres, atol=1e-3, rtol=0
    )
    pixels = torch.zeros(3, 75, 101, dtype=torch.uint8)
    draw_decoder_samples(pixels, samples, result["boxes"][:4], ["a"] * 4, str(tmp_path / "d.png"))
    points = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    draw_encoder_samples(pixels, attn.encoder(0, points), points, str(tmp_path / "e.png"))
    assert (tmp_path / "d.png").stat().st_size > 0 and (tmp_path / "e.png").stat().st_size > 0


def test_a_detr_model_is_refused():
    with pytest.raises(ValueError, match="deformable transformer"):
        DeformableAttention(build_tiny()[0])


def test_the_recorder_follows_the_transformer():
    assert isinstance(attention_recorder(build_tiny(**DEFORMABLE)[0]), DeformableAttention)
    assert isinstance(attention_recorder(build_tiny()[0]), DetrAttention)


def test_predict_draws_the_sampling_points_of_a_deformable_checkpoint(tmp_path):
    model = build_tiny(**DEFORMABLE, box_refine=True)[0]
    save_checkpoint(tmp_path / "c.pth", model, tiny_model_args(**DEFORMABLE, box_refine=True))
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(4)
    for name, (h, w) in (("a", (64, 64)), ("b", (48, 80))):
        pixels = torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{name}.png")
    argv = [
        str(images), "--resume", str(tmp_path / "c.pth"), "--json", str(tmp_path / "d.json"),
        "--attention", str(tmp_path / "attention"), "--score_threshold", "0",
        "--attention_queries", "2", "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip
    predict.main(argparse.ArgumentParser(parents=[predict.get_args_parser()]).parse_args(argv))
    for stem in ("a", "b"):
        for part in ("decoder", "encoder"):
            assert Image.open(tmp_path / "attention" / f"{stem}_{part}.png").size[0] > 100
