"""The training aids, one module each (the interface: :mod:`models.aids.base`).

``AIDS`` lists them; the command line, the builder, checkpoints and sweeps take every aid from
here, so a new aid is a new module and one entry below. Their order is the order in which their
hooks run and their query blocks follow the matching queries.
"""

import argparse

from models.aids.anchors import AnchorQueries
from models.aids.base import Aid, DetectorSpec
from models.aids.denoising import DenoisingQueries
from models.aids.groups import QueryGroups
from models.aids.hybrid import HybridMatching
from models.aids.two_stage import EncoderSelection

AIDS: tuple[type[Aid], ...] = (
    QueryGroups, AnchorQueries, DenoisingQueries, HybridMatching, EncoderSelection
)  # fmt: skip


def add_aid_args(parser: argparse.ArgumentParser) -> list[argparse._ArgumentGroup]:
    """Every aid's flags, in an argument group per aid (titled with its name)."""
    groups = []
    for aid in AIDS:
        doc = " ".join((aid.__doc__ or "").split())  # an aid without one: its name
        summary = doc.split(". ")[0].rstrip(".") + "." if doc else aid.name
        group = parser.add_argument_group(f"aid: {aid.name}", summary)
        aid.add_args(group)
        groups.append(group)
    return groups


def check_aid_args(args: argparse.Namespace) -> None:
    """Every aid's checks of its flags (ValueError naming the flags)."""
    for aid in AIDS:
        aid.check_args(args)


def build_aids(args: argparse.Namespace, spec: DetectorSpec) -> list[Aid]:
    """The aids the flags switch on, built for a detector ``spec``."""
    return [aid.from_args(args, spec) for aid in AIDS if aid.enabled(args)]
