"""Speed and memory of PVT-Small + DETR on this machine, as one Markdown table.

    .venv/bin/python benchmarks/speed.py               # about 9 minutes on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --quick       # 2 timed runs per row instead of 5
    .venv/bin/python benchmarks/speed.py --compile     # add torch.compile rows
    .venv/bin/python benchmarks/speed.py --denormal    # add a flush-denormal row

The model is the paper's detector: PVT-Small, DETR with 6 + 6 layers, hidden 256, 100 queries,
91 classes, random weights (seed 0) and random images (seed 1). Rows: inference at 1x3x800x1216
and 2x3x512x683, and a training step (forward, set loss with Hungarian matching, backward, AdamW)
at 2x3x512x683 and 1x3x800x1216.

Every row is compared with the **official computation**: the eager attention of the official PVT
and DETR code (matmul, softmax, matmul; ``models.attention.set_fused_attention(model, False)``),
with glibc malloc as it comes and ``torch.optim.AdamW`` as DETR builds it, on the same weights
and inputs. The **fast path** is this repository's default: ``F.scaled_dot_product_attention``,
the PVT MLPs over chunks of tokens (``models.pvt.Mlp``) and the fused AdamW of
``main.build_optimizer``, with malloc as it comes. Rows that change one of these
show where the speed-up comes from; others add a memory option (``--recompute_gelu``,
``--checkpoint_backbone``), bf16 autocast, or another allocator setting (``util.cpu``): tcmalloc
preloaded, or glibc's malloc told to keep freed memory (``PVT_DETR_MALLOC=keep``).

Each row runs in a fresh subprocess, so that its peak resident memory (``getrusage`` maxrss) is
its own; the seeds give every subprocess the same weights and inputs. Times are the median of
the timed runs after one warm-up call (two for a training step, one more with torch.compile,
whose first call compiles).
FLOPs are those of ``torch.utils.flop_counter.FlopCounterMode`` on the official fp32 path
(matrix products only: softmax, LayerNorm and other element-wise work are not counted). The
matrix-multiply peaks are ``torch.mm`` of 2048 x 2048 matrices measured in the same run.
"""

import argparse
import ctypes.util
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

from engine import run_model
from models import build_criterion, build_detector
from models.attention import set_fused_attention
from models.config import ModelConfig
from models.matcher import HungarianMatcher
from models.pvt import Mlp, set_gelu_recompute, set_grad_checkpointing
from options import get_args_parser
from training import build_optimizer
from util.cpu import configure_malloc

LARGE, SMALL = (1, 800, 1216), (2, 512, 683)
# gperftools' tcmalloc (Debian/Ubuntu: apt install libtcmalloc-minimal4), preloaded in the rows
# that name it; those rows are left out when it is not installed.
TCMALLOC = ctypes.util.find_library("tcmalloc_minimal")
FAST = {
    "fused": True,
    "chunked": True,
    "malloc": "system",
    "recompute_gelu": False,
    "fused_adamw": True,
}
OFFICIAL = {
    "fused": False,
    "chunked": False,
    "malloc": "system",
    "recompute_gelu": False,
    "fused_adamw": False,
}
SETTING_NAMES = {
    ("fused", False): "eager attention",
    ("chunked", False): "MLP unchunked",
    ("malloc", "keep"): "PVT_DETR_MALLOC=keep",
    ("malloc", "tcmalloc"): "tcmalloc preloaded",
    ("recompute_gelu", True): "--recompute_gelu",
    ("fused_adamw", False): "plain AdamW",
    ("amp", "bf16"): "bf16 autocast",
    ("checkpoint", True): "--checkpoint_backbone",
    ("compile", True): "--compile",
    ("denormal", True): "flush denormal",
}


def row(kind: str, shape: tuple[int, int, int], base: dict = FAST, **changes) -> dict:
    """One measurement: ``kind`` "infer" or "train" on a batch of ``shape`` (B, H, W)."""
    defaults = {"amp": "none", "checkpoint": False, "compile": False, "denormal": False}
    return {"kind": kind, "shape": shape, "runs": None} | defaults | base | changes


def setting(spec: dict) -> str:
    """How a row differs from the fast path, in words."""
    if all(spec[key] == value for key, value in OFFICIAL.items()):
        if spec["kind"] == "infer":
            return "**official** (eager attention, MLP unchunked)"
        return "**official** (eager attention, MLP unchunked, plain AdamW)"
    changes = [name for (key, value), name in SETTING_NAMES.items() if spec[key] == value]
    if spec["kind"] == "infer":  # inference has no backward and no optimizer
        changes = [c for c in changes if c not in ("--recompute_gelu", "plain AdamW")]
    return "**fast path**" + (", but " + ", ".join(changes) if changes else "")


