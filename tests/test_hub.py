"""torch.hub entry points: every variant is listed and builds; weights load from a local file."""

from pathlib import Path

import pytest
import torch

import hubconf
from util import checkpoint

REPO = Path(__file__).resolve().parents[1]
DETECTORS = ("detr_pvt_tiny", "detr_pvt_small", "detr_pvt_medium", "detr_pvt_large")
BACKBONES = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")
TINY = dict(
    num_classes=3, num_queries=4, hidden_dim=16, nheads=2, enc_layers=1, dec_layers=1,
    dim_feedforward=32,
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
    assert out["pred_logits"].shape == (1, 4, 3 + 1)
    assert out["pred_boxes"].shape == (1, 4, 4)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_a_detector_loads_a_checkpoint_of_this_repo_through_torch_hub(tmp_path):
    torch.manual_seed(0)
    saved = hubconf.detr_pvt_tiny(feature_stage=2, **TINY)
    checkpoint.save_atomic({"model": saved.state_dict(), "epoch": 0}, tmp_path / "ckpt.pth")
    torch.manual_seed(1)
    model, postprocess = torch.hub.load(
        str(REPO), "detr_pvt_tiny", source="local", trust_repo=True,
        weights=str(tmp_path / "ckpt.pth"), feature_stage=2, return_postprocessor=True, **TINY,
    )  # fmt: skip
    assert_same_weights(model, saved)
    results = postprocess(model.eval()(torch.rand(1, 3, 32, 32)), torch.tensor([[320, 480]]))
    assert results[0]["boxes"].shape == (4, 4)


def test_a_detector_refuses_weights_of_another_class_count(tmp_path):
    torch.save(hubconf.detr_pvt_tiny(feature_stage=1, **TINY).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="num_classes"):
        hubconf.detr_pvt_tiny(
            weights=str(tmp_path / "w.pth"), feature_stage=1, **(TINY | {"num_classes": 5})
        )


def test_the_resnet50_detector_builds_offline():
    model = hubconf.detr_resnet50(**TINY).eval()
    assert model(torch.rand(1, 3, 64, 64))["pred_logits"].shape == (1, 4, 4)


def test_a_backbone_loads_its_weights_file(tmp_path):
    backbone = dict(num_classes=0, out_indices=(1,))  # two stages: quick to build
    torch.manual_seed(0)
    saved = hubconf.pvt_tiny(**backbone)
    torch.save(saved.state_dict(), tmp_path / "pvt.pth")
    torch.manual_seed(1)
    assert_same_weights(hubconf.pvt_tiny(weights=str(tmp_path / "pvt.pth"), **backbone), saved)
    assert saved.out_channels == (128,)
