"""Batching for detection: images of different sizes padded into one tensor with a mask."""

import torch

from util.misc import pad_images


def collate_fn(
    batch: list[tuple[torch.Tensor, dict]], size_divisibility: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """[(image [3, H_i, W_i], target)] -> (images [B, 3, H, W], mask [B, H, W], targets).

    H and W are the largest height and width in the batch, rounded up to a multiple of
    ``size_divisibility`` (``--size_divisibility``; 0: not rounded); images sit at the top-left,
    padded with zeros, and the bool mask is True on padding. Targets are returned unchanged, as a
    list (their normalized boxes stay relative to each image's own, unpadded size).
    """
    images, targets = zip(*batch, strict=True)
    padded, mask = pad_images(list(images), size_divisibility)
    return padded, mask, list(targets)
