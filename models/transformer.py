"""DETR's transformer encoder-decoder, batch-first.

Parameters carry the names and shapes of the official DETR code (``torch.nn.MultiheadAttention``
inside ``encoder.layers.{i}`` and ``decoder.layers.{i}``, ``linear1``, ``linear2``, ``norm1..3``,
``decoder.norm``), so official checkpoints load unchanged, while attention itself runs through
:func:`models.attention.attention` (``F.scaled_dot_product_attention`` with the key padding mask
and, where a caller gives one, an attention mask).
Positional encodings are added to queries and keys at every layer; the decoder returns the output
of every layer, each through the final decoder LayerNorm, for the auxiliary losses.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import multi_head_attention
from models.neck import InputProjection
from models.protocol import Decoded, Levels, Memory, Queries

if TYPE_CHECKING:
    from models.config import ModelConfig

# The configuration's fields that only the deformable transformer reads.
DEFORMABLE_ONLY = (
    "num_feature_levels", "enc_n_points", "dec_n_points", "box_refine", "query_pos_from_boxes",
    "look_forward_twice",
)  # fmt: skip


class MultiheadAttention(nn.Module):
    """Multi-head attention named and shaped like ``nn.MultiheadAttention``, batch-first.

    ``in_proj_weight`` [3 d, d] and ``in_proj_bias`` [3 d] stack the query, key and value
    projections; ``out_proj`` is a Linear(d, d). ``fused_attn`` picks the fused or the eager
    kernel. The attention weights are not computed on the normal path; read them, when needed,
    from a forward hook on this module.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, fused_attn: bool = True
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.fused_attn = fused_attn
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """query [B, Lq, d], key and value [B, Lk, d], key_padding_mask [B, Lk] bool (True =
        ignore) or None, attn_mask [Lq, Lk] or [B, Lq, Lk], bool (True = may not attend) or
        additive float, or None -> [B, Lq, d]."""
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        dropout_p = self.dropout if self.training else 0.0
        out = multi_head_attention(
            q, k, v, self.num_heads, key_padding_mask, dropout_p, self.fused_attn, attn_mask
        )
        return self.out_proj(out)


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every weight matrix of ``module`` (every parameter of
    more than one dimension), in parameter order, as DETR's and Deformable DETR's transformers
    and DAB-DETR's decoder initialise theirs."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _ResidualLayer(nn.Module):
    """The parts every layer shares: the feed-forward block and the residual + LayerNorm wrapper.

    ``pre_norm`` puts the LayerNorm before each sublayer (``x + f(norm(x))``); otherwise after
    the residual sum (``norm(x + f(x))``), as in the original transformer and DETR's default.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _residual(self, x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.Module) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(_ResidualLayer):
    """Self-attention over the feature map (positions added to queries and keys), then FFN."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ):
        super().__init__(d_model, dim_feedforward, dropout, pre_norm)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """src, pos: [B, L, d]; padding_mask: [B, L] bool, True on padding; attn_mask: [L, L]
        or [B, L, L] (see :func:`models.attention.attention`) or None -> [B, L, d]."""
        src = self._residual(
            src, lambda x: self.self_attn(x + pos, x + pos, x, padding_mask, attn_mask), self.norm1
        )
        return self._residual(src, self._feed_forward, self.norm2)


