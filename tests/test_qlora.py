"""QLoRA end to end: LoRA over NF4 bases in layers, the trainer, the CLI, and PEFT interchange.

tests/test_quant.py covers the quantizer and loader on their own; here the 4-bit layers carry
adapters: layer numerics against a dense reference, what backward keeps alive, which parameters
train, `lorakit train` with `quantize: nf4` (fp32, bf16, 8-bit AdamW), and the adapter it writes
loaded by PEFT over the 16-bit base and over a transformers + bitsandbytes 4-bit base.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_model_folder, tiny_llama
from torch import nn

from lorakit.adapters import load_adapter
from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.inject import inject_adapter
from lorakit.layers import LoraLayer
from lorakit.loss import token_loss_sum

bnb = pytest.importorskip("bitsandbytes")
from lorakit.quant import dequantize_weight, is_4bit, load_model_4bit, quantize_model  # noqa: E402

FP32 = torch.float32
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama folder (hidden 64: one NF4 block per row) and an addition data set."""
    root = tmp_path_factory.mktemp("qlora")
    save_model_folder(root / "model", tiny_llama())
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(160):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}) + "\n")
    return root


def _config(root, out, *, quantize="nf4", lora=None, **train):
    cfg = {
        "model": str(root / "model"),
        "output_dir": str(out),
        "quantize": quantize,
        "data": {"train": str(root / "train.jsonl"), "max_length": 64},
        "lora": lora or {"r": 4, "alpha": 8},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 3.0e-3, "precision": "fp32", "seed": 0, "warmup_steps": 2, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _losses(out):
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in entries if "loss" in e]


@pytest.fixture(scope="module")
def nf4_run(workspace):
    """One fp32 `quantize: nf4` CLI run shared by the tests that read its outputs."""
    out = workspace / "nf4-fp32"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", _config(workspace, out)])
    assert code == 0
    return out, printed.getvalue()


def _mean(values) -> float:
    return sum(values) / len(values)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(seed))


def _batch(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}


# --------------------------------------------------------------------------- the layer
class OneLinear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out, bias=bias)


def _qlora_and_dense_reference(fan_in=128, fan_out=96, r=4, bias=True):
    """A LoraLayer over a Linear4bit and one over nn.Linear holding its dequantized weight, same adapter."""
    torch.manual_seed(0)
    holder = OneLinear(fan_in, fan_out, bias)
    quantize_model(holder, compute_dtype=FP32)
    q = LoraLayer(holder.proj, "proj")
    dense = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(dequantize_weight(holder.proj))
        if bias:
            dense.bias.copy_(holder.proj.bias)
    dense.requires_grad_(False)
    ref = LoraLayer(dense, "proj")
    for layer in (q, ref):
        layer.add_adapter("default", r=r, alpha=2 * r)
    with torch.no_grad():
        b = torch.randn(fan_out, r) * 0.1  # nonzero B, so the adapter path and A's gradient are exercised
        q.lora_B["default"].copy_(b)
        ref.lora_B["default"].copy_(b)
        ref.lora_A["default"].copy_(q.lora_A["default"])
    return q, ref


@pytest.fixture(params=["fused", "plain"])
def lora_path(request, monkeypatch):
    """Both LoRA forward paths: lorakit.fused's autograd Function (default) and plain autograd ops."""
    from lorakit import fused

    monkeypatch.setattr(fused, "ENABLED", request.param == "fused")
    return request.param


