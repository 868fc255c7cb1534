"""``make gpu-check``: the CUDA and NCCL paths, in a few minutes, on a machine with a GPU.

    .venv/bin/python benchmarks/gpu_check.py

1. The tests that run on CUDA (``pytest -m cuda``: every test taking the ``device`` fixture, the
   deformable sampling core's against the ``grid_sample`` core among them).
2. PVT-Small + DETR, 20 training iterations at 2x3x800x1216 (fp32, then ``--amp bf16``): images/s
   and peak GPU memory.
3. PVT-Small + Deformable DETR (FFN 1024) at 2x3x800x1216: the fast sampling core against the
   plain ``grid_sample`` one (outputs, loss and gradients of one training step, fp32), each
   core's training step and inference (images/s, peak GPU memory), and a bf16 autocast training
   step with the fast core (finite, boxes near fp32's).
4. ``main.py`` end to end under ``torch.distributed.run`` (one process, NCCL): one epoch of 20
   iterations at 800 px on the built-in shapes set, evaluation, a checkpoint; then Deformable
   DETR for two iterations and an evaluation the same way.
5. ``predict.py`` on the first checkpoint: images/s.

On a machine without CUDA it says so and exits 0. Everything it prints is measured here; a
check that fails stops it with a non-zero exit status.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from engine import run_model
from models import build_criterion, build_detector
from models.config import ModelConfig
from models.deformable import MSDeformAttn, use_grid_sample_core
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


DEFORMABLE = ModelConfig(transformer="deformable", dim_feedforward=1024, dropout=0.0, drop_path=0.0)


def deformable_batch(device: torch.device):
    """2x3x800x1216 random images (seed 0), no padding, and two boxes per image."""
    images = torch.randn(2, 3, 800, 1216, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.zeros(2, 800, 1216, dtype=torch.bool, device=device)
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]], device=device)
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 7], device=device)}] * 2
    return images, mask, targets


def deformable_step(model, criterion, batch, amp_dtype=None) -> tuple[dict, torch.Tensor]:
    """One forward and backward (no update): (the outputs, the loss)."""
    images, mask, targets = batch
    model.zero_grad(set_to_none=True)
    outputs = run_model(model, images, mask, amp_dtype)
    loss = criterion.weighted_total(criterion(outputs, targets))
    loss.backward()
    return outputs, loss.detach()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| over |b|, whole tensors (L2)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def deformable_agreement(model, criterion, batch) -> list[tuple[str, str, str]]:
    """The fast and the plain core on the same weights and batch, fp32; stops on disagreement."""
    results = {}
    for core in ("plain", "fast"):
        use_grid_sample_core(model, core == "plain")
        outputs, loss = deformable_step(model, criterion, batch)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[core] = (outputs["pred_boxes"], outputs["pred_logits"], loss, grads)
    errors = [relative(f, p) for f, p in zip(results["fast"], results["plain"], strict=True)]
    names = ("boxes", "logits", "loss", "gradients")
    line = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors, strict=True))
    print(f"fast against plain core, relative L2 differences: {line}", flush=True)
    if max(errors) > 1e-3:
        raise SystemExit(f"gpu-check: the fast sampling core disagrees with the plain one: {line}")
    return [("deformable DETR, fast core against plain, fp32 step", line + " (<= 1e-3)", "")]


def per_second(call, iterations: int) -> tuple[float, float]:
    """(images/s of ``call`` on a batch of 2 after one warm-up call, peak GiB during it)."""
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return 2 * iterations / seconds, torch.cuda.max_memory_allocated() / 2**30


def deformable_speed(model, criterion, batch, iterations: int = 5) -> list[tuple[str, str, str]]:
    """Each core's training step (forward, backward, no update) and eval-mode inference."""

    def infer():
        with torch.inference_mode():
            run_model(model.eval(), batch[0], batch[1], None)
        model.train()

    calls = {"training step": lambda: deformable_step(model, criterion, batch), "inference": infer}
    rows, speed = [], {}
    for core in ("plain", "fast"):
        use_grid_sample_core(model, core == "plain")
        for mode, call in calls.items():
            speed[core, mode], peak = per_second(call, iterations)
            rows.append((f"deformable DETR {mode}, 2x3x800x1216, {core} core",
                         f"{speed[core, mode]:.1f} images/s", f"{peak:.2f} GiB"))  # fmt: skip
    for mode in calls:
        ratio = speed["fast", mode] / speed["plain", mode]
        rows.append((f"deformable DETR {mode}: fast over plain core", f"{ratio:.2f}x", ""))
    return rows


def deformable_bf16(model, criterion, batch) -> list[tuple[str, str, str]]:
    """A bf16 autocast step with the fast core: finite loss and gradients, boxes near fp32's."""
    use_grid_sample_core(model, False)
    with torch.no_grad():
        full = run_model(model, batch[0], batch[1], None)["pred_boxes"]
    outputs, loss = deformable_step(model, criterion, batch, torch.bfloat16)
    finite = bool(torch.isfinite(loss)) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    error = (outputs["pred_boxes"] - full).abs().max().item()
    line = f"loss {loss.item():.3f}, finite gradients: {finite}, boxes within {error:.3f} of fp32"
    print(f"bf16 autocast step, fast core: {line}", flush=True)
    if not finite or error > 0.05:
        raise SystemExit(f"gpu-check: the bf16 autocast step of Deformable DETR failed: {line}")
    return [("deformable DETR, bf16 autocast step, fast core", line, "")]


def deformable_checks() -> list[tuple[str, str, str]]:
    """Section 3 of the module docstring."""
    print("\n== Deformable DETR: the fast sampling core against the plain one", flush=True)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_detector(DEFORMABLE).to(device)
    # At the official initialisation every sample sits on a cell centre, where the bilinear
    # weights' derivative jumps and rounding picks the side: offsets that depend on the query
    # move the samples off the centres, so that the two cores' gradients can be compared.
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            nn.init.normal_(module.sampling_offsets.weight, std=0.01)
    criterion = build_criterion(DEFORMABLE).to(device)
    batch = deformable_batch(device)
    rows = deformable_agreement(model, criterion, batch)
    rows += deformable_speed(model, criterion, batch)
    return rows + deformable_bf16(model, criterion, batch)


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
    results += deformable_checks()
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
        deformable = [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py",
            *SHAPES_800, "--shapes_train", "4", "--shapes_val", "4",
            "--coco_path", str(Path(tmp) / "data_deformable"), "--backbone", "pvt_small",
            "--transformer", "deformable", "--dim_feedforward", "1024", "--epochs", "1",
            "--device", "cuda", "--amp", "bf16", "--output_dir", str(Path(tmp) / "deformable"),
        ]  # fmt: skip
        seconds = step(deformable, "Deformable DETR: main.py under torch.distributed.run (NCCL)")
        results.append(("main.py --transformer deformable, 1 NCCL process, 2 iterations + eval",
                        f"{seconds:.0f} s", ""))  # fmt: skip
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
