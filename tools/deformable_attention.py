"""Where Deformable DETR's attention samples, read with forward hooks and drawn over the image,
as in the Deformable DETR paper's figures of sampling points.

Inside ``with DeformableAttention(model) as attn:``, forward hooks on the last decoder layer's
cross-attention and the last encoder layer's self-attention ask each module for the sampling
locations and weights it computes from its queries (:meth:`models.deformable.MSDeformAttn.samples`),
and a hook on the encoder keeps each image's valid ratios. Leaving the block removes the hooks.

A location (x, y) in level l's map (normalized to the map, as the sampling core reads it),
divided by the level's valid ratio (the image's valid cells over the map's), is relative to the
image as the model sees it, the frame its boxes are normalized to; the drawings scale it to the
picture as they scale the boxes.
"""

from typing import NamedTuple

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from models.deformable import DeformableTransformer, level_shapes


class Samples(NamedTuple):
    """The samples of n queries, S = heads x levels x points each, relative to the image.

    xy: [n, S, 2] (x, y) in [0, 1] inside the image (outside: beyond it).
    weight: [n, S] attention weights (each head's sum to 1).
    level: [S] the level of each sample (0 the finest).
    reference: [n, 4] the reference box (cx, cy, w, h) or [n, 2] point, relative to the image.
    """

    xy: Tensor
    weight: Tensor
    level: Tensor
    reference: Tensor


class _Recorded(NamedTuple):
    locations: Tensor  # [B, Q, heads, L, P, 2] in each level's map
    weights: Tensor  # [B, Q, heads, L, P]
    reference: Tensor  # [B, Q, L, 2 | 4] in each level's map
    shapes: list[tuple[int, int]]  # (H_l, W_l)


