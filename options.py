"""The flags of ``main.py`` (the launcher, predict.py and the benchmarks read them too) and the
checks that refuse, before any work is done, a bad combination and a file the flags name that
cannot be read or written (:class:`util.errors.UserError`).

Flag names and meanings follow the official DETR code; defaults follow the PVT + DETR recipe of
the PVT paper (50 epochs, LR divided by 10 after epoch 33). The training aids add their own flags
(:mod:`models.aids`). A recipe can live in a file: ``main.py @configs/demo.txt`` reads flags from
it (any number per line, ``#`` starts a comment; later flags override earlier ones).

The model's, the loss's and the aids' flags are the architecture (:mod:`models.config`) that a
checkpoint saves and rebuilds (:func:`checkpoint_flags`).
"""

import argparse
import os
from pathlib import Path

import torch

import datasets
from datasets.coco_eval import BACKENDS
from models import TRANSFORMERS, rebuild_detector
from models.aids import add_aid_args, check_aid_args
from models.backbone import BACKBONES
from models.classification import CLASS_HEADS
from models.config import architecture_flags
from models.detr import DETR
from models.postprocess import PostProcess
from util import tensorboard
from util.errors import UserError, user_errors

# Between two saves inside an epoch: a PVT-Small + DETR checkpoint is 500 MB, a few seconds to
# write on a cluster file system; every 10 minutes that is under 1% of the training time
# (docs/reliability.md).
CHECKPOINT_MINUTES = 10.0


class RecipeParser(argparse.ArgumentParser):
    """An argument parser that also reads flags from ``@file`` recipes: any number of flags per
    line, ``#`` starts a comment, a recipe may name other recipes (``@configs/demo_data.txt``),
    and a flag given later overrides an earlier one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return arg_line.split("#", 1)[0].split()


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags in --help order: optimisation, the "model" and "loss" groups, the aids',
    the data's, then the run's (output, resuming, evaluation, logging)."""
    parser = RecipeParser("PVT + DETR", add_help=False)
    add_optimisation_args(parser)
    add_model_args(parser)
    add_loss_args(parser)
    add_aid_args(parser)  # training aids (models/aids); all off: vanilla DETR
    datasets.add_dataset_args(parser)  # --dataset_file, --coco_path, augmentation, built-in set
    add_run_args(parser)
    return parser


