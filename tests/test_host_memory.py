"""lorakit.host_memory: glibc keeps freed memory, so memory taken again costs no page faults."""

import os
import platform
import subprocess
import sys

import pytest

from lorakit import host_memory

# In a fresh process (the allocator's settings are process-wide): rounds of taking three 12 MiB
# blocks from malloc (under lorakit's 16 MiB mmap threshold), writing them and freeing them; it
# prints the page faults each round cost. With glibc's defaults the first free lifts the mmap
# threshold to 12 MiB, so later blocks come from the heap, but then 36 MiB lie free at its top, more
# than the trim threshold (twice the mmap threshold): the heap is cut back and every round faults
# all its pages in again.
_ROUNDS = """
import ctypes, resource, sys
from lorakit import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()  # the second call: already set
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.memset.argtypes, libc.free.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t), (ctypes.c_void_p,)
size = 12 << 20
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(3)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*counts)
"""


def _faults(setting: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not host_memory.user_chose_allocator({k: v})}
    done = subprocess.run([sys.executable, "-c", _ROUNDS, setting], capture_output=True, text=True, env=env, check=True)
    return [int(n) for n in done.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_taken_again_without_page_faults():
    pages = (36 << 20) // 4096  # one round's three blocks
    default, kept = _faults("default"), _faults("keep")
    assert all(n > 0.9 * pages for n in default[2:]), default
    assert all(n < 0.01 * pages for n in kept[1:]), kept  # the heap's pages serve every round after the first


def test_the_users_allocator_settings_win():
    assert not host_memory.user_chose_allocator({"PATH": "/usr/bin", "HOME": "/root"})
    assert host_memory.user_chose_allocator({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert host_memory.user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"})
    assert not host_memory.user_chose_allocator({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert host_memory.user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
