"""Multi-scale deformable attention: the sampling core against bilinear interpolation written out
here, the official initialisation, padding, shapes, gradients, box refinement, batch invariance,
training, bf16 autocast, and no convolution anywhere."""

import math

import pytest
import torch
from torch import nn

from models.backbone import Joiner, PVTBackbone
from models.deformable import (
    DeformableTransformer,
    MSDeformAttn,
    box_from_reference,
    encoder_reference_points,
    ms_deform_attn,
)
from models.mlp import MLP
from models.neck import ExtraLevel, InputLevels, MaskedGroupNorm
from models.position_encoding import PositionEmbeddingSine
from models.protocol import Queries
from tests.op_trace import aten_ops, convolution_ops
from util.misc import image_extents, pad_images

D, HEADS, LEVELS, POINTS, QUERIES = 32, 2, 4, 3, 5
STRIDES = (8, 16, 32)  # the backbone's levels; the transformer adds one at stride 64
CHANNELS = (16, 24, 40)


def tiny_transformer(seed: int = 0, layers: int = 2) -> DeformableTransformer:
    torch.manual_seed(seed)
    return DeformableTransformer(
        d_model=D, nhead=HEADS, num_encoder_layers=layers, num_decoder_layers=layers,
        dim_feedforward=64, dropout=0.0, num_feature_levels=LEVELS, enc_n_points=POINTS,
        dec_n_points=POINTS,
    )  # fmt: skip


def tiny_inputs(seed: int = 1) -> InputLevels:
    torch.manual_seed(seed)
    return InputLevels(CHANNELS, D, LEVELS)


def box_heads(layers: int = 2, seed: int = 2) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(MLP(D, D, 4, 3) for _ in range(layers))


