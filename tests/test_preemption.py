"""Interruptions inside an epoch cost nothing: a run stopped by SIGTERM, or killed with SIGKILL
after a timed save, and resumed, ends with the weights and the epoch log of an uninterrupted run.

The runs are ``python main.py`` processes that get real signals; the uninterrupted run and the
last resume run in this process (the same code, one thread each: the same floats).
"""

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import Averager
from tests.conftest import REPO, assert_same_weights, run_main, saved_weights, tiny_argv
from training import EpochBatches
from util import checkpoint

TRAIN_IMAGES, BATCH = 12, 2
PER_EPOCH = TRAIN_IMAGES // BATCH
COMMON = ["--epochs", "2", "--shapes_train", str(TRAIN_IMAGES)]  # dropout, drop path, flips on
# A save after every iteration: the log then says how far the run got, for the signal's timing.
EVERY_ITERATION = ["--checkpoint_minutes", "0.0001"]
SAVED = re.compile(r"epoch (\d+), iteration (\d+) of \d+: saved")


def start(argv: list[str], stderr: Path) -> subprocess.Popen:
    with open(stderr, "w") as err:
        return subprocess.Popen(
            [sys.executable, str(REPO / "main.py"), *argv],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def wait_for_save(process: subprocess.Popen, out: Path, epoch: int, iteration: int) -> None:
    """Return once the run in ``out`` has saved at ``epoch``, ``iteration`` or later."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = (out / "out.log").read_text() if (out / "out.log").is_file() else ""
        if any((int(e), int(i)) >= (epoch, iteration) for e, i in SAVED.findall(log)):
            return
        if process.poll() is not None:
            pytest.fail(f"main.py ended with status {process.returncode} before the signal")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"no save at epoch {epoch}, iteration {iteration} within 120 s")


def train_means(out: Path) -> list[dict]:
    """The ``train_*`` means of each line of ``out/log.txt``."""
    lines = (out / "log.txt").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k.startswith("train_")} for line in lines]


def assert_like_uninterrupted(out: Path, straight: Path) -> None:
    """Bit-identical weights, and one log line per epoch with the same means of every iteration."""
    assert_same_weights(saved_weights(straight), saved_weights(out))
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    assert train_means(out) == train_means(straight)


@pytest.mark.slow
def test_sigterm_at_random_iterations_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    data, straight, out = tmp_path / "data", tmp_path / "straight", tmp_path / "stopped"
    run_main(tiny_argv(data, straight, *COMMON))  # also writes the data set
    draw = random.Random()
    for epoch, resume in ((0, []), (1, ["--resume", "auto"])):  # stopped twice, once per epoch
        iteration = draw.randrange(1, PER_EPOCH - 2)
        argv = tiny_argv(data, out, *COMMON, *EVERY_ITERATION, *resume)
        process = start(argv, tmp_path / "stderr.txt")
        wait_for_save(process, out, epoch, iteration)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
        state = checkpoint.load(out / "checkpoint.pth")
        where = f"signal after the save of epoch {epoch}, iteration {iteration}"
        assert state["epoch"] == epoch, where  # the iteration in progress, then the save
        assert iteration < state["iteration"] <= PER_EPOCH, where
        assert (
            f"SIGTERM: stopped at epoch {epoch}, iteration {state['iteration']}"
            in (out / "out.log").read_text()
        )
    run_main(tiny_argv(data, out, *COMMON, "--resume", "auto"))
    assert_like_uninterrupted(out, straight)


@pytest.mark.slow
def test_kill_9_after_a_timed_save_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    data, straight, out = tmp_path / "data", tmp_path / "straight", tmp_path / "killed"
    run_main(tiny_argv(data, straight, *COMMON))
    iteration = random.Random().randrange(1, PER_EPOCH - 2)
    process = start(tiny_argv(data, out, *COMMON, *EVERY_ITERATION), tmp_path / "stderr.txt")
    wait_for_save(process, out, 0, iteration)
    process.kill()  # SIGKILL: no handler runs, the newest timed save is what is left
    assert process.wait(timeout=60) == -signal.SIGKILL
    state = checkpoint.load(out / "checkpoint.pth")
    assert state["iteration"] >= iteration, f"killed after the save of iteration {iteration}"
    run_main(tiny_argv(data, out, *COMMON, "--resume", "auto"))
    assert_like_uninterrupted(out, straight)


def test_a_resumed_epoch_skips_the_batches_done_without_changing_the_others():
    class Sampler(list):  # the DistributedSampler interface EpochBatches uses
        def set_epoch(self, epoch: int) -> None:
            self[:] = [(i * 7 + epoch) % 20 for i in range(20)]

    batches = EpochBatches(Sampler(), batch_size=3)
    batches.set_epoch(4)
    whole = list(batches)
    batches.set_epoch(4, start=2)
    assert list(batches) == whole[2:] and len(batches) == len(whole) - 2
    assert batches.per_epoch == len(whole) == 6  # 20 // 3: the partial batch is dropped


def test_epoch_means_continue_across_a_saved_averager(tmp_path):
    values = [{"loss": float(v), "lr": 0.1} for v in range(5)]
    straight, first = Averager(), Averager()
    for v in values:
        straight.add(v)
    for v in values[:2]:
        first.add(v)
    checkpoint.save_atomic({"metrics": first.state()}, tmp_path / "c.pth")
    resumed = Averager(checkpoint.load(tmp_path / "c.pth")["metrics"])  # weights_only keeps it
    for v in values[2:]:
        resumed.add(v)
    assert resumed.count == 5
    assert resumed.result(device=None) == straight.result(device=None)
