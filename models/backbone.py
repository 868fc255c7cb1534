"""Backbones for DETR: a padded batch and its mask in; a feature map, its mask and its positional
encoding out.

``pvt_tiny`` .. ``pvt_large`` use one stage of a convolution-free PVT v1 (the last one, stride 32,
512 channels, by default, as in the paper's PVT + DETR). ``resnet50`` is the convolutional baseline
of the ablations: torchvision's ResNet-50 with frozen BatchNorm, layer4 output (stride 32, 2048
channels). Nothing is downloaded; pretrained weights come from a file the user names.
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from models import pvt
from models.position_encoding import build_position_encoding
from util import checkpoint
from util.checkpoint import load_state_dict_strict

PVT_VARIANTS = {
    "pvt_tiny": pvt.pvt_tiny,
    "pvt_small": pvt.pvt_small,
    "pvt_medium": pvt.pvt_medium,
    "pvt_large": pvt.pvt_large,
}
BACKBONES = (*PVT_VARIANTS, "resnet50")


class PVTBackbone(nn.Module):
    """The map of one PVT v1 stage (``feature_stage`` 1..4) and its downsampled mask."""

    def __init__(
        self,
        variant: str,
        feature_stage: int = 4,
        drop_path_rate: float = 0.1,
        train: bool = True,
        pretrained: str | None = None,
    ):
        super().__init__()
        if variant not in PVT_VARIANTS:
            raise ValueError(f"unknown PVT variant {variant!r}; choose from {list(PVT_VARIANTS)}")
        if feature_stage not in (1, 2, 3, 4):
            raise ValueError(f"feature_stage must be 1, 2, 3 or 4, got {feature_stage}")
        self.body = PVT_VARIANTS[variant](
            num_classes=0, out_indices=(feature_stage - 1,), drop_path_rate=drop_path_rate
        )
        if pretrained is not None:
            pvt.load_pvt_checkpoint(self.body, pretrained)
        self.body.requires_grad_(train)
        self.num_channels = self.body.out_channels[0]
        self.stride = self.body.out_strides[0]

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) -> (features [B, C, h, w],
        mask [B, h, w] bool)."""
        maps, masks = self.body.forward_masked(images, mask)
        return maps[0], masks[0]


class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50, frozen BatchNorm, layer4 output; as in DETR, the stem and layer1
    stay frozen, and with ``train=False`` everything does."""

    def __init__(self, train: bool = True, pretrained: str | None = None):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained is not None:
            state_dict = checkpoint.load(pretrained)
            # Frozen BatchNorm keeps no step counter; files saved from nn.BatchNorm2d do.
            state_dict = {
                k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
            }
            load_state_dict_strict(resnet, state_dict, f"{pretrained} (torchvision ResNet-50)")
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        for name, parameter in self.body.named_parameters():
            parameter.requires_grad_(train and name.startswith(("layer2", "layer3", "layer4")))
        self.num_channels = 2048
        self.stride = 32

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) -> (features
        [B, 2048, H / 32, W / 32], mask of the same grid, nearest-downsampled)."""
        features = self.body(images)["0"]
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask


class Joiner(nn.Sequential):
    """``[0]`` the backbone, ``[1]`` the positional encoding: the official DETR module names."""

    def __init__(self, backbone: PVTBackbone | ResNet50Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.stride = backbone.stride

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] bool (True = padding) -> (features [B, C, h, w],
        mask [B, h, w] bool, pos [B, hidden_dim, h, w] in the features' dtype)."""
        features, mask = self[0](images, mask)
        return features, mask, self[1](mask).to(features.dtype)


def build_backbone(args) -> Joiner:
    """Reads backbone, feature_stage, drop_path, lr_backbone, pretrained_backbone and the
    positional encoding flags."""
    train = args.lr_backbone > 0
    if args.backbone in PVT_VARIANTS:
        backbone = PVTBackbone(
            args.backbone, args.feature_stage, args.drop_path, train, args.pretrained_backbone
        )
    elif args.backbone == "resnet50":
        if args.feature_stage != 4:
            raise ValueError(
                f"--feature_stage {args.feature_stage} applies to PVT backbones only; resnet50 "
                "uses layer4 (stride 32): leave --feature_stage at 4"
            )
        backbone = ResNet50Backbone(train, args.pretrained_backbone)
    else:
        raise ValueError(f"unknown --backbone {args.backbone!r}; choose from {list(BACKBONES)}")
    return Joiner(backbone, build_position_encoding(args))
