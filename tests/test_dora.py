"""DoRA (`lora.dora`, PEFT's `use_dora`): PEFT's numbers and files both ways, merging in memory and
streamed, training through the CLI with checkpointing and QLoRA."""

import json

import pytest
import torch
from helpers import save_model_folder, tiny_gpt2, tiny_llama, train_in_modes
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, UserError, inject_adapter, load_adapter, save_adapter
from lorakit.adapters import _adapter_tensors
from lorakit.inject import lora_layers, merge_adapter, unmerge_adapter
from lorakit.inspection import inspect_adapter
from lorakit.merge import merge_adapter_files

def gpt2_with_biases():
    """GPT-2 whose Conv1D biases are not zero (its init zeroes them): DoRA rescales W x, not the bias."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and (".c_attn." in name or ".c_fc." in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


TARGETS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (gpt2_with_biases, ["c_attn", "c_fc"]),
    # an embedding's DoRA magnitudes are per dimension: the norms run over its columns
    "llama-embedding": (tiny_llama, ["embed_tokens", "q_proj"]),
}


def adapted_layers(targets):
    """How many layers `targets` adapts in the tiny models: one per block (2), the embedding once."""
    return sum(1 if t == "embed_tokens" else 2 for t in targets)


def peft_dora(make, targets, tmp_path, dropout=0.0):
    """A PEFT DoRA model with random B and magnitudes moved off their init, and its saved folder."""
    model = get_peft_model(
        make(), PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=True, init_lora_weights=False)
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), tmp_path / "peft"


def gradients(model):
    """lorakit's adapter gradients under PEFT's parameter names (`...lora_A.default.weight` without the adapter)."""
    out = {}
    for path, layer in lora_layers(model):
        for key, p in _adapter_tensors(path, layer, "default").items():
            if not key.endswith(".base_layer.weight"):  # a targeted embedding's frozen weight PEFT saves
                out[key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.weight")] = p.grad
    return out


@pytest.mark.parametrize("arch, dropout", [("llama", 0.0), ("gpt2", 0.0), ("llama-embedding", 0.0), ("llama", 0.2)])
def test_matches_peft_in_forward_and_gradients(arch, dropout, tmp_path):
    make, targets = TARGETS[arch]
    theirs, folder = peft_dora(make, targets, tmp_path, dropout)
    ours = make()
    load_adapter(ours, folder, trainable=True)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    if dropout:
        # Llama has no dropout of its own: in train mode the LoRA dropouts are the only random draws,
        # one nn.Dropout call per adapted layer in layer order on both sides, so one seed gives both the same masks
        theirs.train(), ours.train()
    torch.manual_seed(5)
    expected = theirs(ids, labels=ids)
    expected.loss.backward()
    torch.manual_seed(5)
    got = ours(ids, labels=ids)
    got.loss.backward()
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=2e-6)
    reference = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    mine = gradients(ours)
    assert sorted(mine) == sorted(reference) and sum("magnitude" in k for k in mine) == adapted_layers(targets)
    for key, grad in mine.items():
        torch.testing.assert_close(grad, reference[key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_merge_unmerge_and_files_round_trip(arch, tmp_path):
    make, targets = TARGETS[arch]
    theirs, folder = peft_dora(make, targets, tmp_path)
    model = make()
    load_adapter(model, folder)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids).logits
        weight = next(layer for _, layer in lora_layers(model)).weight.clone()
        merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=2e-6)
        unmerge_adapter(model)
        torch.testing.assert_close(next(layer for _, layer in lora_layers(model)).weight, weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=2e-6)
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    ours_t, theirs_t = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(folder / "adapter_model.safetensors")
    # PEFT saves a targeted embedding's weight too, and so does an adapter loaded with it, saved again
    # (after a merge and unmerge, up to their rounding)
    assert sorted(ours_t) == sorted(theirs_t)
    for k in ours_t:
        torch.testing.assert_close(ours_t[k], theirs_t[k], rtol=0, atol=1e-5 if k.endswith(".base_layer.weight") else 0)
    again = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, adapted, rtol=0, atol=2e-6)


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_streamed_merge_and_inspect(arch, tmp_path):
    make, targets = TARGETS[arch]
    base = save_model_folder(tmp_path / "base", make())
    theirs, folder = peft_dora(make, targets, tmp_path)
    report = merge_adapter_files(base, folder, tmp_path / "merged")
    assert report.merged_modules == adapted_layers(targets)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(ids).logits, theirs(ids).logits, rtol=0, atol=5e-6)
    info = inspect_adapter(folder, base)
    assert info["dora"] is True
    row = info["modules"][0]
    assert row["dora"] and row["params"] == 4 * sum(row["shape"]) + row["shape"][0]  # A, B and the magnitudes (out,)
    layer = dict(lora_layers(load_adapter_model(make, folder)))[row["module"]]
    w = layer.weight.float() if layer.kind.name == "linear" else layer.weight.float().t()
    change = (layer.lora_magnitude["default"] / layer._adapted_row_norms("default")).unsqueeze(1) * (w + layer.delta_weight("default")) - w
    assert row["relative"] == pytest.approx(float(change.norm() / w.norm()), rel=1e-4)


def load_adapter_model(make, folder):
    model = make()
    load_adapter(model, folder)
    return model


def test_dora_config_errors():
    with pytest.raises(UserError, match="lora.dora with lora.init = 'pissa'"):
        LoraConfig(dora=True, init="pissa")
    with pytest.raises(UserError, match="DoRA adapts linear layers"):
        LoraConfig(dora=True, target_parameters=["mlp.experts.down_proj"])


def test_train_dora_through_the_cli(tmp_path):
    folder = save_model_folder(tmp_path / "model", tiny_llama())
    losses = train_in_modes(tmp_path, folder, {"dora": True}, steps=5, lr=1.0e-2)
    assert losses["false"][-1] < losses["false"][0] - 0.3
    assert losses["full"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["selective"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["nf4"][-1] < losses["nf4"][0] - 0.3
    tensors = load_file(tmp_path / "out_false" / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 2 * 7  # every linear layer of both blocks
    # the trained adapter loads in PEFT with the same logits
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter_model(tiny_llama, tmp_path / "out_false" / "adapter")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out_false" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_path_equals_the_plain_path(dtype, tol):
    # Without dropout a DoRA layer runs the fused LoRA kernel and rescales its output; the plain
    # autograd path is the reference (outputs and every gradient).
    model = gpt2_with_biases().to(dtype)
    inject_adapter(model, LoraConfig(r=4, alpha=8, dora=True, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
        layer.lora_magnitude["default"].mul_(torch.linspace(0.8, 1.2, layer.out_features))
    x = torch.randn(2, 7, layer.in_features, dtype=dtype, requires_grad=True)
    results = []
    for run in (layer.forward, layer.plain_forward):
        out = run(x)
        grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                    [x, layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]])  # fmt: skip
        results.append((out, grads))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused.float(), plain.float(), rtol=tol, atol=tol)
    for f, p in zip(fused_grads, plain_grads):
        assert p.abs().max() > 0
        torch.testing.assert_close(f.float(), p.float(), rtol=tol, atol=tol * p.abs().max().item())
