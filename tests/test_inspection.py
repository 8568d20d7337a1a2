"""inspect: numbers of a hand-built adapter, PEFT adapters, and the header-only base check."""

import json
import math

import pytest
import torch
from helpers import make_tokenizer, save_model_folder, tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from lorakit import LoraConfig, inject_adapter, save_adapter
from lorakit.adapters import write_adapter_folder
from lorakit.cli import main
from lorakit.inspection import inspect_adapter, update_spectrum

P = "base_model.model.model.layers.0.self_attn."


def _hand_built(folder):
    """q_proj: s·B@A = 2·(3 e0 e0^T + 4·2 e1 e1^T) -> singular values 16, 6.
    v_proj (out 32): both columns of B parallel -> rank 1, s = 6/2 = 3 (alpha_pattern)."""
    a = torch.zeros(2, 64)
    a[0, 0], a[1, 1] = 1.0, 2.0
    b = torch.zeros(64, 2)
    b[0, 0], b[1, 1] = 3.0, 4.0
    va = torch.zeros(2, 64)
    va[0, 5], va[1, 6] = 1.0, 1.0
    vb = torch.zeros(32, 2)
    vb[3, 0], vb[3, 1] = 1.0, 2.0  # B @ A = e3 (e5 + 2 e6)^T: rank 1, norm sqrt(5)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": r"model\.layers\.0\.self_attn\.(q_proj|v_proj)",
              "alpha_pattern": {"v_proj": 6}}  # fmt: skip
    tensors = {P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b,
               P + "v_proj.lora_A.weight": va, P + "v_proj.lora_B.weight": vb}  # fmt: skip
    return write_adapter_folder(folder, config, tensors)


