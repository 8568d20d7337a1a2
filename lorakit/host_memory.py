"""Keep freed host memory in the process between training steps (Linux with glibc).

glibc's malloc serves blocks above a floating threshold (128 KiB, rising to the largest block
freed, at most 32 MiB) with fresh `mmap`s, and gives the top of its heap back to the system once
more than twice that threshold lies free there. A training step on CPU allocates and frees the
same few hundred MiB of activations every step, so every step meets some of its memory fresh from
the kernel, one page fault per 4 KiB page, each about 2 us on the benchmark machine (the kernel
zeroes the page). With gradient checkpointing, whose rerun frees and allocates each layer's
activations again inside backward, that was 1,000-34,000 faults a step on the benchmark model
(about 20,000 as a rule): up to ~70 ms (docs/benchmarks.md).

`keep_freed_memory` sets both thresholds once: blocks up to 16 MiB come from the heap, and the heap
is not trimmed (up to 2 GiB free at its top stays), so after the first steps the same pages serve
every step. Larger blocks keep their own mappings, given back when freed: at 7B shapes a hidden-size
bf16 activation of 4,096 tokens is just under 32 MiB, and with those in the heap its holes grew the
full-checkpointing peak by 0.8-1.3 GiB (3.80-4.33 against 2.97-2.99 GiB on three Mistral-7B-shaped
layers, docs/benchmarks.md); on the benchmark's model it changed neither the peak nor, within the
host's noise, the step time. The process then keeps what it held at its peak, which a training step
reaches every step anyway. `lorakit train` calls it whenever it trains on CPU: under gradient
checkpointing, whose rerun takes each layer's activations again, it made the benchmark's step a
median 51 ms faster; without checkpointing it took 4,000-9,000 faults and 2-29 ms (plain) or 9-16 ms
(QLoRA, whose dequantized weights are taken again twice a layer) off a step on a host with twice the
earlier GEMM rate, and at 7B shapes lowered the peak by 15% for steps 0-7% slower
(docs/benchmarks.md, levers tables). Where the user has chosen the allocator's settings (glibc's
MALLOC_* or GLIBC_TUNABLES variables) or preloaded another allocator, nothing is changed.

The blocks above the threshold still come fresh from the kernel every time they are taken: at 7B
layer shapes about a million page faults a step, whose cost is the kernel zeroing the pages (huge
pages cut the faults a hundredfold and saved no time). `cache_large_blocks` puts a CPU allocator of
lorakit's in front of torch's that keeps those blocks by size, within the most that was live at
once: half the faults and about 3% of a 7B-shaped step, plain or fully checkpointed, the peak
within 0.1 GiB (docs/benchmarks.md). `lorakit train` installs it on CPU where lorakit's kernels build.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Callable, Mapping, Optional

# Switches for the benchmark's levers (docs/benchmarks.md): on by default.
KEEP_FREED_MEMORY = True
# Freed blocks of MMAP_THRESHOLD bytes or more kept for the next request of their size
# (`cache_large_blocks`).
CACHE_LARGE_BLOCKS = True

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks above this still get their own mapping, returned when freed (see the docstring for why 16
# MiB and not the 32 MiB most glibc takes on 64-bit systems).
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 2**31 - 1  # the most mallopt takes: up to 2 GiB free at the top of the heap stays

_applied = False


def user_chose_allocator(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc malloc's behaviour or preloads another allocator."""
    if any(name.startswith("MALLOC_") for name in environ):
        return True
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(lib in environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Set glibc malloc's thresholds as the module docstring says; True when they are set (now or
    by an earlier call), False where this is not Linux with glibc or the user chose otherwise."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or user_chose_allocator(os.environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own libc, whose heap torch allocates from
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # either setting also stops glibc from moving the mmap threshold itself, so both are set
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def cache_large_blocks(announce: Optional[Callable[[str], None]] = None) -> bool:
    """Put lorakit's large-block cache (lorakit/csrc/block_cache_cpu.cpp) in front of torch's CPU
    allocator, for the rest of the process: a freed block of MMAP_THRESHOLD bytes or more, which glibc
    would hand back to the kernel, is kept for the next request of exactly its size, and the blocks
    held, live and kept, never exceed the most that were live at once. At 7B layer shapes that takes
    about a million page faults out of a step (docs/benchmarks.md). True when installed (now or
    before); False where lorakit's CPU kernels cannot be built. `announce`: told when this call
    builds the kernels (`cpu_kernels.ops`)."""
    from lorakit import cpu_kernels

    ops = cpu_kernels.ops(announce)
    return ops is not None and bool(ops.cache_large_blocks(MMAP_THRESHOLD))

