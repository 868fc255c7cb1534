"""The interface of a training aid, and the decoder queries it works on.

A training aid is one switch that changes how DETR is trained (more queries, other queries, other
targets) and, at most, how its matching queries are represented; with every aid off the model is
DETR as published. An aid is a subclass of :class:`Aid` in a module of its own under
``models/aids/``, listed in ``models/aids/__init__.py``'s ``AIDS``. It declares its flags
(:meth:`Aid.add_args`) and builds itself from them (:meth:`Aid.from_args`); the detector calls
its hooks and never names it:

1. the matching queries: the detector keeps ``num_queries`` times every aid's
   ``query_multiplier`` learned queries (query groups train several copies), and after them
   the ``extra_queries`` of an aid that trains more queries of the same kind (one-to-many
   matching); one aid may represent them all itself (``provides_queries``: anchor boxes), then
   it builds them (:meth:`Aid.build_queries`), hands them out (:meth:`Aid.initial_queries`) and
   decodes them with a decoder of its own (:meth:`Aid.decode`, the transformers' ``decode``
   of :mod:`models.protocol`: the detector's transformer is then built without one); any aid
   may change them (:meth:`Aid.adapt_queries`);
2. in training only, extra query blocks (:meth:`Aid.training_blocks`): each a
   :class:`QueryBlock` that says which queries it sees in self-attention, how its decoder
   outputs split into prediction sets, and how those are scored (known ``indices``, other
   ``targets``, a ``loss_weight``); :func:`self_attention_mask` builds the decoder's one mask
   from the blocks, and the block's sets reach the criterion as ``<name>_outputs``;
3. the encoder's output may choose the queries (:meth:`Aid.select_queries`: two-stage
   selection) and add prediction sets of its own;
4. the outputs (:meth:`Aid.adapt_outputs`), and the heads' initialisation
   (:meth:`Aid.init_heads`).

The decoder's queries are laid out ``[matching | block 1 | block 2 | ...]``. Evaluation runs the
first ``num_queries`` matching queries alone: a model trained with aids costs what DETR costs at
inference.
"""

import argparse
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from models.classification import ClassHead
from models.protocol import Decoded, Memory, Queries


class DetectorSpec(NamedTuple):
    """What an aid may need to know of the detector it is built for."""

    num_classes: int  # the largest category id + 1
    num_queries: int  # matching queries (one group)
    hidden_dim: int  # the transformer's width
    dec_layers: int  # decoder layers
    nheads: int = 8  # attention heads
    dim_feedforward: int = 2048  # the transformer layers' FFN width
    dropout: float = 0.1  # the transformer layers' dropout
    # Whether the transformer's decoder samples around reference boxes given with the queries.
    takes_references: bool = False
    # The class-head convention (models.classification); None: DETR's softmax.
    class_head: ClassHead | None = None
    # Whether the decoder computes every query's position from its reference box at every
    # layer (the deformable decoder's query_pos_from_boxes): queries then bring none.
    positions_from_boxes: bool = False


@dataclass
class QueryBlock:
    """Training-only queries that an aid adds after the matching queries.

    ``queries`` split into ``attention_groups`` equal groups: a query sees its own group in
    self-attention (and the matching queries with ``sees_matching``), never a slot that
    ``valid`` [B, n] marks False; the matching queries see no block. The block's decoder outputs
    are one prediction set, ``outputs[name + "_outputs"]``, or, with ``prediction_sets`` N, a
    list of N sets of equal size, each with its auxiliary layers; every set carries what is given of
    ``indices`` (known query-target pairs, no matching), ``targets`` (scored against these
    instead of the image's) and ``loss_weight``.
    """

    name: str
    queries: Queries
    attention_groups: int = 1
    prediction_sets: int | None = None
    sees_matching: bool = False
    valid: Tensor | None = None
    indices: list[tuple[Tensor, Tensor]] | None = None
    targets: list[dict[str, Tensor]] | None = None
    loss_weight: float = 1.0

    def scoring(self) -> dict:
        """What each prediction set of the block carries for the criterion."""
        extras = {"indices": self.indices, "targets": self.targets}
        scoring = {k: v for k, v in extras.items() if v is not None}
        return scoring | ({"loss_weight": self.loss_weight} if self.loss_weight != 1.0 else {})


