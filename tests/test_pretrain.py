"""The per-patch backbone pretraining that stands in for ImageNet in the demo."""

import torch

import pretrain_backbone
from models.pvt import build_pvt, load_pvt_checkpoint
from tests.conftest import TINY_DATA_FLAGS
from util import checkpoint


def test_patch_labels_take_the_smallest_box_holding_the_patch_centre():
    # A 64 x 64 image, stride-16 patches (4 x 4): a large box of class 1 over the left half,
    # a small box of class 2 inside it around the patch at row 1, column 1.
    large = [0.25, 0.5, 0.5, 1.0]  # cx, cy, w, h: x in [0, 32), all rows
    small = [0.375, 0.375, 0.125, 0.125]  # x, y in [20, 28): holds the centre (24, 24)
    target = {"boxes": torch.tensor([large, small]), "labels": torch.tensor([1, 2])}
    labels = pretrain_backbone.patch_labels([target], (4, 4), 16, (64, 64))
    expected = torch.zeros(1, 4, 4, dtype=torch.int64)
    expected[0, :, :2] = 1
    expected[0, 1, 1] = 2
    assert torch.equal(labels, expected)


def test_pretraining_writes_weights_a_detection_backbone_loads(tmp_path):
    out = tmp_path / "backbone.pth"
    argv = [
        *TINY_DATA_FLAGS, "--coco_path", str(tmp_path / "data"), "--iters", "3",
        "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--output", str(out),
    ]  # fmt: skip
    pretrain_backbone.main(pretrain_backbone.get_args_parser().parse_args(argv))
    saved = checkpoint.load(out)
    assert saved["model"]["head.weight"].shape == (3, 320)  # background + 2 classes, stage 3
    assert 0.0 <= saved["accuracy"]["acc"] <= 1.0
    backbone = build_pvt("pvt_tiny", num_classes=0, out_indices=(2,))
    load_pvt_checkpoint(backbone, str(out))
    torch.testing.assert_close(
        backbone.state_dict()["stages.2.pos_embed"], saved["model"]["stages.2.pos_embed"]
    )
