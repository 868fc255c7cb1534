"""Time one forward pass of a PVT backbone (median of several runs, warm-up excluded).

.venv/bin/python benchmarks/pvt_forward.py --variant pvt_small --size 800 1216
"""

import argparse
import statistics
import time

import torch

from models import pvt
from models.attention import set_fused_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="pvt_small", choices=sorted(pvt.VARIANT_DEPTHS))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="matmul + softmax attention")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = getattr(pvt, args.variant)(num_classes=0).eval()
    set_fused_attention(model, not args.eager)
    x = torch.randn(args.batch, 3, *args.size)
    times = []
    with torch.inference_mode():
        model.forward_features(x)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            model.forward_features(x)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.variant} ({params:.2f}M params, {'eager' if args.eager else 'fused'} attention) "
        f"{args.batch}x3x{args.size[0]}x{args.size[1]}: median {statistics.median(times):.3f} s "
        f"over {args.runs} runs (min {min(times):.3f} s), {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
