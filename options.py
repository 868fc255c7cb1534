"""The flags of ``main.py`` (the launcher, predict.py and the benchmarks read them too) and the
checks that refuse, before any work is done, a bad combination and a file the flags name that
cannot be read or written (:class:`util.errors.UserError`).

Flag names and meanings follow the official DETR code; defaults follow the PVT + DETR recipe of
the PVT paper (50 epochs, LR divided by 10 after epoch 33).
"""

import argparse
import os
from pathlib import Path

import torch

import datasets
from datasets.coco_eval import BACKENDS
from models.backbone import BACKBONES
from util import tensorboard
from util.errors import UserError

# Between two saves inside an epoch: a PVT-Small + DETR checkpoint is 500 MB, a few seconds to
# write on a cluster file system; every 10 minutes that is under 1% of the training time (README,
# "What an interruption costs").
CHECKPOINT_MINUTES = 10.0


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
    # training devices (README, "Query groups, anchor queries, denoising"); all off: vanilla DETR
    add(
        "--query_groups",
        default=1,
        type=int,
        help="train K groups of --num_queries queries, matched per group (Group DETR); "
        "evaluation uses group 0",
    )
    add(
        "--anchor_queries",
        action="store_true",
        help="queries are learned anchor boxes refined by every decoder layer (DAB-DETR)",
    )
    add(
        "--dn_groups",
        default=0,
        type=int,
        help="N groups of noised ground truth as extra queries in training (DN-DETR); "
        "needs --anchor_queries",
    )
    add("--dn_box_noise", default=0.4, type=float, help="denoising box noise scale")
    add("--dn_label_noise", default=0.2, type=float, help="denoising label flip probability")
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
    add(
        "--checkpoint_minutes",
        default=CHECKPOINT_MINUTES,
        type=float,
        help="also save checkpoint.pth inside an epoch every M minutes (0: only after epochs and "
        "on SIGTERM / SIGUSR2): a crash loses at most M minutes",
    )
    add(
        "--render",
        default=0,
        type=int,
        help="draw predictions on N validation images (small images enlarged to about 512 px)",
    )
    add(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard events in output_dir/tensorboard (pip install -e '.[tensorboard]')",
    )
    add(
        "--print_freq",
        default=50,
        type=int,
        help="with --tensorboard, write the training scalars every N iterations",
    )
    add("--num_workers", default=2, type=int)
    add("--dist_url", default="env://", help="rendezvous for torch.distributed")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """``main.py``'s flags parsed from ``argv`` (defaults for the ones not given)."""
    return argparse.ArgumentParser("PVT + DETR", parents=[get_args_parser()]).parse_args(argv)


