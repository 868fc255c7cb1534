"""What the tests share: the one tiny configuration, runs of main.py on it, checkpoint helpers,
and one thread per process for every test.

Test modules import these helpers from here (``from tests.conftest import ...``) and never from
each other. Reference implementations of the official code live in ``tests/reference.py``.
"""

import argparse
import math
import os
from pathlib import Path

import pytest
import torch

import main
import options
from models import build_model
from util import checkpoint

REPO = Path(__file__).resolve().parents[1]

# The tiny detector: PVT-Tiny stages 1-2 (stride 8), a 32-wide transformer of 1 + 2 layers.
NUM_CLASSES, QUERIES, HIDDEN, HEADS, FFN, ENC, DEC = 3, 5, 32, 2, 64, 1, 2
TINY_MODEL_FLAGS = [
    "--backbone", "pvt_tiny", "--feature_stage", "2", "--hidden_dim", str(HIDDEN),
    "--nheads", str(HEADS), "--enc_layers", str(ENC), "--dec_layers", str(DEC),
    "--dim_feedforward", str(FFN), "--num_queries", str(QUERIES),
]  # fmt: skip
# The tiny built-in data set: 64 px images with one or two of two shape kinds.
TINY_DATA_FLAGS = [
    "--dataset_file", "shapes", "--shapes_train", "8", "--shapes_val", "4",
    "--shapes_size", "64", "--shapes_classes", "2", "--shapes_min_objects", "1",
    "--shapes_max_objects", "2", "--scales", "64", "--max_size", "64", "--eval_size", "64",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_process():
    """One thread here and in every process a test starts (torch.distributed, submitit): the
    models are small, and several processes with two threads each thrash two shared cores.
    Results then do not depend on the machine's core count either."""
    previous = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    if previous[0] is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous[0]
    torch.set_num_threads(previous[1])


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
            ],
        ),
    ]
)
def device(request) -> torch.device:
    """The test runs on the CPU, and again on CUDA where there is a GPU (``make gpu-check``
    selects the CUDA runs with ``-m cuda``)."""
    return torch.device(request.param)


def tiny_model_args(**overrides) -> argparse.Namespace:
    """main.py's flags for the tiny detector, with ``num_classes`` set and no pretrained file."""
    args = vars(options.parse(TINY_MODEL_FLAGS))
    return argparse.Namespace(**(args | {"num_classes": NUM_CLASSES} | overrides))


def build_tiny(seed: int = 0, **overrides):
    """(model, criterion, postprocessors) of the tiny detector, initialised from ``seed``."""
    torch.manual_seed(seed)
    return build_model(tiny_model_args(**overrides))


def tiny_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (64 x 96, 48 x 64) and their targets (one and two objects,
    labels below NUM_CLASSES)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.5]])},
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.4, 0.3]]),
        },
    ]
    return images, targets


def train_on_tiny_batch(model, criterion, steps: int = 60, lr: float = 1e-3) -> list[float]:
    """The losses of ``steps`` AdamW steps on ``tiny_batch()`` (the targets passed to the model,
    as training does)."""
    images, targets = tiny_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = criterion.weighted_total(criterion(model(images, targets=targets), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains_on_tiny_batch(model, criterion) -> None:
    """60 steps at lr 1e-3: every loss is finite, and the last five average under 3/4 of the
    first (by half or more, seen on the tiny configurations)."""
    losses = train_on_tiny_batch(model, criterion)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    """``tiny_batch()``'s images and targets on ``device``."""
    images = [image.to(device) for image in images]
    return images, [{k: v.to(device) for k, v in t.items()} for t in targets]


def tiny_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """main.py's command line for a run of a few seconds on 2 CPU cores."""
    return [
        *TINY_DATA_FLAGS, "--coco_path", str(data), *TINY_MODEL_FLAGS,
        "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
        "--lr", "1e-3", "--lr_backbone", "1e-4", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def run_main(argv: list[str]) -> None:
    """``python main.py ARGV`` in this process."""
    main.main(options.parse(argv))


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    """The model weights of ``out/checkpoint.pth``."""
    return checkpoint.load(out / "checkpoint.pth")["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def save_checkpoint(path: Path, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """A checkpoint in the layout main.py writes, for ``model`` trained with ``args``."""
    optimizer = torch.optim.AdamW(model.parameters())
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0).state_dict(),
        "epoch": 0,
        "args": vars(args),
        "rng": [checkpoint.rng_state()],
    }
    checkpoint.save_atomic(state, path)
