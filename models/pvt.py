"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021), written without a single convolution.

A PVT stage turns a map into non-overlapping patches, projects each flattened patch with a linear
layer (the official code does this with a strided convolution whose kernel equals its stride,
which is the same map), adds a learned positional embedding and runs a stack of transformer
blocks whose attention reduces keys and values with the same patchify-and-project step.
Four such stages give features at strides 4, 8, 16 and 32.

The official ImageNet checkpoints load through :func:`load_pvt_checkpoint`; their convolution
kernels ``[C_out, C_in, p, p]`` become linear weights ``[C_out, p * p * C_in]``.
"""

import math
import re
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)
from torchvision.ops import StochasticDepth

from models.attention import attention
from models.chunked_mlp import chunked_mlp
from util.checkpoint import load, load_state_dict_strict
from util.misc import image_extents

# Per-stage settings shared by every variant (PVT v1 paper, Table 1).
EMBED_DIMS = (64, 128, 320, 512)
NUM_HEADS = (1, 2, 5, 8)
MLP_RATIOS = (8, 8, 4, 4)
SR_RATIOS = (8, 4, 2, 1)
PATCH_SIZES = (4, 2, 2, 2)

# The variants: blocks per stage. Every list of variants in the project reads this table.
VARIANT_DEPTHS = {
    "pvt_tiny": (2, 2, 2, 2),
    "pvt_small": (3, 4, 6, 3),
    "pvt_medium": (3, 4, 18, 3),
    "pvt_large": (3, 8, 27, 3),
}

block_norm = partial(nn.LayerNorm, eps=1e-6)


class PatchProject(nn.Module):
    """Cut a channels-last map into non-overlapping ``patch_size`` patches, project, normalize.

    Equal to ``Conv2d(in_dim, out_dim, kernel_size=patch_size, stride=patch_size)`` followed by a
    LayerNorm over channels: rows and columns that do not fill a whole patch are dropped, as a
    strided convolution drops them. Used for the patch embedding and for spatial reduction.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_dim * patch_size * patch_size, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """x: [B, H, W, C] -> (tokens [B, h * w, out_dim], h, w) with h = H // p, w = W // p."""
        p = self.patch_size
        h, w = x.shape[1] // p, x.shape[2] // p
        if h == 0 or w == 0:
            raise ValueError(
                f"a {x.shape[1]}x{x.shape[2]} map is smaller than the {p}x{p} patch; "
                "use a larger input image"
            )
        x = x[:, : h * p, : w * p]
        x = rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return self.norm(self.proj(x)), h, w


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a map reduced ``sr_ratio`` times."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = PatchProject(dim, dim, sr_ratio) if sr_ratio > 1 else None
        self.fused_attn = fused_attn

    def forward(self, x: Tensor, h: int, w: int, padding: Tensor | None = None) -> Tensor:
        """x: [B, h * w, C], padding: [B, h, w] bool (True on padding tokens) or None ->
        [B, h * w, C]. A reduced key cell is padding when its top-left token is (with images at
        the top left and the batch padded to a multiple of the cell, the whole cell is)."""
        q = rearrange(self.q(x), "b n (heads d) -> b heads n d", heads=self.num_heads)
        kv_in = x if self.sr is None else self.sr(x.unflatten(1, (h, w)))[0]
        key_padding = None
        if padding is not None:
            r = self.sr.patch_size if self.sr is not None else 1
            key_padding = padding[:, ::r, ::r][:, : h // r, : w // r].flatten(1)
        k, v = rearrange(
            self.kv(kv_in), "b n (two heads d) -> two b heads n d", two=2, heads=self.num_heads
        )
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, key_padding, dropout_p, fused=self.fused_attn)
        return self.proj_drop(self.proj(rearrange(out, "b heads n d -> b n (heads d)")))


_MATRIX_PRODUCTS = (
    torch.ops.aten.addmm.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
)


