"""The submitit launcher on this machine (requeue after the timeout signal, two tasks, a sweep
and its table) and the pieces of main.py it relies on (--resume auto, the log, NMS evaluation)."""

import json
import os
import signal

import pytest
import submitit
import torch

import options
import run_with_submitit as launcher
import training
from datasets.coco_eval import class_wise_nms
from tests.conftest import REPO, assert_same_weights, run_main, saved_weights, tiny_argv
from tools import ablation_table

pytestmark = pytest.mark.slow


def launch(tmp_path, argv: list[str], cluster: str, ngpus: int, *extra: str) -> list[submitit.Job]:
    jobs = ["--job_dir", str(tmp_path / "jobs"), "--cluster", cluster, "--ngpus", str(ngpus)]
    return launcher.main([*argv, *jobs, *extra])


class InterruptedOnce(launcher.Trainer):
    """Task ``SIGNALLED_TASK`` sends itself submitit's timeout signal at epoch ``EPOCH``,
    iteration 2, unless the job was already requeued."""

    SIGNALLED_TASK, EPOCH = 0, 1

    def __call__(self) -> None:
        signalled = submitit.JobEnvironment().global_rank == self.SIGNALLED_TASK
        if self.args.resume != "auto" and signalled:
            train = training.train_one_epoch

            def interrupted(model, criterion, loader, optimizer, scheduler, device, epoch, *rest,
                            **kwargs):  # fmt: skip
                if epoch == self.EPOCH:
                    loader = SignalBefore(loader, 2)
                return train(
                    model, criterion, loader, optimizer, scheduler, device, epoch, *rest, **kwargs
                )

            training.train_one_epoch = interrupted  # this job's own process only
        super().__call__()


class SecondTaskInterrupted(InterruptedOnce):
    SIGNALLED_TASK, EPOCH = 1, 0


