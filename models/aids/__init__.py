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


class _FlagRecorder:
    """An argument group that also records the destinations of the flags added to it."""

    def __init__(self, group: argparse._ArgumentGroup):
        self.group = group
        self.dests: list[str] = []

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = self.group.add_argument(*args, **kwargs)
        self.dests.append(action.dest)
        return action


def aid_flags(aid: type[Aid]) -> tuple[str, ...]:
    """The destinations of the flags ``aid`` declares (:meth:`Aid.add_args`)."""
    recorder = _FlagRecorder(argparse.ArgumentParser(add_help=False).add_argument_group())
    aid.add_args(recorder)
    return tuple(recorder.dests)


def check_aid_args(args: argparse.Namespace) -> None:
    """Every aid's checks of its flags (ValueError naming the flags)."""
    for aid in AIDS:
        aid.check_args(args)


def build_aids(enabled: dict[str, dict], spec: DetectorSpec) -> list[Aid]:
    """The aids ``enabled`` names (an aid's name -> its flags, as ``ModelConfig.aids`` holds
    them), built for a detector ``spec``, in the order of ``AIDS``."""
    known = {aid.name for aid in AIDS}
    unknown = sorted(set(enabled) - known)
    if unknown:
        raise ValueError(f"unknown training aids {unknown}; known: {sorted(known)}")
    return [
        aid.from_args(argparse.Namespace(**enabled[aid.name]), spec)
        for aid in AIDS
        if aid.name in enabled
    ]
