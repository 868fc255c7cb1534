"""The pieces of a training run that main.py, the launcher, the benchmarks and the tests share:
datasets and loaders, optimizer, LR schedule, restoring and saving checkpoints, the epoch log.
"""

import argparse
import errno
import itertools
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import datasets
from datasets.coco_eval import CocoEvaluator, cocoeval_backend
from datasets.collate import collate_fn
from datasets.seeded import SeededDataset
from models import build_model
from models.detr import load_detr_checkpoint
from options import FILE_FLAGS
from tools.plot import plot_logs
from util import checkpoint, dist
from util.checkpoint import check_state_dict, load_state_dict_strict
from util.errors import UserError, user_errors, writing
from util.logs import append_record, read_log, write_log

logger = logging.getLogger("training")

# What to do when a file in --output_dir cannot be written; the checkpoints are untouched.
WRITE_HINT = (
    "checkpoint.pth is as the last save left it; free space (or fix the permissions), then "
    "--resume auto continues from it"
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
    before each epoch.
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
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, **common)
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


def build_optimizer(model: torch.nn.Module, args, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``--lr_backbone`` and everything else at ``--lr``.

    With ``fused``, the fused implementation (one kernel over all parameters, CPU and CUDA) when
    every parameter is on such a device: the same update, faster than the per-parameter
    loop (docs/speed.md). ``fused=False`` is the official DETR optimizer
    (benchmarks compare the two).
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    groups = [{"params": rest, "lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr_backbone})
    fused = fused and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def build_lr_scheduler(optimizer, args, iters_per_epoch: int):
    """Per-iteration schedule: linear warm-up, then the LR divided by 10 from ``--lr_drop`` on."""

    def factor(iteration: int) -> float:
        warmup = min(1.0, (iteration + 1) / args.warmup_iters) if args.warmup_iters else 1.0
        return warmup * (0.1 if iteration // iters_per_epoch >= args.lr_drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch got before it stopped: ``iteration`` batches done, this process's
    running metric sums (``engine.Averager.state()``) and the seconds the epoch took so far."""

    iteration: int
    metrics: dict
    seconds: float


def load_weights(args) -> dict | None:
    """The checkpoint that ``--resume`` or ``--finetune`` names (None without either).

    Read before any other work, so that a file that cannot be read stops the run at once; the
    run restores from what this returns (:func:`restore`).
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
        model = build_model(argparse.Namespace(**(vars(args) | {"pretrained_backbone": None})))[0]
        check_state_dict(model.state_dict(), weights["model"], args.resume)


def restore(
    args, weights: dict | None, model, optimizer, lr_scheduler, info: dist.DistInfo
) -> tuple[int, EpochProgress | None]:
    """Load ``weights``, the ``--resume`` or ``--finetune`` checkpoint of :func:`load_weights`.

    Returns the first epoch to train and, when the checkpoint stopped inside that epoch, how far
    it got there (None: the epoch starts at its first batch).
    """
    if args.finetune:
        finetune(args, weights, model)
        return 0, None
    if not args.resume:
        return args.start_epoch, None
    with user_errors(ValueError):
        load_state_dict_strict(model, weights["model"], args.resume)
    if args.eval or "optimizer" not in weights:
        return args.start_epoch, None
    hint = "resume with the flags the run started with (they are in its args.json)"
    with user_errors(ValueError, KeyError, hint=hint):
        optimizer.load_state_dict(weights["optimizer"])
        lr_scheduler.load_state_dict(weights["lr_scheduler"])
    rng = weights.get("rng", [])
    if len(rng) == info.world_size:
        checkpoint.set_rng_state(rng[info.rank])
    else:
        logger.warning(
            "checkpoint has RNG states of %d processes, not %d: reseeding",
            len(rng),
            info.world_size,
        )
    if "iteration" not in weights:
        logger.info("resumed from %s after epoch %d", args.resume, weights["epoch"])
        return weights["epoch"] + 1, None
    progress = epoch_progress(args, weights, info)
    where = f"epoch {weights['epoch']}, iteration {progress.iteration}"
    logger.info("resumed from %s at %s", args.resume, where)
    return weights["epoch"], progress


def finetune(args, weights: dict, model) -> None:
    """Load ``--finetune`` weights; the class head only when its class count fits."""
    weights = weights.get("model", weights)
    head = weights.get("class_embed.bias")
    new_classes = head is not None and head.shape != model.class_embed.bias.shape
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


def save(
    args,
    epoch: int,
    model,
    optimizer,
    lr_scheduler,
    info: dist.DistInfo,
    inside: EpochProgress | None = None,
) -> None:
    """``checkpoint.pth`` after epoch ``epoch`` or, with ``inside``, part-way through it; after an
    epoch also a numbered copy before the LR drop and every N epochs.

    Every process calls it: each one's RNG state (and running metric sums) goes in. A checkpoint
    written inside an epoch also holds ``iteration`` (the batches done), ``epoch_metrics`` (per
    process) and ``epoch_seconds``; its ``epoch`` is the epoch in progress.
    """
    gathered = dist.all_gather(
        {"rng": checkpoint.rng_state(), "metrics": inside.metrics if inside else None}
    )
    if not (info.is_main and args.output_dir):
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": vars(args),
        "rng": [process["rng"] for process in gathered],
    }
    out = Path(args.output_dir)
    if inside is not None:
        state |= {
            "iteration": inside.iteration,
            "epoch_metrics": [process["metrics"] for process in gathered],
            "epoch_seconds": inside.seconds,
        }
    write_checkpoint(state, out / "checkpoint.pth")
    done = epoch + 1
    if inside is None and (
        done == args.lr_drop or (args.save_every and done % args.save_every == 0)
    ):
        write_checkpoint(state, out / f"checkpoint{epoch:04}.pth")


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


def log_epoch(args, record: dict, info: dist.DistInfo) -> None:
    """One JSON line in ``log.txt`` and the curves so far in ``curves.png``."""
    logger.info("epoch %d: %s", record["epoch"], json.dumps(record))
    if not (info.is_main and args.output_dir):
        return
    log, curves = Path(args.output_dir) / "log.txt", Path(args.output_dir) / "curves.png"
    with writing(log, WRITE_HINT):
        append_record(log, record)
    with writing(curves, WRITE_HINT):
        plot_logs([log], curves)


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
