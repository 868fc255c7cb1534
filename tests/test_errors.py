"""A user's mistake costs seconds and one line: every command line refuses it with
``error: <what, naming the file, key or image id>; <what to do>``, exit status 2, no traceback.

Each class of mistake runs once as a real command (a subprocess, from the import on); the
variants run in this process through the same ``cli`` wrapper.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main
import options
import predict
from datasets import shapes_spec
from datasets.shapes import ensure_shapes
from tests.conftest import (
    REPO,
    TINY_DATA_FLAGS,
    build_tiny,
    save_checkpoint,
    tiny_argv,
    tiny_model_args,
)
from util.errors import UserError, cli


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny built-in data set, a tiny checkpoint, and a copy of the data set whose training
    annotations have a bad box."""
    tmp = tmp_path_factory.mktemp("errors")
    data = tmp / "data"
    ensure_shapes(data, shapes_spec(options.parse([*TINY_DATA_FLAGS])))
    model = build_tiny()[0]
    save_checkpoint(tmp / "tiny.pth", model, tiny_model_args())
    bad = tmp / "bad_annotations"
    shutil.copytree(data, bad)
    ann_file = bad / "annotations" / "instances_train2017.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"][0]["bbox"] = [1, 2, 3]
    ann_file.write_text(json.dumps(coco))
    bad_image = coco["annotations"][0]["image_id"]
    return {"tmp": tmp, "data": data, "checkpoint": tmp / "tiny.pth", "bad": bad,
            "bad_image": bad_image}  # fmt: skip


def refused(command: list[str]) -> str:
    """Run ``command`` from the repository root; assert the one-line refusal; return the line.
    The seconds it took are printed (``pytest -s``), not asserted: they depend on the machine's
    load (importing torch dominates them)."""
    began = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - began
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "; " in lines[0]  # what is wrong; what to do
    print(f"{seconds:5.1f} s  {' '.join(Path(c).name for c in command[1:3])}: {lines[0]}")
    return lines[0]


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.mark.slow
def test_a_missing_checkpoint_is_refused_before_the_data_are_built(files):
    out = files["tmp"] / "missing_run"
    line = refused(python("main.py", *tiny_argv(files["tmp"] / "new_data", out,
                                                   "--resume", "missing.pth")))  # fmt: skip
    assert "--resume missing.pth" in line
    assert not (files["tmp"] / "new_data").exists()  # nothing generated


@pytest.mark.slow
def test_a_bad_flag_combination_is_refused(files):
    line = refused(python("main.py", "--resume", "a.pth", "--finetune", "b.pth"))
    assert "--finetune" in line and "--resume" in line


@pytest.mark.slow
def test_a_bad_annotation_is_named_with_its_image_id(files):
    argv = tiny_argv(files["bad"], files["tmp"] / "bad_run", "--dataset_file", "coco")
    line = refused(python("main.py", *argv))
    assert "instances_train2017.json" in line and f"image id {files['bad_image']}" in line


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_the_model_is_named(files):
    """A flag that contradicts the checkpoint's architecture is refused naming both values."""
    argv = tiny_argv(files["data"], files["tmp"] / "wide_run", "--hidden_dim", "64")
    line = refused(python("main.py", *argv, "--resume", str(files["checkpoint"])))
    assert str(files["checkpoint"]) in line
    assert "--hidden_dim 64" in line and "trained with --hidden_dim 32" in line


@pytest.mark.slow
def test_a_dataset_that_gives_no_batch_is_refused(files):
    argv = tiny_argv(files["data"], files["tmp"] / "big_batch", "--batch_size", "64")
    line = refused(python("main.py", *argv))
    assert "--batch_size" in line and str(files["data"]) in line


@pytest.mark.slow
def test_the_launcher_refuses_before_queueing(files):
    jobs = files["tmp"] / "jobs"
    argv = tiny_argv(files["data"], files["tmp"] / "job_run", "--resume", "missing.pth")
    line = refused(python("run_with_submitit.py", *argv, "--cluster", "local",
                             "--ngpus", "1", "--job_dir", str(jobs)))  # fmt: skip
    assert "--resume missing.pth" in line
    assert not jobs.exists() or not any(jobs.iterdir())  # nothing was queued


@pytest.mark.slow
def test_predict_refuses_a_missing_checkpoint(files):
    image = next((files["data"] / "val2017").iterdir())
    line = refused(python("predict.py", str(image), "--resume", "missing.pth"))
    assert "--resume missing.pth" in line


@pytest.mark.slow
def test_pretrain_backbone_refuses_a_missing_dataset(files):
    line = refused(python("pretrain_backbone.py", "--dataset_file", "coco",
                             "--coco_path", "nowhere", "--output", "b.pth"))  # fmt: skip
    assert "--coco_path nowhere" in line


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["tools.plot_curves", "tools.ablation_table"])
def test_the_tools_refuse_a_missing_run(tool):
    line = refused(python("-m", tool, "nowhere"))
    assert "nowhere" in line


# The same wrapper in this process: the variants of each class.


def refusal(command, capsys) -> str:
    """The one line ``cli(command)`` prints for a user's mistake (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        cli(command)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--pretrained_backbone", "gone.pth"], "--pretrained_backbone gone.pth: no such file"),
        (["--finetune", "gone.pth"], "--finetune gone.pth: no such file"),
        (["--dataset_file", "coco", "--coco_path", "nowhere"], "--coco_path nowhere"),
        (["--resume", "auto", "--output_dir", ""], "--output_dir"),
        (["--eval"], "--resume PATH"),
        (["--backbone", "resnet50", "--feature_stage", "2"], "--feature_stage 2"),
        (["--eval_every", "0"], "--eval_every 0"),
    ],
)
def test_main_names_the_culprit_in_one_line(files, capsys, extra, culprit):
    argv = [*tiny_argv(files["tmp"] / "unused_data", files["tmp"] / "unused"), *extra]
    assert culprit in refusal(lambda: main.main(options.parse(argv)), capsys)
    assert not (files["tmp"] / "unused_data").exists()


def test_an_unreadable_checkpoint_is_named(files, capsys):
    truncated = files["tmp"] / "truncated.pth"
    truncated.write_bytes(files["checkpoint"].read_bytes()[:1000])
    argv = tiny_argv(files["data"], files["tmp"] / "truncated_run", "--resume", str(truncated))
    line = refusal(lambda: main.main(options.parse(argv)), capsys)
    assert f"{truncated} is not a readable checkpoint" in line


def test_an_output_dir_that_is_a_file_is_refused(files, capsys):
    (files["tmp"] / "a_file").write_text("")
    argv = tiny_argv(files["data"], files["tmp"] / "a_file")
    assert "--output_dir" in refusal(lambda: main.main(options.parse(argv)), capsys)


def test_predict_refuses_an_unwritable_json_before_reading_the_model(files, capsys):
    parser = predict.argparse.ArgumentParser(parents=[predict.get_args_parser()])
    args = parser.parse_args([str(files["data"]), "--resume", str(files["checkpoint"]),
                              "--json", str(files["tmp"] / "no" / "such" / "p.json")])  # fmt: skip
    assert "--json" in refusal(lambda: predict.main(args), capsys)


def test_a_bug_keeps_its_traceback():
    def bug():
        raise KeyError("not a user's mistake")

    with pytest.raises(KeyError):
        cli(bug)
    assert isinstance(UserError("x"), SystemExit)  # uncaught, it still ends without a traceback
