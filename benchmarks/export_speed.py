"""onnxruntime against eager PyTorch: PVT-Small + DETR inference on one image, on the CPU.

    .venv/bin/python benchmarks/export_speed.py            # exports first (minutes), then times
    .venv/bin/python benchmarks/export_speed.py --runs 2 --threads 4

The model is the paper's detector (PVT-Small, DETR 6 + 6 layers, hidden 256, 100 queries, 91
classes) with random weights (seed 0), exported by ``export.export_onnx`` to a temporary file.
The input is one random 3x800x1216 image (800 and 1216 are multiples of 32: no padding) and its
all-False mask. PyTorch runs the eval-mode model under ``torch.no_grad``; onnxruntime runs the
file with the CPUExecutionProvider; both use ``--threads`` threads. Times are the median of
``--runs`` runs after one warm-up, in one process, so the ratio is the measurement. The outputs
are compared too (max |difference| over the scale of PyTorch's).
"""

import argparse
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch
from timing import median_time

import export
from models import build_detector
from models.config import ModelConfig
from util.cpu import configure_malloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    configure_malloc()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    model = build_detector(ModelConfig()).eval()
    inputs = export.padded_batch([(800, 1216)], seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pvt_small_detr.onnx"
        export.export_onnx(model, path)
        session = export.onnx_session(path)
        onnx_seconds, _ = median_time(lambda: export.run_onnx(session, inputs), options.runs)
        diffs = export.differences(
            export.run_onnx(session, inputs), export.run_torch(model, inputs, False)
        )
    torch_seconds, _ = median_time(lambda: export.run_torch(model, inputs, False), options.runs)
    print(
        f"PVT-Small + DETR, 1x3x800x1216, CPU, {options.threads} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"median of {options.runs} runs after one warm-up")
    print(f"eager PyTorch {torch.__version__}: {torch_seconds:.3f} s")
    print(f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider: {onnx_seconds:.3f} s")
    print(f"onnxruntime / PyTorch: {onnx_seconds / torch_seconds:.2f}")
    print(f"max |onnxruntime - PyTorch| / scale: {diffs}")


if __name__ == "__main__":
    main()
