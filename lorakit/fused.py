"""Fused training kernels, each with a plain-PyTorch path and, on CPU, compiled kernels
(lorakit.cpu_kernels) where they build: a LoRA linear, a linear cross-entropy, an
RMSNorm and the SwiGLU gate (packed-row attention is in `lorakit.attention`).

Each is a `torch.autograd.Function` (or an attention function) whose only job is to keep less in
memory and run fewer or cheaper ops than autograd does for the same formulas; each has a plain
path it is tested equal to (tests/test_fused.py).

`lora_linear` computes, for a frozen base layer with weight W (out, in):

    y = base(x) + s · (dropout(x) @ A^T) @ B^T          x: (..., in), A: (r, in), B: (out, r)

- The base output is computed without autograd and the low-rank term is added into it in place
  (one `addmm_`), so no second (T, out) tensor is kept.
- Only `x` is saved. It is the tensor the previous op produced (usually shared by q/k/v or
  gate/up), so the layer adds nothing per token to the saved activations but (T, r). With dropout
  the dropped input is recomputed in backward instead of being kept as a second copy of x, and so
  is the mask, from a seed: on CPU through a counter-based generator (lorakit/csrc/dropout_cpu.cpp),
  on GPUs through PyTorch's bernoulli with a private generator (`_Dropout`).
- The adapter runs in the activations' dtype (bf16 under bf16 compute): A and B are cast, which
  costs r·(in+out) elements, where the plain path casts x (T·in elements) up to fp32 for an fp32
  matmul and keeps that copy for backward. The master weights and their gradients stay fp32. On
  CPUs with AVX512-BF16 the four rank-r products (x @ A^T, g @ B and the two adapter gradients)
  run on lorakit's kernels (lorakit/csrc/lora_cpu.cpp), which sum in fp32 and hand the adapter
  gradients over unrounded.
- Backward runs the input gradient as one matmul against the frozen weight plus one rank-r
  `addmm_` (no weight gradient for W), and the two small adapter gradients.

`linear_cross_entropy_sum` runs the frozen output head and the cross-entropy chunk by chunk and
computes the gradient with respect to the hidden states already in forward (softmax minus
one-hot, times the head weight), so backward is a scale of a (T, hidden) tensor: neither the
(T, vocab) logits nor a recomputation of the head (what activation checkpointing would do) is
needed. Per chunk, one (chunk, vocab) block in the head's dtype holds the logits and then, in
place, their gradient. On CPU the fp32 softmax and its gradient run compiled, one row per task
(lorakit/csrc/cross_entropy_cpu.cpp); without the kernels, or with a tanh softcap, they run as
PyTorch ops `SOFTMAX_ROWS` rows at a time in a small fp32 buffer that stays in cache (on a GPU,
the whole block at once). With a caller-kept `workspace` the buffers live across steps, since a
fresh block of that size costs a page fault per 4 KiB on every step.

`rms_norm` is the Llama-style RMSNorm (normalise in fp32, cast, then scale) with x kept in its own
dtype for backward; on CPU it runs compiled (lorakit/csrc/rms_norm_cpu.cpp: one pass per row, 5x
faster in bf16), elsewhere as a few PyTorch ops. `use_fused_rms_norm` switches a model's norms to
it after checking each gives bit-identical output to those ops.

`silu_gate` is `silu(gate) * up`, the gate of Llama-style MLPs, keeping gate and up for backward
where autograd keeps silu(gate) too (one (T, intermediate) tensor less per layer); compiled on CPU.
`use_fused_silu_gate` switches a model's MLPs to it after the same kind of check.

`use_fused_rope` runs transformers' Llama-style `apply_rotary_pos_emb` (q · cos + rotate_half(q) ·
sin, and the same for k) on a compiled CPU kernel, one pass over q and k each way, bit for bit the
same result (lorakit/csrc/rope_cpu.cpp).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from lorakit import activation_checkpointing, cpu_kernels

if TYPE_CHECKING:
    from lorakit.activation_checkpointing import KeptSlot

# Switches for the benchmark and for comparing against the plain path; the defaults are the
# measured winners (docs/benchmarks.md).
ENABLED = True
# "input": run the adapter matmuls in x's dtype (bf16 under bf16 compute); "adapter": in A's dtype.
ADAPTER_COMPUTE = "input"
FUSED_CROSS_ENTROPY = True
# Llama-style RMSNorm modules run through `rms_norm` (see `use_fused_rms_norm`).
FUSED_RMS_NORM = True
# On CPU, `rms_norm` runs lorakit's compiled kernel where it can be built (lorakit.cpu_kernels):
# fwd+bwd of a (1024, 768) bf16 norm 1.23 -> 0.22 ms.
COMPILED_RMS_NORM = True
# Llama-style MLPs run their SwiGLU gate through `silu_gate` (see `use_fused_silu_gate`), compiled
# on CPU.
FUSED_SILU_GATE = True
COMPILED_SILU_GATE = True
# The fused MLPs' SwiGLU backward writes its two gradients over gate and up, the MLP's own
# temporaries, instead of two fresh (T, intermediate) tensors (see `silu_gate`).
SILU_GATE_GRADIENTS_IN_PLACE = True
# Llama-style rotary position embeddings run through the compiled CPU kernel (see `use_fused_rope`):
# forward + backward of a benchmark layer's q and k 1.86 -> 0.74 ms.
FUSED_ROPE = True
# On CPU, the loss head's softmax and its gradient run as one compiled pass per row
# (lorakit/csrc/cross_entropy_cpu.cpp) instead of `_cross_entropy_rows` over fp32 slices.
COMPILED_CROSS_ENTROPY = True
# On CPU, LoRA dropout's keep-mask comes from a seed through a counter-based generator
# (lorakit/csrc/dropout_cpu.cpp), recomputed in backward instead of kept; PyTorch's CPU bernoulli
# (one Mersenne Twister stream, ~5 ns an element) took ~11 ms for a (1024, 2048) mask.
COMPILED_DROPOUT = True
# On GPUs, LoRA dropout's mask is drawn again in backward from a seed instead of kept (see _Dropout).
REGENERATED_DROPOUT = True
# On CPUs with AVX512-BF16, the LoRA layers' rank-r products in bf16 (x @ A^T, g @ B and the two
# adapter gradients) run on lorakit's kernels (lorakit/csrc/lora_cpu.cpp) instead of oneDNN's GEMMs.
COMPILED_LORA_PRODUCTS = True


# --------------------------------------------------------------------------- LoRA linear
def _add_low_rank(out: torch.Tensor, after_a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """out += scale · after_a @ b^T, in place (b already in after_a's dtype)."""
    out2 = out.view(-1, out.shape[-1])
    if out2.dtype == after_a.dtype:
        out2.addmm_(after_a, b.t(), alpha=scale)
    else:
        out2.add_((after_a @ b.t()).mul_(scale).to(out2.dtype))


class _Dropout:
    """LoRA dropout's keep-mask for one call: drawn in forward, applied again in backward.

    Three ways, by where the call runs:
    - "kernel" (CPU, fp32/bf16, the kernels built): only a seed is drawn from torch's generator and
      the mask is a function of it (lorakit/csrc/dropout_cpu.cpp): nothing the size of the input
      is kept, and the mask costs a fraction of PyTorch's CPU bernoulli.
    - "regenerate" (GPUs and other devices): a seed is drawn the same way and PyTorch's bernoulli
      draws the mask from a private generator seeded with it, once in forward and once more in
      backward, instead of keeping it (on a GPU a bernoulli over (T, in) costs microseconds, the
      kept mask T·in bytes per LoRA layer).
    - "kept" (CPU without the kernels, or fp16): PyTorch's bernoulli from the run's generator, the
      bool mask kept for backward (on CPU a second draw would cost as much as the first).
    The seed comes from the CPU generator on every device (no device sync), whose state a
    checkpoint's rerun, a seeded run and a resume all restore: they draw the same masks.
    """

    def __init__(self, p: float, how: str = "off", mask: Optional[torch.Tensor] = None, seed: Optional[int] = None):
        self.p, self.how, self.mask, self.seed = p, how, mask, seed
        self.active = p > 0
        self.rescale = 1.0 / (1 - p) if p > 0 else 1.0
        self._regenerated: Optional[torch.Tensor] = None

    @classmethod
    def draw(cls, x2: torch.Tensor, p: float, compute_dtype: torch.dtype) -> "_Dropout":
        if p <= 0:
            return cls(0.0)
        if _uses_dropout_kernel(x2.device, compute_dtype):
            return cls(p, "kernel", seed=_draw_seed())
        if _regenerates_mask(x2.device):
            return cls(p, "regenerate", seed=_draw_seed())
        return cls(p, "kept", mask=torch.empty_like(x2, dtype=torch.bool).bernoulli_(1 - p))

    def apply(self, h: torch.Tensor, rescale: bool = True) -> torch.Tensor:
        """h (T, in) with the dropped elements zeroed, the kept ones times 1 / (1 - p) (rescale) or as they are."""
        if not self.active:
            return h
        scale = self.rescale if rescale else 1.0
        if self.how == "kernel":
            return cpu_kernels.ops().dropout_mask_mul(h, self.seed, 1 - self.p, scale)
        mask = self.mask if self.how == "kept" else self._mask_from_seed(h)
        return h * mask * scale if rescale else h * mask

    def _mask_from_seed(self, h: torch.Tensor) -> torch.Tensor:
        # drawn once per forward or backward call and reused within it (not saved for backward)
        if self._regenerated is None:
            generator = torch.Generator(device=h.device)
            generator.manual_seed(self.seed)
            mask = torch.empty(h.shape, dtype=torch.bool, device=h.device)
            self._regenerated = mask.bernoulli_(1 - self.p, generator=generator)
        return self._regenerated


def _draw_seed() -> int:
    """63 bits from the CPU generator of the run."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _lora_products(device: torch.device, compute_dtype: torch.dtype, rank: int) -> Optional[object]:
    """`torch.ops.lorakit_cpu` where the rank-r products of a LoRA layer run on lorakit's bf16 CPU
    kernels (bf16 compute on a CPU with AVX512-BF16, rank <= 64); None where they run as matmuls."""
    if not (COMPILED_LORA_PRODUCTS and device.type == "cpu" and compute_dtype == torch.bfloat16 and rank <= 64):
        return None
    return cpu_kernels.bf16_ops()


def _uses_dropout_kernel(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether LoRA dropout on this device, in compute_dtype, runs through the seeded CPU kernel."""
    if not (COMPILED_DROPOUT and device.type == "cpu" and compute_dtype in cpu_kernels.DTYPES):
        return False
    return cpu_kernels.ops() is not None


def _regenerates_mask(device: torch.device) -> bool:
    """Whether LoRA dropout on this device draws its mask again in backward instead of keeping it."""
    return REGENERATED_DROPOUT and device.type != "cpu"


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        base: Callable[..., torch.Tensor],
        dense_weight: Callable[[torch.Tensor], torch.Tensor],
        scale: float,
        dropout: float,
        compute_dtype: torch.dtype,
        kept: Optional[KeptSlot],
        finish_later: list,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        # drawn in a checkpoint's rerun too: the checkpoint replays the random stream, so this is
        # the forward's mask, and the ops after this one draw what they drew then
        drop = _Dropout.draw(x2, dropout, compute_dtype)
        rerun = kept is not None and kept.replaying
        replay = kept.take() if rerun else None
        if replay is not None:
            # Selective checkpointing's rerun: the output (low-rank term included) and x @ A^T
            # were kept from the forward; nothing is computed again.
            out, after_a = replay
        else:
            h = drop.apply(x2.to(compute_dtype))
            ac, bc = a.to(compute_dtype), b.to(compute_dtype)
            products = _lora_products(h.device, compute_dtype, a.shape[0])
            after_a = products.lora_project(h, ac.t()) if products is not None else h @ ac.t()  # (T, r)
            del h
            if rerun:
                # A checkpoint's rerun wants this layer's saved tensors, which autograd packs once
                # forward returns; the output only matters to the ops after it. So the output is
                # returned empty and `lora_linear` fills it after the packing, unless the
                # checkpoint stops the rerun there because nothing after this layer saves anything
                # (then the projection's GEMM is never run). The fill runs the same ops as below.
                out = x.new_empty(*x.shape[:-1], b.shape[0])

                def fill(out=out.detach(), after_a=after_a, bc=bc):
                    base(x, out=out)
                    _add_low_rank(out, after_a, bc, scale)

                finish_later.append(fill)
            else:
                with torch.no_grad():
                    out = base(x)  # (..., out) in the base's output dtype
                _add_low_rank(out, after_a, bc, scale)
                if kept is not None:
                    kept.record(out, after_a)
        ctx.save_for_backward(x, a, b, after_a, drop.mask)
        ctx.dense_weight, ctx.scale, ctx.compute_dtype = dense_weight, scale, compute_dtype
        ctx.dropout, ctx.dropout_how, ctx.seed = dropout, drop.how, drop.seed
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, a, b, after_a, mask = ctx.saved_tensors
        scale, cd = ctx.scale, ctx.compute_dtype
        drop = _Dropout(ctx.dropout, ctx.dropout_how, mask, ctx.seed)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        gc = g.to(cd)
        ac, bc = a.to(cd), b.to(cd)
        products = _lora_products(g.device, cd, a.shape[0])
        # (T, r): gradient of (h @ A^T) before the scale
        g_after_a = products.lora_project(gc, bc) if products is not None else gc @ bc
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            if products is not None:  # fp32 sums, scaled, never rounded to bf16
                grad_b = products.lora_outer(after_a, gc, scale).t().to(b.dtype).contiguous()  # (out, r)
            else:
                # (after_a^T @ g)^T: the same product, but the skinny operand goes first, which runs
                # about 1.8x faster on CPU than g^T @ after_a for (T, out) x (T, r)
                grad_b = (after_a.t() @ gc).t().mul_(scale).to(b.dtype).contiguous()  # (out, r)
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            h = drop.apply(x2.to(cd))
            if products is not None:
                grad_a = products.lora_outer(g_after_a, h, scale).to(a.dtype)  # (r, in)
            else:
                grad_a = (g_after_a.t() @ h).mul_(scale).to(a.dtype)  # (r, in)
            del h
        if ctx.needs_input_grad[0]:
            w = ctx.dense_weight(g)  # (out, in) in g's dtype, frozen
            grad_x = g @ w  # (T, in)
            del w
            if not drop.active and grad_x.dtype == cd:
                grad_x.addmm_(g_after_a, ac, alpha=scale)
            else:
                # the mask without its 1 / (1 - p), which goes into the add's alpha
                lora = drop.apply(g_after_a @ ac, rescale=False)
                grad_x.add_(lora.to(grad_x.dtype), alpha=scale * drop.rescale)
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    base: Callable[..., torch.Tensor],
    dense_weight: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    dropout: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
    kept: Optional[KeptSlot] = None,
) -> torch.Tensor:
    """base(x) + scale · B(A(dropout(x))) with one saved input; see the module docstring.

    x: (..., in); a: (r, in); b: (out, r); returns (..., out) in base's output dtype.
    base: the frozen layer's forward, `base(x)` -> (..., out) in x's dtype, or written into a
        given `out=` tensor (run without autograd).
    dense_weight: given the output gradient, the frozen weight as (out, in) in its dtype.
    compute_dtype: dtype of the adapter matmuls (default: per ADAPTER_COMPUTE).
    dropout: only applied when > 0 (the caller passes 0 in eval mode).
    kept: inside a checkpointed layer that is rerun (`lorakit.activation_checkpointing`): in
        selective checkpointing's rerun way the forward records its output and x @ A^T and the
        rerun in backward takes them back; in any rerun the projection runs after the layer's
        tensors are saved.
    """
    if compute_dtype is None:
        compute_dtype = x.dtype if ADAPTER_COMPUTE == "input" and x.is_floating_point() else a.dtype
    finish_later: list = []
    out = _LoraLinear.apply(x, a, b, base, dense_weight, scale, dropout, compute_dtype, kept, finish_later)
    if finish_later:
        with torch.no_grad():
            finish_later[0]()
    return out