def image_features(sizes: list[tuple[int, int]], seed: int = 0) -> list[list[torch.Tensor]]:
    """Per image, per backbone level: its features on its own grid, ceil(size / stride) cells."""
    g = torch.Generator().manual_seed(seed)
    levels = list(zip(CHANNELS, STRIDES, strict=True))
    return [
        [torch.randn(c, -(-h // s), -(-w // s), generator=g) for c, s in levels] for h, w in sizes
    ]


def backbone_levels(sizes, features, garbage_seed: int = 0):
    """The levels a backbone gives for these images batched: padded to a multiple of 32, masks
    as PVT makes them (a cell is padding when its top-left pixel is), and large random values
    on padding (a backbone's padded cells are not zero)."""
    pixels = [torch.zeros(1, h, w) for h, w in sizes]
    _, mask = pad_images(pixels, size_divisibility=32)
    g = torch.Generator().manual_seed(garbage_seed)
    encode = PositionEmbeddingSine(D // 2)
    levels = []
    for level, stride in enumerate(STRIDES):
        level_mask = mask[:, ::stride, ::stride]
        x = 10 * torch.randn(len(sizes), CHANNELS[level], *level_mask.shape[1:], generator=g)
        for i, image in enumerate(features):
            _, h, w = image[level].shape
            x[i, :, :h, :w] = image[level]
        levels.append((x, level_mask, encode(level_mask)))
    return levels, encode


def project(inputs, levels, encode):
    """The neck's levels as the official transformer's three lists (srcs, masks, pos_embeds)."""
    return zip(*inputs(levels, encode), strict=True)


def run(transformer, inputs, levels, encode, query_pos, bbox_embed=None):
    srcs, masks, pos = project(inputs, levels, encode)
    return transformer(srcs, masks, pos, query_pos, bbox_embed=bbox_embed)


def bilinear_direct(value, shapes, locations, weights):
    """The deformable attention written out sample by sample: bilinear interpolation of the cell
    centres (cell (i, j) centred at ((j + 0.5) / W, (i + 0.5) / H)), zero beyond the map."""
    batch, _, heads, d_head = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, d_head, dtype=value.dtype)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, ((h, w), start) in enumerate(zip(shapes, starts, strict=True)):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yi < h and 0 <= xi < w:
                                    cell = value[b, start + yi * w + xi, m]
                                    out[b, q, m] += weights[b, q, m, lvl, p] * wy * wx * cell
    return out.flatten(2)


def image_cells(info, level: int, index: int) -> torch.Tensor:
    """The encoder output on image ``index``'s valid cells of ``level``: [rows, cols, d]."""
    h, w = info.spatial_shapes[level]
    start = info.level_start_index[level]
    cells = info.memory[index, start : start + h * w].unflatten(0, (h, w))
    rows, cols = image_extents(info.padding_mask[index, start : start + h * w].view(1, h, w))
    return cells[: rows.item(), : cols.item()]


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> None:
    """fp32 agreement: differences within ``tolerance`` of the values' scale."""
    scale = max(a.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= tolerance * scale


# --- The sampling core and the attention module ---------------------------------------------


def test_sampling_core_is_bilinear_interpolation_with_zeros_beyond_the_map(device):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (1, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3, generator=g, dtype=torch.float64)
    locations = torch.rand(2, 4, 2, 3, 4, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(2, 4, 2, 3, 4, generator=g, dtype=torch.float64)
    expected = bilinear_direct(value, shapes, locations, weights)
    got = ms_deform_attn(
        value.to(device), torch.tensor(shapes, device=device), locations.to(device),
        weights.to(device),
    )  # fmt: skip
    assert got.shape == (2, 4, 6)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-12, rtol=1e-12)
    # Samples more than a cell beyond the map contribute nothing; half a cell beyond, half.
    outside = torch.tensor([-0.5, 1.5], dtype=torch.float64)[
        torch.randint(2, locations.shape, generator=g)
    ]
    far = ms_deform_attn(value, torch.tensor(shapes), outside, weights)
    assert torch.equal(far, torch.zeros_like(far))
    single = torch.ones(1, 1, 1, 1)  # a 1x1 map holding 1
    edge = torch.tensor([1.0, 0.5], dtype=torch.float32).view(1, 1, 1, 1, 1, 2)
    assert ms_deform_attn(single, torch.tensor([(1, 1)]), edge, torch.ones(1, 1, 1, 1, 1)) == 0.5


def test_sampling_core_takes_bf16_values_with_float32_locations():
    """As under autocast: values from a bf16 Linear, locations from float32 reference points."""
    shapes = torch.tensor([(4, 6), (2, 3)])
    value = torch.randn(1, 30, 2, 4)
    locations, weights = torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 3, 2, 2, 2)
    full = ms_deform_attn(value, shapes, locations, weights)
    half = ms_deform_attn(value.bfloat16(), shapes, locations, weights)
    assert half.dtype == torch.float32
    assert_close_to_scale(half, full, 2e-2)


def test_attention_starts_from_the_official_initialisation():
    attn = MSDeformAttn(D, n_levels=2, n_heads=4, n_points=3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):  # head h's k-th point: k + 1 cells in direction 2 pi h / 4, every level
        torch.testing.assert_close(offsets[:, :, k], (k + 1) * directions[:, None].expand(4, 2, 2))
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()  # equal weights over every sample


@pytest.mark.parametrize("box", [False, True])
def test_attention_shapes_and_padding_values_are_zeroed(box):
    torch.manual_seed(0)
    attn = MSDeformAttn(D, n_levels=2, n_heads=HEADS, n_points=POINTS)
    shapes = torch.tensor([(4, 5), (2, 3)])
    source = torch.randn(2, 26, D)
    query = torch.randn(2, 7, D)
    reference = torch.rand(2, 7, 2, 4 if box else 2)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, 10:20] = mask[1, 23:] = True
    out = attn(query, reference, source, shapes, mask)
    assert out.shape == (2, 7, D)
    changed = source.masked_fill(mask[..., None], 100.0)
    torch.testing.assert_close(attn(query, reference, changed, shapes, mask), out)
    # With every cell padding, every value is zero: the output is the output projection's bias.
    nn.init.normal_(attn.value_proj.bias)
    everywhere = attn(query, reference, source, shapes, torch.ones(2, 26, dtype=torch.bool))
    torch.testing.assert_close(everywhere, attn.output_proj.bias.expand(2, 7, -1))


def test_encoder_reference_points_are_cell_centres_of_the_valid_region():
    shapes = torch.tensor([(4, 6), (2, 3)])
    ratios = torch.tensor([[[0.5, 0.75], [2 / 3, 1.0]]])  # (w, h): 3 of 6 columns, 3 of 4 rows
    points = encoder_reference_points(shapes, ratios)
    assert points.shape == (1, 24 + 6, 2, 2)
    # In its own level, a cell's reference point is its centre in the map's coordinates.
    i, j = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    centres = torch.stack([(j.flatten() + 0.5) / 6, (i.flatten() + 0.5) / 4], -1)
    torch.testing.assert_close(points[0, :24, 0], centres)
    # In the other level: the same position relative to the valid region (3 x 3 and 2 x 2 cells).
    relative = torch.stack([(j.flatten() + 0.5) / 3, (i.flatten() + 0.5) / 3], -1)
    torch.testing.assert_close(points[0, :24, 1], relative * torch.tensor([2 / 3, 1.0]))


# --- The input levels -----------------------------------------------------------------------


def test_masked_group_norm_takes_statistics_over_the_valid_cells():
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 8)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 7)
    no_padding = torch.zeros(2, 5, 7, dtype=torch.bool)
    plain = nn.GroupNorm(4, 8)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x, no_padding), plain(x), atol=1e-5, rtol=1e-5)
    mask = no_padding.clone()
    mask[1, 3:] = mask[1, :, 4:] = True
    torch.testing.assert_close(norm(x, mask)[1, :, :3, :4], plain(x[1:, :, :3, :4])[0])


