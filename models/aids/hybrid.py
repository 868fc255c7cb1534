"""Hybrid matching (Jia et al. 2023, "DETRs with Hybrid Matching", H-DETR): in training, a second
set of queries is matched one-to-many, and evaluation runs the one-to-one queries alone.

``M`` one-to-many queries run in the decoder beside the matching queries, which neither see
them in self-attention nor are seen by them (H-DETR's mask). They are learned queries like the
matching ones: with DETR's learned queries, M more rows of ``query_embed`` (positional queries,
zero content); with anchor queries, M more anchors of the anchor aid (the model asks the query
source for ``extra_queries`` more slots). Their prediction set, ``one_to_many_outputs`` (and its
auxiliary layers), is matched by the same Hungarian matcher against each image's targets
repeated ``K`` times, so that up to K queries answer each object, and scored like the matching
set with every term weighted by ``W`` (``loss_*_one_to_many``): H-DETR's ``k_one2many`` and
``lambda_one2many``. The box and focal class losses divide by the number of repeated target
boxes, as H-DETR's criterion does on its repeated targets.

H-DETR's recipe (Deformable DETR, 300 one-to-one queries): M = 1500, K = 6, W = 1.
"""

import argparse

from torch import Tensor

from models.aids.base import Aid, DetectorSpec, Queries, QueryBlock


def repeated_targets(targets: list[dict[str, Tensor]], times: int) -> list[dict[str, Tensor]]:
    """Each image's targets with "labels" [n] and "boxes" [n, 4] repeated ``times`` times
    ([times n], [times n, 4]: all objects, then all again); the other keys as they are."""
    return [
        t | {"labels": t["labels"].repeat(times), "boxes": t["boxes"].repeat(times, 1)}
        for t in targets
    ]


class HybridMatching(Aid):
    """H-DETR's one-to-many query block (module docstring)."""

    name = "one_to_many"

    def __init__(self, queries: int, k: int = 6, weight: float = 1.0):
        super().__init__()
        if queries < 1 or k < 1 or weight < 0:
            raise ValueError(
                f"hybrid matching needs at least 1 query, a repeat count K >= 1 and a weight "
                f">= 0, got {queries}, {k} and {weight}"
            )
        self.extra_queries = queries
        self.k = k
        self.weight = weight

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        add = group.add_argument
        add(
            "--one_to_many_queries",
            default=0,
            type=int,
            help="M extra queries in training, matched to each image's targets repeated "
            "--one_to_many_k times (H-DETR's hybrid matching; 0: off)",
        )
        add("--one_to_many_k", default=6, type=int, help="times the targets are repeated")
        add("--one_to_many_weight", default=1.0, type=float, help="weight of the one-to-many loss")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.one_to_many_queries > 0

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.one_to_many_queries < 0 or args.one_to_many_k < 1 or args.one_to_many_weight < 0:
            raise ValueError(
                f"--one_to_many_queries {args.one_to_many_queries}, --one_to_many_k "
                f"{args.one_to_many_k}, --one_to_many_weight {args.one_to_many_weight}: pass 0 "
                "or more queries (0: off), K >= 1 and a weight >= 0"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "HybridMatching":
        return cls(args.one_to_many_queries, args.one_to_many_k, args.one_to_many_weight)

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list[dict[str, Tensor]] | None
    ) -> list[QueryBlock]:
        """The last ``extra_queries`` of the pool, scored against the targets repeated K
        times."""
        if targets is None:
            raise ValueError(
                "one-to-many queries (--one_to_many_queries) are scored against the repeated "
                "targets in training: call model(images, mask, targets=targets)"
            )
        queries = pool[len(pool) - self.extra_queries :]
        return [
            QueryBlock(
                self.name,
                queries,
                targets=repeated_targets(targets, self.k),
                loss_weight=self.weight,
            )  # fmt: skip
        ]
