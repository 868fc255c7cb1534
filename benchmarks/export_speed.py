"""onnxruntime against eager PyTorch: PVT-Small + DETR and PVT-Small + Deformable DETR inference
on one image, on the CPU.

    .venv/bin/python benchmarks/export_speed.py            # exports first (minutes), then times
    .venv/bin/python benchmarks/export_speed.py --runs 2 --threads 4 --transformer deformable
    .venv/bin/python benchmarks/export_speed.py --size 800 1199    # padded to 800 x 1216 inside

The models are the paper-sized detectors that ``benchmarks/deformable_speed.py --model detector``
times, with random weights (seed 0): PVT-Small and 91 classes, 100 queries, hidden 256, 6 + 6
layers; ``--transformer detr`` (FFN 2048, the stride-32 stage) and ``--transformer deformable``
(FFN 1024, Deformable DETR's; stages 2-4 and the stride-64 level, 4 points per head and level).
Each is exported by ``export.export_onnx`` to a temporary file. The input is one random image of
``--size`` (default 3 x 800 x 1216, multiples of 32: no padding) and its all-False mask. PyTorch
runs ``export.run_torch`` (the graph's padding, then the eval-mode model as eager mode computes
it, its own sampling core included) under ``torch.no_grad``; onnxruntime runs the file with the
CPUExecutionProvider; both use ``--threads`` threads. Times are the median of ``--runs`` runs
after one warm-up, in one process, so the ratio is the measurement (but not on a machine that
other jobs share: their load changes between the two timings). The outputs are compared too
(max |difference| over the scale of PyTorch's)."""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from timing import median_time

import export
from models import build_detector
from models.config import ModelConfig
from util.cpu import configure_malloc

DETECTORS = {
    "detr": ("PVT-Small + DETR", {"transformer": "detr"}),
    "deformable": (
        "PVT-Small + Deformable DETR",
        {"transformer": "deformable", "dim_feedforward": 1024},
    ),
}


def time_detector(name: str, size: tuple[int, int], runs: int) -> None:
    """Export the detector ``name`` of :data:`DETECTORS`, time both runtimes, print the rows."""
    title, settings = DETECTORS[name]
    torch.manual_seed(0)
    model = build_detector(ModelConfig(**settings)).eval()
    inputs = export.padded_batch([size], seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        start = time.perf_counter()
        export.export_onnx(model, path)
        export_seconds = time.perf_counter() - start
        session = export.onnx_session(path)
        onnx_seconds, _ = median_time(lambda: export.run_onnx(session, inputs), runs)
        diffs = export.differences(
            export.run_onnx(session, inputs), export.run_torch(model, inputs, False)
        )
    torch_seconds, _ = median_time(lambda: export.run_torch(model, inputs, False), runs)
    print(f"{title}, 1x3x{size[0]}x{size[1]}")
    print(f"  export: {export_seconds:.0f} s")
    print(f"  eager PyTorch {torch.__version__}: {torch_seconds:.3f} s")
    print(f"  onnxruntime {onnxruntime.__version__}, CPUExecutionProvider: {onnx_seconds:.3f} s")
    print(f"  onnxruntime / PyTorch: {onnx_seconds / torch_seconds:.2f}")
    print(f"  max |onnxruntime - PyTorch| / scale: {diffs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument(
        "--transformer", nargs="+", choices=list(DETECTORS), default=list(DETECTORS)
    )
    options = parser.parse_args()
    configure_malloc()
    torch.set_num_threads(options.threads)
    print(
        f"CPU, {options.threads} threads, {platform.processor() or platform.machine()}; "
        f"median of {options.runs} runs after one warm-up"
    )
    for name in options.transformer:
        time_detector(name, tuple(options.size), options.runs)


if __name__ == "__main__":
    main()
