"""HungarianMatcher: optimal, one-to-one, batched like per-image, and loud on bad input."""

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from models.matcher import HungarianMatcher

NUM_CLASSES = 4


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """n valid normalized (cx, cy, w, h) boxes."""
    centers = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
    sizes = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
    return torch.cat([centers, sizes], 1)


def random_problem(sizes: list[int], num_queries: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(sizes), num_queries, NUM_CLASSES + 1, generator=g),
        "pred_boxes": random_boxes(len(sizes) * num_queries, g).view(len(sizes), num_queries, 4),
    }
    targets = [
        {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": random_boxes(n, g)}
        for n in sizes
    ]
    return outputs, targets


def cost_matrix(logits, pred_boxes, target, weights=(1.0, 5.0, 2.0)):
    """The matching cost of one image, written from its definition: [Q, n]."""
    prob = logits.softmax(-1)[:, target["labels"]]
    l1 = (pred_boxes[:, None, :] - target["boxes"][None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(
        box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy")
    )
    return weights[0] * -prob + weights[1] * l1 + weights[2] * -giou


def test_batched_result_equals_per_image_results():
    outputs, targets = random_problem([2, 0, 4], num_queries=6, seed=0)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = {k: v[i : i + 1] for k, v in outputs.items()}
        ((queries, target_idx),) = matcher(single, [target])
        assert torch.equal(batched[i][0], queries)
        assert torch.equal(batched[i][1], target_idx)


@pytest.mark.parametrize("sizes", [[3, 1], [6, 8]])
def test_matching_is_one_to_one(sizes):
    num_queries = 6
    outputs, targets = random_problem(sizes, num_queries, seed=1)
    for (queries, target_idx), n in zip(HungarianMatcher()(outputs, targets), sizes, strict=True):
        assert queries.dtype == target_idx.dtype == torch.int64
        assert len(queries) == len(target_idx) == min(n, num_queries)
        assert len(set(queries.tolist())) == len(queries)
        assert len(set(target_idx.tolist())) == len(target_idx)
        assert all(0 <= q < num_queries for q in queries.tolist())
        assert all(0 <= t < n for t in target_idx.tolist())


def test_images_without_targets_get_empty_matches():
    outputs, targets = random_problem([0, 0], num_queries=5, seed=2)
    for queries, target_idx in HungarianMatcher()(outputs, targets):
        assert queries.shape == target_idx.shape == (0,)
        assert queries.dtype == target_idx.dtype == torch.int64


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_brute_force_over_all_assignments(seed):
    num_queries, n = 4, 1 + seed % 3
    outputs, targets = random_problem([n], num_queries, seed=10 + seed)
    cost = cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0])
    best = min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), n)
    )
    ((queries, target_idx),) = HungarianMatcher()(outputs, targets)
    assert cost[queries, target_idx].sum().item() == pytest.approx(best, abs=1e-5)


def test_cost_weights_change_the_winner():
    """Query 0 has the right class, query 1 the right box: each cost alone picks its own."""
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    logits = torch.zeros(1, 2, NUM_CLASSES + 1)
    logits[0, 0, 2] = 5.0
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    assert HungarianMatcher(1, 0, 0)(outputs, [target])[0][0].tolist() == [0]
    assert HungarianMatcher(0, 1, 0)(outputs, [target])[0][0].tolist() == [1]
    assert HungarianMatcher(0, 0, 1)(outputs, [target])[0][0].tolist() == [1]


def test_non_finite_predictions_raise_a_clear_error():
    outputs, targets = random_problem([2], num_queries=3, seed=3)
    outputs["pred_boxes"][0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        HungarianMatcher()(outputs, targets)


def test_degenerate_predicted_boxes_raise_a_clear_error():
    outputs, targets = random_problem([2], num_queries=3, seed=3)
    outputs["pred_boxes"][0, 0, 3] = -0.1
    with pytest.raises(ValueError, match="negative width or height"):
        HungarianMatcher()(outputs, targets)


def test_bad_targets_name_the_image():
    outputs, targets = random_problem([1, 2], num_queries=3, seed=4)
    targets[1]["image_id"] = torch.tensor(42)
    targets[1]["labels"][0] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"image_id 42: target labels .* largest category id"):
        HungarianMatcher()(outputs, targets)
    targets[1]["labels"][0] = 0
    targets[1]["boxes"][1, 2] = 0.0
    with pytest.raises(ValueError, match="image_id 42: target boxes .* positive width"):
        HungarianMatcher()(outputs, targets)


def test_all_zero_costs_are_rejected():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(0, 0, 0)
