"""Pretrain a PVT backbone on a detection dataset by labelling every patch.

A stand-in for ImageNet pretraining when there is none (the built-in synthetic dataset): each
patch of the chosen stage gets the category id of the smallest box that contains its centre, or
0 (background: category ids start at 1) when no box does, and a linear layer on the stage's
tokens learns to predict it. The file written loads with ``main.py --pretrained_backbone``
(the patch classifier is saved as ``head.*``, which a detection backbone ignores).

    python pretrain_backbone.py --backbone pvt_tiny --stage 3 --iters 2000 --output backbone.pth
"""

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.ops import box_convert
from tqdm import tqdm

import datasets
from datasets.collate import collate_fn
from models import pvt
from options import RecipeParser, check_coco_root, writable_folder
from util import checkpoint
from util.cpu import configure_malloc
from util.errors import UserError, cli, user_errors

logger = logging.getLogger("pretrain_backbone")


def get_args_parser() -> argparse.ArgumentParser:
    parser = RecipeParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--backbone", default="pvt_tiny", choices=sorted(pvt.VARIANT_DEPTHS))
    add("--stage", default=3, type=int, choices=(1, 2, 3, 4), help="stage whose patches learn")
    add("--iters", default=2000, type=int)
    add("--batch_size", default=16, type=int)
    add("--lr", default=1e-4, type=float)
    add("--weight_decay", default=0.05, type=float)
    add("--drop_path", default=0.0, type=float)
    add("--num_workers", default=2, type=int)
    add("--seed", default=0, type=int)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--output", required=True, help="where to write the backbone weights")
    add("--num_classes", default=None, type=int, help="largest category id + 1 (default: data)")
    datasets.add_dataset_args(parser)
    return parser


def patch_labels(
    targets: list[dict[str, Tensor]],
    grid: tuple[int, int],
    stride: int,
    image_size: tuple[int, int],
) -> Tensor:
    """[B, h, w] int64: the label of the smallest box holding each patch centre, else 0.

    Boxes are normalized cxcywh relative to ``image_size`` (the padded batch's H, W).
    """
    h, w = grid
    ys = (torch.arange(h) + 0.5) * stride / image_size[0]
    xs = (torch.arange(w) + 0.5) * stride / image_size[1]
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    labels = []
    for t in targets:
        out = torch.zeros(h, w, dtype=torch.int64)
        boxes = box_convert(t["boxes"], "cxcywh", "xyxy")
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for i in areas.argsort(descending=True).tolist():  # smallest box written last
            x0, y0, x1, y1 = boxes[i].tolist()
            inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
            out[inside] = t["labels"][i]
        labels.append(out)
    return torch.stack(labels)


def step(model, head, batch, device) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, predicted labels, true labels) over the non-padding patches of a batch."""
    images, mask, targets = batch
    images, mask = images.to(device), mask.to(device)
    (features,), (feature_mask,) = model.forward_masked(images, mask)
    # Targets are normalized to each image's own size; express them in the padded frame.
    targets = [_to_padded_frame(t, images.shape[-2:]) for t in targets]
    labels = patch_labels(targets, features.shape[-2:], model.out_strides[0], images.shape[-2:]).to(
        device
    )
    logits = head(features.flatten(2).transpose(1, 2))
    valid = ~feature_mask.flatten(1)
    loss = F.cross_entropy(logits[valid], labels.flatten(1)[valid])
    return loss, logits[valid].argmax(-1), labels.flatten(1)[valid]


def _to_padded_frame(target: dict[str, Tensor], padded: tuple[int, int]) -> dict[str, Tensor]:
    h, w = target["size"].tolist()
    scale = torch.tensor([w / padded[1], h / padded[0]] * 2)
    return {"boxes": target["boxes"] * scale, "labels": target["labels"]}


@torch.no_grad()
def patch_accuracy(model, head, loader, device) -> dict[str, float]:
    """Accuracy over all patches and over object patches only."""
    model.eval()
    correct = total = fg_correct = fg_total = 0
    for batch in loader:
        _, pred, true = step(model, head, batch, device)
        correct += (pred == true).sum().item()
        total += true.numel()
        fg = true > 0
        fg_correct += (pred[fg] == true[fg]).sum().item()
        fg_total += fg.sum().item()
    model.train()
    return {"acc": correct / max(total, 1), "object_acc": fg_correct / max(fg_total, 1)}


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags, a missing dataset and an unwritable --output (whose folder it creates)
    before any work."""
    for flag in ("iters", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: pass a number >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
    if args.dataset_file == "coco":
        check_coco_root(args.coco_path)
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; pass the file to write, e.g. backbone.pth")
    writable_folder("output", output.parent)
    with user_errors(OSError, hint="pass an --output you can write"):
        output.parent.mkdir(parents=True, exist_ok=True)


def main(args: argparse.Namespace) -> None:
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    configure_malloc()
    device = torch.device(args.device)
    # The data's own checks (missing files, bad annotations) name the file and entry.
    with user_errors(FileNotFoundError, ValueError):
        train_set = datasets.build_dataset("train", args)
        val_set = datasets.build_dataset("val", args)
        num_classes = args.num_classes or datasets.num_classes_of(train_set)
    model = pvt.build_pvt(
        args.backbone, num_classes=0, out_indices=(args.stage - 1,), drop_path_rate=args.drop_path
    ).to(device)
    head = nn.Linear(model.out_channels[0], num_classes).to(device)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, args.iters) / args.iters))
    )
    sampler = RandomSampler(
        train_set,
        replacement=True,
        num_samples=args.iters * args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    loader = DataLoader(
        train_set,
        args.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.num_workers,
        drop_last=True,
    )
    val_loader = DataLoader(
        val_set, args.batch_size, collate_fn=collate_fn, num_workers=args.num_workers
    )
    start = time.time()
    bar = tqdm(loader, desc="pretrain", dynamic_ncols=True)
    for batch in bar:
        loss = step(model, head, batch, device)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy = patch_accuracy(model, head, val_loader, device)
    logger.info(
        "%d steps in %.0f s; validation patch accuracy %.3f, on objects %.3f",
        args.iters,
        time.time() - start,
        accuracy["acc"],
        accuracy["object_acc"],
    )
    state = model.state_dict() | {f"head.{k}": v for k, v in head.state_dict().items()}
    checkpoint.save_atomic({"model": state, "args": vars(args), "accuracy": accuracy}, args.output)
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    cli(lambda: main(get_args_parser().parse_args()))
