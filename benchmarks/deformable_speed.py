"""Speed and memory of the deformable transformer against DETR's, on PVT-Small's feature shapes,
or of the whole detectors (``--model detector``).

    .venv/bin/python benchmarks/deformable_speed.py                     # 1 x 800 x 1216, CPU
    .venv/bin/python benchmarks/deformable_speed.py --device cuda --batch 2
    .venv/bin/python benchmarks/deformable_speed.py --model detector --device cuda --batch 2
    .venv/bin/python benchmarks/deformable_speed.py --size 128 192 --runs 1   # a quick check

``--model transformer`` (the default): random features of the shapes PVT-Small gives --batch
images of --size pixels (padded to a multiple of 32, no padding inside the batch); the backbone
itself does not run. DETR's transformer (``models.transformer.Transformer``: hidden 256, 8 heads,
6 + 6 layers, FFN 2048) reads the stride-32 map (512 channels) through its Linear input
projection; the deformable transformer (``models.deformable.DeformableTransformer``: hidden 256,
8 heads, 6 + 6 layers, FFN 1024, 4 points per head and level) reads the stride 8, 16 and 32 maps
(128, 320, 512 channels) through ``InputLevels`` (Linear + GroupNorm each, and the stride-64
extra level). Both decode --queries zero-initialised queries with learned positions and get sine
positional encodings of the maps.

``--model detector``: the detectors as ``main.py`` builds them, PVT-Small included (randomly
initialised, 91 classes, --queries queries): ``--transformer detr`` (FFN 2048, the stride-32
stage) and ``--transformer deformable`` (FFN 1024, Deformable DETR's; stages 2-4 and the stride-64
level), on random images of --size; the training step's loss is the set criterion's (Hungarian
matching included) against three fixed boxes per image.

Inference: the eval-mode forward under ``torch.inference_mode``. Training step: forward, a loss
(transformers: the mean square of every decoder layer's output), backward, AdamW; dropout 0.1.
Times: median of --runs calls after two warm-up calls. Each row runs in a fresh subprocess; its
peak memory is, on CUDA, ``torch.cuda.max_memory_allocated`` during the calls above what the
built model and inputs hold, and on the CPU the growth of the process's peak resident set
(``getrusage`` maxrss) over its resident size before the first call.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch
from timing import run_times
from torch import nn

from models import build_criterion, build_detector
from models.config import ModelConfig
from models.deformable import DeformableTransformer
from models.neck import InputLevels
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer

PVT_SMALL_LEVELS = ((128, 8), (320, 16), (512, 32))  # (channels, stride) of stages 2, 3, 4
HIDDEN = 256


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


def features(batch: int, height: int, width: int, device: torch.device):
    """Random PVT-Small maps and their (all-valid) masks for images padded to a multiple of 32."""
    height, width = -(-height // 32) * 32, -(-width // 32) * 32
    g = torch.Generator().manual_seed(1)
    maps, masks = [], []
    for channels, stride in PVT_SMALL_LEVELS:
        shape = (height // stride, width // stride)
        maps.append(torch.randn(batch, channels, *shape, generator=g).to(device))
        masks.append(torch.zeros(batch, *shape, dtype=torch.bool, device=device))
    return maps, masks


# ---------------------------------------------------------------- worker (one row per process)


def rss_mib() -> float:
    """Resident memory of this process now, MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


def images_and_targets(batch: int, height: int, width: int, device: torch.device):
    """Random images padded to a multiple of 32 (no padding inside the batch) and three fixed
    boxes of classes 1-3 per image."""
    height, width = -(-height // 32) * 32, -(-width // 32) * 32
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.7, 0.5, 0.2]])
    target = {"labels": torch.tensor([1, 2, 3], device=device), "boxes": boxes.to(device)}
    return images.to(device), [target] * batch


def row_model(spec: dict, device: torch.device):
    """(the model, a forward call, a loss call) of one row."""
    torch.manual_seed(0)
    if spec["model"] == "detector":
        config = ModelConfig(num_queries=spec["queries"], **DETECTORS[spec["transformer"]])
        model = build_detector(config).to(device)
        criterion = build_criterion(config).to(device)
        inputs, targets = images_and_targets(spec["batch"], *spec["size"], device)

        def forward():
            return model(inputs)

        def loss():
            return criterion.weighted_total(criterion(forward(), targets))

        return model, forward, loss
    model = NECKS[spec["transformer"]](spec["queries"]).to(device)
    maps, masks = features(spec["batch"], *spec["size"], device)

    def forward():
        return model(maps, masks)

    def loss():
        return forward().float().square().mean()

    return model, forward, loss


def row_call(spec: dict):
    """(the call to time, the model) for one row."""
    model, forward, loss = row_model(spec, torch.device(spec["device"]))
    if spec["mode"] == "inference":
        model.eval()

        def call():
            with torch.inference_mode():
                forward()

        return call, model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def call():
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return call, model


def worker(spec: dict) -> dict:
    """Time one row and measure its peak memory (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    call, model = row_call(spec)
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
    times = run_times(synced, spec["runs"], warmup=2)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak, "params": params}


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


def level_summary(transformer: str, height: int, width: int) -> tuple[str, int]:
    """(the strides read, the number of cells per image)."""
    maps, _ = features(1, height, width, torch.device("cpu"))
    shapes = [tuple(m.shape[-2:]) for m in maps]
    if transformer == "detr":
        return "32", shapes[-1][0] * shapes[-1][1]
    h, w = shapes[-1]
    shapes.append((-(-h // 2), -(-w // 2)))
    return "8, 16, 32, 64", sum(h * w for h, w in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--model",
        default="transformer",
        choices=("transformer", "detector"),
        help="the transformers on random PVT-Small features, or the whole detectors",
    )
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(json.loads(opts.worker))))
        return
    keys = ("model", "device", "size", "batch", "queries", "runs", "threads")
    base = {k: getattr(opts, k) for k in keys}
    results = {
        (name, mode): run_row(base | {"transformer": name, "mode": mode})
        for name in NECKS
        for mode in ("inference", "train")
    }
    memory = "peak CUDA memory" if opts.device.startswith("cuda") else "peak RSS growth"
    print(
        f"{datetime.date.today()}, {machine(opts.device)}, torch {torch.__version__}, "
        f"{'PVT-Small detectors' if opts.model == 'detector' else 'transformers'}, "
        f"{opts.threads} threads; {opts.batch} x 3 x {opts.size[0]} x {opts.size[1]}, "
        f"{opts.queries} queries; median of {opts.runs} after 2 warm-up calls\n"
    )
    print(
        f"| {opts.model} | strides | cells per image | parameters (M) | inference (s) | "
        f"training step (s) | inference {memory} (MiB) | training {memory} (MiB) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in NECKS:
        infer, train = results[name, "inference"], results[name, "train"]
        strides, cells = level_summary(name, *opts.size)
        print(
            f"| {name} | {strides} | {cells} | {infer['params'] / 1e6:.2f} | "
            f"{infer['seconds']:.3f} | {train['seconds']:.3f} | {infer['peak_mib']:.0f} | "
            f"{train['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
