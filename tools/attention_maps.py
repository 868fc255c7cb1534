"""DETR's attention over the image, read with forward hooks and drawn as in the paper's figures.

Nothing is recorded unless asked: inside ``with DetrAttention(model) as attn:`` forward hooks on
the last decoder layer's cross-attention and the last encoder layer's self-attention keep their
projected queries and keys, and a hook on the backbone keeps the feature map's padding mask. The
weights are recomputed from those with :func:`models.attention.attention_weights` (heads
averaged) only for the rows asked for, so the model itself runs its normal fused path. Leaving
the ``with`` block removes the hooks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from models.attention import additive_mask, attention_weights
from models.deformable import DeformableTransformer
from models.transformer import TransformerDecoder
from util.misc import image_extents


@dataclass
class _Recorded:
    q: Tensor  # [B, heads, Lq, head_dim]
    k: Tensor  # [B, heads, Lk, head_dim]
    key_padding_mask: Tensor | None  # [B, Lk] bool, True on padding


def _project(module: nn.Module, x: Tensor, part: int) -> Tensor:
    """The query (part 0) or key (part 1) projection of a MultiheadAttention: [B, heads, L, hd]."""
    weight = module.in_proj_weight.chunk(3)[part]
    bias = module.in_proj_bias.chunk(3)[part]
    return F.linear(x, weight, bias).unflatten(-1, (module.num_heads, -1)).transpose(1, 2)


class DetrAttention:
    """Records one forward pass of a DETR model (see the module docstring for what and how)."""

    def __init__(self, model: nn.Module):
        transformer = model.transformer
        if not isinstance(getattr(transformer, "decoder", None), TransformerDecoder):
            raise ValueError(
                "attention maps read DETR's own encoder-decoder attention, and this model's "
                "decoder is another (a training aid's, or the deformable transformer's: "
                "attention_recorder draws its sampling points); drop --attention"
            )
        self._modules = {
            "decoder": transformer.decoder.layers[-1].multihead_attn,
            "encoder": transformer.encoder.layers[-1].self_attn,
        }
        self._backbone = model.backbone
        self._recorded: dict[str, _Recorded] = {}
        self._mask: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> "DetrAttention":
        for name, module in self._modules.items():
            self._handles.append(
                module.register_forward_hook(self._attention_hook(name), with_kwargs=True)
            )
        self._handles.append(self._backbone.register_forward_hook(self._backbone_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _attention_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            query, key = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            self._recorded[name] = _Recorded(
                _project(module, query, 0).detach(), _project(module, key, 1).detach(), mask
            )

        return hook

    def _backbone_hook(self, module: nn.Module, args: tuple, output: list) -> None:
        self._mask = output[-1][1].detach()  # the level DETR reads: (features, mask, pos)

    def decoder(self, image: int, queries: Tensor) -> Tensor:
        """Last decoder layer's cross-attention of ``queries`` ([n] query indices) of batch image
        ``image`` -> [n, h, w] over the image's own (unpadded) feature cells; rows sum to 1."""
        return self._maps("decoder", image, queries)

    def encoder(self, image: int, points: Tensor) -> Tensor:
        """Last encoder layer's self-attention at ``points`` ([n, 2] (x, y), relative to the
        image, in [0, 1]) of batch image ``image`` -> [n, h, w] as in :meth:`decoder`."""
        height, width = self._valid_grid(image)
        col = (points[:, 0] * width).long().clamp(0, width - 1)
        row = (points[:, 1] * height).long().clamp(0, height - 1)
        return self._maps("encoder", image, row * self._mask.shape[2] + col)

    def draw_decoder(
        self, image: Tensor, index: int, queries: Tensor, boxes: Tensor, titles: list[str],
        out_png: str,
    ) -> None:  # fmt: skip
        """:func:`draw_decoder_attention` of ``queries`` of batch image ``index`` over the uint8
        [3, H, W] ``image``."""
        draw_decoder_attention(image, self.decoder(index, queries), boxes, titles, out_png)

    def draw_encoder(self, image: Tensor, index: int, points: Tensor, out_png: str) -> None:
        """:func:`draw_encoder_attention` at ``points`` of batch image ``index``."""
        draw_encoder_attention(image, self.encoder(index, points), points, out_png)

    def _maps(self, name: str, image: int, rows: Tensor) -> Tensor:
        if name not in self._recorded or self._mask is None:
            raise RuntimeError(
                "no attention recorded: run the model inside `with DetrAttention(model):` first"
            )
        rec = self._recorded[name]
        q, k = rec.q[image, :, rows.to(rec.q.device)].float(), rec.k[image].float()
        padding = None if rec.key_padding_mask is None else rec.key_padding_mask[image : image + 1]
        weights = attention_weights(q[None], k[None], additive_mask(q, padding, None)).mean(1)[0]
        height, width = self._valid_grid(image)
        grid = weights.unflatten(-1, self._mask.shape[1:])
        return grid[:, :height, :width].cpu()

    def _valid_grid(self, image: int) -> tuple[int, int]:
        """Rows and columns of feature cells that are not padding (padding is bottom/right)."""
        rows, cols = image_extents(self._mask[image : image + 1])
        return int(rows), int(cols)


