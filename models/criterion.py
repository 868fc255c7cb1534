"""DETR's set loss: Hungarian matching, then one ``loss_*`` method per term, over every prediction
set that the model's outputs hold.

A prediction set is a dict with "pred_logits" [B, Q, K + 1] and "pred_boxes" [B, Q, 4]
(normalized cxcywh). The outputs dict is one set (the last decoder layer), and it may hold more:

- ``aux_outputs``: a list of sets (the earlier decoder layers); their terms get ``_0``, ``_1``...
- ``<name>_outputs``: a set, or a list of sets, that a head adds (for example query groups or
  denoising queries); its terms get ``_<name>`` (or ``_<name>_<i>`` for a list), and its own
  ``aux_outputs`` ``_<name>_0``, ...

so a new head adds its predictions to the outputs dict and nothing else changes. A set may also
carry ``indices`` (B pairs of query and target indices, as the matcher returns them) when its
assignment is known and needs no matching, and ``loss_weight`` (default 1) to scale its terms.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from models.matcher import HungarianMatcher
from util import dist as dist_util
from util.boxes import cxcywh_to_xyxy

Indices = list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """DETR's set loss over every prediction set of the outputs (see the module docstring).

    Terms ("losses"): "labels" -> loss_ce (cross-entropy over all queries, weight ``eos_coef`` on
    no-object) and class_error (logged: % of matched queries with the wrong class);
    "boxes" -> loss_bbox (L1) and loss_giou (1 - GIoU) over matched pairs, each summed and divided
    by the number of target boxes averaged over processes (at least 1); "cardinality" ->
    cardinality_error (logged: |predicted objects - target objects| per image).
    ``weight_dict`` holds the weight of each term's base name ("loss_ce", "loss_bbox",
    "loss_giou"): every set's copy of a term gets it. The criterion holds no tensors: it runs on
    the device of the outputs it is given.
    """

    LOSSES = ("labels", "boxes", "cardinality")

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: tuple[str, ...] = LOSSES,
    ):
        super().__init__()
        unknown = sorted(set(losses) - set(self.LOSSES))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; choose from {list(self.LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = tuple(losses)

    def loss_labels(self, outputs, targets, indices, norms: "Normalizers") -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        matched = _matched_queries(indices)
        matched_labels = _matched_targets(targets, indices, "labels")
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched] = matched_labels
        class_weight = torch.ones(self.num_classes + 1, device=logits.device)
        class_weight[-1] = self.eos_coef
        # The weighted mean of DETR, but over the whole batch of all processes, so that N
        # processes compute the same gradient as one process with the N-times batch.
        loss_ce = (
            F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight, reduction="sum")
            / norms.class_weight
        )
        if matched_labels.numel() == 0:
            class_error = logits.new_zeros(())
        else:
            correct = logits[matched].argmax(-1) == matched_labels
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
        logits = outputs["pred_logits"]
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        num_targets = torch.as_tensor(
            [len(t["labels"]) for t in targets], dtype=torch.float32, device=logits.device
        )
        return {"cardinality_error": F.l1_loss(num_predicted, num_targets)}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses and logged metrics for one batch.

        Args:
            outputs: the model's outputs: "pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4]
                normalized cxcywh, and the optional sets of the module docstring.
            targets: B dicts with "labels" [n_i] int64 and "boxes" [n_i, 4] normalized cxcywh.

        Returns:
            loss_ce, loss_bbox, loss_giou, class_error, cardinality_error, and the same names
            with each further set's suffix (``_0``, ``_1``, ... for the auxiliary outputs).
            Scalar tensors.
        """
        sets = prediction_sets(outputs)
        indices = [s["indices"] if "indices" in s else self.matcher(s, targets) for _, s in sets]
        norms = self._normalizers(targets, sets, indices)
        losses = {}
        for (suffix, predictions), set_indices, set_norms in zip(sets, indices, norms, strict=True):
            scale = predictions.get("loss_weight", 1.0)
            for name in self.losses:
                terms = getattr(self, f"loss_{name}")(predictions, targets, set_indices, set_norms)
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

    def _normalizers(self, targets, sets, indices) -> list["Normalizers"]:
        """The divisors of each set's loss terms, averaged over processes in one all-reduce.

        The box losses divide by the number of target boxes (at least 1); the class loss by the
        sum of its class weights: each image matches its matched queries (weight 1) and leaves
        the rest to no-object (weight eos_coef).
        """
        counts = []
        for (_, predictions), set_indices in zip(sets, indices, strict=True):
            queries = predictions["pred_logits"].shape[1] * len(targets)
            if "indices" in predictions:
                matched = boxes = sum(len(i) for i, _ in set_indices)
            else:
                boxes = sum(len(t["labels"]) for t in targets)
                matched = sum(len(i) for i, _ in set_indices)
            counts.append([boxes, matched + self.eos_coef * (queries - matched)])
        device = sets[0][1]["pred_logits"].device
        values = _mean_over_processes(torch.tensor(counts, device=device))
        return [Normalizers(boxes=v[0].clamp(min=1), class_weight=v[1]) for v in values]


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
    class_weight: Tensor  # class-loss weight per process, averaged over processes


def _mean_over_processes(value: Tensor) -> Tensor:
    """Values averaged over processes when distributed (no gradient flows through them)."""
    value = value.detach().clone()
    if dist_util.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / dist_util.world_size()
    return value
