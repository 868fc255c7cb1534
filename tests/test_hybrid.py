"""Hybrid matching (models/aids/hybrid.py, H-DETR): the one-to-many queries are isolated from the
matching queries, scored against the targets repeated K times with their own weight, absent at
evaluation, and train alone and with the other switches, through main.py too."""

import json
import math

import pytest
import torch

import options
from models.aids.base import Queries
from models.aids.hybrid import HybridMatching, repeated_targets
from tests.conftest import (
    NUM_CLASSES,
    QUERIES,
    TINY_DATA_FLAGS,
    assert_trains_on_tiny_batch,
    build_tiny,
    run_main,
    tiny_argv,
    tiny_batch,
    to_device,
)

M, K = 12, 3  # the tiny batch has at most 2 objects an image: 6 repeated targets for 12 queries
HYBRID = {"one_to_many_queries": M, "one_to_many_k": K}
SETS = ("pred_logits", "pred_boxes")


def deterministic(**switches):
    """The tiny model with no dropout or stochastic depth, so that train mode is repeatable."""
    return build_tiny(dropout=0.0, drop_path=0.0, **switches)


def assert_equal_sets(a: dict, b: dict, atol: float = 0.0) -> None:
    """The same prediction sets (pred_logits, pred_boxes and every aux_outputs entry)."""
    pairs = zip([a, *a.get("aux_outputs", [])], [b, *b.get("aux_outputs", [])], strict=True)
    for one, other in pairs:
        for key in SETS:
            torch.testing.assert_close(one[key], other[key], atol=atol, rtol=0)


def change(a: dict, b: dict) -> float:
    return (a["pred_boxes"] - b["pred_boxes"]).abs().max().item()


def bare(predictions: dict) -> dict:
    """A prediction set without what its block gives the criterion (targets, loss_weight)."""
    return {k: predictions[k] for k in SETS} | {
        "aux_outputs": [{k: aux[k] for k in SETS} for aux in predictions["aux_outputs"]]
    }


