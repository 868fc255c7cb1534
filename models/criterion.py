"""DETR's set loss: Hungarian matching, then one ``loss_*`` method per term, over every prediction
set that the model's outputs hold.

A prediction set is a dict with "pred_logits" [B, Q, C] (the class head's logits: K + 1 for
DETR's) and "pred_boxes" [B, Q, 4] (normalized cxcywh). The outputs dict is one set (the last
decoder layer), and it may hold more:

- ``aux_outputs``: a list of sets (the earlier decoder layers); their terms get ``_0``, ``_1``...
- ``<name>_outputs``: a set, or a list of sets, that a head adds (for example query groups or
  denoising queries); its terms get ``_<name>`` (or ``_<name>_<i>`` for a list), and its own
  ``aux_outputs`` ``_<name>_0``, ...

so a new head adds its predictions to the outputs dict and nothing else changes. A set may also
carry ``indices`` (B pairs of query and target indices, as the matcher returns them) when its
assignment is known and needs no matching, ``targets`` (B dicts like the image targets) when it
is scored against other targets than the image's (one-to-many matching against repeated
targets), ``class_agnostic`` when every target counts as class 0 (two-stage Deformable DETR's
proposals), and ``loss_weight`` (default 1) to scale its terms.

The classification terms are those of the class-head convention (:mod:`models.classification`).
A new term is one ``loss_<name>(outputs, targets, indices, norms) -> {name: value}`` method,
listed in ``SetCriterion.terms``, chosen by ``losses`` as the built-in ones are, with its weight
in ``weight_dict`` (:class:`models.config.LossConfig`).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from models.classification import ClassHead
from models.matcher import HungarianMatcher
from util import dist as dist_util
from util.boxes import cxcywh_to_xyxy

Indices = list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """DETR's set loss over every prediction set of the outputs (see the module docstring).

    Terms ("losses"): "labels" -> loss_ce (the class head's loss over all queries; DETR's:
    cross-entropy, weight ``eos_coef`` on no-object) and class_error (logged: % of matched
    queries with the wrong class); "boxes" -> loss_bbox (L1) and loss_giou (1 - GIoU) over matched
    pairs, each summed and divided by the number of target boxes averaged over processes (at
    least 1); "cardinality" -> cardinality_error (logged: |predicted objects - target objects|
    per image). ``weight_dict`` holds the weight of each term's base name
    ("loss_ce", "loss_bbox", "loss_giou"): every set's copy of a term gets it. ``class_head`` is
    the classification convention (default: the matcher's). The criterion holds no tensors: it
    runs on the device of the outputs it is given.
    """

    LOSSES = ("labels", "boxes", "cardinality")

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        class_head: ClassHead | None = None,
        losses: tuple[str, ...] = LOSSES,
    ):
        super().__init__()
        self.terms = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = sorted(set(losses) - set(self.terms))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; choose from {list(self.terms)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.class_head = class_head or matcher.class_head
        self.losses = tuple(losses)

    def loss_labels(self, outputs, targets, indices, norms: "Normalizers") -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        matched = _matched_queries(indices)
        matched_labels = _matched_targets(targets, indices, "labels")
        # Divided by the class-loss normalizer of the whole batch of all processes, so that N
        # processes compute the same gradient as one process with the N-times batch.
        loss_ce = self.class_head.loss(logits, matched, matched_labels) / norms.class_weight
        if matched_labels.numel() == 0:
            class_error = logits.new_zeros(())
        else:
            correct = self.class_head.predicted_class(logits[matched]) == matched_labels
            class_error = 100.0 - 100.0 * correct.float().mean()
        return {"loss_ce": loss_ce, "class_error": class_error.detach()}

    def loss_boxes(self, outputs, targets, indices, norms: "Normalizers") -> dict[str, Tensor]:
        # float32 whatever the autocast dtype: boxes are small differences of numbers in [0, 1].
        pred = outputs["pred_boxes"][_matched_queries(indices)].float()
        target = _matched_targets(targets, indices, "boxes").float()
        loss_bbox = F.l1_loss(pred, target, reduction="sum")
        loss_giou = generalized_box_iou_loss(
            cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), reduction="sum"
        )
        return {"loss_bbox": loss_bbox / norms.boxes, "loss_giou": loss_giou / norms.boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, norms) -> dict[str, Tensor]:
        num_predicted = self.class_head.is_object(outputs["pred_logits"]).sum(1).float()
        num_targets = torch.as_tensor(
            [len(t["labels"]) for t in targets],
            dtype=torch.float32,
            device=outputs["pred_logits"].device,
        )
        return {"cardinality_error": F.l1_loss(num_predicted, num_targets)}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses and logged metrics for one batch.

        Args:
            outputs: the model's outputs: "pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4]
                normalized cxcywh, and the optional sets of the module docstring.
            targets: B dicts with "labels" [n_i] int64 and "boxes" [n_i, 4] normalized cxcywh.

        Returns:
            loss_ce, loss_bbox, loss_giou, class_error, cardinality_error, and the same names
            with each further set's suffix (``_0``, ``_1``, ... for the auxiliary outputs).
            Scalar tensors.
        """
        sets = prediction_sets(outputs)
        set_targets = [_set_targets(s, targets) for _, s in sets]
        indices = [
            s["indices"] if "indices" in s else self.matcher(s, t)
            for (_, s), t in zip(sets, set_targets, strict=True)
        ]
        norms = self._normalizers(set_targets, sets, indices)
        losses = {}
        for (suffix, predictions), own_targets, set_indices, set_norms in zip(
            sets, set_targets, indices, norms, strict=True
        ):
            scale = predictions.get("loss_weight", 1.0)
            for name in self.losses:
                terms = self.terms[name](predictions, own_targets, set_indices, set_norms)
                for term, value in terms.items():
                    losses[term + suffix] = value * scale if term in self.weight_dict else value
        return losses

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """The training objective: the sum of every term that has a weight, times that weight."""
        total = 0.0
        for name, value in losses.items():
            weight = loss_weight(name, self.weight_dict)
            if weight is not None:
                total = total + weight * value
        return total

    def _normalizers(self, set_targets, sets, indices) -> list["Normalizers"]:
        """The divisors of each set's loss terms, averaged over processes in one all-reduce.

        The box losses divide by the number of target boxes of the set (at least 1); the class
        loss by the class head's normalizer (DETR's: the sum of the class weights, 1 for each
        matched query and eos_coef for the rest; the focal loss's: the number of target boxes,
        at least 1).
        """
        counts = []
        for (_, predictions), targets, set_indices in zip(sets, set_targets, indices, strict=True):
            queries = predictions["pred_logits"].shape[1] * len(targets)
            if "indices" in predictions:
                matched = boxes = sum(len(i) for i, _ in set_indices)
            else:
                boxes = sum(len(t["labels"]) for t in targets)
                matched = sum(len(i) for i, _ in set_indices)
            counts.append([boxes, self.class_head.loss_normalizer(queries, matched, boxes)])
        device = sets[0][1]["pred_logits"].device
        values = _mean_over_processes(torch.tensor(counts, device=device))
        least = self.class_head.least_normalizer
        return [Normalizers(v[0].clamp(min=1), v[1].clamp(min=least)) for v in values]


def prediction_sets(outputs: dict, suffix: str = "") -> list[tuple[str, dict]]:
    """(suffix, set) for every prediction set in ``outputs`` (see the module docstring)."""
    sets = [(suffix, outputs)] if "pred_logits" in outputs else []
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        sets.append((f"{suffix}_{i}", aux))
    for key, value in outputs.items():
        if key == "aux_outputs" or not key.endswith("_outputs"):
            continue
        name = f"{suffix}_{key.removesuffix('_outputs')}"
        if isinstance(value, dict):
            sets += prediction_sets(value, name)
        else:
            for i, entry in enumerate(value):
                sets += prediction_sets(entry, f"{name}_{i}")
    return sets


def _set_targets(predictions: dict, targets: list[dict]) -> list[dict]:
    """The targets a prediction set is matched and scored against: its own ("targets"), the
    batch's, or with "class_agnostic" the batch's with every label 0 (two-stage Deformable
    DETR's proposals)."""
    if predictions.get("class_agnostic"):
        return [t | {"labels": torch.zeros_like(t["labels"])} for t in targets]
    return predictions.get("targets", targets)


def loss_weight(name: str, weight_dict: dict[str, float]) -> float | None:
    """The weight of term ``name``: that of its base name (``loss_ce_dn_0`` -> ``loss_ce``)."""
    for base, weight in weight_dict.items():
        if name == base or name.startswith(base + "_"):
            return weight
    return None


def _matched_queries(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched query, for advanced indexing of [B, Q, ...]."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def _matched_targets(targets: list[dict], indices: Indices, key: str) -> Tensor:
    """The matched targets' ``key`` entries, in the order of :func:`_matched_queries`."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices, strict=True)])


class Normalizers(NamedTuple):
    boxes: Tensor  # target boxes per process, averaged over processes, at least 1
    class_weight: Tensor  # class-loss divisor per process, averaged over processes


def _mean_over_processes(value: Tensor) -> Tensor:
    """Values averaged over processes when distributed (no gradient flows through them)."""
    value = value.detach().clone()
    if dist_util.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / dist_util.world_size()
    return value
