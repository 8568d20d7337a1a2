"""lorakit.attention: per-example causal attention for packed rows equals SDPA (1e-5 in fp32; in bf16
as close to the fp64 result as torch's own flash kernel), with the blocked CPU kernel compiled
(lorakit.cpu_kernels) and in PyTorch, which also serves where nothing can be compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, tiny_llama
from lorakit import attention, cpu_kernels
from lorakit.config import LoraConfig
from lorakit.inject import inject_adapter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _packed_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (3, 40), generator=gen)
    pos = torch.stack([
        torch.cat([torch.arange(15), torch.arange(25)]),
        torch.arange(40),
        torch.cat([torch.arange(5), torch.arange(30 - seed), torch.arange(5 + seed)]),
    ])  # fmt: skip
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


@pytest.fixture(params=["compiled", "pytorch"])
def blocked_kernel(request, monkeypatch):
    """Runs a test with the blocked CPU kernel compiled and with its PyTorch version."""
    monkeypatch.setattr(attention, "COMPILED_ATTENTION", request.param == "compiled")
    q = torch.zeros(1, 2, 8, 4, requires_grad=True)
    kernel = type(attention.blocked_causal_attention(q, q, q).grad_fn).__name__
    assert kernel == ("_CompiledBlockedAttentionBackward" if request.param == "compiled" else "_BlockedCausalAttentionBackward")
    return request.param


def test_without_compiled_kernels_attention_falls_back(monkeypatch):
    # no compiler: the same results from the PyTorch kernel
    inputs = _attention_inputs(torch.float32)
    want = _attend(_sdpa_reference, *inputs)
    monkeypatch.setattr(cpu_kernels, "ops", lambda announce=None: None)
    got = _attend(attention.blocked_causal_attention, *inputs)
    assert type(attention.blocked_causal_attention(*inputs[:3]).grad_fn).__name__ == "_BlockedCausalAttentionBackward"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _attention_inputs(dtype, length=77, heads=6, kv_heads=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # q as transformers hands it over: a (B, H, L, D) view of (B, L, H, D) memory
    q = torch.randn(2, length, heads, dim, generator=gen).transpose(1, 2).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, length, dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, length, dim, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(2, length, heads, dim, generator=gen).to(dtype)
    return q, k, v, grad


def _attend(fn, q, k, v, grad):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return [out.detach()] + [x.grad.clone() for x in (q, k, v)]


def _sdpa_reference(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


@pytest.mark.parametrize("block_rows", [64, 16, 7])  # one block; several with a partial last block
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (4, 1)])
def test_blocked_attention_fp32_equals_sdpa(monkeypatch, blocked_kernel, block_rows, heads, kv_heads):
    monkeypatch.setattr(attention, "ATTENTION_BLOCK_ROWS", block_rows)
    inputs = _attention_inputs(torch.float32, heads=heads, kv_heads=kv_heads)
    got = _attend(attention.blocked_causal_attention, *inputs)
    want = _attend(_sdpa_reference, *inputs)
    for name, g, w in zip(("output", "grad q", "grad k", "grad v"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_blocked_attention_bf16_close_to_fp64(blocked_kernel):
    # bf16 against the fp64 result, next to torch's own bf16 flash kernel on the same inputs
    inputs = _attention_inputs(torch.bfloat16, length=150, heads=12, kv_heads=4, dim=64)
    got = _attend(attention.blocked_causal_attention, *inputs)
    flash = _attend(_sdpa_reference, *inputs)
    q, k, v, grad = (x.detach().double().requires_grad_(x.requires_grad) for x in inputs)
    exact = _attend(_sdpa_reference, q, k, v, grad)
    for name, g, f, e in zip(("output", "grad q", "grad k", "grad v"), got, flash, exact):
        assert g.dtype == torch.bfloat16, name
        assert rel(g, e) < 1e-2, (name, rel(g, e))
        assert rel(g, e) < 2 * rel(f, e), (name, rel(g, e), rel(f, e))


def test_blocked_attention_rejects_uneven_head_groups():
    q, k, v, _ = _attention_inputs(torch.float32, heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 key heads"):
        attention.blocked_causal_attention(q, k, v)


# blocked kernel for every example (default), for none, and for the short ones only: a row mixes
# both kernels when BLOCKED_ATTENTION_MAX_LEN falls between its examples' lengths
@pytest.mark.parametrize("blocked,max_len", [(True, 1024), (False, 1024), (True, 20)])
@pytest.mark.parametrize("device", DEVICES)  # on CUDA every example goes to SDPA
def test_varlen_attention_equals_sdpa_with_block_mask(monkeypatch, blocked_kernel, blocked, max_len, device):
    from lorakit.attention import VARLEN_ATTENTION, use_varlen_attention
    from lorakit.loss import token_loss_sum

    monkeypatch.setattr(attention, "BLOCKED_ATTENTION", blocked)
    monkeypatch.setattr(attention, "BLOCKED_ATTENTION_MAX_LEN", max_len)
    monkeypatch.setattr(attention, "ATTENTION_BLOCK_ROWS", 8)
    results = []
    for varlen in (False, True):
        model = tiny_llama().to(device)
        if varlen:
            assert use_varlen_attention(model) and model.config._attn_implementation == VARLEN_ATTENTION
        inject_adapter(model, LoraConfig(r=4, alpha=8))
        model.train()
        losses, grads = [], None
        for seed in (0, 1, 2):  # several batches in a row: the per-forward segment cache must not go stale
            batch = {k: v.to(device) for k, v in _packed_batch(seed).items()}
            loss, _ = token_loss_sum(model, batch, chunk_tokens=16)
            loss.backward()
            losses.append(loss.item())
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((losses, grads))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-5)


def _sdpa_flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


@pytest.mark.parametrize("cudnn", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_per_example_attention_leaves_out_cudnn_on_gpus(monkeypatch, device, cudnn):
    # cuDNN's attention builds a plan for every new sequence length (tens of ms of host time on
    # Hopper) and packed examples change length every step: on GPUs the per-example SDPA calls run
    # with every backend but cuDNN's (unless CUDNN_ATTENTION); on CPU the flags stay as they are.
    from lorakit.attention import use_varlen_attention
    from lorakit.loss import token_loss_sum

    monkeypatch.setattr(attention, "BLOCKED_ATTENTION", False)
    monkeypatch.setattr(attention, "CUDNN_ATTENTION", cudnn)
    seen, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(_sdpa_flags())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_llama().to(device)
    assert use_varlen_attention(model)
    before = _sdpa_flags()
    batch = {k: v.to(device) for k, v in _packed_batch(0).items()}
    loss, _ = token_loss_sum(model, batch, chunk_tokens=16)
    loss.backward()
    assert _sdpa_flags() == before and len(seen) >= 2 * 2  # two layers, two examples or more per row
    want = (False, True, True, True) if device == "cuda" and not cudnn else before
    assert set(seen) == {want}


def test_varlen_model_still_generates_with_padding():
    from lorakit.attention import use_varlen_attention

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = tiny_llama().generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model = tiny_llama()
    assert use_varlen_attention(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), expected)


def test_varlen_model_under_inference_mode():
    # tensors made under torch.inference_mode() have no version counter for the segment cache
    from lorakit.attention import use_varlen_attention

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    expected = tiny_llama().generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    model = tiny_llama()
    assert use_varlen_attention(model)
    batch = _packed_batch(0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    with torch.inference_mode():
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), expected)
        for _ in range(2):  # the second call must not reuse the first call's segments blindly
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].clone()).logits
            torch.testing.assert_close(got, packed, rtol=0, atol=0)


# ------------------------------------------------------------- GPUs: one varlen flash call per layer
def _reference_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
    """torch's `_flash_attention_forward` in its varlen form, in fp32 on any device: (T, H, D)
    inputs, examples at the cumulative offsets; returns output, log-sum-exp (H, T) and the rest."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and dropout_p == 0.0 and is_causal
    offsets = cu_q.tolist()
    assert offsets[0] == 0 and offsets[-1] == q.shape[0] and max_q == max_k == max(np - p for p, np in zip(offsets, offsets[1:]))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(offsets, offsets[1:]):
        qs = q[a:b].float().transpose(0, 1)
        ks, vs = (x[a:b].float().transpose(0, 1).repeat_interleave(group, 0) for x in (k, v))
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse[:, a:b] = scores.logsumexp(-1)
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    empty = q.new_empty(0)
    return out, lse, empty, empty, empty