def no_objects() -> dict:
    return {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


@pytest.mark.parametrize("anchor_queries", [False, True])
def test_the_one_to_one_and_one_to_many_queries_do_not_see_each_other(anchor_queries):
    model = deterministic(**HYBRID, anchor_queries=anchor_queries)[0].train()
    queries = model.aids["anchors"].anchors if anchor_queries else model.query_embed
    assert queries.weight.shape[0] == QUERIES + M  # the one-to-many queries come after
    images, targets = tiny_batch()
    with torch.no_grad():
        before = model(images, targets=targets)
        queries.weight[QUERIES:] += 1.0  # the one-to-many queries
        after = model(images, targets=targets)
        queries.weight[:QUERIES] += 1.0  # the matching queries
        last = model(images, targets=targets)
    assert_equal_sets(after, before, atol=1e-6)
    assert change(after["one_to_many_outputs"], before["one_to_many_outputs"]) > 1e-3
    assert_equal_sets(last["one_to_many_outputs"], after["one_to_many_outputs"], atol=1e-6)
    assert change(last, after) > 1e-3


def test_evaluation_runs_no_one_to_many_query_and_is_the_plain_model():
    hybrid = build_tiny(**HYBRID)[0].eval()
    plain = build_tiny(seed=1)[0].eval()
    state = hybrid.state_dict()
    state["query_embed.weight"] = state["query_embed.weight"][:QUERIES]
    plain.load_state_dict(state)  # no other parameter: the one-to-many queries are embed rows
    decoded = []
    hybrid.transformer.decoder.layers[0].register_forward_hook(
        lambda module, args, out: decoded.append(out.shape[1])
    )
    images, targets = tiny_batch()
    with torch.no_grad():
        out, expected = hybrid(images), plain(images)
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert decoded == [QUERIES]
    assert_equal_sets(out, expected)
    hybrid.train()
    with torch.no_grad():
        hybrid(images, targets=targets)
    assert decoded[-1] == QUERIES + M


def test_the_block_is_matched_to_each_images_targets_repeated_k_times():
    model, criterion, _ = deterministic(**HYBRID)
    images, targets = tiny_batch()
    block = model(images, targets=targets)["one_to_many_outputs"]
    assert block["pred_logits"].shape == (2, M, NUM_CLASSES + 1)
    for repeated, target in zip(block["targets"], targets, strict=True):
        assert repeated["labels"].tolist() == target["labels"].tolist() * K
        assert torch.equal(repeated["boxes"], target["boxes"].repeat(K, 1))
    assert all(aux["targets"] is block["targets"] for aux in block["aux_outputs"])
    assert "loss_weight" not in block  # weight 1
    indices = criterion.matcher(block, block["targets"])
    for (queries, objects), target in zip(indices, targets, strict=True):
        count = len(target["labels"])  # each object gets K distinct queries
        assert len(set(queries.tolist())) == len(queries) == K * count
        assert sorted((objects % count).tolist()) == sorted(list(range(count)) * K)


def test_repeated_targets_keep_the_other_keys_and_leave_the_targets_unchanged():
    _, targets = tiny_batch()
    targets[0]["image_id"] = torch.tensor(7)
    repeated = repeated_targets(targets, 2)
    assert repeated[0]["image_id"] is targets[0]["image_id"]
    assert len(repeated[1]["labels"]) == 4 and len(targets[1]["labels"]) == 2
    assert len(repeated_targets([no_objects()], 6)[0]["boxes"]) == 0


@pytest.mark.parametrize("cls_loss", ["softmax", "focal"])
def test_the_one_to_many_terms_are_the_set_loss_on_the_repeated_targets_times_the_weight(cls_loss):
    model, criterion, _ = deterministic(**HYBRID, one_to_many_weight=0.5, cls_loss=cls_loss)
    images, targets = tiny_batch()
    out = model(images, targets=targets)
    losses = criterion(out, targets)
    block = out["one_to_many_outputs"]
    alone = criterion(bare(block), repeated_targets(targets, K))
    for term, suffix in [("loss_ce", ""), ("loss_bbox", ""), ("loss_giou", ""), ("loss_ce", "_0")]:
        torch.testing.assert_close(
            losses[f"{term}_one_to_many{suffix}"], 0.5 * alone[term + suffix]
        )
    assert "loss_ce_one_to_many_1" not in losses  # one auxiliary layer in the tiny decoder


@pytest.mark.parametrize("cls_loss", ["softmax", "focal"])
def test_the_loss_is_finite_for_images_without_objects(cls_loss):
    model, criterion, _ = deterministic(**HYBRID, cls_loss=cls_loss)
    images, targets = tiny_batch()
    for batch_targets in ([no_objects(), targets[1]], [no_objects(), no_objects()]):
        model.zero_grad()
        losses = criterion(model(images, targets=batch_targets), batch_targets)
        assert all(math.isfinite(v.item()) for v in losses.values())
        criterion.weighted_total(losses).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "switches",
    [{}, {"anchor_queries": True, "dn_groups": 2, "query_groups": 2, "cls_loss": "focal"}],
    ids=["alone", "with_every_switch"],
)
def test_every_parameter_gets_a_finite_gradient(switches, device):
    model, criterion, _ = build_tiny(**HYBRID, **switches)
    model.to(device)
    images, targets = to_device(*tiny_batch(), device)
    out = model(images, targets=targets)
    criterion.weighted_total(criterion(out, targets)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    queries = model.aids["anchors"].anchors if "anchor_queries" in switches else model.query_embed
    assert queries.weight.grad[-M:].abs().sum() > 0  # the one-to-many queries learn


def test_the_flags_reach_the_aid_and_bad_values_are_refused():
    args = options.parse(["--one_to_many_queries", "30"])
    assert (args.one_to_many_k, args.one_to_many_weight) == (6, 1.0)  # H-DETR's K and lambda
    assert not HybridMatching.enabled(options.parse([]))
    options.check_args(args)
    for bad in (
        ["--one_to_many_queries", "-1"],
        ["--one_to_many_queries", "4", "--one_to_many_k", "0"],
        ["--one_to_many_queries", "4", "--one_to_many_weight", "-1"],
    ):
        with pytest.raises(SystemExit, match="--one_to_many_queries .* --one_to_many_k"):
            options.check_args(options.parse(bad))
    aid = HybridMatching(4, k=2)
    pool = Queries(torch.zeros(1, 9, 8), torch.arange(9.0)[None, :, None].expand(1, 9, 8))
    (block,) = aid.training_blocks(pool, 5, [no_objects()])
    assert block.queries.position[0, :, 0].tolist() == [5.0, 6.0, 7.0, 8.0]  # the pool's last
    assert (block.attention_groups, block.sees_matching, block.indices) == (1, False, None)
    with pytest.raises(ValueError, match="targets=targets"):
        aid.training_blocks(pool, 5, None)


# training

TRAINING = [
    pytest.param({}, id="alone", marks=pytest.mark.slow),
    pytest.param({"cls_loss": "focal"}, id="focal", marks=pytest.mark.slow),
    pytest.param({"query_groups": 2}, id="query_groups", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("switches", TRAINING)
def test_a_tiny_model_trains_on_a_fixed_batch(switches):
    """60 steps at lr 1e-3: the loss falls by well over a quarter."""
    model, criterion, _ = deterministic(**HYBRID, **switches)
    assert_trains_on_tiny_batch(model, criterion)


@pytest.mark.slow
def test_main_trains_with_it_and_evaluates_the_checkpoint_from_the_data_flags_alone(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    switches = ["--one_to_many_queries", str(M), "--one_to_many_k", "2"]
    run_main(tiny_argv(data, out, "--epochs", "1", *switches))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for key in ("train_loss_ce_one_to_many", "train_loss_giou_one_to_many_0", "test_loss"):
        assert math.isfinite(record[key]), key
    assert not any("one_to_many" in key for key in record if key.startswith("test_"))
    evaluation = tmp_path / "eval"
    data_flags = [*TINY_DATA_FLAGS, "--coco_path", str(data), "--num_workers", "0"]
    run_main([*data_flags, "--output_dir", str(evaluation), "--eval", "--resume",
              str(out / "checkpoint.pth")])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert f"--one_to_many_queries {M}: taken from" in log
    evaluated = json.loads(
        log.split(f"evaluation of {out / 'checkpoint.pth'}: ")[1].splitlines()[0]
    )
    assert evaluated["coco_AP50"] == record["test_coco_AP50"]
