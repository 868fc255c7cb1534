"""How the process gets its memory from the C library, for CPU runs.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit Linux)
with a fresh ``mmap`` and gives it back with ``munmap`` when freed. A PVT stage-1 MLP activation at
800x1216 is 60,800 tokens x 512 channels = 124 MB, so each such tensor is mapped, page-faulted and
zeroed by the kernel page by page on every use. ``MALLOC_MMAP_THRESHOLD_`` cannot help (glibc
refuses thresholds above 32 MiB). docs/speed.md gives the measured cost.

Besides never allocating such blocks (:mod:`models.chunked_mlp`, the default), two remedies,
measured in docs/speed.md (``benchmarks/speed.py``):

- **tcmalloc** (``apt install libtcmalloc-minimal4``, then
  ``LD_PRELOAD=libtcmalloc_minimal.so.4 python main.py ...``) keeps freed memory for reuse and
  packs it well. It must be preloaded when the process starts, so it cannot be switched on from
  Python.
- ``PVT_DETR_MALLOC=keep`` makes glibc itself keep freed memory (``M_MMAP_MAX = 0``: every block
  from the heap; ``M_TRIM_THRESHOLD`` at its maximum: the heap is not trimmed). It also avoids
  the fresh pages, but it costs memory: PyTorch's 64-byte-aligned blocks go through
  ``posix_memalign``, whose padding can leave a freed block just too small for the next request
  of the same size, so the heap grows for a few steps before it settles, and it never shrinks.
  Opt-in for that reason.

The default, ``PVT_DETR_MALLOC=system``, leaves malloc as it is. ``configure_malloc`` is called at
the start of ``main.py``, ``predict.py``, ``pretrain_backbone.py`` and the benchmarks.
"""

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
CHOICES = ("system", "keep")


def configure_malloc() -> bool:
    """Apply ``PVT_DETR_MALLOC`` (``system``, the default, or ``keep``); True if glibc was tuned.

    ``keep`` on a C library other than glibc, or with another allocator preloaded, logs why it
    does nothing and returns False. Safe to call more than once.
    """
    choice = os.environ.get("PVT_DETR_MALLOC", "system")
    if choice not in CHOICES:
        raise ValueError(f"PVT_DETR_MALLOC={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "system":
        return False
    preloaded = os.environ.get("LD_PRELOAD", "")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "malloc" in preloaded:
        logger.warning("PVT_DETR_MALLOC=keep tunes glibc's malloc, which is not in use here")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success. The trim threshold is an int: INT_MAX (2 GiB) is the largest.
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not applied:
        logger.warning("mallopt refused PVT_DETR_MALLOC=keep; malloc is left as it is")
    return applied
