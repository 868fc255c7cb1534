"""A run's results depend on its seed alone: not on the number of loader workers, nor on whether
an evaluation ran between two epochs (the model's dropout and stochastic depth draw from the
global generator, which neither loader touches)."""

import json

import pytest

from tests.conftest import run_main, tiny_argv


def train_records(out) -> list[dict]:
    """Each epoch's training terms (the log without the evaluation's and the time)."""
    lines = (out / "log.txt").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k.startswith("train_")} for line in lines]


def full_records(out) -> list[dict]:
    lines = (out / "log.txt").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


@pytest.mark.slow
def test_the_log_is_the_same_with_0_and_2_loader_workers(tmp_path):
    """Two epochs with dropout and stochastic depth on: every logged number equal, the
    evaluation after each epoch included."""
    outs = [tmp_path / f"workers_{n}" for n in (0, 2)]
    for n, out in zip((0, 2), outs, strict=True):
        run_main(tiny_argv(tmp_path / "data", out, "--epochs", "2", "--num_workers", str(n)))
    first, second = (full_records(out) for out in outs)
    assert len(first) == 2 and "test_coco_AP" in first[0]
    assert first == second


@pytest.mark.slow
def test_an_evaluation_between_epochs_leaves_the_next_epoch_unchanged(tmp_path):
    with_eval, without = tmp_path / "every_epoch", tmp_path / "last_epoch"
    data = tmp_path / "data"
    run_main(tiny_argv(data, with_eval, "--epochs", "2", "--eval_every", "1"))
    run_main(tiny_argv(data, without, "--epochs", "2", "--eval_every", "2"))
    assert "test_coco_AP" in full_records(with_eval)[0]
    assert "test_coco_AP" not in full_records(without)[0]
    assert train_records(with_eval) == train_records(without)
