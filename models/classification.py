"""Class-head conventions: how the class logits of a query are read, matched, scored and turned
into detections.

One object holds a convention, and the detector's class head, the matcher, the criterion and the
post-processing all ask it, so that a new convention is one subclass of :class:`ClassHead` here
and one entry in :data:`CLASS_HEADS`. Two are defined:

- :class:`SoftmaxClassification`, DETR's, the default: ``num_classes + 1`` logits, the last
  no-object, a softmax over them, cross-entropy with the no-object class weighted by
  ``eos_coef``;
- :class:`FocalClassification`, Deformable DETR's: ``num_classes`` logits, one sigmoid each, the
  sigmoid focal loss, a focal matching cost, and detections the best (query, class) pairs.
"""

import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss


class ClassHead:
    """The methods of a class-head convention (module docstring). ``C`` is the head's number of
    logits, K the number of classes."""

    name: ClassVar[str] = ""
    # The criterion divides the class loss by the normalizer averaged over processes and raised
    # to at least this (a divisor that may be 0, a count of boxes, needs 1).
    least_normalizer: ClassVar[float] = 0.0

    def num_logits(self, num_classes: int) -> int:
        """Columns of the class head for ``num_classes`` classes."""
        raise NotImplementedError

    def num_classes(self, num_logits: int) -> int:
        """The class count of a head with ``num_logits`` columns."""
        raise NotImplementedError

    def init_head(self, class_embed: nn.Linear) -> None:
        """Initialise the class head (default: nn.Linear's own initialisation)."""

    def probabilities(self, logits: Tensor) -> Tensor:
        """[..., C] logits -> [..., K] probabilities of the classes, in float32."""
        raise NotImplementedError

    def matching_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """[N, C] logits of N queries, [T] target labels -> [N, T] cost (lower: better)."""
        raise NotImplementedError

    def loss_normalizer(self, queries: int, matched: int, boxes: int) -> float:
        """This process's share of the class loss's divisor, for ``queries`` queries of which
        ``matched`` are matched, against ``boxes`` target boxes."""
        raise NotImplementedError

    def loss(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        """The summed class loss of logits [B, Q, C] whose queries at ``matched`` (batch index,
        query index) have the classes ``labels`` and the others none."""
        raise NotImplementedError

    def predicted_class(self, logits: Tensor) -> Tensor:
        """[..., C] -> [...] the most likely column."""
        return logits.argmax(-1)

    def is_object(self, logits: Tensor) -> Tensor:
        """[..., C] -> [...] bool: the query predicts an object."""
        raise NotImplementedError

    def detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """logits [B, Q, C], boxes [B, Q, 4] -> scores [B, N], labels [B, N], boxes [B, N, 4]
        and queries [B, N] (the query each detection comes from), best score first or in query
        order."""
        raise NotImplementedError


class SoftmaxClassification(ClassHead):
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
        return num_classes + 1

    def num_classes(self, num_logits: int) -> int:
        return num_logits - 1

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(-1)[..., :-1]

    def matching_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        return -logits.float().softmax(-1)[:, labels]

    def loss_normalizer(self, queries: int, matched: int, boxes: int) -> float:
        """The sum of the class weights: 1 per matched query, ``eos_coef`` per other."""
        return matched + self.eos_coef * (queries - matched)

    def loss(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        """Cross-entropy, no-object everywhere but at ``matched``, weighted."""
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

    def is_object(self, logits: Tensor) -> Tensor:
        """The most likely column is not no-object."""
        return logits.argmax(-1) != logits.shape[-1] - 1

    def detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One detection per query (N = Q, in query order), its best real class."""
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        queries = torch.arange(logits.shape[1], device=logits.device).expand_as(labels)
        return scores, labels, boxes, queries


class FocalClassification(ClassHead):
    """Deformable DETR's sigmoid classification: K logits per query, no no-object column.

    Each (query, class) is a binary decision with probability p = sigmoid(logit). Loss: the
    sigmoid focal loss (``torchvision.ops.sigmoid_focal_loss``, ``focal_alpha``,
    ``focal_gamma``) of every query and class against one-hot targets (the class of a matched
    query is 1, everything else 0), summed and divided by the number of target boxes averaged
    over processes (at least 1): Deformable DETR's ``loss_labels``, whose mean over the queries
    times their number is this sum. Matching cost at the target class: ``alpha (1 - p)^gamma
    (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))``. The bias starts at
    -log((1 - 0.01) / 0.01), so every probability starts at 0.01. Detections: the ``topk``
    (default Q) best (query, class) pairs of the Q K sigmoid scores, each with its query's box,
    so one query may give several. A query is an object (the logged ``cardinality_error``) when
    a probability exceeds 0.5; Deformable DETR logs DETR's softmax test there (the argmax is not
    the last column), which with sigmoid logits counts nearly every query.

    Deformable DETR's recipe weighs this loss and cost by 2 (``--cls_loss_coef 2
    --set_cost_class 2`` there; DETR's 1 stays the default here).
    """

    name = "focal"
    least_normalizer = 1.0
    PRIOR_PROBABILITY = 0.01

    def __init__(
        self, focal_alpha: float = 0.25, focal_gamma: float = 2.0, topk: int | None = None
    ):
        if not 0.0 <= focal_alpha <= 1.0 or focal_gamma < 0.0:
            raise ValueError(
                f"focal loss: alpha must be in [0, 1] and gamma >= 0, got {focal_alpha} and "
                f"{focal_gamma}"
            )
        if topk is not None and topk < 1:
            raise ValueError(f"focal detections: topk must be >= 1 (None: Q), got {topk}")
        self.alpha = focal_alpha
        self.gamma = focal_gamma
        self.topk = topk

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def num_classes(self, num_logits: int) -> int:
        return num_logits

    def init_head(self, class_embed: nn.Linear) -> None:
        """The prior probability 0.01 everywhere (RetinaNet's, Deformable DETR's)."""
        prior = self.PRIOR_PROBABILITY
        nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.float().sigmoid()

    def matching_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        prob = logits.float().sigmoid()[:, labels]
        alpha, gamma = self.alpha, self.gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive - negative

    def loss_normalizer(self, queries: int, matched: int, boxes: int) -> float:
        """The number of target boxes."""
        return boxes

    def loss(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        """The summed focal loss against one-hot targets at ``matched``."""
        target = torch.zeros_like(logits)
        target[matched[0], matched[1], labels] = 1.0
        return sigmoid_focal_loss(logits, target, self.alpha, self.gamma, reduction="sum")

    def is_object(self, logits: Tensor) -> Tensor:
        """Some class's probability exceeds 0.5."""
        return logits.float().sigmoid().amax(-1) > 0.5

    def detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``topk`` best (query, class) pairs (N = topk, at most Q K; default Q), best
        first, each with its query's box."""
        batch, num_queries, num_classes = logits.shape
        prob = logits.float().sigmoid().view(batch, -1)
        scores, index = prob.topk(min(self.topk or num_queries, prob.shape[1]), dim=1)
        queries, labels = index // num_classes, index % num_classes
        boxes = boxes.gather(1, queries[..., None].expand(-1, -1, boxes.shape[-1]))
        return scores, labels, boxes, queries


# The conventions ``--cls_loss`` chooses from; the first is the default.
CLASS_HEADS: dict[str, type[ClassHead]] = {
    "softmax": SoftmaxClassification,
    "focal": FocalClassification,
}


def build_class_head(
    name: str = "softmax",
    *,
    eos_coef: float = 0.1,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> ClassHead:
    """The convention ``name`` of :data:`CLASS_HEADS`, given the settings its constructor
    takes (``eos_coef``: softmax; ``focal_alpha``, ``focal_gamma``: focal)."""
    if name not in CLASS_HEADS:
        raise ValueError(f"unknown class head {name!r}; choose from {list(CLASS_HEADS)}")
    head = CLASS_HEADS[name]
    settings = {"eos_coef": eos_coef, "focal_alpha": focal_alpha, "focal_gamma": focal_gamma}
    accepted = inspect.signature(head).parameters
    return head(**{k: v for k, v in settings.items() if k in accepted})
