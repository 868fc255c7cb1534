"""DINO's pieces on the deformable decoder: contrastive denoising (``--dn_groups`` with
``--transformer deformable``), query positions computed from the boxes at every layer
(``--query_pos_from_boxes``) and look-forward-twice (``--look_forward_twice``): the noise, the
isolation of the groups and of their negatives, gradients, inference without training-only
queries, no convolution, training, and a checkpoint that evaluates, predicts and exports.
Batch invariance: ``stage4-dino`` in tests/test_deformable_detr.py."""

import math

import pytest
import torch
from torch import nn

import export
import options
import predict
from models.aids.denoising import contrastive_boxes, contrastive_targets
from models.position_encoding import box_sine_encoding
from tests.conftest import (
    NUM_CLASSES,
    QUERIES,
    build_tiny,
    run_main,
    tiny_argv,
    tiny_batch,
    train_on_tiny_batch,
)
from tests.op_trace import aten_ops, convolution_ops
from tests.test_deformable_detr import (
    all_sets,
    assert_same_inference_outputs,
    images,
)
from util.boxes import cxcywh_to_xyxy

# DINO on the tiny detector: Deformable DETR with box refinement, DINO's mixed selection, the
# positions from the boxes, look-forward-twice, 3 contrastive groups, focal classification.
REFINE = {"transformer": "deformable", "box_refine": True, "dropout": 0.0, "drop_path": 0.0}
MIXED = {**REFINE, "two_stage": True, "mixed_selection": True}
POSITIONS = {**MIXED, "query_pos_from_boxes": True}
DINO = {
    **POSITIONS, "look_forward_twice": True, "dn_groups": 3, "dn_box_noise": 1.0,
    "dn_label_noise": 0.25, "cls_loss": "focal",
}  # fmt: skip
DINO_FLAGS = [
    "--transformer", "deformable", "--box_refine", "--two_stage", "--mixed_selection",
    "--query_pos_from_boxes", "--look_forward_twice", "--dn_groups", "2", "--dn_box_noise",
    "1.0", "--dn_label_noise", "0.25", "--cls_loss", "focal",
]  # fmt: skip


# --- the contrastive queries -------------------------------------------------------------------


def test_positive_corners_move_less_than_half_the_size_and_negative_ones_up_to_twice_that():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(2000, 1)  # far from the image's edges
    negative = torch.arange(2000) >= 1000
    noised = contrastive_boxes(boxes, negative, scale=0.5)
    moved = (cxcywh_to_xyxy(noised) - cxcywh_to_xyxy(boxes)).abs()
    half = torch.tensor([0.1, 0.15, 0.1, 0.15]) * 0.5  # half the size, times the scale
    ratio = moved / half
    assert ratio[~negative].max() < 1 + 1e-4 and ratio[~negative].max() > 0.9
    assert ratio[negative].min() > 1 - 1e-4 and ratio[negative].max() < 2 + 1e-4
    # Clamped to the image, with a positive size, whatever the scale.
    wild = contrastive_boxes(torch.rand(500, 4) * 0.5 + 0.25, torch.rand(500) > 0.5, 5.0)
    corners = cxcywh_to_xyxy(wild)
    assert (corners >= -1e-6).all() and (corners <= 1 + 1e-6).all()
    assert (wild[:, 2:] > 0).all()


