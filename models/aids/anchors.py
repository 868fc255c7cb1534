"""Anchor-box queries (Liu et al. 2022, "DAB-DETR") and the decoder they drive.

Each matching query owns a box (cx, cy, w, h), stored before the sigmoid. ``--anchor_init
learned`` learns all four numbers from N(0, 1); ``uniform`` draws the centres uniformly in
[0, 1] and keeps them fixed (a buffer, saved in the state dict), learning only the sizes (the
reference's ``random_refpoints_xy``).

The queries are decoded by the aid's own :class:`AnchorDecoder` (the detector's transformer is
built without DETR's decoder layers), with the width, heads, FFN width and dropout of DETR's
decoder. At every layer, with ``d`` the width and ``c`` the content query (zero at the first layer):

- the box's sine encoding (:func:`box_sine_encoding`, ``2 d`` features: y, x, w, h) gives the
  positional query ``p = MLP(sine)``;
- the cross-attention's positional part is the (y, x) half of that encoding, times ``MLP(c)``
  elementwise from the second layer on, with its x features times ``w_ref / w`` and its y
  features times ``h_ref / h``, ``(w_ref, h_ref) = sigmoid(MLP(c))`` (:func:`modulate_by_size`);
- the layer (:class:`AnchorDecoderLayer`, Conditional DETR's layer) projects content and
  positions separately: self-attention takes ``q = Wqc c + Wqp p``, ``k = Wkc c + Wkp p``,
  ``v = Wv c``; cross-attention concatenates, per head, a content part (the query's projected
  content, plus its projected ``p`` at the first layer only) with the projected positional
  part, and the key's projected content (plus its projected position at the first layer only)
  with the key's projected position, so that each head's query and key have ``2 d / heads``
  features and its value ``d / heads``; post-norm residuals and DETR's ReLU FFN;
- the box head, shared by the layers, refines in inverse-sigmoid space: layer i predicts
  ``sigmoid(head(norm(out_i)) + logit(r_i))`` with ``r_0`` the anchor and
  ``r_{i+1} = sigmoid(head(out_i) + logit(detached r_i))`` computed from the layer's output
  before the final LayerNorm. ``r_{i+1}`` keeps its gradient in layer i+1's prediction and,
  detached, is layer i+1's anchor.

Initialisation as the reference: Xavier-uniform weights in the decoder and its MLPs, zero biases
of the attention's output projections, and a zero last layer of the box head (no offset at
first). The anchors' sine encoding is the reference's ``gen_sineembed_for_position``:
temperature 10000, angles ``2 pi`` times the coordinate, ``d / 2`` features per coordinate.

What stays this repository's: the encoder is DETR's, with the feature map's positions of
:class:`models.position_encoding.PositionEmbeddingSine` (temperature 10000 along both axes);
DAB-DETR's encoder uses ``PositionEmbeddingSineHW`` with temperature 20 along both axes and
rescales the positions at every encoder layer by an MLP of the features. The FFN is DETR's
ReLU and the dropout ``--dropout`` (the released DAB-DETR defaults to PReLU and dropout 0); the
decoder layers are post-norm whatever ``--pre_norm`` (the reference's decoder layer has no
pre-norm path). The class head and the loss are the model's (``--cls_loss``). Two guards the
reference does not have: anchor sizes are clamped at 1e-3 in the modulation (a collapsed box
cannot give an infinite query), and the ``uniform`` centres are truly fixed (the released code
sets ``requires_grad`` on a copy, so its centres train).
"""

import argparse

import torch
from torch import Tensor, nn

from models.aids.base import Aid, DetectorSpec, Queries
from models.attention import multi_head_attention
from models.mlp import MLP
from models.position_encoding import box_sine_encoding
from models.protocol import Decoded, Memory
from models.transformer import _ResidualLayer, xavier_init
from util.boxes import inverse_sigmoid

ANCHOR_INITS = ("learned", "uniform")


def refine(offset: Tensor, box: Tensor) -> Tensor:
    """[..., 4] ``offset`` in inverse-sigmoid space added to ``box`` (normalized cxcywh)."""
    return (offset + inverse_sigmoid(box)).sigmoid()


