"""The typed model configuration and the transformer protocol: the flags become one
configuration, it round-trips through a checkpoint as plain data, checkpoints that predate it
still rebuild their model, every transformer entry follows the protocol, and the hub entry
points import no data code."""

import argparse
import dataclasses
import subprocess
import sys

import pytest
import torch

import options
from models import TRANSFORMERS, build_criterion, build_detector, build_model, rebuild_detector
from models.config import LossConfig, ModelConfig, architecture_flags
from models.protocol import Decoded, Memory, Queries
from tests.conftest import (
    NUM_CLASSES,
    QUERIES,
    build_tiny,
    run_main,
    tiny_argv,
    tiny_batch,
    tiny_model_args,
)  # fmt: skip
from util import checkpoint

DEFORMABLE_TWO_STAGE = {
    "transformer": "deformable", "box_refine": True, "two_stage": True, "cls_loss": "focal",
    "query_groups": 2, "dropout": 0.0, "drop_path": 0.0,
}  # fmt: skip


def test_the_default_configuration_is_the_default_flags():
    """The dataclass defaults and main.py's flag defaults describe the same detector (PVT-Small
    + DETR, the paper's loss), so a checkpoint that predates a field rebuilds as it was."""
    assert ModelConfig.from_args(options.parse(["--num_classes", "91"])) == ModelConfig()
    assert ModelConfig().loss == LossConfig()


def test_flags_become_fields_and_enabled_aids_keep_their_own_flags():
    argv = ["--num_classes", "5", "--hidden_dim", "64", "--no_aux_loss", "--lr_backbone", "0"]
    argv += ["--query_groups", "3", "--set_cost_bbox", "4", "--cls_loss", "focal"]
    config = ModelConfig.from_args(options.parse(argv))
    assert (config.num_classes, config.hidden_dim, config.cls_loss) == (5, 64, "focal")
    assert not config.aux_loss and not config.train_backbone
    assert config.loss.set_cost_bbox == 4.0
    assert config.aids == {"group": {"query_groups": 3}}
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig.from_args(options.parse([]))


def test_architecture_flags_are_the_models_the_losss_and_the_aids():
    flags = architecture_flags()
    for flag in ("backbone", "hidden_dim", "transformer", "box_refine", "no_aux_loss"):
        assert flag in flags
    for flag in ("set_cost_class", "giou_loss_coef", "eos_coef", "focal_gamma"):
        assert flag in flags
    for flag in ("query_groups", "anchor_init", "dn_box_noise", "one_to_many_k", "two_stage"):
        assert flag in flags
    for flag in ("lr", "epochs", "output_dir", "pretrained_backbone", "batch_size", "coco_path"):
        assert flag not in flags
    assert len(flags) == len(set(flags))
    assert set(flags) <= set(vars(options.parse([])))


def test_the_configuration_round_trips_as_plain_data(tmp_path):
    config = ModelConfig.from_args(tiny_model_args(**DEFORMABLE_TWO_STAGE))
    torch.save({"config": config.to_dict()}, tmp_path / "c.pth")
    saved = torch.load(tmp_path / "c.pth", weights_only=True)["config"]
    assert ModelConfig.from_dict(saved) == config
    with pytest.raises(ValueError, match=r"c\.pth.*\['colour'\]"):
        ModelConfig.from_dict(saved | {"colour": "red"}, source=str(tmp_path / "c.pth"))


@pytest.mark.parametrize("switches", [{}, DEFORMABLE_TWO_STAGE], ids=["detr", "deformable"])
def test_a_checkpoint_of_flags_alone_rebuilds_the_same_model(tmp_path, switches):
    """A checkpoint in the layout that saved the run's flags ("args") and no configuration, as
    written by this test, rebuilds its model: same weights, same detections."""
    args = tiny_model_args(**switches)
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    flags = {k: v for k, v in vars(args).items() if k != "pretrained_backbone"}
    state = {"model": model.state_dict(), "args": flags, "epoch": 3}
    torch.save(state, tmp_path / "old.pth")
    rebuilt, postprocess, config, _ = rebuild_detector(tmp_path / "old.pth")
    assert config == dataclasses.replace(ModelConfig.from_args(args), pretrained_backbone=None)
    images, _ = tiny_batch()
    with torch.no_grad():
        expected, got = model(images), rebuilt.eval()(images)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], atol=0, rtol=0)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], atol=0, rtol=0)
    # A flag the layout lacks (added later) takes its default; the class count is read from
    # the class head where the flags left it unresolved.
    del state["args"]["set_cost_giou"]
    state["args"]["num_classes"] = None
    torch.save(state, tmp_path / "older.pth")
    _, _, older, _ = rebuild_detector(tmp_path / "older.pth")
    assert older.num_classes == NUM_CLASSES and older.loss.set_cost_giou == 2.0