def _recompute_gelu(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: keep the matrix products' outputs, recompute the rest.

    The rest is GELU, dropout and reshapes. The reshapes must be recomputed too: a kept view of
    the GELU output would keep its memory.
    """
    return (
        CheckpointPolicy.MUST_SAVE if op in _MATRIX_PRODUCTS else CheckpointPolicy.PREFER_RECOMPUTE
    )


class Mlp(nn.Module):
    """fc1, GELU, fc2, each followed by dropout: the feed-forward half of a PVT block.

    With ``recompute_gelu`` (``main.py --recompute_gelu``), a forward that records for autograd
    keeps fc1's output but not GELU's, which the backward pass recomputes (selective
    ``torch.utils.checkpoint``; the matrix products are not rerun): less memory, same results.

    On the CPU the tokens go through in chunks of ``chunk_values // hidden_dim`` rows
    (:func:`models.chunked_mlp.chunked_mlp`): the same rows, but no hidden tensor above
    ``chunk_values`` values, which the C library's allocator serves from its heap instead of
    mapping fresh pages (docs/speed.md). ``chunked = False`` computes the hidden
    layer whole, as the official code does; other devices never chunk, and neither does a graph
    captured by ``torch.export`` (its chunk count would be fixed at the example's size).
    """

    chunk_values = 2**21  # hidden values per chunk: 8 MiB in fp32

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, recompute_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.recompute_gelu = recompute_gelu
        self.chunked = True

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]."""
        if self.chunked and x.device.type == "cpu" and not torch.compiler.is_exporting():
            return chunked_mlp(self, x)
        return self.layers(x)

    def layers(self, x: Tensor) -> Tensor:
        """fc1, GELU, fc2 on all of ``x``, GELU recomputed in backward if asked."""
        if self.recompute_gelu and self.records(x):
            context = partial(create_selective_checkpoint_contexts, _recompute_gelu)
            return checkpoint(self._layers, x, use_reentrant=False, context_fn=context)
        return self._layers(x)

    def _layers(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def records(self, x: Tensor) -> bool:
        """Whether autograd records this forward (for a backward pass through it)."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )


class Block(nn.Module):
    """Pre-norm transformer block: spatial-reduction attention, then MLP, each with drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
    ):
        super().__init__()
        self.norm1 = block_norm(dim)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop, fused_attn
        )
        self.norm2 = block_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: Tensor, h: int, w: int, padding: Tensor | None = None) -> Tensor:
        """x: [B, h * w, C], padding: [B, h, w] bool or None -> [B, h * w, C]."""
        x = x + self.drop_path(self.attn(self.norm1(x), h, w, padding))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Patchify and project, add the (resized) positional embedding, run the blocks.

    The positional embedding is stored for the grid of a ``img_size`` x ``img_size`` input and
    resized bilinearly when the input grid differs. With ``grad_checkpointing``, a block run with
    gradients enabled keeps only its input and recomputes its activations in the backward pass
    (``torch.utils.checkpoint``, same random draws): less memory, one more block forward.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        patch_size: int,
        pos_grid: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        drop_path: Sequence[float],
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        fused_attn: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grad_checkpointing = grad_checkpointing
        self._resized: tuple[tuple, Tensor] | None = None  # see resized_pos_embed
        self.patch_embed = PatchProject(in_dim, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid, dim))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop, attn_drop, dp, fused_attn)
            for dp in drop_path
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def resized_pos_embed(self, h: int, w: int) -> Tensor:
        """The positional embedding for an h x w grid: [1, h * w, dim].

        Without autograd the last resized embedding is kept and reused while the grid and the
        parameter are unchanged (its ``_version`` counts in-place updates such as optimizer steps
        and ``load_state_dict``): evaluation at one size resizes once, not once per image.
        """
        grid = math.isqrt(self.pos_embed.shape[1])
        if (h, w) == (grid, grid):
            return self.pos_embed
        records = torch.is_grad_enabled() and self.pos_embed.requires_grad
        pos = self.pos_embed
        key = (h, w, pos._version, pos.device, pos.dtype, torch.is_inference_mode_enabled())
        if not records and self._resized is not None and self._resized[0] == key:
            return self._resized[1]
        pos = rearrange(pos, "1 (h w) c -> 1 c h w", h=grid)
        pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        pos = rearrange(pos, "1 c h w -> 1 (h w) c")
        self._resized = None if records else (key, pos.contiguous())
        return pos if records else self._resized[1]

    def padded_pos_embed(self, padding: Tensor) -> Tensor:
        """Each image's embedding resized to its own grid (its unpadded tokens, at the top left),
        zero on padding: padding [B, h, w] bool -> [B, h * w, dim].

        Under ``torch.export`` the per-image sizes are data, not Python ints, and the whole batch
        is resampled at once (:func:`sampled_pos_embed`): the same values to fp32 rounding."""
        if torch.compiler.is_exporting():
            return sampled_pos_embed(self.pos_embed, padding)
        batch, h, w = padding.shape
        rows, cols = image_extents(padding)
        pos = self.pos_embed.new_zeros(batch, h, w, self.pos_embed.shape[-1])
        for i, (valid_h, valid_w) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            pos[i, :valid_h, :valid_w] = self.resized_pos_embed(valid_h, valid_w)[0].unflatten(
                0, (valid_h, valid_w)
            )
        return pos.flatten(1, 2)

    def embed(self, x: Tensor, padding: Tensor | None = None) -> tuple[Tensor, int, int]:
        """x: [B, H, W, C_in], padding: [B, H / p, W / p] bool (True on padding tokens) or None
        -> (tokens [B, h * w, dim] with positions added, h, w)."""
        tokens, h, w = self.patch_embed(x)
        pos = self.resized_pos_embed(h, w) if padding is None else self.padded_pos_embed(padding)
        return self.pos_drop(tokens + pos), h, w

    def run_blocks(self, tokens: Tensor, h: int, w: int, padding: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, h, w, padding, use_reentrant=False)
            else:
                tokens = block(tokens, h, w, padding)
        return tokens

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """x: [B, H, W, C_in], padding: [B, H / p, W / p] bool or None -> [B, H / p, W / p, dim]
        (channels last). With ``padding``, each image gets the positional embedding of its own
        grid and no token attends to padding tokens, so an image's tokens do not depend on how
        much padding its batch adds; without it, the official computation."""
        tokens, h, w = self.embed(x, padding)
        return self.run_blocks(tokens, h, w, padding).unflatten(1, (h, w))


