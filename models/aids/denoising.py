"""Denoising queries (Li et al. 2022, "DN-DETR"): noised ground truth enters the decoder as extra
queries during training and is reconstructed without matching.

Each of ``groups`` denoising groups holds one query per ground-truth object of the image: its
anchor is the object's box with noise (the centre moves by up to ``box_noise`` times half the
width and height, the width and height change by up to ``box_noise`` times themselves; the box is
then kept inside the image with a positive size), and its content query is a learned embedding of
the object's label, flipped to a random class with probability ``label_noise``, with a last
feature of 1 that tells denoising queries from matching queries (whose content is the embedding
of the extra "unknown" label, index ``num_classes``, with a last feature of 0). Images of a batch
hold different numbers of objects: every group has as many slots as the batch's largest count
(at least one, so that the decoder always has the same queries), and the slots an image does not
fill are padding: no query attends to them (:func:`models.aids.base.self_attention_mask`), and
the loss treats them as unmatched queries, whose target is no-object. A denoising query sees the
real queries of its own group and the matching queries; the matching queries see none of them.

The queries of group g, slot j answer target j of their image; :func:`noised_targets` returns
those pairs as the ``indices`` that :class:`models.criterion.SetCriterion` uses instead of
matching, so an image without objects contributes only no-object terms and the loss stays finite.
Denoising runs in training only; the model in evaluation mode has no denoising queries.

With the deformable transformer (``--transformer deformable``) the denoising is DINO's
contrastive denoising (Zhang et al., ICLR 2023), after IDEA-Research/DINO's ``prepare_for_cdn``:

- every group holds, per slot, a positive query and a negative one: the group's ``M`` positive
  slots, then its ``M`` negative slots, each target of an image at the same slot in both;
- each corner of a positive's box moves, along its axis, by ``u * box_noise`` times half the
  box's width (x) or height (y), ``u`` uniform in [0, 1) with a random sign; a negative's by
  ``u`` in [1, 2): farther from the object. Corners are clamped to the image (DINO); a width or
  height that this leaves below ``MIN_SIZE`` is set to it (DINO leaves a negative size, which
  its inverse sigmoid clamps);
- a label is replaced by a random class with probability ``label_noise`` (DINO's
  ``label_noise_ratio * 0.5``: its 0.5 is 0.25 here), for positives and negatives alike;
- the content query is the label's embedding (``num_classes + 1`` rows of width d, the last
  for padding slots; no indicator feature); the query's reference box is its noised box, and its
  position the decoder's, computed from that box (``query_pos_from_boxes``, which the deformable
  denoising needs, with DINO's mixed selection);
- positives answer their targets (``indices``, no matching); negatives, with the padding slots,
  are unmatched and scored as no-object (DINO's loss on the positives, the class loss on all).

Groups see the matching queries and their own group, as in DINO; DINO does not mask the padding
slots in the attention, here they are masked as in DN-DETR. ``max_queries`` (``--dn_max_queries``,
DINO's ``dn_number``) caps the positive queries of a batch: at most ``max(1, max_queries // M)``
groups, so a batch with many objects per image gets fewer groups.
"""

import argparse
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.aids.base import Aid, DetectorSpec, Queries, QueryBlock
from util.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

# Noised boxes keep at least this width and height (normalized) before they are clipped to the
# image, where they keep at least half of it.
MIN_SIZE = 1e-3


class NoisedTargets(NamedTuple):
    """The denoising queries of a batch, ``groups * slots`` per image, group by group."""

    labels: Tensor  # [B, G * M] int64 noised labels; num_classes on padding slots
    boxes: Tensor  # [B, G * M, 4] noised normalized (cx, cy, w, h), inside the image
    valid: Tensor  # [B, G * M] bool, True on real queries, False on padding slots
    indices: list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices)


def noised_targets(
    targets: list[dict[str, Tensor]],
    groups: int,
    box_noise: float,
    label_noise: float,
    num_classes: int,
) -> NoisedTargets:
    """``groups`` noised copies of the targets, padded to the batch's largest object count.

    Args:
        targets: B dicts with "labels" [n_i] int64 and "boxes" [n_i, 4] normalized
            (cx, cy, w, h); n_i may be 0.
        groups: the number of denoising groups G.
        box_noise: the box noise scale (DN-DETR's lambda, 0.4 in the paper); 0: the boxes.
        label_noise: the probability that a label is replaced by a random class (0.2).
        num_classes: labels are in [0, num_classes); padding slots get ``num_classes``.

    Returns:
        :class:`NoisedTargets` with M = max(1, max n_i) slots per group: the queries of group g
        are at [g M, g M + M), the first n_i of them real.
    """
    counts = [len(t["labels"]) for t in targets]
    slots = max(1, *counts)
    device = targets[0]["boxes"].device
    labels = torch.full((len(targets), slots), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), slots, 4), 0.5, device=device)  # padding: any valid box
    valid = torch.zeros(len(targets), slots, dtype=torch.bool, device=device)
    for i, (target, count) in enumerate(zip(targets, counts, strict=True)):
        labels[i, :count] = target["labels"]
        boxes[i, :count] = target["boxes"]
        valid[i, :count] = True
    labels, valid = labels.repeat(1, groups), valid.repeat(1, groups)
    boxes = boxes.repeat(1, groups, 1)
    labels = torch.where(valid, flip_labels(labels, label_noise, num_classes), labels)
    boxes = torch.where(valid[..., None], jitter_boxes(boxes, box_noise), boxes)
    indices = [
        (
            torch.cat([g * slots + torch.arange(count, device=device) for g in range(groups)]),
            torch.arange(count, device=device).repeat(groups),
        )
        for count in counts
    ]
    return NoisedTargets(labels, boxes, valid, indices)


