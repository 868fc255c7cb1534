"""``make gpu-check``: the CUDA and NCCL paths, in a few minutes, on a machine with a GPU.

    .venv/bin/python benchmarks/gpu_check.py

1. The tests that run on CUDA (``pytest -m cuda``: every test taking the ``device`` fixture).
2. PVT-Small + DETR, 20 training iterations at 2x3x800x1216 (fp32, then ``--amp bf16``): images/s
   and peak GPU memory.
3. ``main.py`` end to end under ``torch.distributed.run`` (one process, NCCL): one epoch of 20
   iterations at 800 px on the built-in shapes set, evaluation, a checkpoint.
4. ``predict.py`` on that checkpoint: images/s.

On a machine without CUDA it says so and exits 0. Everything it prints is measured here.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import run_model
from models import build_criterion, build_detector
from models.config import ModelConfig
from options import parse
from training import build_optimizer

REPO = Path(__file__).resolve().parents[1]

SHAPES_800 = [
    "--dataset_file", "shapes", "--shapes_train", "40", "--shapes_val", "16",
    "--shapes_size", "800", "--shapes_max_size", "1000", "--scales", "800", "--max_size", "1333",
    "--eval_size", "800", "--num_classes", "5", "--batch_size", "2", "--num_workers", "4",
]  # fmt: skip


def step(command: list[str], what: str) -> float:
    """Run ``command`` from the repository root; stop the check if it fails; return seconds."""
    print(f"\n== {what}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def training_speed(amp: str, iterations: int = 20) -> tuple[float, float]:
    """(images/s, peak GiB) of PVT-Small + DETR training steps at 2x3x800x1216."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_detector(ModelConfig()).to(device)
    criterion = build_criterion(ModelConfig())
    optimizer = build_optimizer(model, parse([]))
    images = torch.randn(2, 3, 800, 1216, device=device)
    mask = torch.zeros(2, 800, 1216, dtype=torch.bool, device=device)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]], device=device)
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 7], device=device)}] * 2
    amp_dtype = torch.bfloat16 if amp == "bf16" else None

    def train_step():
        loss = criterion.weighted_total(
            criterion(run_model(model, images, mask, amp_dtype), targets)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    train_step()  # warm-up: kernels chosen, memory pools filled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        train_step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 2 * iterations / seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "nothing to check here. Run `make gpu-check` on a machine with a GPU.")  # fmt: skip
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")  # fmt: skip
    py = sys.executable
    results = []
    seconds = step([py, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                   "tests on CUDA")  # fmt: skip
    results.append(("pytest -m cuda", f"passed in {seconds:.0f} s", ""))
    for amp in ("none", "bf16"):
        images_s, peak = training_speed(amp)
        results.append((f"training, 2x3x800x1216, --amp {amp}", f"{images_s:.1f} images/s",
                        f"{peak:.2f} GiB"))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out, data = Path(tmp) / "run", Path(tmp) / "data"
        run = [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py",
            *SHAPES_800, "--coco_path", str(data), "--backbone", "pvt_small", "--epochs", "1",
            "--device", "cuda", "--amp", "bf16", "--output_dir", str(out),
        ]  # fmt: skip
        seconds = step(run, "main.py under torch.distributed.run (NCCL), train + evaluate")
        results.append(("main.py, 1 NCCL process, 20 iterations + eval of 16 images",
                        f"{seconds:.0f} s (data generation included)", "see out.log"))  # fmt: skip
        images = sorted((data / "val2017").iterdir())
        predict = [
            py, "predict.py", str(data / "val2017"), "--resume", str(out / "checkpoint.pth"),
            "--json", str(Path(tmp) / "p.json"), "--device", "cuda", "--batch_size", "8",
        ]  # fmt: skip
        seconds = step(predict, "predict.py on the checkpoint")
        results.append(("predict.py", f"{len(images) / seconds:.1f} images/s (start-up included)",
                        ""))  # fmt: skip
        log = (out / "out.log").read_text().splitlines()
        print("\n".join(line for line in log if "epoch 0" in line or "evaluation" in line))
    print("\n| check | result | peak GPU memory |\n| --- | --- | --- |")
    for row in results:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
