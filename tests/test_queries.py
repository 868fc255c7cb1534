"""The training aids of DETR (models/aids/): all off being today's DETR, query groups (with
learned and with anchor queries), every aid together in training, the flags and the checkpoints
that rebuild a model trained with them.

Anchor queries have their own tests in tests/test_anchors.py, denoising queries in
tests/test_denoising.py.
"""

import json
import math

import pytest
import torch
from torch import nn

import hubconf
import options
import predict
from run_with_submitit import get_args_parser as launcher_parser
from run_with_submitit import plan_runs
from tests.conftest import (
    HIDDEN,
    QUERIES,
    TINY_DATA_FLAGS,
    assert_trains_on_tiny_batch,
    build_tiny,
    run_main,
    save_checkpoint,
    tiny_argv,
    tiny_batch,
    tiny_model_args,
    to_device,
)
from util.errors import UserError
from util.misc import pad_images

ALL_SWITCHES = {"query_groups": 2, "anchor_queries": True, "dn_groups": 2}
TODAYS_HEAD_KEYS = {
    "input_proj.weight", "input_proj.bias", "query_embed.weight", "class_embed.weight",
    "class_embed.bias",
    *(f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")),
}  # fmt: skip


def deterministic(**switches):
    """The tiny model with no dropout or stochastic depth, so that train mode is repeatable."""
    return build_tiny(dropout=0.0, drop_path=0.0, **switches)


def todays_forward(model, images) -> dict:
    """DETR.forward as it was before the switches: learned queries, zero targets, no mask."""
    images, mask = pad_images(images, model.size_divisibility)
    features, mask, pos = model.backbone(images, mask)[-1]
    src = nn.Linear.forward(model.input_proj, features.flatten(2).transpose(1, 2))
    query_pos = model.query_embed.weight.unsqueeze(0).expand(src.shape[0], -1, -1)
    hs, _ = model.transformer(
        src, mask.flatten(1), query_pos, pos.flatten(2).transpose(1, 2),
        tgt=torch.zeros_like(query_pos),
    )  # fmt: skip
    return model.predict(hs)


def assert_equal_sets(a: dict, b: dict, atol: float = 0.0) -> None:
    """The same prediction sets (pred_logits, pred_boxes and every aux_outputs entry)."""
    pairs = zip([a, *a.get("aux_outputs", [])], [b, *b.get("aux_outputs", [])], strict=True)
    for one, other in pairs:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(one[key], other[key], atol=atol, rtol=0)


def without_loss_weight(predictions: dict) -> dict:
    stripped = {k: v for k, v in predictions.items() if k not in ("loss_weight", "group_outputs")}
    if "aux_outputs" in stripped:
        stripped["aux_outputs"] = [without_loss_weight(a) for a in stripped["aux_outputs"]]
    return stripped


# all switches off


def test_with_every_switch_off_the_model_is_todays_detr():
    model = build_tiny()[0]
    keys = {k for k in model.state_dict() if not k.startswith(("backbone.", "transformer."))}
    assert keys == TODAYS_HEAD_KEYS
    assert model.query_embed.weight.shape == (QUERIES, HIDDEN)
    images, targets = tiny_batch()
    for train in (True, False):  # dropout and stochastic depth draw the same numbers
        model.train(train)
        with torch.no_grad():
            torch.manual_seed(0)
            out = model(images, targets=targets)
            torch.manual_seed(0)
            expected = todays_forward(model, images)
        assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
        assert_equal_sets(out, expected)


# query groups


@pytest.mark.parametrize("anchor_queries", [False, True])
def test_perturbing_the_queries_of_group_1_leaves_group_0_unchanged(anchor_queries):
    model = deterministic(query_groups=3, anchor_queries=anchor_queries)[0].train()
    images, _ = tiny_batch()
    queries = model.aids["anchors"].anchors if anchor_queries else model.query_embed
    with torch.no_grad():
        before = model(images)
        queries.weight[QUERIES : 2 * QUERIES] += 1.0
        after = model(images)
    assert len(after["group_outputs"]) == 2
    assert_equal_sets(without_loss_weight(after), without_loss_weight(before), atol=1e-6)
    changed = after["group_outputs"][0]["pred_boxes"] - before["group_outputs"][0]["pred_boxes"]
    assert changed.abs().max() > 1e-3  # group 1 itself did change


@pytest.mark.parametrize("anchor_queries", [False, True])
def test_in_eval_mode_a_grouped_model_is_the_plain_model_with_group_0s_weights(anchor_queries):
    grouped = build_tiny(query_groups=3, anchor_queries=anchor_queries)[0].eval()
    plain = build_tiny(seed=1, anchor_queries=anchor_queries)[0].eval()
    state = grouped.state_dict()
    key = "aids.anchors.anchors.weight" if anchor_queries else "query_embed.weight"
    assert state[key].shape[0] == 3 * QUERIES
    state[key] = state[key][:QUERIES]
    plain.load_state_dict(state)
    images, _ = tiny_batch()
    with torch.no_grad():
        out, expected = grouped(images), plain(images)
    assert set(out) == set(expected) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert_equal_sets(out, expected)


def test_the_loss_of_a_grouped_model_is_the_mean_of_each_groups_own_set_loss():
    model, criterion, _ = deterministic(query_groups=2)
    images, targets = tiny_batch()
    out = model(images)
    losses = criterion(out, targets)
    assert {"loss_ce_group_0", "loss_bbox_group_0", "loss_giou_group_0_0"} <= set(losses)
    groups = [without_loss_weight(out), without_loss_weight(out["group_outputs"][0])]
    alone = [criterion.weighted_total(criterion(group, targets)) for group in groups]
    torch.testing.assert_close(criterion.weighted_total(losses), (alone[0] + alone[1]) / 2)


# training, flags, checkpoints

TRAINING = [
    pytest.param({"query_groups": 3}, id="query_groups", marks=pytest.mark.slow),
    pytest.param({"anchor_queries": True}, id="anchor_queries", marks=pytest.mark.slow),
    pytest.param({"anchor_queries": True, "dn_groups": 2}, id="dn_groups", marks=pytest.mark.slow),
    pytest.param(ALL_SWITCHES, id="all", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("switches", TRAINING)
def test_each_switch_and_all_together_train_on_a_fixed_batch(switches):
    """60 steps at lr 1e-3: the loss falls by well over a quarter (by half or more, seen)."""
    model, criterion, _ = deterministic(**switches)
    assert_trains_on_tiny_batch(model, criterion)


def test_every_parameter_of_every_switch_gets_a_finite_gradient(device):
    model, criterion, _ = build_tiny(**ALL_SWITCHES)
    model.to(device)
    images, targets = to_device(*tiny_batch(), device)
    criterion.weighted_total(criterion(model(images, targets=targets), targets)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.slow
def test_main_trains_logs_and_evaluates_with_every_switch(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    switches = ["--query_groups", "2", "--anchor_queries", "--dn_groups", "2"]
    run_main(tiny_argv(data, out, "--epochs", "1", "--enc_layers", "2", *switches))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for key in ("train_loss_ce_dn", "train_loss_giou_dn_0", "train_loss_ce_group_0", "test_loss"):
        assert math.isfinite(record[key]), key
    assert "test_loss_ce_dn" not in record and "test_loss_ce_group_0" not in record
    saved = json.loads((out / "args.json").read_text())
    assert (saved["query_groups"], saved["anchor_queries"], saved["dn_groups"]) == (2, True, 2)
    # The data flags alone: the architecture (a non-default --enc_layers, every aid) comes
    # from the checkpoint, and the evaluation reproduces the training run's.
    evaluation = tmp_path / "eval"
    data_flags = [*TINY_DATA_FLAGS, "--coco_path", str(data), "--num_workers", "0"]
    run_main([*data_flags, "--output_dir", str(evaluation), "--eval", "--resume",
              str(out / "checkpoint.pth")])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert "--anchor_queries True: taken from" in log and "--enc_layers 2: taken from" in log
    evaluated = json.loads(
        log.split(f"evaluation of {out / 'checkpoint.pth'}: ")[1].splitlines()[0]
    )
    assert evaluated["coco_AP"] == record["test_coco_AP"]
    assert evaluated["coco_AP50"] == record["test_coco_AP50"]


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_data_is_built(tmp_path):
    model = build_tiny(query_groups=2)[0]
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, model, tiny_model_args(query_groups=3))  # saved flags do not fit
    data = tmp_path / "data"
    with pytest.raises(UserError, match="query_embed.weight: file .10, 32. vs model .15, 32."):
        run_main([*TINY_DATA_FLAGS, "--coco_path", str(data), "--eval", "--resume", str(path)])
    assert not data.exists()  # refused before the built-in set was generated


def test_eval_and_resume_take_the_switches_from_the_checkpoint():
    argv = ["--eval", "--resume", "run/checkpoint.pth"]
    flags = ["--query_groups", "2", "--anchor_queries", "--dn_groups", "2", "--dn_box_noise", ".1"]
    saved = {"args": vars(options.parse(flags))}
    adopted = options.adopt_checkpoint_flags(options.parse(argv), saved)
    assert (adopted.query_groups, adopted.anchor_queries, adopted.dn_groups) == (2, True, 2)
    assert adopted.dn_box_noise == 0.1 and adopted.resume == "run/checkpoint.pth"
    given = options.adopt_checkpoint_flags(options.parse([*argv, "--query_groups", "2"]), saved)
    assert given.query_groups == 2 and given.anchor_queries
    with pytest.raises(UserError, match="--query_groups 3: --resume run/checkpoint.pth was trained "
                       "with --query_groups 2"):  # fmt: skip
        options.adopt_checkpoint_flags(options.parse([*argv, "--query_groups", "3"]), saved)
    plain = options.parse(argv)  # no saved flags (an official DETR file), or no --resume: as given
    assert options.adopt_checkpoint_flags(plain, {"model": {}}) is plain
    fresh = options.parse(["--output_dir", "run"])
    assert options.adopt_checkpoint_flags(fresh, saved) is fresh


def test_predict_rebuilds_a_model_trained_with_every_switch(tmp_path):
    model = build_tiny(**ALL_SWITCHES)[0].eval()
    save_checkpoint(tmp_path / "checkpoint.pth", model, tiny_model_args(**ALL_SWITCHES))
    rebuilt, args = predict.load_model(str(tmp_path / "checkpoint.pth"), torch.device("cpu"))
    assert (args.query_groups, args.anchor_queries, args.dn_groups) == (2, True, 2)
    images, _ = tiny_batch()
    with torch.no_grad():
        assert_equal_sets(rebuilt(images), model(images))


def test_torch_hub_rebuilds_a_model_trained_with_every_switch_from_the_checkpoint_alone(tmp_path):
    model = build_tiny(**ALL_SWITCHES)[0].eval()
    save_checkpoint(tmp_path / "checkpoint.pth", model, tiny_model_args(**ALL_SWITCHES))
    loaded, postprocess = hubconf.detr_from_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert not loaded.training and postprocess.class_head.name == model.class_head.name
    images, _ = tiny_batch()
    with torch.no_grad():
        assert_equal_sets(loaded(images), model(images))


def test_the_flags_reach_the_model_and_bad_combinations_are_refused():
    argv = ["--query_groups", "2", "--anchor_queries", "--dn_groups", "3", "--dn_box_noise", "1"]
    args = options.parse(argv)
    model = build_tiny(**{k: getattr(args, k) for k in ("query_groups", "anchor_queries")})[0]
    assert model.aids["anchors"].anchors.weight.shape == (2 * QUERIES, 4)
    options.check_args(args)
    for bad, message in [
        (["--dn_groups", "2"], "--anchor_queries"),
        (["--query_groups", "0"], "--query_groups"),
        (["--anchor_queries", "--dn_groups", "1", "--dn_label_noise", "2"], "probability"),
    ]:
        with pytest.raises(SystemExit, match=message):
            options.check_args(options.parse(bad))


def test_a_sweep_varies_the_switches_like_any_flag(tmp_path):
    args = launcher_parser().parse_args(
        ["--output_dir", str(tmp_path), "--job_dir", str(tmp_path / "jobs"), "--sweep",
         "query_groups=1,3", "anchor_queries=false,true"]
    )  # fmt: skip
    runs = plan_runs(args)
    assert [(r.query_groups, r.anchor_queries) for r in runs] == [
        (1, False), (1, True), (3, False), (3, True)
    ]  # fmt: skip