def test_each_group_holds_positives_then_negatives_and_only_positives_are_paired():
    torch.manual_seed(0)
    _, targets = tiny_batch()  # one object, then two: 2 slots of each kind per group
    noised = contrastive_targets(targets, 3, 0.4, 0.0, NUM_CLASSES)
    assert noised.labels.shape == (2, 3 * 2 * 2) and noised.boxes.shape == (2, 12, 4)
    valid = torch.tensor([[1, 0, 1, 0] * 3, [1, 1, 1, 1] * 3], dtype=torch.bool)
    assert torch.equal(noised.valid, valid)
    for image, (query, target) in enumerate(noised.indices):
        count = len(targets[image]["labels"])
        expected = torch.cat([g * 4 + torch.arange(count) for g in range(3)])
        assert torch.equal(query, expected)  # the positive slots only
        assert torch.equal(target, torch.arange(count).repeat(3))
        # Labels unflipped (no label noise); padding slots get num_classes.
        positives, negatives = noised.labels[image].view(3, 2, 2).unbind(1)
        assert torch.equal(positives[:, :count], targets[image]["labels"].repeat(3, 1))
        assert torch.equal(negatives, positives)
    assert (noised.labels[0].view(3, 2, 2)[:, :, 1] == NUM_CLASSES).all()


def test_the_denoising_block_brings_reference_boxes_and_no_positions():
    model = build_tiny(**DINO)[0].train()
    _, targets = tiny_batch()
    blocks = model.aids["dn"].training_blocks(None, QUERIES, targets)
    assert len(blocks) == 1 and blocks[0].attention_groups == 3 and blocks[0].sees_matching
    assert blocks[0].queries.reference.shape == (2, 12, 4)
    assert blocks[0].queries.position.shape == (2, 12, 0)  # the decoder computes them


def record_blocks(model, targets):
    """The denoising block of one training forward, and a function that runs the model again
    with that block (optionally changed)."""
    aid = model.aids["dn"]
    original = aid.training_blocks
    block = original(None, QUERIES, targets)[0]

    def run(images_, change=None):
        given = block if change is None else change(block)
        aid.training_blocks = lambda *args: [given]
        try:
            return model(images_, targets=targets)
        finally:
            aid.training_blocks = original

    return block, run


def test_a_group_and_its_negatives_never_reach_the_matching_queries_or_other_groups():
    """Changing group 1's contents (its positives and its negatives) leaves the matching
    queries' predictions and groups 0 and 2 exactly as they were, and changes group 1."""
    torch.manual_seed(0)
    model = build_tiny(**DINO)[0].train()
    images_, targets = tiny_batch()
    block, run = record_blocks(model, targets)
    size = len(block.queries) // block.attention_groups

    def change_group_1(block):
        content = block.queries.content.clone()
        content[:, size : 2 * size] += 3.0
        queries = type(block.queries)(content, block.queries.position, block.queries.reference)
        return type(block)(**{**block.__dict__, "queries": queries})

    with torch.no_grad():
        before, after = run(images_), run(images_, change_group_1)
    for one, other in zip(all_sets(before), all_sets(after), strict=True):
        torch.testing.assert_close(one["pred_boxes"], other["pred_boxes"], atol=0, rtol=0)
        torch.testing.assert_close(one["pred_logits"], other["pred_logits"], atol=0, rtol=0)
    dn_before, dn_after = before["dn_outputs"]["pred_logits"], after["dn_outputs"]["pred_logits"]
    keep = torch.cat([torch.arange(size), torch.arange(2 * size, 3 * size)])
    torch.testing.assert_close(dn_before[:, keep], dn_after[:, keep], atol=0, rtol=0)
    group_1 = slice(size, 2 * size)
    assert (dn_before[:, group_1] - dn_after[:, group_1]).abs().max() > 1e-3


