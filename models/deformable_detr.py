"""Deformable DETR (Zhu et al., ICLR 2021): DETR on the multi-scale deformable transformer of
:mod:`models.deformable`, reading several backbone levels.

:class:`DeformableDETR` is :class:`models.detr.DETR` (the class head, the outputs, aux outputs,
the training aids) with three parts of its own, as in the official code:

- the input: the backbone's levels, each projected to the transformer's width by a Linear +
  GroupNorm, then extra levels at twice the stride each, from the last one
  (:class:`models.deformable.InputLevels`, no convolution). The backbone's levels are its
  stages from stride 8 up to ``--feature_stage`` (:func:`backbone_levels`): with PVT's stage 4
  and 4 levels, stages 2, 3, 4 (strides 8, 16, 32) and one extra level (stride 64), as
  Deformable DETR's ResNet-50 layers 2-4 and its extra level;
- the queries: ``query_embed`` [Q, 2 d] holds each query's position (first half) and its content
  (second half: learned, where DETR's content starts at zero); the query's reference point is
  the sigmoid of a linear map of its position (the transformer's ``reference_points``);
- the boxes: every decoder layer's box is an offset from that layer's reference, in
  inverse-sigmoid space (:func:`models.deformable.box_from_reference`). The box head's last layer
  starts at zero, with a width and height bias of -2 (a box of about 0.12 of the image a side
  at the reference point). With ``box_refine`` every decoder layer has its own box head, and
  its box, detached, is the next layer's reference; only the first head gets the -2 bias (the
  later ones start from a box).

One difference from the official refinement, which clones the class head per layer too: the
layers share DETR's one class head (``class_embed``), so the parameters that follow the class
count are DETR's (fine-tuning on other classes, the class count read from a checkpoint).

The training aids whose queries are learned rows of ``query_embed`` and whose extra query blocks
meet through the decoder's self-attention mask (query groups, one-to-many queries) work as in
DETR; two-stage selection gives the queries reference boxes from the encoder's tokens of every
level (``--two_stage``, :mod:`models.aids.two_stage`). An aid that represents the queries
itself and drives DETR's decoder layer by layer (anchor boxes, and denoising, which needs them)
does not combine with the deformable decoder: it is refused.
"""

import copy

import torch
from torch import Tensor, nn

from models.aids.base import Aid, Queries
from models.backbone import Joiner
from models.classification import ClassHead
from models.deformable import DeformableTransformer, InputLevels, MemoryInfo, box_from_reference
from models.detr import DETR
from models.mlp import MLP


def backbone_levels(num_feature_levels: int, feature_stage: int) -> int:
    """How many backbone stages, the last one ``feature_stage``, give levels of the
    ``num_feature_levels``: those from stride 8 on (PVT's stage 2, ResNet-50's layer 2; as in
    Deformable DETR, no stride-4 level, the one with the most cells), at most
    ``num_feature_levels``, at least the ``feature_stage`` itself. Extra levels make up the
    rest."""
    return max(1, min(num_feature_levels, feature_stage - 1))


class DeformableDETR(DETR):
    """DETR with Deformable DETR's input levels, queries, transformer and box heads (module
    docstring); ``box_refine``: per-layer box heads that refine the references layer by layer.

    Parameter names: DETR's, with ``input_proj`` an :class:`InputLevels`, ``query_embed``
    [Q, 2 d], and with ``box_refine`` ``bbox_embed.<layer>`` per decoder layer.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        size_divisibility: int = 32,
        class_head: ClassHead | None = None,
        aids: list[Aid] | tuple[Aid, ...] = (),
        box_refine: bool = False,
    ):
        drivers = [aid.name for aid in aids if aid.provides_queries]
        if drivers:
            raise ValueError(
                f"aid {drivers[0]!r} represents the queries and drives DETR's decoder; it does "
                "not combine with the deformable transformer (--transformer deformable)"
            )
        super().__init__(
            backbone, transformer, num_classes, num_queries, aux_loss, size_divisibility,
            class_head, aids,
        )  # fmt: skip
        hidden_dim = transformer.d_model
        # Deformable DETR's input levels, two-part queries and box heads in DETR's places.
        self.input_proj = InputLevels(
            backbone.out_channels, hidden_dim, transformer.num_feature_levels
        )
        self.query_embed = nn.Embedding(self.query_embed.num_embeddings, 2 * hidden_dim)
        layers = len(transformer.decoder.layers)
        self.bbox_embed = deformable_box_heads(self.bbox_embed, layers, box_refine)
        self.box_refine = box_refine
        if any(aid.gives_references for aid in self.aids.values()):
            transformer.reference_points = None  # the queries come with their references
        for aid in self.aids.values():  # the aids' initialisation of the heads comes last
            aid.init_heads(self.class_embed, self.bbox_embed)

    def _encode(self, images: Tensor, mask: Tensor) -> MemoryInfo:
        """Every backbone level and the extra levels, projected, through the deformable encoder;
        images [B, 3, H, W], mask [B, H, W] bool (True on padding)."""
        srcs, masks, pos = self.input_proj(self.backbone(images, mask), self.backbone[1])
        return self.transformer.encode(srcs, masks, pos)

    def _learned_queries(self, count: int, batch: int) -> Queries:
        """The first ``count`` rows of ``query_embed``: positions, then learned content."""
        query_pos, content = self.query_embed.weight[:count].expand(batch, -1, -1).chunk(2, -1)
        return Queries(content, query_pos)

    def _decode(
        self, queries: Queries, memory: MemoryInfo, attn_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Every decoder layer's output [L, B, T, d] and its boxes [L, B, T, 4], each relative
        to the layer's reference (the queries' reference points, or the previous layer's box)."""
        refine = self.bbox_embed if self.box_refine else None
        decoded = self.transformer.decode(
            queries.content, queries.position, queries.reference, memory, attn_mask, refine
        )
        if decoded.boxes is not None:
            return decoded.hs, decoded.boxes
        references = torch.stack(decoded.references)
        return decoded.hs, box_from_reference(self.bbox_embed(decoded.hs), references)


def deformable_box_heads(head: MLP, layers: int, refine: bool) -> MLP | nn.ModuleList:
    """DETR's box head ``head`` initialised as Deformable DETR's (module docstring): the head
    itself, or with ``refine`` ``layers`` copies of it."""
    last = head.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    if not refine:
        nn.init.constant_(last.bias[2:], -2.0)
        return head
    heads = nn.ModuleList(copy.deepcopy(head) for _ in range(layers))
    nn.init.constant_(heads[0].layers[-1].bias[2:], -2.0)
    return heads