def rows(options: argparse.Namespace) -> list[dict]:
    """The measurements to make: one subprocess each."""
    specs = [
        row("infer", LARGE),
        row("infer", LARGE, OFFICIAL),
        row("infer", LARGE, fused=False),
        row("infer", LARGE, chunked=False),
        row("infer", LARGE, malloc="keep"),
        row("infer", LARGE, malloc="tcmalloc"),
        row("infer", LARGE, amp="bf16"),
        row("infer", LARGE, amp="bf16", malloc="tcmalloc"),
        row("infer", SMALL),
        row("infer", SMALL, OFFICIAL),
        row("train", SMALL),
        row("train", SMALL, OFFICIAL),
        row("train", SMALL, fused=False),
        row("train", SMALL, chunked=False),
        row("train", SMALL, malloc="keep"),
        row("train", SMALL, malloc="tcmalloc"),
        row("train", SMALL, recompute_gelu=True),
        row("train", SMALL, malloc="tcmalloc", recompute_gelu=True),
        row("train", SMALL, fused_adamw=False),
        row("train", SMALL, checkpoint=True),
        row("train", SMALL, amp="bf16"),
        row("train", LARGE, runs=3),
        row("train", LARGE, OFFICIAL, runs=3),
    ]
    if not TCMALLOC:
        specs = [spec for spec in specs if spec["malloc"] != "tcmalloc"]
    if options.compile:
        specs += [row("infer", LARGE, compile=True), row("train", SMALL, compile=True)]
    if options.denormal:
        specs += [row("train", SMALL, denormal=True)]
    return specs


