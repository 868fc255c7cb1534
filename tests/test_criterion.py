"""SetCriterion: every term against a hand computation, aux terms, and the edge cases."""

import math

import pytest
import torch

from models.classification import SoftmaxClassification
from models.criterion import SetCriterion
from models.matcher import HungarianMatcher

NUM_CLASSES = 2
EOS = 0.1
TERMS = ("loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error")


class FixedMatcher:
    """Matches query ``queries[i]`` of image i to its target 0 (default: the tiny case's)."""

    def __init__(self, queries: tuple[int, ...] = (0, 1)):
        self.queries = queries

    def __call__(self, outputs, targets):
        return [(torch.tensor([q]), torch.tensor([0])) for q in self.queries]


WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def criterion(matcher=None) -> SetCriterion:
    return SetCriterion(
        NUM_CLASSES, matcher or HungarianMatcher(), WEIGHTS, SoftmaxClassification(EOS)
    )


def tiny_case():
    """Two images, two queries, one target each (see the hand computation below)."""
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]],  # q0 says class 1 (right), q1 no-object
            [[0.2, 1.5, 0.0], [1.0, 2.0, 0.0]],  # both say class 1; q1's target is class 0
        ]
    )
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1]],
            [[0.5, 0.5, 0.1, 0.1], [0.2, 0.5, 0.2, 0.2]],
        ]
    )
    target_box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # xyxy [0.4, 0.4, 0.6, 0.6]
    targets = [
        {"labels": torch.tensor([1]), "boxes": target_box},
        {"labels": torch.tensor([0]), "boxes": target_box.clone()},
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def nll(logits: list[float], label: int) -> float:
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


def test_each_term_matches_a_hand_computation(device):
    outputs, targets = tiny_case()
    outputs = {k: v.to(device) for k, v in outputs.items()}
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    losses = criterion(FixedMatcher())(outputs, targets)
    assert all(v.device.type == device.type for v in losses.values())
    # Cross-entropy: matched queries take their target class (weight 1), the others no-object
    # (weight EOS); the mean is weighted.
    ce = (
        nll([1.0, 2.0, 0.5], 1)
        + EOS * nll([0.0, 0.0, 3.0], 2)
        + EOS * nll([0.2, 1.5, 0.0], 2)
        + nll([1.0, 2.0, 0.0], 0)
    ) / (2 + 2 * EOS)
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    # One of the two matched queries has the wrong class.
    assert losses["class_error"].item() == pytest.approx(50.0)
    # L1 over matched pairs / 2 target boxes: |0.4 - 0.2| and |0.2 - 0.5|.
    assert losses["loss_bbox"].item() == pytest.approx((0.2 + 0.3) / 2, rel=1e-5)
    # Image 0: [0.3, 0.4, 0.7, 0.6] vs [0.4, 0.4, 0.6, 0.6]: IoU 0.04 / 0.08, enclosing box is
    # the union, GIoU 0.5. Image 1: [0.1, 0.4, 0.3, 0.6]: no overlap, union 0.08, enclosing
    # [0.1, 0.4, 0.6, 0.6] of area 0.1, GIoU = 0 - 0.02 / 0.1.
    assert losses["loss_giou"].item() == pytest.approx(((1 - 0.5) + (1 + 0.2)) / 2, rel=1e-4)
    # Predicted objects: image 0 one (target 1), image 1 two (target 1).
    assert losses["cardinality_error"].item() == pytest.approx(0.5)


def test_aux_terms_are_present_and_weighted():
    outputs, targets = tiny_case()
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        for _ in range(2)
    ]
    crit = criterion(FixedMatcher())
    losses = crit(outputs, targets)
    assert set(losses) == {f"{t}{s}" for t in TERMS for s in ("", "_0", "_1")}
    for term in TERMS:
        assert losses[f"{term}_1"].item() == pytest.approx(losses[term].item())
    # The objective weighs every copy of a term as the term; logged metrics are not in it.
    expected = 3 * sum(WEIGHTS[t] * losses[t] for t in WEIGHTS)
    assert crit.weighted_total(losses).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_head_adds_prediction_sets_through_the_outputs_dict_alone():
    """``<name>_outputs`` sets get their own suffixed terms; a set that carries ``indices`` is
    not matched, and ``loss_weight`` scales its weighted terms (not the logged metrics)."""
    outputs, targets = tiny_case()
    same = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    outputs["group_outputs"] = [dict(same, aux_outputs=[dict(same)])]
    fixed = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    outputs["dn_outputs"] = dict(same, indices=fixed, loss_weight=0.5)
    calls = []
    matcher = FixedMatcher()
    losses = criterion(lambda o, t: calls.append(1) or matcher(o, t))(outputs, targets)
    suffixes = ("", "_group_0", "_group_0_0", "_dn")
    assert set(losses) == {f"{t}{s}" for t in TERMS for s in suffixes}
    assert len(calls) == 3  # the dn set came with its assignment
    for term in TERMS:
        assert losses[f"{term}_group_0_0"].item() == pytest.approx(losses[term].item())
    # The dn set's assignment: image 0's q1 and image 1's q0, both [0.5, 0.5, 0.1, 0.1] against
    # [0.5, 0.5, 0.2, 0.2] (L1 0.2 each), over 2 boxes, times the set's weight 0.5; both of
    # their classes are wrong.
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.5 * (0.2 + 0.2) / 2, rel=1e-5)
    assert losses["class_error_dn"].item() == pytest.approx(100.0)


def test_perfect_prediction_has_zero_box_losses():
    outputs, targets = tiny_case()
    outputs["pred_boxes"] = torch.tensor(
        [[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]], [[0.7, 0.7, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]]
    )
    outputs["pred_logits"] = torch.tensor(
        [[[0.0, 9.0, 0.0], [0.0, 0.0, 9.0]], [[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]]]
    )
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 0.0


def test_images_without_targets_give_finite_losses_and_gradients():
    outputs, _ = tiny_case()
    logits = outputs["pred_logits"].requires_grad_()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    crit = criterion()
    losses = crit(outputs, [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in losses.values())
    no_object = sum(nll(q, 2) for image in logits.tolist() for q in image) / 4
    assert losses["loss_ce"].item() == pytest.approx(no_object, rel=1e-5)
    assert losses["loss_bbox"].item() == losses["loss_giou"].item() == 0.0
    crit.weighted_total(losses).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_box_losses_are_normalized_by_the_number_of_targets():
    """Image 0 alone, then with a perfectly predicted image 1: its L1 loss is shared by 2."""
    outputs, targets = tiny_case()
    first = {k: v[:1] for k, v in outputs.items()}
    alone = criterion(FixedMatcher((0,)))(first, targets[:1])["loss_bbox"]
    outputs["pred_boxes"][1, 1] = targets[1]["boxes"][0]
    together = criterion(FixedMatcher())(outputs, targets)["loss_bbox"]
    assert alone.item() == pytest.approx(0.2)
    assert together.item() == pytest.approx(0.2 / 2)


def test_unknown_loss_terms_are_rejected():
    with pytest.raises(ValueError, match="unknown loss terms"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, losses=("labels", "masks"))
