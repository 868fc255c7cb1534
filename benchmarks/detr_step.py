"""Time DETR inference and one training step (forward, loss, backward, AdamW).

    .venv/bin/python benchmarks/detr_step.py --backbone pvt_small --batch 2 --size 512 683

Random images and targets, 91 classes, the default DETR (hidden 256, 6 + 6 layers, 100 queries).
Warm-up excluded; median of ``--runs`` runs.
"""

import argparse

import torch
from timing import median_time

from models import build_criterion, build_detector
from models.attention import set_fused_attention
from models.backbone import BACKBONES
from models.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="pvt_small", choices=BACKBONES)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="matmul + softmax attention")
    options = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(backbone=options.backbone)
    model, criterion = build_detector(config), build_criterion(config)
    set_fused_attention(model, not options.eager)
    images = torch.randn(options.batch, 3, *options.size)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]),
         "labels": torch.tensor([1, 7])}
        for _ in range(options.batch)
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def train_step():
        losses = criterion(model(images), targets)
        loss = sum(
            losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def inference():
        with torch.inference_mode():
            model(images)

    model.eval()
    infer = median_time(inference, options.runs)[0]
    model.train()
    step = median_time(train_step, options.runs)[0]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shape = f"{options.batch}x3x{options.size[0]}x{options.size[1]}"
    print(
        f"{options.backbone} + DETR ({params:.2f}M params, "
        f"{'eager' if options.eager else 'fused'} attention), {shape}, "
        f"{torch.get_num_threads()} threads: inference {infer:.3f} s "
        f"({options.batch / infer:.2f} img/s), training step {step:.3f} s "
        f"({options.batch / step:.2f} img/s), median of {options.runs}"
    )


if __name__ == "__main__":
    main()
