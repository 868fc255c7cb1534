"""The pieces of a training run that main.py, the launcher, the benchmarks and the tests share:
datasets and loaders, optimizer, LR schedule, restoring and saving checkpoints, the epoch log.
"""

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import datasets
from datasets.coco_eval import CocoEvaluator, cocoeval_backend
from datasets.collate import collate_fn
from datasets.seeded import SeededDataset
from models.detr import load_detr_checkpoint
from tools.plot import plot_logs
from util import checkpoint, dist
from util.checkpoint import load_state_dict_strict
from util.logs import append_record, read_log, write_log

logger = logging.getLogger("training")


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
    train_set = datasets.build_dataset("train", args)
    args = resolve_args(args, train_set)
    val_set = datasets.build_dataset("val", args)
    if info.is_main:
        dist.barrier()
    return train_set, val_set, args


def build_loaders(args, train_set, val_set, info: dist.DistInfo) -> tuple[DataLoader, DataLoader]:
    """Loaders whose data depend only on the seed and the epoch, not on processes or workers."""
    train_sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed
    )
    val_sampler = DistributedSampler(
        val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False
    )
    collate = partial(collate_fn, size_divisibility=args.size_divisibility)
    common = {"collate_fn": collate, "num_workers": args.num_workers}
    train_loader = DataLoader(
        SeededDataset(train_set, args.seed),
        batch_sampler=BatchSampler(train_sampler, args.batch_size, drop_last=True),
        **common,
    )
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, **common)
    if len(train_loader) == 0:
        raise SystemExit(
            f"{len(train_set)} training images give no full batch of {args.batch_size} per "
            f"process on {info.world_size} processes: lower --batch_size"
        )
    return train_loader, val_loader


def build_optimizer(model: torch.nn.Module, args, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``--lr_backbone`` and everything else at ``--lr``.

    With ``fused``, the fused implementation (one kernel over all parameters, CPU and CUDA) when
    every parameter is on such a device: the same update, faster than the per-parameter
    loop (README, "Speed and memory"). ``fused=False`` is the official DETR optimizer
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


def restore(args, model, optimizer, lr_scheduler, info: dist.DistInfo) -> int:
    """Load ``--resume`` or ``--finetune``; return the first epoch to train."""
    if args.finetune:
        weights = checkpoint.load(args.finetune)
        weights = weights.get("model", weights)
        head = weights.get("class_embed.bias")
        new_classes = head is not None and head.shape != model.class_embed.bias.shape
        load_detr_checkpoint(model, weights, drop_class_head=new_classes)
        logger.info("fine-tuning from %s%s", args.finetune,
                    ", with a new class head" if new_classes else "")  # fmt: skip
        return 0
    if not args.resume:
        return args.start_epoch
    state = checkpoint.load(args.resume)
    if "model" not in state:
        raise ValueError(f"{args.resume} has no 'model' key; is it a checkpoint of this repo?")
    load_state_dict_strict(model, state["model"], args.resume)
    if args.eval or "optimizer" not in state:
        return args.start_epoch
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = state.get("rng", [])
    if len(rng) == info.world_size:
        checkpoint.set_rng_state(rng[info.rank])
    else:
        logger.warning(
            "checkpoint has RNG states of %d processes, not %d: reseeding",
            len(rng),
            info.world_size,
        )
    logger.info("resumed from %s after epoch %d", args.resume, state["epoch"])
    return state["epoch"] + 1


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
        write_log(log, kept)
        dropped = len(lines) - len(kept)
        logger.info("dropped %d lines after epoch %d from %s", dropped, last_epoch, log)


def save(args, epoch: int, model, optimizer, lr_scheduler, info: dist.DistInfo) -> None:
    """``checkpoint.pth`` every epoch; a numbered copy before the LR drop and every N epochs."""
    rng = dist.all_gather(checkpoint.rng_state())
    if not (info.is_main and args.output_dir):
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": vars(args),
        "rng": rng,
    }
    out = Path(args.output_dir)
    checkpoint.save_atomic(state, out / "checkpoint.pth")
    done = epoch + 1
    if done == args.lr_drop or (args.save_every and done % args.save_every == 0):
        checkpoint.save_atomic(state, out / f"checkpoint{epoch:04}.pth")


def log_epoch(args, record: dict, info: dist.DistInfo) -> None:
    """One JSON line in ``log.txt`` and the curves so far in ``curves.png``."""
    logger.info("epoch %d: %s", record["epoch"], json.dumps(record))
    if not (info.is_main and args.output_dir):
        return
    log = Path(args.output_dir) / "log.txt"
    append_record(log, record)
    plot_logs([log], Path(args.output_dir) / "curves.png")


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
