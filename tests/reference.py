"""Reference implementations in the official layouts, written here for the equivalence tests:
DETR's transformer (``nn.MultiheadAttention``, sequence-first, official parameter names) and the
official DETR-R50 checkpoint layout. Sizes are those of the tiny detector (tests/conftest.py).
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from tests.conftest import DEC, ENC, FFN, HEADS, NUM_CLASSES, QUERIES
from tests.conftest import HIDDEN as D


class ReferenceEncoderLayer(nn.Module):
    def __init__(self, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS)
        self.linear1, self.linear2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.pre_norm = pre_norm

    def forward(self, src, pos, mask):
        if self.pre_norm:
            x = self.norm1(src)
            src = src + self.self_attn(x + pos, x + pos, x, key_padding_mask=mask)[0]
            return src + self.linear2(F.relu(self.linear1(self.norm2(src))))
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class ReferenceDecoderLayer(nn.Module):
    def __init__(self, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS)
        self.multihead_attn = nn.MultiheadAttention(D, HEADS)
        self.linear1, self.linear2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.pre_norm = pre_norm

    def forward(self, tgt, query_pos, memory, pos, mask):
        def self_attn(x):
            return self.self_attn(x + query_pos, x + query_pos, x)[0]

        def cross_attn(x):
            return self.multihead_attn(x + query_pos, memory + pos, memory, key_padding_mask=mask)[
                0
            ]

        def ffn(x):
            return self.linear2(F.relu(self.linear1(x)))

        if self.pre_norm:
            tgt = tgt + self_attn(self.norm1(tgt))
            tgt = tgt + cross_attn(self.norm2(tgt))
            return tgt + ffn(self.norm3(tgt))
        tgt = self.norm1(tgt + self_attn(tgt))
        tgt = self.norm2(tgt + cross_attn(tgt))
        return self.norm3(tgt + ffn(tgt))


class ReferenceTransformer(nn.Module):
    """Official DETR's transformer (dropout 0) with its parameter names."""

    def __init__(self, pre_norm: bool = False):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ReferenceEncoderLayer(pre_norm) for _ in range(ENC))
        self.encoder.norm = nn.LayerNorm(D) if pre_norm else None
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(ReferenceDecoderLayer(pre_norm) for _ in range(DEC))
        self.decoder.norm = nn.LayerNorm(D)
        for p in self.parameters():  # non-trivial LayerNorm parameters, so a swap would show
            nn.init.normal_(p, std=0.2 if p.dim() > 1 else 0.5)

    def forward(self, src, mask, query_embed, pos):
        """Batch-first in and out like ours: src, pos [B, L, D] -> [DEC, B, Q, D]."""
        src, pos = src.transpose(0, 1), pos.transpose(0, 1)
        for layer in self.encoder.layers:
            src = layer(src, pos, mask)
        memory = src if self.encoder.norm is None else self.encoder.norm(src)
        query_pos = query_embed[:, None].expand(-1, src.shape[1], -1)
        tgt, hs = torch.zeros_like(query_pos), []
        for layer in self.decoder.layers:
            tgt = layer(tgt, query_pos, memory, pos, mask)
            hs.append(self.decoder.norm(tgt))
        return torch.stack(hs).transpose(1, 2)


def transformer_inputs(batch: int = 2, length: int = 12, queries: int = QUERIES):
    """Random src, pos [B, L, D], query_embed [Q, D] and a mask padding the last image's end."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(batch, length, D, generator=g)
    pos = torch.randn(batch, length, D, generator=g)
    query_embed = torch.randn(queries, D, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, length // 2 :] = True
    return src, mask, query_embed, pos


def official_detr_state_dict(reference: ReferenceTransformer) -> dict[str, torch.Tensor]:
    """The layout of the official DETR-R50 release: torchvision ResNet names under
    backbone.0.body, nn.MultiheadAttention transformer, 1x1-convolution input projection."""
    g = torch.Generator().manual_seed(3)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {
        f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    state |= {f"transformer.{k}": v for k, v in reference.state_dict().items()}
    shapes = {
        "input_proj.weight": (D, 2048, 1, 1),
        "input_proj.bias": (D,),
        "query_embed.weight": (QUERIES, D),
        "class_embed.weight": (NUM_CLASSES + 1, D),
        "class_embed.bias": (NUM_CLASSES + 1,),
        **{f"bbox_embed.layers.{i}.weight": (4 if i == 2 else D, D) for i in range(3)},
        **{f"bbox_embed.layers.{i}.bias": (4 if i == 2 else D,) for i in range(3)},
    }
    return state | {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
