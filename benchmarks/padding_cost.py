"""What batch invariance costs: PVT-Small + DETR inference, masked path against unmasked.

    .venv/bin/python benchmarks/padding_cost.py            # Markdown table on stdout

Two inputs, fp32, eval mode, random weights and images:

- 1x3x800x1216: no padding (800 and 1216 are multiples of 32), so the masked path is never
  taken; the row shows that the invariance code costs nothing there.
- 2x3x512x683 + 2x3x480x640: a mixed batch padded to 512x704. "masked" is this repository's
  computation (padded keys masked at every PVT stage, each image's positional embedding resized
  to its own grid); "unmasked" is the same padded batch through the official computation
  (``mask=None``: padding attended to, one embedding resized to the padded grid), which is not
  batch-invariant.

Median of ``--runs`` runs after one warm-up, all in one process, so the ratio is the measurement.
"""

import argparse
import platform

import torch
from timing import median_time

from models import build_detector
from models.config import ModelConfig
from util.cpu import configure_malloc
from util.misc import pad_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    configure_malloc()
    device = torch.device(options.device)
    torch.manual_seed(0)
    model = build_detector(ModelConfig()).eval().to(device)
    g = torch.Generator().manual_seed(0)
    mixed = [torch.randn(3, h, w, generator=g) for h, w in [(512, 683)] * 2 + [(480, 640)] * 2]
    images, mask = (t.to(device) for t in pad_images(mixed, 32))
    large = torch.randn(1, 3, 800, 1216, generator=g).to(device)

    def timed(*inputs) -> float:
        def call():
            with torch.inference_mode():
                model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return median_time(call, options.runs)[0]

    rows = [
        ("1x3x800x1216", "no padding (masked path not taken)", timed(large, None), None),
        ("2x512x683 + 2x480x640 -> 4x512x704", "unmasked (official, not invariant)",
         timed(images, None), None),
    ]  # fmt: skip
    masked = timed(images, mask)
    rows.append(("2x512x683 + 2x480x640 -> 4x512x704", "masked (batch-invariant)", masked,
                 masked / rows[1][2]))  # fmt: skip
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}\n")  # fmt: skip
    print("| input | path | seconds | vs unmasked |\n| --- | --- | ---: | ---: |")
    for size, path, seconds, ratio in rows:
        print(f"| {size} | {path} | {seconds:.3f} | {'' if ratio is None else f'{ratio:.3f}x'} |")


if __name__ == "__main__":
    main()
