"""One run of main.py (:class:`Run`: build, restore, train, evaluate, save) and the pieces that
main.py, the launcher, the benchmarks and the tests share: datasets and loaders, optimizer, LR
schedule, checkpoints, the epoch log.

SIGTERM or SIGUSR2 (what SLURM, torchrun and submitit send) saves the position inside the epoch
in checkpoint.pth after the iteration in progress and raises :class:`Interrupted`; --resume
continues there. An image that cannot be read ends the run with a :class:`UserError` (after
saving the position inside the epoch, in a single process); so does a checkpoint or log that
cannot be written (the previous checkpoint is intact). --tensorboard writes TensorBoard events
(util/tensorboard.py).
"""

import argparse
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import datasets
from datasets.coco import UnreadableImage
from datasets.coco_eval import CocoEvaluator, cocoeval_backend
from datasets.collate import collate_fn
from datasets.seeded import SeededDataset
from engine import Averager, evaluate, train_one_epoch
from models import build_criterion, build_detector
from models.config import ModelConfig
from models.detr import class_bias, load_detr_checkpoint
from models.postprocess import PostProcess
from models.pvt import set_gelu_recompute, set_grad_checkpointing
from options import (
    FILE_FLAGS,
    adopt_checkpoint_flags,
    check_args,
    check_files,
    resolve_resume,
)
from tools.plot import plot_logs
from tools.render import draw_predictions, render_predictions
from util import checkpoint, dist
from util.checkpoint import check_state_dict, load_state_dict_strict
from util.errors import UserError, user_errors, writing
from util.logs import append_record, read_log, write_log
from util.preemption import Interrupted, StopRequests
from util.tensorboard import TensorBoard

logger = logging.getLogger("training")

# What to do when a file in --output_dir cannot be written; the checkpoints are untouched.
WRITE_HINT = (
    "checkpoint.pth is as the last save left it; free space (or fix the permissions), then "
    "--resume auto continues from it"
)

