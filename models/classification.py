"""Class-head conventions: how the class logits of a query are read, matched, scored and turned
into detections.

One object holds a convention, and the detector's class head, the matcher, the criterion and the
post-processing all ask it, so that a new convention (sigmoid focal classification, say) is one
class here and one entry in :data:`CLASS_HEADS`. :class:`SoftmaxClassification` is DETR's, the
default: ``num_classes + 1`` logits, the last no-object, a softmax over them, cross-entropy with
the no-object class weighted by ``eos_coef``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftmaxClassification:
    """DETR's classification: K + 1 logits per query (the last is no-object) and a softmax.

    Matching cost: minus the probability of the target class. Loss: cross-entropy over all
    queries, unmatched ones against no-object, class weights 1 and ``eos_coef`` (no-object),
    divided by the sum of the weights. Detections: every query, scored by its most probable
    real class.
    """

    name = "softmax"

    def __init__(self, eos_coef: float = 0.1):
        self.eos_coef = eos_coef

    def num_logits(self, num_classes: int) -> int:
        """Columns of the class head for ``num_classes`` classes."""
        return num_classes + 1

    def num_classes(self, num_logits: int) -> int:
        """The class count of a head with ``num_logits`` columns."""
        return num_logits - 1

    def init_head(self, class_embed: nn.Linear) -> None:
        """Initialise the class head (DETR keeps nn.Linear's default)."""

    def probabilities(self, logits: Tensor) -> Tensor:
        """[..., K + 1] logits -> [..., K] probabilities of the real classes, in float32."""
        return logits.float().softmax(-1)[..., :-1]

    def matching_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """[N, K + 1] logits of N queries, [T] target labels -> [N, T] cost (lower: better)."""
        return -logits.float().softmax(-1)[:, labels]

    def loss_normalizer(self, queries: int, matched: int) -> float:
        """This process's share of the class loss's divisor: ``queries`` queries of which
        ``matched`` are matched (the sum of the class weights)."""
        return matched + self.eos_coef * (queries - matched)

    def loss(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        """The summed, weighted cross-entropy of logits [B, Q, K + 1] against no-object
        everywhere but at ``matched`` (batch index, query index), whose classes are ``labels``."""
        num_classes = logits.shape[-1] - 1
        target_classes = torch.full(
            logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched] = labels
        class_weight = torch.ones(num_classes + 1, device=logits.device)
        class_weight[-1] = self.eos_coef
        return F.cross_entropy(
            logits.transpose(1, 2), target_classes, class_weight, reduction="sum"
        )

    def predicted_class(self, logits: Tensor) -> Tensor:
        """[..., K + 1] -> [...] the most likely column (K: no-object)."""
        return logits.argmax(-1)

    def is_object(self, logits: Tensor) -> Tensor:
        """[..., K + 1] -> [...] bool: the query predicts an object."""
        return logits.argmax(-1) != logits.shape[-1] - 1

    def detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits [B, Q, K + 1], boxes [B, Q, 4] -> scores [B, Q], labels [B, Q], boxes
        [B, Q, 4]: one detection per query, its best real class."""
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        return scores, labels, boxes


# The conventions ``--cls_loss`` chooses from; the first is the default.
CLASS_HEADS = {"softmax": SoftmaxClassification}
ClassHead = SoftmaxClassification


def build_class_head(name: str = "softmax", *, eos_coef: float = 0.1) -> ClassHead:
    if name not in CLASS_HEADS:
        raise ValueError(f"unknown class head {name!r}; choose from {list(CLASS_HEADS)}")
    return CLASS_HEADS[name](eos_coef=eos_coef)