def _reference_flash_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale=None):
    assert grad.shape == out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    with torch.enable_grad():
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        again = _reference_flash_forward(*leaves, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)[0]
        torch.testing.assert_close(again.to(out.dtype), out, rtol=0, atol=0)
        grads = torch.autograd.grad(again, leaves, grad.float())
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


@pytest.fixture(params=DEVICES)
def flash_device(request, monkeypatch):
    """Runs a test on CUDA with torch's varlen flash kernel, and on CPU with the reference ops in its
    place, so the layouts, offsets and gradients around the kernel are checked without a GPU."""
    if request.param == "cpu":
        monkeypatch.setattr(attention, "_gpu_has_flash", lambda device: True)
        monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", _reference_flash_forward, raising=False)
        monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", _reference_flash_backward, raising=False)
    elif not attention._gpu_has_flash(torch.device("cuda")):
        pytest.skip("no GPU with flash attention")
    return request.param


def test_cumulative_lengths_lay_rows_end_to_end():
    rows = [[(0, 15), (15, 40)], [(0, 40)], [(0, 5), (5, 35), (35, 40)]]
    offsets, longest = attention._cumulative_lengths(rows, 40, "cpu")
    assert offsets.dtype == torch.int32 and offsets.tolist() == [0, 15, 40, 80, 85, 115, 120] and longest == 40


