"""Train and evaluate PVT + DETR.

    python main.py                                       # built-in synthetic dataset, one process
    python -m torch.distributed.run --nproc_per_node=8 main.py --backbone pvt_small \\
        --coco_path /data/coco --dataset_file coco --output_dir outputs/pvt_small
    python main.py --eval --resume outputs/pvt_small/checkpoint.pth --dataset_file coco ...
    python run_with_submitit.py --nodes 2 --ngpus 8 ...  # SLURM (docs/cluster.md)

The flags are in options.py; the run (data, model, loaders, optimizer, checkpoints, log, stop
signals) in training.py (:class:`training.Run`); one epoch of training and one evaluation pass in
engine.py.

SIGTERM or SIGUSR2 (what SLURM, torchrun and submitit send) saves the position inside the epoch
in checkpoint.pth after the iteration in progress and exits with status 143 or 140; --resume
continues there. A mistake in the flags or the files they name prints one line, ``error: ...``,
and exits with status 2; so do an image that cannot be read (after saving the position inside
the epoch, in a single process) and a checkpoint or log that cannot be written (the previous
checkpoint is intact). --tensorboard writes TensorBoard events (util/tensorboard.py).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from datasets.coco import UnreadableImage
from options import checkpoint_flags, parse
from training import FIX_IMAGE, WRITE_HINT, Run, prepare
from util import dist
from util.cpu import configure_malloc
from util.errors import UserError, cli, user_errors
from util.logs import LogFile

logger = logging.getLogger("main")


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
    log_resolved(args, resolved)
    args = resolved
    try:
        run = Run(args, info)
        start_epoch, progress = run.restore(weights)
        del weights  # the model, optimizer and schedule hold it now
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
            run.train(start_epoch, progress)
        run.finish()
    except UnreadableImage as err:  # evaluating or drawing: the checkpoints are as they were
        rank = info.rank if info.distributed else None
        raise UserError(f"{err.original}; {FIX_IMAGE}", rank=rank) from err
    finally:
        dist.cleanup()


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


def log_resolved(args: argparse.Namespace, resolved: argparse.Namespace) -> None:
    """Say where ``--resume auto`` led and which flags the --resume checkpoint set
    (``resolved``: ``args`` as :func:`training.prepare` returns them)."""
    if args.resume == "auto":
        logger.info("--resume auto: %s", resolved.resume or "no checkpoint yet, starting fresh")
    for flag in checkpoint_flags():
        if getattr(resolved, flag) != getattr(args, flag):
            value, path = getattr(resolved, flag), resolved.resume
            logger.info("--%s %s: taken from %s, which was trained with it", flag, value, path)


if __name__ == "__main__":
    cli(lambda: main(parse(sys.argv[1:])))