def contrastive_targets(
    targets: list[dict[str, Tensor]],
    groups: int,
    box_noise: float,
    label_noise: float,
    num_classes: int,
) -> NoisedTargets:
    """DINO's contrastive denoising queries: ``groups`` groups of ``2 M`` slots, M = max(1,
    max n_i), positives at [2 g M, 2 g M + M) and negatives at [2 g M + M, 2 g M + 2 M), the
    first n_i of each real (module docstring). ``indices`` pair the positives with their
    targets; negatives and padding are unmatched. Arguments as :func:`noised_targets`."""
    plain = noised_targets(targets, 2 * groups, 0.0, 0.0, num_classes)
    slots = plain.labels.shape[1] // (2 * groups)
    negative = (torch.arange(2 * groups * slots, device=plain.boxes.device) // slots) % 2 == 1
    boxes = contrastive_boxes(plain.boxes, negative, box_noise)
    boxes = torch.where(plain.valid[..., None], boxes, plain.boxes)
    labels = flip_labels(plain.labels, label_noise, num_classes)
    labels = torch.where(plain.valid, labels, plain.labels)
    indices = []
    for query, target in plain.indices:
        positive = (query // slots) % 2 == 0
        indices.append((query[positive], target[positive]))
    return NoisedTargets(labels, boxes, plain.valid, indices)


def contrastive_boxes(boxes: Tensor, negative: Tensor, scale: float) -> Tensor:
    """DINO's contrastive box noise on [..., Q, 4] normalized (cx, cy, w, h): each corner moved
    along its axis by ``u * scale`` times half the width or height, with a random sign, ``u``
    uniform in [0, 1) where ``negative`` [Q] is False and in [1, 2) where True; corners clamped
    to the image, then the size to at least ``MIN_SIZE`` (the box kept inside the image)."""
    corners = cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2  # (w, h, w, h) / 2
    sign = torch.randint_like(boxes, 0, 2) * 2 - 1
    amount = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
    corners = (corners + sign * amount * half * scale).clamp(0.0, 1.0)
    size = (corners[..., 2:] - corners[..., :2]).clamp(min=MIN_SIZE)
    centre = ((corners[..., :2] + corners[..., 2:]) / 2).clamp(size / 2, 1 - size / 2)
    return torch.cat([centre, size], -1)


def flip_labels(labels: Tensor, probability: float, num_classes: int) -> Tensor:
    """Each label replaced, with ``probability``, by a class drawn uniformly (the same one
    possibly), as DN-DETR does."""
    flip = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)


def jitter_boxes(boxes: Tensor, scale: float) -> Tensor:
    """DN-DETR's box noise on [..., 4] normalized (cx, cy, w, h): the centre moves by up to
    ``scale`` times half the size, the size changes by up to ``scale`` times itself (uniform).
    The result lies inside the image with a positive size, whatever ``scale``: the centre is
    clamped to the image, the size to at least ``MIN_SIZE``, the corners to the image."""
    noise = (torch.rand_like(boxes) * 2 - 1) * scale
    centre, size = boxes[..., :2], boxes[..., 2:]
    centre = (centre + noise[..., :2] * size / 2).clamp(0.0, 1.0)
    size = (size * (1 + noise[..., 2:])).clamp(min=MIN_SIZE)
    corners = cxcywh_to_xyxy(torch.cat([centre, size], dim=-1)).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(corners)


class DenoisingQueries(Aid):
    """The label embedding of the denoising queries (and, in DN-DETR's form, of the matching
    queries' content), and the noising of a batch's targets (module docstring). DN-DETR's form
    needs anchor queries (the denoising queries' positions are noised boxes); ``contrastive``,
    DINO's, needs a decoder that computes the positions from reference boxes."""

    name = "dn"
    class_count_keys = ("label_embed.weight",)

    def __init__(
        self,
        num_classes: int,
        d_model: int,
        groups: int,
        box_noise: float = 0.4,
        label_noise: float = 0.2,
        contrastive: bool = False,
        max_queries: int = 0,
    ):
        super().__init__()
        if groups < 1:
            raise ValueError(f"denoising needs at least one group, got {groups}")
        if box_noise < 0 or not 0 <= label_noise <= 1:
            raise ValueError(
                f"box noise must be >= 0 and label noise a probability in [0, 1], got "
                f"{box_noise} and {label_noise}"
            )
        self.num_classes = num_classes
        self.groups = groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.contrastive = contrastive
        self.max_queries = max_queries
        # DN-DETR's embedding leaves a feature for the indicator; DINO's has none.
        self.label_embed = nn.Embedding(num_classes + 1, d_model if contrastive else d_model - 1)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        add = group.add_argument
        add(
            "--dn_groups",
            default=0,
            type=int,
            help="N groups of noised ground truth as extra queries in training: DN-DETR's with "
            "--anchor_queries; DINO's contrastive groups (positives and negatives) with "
            "--transformer deformable --two_stage --mixed_selection --query_pos_from_boxes",
        )
        add("--dn_box_noise", default=0.4, type=float, help="denoising box noise scale")
        add("--dn_label_noise", default=0.2, type=float, help="denoising label flip probability")
        add(
            "--dn_max_queries",
            default=0,
            type=int,
            help="at most this many positive denoising queries per image: fewer groups for a "
            "batch with many objects (DINO's dn_number; 0: --dn_groups always)",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.dn_groups > 0

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.dn_groups < 0:
            raise ValueError(f"--dn_groups {args.dn_groups}: pass 0 or more (0: off)")
        if args.dn_groups and args.transformer == "deformable":
            if not getattr(args, "query_pos_from_boxes", False):
                raise ValueError(
                    "--dn_groups on the deformable transformer is DINO's contrastive denoising: "
                    "its queries are reference boxes whose positions the decoder computes; add "
                    "--two_stage --mixed_selection --query_pos_from_boxes"
                )
        elif args.dn_groups and not args.anchor_queries:
            raise ValueError("--dn_groups noises anchor boxes; add --anchor_queries")
        if getattr(args, "dn_max_queries", 0) < 0:
            raise ValueError(f"--dn_max_queries {args.dn_max_queries}: pass 0 or more (0: no cap)")
        if args.dn_box_noise < 0 or not 0 <= args.dn_label_noise <= 1:
            raise ValueError(
                f"--dn_box_noise {args.dn_box_noise}, --dn_label_noise {args.dn_label_noise}: "
                "out of range; --dn_box_noise takes 0 or more, --dn_label_noise a probability "
                "in [0, 1]"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "DenoisingQueries":
        return cls(
            spec.num_classes, spec.hidden_dim, args.dn_groups, args.dn_box_noise,
            args.dn_label_noise, contrastive=spec.takes_references,
            max_queries=getattr(args, "dn_max_queries", 0),
        )  # fmt: skip

    def adapt_queries(self, queries: Queries) -> Queries:
        """DN-DETR's matching queries' content: the "unknown" label's embedding and a 0
        indicator (contrastive denoising: unchanged)."""
        if self.contrastive:
            return queries
        unknown = self.label_embed.weight[self.num_classes]
        content = torch.cat([unknown, unknown.new_zeros(1)]).expand_as(queries.content)
        return Queries(content, queries.position)

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list[dict[str, Tensor]] | None
    ) -> list[QueryBlock]:
        """The batch's denoising queries, ``groups`` groups (at most ``max_queries`` positives
        an image) of the batch's largest object count: DN-DETR's, content (the noised label's
        embedding and a 1 indicator) and noised boxes as anchors; contrastive, content (the
        label's embedding) and noised boxes as reference boxes, positives then negatives."""
        if targets is None:
            raise ValueError(
                "denoising queries (--dn_groups) are made from the targets in training: "
                "call model(images, mask, targets=targets)"
            )
        groups = self.groups
        if self.max_queries:
            largest = max(1, *(len(t["labels"]) for t in targets))
            groups = max(1, min(groups, self.max_queries // largest))
        make = contrastive_targets if self.contrastive else noised_targets
        noised = make(targets, groups, self.box_noise, self.label_noise, self.num_classes)
        common = dict(attention_groups=groups, sees_matching=True, valid=noised.valid)
        content = self.label_embed(noised.labels)
        if self.contrastive:
            none = content[..., :0]  # the decoder computes the positions from the boxes
            queries = Queries(content, none, noised.boxes)
            return [QueryBlock(self.name, queries, indices=noised.indices, **common)]
        indicator = content.new_ones(content.shape[:-1] + (1,))
        queries = Queries(
            torch.cat([content, indicator], dim=-1), noised.boxes.to(pool.position.dtype)
        )
        return [QueryBlock(self.name, queries, indices=noised.indices, **common)]