def test_flash_varlen_only_for_half_precision_on_gpus(monkeypatch):
    q, k = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    assert not attention._flash_varlen_takes(q, k, 0.0)  # CPU
    monkeypatch.setattr(attention, "_gpu_has_flash", lambda device: True)
    assert attention._flash_varlen_takes(q, k, 0.0)
    assert not attention._flash_varlen_takes(q, k, 0.1)  # dropout: per-example SDPA
    assert not attention._flash_varlen_takes(q.float(), k.float(), 0.0)
    assert not attention._flash_varlen_takes(q[..., :12], k[..., :12], 0.0)  # head dim not a multiple of 8
    assert not attention._flash_varlen_takes(torch.zeros(1, 3, 8, 16, dtype=torch.bfloat16), k, 0.0)
    monkeypatch.setattr(attention, "GPU_VARLEN_FLASH", False)
    assert not attention._flash_varlen_takes(q, k, 0.0)


def _packed_bf16_run(device, mode=None, seeds=(0, 1)):
    """Losses and LoRA gradients of a bf16 tiny Llama on packed batches, per-example attention."""
    from lorakit import activation_checkpointing
    from lorakit.attention import use_varlen_attention
    from lorakit.loss import token_loss_sum

    torch.manual_seed(0)
    model = tiny_llama().to(device=device, dtype=torch.bfloat16)
    assert use_varlen_attention(model)
    inject_adapter(model, LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave the adapters' A without a gradient
            torch.nn.init.normal_(p, std=0.02)
    if mode:
        activation_checkpointing.enable(model, mode)
    model.train()
    losses = []
    for seed in seeds:  # batches of other layouts in a row: the offsets must follow the batch
        batch = {k: v.to(device) for k, v in _packed_batch(seed).items()}
        loss, _ = token_loss_sum(model, batch, chunk_tokens=16)
        loss.backward()
        losses.append(loss.item())
    return losses, {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_flash_varlen_model_equals_per_example_attention(monkeypatch, flash_device):
    # the whole model in bf16: one flash call per layer against an SDPA call per example
    calls = []
    real = attention._FlashVarlenAttention.apply
    monkeypatch.setattr(attention._FlashVarlenAttention, "apply", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(attention, "BLOCKED_ATTENTION", False)
    got_losses, got = _packed_bf16_run(flash_device)
    assert len(calls) == 2 * 2  # two layers, two batches
    monkeypatch.setattr(attention, "GPU_VARLEN_FLASH", False)
    want_losses, want = _packed_bf16_run(flash_device)
    assert len(calls) == 4
    assert got_losses == pytest.approx(want_losses, rel=1e-2)
    for k in want:
        assert rel(got[k], want[k]) < 2e-2, (k, rel(got[k], want[k]))


@pytest.mark.parametrize("mode", ["full", "selective", "selective-rerun"])
def test_flash_varlen_under_gradient_checkpointing(monkeypatch, flash_device, mode):
    # Of the tiny model's two layers the first is checkpointed (the last never is). Full reruns its
    # flash call; selective keeps the call's output and log-sum-exp (the rerun way replays them)
    # and calls the kernel no more than without checkpointing.
    from lorakit import activation_checkpointing

    monkeypatch.setattr(activation_checkpointing, "SELECTIVE_WITHOUT_RERUN", mode != "selective-rerun")
    calls = []
    real = torch.ops.aten._flash_attention_forward
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain_losses, plain = _packed_bf16_run(flash_device, seeds=(0,))
    assert len(calls) == 2
    losses, grads = _packed_bf16_run(flash_device, mode=True if mode == "full" else "selective", seeds=(0,))
    assert len(calls) - 2 == (3 if mode == "full" else 2)
    # the same bits on CPU; on a GPU flash's backward sums dQ with atomics, in any order
    assert losses == pytest.approx(plain_losses, rel=0 if flash_device == "cpu" else 1e-3)
    for k in plain:
        tolerance = 0 if flash_device == "cpu" else 1e-2
        assert rel(grads[k], plain[k]) <= tolerance, (k, rel(grads[k], plain[k]))
