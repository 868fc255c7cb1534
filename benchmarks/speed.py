"""Speed and memory of PVT-Small + DETR on this machine, as one Markdown table.

    .venv/bin/python benchmarks/speed.py               # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --quick       # 2 timed runs per row instead of 5
    .venv/bin/python benchmarks/speed.py --compile     # add torch.compile rows
    .venv/bin/python benchmarks/speed.py --allocator   # add malloc-tuning and flush-denormal rows

The model is the paper's detector: PVT-Small, DETR with 6 + 6 layers, hidden 256, 100 queries,
91 classes, random weights (seed 0) and random images (seed 1). Rows: inference at 1x3x800x1216
and 2x3x512x683, and a training step (forward, set loss with Hungarian matching, backward, AdamW)
at 2x3x512x683, each on the fused attention path and on the eager one of the official code
(``models.attention.set_fused_attention(model, False)``), plus bf16 autocast and
``--checkpoint_backbone`` rows.

Each row runs in a fresh subprocess, so that its peak resident memory (``getrusage`` maxrss) is
its own; the seeds give every subprocess the same weights and inputs. Times are the median of
the timed runs after one warm-up call (two for a training step, one more with torch.compile,
whose first call compiles).
FLOPs are those of ``torch.utils.flop_counter.FlopCounterMode`` on the eager fp32 path
(matrix products only: softmax, LayerNorm and other element-wise work are not counted). The
matrix-multiply peaks are ``torch.mm`` of 2048 x 2048 matrices measured in the same run.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import run_times
from torch.utils.flop_counter import FlopCounterMode

from engine import run_model, weighted_loss
from main import get_args_parser
from models import build_model
from models.attention import set_fused_attention
from models.matcher import HungarianMatcher
from models.pvt import set_grad_checkpointing

LARGE, SMALL = (1, 800, 1216), (2, 512, 683)
# Glibc malloc settings tried by --allocator: blocks up to 32 MiB (the largest threshold glibc
# accepts on 64-bit; it ignores larger values) come from the heap and stay there between steps,
# instead of being mapped and unmapped, and so page-faulted and zeroed, every step.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def row(name: str, kind: str, shape: tuple[int, int, int], fused: bool = True, **changes) -> dict:
    """One measurement: ``kind`` "infer" or "train" on a batch of ``shape`` (B, H, W)."""
    defaults = {"amp": "none", "checkpoint": False, "compile": False, "denormal": False, "env": {}}
    return {"name": name, "kind": kind, "shape": shape, "fused": fused} | defaults | changes


def rows(options: argparse.Namespace) -> list[dict]:
    """The measurements to make: one subprocess each."""
    specs = [
        row("inference", "infer", LARGE),
        row("inference", "infer", LARGE, fused=False),
        row("inference bf16", "infer", LARGE, amp="bf16"),
        row("inference", "infer", SMALL),
        row("inference", "infer", SMALL, fused=False),
        row("training step", "train", SMALL),
        row("training step", "train", SMALL, fused=False),
        row("training step, checkpoint_backbone", "train", SMALL, checkpoint=True),
        row("training step bf16", "train", SMALL, amp="bf16"),
    ]
    if options.compile:
        specs += [
            row("inference, compile", "infer", LARGE, compile=True),
            row("training step, compile", "train", SMALL, compile=True),
        ]
    if options.allocator:
        specs += [
            row("training step, malloc thresholds", "train", SMALL, env=MALLOC_ENV),
            row("training step, flush denormal", "train", SMALL, denormal=True),
        ]
    return specs


# ---------------------------------------------------------------- worker (one row per process)


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def build(spec: dict):
    """(model, criterion, images, mask, targets), identical in every subprocess."""
    torch.manual_seed(0)
    args = get_args_parser().parse_args(["--backbone", "pvt_small", "--num_classes", "91"])
    model, criterion, _ = build_model(args)
    set_fused_attention(model, spec["fused"])
    set_grad_checkpointing(model, spec["checkpoint"])
    batch, height, width = spec["shape"]
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]),
         "labels": torch.tensor([1, 7])}
        for _ in range(batch)
    ]  # fmt: skip
    return model, criterion, images, mask, targets


def step_function(spec: dict):
    """(the call to time, the call to count FLOPs of): inference returns the outputs, a training
    step its loss."""
    model, criterion, images, mask, targets = build(spec)
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None
    runner = torch.compile(model) if spec["compile"] else model
    if spec["kind"] == "infer":
        model.eval()

        def call():
            with torch.inference_mode():
                return run_model(runner, images, mask, amp)

        # FlopCounterMode's module hooks fail under no_grad and inference_mode: count with grad.
        return call, lambda: run_model(runner, images, mask, amp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step():
        loss = weighted_loss(criterion(run_model(runner, images, mask, amp), targets),
                             criterion.weight_dict)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, step


def leaves(value) -> list[torch.Tensor]:
    """Every tensor of a nested dict / list output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value.float()]
    items = value.values() if isinstance(value, dict) else value
    return [t for item in items for t in leaves(item)]