# --------------------------------------------------------------------------- linear cross-entropy
def _scratch(workspace: Optional[dict], name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A (rows, cols) buffer, kept in `workspace` between calls when one is given.

    The loss blocks are tens to hundreds of MB: the C allocator hands blocks that large straight
    back to the OS on free, so a fresh one costs a page fault per 4 KiB on every step (about
    30 ms per 128 MB on the benchmark's CPU). Reusing the buffer pays that once.
    """
    if workspace is None:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buf = workspace.get(name)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != device:
        workspace.pop(name, None)  # free the old one before allocating its replacement
        buf = workspace[name] = torch.empty(rows, cols, dtype=dtype, device=device)
    return buf[:rows]


# Rows of the logits block converted to fp32 at a time for the softmax on CPU: 32 x 32k vocab is
# 4 MB, which stays in cache from the conversion through the softmax to the copy back; 16 to 128
# rows run within noise of each other (a 512 x 32k block: 8.6-9.9 ms), so the smallest buffer wins.
# On a GPU the softmax takes the whole chunk at once: every slice costs a dozen kernel launches.
SOFTMAX_ROWS = 32


def _cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: Optional[float], need_grad: bool
) -> torch.Tensor:
    """Cross-entropy of each row of fp32 `logits` (n, V) against `targets` (n,), 0 for ignored
    targets, as (n,) fp32; with need_grad the block is overwritten, in place, with d loss / d logits
    (softmax minus one-hot, zero rows for ignored targets)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    valid = targets != ignore_index
    safe_t = targets.clamp(min=0)
    if softcap:
        capped = logits.div_(softcap).tanh_().clone()
        logits.mul_(softcap)
    picked = logits[rows, safe_t]
    top = logits.amax(dim=1)
    # torch's softmax kernel, in place: it walks the block a row at a time, so each row stays in
    # cache across its passes, where separate sub/exp/sum/scale ops each walk the whole block.
    probs = torch.softmax(logits, dim=1, out=logits)
    # The row's largest probability is exp(top - lse) >= 1/V: it never underflows, so the log-sum-exp
    # comes back from it to fp32 precision, where -log(p[target]) is inf once p[target] underflows.
    lse = top - probs.amax(dim=1).log()
    loss = torch.where(valid, lse - picked, 0.0)
    if need_grad:
        probs[rows, safe_t] -= 1.0
        # On CPU a host check saves a pass over the block when every row counts (the usual case);
        # on a GPU the pass costs less than the sync.
        if logits.device.type != "cpu" or not bool(valid.all()):
            probs.mul_(valid.unsqueeze(1))
        if softcap:
            probs.mul_(1 - capped * capped)
    return loss


def _cross_entropy_block(
    block: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    need_grad: bool,
    workspace: Optional[dict],
    rows_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`_cross_entropy_rows` over a block of logits in any float dtype, in fp32 slices of
    `SOFTMAX_ROWS` rows on CPU (the whole block on a GPU), gradient written back into the block;
    returns the sum, and writes each row's loss into `rows_out` (n,) when given."""
    step = SOFTMAX_ROWS if block.device.type == "cpu" else block.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=block.device)
    for row in range(0, block.shape[0], step):
        part = block[row : row + step]
        if part.dtype == torch.float32:
            fp32 = part
        else:
            fp32 = _scratch(workspace, "fp32", step, block.shape[1], torch.float32, block.device)[: part.shape[0]]
            fp32.copy_(part)
        losses = _cross_entropy_rows(fp32, targets[row : row + step], ignore_index, softcap, need_grad)
        total += losses.sum()
        if rows_out is not None:
            rows_out[row : row + step] = losses
        if need_grad and fp32 is not part:
            part.copy_(fp32)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        chunk: int,
        softcap: Optional[float],
        ignore_index: int,
        workspace: Optional[dict],
        per_row: bool,
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if per_row else None
        vocab = weight.shape[0]
        # rounded up so that a later batch with a few more trainable tokens reuses the kept block
        block_rows = min(chunk, -(-hidden.shape[0] // 256) * 256)
        # the blocks are in the head's dtype, on its device
        ops = cpu_kernels.ops_for(weight) if COMPILED_CROSS_ENTROPY and not softcap else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            # The head's output in its own dtype; the softmax runs in fp32 (on CPU compiled, a row
            # per task) and writes the logits' gradient back into the same block, which then feeds
            # one GEMM.
            block = _scratch(workspace, "logits", block_rows, vocab, weight.dtype, h.device)[: h.shape[0]]
            if bias is None:
                torch.mm(h, weight.t(), out=block)
            else:
                torch.addmm(bias, h, weight.t(), out=block)
            if ops is not None and per_row:
                rows[start : start + chunk] = ops.cross_entropy_losses(block, t, ignore_index, need_grad)
            elif ops is not None:
                total += ops.cross_entropy_rows(block, t, ignore_index, need_grad)
            else:
                part = rows[start : start + chunk] if per_row else None
                total += _cross_entropy_block(block, t, ignore_index, softcap, need_grad, workspace, part)
            if need_grad:
                torch.mm(block, weight, out=grad_hidden[start : start + chunk])
            del block
        ctx.save_for_backward(grad_hidden)
        return rows if per_row else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        # each row's gradient is linear in its loss's incoming gradient: per row a scale of the row
        scale = grad_out.to(grad_hidden.dtype)
        grad = grad_hidden * (scale.unsqueeze(1) if grad_out.dim() else scale)
        return grad, None, None, None, None, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk: int = 512,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    workspace: Optional[dict] = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight^T (+ bias)` against `targets`, fp32 scalar.

    hidden: (T, H); weight: (V, H), frozen; targets: (T,) with `ignore_index` for no loss.
    Logits are computed `chunk` rows at a time in the head's dtype, and their softmax in fp32 (on
    CPU compiled, a row per task, or `SOFTMAX_ROWS` rows at a time; the whole chunk on a GPU; after
    an optional tanh softcap); the gradient for `hidden` is computed in forward, so backward needs
    no logits and no recompute.
    workspace: a dict the caller keeps between calls; the (chunk, V) block and the fp32 rows live
    there instead of being allocated afresh each call (None: allocate per call).
    """
    assert not weight.requires_grad and (bias is None or not bias.requires_grad), "the head must be frozen"
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, softcap, ignore_index, workspace, False)


def linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk: int = 512,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    workspace: Optional[dict] = None,
) -> torch.Tensor:
    """`linear_cross_entropy_sum`, but each token's cross-entropy: (T,) fp32, 0 where the target is
    `ignore_index`. For losses that weigh tokens by what only the whole forward knows (DPO's
    per-sequence sums): the gradient for `hidden` is still computed in forward, one row per token,
    and backward scales each row by its token's incoming gradient."""
    assert not weight.requires_grad and (bias is None or not bias.requires_grad), "the head must be frozen"
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, softcap, ignore_index, workspace, True)


# --------------------------------------------------------------------------- RMSNorm
def _rms_norm_ops(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm as PyTorch ops, the same ops in the same order as transformers' Llama module:
    returns the output and rstd (..., 1) in fp32."""
    xf = x.to(torch.float32, copy=True)  # a copy even for fp32 x: it is scaled in place
    rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    normed = xf.mul_(rstd).to(x.dtype)
    return (normed.mul_(weight) if normed.dtype == weight.dtype else weight * normed), rstd


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The norm's output, rstd (one fp32 value per row) and whether the compiled kernel ran."""
    ops = cpu_kernels.ops_for(x, weight) if COMPILED_RMS_NORM else None
    out, rstd = ops.rms_norm_forward(x, weight, eps) if ops is not None else _rms_norm_ops(x, weight, eps)
    return out, rstd, ops is not None


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd, ctx.compiled = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if ctx.compiled:
            grad_x, grad_weight = cpu_kernels.ops().rms_norm_backward(grad_out, x, weight, rstd, ctx.needs_input_grad[1])
            return grad_x, grad_weight, None
        normed = x.to(torch.float32, copy=True).mul_(rstd)  # (..., n) fp32, recomputed: x is kept instead
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rounded = normed.to(x.dtype).float()  # the forward multiplied the weight by this
            grad_weight = (grad_out.float() * rounded).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = grad_out.to(torch.float32, copy=True).mul_(weight)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / sqrt(mean(x^2) + eps))`, normalised in fp32 and cast to x's dtype before the
    weight is applied: the Llama / Mistral / Qwen RMSNorm, equal to transformers' forward.

    Autograd on the transformers module keeps an fp32 copy of x and runs seven elementwise ops each
    way; this keeps x in its own dtype and one value per row, and runs at about twice the speed.
    """
    out = _RmsNorm.apply(x, weight, eps)
    # under selective checkpointing the norm's input is kept (its own backward reads it): its
    # output, which the next projections save, is computed again instead of kept
    activation_checkpointing.recomputable(out, lambda: _rms_norm_forward(x, weight, eps)[0], (x, weight))
    return out


def _fused_rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self._lorakit_eps)


def _same_output(module: torch.nn.Module, probe: torch.Tensor, formula: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether `module(probe)` equals `formula(probe)` bit for bit. Run in eval mode, so that LoRA
    dropout inside the module neither changes the result nor draws from the training run's random
    stream (a draw here would change every dropout mask after it)."""
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return torch.equal(module(probe), formula(probe))
    finally:
        for m, mode in training.items():
            m.training = mode


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Run the model's Llama-style RMSNorm modules through `rms_norm`; returns how many switched.

    A module qualifies when its class name ends in "RMSNorm", it has a 1-d `weight` and an epsilon
    (`variance_epsilon` or `eps`), and its own forward gives bit-identical output to `rms_norm`'s
    PyTorch ops on a random input: other formulas (Gemma's `1 + weight`, norms without a weight)
    keep their forward. (The compiled CPU kernel is held to those ops by the tests; the probe does
    not use it, so checking a model never builds it.)
    """
    switched = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if (
            not type(module).__name__.endswith("RMSNorm")
            or not isinstance(weight, torch.Tensor)
            or weight.dim() != 1
            or weight.is_meta
            or not isinstance(eps, float)
            or "forward" in vars(module)
        ):
            continue
        probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).mul_(3)
        probe = probe.to(device=weight.device, dtype=weight.dtype)
        if not _same_output(module, probe, lambda x: _rms_norm_ops(x, weight, eps)[0]):
            continue
        module._lorakit_eps = eps
        module.forward = _fused_rms_norm_forward.__get__(module)
        switched += 1
    return switched


# --------------------------------------------------------------------------- SwiGLU gate
def _silu_gate_forward(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """silu(gate) * up and whether the compiled kernel computed it."""
    ops = cpu_kernels.ops_for(gate, up) if COMPILED_SILU_GATE else None
    if ops is not None:
        return ops.silu_gate_forward(gate, up), True
    return F.silu(gate).mul_(up), False  # transformers' `act_fn(gate) * up`, rounded the same way


class _SiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gradients_into_inputs: bool) -> torch.Tensor:
        out, ctx.compiled = _silu_gate_forward(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.gradients_into_inputs, ctx.spent = gradients_into_inputs, False
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.spent:
            raise RuntimeError(
                "silu_gate: a second backward through the same graph, but the first wrote its gradients over "
                "the saved gate and up; set lorakit.fused.SILU_GATE_GRADIENTS_IN_PLACE = False to backward twice"
            )
        gate, up = ctx.saved_tensors
        if ctx.gradients_into_inputs:
            ctx.spent = True
            return _silu_gate_gradients_into(grad_out, gate, up, compiled=ctx.compiled) + (None,)
        if ctx.compiled:
            return cpu_kernels.ops().silu_gate_backward(grad_out, gate, up) + (None,)
        # autograd's own backward of `silu(gate) * up`, op for op (so the same bits), with
        # silu(gate) computed again instead of kept
        grad_up = grad_out * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up, None


def _silu_gate_gradients_into(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, compiled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """_SiluGate's gradients (d gate, d up), written over gate and up; the same values as its
    allocating backward (compiled: whether its forward ran the CPU kernel)."""
    if compiled and gate.is_contiguous() and up.is_contiguous():
        cpu_kernels.ops().silu_gate_backward_(grad_out, gate, up)
        # as an in-place PyTorch op would: another node that saved gate or up then refuses to run
        torch.autograd.graph.increment_version((gate, up))
        return gate, up
    # The PyTorch ops of the allocating backward, ordered so that each input is read before it is
    # overwritten: one fresh tensor, silu(gate), instead of two results and a temporary.
    silu = F.silu(gate)
    grad_gate_in = up.mul_(grad_out)  # grad_out * up
    torch.ops.aten.silu_backward.grad_input(grad_gate_in, gate, grad_input=gate)
    return gate, torch.mul(grad_out, silu, out=up)


def silu_gate(gate: torch.Tensor, up: torch.Tensor, *, gradients_into_inputs: bool = False) -> torch.Tensor:
    """`silu(gate) * up` (the SwiGLU gate of Llama-style MLPs), rounded as transformers computes it.

    Autograd on the two ops keeps three (T, intermediate) tensors, gate, silu(gate) and up; this
    keeps gate and up and computes silu(gate) again in backward, giving autograd's gradients bit for
    bit. On CPU it runs compiled instead (lorakit/csrc/silu_gate_cpu.cpp: one pass each way, 1.2x
    the speed of the PyTorch ops; its gradients round once, in fp32). gate and up: the same shape
    and dtype.

    gradients_into_inputs: backward writes the gradients over gate and up instead of into two
    fresh tensors, for callers whose gate and up are their own temporaries that nothing reads
    afterwards (the fused MLP forward). A second backward through the same graph then raises.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return F.silu(gate) * up
    out = _SiluGate.apply(gate, up, gradients_into_inputs and not gate.is_set_to(up))
    # gate and up are kept for the backward anyway; the product, which down_proj saves, is not
    activation_checkpointing.recomputable(out, lambda: _silu_gate_forward(gate, up)[0], (gate, up))
    return out


def _fused_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # gate and up are this forward's own: their storage takes their gradients in backward
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(silu_gate(gate, up, gradients_into_inputs=SILU_GATE_GRADIENTS_IN_PLACE))


def use_fused_silu_gate(model: torch.nn.Module) -> int:
    """Run the model's Llama-style MLPs, `down_proj(silu(gate_proj(x)) * up_proj(x))`, through
    `silu_gate`; returns how many switched.

    A module qualifies when it has `gate_proj`, `up_proj`, `down_proj` and a SiLU `act_fn`, and its
    own forward gives bit-identical output to that formula on a random input: other MLPs (Gemma's
    GELU gate, fused gate_up projections, mixtures of experts) keep their forward.
    """
    switched = 0
    for module in model.modules():
        parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        if any(not isinstance(p, torch.nn.Module) for p in parts) or "forward" in vars(module):
            continue
        gate_proj, up_proj, down_proj, act_fn = parts
        weight = getattr(gate_proj, "weight", None)
        if type(act_fn).__name__ not in ("SiLU", "SiLUActivation") or not isinstance(weight, torch.Tensor) or weight.is_meta:
            continue
        hidden = getattr(gate_proj, "in_features", None)
        if not isinstance(hidden, int):
            continue
        dtype = weight.dtype if weight.is_floating_point() else getattr(gate_proj, "compute_dtype", None) or torch.float32
        probe = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(0)).to(device=weight.device, dtype=dtype)
        if not _same_output(module, probe, lambda x: down_proj(F.silu(gate_proj(x)) * up_proj(x))):
            continue
        module.forward = _fused_mlp_forward.__get__(module)
        switched += 1
    return switched


def runs_fused(module: torch.nn.Module) -> bool:
    """Whether `module` was switched to lorakit's fused RMSNorm or SwiGLU MLP forward."""
    return getattr(vars(module).get("forward"), "__func__", None) in (_fused_rms_norm_forward, _fused_mlp_forward)


# --------------------------------------------------------------------------- rotary embeddings
def _rope_ops(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' Llama formula, x · cos + rotate_half(x) · sin (cos, sin broadcast to x)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ops = cpu_kernels.ops()
        ctx.save_for_backward(cos, sin)  # (B, T, D), shared by every layer of the model's forward
        return ops.rope(q, cos, sin, False), ops.rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        ops = cpu_kernels.ops()
        return ops.rope(grad_q, cos, sin, True), ops.rope(grad_k, cos, sin, True), None, None


def _rope_kernel_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the compiled kernel computes this call: q (B, H, T, D), k (B, H_kv, T, D), cos and sin
    (B or 1, T, D) not requiring grad, one kernel dtype, CPU tensors (the kernels built)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.requires_grad or sin.requires_grad:
        return False
    batch, _, tokens, dim = q.shape
    return (
        dim % 2 == 0
        and k.shape[0] == batch
        and k.shape[2:] == (tokens, dim)
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (tokens, dim)
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and cpu_kernels.ops_for(q, k, cos, sin) is not None
    )


def _fused_apply_rotary_pos_emb(original: Callable) -> Callable:
    """`original` (a modeling file's `apply_rotary_pos_emb`) with the calls the kernel covers sent to it."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain_call = not args and (not kwargs or kwargs == {"unsqueeze_dim": 1})
        if FUSED_ROPE and plain_call and _rope_kernel_applies(q, k, cos, sin):
            return _Rope.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._lorakit_original = original
    return apply_rotary_pos_emb


def _same_rope(function: Callable) -> bool:
    """Whether `function(q, k, cos, sin)` is Llama's rotary embedding bit for bit, in float32 and bfloat16,
    on q and k laid out as attention layers make them (a transposed view of the projection output)."""
    generator = torch.Generator().manual_seed(0)
    # two head sizes: a formula could rotate a fixed number of dimensions and pass at one of them
    for dtype, dim in itertools.product(cpu_kernels.DTYPES, (8, 128)):
        q = torch.randn(2, 5, 3 * dim, generator=generator).mul_(3).to(dtype).view(2, 5, 3, dim).transpose(1, 2)
        k = torch.randn(2, 5, dim, generator=generator).mul_(3).to(dtype).view(2, 5, 1, dim).transpose(1, 2)
        cos, sin = (torch.randn(2, 5, dim, generator=generator).to(dtype) for _ in range(2))
        try:
            with torch.no_grad():
                got = function(q, k, cos, sin)
        except Exception:  # another signature or formula
            return False
        expected = (_rope_ops(q, cos.unsqueeze(1), sin.unsqueeze(1)), _rope_ops(k, cos.unsqueeze(1), sin.unsqueeze(1)))
        if not (isinstance(got, tuple) and len(got) == 2 and all(torch.equal(g, e) for g, e in zip(got, expected))):
            return False
    return True


def use_fused_rope(model: torch.nn.Module) -> int:
    """Run the model's Llama-style rotary embeddings on lorakit's compiled CPU kernel; returns how many
    modeling files (Python modules) were switched.

    transformers' attention layers call their modeling file's module-level `apply_rotary_pos_emb`,
    so that function is what gets replaced (as Liger Kernel does), for every model of that family in
    the process. A file qualifies when one of the model's modules defined there calls it in forward
    and it gives Llama's formula bit for bit on a random input (the probe runs the PyTorch ops, so
    checking a model never builds the kernels). The replacement returns the same bits as the
    original and hands every call the kernel does not cover (GPUs, other dtypes, other layouts, cos
    or sin that require grad, `FUSED_ROPE` off) to the original.
    """
    switched, probed = 0, set()
    for module in model.modules():
        source = sys.modules.get(type(module).__module__)
        function = getattr(source, "apply_rotary_pos_emb", None)
        if not callable(function) or hasattr(function, "_lorakit_original") or function in probed:
            continue
        forward = inspect.unwrap(type(module).forward)
        if "apply_rotary_pos_emb" not in getattr(getattr(forward, "__code__", None), "co_names", ()):
            continue
        probed.add(function)  # once per file, not once per layer
        if not _same_rope(function):
            continue
        source.apply_rotary_pos_emb = _fused_apply_rotary_pos_emb(function)
        switched += 1
    return switched


def use_lorakit_kernels(model: torch.nn.Module) -> None:
    """Swap lorakit's kernels into a transformers model where they compute what its own modules do:
    per-example attention for packed rows (lorakit.attention), the fused RMSNorm, SwiGLU gate and
    rotary embeddings. The trainer's forward, which `lorakit eval` runs too, so that it gives a run's
    own eval numbers (in bf16 the attention kernel rounds otherwise than SDPA). Each part keeps
    its switch (the benchmark's levers turn them off)."""
    from lorakit import attention

    if attention.VARLEN_ENABLED:
        attention.use_varlen_attention(model)
    if FUSED_RMS_NORM:
        use_fused_rms_norm(model)
    if FUSED_SILU_GATE:
        use_fused_silu_gate(model)
    if FUSED_ROPE:
        use_fused_rope(model)
