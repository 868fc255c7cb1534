"""Time one forward pass of a PVT backbone (median of several runs, warm-up excluded).

.venv/bin/python benchmarks/pvt_forward.py --variant pvt_small --size 800 1216
"""

import argparse

import torch
from timing import median_time

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
    model = pvt.build_pvt(args.variant, num_classes=0).eval()
    set_fused_attention(model, not args.eager)
    x = torch.randn(args.batch, 3, *args.size)
    with torch.inference_mode():
        median, fastest = median_time(lambda: model.forward_features(x), args.runs)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.variant} ({params:.2f}M params, {'eager' if args.eager else 'fused'} attention) "
        f"{args.batch}x3x{args.size[0]}x{args.size[1]}: median {median:.3f} s "
        f"over {args.runs} runs (min {fastest:.3f} s), {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
