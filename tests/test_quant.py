"""lorakit.quant: NF4 + double quantization in bitsandbytes' format, streaming 4-bit loading."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import save_model_folder, tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_qwen3_moe
from lorakit.errors import UserError
from lorakit.merge import merge_adapter_files
from lorakit.quant import (
    NF4_CODE,
    dequantize_weight,
    is_4bit,
    load_model_4bit,
    make_8bit_adamw,
    quantize_model,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

FP32 = torch.float32
# QLoRA paper (Dettmers et al. 2023), appendix E: the NF4 levels, as printed (4 decimals).
PAPER_NF4 = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]  # fmt: skip
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class OneLinear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(seed))


def _nf4_reference_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """code[nibble] * absmax[block], written out in plain torch (high nibble first)."""
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).reshape(-1).long()
    n = state.shape.numel()
    values = torch.tensor(NF4_CODE)[nibbles[:n]]
    return (values * absmax[torch.arange(n) // state.blocksize]).reshape(state.shape)


def test_nf4_code_table_is_the_papers_and_bitsandbytes():
    assert len(NF4_CODE) == 16
    assert list(NF4_CODE) == sorted(NF4_CODE)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0  # exact zero and ends
    assert torch.allclose(torch.tensor(NF4_CODE), torch.tensor(PAPER_NF4), atol=5e-5, rtol=0)
    assert F.get_4bit_type("nf4", device="cpu").tolist() == list(NF4_CODE)


def test_quantize_model_equals_bitsandbytes_bit_for_bit():
    model = tiny_llama()
    weight = model.model.layers[1].mlp.down_proj.weight.detach().clone()  # (64, 128)
    quantize_model(model, compute_dtype=FP32)
    layer = model.model.layers[1].mlp.down_proj
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = layer.weight.quant_state
    assert torch.equal(layer.weight.data, packed)  # packed codes
    assert layer.weight.data.dtype == torch.uint8 and layer.weight.data.numel() == 64 * 128 // 2
    assert torch.equal(ours.absmax, state.absmax) and ours.absmax.dtype == torch.uint8  # 8-bit absmax
    assert torch.equal(ours.state2.absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset)
    assert ours.blocksize == 64 and ours.state2.blocksize == 256 and ours.nested and ours.quant_type == "nf4"
    dense = dequantize_weight(layer)
    assert dense.dtype == FP32 and dense.shape == (64, 128)
    assert torch.equal(dense, F.dequantize_4bit(packed, state))
    assert torch.equal(dense, _nf4_reference_dequant(packed, state))
    # NF4 with blocks of 64: each value lands on one of 16 levels of its block's range.
    assert (dense - weight).abs().max() <= 0.2 * weight.abs().max()


def test_bits_per_param_matches_hand_count():
    model = OneLinear(256, 128)  # 32768 params, 512 blocks of 64, 2 nested blocks of 256
    report = quantize_model(model, compute_dtype=FP32)
    codes, absmax8, nested, offset, tables = 32768 // 2, 512, 2 * 4, 4, 16 * 4 + 256 * 4
    assert report.layers == 1 and report.params == 32768
    assert report.linear_bytes_before == 32768 * 4
    assert report.linear_bytes_after == codes + absmax8 + nested + offset + tables == 17996
    assert report.bits_per_param == pytest.approx(17996 * 8 / 32768)
    assert report.frozen_bytes_after == 17996  # no bias, nothing else
    assert "bits/param" in report.summary() and "1 linear layers" in report.summary()

    # Big layers: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter, plus one fp32 offset a layer.
    big = quantize_model(OneLinear(4096, 256), compute_dtype=FP32)
    n = 4096 * 256
    assert (big.linear_bytes_after - tables) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert big.bits_per_param < 4.14


def test_quantize_model_keeps_embeddings_norms_and_head_16bit():
    model = tiny_llama().to(torch.bfloat16)
    report = quantize_model(model, compute_dtype=torch.bfloat16)
    assert report.layers == 2 * 7
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEAR_NAMES:
            assert is_4bit(module), name
            assert not module.weight.requires_grad and module.compute_dtype == torch.bfloat16
    assert not is_4bit(model.lm_head) and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert report.linear_bytes_before == 73728 * 2
    assert report.linear_bytes_after < 0.27 * report.linear_bytes_before  # the goal vs bf16


def test_quantized_logits_close_to_fp32_and_equal_to_dequantized_model():
    original = tiny_llama()
    quantized = copy.deepcopy(original)
    quantize_model(quantized, compute_dtype=FP32)
    dequantized = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if is_4bit(module):
            dequantized.get_submodule(name).weight.data = dequantize_weight(module)
    ids = _ids()
    with torch.no_grad():
        ref = original(ids).logits
        q = quantized(ids).logits
        dq = dequantized(ids).logits
    assert torch.allclose(q, dq, rtol=1e-5, atol=1e-6)
    rel = (q - ref).norm() / ref.norm()
    assert 0 < rel < 0.15, rel  # 4-bit is lossy, but close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_4bit_autograd_with_frozen_weight(dtype):
    """The call the LoRA layer makes: output and input gradient equal the dense dequantized ones."""
    model = OneLinear(128, 96, bias=True).to(dtype)
    quantize_model(model, compute_dtype=dtype)
    layer = model.proj
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = bnb.matmul_4bit(x, layer.weight.t(), bias=layer.bias, quant_state=layer.weight.quant_state)
    dense = dequantize_weight(layer).to(dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, dense, layer.bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert layer.weight.grad is None and layer.bias.grad is None


def _load_reference(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=FP32).eval()
    report = quantize_model(model, compute_dtype=FP32)
    return model, report


@pytest.mark.parametrize(
    "make, shard",
    [
        (tiny_llama, None),
        (tiny_llama, "100KB"),
        (lambda: tiny_llama(tie_word_embeddings=True), None),
        (tiny_gpt2, None),  # Conv1D layers, tied head
        (tiny_gpt_neox, None),  # its head stored as embed_out, renamed on load
    ],
    ids=["llama", "llama-sharded", "llama-tied", "gpt2-tied", "gpt-neox"],
)
def test_load_model_4bit_equals_load_then_quantize(tmp_path, make, shard):
    folder = save_model_folder(tmp_path / "m", make(), max_shard_size=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    model, report = load_model_4bit(folder, compute_dtype=FP32)
    ref, ref_report = _load_reference(folder)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)
    for field in ("layers", "params", "linear_bytes_after", "frozen_bytes_after"):
        assert getattr(report, field) == getattr(ref_report, field), field
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert not any(p.requires_grad for p in model.parameters())

    # Peak held: the 4-bit model plus one full-precision tensor (the largest, fp32) at most.
    largest = max(t.numel() * 4 for t in ref.state_dict().values() if t.is_floating_point())
    assert report.peak_bytes <= report.frozen_bytes_after + largest + 4096, report.summary()
    assert report.peak_bytes < 0.75 * report.frozen_bytes_before  # never the whole fp32 model
    assert report.peak_rss_bytes > 0 and "loading peak" in report.summary()


def test_load_model_4bit_puts_moe_experts_together_a_layer_at_a_time(tmp_path, caplog):
    # Qwen3-MoE's experts are stored one by one and held as fused 3-d tensors: the loader streams,
    # putting each layer's fused expert weights together from their pieces and quantizing them
    # expert by expert; the result is the reference's (from_pretrained, then quantize_model).
    folder = save_model_folder(tmp_path / "m", tiny_qwen3_moe())
    with caplog.at_level("INFO", logger="lorakit.quant"):
        model, report = load_model_4bit(folder, compute_dtype=FP32)
    assert "loading the model whole" not in caplog.text
    ref, ref_report = _load_reference(folder)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)
    for field in ("layers", "params", "linear_bytes_after", "frozen_bytes_after"):
        assert getattr(report, field) == getattr(ref_report, field), field
    # per layer q/k/v/o and, for each of the 4 experts, gate_up and down; the router stays 16-bit
    assert report.layers == 2 * (4 + 4 * 2)
    # never all of the model in fp32: the loader holds one layer's experts (and an index) at a time
    assert report.peak_bytes < 0.75 * report.frozen_bytes_before, report.summary()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_load_model_4bit_accepts_checkpoint_keys_without_base_prefix(tmp_path):
    folder = save_model_folder(tmp_path / "m", tiny_llama())
    tensors = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, folder / "model.safetensors")
    model, _ = load_model_4bit(folder, compute_dtype=FP32)
    ref, _ = _load_reference(save_model_folder(tmp_path / "ref", tiny_llama()))
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)


def test_load_model_4bit_refuses_pickles_and_incomplete_folders(tmp_path):
    folder = save_model_folder(tmp_path / "m", tiny_llama())
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickle.*arbitrary code.*safetensors.*save_pretrained"):
        load_model_4bit(folder, compute_dtype=FP32)
    (folder / "pytorch_model.bin").unlink()
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"lack 1 weights.*model\.norm\.weight"):
        load_model_4bit(folder, compute_dtype=FP32)
    with pytest.raises(UserError, match="folder not found"):
        load_model_4bit(tmp_path / "nope", compute_dtype=FP32)


def test_user_errors_for_shapes_models_and_args():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.good = nn.Linear(64, 64)
            self.odd = nn.Linear(100, 64)

    with pytest.raises(UserError, match=r"odd \(in_features=100, out_features=64\).*multiple of 64.*skip"):
        quantize_model(Odd(), compute_dtype=FP32)
    report = quantize_model(Odd(), compute_dtype=FP32, skip=("odd",))  # the fix the message names
    assert report.layers == 1

    no_linear = nn.Sequential(nn.Embedding(10, 64), nn.LayerNorm(64))
    with pytest.raises(UserError, match="no nn.Linear"):
        quantize_model(no_linear, compute_dtype=FP32)
    with pytest.raises(UserError, match="skipped"):
        quantize_model(OneLinear(64, 64), compute_dtype=FP32, skip=("proj",))
    with pytest.raises(UserError, match="blocksize = 48"):
        quantize_model(OneLinear(64, 64), compute_dtype=FP32, blocksize=48)
    with pytest.raises(UserError, match="compute_dtype"):
        quantize_model(OneLinear(64, 64), compute_dtype=torch.int8)


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(UserError, match=r"needs bitsandbytes, which is not installed: pip install 'bitsandbytes>=0\.46\.1' \(lorakit's `quant` extra\)$"):
        quantize_model(OneLinear(64, 64), compute_dtype=FP32)
    with pytest.raises(UserError, match=r"adamw8bit.*pip install 'bitsandbytes"):
        make_8bit_adamw([nn.Parameter(torch.zeros(4))])
    # merging as over a 4-bit base: refused before any folder is read
    with pytest.raises(UserError, match=r"^--simulate-nf4 needs bitsandbytes"):
        merge_adapter_files("no-base", "no-adapter", "out", simulate_nf4=True)
    assert not is_4bit(nn.Linear(4, 4))


def test_8bit_adamw_runs_on_cpu_and_refuses_unsupported_device():
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    p = nn.Parameter(torch.zeros(64, 128))
    opt = make_8bit_adamw([p], lr=0.05)
    losses = []
    for _ in range(20):
        loss = (p - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[p]["state1"].dtype == torch.uint8  # moments really held in 8 bits
    assert losses[-1] < 0.5 * losses[0]


def test_8bit_adamw_on_a_device_without_kernels_is_a_user_error(monkeypatch):
    class NoKernel(bnb.optim.AdamW8bit):  # what a backend without 8-bit optimizer kernels does
        def step(self, closure=None):
            raise NotImplementedError("Could not run 'bitsandbytes::optimizer_update_8bit_blockwise'")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", NoKernel)
    with pytest.raises(UserError, match=r"device cpu \(NotImplementedError: .*\); set train\.optimizer: adamw$"):
        make_8bit_adamw([nn.Parameter(torch.zeros(8))])
