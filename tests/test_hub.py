"""torch.hub entry points: every variant is listed and builds; weights load from a local file."""

import pytest
import torch

import hubconf
from models.pvt import VARIANT_DEPTHS
from tests.conftest import (
    DEC,
    ENC,
    FFN,
    HEADS,
    HIDDEN,
    NUM_CLASSES,
    QUERIES,
    REPO,
    assert_same_weights,
)
from util import checkpoint

BACKBONES = tuple(VARIANT_DEPTHS)
DETECTORS = tuple(f"detr_{variant}" for variant in VARIANT_DEPTHS)
TINY = dict(
    num_classes=NUM_CLASSES, num_queries=QUERIES, hidden_dim=HIDDEN, nheads=HEADS,
    enc_layers=ENC, dec_layers=DEC, dim_feedforward=FFN,
)  # fmt: skip


def test_every_entry_point_exists_and_its_dependencies_import():
    for name in (*DETECTORS, "detr_resnet50", *BACKBONES):
        assert callable(getattr(hubconf, name, None)), name
    for package in hubconf.dependencies:  # what torch.hub checks before loading
        __import__(package)


@pytest.mark.parametrize("name", DETECTORS)
def test_pvt_detectors_build_with_keywords_and_detect(name):
    model = getattr(hubconf, name)(feature_stage=1, **TINY).eval()
    out = model(torch.rand(1, 3, 32, 48))
    assert out["pred_logits"].shape == (1, QUERIES, NUM_CLASSES + 1)
    assert out["pred_boxes"].shape == (1, QUERIES, 4)


def test_a_detector_loads_a_checkpoint_of_this_repo_through_torch_hub(tmp_path):
    torch.manual_seed(0)
    saved = hubconf.detr_pvt_tiny(feature_stage=2, **TINY)
    checkpoint.save_atomic({"model": saved.state_dict(), "epoch": 0}, tmp_path / "ckpt.pth")
    torch.manual_seed(1)
    model, postprocess = torch.hub.load(
        str(REPO), "detr_pvt_tiny", source="local", trust_repo=True,
        weights=str(tmp_path / "ckpt.pth"), feature_stage=2, return_postprocessor=True, **TINY,
    )  # fmt: skip
    assert_same_weights(model.state_dict(), saved.state_dict())
    results = postprocess(model.eval()(torch.rand(1, 3, 32, 32)), torch.tensor([[320, 480]]))
    assert results[0]["boxes"].shape == (QUERIES, 4)


def test_a_detector_refuses_weights_of_another_class_count(tmp_path):
    torch.save(hubconf.detr_pvt_tiny(feature_stage=1, **TINY).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="num_classes"):
        hubconf.detr_pvt_tiny(
            weights=str(tmp_path / "w.pth"), feature_stage=1, **(TINY | {"num_classes": 5})
        )


def test_the_resnet50_detector_builds_offline():
    model = hubconf.detr_resnet50(**TINY).eval()
    assert model(torch.rand(1, 3, 64, 64))["pred_logits"].shape == (1, QUERIES, NUM_CLASSES + 1)


def test_a_backbone_loads_its_weights_file(tmp_path):
    backbone = dict(num_classes=0, out_indices=(1,))  # two stages: quick to build
    torch.manual_seed(0)
    saved = hubconf.pvt_tiny(**backbone)
    torch.save(saved.state_dict(), tmp_path / "pvt.pth")
    torch.manual_seed(1)
    loaded = hubconf.pvt_tiny(weights=str(tmp_path / "pvt.pth"), **backbone)
    assert_same_weights(loaded.state_dict(), saved.state_dict())
    assert saved.out_channels == (128,)
