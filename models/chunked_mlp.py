"""The PVT MLP over chunks of tokens, for the CPU.

The hidden layer of a PVT MLP is 8 times wider than the tokens in the first two stages, so at
detection sizes a single hidden tensor is over a hundred megabytes. glibc's malloc maps every
block above 32 MiB afresh and the kernel zeroes and page-faults it on each use; blocks of a few
MiB are reused from the heap. Running the tokens through in chunks keeps every hidden tensor
small. docs/speed.md gives what this buys (``benchmarks/speed.py``).

Each output row is computed exactly as without chunks. With autograd each chunk keeps its own
activations (the same memory in all) and weight gradients are sums over chunks, equal up to
rounding. Without autograd (inference, a frozen backbone) GELU runs in place and the output is
written chunk by chunk, with the weights cast once under autocast.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def chunked_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp.layers(x)`` over chunks of ``mlp.chunk_values // hidden_dim`` tokens (a
    :class:`models.pvt.Mlp`); x: [..., dim] -> [..., dim]."""
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, mlp.chunk_values // mlp.fc1.out_features)
    if not mlp.records(x) and (mlp.drop.p == 0 or not mlp.training):
        out = inplace_chunks(mlp, rows, step)
    elif rows.shape[0] <= step:
        return mlp.layers(x)
    else:
        out = torch.cat([mlp.layers(part) for part in rows.split(step)])
    return out.view(*x.shape[:-1], out.shape[-1])


def inplace_chunks(mlp: nn.Module, rows: Tensor, step: int) -> Tensor:
    """fc1, GELU in place, fc2 on ``rows`` [N, dim], ``step`` rows at a time; no autograd."""
    weights = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    if torch.is_autocast_enabled(rows.device.type):  # cast once, not once per chunk
        weights = [w.to(torch.get_autocast_dtype(rows.device.type)) for w in weights]
    w1, b1, w2, b2 = weights
    out = None
    for start in range(0, rows.shape[0], step):
        hidden = F.linear(rows[start : start + step], w1, b1)
        part = F.linear(torch.ops.aten.gelu_(hidden, approximate=mlp.act.approximate), w2, b2)
        if out is None:
            out = part.new_empty(rows.shape[0], part.shape[-1])
        out[start : start + step] = part
    return out
