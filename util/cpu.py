"""Process-wide settings for fast CPU runs.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit Linux)
with a fresh ``mmap`` and returns it with ``munmap`` when freed. A PVT stage-1 activation at
800x1216 is 60,800 tokens x 512 channels = 124 MB, so every such tensor is mapped, page-faulted
and zeroed by the kernel page by page on each use, and then unmapped again: on the 2-core machine
this project is developed on that made ``F.gelu`` on one such tensor 49 ms instead of 14 ms, an
``addmm`` 102 ms instead of 30 ms, and a whole inference 1.9 s instead of 1.45 s (see README,
"Speed and memory"). Raising ``MALLOC_MMAP_THRESHOLD_`` cannot help, because glibc refuses any
threshold above 32 MiB; turning ``mmap`` off (``M_MMAP_MAX = 0``) and never trimming the heap
(``M_TRIM_THRESHOLD``) can: freed activations stay in the heap, already mapped, and the next step
reuses them. jemalloc or tcmalloc through ``LD_PRELOAD`` do the same and are fine to use instead.

The cost is that memory freed after a peak is kept by the process (the resident size stays at
the peak), which is what a training loop wants. ``keep_freed_memory`` is called at the start of
``main.py``, ``predict.py``, ``pretrain_backbone.py`` and the benchmarks; set
``PVT_DETR_MALLOC=system`` to leave malloc as it is.
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


def keep_freed_memory() -> bool:
    """Serve all blocks from the heap and keep freed memory for reuse (glibc only).

    Returns True when the setting was applied; False on other C libraries or platforms, or when
    the environment variable ``PVT_DETR_MALLOC`` is ``system``. Safe to call more than once.
    """
    choice = os.environ.get("PVT_DETR_MALLOC", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"PVT_DETR_MALLOC={choice!r}: use 'keep' (default) or 'system'")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success. The trim threshold is an int: INT_MAX (2 GiB) is the largest
    # and means that the heap top is returned to the system only when 2 GiB of it are free.
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not applied:
        logger.warning("mallopt refused the heap settings; large tensors will be mmapped per use")
    return applied
