import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import set_fused_attention
from models.pvt import (
    EMBED_DIMS,
    NUM_HEADS,
    SR_RATIOS,
    VARIANT_DEPTHS,
    PatchProject,
    build_pvt,
    load_pvt_checkpoint,
)
from tests.op_trace import aten_ops, convolution_ops

PAPER_PARAMS_M = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}


@pytest.mark.parametrize("size", [(16, 16), (18, 23)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patch_project_equals_strided_convolution(size, patch):
    torch.manual_seed(0)
    layer = PatchProject(5, 7, patch)
    conv = nn.Conv2d(5, 7, kernel_size=patch, stride=patch)
    with torch.no_grad():
        layer.proj.weight.copy_(conv.weight.permute(0, 2, 3, 1).flatten(1))
        layer.proj.bias.copy_(conv.bias)
    x = torch.randn(2, 5, *size)
    tokens, h, w = layer(x.permute(0, 2, 3, 1))
    expected = conv(x)
    assert (h, w) == expected.shape[-2:]
    expected = F.layer_norm(expected.flatten(2).transpose(1, 2), (7,))
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANT_DEPTHS))
def test_parameter_counts_match_the_paper(variant):
    model = build_pvt(variant, num_classes=1000)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - PAPER_PARAMS_M[variant]) < 0.1, millions


# ---------------------------------------------------------------------------------------------
# The official layout and a convolution-based reference forward written from the paper's code.


def official_state_dict(depths, num_classes, mlp_ratios=(8, 8, 4, 4)):
    """Random weights with the keys and shapes of an official PVT v1 ImageNet checkpoint."""
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    sd, in_dim = {}, 3
    for i, (dim, depth) in enumerate(zip(EMBED_DIMS, depths, strict=True), start=1):
        p, grid = (4 if i == 1 else 2), 224 // (4 * 2 ** (i - 1))
        sd[f"patch_embed{i}.proj.weight"] = rand(dim, in_dim, p, p)
        sd[f"patch_embed{i}.proj.bias"] = rand(dim)
        sd[f"patch_embed{i}.norm.weight"] = 1 + rand(dim)
        sd[f"patch_embed{i}.norm.bias"] = rand(dim)
        sd[f"pos_embed{i}"] = rand(1, grid * grid + (i == 4), dim)
        for j in range(depth):
            b, hidden, r = f"block{i}.{j}.", dim * mlp_ratios[i - 1], SR_RATIOS[i - 1]
            shapes = {
                "norm1": [dim],
                "attn.q": [dim, dim],
                "attn.kv": [2 * dim, dim],
                "attn.proj": [dim, dim],
                "norm2": [dim],
                "mlp.fc1": [hidden, dim],
                "mlp.fc2": [dim, hidden],
            }
            if r > 1:
                shapes |= {"attn.sr": [dim, dim, r, r], "attn.norm": [dim]}
            for name, shape in shapes.items():
                sd[b + name + ".weight"] = rand(*shape) + (1 if len(shape) == 1 else 0)
                sd[b + name + ".bias"] = rand(shape[0])
        in_dim = dim
    sd["cls_token"] = rand(1, 1, 512)
    sd["norm.weight"], sd["norm.bias"] = 1 + rand(512), rand(512)
    sd["head.weight"], sd["head.bias"] = rand(num_classes, 512), rand(num_classes)
    return sd


def reference_attention(sd, b, x, h, w, heads, r):
    B, N, C = x.shape
    q = F.linear(x, sd[b + "attn.q.weight"], sd[b + "attn.q.bias"])
    q = q.reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    x_ = x
    if r > 1:
        x_ = x.permute(0, 2, 1).reshape(B, C, h, w)
        x_ = F.conv2d(x_, sd[b + "attn.sr.weight"], sd[b + "attn.sr.bias"], stride=r)
        x_ = F.layer_norm(
            x_.reshape(B, C, -1).permute(0, 2, 1),
            (C,),
            sd[b + "attn.norm.weight"],
            sd[b + "attn.norm.bias"],
        )
    kv = F.linear(x_, sd[b + "attn.kv.weight"], sd[b + "attn.kv.bias"])
    k, v = kv.reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])