def test_qlora_layer_equals_lora_over_dequantized_weight(lora_path):
    q, ref = _qlora_and_dense_reference()
    assert q.kind.name == "linear4bit" and ref.kind.name == "linear"
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    xq, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yq, yr = q(xq), ref(xr)
    assert yq.shape == (3, 5, 96) and yq.dtype == FP32
    torch.testing.assert_close(yq, yr, rtol=1e-5, atol=1e-6)
    # The adapter really contributes (else the comparison would only test the base).
    assert (yr - ref.base_forward(xr)).abs().max() > 1e-2
    grad = torch.randn_like(yq)
    yq.backward(grad)
    yr.backward(grad)
    for name in ("lora_A", "lora_B"):
        gq, gr = getattr(q, name)["default"].grad, getattr(ref, name)["default"].grad
        torch.testing.assert_close(gq, gr, rtol=1e-5, atol=1e-6)
        assert gq.abs().sum() > 0, name
    torch.testing.assert_close(xq.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert q.weight.grad is None and q.bias.grad is None and not q.weight.requires_grad


def _saved_by_graph(output: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph of `output` keeps for backward: built-in nodes' `_saved_*`,
    custom Functions' `saved_tensors`, and bitsandbytes' `ctx.tensors`."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_") or attr in ("saved_tensors", "tensors"):
                value = getattr(node, attr)
                values = value if isinstance(value, (tuple, list)) else [value]
                found += [v for v in values if isinstance(v, torch.Tensor)]
        stack += [n for n, _ in node.next_functions]
    return found


def test_qlora_backward_keeps_no_dequantized_weight(lora_path):
    """The issue: backward dequantizes again instead of keeping a dense copy alive."""
    q, ref = _qlora_and_dense_reference(fan_in=128, fan_out=96)
    x = torch.randn(3, 5, 128, requires_grad=True)
    dense_numel = 96 * 128  # nothing else in this graph has that many elements
    saved = _saved_by_graph(q(x).sum())
    assert any(t.numel() == x.numel() for t in saved)  # the walk does see what the layer saves (x)
    assert not [(t.shape, t.dtype) for t in saved if t.is_floating_point() and t.numel() == dense_numel]
    # Control: the same walk finds a dense weight that plain autograd keeps for the input gradient.
    assert any(t.numel() == dense_numel for t in _saved_by_graph(nn.functional.linear(x, ref.weight).sum()))


# --------------------------------------------------------------------------- one manual step
def test_only_adapters_train_and_the_4bit_base_stays_bit_identical(workspace):
    model, report = load_model_4bit(workspace / "model", compute_dtype=FP32)
    assert report.layers == 2 * 7
    paths = inject_adapter(model, LoraConfig(r=4, alpha=8))
    assert len(paths) == 2 * 7  # all-linear: every 4-bit layer, not the 16-bit head
    model.train()
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r x (in + out) per layer: q, o 64+64; k, v 64+32 (2 KV heads of 16); gate, up 64+128; down 128+64
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 2 * 4 * (
        2 * 128 + 2 * 96 + 3 * 192
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):  # two steps: B starts at zero, so A first gets a gradient on step 2
        optimizer.zero_grad()
        loss, count = token_loss_sum(model, _batch(_ids()), chunk_tokens=16)
        (loss / count).backward()
        losses.append(loss.item() / count)
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable  # gradients reach every adapter and nothing else
        optimizer.step()
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            assert torch.equal(module.weight.data, packed[name]), name  # NF4 codes untouched
            assert module.weight.data.dtype == torch.uint8
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None
    assert losses[1] < losses[0]


# --------------------------------------------------------------------------- the CLI
def test_modules_to_save_on_a_4bit_layer_is_a_one_line_error(workspace, capsys):
    model = tiny_llama()
    quantize_model(model, compute_dtype=FP32)
    with pytest.raises(UserError, match=r"lora.modules_to_save: model.layers.0.self_attn.o_proj holds no floating-point weight "
                                        r"to train in full \(model.layers.0.self_attn.o_proj.weight is torch.uint8"):  # fmt: skip
        inject_adapter(model, LoraConfig(r=4, targets=["q_proj"], modules_to_save=["o_proj"]))
    inject_adapter(tiny_llama(), LoraConfig(r=4, targets=["q_proj"], modules_to_save=["lm_head"]))  # 16-bit: trained in full
    out = workspace / "nf4-o-proj"
    config = _config(workspace, out, lora={"r": 4, "alpha": 8, "modules_to_save": ["o_proj"]})
    assert main(["train", config]) == 2
    err = capsys.readouterr().err  # named where the config gives the key
    line = Path(config).read_text().splitlines().index("  modules_to_save:") + 1
    assert err.startswith(f"error: {config}:{line}: lora.modules_to_save: model.layers.0.self_attn.o_proj holds") and err.count("\n") == 1


def test_cli_nf4_fp32_trains_and_reports_frozen_memory(nf4_run):
    out, printed = nf4_run
    losses = _losses(out)
    assert len(losses) == 12 and all(map(lambda v: v == v, losses))
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.3, losses
    # The start summary: 14 NF4 layers, their memory before -> after, bits per parameter.
    line = next(ln for ln in printed.splitlines() if ln.startswith("precision"))
    assert "nf4: 14 linear layers" in line and "frozen linear weights" in line and "bits/param" in line, line
    bits = float(line.split(" bits/param")[0].rsplit(" ", 1)[1])
    # 73728 params: 4-bit codes, an 8-bit absmax per 64; per layer one fp32 nested absmax (each
    # layer has <= 256 blocks) and one fp32 offset; the two code tables (16 + 256 fp32) once.
    held = 73728 // 2 + 73728 // 64 + 14 * (4 + 4) + (16 + 256) * 4
    assert bits == pytest.approx(8 * held / 73728, abs=1e-3) and 4.1 < bits < 4.4
    assert "frozen linear weights 288.0 KiB -> 38.3 KiB" in line  # 73728 fp32 weights before
    card = (out / "adapter" / "README.md").read_text()
    assert "NF4 4-bit during training" in card and "quantize: nf4" in card


def test_cli_nf4_bf16_trains(workspace, nf4_run, capsys):
    out = workspace / "nf4-bf16"
    assert main(["train", _config(workspace, out, precision="bf16")]) == 0
    printed = capsys.readouterr().out
    assert "bfloat16 compute" in printed and "nf4: 14 linear layers" in printed
    losses = _losses(out)
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.3, losses
    # bf16 compute over the same NF4 codes tracks the fp32 run closely.
    fp32 = _losses(nf4_run[0])
    assert max(abs(a - b) for a, b in zip(losses, fp32)) < 0.05, (losses, fp32)


@pytest.mark.parametrize("mode", [True, "selective"])
def test_cli_nf4_with_gradient_checkpointing_gives_the_same_losses(workspace, nf4_run, mode):
    # selective checkpointing keeps the 4-bit layers' outputs: no 4-bit projection or dequantization is redone
    out = workspace / f"nf4-ckpt-{mode}"
    assert main(["train", _config(workspace, out, gradient_checkpointing=mode)]) == 0
    assert _losses(out) == pytest.approx(_losses(nf4_run[0]), abs=1e-4)


def test_cli_nf4_with_8bit_adamw_trains_with_8bit_moments(workspace):
    out = workspace / "nf4-adamw8bit"
    # r=64 on q/o: A and B are (64, 64) = 4096 values, the smallest tensor bitsandbytes keeps in
    # 8-bit state (smaller ones fall back to 32-bit moments).
    lora = {"r": 64, "alpha": 64, "targets": ["q_proj", "o_proj"]}
    cfg = _config(workspace, out, lora=lora, optimizer="adamw8bit", lr=3.0e-3, save_every=6)
    assert main(["train", cfg]) == 0
    losses = _losses(out)
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.3, losses
    state = torch.load(out / "checkpoints" / "step-6" / "optimizer.pt", weights_only=True)["state"]
    # bitsandbytes keeps its 8-bit moments under this key in state_dict()
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    assert len(moments) == 2 * 2 * 2  # A and B of q and o in both blocks
    for m in moments:
        assert m["state1"].dtype == m["state2"].dtype == torch.uint8 and m["state1"].shape == (64, 64)


def test_cli_adamw8bit_on_a_device_without_kernels_exits_2(workspace, monkeypatch, capsys):
    class NoKernel(bnb.optim.AdamW8bit):
        def step(self, closure=None):
            raise NotImplementedError("Could not run 'bitsandbytes::optimizer_update_8bit_blockwise'")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", NoKernel)
    assert main(["train", _config(workspace, workspace / "nokernel", optimizer="adamw8bit")]) == 2
    err = capsys.readouterr().err
    assert "adamw8bit" in err and "set train.optimizer: adamw" in err and "Traceback" not in err


# --------------------------------------------------------------------------- PEFT interchange
def _lorakit_qlora(workspace, adapter) -> nn.Module:
    model, _ = load_model_4bit(workspace / "model", compute_dtype=FP32)
    load_adapter(model, adapter)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_peft_over_the_16bit_base(workspace, nf4_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = nf4_run
    ids = _ids(3)
    ours = _logits(_lorakit_qlora(workspace, out / "adapter"), ids)

    base = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=FP32).eval()
    plain = _logits(base, ids)
    peft16 = PeftModel.from_pretrained(base, out / "adapter").eval()
    p16 = _logits(peft16, ids)
    assert (p16 - plain).norm() / plain.norm() > 1e-3  # the adapter is loaded and does something
    # Against lorakit's 4-bit model the only difference is the base's quantization error, so it
    # is about as large as the error of the bare base (and small).
    qbase, _ = load_model_4bit(workspace / "model", compute_dtype=FP32)
    base_err = ((_logits(qbase, ids) - plain).norm() / plain.norm()).item()
    adapted_err = ((p16 - ours).norm() / p16.norm()).item()
    assert 0 < adapted_err < 0.1 and adapted_err < 1.5 * base_err, (adapted_err, base_err)

    # Exactly that: with the NF4-rounded weights put into the 16-bit base, PEFT matches lorakit.
    with torch.no_grad():
        for name, module in qbase.named_modules():
            if is_4bit(module):
                peft16.base_model.model.get_submodule(name).base_layer.weight.copy_(dequantize_weight(module))
    torch.testing.assert_close(_logits(peft16, ids), ours, rtol=1e-5, atol=1e-5)


def test_inference_commands_run_a_qlora_adapter_over_its_4bit_base(workspace, nf4_run, capsys):
    from lorakit.cli import main
    from lorakit.generate import generate
    from lorakit.models import load_for_inference

    out, _ = nf4_run
    ids = _ids(4)
    model, tokenizer = load_for_inference(workspace / "model", out / "adapter", dtype=FP32, device="cpu", quantize="nf4")
    assert sum(type(p).__name__ == "Params4bit" for p in model.parameters()) == 2 * len(LINEAR_NAMES)
    torch.testing.assert_close(_logits(model, ids), _logits(_lorakit_qlora(workspace, out / "adapter"), ids), rtol=0, atol=0)
    # the CLI computes in bf16 where the CPU has it, as training's precision: auto would
    model, tokenizer = load_for_inference(workspace / "model", out / "adapter", device="cpu", quantize="nf4")
    want = generate(model, tokenizer, ["3 plus 4 is"], max_new_tokens=3)
    args = ["generate", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"), "--prompt", "3 plus 4 is"]
    assert main(args + ["--quantize", "nf4", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == want[0] + "\n"
    # --precision fp32 computes as this fp32 run did, so eval gives its numbers
    from lorakit.config import DataConfig
    from lorakit.data import load_dataset
    from lorakit.evaluate import evaluate_loss

    model, tokenizer = load_for_inference(workspace / "model", out / "adapter", dtype=FP32, device="cpu", quantize="nf4")
    data = load_dataset(workspace / "train.jsonl", tokenizer, DataConfig(max_length=1024, packing=False), use_cache=False)
    want = evaluate_loss(model, data, batch_size=8, max_length=1024)["loss"]
    args = ["eval", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"), "--data", str(workspace / "train.jsonl")]
    assert main(args + ["--quantize", "nf4", "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(want, abs=1e-6)


def test_adapter_loads_in_peft_over_a_bitsandbytes_4bit_base(workspace, nf4_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out, _ = nf4_run
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=FP32
    )
    base = AutoModelForCausalLM.from_pretrained(workspace / "model", quantization_config=quant, dtype=FP32, device_map="cpu")
    ours = _lorakit_qlora(workspace, out / "adapter")
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for name, module in layers:
        # bitsandbytes' own eval-mode CPU path would repack the weight into a lossy bf16 layout on
        # AVX512-BF16 CPUs; lorakit turns that off (see quant._new_linear4bit), so do the same here.
        module.support_avx512bf16_for_cpu = False
        mine = ours.get_submodule(name)
        assert torch.equal(module.weight.data, mine.weight.data), name  # same NF4 codes ...
        assert torch.equal(module.weight.quant_state.absmax, mine.weight.quant_state.absmax), name  # ... and absmax
    peft4 = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = _ids(4)
    ours_logits, peft_logits = _logits(ours, ids), _logits(peft4, ids)
    with peft4.disable_adapter():
        assert (_logits(peft4, ids) - peft_logits).abs().max() > 1e-3  # the adapter is active
    torch.testing.assert_close(peft_logits, ours_logits, rtol=1e-5, atol=1e-5)
