"""Deformable DETR (Zhu et al., ICLR 2021): multi-scale deformable attention over the backbone's
levels, without a convolution over PVT.

A deformable attention head lets each query read ``n_points`` bilinearly sampled values per
level around its reference point, at offsets and with weights that are linear maps of the query:
no query-key products, a cost linear in the number of feature cells, so the encoder can run over
the stride 8, 16 and 32 maps and one coarser map at stride 64. The sampling itself is one
function, :func:`ms_deform_attn`: every sample's four corner cells gathered and weighted in one
``F.embedding_bag``, without building the samples, with a backward of its own; the official
code's plain-PyTorch fallback for its CUDA kernel (``F.grid_sample`` per level), which builds
them, stays as :func:`ms_deform_attn_grid_sample`, the reference the first is tested against.

:class:`DeformableTransformer` follows the transformer protocol (:mod:`models.protocol`), as in
the official code:

- its input: the backbone's levels, each projected by a Linear + GroupNorm, then extra levels at
  twice the stride each (:class:`models.neck.InputLevels`: no convolution after PVT, the official
  3x3 stride-2 convolution after ResNet-50). The backbone's levels are its stages from stride 8 up
  to ``--feature_stage`` (:func:`models.neck.backbone_levels`): with PVT's stage 4 and 4 levels,
  stages 2, 3, 4 (strides 8, 16, 32) and one extra level (stride 64), as Deformable DETR's ResNet-50
  layers 2-4 and its extra level;
- its queries: a learned row [2 d] holds each query's position (first half) and its content (second
  half: learned, where DETR's content starts at zero), unless the two-stage selection gives them
  (:mod:`models.aids.two_stage`); the query's reference point is the sigmoid of a linear map of its
  position (``reference_points``), unless the queries come with reference boxes (two-stage
  selection: the transformer then has no such map);
- its boxes: every decoder layer's box is an offset from that layer's reference, in
  inverse-sigmoid space (:func:`box_from_reference`). The box head's last layer starts at zero,
  with a width and height bias of -2 (a box of about 0.12 of the image a side at the reference
  point). With ``box_refine`` every decoder layer has its own box head (the detector's
  ``bbox_embed.<layer>``), and its box, detached, is the next layer's reference; only the first
  head gets the -2 bias (the later ones start from a box).

With ``box_refine`` the class head is cloned per layer too (``class_embed.<layer>``), as in the
official refinement; without it every layer shares one class head and one box head. An aid that
represents the queries and decodes them with a decoder of its own (anchor boxes) does not
combine with the deformable decoder: it is refused.

DINO's decoder (Zhang et al., ICLR 2023; IDEA-Research/DINO's ``deformable_transformer.py``)
is two switches of this one, with DINO's mixed query selection (:mod:`models.aids.two_stage`)
and contrastive denoising (:mod:`models.aids.denoising`) as aids:

- ``query_pos_from_boxes``: the queries bring content and reference boxes, no position; every
  layer computes each query's position from its current reference box, ``ref_point_head``, an
  MLP (2 d -> d -> d) of the box's sine encoding (y, x, w, h, d / 2 features each,
  :func:`models.position_encoding.box_sine_encoding`), as DINO's
  ``ref_point_head(gen_sineembed_for_position(...))``.
  DINO encodes the box after scaling it by the finest level's valid ratio (its position in the
  padded map); the box here is encoded as it is, relative to the image, so that an image's
  queries do not depend on its batch's padding. The learned query rows are then the content alone
  (width d);
- ``look_forward_twice`` (with ``box_refine``): layer i's box is its head's offset applied to
  layer i-1's box with its gradient, where Deformable DETR applies it to the detached box; the
  reference that layer i samples around and the box it hands on stay detached, as in DINO. The
  boxes are the same numbers; layer i's box loss now also updates layer i-1's box.

What stays Deformable DETR's: no final LayerNorm on the decoder's outputs (DINO has one), and
with ``box_refine`` a box and a class head per layer (DINO shares one box head and one class head
across the decoder layers).

Parameters carry the names of the official Deformable DETR code: ``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj`` in each attention; encoder layers
``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``; decoder layers ``cross_attn`` and
``norm1``, ``self_attn`` (``nn.MultiheadAttention``'s names) and ``norm2``, ``linear1``,
``linear2``, ``norm3``; ``level_embed`` and ``reference_points`` in the transformer. Layers are
post-norm as there.

An image's outputs do not depend on the other images of its batch. Reference points and boxes
are normalized to the image (its valid cells); each level scales them by its valid ratio (valid
cells over map cells) into the map's [0, 1] coordinates, divides the offsets by the map's size,
and the sampling multiplies the sum back by the map's size: a sample lands on cell
``valid_cells * r + offset`` whatever the map's padded size. That holds in the official
formulation as it is, given valid cells that do not depend on the batch (ceil(image / stride)
with images padded to a multiple of the coarsest stride, as PVT's masks give them) and padding
that reads as zeros: values are zeroed on padding, so a tap on a padded cell reads what a tap
beyond the map reads. The neck's two padding-dependent official steps are changed there
(:mod:`models.neck`).
"""

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.mlp import MLP, LayerHeads
from models.neck import InputLevels, backbone_levels
from models.position_encoding import box_sine_encoding
from models.protocol import Decoded, Levels, Memory, Queries
from models.transformer import MultiheadAttention, _ResidualLayer, xavier_init
from util.boxes import inverse_sigmoid

if TYPE_CHECKING:
    from models.config import ModelConfig

Shapes = Sequence[tuple[int, int]] | Tensor


