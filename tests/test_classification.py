"""The class-head conventions (models/classification.py): Deformable DETR's sigmoid focal head
against the formulas computed by hand, its detections, a model trained and rebuilt with it; and
DETR's softmax head staying the default, computing what it computed before."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import options
import predict
from datasets.coco_eval import class_wise_nms
from models.classification import (
    CLASS_HEADS,
    FocalClassification,
    SoftmaxClassification,
    build_class_head,
)
from models.criterion import SetCriterion
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess
from tests.conftest import (
    HIDDEN,
    NUM_CLASSES,
    QUERIES,
    assert_trains_on_tiny_batch,
    build_tiny,
    run_main,
    save_checkpoint,
    tiny_argv,
    tiny_batch,
    tiny_model_args,
)

ALPHA, GAMMA = 0.25, 2.0


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def focal_term(logit: float, positive: bool) -> float:
    """RetinaNet's focal loss of one binary decision, by hand."""
    p = sigmoid(logit)
    if positive:
        return -ALPHA * (1 - p) ** GAMMA * math.log(p)
    return -(1 - ALPHA) * p**GAMMA * math.log(1 - p)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class FixedMatcher:
    """Returns the given indices, whatever the predictions."""

    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return self.indices


def focal_case():
    """Two images, three queries, two classes: image 0 has one object (class 1) matched to
    query 2, image 1 two objects (classes 0, 1) matched to queries 1 and 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, generator=g) * 2
    boxes = torch.rand(2, 3, 4, generator=g) * 0.4 + 0.2
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)},
    ]
    indices = [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([1, 0]), torch.tensor([0, 1]))]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def focal_criterion(indices) -> SetCriterion:
    head = FocalClassification(ALPHA, GAMMA)
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(2, FixedMatcher(indices), weights, head)


# the focal convention against hand computations


def test_the_focal_loss_is_the_sum_over_queries_and_classes_divided_by_the_target_boxes():
    outputs, targets, indices = focal_case()
    positives = {(0, 2, 1), (1, 1, 0), (1, 0, 1)}  # (image, query, class)
    logits = outputs["pred_logits"].tolist()
    total = sum(
        focal_term(logits[b][q][c], (b, q, c) in positives)
        for b in range(2)
        for q in range(3)
        for c in range(2)
    )
    losses = focal_criterion(indices)(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(total / 3, rel=1e-5)
    # Deformable DETR's loss_labels: the mean over the queries, summed, / num_boxes, times Q.
    one_hot = torch.zeros(2, 3, 2)
    for b, q, c in positives:
        one_hot[b, q, c] = 1.0
    x = outputs["pred_logits"]
    prob = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, one_hot, reduction="none")
    p_t = prob * one_hot + (1 - prob) * (1 - one_hot)
    alpha_t = ALPHA * one_hot + (1 - ALPHA) * (1 - one_hot)
    reference = (alpha_t * ce * (1 - p_t) ** GAMMA).mean(1).sum() / 3 * x.shape[1]
    torch.testing.assert_close(losses["loss_ce"], reference)
    assert losses["class_error"].item() == pytest.approx(
        100 * (1 - sum(logits[b][q].index(max(logits[b][q])) == c for b, q, c in positives) / 3)
    )


def test_the_focal_loss_of_images_without_objects_is_finite_and_divided_by_one():
    outputs, _, _ = focal_case()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    no_match = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))] * 2
    losses = focal_criterion(no_match)(outputs, empty)
    total = sum(focal_term(v, False) for v in outputs["pred_logits"].flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(total, rel=1e-5)
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_the_focal_matching_cost_is_deformable_detrs_at_the_target_class():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=g) * 3
    labels = torch.tensor([2, 0, 2])
    cost = FocalClassification(ALPHA, GAMMA).matching_cost(logits, labels)
    assert cost.shape == (4, 3)
    for i in range(4):
        for j, label in enumerate(labels.tolist()):
            p = sigmoid(logits[i, label].item())
            positive = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
            negative = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + 1e-8)
            assert cost[i, j].item() == pytest.approx(positive - negative, rel=1e-5, abs=1e-7)
    # A query sure of the target class costs less than one sure of another.
    sure = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = FocalClassification().matching_cost(sure, torch.tensor([0]))
    assert cost[0, 0] < cost[1, 0]


def test_the_matcher_pairs_each_target_with_the_query_most_sure_of_its_class():
    head = FocalClassification()
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0, class_head=head)
    logits = torch.tensor([[[3.0, -3.0], [-3.0, -3.0], [-3.0, 3.0]]])
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    ((queries, objects),) = matcher(
        {"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}, targets
    )
    assert dict(zip(objects.tolist(), queries.tolist(), strict=True)) == {0: 2, 1: 0}


def test_detections_are_the_k_best_query_class_pairs_with_their_querys_box():
    probabilities = torch.tensor([[[0.9, 0.8], [0.1, 0.7], [0.95, 0.05]]])  # [1, Q=3, K=2]
    logits = probabilities.logit()
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1], [0.75, 0.5, 0.5, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    (result,) = PostProcess(FocalClassification())(outputs, torch.tensor([[100, 200]]))
    # k = Q = 3 by default: (q2, c0), (q0, c0), (q0, c1); query 0 gives two detections.
    torch.testing.assert_close(result["scores"], torch.tensor([0.95, 0.9, 0.8]))
    assert result["labels"].tolist() == [0, 0, 1]
    assert result["queries"].tolist() == [2, 0, 0]
    xyxy = {0: [80.0, 40.0, 120.0, 60.0], 2: [100.0, 40.0, 200.0, 60.0]}  # (x0, y0, x1, y1) px
    expected = torch.tensor([xyxy[q] for q in (2, 0, 0)])
    torch.testing.assert_close(result["boxes"], expected)
    (best,) = PostProcess(FocalClassification(topk=2))(outputs, torch.tensor([[100, 200]]))
    assert best["queries"].tolist() == [2, 0] and best["labels"].tolist() == [0, 0]
    (every,) = PostProcess(FocalClassification(topk=50))(outputs, torch.tensor([[100, 200]]))
    assert len(every["scores"]) == 6  # at most Q K
    assert torch.all(every["scores"][:-1] >= every["scores"][1:])


def test_class_wise_nms_takes_the_focal_detections():
    probabilities = torch.tensor([[[0.9, 0.8], [0.85, 0.1], [0.1, 0.2]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.21, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    outputs = {"pred_logits": probabilities.logit(), "pred_boxes": boxes}
    (result,) = PostProcess(FocalClassification())(outputs, torch.tensor([[100, 100]]))
    kept = class_wise_nms(result, 0.5)
    # q1's class 0 overlaps q0's class 0 and goes; q0's class 1 is another class and stays.
    assert kept["labels"].tolist() == [0, 1]
    torch.testing.assert_close(kept["scores"], torch.tensor([0.9, 0.8]))


def test_the_focal_head_has_k_logits_starting_at_probability_one_percent():
    model = build_tiny(cls_loss="focal")[0]
    assert model.class_embed.weight.shape == (NUM_CLASSES, HIDDEN)
    torch.testing.assert_close(model.class_embed.bias.sigmoid(), torch.full((NUM_CLASSES,), 0.01))
    images, _ = tiny_batch()
    with torch.no_grad():
        logits = model.eval()(images)["pred_logits"]
    assert logits.shape == (2, QUERIES, NUM_CLASSES)
    head = model.class_head
    assert not head.is_object(torch.full((2, 3), -0.1)).any()
    assert head.is_object(torch.tensor([[-5.0, 0.1, -5.0]])).all()
    assert head.predicted_class(torch.tensor([[-5.0, 0.1, -1.0]])).item() == 1


def test_bad_focal_settings_are_refused_naming_the_flags():
    with pytest.raises(ValueError, match="alpha"):
        FocalClassification(focal_alpha=1.5)
    for bad in (["--focal_alpha", "-0.5"], ["--focal_gamma", "-1"]):
        with pytest.raises(SystemExit, match="--focal_alpha .* --focal_gamma"):
            options.check_args(options.parse(bad))


# a model trained, rebuilt and run with the focal head


@pytest.mark.slow
def test_a_tiny_model_with_the_focal_head_trains_on_a_fixed_batch():
    """60 steps at lr 1e-3: the loss falls by well over a quarter."""
    model, criterion, _ = build_tiny(cls_loss="focal", dropout=0.0, drop_path=0.0)
    assert_trains_on_tiny_batch(model, criterion)


def test_a_focal_checkpoint_rebuilds_with_its_head_from_the_file_alone(tmp_path):
    model = build_tiny(cls_loss="focal")[0].eval()
    # num_classes unsaved: the focal head reads K from the K logits of the class head.
    save_checkpoint(tmp_path / "c.pth", model, tiny_model_args(cls_loss="focal", num_classes=None))
    rebuilt, postprocess, args = options.rebuild_model(str(tmp_path / "c.pth"))
    assert args.cls_loss == "focal" and args.num_classes == NUM_CLASSES
    assert isinstance(rebuilt.class_head, FocalClassification)
    assert isinstance(postprocess.class_head, FocalClassification)
    images, _ = tiny_batch()
    with torch.no_grad():
        out, expected = rebuilt(images), model(images)
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], atol=0, rtol=0)
    (result, _) = postprocess(out, torch.tensor([[64, 96], [48, 64]]))
    assert len(result["scores"]) == QUERIES  # k = Q (query, class) pairs


@pytest.mark.slow
def test_predict_runs_a_focal_checkpoint_and_draws_each_detections_query(tmp_path):
    model = build_tiny(cls_loss="focal")[0].eval()
    save_checkpoint(tmp_path / "c.pth", model, tiny_model_args(cls_loss="focal"))
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(48, 64), (64, 40)]):
        pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{i}.png")
    argv = [
        str(images), "--resume", str(tmp_path / "c.pth"), "--json", str(tmp_path / "out.json"),
        "--attention", str(tmp_path / "attention"), "--score_threshold", "0",
        "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip
    parser = argparse.ArgumentParser(parents=[predict.get_args_parser()])
    assert predict.main(parser.parse_args(argv)) == []
    records = json.loads((tmp_path / "out.json").read_text())
    assert len(records) == 2 * QUERIES
    assert all(0 <= r["category_id"] < NUM_CLASSES for r in records)
    for i in range(2):
        assert (tmp_path / "attention" / f"{i}_decoder.png").is_file()


@pytest.mark.slow
def test_main_trains_and_evaluates_a_focal_model_with_and_without_nms(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1", "--cls_loss", "focal"))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss_ce"]) and math.isfinite(record["test_loss_ce"])
    evaluation = tmp_path / "eval"  # the head comes from the checkpoint
    argv = ["--eval", "--resume", str(out / "checkpoint.pth"), "--eval_nms_iou", "0.5"]
    run_main(tiny_argv(data, evaluation, *argv))
    log = (evaluation / "out.log").read_text()
    assert "coco_AP50" in log and "coco_nms_AP50" in log and "--cls_loss focal" in log


# DETR's softmax convention stays the default and unchanged


def test_softmax_is_the_default_convention():
    assert options.parse([]).cls_loss == "softmax" == next(iter(CLASS_HEADS))
    head = build_class_head()
    assert isinstance(head, SoftmaxClassification) and head.eos_coef == 0.1
    assert build_class_head("softmax", eos_coef=0.3, focal_alpha=0.5).eos_coef == 0.3
    focal = build_class_head("focal", eos_coef=0.3, focal_alpha=0.5, focal_gamma=1.0)
    assert (focal.alpha, focal.gamma) == (0.5, 1.0)
    model = build_tiny()[0]
    assert isinstance(model.class_head, SoftmaxClassification)
    assert model.class_embed.weight.shape == (NUM_CLASSES + 1, HIDDEN)


def test_the_softmax_convention_computes_exactly_what_detr_computes():
    """The expressions of DETR's matcher, loss_labels and PostProcess, bit for bit."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, NUM_CLASSES + 1, generator=g)
    boxes = torch.rand(2, 4, 4, generator=g)
    labels = torch.tensor([2, 0, 1])
    head = SoftmaxClassification(0.1)
    flat = logits.flatten(0, 1)
    assert torch.equal(head.matching_cost(flat, labels), -flat.softmax(-1)[:, labels])
    matched = (torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2]))
    target_classes = torch.full((2, 4), NUM_CLASSES, dtype=torch.int64)
    target_classes[matched] = labels
    weight = torch.ones(NUM_CLASSES + 1)
    weight[-1] = 0.1
    expected = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum")
    assert torch.equal(head.loss(logits, matched, labels), expected)
    assert head.loss_normalizer(8, 3, 3) == 3 + 0.1 * 5
    scores, classes, kept, queries = head.detections(logits, boxes)
    expected_scores, expected_classes = logits.softmax(-1)[..., :-1].max(-1)
    assert torch.equal(scores, expected_scores) and torch.equal(classes, expected_classes)
    assert kept is boxes and queries.tolist() == [[0, 1, 2, 3]] * 2
    assert torch.equal(head.is_object(logits), logits.argmax(-1) != NUM_CLASSES)