# ---------------------------------------------------------------- worker (one row per process)


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def build(spec: dict):
    """(model, criterion, images, mask, targets), identical in every subprocess."""
    torch.manual_seed(0)
    model, criterion = build_detector(ModelConfig()), build_criterion(ModelConfig())
    set_fused_attention(model, spec["fused"])
    set_grad_checkpointing(model, spec["checkpoint"])
    if not spec["checkpoint"]:
        set_gelu_recompute(model, spec["recompute_gelu"])
    for module in model.modules():
        if isinstance(module, Mlp):
            module.chunked = spec["chunked"]
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
    # Default flags: lr 1e-4 for the transformer, 1e-5 for the backbone, as in the official DETR.
    optimizer = build_optimizer(model, get_args_parser().parse_args([]), spec["fused_adamw"])

    def step():
        loss = criterion.weighted_total(criterion(run_model(runner, images, mask, amp), targets))
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
    go to ``spec['out']``; the official rows also count FLOPs, after the timing."""
    configure_malloc()  # PVT_DETR_MALLOC, set by the parent, decides
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
    if is_official(spec):
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


def is_official(spec: dict) -> bool:
    plain = {"amp": "none", "checkpoint": False, "compile": False, "denormal": False}
    return all(spec[key] == value for key, value in (OFFICIAL | plain).items())


def run_row(spec: dict, tmp: Path, index: int) -> dict:
    spec = spec | {"out": str(tmp / f"{index}.pt")}
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env["PVT_DETR_MALLOC"] = spec["malloc"]
    if spec["malloc"] == "tcmalloc":
        env |= {"PVT_DETR_MALLOC": "system", "LD_PRELOAD": TCMALLOC}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"row {setting(spec)} {spec['shape']} failed:\n{done.stderr[-3000:]}")
    return spec | json.loads(done.stdout.splitlines()[-1])


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


def find(results: list[dict], kind: str, shape: tuple, base: dict = FAST, **changes) -> dict:
    """The result of ``row(kind, shape, base, **changes)``."""
    wanted = row(kind, shape, base, **changes)
    keys = [key for key in wanted if key != "runs"]
    return next(r for r in results if all(r[key] == wanted[key] for key in keys))


def reference(results: list[dict], spec: dict) -> dict:
    """The official row of the same kind and input shape."""
    return find(results, spec["kind"], tuple(spec["shape"]), OFFICIAL)


def median(spec: dict) -> float:
    return statistics.median(spec["times"])


def step_mib(spec: dict) -> float:
    """Resident memory the timed calls added on top of the built model and inputs."""
    return spec["maxrss"] - spec["rss_before"]


def table(results: list[dict], peaks: dict[str, float]) -> list[str]:
    lines = [
        "| measurement | input | setting | median s | spread | speed-up vs official | "
        "max rel. diff vs official | GFLOP/img | GFLOP/s | share of mm peak | peak RSS MiB | "
        "step +MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec in results:
        ref = reference(results, spec)
        spread = (max(spec["times"]) - min(spec["times"])) / median(spec)
        diff = relative_difference(torch.load(spec["out"]), torch.load(ref["out"]))
        rate = ref["flops"] / median(spec) / 1e9
        share = rate / peaks["bf16" if spec["amp"] == "bf16" else "fp32"]
        what = {"infer": "inference", "train": "training step"}[spec["kind"]]
        if spec["compile"]:
            what += f" (first call {spec['first']:.0f} s)"
        lines.append(
            f"| {what} | {'{}x3x{}x{}'.format(*spec['shape'])} | {setting(spec)} | "
            f"{median(spec):.3f} | {spread:.0%} | {median(ref) / median(spec):.2f}x | "
            f"{diff:.1e} | {ref['flops'] / spec['shape'][0] / 1e9:.0f} | {rate:.0f} | "
            f"{share:.0%} | {spec['maxrss']:.0f} | {step_mib(spec):.0f} |"
        )
    return lines


def targets(results: list[dict], peaks: dict[str, float]) -> list[str]:
    """The issue's targets, with the measured values: the fast path, then other settings."""
    official, fast = find(results, "infer", LARGE, OFFICIAL), find(results, "infer", LARGE)
    train_official = find(results, "train", SMALL, OFFICIAL)
    diff = relative_difference(torch.load(fast["out"]), torch.load(official["out"]))
    share = official["flops"] / median(fast) / 1e9 / peaks["fp32"]
    checks = [("fp32 inference 800x1216: max rel. diff vs official, at most 1e-4", diff, 1e-4, -1)]
    checks.append(("fp32 inference 800x1216: share of fp32 mm peak, at least 0.5", share, 0.5, 1))
    settings = [{}, {"malloc": "tcmalloc"}, {"malloc": "keep"}]
    memory_settings = [{}, {"recompute_gelu": True}, {"malloc": "tcmalloc", "recompute_gelu": True}]
    for what, kind, ref, extra, goal, options in [
        ("fp32 inference 800x1216: speed-up", "infer", official, {}, 2, settings),
        ("training step 2x512x683: speed-up", "train", train_official, {}, 1.5, settings),
        ("bf16 inference 800x1216: speed-up", "infer", official, {"amp": "bf16"}, 5,
         settings[:2]),
    ]:  # fmt: skip
        for changes in options:
            spec = find_or_none(results, kind, LARGE if kind == "infer" else SMALL, extra | changes)
            if spec:
                text = f"{what} vs official fp32, at least {goal}x ({setting(spec)})"
                checks.append((text, median(ref) / median(spec), goal, 1))
    for changes in memory_settings:
        spec = find_or_none(results, "train", SMALL, changes)
        if spec:
            text = f"training step 2x512x683: memory vs official, at most 0.7x ({setting(spec)})"
            checks.append((text, step_mib(spec) / step_mib(train_official), 0.7, -1))
    lines = ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for text, value, goal, sign in checks:
        met = value >= goal if sign > 0 else value <= goal
        lines.append(f"| {text} | {value:.3g} | {'yes' if met else 'no'} |")
    return lines


def find_or_none(results: list[dict], kind: str, shape: tuple, changes: dict) -> dict | None:
    try:
        return find(results, kind, shape, **changes)
    except StopIteration:
        return None


def header(options: argparse.Namespace, peaks: dict[str, float], matcher: float) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"{datetime.date.today()}, {platform.machine()} {cpu}, {os.cpu_count()} cores, "
        f"{memory:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {options.runs} runs after warm-up"
        + (
            ""
            if options.quick
            else " (8 for the 512x683 training steps, the noisiest; 3 at 800x1216)"
        ),
        f"torch.mm 2048x2048 on this machine: fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s; Hungarian matching, batch of 8, 100 queries, "
        f"50 targets each: {matcher:.1f} ms",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed runs per row, not 5")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--denormal", action="store_true", help="add a flush-denormal row")
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
            default = 8 if spec["kind"] == "train" else options.runs
            spec["runs"] = options.runs if options.quick else spec["runs"] or default
            results.append(run_row(spec, Path(tmp), i))
            print(f"done: {spec['kind']} {spec['shape']} {setting(spec)}", file=sys.stderr)
        lines = header(options, peaks, matcher) + table(results, peaks) + targets(results, peaks)
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
