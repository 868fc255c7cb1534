"""What the detector's parts exchange: levels, the encoder's memory, the decoder's output, and
the protocol every transformer follows.

A detector (:class:`models.detr.DETR`) is backbone -> neck -> transformer -> heads, with the
training aids around the queries. The backbone and the neck hand on :data:`Levels`; the
transformer turns them into a :class:`Memory` (``encode``) and decodes queries over it
(``decode``) into a :class:`Decoded`. A decoder of its own that an aid brings (anchor queries)
follows the same ``decode``. Each transformer is one module listed in ``models.TRANSFORMERS``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

# Per level, finest first: features [B, C, H_l, W_l], mask [B, H_l, W_l] bool (True on padding,
# images at the top left), positional encoding [B, d, H_l, W_l] in the features' dtype.
Levels = list[tuple[Tensor, Tensor, Tensor]]


@dataclass
class Queries:
    """Decoder queries: ``content`` [B, n, d], the decoder's initial input, and ``position``,
    [B, n, d] a learned positional query (DETR), [B, n, 4] normalized (cx, cy, w, h) anchor
    boxes (an aid that ``provides_queries``), or [B, n, 0] none, for a decoder that computes
    every query's position from its reference box (``query_pos_from_boxes``). ``reference``,
    for a decoder that samples around reference points (the deformable one): None (the decoder
    derives them from ``position``) or [B, n, 4] normalized boxes given with the queries
    (two-stage selection, denoising queries)."""

    content: Tensor
    position: Tensor
    reference: Tensor | None = None

    def __len__(self) -> int:
        return self.content.shape[1]

    def __getitem__(self, part: slice) -> "Queries":
        reference = None if self.reference is None else self.reference[:, part]
        return Queries(self.content[:, part], self.position[:, part], reference)

    @staticmethod
    def cat(parts: list["Queries"]) -> "Queries":
        if len(parts) == 1:
            return parts[0]
        given = [p.reference is not None for p in parts]
        if any(given) and not all(given):
            raise ValueError("queries with reference boxes and queries without cannot be joined")
        return Queries(
            torch.cat([p.content for p in parts], dim=1),
            torch.cat([p.position for p in parts], dim=1),
            torch.cat([p.reference for p in parts], dim=1) if all(given) else None,
        )


class Memory(NamedTuple):
    """The encoder's output, as the decoders and the aids read it.

    memory: [B, S, d] every level's cells, flattened row by row, finest level first.
    padding_mask: [B, S] bool, True on padding.
    spatial_shapes: L pairs (H_l, W_l), S = sum of H_l W_l (or an [L, 2] integer tensor, the
        official Deformable DETR form).
    level_start_index: L integers, where each level starts in S.
    valid_ratios: [B, L, 2] (w, h) float32, each image's valid cells over the map's, per level
        (the deformable encoder's); None where the transformer does not use them.
    pos: [B, S, d] the cells' positional encodings, for a decoder that adds them to its keys
        (DETR's); None where the decoder does not read them.
    """

    memory: Tensor
    padding_mask: Tensor
    spatial_shapes: Sequence[tuple[int, int]] | Tensor
    level_start_index: Sequence[int] | Tensor
    valid_ratios: Tensor | None = None
    pos: Tensor | None = None


class Decoded(NamedTuple):
    """What a decoder returns for T queries over L layers.

    hs: [L, B, T, d] every layer's output (through the final norm where the decoder has one).
    boxes: [L, B, T, 4] every layer's boxes, normalized (cx, cy, w, h), where the decoder
        computes them relative to references or anchors; None where the detector's box head
        predicts them from ``hs`` alone (DETR's).
    """

    hs: Tensor
    boxes: Tensor | None


class Transformer(Protocol):
    """The protocol of an encoder-decoder (:mod:`models.transformer`, :mod:`models.deformable`).

    ``d_model`` is its width. ``takes_references``: whether its decoder samples around reference
    boxes that may come with the queries (``Queries.reference``: two-stage selection gives them).
    ``query_dim``: the width of one learned query row of the detector's ``query_embed``;
    :meth:`learned_queries` splits rows into content and position. ``position_offset``: where
    the backbone's sine positions count each level's cells from (DETR 0, Deformable DETR 0.5).
    """

    d_model: int
    takes_references: ClassVar[bool]
    position_offset: ClassVar[float]
    query_dim: int

    def encode(self, levels: Levels) -> Memory:
        """The neck's levels (projected to ``d_model``) through the encoder."""
        ...

    def decode(
        self,
        queries: Queries,
        memory: Memory,
        self_attn_mask: Tensor | None,
        bbox_embed: nn.Module,
    ) -> Decoded:
        """Decode ``queries`` over ``memory``;
        ``self_attn_mask`` [T, T] or [B, T, T] bool, True where a query may NOT attend;
        ``bbox_embed`` the detector's box head(s), for a decoder that refines boxes."""
        ...

    def learned_queries(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows [B, n, query_dim] of ``query_embed`` -> (content [B, n, d], position
        [B, n, d])."""
        ...

    def box_heads(self, head: nn.Module) -> nn.Module:
        """The detector's box head(s), initialised from ``head`` as this decoder reads them."""
        ...

    def class_heads(self, head: nn.Linear) -> nn.Module:
        """The detector's class head(s) from the initialised ``head``: [L, ..., d] -> [L, ...,
        C] over every decoder layer's outputs."""
        ...