def sampled_pos_embed(pos_embed: Tensor, padding: Tensor) -> Tensor:
    """``pos_embed`` [1, g * g, dim] resized bilinearly to each image's grid, zero on padding:
    padding [B, h, w] bool (images at the top left) -> [B, h * w, dim].

    ``F.interpolate(..., mode="bilinear", align_corners=False)`` to an image's r x c tokens
    samples the g x g grid at ``(i + 0.5) g / r - 0.5``, clamped to the grid: ``F.grid_sample``
    at the normalized ``(2 i + 1) / r - 1`` with border padding samples the same points, with the
    sizes r and c as tensors rather than Python ints (graph export, dynamic shapes).
    """
    batch, h, w = padding.shape
    grid = math.isqrt(pos_embed.shape[1])
    rows, cols = (extent.clamp(min=1).to(pos_embed.dtype) for extent in image_extents(padding))
    steps = partial(torch.arange, dtype=pos_embed.dtype, device=pos_embed.device)
    y = (2 * steps(h) + 1) / rows[:, None] - 1  # [B, h]
    x = (2 * steps(w) + 1) / cols[:, None] - 1  # [B, w]
    points = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)
    pos = rearrange(pos_embed, "1 (h w) c -> 1 c h w", h=grid).expand(batch, -1, -1, -1)
    pos = F.grid_sample(pos, points, mode="bilinear", padding_mode="border", align_corners=False)
    pos = pos.masked_fill(padding[:, None], 0.0)
    return rearrange(pos, "b c h w -> b (h w) c")


