"""Small helpers shared by the data loader and the model."""

import torch
import torch.nn.functional as F
from torch import Tensor


def pad_images(images: list[Tensor], size_divisibility: int = 0) -> tuple[Tensor, Tensor]:
    """Stack images of different sizes into one zero-padded batch and its padding mask.

    Args:
        images: B tensors [C, H_i, W_i] with the same C, dtype and device.
        size_divisibility: if > 0, the padded height and width are rounded up to a multiple of it.

    Returns:
        batch: [B, C, H, W] with each image at the top-left and zeros at the bottom and right,
            H = max H_i and W = max W_i (rounded up).
        mask: [B, H, W] bool, True on padding.
    """
    if not images:
        raise ValueError("pad_images: got an empty list of images")
    if any(img.dim() != 3 or img.shape[0] != images[0].shape[0] for img in images):
        shapes = [tuple(img.shape) for img in images]
        raise ValueError(f"pad_images: expected [C, H, W] images with the same C, got {shapes}")
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    if size_divisibility > 0:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros(len(images), first.shape[0], height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=first.device)
    for img, padded, img_mask in zip(images, batch, mask, strict=True):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        img_mask[: img.shape[1], : img.shape[2]] = False
    return batch, mask


def pad_to_multiple(images: Tensor, mask: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Pad a padded batch further, at the bottom and right, to height and width multiples of
    ``multiple`` (``size_divisibility``; 0 or 1: unchanged): images [B, C, H, W] with zeros,
    mask [B, H, W] bool with True. A batch of :func:`pad_images` ``(images)`` becomes that of
    ``pad_images(images, multiple)``. The amounts are computed from the shapes, so a graph
    captured by ``torch.export`` with symbolic H and W pads any size it is given."""
    if multiple <= 1:
        return images, mask

    def up(n):
        return (n + multiple - 1) // multiple * multiple

    height, width = images.shape[-2:]
    # (n + m - 1) // m * m - n rather than -n % m: the exporter can bound the padded size (at
    # least m for n >= 1) without knowing the sign rules of Mod.
    pad = (0, up(width) - width, 0, up(height) - height)
    return F.pad(images, pad), F.pad(mask, pad, value=True)


def image_extents(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's unpadded rows and columns in a padded batch's mask [B, H, W] (True on
    padding, images at the top left, as :func:`pad_images` makes it): two int64 tensors [B]."""
    return (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