class Aid(nn.Module):
    """A training aid (module docstring). Subclasses set ``name`` and override what they need;
    every hook's default leaves DETR as it is."""

    name: ClassVar[str] = ""
    # Whether the aid represents the matching queries itself and decodes them (at most one
    # enabled aid may).
    provides_queries: ClassVar[bool] = False
    # The aid's parameters (names relative to the aid) whose shape follows the class count: a
    # fine-tuning run on other classes keeps the model's own.
    class_count_keys: ClassVar[tuple[str, ...]] = ()
    # How many times num_queries learned queries the model keeps (the first num_queries match).
    query_multiplier: int = 1
    # Learned queries the model keeps after those, for this aid's training blocks: the last
    # extra_queries of the pool (at most one enabled aid may have any).
    extra_queries: int = 0
    # Whether select_queries gives every query its reference box (``Queries.reference``): a
    # transformer that samples around reference points is then built without a map of its own
    # to make them.
    gives_references: bool = False
    # Whether select_queries gives every query its content and position too (two-stage
    # Deformable DETR): the detector then learns no query rows.
    gives_content: bool = False

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """Add the aid's flags to ``group`` (its defaults: the aid is off)."""
        raise NotImplementedError

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        """Whether the flags switch the aid on."""
        raise NotImplementedError

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raise ValueError, naming the flags, on a value or combination that cannot work."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "Aid":
        """The aid that its flags describe, for a detector ``spec``. ``args`` holds the aid's
        own flags alone (those :meth:`add_args` declares, as the model configuration saves
        them); what it needs of the detector is in ``spec``."""
        raise NotImplementedError

    def build_queries(self, count: int) -> None:
        """(``provides_queries``) Create the parameters of ``count`` matching queries."""
        raise NotImplementedError

    def initial_queries(self, count: int, batch: int) -> Queries:
        """(``provides_queries``) The first ``count`` matching queries for a batch."""
        raise NotImplementedError

    def decode(
        self,
        queries: Queries,
        memory: Memory,
        self_attn_mask: Tensor | None,
        bbox_embed: nn.Module,
    ) -> Decoded:
        """(``provides_queries``) Decode ``queries`` over the encoder's ``memory`` with the aid's
        own decoder, as a transformer's ``decode`` (:class:`models.protocol.Transformer`)."""
        raise NotImplementedError

    def adapt_queries(self, queries: Queries) -> Queries:
        """The matching queries as this aid changes them (default: unchanged)."""
        return queries

    def select_queries(self, queries: Queries, memory: Memory) -> tuple[Queries, dict]:
        """The queries (the whole pool) as the encoder's output changes them, and prediction
        sets to add to the outputs (training only; default: unchanged, none). ``memory`` is
        the transformer's encoder output (:class:`models.protocol.Memory`)."""
        return queries, {}

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list[dict[str, Tensor]] | None
    ) -> list[QueryBlock]:
        """Training only: the blocks of queries this aid adds. ``pool`` holds every learned
        query (``num_queries`` times the multipliers, the first ``num_queries`` matching, then
        the ``extra_queries``);
        ``targets`` are the batch's (B dicts with "labels" and normalized cxcywh "boxes")."""
        return []

    def adapt_outputs(self, outputs: dict) -> None:
        """Training only: change the outputs dict in place (default: nothing)."""

    def init_heads(self, class_embed: nn.Module, bbox_embed: nn.Module) -> None:
        """Initialise the detector's heads as the aid needs (default: nothing)."""


def self_attention_mask(
    num_matching: int, blocks: list[QueryBlock], device: torch.device
) -> Tensor | None:
    """The mask of the decoder's self-attention over ``[matching | blocks...]``, bool, True
    where a query may NOT attend: None without blocks (DETR), [T, T] when no block has
    padding slots, else [B, T, T]. Rules in :class:`QueryBlock`."""
    if not blocks:
        return None
    sizes = [num_matching, *(len(b.queries) for b in blocks)]
    total = sum(sizes)
    padded = [b for b in blocks if b.valid is not None]
    shape = (padded[0].valid.shape[0], total, total) if padded else (total, total)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[..., :num_matching, :num_matching] = False
    start = num_matching
    for block, size in zip(blocks, sizes[1:], strict=True):
        part = slice(start, start + size)
        group = torch.arange(size, device=device) // (size // block.attention_groups)
        own = group[:, None] != group[None, :]
        if block.valid is not None:
            own = own | ~block.valid[:, None, :]
        mask[..., part, part] = own
        if block.sees_matching:
            mask[..., part, :num_matching] = False
        start += size
    return mask