def test_negatives_are_scored_as_no_object_and_positives_against_their_targets():
    """The denoising set pairs the positives alone; making a negative predict its target with
    certainty raises the class loss (it is no-object), making a positive do so lowers it."""
    torch.manual_seed(0)
    model, criterion, _ = build_tiny(**DINO)
    images_, targets = tiny_batch()
    with torch.no_grad():
        outputs = model.train()(images_, targets=targets)
    dn = outputs["dn_outputs"]
    base = criterion(outputs, targets)["loss_ce_dn"]
    size = dn["pred_logits"].shape[1] // 3  # 2 positive and 2 negative slots per group
    for slot, effect in ((0, -1), (size // 2, 1)):  # image 0's first positive, first negative
        logits = dn["pred_logits"].clone()
        logits[0, slot] = -20.0
        logits[0, slot, targets[0]["labels"][0]] = 20.0
        changed = dict(outputs, dn_outputs=dict(dn, pred_logits=logits))
        loss = criterion(changed, targets)["loss_ce_dn"]
        assert (loss - base).sign() == effect, (slot, base, loss)


def test_dn_max_queries_caps_the_groups_of_a_batch():
    model = build_tiny(**{**DINO, "dn_groups": 10, "dn_max_queries": 5})[0].train()
    _, targets = tiny_batch()  # at most two objects: 5 // 2 = 2 groups
    block = model.aids["dn"].training_blocks(None, QUERIES, targets)[0]
    assert block.attention_groups == 2 and len(block.queries) == 2 * 2 * 2


# --- the decoder -------------------------------------------------------------------------------


def test_every_layer_computes_the_query_positions_from_its_own_boxes():
    model = build_tiny(**POSITIONS)[0].eval()
    decoder = model.transformer.decoder
    assert model.query_embed.weight.shape == (QUERIES, 32)  # content alone
    assert not hasattr(model.aids["enc"], "pos_trans")
    nn.init.normal_(model.bbox_embed[0].layers[-1].weight, std=0.1)  # layer 0 moves the boxes
    seen, ratios = [], []

    def record_layer(_, args):
        seen.append((args[1], args[2]))  # query_pos, the references scaled to each level

    def record_ratios(_, args):
        ratios.append(args[3].valid_ratios[:, 0])  # the finest level's

    hooks = [layer.register_forward_pre_hook(record_layer) for layer in decoder.layers]
    hooks.append(decoder.register_forward_pre_hook(record_ratios))
    with torch.no_grad():
        model(images())
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2
    for query_pos, scaled in seen:
        box = scaled[:, :, 0] / torch.cat([ratios[0]] * 2, -1)[:, None]
        expected = decoder.ref_point_head(box_sine_encoding(box, 32))
        torch.testing.assert_close(query_pos, expected, atol=1e-5, rtol=1e-4)
    assert (seen[0][0] - seen[1][0]).abs().max() > 1e-4  # the second layer's boxes moved


def test_look_forward_twice_keeps_the_boxes_and_sends_a_layers_box_loss_to_the_layer_before():
    torch.manual_seed(0)
    plain = build_tiny(**POSITIONS)[0].train()
    twice = build_tiny(**POSITIONS, look_forward_twice=True)[0].train()
    twice.load_state_dict(plain.state_dict())
    images_, targets = tiny_batch()
    grads = []
    for model in (plain, twice):
        torch.manual_seed(1)
        out = model(images_, targets=targets)
        out["pred_boxes"].sum().backward()  # the last layer's boxes alone
        grads.append(model.bbox_embed[0].layers[-1].bias.grad)
        if model is plain:
            boxes = out["pred_boxes"].detach()
    torch.testing.assert_close(out["pred_boxes"].detach(), boxes, atol=0, rtol=0)
    assert grads[0] is None or grads[0].abs().max() == 0  # detached: nothing reaches layer 0
    assert grads[1].abs().max() > 0


def test_the_switches_are_refused_where_they_cannot_act():
    with pytest.raises(ValueError, match="--query_pos_from_boxes .* add --two_stage"):
        build_tiny(**REFINE, query_pos_from_boxes=True)
    with pytest.raises(ValueError, match="--look_forward_twice .* add --box_refine"):
        build_tiny(transformer="deformable", look_forward_twice=True)
    with pytest.raises(ValueError, match="--query_pos_from_boxes: the deformable transformer"):
        build_tiny(query_pos_from_boxes=True)
    for flags, message in [
        (["--dn_groups", "2"], "contrastive denoising: .* add --two_stage --mixed_selection"),
        (["--two_stage", "--query_pos_from_boxes"], "add --mixed_selection"),
    ]:
        with pytest.raises(SystemExit, match=message):
            options.check_args(options.parse(["--transformer", "deformable", *flags]))
    options.check_args(options.parse(DINO_FLAGS))


# --- the whole model ---------------------------------------------------------------------------


def test_every_parameter_gets_a_finite_gradient():
    """After one step (the zero-initialised box heads' last layers move), every parameter,
    the denoising label embedding and the position MLP included, gets a nonzero gradient."""
    torch.manual_seed(0)
    model, criterion, _ = build_tiny(**DINO, feature_stage=4)
    images_, targets = tiny_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        criterion.weighted_total(criterion(model(images_, targets=targets), targets)).backward()
        optimizer.step()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("aids.dn.label_embed") for n, _ in trainable)
    assert any(n.startswith("transformer.decoder.ref_point_head") for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None or not p.grad.any()] == []
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


def test_inference_runs_the_matching_queries_alone_as_a_model_without_denoising():
    """In evaluation mode the outputs are those of the same weights without denoising, with no
    training-only set."""
    trained = build_tiny(**DINO)[0]
    plain = build_tiny(**{**DINO, "dn_groups": 0}, seed=1)[0]
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("aids.dn.")}
    plain.load_state_dict(state)
    with torch.no_grad():
        out, expected = trained.eval()(images()), plain.eval()(images())
    assert out["pred_logits"].shape[1] == QUERIES
    assert_same_inference_outputs(out, expected)