# What to do about an image that cannot be read.
FIX_IMAGE = "replace the file, or remove that image from the annotation file"


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


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch got before it stopped: ``iteration`` batches done, this process's
    running metric sums (``engine.Averager.state()``) and the seconds the epoch took so far."""

    iteration: int
    metrics: dict
    seconds: float


class Run:
    """This process's part of one run: its data, model, loaders, optimizer and schedule, built
    from the flags; restored from --resume or --finetune weights; trained epoch by epoch (an
    evaluation every --eval_every epochs, a log record and a checkpoint after each) or evaluated.

    ``model`` is what is saved and evaluated, ``trained`` what trains it (DDP across processes,
    torch.compile with --compile). During :meth:`train`, a SIGTERM or SIGUSR2 (to any process)
    saves after the iteration in progress and raises :class:`Interrupted`; every
    --checkpoint_minutes a save is made inside the epoch; an image that cannot be read saves the
    position too and raises :class:`UserError`.
    """

    def __init__(self, args: argparse.Namespace, info: dist.DistInfo):
        """Data, model, loaders, optimizer and schedule; ``args.json`` in --output_dir.

        ``args`` as :func:`prepare` returns them; :attr:`args` adds what the data resolve
        (:func:`resolve_args`).
        """
        self.info = info
        self.device = torch.device(
            f"cuda:{info.local_rank}" if args.device == "cuda" and info.distributed else args.device
        )
        torch.manual_seed(args.seed + info.rank)
        random.seed(args.seed + info.rank)
        train_set, self.val_set, self.args = build_datasets(args, info)
        args = self.args  # with what the data resolve
        if info.is_main and args.output_dir:
            saved_args = Path(args.output_dir) / "args.json"
            with writing(saved_args, WRITE_HINT):
                saved_args.write_text(json.dumps(vars(args), indent=1))
        with user_errors(ValueError):
            self.config = ModelConfig.from_args(args)
        self.model, self.criterion, self.postprocessors = build_model_on(
            self.config, args, self.device
        )
        self.n_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        detector = {"detr": "DETR", "deformable": "Deformable DETR"}[args.transformer]
        logger.info(
            "%s + %s: %.2fM trainable parameters", args.backbone, detector, self.n_parameters / 1e6
        )
        self.train_loader, self.val_loader = build_loaders(args, train_set, self.val_set, info)
        self.per_epoch = self.train_loader.batch_sampler.per_epoch
        self.optimizer = build_optimizer(self.model, args)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, args, self.per_epoch)
        trained = DistributedDataParallel(self.model) if info.distributed else self.model
        self.trained = torch.compile(trained) if args.compile else trained
        self.amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
        self.evaluators = build_evaluators(args, self.val_set)

    def restore(self, weights: dict | None) -> tuple[int, EpochProgress | None]:
        """Load ``weights``, the --resume or --finetune checkpoint of :func:`prepare`; when
        training, drop the records of ``log.txt`` that this run writes again (:func:`trim_log`).

        Returns the first epoch to train and, when the checkpoint stopped inside that epoch, how
        far it got there (None: the epoch starts at its first batch).
        """
        start_epoch, progress = self._load(weights)
        if self.info.is_main and self.args.output_dir and not self.args.eval:
            trim_log(Path(self.args.output_dir) / "log.txt", start_epoch - 1)
        return start_epoch, progress

    def _load(self, weights: dict | None) -> tuple[int, EpochProgress | None]:
        """:meth:`restore` without the log: ``weights`` into the model and, resuming training,
        into the optimizer, the schedule and the RNG."""
        args = self.args
        if args.finetune:
            finetune(args, weights, self.model)
            return 0, None
        if not args.resume:
            return args.start_epoch, None
        with user_errors(ValueError):
            load_state_dict_strict(self.model, weights["model"], args.resume)
        if args.eval or "optimizer" not in weights:
            return args.start_epoch, None
        hint = "resume with the flags the run started with (they are in its args.json)"
        with user_errors(ValueError, KeyError, hint=hint):
            self.optimizer.load_state_dict(weights["optimizer"])
            self.lr_scheduler.load_state_dict(weights["lr_scheduler"])
        restore_rng(weights.get("rng", []), self.info)
        if "iteration" not in weights:
            logger.info("resumed from %s after epoch %d", args.resume, weights["epoch"])
            return weights["epoch"] + 1, None
        progress = epoch_progress(args, weights, self.info)
        where = f"epoch {weights['epoch']}, iteration {progress.iteration}"
        logger.info("resumed from %s at %s", args.resume, where)
        return weights["epoch"], progress

    def save(self, epoch: int, inside: EpochProgress | None = None) -> None:
        """``checkpoint.pth`` after epoch ``epoch`` or, with ``inside``, part-way through it;
        after an epoch also a numbered copy before the LR drop and every --save_every epochs.

        Every process calls it: each one's RNG state (and running metric sums) goes in
        (:meth:`checkpoint_state`); the main process writes, atomically (:func:`write_checkpoint`).
        """
        gathered = dist.all_gather(
            {"rng": checkpoint.rng_state(), "metrics": inside.metrics if inside else None}
        )
        if not (self.info.is_main and self.args.output_dir):
            return
        state = self.checkpoint_state(epoch, gathered, inside)
        out = Path(self.args.output_dir)
        write_checkpoint(state, out / "checkpoint.pth")
        done = epoch + 1
        if inside is None and (
            done == self.args.lr_drop or (self.args.save_every and done % self.args.save_every == 0)
        ):
            write_checkpoint(state, out / f"checkpoint{epoch:04}.pth")

    def checkpoint_state(
        self, epoch: int, gathered: list[dict], inside: EpochProgress | None = None
    ) -> dict:
        """What a checkpoint holds: ``model``, ``optimizer`` and ``lr_scheduler`` states, ``epoch``,
        ``args`` (the flags, as a dict), ``config`` (the model configuration, as a dict: the
        model rebuilds from it alone) and ``rng`` (every process's RNG state, from ``gathered``,
        one ``{"rng", "metrics"}`` per process). One written inside an epoch also holds
        ``iteration`` (the batches done), ``epoch_metrics`` (per process) and ``epoch_seconds``;
        its ``epoch`` is the epoch in progress."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch,
            "args": vars(self.args),
            "config": self.config.to_dict(),
            "rng": [process["rng"] for process in gathered],
        }
        if inside is not None:
            state |= {
                "iteration": inside.iteration,
                "epoch_metrics": [process["metrics"] for process in gathered],
                "epoch_seconds": inside.seconds,
            }
        return state

    def evaluate(self) -> dict[str, float]:
        """Losses and COCO metrics of ``model`` on the validation set (:func:`engine.evaluate`)."""
        return evaluate(
            self.model, self.criterion, self.postprocessors["bbox"], self.val_loader,
            self.evaluators(), self.device, self.amp_dtype, self.info.is_main,
        )  # fmt: skip

    def train(self, start_epoch: int, progress: EpochProgress | None) -> None:
        """Epochs ``start_epoch`` to --epochs - 1, the first from ``progress`` if it stopped
        inside; each one logged (``log.txt``) and saved (:meth:`save`)."""
        args = self.args
        minutes = args.checkpoint_minutes if args.output_dir else 0  # nowhere to save
        first_step = start_epoch * self.per_epoch + (progress.iteration if progress else 0)
        with (
            StopRequests(
                save_minutes=minutes, is_main=self.info.is_main, device=self.device
            ) as stop,
            self._board(first_step) as board,
        ):
            for epoch in range(start_epoch, args.epochs):
                record, began = self._train_epoch(epoch, progress, stop, board)
                progress = None  # later epochs start at their first batch
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                    metrics = self.evaluate()
                    record |= {f"test_{k}": v for k, v in metrics.items()}
                    if board is not None:
                        self._show_evaluation(board, (epoch + 1) * self.per_epoch - 1, metrics)
                record |= {"epoch": epoch, "n_parameters": self.n_parameters}
                record["time"] = time.time() - began
                self._log_epoch(record)
                self.save(epoch)
                stop.saved()
                signum = stop.poll()[0] if epoch + 1 < args.epochs else 0
                if signum:
                    self._stopped(signum, f"after epoch {epoch}")

    def _train_epoch(
        self,
        epoch: int,
        progress: EpochProgress | None,
        stop: StopRequests,
        board: TensorBoard | None,
    ) -> tuple[dict[str, float], float]:
        """Train ``epoch`` (from ``progress`` if it stopped inside); the log record's ``train_*``
        means and the time the epoch began (earlier by the time it took before a stop)."""
        begin_epoch(self.train_loader, epoch, progress.iteration if progress else 0)
        began = time.time() - (progress.seconds if progress else 0.0)
        averager = Averager(progress.metrics if progress else None)
        resumed_at = averager.count

        def after_step(averager: Averager) -> None:
            signum, due = stop.poll()
            if not (signum or due):
                return
            self.save(epoch, EpochProgress(averager.count, averager.state(), time.time() - began))
            stop.saved()
            where = f"epoch {epoch}, iteration {averager.count} of {self.per_epoch}"
            if signum:
                self._stopped(signum, f"at {where}")
            logger.info("%s: saved %s", where, Path(self.args.output_dir) / "checkpoint.pth")

        def log_step(iteration: int, scalars: dict[str, float]) -> None:
            board.training(epoch * self.per_epoch + iteration, scalars)

        try:
            stats = train_one_epoch(
                self.trained, self.criterion, self.train_loader, self.optimizer,
                self.lr_scheduler, self.device, epoch, self.args.clip_max_norm, self.amp_dtype,
                self.info.is_main, averager=averager, after_step=after_step,
                log_step=None if board is None else log_step,
            )  # fmt: skip
        except UnreadableImage as err:
            done = EpochProgress(averager.count, averager.state(), time.time() - began)
            raise self._unreadable(err, epoch, done, saves=averager.count > resumed_at) from err
        return {f"train_{k}": v for k, v in stats.items()}, began

    def _unreadable(
        self, err: UnreadableImage, epoch: int, done: EpochProgress, saves: bool
    ) -> UserError:
        """The error that ends a run on an image it cannot read in ``epoch``, after ``done``.

        A single process saves its position first when it trained a step since it started or
        resumed (``saves``), and --resume continues there once the image is fixed. A process of
        a distributed run cannot save alone (a save gathers from every process, and the others
        are in their next step): it reports the image with its rank and leaves, and torchrun
        ends the others; the run continues from the last save.
        """
        where = f"epoch {epoch}, iteration {done.iteration} of {self.per_epoch}"
        if self.info.distributed:
            then = (
                f"stopped at {where}; {FIX_IMAGE}, then --resume auto continues from the last save"
            )
            return UserError(f"{err.original}; {then}", rank=self.info.rank)
        if not (saves and self.args.output_dir):
            return UserError(
                f"{err.original}; stopped at {where}, nothing new to save; {FIX_IMAGE}"
            )
        self.save(epoch, done)
        saved = f"saved {Path(self.args.output_dir) / 'checkpoint.pth'} at {where}"
        return UserError(
            f"{err.original}; {saved}; {FIX_IMAGE}, then --resume auto continues there"
        )

    def _stopped(self, signum: int, where: str) -> None:
        """End the run on signal ``signum`` once every process has saved (:class:`Interrupted`)."""
        output_dir = self.args.output_dir
        saved = Path(output_dir) / "checkpoint.pth" if output_dir else None
        logger.warning(
            "%s: stopped %s; %s",
            signal.Signals(signum).name,
            where,
            f"saved {saved}, --resume continues there"
            if saved
            else "nothing saved (no --output_dir)",
        )
        dist.barrier()  # no process leaves before the checkpoint is written
        raise Interrupted(signum)

    @contextlib.contextmanager
    def _board(self, first_step: int) -> Iterator[TensorBoard | None]:
        """With --tensorboard, the main process's :class:`TensorBoard` from step ``first_step`` on
        (the events an interrupted run wrote from there on are dropped); None otherwise."""
        if not (self.args.tensorboard and self.info.is_main):
            yield None
            return
        folder = Path(self.args.output_dir) / "tensorboard"
        board = TensorBoard(
            folder, every=self.args.print_freq, purge_step=first_step, hint=WRITE_HINT
        )
        try:
            yield board
        except BaseException:
            with contextlib.suppress(UserError):  # the error on its way out is the one to report
                board.close()
            raise
        board.close()

    def _show_evaluation(self, board: TensorBoard, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's AP metrics and, with --render, the drawn predictions in TensorBoard."""
        board.evaluation(step, metrics)
        if self.args.render:
            # The validation transforms draw from the generator; training goes on as without them.
            with torch.random.fork_rng(devices=[]):
                drawings = draw_predictions(
                    self.model, self.postprocessors["bbox"], self.val_set, self.args.render,
                    self.device,
                )  # fmt: skip
            board.images(step, drawings)

    def _log_epoch(self, record: dict) -> None:
        """One JSON line in ``log.txt`` and the curves so far in ``curves.png``."""
        logger.info("epoch %d: %s", record["epoch"], json.dumps(record))
        if not (self.info.is_main and self.args.output_dir):
            return
        out = Path(self.args.output_dir)
        log, curves = out / "log.txt", out / "curves.png"
        with writing(log, WRITE_HINT):
            append_record(log, record)
        with writing(curves, WRITE_HINT):
            plot_logs([log], curves)

    def finish(self) -> None:
        """With --render, the main process draws predictions on --render validation images in
        output_dir/predictions."""
        args = self.args
        if args.render and self.info.is_main and args.output_dir:
            out = Path(args.output_dir) / "predictions"
            render_predictions(
                self.model, self.postprocessors["bbox"], self.val_set, args.render, out, self.device
            )
            logger.info("drew predictions on %d validation images in %s", args.render, out)


def build_model_on(
    config: ModelConfig, args, device: torch.device
) -> tuple[nn.Module, nn.Module, dict]:
    """The model, criterion and post-processing of ``config``, with --checkpoint_backbone and
    --recompute_gelu applied, the model moved to ``device``; the model's own checks (the class
    count, the --pretrained_backbone weights) name the culprit (:class:`UserError`)."""
    with user_errors(FileNotFoundError, ValueError):
        model, criterion = build_detector(config), build_criterion(config)
    postprocessors = {"bbox": PostProcess(model.class_head)}
    set_grad_checkpointing(model, args.checkpoint_backbone)
    set_gelu_recompute(model, args.recompute_gelu)
    model.to(device)
    return model, criterion, postprocessors


def restore_rng(rng: list, info: dist.DistInfo) -> None:
    """This process's RNG state from a checkpoint's ``rng`` (one per process); with the states
    of another number of processes, the generators stay as this run seeded them."""
    if len(rng) == info.world_size:
        checkpoint.set_rng_state(rng[info.rank])
    else:
        logger.warning(
            "checkpoint has RNG states of %d processes, not %d: reseeding",
            len(rng),
            info.world_size,
        )


def resolve_args(args: argparse.Namespace, train_set) -> argparse.Namespace:
    """A copy of ``args`` with the values read from the data filled in (``args`` is unchanged).

    A run that loads whole-model weights (--resume, --finetune) does not read
    --pretrained_backbone: those weights replace it, and the file need not exist any more.
    """
    num_classes = args.num_classes or datasets.num_classes_of(train_set)
    pretrained = None if args.resume or args.finetune else args.pretrained_backbone
    return argparse.Namespace(
        **(vars(args) | {"num_classes": num_classes, "pretrained_backbone": pretrained})
    )


def build_datasets(args, info: dist.DistInfo):
    """(train set, val set, resolved args); the main process writes the built-in set first.

    The validation set is checked against the class count the training set resolves.
    """
    if not info.is_main:
        dist.barrier()
    # The data's own checks (missing files, bad annotations, class ids) name the file and entry.
    with user_errors(FileNotFoundError, ValueError):
        train_set = datasets.build_dataset("train", args)
        args = resolve_args(args, train_set)
        val_set = datasets.build_dataset("val", args)
    if info.is_main:
        dist.barrier()
    return train_set, val_set, args


class EpochBatches(BatchSampler):
    """One process's batches of an epoch: its share of a DistributedSampler, ``batch_size`` at a
    time (the last partial batch dropped), from batch ``start`` on.

    A resumed epoch starts after the batches it has done, without loading them: the batches of
    an epoch depend only on the seed and the epoch, so they are the ones it would have seen.
    ``len()`` counts the batches left; :attr:`per_epoch` all of them.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    @property
    def per_epoch(self) -> int:
        return super().__len__()

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.per_epoch - self.start


def build_loaders(args, train_set, val_set, info: dist.DistInfo) -> tuple[DataLoader, DataLoader]:
    """Loaders whose data depend only on the seed and the epoch, not on processes or workers.

    The training loader's batch sampler is an :class:`EpochBatches`; call :func:`begin_epoch`
    before each epoch. Both loaders' samples are drawn under generators seeded from (seed,
    epoch, index) (:class:`datasets.seeded.SeededDataset`), and each loader draws its workers'
    base seed from a generator of its own: neither loader, with any number of workers, draws
    from the global generator that dropout draws from, so an evaluation between two epochs
    leaves the next one as it would be without it.
    """
    train_sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed
    )
    val_sampler = DistributedSampler(
        val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False
    )
    collate = partial(collate_fn, size_divisibility=args.size_divisibility)
    common = {"collate_fn": collate, "num_workers": args.num_workers}
    # Its own generator: starting an epoch draws the workers' base seed from it rather than from
    # the global generator that dropout draws from, so a resumed epoch draws what the
    # uninterrupted one did.
    train_loader = DataLoader(
        SeededDataset(train_set, args.seed),
        batch_sampler=EpochBatches(train_sampler, args.batch_size),
        generator=torch.Generator(),
        **common,
    )
    val_loader = DataLoader(
        SeededDataset(val_set, args.seed),
        batch_size=args.batch_size,
        sampler=val_sampler,
        generator=torch.Generator(),
        **common,
    )
    if len(train_loader) == 0:
        raise UserError(
            f"--coco_path {datasets.data_root(args)}: {len(train_set)} training images give no "
            f"full batch of {args.batch_size} per process on {info.world_size} processes; "
            "lower --batch_size, or use fewer processes"
        )
    return train_loader, val_loader


def begin_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Set the training ``loader`` of :func:`build_loaders` to ``epoch``, from batch ``start``."""
    loader.dataset.set_epoch(epoch)
    loader.batch_sampler.set_epoch(epoch, start)
    loader.generator.manual_seed(hash((loader.dataset.seed, epoch)) % 2**63)


