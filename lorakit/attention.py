"""Causal attention within each example of packed rows, for transformers models.

Packed rows (lorakit.batching) carry no attention mask: position ids restart at 0 for every example.
`use_varlen_attention` registers `varlen_attention_forward` with transformers and switches a
model to it; it attends to each example on its own, so no work or memory goes to the (T, T)
block-diagonal mask or to scores across examples.

On CPU, examples of up to `BLOCKED_ATTENTION_MAX_LEN` tokens go through a blocked kernel:
GEMMs over blocks of query rows that keep their softmax for backward. It runs compiled
(`_CompiledBlockedAttention`, the C++ of lorakit/csrc/attention_cpu.cpp, built by
`lorakit.cpu_kernels`) for float32 and bfloat16 where a compiler is at hand, in bfloat16 on its own
AVX512-BF16 GEMMs where the CPU has them (3x-5x faster than torch's CPU flash kernel there,
docs/benchmarks.md), else in PyTorch (`_BlockedCausalAttention`, the same algorithm).
On GPUs, bf16 and fp16 rows go through one call of torch's variable-length flash kernel per layer
for all the examples of the batch (`_FlashVarlenAttention`, see GPU_VARLEN_FLASH). Longer examples,
dropout and everything else use `F.scaled_dot_product_attention` per example (on GPUs without
cuDNN's backend, see CUDNN_ATTENTION); padding masks,
KV caches and softcapping go to transformers' own SDPA path. Tested equal to SDPA in
tests/test_attention.py.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorakit import activation_checkpointing, cpu_kernels
from lorakit.activation_checkpointing import KeptSlot

# Switches for the benchmark and for comparing against the plain path; the defaults are the
# measured winners (docs/benchmarks.md).
# Packed rows: one causal attention per example instead of SDPA with a block-diagonal mask.
VARLEN_ENABLED = True
# On CPU, examples up to BLOCKED_ATTENTION_MAX_LEN tokens go through `_BlockedCausalAttention`
# instead of torch's flash SDPA kernel.
BLOCKED_ATTENTION = True
# The blocked kernel compiled (lorakit.cpu_kernels) rather than in PyTorch, where it can be built:
# per 512-token example (12/4 heads of 64, bf16, forward + backward) 7.5 ms against 10.3 ms.
COMPILED_ATTENTION = True
# In bf16, the compiled kernel's GEMMs run on lorakit's own AVX512-BF16 code where the CPU has it,
# rather than through oneDNN (lorakit/csrc/attention_cpu.cpp): forward + backward of a benchmark
# layer about 12 -> 8 ms; whole plain steps 0.891 -> 0.871 s.
COMPILED_BF16_GEMM = True
# On GPUs, the per-example SDPA calls may use cuDNN's attention. Off by default: on Hopper torch
# prefers cuDNN, which builds an execution plan for every new sequence length (25-31 ms of host
# time a call on an H200 with torch 2.11, against ~0.1 ms on the GPU), and packed examples bring
# new lengths every step. Flash attention (then the memory-efficient kernel, then math) has no
# per-shape setup.
CUDNN_ATTENTION = False
# On GPUs, bf16/fp16 packed rows go to one varlen flash-attention call per layer (the examples given
# by cumulative lengths) instead of one SDPA call per example, whose slicing, joins and launches
# grow with the number of examples: on a small model a GPU step is bound by the host's launches.
GPU_VARLEN_FLASH = True

VARLEN_ATTENTION = "lorakit_varlen"


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example in a packed row: positions restart at 0."""
    rows = []
    starts_mask = torch.ones_like(position_ids, dtype=torch.bool)
    starts_mask[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    for row in starts_mask.tolist():
        starts = [i for i, s in enumerate(row) if s]
        rows.append(list(zip(starts, starts[1:] + [length])))
    return rows


_segment_cache: dict[str, object] = {}


# Longer examples go to torch's flash kernel, whose memory is linear in length. The blocked kernel
# keeps ~L^2/2 probabilities per head for backward, H·L bytes per token in bf16: at 512 tokens that
# is about a quarter of what a Llama layer keeps per token anyway (6 KB against ~22 KB in the
# benchmark model), at 1024 about half, for a gain that falls from 2x (<= 512 tokens) to 1.25x
# (1024) as the score blocks outgrow the cache.
BLOCKED_ATTENTION_MAX_LEN = 512
# Query rows per block. Forward + backward of two 512-token rows, 12/4 heads of 64: 64 rows 21.3 ms,
# 32 rows +29%, 48/96/128 rows +5% (128 wins on single shorter examples, by up to 12%).
ATTENTION_BLOCK_ROWS = 64

_causal_bias_cache: dict[tuple, torch.Tensor] = {}


def _causal_bias(rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, rows) additive mask: 0 on and below the diagonal, -inf above."""
    key = (rows, dtype, device)
    if key not in _causal_bias_cache:
        _causal_bias_cache[key] = torch.full((rows, rows), float("-inf"), dtype=dtype, device=device).triu_(1)
    return _causal_bias_cache[key]


def _query_blocks(length: int) -> list[tuple[int, int]]:
    return [(start, min(length, start + ATTENTION_BLOCK_ROWS)) for start in range(0, length, ATTENTION_BLOCK_ROWS)]


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, L, H, D) -> (B, H_kv, H/H_kv, L, D) view: the query heads that share a key head together."""
    return x.unflatten(2, (kv_heads, x.shape[2] // kv_heads)).permute(0, 2, 3, 1, 4)


def _block_scores(query: torch.Tensor, keys: torch.Tensor, start: int, end: int, scale: float) -> torch.Tensor:
    """Scaled causal scores of query rows start:end of every head against keys 0:end, in `keys`' dtype.

    query: (B, H, L, D), keys: (B·H_kv, L, D) in the accumulation dtype; returns (B·H_kv, g·rows, end)
    with the g = H/H_kv query heads of a key head stacked, so one GEMM serves the whole group.
    """
    b, heads, _, d = query.shape
    groups = keys.shape[0]
    kv_heads, rows = groups // b, end - start
    q = torch.empty((b, kv_heads, heads // kv_heads, rows, d), dtype=keys.dtype, device=keys.device)
    q.copy_(query[:, :, start:end].unflatten(1, (kv_heads, heads // kv_heads))).mul_(scale)
    scores = torch.bmm(q.view(groups, -1, d), keys[:, :end].transpose(1, 2))
    scores.view(groups, heads // kv_heads, rows, end)[..., start:].add_(_causal_bias(rows, keys.dtype, keys.device))
    return scores


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal attention over one example, as batched GEMMs over blocks of query rows.

    For each block of `ATTENTION_BLOCK_ROWS` query rows, the scores against the keys up to the
    block's end are one GEMM for all query heads sharing a key head, in fp32 (as flash kernels
    accumulate); the softmax runs on the whole row at once (the row fits in the block, so no online
    rescaling), and its result is kept in the activations' dtype for backward. Backward then needs
    no recomputation: dV = P^T dO, dS = P ∘ (dO V^T - rowsum(dO ∘ O)), dQ = s·dS K, dK = s·dS^T Q,
    with dK and dV summed over blocks in fp32. Above-diagonal work is skipped block by block.

    Against torch's CPU flash kernel (2-core AVX-512, bf16, one example, 12 heads / 4 KV heads of
    64, forward + backward): 100 tokens 2.4 -> 1.2 ms, 300 tokens 7.8 -> 4.9 ms, 512 tokens 18 ->
    9.2 ms, 1024 tokens 44 -> 35 ms. The price is the kept probabilities, about H·L^2 bytes per layer
    in bf16 (3.5 MB for a 512-token example with 12 heads): see BLOCKED_ATTENTION_MAX_LEN.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, kept: Optional[KeptSlot] = None):
        # query (B, H, L, D), key/value (B, H_kv, L, D), any strides; returns (B, L, H, D)
        b, heads, length, d = query.shape
        kv_heads = key.shape[1]
        # Selective checkpointing keeps the output and the probabilities: its rerun computes nothing.
        replay = kept.take() if kept is not None and kept.replaying else None
        if replay is None:
            accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
            keys = key.reshape(b * kv_heads, length, d).to(accumulate)
            values = value.reshape(b * kv_heads, length, d)
            out = query.new_empty(b, length, heads, d)
            out_grouped = _grouped(out, kv_heads)
            probs = []
            for start, end in _query_blocks(length):
                p = torch.softmax(_block_scores(query, keys, start, end, scale), dim=-1).to(query.dtype)
                out_grouped[:, :, :, start:end] = torch.bmm(p, values[:, :end]).view(b, kv_heads, -1, end - start, d)
                probs.append(p)
        else:
            out, probs = replay
        if kept is not None and not kept.replaying:
            kept.record(out, probs)
        ctx.save_for_backward(query, key, value, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *probs = ctx.saved_tensors
        b, heads, length, d = query.shape
        kv_heads = key.shape[1]
        groups, per_group = b * kv_heads, heads // kv_heads
        keys = key.reshape(groups, length, d)
        values = value.reshape(groups, length, d)
        grad_grouped = _grouped(grad_out, kv_heads).reshape(groups, per_group, length, d)
        # rowsum(P ∘ dP) = rowsum(dO ∘ O): one (L, D) product instead of one per score
        accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
        delta = (grad_grouped.to(accumulate) * _grouped(out, kv_heads).reshape(groups, per_group, length, d))
        delta = delta.sum(-1, keepdim=True).to(query.dtype)
        grad_query = query.new_empty(b, length, heads, d)
        grad_query_grouped = _grouped(grad_query, kv_heads)
        grad_key = torch.zeros((groups, length, d), dtype=accumulate, device=query.device)
        grad_value = torch.zeros_like(grad_key)
        for (start, end), p in zip(_query_blocks(length), probs):
            rows = end - start
            grad_block = grad_grouped[:, :, start:end].reshape(groups, per_group * rows, d)
            grad_value[:, :end] += torch.bmm(p.transpose(1, 2), grad_block)
            grad_scores = torch.bmm(grad_block, values[:, :end].transpose(1, 2)).view(groups, per_group, rows, end)
            grad_scores = grad_scores.sub_(delta[:, :, start:end]).view(groups, per_group * rows, end).mul_(p)
            grad_query_grouped[:, :, :, start:end] = torch.bmm(grad_scores, keys[:, :end]).view(b, kv_heads, per_group, rows, d)
            query_block = query[:, :, start:end].unflatten(1, (kv_heads, per_group)).reshape(groups, per_group * rows, d)
            grad_key[:, :end] += torch.bmm(grad_scores.transpose(1, 2), query_block)
        grad_query.mul_(ctx.scale)
        grad_key.mul_(ctx.scale)
        shape = (b, kv_heads, length, d)
        return grad_query.transpose(1, 2), grad_key.to(key.dtype).view(shape), grad_value.to(value.dtype).view(shape), None, None


class _CompiledBlockedAttention(torch.autograd.Function):
    """`_BlockedCausalAttention`'s algorithm, compiled, over all the examples of a batch at once.

    One call per layer: the C++ hands one (example, key head) pair at a time to each intra-op
    thread, and runs the block loop, the softmax and the gradient rows without a Python op per
    block. `segments` is a flat tuple of (row, start, end) triples; tokens outside them get zeros.
    In bf16 (with COMPILED_BF16_GEMM, on AVX512-BF16) its GEMMs sum in fp32 and round each result
    once, where oneDNN's round every block product: its results are a little closer to the fp64
    ones than the oneDNN path's, not bit-equal to them (tests/test_cpu_kernels.py).
    """

    @staticmethod
    def forward(ctx, query, key, value, segments: tuple[int, ...], scale: float, kept: Optional[KeptSlot] = None):
        # query (B, H, T, D), key/value (B, H_kv, T, D); returns (B, T, H, D)
        # Selective checkpointing keeps the output and the probabilities: its rerun computes nothing.
        replay = kept.take() if kept is not None and kept.replaying else None
        rows = ATTENTION_BLOCK_ROWS
        if replay is None:
            out, probs = cpu_kernels.ops().attention_forward(query, key, value, segments, scale, rows, COMPILED_BF16_GEMM)
        else:
            out, probs = replay
        if kept is not None and not kept.replaying:
            kept.record(out, probs)
        ctx.save_for_backward(query, key, value, out, probs)
        ctx.segments, ctx.scale, ctx.rows, ctx.bf16_gemm = segments, scale, rows, COMPILED_BF16_GEMM
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, probs = ctx.saved_tensors
        grad_query, grad_key, grad_value = cpu_kernels.ops().attention_backward(
            grad_out, query, key, value, out, probs, ctx.segments, ctx.scale, ctx.rows, ctx.bf16_gemm
        )
        return grad_query.transpose(1, 2), grad_key, grad_value, None, None, None


def _compiled(query: torch.Tensor) -> bool:
    """Whether the compiled blocked kernel takes these queries (and can be built: built here once)."""
    return COMPILED_ATTENTION and cpu_kernels.ops_for(query) is not None


# Kept out of torch.compile graphs (`train.compile: true`): dynamo would unroll the PyTorch kernel's
# block loop for every example length it meets and trip over the mask cache, and the compiled
# kernel's ops have no shape functions to trace; eager, either is already GEMMs.
@torch.compiler.disable
def _blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    if _compiled(query):
        length = query.shape[2]
        segments = tuple(x for row in range(query.shape[0]) for x in (row, 0, length))
        return _CompiledBlockedAttention.apply(query, key, value, segments, scale)
    return _BlockedCausalAttention.apply(query, key, value, scale)


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of (B, H, L, D) queries over (B, H_kv, L, D) keys/values -> (B, L, H, D)."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"attention.blocked_causal_attention: {query.shape[1]} query heads are not a multiple of "
                         f"{key.shape[1]} key heads; pass key/value with a divisor of the query heads")  # fmt: skip
    return _blocked_causal_attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale)


def _gpu_has_flash(device: torch.device) -> bool:
    """A CUDA GPU of sm80 or later, with torch's flash attention built in."""
    return (
        device.type == "cuda"
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def _flash_varlen_takes(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether torch's varlen flash kernel takes these (B, H, T, D) queries: on such a GPU, in
    bf16/fp16, without dropout, head dims up to 256, whole groups of query heads per key head."""
    return (
        GPU_VARLEN_FLASH
        and dropout == 0.0
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.dtype == query.dtype
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and query.shape[1] % key.shape[1] == 0
        and _gpu_has_flash(query.device)
    )


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B·T, H, D), as the varlen kernel takes it: a view where transformers'
    projections left the heads inside each token's row (no copy), a copy otherwise."""
    b, heads, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, heads, d)


class _FlashVarlenAttention(torch.autograd.Function):
    """Causal attention over every example of a packed batch in one call of torch's varlen flash
    kernel (GPUs): the rows are laid end to end and the examples given by their cumulative lengths.

    Saves what flash attention's backward reads (the inputs, the output and the per-row log-sum-exp)
    and no probabilities. Selective checkpointing keeps the output and the log-sum-exp, so its
    rerun computes nothing here either.
    """

    @staticmethod
    def forward(ctx, query, key, value, cu_seqlens: torch.Tensor, max_len: int, scale: float,
                kept: Optional[KeptSlot] = None):  # fmt: skip
        # query (B, H, T, D), key/value (B, H_kv, T, D), heads inside each token's row; returns (B, T, H, D)
        b, heads, t, d = query.shape
        q, k, v = _tokens_first(query), _tokens_first(key), _tokens_first(value)
        replay = kept.take() if kept is not None and kept.replaying else None
        if replay is None:
            out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale
            )
        else:
            out, (lse, rng_state, unused) = replay
        if kept is not None and not kept.replaying:
            kept.record(out, (lse, rng_state, unused))
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_len, ctx.scale, ctx.shapes = max_len, scale, (query.shape, key.shape)
        return out.view(b, t, heads, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        grad = grad_out.reshape(out.shape)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        grad_q, grad_k, grad_v = torch.ops.aten._flash_attention_backward(
            grad, q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True, rng_state, unused,
            scale=ctx.scale,
        )  # fmt: skip
        (b, heads, t, d), (_, kv_heads, _, _) = ctx.shapes
        return (grad_q.view(b, t, heads, d).transpose(1, 2), grad_k.view(b, t, kv_heads, d).transpose(1, 2),
                grad_v.view(b, t, kv_heads, d).transpose(1, 2), None, None, None, None)  # fmt: skip


def _cumulative_lengths(rows: list[list[tuple[int, int]]], length: int, device) -> tuple[torch.Tensor, int]:
    """The examples of all rows laid end to end: int32 offsets (0, end_1, ..., B·T) and the longest."""
    offsets, longest = [0], 0
    for b, segs in enumerate(rows):
        for s, e in segs:
            offsets.append(b * length + e)
            longest = max(longest, e - s)
    return torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True), longest


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_backends(query: torch.Tensor) -> contextlib.AbstractContextManager:
    """The SDPA backends a per-example call may use: all but cuDNN's on GPUs (see CUDNN_ATTENTION)."""
    return sdpa_kernel(_NO_CUDNN) if query.is_cuda and not CUDNN_ATTENTION else contextlib.nullcontext()


# Eager under torch.compile too: the segments come from position ids through Python lists and a
# per-forward cache, which a traced graph would freeze to the first batch's layout.
@torch.compiler.disable
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    position_ids: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of packed rows, without a (T, T) mask.

    query: (B, H, T, D), key/value: (B, H_kv, T, D); returns (B, T, H, D) as transformers expects.
    With position ids restarting per example, each example is attended on its own: the kernel then
    skips the upper triangle and the blocks of other examples, where a block-diagonal mask makes it
    compute all T x T scores and read the mask besides. On CPU without dropout, examples up to
    `BLOCKED_ATTENTION_MAX_LEN` tokens use `_BlockedCausalAttention`, others a causal SDPA call.
    Anything else (a padding mask, a KV cache, softcapping) goes to transformers' SDPA path.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len != kv_len or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids, **kwargs
        )
    # Every layer gets the same position_ids object: find the segments once per forward. The cache
    # holds that tensor, so its memory cannot be reused by another batch while it is the key.
    # Tensors made under torch.inference_mode() have no version counter: they are not cached.
    version = None if position_ids.is_inference() else position_ids._version
    cached = _segment_cache.get("key")
    if version is not None and cached is position_ids and _segment_cache.get("version") == version:
        rows = _segment_cache["rows"]
    else:
        full = position_ids.expand(query.shape[0], -1) if position_ids.shape[0] != query.shape[0] else position_ids
        rows = _segments(full)
        _segment_cache.pop("flash", None)
        if version is not None:
            _segment_cache.update(key=position_ids, version=version, rows=rows)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    slot = activation_checkpointing.current_slot(module)  # set in a checkpointed layer that is rerun
    if _flash_varlen_takes(query, key, p):  # GPUs: one call for every example of the batch
        # the offsets go with the cached segments (dropped above whenever those are found afresh)
        flash = _segment_cache.get("flash") or _cumulative_lengths(rows, query.shape[2], query.device)
        if version is not None:
            _segment_cache["flash"] = flash
        cu_seqlens, longest = flash
        return _FlashVarlenAttention.apply(query, key, value, cu_seqlens, longest, scale, slot), None
    blocked = BLOCKED_ATTENTION and p == 0.0 and query.device.type == "cpu" and query.shape[1] % key.shape[1] == 0

    def attend(q, k, v):  # one example: (b, H, L, D) -> (b, L, H, D)
        if blocked and q.shape[2] <= BLOCKED_ATTENTION_MAX_LEN:
            return _BlockedCausalAttention.apply(q, k, v, scale, slot)  # already outside compiled graphs
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)

    def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    if blocked and _compiled(query):  # one call for every short example of the batch
        short = tuple(x for b, segs in enumerate(rows) for s, e in segs if e - s <= BLOCKED_ATTENTION_MAX_LEN for x in (b, s, e))
        out = _CompiledBlockedAttention.apply(query, key, value, short, scale, slot)
        longer = [(b, s, e) for b, segs in enumerate(rows) for s, e in segs if e - s > BLOCKED_ATTENTION_MAX_LEN]
        if longer:
            out = out.clone()  # the kernel saved its own output for backward: write into a copy
            for b, s, e in longer:
                out[b : b + 1, s:e] = attend(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e])
        return out, None
    with _sdpa_backends(query):  # once for all of this forward's calls (GPUs take SDPA here)
        if all(r == rows[0] for r in rows):  # same layout in every row (e.g. unpacked batches): batch the rows
            out = join([attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]) for s, e in rows[0]], 1)
        else:
            out = join(
                [
                    join([attend(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]) for s, e in segs], 1)
                    for b, segs in enumerate(rows)
                ],
                0,
            )
    return out.contiguous(), None


def _varlen_mask(*args, attention_mask=None, local_size=None, **kwargs):
    """No mask for training-style calls (the attention reads example boundaries from position ids);
    transformers' SDPA mask for everything else (padding, KV caches, sliding windows)."""
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length = kwargs.get("q_length", args[1] if len(args) > 1 else None), kwargs.get(
        "kv_length", args[2] if len(args) > 2 else None
    )
    if attention_mask is None and local_size is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, local_size=local_size, **kwargs)


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model from SDPA to per-example attention for packed batches.

    Only for models already on SDPA without sliding windows; returns whether it switched.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    try:
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return config._attn_implementation == VARLEN_ATTENTION
