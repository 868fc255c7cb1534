"""Query groups (Chen et al. 2022, "Group DETR"): K groups of ``num_queries`` queries share the
decoder in training, each matched one-to-one and scored on its own, with no attention between
groups; evaluation runs group 0 alone.

Every group's sets (and their auxiliary layers) weigh 1 / K, so the loss is the mean over the
groups. With learned queries the K groups are the rows of DETR's ``query_embed`` [K Q, d]; with
anchor queries, K Q anchors.
"""

import argparse

from models.aids.base import Aid, DetectorSpec, Queries, QueryBlock


class QueryGroups(Aid):
    """Group DETR's query groups (module docstring)."""

    name = "group"

    def __init__(self, groups: int):
        super().__init__()
        if groups < 2:
            raise ValueError(f"query groups need at least 2 groups (1: off), got {groups}")
        self.query_multiplier = groups

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--query_groups",
            default=1,
            type=int,
            help="train K groups of --num_queries queries, matched per group (Group DETR); "
            "evaluation uses group 0",
        )

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.query_groups > 1

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.query_groups < 1:
            raise ValueError(f"--query_groups {args.query_groups}: pass 1 or more (1: off)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "QueryGroups":
        return cls(args.query_groups)

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list | None
    ) -> list[QueryBlock]:
        groups = self.query_multiplier
        extra = pool[num_queries : groups * num_queries]
        return [
            QueryBlock(
                self.name,
                extra,
                attention_groups=groups - 1,
                prediction_sets=groups - 1,
                loss_weight=1.0 / groups,
            )  # fmt: skip
        ]

    def adapt_outputs(self, outputs: dict) -> None:
        for entry in [outputs, *outputs.get("aux_outputs", [])]:
            entry["loss_weight"] = 1.0 / self.query_multiplier