def test_forward_and_backward_run_no_convolution():
    model, criterion, _ = build_tiny(**DINO, feature_stage=4)
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    images_, targets = tiny_batch()

    def step():
        criterion.weighted_total(criterion(model(images_, targets=targets), targets)).backward()

    ops = aten_ops(step)
    assert "_embedding_bag_forward_only" in ops
    assert convolution_ops(ops) == set()


@pytest.mark.parametrize(
    "switches",
    [{**POSITIONS, "look_forward_twice": True}, {**DINO, "cls_loss": "softmax"}, DINO],
    ids=["positions+lft", "dino-softmax", "dino"],
)
def test_a_tiny_model_trains_on_a_fixed_batch(switches):
    """40 steps at lr 1e-3: the loss falls below 3/4 of the first (to about half, seen)."""
    losses = train_on_tiny_batch(*build_tiny(**switches)[:2], steps=40)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses


@pytest.mark.slow
def test_a_checkpoint_evaluates_predicts_and_exports(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1", *DINO_FLAGS))
    checkpoint = out / "checkpoint.pth"
    evaluation = tmp_path / "eval"
    data_flags = tiny_argv(data, evaluation)[: tiny_argv(data, evaluation).index("--backbone")]
    run_main([*data_flags, "--eval", "--resume", str(checkpoint), "--num_workers", "0",
              "--output_dir", str(evaluation)])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert "--query_pos_from_boxes True" in log and "--dn_groups 2" in log
    assert "coco_AP50" in log
    model, args = predict.load_model(str(checkpoint), torch.device("cpu"))
    assert args.look_forward_twice and model.transformer.decoder.ref_point_head is not None
    with torch.no_grad():
        eager = model(images())
    assert eager["pred_boxes"].shape == (2, QUERIES, 4)
    onnx_path = tmp_path / "dino.onnx"
    export.main(export.get_args_parser().parse_args(
        ["--resume", str(checkpoint), "--output", str(onnx_path)]
    ))  # fmt: skip
    inputs = export.padded_batch([(72, 88), (65, 97)], 1, False)
    onnx = export.run_onnx(export.onnx_session(onnx_path), inputs)
    eager = export.run_torch(export.load_detector(str(checkpoint)), inputs, False)
    assert onnx.keys() == eager.keys()
    assert max(export.differences(onnx, eager).values()) <= 1e-4
