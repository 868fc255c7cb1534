"""PVT + DETR and ResNet-50 + DETR end to end, on tiny configurations."""

import argparse

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from models import build_model
from models.attention import set_fused_attention
from models.detr import PostProcess, load_detr_checkpoint
from tests.op_trace import aten_ops, convolution_ops
from tests.test_transformer import (
    DEC,
    ENC,
    FFN,
    HEADS,
    D,
    ReferenceTransformer,
    transformer_inputs,
)
from util.misc import pad_images

NUM_CLASSES, QUERIES = 3, 5


def tiny_args(**overrides) -> argparse.Namespace:
    args = dict(
        backbone="pvt_tiny",
        pretrained_backbone=None,
        feature_stage=4,
        drop_path=0.1,
        lr_backbone=1e-5,
        position_embedding="sine",
        hidden_dim=D,
        nheads=HEADS,
        enc_layers=ENC,
        dec_layers=DEC,
        dim_feedforward=FFN,
        dropout=0.1,
        pre_norm=False,
        num_queries=QUERIES,
        no_aux_loss=False,
        num_classes=NUM_CLASSES,
        set_cost_class=1.0,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
        bbox_loss_coef=5.0,
        giou_loss_coef=2.0,
        eos_coef=0.1,
    )
    return argparse.Namespace(**(args | overrides))


def build(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_args(**overrides))


