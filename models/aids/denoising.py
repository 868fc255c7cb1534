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
    """The label embedding of the denoising queries and of the matching queries' content, and
    the noising of a batch's targets (module docstring). Needs anchor queries: the denoising
    queries' positions are noised boxes."""

    name = "dn"
    class_count_keys = ("label_embed.weight",)

    def __init__(
        self,
        num_classes: int,
        d_model: int,
        groups: int,
        box_noise: float = 0.4,
        label_noise: float = 0.2,
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
        self.label_embed = nn.Embedding(num_classes + 1, d_model - 1)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        add = group.add_argument
        add(
            "--dn_groups",
            default=0,
            type=int,
            help="N groups of noised ground truth as extra queries in training (DN-DETR); "
            "needs --anchor_queries",
        )
        add("--dn_box_noise", default=0.4, type=float, help="denoising box noise scale")
        add("--dn_label_noise", default=0.2, type=float, help="denoising label flip probability")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.dn_groups > 0

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.dn_groups < 0:
            raise ValueError(f"--dn_groups {args.dn_groups}: pass 0 or more (0: off)")
        if args.dn_groups and not args.anchor_queries:
            raise ValueError("--dn_groups noises anchor boxes; add --anchor_queries")
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
            args.dn_label_noise,
        )  # fmt: skip

    def adapt_queries(self, queries: Queries) -> Queries:
        """The matching queries' content: the "unknown" label's embedding and a 0 indicator."""
        unknown = self.label_embed.weight[self.num_classes]
        content = torch.cat([unknown, unknown.new_zeros(1)]).expand_as(queries.content)
        return Queries(content, queries.position)

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list[dict[str, Tensor]] | None
    ) -> list[QueryBlock]:
        """The batch's denoising queries: content (the noised label's embedding and a 1
        indicator) and noised boxes, ``groups`` groups of the batch's largest object count."""
        if targets is None:
            raise ValueError(
                "denoising queries (--dn_groups) are made from the targets in training: "
                "call model(images, mask, targets=targets)"
            )
        noised = noised_targets(
            targets, self.groups, self.box_noise, self.label_noise, self.num_classes
        )
        content = self.label_embed(noised.labels)
        indicator = content.new_ones(content.shape[:-1] + (1,))
        queries = Queries(
            torch.cat([content, indicator], dim=-1), noised.boxes.to(pool.position.dtype)
        )
        return [
            QueryBlock(
                self.name,
                queries,
                attention_groups=self.groups,
                sees_matching=True,
                valid=noised.valid,
                indices=noised.indices,
            )  # fmt: skip
        ]
