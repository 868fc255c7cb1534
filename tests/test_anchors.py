"""Anchor-box queries (models/aids/anchors.py): DAB-DETR's decoder layer against its formula
written out here, the anchors' encoding and size modulation, the layer-by-layer box refinement,
the anchors' initialisations and gradients.

Query groups and denoising on top of anchor queries are tested in tests/test_queries.py and
tests/test_denoising.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import options
from models.aids.anchors import (
    AnchorDecoderLayer,
    inverse_sigmoid,
    modulate_by_size,
)
from models.position_encoding import PositionEmbeddingSine, box_sine_encoding
from tests.conftest import DEC, HIDDEN, QUERIES, build_tiny, tiny_batch

# The layer checked by hand: width 8, 2 heads, 2 queries, 3 memory tokens, a batch of 2.
D, HEADS, NQ, NK = 8, 2, 2, 3


def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ module.weight.T + module.bias


def layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def heads_attention(qs, ks, vs, out_proj, key_padding=None):
    """Per head h: softmax(q_h k_h^T / sqrt(dim q_h)) v_h, heads side by side, out_proj."""
    outputs = []
    for q, k, v in zip(qs, ks, vs, strict=True):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, :], float("-inf"))
        outputs.append(scores.softmax(-1) @ v)
    return linear(out_proj, torch.cat(outputs, dim=-1))


def split(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.chunk(HEADS, dim=-1))


def layer_by_hand(layer, tgt, query_pos, query_sine, memory, memory_pos, padding):
    """DAB-DETR's decoder layer (Conditional DETR's attention), written out."""
    q = linear(layer.sa_qcontent_proj, tgt) + linear(layer.sa_qpos_proj, query_pos)
    k = linear(layer.sa_kcontent_proj, tgt) + linear(layer.sa_kpos_proj, query_pos)
    v = linear(layer.sa_v_proj, tgt)
    attended = heads_attention(split(q), split(k), split(v), layer.self_attn.out_proj)
    tgt = layer_norm(layer.norm1, tgt + attended)

    q_content = linear(layer.ca_qcontent_proj, tgt)
    k_content = linear(layer.ca_kcontent_proj, memory)
    k_pos = linear(layer.ca_kpos_proj, memory_pos)
    if layer.ca_qpos_proj is not None:
        q_content = q_content + linear(layer.ca_qpos_proj, query_pos)
        k_content = k_content + k_pos
    q_sine = linear(layer.ca_qpos_sine_proj, query_sine)
    qs = [torch.cat(p, -1) for p in zip(split(q_content), split(q_sine), strict=True)]
    ks = [torch.cat(p, -1) for p in zip(split(k_content), split(k_pos), strict=True)]
    assert qs[0].shape[-1] == ks[0].shape[-1] == 2 * D // HEADS
    v = linear(layer.ca_v_proj, memory)
    attended = heads_attention(qs, ks, split(v), layer.cross_attn.out_proj, padding)
    tgt = layer_norm(layer.norm2, tgt + attended)

    hidden = torch.relu(linear(layer.linear1, tgt))
    return layer_norm(layer.norm3, tgt + linear(layer.linear2, hidden))


def layer_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, NQ, D), (2, NQ, D), (2, NQ, D), (2, NK, D), (2, NK, D)]
    tgt, query_pos, query_sine, memory, memory_pos = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes
    )
    padding = torch.tensor([[False] * NK, [False] * (NK - 1) + [True]])  # image 1: 1 padding key
    return tgt, query_pos, query_sine, memory, memory_pos, padding


def small_layer(first: bool, fused: bool) -> AnchorDecoderLayer:
    torch.manual_seed(0)
    layer = AnchorDecoderLayer(D, HEADS, 16, dropout=0.0, first=first).double().eval()
    for p in layer.parameters():  # non-zero biases and norm scales too
        torch.nn.init.normal_(p, std=0.5)
    layer.self_attn.fused_attn = layer.cross_attn.fused_attn = fused
    return layer


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("first", [True, False], ids=["first layer", "later layer"])
def test_one_decoder_layer_is_dab_detrs_formula_written_out(first, fused):
    layer = small_layer(first, fused)
    assert (layer.ca_qpos_proj is not None) == first  # the query's position: first layer only
    inputs = layer_inputs()
    with torch.no_grad():
        out = layer(*inputs)
        expected = layer_by_hand(layer, *inputs)
    assert out.shape == (2, NQ, D)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_the_positional_part_enters_the_second_half_of_each_heads_query_only():
    layer = small_layer(first=True, fused=True)
    queries = []
    layer.cross_attn.register_forward_hook(lambda module, args, out: queries.append(args[0]))
    tgt, query_pos, query_sine, memory, memory_pos, padding = layer_inputs()
    with torch.no_grad():
        for scale in (1.0, 3.0):  # what the size modulation and query_scale do to query_sine
            layer(tgt, query_pos, scale * query_sine, memory, memory_pos, padding)
    per_head = [q.unflatten(-1, (HEADS, 2, D // HEADS)) for q in queries]
    torch.testing.assert_close(per_head[0][..., 0, :], per_head[1][..., 0, :], atol=0, rtol=0)
    assert (per_head[0][..., 1, :] - per_head[1][..., 1, :]).abs().min() > 0


def test_each_layer_gets_the_size_modulated_encoding_of_its_anchor_as_positional_part():
    model = build_tiny(dropout=0.0, drop_path=0.0, anchor_queries=True)[0].eval()
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.5)  # the boxes move
    decoder = model.aids["anchors"].decoder
    calls, offsets = [], []
    for layer in decoder.layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(args))
    model.bbox_embed.register_forward_hook(lambda module, args, out: offsets.append(out))
    with torch.no_grad():
        out = model(tiny_batch()[0])
    anchors = model.aids["anchors"].anchors.weight.sigmoid().expand(2, -1, -1)
    for i, (tgt, query_pos, query_sine, *_) in enumerate(calls):
        sine = box_sine_encoding(anchors, HIDDEN)
        spatial = sine[..., :HIDDEN] * (decoder.query_scale(tgt) if i else 1.0)
        ref_wh = decoder.ref_anchor_head(tgt).sigmoid()
        torch.testing.assert_close(query_sine, modulate_by_size(spatial, ref_wh, anchors[..., 2:]))
        torch.testing.assert_close(query_pos, decoder.ref_point_head(sine))
        if i + 1 < len(calls):  # the next anchor: this layer's refinement (offsets[2 i + 1])
            anchors = (offsets[2 * i + 1] + inverse_sigmoid(anchors)).sigmoid()
    assert len(calls) == DEC and (anchors - out["aux_outputs"][0]["pred_boxes"]).abs().max() > 0


def test_anchor_queries_own_a_box_each_the_decoder_and_the_first_layer_starts_at_the_box():
    model = build_tiny(anchor_queries=True)[0].eval()
    keys = set(model.state_dict())
    assert "query_embed.weight" not in keys
    assert not any(k.startswith("transformer.decoder.") for k in keys)  # DETR's: dropped
    assert model.transformer.decoder is None
    assert {f"aids.anchors.decoder.layers.{DEC - 1}.ca_qpos_sine_proj.weight"} <= keys
    assert "aids.anchors.decoder.layers.0.ca_qpos_proj.weight" in keys
    assert "aids.anchors.decoder.layers.1.ca_qpos_proj.weight" not in keys
    assert model.state_dict()["aids.anchors.anchors.weight"].shape == (QUERIES, 4)
    images, _ = tiny_batch()
    with torch.no_grad():
        first_layer = model(images)["aux_outputs"][0]["pred_boxes"]
    anchors = model.aids["anchors"].anchors.weight.sigmoid()
    torch.testing.assert_close(first_layer, anchors.expand(2, -1, -1), atol=1e-6, rtol=0)


def test_every_layer_refines_the_previous_box_which_keeps_its_gradient_and_detached_is_the_anchor():
    model = build_tiny(dropout=0.0, drop_path=0.0, anchor_queries=True, dec_layers=3)[0].train()
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.5)  # non-zero offsets
    calls = []  # per layer: the head on the normed output, then (not the last) the refinement
    model.bbox_embed.register_forward_hook(lambda module, args, out: calls.append((args[0], out)))
    out = model(tiny_batch()[0])
    boxes = [aux["pred_boxes"] for aux in out["aux_outputs"]] + [out["pred_boxes"]]
    assert len(calls) == 5
    heads, refinements = calls[0::2], calls[1::2]
    norm = model.aids["anchors"].decoder.norm
    reference = model.aids["anchors"].anchors.weight.sigmoid()
    for layer in range(3):
        expected = (heads[layer][1] + inverse_sigmoid(reference)).sigmoid()
        torch.testing.assert_close(boxes[layer], expected)
        if layer < 2:  # the refinement reads the layer's output before the final norm
            torch.testing.assert_close(heads[layer][0], norm(refinements[layer][0]))
            reference = (refinements[layer][1] + inverse_sigmoid(reference)).sigmoid()
    assert (boxes[2] - boxes[1]).abs().max() > 1e-3  # it did move
    offsets = [refinements[0][1], refinements[1][1], heads[2][1]]
    earlier, previous, own = torch.autograd.grad(boxes[2].sum(), offsets, allow_unused=True)
    assert earlier is None or not earlier.any()  # detached: not through the earlier anchors
    assert previous.abs().max() > 0 and own.abs().max() > 0


def test_the_anchor_encoding_is_the_reference_sine_formula():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 4, generator=g)
    encoding = box_sine_encoding(boxes, HIDDEN)
    assert encoding.shape == (3, 2 * HIDDEN)
    feats = HIDDEN // 2
    i = torch.arange(feats)
    for part, coordinate in enumerate((1, 0, 2, 3)):  # y, x, w, h
        angles = boxes[:, coordinate, None] * 2 * math.pi / 10000 ** (2 * (i // 2) / feats)
        expected = torch.where(i % 2 == 0, angles.sin(), angles.cos())
        torch.testing.assert_close(encoding[:, part * feats : (part + 1) * feats], expected)


def test_the_anchor_encoding_is_the_feature_maps_encoding_at_the_box_centre():
    height, width = 4, 6
    pos = PositionEmbeddingSine(HIDDEN // 2)(torch.zeros(1, height, width, dtype=torch.bool))
    row, col = 2, 3  # cells count from 1: cell (2, 3) is at (x, y) = (4/6, 3/4)
    box = torch.tensor([(col + 1) / width, (row + 1) / height, 0.2, 0.3])
    encoding = box_sine_encoding(box, HIDDEN)
    torch.testing.assert_close(encoding[:HIDDEN], pos[0, :, row, col], atol=1e-5, rtol=0)


def test_cross_attention_positions_are_modulated_by_the_anchors_width_and_height():
    g = torch.Generator().manual_seed(0)
    spatial = torch.randn(2, 3, HIDDEN, generator=g)
    ref_wh = 0.05 + 0.9 * torch.rand(2, 3, 2, generator=g)
    anchor_wh = 0.05 + 0.9 * torch.rand(2, 3, 2, generator=g)
    out = modulate_by_size(spatial, ref_wh, anchor_wh)
    half = HIDDEN // 2  # (y, x): y features scale with the height, x features with the width
    y_scale, x_scale = ref_wh[..., 1] / anchor_wh[..., 1], ref_wh[..., 0] / anchor_wh[..., 0]
    torch.testing.assert_close(out[..., :half], spatial[..., :half] * y_scale[..., None])
    torch.testing.assert_close(out[..., half:], spatial[..., half:] * x_scale[..., None])


def test_uniform_anchors_keep_their_centres_fixed_while_their_sizes_learn():
    model, criterion, _ = build_tiny(anchor_queries=True, anchor_init="uniform")
    aid = model.aids["anchors"]
    state = model.state_dict()
    assert "aids.anchors.anchors.weight" not in state
    assert state["aids.anchors.anchor_xy"].shape == (QUERIES, 2)  # saved with the model
    assert state["aids.anchors.anchor_wh.weight"].shape == (QUERIES, 2)
    assert all(p is not aid.anchor_xy for p in model.parameters())
    centres = aid.anchor_xy.sigmoid()
    assert ((centres > 0) & (centres < 1)).all() and centres.std() > 0.1
    xy, wh = aid.anchor_xy.clone(), aid.anchor_wh.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    images, targets = tiny_batch()
    criterion.weighted_total(criterion(model(images, targets=targets), targets)).backward()
    optimizer.step()
    assert torch.equal(aid.anchor_xy, xy)
    assert (aid.anchor_wh.weight - wh).abs().min() > 0


@pytest.mark.parametrize("anchor_init", ["learned", "uniform"])
@pytest.mark.parametrize("dec_layers", [1, 3])
def test_every_parameter_of_the_anchor_decoder_gets_a_finite_gradient(dec_layers, anchor_init):
    model, criterion, _ = build_tiny(
        anchor_queries=True, anchor_init=anchor_init, dec_layers=dec_layers
    )
    images, targets = tiny_batch()
    criterion.weighted_total(criterion(model(images, targets=targets), targets)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_decoder_follows_the_models_width_heads_ffn_and_dropout():
    model = build_tiny(anchor_queries=True, nheads=4, dim_feedforward=48, dropout=0.2)[0]
    layers = model.aids["anchors"].decoder.layers
    assert len(layers) == DEC
    assert layers[0].cross_attn.num_heads == 4 and layers[0].linear1.out_features == 48
    assert layers[0].dropout.p == layers[0].cross_attn.dropout == 0.2


def test_anchor_init_is_a_flag_of_anchor_queries():
    args = options.parse(["--anchor_queries", "--anchor_init", "uniform"])
    options.check_args(args)
    assert args.anchor_init == "uniform"
    with pytest.raises(SystemExit, match="--anchor_queries"):
        options.check_args(options.parse(["--anchor_init", "uniform"]))
    assert options.parse([]).anchor_init == "learned"


def test_a_layers_self_attention_applies_the_mask():
    layer = small_layer(first=False, fused=True)
    tgt, query_pos, query_sine, memory, memory_pos, padding = layer_inputs()
    alone = torch.eye(NQ, dtype=torch.bool).logical_not()  # each query sees only itself
    with torch.no_grad():
        out = layer(tgt, query_pos, query_sine, memory, memory_pos, padding, alone)
        other = tgt.clone()
        other[:, 1] += 1.0
        changed = layer(other, query_pos, query_sine, memory, memory_pos, padding, alone)
    torch.testing.assert_close(changed[:, 0], out[:, 0], atol=1e-12, rtol=0)
    assert F.l1_loss(changed[:, 1], out[:, 1]) > 1e-3
