"""Process-group set-up and the few collective helpers the training loop needs.

``torch.distributed.run`` sets the usual environment variables (``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``); the SLURM launcher passes the same from submitit's job environment as a
:class:`DistInfo`. Without either the program runs as a single process.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def info_from_env() -> DistInfo:
    """Rank, world size and local rank from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (if set)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(
    device: str, dist_url: str = "env://", info: DistInfo | None = None
) -> DistInfo:
    """Join the process group of ``info``, or of the environment when ``info`` is None.

    A no-op for a single process. ``dist_url`` is the rendezvous (``env://``, ``tcp://host:port``
    or ``file:///shared/path``). The backend is ``nccl`` on CUDA and ``gloo`` on the CPU.
    """
    info = info_from_env() if info is None else info
    if info.world_size == 1:
        return info
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend, init_method=dist_url, rank=info.rank, world_size=info.world_size
    )
    logger.info("process %d of %d (%s, %s)", info.rank, info.world_size, backend, dist_url)
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over all processes (same keys on every process)."""
    if not is_initialized():
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / world_size()).tolist(), strict=True))


def all_gather(obj: object) -> list[object]:
    """``[obj from rank 0, obj from rank 1, ...]``; ``[obj]`` for a single process."""
    if not is_initialized():
        return [obj]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
