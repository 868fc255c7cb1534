"""engine.train_one_epoch on any iterable of batches, not only a DataLoader."""

import torch

from datasets.collate import collate_fn
from engine import train_one_epoch
from tests.conftest import build_tiny, tiny_batch


def test_an_epoch_takes_a_generator_of_batches():
    """A generator has no length (benchmarks/convergence.py cuts epochs by a time budget)."""
    model, criterion, _ = build_tiny(dropout=0.0, drop_path=0.0)
    images, targets = tiny_batch()
    batch = collate_fn(list(zip(images, targets, strict=True)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = (batch for _ in range(3))
    stats = train_one_epoch(
        model, criterion, batches, optimizer, schedule, torch.device("cpu"), 0, progress=False
    )
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["lr"] == 1e-3