def test_extra_level_halves_odd_maps_and_ignores_padding():
    torch.manual_seed(0)
    extra = ExtraLevel(6, D)
    x = torch.randn(1, 6, 5, 7)
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    out, out_mask = extra(x, mask)
    assert out.shape == (1, D, 3, 4) and out_mask.shape == (1, 3, 4) and not out_mask.any()
    # The same map inside a larger padded one, with large values on padding.
    padded = torch.full((1, 6, 8, 10), 50.0)
    padded[..., :5, :7] = x
    padded_mask = torch.ones(1, 8, 10, dtype=torch.bool)
    padded_mask[:, :5, :7] = False
    out_padded, mask_padded = extra(padded, padded_mask)
    assert mask_padded.shape == (1, 4, 5) and (~mask_padded).sum() == 12
    torch.testing.assert_close(out_padded[..., :3, :4], out, atol=1e-5, rtol=1e-5)


# --- The transformer ------------------------------------------------------------------------


def test_encoder_and_decoder_shapes():
    sizes = [(97, 131), (128, 160)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs = tiny_transformer(), tiny_inputs()
    projected = inputs(levels, encode)
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]  # strides 8, 16, 32, 64 of 128 x 160 pixels
    assert [tuple(src.shape) for src, _, _ in projected] == [(2, D, *shape) for shape in shapes]
    memory = transformer.encode(projected)
    cells = sum(h * w for h, w in shapes)
    assert memory.memory.shape == (2, cells, D) and memory.padding_mask.shape == (2, cells)
    assert memory.spatial_shapes == tuple(shapes)
    assert memory.level_start_index == (0, 320, 400, 420)
    valid = [(13, 17), (7, 9), (4, 5), (2, 3)]  # (rows, cols) of the 97 x 131 image per level
    expected = [[c / w, r / h] for (r, c), (h, w) in zip(valid, shapes, strict=True)]
    torch.testing.assert_close(memory.valid_ratios[0], torch.tensor(expected))
    torch.testing.assert_close(memory.valid_ratios[1], torch.ones(LEVELS, 2))
    query_pos, tgt = torch.randn(2, QUERIES, D), torch.randn(2, QUERIES, D)
    points = transformer.reference_points(query_pos).sigmoid()
    decoded = transformer.decoder(tgt, query_pos, points, memory)
    assert decoded.hs.shape == (2, 2, QUERIES, D) and decoded.boxes is None
    assert [r.shape for r in decoded.references] == [(2, QUERIES, 2)] * 2
    boxes = torch.rand(2, QUERIES, 4)
    decoded = transformer.decoder(tgt, query_pos, boxes, memory, torch.eye(QUERIES) < 0)
    assert decoded.hs.shape == (2, 2, QUERIES, D)
    assert all(r is boxes for r in decoded.references)
    # The protocol's decode: every layer's boxes, relative to its reference.
    head = transformer.box_heads(MLP(D, D, 4, 3))
    out = transformer.decode(Queries(tgt, query_pos, boxes), memory, None, head)
    assert torch.equal(out.hs, decoded.hs)
    torch.testing.assert_close(
        out.boxes, box_from_reference(head(out.hs), boxes.expand(2, -1, -1, -1))
    )


