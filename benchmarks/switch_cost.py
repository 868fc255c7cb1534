"""What each training switch costs: one training step and one inference pass of the demo's model.

    .venv/bin/python benchmarks/switch_cost.py --threads 1       # Markdown table on stdout

The demo's model and batch (benchmarks/demo_setup.py, as the Makefile: PVT-Tiny to stage 3,
frozen; hidden 256, 2 + 3 layers, 10 queries; 8 images of 64 x 64 with 1-3 objects, 3 classes),
random weights and images. A training step is what ``engine.train_one_epoch`` runs: forward,
matching (on the CPU) and set loss, backward, gradient clipping, AdamW. Inference is the
evaluation-mode forward. The configurations take turns, one step each per round, so that other
load on the machine falls on all of them alike; median of ``--runs`` rounds after one warm-up.
"""

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch
from demo_setup import DEMO_MODEL, DEMO_TRAINING, SWITCHES, shown
from timing import run_times

import options
from engine import run_model
from models import build_model
from training import build_optimizer
from util.cpu import configure_malloc

NUM_CLASSES = 4  # the demo's 3 shape classes have category ids 1..3


def demo_batch(seed: int = 0):
    """8 normalized 64 x 64 images (no padding) and their targets, 1-3 objects each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 64, 64, generator=g)
    mask = torch.zeros(8, 64, 64, dtype=torch.bool)
    targets = []
    for _ in range(8):
        count = int(torch.randint(1, 4, (), generator=g))
        size = 0.2 + 0.3 * torch.rand(count, 2, generator=g)
        centre = size / 2 + (1 - size) * torch.rand(count, 2, generator=g)
        labels = torch.randint(1, NUM_CLASSES, (count,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return images, mask, targets


def step_and_inference(flags: list[str]):
    """(training step, inference) callables of the demo's model with ``flags`` switched on."""
    args = options.parse([*DEMO_MODEL, *DEMO_TRAINING, *flags, "--num_classes", str(NUM_CLASSES)])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    images, mask, targets = demo_batch()

    def step():
        model.train()
        outputs = run_model(model, images, mask, None, targets)
        loss = criterion.weighted_total(criterion(outputs, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    def inference():
        model.eval()
        with torch.inference_mode():
            model(images, mask)

    return step, inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (default: torch's; on a machine shared with other jobs 1 thread "
        "avoids the slowdown of oversubscribed cores)",
    )
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    configure_malloc()
    calls = {name: step_and_inference(SWITCHES[name]) for name in opts.configs}
    times = {name: ([], []) for name in opts.configs}
    for round_ in range(opts.runs + 1):  # round 0 warms up
        for name, fns in calls.items():
            for fn, out in zip(fns, times[name], strict=True):
                seconds = run_times(fn, runs=1, warmup=0)[0]
                if round_:
                    out.append(seconds)
    medians = {name: [sorted(t)[len(t) // 2] for t in pair] for name, pair in times.items()}
    base = medians.get("vanilla")
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if "model name" in line), platform.processor(),
    )  # fmt: skip
    print(f"{datetime.date.today()}, {platform.machine()} {cpu}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {opts.runs} "
          "rounds after warm-up\n")  # fmt: skip
    print("| configuration | flags | training step (s) | vs vanilla | inference (s) | vs vanilla |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, (step, infer) in medians.items():
        ratios = ("", "") if base is None else (f"{step / base[0]:.2f}x", f"{infer / base[1]:.2f}x")
        flags = shown(SWITCHES[name]) or "(none)"
        print(f"| {name} | `{flags}` | {step:.3f} | {ratios[0]} | {infer:.4f} | {ratios[1]} |")


if __name__ == "__main__":
    main()