def batch(seed: int = 0):
    """Two images of different sizes (64 x 96, 48 x 64) and their targets (one and two)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.5]])},
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.4, 0.3]]),
        },
    ]
    return images, targets


def total_loss(criterion, outputs, targets) -> torch.Tensor:
    losses = criterion(outputs, targets)
    return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)


def test_pad_images_pads_bottom_right_and_masks_the_padding():
    a, b = torch.ones(3, 5, 7), 2 * torch.ones(3, 6, 4)
    padded, mask = pad_images([a, b], size_divisibility=4)
    assert padded.shape == (2, 3, 8, 8) and mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(padded[0, :, :5, :7], a) and torch.equal(padded[1, :, :6, :4], b)
    assert padded[0, :, 5:].abs().sum() == 0 and padded[0, :, :, 7:].abs().sum() == 0
    assert torch.equal(~mask[0], padded[0, 0] == 1) and torch.equal(~mask[1], padded[1, 0] == 2)


@pytest.mark.parametrize("aux", [True, False])
def test_output_keys_and_shapes(aux):
    model, _, _ = build(no_aux_loss=not aux)
    images, _ = batch()
    out = model(*pad_images(images))
    assert set(out) == (
        {"pred_logits", "pred_boxes", "aux_outputs"} if aux else {"pred_logits", "pred_boxes"}
    )
    assert out["pred_logits"].shape == (2, QUERIES, NUM_CLASSES + 1)
    assert out["pred_boxes"].shape == (2, QUERIES, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    if aux:
        assert len(out["aux_outputs"]) == DEC - 1
        for layer in out["aux_outputs"]:
            assert layer["pred_logits"].shape == (2, QUERIES, NUM_CLASSES + 1)
            assert layer["pred_boxes"].shape == (2, QUERIES, 4)


def test_a_list_of_images_equals_the_padded_batch_with_its_mask():
    model = build()[0].eval()
    images, _ = batch()
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(*pad_images(images))
    torch.testing.assert_close(from_list["pred_boxes"], from_batch["pred_boxes"])
    torch.testing.assert_close(from_list["pred_logits"], from_batch["pred_logits"])


def test_a_wrong_mask_is_rejected():
    model = build()[0]
    with pytest.raises(ValueError, match="mask must be bool"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64))


def test_forward_and_backward_run_no_convolution():
    model, criterion, _ = build()
    images, targets = batch()

    def step():
        total_loss(criterion, model(images), targets).backward()

    ops = aten_ops(step)
    assert "mm" in ops or "addmm" in ops  # the trace saw the model run
    assert convolution_ops(ops) == set()


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_every_trainable_parameter_gets_a_gradient(position_embedding):
    model, criterion, _ = build(position_embedding=position_embedding)
    images, targets = batch()
    total_loss(criterion, model(images), targets).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch():
    model, criterion, _ = build(dropout=0.0, drop_path=0.0)
    images, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = total_loss(criterion, model(images), targets)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = total_loss(criterion, model(images), targets)
    assert after.item() < before.item()


def test_fused_and_eager_transformer_attention_agree():
    model = build()[0].eval()
    images, _ = batch()
    with torch.no_grad():
        fused = model(images)
        set_fused_attention(model.transformer, False)
        eager = model(images)
    torch.testing.assert_close(fused["pred_boxes"], eager["pred_boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["pred_logits"], eager["pred_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("stage", "channels", "stride"), [(3, 320, 16), (4, 512, 32)])
def test_feature_stage_picks_the_pvt_stage(stage, channels, stride):
    model = build(feature_stage=stage)[0]
    assert (model.backbone.num_channels, model.backbone.stride) == (channels, stride)
    assert model.input_proj.in_features == channels
    assert len(model.backbone[0].body.stages) == stage


def test_lr_backbone_zero_freezes_the_backbone_only():
    model = build(lr_backbone=0.0)[0]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backb"))


def test_postprocess_gives_absolute_xyxy_boxes_in_the_original_size():
    logits = torch.tensor([[[0.0, 2.0, 1.0, 5.0], [3.0, 0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    (result,) = PostProcess()(outputs, torch.tensor([[100, 200]]))
    probs = logits.softmax(-1)[0]
    assert result["labels"].tolist() == [1, 0]  # the no-object column is never a label
    torch.testing.assert_close(result["scores"], torch.stack([probs[0, 1], probs[1, 0]]))
    expected = torch.tensor([[50.0, 25.0, 150.0, 75.0], [0.0, 50.0, 100.0, 100.0]])
    torch.testing.assert_close(result["boxes"], expected)


def test_resnet50_builds_offline_and_runs():
    model = build(backbone="resnet50")[0].eval()
    body = model.backbone[0].body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    with torch.no_grad():
        features, mask, pos = model.backbone(
            torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=bool)
        )
        out = model([torch.randn(3, 64, 96)])
    assert features.shape == (1, 2048, 2, 3) and mask.shape == (1, 2, 3) and pos.shape[1] == D
    assert out["pred_boxes"].shape == (1, QUERIES, 4) and torch.isfinite(out["pred_logits"]).all()


def test_resnet50_rejects_another_feature_stage():
    with pytest.raises(ValueError, match="applies to PVT backbones only"):
        build(backbone="resnet50", feature_stage=3)


def official_detr_state_dict(reference: ReferenceTransformer) -> dict[str, torch.Tensor]:
    """The layout of the official DETR-R50 release: torchvision ResNet names under
    backbone.0.body, nn.MultiheadAttention transformer, 1x1-convolution input projection."""
    g = torch.Generator().manual_seed(3)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {
        f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    state |= {f"transformer.{k}": v for k, v in reference.state_dict().items()}
    shapes = {
        "input_proj.weight": (D, 2048, 1, 1),
        "input_proj.bias": (D,),
        "query_embed.weight": (QUERIES, D),
        "class_embed.weight": (NUM_CLASSES + 1, D),
        "class_embed.bias": (NUM_CLASSES + 1,),
        **{f"bbox_embed.layers.{i}.weight": (4 if i == 2 else D, D) for i in range(3)},
        **{f"bbox_embed.layers.{i}.bias": (4 if i == 2 else D,) for i in range(3)},
    }
    return state | {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}


def test_an_official_detr_checkpoint_loads_and_its_transformer_matches(tmp_path):
    torch.manual_seed(0)
    reference = ReferenceTransformer().eval()
    official = official_detr_state_dict(reference)
    path = tmp_path / "detr-r50-official.pth"
    torch.save({"model": official}, path)
    model = build(seed=1, backbone="resnet50", dropout=0.0)[0].eval()
    load_detr_checkpoint(model, path)

    torch.testing.assert_close(model.input_proj.weight, official["input_proj.weight"][:, :, 0, 0])
    key = "backbone.0.body.layer4.2.bn3.running_var"
    torch.testing.assert_close(model.state_dict()[key], official[key])
    inputs = transformer_inputs()
    with torch.no_grad():
        hs, _ = model.transformer(*inputs)
        torch.testing.assert_close(hs, reference(*inputs), atol=1e-5, rtol=1e-5)


def test_class_head_is_dropped_only_when_asked():
    source = build(seed=0)[0].eval()
    target = build(seed=1, num_classes=NUM_CLASSES + 2)[0].eval()
    own_head = target.class_embed.weight.clone()
    with pytest.raises(ValueError, match="drop_class_head"):
        load_detr_checkpoint(target, {"model": source.state_dict()})
    load_detr_checkpoint(target, {"model": source.state_dict()}, drop_class_head=True)
    assert torch.equal(target.class_embed.weight, own_head)
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(target(images)["pred_boxes"], source(images)["pred_boxes"])
