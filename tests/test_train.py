"""End-to-end training runs on a tiny built-in dataset: resume, distributed, overfitting."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

import datasets
import options
from datasets.coco_eval import CocoEvaluator
from datasets.collate import collate_fn
from datasets.transforms import eval_transforms
from engine import evaluate, train_one_epoch
from models import build_model
from models.criterion import SetCriterion
from tests.conftest import REPO, assert_same_weights, run_main, saved_weights, tiny_argv
from util.errors import UserError

pytestmark = pytest.mark.slow


def test_resume_continues_exactly(tmp_path):
    data = tmp_path / "data"
    # Dropout, stochastic depth and flips all draw random numbers: resume must restore them.
    common = ["--dropout", "0.1", "--drop_path", "0.1", "--lr_drop", "1"]
    run_main(tiny_argv(data, tmp_path / "straight", "--epochs", "2", *common))
    run_main(tiny_argv(data, tmp_path / "resumed", "--epochs", "1", *common))
    first = saved_weights(tmp_path / "resumed")
    run_main(
        tiny_argv(
            data,
            tmp_path / "resumed",
            "--epochs",
            "2",
            *common,
            "--resume",
            str(tmp_path / "resumed" / "checkpoint.pth"),
        )
    )
    straight, resumed = saved_weights(tmp_path / "straight"), saved_weights(tmp_path / "resumed")
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # epoch 2 did train
    assert_same_weights(straight, resumed)
    # A copy was kept before the LR drop, and the log has one line per epoch.
    assert (tmp_path / "straight" / "checkpoint0000.pth").is_file()
    lines = (tmp_path / "resumed" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 0


def test_resuming_a_finished_run_does_nothing(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1"))
    before = (out / "checkpoint.pth").read_bytes()
    run_main(tiny_argv(data, out, "--epochs", "1", "--resume", str(out / "checkpoint.pth")))
    assert "nothing to do" in (out / "out.log").read_text()
    assert (out / "checkpoint.pth").read_bytes() == before


def test_eval_of_a_checkpoint_reports_coco_metrics_and_draws_legibly(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1"))
    resume = ["--resume", str(out / "checkpoint.pth")]
    run_main(tiny_argv(data, tmp_path / "eval", "--eval", *resume, "--render", "2"))
    assert "coco_AP50" in (tmp_path / "eval" / "out.log").read_text()
    drawings = sorted((tmp_path / "eval" / "predictions").glob("*.png"))
    assert len(drawings) == 2
    assert all(Image.open(png).size == (512, 512) for png in drawings)  # 64 px images, 8 times


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_two_processes_agree_with_one(tmp_path):
    data = tmp_path / "data"
    common = ["--epochs", "1", "--dropout", "0", "--drop_path", "0", "--seed", "3"]
    run_main(tiny_argv(data, tmp_path / "single", *common))  # also generates the data set
    argv = tiny_argv(data, tmp_path / "double", *common)
    argv[argv.index("--batch_size") + 1] = "1"  # same global batch of 2
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--standalone", str(REPO / "main.py"), *argv],
        check=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert_same_weights(
        saved_weights(tmp_path / "single"), saved_weights(tmp_path / "double"), atol=1e-5
    )


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1"))
    saved = (out / "checkpoint.pth").read_bytes()

    forward = SetCriterion.forward
    calls = {"train": 0}

    def poisoned(self, outputs, targets):
        losses = forward(self, outputs, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 3:  # the third training iteration of the resumed run
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    resume = ["--resume", str(out / "checkpoint.pth")]
    with pytest.raises(FloatingPointError, match=r"epoch 1, iteration 2: loss_giou=nan"):
        run_main(tiny_argv(data, out, "--epochs", "2", *resume))
    assert (out / "checkpoint.pth").read_bytes() == saved


def test_starting_over_an_existing_run_is_refused(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1"))
    with pytest.raises(UserError, match="--resume"):
        run_main(tiny_argv(data, out, "--epochs", "2"))


def test_class_ids_beyond_num_classes_are_reported(tmp_path):
    with pytest.raises(UserError, match="--num_classes"):
        run_main(tiny_argv(tmp_path / "data", tmp_path / "run", "--num_classes", "2"))


def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    """Training lowers the loss and reaches a high AP on the images it trained on."""
    torch.manual_seed(0)
    argv = tiny_argv(
        tmp_path / "data",
        tmp_path / "run",
        "--num_classes",
        "3",
        "--dropout",
        "0",
        "--drop_path",
        "0",
        "--hidden_dim",
        "64",
        "--nheads",
        "4",
        "--dim_feedforward",
        "128",
        "--shapes_train",
        "4",
        "--shapes_empty",
        "0",
    )
    args = options.parse(argv)
    train_set = datasets.build_dataset("train", args)
    eval_set = datasets.build_dataset("train", args)
    eval_set.transforms = eval_transforms(size=64, max_size=64)  # the same 4 images, unflipped
    model, criterion, postprocessors = build_model(args)
    iterations = 300
    sampler = RandomSampler(train_set, replacement=True, num_samples=4 * iterations)
    loader = DataLoader(train_set, batch_size=4, sampler=sampler, collate_fn=collate_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / 20))
    cpu = torch.device("cpu")
    evaluate_now = lambda: evaluate(  # noqa: E731
        model, criterion, postprocessors["bbox"],
        DataLoader(eval_set, batch_size=4, collate_fn=collate_fn),
        {"coco": CocoEvaluator(datasets.get_coco_api(eval_set))}, cpu, progress=False,
    )  # fmt: skip
    before = evaluate_now()
    train_one_epoch(model, criterion, loader, optimizer, warmup, cpu, 0, 0.1, progress=False)
    after = evaluate_now()
    # AP50 on 4 images moves in steps of one box (about 0.17): ask for a clear rise, not a value.
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["coco_AP50"] > before["coco_AP50"] + 0.35, (before, after)


@pytest.mark.parametrize("num_classes", [3, 5])
def test_finetune_starts_a_new_run_from_trained_weights(tmp_path, num_classes):
    """--finetune loads the weights at epoch 0; the class head is kept only if its size fits."""
    data = tmp_path / "data"
    run_main(tiny_argv(data, tmp_path / "source", "--epochs", "1"))
    source = saved_weights(tmp_path / "source")
    new = tmp_path / "new"
    finetune = ["--finetune", str(tmp_path / "source" / "checkpoint.pth")]
    run_main(tiny_argv(data, new, "--epochs", "1", "--lr", "0", "--lr_backbone", "0",
                  "--num_classes", str(num_classes), *finetune))  # fmt: skip
    loaded = saved_weights(new)
    assert [json.loads(line)["epoch"] for line in (new / "log.txt").read_text().splitlines()] == [0]
    for key in ("transformer.decoder.norm.weight", "query_embed.weight", "input_proj.weight"):
        assert torch.equal(loaded[key], source[key]), key
    head, source_head = loaded["class_embed.weight"], source["class_embed.weight"]
    kept = head.shape == source_head.shape and torch.equal(head, source_head)
    assert kept == (num_classes == 3)  # the source has 2 shape classes: ids 1, 2
