"""Anchor-box queries (Liu et al. 2022, "DAB-DETR"), as :class:`AnchorQueries` does them here:

- each query owns a learned box (cx, cy, w, h), stored before the sigmoid;
- its positional query, added to the queries and keys of the decoder's self-attention, is an MLP
  of the box's sine encoding (:func:`box_sine_encoding`, the encoding of the feature map's
  positions applied to each coordinate);
- the cross-attention's positional query is the (y, x) part of that encoding, scaled elementwise
  by an MLP of the content query (from the second layer on) and modulated by the anchor's size:
  the x features times ``w_ref / w``, the y features times ``h_ref / h``, with ``(w_ref, h_ref)``
  the sigmoid of an MLP of the content query (:func:`modulate_by_size`);
- every layer predicts an offset of the box in inverse-sigmoid space, added to its anchor; the
  refined box is that layer's prediction and, detached, the next layer's anchor.

Deviations from the paper's code, to fit the add-style layers of :mod:`models.transformer`: the
positional queries are added to the content before one shared projection instead of concatenated
per head after separate ones (Conditional DETR's concatenation); the encoder is DETR's (DAB-DETR
also rescales the encoder's positions by an MLP of its features); the refinement reads the
decoder output after the final LayerNorm, the same tensor the heads read, so a layer's predicted
box is exactly the next layer's anchor; and the head adds the offset to the detached anchor
(Deformable DETR's refinement) where the released DAB-DETR code keeps the gradient of the
previous layer's box in the prediction.
"""

import argparse

import torch
from torch import Tensor, nn

from models.aids.base import Aid, DetectorSpec, Queries
from models.mlp import MLP
from models.position_encoding import sine_encoding
from models.transformer import TransformerDecoder
from util.boxes import inverse_sigmoid


def box_sine_encoding(boxes: Tensor, d_model: int) -> Tensor:
    """[..., 4] normalized (cx, cy, w, h) -> [..., 2 d_model]: the sine encodings of y, x, w and
    h, ``d_model / 2`` features each, in that order. The (y, x) half is the encoding that the
    feature map's cells get at the box's centre (:class:`PositionEmbeddingSine` features)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([sine_encoding(v, d_model // 2) for v in (cy, cx, w, h)], dim=-1)


def modulate_by_size(spatial: Tensor, ref_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """DAB-DETR's width and height modulation of the positional query of the cross-attention.

    spatial: [..., d] the (y, x) sine encoding (y in the first half, x in the second);
    ref_wh: [..., 2] the reference width and height in (0, 1) (predicted from the content);
    anchor_wh: [..., 2] the anchor's width and height -> [..., d], the x features times
    ``w_ref / w`` and the y features times ``h_ref / h``: a narrow anchor's attention falls off
    faster along x, a short one's along y. Anchor sizes are clamped at 1e-3 (a ratio of at most
    1000) so that a collapsed box cannot give an infinite query.
    """
    half = spatial.shape[-1] // 2
    scale = ref_wh / anchor_wh.clamp(min=1e-3)
    return torch.cat(
        [spatial[..., :half] * scale[..., 1:2], spatial[..., half:] * scale[..., 0:1]], dim=-1
    )


class AnchorQueries(Aid):
    """DAB-DETR's anchor-box queries and the layer-by-layer decoding they drive (module
    docstring). Holds the anchors of every matching query (all groups), the MLP that maps an
    anchor's sine encoding to its positional query, the MLP that scales the cross-attention's
    positional query (only with more than one decoder layer: the first layer does not use it),
    and the MLP that predicts the reference width and height."""

    name = "anchors"
    provides_queries = True

    def __init__(self, d_model: int, num_layers: int):
        super().__init__()
        if d_model % 4:
            raise ValueError(
                f"anchor queries encode 4 coordinates in d_model / 2 sine features each: "
                f"hidden_dim must be a multiple of 4, got {d_model}"
            )
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--anchor_queries",
            action="store_true",
            help="queries are learned anchor boxes refined by every decoder layer (DAB-DETR)",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.anchor_queries

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "AnchorQueries":
        return cls(spec.hidden_dim, spec.dec_layers)

    def build_queries(self, count: int) -> None:
        self.anchors = nn.Embedding(count, 4)

    def initial_queries(self, count: int, batch: int) -> Queries:
        """Zero content and the first ``count`` learned anchors, normalized (cx, cy, w, h)."""
        anchors = self.anchors.weight[:count].sigmoid()
        content = anchors.new_zeros(batch, count, self.d_model)
        return Queries(content, anchors.expand(batch, -1, -1))

    def init_heads(self, class_embed: nn.Module, bbox_embed: nn.Module) -> None:
        # The box head predicts offsets from the anchors, none at first (DAB-DETR).
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)

    def decode(
        self,
        decoder: TransformerDecoder,
        queries: Queries,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        bbox_embed: nn.Module,
    ) -> tuple[Tensor, Tensor]:
        """Decode the queries with ``decoder``'s layers, refining their boxes layer by layer.

        Args:
            decoder: the transformer's decoder (its layers and final LayerNorm are used).
            queries: content [B, T, d], the initial content queries, and position [B, T, 4],
                their anchors, normalized (cx, cy, w, h) in (0, 1).
            memory, memory_pos: [B, L, d] the encoder output and the feature map's positions.
            memory_padding_mask: [B, L] bool, True on padding, or None.
            self_attn_mask: see :func:`models.aids.base.self_attention_mask`.
            bbox_embed: the box head, predicting [..., 4] offsets in inverse-sigmoid space.

        Returns:
            hs: [num_layers, B, T, d] every layer's output after the final LayerNorm.
            boxes: [num_layers, B, T, 4] every layer's boxes, normalized (cx, cy, w, h).
        """
        tgt, anchors = queries.content, queries.position
        d_model = tgt.shape[-1]
        outputs, boxes = [], []
        for i, layer in enumerate(decoder.layers):
            sine = box_sine_encoding(anchors, d_model)
            spatial = sine[..., :d_model]
            if i > 0:
                spatial = spatial * self.query_scale(tgt)
            ref_wh = self.ref_anchor_head(tgt).sigmoid()
            tgt = layer(
                tgt, self.ref_point_head(sine), memory, memory_pos, memory_padding_mask,
                self_attn_mask, cross_query_pos=modulate_by_size(spatial, ref_wh, anchors[..., 2:]),
            )  # fmt: skip
            hs = decoder.norm(tgt)
            box = (bbox_embed(hs) + inverse_sigmoid(anchors)).sigmoid()
            outputs.append(hs)
            boxes.append(box)
            anchors = box.detach()
        return torch.stack(outputs), torch.stack(boxes)
