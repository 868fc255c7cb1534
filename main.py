"""Train and evaluate PVT + DETR.

    python main.py                                       # built-in synthetic dataset, one process
    python -m torch.distributed.run --nproc_per_node=8 main.py --backbone pvt_small \\
        --coco_path /data/coco --dataset_file coco --output_dir outputs/pvt_small
    python main.py --eval --resume outputs/pvt_small/checkpoint.pth --dataset_file coco ...
    python run_with_submitit.py --nodes 2 --ngpus 8 ...  # SLURM (docs/cluster.md)

The flags are in options.py; the pieces of a run (loaders, optimizer, checkpoints, log) in
training.py; one epoch of training and one evaluation pass in engine.py.

SIGTERM or SIGUSR2 (what SLURM, torchrun and submitit send) saves the position inside the epoch
in checkpoint.pth after the iteration in progress and exits with status 143 or 140; --resume
continues there. A mistake in the flags or the files they name prints one line, ``error: ...``,
and exits with status 2; so do an image that cannot be read (after saving the position inside
the epoch, in a single process) and a checkpoint or log that cannot be written (the previous
checkpoint is intact). --tensorboard writes TensorBoard events (util/tensorboard.py).
"""

import argparse
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets.coco import UnreadableImage
from engine import Averager, evaluate, train_one_epoch
from models import build_model
from models.pvt import set_gelu_recompute, set_grad_checkpointing
from options import (
    adopt_checkpoint_flags,
    check_args,
    check_files,
    checkpoint_flags,
    parse,
    resolve_resume,
)
from tools.render import draw_predictions, render_predictions
from training import (
    WRITE_HINT,
    EpochProgress,
    begin_epoch,
    build_datasets,
    build_evaluators,
    build_loaders,
    build_lr_scheduler,
    build_optimizer,
    check_fits,
    load_weights,
    log_epoch,
    restore,
    save,
    trim_log,
)
from util import dist
from util.cpu import configure_malloc
from util.errors import UserError, cli, user_errors, writing
from util.logs import LogFile
from util.preemption import Interrupted, StopRequests
from util.tensorboard import TensorBoard

logger = logging.getLogger("main")


