"""The neck: the backbone's levels to the transformer's input levels, at its width.

DETR's (:class:`InputProjection`) projects the backbone's last level with a Linear over channels,
the official 1x1 convolution as a linear map (its parameters keep the official ``input_proj``
names). Deformable DETR's (:class:`InputLevels`) projects every backbone level with a Linear +
GroupNorm (the official 1x1 convolution + GroupNorm) and adds extra levels at twice the stride
each. After a convolution-free backbone (PVT) each extra level is a linear map of
non-overlapping 2x2 patches + GroupNorm (:class:`ExtraLevel`, in place of the official 3x3,
stride-2 convolution): no convolution on the PVT path. After ResNet-50 it is the official 3x3,
stride-2 convolution + GroupNorm (:class:`ConvLevel`), so that the official Deformable DETR
checkpoints load. Both necks take and return :data:`models.protocol.Levels`.

Two official steps depend on the batch's padding and are changed in :class:`InputLevels`: the
GroupNorm statistics cover each image's valid cells only (:class:`MaskedGroupNorm`), and the
extra level reads the backbone's features zeroed on padding (a PVT leaves them non-zero), the
map padded to even sizes with zeros (:class:`ExtraLevel`), its mask the fine mask's top-left
cells (the official nearest-downsamples the image's mask). On a batch without padding both are
the official computation.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.protocol import Levels


def backbone_levels(num_feature_levels: int, feature_stage: int) -> int:
    """How many backbone stages, the last one ``feature_stage``, give levels of the
    ``num_feature_levels``: those from stride 8 on (PVT's stage 2, ResNet-50's layer 2; as in
    Deformable DETR, no stride-4 level, the one with the most cells), at most
    ``num_feature_levels``, at least the ``feature_stage`` itself. Extra levels make up the
    rest."""
    return max(1, min(num_feature_levels, feature_stage - 1))


class InputProjection(nn.Linear):
    """DETR's neck: the backbone's last level projected to the transformer's width by a Linear
    over channels (``weight`` [d, C], ``bias`` [d]: the official ``input_proj``)."""

    def forward(
        self, levels: Levels, position_encoding: Callable[[Tensor], Tensor] | None = None
    ) -> Levels:
        """levels: the backbone's (:data:`models.protocol.Levels`); ``position_encoding`` is
        not read (no level is added) -> [(features [B, d, H, W], mask, pos)] of the last
        level."""
        features, mask, pos = levels[-1]
        projected = super().forward(features.flatten(2).transpose(1, 2))  # [B, H W, d]
        return [(projected.transpose(1, 2).unflatten(2, features.shape[-2:]), mask, pos)]


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics, given a padding mask, cover each image's valid cells
    only, so that they do not depend on the batch's padding. Without a mask, ``nn.GroupNorm``."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], mask [B, H, W] bool (True on padding) or None -> [B, C, H, W], in at
        least float32 (as autocast runs GroupNorm)."""
        if mask is None:
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        groups = x.to(dtype).unflatten(1, (self.num_groups, -1))  # [B, G, C / G, H, W]
        valid = (~mask).to(dtype)[:, None, None]
        dims = (2, 3, 4)
        count = valid.sum(dims, keepdim=True) * groups.shape[2]
        mean = (groups * valid).sum(dims, keepdim=True) / count
        var = ((groups - mean).square() * valid).sum(dims, keepdim=True) / count
        out = ((groups - mean) * torch.rsqrt(var + self.eps)).flatten(1, 2)
        return out * self.weight[:, None, None] + self.bias[:, None, None]


class LevelProjection(nn.Module):
    """A backbone level to the transformer's width: Linear over channels + GroupNorm (the official
    1x1 convolution + GroupNorm), statistics over each image's valid cells."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = MaskedGroupNorm(num_groups, out_channels)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, C_in, H, W], mask [B, H, W] bool (True on padding) or None -> [B, C_out, H, W]."""
        return self.norm(self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), mask)