def _figure_size(image: Tensor, panels: int) -> tuple[float, float]:
    """Inches for a row of ``panels`` panels of the image's aspect ratio, with titles."""
    height, width = image.shape[1:]
    return 2.6 * panels, 2.6 * height / width + 0.7


def _show(ax, image: Tensor, attention: Tensor | None = None) -> None:
    """``image`` uint8 [3, H, W]; ``attention`` [h, w] stretched over it, half transparent."""
    height, width = image.shape[1:]
    extent = (0, width, height, 0)
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest", extent=extent)
    if attention is not None:
        ax.imshow(attention.numpy(), cmap="inferno", alpha=0.6, extent=extent)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")


def draw_decoder_attention(
    image: Tensor, maps: Tensor, boxes: Tensor, titles: list[str], out_png: str
) -> None:
    """One panel per query: its cross-attention ``maps`` [n, h, w] over the uint8 [3, H, W]
    ``image``, with its box (absolute xyxy, [n, 4]) and its title; written to ``out_png``."""
    fig = Figure(figsize=_figure_size(image, len(maps)))
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, attention, box, title in zip(axes, maps, boxes.tolist(), titles, strict=True):
        _show(ax, image, attention)
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="cyan", lw=2))
        ax.set_title(title, fontsize=9)
    fig.suptitle("decoder cross-attention (last layer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def draw_encoder_attention(image: Tensor, maps: Tensor, points: Tensor, out_png: str) -> None:
    """The image with ``points`` ([n, 2] relative (x, y)) marked, then one panel per point with
    its self-attention ``maps`` [n, h, w] over the uint8 [3, H, W] ``image``."""
    height, width = image.shape[1:]
    xy = points * torch.tensor([width, height])
    fig = Figure(figsize=_figure_size(image, len(maps) + 1))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    _show(axes[0], image)
    axes[0].set_title("points", fontsize=9)
    for i, (ax, attention, (x, y)) in enumerate(zip(axes[1:], maps, xy.tolist(), strict=True)):
        axes[0].plot(x, y, "o", color="cyan", markersize=6)
        axes[0].annotate(
            str(i + 1), (x, y), color="cyan", xytext=(4, 4), textcoords="offset points"
        )
        _show(ax, image, attention)
        ax.plot(x, y, "o", color="cyan", markersize=6)
        ax.set_title(f"point {i + 1}", fontsize=9)
    fig.suptitle("encoder self-attention (last layer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def attention_recorder(model: nn.Module):
    """The recorder of ``model``'s attention: :class:`DetrAttention` (attention maps) for DETR's
    transformer, :class:`tools.deformable_attention.DeformableAttention` (sampling points) for
    the deformable one. Both draw with ``draw_decoder`` and ``draw_encoder``."""
    from tools.deformable_attention import DeformableAttention

    if isinstance(model.transformer, DeformableTransformer):
        return DeformableAttention(model)
    return DetrAttention(model)
