"""Train and evaluate PVT + DETR.

    python main.py                                       # built-in synthetic dataset, one process
    python -m torch.distributed.run --nproc_per_node=8 main.py --backbone pvt_small \\
        --coco_path /data/coco --dataset_file coco --output_dir outputs/pvt_small
    python main.py --eval --resume outputs/pvt_small/checkpoint.pth --dataset_file coco ...
    python run_with_submitit.py --nodes 2 --ngpus 8 ...  # SLURM, see docs/cluster.md

Flag names and meanings follow the official DETR code; defaults follow the PVT + DETR recipe of
the PVT paper (50 epochs, LR divided by 10 after epoch 33).
"""

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import datasets
from datasets.coco_eval import BACKENDS, CocoEvaluator, cocoeval_backend
from datasets.collate import collate_fn
from datasets.seeded import SeededDataset
from engine import evaluate, train_one_epoch
from models import build_model
from models.detr import load_detr_checkpoint
from models.pvt import set_gelu_recompute, set_grad_checkpointing
from util import checkpoint, dist
from util.checkpoint import load_state_dict_strict
from util.cpu import configure_malloc
from util.plot import plot_logs
from util.render import render_predictions

logger = logging.getLogger("main")

BACKBONES = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "resnet50")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("PVT + DETR", add_help=False)
    add = parser.add_argument
    # optimisation
    add("--lr", default=1e-4, type=float)
    add("--lr_backbone", default=1e-5, type=float, help="0 freezes the backbone")
    add("--batch_size", default=2, type=int, help="images per process")
    add("--weight_decay", default=1e-4, type=float)
    add("--epochs", default=50, type=int)
    add("--lr_drop", default=33, type=int, help="divide the LR by 10 from this epoch on")
    add("--warmup_iters", default=0, type=int, help="linear LR warm-up over this many steps")
    add("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    add("--amp", default="none", choices=("none", "bf16"), help="autocast precision")
    add(
        "--checkpoint_backbone",
        action="store_true",
        help="PVT blocks recompute their activations in the backward pass: less memory, slower",
    )
    add(
        "--recompute_gelu",
        action="store_true",
        help="PVT MLPs recompute GELU in the backward pass instead of keeping its output: less "
        "memory for a few percent of time (see README, Speed and memory)",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (the first steps compile; evaluation is eager)",
    )
    # model
    add("--backbone", default="pvt_small", choices=BACKBONES)
    add("--pretrained_backbone", default=None, help="PVT v1 ImageNet (or torchvision) weights")
    add(
        "--feature_stage",
        default=4,
        type=int,
        choices=(1, 2, 3, 4),
        help="PVT stage that feeds the transformer (4: stride 32, the paper's)",
    )
    add("--drop_path", default=0.1, type=float, help="backbone stochastic depth rate")
    add("--position_embedding", default="sine", choices=("sine", "learned"))
    add("--enc_layers", default=6, type=int)
    add("--dec_layers", default=6, type=int)
    add("--dim_feedforward", default=2048, type=int)
    add("--hidden_dim", default=256, type=int)
    add("--dropout", default=0.1, type=float)
    add("--nheads", default=8, type=int)
    add("--num_queries", default=100, type=int)
    add("--pre_norm", action="store_true")
    add(
        "--num_classes",
        default=None,
        type=int,
        help="largest category id + 1 (default: read from the training annotations)",
    )
    # loss and matcher
    add("--no_aux_loss", action="store_true", help="no losses on the earlier decoder layers")
    add("--set_cost_class", default=1, type=float)
    add("--set_cost_bbox", default=5, type=float)
    add("--set_cost_giou", default=2, type=float)
    add("--bbox_loss_coef", default=5, type=float)
    add("--giou_loss_coef", default=2, type=float)
    add("--eos_coef", default=0.1, type=float, help="class weight of no-object")
    # data: --dataset_file, --coco_path, augmentation and built-in dataset flags
    datasets.add_dataset_args(parser)
    # run
    add("--output_dir", default="", help="where to save; empty: save nothing")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--seed", default=42, type=int)
    add(
        "--resume",
        default="",
        help="checkpoint to continue from (model, optimizer, epoch); 'auto': output_dir/"
        "checkpoint.pth if it exists (then --finetune is not used), else start fresh",
    )
    add("--finetune", default="", help="weights to start from at epoch 0, fresh optimizer")
    add("--start_epoch", default=0, type=int)
    add("--eval", action="store_true", help="evaluate --resume and exit")
    add("--eval_every", default=1, type=int, help="evaluate every N epochs (and the last)")
    add(
        "--eval_nms_iou",
        default=0.0,
        type=float,
        help="also report COCO metrics after class-wise NMS at this IoU, as coco_nms_* (0: off)",
    )
    add(
        "--coco_backend",
        default="auto",
        choices=BACKENDS,
        help="COCOeval implementation, same numbers; auto: faster_coco_eval if installed "
        "(pip install faster-coco-eval), else pycocotools",
    )
    add("--save_every", default=0, type=int, help="also keep checkpointNNNN.pth every N epochs")
    add("--render", default=0, type=int, help="draw predictions on N validation images")
    add("--num_workers", default=2, type=int)
    add("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    add("--dist_url", default="env://", help="rendezvous for torch.distributed")
    return parser


def setup_logging(output_dir: str, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "out.log"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def resolve_resume(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with ``--resume auto`` replaced (``args`` is unchanged).

    ``auto`` becomes ``output_dir/checkpoint.pth`` when that exists (and ``--finetune`` is then
    dropped: the run continues from its own checkpoint), else "" (start fresh).
    """
    if args.resume != "auto":
        return args
    if not args.output_dir:
        raise SystemExit("--resume auto continues the run saved in --output_dir: pass --output_dir")
    found = Path(args.output_dir) / "checkpoint.pth"
    if not found.is_file():
        return argparse.Namespace(**(vars(args) | {"resume": ""}))
    return argparse.Namespace(**(vars(args) | {"resume": str(found), "finetune": ""}))


def check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.eval_nms_iou <= 1.0:
        raise SystemExit(f"--eval_nms_iou {args.eval_nms_iou}: pass an IoU in (0, 1], or 0 for off")
    if args.resume and args.finetune:
        raise SystemExit("--resume continues a run, --finetune starts a new one: pass only one")
    if args.eval and not args.resume:
        raise SystemExit("--eval needs --resume PATH, the checkpoint to evaluate")
    for flag in ("checkpoint_backbone", "recompute_gelu"):
        if getattr(args, flag) and args.backbone == "resnet50":
            raise SystemExit(f"--{flag} applies to PVT backbones: drop it for resnet50")
    if args.checkpoint_backbone and args.recompute_gelu:
        raise SystemExit(
            "--checkpoint_backbone already recomputes whole blocks: drop --recompute_gelu"
        )
    existing = Path(args.output_dir or ".") / "checkpoint.pth"
    if args.output_dir and existing.exists() and not args.resume and not args.eval:
        raise SystemExit(
            f"{existing} exists: pass --resume {existing} to continue that run, "
            "or choose another --output_dir (nothing was overwritten)"
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
    common = {"collate_fn": collate_fn, "num_workers": args.num_workers}
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
    every parameter is on such a device: the same update, about 3x faster than the per-parameter
    loop on the CPU. ``fused=False`` is the official DETR optimizer (benchmarks compare the two).
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
    """Drop the lines of ``log.txt`` after ``last_epoch``, the epochs this run trains again.

    An epoch is logged before its checkpoint is written, so an interruption between the two
    leaves a line that the resumed (or restarted) run writes again.
    """
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_epoch(line) <= last_epoch]
    if len(kept) < len(lines):
        log.write_text("".join(kept))
        dropped = len(lines) - len(kept)
        logger.info("dropped %d lines after epoch %d from %s", dropped, last_epoch, log)


def _logged_epoch(line: str) -> float:
    """The epoch of a ``log.txt`` line; infinity for a line cut short by a kill."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


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
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")
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


def main(args: argparse.Namespace, dist_info: dist.DistInfo | None = None) -> None:
    """Train (or evaluate with --eval) as one process of ``dist_info``.

    ``dist_info`` None: rank and world size come from the environment (torch.distributed.run).
    """
    resolved = resolve_resume(args)
    check_args(resolved)
    configure_malloc()
    info = dist.init_distributed(args.device, args.dist_url, dist_info)
    setup_logging(args.output_dir, info.is_main)
    if args.resume == "auto":
        logger.info("--resume auto: %s", resolved.resume or "no checkpoint yet, starting fresh")
    args = resolved
    device = torch.device(
        f"cuda:{info.local_rank}" if args.device == "cuda" and info.distributed else args.device
    )
    torch.manual_seed(args.seed + info.rank)
    random.seed(args.seed + info.rank)

    train_set, val_set, args = build_datasets(args, info)
    if info.is_main and args.output_dir:
        (Path(args.output_dir) / "args.json").write_text(json.dumps(vars(args), indent=1))

    model, criterion, postprocessors = build_model(args)
    set_grad_checkpointing(model, args.checkpoint_backbone)
    set_gelu_recompute(model, args.recompute_gelu)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s + DETR: %.2fM trainable parameters", args.backbone, n_parameters / 1e6)
    train_loader, val_loader = build_loaders(args, train_set, val_set, info)
    optimizer = build_optimizer(model, args)
    lr_scheduler = build_lr_scheduler(optimizer, args, len(train_loader))
    start_epoch = restore(args, model, optimizer, lr_scheduler, info)
    if info.is_main and args.output_dir and not args.eval:
        trim_log(Path(args.output_dir) / "log.txt", start_epoch - 1)
    trained = DistributedDataParallel(model) if info.distributed else model
    trained = torch.compile(trained) if args.compile else trained
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    evaluators = build_evaluators(args, val_set)
    progress = info.is_main

    def evaluate_now() -> dict[str, float]:
        return evaluate(
            model, criterion, postprocessors["bbox"], val_loader, evaluators(), device, amp_dtype,
            progress,
        )  # fmt: skip

    if args.eval:
        stats = evaluate_now()
        logger.info("evaluation of %s: %s", args.resume, json.dumps(stats))
        finish(args, model, postprocessors, val_set, device, info)
        return
    if start_epoch >= args.epochs:
        logger.info(
            "%s already finished %d epochs (--epochs %d): nothing to do",
            args.resume,
            start_epoch,
            args.epochs,
        )
        return

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        train_loader.dataset.set_epoch(epoch)
        train_loader.batch_sampler.sampler.set_epoch(epoch)
        record = {
            f"train_{k}": v
            for k, v in train_one_epoch(
                trained,
                criterion,
                train_loader,
                optimizer,
                lr_scheduler,
                device,
                epoch,
                args.clip_max_norm,
                amp_dtype,
                progress,
            ).items()
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            record |= {f"test_{k}": v for k, v in evaluate_now().items()}
        record |= {"epoch": epoch, "n_parameters": n_parameters, "time": time.time() - start}
        log_epoch(args, record, info)
        save(args, epoch, model, optimizer, lr_scheduler, info)
    finish(args, model, postprocessors, val_set, device, info)


def finish(args, model, postprocessors, val_set, device, info: dist.DistInfo) -> None:
    if args.render and info.is_main and args.output_dir:
        out = Path(args.output_dir) / "predictions"
        render_predictions(model, postprocessors["bbox"], val_set, args.render, out, device)
        logger.info("drew predictions on %d validation images in %s", args.render, out)
    dist.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser("PVT + DETR", parents=[get_args_parser()])
    main(parser.parse_args())
