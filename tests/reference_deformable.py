"""A reference computation of the official Deformable DETR forward (fundamentalvision/
Deformable-DETR: ``DeformableDETR``, ``DeformableTransformer`` with its plain-PyTorch sampling
core, ResNet-50 with frozen BatchNorm), with the official module names, so that its
``state_dict()`` is an official checkpoint's ``model``. Written for the checkpoint-loading test:
one-stage, with iterative box refinement, and two-stage with refinement; a batch without padding.
The official two-stage hard-codes 128 features per box coordinate (d / 2 for its d = 256): here
d / 2.
"""

import copy
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d


def sampling_core(value: Tensor, shapes: list, locations: Tensor, weights: Tensor) -> Tensor:
    """value [N, S, M, D]; locations [N, Q, M, L, P, 2] in [0, 1]; weights [N, Q, M, L, P]
    -> [N, Q, M D]: per level ``grid_sample`` (bilinear, zeros, align_corners False), weighted
    and summed."""
    n, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N M, Q, P, 2]
        sampled.append(F.grid_sample(v, g, "bilinear", "zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, heads * dim, queries).transpose(1, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference, source, shapes, padding):
        n, q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(source).masked_fill(padding[..., None], 0.0)
        value = value.view(n, source.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(n, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, q, heads, levels * points)
        weights = weights.softmax(-1).view(n, q, heads, levels, points)
        if reference.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
            locations = (
                reference[:, :, None, :, None] + offsets / normalizer[None, None, None, :, None]
            )
        else:
            locations = (
                reference[:, :, None, :, None, :2]
                + offsets / points * reference[:, :, None, :, None, 2:] * 0.5
            )
        return self.output_proj(sampling_core(value, shapes, locations, weights))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference, shapes, padding):
        src = self.norm1(src + self.self_attn(src + pos, reference, src, shapes, padding))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference, memory, shapes, padding):
        q = (tgt + query_pos).transpose(0, 1)
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt.transpose(0, 1))[0].transpose(0, 1))
        attended = self.cross_attn(tgt + query_pos, reference, memory, shapes, padding)
        tgt = self.norm1(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Layers(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.bbox_embed = self.class_embed = None  # the official decoder's hooks


class Transformer(nn.Module):
    def __init__(
        self, d_model, n_heads, enc_layers, dec_layers, d_ffn, n_levels, n_points, two_stage
    ):
        super().__init__()
        args = (d_model, d_ffn, n_levels, n_heads, n_points)
        self.encoder = Layers(EncoderLayer(*args), enc_layers)
        self.decoder = Layers(DecoderLayer(*args), dec_layers)
        self.level_embed = nn.Parameter(torch.randn(n_levels, d_model))
        self.two_stage = two_stage
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)

    def proposals(self, memory, padding, shapes):
        """The official ``gen_encoder_output_proposals``: (features, proposals in
        inverse-sigmoid space, inf where invalid)."""
        n = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(shapes):
            mask = padding[:, start : start + h * w].view(n, h, w)
            valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            y, x = torch.meshgrid(
                torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w), indexing="ij"
            )
            grid = torch.cat([x[..., None], y[..., None]], -1)
            scale = torch.cat([valid_w[:, None], valid_h[:, None]], 1).view(n, 1, 1, 2)
            grid = (grid[None].expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding[..., None], float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        features = memory.masked_fill(padding[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(features)), proposals

    def forward(self, srcs, masks, pos_embeds, queries):
        """``queries``: the query rows [Q, 2 d], or with two-stage their count."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + e
                for p, e in zip(pos_embeds, self.level_embed, strict=True)
            ],
            1,
        )
        ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [N, L, 2]
        reference = encoder_reference_points(shapes, ratios)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pos, reference, shapes, padding)
        n, d = src.shape[0], src.shape[-1]
        enc_outputs = None
        if self.two_stage:
            features, proposals = self.proposals(memory, padding, shapes)
            layers = len(self.decoder.layers)
            enc_class = self.decoder.class_embed[layers](features)
            enc_coords = self.decoder.bbox_embed[layers](features) + proposals
            topk = torch.topk(enc_class[..., 0], queries, dim=1)[1]
            coords = torch.gather(enc_coords, 1, topk[..., None].repeat(1, 1, 4)).detach()
            reference = coords.sigmoid()
            pos = proposal_positions(coords, d // 2)
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(pos)).split(d, dim=2)
            enc_outputs = {"pred_logits": enc_class, "pred_boxes": enc_coords.sigmoid()}
        else:
            query_pos, tgt = queries.split(d, dim=1)
            query_pos, tgt = query_pos.expand(n, -1, -1), tgt.expand(n, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()
        hs, references = [], []
        for i, layer in enumerate(self.decoder.layers):
            scale = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            tgt = layer(
                tgt, query_pos, reference[:, :, None] * scale[:, None], memory, shapes, padding
            )
            references.append(reference)  # the reference this layer's boxes are relative to
            if self.decoder.bbox_embed is not None:
                delta = self.decoder.bbox_embed[i](tgt)
                if reference.shape[-1] == 4:
                    reference = (delta + inverse_sigmoid(reference)).sigmoid().detach()
                else:
                    new = delta.clone()
                    new[..., :2] = delta[..., :2] + inverse_sigmoid(reference)
                    reference = new.sigmoid().detach()
            hs.append(tgt)
        return hs, references, enc_outputs


def proposal_positions(coords: Tensor, num_feats: int) -> Tensor:
    """The official ``get_proposal_pos_embed``: [N, Q, 4] boxes in inverse-sigmoid space ->
    [N, Q, 4 num_feats], each of cx, cy, w, h encoded in turn."""
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    pos = coords.sigmoid() * 2 * math.pi
    pos = pos[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


def valid_ratio(mask: Tensor) -> Tensor:
    _, h, w = mask.shape
    valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def encoder_reference_points(shapes, ratios: Tensor) -> Tensor:
    points = []
    for level, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij"
        )
        y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(torch.stack((x, y), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_positions(mask: Tensor, num_feats: int) -> Tensor:
    """The official Deformable DETR sine encoding: cells counted from their centres."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class MLP(nn.Module):
    def __init__(self, d: int, out: int, num_layers: int):
        super().__init__()
        dims = [d] * num_layers + [out]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        self.body = IntermediateLayerGetter(resnet, return_layers=layers)


class DeformableDETR(nn.Module):
    """The official detector: ResNet-50 layers 2-4, one extra level, ``num_classes`` focal
    logits, with or without ``box_refine``, ``two_stage`` (with ``box_refine``)."""

    def __init__(
        self, num_classes, num_queries, d_model, n_heads, enc, dec, d_ffn, box_refine, two_stage
    ):
        super().__init__()
        levels = 4
        self.backbone = nn.ModuleList([Backbone()])
        self.d_model = d_model
        self.num_queries = num_queries
        self.two_stage = two_stage
        self.transformer = Transformer(d_model, n_heads, enc, dec, d_ffn, levels, 4, two_stage)
        channels = (512, 1024, 2048)
        projections = [
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in channels
        ]
        projections.append(
            nn.Sequential(
                nn.Conv2d(channels[-1], d_model, 3, stride=2, padding=1),
                nn.GroupNorm(32, d_model),
            )
        )
        self.input_proj = nn.ModuleList(projections)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
        class_embed, bbox_embed = nn.Linear(d_model, num_classes), MLP(d_model, 4, 3)
        heads = dec + 1 if two_stage else dec  # two-stage: the last ones score the proposals
        if box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(heads))
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList([class_embed] * heads)
            self.bbox_embed = nn.ModuleList([bbox_embed] * heads)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed

    def forward(self, images: Tensor) -> dict:
        """images [B, 3, H, W], no padding."""
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        features = list(self.backbone[0].body(images).values())
        srcs, masks, pos = [], [], []
        for level, x in enumerate(features):
            m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            srcs.append(self.input_proj[level](x))
            masks.append(m)
            pos.append(sine_positions(m, self.d_model // 2))
        src = self.input_proj[len(features)](features[-1])
        m = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        srcs.append(src)
        masks.append(m)
        pos.append(sine_positions(m, self.d_model // 2))
        queries = self.num_queries if self.two_stage else self.query_embed.weight
        hs, references, enc_outputs = self.transformer(srcs, masks, pos, queries)
        logits, boxes = [], []
        for level, (h, reference) in enumerate(zip(hs, references, strict=True)):
            delta = self.bbox_embed[level](h)
            if reference.shape[-1] == 4:
                delta = delta + inverse_sigmoid(reference)
            else:
                delta = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)
            logits.append(self.class_embed[level](h))
            boxes.append(delta.sigmoid())
        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_boxes": b}
                for a, b in zip(logits[:-1], boxes[:-1], strict=True)
            ],
        }
        return out | ({"enc_outputs": enc_outputs} if enc_outputs is not None else {})
