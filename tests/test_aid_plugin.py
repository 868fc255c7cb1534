"""The plug-in contract of the training aids: an aid written in one file (here, this test file)
and listed in ``models.aids.AIDS`` gets its flags on main.py's command line, trains through
main.py, is saved with its flags and rebuilt from the checkpoint alone, and runs no query at
evaluation; no other file of the repository changes."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

import models.aids
import options
from models.aids.base import Aid, DetectorSpec, Queries, QueryBlock
from tests.conftest import QUERIES, run_main, tiny_argv


class ToyQueries(Aid):
    """M extra learned queries, matched to the image's targets on their own (training only)."""

    name = "toy"

    def __init__(self, count: int, d_model: int):
        super().__init__()
        self.queries = nn.Embedding(count, d_model)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--toy_queries", default=0, type=int, help="extra matched queries")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.toy_queries > 0

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.toy_queries < 0:
            raise ValueError(f"--toy_queries {args.toy_queries}: pass 0 or more")

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "ToyQueries":
        return cls(args.toy_queries, spec.hidden_dim)

    def training_blocks(self, pool: Queries, num_queries: int, targets) -> list[QueryBlock]:
        position = self.queries.weight.expand(pool.content.shape[0], -1, -1)
        return [QueryBlock(self.name, Queries(torch.zeros_like(position), position))]


@pytest.fixture
def with_toy_aid(monkeypatch):
    monkeypatch.setattr(models.aids, "AIDS", (*models.aids.AIDS, ToyQueries))


def test_an_aid_declares_its_flags_and_its_checks(with_toy_aid):
    assert options.parse(["--toy_queries", "3"]).toy_queries == 3
    assert "toy_queries" in options.checkpoint_flags()
    with pytest.raises(SystemExit, match="--toy_queries -1"):
        options.check_args(options.parse(["--toy_queries", "-1"]))


@pytest.mark.slow
def test_an_aid_in_one_file_trains_through_main_and_its_checkpoint_rebuilds_it(
    with_toy_aid, tmp_path
):
    data, out = tmp_path / "data", tmp_path / "run"
    run_main(tiny_argv(data, out, "--epochs", "1", "--toy_queries", "4"))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for key in ("train_loss_ce_toy", "train_loss_giou_toy_0", "test_coco_AP"):
        assert math.isfinite(record[key]), key
    assert "test_loss_ce_toy" not in record  # evaluation runs no toy query
    assert json.loads((out / "args.json").read_text())["toy_queries"] == 4

    model, _, args = options.rebuild_model(str(out / "checkpoint.pth"))
    assert args.toy_queries == 4 and model.aids["toy"].queries.weight.shape[0] == 4
    with torch.no_grad():
        outputs = model([torch.zeros(3, 64, 64)])
    assert outputs["pred_logits"].shape[1] == QUERIES and "toy_outputs" not in outputs

    evaluation = tmp_path / "eval"  # the data flags alone: the aid comes from the checkpoint
    data_flags = tiny_argv(data, evaluation)[: tiny_argv(data, evaluation).index("--backbone")]
    run_main([*data_flags, "--eval", "--resume", str(out / "checkpoint.pth"), "--num_workers", "0",
              "--output_dir", str(evaluation)])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert "--toy_queries 4: taken from" in log and "coco_AP50" in log