# The parameters that --lr_linear_proj_mult scales: those whose names hold one of these (the
# official Deformable DETR's lr_linear_proj_names).
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def build_optimizer(model: torch.nn.Module, args, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``--lr_backbone`` and everything else at ``--lr``; with
    ``--lr_linear_proj_mult`` other than 1, the deformable attention's sampling offsets and the
    reference-point map (:data:`LINEAR_PROJ_NAMES`) in a third group at ``--lr`` times it.

    With ``fused``, the fused implementation (one kernel over all parameters, CPU and CUDA) when
    every parameter is on such a device: the same update, faster than the per-parameter
    loop (docs/speed.md). ``fused=False`` is the official DETR optimizer
    (benchmarks compare the two).
    """
    backbone, rest, linear_proj = [], [], []
    scaled = args.lr_linear_proj_mult != 1.0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(param)
        elif scaled and any(key in name for key in LINEAR_PROJ_NAMES):
            linear_proj.append(param)
        else:
            rest.append(param)
    groups = [{"params": rest, "lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr_backbone})
    if linear_proj:
        groups.append({"params": linear_proj, "lr": args.lr * args.lr_linear_proj_mult})
    fused = fused and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def build_lr_scheduler(optimizer, args, iters_per_epoch: int):
    """Per-iteration schedule: linear warm-up, then the LR divided by 10 from ``--lr_drop`` on."""

    def factor(iteration: int) -> float:
        warmup = min(1.0, (iteration + 1) / args.warmup_iters) if args.warmup_iters else 1.0
        return warmup * (0.1 if iteration // iters_per_epoch >= args.lr_drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_weights(args) -> dict | None:
    """The checkpoint that ``--resume`` or ``--finetune`` names (None without either).

    Read before any other work, so that a file that cannot be read stops the run at once; the
    run restores from what this returns (:meth:`Run.restore`).
    """
    flag = "resume" if args.resume else "finetune" if args.finetune else None
    if flag is None:
        return None
    path = getattr(args, flag)
    with user_errors(FileNotFoundError, ValueError, hint=FILE_FLAGS[flag]):
        state = checkpoint.load(path)
    if flag == "resume" and "model" not in state:
        raise UserError(f"--resume {path} has no 'model' key; {FILE_FLAGS['resume']}")
    return state


def check_fits(args, weights: dict | None) -> None:
    """Refuse, before any data are built, ``--resume`` weights that do not fit the model the
    flags describe (built on the meta device: no memory, no initialisation cost). Needs the
    class count: without it (a checkpoint that saved none) the check waits for the loading."""
    if not args.resume or weights is None or args.num_classes is None:
        return
    with torch.device("meta"), user_errors(ValueError, FileNotFoundError):
        config = ModelConfig.from_args(args)
        model = build_detector(dataclasses.replace(config, pretrained_backbone=None))
        check_state_dict(model.state_dict(), weights["model"], args.resume)


def finetune(args, weights: dict, model) -> None:
    """Load ``--finetune`` weights; the class head only when its class count fits."""
    weights = weights.get("model", weights)
    head = class_bias(weights)
    new_classes = head is not None and head.shape != model.class_bias.shape
    with user_errors(ValueError):
        load_detr_checkpoint(model, weights, drop_class_head=new_classes)
    logger.info("fine-tuning from %s%s", args.finetune,
                ", with a new class head" if new_classes else "")  # fmt: skip


def epoch_progress(args, state: dict, info: dist.DistInfo) -> EpochProgress:
    """This process's part of a checkpoint written inside an epoch.

    The batches done are skipped, so they must hold the images they held: the same number of
    images per step (processes x --batch_size). Running sums saved by another number of
    processes are averaged, and every process continues from that average.
    """
    saved_batch = state["args"]["batch_size"] * len(state["rng"])
    if saved_batch != args.batch_size * info.world_size:
        raise UserError(
            f"--resume {args.resume} stopped inside epoch {state['epoch']} after "
            f"{state['iteration']} steps of {saved_batch} images ({len(state['rng'])} processes x "
            f"--batch_size {state['args']['batch_size']}), this run takes "
            f"{args.batch_size * info.world_size} per step; resume with {saved_batch} images per "
            "step (processes x --batch_size)"
        )
    metrics = state["epoch_metrics"]
    if len(metrics) == info.world_size:
        own = metrics[info.rank]
    else:
        names = metrics[0]["sums"]
        sums = {k: sum(m["sums"][k] for m in metrics) / len(metrics) for k in names}
        own = {"sums": sums, "count": metrics[0]["count"]}
    return EpochProgress(state["iteration"], own, state["epoch_seconds"])


def trim_log(log: Path, last_epoch: int) -> None:
    """Drop the records of ``log.txt`` after ``last_epoch``, the epochs this run trains again.

    An epoch is logged before its checkpoint is written, so an interruption between the two
    leaves a record that the resumed (or restarted) run writes again; a torn last line goes too.
    """
    if not log.is_file():
        return
    lines = log.read_text().splitlines()
    kept = [record for record in read_log(log) if record["epoch"] <= last_epoch]
    if len(kept) < len(lines):
        with writing(log, WRITE_HINT):
            write_log(log, kept)
        dropped = len(lines) - len(kept)
        logger.info("dropped %d lines after epoch %d from %s", dropped, last_epoch, log)


def write_checkpoint(state: dict, path: Path) -> None:
    """``checkpoint.save_atomic``; a write that fails ends the run with a :class:`UserError`
    that names ``path`` and, when space ran out, the space the checkpoint needs: the file it was
    to replace is intact."""
    try:
        checkpoint.save_atomic(state, path)
    except OSError as err:
        needs = ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            size, free = checkpoint.saved_size(state), shutil.disk_usage(path.parent).free
            needs = f" (it needs {size / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free)"
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was replaced"
        raise UserError(
            f"cannot write {path}: {err.strerror or err}{needs}; {kept}; free space (or fix the "
            "permissions), then --resume auto continues from the last checkpoint"
        ) from err


def build_evaluators(args, val_set) -> Callable[[], dict[str, CocoEvaluator]]:
    """Fresh evaluators for each evaluation: ``coco``, and ``coco_nms`` with --eval_nms_iou, on
    the --coco_backend COCOeval."""
    coco_gt = datasets.get_coco_api(val_set)
    backend, _ = cocoeval_backend(args.coco_backend)
    logger.info("COCO evaluation with %s (--coco_backend %s)", backend, args.coco_backend)

    def make() -> dict[str, CocoEvaluator]:
        evaluators = {"coco": CocoEvaluator(coco_gt, backend=backend)}
        if args.eval_nms_iou:
            evaluators["coco_nms"] = CocoEvaluator(
                coco_gt, nms_iou=args.eval_nms_iou, backend=backend
            )
        return evaluators

    return make
