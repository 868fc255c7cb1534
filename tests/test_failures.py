"""A long run that meets a bad image or a full disk ends in one line and loses nothing: an image
that cannot be read (in the main process or a loader worker) saves the position inside the epoch
first, a checkpoint that cannot be written leaves the previous one intact, and ``--resume auto``
continues once the file is fixed or space is freed; under torchrun the line is printed once and
every process ends within a minute.
"""

import errno
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

import options
from datasets import shapes_spec
from datasets.coco import CocoDetection
from datasets.shapes import ensure_shapes
from tests.conftest import (
    REPO,
    TINY_DATA_FLAGS,
    assert_same_weights,
    run_main,
    saved_weights,
    tiny_argv,
)
from training import EpochBatches
from util import checkpoint
from util.errors import cli
from util.logs import read_log

COCO = ["--dataset_file", "coco"]  # the tiny built-in set, read as COCO files
TWO = [*COCO, "--epochs", "2"]
BATCH = 2  # tiny_argv's --batch_size


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("failures") / "data"
    ensure_shapes(data, shapes_spec(options.parse(TINY_DATA_FLAGS)))
    return data


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """A run of 2 epochs that nothing interrupts."""
    out = tmp_path_factory.mktemp("failures") / "straight"
    run_main(tiny_argv(data, out, *TWO))
    return out


def break_image(data: Path, copy: Path, *, rank: int, world: int, batch: int) -> tuple[Path, int]:
    """Copy the data set to ``copy`` and overwrite an image of the ``batch``-th training batch
    of epoch 0 that process ``rank`` of ``world`` reads (and no other); (file, image id)."""
    shutil.copytree(data, copy)
    train = CocoDetection(img_folder=copy / "train2017",
                          ann_file=copy / "annotations" / "instances_train2017.json",
                          transforms=None)  # fmt: skip
    batches = EpochBatches(DistributedSampler(train, world, rank, seed=42), BATCH)  # --seed 42
    batches.set_epoch(0)
    image_id = train.ids[list(batches)[batch][0]]
    path = copy / "train2017" / train.coco.imgs[image_id]["file_name"]
    path.write_bytes(b"not an image")
    return path, image_id


def refusal(argv: list[str], capsys) -> str:
    """The one ``error:`` line that main.py's command line ends with (status 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        cli(lambda: run_main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("workers", ["0", pytest.param("1", marks=pytest.mark.slow)])
def test_an_unreadable_image_saves_the_position_then_resume_ends_like_a_straight_run(
    data, straight, tmp_path, capsys, workers
):
    path, image_id = break_image(data, tmp_path / "data", rank=0, world=1, batch=2)
    out = tmp_path / "run"
    argv = tiny_argv(tmp_path / "data", out, *TWO, "--num_workers", workers)
    line = refusal(argv, capsys)
    assert f"cannot decode image file {path} (image id {image_id})" in line
    assert f"saved {out / 'checkpoint.pth'} at epoch 0, iteration 2 of 4" in line
    state = checkpoint.load(out / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (0, 2)  # the two steps before the image
    shutil.copy(data / "train2017" / path.name, path)  # fixed
    # Evaluation draws from the generator of the process that reads the validation images, so
    # the resumed run reads them where the straight run did: in the main process.
    run_main([*argv, "--resume", "auto", "--num_workers", "0"])
    assert_same_weights(saved_weights(straight), saved_weights(out))
    assert [record["epoch"] for record in read_log(out / "log.txt")] == [0, 1]


def torchrun(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m torch.distributed.run --nproc_per_node=2 main.py ARGV``: (result, seconds)."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO / "main.py"), *argv],
        cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return done, time.monotonic() - began


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_an_image_only_rank_1_reads_ends_every_process_with_one_line(data, tmp_path):
    path, image_id = break_image(data, tmp_path / "data", rank=1, world=2, batch=1)
    done, seconds = torchrun(tiny_argv(tmp_path / "data", tmp_path / "run", *TWO))
    output = done.stdout + done.stderr
    assert done.returncode == 1  # torchrun's status when a process fails
    assert output.count("error:") == 1, output
    assert f"\nerror: rank 1: cannot decode image file {path} (image id {image_id})" in output
    assert "exitcode  : 2" in output  # torchrun's summary names the rank's status
    assert seconds < 60


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_a_mistake_every_process_meets_is_reported_once(data, tmp_path):
    argv = tiny_argv(data, tmp_path / "run", "--batch_size", "64")  # no batch for any process
    done, seconds = torchrun(argv)
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert output.count("error:") == 1, output
    assert "\nerror: --coco_path" in "\n" + done.stderr and "--batch_size" in output
    assert seconds < 60


class FullDisk(io.FileIO):
    """A file that takes ``room`` bytes, then fails as a full file system does."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + memoryview(data).nbytes > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_then_resume_continues(
    data, straight, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    run_main(tiny_argv(data, out, *COCO, "--epochs", "1"))
    before = (out / "checkpoint.pth").read_bytes()
    argv = tiny_argv(data, out, *TWO, "--resume", "auto")
    with monkeypatch.context() as full:
        full.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, "w"), raising=False)
        line = refusal(argv, capsys)
    assert f"cannot write {out / 'checkpoint.pth'}: No space left on device (it needs " in line
    assert "the previous checkpoint.pth is intact" in line and "--resume auto" in line
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the partial file is gone
    run_main(argv)
    assert_same_weights(saved_weights(straight), saved_weights(out))
    assert [record["epoch"] for record in read_log(out / "log.txt")] == [0, 1]


def test_a_log_that_cannot_be_written_is_named(data, tmp_path, capsys, monkeypatch):
    def denied(path, record):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("training.append_record", denied)
    out = tmp_path / "run"
    line = refusal(tiny_argv(data, out, *TWO), capsys)
    assert f"cannot write {out / 'log.txt'}: Permission denied" in line
    assert not (out / "checkpoint.pth").exists()  # the epoch is logged before it is saved


@pytest.fixture
def small_disk(tmp_path):
    """A 128 MB tmpfs mounted in ``tmp_path`` (root only), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # out.log may still be open


def test_a_full_file_system_ends_in_one_line_and_resume_continues_once_space_is_freed(
    data, straight, small_disk, capsys
):
    out = small_disk / "run"
    run_main(tiny_argv(data, out, *COCO, "--epochs", "1"))
    before = (out / "checkpoint.pth").read_bytes()
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - len(before) // 2))
    argv = tiny_argv(data, out, *TWO, "--resume", "auto")
    line = refusal(argv, capsys)
    assert f"cannot write {out / 'checkpoint.pth'}: No space left on device" in line
    needs = float(line.split("(it needs ")[1].split(" MiB")[0])
    assert needs == pytest.approx(len(before) / 2**20, rel=0.01)  # the size of a checkpoint
    assert "the previous checkpoint.pth is intact" in line
    assert (out / "checkpoint.pth").read_bytes() == before
    filler.unlink()
    run_main(argv)
    assert_same_weights(saved_weights(straight), saved_weights(out))
    assert [record["epoch"] for record in read_log(out / "log.txt")] == [0, 1]
