"""Encoder query selection (two-stage Deformable DETR, Zhu et al. 2021; DINO's mixed selection,
Zhang et al. 2023): every encoder token predicts a class and a box, and the best-scoring boxes
become the anchors of the decoder's queries.

Each token of the encoder's output goes through a linear map and a LayerNorm, then a class head
and a box head; its box is an offset, in inverse-sigmoid space, from a proposal centred on the
token's cell with a side of 0.05 of the image (Deformable DETR's proposals on its finest level).
Padded tokens, and tokens whose proposal has a coordinate outside (0.01, 0.99) (as in the
reference code), propose nothing: their features are zeroed and their boxes pushed to the far
corner, and they are never selected (the reference code leaves them selectable). Every image
must have a proposing token per query. In training these per-token predictions are a prediction set,
``enc_outputs``, matched one-to-one to the targets and scored with the detector's terms (logged
with the suffix ``_enc``). Every image's ``len(queries)`` best tokens (by their best class
probability) give their boxes, detached, as the anchors of the queries, best first (group 0 gets
the best ``num_queries``); the queries keep their learned content (mixed selection). The anchors
need an aid that represents the queries as boxes: ``--anchor_queries``.

With the deformable transformer (``--transformer deformable``, two-stage Deformable DETR) every
level's tokens propose, with a side of ``0.05 * 2^l`` on level ``l`` (finest first), as in
Deformable DETR; the selected boxes become the queries' reference boxes (``Queries.reference``,
the decoder samples around them and, with ``--box_refine``, refines them), and the queries'
positions are a linear map and a LayerNorm of the boxes' sine encoding (Deformable DETR's
``pos_trans``; DINO's mixed selection: the content stays learned). Every query gets a token, so
a model needs at least as many tokens (cells of all levels) as queries in training.
"""

import argparse

import torch
from torch import Tensor, nn

from models.aids.anchors import box_sine_encoding
from models.aids.base import Aid, DetectorSpec, Queries
from models.classification import ClassHead, SoftmaxClassification
from models.deformable import Shapes, level_shapes
from models.mlp import MLP
from models.protocol import Memory
from util.boxes import inverse_sigmoid
from util.misc import image_extents

# The side of a token's proposal, relative to the image (Deformable DETR's, finest level).
PROPOSAL_SIZE = 0.05


class EncoderSelection(Aid):
    """Two-stage query selection from the encoder's tokens (module docstring)."""

    name = "enc"
    class_count_keys = ("class_embed.weight", "class_embed.bias")

    def __init__(
        self, num_classes: int, d_model: int, class_head: ClassHead, references: bool = False
    ):
        """``references``: the selected boxes become the queries' reference boxes (a decoder
        that samples around them, the deformable one), else their anchors (anchor queries)."""
        super().__init__()
        self.class_head = class_head
        self.gives_references = references
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, class_head.num_logits(num_classes))
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        class_head.init_head(self.class_embed)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if references:  # the queries' positions from their reference boxes
            self.pos_trans = nn.Linear(2 * d_model, d_model)
            self.pos_trans_norm = nn.LayerNorm(d_model)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--two_stage",
            action="store_true",
            help="every encoder token predicts a box; the best become the queries' anchors "
            "(two-stage Deformable DETR, DINO's mixed selection); needs --anchor_queries with "
            "--transformer detr",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.two_stage

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.two_stage and args.transformer == "detr" and not args.anchor_queries:
            raise ValueError("--two_stage selects anchor boxes; add --anchor_queries")

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "EncoderSelection":
        head = spec.class_head or SoftmaxClassification()
        return cls(spec.num_classes, spec.hidden_dim, head, spec.takes_references)

    def select_queries(self, queries: Queries, memory: Memory) -> tuple[Queries, dict]:
        """The queries with the best tokens' boxes as reference boxes (``gives_references``)
        or as anchors, and the tokens' prediction set as
        ``{"enc_outputs": {"pred_logits": [B, S, C], "pred_boxes": [B, S, 4]}}``."""
        proposals = level_proposals(memory.padding_mask, memory.spatial_shapes)
        # Padding, and proposals with a coordinate outside (0.01, 0.99), propose nothing.
        inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
        barred = memory.padding_mask | ~inside
        # Checked in eager runs (a count of the data: an exported graph cannot raise on it).
        tokens = None if torch.compiler.is_compiling() else int((~barred).sum(1).min())
        if self.gives_references and tokens is not None and len(queries) > tokens:
            raise ValueError(
                f"--two_stage gives each of the {len(queries)} queries an encoder token, but "
                f"an image of the batch has {tokens} tokens that propose; use fewer queries "
                "(query groups, one-to-many queries) or larger images"
            )
        if not self.gives_references and queries.position.shape[-1] != 4:
            raise ValueError("--two_stage selects anchor boxes; add --anchor_queries")
        proposals = proposals.masked_fill(barred[..., None], 1.0)
        features = self.memory_norm(
            self.memory_proj(memory.memory.masked_fill(barred[..., None], 0))
        )
        logits = self.class_embed(features)
        boxes = (self.bbox_embed(features) + inverse_sigmoid(proposals, eps=1e-5)).sigmoid()
        scores = self.class_head.probabilities(logits).max(-1).values
        scores = scores.masked_fill(barred, -1.0)
        count = min(len(queries), scores.shape[1])
        best = scores.topk(count, dim=1).indices
        anchors = boxes.detach().gather(1, best[..., None].expand(-1, -1, 4))
        outputs = {"enc_outputs": {"pred_logits": logits, "pred_boxes": boxes}}
        if self.gives_references:
            encoding = box_sine_encoding(anchors, self.memory_proj.in_features)
            position = self.pos_trans_norm(self.pos_trans(encoding))
            return Queries(queries.content, position.to(queries.content.dtype), anchors), outputs
        position = torch.cat([anchors.to(queries.position.dtype), queries.position[:, count:]], 1)
        return Queries(queries.content, position), outputs


def token_proposals(padding: Tensor, size: float = PROPOSAL_SIZE) -> Tensor:
    """padding [B, H, W] bool (True on padding, images at the top left) -> [B, H W, 4] each
    token's proposal, normalized (cx, cy, w, h) relative to its image's own extent: its cell's
    centre and a side of ``size``; padded tokens get (1, 1, 1, 1)."""
    batch, height, width = padding.shape
    rows, cols = image_extents(padding)
    y = (torch.arange(height, device=padding.device) + 0.5)[None, :] / rows[:, None]
    x = (torch.arange(width, device=padding.device) + 0.5)[None, :] / cols[:, None]
    centres = torch.stack(
        [x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)], dim=-1
    )
    sizes = torch.full_like(centres, size)
    proposals = torch.cat([centres, sizes], dim=-1).masked_fill(padding[..., None], 1.0)
    return proposals.flatten(1, 2)


def level_proposals(padding_mask: Tensor, spatial_shapes: Shapes) -> Tensor:
    """padding_mask [B, S] bool of every level's cells (row by row, finest level first, as
    :class:`models.protocol.Memory`), spatial_shapes the levels' (H, W) -> [B, S, 4] each
    token's :func:`token_proposals` on its level, with a side of ``PROPOSAL_SIZE * 2^l`` on
    level l."""
    shapes = level_shapes(spatial_shapes)
    levels = padding_mask.split([h * w for h, w in shapes], dim=1)
    return torch.cat(
        [
            token_proposals(level.view(-1, h, w), PROPOSAL_SIZE * 2.0**index)
            for index, (level, (h, w)) in enumerate(zip(levels, shapes, strict=True))
        ],
        dim=1,
    )
