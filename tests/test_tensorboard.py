"""main.py --tensorboard: the training scalars every --print_freq steps, the COCO AP metrics and
drawn predictions after every evaluation, each step once across interruptions and resumes, and
only the main process writes."""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest
import torch

from models.criterion import SetCriterion
from tests.conftest import DEC, REPO, assert_same_weights, run_main, saved_weights, tiny_argv
from util.errors import UserError
from util.preemption import Interrupted

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator

PER_EPOCH = 4  # 8 training images, 2 per batch
TENSORBOARD = ["--epochs", "2", "--tensorboard", "--print_freq", "2", "--render", "2"]
TRAIN_STEPS = [0, 2, 4, 6]  # every second step of 2 epochs of 4
EVAL_STEPS = [3, 7]  # the last step of each epoch
TERMS = ["loss_ce", "loss_bbox", "loss_giou"]
TRAIN_TAGS = {
    "train/loss", "train/lr_group0", "train/lr_group1", "train/images_per_s",
    *(f"train/{t}{s}" for t in TERMS for s in ["", *(f"_{i}" for i in range(DEC - 1))]),
}  # fmt: skip
TEST_TAGS = {f"test/coco_{name}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def events(out) -> EventAccumulator:
    """Every event under ``out/tensorboard``, as TensorBoard reads them (purges applied)."""
    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0,
                                                                         "images": 0})  # fmt: skip
    return accumulator.Reload()


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def assert_each_step_once(out) -> EventAccumulator:
    accumulator = events(out)
    scalars = set(accumulator.Tags()["scalars"])
    assert scalars >= TRAIN_TAGS | TEST_TAGS, TRAIN_TAGS | TEST_TAGS - scalars
    for tag in TRAIN_TAGS:
        assert steps(accumulator, tag) == TRAIN_STEPS, tag
    for tag in TEST_TAGS:
        assert steps(accumulator, tag) == EVAL_STEPS, tag
    drawings = accumulator.Tags()["images"]
    assert len(drawings) == 2 and all(tag.startswith("predictions/") for tag in drawings)
    for tag in drawings:
        assert [event.step for event in accumulator.Images(tag)] == EVAL_STEPS
    return accumulator


def test_scalars_every_print_freq_steps_and_metrics_after_each_evaluation(tmp_path):
    out = tmp_path / "run"
    run_main(tiny_argv(tmp_path / "data", out, *TENSORBOARD))
    run_main(tiny_argv(tmp_path / "data", tmp_path / "plain", "--epochs", "2", "--render", "2"))
    assert_same_weights(saved_weights(out), saved_weights(tmp_path / "plain"))  # unchanged
    accumulator = assert_each_step_once(out)
    lrs = [(e.value, f.value) for e, f in zip(*(accumulator.Scalars(f"train/lr_group{i}")
                                                for i in (0, 1)), strict=True)]  # fmt: skip
    assert lrs == [pytest.approx((1e-3, 1e-4))] * len(TRAIN_STEPS)  # --lr, --lr_backbone
    assert all(e.value > 0 for e in accumulator.Scalars("train/images_per_s"))
    # The loss is the sum of the weighted terms that are written.
    terms = [tag for tag in TRAIN_TAGS if tag.startswith("train/loss_")]
    for i, total in enumerate(accumulator.Scalars("train/loss")):
        parts = sum(accumulator.Scalars(tag)[i].value for tag in terms)
        assert parts == pytest.approx(total.value, rel=1e-4)


def test_resuming_from_an_earlier_checkpoint_shows_each_step_once(tmp_path):
    """The resumed run rewrites epoch 1: TensorBoard drops what the first run wrote there."""
    out = tmp_path / "run"
    run_main(tiny_argv(tmp_path / "data", out, *TENSORBOARD, "--save_every", "1"))
    first = {e.step: e.value for e in events(out).Scalars("train/loss")}
    resume = ["--resume", str(out / "checkpoint0000.pth")]  # saved after epoch 0
    run_main(tiny_argv(tmp_path / "data", out, *TENSORBOARD, *resume))
    assert len(list((out / "tensorboard").iterdir())) == 2  # one event file per run
    again = {e.step: e.value for e in assert_each_step_once(out).Scalars("train/loss")}
    assert again == first  # the resumed run repeats the same steps


@pytest.mark.slow
def test_a_run_stopped_inside_an_epoch_continues_its_steps(tmp_path, monkeypatch):
    out, forward = tmp_path / "run", SetCriterion.forward
    calls = {"train": 0}

    def sigterm_in_step_5(self, outputs, targets):  # epoch 1, iteration 1
        if self.training:
            calls["train"] += 1
            if calls["train"] == 6:
                os.kill(os.getpid(), signal.SIGTERM)  # recorded; the run saves after this step
        return forward(self, outputs, targets)

    monkeypatch.setattr(SetCriterion, "forward", sigterm_in_step_5)
    with pytest.raises(Interrupted):
        run_main(tiny_argv(tmp_path / "data", out, *TENSORBOARD))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2
    assert steps(events(out), "train/loss") == [0, 2, 4]
    monkeypatch.undo()
    run_main(tiny_argv(tmp_path / "data", out, *TENSORBOARD, "--resume", "auto"))
    assert_each_step_once(out)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_only_the_main_process_writes_events(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    argv = tiny_argv(data, out, "--epochs", "1", "--tensorboard", "--print_freq", "1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO / "main.py"), *argv],
        check=True, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert steps(events(out), "train/loss") == [0, 1]  # 8 images, 2 processes x 2 per batch
    assert steps(events(out), "test/coco_AP") == [1]


def test_tensorboard_without_the_package_or_an_output_dir_is_refused(tmp_path, monkeypatch):
    argv = tiny_argv(tmp_path / "data", tmp_path / "run", "--tensorboard")
    with pytest.raises(UserError, match="--output_dir"):
        run_main([*argv, "--output_dir", ""])
    find_spec = importlib.util.find_spec

    def without_tensorboard(name, *args):
        return None if name == "tensorboard" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    with pytest.raises(UserError, match=r"not installed; pip install -e '\.\[tensorboard\]'"):
        run_main(argv)
    assert not (tmp_path / "data").exists()  # refused before the data are built
