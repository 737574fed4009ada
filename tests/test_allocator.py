"""glibc malloc settings of a training process (trainer/allocator.py): freed memory is reused
without page faults; the user's own MALLOC_* settings are left alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

#: a step's pattern in small: ``count`` blocks of ``size`` MiB allocated, touched, all freed, three
#: times; prints the minor page faults of each round (a fresh interpreter: malloc's state is per process)
ROUNDS = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
from trainer.allocator import keep_freed_memory
configured = keep_freed_memory() if sys.argv[2] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, count, faults = int(sys.argv[3]) << 20, int(sys.argv[4]), []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"configured": configured, "faults": faults}))
"""


def _rounds(configure: bool, mib: int = 4, count: int = 12, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", ROUNDS, str(ROOT), "1" if configure else "0", str(mib), str(count)],
                         env={**clean, **env}, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mib,count", [(4, 12), (48, 1)])  # the heap top trimmed; a block above any mmap threshold
def test_freed_blocks_are_reused_without_page_faults(mib, count):
    pages = count * (mib << 20) // 4096
    assert _rounds(False, mib, count)["faults"][2] > pages // 2  # glibc gave the memory back: faulted in again
    kept = _rounds(True, mib, count)
    assert kept["configured"] and kept["faults"][2] < pages // 20


def test_user_malloc_settings_are_left_alone():
    assert keep_freed_memory(env={"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    chosen = _rounds(True, MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")
    assert chosen["configured"] is False and chosen["faults"][2] > 12 * (4 << 20) // 4096 // 2