class DeformableAttention:
    """Records one forward pass of a Deformable DETR model (module docstring)."""

    def __init__(self, model: nn.Module):
        transformer = model.transformer
        if not isinstance(transformer, DeformableTransformer):
            raise ValueError(
                "sampling points are those of the deformable transformer; this model's is "
                f"{type(transformer).__name__}"
            )
        self._modules = {
            "decoder": transformer.decoder.layers[-1].cross_attn,
            "encoder": transformer.encoder.layers[-1].self_attn,
        }
        self._encoder = transformer.encoder
        self._recorded: dict[str, _Recorded] = {}
        self._ratios: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> "DeformableAttention":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self._handles.append(self._encoder.register_forward_hook(self._encoder_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            query, reference, _, spatial_shapes = args[:4]
            with torch.no_grad():
                locations, weights = module.samples(query, reference, spatial_shapes)
            shapes = [(int(h), int(w)) for h, w in level_shapes(spatial_shapes)]
            self._recorded[name] = _Recorded(
                locations.float(), weights.float(), reference.detach().float(), shapes
            )

        return hook

    def _encoder_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._ratios = args[3].detach().float()  # valid ratios [B, L, 2] (w, h)

    def decoder(self, image: int, queries: Tensor) -> Samples:
        """The last decoder layer's samples of ``queries`` ([n] query indices) of batch image
        ``image``, relative to that image."""
        return self._samples("decoder", image, queries)

    def encoder(self, image: int, points: Tensor) -> Samples:
        """The last encoder layer's samples of the finest level's cells under ``points`` ([n, 2]
        (x, y) relative to the image, in [0, 1]) of batch image ``image``."""
        recorded = self._get("encoder")
        height, width = recorded.shapes[0]
        valid = self._ratios[image, 0].cpu() * torch.tensor([width, height])  # cells (x, y)
        col = (points[:, 0] * valid[0]).long().clamp(0, width - 1)
        row = (points[:, 1] * valid[1]).long().clamp(0, height - 1)
        return self._samples("encoder", image, row * width + col)

    def draw_decoder(
        self, image: Tensor, index: int, queries: Tensor, boxes: Tensor, titles: list[str],
        out_png: str,
    ) -> None:  # fmt: skip
        """:func:`draw_decoder_samples` of ``queries`` of batch image ``index`` over the uint8
        [3, H, W] ``image``."""
        draw_decoder_samples(image, self.decoder(index, queries), boxes, titles, out_png)

    def draw_encoder(self, image: Tensor, index: int, points: Tensor, out_png: str) -> None:
        """:func:`draw_encoder_samples` at ``points`` of batch image ``index``."""
        draw_encoder_samples(image, self.encoder(index, points), points, out_png)

    def _get(self, name: str) -> _Recorded:
        if name not in self._recorded or self._ratios is None:
            raise RuntimeError(
                "no sampling recorded: run the model inside `with DeformableAttention(model):`"
            )
        return self._recorded[name]

    def _samples(self, name: str, image: int, rows: Tensor) -> Samples:
        recorded = self._get(name)
        rows = rows.to(recorded.locations.device)
        locations = recorded.locations[image, rows]  # [n, heads, L, P, 2]
        heads, levels, points = locations.shape[1:4]
        scale = 1.0 / self._ratios[image].to(locations.device)  # [L, 2]
        xy = locations * scale[:, None, :]
        level = torch.arange(levels)[None, :, None].expand(heads, -1, points).flatten()
        reference = recorded.reference[image, rows, 0]  # the finest level's
        reference = reference * scale[0].repeat(reference.shape[-1] // 2)
        return Samples(
            xy.flatten(1, 3).cpu(), recorded.weights[image, rows].flatten(1).cpu(), level,
            reference.cpu(),
        )  # fmt: skip


def _show(ax, image: Tensor) -> None:
    height, width = image.shape[1:]
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")


def _scatter(ax, image: Tensor, samples: Samples, query: int) -> None:
    """One query's samples: a dot each, its colour and size growing with its weight, the
    level's marker (circle, square, triangle, diamond, ...), over ``image``."""
    height, width = image.shape[1:]
    xy = samples.xy[query] * torch.tensor([width, height])
    weight = samples.weight[query]
    order = weight.argsort()  # the heaviest drawn last, on top
    markers = "os^Dv<>p"
    top = float(weight.max())
    for level in samples.level.unique().tolist():
        keep = order[samples.level[order] == level]
        ax.scatter(
            xy[keep, 0], xy[keep, 1], c=weight[keep], cmap="plasma", vmin=0, vmax=top,
            s=8 + 60 * weight[keep] / top, marker=markers[level % len(markers)], linewidths=0,
        )  # fmt: skip


def draw_decoder_samples(
    image: Tensor, samples: Samples, boxes: Tensor, titles: list[str], out_png: str
) -> None:
    """One panel per query: its sampling points over the uint8 [3, H, W] ``image``, with its
    detection box (absolute xyxy, [n, 4], cyan), its reference box or point (white, dashed) and
    its title; written to ``out_png``."""
    height, width = image.shape[1:]
    size = torch.tensor([width, height])
    fig = Figure(figsize=(3.0 * len(boxes), 3.0 * height / width + 0.8))
    axes = fig.subplots(1, len(boxes), squeeze=False)[0]
    for i, (ax, box, title) in enumerate(zip(axes, boxes.tolist(), titles, strict=True)):
        _show(ax, image)
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="cyan", lw=2))
        reference = samples.reference[i]
        centre = reference[:2] * size
        if len(reference) == 4:
            w, h = (reference[2:] * size).tolist()
            corner = (centre[0] - w / 2, centre[1] - h / 2)
            ax.add_patch(Rectangle(corner, w, h, fill=False, ec="white", lw=1, ls="--"))
        ax.plot(*centre.tolist(), "+", color="white", markersize=8)
        _scatter(ax, image, samples, i)
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        "decoder sampling points (last layer; colour and size: weight; marker: level)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def draw_encoder_samples(image: Tensor, samples: Samples, points: Tensor, out_png: str) -> None:
    """One panel per point ([n, 2] relative (x, y)): the sampling points of the finest level's
    cell under it, over the uint8 [3, H, W] ``image``; written to ``out_png``."""
    height, width = image.shape[1:]
    xy = points * torch.tensor([width, height])
    fig = Figure(figsize=(3.0 * len(points), 3.0 * height / width + 0.8))
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    for i, (ax, (x, y)) in enumerate(zip(axes, xy.tolist(), strict=True)):
        _show(ax, image)
        _scatter(ax, image, samples, i)
        ax.plot(x, y, "o", color="cyan", markersize=6, markerfacecolor="none")
        ax.set_title(f"point {i + 1}", fontsize=9)
    fig.suptitle("encoder sampling points (last layer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