def worker(spec: dict) -> dict:
    """Time one row. The first call's outputs (inference) or loss (training, before any update)
    go to ``spec['out']``; the eager fp32 rows also count FLOPs, after the timing."""
    torch.set_flush_denormal(spec["denormal"])
    fn, flop_fn = step_function(spec)
    rss_before = rss_mib()
    start = time.perf_counter()
    torch.save(leaves(fn()), spec["out"])
    first = time.perf_counter() - start
    # One more warm-up for a training step (the second still settles: AdamW state, allocator)
    # and for torch.compile (the second call may compile again).
    warmup = int(spec["kind"] == "train") + int(spec["compile"])
    times = run_times(fn, spec["runs"], warmup)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"times": times, "first": first, "rss_before": rss_before, "maxrss": maxrss}
    if not spec["fused"] and spec["amp"] == "none" and not spec["compile"]:
        with FlopCounterMode(display=False) as counter:
            flop_fn()
        result["flops"] = counter.get_total_flops()
    return result


# ---------------------------------------------------------------- parent: run rows, print table


def matmul_gflops(dtype: torch.dtype, n: int = 2048, runs: int = 10) -> float:
    """This process's ``torch.mm`` rate on n x n matrices, GFLOP/s (median of ``runs``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / statistics.median(run_times(lambda: torch.mm(a, b), runs, warmup=3)) / 1e9


def matcher_ms(runs: int) -> float:
    """Hungarian matching of a batch of 8 (100 queries, 91 classes, 50 targets each), ms."""
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(8, 100, 92, generator=g),
               "pred_boxes": torch.rand(8, 100, 4, generator=g) * 0.5 + 0.25}  # fmt: skip
    targets = [
        {"labels": torch.randint(0, 91, (50,), generator=g),
         "boxes": torch.rand(50, 4, generator=g) * 0.5 + 0.25}
        for _ in range(8)
    ]  # fmt: skip
    matcher = HungarianMatcher()
    return statistics.median(run_times(lambda: matcher(outputs, targets), runs)) * 1e3


def run_row(spec: dict, tmp: Path, index: int) -> dict:
    spec = spec | {"out": str(tmp / f"{index}.pt")}
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(
        command, env=os.environ | spec["env"], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"row {spec['name']} {spec['shape']} failed:\n{done.stderr[-3000:]}")
    return spec | json.loads(done.stdout.splitlines()[-1])


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


def reference(results: list[dict], row: dict) -> dict:
    """The eager fp32 row of the same kind and input shape."""
    return next(
        r for r in results
        if (r["kind"], r["shape"], r["fused"], r["amp"], r["checkpoint"], r["compile"],
            r["denormal"], r["env"]) == (row["kind"], row["shape"], False, "none", False, False,
                                          False, {})
    )  # fmt: skip


def table(results: list[dict], peaks: dict[str, float]) -> list[str]:
    lines = [
        "| measurement | input | attention | median s | spread | speed-up vs eager | "
        "max rel. diff vs eager | GFLOP/img | GFLOP/s | share of mm peak | peak RSS MiB | "
        "step +MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        ref = reference(results, row)
        median = statistics.median(row["times"])
        spread = (max(row["times"]) - min(row["times"])) / median
        speedup = statistics.median(ref["times"]) / median
        diff = relative_difference(torch.load(row["out"]), torch.load(ref["out"]))
        batch = row["shape"][0]
        gflop = ref["flops"] / batch / 1e9
        rate = ref["flops"] / median / 1e9
        share = rate / peaks["bf16" if row["amp"] == "bf16" else "fp32"]
        shape = "{}x3x{}x{}".format(*row["shape"])
        name = row["name"] + (f" (first call {row['first']:.0f} s)" if row["compile"] else "")
        lines.append(
            f"| {name} | {shape} | {'fused' if row['fused'] else 'eager'} | {median:.3f} | "
            f"{spread:.0%} | {speedup:.2f}x | {diff:.1e} | {gflop:.0f} | {rate:.0f} | "
            f"{share:.0%} | {row['maxrss']:.0f} | {row['maxrss'] - row['rss_before']:.0f} |"
        )
    return lines


def find(results: list[dict], name: str, shape: tuple, fused: bool) -> dict:
    return next(r for r in results if (r["name"], r["shape"], r["fused"]) == (name, shape, fused))


def targets(results: list[dict], peaks: dict[str, float]) -> list[str]:
    """The issue's targets, with the measured values."""
    eager = find(results, "inference", LARGE, False)
    fused = find(results, "inference", LARGE, True)
    half = find(results, "inference bf16", LARGE, True)
    train_eager = find(results, "training step", SMALL, False)
    train = find(results, "training step", SMALL, True)
    speed = lambda row, ref: statistics.median(ref["times"]) / statistics.median(row["times"])
    step_mib = lambda row: row["maxrss"] - row["rss_before"]
    diff = relative_difference(torch.load(fused["out"]), torch.load(eager["out"]))
    share = eager["flops"] / statistics.median(fused["times"]) / 1e9 / peaks["fp32"]
    fp32, train_fp32, bf16 = speed(fused, eager), speed(train, train_eager), speed(half, eager)
    memory = step_mib(train) / step_mib(train_eager)
    checks = [
        ("fp32 inference 800x1216: speed-up vs eager, at least 2x", fp32, fp32 >= 2),
        ("fp32 inference 800x1216: max rel. diff vs eager, at most 1e-4", diff, diff <= 1e-4),
        ("fp32 inference 800x1216: share of fp32 mm peak, at least 0.5", share, share >= 0.5),
        ("training step: speed-up vs eager, at least 1.5x", train_fp32, train_fp32 >= 1.5),
        ("training step: step memory vs eager, at most 0.7x", memory, memory <= 0.7),
        ("bf16 inference 800x1216: speed-up vs eager fp32, at least 5x", bf16, bf16 >= 5),
    ]
    lines = ["", "| target | measured | met |", "| --- | ---: | --- |"]
    lines += [f"| {text} | {value:.3g} | {'yes' if ok else 'no'} |" for text, value, ok in checks]
    return lines


def header(options: argparse.Namespace, peaks: dict[str, float], matcher: float) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"{datetime.date.today()}, {platform.machine()} {cpu}, {os.cpu_count()} cores, "
        f"{memory:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {options.runs} runs after warm-up",
        f"torch.mm 2048x2048 on this machine: fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s; Hungarian matching, batch of 8, 100 queries, "
        f"50 targets each: {matcher:.1f} ms",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed runs per row, not 5")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--allocator", action="store_true", help="add malloc / denormal rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(worker(json.loads(options.worker))))
        return
    options.runs = 2 if options.quick else 5
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    matcher = matcher_ms(options.runs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for i, spec in enumerate(rows(options)):
            results.append(run_row(spec | {"runs": options.runs}, Path(tmp), i))
            print(f"done: {spec['name']} {spec['shape']}", file=sys.stderr)
        lines = header(options, peaks, matcher) + table(results, peaks) + targets(results, peaks)
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
