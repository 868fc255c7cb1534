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
with the suffix ``_enc``). With DETR's transformer every image's ``len(queries)`` best tokens
(by their best class probability) give their boxes, detached, as the anchors of the queries,
best first (group 0 gets the best ``num_queries``); the queries keep their learned content (mixed
selection). The anchors need an aid that represents the queries as boxes: ``--anchor_queries``.

With the deformable transformer (``--transformer deformable``, two-stage Deformable DETR) every
level's tokens propose, with a side of ``0.05 * 2^l`` on level ``l`` (finest first), as in
Deformable DETR; the selected boxes become the queries' reference boxes (``Queries.reference``,
the decoder samples around them and, with ``--box_refine``, refines them). Every query gets a
token, so a model needs at least as many tokens (cells of all levels) as queries in training.
The rest follows one of two references:

- Deformable DETR's (``--two_stage``): the encoder's proposals are trained class-agnostic (every
  target labelled class 0, the set's ``class_agnostic``) and the tokens ranked by class 0's
  probability; a linear map 2 d -> 2 d and a LayerNorm of the boxes' sine encoding (``pos_trans``,
  coordinates in the order cx, cy, w, h) give each query its position (first half) and its
  content (second half): the detector learns no query rows, as the official.
- DINO's mixed selection (``--two_stage --mixed_selection``): the proposals are trained with the
  real labels and ranked by their best class probability; the queries' positions are a linear map
  2 d -> d and a LayerNorm of the boxes' sine encoding, and their content stays learned. DINO
  scores only the selected tokens' predictions (its ``interm_outputs``); every token's are
  scored here, as in Deformable DETR.

With ``--query_pos_from_boxes`` (DINO's decoder, which computes every query's position from its
reference box at every layer) mixed selection gives the reference boxes alone, without the map to
positions: the queries are DINO's, learned content and the selected boxes.

With DETR's transformer (``--anchor_queries``) the selection is DINO's: the anchor queries keep
their learned content.
"""

import argparse

import torch
from torch import Tensor, nn

from models.aids.base import Aid, DetectorSpec, Queries
from models.classification import ClassHead, SoftmaxClassification
from models.deformable import Shapes, level_shapes
from models.mlp import MLP
from models.position_encoding import box_sine_encoding, sine_encoding
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
        self,
        num_classes: int,
        d_model: int,
        class_head: ClassHead,
        references: bool = False,
        mixed: bool = True,
        positions_from_boxes: bool = False,
    ):
        """``references``: the selected boxes become the queries' reference boxes (a decoder
        that samples around them, the deformable one), else their anchors (anchor queries).
        ``mixed``: DINO's mixed selection, else (with ``references``) Deformable DETR's
        (module docstring). ``positions_from_boxes``: the decoder computes the queries'
        positions from their reference boxes (mixed selection only): no ``pos_trans``."""
        super().__init__()
        self.class_head = class_head
        self.gives_references = references
        self.mixed = mixed or not references
        self.gives_content = not self.mixed
        if positions_from_boxes and not (references and self.mixed):
            raise ValueError(
                "positions computed from the reference boxes need mixed selection of reference "
                "boxes (--two_stage --mixed_selection with --transformer deformable)"
            )
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, class_head.num_logits(num_classes))
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        class_head.init_head(self.class_embed)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if references and not positions_from_boxes:  # positions (contents) from the boxes
            width = d_model if self.mixed else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, width)
            self.pos_trans_norm = nn.LayerNorm(width)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--two_stage",
            action="store_true",
            help="every encoder token predicts a box; the best become the queries' reference "
            "boxes (two-stage Deformable DETR: their positions and contents from the boxes) or "
            "anchors (needs --anchor_queries with --transformer detr)",
        )
        group.add_argument(
            "--mixed_selection",
            action="store_true",
            help="with --two_stage --transformer deformable: DINO's mixed query selection (the "
            "queries' content learned, the proposals trained with the real labels)",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.two_stage

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.two_stage and args.transformer == "detr" and not args.anchor_queries:
            raise ValueError("--two_stage selects anchor boxes; add --anchor_queries")
        pos_from_boxes = getattr(args, "query_pos_from_boxes", False)
        if args.two_stage and pos_from_boxes and not args.mixed_selection:
            raise ValueError(
                "--query_pos_from_boxes computes the positions that --two_stage would give the "
                "queries; it goes with DINO's selection: add --mixed_selection"
            )
        if args.mixed_selection and (not args.two_stage or args.transformer != "deformable"):
            raise ValueError(
                "--mixed_selection chooses how two-stage Deformable DETR forms its queries; it "
                "needs --two_stage --transformer deformable (with --anchor_queries the "
                "selection is always mixed)"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "EncoderSelection":
        head = spec.class_head or SoftmaxClassification()
        # A configuration saved before --mixed_selection existed selected as DINO does.
        mixed = getattr(args, "mixed_selection", True)
        return cls(
            spec.num_classes, spec.hidden_dim, head, spec.takes_references, mixed,
            spec.positions_from_boxes,
        )  # fmt: skip

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
        probabilities = self.class_head.probabilities(logits)
        # Class-agnostic proposals (Deformable DETR's) rank by class 0, DINO's by the best class.
        scores = probabilities.max(-1).values if self.mixed else probabilities[..., 0]
        scores = scores.masked_fill(barred, -1.0)
        count = min(len(queries), scores.shape[1])
        best = scores.topk(count, dim=1).indices
        anchors = boxes.detach().gather(1, best[..., None].expand(-1, -1, 4))
        proposals_set = {"pred_logits": logits, "pred_boxes": boxes}
        if not self.mixed:
            proposals_set["class_agnostic"] = True
        outputs = {"enc_outputs": proposals_set}
        if not self.gives_references:
            position = torch.cat(
                [anchors.to(queries.position.dtype), queries.position[:, count:]], 1
            )
            return Queries(queries.content, position), outputs
        d_model = self.memory_proj.in_features
        if not hasattr(self, "pos_trans"):  # the decoder computes the positions from the boxes
            return Queries(queries.content, queries.position, anchors), outputs
        if self.mixed:
            encoding = box_sine_encoding(anchors, d_model)
            position = self.pos_trans_norm(self.pos_trans(encoding))
            return Queries(queries.content, position.to(queries.content.dtype), anchors), outputs
        # Deformable DETR's: position and content from the boxes' encoding (cx, cy, w, h).
        encoding = torch.cat([sine_encoding(v, d_model // 2) for v in anchors.unbind(-1)], -1)
        position, content = self.pos_trans_norm(self.pos_trans(encoding)).split(d_model, -1)
        dtype = queries.content.dtype
        return Queries(content.to(dtype), position.to(dtype), anchors), outputs


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