def test_every_parameter_gets_a_gradient():
    sizes = [(97, 131), (64, 96)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs = tiny_transformer(), tiny_inputs()
    # At the official initialisation the queries' offset and weight maps are zero, which cuts
    # the gradient to what enters through the queries alone (level_embed): perturb them.
    for module in transformer.modules():
        if isinstance(module, MSDeformAttn):
            nn.init.normal_(module.sampling_offsets.weight, std=0.01)
            nn.init.normal_(module.attention_weights.weight, std=0.01)
    # Content queries that are not zero (as Deformable DETR learns them): with zeros, the first
    # self-attention's values are all equal and its query and key maps get no gradient.
    tgt, query_pos = torch.randn(QUERIES, D), torch.randn(QUERIES, D)
    decoded, _ = transformer(*project(inputs, levels, encode), query_pos, tgt)
    # A random projection: the sum of a LayerNorm's outputs has no gradient to its input.
    (decoded.hs * torch.randn(decoded.hs.shape)).sum().backward()
    for name, p in [*transformer.named_parameters(), *inputs.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_box_refinement_detaches_references_between_layers():
    sizes = [(97, 131), (64, 96)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs, heads = tiny_transformer(layers=3), tiny_inputs(), box_heads(3)
    decoded, _ = run(transformer, inputs, levels, encode, torch.randn(QUERIES, D), heads)
    assert decoded.hs.shape == (3, 2, QUERIES, D) and decoded.boxes.shape == (3, 2, QUERIES, 4)
    # The first reference is a point from the query positions; then each layer's box, detached.
    assert [tuple(r.shape) for r in decoded.references] == [(2, QUERIES, 2)] + [(2, QUERIES, 4)] * 2
    assert decoded.references[0].requires_grad
    assert not any(r.requires_grad for r in decoded.references[1:])
    for i in range(2):
        assert torch.equal(decoded.references[i + 1], decoded.boxes[i].detach())
    expected = box_from_reference(heads[2](decoded.hs[2]), decoded.references[2])
    torch.testing.assert_close(decoded.boxes[2], expected)
    # The last box's gradient reaches the last head alone: earlier boxes entered detached.
    decoded.boxes[-1].sum().backward()
    reached = [any(p.grad is not None and p.grad.any() for p in h.parameters()) for h in heads]
    assert reached == [False, False, True]


def test_wrong_box_heads_or_levels_are_rejected():
    sizes = [(64, 64)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, query_pos = tiny_transformer(), torch.randn(QUERIES, D)
    with pytest.raises(ValueError, match="one box head per decoder layer"):
        run(transformer, tiny_inputs(), levels, encode, query_pos, box_heads(1))
    with pytest.raises(ValueError, match="built for 4 levels"):
        transformer.encode(tiny_inputs()(levels, encode)[:3])


def test_an_image_gives_the_same_outputs_alone_and_in_a_padded_batch():
    """Two odd-size images; the first alone is padded to 128 x 160, batched to 160 x 224 (the
    second's), with different large values on the padding each time."""
    sizes = [(97, 131), (150, 200)]
    features = image_features(sizes)
    transformer, inputs, heads = tiny_transformer(layers=3), tiny_inputs(), box_heads(3)
    query_pos = torch.randn(QUERIES, D)
    with torch.no_grad():
        alone, memory_alone = run(
            transformer, inputs, *backbone_levels(sizes[:1], features[:1], 1), query_pos, heads
        )
        batch, memory = run(
            transformer, inputs, *backbone_levels(sizes[::-1], features[::-1], 2), query_pos, heads
        )
    assert_close_to_scale(batch.hs[:, 1], alone.hs[:, 0], 1e-5)
    assert_close_to_scale(batch.boxes[:, 1], alone.boxes[:, 0], 1e-5)
    for ref, ref_alone in zip(batch.references, alone.references, strict=True):
        assert_close_to_scale(ref[1], ref_alone[0], 1e-5)
    for level in range(LEVELS):  # the encoder output on the image's cells
        assert_close_to_scale(
            image_cells(memory, level, 1), image_cells(memory_alone, level, 0), 1e-5
        )


def test_batch_invariance_with_a_pvt_backbone():
    """PVT-Tiny stages 2-4 (strides 8, 16, 32) and the stride-64 extra level, end to end."""
    torch.manual_seed(0)
    backbone = Joiner(
        PVTBackbone("pvt_tiny", (2, 3, 4), drop_path_rate=0.0, train=False),
        PositionEmbeddingSine(D // 2),
    ).eval()
    transformer = tiny_transformer()
    inputs = InputLevels(backbone.out_channels, D, LEVELS)
    heads = box_heads()
    g = torch.Generator().manual_seed(0)
    first, large = torch.randn(3, 75, 101, generator=g), torch.randn(3, 130, 170, generator=g)
    query_pos = torch.randn(QUERIES, D)
    outputs = []
    with torch.no_grad():
        for images in ([first], [large, first]):
            levels = backbone(*pad_images(images, size_divisibility=32))
            outputs.append(run(transformer, inputs, levels, backbone[1], query_pos, heads)[0])
    alone, batch = outputs
    assert_close_to_scale(batch.hs[:, 1], alone.hs[:, 0], 1e-4)
    assert_close_to_scale(batch.boxes[:, 1], alone.boxes[:, 0], 1e-4)


def test_a_tiny_encoder_decoder_fits_fixed_boxes():
    sizes = [(64, 96), (48, 64)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs = tiny_transformer(), tiny_inputs()
    torch.manual_seed(2)
    head, query_pos = MLP(D, D, 4, 2), nn.Parameter(torch.randn(QUERIES, D))
    target = torch.rand(2, QUERIES, 4, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.2
    parameters = [query_pos, *transformer.parameters(), *inputs.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    losses = []
    for _ in range(20):
        decoded, _ = run(transformer, inputs, levels, encode, query_pos)
        boxes = box_from_reference(head(decoded.hs), torch.stack(decoded.references))
        loss = (boxes - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_on_the_cpu():
    sizes = [(97, 131), (64, 96)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs, heads = tiny_transformer(), tiny_inputs(), box_heads()
    query_pos = torch.randn(QUERIES, D)
    with torch.no_grad():
        full = run(transformer, inputs, levels, encode, query_pos, heads)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = run(transformer, inputs, levels, encode, query_pos, heads)[0]
    assert torch.isfinite(half.hs).all() and torch.isfinite(half.boxes).all()
    # bf16 keeps 8 bits of mantissa: boxes within a few hundredths of the image.
    assert (half.boxes.float() - full.boxes).abs().max() < 0.05
    half.boxes.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in transformer.parameters() if p.grad is not None)


def test_no_convolution_runs_forward_or_backward():
    sizes = [(97, 131), (64, 96)]
    levels, encode = backbone_levels(sizes, image_features(sizes))
    transformer, inputs, heads = tiny_transformer(), tiny_inputs(), box_heads()
    modules = [*transformer.modules(), *inputs.modules()]
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)

    def step():
        decoded, _ = run(transformer, inputs, levels, encode, torch.randn(QUERIES, D), heads)
        (decoded.hs.sum() + decoded.boxes.sum()).backward()

    ops = aten_ops(step)
    assert "_embedding_bag_forward_only" in ops and ("mm" in ops or "addmm" in ops)  # it ran
    assert convolution_ops(ops) == set()
