"""Backbones for DETR: a padded batch and its mask in; feature maps (levels), their masks and
their positional encodings out.

Every backbone declares what it returns: ``out_channels`` and ``out_strides``, one entry per
level, finest first. ``pvt_tiny`` .. ``pvt_large`` return the chosen stages of a convolution-free
PVT v1 (by default the last one, stride 32, 512 channels, as in the paper's PVT + DETR).
``resnet50`` is the convolutional baseline of the ablations: torchvision's ResNet-50 with frozen
BatchNorm, layer4 output (stride 32, 2048 channels; layers 2 and 3 too for a multi-level
transformer). Nothing is downloaded; pretrained weights
come from a file the user names.
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from models import pvt
from models.position_encoding import build_position_encoding
from models.protocol import Levels
from util import checkpoint
from util.checkpoint import load_state_dict_strict
from util.misc import image_extents

# Every backbone name the project accepts: the PVT variants' table, then the baseline.
BACKBONES = (*pvt.VARIANT_DEPTHS, "resnet50")

# A backbone body's output, per level: features [B, C, h, w], mask [B, h, w] bool; the Joiner
# adds each level's positional encoding (models.protocol.Levels).
Maps = list[tuple[Tensor, Tensor]]

# ResNet-50's layers that a backbone may return: (channels, stride) of each.
RESNET_LAYERS = {2: (512, 8), 3: (1024, 16), 4: (2048, 32)}


class PVTBackbone(nn.Module):
    """The maps of the chosen PVT v1 stages (``stages``, 1..4) and their downsampled masks."""

    # No convolution: the necks after it keep none either (models.neck).
    convolution_free = True

    def __init__(
        self,
        variant: str,
        stages: tuple[int, ...] = (4,),
        drop_path_rate: float = 0.1,
        train: bool = True,
        pretrained: str | None = None,
    ):
        super().__init__()
        if not stages or any(stage not in (1, 2, 3, 4) for stage in stages):
            raise ValueError(f"PVT stages must be among 1, 2, 3, 4, got {stages}")
        self.body = pvt.build_pvt(
            variant,
            num_classes=0,
            out_indices=tuple(stage - 1 for stage in stages),
            drop_path_rate=drop_path_rate,
        )
        if pretrained is not None:
            pvt.load_pvt_checkpoint(self.body, pretrained)
        self.body.requires_grad_(train)
        self.out_channels = self.body.out_channels
        self.out_strides = self.body.out_strides

    def forward(self, images: Tensor, mask: Tensor) -> Maps:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) -> one (features
        [B, C_i, H / s_i, W / s_i], mask [B, H / s_i, W / s_i] bool) per chosen stage."""
        return list(zip(*self.body.forward_masked(images, mask), strict=True))