class PyramidVisionTransformer(nn.Module):
    """PVT v1: four stages at strides 4, 8, 16, 32.

    With ``num_classes > 0`` it is the ImageNet classifier of the paper: a class token joins the
    last stage, then a final LayerNorm and a linear head. With ``num_classes == 0`` it is a
    detection backbone: no class token, norm or head, and stages after ``max(out_indices)`` are not
    built.
    """

    def __init__(
        self,
        depths: Sequence[int],
        *,
        embed_dims: Sequence[int] = EMBED_DIMS,
        num_heads: Sequence[int] = NUM_HEADS,
        mlp_ratios: Sequence[float] = MLP_RATIOS,
        sr_ratios: Sequence[int] = SR_RATIOS,
        patch_sizes: Sequence[int] = PATCH_SIZES,
        in_chans: int = 3,
        img_size: int = 224,
        num_classes: int = 0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        fused_attn: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        out_indices = tuple(sorted(out_indices))
        if not out_indices or not all(0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must name stages 0..{len(depths) - 1}")
        if num_classes > 0 and (out_indices[-1] != len(depths) - 1 or sr_ratios[-1] != 1):
            raise ValueError("a classifier (num_classes > 0) needs the last stage, with sr_ratio 1")
        num_built = len(depths) if num_classes > 0 else out_indices[-1] + 1
        self.num_classes = num_classes
        self.out_indices = out_indices
        self.embed_dims = tuple(embed_dims[:num_built])
        self.strides = tuple(math.prod(patch_sizes[: i + 1]) for i in range(num_built))
        self.out_channels = tuple(self.embed_dims[i] for i in out_indices)
        self.out_strides = tuple(self.strides[i] for i in out_indices)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        in_dims = (in_chans, *embed_dims)
        self.stages = nn.ModuleList()
        for i in range(num_built):
            self.stages.append(
                Stage(
                    in_dim=in_dims[i],
                    dim=embed_dims[i],
                    patch_size=patch_sizes[i],
                    pos_grid=img_size // self.strides[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    sr_ratio=sr_ratios[i],
                    drop_path=drop_path[sum(depths[:i]) : sum(depths[: i + 1])],
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    fused_attn=fused_attn,
                    grad_checkpointing=grad_checkpointing,
                )
            )
        if num_classes > 0:
            self._add_classifier(embed_dims[-1], num_classes)
        self.apply(_init_weights)

    def _add_classifier(self, dim: int, num_classes: int) -> None:
        """The ImageNet classifier's parts: a class token and its positional embedding that join
        the last stage (``dim`` channels), a final LayerNorm and a linear head."""
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = block_norm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)

    def forward_masked(self, x: Tensor, mask: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """Stage maps and padding masks for ``out_indices``.

        Args:
            x: [B, 3, H, W] images at the top left of the batch (any H, W that the first patch
                fits; padded to a multiple of 32 for the padding to be exact at every stage).
            mask: [B, H, W] bool, True on padding, or None (no padding).

        Returns:
            maps: [B, C_i, H_i, W_i] with H_i = floor of H over the stage's stride.
            masks: [B, H_i, W_i] bool; a patch is padding when its top-left pixel is, which
            for bottom/right padding means the whole patch is padding.

        A batch with padding runs every stage masked (see :meth:`Stage.forward`), so that an
        image's maps are those it gets alone; a batch without padding runs the official path.
        A graph captured by ``torch.export`` cannot branch on the mask's values: it runs the
        masked path for every batch (the same maps, to fp32 rounding).
        """
        if mask is None:
            mask = torch.zeros(
                x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool, device=x.device
            )
        padded = torch.compiler.is_exporting() or bool(mask.any())
        x = x.permute(0, 2, 3, 1)
        maps, masks = [], []
        for i, stage in enumerate(self.stages):
            p = stage.patch_size
            mask = mask[:, ::p, ::p][:, : x.shape[1] // p, : x.shape[2] // p]
            x = stage(x, mask if padded else None)
            if i in self.out_indices:
                maps.append(x.permute(0, 3, 1, 2))
                masks.append(mask)
        return maps, masks

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> one map [B, C_i, H_i, W_i] per stage in ``out_indices``."""
        return self.forward_masked(x, None)[0]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Classifier: [B, 3, H, W] -> logits [B, num_classes]. Backbone: ``forward_features``."""
        if self.num_classes == 0:
            return self.forward_features(x)
        x = x.permute(0, 2, 3, 1)
        for stage in self.stages[:-1]:
            x = stage(x)
        last = self.stages[-1]
        tokens, h, w = last.embed(x)
        cls = (self.cls_token + self.cls_pos_embed).expand(x.shape[0], -1, -1)
        tokens = last.run_blocks(torch.cat([cls, tokens], dim=1), h, w)
        return self.head(self.norm(tokens[:, 0]))


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch whole-block activation recomputation on or off in every PVT stage of ``model``."""
    for module in model.modules():
        if isinstance(module, Stage):
            module.grad_checkpointing = enabled
    return model


def set_gelu_recompute(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the MLPs' GELU recomputation (see :class:`Mlp`) on or off in ``model``."""
    for module in model.modules():
        if isinstance(module, Mlp):
            module.recompute_gelu = enabled
    return model


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_pvt(variant: str, **kwargs) -> PyramidVisionTransformer:
    """The PVT v1 ``variant`` (a key of :data:`VARIANT_DEPTHS`); keywords of
    :class:`PyramidVisionTransformer`."""
    if variant not in VARIANT_DEPTHS:
        raise ValueError(f"unknown PVT variant {variant!r}; choose from {list(VARIANT_DEPTHS)}")
    return PyramidVisionTransformer(VARIANT_DEPTHS[variant], **kwargs)


def _official_key(key: str) -> str | None:
    """Our name for one key of the official layout, or None if the key is not official."""
    if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)", key):
        return f"stages.{int(m[1]) - 1}.patch_embed.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"pos_embed(\d)", key):
        return f"stages.{int(m[1]) - 1}.pos_embed"
    if m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key):
        rest = m[3].replace("attn.sr.", "attn.sr.proj.").replace("attn.norm.", "attn.sr.norm.")
        return f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{rest}"
    return None


def convert_official_pvt(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official PVT v1 state dict to this module's names and shapes.

    Convolution kernels ``[C_out, C_in, p, p]`` (patch embeddings, spatial reductions) become
    linear weights ``[C_out, p * p * C_in]`` in the (row, column, channel) order that
    :class:`PatchProject` flattens patches in. The class token's entry at the front of
    ``pos_embed4`` becomes ``cls_pos_embed``. Keys that are already ours pass unchanged.
    """
    converted = {}
    for key, value in state_dict.items():
        new_key = _official_key(key) or key
        if value.ndim == 4 and new_key.endswith("proj.weight"):
            value = value.permute(0, 2, 3, 1).flatten(1)
        if new_key.endswith("pos_embed") and _has_class_entry(value.shape[1]):
            converted["cls_pos_embed"], value = value[:, :1], value[:, 1:]
        converted[new_key] = value
    return converted


def _has_class_entry(n: int) -> bool:
    """A grid's embedding has a square number of entries; one more means a class token's."""
    return math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1


CLASSIFIER_ONLY = ("cls_token", "cls_pos_embed", "norm.", "head.")


def load_pvt_checkpoint(model: PyramidVisionTransformer, path: str) -> None:
    """Load a PVT v1 checkpoint (official ImageNet layout or this module's) into ``model``.

    The file may wrap the weights under ``model``. A detection backbone (``num_classes == 0``)
    ignores the class token, final norm and head, and the stages it did not build. Missing,
    unexpected or mis-shaped keys raise one ``ValueError`` that lists them all.
    """
    checkpoint = load(path)
    state_dict = checkpoint.get("model", checkpoint)
    state_dict = convert_official_pvt(state_dict)
    if model.num_classes == 0:
        built = len(model.stages)
        state_dict = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith(CLASSIFIER_ONLY)
            and not (k.startswith("stages.") and int(k.split(".")[1]) >= built)
        }
    load_state_dict_strict(model, state_dict, path)
