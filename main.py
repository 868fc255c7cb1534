"""Train and evaluate PVT + DETR.

    python main.py                                       # built-in synthetic dataset, one process
    python -m torch.distributed.run --nproc_per_node=8 main.py --backbone pvt_small \\
        --coco_path /data/coco --dataset_file coco --output_dir outputs/pvt_small
    python main.py --eval --resume outputs/pvt_small/checkpoint.pth --dataset_file coco ...
    python run_with_submitit.py --nodes 2 --ngpus 8 ...  # SLURM (README, "Running on a cluster")

The flags are in options.py; the pieces of a run (loaders, optimizer, checkpoints, log) in
training.py; one epoch of training and one evaluation pass in engine.py.
"""

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine import evaluate, train_one_epoch
from models import build_model
from models.pvt import set_gelu_recompute, set_grad_checkpointing
from options import check_args, parse, resolve_resume
from tools.render import render_predictions
from training import (
    build_datasets,
    build_evaluators,
    build_loaders,
    build_lr_scheduler,
    build_optimizer,
    log_epoch,
    restore,
    save,
    trim_log,
)
from util import dist
from util.cpu import configure_malloc

logger = logging.getLogger("main")


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
    main(parse(sys.argv[1:]))