class ExtraLevel(nn.Module):
    """A map at twice the stride: a linear map of non-overlapping 2x2 patches + GroupNorm.

    Replaces the official 3x3, stride-2 convolution. Features are zeroed on padding and an odd
    map gets a zero row or column first, so a coarse cell sees the same values whether the batch
    pads around the image or not; it is padding when its top-left fine cell is. (PVT's
    ``PatchProject`` is the same patchify-and-project, but drops cells that do not fill a patch
    and normalizes with a LayerNorm.)
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.proj = nn.Linear(4 * in_channels, out_channels)
        self.norm = MaskedGroupNorm(num_groups, out_channels)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C_in, H, W], mask [B, H, W] bool (True on padding) -> (features
        [B, C_out, ceil(H / 2), ceil(W / 2)], mask [B, ceil(H / 2), ceil(W / 2)] bool)."""
        height, width = x.shape[-2:]
        pad = (0, width % 2, 0, height % 2)
        x = F.pad(x.masked_fill(mask[:, None], 0.0), pad)
        patches = rearrange(x, "b c (h p1) (w p2) -> b h w (p1 p2 c)", p1=2, p2=2)
        mask = coarse_mask(mask)
        return self.norm(self.proj(patches).permute(0, 3, 1, 2), mask), mask


def coarse_mask(mask: Tensor) -> Tensor:
    """mask [B, H, W] bool (True on padding) -> [B, ceil(H / 2), ceil(W / 2)]: each 2x2 patch's
    top-left cell (a strided slice would not export with symbolic sizes)."""
    height, width = mask.shape[-2:]
    mask = F.pad(mask, (0, width % 2, 0, height % 2), value=True)
    return rearrange(mask, "b (h p1) (w p2) -> b h w p1 p2", p1=2, p2=2)[..., 0, 0]


class ConvLevel(nn.Module):
    """A map at twice the stride, as the official Deformable DETR makes it after ResNet-50: a 3x3,
    stride-2 convolution (padding 1) + GroupNorm. The features are zeroed on padding first and
    the mask is :func:`coarse_mask`, so that a coarse cell does not depend on the batch's
    padding."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = MaskedGroupNorm(num_groups, out_channels)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C_in, H, W], mask [B, H, W] bool (True on padding) -> (features
        [B, C_out, ceil(H / 2), ceil(W / 2)], mask [B, ceil(H / 2), ceil(W / 2)] bool)."""
        mask_out = coarse_mask(mask)
        out = self.proj(x.masked_fill(mask[:, None], 0.0))
        return self.norm(out, mask_out), mask_out


class InputLevels(nn.Module):
    """The transformer's input levels from the backbone's: each projected (``input_proj``), then
    ``num_feature_levels - len(in_channels)`` extra levels at twice the stride each
    (``extra_levels``), the first from the backbone's last level, the others from the previous
    extra level, as in Deformable DETR: :class:`ExtraLevel` after a ``convolution_free``
    backbone, else :class:`ConvLevel`."""

    def __init__(
        self,
        in_channels: Sequence[int],
        d_model: int,
        num_feature_levels: int,
        convolution_free: bool = True,
    ):
        super().__init__()
        if num_feature_levels < len(in_channels):
            raise ValueError(
                f"num_feature_levels {num_feature_levels} is below the backbone's "
                f"{len(in_channels)} levels: choose at least {len(in_channels)}"
            )
        self.input_proj = nn.ModuleList(LevelProjection(c, d_model) for c in in_channels)
        extra = num_feature_levels - len(in_channels)
        level = ExtraLevel if convolution_free else ConvLevel
        self.extra_levels = nn.ModuleList(
            level(in_channels[-1] if i == 0 else d_model, d_model) for i in range(extra)
        )

    def forward(self, levels: Levels, position_encoding: Callable[[Tensor], Tensor]) -> Levels:
        """levels: the backbone's (features [B, C_l, H_l, W_l], mask [B, H_l, W_l] bool, pos
        [B, d, H_l, W_l]) per level, finest first (:class:`models.backbone.Joiner`'s output);
        position_encoding: mask [B, h, w] -> [B, d, h, w] for the extra levels (the Joiner's
        ``[1]``) -> every level projected, then the extra levels: ``num_feature_levels``
        (features [B, d, H_l, W_l], mask, pos)."""
        if len(levels) != len(self.input_proj):
            raise ValueError(
                f"the input projections were built for {len(self.input_proj)} backbone levels, "
                f"got {len(levels)}"
            )
        srcs = [proj(x, mask) for proj, (x, mask, _) in zip(self.input_proj, levels, strict=True)]
        masks = [mask for _, mask, _ in levels]
        pos_embeds = [pos for _, _, pos in levels]
        x = levels[-1][0]
        for extra in self.extra_levels:
            x, mask = extra(x, masks[-1])
            srcs.append(x)
            masks.append(mask)
            pos_embeds.append(position_encoding(mask).to(x.dtype))
        return list(zip(srcs, masks, pos_embeds, strict=True))
