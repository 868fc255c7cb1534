"""Speed and memory of the deformable attention's sampling core against the plain ``grid_sample``
core, side by side in one run: the core alone, the deformable transformer and the whole detector,
each beside DETR's, on PVT-Small's shapes.

    .venv/bin/python benchmarks/deformable_speed.py                     # 1 x 800 x 1216, CPU
    .venv/bin/python benchmarks/deformable_speed.py --model core transformer
    .venv/bin/python benchmarks/deformable_speed.py --device cuda --batch 2
    .venv/bin/python benchmarks/deformable_speed.py --size 128 192 --runs 1   # a quick check

Rows (``--model``, any of the three; all by default), each deformable one with the fast core
(``models.deformable.ms_deform_attn``, the default) and with the plain one
(``ms_deform_attn_grid_sample``, ``MSDeformAttn.grid_sample_core``):

- ``core``: one encoder layer's sampling alone: the value [B, cells, 8 heads, 32] of the four
  levels PVT-Small and the extra level give --batch images of --size pixels (strides 8, 16, 32,
  64), every cell a query around its own centre, the official initial offsets (head h's k-th
  point k cells away in direction 2 pi h / 8) plus random ones of a cell, softmax weights.
  Training step: forward and backward to the value, the locations and the weights.
- ``transformer``: random features of the shapes PVT-Small gives (the backbone does not run).
  DETR's transformer (``models.transformer.Transformer``: hidden 256, 8 heads, 6 + 6 layers, FFN
  2048) reads the stride-32 map (512 channels) through its Linear input projection; the
  deformable transformer (``models.deformable.DeformableTransformer``: hidden 256, 8 heads,
  6 + 6 layers, FFN 1024, 4 points per head and level) reads the stride 8, 16 and 32 maps (128,
  320, 512 channels) through ``InputLevels`` (Linear + GroupNorm each, and the stride-64 extra
  level). Both decode --queries zero-initialised queries with learned positions and get sine
  positional encodings of the maps. Training step: forward, the mean square of every decoder
  layer's output, backward, AdamW; dropout 0.1.
- ``detector``: the detectors as ``main.py`` builds them, PVT-Small included (randomly
  initialised, 91 classes, --queries queries): ``--transformer detr`` (FFN 2048, the stride-32
  stage) and ``--transformer deformable`` (FFN 1024, Deformable DETR's; stages 2-4 and the
  stride-64 level), on random images of --size; the training step's loss is the set criterion's
  (Hungarian matching included) against three fixed boxes per image, then backward, AdamW.

Inference: the eval-mode forward under ``torch.inference_mode``. Times: median of --runs calls
after one warm-up call. Each row runs in a fresh subprocess; its peak memory is, on CUDA,
``torch.cuda.max_memory_allocated`` during the calls above what the built model and inputs hold,
and on the CPU the growth of the process's peak resident set (``getrusage`` maxrss) over its
resident size before the first call. "fast / plain" compares each fast-core row with its
plain-core row: the plain time over the fast one, and the fast training peak over the plain one.

The matmul floor is the time the row's matrix products (``FlopCounterMode``: the linear layers,
DETR's attention products; not the sampling, norms or other element-wise work) would take at
the rate a [8192, 256] x [256, 1024] float32 product (the encoder FFN's) runs at on this
machine (the fastest of 10), measured in the same run; the last column is the row's time over
that floor. The core
alone has no matrix products.
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
from pathlib import Path

import torch
from timing import run_times
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import build_criterion, build_detector
from models.config import ModelConfig
from models.deformable import (
    DeformableTransformer,
    MSDeformAttn,
    encoder_reference_points,
    ms_deform_attn,
    ms_deform_attn_grid_sample,
    sampling_locations,
    use_grid_sample_core,
)
from models.neck import InputLevels
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer

PVT_SMALL_LEVELS = ((128, 8), (320, 16), (512, 32))  # (channels, stride) of stages 2, 3, 4
HIDDEN, HEADS, POINTS = 256, 8, 4
MODELS = ("core", "transformer", "detector")
CORES = {"fast": ms_deform_attn, "plain": ms_deform_attn_grid_sample}
MATMUL = (8192, 256, 1024)  # the matmul rate's product: [M, K] x [K, N]


class DETRNeck(nn.Module):
    """DETR's path from the stride-32 map: Linear input projection, sine positions, transformer."""

    def __init__(self, queries: int):
        super().__init__()
        self.input_proj = nn.Linear(PVT_SMALL_LEVELS[-1][0], HIDDEN)
        self.position = PositionEmbeddingSine(HIDDEN // 2)
        self.transformer = Transformer(HIDDEN)
        self.query_pos = nn.Parameter(torch.randn(queries, HIDDEN))

    def forward(self, maps: list[torch.Tensor], mask: list[torch.Tensor]) -> torch.Tensor:
        src = self.input_proj(maps[-1].flatten(2).transpose(1, 2))
        pos = self.position(mask[-1]).flatten(2).transpose(1, 2)
        query_pos = self.query_pos.expand(src.shape[0], -1, -1)
        return self.transformer(src, mask[-1].flatten(1), query_pos, pos)[0]


class DeformableNeck(nn.Module):
    """The deformable path: every level projected, the extra level, sine positions, transformer."""

    def __init__(self, queries: int):
        super().__init__()
        channels = [c for c, _ in PVT_SMALL_LEVELS]
        self.levels = InputLevels(channels, HIDDEN, len(channels) + 1)
        self.position = PositionEmbeddingSine(HIDDEN // 2)
        self.transformer = DeformableTransformer(HIDDEN, num_feature_levels=len(channels) + 1)
        self.query_pos = nn.Parameter(torch.randn(queries, HIDDEN))

    def forward(self, maps: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        levels = [(x, m, self.position(m)) for x, m in zip(maps, masks, strict=True)]
        srcs, masks, pos = zip(*self.levels(levels, self.position), strict=True)
        return self.transformer(srcs, masks, pos, self.query_pos)[0].hs


NECKS = {"detr": DETRNeck, "deformable": DeformableNeck}
# The model configuration of each detector (beyond PVT-Small and its defaults).
DETECTORS = {
    "detr": {"transformer": "detr"},
    "deformable": {"transformer": "deformable", "dim_feedforward": 1024},
}


def padded(height: int, width: int) -> tuple[int, int]:
    """The image size padded to a multiple of 32."""
    return -(-height // 32) * 32, -(-width // 32) * 32


def features(batch: int, height: int, width: int, device: torch.device):
    """Random PVT-Small maps and their (all-valid) masks for images padded to a multiple of 32."""
    height, width = padded(height, width)
    g = torch.Generator().manual_seed(1)
    maps, masks = [], []
    for channels, stride in PVT_SMALL_LEVELS:
        shape = (height // stride, width // stride)
        maps.append(torch.randn(batch, channels, *shape, generator=g).to(device))
        masks.append(torch.zeros(batch, *shape, dtype=torch.bool, device=device))
    return maps, masks


def deformable_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """The deformable transformer's levels: strides 8, 16, 32 and the extra stride-64 level."""
    height, width = padded(height, width)
    shapes = [(height // stride, width // stride) for _, stride in PVT_SMALL_LEVELS]
    h, w = shapes[-1]
    return [*shapes, (-(-h // 2), -(-w // 2))]


# ---------------------------------------------------------------- worker (one row per process)


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def images_and_targets(batch: int, height: int, width: int, device: torch.device):
    """Random images padded to a multiple of 32 (no padding inside the batch) and three fixed
    boxes of classes 1-3 per image."""
    height, width = padded(height, width)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.7, 0.5, 0.2]])
    target = {"labels": torch.tensor([1, 2, 3], device=device), "boxes": boxes.to(device)}
    return images.to(device), [target] * batch


def core_inputs(batch: int, height: int, width: int, device: torch.device) -> list[torch.Tensor]:
    """One encoder layer's sampling inputs (value, locations, weights; module docstring)."""
    shapes = deformable_shapes(height, width)
    cells, levels = sum(h * w for h, w in shapes), len(shapes)
    g = torch.Generator().manual_seed(1)
    initial = MSDeformAttn(HIDDEN, levels, HEADS, POINTS).sampling_offsets.bias.detach()
    offsets = initial.view(HEADS, levels, POINTS, 2) + torch.randn(
        batch, cells, HEADS, levels, POINTS, 2, generator=g
    )
    reference = encoder_reference_points(shapes, torch.ones(batch, levels, 2))
    locations = sampling_locations(reference, offsets, shapes, POINTS)
    logits = torch.randn(batch, cells, HEADS, levels * POINTS, generator=g)
    weights = logits.softmax(-1).view(batch, cells, HEADS, levels, POINTS)
    value = torch.randn(batch, cells, HEADS, HIDDEN // HEADS, generator=g)
    return [t.to(device) for t in (value, locations, weights)]


def row_model(spec: dict, device: torch.device):
    """(the parameters, a forward call, a loss call) of one row."""
    torch.manual_seed(0)
    if spec["model"] == "core":
        shapes = deformable_shapes(*spec["size"])
        inputs = core_inputs(spec["batch"], *spec["size"], device)
        core = CORES[spec["core"]]

        def forward():
            return core(inputs[0], shapes, inputs[1], inputs[2])

        return [t.requires_grad_() for t in inputs], forward, lambda: forward().square().mean()
    if spec["model"] == "detector":
        config = ModelConfig(num_queries=spec["queries"], **DETECTORS[spec["transformer"]])
        model = build_detector(config).to(device)
        criterion = build_criterion(config).to(device)
        inputs, targets = images_and_targets(spec["batch"], *spec["size"], device)

        def forward():
            return model(inputs)

        def loss():
            return criterion.weighted_total(criterion(forward(), targets))

    else:
        model = NECKS[spec["transformer"]](spec["queries"]).to(device)
        maps, masks = features(spec["batch"], *spec["size"], device)

        def forward():
            return model(maps, masks)

        def loss():
            return forward().float().square().mean()

    use_grid_sample_core(model, spec.get("core") == "plain")
    if spec["mode"] == "inference":
        model.eval()
    return list(model.parameters()), forward, loss


def row_call(spec: dict):
    """(the call to time, the call to count the matrix products of, the parameters)."""
    params, forward, loss = row_model(spec, torch.device(spec["device"]))
    if spec["mode"] == "inference":

        def infer():
            with torch.inference_mode():
                forward()

        # FlopCounterMode's module hooks fail under inference_mode: count with grad.
        return infer, forward, params
    if spec["model"] == "core":

        def backward():
            for t in params:
                t.grad = None
            loss().backward()

        return backward, backward, params
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def step():
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step, step, params


def worker(spec: dict) -> dict:
    """Time one row, measure its peak memory (module docstring) and count its matrix products."""
    torch.set_num_threads(spec["threads"])
    if spec["model"] == "matmul":
        return {"macs_per_s": matmul_rate(torch.device(spec["device"]))}
    call, count, params = row_call(spec)
    cuda = spec["device"].startswith("cuda")

    def synced():
        call()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_mib()
    times = run_times(synced, spec["runs"], warmup=1)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    with FlopCounterMode(display=False) as counter:
        count()
    parameters = sum(p.numel() for p in params) if spec["model"] != "core" else 0
    return {
        "seconds": statistics.median(times),
        "peak_mib": peak,
        "params": parameters,
        "macs": counter.get_total_flops() / 2,
    }


def matmul_rate(device: torch.device, runs: int = 10) -> float:
    """Multiply-adds per second of the ``MATMUL`` float32 product: the fastest of ``runs``, the
    rate the machine reaches (a slower run was interrupted)."""
    m, k, n = MATMUL
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)

    def product():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return m * k * n / min(run_times(product, runs, warmup=3))


# ---------------------------------------------------------------- parent: run rows, print table


def run_row(spec: dict) -> dict:
    """``worker(spec)`` in a fresh Python process."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if "model name" in line), platform.processor(),
    )  # fmt: skip
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores"


def rows(models: list[str]) -> list[tuple[str, str, str | None]]:
    """(model, transformer, core) of every row, in the table's order."""
    out = []
    for model in models:
        if model != "core":
            out.append((model, "detr", None))
        out += [(model, "deformable", "fast"), (model, "deformable", "plain")]
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def table_row(key, results: dict, macs_per_s: float) -> str:
    """One Markdown row: times, memory, fast / plain, the matmul floor."""
    model, transformer, core = key
    infer, train = results[key, "inference"], results[key, "train"]
    cells = [model, transformer if model != "core" else "one encoder layer", core or "-"]
    cells += [f"{infer['params'] / 1e6:.2f}" if model != "core" else "-"]
    cells += [f"{infer['seconds']:.3f}", f"{train['seconds']:.3f}"]
    cells += [f"{infer['peak_mib']:.0f}", f"{train['peak_mib']:.0f}"]
    if core == "fast":
        plain_infer, plain_train = (results[(model, transformer, "plain"), mode] for mode in MODES)
        cells.append(
            f"{ratio(plain_infer['seconds'], infer['seconds'])}, "
            f"{ratio(plain_train['seconds'], train['seconds'])}, "
            f"{ratio(train['peak_mib'], plain_train['peak_mib'])}"
        )
    else:
        cells.append("-")
    floors = [r["macs"] / macs_per_s for r in (infer, train)]
    if floors[0] > 0:
        cells.append(f"{floors[0]:.3f}, {floors[1]:.3f}")
        cells.append(f"{ratio(infer['seconds'], floors[0])}, {ratio(train['seconds'], floors[1])}")
    else:
        cells += ["-", "-"]
    return "| " + " | ".join(cells) + " |"


MODES = ("inference", "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--model", nargs="+", default=list(MODELS), choices=MODELS,
        help="the sampling core alone, the transformers on random PVT-Small features, the whole "
        "detectors (default: all three)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(json.loads(opts.worker))))
        return
    base = {k: getattr(opts, k) for k in ("device", "size", "batch", "queries", "runs", "threads")}
    load = os.getloadavg()
    macs_per_s = run_row(base | {"model": "matmul"})["macs_per_s"]
    results = {}
    for key in rows([m for m in MODELS if m in opts.model]):
        model, transformer, core = key
        for mode in MODES:
            spec = base | {"model": model, "transformer": transformer, "core": core, "mode": mode}
            results[key, mode] = run_row(spec)
    print_table(opts, results, macs_per_s, load)


def print_table(opts, results: dict, macs_per_s: float, load: tuple[float, ...]) -> None:
    memory = "peak CUDA memory" if opts.device.startswith("cuda") else "peak RSS growth"
    shapes = deformable_shapes(*opts.size)
    print(
        f"{datetime.date.today()}, {machine(opts.device)}, torch {torch.__version__}, "
        f"{opts.threads} threads, load average {load[0]:.2f} at the start; "
        f"{opts.batch} x 3 x {opts.size[0]} x {opts.size[1]}, deformable levels {shapes} "
        f"({sum(h * w for h, w in shapes)} cells), {opts.queries} queries; median of "
        f"{opts.runs} after 1 warm-up call; matmul {MATMUL[0]} x {MATMUL[1]} x {MATMUL[2]} "
        f"float32: {macs_per_s / 1e9:.1f} G multiply-adds/s\n"
    )
    print(
        f"| model | transformer | sampling core | parameters (M) | inference (s) | "
        f"training step (s) | inference {memory} (MiB) | training {memory} (MiB) | "
        f"fast / plain: inference, training speed-up, training memory | matmul floor: "
        f"inference, training (s) | time / floor: inference, training |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for key in rows([m for m in MODELS if m in opts.model]):
        print(table_row(key, results, macs_per_s))


if __name__ == "__main__":
    main()
