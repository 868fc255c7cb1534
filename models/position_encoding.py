"""Positional encodings of a feature map for the DETR transformer.

Both encodings take the padding mask of the feature map and return ``[B, 2 * num_pos_feats, H, W]``,
with their halves in the official DETR order (sine: y then x; learned: column then row) so that
official checkpoints keep their meaning.
"""

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine of each pixel's row and column, counted over the valid (unpadded) region.

    With ``normalize`` the coordinates are divided by the image's valid height and width and scaled
    to ``[0, 2 pi]``, so an image's encoding does not depend on how much padding its batch adds.
    ``offset`` is subtracted from the 1-based row and column counts first: DETR's 0, Deformable
    DETR's 0.5 (its cells' centres, ``(cumsum - 0.5) / (last + eps)``).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        offset: float = 0.0,
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(
                f"num_pos_feats must be even (sine and cosine pairs), got {num_pos_feats}"
            )
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask: [B, H, W] bool, True on padding -> [B, 2 * num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # The last row and column, indexed (not sliced: a slice's length stays symbolic
            # when the model is exported, and the division would not broadcast).
            y_last, x_last = y_embed[:, -1, None, :], x_embed[:, :, -1, None]
            y_embed = (y_embed - self.offset) / (y_last + eps) * (2 * math.pi)
            x_embed = (x_embed - self.offset) / (x_last + eps) * (2 * math.pi)
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_encoding(coords: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """[...] normalized coordinates (0..1) -> [..., num_pos_feats]: the features that
    :class:`PositionEmbeddingSine` gives a cell at that coordinate along one axis (angles
    ``2 pi coords / temperature^(2 (i // 2) / num_pos_feats)``, sine and cosine interleaved)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    return _interleave_sin_cos(coords[..., None] * (2 * math.pi) / dim_t)


def box_sine_encoding(boxes: Tensor, d_model: int) -> Tensor:
    """[..., 4] normalized (cx, cy, w, h) -> [..., 2 d_model]: the sine encodings of y, x, w and
    h, ``d_model / 2`` features each, in that order (temperature 10000, angles ``2 pi`` times
    the coordinate). The (y, x) half is the encoding that the feature map's cells get at the
    box's centre (:class:`PositionEmbeddingSine` features)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([sine_encoding(v, d_model // 2) for v in (cy, cx, w, h)], dim=-1)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """[..., F] angles -> [..., F] as sin of the even entries and cos of the odd ones, paired."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingLearned(nn.Module):
    """A learned embedding per row and per column, for maps up to ``max_size`` cells a side."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """mask: [B, H, W] bool (only its shape is used) -> [B, 2 * num_pos_feats, H, W]."""
        batch, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"a {h}x{w} feature map exceeds the learned positional embedding's {max_size} "
                "cells per side; use smaller images or --position_embedding sine"
            )
        rows = self.row_embed(torch.arange(h, device=mask.device))
        cols = self.col_embed(torch.arange(w, device=mask.device))
        pos = torch.cat((cols[None, :, :].expand(h, w, -1), rows[:, None, :].expand(h, w, -1)), -1)
        return pos.permute(2, 0, 1).expand(batch, -1, -1, -1)


def build_position_encoding(
    kind: str = "sine", hidden_dim: int = 256, offset: float = 0.0
) -> nn.Module:
    """The ``kind`` ('sine' | 'learned') encoding with ``hidden_dim / 2`` features per axis; a
    sine encoding counts cells from ``offset`` (:class:`PositionEmbeddingSine`)."""
    num_pos_feats = hidden_dim // 2
    if kind == "sine":
        return PositionEmbeddingSine(num_pos_feats, normalize=True, offset=offset)
    if kind == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