def modulate_by_size(spatial: Tensor, ref_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """DAB-DETR's width and height modulation of the positional part of the cross-attention.

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


def concat_heads(a: Tensor, b: Tensor, heads: int) -> Tensor:
    """[..., D] and [..., D] -> [..., 2 D]: head j's slice of ``a`` followed by head j's slice
    of ``b``, for every head j (Conditional DETR's per-head concatenation)."""
    return torch.cat([a.unflatten(-1, (heads, -1)), b.unflatten(-1, (heads, -1))], -1).flatten(-2)


class HeadAttention(nn.Module):
    """Multi-head attention over queries, keys and values projected by the caller (no input
    projection), then the output projection ``out_proj`` [d, d] (zero bias). Queries and keys
    may be wider than the values: each head takes its slice of each. ``fused_attn`` picks the
    kernel of :func:`models.attention.attention`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, fused_attn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.fused_attn = fused_attn
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """query [B, Lq, E], key [B, Lk, E], value [B, Lk, d]; masks as in
        :func:`models.attention.attention` -> [B, Lq, d]."""
        dropout_p = self.dropout if self.training else 0.0
        out = multi_head_attention(
            query, key, value, self.num_heads, key_padding_mask, dropout_p, self.fused_attn,
            attn_mask,
        )  # fmt: skip
        return self.out_proj(out)


class AnchorDecoderLayer(_ResidualLayer):
    """DAB-DETR's decoder layer (module docstring): self-attention with separate content and
    position projections, cross-attention with per-head concatenated content and positional
    parts, post-norm residuals, ReLU FFN. Only the ``first`` layer has ``ca_qpos_proj``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, first: bool):
        super().__init__(d_model, dim_feedforward, dropout, pre_norm=False)
        if d_model % nhead:
            raise ValueError(f"hidden_dim {d_model} is not divisible by nheads {nhead}")
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = HeadAttention(d_model, nhead, dropout)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = HeadAttention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt: [B, Q, d] content queries; query_pos: [B, Q, d] positional queries (MLP of the
        anchors' encoding); query_sine: [B, Q, d] the cross-attention's positional part;
        memory, memory_pos: [B, L, d]; memory_padding_mask: [B, L] bool, True on padding;
        self_attn_mask: [Q, Q] or [B, Q, Q] (see :func:`models.attention.attention`) or None
        -> [B, Q, d]."""
        tgt = self._residual(
            tgt, lambda x: self._self_attention(x, query_pos, self_attn_mask), self.norm1
        )
        tgt = self._residual(
            tgt,
            lambda x: self._cross_attention(
                x, query_pos, query_sine, memory, memory_pos, memory_padding_mask
            ),
            self.norm2,
        )
        return self._residual(tgt, self._feed_forward, self.norm3)

    def _self_attention(self, tgt: Tensor, query_pos: Tensor, mask: Tensor | None) -> Tensor:
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        return self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=mask)

    def _cross_attention(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        q, k = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(memory_pos)
        if self.ca_qpos_proj is not None:  # the first layer
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        heads = self.cross_attn.num_heads
        q = concat_heads(q, self.ca_qpos_sine_proj(query_sine), heads)
        k = concat_heads(k, k_pos, heads)
        return self.cross_attn(q, k, self.ca_v_proj(memory), padding_mask)


class AnchorDecoder(nn.Module):
    """DAB-DETR's decoder (module docstring): ``num_layers`` :class:`AnchorDecoderLayer`, the
    final LayerNorm, the MLP from an anchor's encoding to its positional query
    (``ref_point_head``), the MLP that scales the cross-attention's positional part (only with
    more than one layer: the first layer does not use it) and the MLP of the reference width and
    height (``ref_anchor_head``). Weights Xavier-uniform."""

    def __init__(
        self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(
            AnchorDecoderLayer(d_model, nhead, dim_feedforward, dropout, first=i == 0)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)
        xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        anchors: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        bbox_embed: nn.Module,
    ) -> tuple[Tensor, Tensor]:
        """Decode, refining the boxes layer by layer.

        Args:
            tgt: [B, T, d] the initial content queries.
            anchors: [B, T, 4] the queries' anchors, normalized (cx, cy, w, h) in (0, 1).
            memory, memory_pos: [B, L, d] the encoder output and the feature map's positions.
            memory_padding_mask: [B, L] bool, True on padding, or None.
            self_attn_mask: see :func:`models.aids.base.self_attention_mask`.
            bbox_embed: the box head, predicting [..., 4] offsets in inverse-sigmoid space.

        Returns:
            hs: [num_layers, B, T, d] every layer's output after the final LayerNorm.
            boxes: [num_layers, B, T, 4] every layer's boxes, normalized (cx, cy, w, h).
        """
        d_model = tgt.shape[-1]
        reference = anchors  # the box that the layer's prediction refines, with its gradient
        outputs, boxes = [], []
        for i, layer in enumerate(self.layers):
            sine = box_sine_encoding(anchors, d_model)
            spatial = sine[..., :d_model]
            if i > 0:
                spatial = spatial * self.query_scale(tgt)
            ref_wh = self.ref_anchor_head(tgt).sigmoid()
            spatial = modulate_by_size(spatial, ref_wh, anchors[..., 2:])
            tgt = layer(
                tgt, self.ref_point_head(sine), spatial, memory, memory_pos, memory_padding_mask,
                self_attn_mask,
            )  # fmt: skip
            outputs.append(self.norm(tgt))
            boxes.append(refine(bbox_embed(outputs[-1]), reference))
            if i + 1 < len(self.layers):
                reference = refine(bbox_embed(tgt), anchors)
                anchors = reference.detach()
        return torch.stack(outputs), torch.stack(boxes)


class AnchorQueries(Aid):
    """DAB-DETR's anchor-box queries and the decoder they drive (module docstring). Holds the
    anchors of every matching query (all groups) and the :class:`AnchorDecoder`."""

    name = "anchors"
    provides_queries = True

    def __init__(
        self,
        d_model: int,
        num_layers: int,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        anchor_init: str = "learned",
    ):
        super().__init__()
        if d_model % 4:
            raise ValueError(
                f"anchor queries encode 4 coordinates in d_model / 2 sine features each: "
                f"hidden_dim must be a multiple of 4, got {d_model}"
            )
        if anchor_init not in ANCHOR_INITS:
            raise ValueError(f"anchor_init must be one of {ANCHOR_INITS}, got {anchor_init!r}")
        self.d_model = d_model
        self.anchor_init = anchor_init
        self.decoder = AnchorDecoder(num_layers, d_model, nhead, dim_feedforward, dropout)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--anchor_queries",
            action="store_true",
            help="queries are learned anchor boxes refined by every decoder layer (DAB-DETR)",
        )
        group.add_argument(
            "--anchor_init",
            default="learned",
            choices=ANCHOR_INITS,
            help="learned: every anchor coordinate is learned; uniform: the anchor centres are "
            "drawn uniformly in the image and fixed, their sizes learned",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.anchor_queries

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.anchor_init != "learned" and not args.anchor_queries:
            raise ValueError(
                f"--anchor_init {args.anchor_init} sets the anchors of anchor queries; add "
                "--anchor_queries"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "AnchorQueries":
        return cls(
            spec.hidden_dim, spec.dec_layers, nhead=spec.nheads,
            dim_feedforward=spec.dim_feedforward, dropout=spec.dropout,
            anchor_init=args.anchor_init,
        )  # fmt: skip

    def build_queries(self, count: int) -> None:
        if self.anchor_init == "learned":
            self.anchors = nn.Embedding(count, 4)
            return
        self.register_buffer("anchor_xy", inverse_sigmoid(torch.rand(count, 2)))
        self.anchor_wh = nn.Embedding(count, 2)

    def anchor_logits(self) -> Tensor:
        """[slots, 4] every anchor (cx, cy, w, h) before the sigmoid."""
        if self.anchor_init == "learned":
            return self.anchors.weight
        return torch.cat([self.anchor_xy, self.anchor_wh.weight], dim=-1)

    def initial_queries(self, count: int, batch: int) -> Queries:
        """Zero content and the first ``count`` anchors, normalized (cx, cy, w, h)."""
        anchors = self.anchor_logits()[:count].sigmoid()
        content = anchors.new_zeros(batch, count, self.d_model)
        return Queries(content, anchors.expand(batch, -1, -1))

    def init_heads(self, class_embed: nn.Module, bbox_embed: nn.Module) -> None:
        # The box head predicts offsets from the anchors, none at first (DAB-DETR).
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)

    def decode(
        self,
        queries: Queries,
        memory: Memory,
        self_attn_mask: Tensor | None,
        bbox_embed: nn.Module,
    ) -> Decoded:
        """Decode with the aid's :class:`AnchorDecoder` over DETR's encoder output (its ``pos``
        read by the cross-attention's keys). ``queries`` carry the content [B, T, d] and the
        anchors [B, T, 4]; shapes in :meth:`AnchorDecoder.forward`."""
        hs, boxes = self.decoder(
            queries.content, queries.position, memory.memory, memory.pos, memory.padding_mask,
            self_attn_mask, bbox_embed,
        )  # fmt: skip
        return Decoded(hs, boxes)
