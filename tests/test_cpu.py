"""util.cpu.configure_malloc: with PVT_DETR_MALLOC=keep, large blocks come from the heap, which
keeps them mapped for reuse; by default glibc maps each one afresh."""

import json
import os
import platform
import subprocess
import sys

import pytest

from util.cpu import configure_malloc

# In a fresh interpreter: apply the setting, allocate a 118 MiB tensor (the size of a PVT stage-1
# MLP activation at 800x1216) and tell whether its memory lies in the [heap] mapping.
SCRIPT = """
import json, torch
from util.cpu import configure_malloc
applied = configure_malloc()
tensor = torch.empty(31_000_000)
address = tensor.data_ptr()
heap = []
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        heap += [int(bound, 16) for bound in line.split()[0].split("-")]
in_heap = bool(heap) and min(heap) <= address < max(heap)
print(json.dumps({"applied": applied, "in_heap": in_heap}))
"""


def allocate(malloc: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PVT_DETR_MALLOC", "LD_PRELOAD")}
    env |= {"OMP_NUM_THREADS": "1"} | ({"PVT_DETR_MALLOC": malloc} if malloc else {})
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_keep_serves_large_blocks_from_the_heap_and_system_is_the_default():
    assert allocate("keep") == {"applied": True, "in_heap": True}
    assert allocate(None) == allocate("system") == {"applied": False, "in_heap": False}


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("PVT_DETR_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="PVT_DETR_MALLOC='jemalloc'"):
        configure_malloc()