def test_a_checkpoint_with_its_configuration_needs_no_flags(tmp_path):
    args = tiny_model_args(**DEFORMABLE_TWO_STAGE)
    model, _, _ = build_model(args)
    config = ModelConfig.from_args(args)
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, tmp_path / "c.pth")
    rebuilt, _, saved, _ = rebuild_detector(tmp_path / "c.pth")
    assert saved.aids == config.aids and saved.transformer == "deformable"
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_builders_take_the_configuration_alone():
    config = ModelConfig(
        backbone="pvt_tiny", num_classes=4, num_queries=5, hidden_dim=32, nheads=2, enc_layers=1,
        dec_layers=2, dim_feedforward=64, feature_stage=2, aids={"one_to_many": {
            "one_to_many_queries": 6, "one_to_many_k": 2, "one_to_many_weight": 1.0}},
    )  # fmt: skip
    model, criterion = build_detector(config), build_criterion(config)
    assert model.query_embed.weight.shape == (5 + 6, 32) and "one_to_many" in model.aids
    assert criterion.num_classes == 4 and criterion.weight_dict["loss_bbox"] == 5.0
    with pytest.raises(ValueError, match="unknown training aids \\['glitter'\\]"):
        build_detector(dataclasses.replace(config, aids={"glitter": {}}))
    with pytest.raises(ValueError, match="--box_refine: the deformable transformer reads"):
        build_detector(dataclasses.replace(config, box_refine=True))


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_every_transformer_follows_the_protocol(name):
    """encode -> a Memory whose levels add up to its cells; decode -> a Decoded with every
    layer's output; the detector is these parts composed."""
    model = build_tiny(transformer=name, dropout=0.0, drop_path=0.0)[0].eval()
    transformer = model.transformer
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        levels = model.input_proj(model.backbone(images, mask), model.backbone[1])
        memory = transformer.encode(levels)
        rows = model.query_embed.weight[None].expand(2, -1, -1)
        queries = Queries(*transformer.learned_queries(rows))
        decoded = transformer.decode(queries, memory, None, model.bbox_embed)
        outputs = model(images)
    assert isinstance(memory, Memory) and isinstance(decoded, Decoded)
    cells = sum(h * w for h, w in memory.spatial_shapes)
    assert memory.memory.shape == (2, cells, transformer.d_model)
    assert memory.padding_mask.shape == (2, cells)
    layers = len(transformer.decoder.layers)
    assert decoded.hs.shape == (layers, 2, QUERIES, transformer.d_model)
    boxes = decoded.boxes
    if boxes is None:  # DETR's: the box head predicts them
        boxes = model.bbox_embed(decoded.hs).sigmoid()
    torch.testing.assert_close(outputs["pred_boxes"], boxes[-1])


def test_importing_the_hub_entry_points_imports_no_data_code():
    code = (
        "import sys, hubconf; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('datasets', 'pycocotools', 'options', 'training', 'engine')]; "
        "print(loaded); assert not loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.slow
def test_main_saves_the_configuration_and_the_model_rebuilds_from_it_alone(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1", "--transformer", "deformable", "--two_stage"))
    state = checkpoint.load(out / "checkpoint.pth")
    args = argparse.Namespace(**state["args"])
    assert ModelConfig.from_dict(state["config"]) == ModelConfig.from_args(args)
    del state["args"]  # the configuration alone rebuilds the model
    torch.save(state, tmp_path / "config_only.pth")
    model, _, config, _ = rebuild_detector(tmp_path / "config_only.pth")
    assert config.transformer == "deformable" and "enc" in config.aids
    saved = checkpoint.load(out / "checkpoint.pth")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
