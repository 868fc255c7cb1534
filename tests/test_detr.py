"""PVT + DETR and ResNet-50 + DETR end to end, on the tiny configuration of tests/conftest.py."""

import pytest
import torch

from models.attention import set_fused_attention
from models.backbone import BACKBONES, PVTBackbone, build_backbone
from models.detr import load_detr_checkpoint
from models.postprocess import PostProcess
from tests.conftest import DEC, HIDDEN, NUM_CLASSES, QUERIES, build_tiny, tiny_batch, to_device
from tests.op_trace import aten_ops, convolution_ops
from tests.reference import ReferenceTransformer, official_detr_state_dict, transformer_inputs
from util.misc import pad_images


def test_pad_images_pads_bottom_right_and_masks_the_padding():
    a, b = torch.ones(3, 5, 7), 2 * torch.ones(3, 6, 4)
    padded, mask = pad_images([a, b], size_divisibility=4)
    assert padded.shape == (2, 3, 8, 8) and mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(padded[0, :, :5, :7], a) and torch.equal(padded[1, :, :6, :4], b)
    assert padded[0, :, 5:].abs().sum() == 0 and padded[0, :, :, 7:].abs().sum() == 0
    assert torch.equal(~mask[0], padded[0, 0] == 1) and torch.equal(~mask[1], padded[1, 0] == 2)


@pytest.mark.parametrize("aux", [True, False])
def test_output_keys_and_shapes(aux):
    model, _, _ = build_tiny(no_aux_loss=not aux)
    images, _ = tiny_batch()
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
    model = build_tiny()[0].eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(*pad_images(images))
    torch.testing.assert_close(from_list["pred_boxes"], from_batch["pred_boxes"])
    torch.testing.assert_close(from_list["pred_logits"], from_batch["pred_logits"])


def test_a_wrong_mask_is_rejected():
    model = build_tiny()[0]
    with pytest.raises(ValueError, match="mask must be bool"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64))


def test_forward_and_backward_run_no_convolution():
    model, criterion, _ = build_tiny()
    images, targets = tiny_batch()

    def step():
        criterion.weighted_total(criterion(model(images), targets)).backward()

    ops = aten_ops(step)
    assert "mm" in ops or "addmm" in ops  # the trace saw the model run
    assert convolution_ops(ops) == set()


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_every_trainable_parameter_gets_a_gradient(position_embedding, device):
    model, criterion, _ = build_tiny(position_embedding=position_embedding)
    model.to(device)
    images, targets = to_device(*tiny_batch(), device)
    criterion.weighted_total(criterion(model(images), targets)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch(device):
    model, criterion, _ = build_tiny(dropout=0.0, drop_path=0.0)
    model.to(device)
    images, targets = to_device(*tiny_batch(), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = criterion.weighted_total(criterion(model(images), targets))
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = criterion.weighted_total(criterion(model(images), targets))
    assert after.item() < before.item()


def test_fused_and_eager_transformer_attention_agree():
    model = build_tiny()[0].eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        fused = model(images)
        set_fused_attention(model.transformer, False)
        eager = model(images)
    torch.testing.assert_close(fused["pred_boxes"], eager["pred_boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["pred_logits"], eager["pred_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("stage", "channels", "stride"), [(3, 320, 16), (4, 512, 32)])
def test_feature_stage_picks_the_pvt_stage(stage, channels, stride):
    model = build_tiny(feature_stage=stage)[0]
    assert (model.backbone.out_channels, model.backbone.out_strides) == ((channels,), (stride,))
    assert model.input_proj.in_features == channels
    assert len(model.backbone[0].body.stages) == stage


def test_lr_backbone_zero_freezes_the_backbone_only():
    model = build_tiny(lr_backbone=0.0)[0]
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
    model = build_tiny(backbone="resnet50", feature_stage=4)[0].eval()
    body = model.backbone[0].body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    with torch.no_grad():
        ((features, mask, pos),) = model.backbone(
            torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=bool)
        )
        out = model([torch.randn(3, 64, 96)])
    assert features.shape == (1, 2048, 2, 3) and mask.shape == (1, 2, 3) and pos.shape[1] == HIDDEN
    assert out["pred_boxes"].shape == (1, QUERIES, 4) and torch.isfinite(out["pred_logits"]).all()


def test_resnet50_rejects_another_feature_stage():
    with pytest.raises(ValueError, match="applies to PVT backbones only"):
        build_tiny(backbone="resnet50", feature_stage=3)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_declares_the_channels_and_strides_it_returns(name):
    stage = 4 if name == "resnet50" else 2
    backbone = build_backbone(name, feature_stage=stage, hidden_dim=HIDDEN).eval()
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 48, 64)])
    with torch.no_grad():
        levels = backbone(images, mask)
    assert len(levels) == len(backbone.out_channels) == len(backbone.out_strides) == 1
    for (features, level_mask, pos), channels, stride in zip(
        levels, backbone.out_channels, backbone.out_strides, strict=True
    ):
        assert features.shape == (2, channels, 64 // stride, 96 // stride)
        assert level_mask.shape == pos.shape[:1] + pos.shape[2:] == (2, 64 // stride, 96 // stride)


def test_the_backbone_returns_every_pvt_stage_asked_for():
    backbone = PVTBackbone("pvt_tiny", stages=(1, 2, 3)).eval()
    assert backbone.out_channels == (64, 128, 320) and backbone.out_strides == (4, 8, 16)
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert [tuple(f.shape[1:]) for f, _ in levels] == [(64, 16, 16), (128, 8, 8), (320, 4, 4)]


def test_an_official_detr_checkpoint_loads_and_its_transformer_matches(tmp_path):
    torch.manual_seed(0)
    reference = ReferenceTransformer().eval()
    official = official_detr_state_dict(reference)
    path = tmp_path / "detr-r50-official.pth"
    torch.save({"model": official}, path)
    model = build_tiny(seed=1, backbone="resnet50", feature_stage=4, dropout=0.0)[0].eval()
    load_detr_checkpoint(model, path)

    torch.testing.assert_close(model.input_proj.weight, official["input_proj.weight"][:, :, 0, 0])
    key = "backbone.0.body.layer4.2.bn3.running_var"
    torch.testing.assert_close(model.state_dict()[key], official[key])
    inputs = transformer_inputs()
    with torch.no_grad():
        hs, _ = model.transformer(*inputs)
        torch.testing.assert_close(hs, reference(*inputs), atol=1e-5, rtol=1e-5)


def test_class_head_is_dropped_only_when_asked():
    source = build_tiny(seed=0)[0].eval()
    target = build_tiny(seed=1, num_classes=NUM_CLASSES + 2)[0].eval()
    own_head = target.class_embed.weight.clone()
    with pytest.raises(ValueError, match="drop_class_head"):
        load_detr_checkpoint(target, {"model": source.state_dict()})
    load_detr_checkpoint(target, {"model": source.state_dict()}, drop_class_head=True)
    assert torch.equal(target.class_embed.weight, own_head)
    images, _ = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(target(images)["pred_boxes"], source(images)["pred_boxes"])
