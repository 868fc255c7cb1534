"""Encoder query selection (two-stage Deformable DETR, Zhu et al. 2021; DINO's mixed selection,
Zhang et al. 2023): every encoder token predicts a class and a box, and the best-scoring boxes
become the anchors of the decoder's queries.

Each token of the encoder's output goes through a linear map and a LayerNorm, then a class head
and a box head; its box is an offset, in inverse-sigmoid space, from a proposal centred on the
token's cell with a side of 0.05 of the image (Deformable DETR's proposals on its finest level).
Padded tokens propose nothing: their features are zeroed and their boxes pushed to the far
corner, and they are never selected. In training these per-token predictions are a prediction set,
``enc_outputs``, matched one-to-one to the targets and scored with the detector's terms (logged
with the suffix ``_enc``). Every image's ``len(queries)`` best tokens (by their best class
probability) give their boxes, detached, as the anchors of the queries, best first (group 0 gets
the best ``num_queries``); the queries keep their learned content (mixed selection). The anchors
need an aid that represents the queries as boxes: ``--anchor_queries``.
"""

import argparse
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.aids.base import Aid, DetectorSpec, Queries
from models.classification import ClassHead, build_class_head
from models.mlp import MLP
from util.boxes import inverse_sigmoid
from util.misc import image_extents

# The side of a token's proposal, relative to the image (Deformable DETR's, finest level).
PROPOSAL_SIZE = 0.05


class EncoderSelection(Aid):
    """Two-stage query selection from the encoder's tokens (module docstring)."""

    name = "enc"
    class_count_keys = ("class_embed.weight", "class_embed.bias")

    def __init__(self, num_classes: int, d_model: int, class_head: ClassHead):
        super().__init__()
        self.class_head = class_head
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, class_head.num_logits(num_classes))
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        class_head.init_head(self.class_embed)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--two_stage",
            action="store_true",
            help="every encoder token predicts a box; the best become the queries' anchors "
            "(two-stage Deformable DETR, DINO's mixed selection); needs --anchor_queries",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.two_stage

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.two_stage and not args.anchor_queries:
            raise ValueError("--two_stage selects anchor boxes; add --anchor_queries")

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "EncoderSelection":
        head = build_class_head(
            args.cls_loss, eos_coef=args.eos_coef, focal_alpha=args.focal_alpha,
            focal_gamma=args.focal_gamma,
        )  # fmt: skip
        return cls(spec.num_classes, spec.hidden_dim, head)

    def select_queries(self, queries: Queries, memory: NamedTuple) -> tuple[Queries, dict]:
        """The queries with the best tokens' boxes as anchors, and the tokens' prediction set
        as ``{"enc_outputs": {"pred_logits": [B, L, C], "pred_boxes": [B, L, 4]}}``, from
        DETR's single-level encoder output (:class:`models.detr.Memory`)."""
        if queries.position.shape[-1] != 4:
            raise ValueError("--two_stage selects anchor boxes; add --anchor_queries")
        if not hasattr(memory, "grid"):
            raise ValueError(
                f"two-stage selection reads DETR's single-level encoder; {type(memory).__name__} "
                "is another transformer's"
            )
        padding_mask = memory.padding_mask
        padding = padding_mask.view(-1, *memory.grid)
        memory = memory.memory
        features = self.memory_norm(
            self.memory_proj(memory.masked_fill(padding_mask[..., None], 0))
        )
        logits = self.class_embed(features)
        proposals = token_proposals(padding)
        boxes = (self.bbox_embed(features) + inverse_sigmoid(proposals, eps=1e-5)).sigmoid()
        scores = self.class_head.probabilities(logits).max(-1).values
        scores = scores.masked_fill(padding_mask, -1.0)
        count = min(len(queries), scores.shape[1])
        best = scores.topk(count, dim=1).indices
        anchors = boxes.detach().gather(1, best[..., None].expand(-1, -1, 4))
        position = torch.cat([anchors.to(queries.position.dtype), queries.position[:, count:]], 1)
        outputs = {"enc_outputs": {"pred_logits": logits, "pred_boxes": boxes}}
        return Queries(queries.content, position), outputs


def token_proposals(padding: Tensor) -> Tensor:
    """padding [B, H, W] bool (True on padding, images at the top left) -> [B, H W, 4] each
    token's proposal, normalized (cx, cy, w, h) relative to its image's own extent: its cell's
    centre and a side of ``PROPOSAL_SIZE``; padded tokens get (1, 1, 1, 1)."""
    batch, height, width = padding.shape
    rows, cols = image_extents(padding)
    y = (torch.arange(height, device=padding.device) + 0.5)[None, :] / rows[:, None]
    x = (torch.arange(width, device=padding.device) + 0.5)[None, :] / cols[:, None]
    centres = torch.stack(
        [x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)], dim=-1
    )
    sizes = torch.full_like(centres, PROPOSAL_SIZE)
    proposals = torch.cat([centres, sizes], dim=-1).masked_fill(padding[..., None], 1.0)
    return proposals.flatten(1, 2)