def setup_logging(output_dir: str, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and output_dir:
        with user_errors(OSError, hint="pass an --output_dir you can write in"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(LogFile(Path(output_dir) / "out.log", hint=WRITE_HINT))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def prepare(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """``args`` with ``--resume auto`` resolved, and the checkpoint that --resume or --finetune
    names (read now), once the flags and the files they name have passed their checks.

    What these checks refuse (:class:`UserError`) is refused in seconds, before any data are
    generated or read and any model is built; the launcher runs them before it queues a job.
    """
    resolved = resolve_resume(args)
    check_args(resolved)
    check_files(resolved)
    weights = load_weights(resolved)
    adopted = adopt_checkpoint_flags(resolved, weights)
    if adopted is not resolved:
        check_args(adopted)
    check_fits(adopted, weights)
    return adopted, weights


def main(args: argparse.Namespace, dist_info: dist.DistInfo | None = None) -> None:
    """Train (or evaluate with --eval) as one process of ``dist_info``.

    ``dist_info`` None: rank and world size come from the environment (torch.distributed.run).
    A stop signal during training saves and raises :class:`Interrupted`; a user's mistake raises
    :class:`UserError`.
    """
    resolved, weights = prepare(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
    configure_malloc()
    info = dist.init_distributed(args.device, args.dist_url, dist_info)
    setup_logging(args.output_dir, info.is_main)
    if args.resume == "auto":
        logger.info("--resume auto: %s", resolved.resume or "no checkpoint yet, starting fresh")
    for flag in checkpoint_flags():
        if getattr(resolved, flag) != getattr(args, flag):
            value, path = getattr(resolved, flag), resolved.resume
            logger.info("--%s %s: taken from %s, which was trained with it", flag, value, path)
    args = resolved
    try:
        run = build(args, info)
        start_epoch, progress = restore(
            run.args, weights, run.model, run.optimizer, run.lr_scheduler, info
        )
        del weights  # the model, optimizer and schedule hold it now
        if info.is_main and args.output_dir and not args.eval:
            trim_log(Path(args.output_dir) / "log.txt", start_epoch - 1)
        if args.eval:
            logger.info("evaluation of %s: %s", args.resume, json.dumps(run.evaluate()))
        elif start_epoch >= args.epochs:
            logger.info(
                "%s already finished %d epochs (--epochs %d): nothing to do",
                args.resume,
                start_epoch,
                args.epochs,
            )
            return
        else:
            train(run, start_epoch, progress)
        finish(run)
    except UnreadableImage as err:  # evaluating or drawing: the checkpoints are as they were
        rank = info.rank if info.distributed else None
        raise UserError(f"{err.original}; {FIX_IMAGE}", rank=rank) from err
    finally:
        dist.cleanup()


@dataclass
class Run:
    """The pieces of one run. ``model`` is what is saved; ``trained`` trains it (DDP, compile)."""

    args: argparse.Namespace
    info: dist.DistInfo
    device: torch.device
    model: nn.Module
    trained: nn.Module
    criterion: nn.Module
    postprocessors: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    val_set: torch.utils.data.Dataset
    evaluators: Callable[[], dict]
    amp_dtype: torch.dtype | None
    n_parameters: int

    def evaluate(self) -> dict[str, float]:
        return evaluate(
            self.model, self.criterion, self.postprocessors["bbox"], self.val_loader,
            self.evaluators(), self.device, self.amp_dtype, self.info.is_main,
        )  # fmt: skip

    def save(self, epoch: int, inside: EpochProgress | None = None) -> None:
        save(self.args, epoch, self.model, self.optimizer, self.lr_scheduler, self.info, inside)


def build(args: argparse.Namespace, info: dist.DistInfo) -> Run:
    """Data, model, loaders, optimizer and schedule; ``args.json`` in --output_dir."""
    device = torch.device(
        f"cuda:{info.local_rank}" if args.device == "cuda" and info.distributed else args.device
    )
    torch.manual_seed(args.seed + info.rank)
    random.seed(args.seed + info.rank)
    train_set, val_set, args = build_datasets(args, info)
    if info.is_main and args.output_dir:
        saved_args = Path(args.output_dir) / "args.json"
        with writing(saved_args, WRITE_HINT):
            saved_args.write_text(json.dumps(vars(args), indent=1))
    # The model's own checks (--num_classes, the --pretrained_backbone weights) name the culprit.
    with user_errors(FileNotFoundError, ValueError):
        model, criterion, postprocessors = build_model(args)
    set_grad_checkpointing(model, args.checkpoint_backbone)
    set_gelu_recompute(model, args.recompute_gelu)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    detector = {"detr": "DETR", "deformable": "Deformable DETR"}[args.transformer]
    logger.info("%s + %s: %.2fM trainable parameters", args.backbone, detector, n_parameters / 1e6)
    train_loader, val_loader = build_loaders(args, train_set, val_set, info)
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(optimizer, args, train_loader.batch_sampler.per_epoch)
    trained = DistributedDataParallel(model) if info.distributed else model
    trained = torch.compile(trained) if args.compile else trained
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    return Run(
        args, info, device, model, trained, criterion, postprocessors, optimizer, lr_scheduler,
        train_loader, val_loader, val_set, build_evaluators(args, val_set), amp_dtype,
        n_parameters,
    )  # fmt: skip


def train(run: Run, start_epoch: int, progress: EpochProgress | None) -> None:
    """Epochs ``start_epoch`` to --epochs - 1, the first from ``progress`` if it stopped inside.

    A SIGTERM or SIGUSR2 (to any process) saves after the iteration in progress and raises
    :class:`Interrupted`; every --checkpoint_minutes a save is made inside the epoch. An image
    that cannot be read saves the position too (:func:`unreadable`).
    """
    args = run.args
    minutes = args.checkpoint_minutes if args.output_dir else 0  # nowhere to save
    per_epoch = run.train_loader.batch_sampler.per_epoch
    first_step = start_epoch * per_epoch + (progress.iteration if progress else 0)
    with (
        StopRequests(save_minutes=minutes, is_main=run.info.is_main, device=run.device) as stop,
        open_board(run, first_step) as board,
    ):
        for epoch in range(start_epoch, args.epochs):
            record, began = train_epoch(run, epoch, progress, stop, board)
            progress = None  # later epochs start at their first batch
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics = run.evaluate()
                record |= {f"test_{k}": v for k, v in metrics.items()}
                if board is not None:
                    show_evaluation(run, board, (epoch + 1) * per_epoch - 1, metrics)
            record |= {"epoch": epoch, "n_parameters": run.n_parameters}
            record["time"] = time.time() - began
            log_epoch(args, record, run.info)
            run.save(epoch)
            stop.saved()
            signum = stop.poll()[0] if epoch + 1 < args.epochs else 0
            if signum:
                stopped(args, signum, f"after epoch {epoch}")


def train_epoch(
    run: Run,
    epoch: int,
    progress: EpochProgress | None,
    stop: StopRequests,
    board: TensorBoard | None,
) -> tuple[dict[str, float], float]:
    """Train ``epoch`` (from ``progress`` if it stopped inside); the log record's ``train_*``
    means and the time the epoch began (earlier by the time it took before a stop)."""
    begin_epoch(run.train_loader, epoch, progress.iteration if progress else 0)
    per_epoch = run.train_loader.batch_sampler.per_epoch
    began = time.time() - (progress.seconds if progress else 0.0)
    averager = Averager(progress.metrics if progress else None)
    resumed_at = averager.count

    def after_step(averager: Averager) -> None:
        signum, due = stop.poll()
        if not (signum or due):
            return
        run.save(epoch, EpochProgress(averager.count, averager.state(), time.time() - began))
        stop.saved()
        where = f"epoch {epoch}, iteration {averager.count} of {per_epoch}"
        if signum:
            stopped(run.args, signum, f"at {where}")
        logger.info("%s: saved %s", where, Path(run.args.output_dir) / "checkpoint.pth")

    def log_step(iteration: int, scalars: dict[str, float]) -> None:
        board.training(epoch * per_epoch + iteration, scalars)

    try:
        stats = train_one_epoch(
            run.trained, run.criterion, run.train_loader, run.optimizer, run.lr_scheduler,
            run.device, epoch, run.args.clip_max_norm, run.amp_dtype, run.info.is_main,
            averager=averager, after_step=after_step, log_step=None if board is None else log_step,
        )  # fmt: skip
    except UnreadableImage as err:
        done = EpochProgress(averager.count, averager.state(), time.time() - began)
        raise unreadable(run, err, epoch, done, saves=averager.count > resumed_at) from err
    return {f"train_{k}": v for k, v in stats.items()}, began


# What to do about an image that cannot be read.
FIX_IMAGE = "replace the file, or remove that image from the annotation file"


def unreadable(
    run: Run, err: UnreadableImage, epoch: int, done: EpochProgress, saves: bool
) -> UserError:
    """The error that ends a run on an image it cannot read in ``epoch``, after ``done``.

    A single process saves its position first when it trained a step since it started or
    resumed (``saves``), and --resume continues there once the image is fixed. A process of a
    distributed run cannot save alone (a save gathers from every process, and the others are
    in their next step): it reports the image with its rank and leaves, and torchrun ends the
    others; the run continues from the last save.
    """
    per_epoch = run.train_loader.batch_sampler.per_epoch
    where = f"epoch {epoch}, iteration {done.iteration} of {per_epoch}"
    if run.info.distributed:
        then = f"stopped at {where}; {FIX_IMAGE}, then --resume auto continues from the last save"
        return UserError(f"{err.original}; {then}", rank=run.info.rank)
    if not (saves and run.args.output_dir):
        return UserError(f"{err.original}; stopped at {where}, nothing new to save; {FIX_IMAGE}")
    run.save(epoch, done)
    saved = f"saved {Path(run.args.output_dir) / 'checkpoint.pth'} at {where}"
    return UserError(f"{err.original}; {saved}; {FIX_IMAGE}, then --resume auto continues there")


@contextlib.contextmanager
def open_board(run: Run, first_step: int) -> Iterator[TensorBoard | None]:
    """With --tensorboard, the main process's :class:`TensorBoard` from step ``first_step`` on
    (the events an interrupted run wrote from there on are dropped); None otherwise."""
    if not (run.args.tensorboard and run.info.is_main):
        yield None
        return
    folder = Path(run.args.output_dir) / "tensorboard"
    board = TensorBoard(folder, every=run.args.print_freq, purge_step=first_step, hint=WRITE_HINT)
    try:
        yield board
    except BaseException:
        with contextlib.suppress(UserError):  # the error on its way out is the one to report
            board.close()
        raise
    board.close()


def show_evaluation(run: Run, board: TensorBoard, step: int, metrics: dict[str, float]) -> None:
    """An evaluation's AP metrics and, with --render, the drawn predictions in TensorBoard."""
    board.evaluation(step, metrics)
    if run.args.render:
        # The validation transforms draw from the generator; training goes on as without them.
        with torch.random.fork_rng(devices=[]):
            drawings = draw_predictions(
                run.model, run.postprocessors["bbox"], run.val_set, run.args.render, run.device
            )
        board.images(step, drawings)


def stopped(args: argparse.Namespace, signum: int, where: str) -> None:
    """End the run on signal ``signum`` once every process has saved (:class:`Interrupted`)."""
    saved = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    logger.warning(
        "%s: stopped %s; %s",
        signal.Signals(signum).name,
        where,
        f"saved {saved}, --resume continues there" if saved else "nothing saved (no --output_dir)",
    )
    dist.barrier()  # no process leaves before the checkpoint is written
    raise Interrupted(signum)


def finish(run: Run) -> None:
    if run.args.render and run.info.is_main and run.args.output_dir:
        out = Path(run.args.output_dir) / "predictions"
        render_predictions(
            run.model, run.postprocessors["bbox"], run.val_set, run.args.render, out, run.device
        )
        logger.info("drew predictions on %d validation images in %s", run.args.render, out)


if __name__ == "__main__":
    cli(lambda: main(parse(sys.argv[1:])))
