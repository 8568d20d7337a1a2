"""LoRA on MoE expert weights (lorakit.experts): the math against a reference built from transformers'
own experts forward, PEFT's file format both ways, merging (in memory and streamed), the CLI."""

import json
import warnings

import pytest
import torch
from helpers import save_model_folder, tiny_causal_lm, tiny_qwen3_moe, train_in_modes
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lorakit import LoraConfig, UserError, inject_adapter, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.experts import LoraExperts
from lorakit.inject import lora_layers, merge_adapter, unload, unmerge_adapter
from lorakit.inspection import inspect_adapter
from lorakit.merge import merge_adapter_files

EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_gpt_oss():
    # gpt-oss: transposed (E, in, out) expert weights with biases and its own clamped, interleaved gate
    return tiny_causal_lm(
        "GptOss", num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
        layer_types=["full_attention", "sliding_attention"], sliding_window=16,
    )  # fmt: skip


def tiny_mixtral():
    # Mixtral stores each expert's w1 / w3 / w2 (gate, up, down) one by one under `block_sparse_moe`,
    # which transformers holds fused under `mlp.experts`
    return tiny_causal_lm("Mixtral", num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)


MODELS = {"qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def randomize(model, seed=1):
    """Give every adapter a non-zero B, so the update shows in outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                for p in b.values() if isinstance(layer, LoraExperts) else [b]:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def reference_loss(model, adapted, ids):
    """The loss with each adapted expert weight replaced by W + s·B_e@A_e, run through transformers'
    own experts forward (torch.func.functional_call on the unwrapped base model)."""
    overrides = {}
    for path, layer in adapted:
        for param in layer.lora_A["default"]:
            weight = getattr(layer.base_layer, param)
            a, b = layer.factors("default", param)
            delta = layer.scaling["default"][param] * torch.bmm(b, a)
            overrides[f"{path}.base_layer.{param}"] = weight + (delta.transpose(1, 2) if layer.base_layer.is_transposed else delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.func.functional_call(model, overrides, (ids,), {"labels": ids}).loss


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_and_gradients_match_the_merged_weight_reference(arch):
    model = MODELS[arch]().float()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=[], target_parameters=EXPERT_WEIGHTS))
    randomize(model)
    adapted = [(p, layer) for p, layer in lora_layers(model) if isinstance(layer, LoraExperts)]
    assert len(adapted) == 2 and all(set(layer.lora_A["default"]) == {"gate_up_proj", "down_proj"} for _, layer in adapted)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for _, layer in adapted:
        layer.disabled = True  # the reference runs the base experts forward on the overridden weights
    ref = reference_loss(model, adapted, ids)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert len(grads) == 8
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert grads[name].abs().max() > 0, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_format_both_ways(arch, tmp_path):
    base = MODELS[arch]().float()
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(
        MODELS[arch]().float(),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_WEIGHTS, init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model(ids).logits
        base_logits = base(ids).logits
    load_adapter(base, tmp_path / "peft")
    with torch.no_grad():
        got = base(ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)

    save_adapter(base, tmp_path / "ours")
    ours, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(EXPERT_WEIGHTS) and config["target_modules"] == ["q_proj"]
    again = PeftModel.from_pretrained(MODELS[arch]().float(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=2e-6)


def test_nesting_order_follows_the_module_not_the_config(tmp_path):
    # PEFT nests one wrapper per weight in the order the experts module registers them: gate_up_proj
    # (first) sits one `.base_layer` deeper than down_proj, whichever order the config lists them in.
    model = tiny_qwen3_moe()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=[], target_parameters=list(reversed(EXPERT_WEIGHTS))))
    save_adapter(model, tmp_path / "a")
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    prefix = "base_model.model.model.layers.0.mlp.experts"
    # 4 experts x r=2; gate_up_proj (E, 2·64, 64): in 64, out 128; down_proj (E, 64, 64): in 64, out 64
    assert shapes[f"{prefix}.base_layer.lora_A.weight"] == (8, 64) and shapes[f"{prefix}.base_layer.lora_B.weight"] == (128, 8)
    assert shapes[f"{prefix}.lora_A.weight"] == (8, 64) and shapes[f"{prefix}.lora_B.weight"] == (64, 8)
    assert len(shapes) == 8


def test_merge_unmerge_and_unload():
    model = tiny_gpt_oss().float()
    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        weight = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], target_parameters=EXPERT_WEIGHTS))
    randomize(model)
    with torch.no_grad():
        adapted = model(ids).logits
        merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=2e-5)
        unmerge_adapter(model)
        torch.testing.assert_close(model.model.layers[0].mlp.experts.base_layer.gate_up_proj, weight, rtol=0, atol=1e-6)
        plain = unload(model)
        assert type(plain.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
        torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=2e-5)
    assert (adapted - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    "make, stored_key",
    [(tiny_qwen3_moe, "model.layers.0.mlp.experts.3.up_proj.weight"),
     (tiny_mixtral, "model.layers.0.block_sparse_moe.experts.3.w3.weight")],
    ids=["qwen3_moe", "mixtral"],
)  # fmt: skip
def test_streamed_merge_and_inspect_match_the_adapted_model(make, stored_key, tmp_path):
    folder = save_model_folder(tmp_path / "base", make())
    model = make()
    inject_adapter(model, LoraConfig(r=4, alpha=8, rank_pattern={"down_proj": 2}, target_parameters=EXPERT_WEIGHTS))
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    report = merge_adapter_files(folder, tmp_path / "adapter", tmp_path / "merged")
    assert report.merged_modules == 8 + 4  # q, k, v, o of 2 layers (the router is no nn.Linear), 4 expert weights
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    assert stored_key in stored  # written in the layout the base stores
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=2e-5)

    info = inspect_adapter(tmp_path / "adapter", folder)
    rows = {m["module"]: m for m in info["modules"]}
    down = rows["model.layers.1.mlp.experts.down_proj"]
    layer = model.model.layers[1].mlp.experts
    assert down["kind"] == "experts" and down["r"] == 2 and down["shape"] == list(layer.base_layer.down_proj.shape)  # (E, out, in)
    delta = layer.delta_weight("default", "down_proj")
    with torch.no_grad():
        assert down["norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert down["relative"] == pytest.approx(float(delta.norm() / layer.base_layer.down_proj.norm()), rel=1e-5)


def test_bad_targets_are_one_line_errors():
    model = tiny_qwen3_moe()
    with pytest.raises(UserError, match=r"'mlp.experts.gate_proj' matches no parameter.*gate_up_proj"):
        inject_adapter(model, LoraConfig(target_parameters=["mlp.experts.gate_proj"]))
    with pytest.raises(UserError, match="q_proj.weight .* is not a 3-D expert weight"):
        inject_adapter(model, LoraConfig(target_parameters=["q_proj.weight"]))
    with pytest.raises(UserError, match="dropout = 0.1 with lora.target_parameters"):
        LoraConfig(dropout=0.1, target_parameters=EXPERT_WEIGHTS)
    with pytest.raises(UserError, match="init = 'pissa' with lora.target_parameters"):
        LoraConfig(init="pissa", target_parameters=EXPERT_WEIGHTS)
    # the errors come before any change to the model
    assert all(p.requires_grad for p in model.parameters()) and not list(lora_layers(model))


def test_train_experts_through_the_cli(tmp_path, capsys):
    folder = save_model_folder(tmp_path / "model", tiny_qwen3_moe())

    def summary_line(mode, out):
        text = capsys.readouterr().out
        assert "on 2 expert modules;" in text and "not adapted" not in text
        if mode == "false":  # the dry run words what it adapts as the run does
            assert main(["train", str(tmp_path / "cfg.yaml"), f"output_dir={tmp_path / 'dry'}", "--dry-run"]) == 0
            assert "on 2 expert modules;" in capsys.readouterr().out

    lora = {"targets": [], "target_parameters": EXPERT_WEIGHTS}
    losses = train_in_modes(tmp_path, folder, lora, steps=6, lr=2.0e-2, after=summary_line)
    assert len(losses["false"]) == 6 and losses["false"][-1] < losses["false"][0] - 0.5
    assert losses["full"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["selective"] == pytest.approx(losses["false"], rel=1e-5)
    # QLoRA: the attention and the expert weights are NF4-rounded, so close, not equal
    assert losses["nf4"][0] == pytest.approx(losses["false"][0], abs=0.05) and losses["nf4"][-1] < losses["nf4"][0] - 0.5
    tensors = load_file(tmp_path / "out_false" / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 8 and all(".mlp.experts." in k for k in tensors)
    # all-linear leaves the experts alone, and the start summary says how to adapt them
    assert main(["train", str(tmp_path / "cfg.yaml"), f"output_dir={tmp_path / 'linear'}", "lora.targets=all-linear",
                 "lora.target_parameters=[]", "train.max_steps=1"]) == 0  # fmt: skip
    assert ("the MoE experts are not adapted (their 3-D weights are no linear layers): lora.target_parameters: "
            "[mlp.experts.gate_up_proj, mlp.experts.down_proj] adapts them") in capsys.readouterr().out  # fmt: skip


def test_a_layer_filter_is_written_as_full_parameter_paths(tmp_path):
    # PEFT applies no layer filter to target_parameters, so the file names the adapted weights in full.
    model = tiny_qwen3_moe()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"], layers=[1], target_parameters=["gate_up_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.1.mlp.experts.gate_up_proj"]
    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    # the q_proj by its path: PEFT turned a regex into leaf names on this model (its transformers 5
    # MoE conversion), adding a LoRA (zero, missing from the file) on every block's q_proj
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "a")
    assert peft_model.base_model.targeted_module_names == ["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=0, atol=2e-6)
    assert isinstance(model.model.layers[1].mlp.experts, LoraExperts)
    assert not isinstance(model.model.layers[0].mlp.experts, LoraExperts)


def test_a_peft_adapter_whose_layer_filter_peft_does_not_apply_to_its_experts_is_refused_with_the_fix(tmp_path):
    # PEFT applies layers_to_transform to target_modules only: its file holds every block's experts,
    # which lorakit (filtering target_parameters by block too) cannot load as PEFT does. The message
    # said the adapter might be for another base model; the fix it now gives loads in both
    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(tiny_qwen3_moe().float(), PeftLoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1], target_parameters=EXPERT_WEIGHTS,
        init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        expected = peft_model(ids).logits
    files = tmp_path / "a" / "adapter_config.json"
    message = (
        f"{tmp_path / 'a'}: adapter_model.safetensors holds LoRA weights for the expert weights of "
        f"model.layers.0.mlp.experts (target_parameters {json.loads(files.read_text())['target_parameters']!r}), a block "
        "that layers_to_transform / exclude_modules leave out: PEFT applies those two to target_modules only and adapts "
        "the expert weights of every block, lorakit to target_parameters too, so lorakit cannot load this adapter as PEFT "
        "does; in adapter_config.json, list target_modules by their full module paths and remove layers_to_transform "
        "and exclude_modules"
    )
    with pytest.raises(UserError) as err:
        load_adapter(tiny_qwen3_moe().float(), tmp_path / "a")
    assert str(err.value) == message
    folder = save_model_folder(tmp_path / "base", tiny_qwen3_moe())
    with pytest.raises(UserError) as err:
        merge_adapter_files(folder, tmp_path / "a", tmp_path / "merged")
    assert str(err.value) == message
    # the fix: the same modules by their paths, no layer filter
    config = json.loads(files.read_text())
    files.write_text(json.dumps({**config, "target_modules": ["model.layers.1.self_attn.q_proj"], "layers_to_transform": None}))
    model = tiny_qwen3_moe().float()
    load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=2e-6)
        again = PeftModel.from_pretrained(tiny_qwen3_moe().float(), tmp_path / "a")
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=2e-6)


def test_experts_without_a_gate():
    # has_gate=False (Nemotron-H style): up_proj then the activation, no gate_up_proj
    from types import SimpleNamespace

    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class UpDownExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 3
            self.up_proj = torch.nn.Parameter(torch.randn(3, 8, 6))  # (E, I, H)
            self.down_proj = torch.nn.Parameter(torch.randn(3, 6, 8))  # (E, H, I)
            self.act_fn = torch.nn.functional.relu

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for slot, e in enumerate(top_k_index[t].tolist()):
                    h = self.act_fn(hidden_states[t] @ self.up_proj[e].t())
                    out[t] += top_k_weights[t, slot] * (h @ self.down_proj[e].t())
            return out

    torch.manual_seed(0)
    experts = UpDownExperts(SimpleNamespace(_experts_implementation="eager"))
    holder = torch.nn.Module()
    holder.experts = experts
    inject_adapter(holder, LoraConfig(r=2, alpha=2, targets=[], target_parameters=["up_proj", "down_proj"]))
    randomize(holder)
    layer = holder.experts
    x = torch.randn(5, 6)
    index = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0], [1, 2]])
    weights = torch.rand(5, 2)
    got = layer(x, index, weights)
    merged = {p: getattr(experts, p) + layer.delta_weight("default", p) for p in ("up_proj", "down_proj")}
    expected = torch.func.functional_call(experts, merged, (x, index, weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - experts(x, index, weights)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_nf4_experts_compute_with_their_dequantized_weights(arch):
    # QLoRA on a MoE: every expert's (out, in) matrix is NF4 on its own (lorakit.quant.Experts4bit);
    # forward and the adapters' gradients equal the 16-bit model run on the dequantized weights.
    from lorakit.quant import Experts4bit, dequantize_weight, is_4bit, quantize_model

    model, twin = MODELS[arch]().float(), MODELS[arch]().float()
    report = quantize_model(model, compute_dtype=torch.float32)
    assert report.layers == 2 * (4 + 4 * 2) and report.expert_matrices == 2 * 4 * 2  # q, k, v, o; 4 experts x 2 weights
    assert "nf4: 24 linear layers (16 of them expert matrices)" in report.summary()
    overrides = {}
    for path, module in model.named_modules():
        if isinstance(module, Experts4bit):
            for param, layers in module.experts4.items():
                dense = torch.stack([dequantize_weight(layer) for layer in layers])  # (E, out, in)
                overrides[f"{path}.{param}"] = dense.transpose(1, 2) if module.is_transposed else dense
        elif is_4bit(module) and ".experts4." not in path:
            overrides[f"{path}.weight"] = dequantize_weight(module)
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=[], target_parameters=EXPERT_WEIGHTS))
    randomize(model)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    factors = [p for _, layer in lora_layers(model) for ab in (layer.lora_A, layer.lora_B) for p in ab["default"].values()]
    loss = model(ids, labels=ids).loss
    ours = torch.autograd.grad(loss, factors)
    for path, layer in lora_layers(model):
        for param in layer.lora_A["default"]:
            a, b = layer.factors("default", param)
            delta = layer.scaling["default"][param] * torch.bmm(b, a)
            overrides[f"{path}.{param}"] = overrides[f"{path}.{param}"] + (delta.transpose(1, 2) if layer.is_transposed else delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.func.functional_call(twin, overrides, (ids,), {"labels": ids}).loss
    assert abs(loss.item() - ref.item()) < 1e-5
    for got, expected in zip(ours, torch.autograd.grad(ref, factors)):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="cannot merge an adapter into the 4-bit experts"):
        merge_adapter(model)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_all_linear_never_reaches_into_4bit_experts(arch):
    # QLoRA holds each expert's matrix as a 4-bit linear layer: all-linear must select what it
    # selects on the 16-bit model (attention), not those (their adapters would fit no other model)
    from lorakit.inject import find_targets
    from lorakit.quant import quantize_model

    plain, quantized = MODELS[arch]().float(), MODELS[arch]().float()
    quantize_model(quantized, compute_dtype=torch.float32)
    chosen = find_targets(quantized, LoraConfig(targets="all-linear"))
    assert chosen == find_targets(plain, LoraConfig(targets="all-linear")) and not any("experts" in p for p in chosen)


def test_simulate_nf4_merge_reproduces_the_4bit_model(tmp_path):
    # --simulate-nf4 rounds each expert's matrix as QLoRA training held it: put together from the
    # keys the base stores it under (gate_proj and up_proj rows of one gate_up_proj), rounded, cut again.
    from transformers import AutoModelForCausalLM

    from lorakit.quant import load_model_4bit

    folder = save_model_folder(tmp_path / "base", tiny_qwen3_moe())
    model, _ = load_model_4bit(folder, compute_dtype=torch.float32)
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], target_parameters=["experts.down_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    report = merge_adapter_files(folder, tmp_path / "adapter", tmp_path / "merged", simulate_nf4=True)
    assert report.nf4_rounded == 2 * (4 + 4 * 3)  # q, k, v, o and each expert's gate, up, down, per layer
    plain = merge_adapter_files(folder, tmp_path / "adapter", tmp_path / "plain")
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(ids).logits
        simulated = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        unrounded = AutoModelForCausalLM.from_pretrained(plain.out_dir).eval()(ids).logits
    torch.testing.assert_close(simulated, trained, rtol=0, atol=2e-5)
    assert (unrounded - trained).abs().max() > 1e-3  # the rounding is what makes the difference


def test_routers_built_on_nn_linear_are_left_alone():
    # Phi-MoE's router subclasses nn.Linear but returns a routing tuple: LoRA (all-linear) and NF4
    # leave it as it is, where wrapping or replacing it broke the model's forward.
    from lorakit.quant import quantize_model

    def make():
        return tiny_causal_lm("Phimoe", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              intermediate_size=64, router_jitter_noise=0.0, input_jitter_noise=0.0).float()  # fmt: skip

    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    model = make()
    with torch.no_grad():
        expected = model(ids).logits
    paths = inject_adapter(model, LoraConfig(r=2, alpha=4))
    assert not any(p.endswith(".router") for p in paths) and len(paths) == 2 * 4  # q, k, v, o
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)  # B = 0: unchanged
    quantized = make()
    report = quantize_model(quantized, compute_dtype=torch.float32)
    assert type(quantized.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    assert report.layers == 2 * (4 + 4 * 2)
    with torch.no_grad():
        assert quantized(ids).logits.isfinite().all()