class SignalBefore:
    """``loader``'s batches; this process signals itself before yielding batch ``iteration``."""

    def __init__(self, loader, iteration: int):
        self.loader, self.iteration = loader, iteration

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for iteration, batch in enumerate(self.loader):
            if iteration == self.iteration:
                os.kill(os.getpid(), signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"])
            yield batch


def test_interrupted_job_requeues_and_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupted inside epoch 1, the job saves there, requeues and continues there: the
    weights and the epoch log are those of a run that was never interrupted."""
    data, out = tmp_path / "data", tmp_path / "interrupted"
    run_main(tiny_argv(data, tmp_path / "straight", "--epochs", "2"))  # dropout and drop path on
    monkeypatch.setattr(launcher, "Trainer", InterruptedOnce)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job process unpickles InterruptedOnce
    (job,) = launch(tmp_path, tiny_argv(data, out, "--epochs", "2"), "local", 1)
    job.result()
    log = (out / "out.log").read_text()  # one log for both starts, requeue and resume in it
    assert "SIGUSR2: stopped at epoch 1, iteration 3 of 4" in log  # the iteration in progress
    assert f"requeued; it resumes from {out / 'checkpoint.pth'}" in log
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 1, iteration 3" in log
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.txt").open()]
    assert [r["epoch"] for r in records] == [0, 1]
    for record, expected in zip(records, straight, strict=True):  # means over all iterations
        assert {k: v for k, v in record.items() if k.startswith("train_")} == {
            k: v for k, v in expected.items() if k.startswith("train_")
        }
    assert_same_weights(saved_weights(tmp_path / "straight"), saved_weights(out))


def test_two_local_tasks_agree_with_one_through_an_interruption(tmp_path, monkeypatch):
    """The second of two tasks alone gets the signal: both stop at the same iteration, the job
    requeues, and ends with the weights of one process taking the same global batch."""
    data = tmp_path / "data"
    common = ["--epochs", "1", "--dropout", "0", "--drop_path", "0", "--seed", "3"]
    run_main(tiny_argv(data, tmp_path / "single", *common))
    argv = tiny_argv(data, tmp_path / "double", *common)
    argv[argv.index("--batch_size") + 1] = "1"  # same global batch of 2
    monkeypatch.setattr(launcher, "Trainer", SecondTaskInterrupted)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (job,) = launch(tmp_path, argv, "local", 2)
    assert job.results() == [None, None]
    log = (tmp_path / "double" / "out.log").read_text()
    assert "SIGUSR2: stopped at epoch 0, iteration 3 of 4" in log  # task 0 stopped there too
    assert "resumed from" in log.split("requeued")[1]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "double" / "log.txt").open()] == [0]
    args = json.loads((tmp_path / "double" / "args.json").read_text())
    assert args["dist_url"].startswith((tmp_path / "jobs").resolve().as_uri())
    assert_same_weights(
        saved_weights(tmp_path / "single"), saved_weights(tmp_path / "double"), atol=1e-5
    )


def test_sweep_runs_every_combination_and_tabulates_them(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = tiny_argv(tmp_path / "data", out, "--epochs", "1", "--eval_nms_iou", "0.5")
    sweep = ["--sweep", "num_queries=3,5", "no_aux_loss=true,false"]
    launch(tmp_path, argv, "debug", 1, *sweep)
    names = [f"num_queries={q},no_aux_loss={a}" for q in (3, 5) for a in ("true", "false")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        args = json.loads((out / name / "args.json").read_text())
        assert name == (
            f"num_queries={args['num_queries']},no_aux_loss={str(args['no_aux_loss']).lower()}"
        )

    capsys.readouterr()  # the runs' own output
    ablation_table.main([str(out)])
    header, _, *rows = capsys.readouterr().out.strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:2] == ["num_queries", "no_aux_loss"] and "AP NMS" in columns
    assert len(rows) == 4
    for line in rows:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        name = f"num_queries={cells['num_queries']},no_aux_loss={cells['no_aux_loss']}"
        (record,) = [json.loads(line) for line in (out / name / "log.txt").read_text().splitlines()]
        assert cells["AP"] == f"{100 * record['test_coco_AP']:.1f}"  # each row reads its own run
        assert cells["AP NMS"] == f"{100 * record['test_coco_nms_AP']:.1f}"
        assert cells["time/epoch"] == f"{record['time']:.1f} s"
        assert cells["epochs"] == "1" and cells["best epoch"] == "0"


def test_resume_auto_continues_the_output_dir_or_starts_fresh(tmp_path):
    parse = options.get_args_parser().parse_args
    args = parse(["--output_dir", str(tmp_path), "--resume", "auto", "--finetune", "detr.pth"])
    fresh = options.resolve_resume(args)
    assert (fresh.resume, fresh.finetune) == ("", "detr.pth")  # a new run starts from --finetune
    (tmp_path / "checkpoint.pth").touch()
    continued = options.resolve_resume(args)
    assert (continued.resume, continued.finetune) == (str(tmp_path / "checkpoint.pth"), "")
    assert args.resume == "auto"  # the parsed arguments are left as they were
    with pytest.raises(SystemExit, match="--output_dir"):
        options.resolve_resume(parse(["--resume", "auto"]))


def test_restarted_epochs_leave_the_log(tmp_path):
    log = tmp_path / "log.txt"
    lines = [json.dumps({"epoch": e, "train_loss": 1.0}) + "\n" for e in range(3)]
    log.write_text("".join(lines) + '{"epoch": 3, "train_lo')  # cut short by a kill
    training.trim_log(log, 1)
    assert log.read_text() == "".join(lines[:2])


def test_nms_evaluation_keeps_the_best_box_per_class_and_place():
    result = {
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 1, 2]),
        "boxes": torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10]]),
    }
    kept = class_wise_nms(result, iou=0.5)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.7])  # same class and place: dropped
    assert kept["labels"].tolist() == [1, 2]
