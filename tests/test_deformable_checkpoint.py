"""Official Deformable DETR checkpoints load (models.deformable_checkpoint): a file in the
official layout, written here from a reference computation of the official forward
(tests/reference_deformable.py) with random weights, gives the same outputs in this repository's
model: one-stage, with iterative box refinement, and two-stage with refinement."""

import argparse

import pytest
import torch

import training
from models import build_detector
from models.config import ModelConfig
from models.detr import load_detr_checkpoint
from models.neck import ConvLevel
from tests import reference_deformable as official
from util import checkpoint

CLASSES, QUERIES, D, HEADS, ENC, DEC, FFN = 5, 7, 32, 4, 2, 2, 64


# (box refinement, two-stage): the three official releases.
RELEASES = [(False, False), (True, False), (True, True)]


def official_checkpoint(
    path, box_refine: bool, two_stage: bool = False, seed: int = 0
) -> official.DeformableDETR:
    """Write an official-layout checkpoint of random weights to ``path``; return its model."""
    torch.manual_seed(seed)
    reference = official.DeformableDETR(
        CLASSES, QUERIES, D, HEADS, ENC, DEC, FFN, box_refine, two_stage
    )
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if not name.startswith("backbone."):  # non-zero offsets, biases and norms
                parameter.normal_(0.0, 0.2 if parameter.dim() > 1 else 0.5)
    args = argparse.Namespace(two_stage=two_stage, with_box_refine=box_refine, num_queries=QUERIES)
    torch.save({"model": reference.state_dict(), "args": args, "epoch": 49}, path)
    return reference.eval()


def repository_model(
    box_refine: bool, two_stage: bool = False, mixed: bool = False, num_classes: int = CLASSES
):
    aids = {"enc": {"two_stage": True, "mixed_selection": mixed}} if two_stage else {}
    config = ModelConfig(
        backbone="resnet50", transformer="deformable", num_classes=num_classes,
        num_queries=QUERIES, hidden_dim=D, nheads=HEADS, enc_layers=ENC, dec_layers=DEC,
        dim_feedforward=FFN, dropout=0.0, drop_path=0.0, cls_loss="focal",
        box_refine=box_refine, aids=aids,
    )  # fmt: skip
    return build_detector(config).eval()


@pytest.mark.parametrize(("box_refine", "two_stage"), RELEASES)
def test_an_official_checkpoint_loads_and_its_outputs_match_the_official_forward(
    tmp_path, box_refine, two_stage
):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    reference = official_checkpoint(path, box_refine, two_stage)
    model = repository_model(box_refine, two_stage)
    assert isinstance(model.input_proj.extra_levels[0], ConvLevel)  # the official 3x3 conv
    assert not hasattr(model, "query_embed") if two_stage else hasattr(model, "query_embed")
    load_detr_checkpoint(model, path)
    images = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(images), model(images)
        if two_stage:  # the proposals' set, a training output (dropout is 0)
            got["enc_outputs"] = model.train()(images)["enc_outputs"]
    pairs = [(expected, got), *zip(expected["aux_outputs"], got["aux_outputs"], strict=True)]
    if two_stage:
        pairs.append((expected["enc_outputs"], got["enc_outputs"]))
    for want, have in pairs:
        for key in ("pred_logits", "pred_boxes"):
            scale = max(want[key].abs().max().item(), 1.0)
            assert (want[key] - have[key]).abs().max().item() <= 1e-4 * scale, key
    # The boxes are not at their initial values: the sampling and the heads were exercised.
    assert expected["pred_boxes"].std() > 0.05


def test_a_model_of_another_kind_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    official_checkpoint(path, box_refine=True, two_stage=True)
    detr = build_detector(ModelConfig(backbone="resnet50", num_classes=CLASSES, hidden_dim=D))
    with pytest.raises(ValueError, match=r"official Deformable DETR.*--transformer deformable"):
        load_detr_checkpoint(detr, path)
    for model in (repository_model(True), repository_model(True, True, mixed=True)):
        with pytest.raises(ValueError, match="two-stage Deformable DETR checkpoint; build the"):
            load_detr_checkpoint(model, path)


def test_finetune_takes_an_official_file_and_keeps_its_own_class_heads_for_other_classes(
    tmp_path,
):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    reference = official_checkpoint(path, box_refine=True, two_stage=True)
    model = repository_model(True, True, num_classes=CLASSES + 2)
    own = {k: v.clone() for k, v in model.state_dict().items() if "class_embed" in k}
    training.finetune(argparse.Namespace(finetune=str(path)), checkpoint.load(path), model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in own.items())  # the model's own heads
    assert {k for k in own if k.startswith("aids.enc.")}  # the proposals' head too
    official = reference.state_dict()
    assert torch.equal(state["transformer.level_embed"], official["transformer.level_embed"])
    assert torch.equal(state["aids.enc.pos_trans.weight"], official["transformer.pos_trans.weight"])