def resolve_resume(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with ``--resume auto`` replaced (``args`` is unchanged).

    ``auto`` becomes ``output_dir/checkpoint.pth`` when that exists (and ``--finetune`` is then
    dropped: the run continues from its own checkpoint), else "" (start fresh).
    """
    if args.resume != "auto":
        return args
    if not args.output_dir:
        raise UserError("--resume auto continues the run saved in --output_dir; pass --output_dir")
    found = Path(args.output_dir) / "checkpoint.pth"
    if not found.is_file():
        return argparse.Namespace(**(vars(args) | {"resume": ""}))
    return argparse.Namespace(**(vars(args) | {"resume": str(found), "finetune": ""}))


# The training switches. The first three shape the model's parameters (K groups of query
# embeddings, anchor boxes, the denoising label embedding), so a checkpoint loads only into a model
# built with its own; the two noise scales go with them so that a resumed run trains as it did.
SWITCH_FLAGS = ("query_groups", "anchor_queries", "dn_groups", "dn_box_noise", "dn_label_noise")


def adopt_switches(args: argparse.Namespace, saved: dict | None) -> argparse.Namespace:
    """A copy of ``args`` whose training switches are those of the ``--resume`` checkpoint
    ``saved`` (as :func:`training.load_weights` returns it), where the command line leaves them at
    their defaults: ``--eval --resume run/checkpoint.pth`` rebuilds the model the run trained,
    as ``predict.py`` does. A switch given with a value other than the checkpoint's is refused.
    ``args`` is returned as it is without ``--resume`` or when the checkpoint saved no flags
    (DETR's official checkpoints save theirs, which have no switches: the defaults stay).
    """
    saved_args = (saved or {}).get("args") if args.resume else None
    if not isinstance(saved_args, dict):
        return args
    parser = get_args_parser()
    adopted = {}
    for flag in SWITCH_FLAGS:
        if flag not in saved_args or saved_args[flag] == getattr(args, flag):
            continue
        if getattr(args, flag) != parser.get_default(flag):
            raise UserError(
                f"--{flag} {getattr(args, flag)}: --resume {args.resume} was trained with "
                f"--{flag} {saved_args[flag]}, and its weights fit only that model; drop the flag "
                f"(the checkpoint's value is used) or pass {saved_args[flag]}"
            )
        adopted[flag] = saved_args[flag]
    return argparse.Namespace(**(vars(args) | adopted)) if adopted else args


# Flags that take a count or a duration, and their least meaningful value.
NUMBERS_AT_LEAST = {
    "batch_size": 1,
    "epochs": 1,
    "eval_every": 1,
    "save_every": 0,
    "num_workers": 0,
    "render": 0,
    "warmup_iters": 0,
    "checkpoint_minutes": 0,
    "print_freq": 1,
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse a flag value or combination that cannot work, naming the flags (no files read)."""
    for flag, least in NUMBERS_AT_LEAST.items():
        if getattr(args, flag) < least:
            raise UserError(f"--{flag} {getattr(args, flag)}: pass a number >= {least}")
    if not 0.0 <= args.eval_nms_iou <= 1.0:
        raise UserError(f"--eval_nms_iou {args.eval_nms_iou}: pass an IoU in (0, 1], or 0 for off")
    if args.resume and args.finetune:
        raise UserError("--resume continues a run, --finetune starts a new one; pass only one")
    if args.eval and not args.resume:
        raise UserError("--eval needs the checkpoint to evaluate; pass --resume PATH")
    if args.tensorboard and (args.eval or not args.output_dir):
        raise UserError(
            "--tensorboard records training in --output_dir; pass --output_dir, without --eval"
        )
    if args.tensorboard:
        tensorboard.check_installed()
    for flag in ("checkpoint_backbone", "recompute_gelu"):
        if getattr(args, flag) and args.backbone == "resnet50":
            raise UserError(f"--{flag} applies to PVT backbones; drop it for resnet50")
    if args.backbone == "resnet50" and args.feature_stage != 4:
        raise UserError(
            f"--feature_stage {args.feature_stage} applies to PVT backbones; resnet50 uses its "
            "last stage, drop --feature_stage"
        )
    if args.checkpoint_backbone and args.recompute_gelu:
        raise UserError(
            "--checkpoint_backbone already recomputes whole blocks; drop --recompute_gelu"
        )
    existing = Path(args.output_dir or ".") / "checkpoint.pth"
    if args.output_dir and existing.exists() and not args.resume and not args.eval:
        raise UserError(
            f"{existing} exists (nothing was overwritten); pass --resume {existing} to continue "
            "that run, or choose another --output_dir"
        )
    if args.query_groups < 1 or args.dn_groups < 0:
        raise UserError(
            f"--query_groups {args.query_groups}, --dn_groups {args.dn_groups}: out of range; "
            "--query_groups takes 1 or more (1: off), --dn_groups 0 or more (0: off)"
        )
    if args.dn_groups and not args.anchor_queries:
        raise UserError("--dn_groups noises anchor boxes; add --anchor_queries")
    if args.dn_box_noise < 0 or not 0 <= args.dn_label_noise <= 1:
        raise UserError(
            f"--dn_box_noise {args.dn_box_noise}, --dn_label_noise {args.dn_label_noise}: out of "
            "range; --dn_box_noise takes 0 or more, --dn_label_noise a probability in [0, 1]"
        )


# What each flag that names a file wants, for the error that says it is missing.
FILE_FLAGS = {
    "resume": "pass the checkpoint.pth of a main.py run (or --resume auto)",
    "finetune": "pass DETR weights: a main.py checkpoint or an official DETR one",
    "pretrained_backbone": "pass the PVT v1 ImageNet (or torchvision) weights you downloaded",
}


def check_files(args: argparse.Namespace) -> None:
    """Refuse, naming the flag and the path, a file or folder the run would fail to read or
    write: checked in a moment, before the data are built or a job is queued."""
    for flag in ("resume", "finetune"):
        if getattr(args, flag):
            readable_file(flag, getattr(args, flag))
    if args.pretrained_backbone and not (args.resume or args.finetune):
        readable_file("pretrained_backbone", args.pretrained_backbone)
    if args.dataset_file == "coco":
        check_coco_root(args.coco_path)
    elif args.coco_path is not None and Path(args.coco_path).is_file():
        raise UserError(
            f"--coco_path {args.coco_path} is a file; pass the folder to generate the built-in "
            "set into"
        )
    if args.output_dir:
        writable_folder("output_dir", Path(args.output_dir))


def readable_file(flag: str, path: str) -> None:
    if not Path(path).is_file():
        what = "no such file" if not Path(path).exists() else "not a file"
        raise UserError(f"--{flag} {path}: {what}; {FILE_FLAGS[flag]}")
    if not os.access(path, os.R_OK):
        raise UserError(f"--{flag} {path}: not readable (permissions); check the file's mode")


def check_coco_root(root: str | None) -> None:
    """The COCO 2017 layout under ``--coco_path``: both splits' folders and annotation files."""
    layout = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"
    if root is None:
        raise UserError(f"--dataset_file coco needs --coco_path; pass the folder holding {layout}")
    for part in ("train2017", "val2017"):
        folder = Path(root) / part
        ann_file = Path(root) / "annotations" / f"instances_{part}.json"
        if not folder.is_dir():
            raise UserError(f"--coco_path {root}: no {folder}; pass the folder holding {layout}")
        if not ann_file.is_file() or not os.access(ann_file, os.R_OK):
            raise UserError(
                f"--coco_path {root}: cannot read {ann_file}; pass the folder holding {layout}"
            )


def writable_folder(flag: str, folder: Path) -> None:
    """``folder`` (where --``flag`` writes) is, or can be created as, a folder this process can
    write in."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--{flag}: {folder} is a file; pass a path in a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"--{flag}: cannot write in {existing}; pass a path you can write to")