def add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    """Learning rates, batch, epochs and schedule, gradient clipping, precision, memory and the
    backbone's pretrained weights."""
    add = parser.add_argument
    add("--lr", default=1e-4, type=float)
    add("--lr_backbone", default=1e-5, type=float, help="0 freezes the backbone")
    add(
        "--lr_linear_proj_mult",
        default=1.0,
        type=float,
        help="the deformable attention's sampling offsets and the reference-point map train at "
        "--lr times this (Deformable DETR's recipe: 0.1)",
    )
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
        "memory for a few percent of time (docs/speed.md)",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (the first steps compile; evaluation is eager)",
    )
    add(
        "--pretrained_backbone",
        default=None,
        type=lambda path: path or None,
        help="PVT v1 ImageNet (or torchvision) weights ('': none, e.g. over a recipe's)",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The "model" group: backbone, transformer, queries and class head."""
    model = parser.add_argument_group("model", "the architecture; checkpoints save it")
    model.add_argument("--backbone", default="pvt_small", choices=BACKBONES)
    model.add_argument(
        "--feature_stage",
        default=4,
        type=int,
        choices=(1, 2, 3, 4),
        help="PVT stage that feeds the transformer (4: stride 32, the paper's)",
    )
    model.add_argument("--drop_path", default=0.1, type=float, help="backbone stochastic depth")
    model.add_argument("--position_embedding", default="sine", choices=("sine", "learned"))
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=2048, type=int)
    model.add_argument("--hidden_dim", default=256, type=int)
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=100, type=int)
    model.add_argument("--pre_norm", action="store_true")
    model.add_argument(
        "--transformer",
        default="detr",
        choices=TRANSFORMERS,
        help="detr: DETR's, over the --feature_stage map; deformable: Deformable DETR's "
        "multi-scale deformable attention over --num_feature_levels levels",
    )
    add_deformable_args(model)
    model.add_argument(
        "--num_classes",
        default=None,
        type=int,
        help="largest category id + 1 (default: read from the training annotations)",
    )
    model.add_argument(
        "--cls_loss",
        default="softmax",
        choices=tuple(CLASS_HEADS),
        help="class-head convention (softmax: DETR's, with a no-object class; focal: Deformable "
        "DETR's sigmoid focal loss, whose recipe also passes --cls_loss_coef 2 --set_cost_class 2)",
    )


def add_deformable_args(model: argparse._ArgumentGroup) -> None:
    """The "model" group's flags of --transformer deformable: levels, samples, box refinement."""
    model.add_argument(
        "--num_feature_levels",
        default=4,
        type=int,
        help="(deformable) levels: the backbone's stages from stride 8 to --feature_stage, then "
        "extra levels at twice the stride each (4 with stage 4: strides 8, 16, 32, 64)",
    )
    model.add_argument(
        "--enc_n_points", default=4, type=int, help="(deformable) encoder samples per head, level"
    )
    model.add_argument(
        "--dec_n_points", default=4, type=int, help="(deformable) decoder samples per head, level"
    )
    model.add_argument(
        "--box_refine",
        action="store_true",
        help="(deformable) a box head per decoder layer, each layer's box the next one's "
        "reference (Deformable DETR's --with_box_refine)",
    )
    model.add_argument(
        "--query_pos_from_boxes",
        action="store_true",
        help="(deformable) every decoder layer computes each query's position from its "
        "reference box, an MLP of the box's sine encoding (DINO); needs --two_stage "
        "--mixed_selection",
    )
    model.add_argument(
        "--look_forward_twice",
        action="store_true",
        help="(deformable, --box_refine) a layer's box loss also reaches the previous layer's "
        "box (DINO)",
    )


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """The "loss" group: matching costs and loss weights."""
    loss = parser.add_argument_group("loss", "matching costs and loss weights")
    loss.add_argument("--no_aux_loss", action="store_true", help="no earlier decoder layer losses")
    loss.add_argument("--set_cost_class", default=1, type=float)
    loss.add_argument("--set_cost_bbox", default=5, type=float)
    loss.add_argument("--set_cost_giou", default=2, type=float)
    loss.add_argument("--cls_loss_coef", default=1, type=float, help="class loss weight")
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--eos_coef", default=0.1, type=float, help="class weight of no-object")
    loss.add_argument("--focal_alpha", default=0.25, type=float, help="--cls_loss focal's alpha")
    loss.add_argument("--focal_gamma", default=2.0, type=float, help="--cls_loss focal's gamma")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Where to save, device and seed, resuming, evaluation, checkpoints, drawing and logging."""
    add = parser.add_argument
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


def parse(argv: list[str]) -> argparse.Namespace:
    """``main.py``'s flags parsed from ``argv`` (defaults for the ones not given)."""
    return RecipeParser("PVT + DETR", parents=[get_args_parser()]).parse_args(argv)


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


def checkpoint_flags() -> list[str]:
    """The flags a checkpoint's model is rebuilt from (:func:`models.config.architecture_flags`):
    the model configuration's, the loss's and every aid's."""
    return architecture_flags()


def adopt_checkpoint_flags(args: argparse.Namespace, saved: dict | None) -> argparse.Namespace:
    """A copy of ``args`` whose architecture flags (:func:`checkpoint_flags`) are those of the
    ``--resume`` checkpoint ``saved`` (as :func:`training.load_weights` returns it), where the
    command line leaves them at their defaults: ``--eval --resume run/checkpoint.pth`` with the
    data flags alone rebuilds the model the run trained. A flag given with a value other than
    the checkpoint's is refused, naming both. ``args`` is returned as it is without ``--resume``
    or when the checkpoint saved no flags (DETR's official checkpoints save theirs, of another
    parser: flags this one lacks are ignored, and the defaults stay for the rest).
    """
    saved_args = (saved or {}).get("args") if args.resume else None
    if not isinstance(saved_args, dict):
        return args
    parser = get_args_parser()
    adopted = {}
    for flag in checkpoint_flags():
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


def checkpoint_args(state: dict, source: str) -> argparse.Namespace:
    """The flags of checkpoint ``state`` (read from ``source``) of this repository, its "args"
    over main.py's defaults for flags it predates (the data flags a checkpoint's model was
    trained with: predict.py reads its image sizes and class names there)."""
    if "args" not in state:
        raise ValueError(
            f"{source} has no 'args' key; pass a checkpoint written by main.py (it saves the "
            "flags of the run)"
        )
    saved = state["args"] if isinstance(state["args"], dict) else vars(state["args"])
    return argparse.Namespace(**(vars(parse([])) | saved | {"pretrained_backbone": None}))


def rebuild_model(
    path: str, device: torch.device | str = "cpu"
) -> tuple[DETR, PostProcess, argparse.Namespace]:
    """The model a checkpoint of this repository holds, from the file alone
    (:func:`models.rebuild_detector`); in evaluation mode on ``device``, with its
    post-processing and the flags of its run. Raises FileNotFoundError or ValueError naming the
    file."""
    model, postprocess, config, state = rebuild_detector(path)
    args = checkpoint_args(state, path)
    args.num_classes = config.num_classes  # resolved (from the class head where unsaved)
    return model.to(device).eval(), postprocess, args


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
    if not 0.0 <= args.focal_alpha <= 1.0 or args.focal_gamma < 0.0:
        raise UserError(
            f"--focal_alpha {args.focal_alpha}, --focal_gamma {args.focal_gamma}: pass an alpha "
            "in [0, 1] and a gamma >= 0"
        )
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
    with user_errors(ValueError):
        check_aid_args(args)


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