def test_hand_built_numbers(tmp_path):
    base_model = tiny_llama()
    base = save_model_folder(tmp_path / "base", base_model, make_tokenizer())
    info = inspect_adapter(_hand_built(tmp_path / "adapter"), base)
    q, v = info["modules"]
    assert q["module"] == "model.layers.0.self_attn.q_proj" and (q["r"], q["alpha"], q["scaling"]) == (2, 4.0, 2.0)
    assert q["norm"] == pytest.approx(math.sqrt(16**2 + 6**2), rel=1e-12) and q["rank_1pct"] == 2
    p = torch.tensor([16 / 22, 6 / 22], dtype=torch.float64)
    assert q["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)
    assert (v["alpha"], v["scaling"], v["shape"]) == (6.0, 3.0, [32, 64])
    assert v["norm"] == pytest.approx(3 * math.sqrt(5), rel=1e-12) and v["rank_1pct"] == 1
    assert v["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert (info["params"], info["lora_params"], info["lora_modules"]) == (2 * 128 + 128 + 64, 448, 2)
    assert info["file_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    # relative size against the stored base weight; 2 layers x 7 linears + lm_head, minus the two targets
    w = base_model.model.layers[0].self_attn.q_proj.weight.double()
    assert q["relative"] == pytest.approx(q["norm"] / float(w.norm()), rel=1e-9)
    assert len(info["base"]["untouched"]) == 13 and "lm_head" in info["base"]["untouched"]
    assert "model.layers.0.self_attn.k_proj" in info["base"]["untouched"]


def test_principal_init_relative_size_is_the_change_merging_makes(tmp_path, capsys):
    # PiSSA: s·B@A holds the base's principal part; against the base, inspect reports what the
    # merge changes, ||residual + s·B@A - W|| / ||W||
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].add_(0.005)
    save_adapter(model, tmp_path / "adapter")
    base = save_model_folder(tmp_path / "base", tiny_llama(), make_tokenizer())
    info = inspect_adapter(tmp_path / "adapter", base)
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().double()
    merged = layer.weight.detach().double() + layer.scaling["default"] * (
        layer.lora_B["default"].detach().double() @ layer.lora_A["default"].detach().double())  # fmt: skip
    q0 = info["modules"][0]
    assert q0["module"] == "model.layers.0.self_attn.q_proj" and info["init"] == "pissa"
    assert q0["relative"] == pytest.approx(float((merged - w).norm() / w.norm()), rel=1e-4)
    assert q0["relative"] < 0.5 * q0["norm"] / float(w.norm())  # s·B@A alone is mostly W's principal part
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "init pissa: B@A started as the base weight's principal part" in capsys.readouterr().out


def test_spectrum_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 80, generator=gen), torch.randn(50, 6, generator=gen)
    dense = torch.linalg.svdvals(0.7 * (b.double() @ a.double()))[:6]
    torch.testing.assert_close(update_spectrum(a, b, 0.7), dense, rtol=1e-10, atol=1e-10)


def test_peft_adapter_and_cli(tmp_path, capsys):
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                             rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"]))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in peft_model.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    base = save_model_folder(tmp_path / "base", tiny_llama(), make_tokenizer())
    info = inspect_adapter(tmp_path / "peft", base)
    assert info["lora_modules"] == 4 and [m["r"] for m in info["modules"]] == [2, 4, 2, 4]  # sorted by path: mlp before self_attn
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    dense = layer.scaling["default"] * (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
    down1 = next(m for m in info["modules"] if m["module"] == "model.layers.1.mlp.down_proj")
    assert down1["scaling"] == 4.0 and down1["norm"] == pytest.approx(float(dense.norm()), rel=1e-9)
    assert [s["tensor"] for s in info["modules_to_save"]] == ["lm_head.weight"]
    assert main(["inspect", str(tmp_path / "peft"), "--base", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"][0]["norm"] == pytest.approx(info["modules"][0]["norm"])
    assert main(["inspect", str(tmp_path / "peft"), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    # 2 layers x 7 linears + lm_head, minus the 4 targets and lm_head, which the adapter replaces
    assert "model.layers.1.mlp.down_proj" in out and "linear modules left untouched: 10" in out and "||ΔW||/||W||" in out
    assert "lm_head" not in info["base"]["untouched"]


def test_mismatch_and_bad_folders(tmp_path, capsys):
    adapter = _hand_built(tmp_path / "adapter")
    wide = save_model_folder(tmp_path / "wide", tiny_llama(hidden_size=96), make_tokenizer())
    assert main(["inspect", str(adapter), "--base", str(wide)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.layers.0.self_attn.q_proj" in err[0] and "(96, 96)" in err[0] and "(2, 64)" in err[0]
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_malformed_adapters_exit_2(tmp_path, capsys):
    from safetensors.torch import save_file

    good = _hand_built(tmp_path / "good")
    config = json.loads((good / "adapter_config.json").read_text())
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)

    def case(name, *, raw=None, tensors=None):
        folder = write_adapter_folder(tmp_path / name, config, {P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b})
        if raw is not None:
            (folder / "adapter_config.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
        if tensors is not None:
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    no_r = {k: v for k, v in config.items() if k != "r"}
    cases = [
        (case("list", raw="[1, 2]"), "adapter_config.json: expected a JSON object, got list"),
        (case("json", raw='{"r": 2,'), "adapter_config.json: invalid JSON: Expecting property name"),
        (case("no_r", raw=no_r), "adapter_config.json: r is missing; set it to the adapter's rank"),
        (case("rank1", tensors={P + "q_proj.lora_A.weight": a[0].clone(), P + "q_proj.lora_B.weight": b}),
         f"{P[len('base_model.model.'):]}q_proj: adapter A (64,), B (64, 2) are not a LoRA module of rank 2"),
        (case("rank3", tensors={P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b[None]}),
         "q_proj: adapter A (2, 64), B (1, 64, 2) are not a LoRA module of rank 2"),
        (case("other_r", tensors={P + "q_proj.lora_A.weight": torch.zeros(3, 64), P + "q_proj.lora_B.weight": b}),
         "q_proj: adapter A (3, 64), B (64, 2) are not a LoRA module of rank 2"),
        (case("stray", tensors={P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b, P + "q_proj.scales": a.clone()}),
         f"adapter tensor {P}q_proj.scales is no LoRA matrix"),
        (case("unprefixed", tensors={P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b, "scales": a.clone()}),
         "adapter tensor scales does not start with 'base_model.model.'"),
        (case("inf", tensors={P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": torch.full((64, 2), float("inf"))}),
         f"module {P[len('base_model.model.'):]}q_proj holds inf/NaN values in its LoRA matrices; the adapter is broken"),
        (case("unselected", tensors={P + "q_proj.lora_A.weight": a, P + "q_proj.lora_B.weight": b,
                                     P + "k_proj.lora_A.weight": a.clone(), P + "k_proj.lora_B.weight": b.clone()}),
         f"holds LoRA weights for {P[len('base_model.model.'):]}k_proj"),
    ]
    (case("no_file") / "adapter_model.safetensors").unlink()
    cases.append((tmp_path / "no_file", ": no adapter_model.safetensors, the adapter's weights"))
    for folder, message in cases:
        assert main(["inspect", str(folder)]) == 2, message
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and err[0].startswith(f"error: {folder}") and message in err[0], (message, err)


def test_what_narrows_the_targets_is_reported(tmp_path, capsys):
    # exclude_modules, layers_to_transform and layers_pattern decide which modules an adapter holds;
    # inspect showed the targets alone
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[1],
        layers_pattern="layers"))  # fmt: skip
    peft_model.save_pretrained(str(tmp_path / "peft"))
    info = inspect_adapter(tmp_path / "peft")
    assert (info["exclude"], info["layers"], info["layers_pattern"]) == (["v_proj"], [1], "layers")
    assert [m["module"] for m in info["modules"]] == ["model.layers.1.self_attn.q_proj"]
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    # (PEFT writes target_modules from a set: in either order)
    assert sorted(info["targets"]) == ["q_proj", "v_proj"]
    assert f"targets   {info['targets']}, exclude ['v_proj'], layers [1] of layers\n" in capsys.readouterr().out


def test_peft_modules_to_save_entries_match_as_peft_matches_them(tmp_path, capsys):
    # PEFT saves every module whose name ends with an entry: "norm" is model.norm and each *_layernorm
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    info = inspect_adapter(tmp_path / "peft")
    saved = sorted(s["tensor"] for s in info["modules_to_save"])
    assert "model.norm.modules_to_save.default.weight" in saved or "model.norm.weight" in saved
    assert any("input_layernorm" in name for name in saved) and len(saved) == 5  # model.norm + 2 blocks x 2 layernorms
    assert main(["inspect", str(tmp_path / "peft")]) == 0


def test_the_base_weight_peft_saves_beside_an_embedding_lora_is_no_module_to_save(tmp_path, capsys):
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    info = inspect_adapter(tmp_path / "peft")
    assert info["modules_to_save"] == []
    assert [s["tensor"] for s in info["base_weights"]] == ["model.embed_tokens.base_layer.weight"]
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "in modules_to_save" not in out and "25,600 in base weights PEFT saves beside embedding LoRA" in out
    assert "saved in full: model.embed_tokens.base_layer.weight (400, 64)" in out
