"""Deformable DETR (``--transformer deformable``): outputs with and without box refinement, the
official initialisation, gradients, batch invariance end to end, no convolution, training (alone
and with query groups), the flags, and a checkpoint that rebuilds its model."""

import math

import pytest
import torch
from torch import nn

import options
import predict
from models.backbone import RESNET_LAYERS, build_backbone
from models.deformable import DeformableTransformer, MSDeformAttn
from models.detr import DETR, load_detr_checkpoint
from models.neck import InputLevels
from tests.conftest import (
    DEC,
    NUM_CLASSES,
    QUERIES,
    build_tiny,
    run_main,
    tiny_argv,
    tiny_batch,
    to_device,
    train_on_tiny_batch,
)
from tests.op_trace import aten_ops, convolution_ops
from tools.attention_maps import DetrAttention
from training import build_optimizer
from util.errors import UserError

# The tiny detector's Deformable DETR: its PVT-Tiny ends at stage 2 (stride 8), which gives one
# level; three extra levels follow (strides 16, 32, 64). STAGE_4 is the default layout: stages
# 2-4 (strides 8, 16, 32) and one extra level (64).
DEFORMABLE = {"transformer": "deformable", "dropout": 0.0, "drop_path": 0.0}
STAGE_4 = {**DEFORMABLE, "feature_stage": 4}