class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50, frozen BatchNorm, the outputs of ``layers`` (among 2, 3, 4; DETR's:
    layer4 alone); as in DETR, the stem and layer1 stay frozen, and with ``train=False``
    everything does.

    On a padded batch every normalisation's output is zeroed outside each image's own extent at
    that resolution (a forward hook), so that a convolution next to an image's border reads
    zeros whether the batch adds padding there or the image ends the tensor: with padding to a
    multiple of 32, an image's features are those it gets alone. Batches without padding run
    the official computation, except in a graph captured by ``torch.export``, which cannot
    branch on the mask's values and zeroes the padding of every batch.
    """

    # A convolutional network: Deformable DETR's neck after it is the official one (models.neck).
    convolution_free = False

    def __init__(
        self, train: bool = True, pretrained: str | None = None, layers: tuple[int, ...] = (4,)
    ):
        super().__init__()
        if not layers or list(layers) != sorted(set(layers)) or not set(layers) <= {2, 3, 4}:
            raise ValueError(f"ResNet-50 layers must be among 2, 3, 4 in order, got {layers}")
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained is not None:
            state_dict = checkpoint.load(pretrained)
            # Frozen BatchNorm keeps no step counter; files saved from nn.BatchNorm2d do.
            state_dict = {
                k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
            }
            load_state_dict_strict(resnet, state_dict, f"{pretrained} (torchvision ResNet-50)")
        returned = {f"layer{layer}": str(i) for i, layer in enumerate(layers)}
        self.body = IntermediateLayerGetter(resnet, return_layers=returned)
        for name, parameter in self.body.named_parameters():
            parameter.requires_grad_(train and name.startswith(("layer2", "layer3", "layer4")))
        self.out_channels = tuple(RESNET_LAYERS[layer][0] for layer in layers)
        self.out_strides = tuple(RESNET_LAYERS[layer][1] for layer in layers)
        # Set while a padded batch runs: each image's rows and columns, the input height, and
        # the masks made so far, one per resolution (every normalisation at a stride shares it).
        self._extent: tuple[Tensor, Tensor, int] | None = None
        self._valid: dict[tuple[int, int], Tensor] = {}
        for module in self.body.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.register_forward_hook(self._zero_padding)

    def forward(self, images: Tensor, mask: Tensor) -> Maps:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding, images at the top left) ->
        per layer (layer4: features [B, 2048, H / 32, W / 32]), the features and the mask of
        the same grid, nearest-downsampled."""
        if torch.compiler.is_exporting() or mask.any():
            self._extent = (*image_extents(mask), images.shape[-2])
        try:
            outputs = self.body(images)
        finally:
            self._extent = None
            self._valid.clear()
        return [
            (
                features,
                F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0],
            )
            for features in outputs.values()
        ]

    def _zero_padding(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Zero ``output`` [B, C, h, w] beyond each image's rows and columns at its stride."""
        if self._extent is None:
            return None
        size = tuple(output.shape[-2:])
        if torch.compiler.is_exporting():  # symbolic sizes, which cannot key the cache
            return output * self._valid_cells(size, output.device).to(output.dtype)
        if size not in self._valid:
            self._valid[size] = self._valid_cells(size, output.device)
        return output * self._valid[size].to(output.dtype)

    def _valid_cells(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """[B, 1, h, w] bool: the cells of an h x w map inside each image's rows and columns."""
        rows, cols, height = self._extent
        stride = height // size[0]
        valid_rows = torch.arange(size[0], device=device) < -(-rows[:, None] // stride)
        valid_cols = torch.arange(size[1], device=device) < -(-cols[:, None] // stride)
        return valid_rows[:, None, :, None] & valid_cols[:, None, None, :]


class Joiner(nn.Sequential):
    """``[0]`` the backbone, ``[1]`` the positional encoding: the official DETR module names."""

    def __init__(self, backbone: PVTBackbone | ResNet50Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.convolution_free = backbone.convolution_free
        self.out_channels = backbone.out_channels
        self.out_strides = backbone.out_strides

    def forward(self, images: Tensor, mask: Tensor) -> Levels:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) -> per level, finest first:
        (features [B, C, h, w], mask [B, h, w] bool, pos [B, hidden_dim, h, w] in the features'
        dtype)."""
        return [
            (features, level_mask, self[1](level_mask).to(features.dtype))
            for features, level_mask in self[0](images, mask)
        ]


def build_backbone(
    name: str = "pvt_small",
    *,
    feature_stage: int = 4,
    levels: int = 1,
    drop_path: float = 0.1,
    train: bool = True,
    pretrained: str | None = None,
    position_embedding: str = "sine",
    hidden_dim: int = 256,
    position_offset: float = 0.0,
) -> Joiner:
    """Backbone ``name`` (one of :data:`BACKBONES`) returning the maps of the ``levels``
    consecutive stages that end at ``feature_stage`` (DETR's: that stage alone), with their
    positional encodings (sine ones counting cells from ``position_offset``); ``train`` False
    freezes it; ``pretrained`` is a weights file or None."""
    stages = tuple(range(feature_stage - levels + 1, feature_stage + 1))
    if name in pvt.VARIANT_DEPTHS:
        if not stages or stages[0] < 1:
            raise ValueError(
                f"{levels} backbone levels ending at PVT stage {feature_stage}: pass 1 to "
                f"{feature_stage} levels, or a later --feature_stage"
            )
        backbone = PVTBackbone(name, stages, drop_path, train, pretrained)
    elif name == "resnet50":
        if feature_stage != 4:
            raise ValueError(
                f"--feature_stage {feature_stage} applies to PVT backbones only; resnet50 "
                "uses layer4 (stride 32): leave --feature_stage at 4"
            )
        if not stages or stages[0] < min(RESNET_LAYERS):
            raise ValueError(
                f"{levels} backbone levels: resnet50 returns 1 to {len(RESNET_LAYERS)} (layers 2 "
                "to 4, strides 8 to 32)"
            )
        backbone = ResNet50Backbone(train, pretrained, stages)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {list(BACKBONES)}")
    return Joiner(
        backbone, build_position_encoding(position_embedding, hidden_dim, position_offset)
    )
