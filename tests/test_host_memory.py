"""lorakit.host_memory: glibc keeps freed memory, so memory taken again costs no page faults."""

import json
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


# In a fresh process (the CPU allocator is process-wide): large tensors taken and freed under the
# cache; prints JSON with what came back, the page faults and the cache's counters.
_CACHE = """
import json, resource, sys, torch
from lorakit import cpu_kernels, host_memory
if cpu_kernels.ops() is None:
    print(json.dumps(None)); sys.exit()
assert host_memory.cache_large_blocks() and host_memory.cache_large_blocks()  # the second call: already installed
stats = lambda: list(torch.ops.lorakit_cpu.large_block_stats())
mib = 1 << 20
out = {}
a = torch.full((40 * mib,), 7, dtype=torch.uint8)
pointer = a.data_ptr()
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.zeros(40 * mib, dtype=torch.uint8)  # the same size: the kept block, zeroed as asked
out["reused"] = b.data_ptr() == pointer
out["zeros"] = int(b.count_nonzero())
out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
out["after_reuse"] = stats()  # hits, misses, live, kept, peak live
del b
c = torch.ones(24 * mib, dtype=torch.uint8)  # another size: the 40 MiB block is given back first
out["other_size"] = stats()
small = torch.ones(1000)
out["small"] = stats()
x = torch.randn(2048, 2048)  # its product is 16 MiB: a block of the cache's
out["matmul"] = torch.allclose((x @ x.t()).double(), x.double() @ x.double().t(), rtol=1e-4, atol=1e-3)
del c, x, small
out["end"] = stats()
print(json.dumps(out))
"""


def test_large_blocks_come_back_by_size_within_the_peak():
    done = subprocess.run([sys.executable, "-c", _CACHE], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.splitlines()[-1])
    if out is None:
        pytest.skip("lorakit's CPU kernels cannot be built here")
    mib = 1 << 20
    assert out["reused"] and out["zeros"] == 0
    assert out["faults"] < 0.01 * (40 * mib // 4096), out["faults"]  # its pages were already there
    assert out["after_reuse"] == [1, 1, 40 * mib, 0, 40 * mib]
    # 24 MiB found no block of its size; holding 40 kept + 24 live would pass the 40 MiB peak
    assert out["other_size"] == [1, 2, 24 * mib, 0, 40 * mib]
    assert out["small"] == out["other_size"]  # under 16 MiB: the allocator before it
    assert out["matmul"]
    hits, misses, live, kept, peak = out["end"]
    assert live == 0 and kept <= peak and kept >= 24 * mib  # freed blocks kept, never above the peak