class TransformerDecoderLayer(_ResidualLayer):
    """Self-attention among the queries, cross-attention to the encoder memory, then FFN."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool
    ):
        super().__init__(d_model, dim_feedforward, dropout, pre_norm)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: [B, Q, d]; memory, memory_pos: [B, L, d]; memory_padding_mask: [B, L]
        bool, True on padding; self_attn_mask [Q, Q] or [B, Q, Q] (see
        :func:`models.attention.attention`) or None -> [B, Q, d]."""
        tgt = self._residual(
            tgt,
            lambda x: self.self_attn(x + query_pos, x + query_pos, x, attn_mask=self_attn_mask),
            self.norm1,
        )
        tgt = self._residual(
            tgt,
            lambda x: self.multihead_attn(
                x + query_pos, memory + memory_pos, memory, memory_padding_mask
            ),
            self.norm2,
        )
        return self._residual(tgt, self._feed_forward, self.norm3)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; a final LayerNorm only with pre-norm layers (as in DETR)."""

    def __init__(self, num_layers: int, pre_norm: bool, d_model: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model=d_model, pre_norm=pre_norm, **layer_kwargs)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre_norm else None

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """src, pos: [B, L, d]; padding_mask: [B, L] bool or None; attn_mask as in
        :class:`TransformerEncoderLayer` -> memory [B, L, d]."""
        for layer in self.layers:
            src = layer(src, pos, padding_mask, attn_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output through the final LayerNorm."""

    def __init__(self, num_layers: int, pre_norm: bool, d_model: int, **layer_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model=d_model, pre_norm=pre_norm, **layer_kwargs)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Shapes as in :class:`TransformerDecoderLayer` -> [num_layers, B, Q, d]."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, memory_pos, memory_padding_mask, self_attn_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """DETR's encoder-decoder: 6 + 6 layers, width 256, 8 heads, FFN 2048, ReLU, dropout 0.1.

    It follows the transformer protocol (:mod:`models.protocol`): the encoder reads the neck's
    one level (:class:`models.neck.InputProjection`: the backbone's last level, projected), the
    queries are zero content and a learned position each, and the box head predicts boxes from
    the decoder's output alone. ``num_decoder_layers`` 0 builds no decoder (``decoder`` None),
    for queries that an aid decodes with a decoder of its own (anchor queries).
    """

    takes_references: ClassVar[bool] = False
    # DETR's sine positions count cells from 1 (models.position_encoding).
    position_offset: ClassVar[float] = 0.0

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        layer_kwargs = dict(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
        )
        self.encoder = TransformerEncoder(num_encoder_layers, pre_norm, **layer_kwargs)
        self.decoder = None
        if num_decoder_layers:
            self.decoder = TransformerDecoder(num_decoder_layers, pre_norm, **layer_kwargs)
        self.d_model = d_model
        self.query_dim = d_model
        xavier_init(self)

    @staticmethod
    def backbone_levels(config: "ModelConfig") -> int:
        """DETR reads one backbone level, the ``--feature_stage`` map."""
        return 1

    @classmethod
    def from_config(cls, config: "ModelConfig", aids: Sequence) -> "Transformer":
        """The transformer of ``config``; without a decoder when one of the training ``aids``
        decodes the queries itself. Flags that only the deformable transformer reads, away from
        their defaults, are refused (ValueError naming them)."""
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        given = [
            f"--{name}" if value is True else f"--{name} {value}"
            for name in DEFORMABLE_ONLY
            if (value := getattr(config, name)) != defaults[name]
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: the deformable transformer reads these; add --transformer "
                "deformable or drop them"
            )
        decodes_itself = any(aid.provides_queries for aid in aids)
        return cls(
            config.hidden_dim, config.nheads, config.enc_layers,
            0 if decodes_itself else config.dec_layers, config.dim_feedforward, config.dropout,
            config.pre_norm,
        )  # fmt: skip

    def build_neck(
        self, in_channels: Sequence[int], convolution_free: bool = True
    ) -> InputProjection:
        """A Linear from the backbone's last level to the transformer's width (the official 1x1
        convolution, whatever the backbone)."""
        return InputProjection(in_channels[-1], self.d_model)

    def learned_queries(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows [B, n, d] -> (content: zeros, position: the rows), as in DETR."""
        return torch.zeros_like(rows), rows

    def box_heads(self, head: nn.Module) -> nn.Module:
        """DETR's box head as it is."""
        return head

    def class_heads(self, head: nn.Linear) -> nn.Module:
        """DETR's class head as it is, shared by the decoder layers."""
        return head

    def encode(self, levels: Levels) -> Memory:
        """The neck's last (only) level (features [B, d, H, W], mask [B, H, W], pos
        [B, d, H, W]) through the encoder -> :class:`models.protocol.Memory` of its H W cells,
        with their positions ``pos``."""
        features, mask, pos = levels[-1]
        src = features.flatten(2).transpose(1, 2)
        mask, pos = mask.flatten(1), pos.flatten(2).transpose(1, 2)
        shape = (features.shape[-2], features.shape[-1])
        return Memory(self.encoder(src, pos, mask), mask, (shape,), (0,), pos=pos)

    def decode(
        self,
        queries: Queries,
        memory: Memory,
        self_attn_mask: Tensor | None = None,
        bbox_embed: nn.Module | None = None,
    ) -> Decoded:
        """The decoder over ``queries`` (content [B, Q, d], position [B, Q, d]) -> every
        layer's output [L, B, Q, d]; no boxes (the box head predicts them)."""
        hs = self.decoder(
            queries.content, queries.position, memory.memory, memory.pos, memory.padding_mask,
            self_attn_mask,
        )  # fmt: skip
        return Decoded(hs, None)

    def forward(
        self,
        src: Tensor,
        padding_mask: Tensor | None,
        query_pos: Tensor,
        pos: Tensor,
        tgt: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode the feature map, decode the queries.

        Args:
            src: [B, L, d] flattened, projected feature map (L = H * W).
            padding_mask: [B, L] bool, True on padding, or None.
            query_pos: [Q, d] or [B, Q, d] query positional embeddings (DETR's learned
                ``query_embed``), added to the queries at every decoder layer.
            pos: [B, L, d] positional encoding of the feature map.
            tgt: [B, Q, d] the decoder's initial queries; None: zeros, as in DETR.
            self_attn_mask: [Q, Q] or [B, Q, Q] mask of the decoder's self-attention (query
                groups, denoising queries), bool (True = may not attend) or additive; or None.

        Returns:
            hs: [num_decoder_layers, B, Q, d], every decoder layer's output after the final norm.
            memory: [B, L, d], the encoder output.
        """
        memory = self.encoder(src, pos, padding_mask)
        if query_pos.dim() == 2:
            query_pos = query_pos.unsqueeze(0).expand(src.shape[0], -1, -1)
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, query_pos, memory, pos, padding_mask, self_attn_mask)
        return hs, memory
