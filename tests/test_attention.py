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