def reference_forward(sd, x, depths, classifier):
    """Official PVT v1 forward with convolutions; returns (stage maps, logits or None)."""
    maps, logits = [], None
    ln = lambda t, key, eps: F.layer_norm(
        t,
        t.shape[-1:],
        sd[key + ".weight"],  # noqa: E731
        sd[key + ".bias"],
        eps,
    )
    for i in range(1, 5):
        w = sd[f"patch_embed{i}.proj.weight"]
        x = F.conv2d(x, w, sd[f"patch_embed{i}.proj.bias"], stride=w.shape[-1])
        B, C, h, w_ = x.shape
        x = ln(x.flatten(2).transpose(1, 2), f"patch_embed{i}.norm", 1e-5)
        pos = sd[f"pos_embed{i}"]
        cls_pos, pos = (pos[:, :1], pos[:, 1:]) if i == 4 else (None, pos)
        g = int(pos.shape[1] ** 0.5)
        if (h, w_) != (g, g):
            pos = pos.reshape(1, g, g, C).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(h, w_), mode="bilinear").flatten(2).transpose(1, 2)
        x = x + pos
        if i == 4 and classifier:
            x = torch.cat([sd["cls_token"].expand(B, -1, -1) + cls_pos, x], dim=1)
        for j in range(depths[i - 1]):
            b = f"block{i}.{j}."
            x = x + reference_attention(
                sd, b, ln(x, b + "norm1", 1e-6), h, w_, NUM_HEADS[i - 1], SR_RATIOS[i - 1]
            )
            y = F.gelu(
                F.linear(ln(x, b + "norm2", 1e-6), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
            )
            x = x + F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if i == 4 and classifier:
            logits = F.linear(ln(x, "norm", 1e-6)[:, 0], sd["head.weight"], sd["head.bias"])
            x = x[:, 1:]
        x = x.reshape(B, h, w_, C).permute(0, 3, 1, 2)
        maps.append(x)
    return maps, logits


@pytest.mark.parametrize("wrap", [False, True])
def test_official_checkpoint_loads_and_matches_convolution_reference(tmp_path, wrap):
    depths = VARIANT_DEPTHS["pvt_tiny"]
    sd = official_state_dict(depths, num_classes=10)
    path = tmp_path / "pvt_tiny_official.pth"
    torch.save({"model": sd} if wrap else sd, path)
    x = torch.randn(2, 3, 96, 136)
    ref_maps = reference_forward(sd, x, depths, classifier=False)[0]

    backbone = build_pvt("pvt_tiny", num_classes=0).eval()
    load_pvt_checkpoint(backbone, str(path))
    with torch.no_grad():
        maps = backbone.forward_features(x)
    for ours, ref in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    classifier = build_pvt("pvt_tiny", num_classes=10).eval()
    load_pvt_checkpoint(classifier, str(path))
    x224 = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            classifier(x224), reference_forward(sd, x224, depths, True)[1], atol=1e-4, rtol=1e-4
        )


def test_detection_backbone_with_fewer_stages_loads_official_checkpoint(tmp_path):
    sd = official_state_dict(VARIANT_DEPTHS["pvt_tiny"], num_classes=10)
    torch.save(sd, tmp_path / "w.pth")
    model = build_pvt("pvt_tiny", num_classes=0, out_indices=(2,)).eval()
    load_pvt_checkpoint(model, str(tmp_path / "w.pth"))
    x = torch.randn(1, 3, 64, 64)
    ref = reference_forward(sd, x, VARIANT_DEPTHS["pvt_tiny"], classifier=False)[0][2]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[0], ref, atol=1e-4, rtol=1e-4)


def test_loader_reports_all_bad_keys_at_once(tmp_path):
    sd = official_state_dict(VARIANT_DEPTHS["pvt_tiny"], num_classes=10)
    del sd["block1.0.attn.q.weight"]
    sd["block1.0.attn.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_pvt_checkpoint(build_pvt("pvt_tiny", num_classes=0), str(tmp_path / "bad.pth"))
    message = str(err.value)
    assert "bad.pth" in message
    assert "stages.0.blocks.0.attn.q.weight" in message
    assert "stages.0.blocks.0.attn.extra" in message
    with pytest.raises(ValueError, match="mis-shaped"):
        load_pvt_checkpoint(build_pvt("pvt_small", num_classes=0), str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANT_DEPTHS))
def test_no_convolution_runs_forward_or_backward(variant):
    torch.manual_seed(0)
    model = build_pvt(variant, num_classes=0)
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    x = torch.randn(1, 3, 64, 96)
    ops = aten_ops(lambda: sum(f.sum() for f in model.forward_features(x)).backward())
    assert "mm" in ops or "addmm" in ops  # the recorder saw the model's work
    assert convolution_ops(ops) == set()


@pytest.mark.parametrize("size", [(96, 128), (136, 200), (100, 171), (75, 101)])
def test_stage_shapes_for_any_input_size(size):
    model = build_pvt("pvt_tiny", num_classes=0).eval()
    assert model.out_channels == (64, 128, 320, 512)
    assert model.out_strides == (4, 8, 16, 32)
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, *size))
    h, w = size
    for f, c, s in zip(maps, model.out_channels, model.out_strides, strict=True):
        assert f.shape == (1, c, h // s, w // s)  # strided-convolution floor, stage after stage
        assert torch.isfinite(f).all()


def test_out_indices_select_stages_and_masks_follow_padding():
    torch.manual_seed(0)
    model = build_pvt("pvt_tiny", num_classes=0, out_indices=(1, 3)).eval()
    assert model.out_channels == (128, 512) and model.out_strides == (8, 32)
    x = torch.randn(2, 3, 128, 192)
    mask = torch.zeros(2, 128, 192, dtype=torch.bool)
    mask[1, 64:, :] = True  # image 1 is 64 x 96 of real pixels
    mask[1, :, 96:] = True
    with torch.no_grad():
        maps, masks = model.forward_masked(x, mask)
    assert [m.shape for m in maps] == [(2, 128, 16, 24), (2, 512, 4, 6)]
    assert [m.shape for m in masks] == [(2, 16, 24), (2, 4, 6)]
    assert not masks[0][0].any() and not masks[1][0].any()
    expected = torch.ones(4, 6, dtype=torch.bool)
    expected[:2, :3] = False
    assert torch.equal(masks[1][1], expected)


@pytest.mark.parametrize("num_classes", [0, 7])
def test_every_parameter_gets_a_gradient(num_classes):
    torch.manual_seed(0)
    model = build_pvt("pvt_tiny", num_classes=num_classes)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.sum() if num_classes else sum(f.square().mean() for f in out)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_fused_and_eager_attention_agree():
    torch.manual_seed(0)
    model = build_pvt("pvt_small", num_classes=0).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        fused = model.forward_features(x)
        set_fused_attention(model, False)
        eager = model.forward_features(x)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
