"""Settle oneMKL's vector-math kernels before the first multi-threaded call (a race in oneMKL 2024.2).

On CPU, torch computes float32 and float64 cos, sin, exp, log, sqrt, tanh, erf, ... of a contiguous
tensor with oneMKL's vector math library (VML; ATen/cpu/vml.h), which splits the tensor across the
intra-op threads. oneMKL chooses each function's kernel on its first call, and when that first call
runs on several threads at once, one thread can run a low-accuracy kernel over its whole share of
that one call: errors of hundreds to thousands of ulp, on no later call (pytorch/pytorch#188792;
oneMKL 2024.2, the version torch's wheels link, has it; 2025.0 does not).

lorakit met it as the first forward of a run: transformers' rotary embedding takes cos and sin of a
float32 (batch, tokens, head_dim) table, and in about one process in twenty the second thread's half
of the first table came out wrong far enough to round one entry to the next bf16 value. The first
forward of a DPO step is its reference pass, so the first loss then differed from ln 2 (0.6931504
instead of 0.6931472, measured on a tiny Qwen2), the policy pass having the settled kernel.

Calling every such function once on one element, which runs on the calling thread alone, makes the
choice before any concurrent call: the fix proposed upstream (pytorch/pytorch#188791) and harmless
where torch is built without oneMKL (the functions then run SLEEF's kernels, which have no race).
"""

from __future__ import annotations

import torch

# The functions ATen sends to oneMKL (its IMPLEMENT_VML_MKL list in ATen/cpu/vml.h; tests/test_cpu_math.py
# checks this against the header of the installed torch), each in float32 and float64.
VML_FUNCTIONS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt", "tan",
    "tanh", "trunc",
)  # fmt: skip

_settled = False


def settle_vector_math() -> bool:
    """Call each of oneMKL's vector-math functions once, single-threaded, so that none makes its first
    call from several threads (see the module docstring). Once per process; False where torch has no
    oneMKL (nothing to settle), True otherwise."""
    global _settled
    if _settled:
        return True
    if not torch.backends.mkl.is_available():
        return False
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            one = torch.full((1,), 0.5, dtype=dtype)  # inside every function's domain
            for name in VML_FUNCTIONS:
                getattr(torch, name)(one)
    _settled = True
    return True