def images(seed: int = 0) -> list[torch.Tensor]:
    """Odd sizes: none is a multiple of 32 or 64."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in ((75, 101), (130, 170))]


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-4) -> None:
    """fp32 agreement: differences within ``tolerance`` of the values' scale."""
    scale = max(a.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= tolerance * scale


def all_sets(outputs: dict) -> list[dict]:
    return [outputs, *outputs.get("aux_outputs", [])]


def assert_same_inference_outputs(out: dict, expected: dict) -> None:
    """``out`` has only the inference sets, and every one equals ``expected``'s to the bit."""
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    for one, other in zip(all_sets(out), all_sets(expected), strict=True):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(one[key], other[key], atol=0.0, rtol=0.0)


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("box_refine", [False, True])
def test_outputs_and_parameters_with_and_without_box_refinement(box_refine):
    model = build_tiny(**DEFORMABLE, box_refine=box_refine)[0]
    assert isinstance(model.transformer, DeformableTransformer)
    assert isinstance(model.input_proj, InputLevels)
    assert model.backbone.out_strides == (8,) and len(model.input_proj.extra_levels) == 3
    assert model.transformer.num_feature_levels == 4
    assert model.query_embed.weight.shape == (QUERIES, 2 * model.transformer.d_model)
    keys = set(model.state_dict())
    per_layer = {f"bbox_embed.{i}.layers.2.weight" for i in range(DEC)}
    per_layer |= {f"class_embed.{i}.weight" for i in range(DEC)}  # cloned, as the official
    shared = {"bbox_embed.layers.2.weight", "class_embed.weight"}
    assert per_layer <= keys if box_refine else shared <= keys
    first = "class_embed.0" if box_refine else "class_embed"
    assert model.class_count_keys()[:2] == (f"{first}.weight", f"{first}.bias")
    images_, targets = tiny_batch()
    out = model.train()(images_, targets=targets)
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert len(out["aux_outputs"]) == DEC - 1
    for one in all_sets(out):
        assert one["pred_logits"].shape == (2, QUERIES, 4)  # 3 classes + no-object
        assert one["pred_boxes"].shape == (2, QUERIES, 4)
        assert ((one["pred_boxes"] > 0) & (one["pred_boxes"] < 1)).all()


def test_positions_are_at_cell_centres_for_deformable_detr_and_count_from_1_for_detr():
    deformable, detr = build_tiny(**DEFORMABLE)[0], build_tiny()[0]
    assert deformable.backbone[1].offset == 0.5 and detr.backbone[1].offset == 0.0
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    # Deformable DETR's first column: (1 - 0.5) / 4 of 2 pi; its features are the sines and
    # cosines of that angle over the frequencies.
    first = deformable.backbone[1](mask)[0, :, 0, 0]
    x_half = first[first.shape[0] // 2 :]
    assert x_half[0].item() == pytest.approx(math.sin(0.5 / 4 * 2 * math.pi), abs=1e-5)
    assert x_half[1].item() == pytest.approx(math.cos(0.5 / 4 * 2 * math.pi), abs=1e-5)
    x_detr = detr.backbone[1](mask)[0, first.shape[0] // 2 :, 0, 0]
    assert x_detr[0].item() == pytest.approx(math.sin(1 / 4 * 2 * math.pi), abs=1e-5)


def test_per_layer_class_heads_load_one_shared_head_and_fine_tune_to_other_classes():
    model = build_tiny(**DEFORMABLE, box_refine=True)[0]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("class_embed.")}
    head = torch.nn.Linear(model.transformer.d_model, NUM_CLASSES + 1)
    state |= {"class_embed.weight": head.weight.detach(), "class_embed.bias": head.bias.detach()}
    load_detr_checkpoint(model, state)  # a file of one shared head: every layer starts from it
    for layer in model.class_embed:
        assert torch.equal(layer.weight, head.weight) and torch.equal(layer.bias, head.bias)
    other = {k: v for k, v in state.items() if not k.startswith("class_embed.")}
    other |= {f"class_embed.{i}.{k}": torch.zeros(7, *v.shape[1:]) for i in range(DEC)
              for k, v in head.state_dict().items()}  # fmt: skip
    with pytest.raises(ValueError, match="7 outputs"):
        load_detr_checkpoint(model, other)
    load_detr_checkpoint(model, other, drop_class_head=True)  # keeps its own heads
    assert torch.equal(model.class_embed[0].weight, head.weight)


def test_lr_linear_proj_mult_scales_the_sampling_offsets_and_the_reference_point_map():
    """Deformable DETR's recipe: those parameters in a group of their own at lr x 0.1; every
    trainable parameter in exactly one group; by default the two groups of DETR."""
    model = build_tiny(**DEFORMABLE)[0]
    argv = ["--lr", "2e-4", "--lr_backbone", "2e-5", "--lr_linear_proj_mult", "0.1"]
    optimizer = build_optimizer(model, options.parse(argv))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = {names[id(p)] for p in optimizer.param_groups[2]["params"]}
    expected = {
        n for n, p in model.named_parameters()
        if p.requires_grad and ("sampling_offsets" in n or "reference_points" in n)
    }  # fmt: skip
    assert scaled == expected and any("reference_points" in n for n in scaled)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(build_optimizer(model, options.parse([])).param_groups) == 2


def test_stage_4_gives_strides_8_16_32_and_an_extra_level_at_64():
    model = build_tiny(**STAGE_4)[0]
    assert model.backbone.out_strides == (8, 16, 32)
    assert len(model.input_proj.input_proj) == 3 and len(model.input_proj.extra_levels) == 1
    three = build_tiny(**STAGE_4, num_feature_levels=3)[0]
    assert three.backbone.out_strides == (8, 16, 32) and len(three.input_proj.extra_levels) == 0
    one = build_tiny(**STAGE_4, num_feature_levels=1)[0]
    assert one.backbone.out_strides == (32,)
    stage_3 = build_tiny(**DEFORMABLE, feature_stage=3)[0]
    assert stage_3.backbone.out_strides == (8, 16) and len(stage_3.input_proj.extra_levels) == 2


def test_resnet50_gives_layers_2_to_4_and_an_image_detects_the_same_alone_and_batched():
    model = build_tiny(**DEFORMABLE, backbone="resnet50", feature_stage=4)[0].eval()
    assert model.backbone.out_channels == tuple(c for c, _ in RESNET_LAYERS.values())
    assert model.backbone.out_strides == (8, 16, 32)
    first, large = images()
    with torch.no_grad():
        alone, batch = model([first]), model([large, first])
    for key in ("pred_logits", "pred_boxes"):
        assert_close_to_scale(batch[key][1], alone[key][0])


@pytest.mark.parametrize("box_refine", [False, True])
def test_at_initialisation_boxes_start_at_the_reference_points(box_refine):
    """The box head's last layer is zero with a width and height bias of -2 (the first head's
    alone with refinement): the first layer's boxes sit on the queries' reference points, and
    with refinement the later layers keep the first layer's box."""
    model = build_tiny(**DEFORMABLE, box_refine=box_refine)[0].eval()
    with torch.no_grad():
        out = model(images())
        query_pos = model.query_embed.weight[:, : model.transformer.d_model]
        reference = model.transformer.reference_points(query_pos).sigmoid()
    first = out["aux_outputs"][0]["pred_boxes"]
    torch.testing.assert_close(first[..., :2], reference.expand_as(first[..., :2]))
    torch.testing.assert_close(first[..., 2:], torch.full_like(first[..., 2:], 1 / (1 + math.e**2)))
    if box_refine:
        torch.testing.assert_close(out["pred_boxes"], first)


@pytest.mark.parametrize("box_refine", [False, True])
def test_every_parameter_gets_a_gradient(box_refine, device):
    """Every trainable parameter gets a finite gradient; by the second step none is zero (the
    official initialisation zeroes the box head's last layer and the sampling offsets' and
    weights' maps, which cut some gradients until the first step moves them)."""
    model, criterion, _ = build_tiny(**DEFORMABLE, box_refine=box_refine)
    model.to(device)
    images_, targets = to_device(*tiny_batch(), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        criterion.weighted_total(criterion(model(images_, targets=targets), targets)).backward()
        optimizer.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert [n for n, p in trainable if not torch.isfinite(p.grad).all()] == []
    assert [n for n, p in trainable if not p.grad.any()] == []


@pytest.mark.parametrize(
    "switches",
    [STAGE_4, {**STAGE_4, "box_refine": True}, DEFORMABLE,
     {**STAGE_4, "box_refine": True, "two_stage": True},
     {**STAGE_4, "box_refine": True, "two_stage": True, "mixed_selection": True,
      "query_pos_from_boxes": True, "look_forward_twice": True, "dn_groups": 3,
      "cls_loss": "focal"}],
    ids=["stage4", "stage4-refine", "stage2", "stage4-two-stage", "stage4-dino"],
)  # fmt: skip
def test_an_image_detects_the_same_alone_and_in_a_padded_batch(switches):
    model = build_tiny(**switches)[0].eval()
    first, large = images()
    with torch.no_grad():
        alone, batch = model([first]), model([large, first])
    for one, other in zip(all_sets(alone), all_sets(batch), strict=True):
        for key in ("pred_logits", "pred_boxes"):
            assert_close_to_scale(other[key][1], one[key][0])


def test_an_images_gradient_does_not_depend_on_its_batch_mates():
    """Dropout off. The sampling offsets are moved off their initial whole cells first: at a
    cell centre bilinear interpolation has a kink, and which side's slope a sample gets there
    depends on the last bit of its location, which does depend on the padded map's size."""
    model = build_tiny(**STAGE_4, box_refine=True)[0]
    with torch.no_grad():
        for module in model.transformer.modules():
            if isinstance(module, MSDeformAttn):
                module.sampling_offsets.bias.add_(0.3)
    first, large = images()
    grads = []
    for batch in ([first], [large, first]):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        index = len(batch) - 1
        (out["pred_logits"][index].square().sum() + out["pred_boxes"][index].sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("input_proj.extra_levels") for n in grads[0])
    for name, grad in grads[0].items():
        assert_close_to_scale(grads[1][name], grad, 1e-3)


def test_forward_and_backward_run_no_convolution():
    """With every aid that combines with the deformable transformer."""
    model, criterion, _ = build_tiny(
        **STAGE_4, box_refine=True, two_stage=True, query_groups=2, one_to_many_queries=6,
        cls_loss="focal",
    )  # fmt: skip
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    images_, targets = tiny_batch()

    def step():
        criterion.weighted_total(criterion(model(images_, targets=targets), targets)).backward()

    ops = aten_ops(step)
    assert "_embedding_bag_forward_only" in ops and ("mm" in ops or "addmm" in ops)  # it ran
    assert convolution_ops(ops) == set()


# --- training and the training aids ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches", [DEFORMABLE, {**DEFORMABLE, "box_refine": True}], ids=["plain", "box_refine"]
)
def test_a_tiny_model_trains_on_a_fixed_batch(switches):
    """60 steps at lr 1e-3: the loss falls by half (to about a tenth, seen)."""
    losses = train_on_tiny_batch(*build_tiny(**switches)[:2], steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


@pytest.mark.slow
def test_query_groups_train_and_evaluate_as_group_0():
    grouped, criterion, _ = build_tiny(**DEFORMABLE, query_groups=2)
    assert grouped.query_embed.weight.shape[0] == 2 * QUERIES
    losses = train_on_tiny_batch(grouped, criterion, steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    plain = build_tiny(**DEFORMABLE, seed=1)[0]
    state = grouped.state_dict()
    state["query_embed.weight"] = state["query_embed.weight"][:QUERIES]
    plain.load_state_dict(state)
    with torch.no_grad():
        out, expected = grouped.eval()(images()), plain.eval()(images())
    assert_same_inference_outputs(out, expected)


def test_a_query_group_sees_only_its_own_group():
    """Perturbing group 1's queries leaves group 0's predictions (the matching set) alone."""
    model = build_tiny(**DEFORMABLE, query_groups=3)[0].train()
    images_, _ = tiny_batch()
    with torch.no_grad():
        before = model(images_)
        model.query_embed.weight[QUERIES : 2 * QUERIES] += 1.0
        after = model(images_)
    for one, other in zip(all_sets(before), all_sets(after), strict=True):
        torch.testing.assert_close(one["pred_boxes"], other["pred_boxes"], atol=1e-6, rtol=0)
    changed = after["group_outputs"][0]["pred_boxes"] - before["group_outputs"][0]["pred_boxes"]
    assert changed.abs().max() > 1e-4


def test_an_aid_that_drives_the_decoder_is_refused():
    with pytest.raises(ValueError, match="'anchors' .* does not combine with the deformable"):
        build_tiny(**DEFORMABLE, anchor_queries=True)


# --- flags and checkpoints ---------------------------------------------------------------------


def test_the_flags_are_architecture_flags_and_reach_the_model():
    flags = ["--transformer", "deformable", "--num_feature_levels", "3", "--enc_n_points", "2"]
    flags += ["--dec_n_points", "3", "--box_refine"]
    args = options.parse(flags)
    for name in ("transformer", "num_feature_levels", "enc_n_points", "dec_n_points", "box_refine"):
        assert name in options.checkpoint_flags()
    model = build_tiny(**{k: getattr(args, k) for k in ("num_feature_levels", "box_refine")},
                       transformer="deformable", enc_n_points=2, dec_n_points=3)[0]  # fmt: skip
    encoder_attn = model.transformer.encoder.layers[0].self_attn
    decoder_attn = model.transformer.decoder.layers[0].cross_attn
    assert (encoder_attn.n_levels, encoder_attn.n_points, decoder_attn.n_points) == (3, 2, 3)
    assert isinstance(model.bbox_embed, nn.ModuleList)


def test_detr_is_the_default_and_refuses_the_deformable_flags():
    assert options.parse([]).transformer == "detr"
    assert type(build_tiny()[0]) is DETR
    for flags, message in [
        ({"box_refine": True}, "--box_refine: the deformable transformer reads"),
        ({"num_feature_levels": 3, "dec_n_points": 2}, "--num_feature_levels 3, --dec_n_points 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_tiny(**flags)
    with pytest.raises(ValueError, match="--pre_norm"):
        build_tiny(**DEFORMABLE, pre_norm=True)


def test_the_backbone_refuses_levels_it_does_not_have():
    with pytest.raises(ValueError, match="resnet50 returns 1 to 3"):
        build_backbone("resnet50", levels=4)
    with pytest.raises(ValueError, match="3 backbone levels ending at PVT stage 2"):
        build_backbone("pvt_tiny", feature_stage=2, levels=3)


def test_main_refuses_a_conflict_in_one_line(tmp_path):
    argv = tiny_argv(tmp_path / "data", tmp_path / "run", "--transformer", "deformable")
    with pytest.raises(UserError, match="'anchors' represents the queries"):
        run_main([*argv, "--anchor_queries"])


@pytest.mark.slow
def test_a_checkpoint_evaluates_from_the_data_flags_alone_and_predicts(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    switches = ["--transformer", "deformable", "--box_refine", "--query_groups", "2"]
    run_main(tiny_argv(data, out, "--epochs", "1", *switches))
    evaluation = tmp_path / "eval"  # the data flags alone: the architecture from the checkpoint
    data_flags = tiny_argv(data, evaluation)[: tiny_argv(data, evaluation).index("--backbone")]
    run_main([*data_flags, "--eval", "--resume", str(out / "checkpoint.pth"), "--num_workers", "0",
              "--output_dir", str(evaluation)])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert "--transformer deformable: taken from" in log and "--box_refine True" in log
    assert "coco_AP50" in log
    model, args = predict.load_model(str(out / "checkpoint.pth"), torch.device("cpu"))
    assert isinstance(model.transformer, DeformableTransformer)
    assert args.box_refine and model.transformer.box_refine and not model.training
    with torch.no_grad():
        outputs = model(images())
    assert outputs["pred_boxes"].shape == (2, QUERIES, 4)
    assert torch.isfinite(outputs["pred_logits"]).all()


def test_attention_maps_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="decoder is another .* drop --attention"):
        DetrAttention(build_tiny(**DEFORMABLE)[0])