def level_shapes(spatial_shapes: Shapes) -> list[tuple[int, int]]:
    """The levels' (H_l, W_l) as Python integers, from a [L, 2] integer tensor (the official
    code's form) or from a sequence of pairs (:meth:`DeformableTransformer.encode`'s: taken from
    the maps' shapes, they stay symbolic when the model is exported)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def width_height(height: int, width: int, like: Tensor) -> Tensor:
    """[2] (width, height) in ``like``'s dtype and device. Built from scalar tensors: sizes that
    are symbolic in an export stay symbolic (``new_tensor`` would freeze them)."""
    return torch.stack(
        [torch.scalar_tensor(v, dtype=like.dtype, device=like.device) for v in (width, height)]
    )


def ms_deform_attn(
    value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinear samples of every level, per head.

    Args:
        value: [B, S, heads, d_head], the levels' cells flattened row by row, level after level
            (S = sum of H_l * W_l).
        spatial_shapes: (H_l, W_l) of each level: [L, 2] integer tensor or L pairs.
        sampling_locations: [B, Q, heads, L, P, 2] normalized (x, y): 0 and 1 are the outer
            edges of the map's first and last cells (``align_corners=False``); samples beyond
            the map read zeros.
        attention_weights: [B, Q, heads, L, P], the weight of each sample.

    Returns:
        [B, Q, heads * d_head], heads concatenated, in the wider of ``value``'s and
        ``sampling_locations``' dtypes. Samples are placed and weighted in at least float32
        (bf16 locations would place them a fraction of a cell off on large maps).

    The sum is computed without building the samples: each output row is a weighted sum of
    L * P * 4 rows of ``value`` (every sample's four corner cells, each weighted by the
    sample's attention weight times its bilinear weight), one ``F.embedding_bag`` over
    ``value`` with per-sample weights, in chunks of queries. Its backward
    (:class:`_BilinearSum`) keeps only the inputs, never a tensor per sample. Results agree with
    :func:`ms_deform_attn_grid_sample`, the plain ``F.grid_sample`` formulation, to rounding.
    An exported graph (``torch.export``) takes that formulation: ONNX has ``GridSample``.
    """
    shapes = _checked_shapes(value, spatial_shapes)
    if torch.compiler.is_exporting():
        return ms_deform_attn_grid_sample(value, shapes, sampling_locations, attention_weights)
    return _BilinearSum.apply(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_grid_sample(
    value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn` as the official code's plain-PyTorch fallback computes it: one
    ``F.grid_sample`` per level into a [B * heads, d_head, Q, L * P] tensor of samples, then
    multiplied by the weights and summed. The reference the faster core is tested against
    (``MSDeformAttn.grid_sample_core``). Same arguments; sampling runs in the wider of
    ``value``'s and ``sampling_locations``' dtypes, which is also the output's dtype.
    """
    batch, _, heads, _ = value.shape
    shapes = _checked_shapes(value, spatial_shapes)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    # grid_sample reads [-1, 1]; batch and heads share its batch dimension.
    grids = rearrange(2 * sampling_locations.to(dtype) - 1, "b q m l p xy -> l (b m) q p xy")
    values = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    samples = [
        F.grid_sample(
            rearrange(level_value, "b (h w) m d -> (b m) d h w", h=h, w=w),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # [B * heads, d_head, Q, P]
        for (h, w), level_value, grid in zip(shapes, values, grids, strict=True)
    ]
    samples = torch.stack(samples, dim=-2).flatten(-2)  # [B * heads, d_head, Q, L * P]
    weights = rearrange(attention_weights, "b q m l p -> (b m) 1 q (l p)")
    out = (samples * weights).sum(-1)  # [B * heads, d_head, Q]
    return rearrange(out, "(b m) d q -> b q (m d)", b=batch, m=heads)


def use_grid_sample_core(model: nn.Module, grid_sample: bool = True) -> nn.Module:
    """Set ``grid_sample_core`` on every :class:`MSDeformAttn` of ``model``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.grid_sample_core = grid_sample
    return model


def _checked_shapes(value: Tensor, spatial_shapes: Shapes) -> list[tuple[int, int]]:
    """The levels' (H_l, W_l), checked against ``value``'s cells."""
    shapes = level_shapes(spatial_shapes)
    if value.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(
            f"value has {value.shape[1]} cells but spatial_shapes {shapes} add up to "
            f"{sum(h * w for h, w in shapes)}: pass the levels' flattened cells, finest first"
        )
    return shapes


# Samples per chunk of queries in the bilinear sum and its backward, which hold about 100 bytes
# per sample at once (corner rows, weights, the sampled products, the sort): 2**19 keeps that
# near 50 MB, 4096 queries of 8 heads x 4 levels x 4 points; the backward also adds four
# table-sized sums per chunk, which is what larger chunks save.
CHUNK_SAMPLES = 2**19


class _PaddedLevels:
    """The layout the bilinear sum reads ``value`` in: every level padded with zero cells, one
    row and column before, two after ((H + 3) x (W + 3) cells), then flattened into one table
    of [B * cells * heads, d_head] rows, row (b * cells + cell) * heads + head.

    A sample's pixel coordinates (``location * size - 0.5``) are clamped to [-1, W] x [-1, H]:
    its four corners then lie inside the padded level, and a sample clamped there reads only
    padding (zero), as ``grid_sample`` reads beyond the map. No corner needs a bounds test.
    Constants are [L, P] (per level, repeated over the points) so that elementwise operations
    broadcast over whole rows of samples.
    """

    def __init__(self, shapes, batch: int, heads: int, points: int, dtype, device):
        self.shapes, self.heads = shapes, heads
        self.padded = [(h + 3, w + 3) for h, w in shapes]
        sizes = [h * w for h, w in self.padded]
        self.starts = [sum(sizes[:level]) for level in range(len(sizes))]
        self.cells = sum(sizes)
        self.rows = batch * self.cells * heads
        if self.cells >= 2**24 or self.rows >= 2**31:
            raise ValueError(f"{self.cells} padded cells, {self.rows} rows: too large to index")

        def per_level(values, dtype=dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None].repeat(1, points)

        self.width = per_level([w for _, w in shapes])
        self.height = per_level([h for h, _ in shapes])
        self.padded_width = per_level([w for _, w in self.padded])
        # The padded cell of pixel (-1, -1) of each level.
        self.origin = per_level(
            [s + w + 1 for s, (_, w) in zip(self.starts, self.padded, strict=True)]
        )
        # The rows of a sample's corners (x0, y0), (x1, y0), (x0, y1), (x1, y1) from the first.
        corners = torch.tensor([(0, 1, w, w + 1) for _, w in self.padded], device=device) * heads
        self.corners = corners.T[:, :, None].repeat(1, 1, points).to(torch.int32)  # [4, L, P]
        self.head = torch.arange(heads, dtype=torch.int32, device=device)[:, None, None]

    def table(self, value: Tensor) -> Tensor:
        """value [B, S, heads, d_head] -> the padded table [rows, d_head]."""
        batch, _, heads, d_head = value.shape
        levels = value.split([h * w for h, w in self.shapes], 1)
        padded = [
            F.pad(level.reshape(batch, h, w, heads * d_head), (0, 0, 1, 2, 1, 2)).flatten(1, 2)
            for level, (h, w) in zip(levels, self.shapes, strict=True)
        ]
        return torch.cat(padded, 1).view(self.rows, d_head)

    def unpad(self, table: Tensor, batch: int) -> Tensor:
        """The padded table's rows [rows, d_head] -> [B, S, heads, d_head], padding dropped."""
        table = table.view(batch, self.cells, self.heads, -1)
        levels = [
            table[:, start : start + hp * wp].unflatten(1, (hp, wp))[:, 1 : h + 1, 1 : w + 1]
            for (h, w), (hp, wp), start in zip(self.shapes, self.padded, self.starts, strict=True)
        ]
        return torch.cat([level.flatten(1, 2) for level in levels], 1)

    def samples(self, locations: Tensor, first_rows: Tensor, inside: bool = False) -> "_Samples":
        """locations [n, heads, L, P, 2] of n queries whose value rows start at ``first_rows``
        [n] (b * cells * heads) -> each sample's first corner row and its fractions (and with
        ``inside``, whether its location has a gradient)."""
        x = locations[..., 0] * self.width - 0.5
        y = locations[..., 1] * self.height - 0.5
        if inside:  # at -1 exactly, the corner at 0 is read (grid_sample's derivative there)
            inside = (x >= -1) & (x < self.width) & (y >= -1) & (y < self.height)
        x = torch.minimum(x.clamp_(min=-1), self.width)
        y = torch.minimum(y.clamp_(min=-1), self.height)
        x0, y0 = x.floor(), y.floor()
        cell = torch.addcmul(self.origin, y0, self.padded_width).add_(x0)
        # NaN locations read a valid row (and give NaN weights): never an index out of range.
        rows = cell.nan_to_num_(0.0).to(torch.int32).mul_(self.heads)
        rows += first_rows.view(-1, 1, 1, 1) + self.head
        return _Samples(rows, x.sub_(x0), y.sub_(y0), inside)


class _Samples(NamedTuple):
    """Samples [n, heads, L, P]: the value row of each one's (x0, y0) corner, its fractions past
    that corner, and whether its location has a gradient: whether it lies within [-1, W) x
    [-1, H) pixels (beyond, every corner it reads is padding, as for ``grid_sample``)."""

    rows: Tensor
    fx: Tensor
    fy: Tensor
    inside: Tensor | bool

    def weights(self, attention_weights: Tensor) -> Tensor:
        """[n, heads, 4, L, P]: attention weight x bilinear weight of the four corners."""
        n, heads, levels, points = attention_weights.shape
        weights = attention_weights.new_empty(n, heads, 4, levels, points)
        y1 = attention_weights * self.fy
        y0 = attention_weights - y1
        x0 = 1 - self.fx
        torch.mul(y0, x0, out=weights[:, :, 0])
        torch.mul(y0, self.fx, out=weights[:, :, 1])
        torch.mul(y1, x0, out=weights[:, :, 2])
        torch.mul(y1, self.fx, out=weights[:, :, 3])
        return weights

    def corner_rows(self, layout: _PaddedLevels) -> Tensor:
        """[n * heads, 4 * L * P]: the value rows of every sample's corners, as ``weights``."""
        n, heads = self.rows.shape[:2]
        return (self.rows[:, :, None] + layout.corners).view(n * heads, -1)


class _BilinearSum(torch.autograd.Function):
    """:func:`ms_deform_attn`'s sum with a backward that recomputes the samples' corners and
    weights from the saved inputs (the padded value, the locations, the attention weights), in
    the same chunks of queries:

    - the corners' weights get ``grad_out[query] . value[corner]`` (a sampled product,
      ``torch.sparse.sampled_addmm``), from which the attention weights' gradient (the sum over
      corners times the bilinear weights) and the locations' (the bilinear weights' derivatives
      times the map's size) follow;
    - the value gets the transposed sum: the samples sorted by their first corner's row, each
      corner's weighted sum of ``grad_out`` rows per row (``F.embedding_bag`` with offsets),
      added at that corner's offset (0, 1, W + 3, W + 4 cells) in the padded table.
    """

    @staticmethod
    def forward(ctx, value, shapes, locations, attention_weights):
        out_dtype = torch.promote_types(value.dtype, locations.dtype)
        dtype = torch.promote_types(out_dtype, torch.float32)
        batch, _, heads, d_head = value.shape
        queries = locations.shape[1]
        with torch.autocast(value.device.type, enabled=False):
            layout = _PaddedLevels(shapes, batch, heads, locations.shape[-2], dtype, value.device)
            table = layout.table(value.to(dtype))
            out = table.new_empty(batch * queries * heads, d_head)
            for rows, samples, weights in _chunks(layout, locations, attention_weights, dtype):
                index = samples.corner_rows(layout)
                bag_weights = samples.weights(weights).view(index.shape)
                out[rows] = F.embedding_bag(
                    index, table, per_sample_weights=bag_weights, mode="sum"
                )
        ctx.save_for_backward(table, locations, attention_weights)
        ctx.layout, ctx.value_dtype = layout, value.dtype
        return out.view(batch, queries, heads * d_head).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        table, locations, attention_weights = ctx.saved_tensors
        layout, dtype = ctx.layout, table.dtype
        batch, queries, heads = locations.shape[:3]
        grad_out = grad_out.to(dtype).reshape(batch * queries * heads, table.shape[1])
        need_value, _, need_locations, need_weights = ctx.needs_input_grad
        grad_table = torch.zeros_like(table) if need_value else None
        grad_locations = locations.new_empty(locations.shape, dtype=dtype).flatten(0, 1)
        grad_weights = attention_weights.new_empty(attention_weights.shape, dtype=dtype)
        grad_weights = grad_weights.flatten(0, 1)
        chunks = _chunks(layout, locations, attention_weights, dtype, inside=True)
        with torch.autocast(table.device.type, enabled=False):
            for rows, samples, weights in chunks:
                grad = grad_out[rows]
                if need_value:
                    _add_value_grad(grad_table, layout, samples, weights, grad)
                if need_locations or need_weights:
                    corner_grads = _corner_grads(table, layout, samples, grad)
                    queries = slice(rows.start // heads, rows.stop // heads)
                    grad_locations[queries] = _location_grad(layout, samples, weights, corner_grads)
                    grad_weights[queries] = _attention_grad(samples, corner_grads)
        grad_value = layout.unpad(grad_table, batch).to(ctx.value_dtype) if need_value else None
        if not (need_locations or need_weights):
            return grad_value, None, None, None
        grad_locations = grad_locations.view(locations.shape).to(locations.dtype)
        grad_weights = grad_weights.view(attention_weights.shape).to(attention_weights.dtype)
        return grad_value, None, grad_locations, grad_weights


def _chunks(
    layout: _PaddedLevels, locations: Tensor, attention_weights: Tensor, dtype, inside=False
):
    """The samples in chunks of whole queries, at most ``CHUNK_SAMPLES`` each: per chunk, its
    rows of the output [B * Q * heads] (a slice), its samples (``_PaddedLevels.samples``), its
    attention weights [n, heads, L, P] in ``dtype``."""
    batch, queries, heads, levels, points, _ = locations.shape
    locations, attention_weights = locations.flatten(0, 1), attention_weights.flatten(0, 1)
    step = max(1, CHUNK_SAMPLES // (heads * levels * points))
    for start in range(0, batch * queries, step):
        stop = min(start + step, batch * queries)
        image = torch.arange(start, stop, device=locations.device).div_(
            queries, rounding_mode="floor"
        )
        first_rows = (image * (layout.cells * heads)).to(torch.int32)
        samples = layout.samples(locations[start:stop].to(dtype), first_rows, inside)
        yield slice(start * heads, stop * heads), samples, attention_weights[start:stop].to(dtype)


def _corner_grads(table: Tensor, layout: _PaddedLevels, samples: _Samples, grad: Tensor) -> Tensor:
    """[n, heads, 4, L, P]: ``grad[query, head] . table[corner]`` for every sample's corners
    (the gradient of each corner's weight), a sampled product over the corners' pattern."""
    index = samples.corner_rows(layout)
    per_row = index.shape[1]
    starts = torch.arange(0, index.numel() + 1, per_row, dtype=index.dtype, device=index.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            starts, index.view(-1), table.new_zeros(index.numel()),
            (index.shape[0], table.shape[0]), check_invariants=False,
        )  # fmt: skip
        products = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0)
    n, heads, levels, points = samples.rows.shape
    return products.values().view(n, heads, 4, levels, points)


def _location_grad(
    layout: _PaddedLevels, samples: _Samples, weights: Tensor, corner_grads: Tensor
) -> Tensor:
    """[n, heads, L, P, 2]: the locations' gradient, from the corners' (``_corner_grads``)."""
    g00, g01, g10, g11 = corner_grads.unbind(2)
    grad_x = torch.lerp(g01 - g00, g11 - g10, samples.fy).mul_(layout.width)
    grad_y = torch.lerp(g10 - g00, g11 - g01, samples.fx).mul_(layout.height)
    scale = weights * samples.inside
    return torch.stack([grad_x.mul_(scale), grad_y.mul_(scale)], -1)


def _attention_grad(samples: _Samples, corner_grads: Tensor) -> Tensor:
    """[n, heads, L, P]: the attention weights' gradient, the bilinear sum of the corners'."""
    g00, g01, g10, g11 = corner_grads.unbind(2)
    return torch.lerp(
        torch.lerp(g00, g01, samples.fx), torch.lerp(g10, g11, samples.fx), samples.fy
    )


def _add_value_grad(
    grad_table: Tensor, layout: _PaddedLevels, samples: _Samples, weights: Tensor, grad: Tensor
) -> None:
    """grad_table [rows, d_head] += the transposed sum of ``grad`` [n * heads, d_head]: samples
    sorted by their first corner's row, one weighted ``embedding_bag`` of ``grad`` rows per
    corner and table row, added at the corner's offset in each level."""
    heads, levels, points = weights.shape[1:]
    first = samples.rows.view(-1)
    order = first.argsort(stable=True)
    bags = order.div(levels * points, rounding_mode="floor")  # the (query, head) of each sample
    counts = torch.bincount(first, minlength=layout.rows)
    offsets = counts.cumsum(0).sub_(counts)
    a, fx, fy = (t.reshape(-1).index_select(0, order) for t in (weights, samples.fx, samples.fy))
    y1 = a * fy
    y0, x0 = a - y1, 1 - fx
    table = grad_table.view(-1, layout.cells * heads, grad_table.shape[1])
    for corner, corner_weights in enumerate((y0 * x0, y0 * fx, y1 * x0, y1 * fx)):
        summed = F.embedding_bag(bags, grad, offsets, mode="sum", per_sample_weights=corner_weights)
        summed = summed.view(table.shape)
        for (height, width), start in zip(layout.padded, layout.starts, strict=True):
            shift = (0, 1, width, width + 1)[corner] * heads
            low, high = start * heads, (start + height * width) * heads
            table[:, low + shift : high] += summed[:, low : high - shift]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: ``n_heads`` heads, ``n_points`` samples per head and level.

    ``sampling_offsets`` predicts each sample's offset from the query; at initialisation (weight
    zero) the offsets of head h point in the direction 2 pi h / n_heads, the k-th point k cells
    away (on the unit square's border, scaled by k). ``attention_weights`` (zero-initialised: equal
    weights) predicts the samples' weights, a softmax over the head's L * P samples. ``value_proj``
    and ``output_proj`` are xavier-initialised with zero bias.

    ``grid_sample_core`` (False; set it on a module, or on every module with
    :func:`use_grid_sample_core`) samples with :func:`ms_deform_attn_grid_sample`, the plain
    formulation, instead of :func:`ms_deform_attn`: the same results to rounding, slower.
    """

    grid_sample_core: bool = False

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (see the class docstring)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * steps[None, None, :, None]  # [heads, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Shapes,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Sample the levels around each query's reference.

        Args:
            query: [B, Q, d] (positions already added).
            reference_points: [B, Q, L, 2] normalized (x, y) in each level's map, or
                [B, Q, L, 4] boxes (cx, cy, w, h): the offsets are then in units of the box,
                scaled by w / 2 and h / 2 over ``n_points``, instead of in cells.
            input_flatten: [B, S, d] the levels' cells, flattened (see :func:`ms_deform_attn`).
            spatial_shapes: [L, 2] integer (H_l, W_l).
            input_padding_mask: [B, S] bool, True on padding (its values are zeroed), or None.

        Returns:
            [B, Q, d].

        The official module also takes the levels' start indices, which only its CUDA kernel
        reads; the sampling core here splits the levels by their sizes.
        """
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (self.n_heads, -1))
        locations, weights = self.samples(query, reference_points, spatial_shapes)
        core = ms_deform_attn_grid_sample if self.grid_sample_core else ms_deform_attn
        return self.output_proj(core(value, spatial_shapes, locations, weights))

    def samples(
        self, query: Tensor, reference_points: Tensor, spatial_shapes: Shapes
    ) -> tuple[Tensor, Tensor]:
        """Where each query samples and with what weight (arguments as in :meth:`forward`):
        locations [B, Q, heads, L, P, 2] normalized (x, y) in each level's map, weights
        [B, Q, heads, L, P] (a softmax over each head's L * P samples)."""
        batch, queries, _ = query.shape
        shape = (batch, queries, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(*shape[:3], -1).softmax(-1).view(shape)
        locations = sampling_locations(reference_points, offsets, spatial_shapes, self.n_points)
        return locations, weights


def sampling_locations(
    reference_points: Tensor, offsets: Tensor, spatial_shapes: Shapes, n_points: int
) -> Tensor:
    """reference_points [B, Q, L, 2 | 4], offsets [B, Q, heads, L, P, 2] -> [B, Q, heads, L, P, 2]
    normalized locations, computed in at least float32."""
    dtype = torch.promote_types(reference_points.dtype, torch.float32)
    reference_points, offsets = reference_points.to(dtype), offsets.to(dtype)
    centre = reference_points[:, :, None, :, None, :2]
    if reference_points.shape[-1] == 2:
        map_size = torch.stack(
            [width_height(h, w, offsets) for h, w in level_shapes(spatial_shapes)]
        )
        return centre + offsets / map_size[:, None, :]
    if reference_points.shape[-1] == 4:
        return centre + offsets * reference_points[:, :, None, :, None, 2:] * (0.5 / n_points)
    raise ValueError(
        f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}"
    )


def valid_ratios(mask: Tensor) -> Tensor:
    """mask [B, H, W] bool (True on padding, images at the top left) -> [B, 2] (w, h) float32:
    each image's unpadded columns and rows over the map's."""
    height, width = mask.shape[-2:]
    rows = (~mask[:, :, 0]).sum(1)
    cols = (~mask[:, 0, :]).sum(1)
    return torch.stack([cols / width, rows / height], -1).float()


class DeformableEncoderLayer(_ResidualLayer):
    """Deformable self-attention over all levels' cells, then FFN; post-norm."""

    def __init__(
        self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, n_levels: int,
        n_points: int,
    ):  # fmt: skip
        super().__init__(d_model, dim_feedforward, dropout, pre_norm=False)
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Shapes,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src, pos: [B, S, d]; reference_points [B, S, L, 2]; spatial_shapes [L, 2];
        padding_mask [B, S] bool or None -> [B, S, d]."""
        src = self._residual(
            src,
            lambda x: self.self_attn(x + pos, reference_points, x, spatial_shapes, padding_mask),
            self.norm1,
        )
        return self._residual(src, self._feed_forward, self.norm2)


def encoder_reference_points(spatial_shapes: Shapes, valid_ratios: Tensor) -> Tensor:
    """Every cell's centre as a reference point in every level's map.

    spatial_shapes [L, 2] (H, W), valid_ratios [B, L, 2] (w, h) -> [B, S, L, 2] (x, y): the
    centre of cell (i, j) of level l, relative to the image's valid cells there, then scaled into
    each level's map by that level's valid ratio (the official ``get_reference_points``).
    """
    points = []
    for level, (h, w) in enumerate(level_shapes(spatial_shapes)):
        y, x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        valid_cells = valid_ratios[:, None, level] * width_height(h, w, valid_ratios)  # [B, 1, 2]
        points.append(torch.stack([x.flatten(), y.flatten()], -1)[None] / valid_cells)
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers; no final norm (post-norm layers)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: Shapes,
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src, pos: [B, S, d]; spatial_shapes [L, 2]; valid_ratios [B, L, 2] (w, h);
        padding_mask [B, S] bool or None -> memory [B, S, d]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DeformableDecoderLayer(_ResidualLayer):
    """Self-attention among the queries, deformable cross-attention to the levels, FFN; post-norm.

    The self-attention is :class:`models.transformer.MultiheadAttention` (the project's one
    attention kernel), with ``nn.MultiheadAttention``'s parameter names as in the official code.
    """

    def __init__(
        self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float, n_levels: int,
        n_points: int,
    ):  # fmt: skip
        super().__init__(d_model, dim_feedforward, dropout, pre_norm=False)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Shapes,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos [B, Q, d]; reference_points [B, Q, L, 2 | 4] in each level's map;
        memory [B, S, d]; spatial_shapes [L, 2]; memory_padding_mask [B, S] bool or None;
        self_attn_mask [Q, Q] or [B, Q, Q] (bool: True = may not attend) or None -> [B, Q, d]."""
        tgt = self._residual(
            tgt,
            lambda x: self.self_attn(x + query_pos, x + query_pos, x, attn_mask=self_attn_mask),
            self.norm2,
        )
        tgt = self._residual(
            tgt,
            lambda x: self.cross_attn(
                x + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask
            ),
            self.norm1,
        )
        return self._residual(tgt, self._feed_forward, self.norm3)


def box_from_reference(delta: Tensor, reference: Tensor) -> Tensor:
    """A box head's output applied to a reference, in inverse-sigmoid space (Deformable DETR).

    delta [..., 4] and reference [..., 4] (cx, cy, w, h) or [..., 2] (cx, cy: the delta's w, h
    stand alone) -> boxes [..., 4], normalized (cx, cy, w, h).
    """
    offset = inverse_sigmoid(reference, eps=1e-5)
    if reference.shape[-1] == 2:
        offset = F.pad(offset, (0, 2))
    return (delta + offset).sigmoid()


class DecoderOutput(NamedTuple):
    """What the deformable decoder returns.

    hs: [num_layers, B, Q, d] every layer's output (no final norm: post-norm layers).
    references: num_layers tensors, the i-th [B, Q, 2] points or [B, Q, 4] boxes, normalized to
        the image: the reference layer i sampled around, to which its box prediction is relative
        (``box_from_reference(bbox_embed(hs[i]), references[i])``). With box refinement every
        reference after the first is the previous layer's box, detached.
    boxes: with box refinement, [num_layers, B, Q, 4] every layer's refined box with its
        gradient (that same ``box_from_reference``); None without.
    """

    hs: Tensor
    references: list[Tensor]
    boxes: Tensor | None


class DeformableDecoder(nn.Module):
    """A stack of deformable decoder layers, with optional per-layer box refinement.

    ``query_pos_from_boxes``: every layer computes each query's position from its reference box
    (``ref_point_head``, an MLP of the box's sine encoding, as DINO's decoder), instead of one
    position given with the queries. ``look_forward_twice`` (with box refinement): layer i's
    box is its offset applied to layer i-1's box with its gradient (DINO), so that layer i's box
    loss also updates layer i-1's box; the reference it samples around, and passes on, stays
    detached. Both leave the forward values as they are, but for the positions.
    """

    def __init__(
        self,
        num_layers: int,
        query_pos_from_boxes: bool = False,
        look_forward_twice: bool = False,
        **layer_kwargs,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers)
        )
        d_model = layer_kwargs["d_model"]
        self.ref_point_head = None
        if query_pos_from_boxes:
            self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.look_forward_twice = look_forward_twice

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Memory,
        self_attn_mask: Tensor | None = None,
        bbox_embed: Sequence[Callable[[Tensor], Tensor]] | None = None,
    ) -> DecoderOutput:
        """Decode the queries; see :meth:`DeformableTransformer.decode` for the arguments."""
        if bbox_embed is not None and len(bbox_embed) != len(self.layers):
            raise ValueError(
                f"box refinement needs one box head per decoder layer: got {len(bbox_embed)} "
                f"heads for {len(self.layers)} layers"
            )
        if self.ref_point_head is not None and reference_points.shape[-1] != 4:
            raise ValueError("query positions from boxes need reference boxes [B, Q, 4]")
        outputs, references, boxes = [], [], []
        previous = None  # the previous layer's box, with its gradient (look-forward-twice)
        for i, layer in enumerate(self.layers):
            scale = memory.valid_ratios
            if reference_points.shape[-1] == 4:
                scale = torch.cat([scale, scale], -1)
            if self.ref_point_head is not None:
                encoding = box_sine_encoding(reference_points, tgt.shape[-1])
                query_pos = self.ref_point_head(encoding.to(tgt.dtype))
            tgt = layer(
                tgt, query_pos, reference_points[:, :, None] * scale[:, None], memory.memory,
                memory.spatial_shapes, memory.padding_mask, self_attn_mask,
            )  # fmt: skip
            outputs.append(tgt)
            references.append(reference_points)
            if bbox_embed is not None:
                delta = bbox_embed[i](tgt)
                box = box_from_reference(delta, reference_points)
                # The same values; with look-forward-twice the previous box's gradient too.
                lft = self.look_forward_twice and previous is not None
                boxes.append(box_from_reference(delta, previous) if lft else box)
                previous, reference_points = box, box.detach()
        return DecoderOutput(
            torch.stack(outputs), references, torch.stack(boxes) if boxes else None
        )


class DeformableTransformer(nn.Module):
    """Deformable DETR's encoder-decoder: 6 + 6 layers, width 256, 8 heads, FFN 1024, ReLU,
    dropout 0.1, 4 levels, 4 points per head and level in the encoder and decoder.

    ``level_embed`` [L, d] tells the levels apart (added to the positions of each level's cells);
    ``reference_points`` (a Linear of the query positions, sigmoid) gives the queries' reference
    points where they come without (``learned_references`` False: none, the queries always
    bring their reference boxes). ``box_refine``: the decoder refines the boxes layer by layer
    with one box head per layer (module docstring).
    """

    takes_references: ClassVar[bool] = True
    # Deformable DETR's sine positions are at the cells' centres (models.position_encoding).
    position_offset: ClassVar[float] = 0.5

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        box_refine: bool = False,
        learned_references: bool = True,
        query_pos_from_boxes: bool = False,
        look_forward_twice: bool = False,
    ):
        super().__init__()
        if query_pos_from_boxes and learned_references:
            raise ValueError(
                "--query_pos_from_boxes computes the query positions from reference boxes; add "
                "--two_stage --mixed_selection (the selected boxes)"
            )
        if look_forward_twice and not box_refine:
            raise ValueError("--look_forward_twice acts between refining layers; add --box_refine")
        layer_kwargs = dict(
            d_model=d_model, n_heads=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
            n_levels=num_feature_levels,
        )  # fmt: skip
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **layer_kwargs)
        self.decoder = DeformableDecoder(
            num_decoder_layers, query_pos_from_boxes, look_forward_twice, n_points=dec_n_points,
            **layer_kwargs,
        )  # fmt: skip
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2) if learned_references else None
        self.d_model = d_model
        # A learned query row: position and content, or the content alone where the decoder
        # computes the positions from the boxes.
        self.query_dim = d_model if query_pos_from_boxes else 2 * d_model
        self.num_feature_levels = num_feature_levels
        self.box_refine = box_refine
        xavier_init(self)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if learned_references:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def backbone_levels(config: "ModelConfig") -> int:
        """The backbone stages ``config`` reads (:func:`models.neck.backbone_levels`)."""
        return backbone_levels(config.num_feature_levels, config.feature_stage)

    @classmethod
    def from_config(cls, config: "ModelConfig", aids: Sequence) -> "DeformableTransformer":
        """The transformer of ``config``, for a detector with the training ``aids``."""
        if config.pre_norm:
            raise ValueError(
                "--pre_norm: the deformable transformer's layers are post-norm (as the official "
                "Deformable DETR's); drop --pre_norm"
            )
        drivers = [aid.name for aid in aids if aid.provides_queries]
        if drivers:
            raise ValueError(
                f"aid {drivers[0]!r} represents the queries and drives DETR's decoder; it does "
                "not combine with the deformable transformer (--transformer deformable)"
            )
        return cls(
            config.hidden_dim, config.nheads, config.enc_layers, config.dec_layers,
            config.dim_feedforward, config.dropout, config.num_feature_levels,
            config.enc_n_points, config.dec_n_points, config.box_refine,
            learned_references=not any(aid.gives_references for aid in aids),
            query_pos_from_boxes=config.query_pos_from_boxes,
            look_forward_twice=config.look_forward_twice,
        )  # fmt: skip

    def build_neck(self, in_channels: Sequence[int], convolution_free: bool = True) -> InputLevels:
        """The input levels from backbone levels of ``in_channels``; after a backbone that is not
        ``convolution_free``, the official convolutional extra levels."""
        return InputLevels(in_channels, self.d_model, self.num_feature_levels, convolution_free)

    def learned_queries(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows [B, n, 2 d] -> (content: the second half, position: the first half); where the
        decoder computes the positions from the boxes, rows [B, n, d] -> (content: the rows,
        position: none, [B, n, 0])."""
        if self.decoder.ref_point_head is not None:
            return rows, rows[..., :0]
        query_pos, content = rows.chunk(2, -1)
        return content, query_pos

    def box_heads(self, head: nn.Module) -> nn.Module:
        """``head`` (an MLP) initialised as Deformable DETR's (module docstring): itself, or with
        ``box_refine`` one copy per decoder layer. Where the queries bring reference boxes
        (two-stage), the width and height bias is 0, as the official two-stage sets it: the
        first layer's boxes start as the selected proposals."""
        last = head.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        # Around reference points, a small box; around given reference boxes (two-stage), none.
        size_bias = -2.0 if self.reference_points is not None else 0.0
        if not self.box_refine:
            nn.init.constant_(last.bias[2:], size_bias)
            return head
        heads = LayerHeads(head, len(self.decoder.layers))
        nn.init.constant_(heads[0].layers[-1].bias[2:], size_bias)
        return heads

    def class_heads(self, head: nn.Linear) -> nn.Module:
        """The class head, initialised: shared by the decoder layers, or with ``box_refine``
        one copy per layer (``class_embed.<layer>``), as the official refinement clones it."""
        return LayerHeads(head, len(self.decoder.layers)) if self.box_refine else head

    def encode(self, levels: Levels) -> Memory:
        """Run the encoder over every level.

        Args:
            levels: per level, finest first, (features [B, d, H_l, W_l] projected to d, mask
                [B, H_l, W_l] bool, True on padding (images at the top left), positional
                encoding [B, d, H_l, W_l]): the neck's output.

        Returns:
            :class:`models.protocol.Memory` of the encoder output (``valid_ratios`` set, no
            ``pos``).
        """
        if len(levels) != self.num_feature_levels:
            raise ValueError(
                f"the deformable transformer was built for {self.num_feature_levels} levels, got "
                f"{len(levels)}"
            )
        srcs, masks, pos_embeds = zip(*levels, strict=True)
        src = torch.cat([_cells(s) for s in srcs], 1)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat(
            [_cells(p) + e for p, e in zip(pos_embeds, self.level_embed, strict=True)], 1
        )
        spatial_shapes = tuple((s.shape[-2], s.shape[-1]) for s in srcs)
        sizes = [h * w for h, w in spatial_shapes]
        level_start_index = tuple(sum(sizes[:level]) for level in range(len(sizes)))
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(src, pos, spatial_shapes, ratios, padding_mask)
        return Memory(memory, padding_mask, spatial_shapes, level_start_index, ratios)

    def decode(
        self,
        queries: Queries,
        memory: Memory,
        self_attn_mask: Tensor | None = None,
        bbox_embed: nn.Module | None = None,
    ) -> Decoded:
        """Decode the queries against the encoder's memory.

        Args:
            queries: content [B, Q, d], position [B, Q, d] (added to the queries of the
                self-attention, its keys, and the cross-attention at every layer; [B, Q, 0]
                with ``query_pos_from_boxes``: computed from the boxes at every layer),
                reference [B, Q, 4] boxes normalized to each image, or None: the sigmoid of
                ``self.reference_points(position)``, points.
            memory: what :meth:`encode` returned.
            self_attn_mask: [Q, Q] or [B, Q, Q] bool, True where a query may NOT attend, or None.
            bbox_embed: the box head, or with ``box_refine`` one per decoder layer (from
                :meth:`box_heads`): [..., d] -> [..., 4] offsets in inverse-sigmoid space.

        Returns:
            every layer's output and its boxes, each relative to the layer's reference.
        """
        reference = queries.reference
        if reference is None:
            if self.reference_points is None:
                raise ValueError("this transformer was built for queries with reference boxes")
            reference = self.reference_points(queries.position).sigmoid()
        refine = bbox_embed if self.box_refine else None
        decoded = self.decoder(
            queries.content, queries.position, reference, memory, self_attn_mask, refine
        )
        if decoded.boxes is not None:
            return Decoded(decoded.hs, decoded.boxes)
        references = torch.stack(decoded.references)
        return Decoded(decoded.hs, box_from_reference(bbox_embed(decoded.hs), references))

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        query_pos: Tensor,
        tgt: Tensor | None = None,
        reference_points: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        bbox_embed: Sequence[Callable[[Tensor], Tensor]] | None = None,
    ) -> tuple[DecoderOutput, Memory]:
        """The official transformer's call: :meth:`encode` the levels (``srcs``, ``masks``,
        ``pos_embeds``: per level [B, d, H_l, W_l], [B, H_l, W_l], [B, d, H_l, W_l]), then run
        the decoder over ``tgt`` (None: zeros, as in DETR) and ``query_pos``, each [Q, d]
        (expanded over the batch) or [B, Q, d], around ``reference_points`` ([B, Q, 2] points or
        [B, Q, 4] boxes; None: from ``query_pos``); ``bbox_embed`` one box head per layer to
        refine the boxes, or None. Returns the decoder's :class:`DecoderOutput` (every layer's
        references) and the memory."""
        memory = self.encode(list(zip(srcs, masks, pos_embeds, strict=True)))
        batch = memory.memory.shape[0]
        if query_pos.dim() == 2:
            query_pos = query_pos.expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt
        if tgt.dim() == 2:
            tgt = tgt.expand(batch, -1, -1)
        if reference_points is None:
            reference_points = self.reference_points(query_pos).sigmoid()
        decoded = self.decoder(tgt, query_pos, reference_points, memory, self_attn_mask, bbox_embed)
        return decoded, memory


def _cells(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H * W, C], row by row."""
    return x.flatten(2).transpose(1, 2)
