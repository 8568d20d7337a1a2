"""lorakit merge: streamed merge -> plain transformers load -> logits equal base+adapter."""

import functools
import json

import pytest
import torch
from helpers import make_tokenizer, save_model_folder, tiny_gpt2, tiny_gpt_neox, tiny_llama
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, inject_adapter, save_adapter
from lorakit.cli import main
from lorakit.merge import merge_adapter_files, nf4_round, parse_size


def _ids():
    return torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def _randomise(model, scale=0.05):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif ".copies." in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _error(capsys) -> str:
    """The one `error: ...` line the CLI printed (library noise on stderr aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _plain(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _lorakit_case(tmp_path, make, lora, shard="200KB"):
    base = save_model_folder(tmp_path / "base", make(), make_tokenizer(), max_shard_size=shard)
    model = make()
    inject_adapter(model, lora)
    _randomise(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(_ids()).logits
    return base, expected


def test_llama_multi_shard_logits_and_bounded_memory(tmp_path):
    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                      alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"])  # fmt: skip
    deep = functools.partial(tiny_llama, num_hidden_layers=6)  # enough shards for the bound to mean something
    base, expected = _lorakit_case(tmp_path, deep, lora)
    in_shards = sorted(base.glob("model-*.safetensors"))
    assert len(in_shards) >= 3
    report = merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out", max_shard_size="150KB")
    out = tmp_path / "out"
    assert report.shards >= 3 and (out / "model.safetensors.index.json").is_file()
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "tokenizer.json"}
    for shard in out.glob("model-*.safetensors"):
        assert shard.stat().st_size <= 150_000 + 10_000  # header slack
    with torch.no_grad():
        got = _plain(out)(_ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # 3 LoRA modules x 6 layers merged, lm_head replaced by the adapter's copy
    assert (report.merged_modules, report.replaced_tensors, report.untied) == (18, 1, False)
    # Bound: the adapter + the largest tensor in fp32 three times over (stored, working copy,
    # update) + one output shard; in particular below "largest input shard + adapter + one output shard".
    model_bytes = sum(p.stat().st_size for p in in_shards)
    largest_shard = max(p.stat().st_size for p in in_shards)
    assert report.peak_held_bytes <= largest_shard + report.adapter_bytes + 150_000
    largest_tensor = 400 * 64 * 4  # embed_tokens / lm_head in fp32
    assert report.peak_held_bytes <= report.adapter_bytes + 150_000 + 3 * largest_tensor
    assert report.peak_held_bytes < 0.4 * model_bytes
    print(f"\npeak held {report.peak_held_bytes} B; model {model_bytes} B in {len(in_shards)} shards "
          f"(largest {largest_shard}); adapter {report.adapter_bytes} B; RSS {report.peak_rss_bytes} B")  # fmt: skip


def test_the_merged_folder_has_its_own_card_with_the_bases_terms(tmp_path):
    import yaml

    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    base, _ = _lorakit_case(tmp_path, tiny_llama, lora, shard=None)
    (base / "README.md").write_text(
        "\ufeff---\nlicense: other\nlicense_name: tiny-license\ntags: [base-tag]\nlanguage: [en]\n---\n"
        "# Tiny base\n\nWhat the base is.\n\n```python\n# a comment, not a heading\n```\n## Use\n"
    )
    (tmp_path / "adapter" / "README.md").write_text("---\n---\n# The adapter\n\nTrained on sums.\n##### Deep\n")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-base"}))
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": "org/tiny-base", "library_name": "transformers", "license": "other",
        "license_name": "tiny-license", "language": ["en"], "tags": ["lorakit", "lora", "merged"],
    }  # fmt: skip
    assert body.startswith("# base with a LoRA adapter merged in\n") and "r=4, alpha=8, targets: q_proj, v_proj" in body
    adapter_at = body.index("## The adapter's card\n\n### The adapter\n\nTrained on sums.\n###### Deep\n")
    base_at = body.index("## The base model's card")
    assert adapter_at < base_at and body[base_at:].endswith(
        "### Tiny base\n\nWhat the base is.\n\n```python\n# a comment, not a heading\n```\n#### Use\n"
    )
    assert card.count("---\n") == 2 and "base-tag" not in card


def test_gpt2_conv1d_and_tied_embedding_are_untied(tmp_path):
    # c_proj is square (64x64): only the model class tells Conv1D from Linear
    lora = LoraConfig(r=4, alpha=8, targets=["c_attn", "c_proj", "wte"], layers=None)
    base, expected = _lorakit_case(tmp_path, tiny_gpt2, lora, shard=None)
    report = merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert report.untied and config["tie_word_embeddings"] is False
    merged = _plain(tmp_path / "out")
    assert merged.lm_head.weight.data_ptr() != merged.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(merged.lm_head.weight, tiny_gpt2().transformer.wte.weight)  # head keeps the base
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_merge_into_the_residual(tmp_path, init):
    # PiSSA / OLoRA adapters were trained against W minus its principal part: the merge takes that
    # part out again (recomputed from W, as loading does), so the merged model is the adapted one
    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"], init=init)
    base, expected = _lorakit_case(tmp_path, tiny_llama, lora, shard=None)
    merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    with torch.no_grad():
        got = _plain(tmp_path / "out")(_ids()).logits
        peft_model = PeftModel.from_pretrained(_plain(base), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(peft_model(_ids()).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_keys_transformers_renames_on_load(tmp_path):
    # GPT-NeoX stores its head as embed_out.weight, which the model holds as lm_head.weight: the
    # adapter's copy of lm_head replaces the stored tensor, under its stored name.
    lora = LoraConfig(r=4, alpha=8, targets=["query_key_value", "dense_4h_to_h"], modules_to_save=["lm_head"])
    base, expected = _lorakit_case(tmp_path, tiny_gpt_neox, lora, shard=None)
    report = merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    assert (report.merged_modules, report.replaced_tensors) == (4, 1)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()
    with torch.no_grad():
        torch.testing.assert_close(_plain(tmp_path / "out")(_ids()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_written_adapter(make, tmp_path):
    targets = ["q_proj", "v_proj", "embed_tokens"] if make is tiny_llama else ["c_attn", "c_fc"]
    peft_model = get_peft_model(make(), PeftLoraConfig(
        r=8, lora_alpha=12, target_modules=targets, use_rslora=True, rank_pattern={targets[1]: 4},
        modules_to_save=["lm_head"] if make is tiny_llama else None))  # fmt: skip
    _randomise(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    base = save_model_folder(tmp_path / "base", make(), make_tokenizer(), max_shard_size="300KB")
    merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(_plain(tmp_path / "out")(_ids()).logits, expected, atol=1e-5, rtol=0)


def test_dtype_defaults_to_base_and_cli_override(tmp_path, capsys):
    lora = LoraConfig(r=2, alpha=4, targets=["q_proj"])
    model = tiny_llama().to(torch.bfloat16)
    base = save_model_folder(tmp_path / "base", model, make_tokenizer())
    m = tiny_llama()
    inject_adapter(m, lora)
    _randomise(m)
    save_adapter(m, tmp_path / "adapter")
    report = merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    assert report.dtype == torch.bfloat16
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 merge = bf16(fp32(W) + s·B@A)
    layer = m.model.layers[0].self_attn.q_proj
    want = (model.model.layers[0].self_attn.q_proj.weight.float() + layer.delta_weight("default")).bfloat16()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"), want)
    # CLI: a non-empty --out is refused, --force replaces it, --dtype fp32 is honoured
    args = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]
    assert main(args + ["--dtype", "fp32"]) == 2
    err = _error(capsys)
    assert err.startswith("error: --out") and "--force" in err
    assert main(args + ["--dtype", "fp32", "--force"]) == 0
    assert "merged 2 LoRA modules" in capsys.readouterr().out
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_simulate_nf4_matches_qlora_forward(tmp_path):
    from lorakit.adapters import apply_adapter, read_adapter
    from lorakit.quant import quantize_model

    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "o_proj"])
    base, _ = _lorakit_case(tmp_path, tiny_llama, lora, shard=None)
    report = merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out", simulate_nf4=True)
    assert report.nf4_rounded == 2 * 7  # every linear of both blocks, not only the targeted ones
    qlora = tiny_llama()
    quantize_model(qlora, compute_dtype=torch.float32)
    apply_adapter(qlora, read_adapter(tmp_path / "adapter"))
    merged = _plain(tmp_path / "out")
    w = tiny_llama().model.layers[1].mlp.up_proj.weight  # not targeted, still rounded
    torch.testing.assert_close(merged.model.layers[1].mlp.up_proj.weight, nf4_round(w), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, qlora(_ids()).logits, atol=1e-4, rtol=0)


def test_bad_inputs_exit_2(tmp_path, capsys):
    lora = LoraConfig(r=2, alpha=4, targets=["q_proj"])
    base, _ = _lorakit_case(tmp_path, tiny_llama, lora, shard=None)
    wide = save_model_folder(tmp_path / "wide", tiny_llama(hidden_size=96, num_attention_heads=4), make_tokenizer())

    def run(b, a, out="o"):
        code = main(["merge", "--base", str(b), "--adapter", str(a), "--out", str(tmp_path / out)])
        return code, _error(capsys)

    code, err = run(wide, tmp_path / "adapter")
    assert code == 2 and "model.layers.0.self_attn.q_proj" in err and "(2, 64)" in err and "(96, 96)" in err
    assert run(tmp_path / "nope", tmp_path / "adapter")[0] == 2
    (tmp_path / "notok").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / name).write_bytes((base / name).read_bytes())
    code, err = run(tmp_path / "notok", tmp_path / "adapter")
    assert code == 2 and "tokenizer" in err
    (tmp_path / "noconf").mkdir()
    code, err = run(base, tmp_path / "noconf")
    assert code == 2 and "adapter_config.json" in err
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    code, err = run(base, tmp_path / "pickled")
    assert code == 2 and "pickled" in err
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("10kb") == 10_000


@pytest.mark.parametrize(
    "make, init, rslora", [(tiny_llama, "pissa", False), (tiny_gpt2, "olora", True)], ids=["llama-pissa", "gpt2-olora-rslora"]
)
def test_convert_writes_a_principal_adapter_as_plain_lora(make, init, rslora, tmp_path, capsys):
    # A PiSSA / OLoRA adapter over the unchanged base, as a rank-2r LoRA: the model it makes is the
    # adapted model the principal adapter makes over its residual base (lorakit and PEFT both).
    from lorakit import load_adapter

    base = save_model_folder(tmp_path / "base", make())
    model = make()
    patterned = "q_proj" if make is tiny_llama else "c_proj"  # a module of the model's own (GPT-2 has no q_proj)
    inject_adapter(model, LoraConfig(r=4, alpha=8, init=init, rslora=rslora, rank_pattern={patterned: 2}))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # "trained" away from the init
    save_adapter(model, tmp_path / "adapter")
    args = ["convert", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora")]
    assert main(args) == 0
    assert "plain LoRA adapter of rank 8" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and config["rank_pattern"] == {patterned: 4}
    assert config["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = make()
    load_adapter(plain, tmp_path / "lora")
    theirs = PeftModel.from_pretrained(make(), tmp_path / "lora").eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=2e-5)
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=0, atol=2e-5)
        assert (make()(ids).logits - expected).abs().max() > 1e-3  # the adapter does change the model
    assert main(args) == 2  # a non-empty --out without --force
    plain_lora = tmp_path / "lora"
    assert main(["convert", "--base", str(base), "--adapter", str(plain_lora), "--out", str(tmp_path / "again")]) == 2
    assert "only PiSSA and OLoRA adapters need converting" in capsys.readouterr().err


def test_an_update_to_an_integer_weight_is_refused(tmp_path, capsys):
    # a checkpoint whose weight is stored as integers: the update would be rounded into it
    from safetensors.torch import load_file, save_file

    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=4, targets=["q_proj"]), shard="10GB")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(str(base / "model.safetensors"))
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {key} is stored as torch.int8, not as floating-point numbers" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_changes_no_weight_of_the_base_is_refused(tmp_path, capsys):
    from lorakit.adapters import write_adapter_folder

    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=2, targets=["q_proj"]), shard=None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    empty = write_adapter_folder(tmp_path / "empty", config, {})  # no tensors: it used to merge into an unchanged copy
    for extra in ([], ["--simulate-nf4"]):
        assert main(["merge", "--base", str(base), "--adapter", str(empty), "--out", str(tmp_path / "out"), *extra]) == 2
        assert _error(capsys) == (f"error: {empty}: the adapter changes no weight of {base} (adapter_model.safetensors holds 0 "
                                  "tensors), so merging it would add nothing to the base; check that this is the trained "
                                  "adapter's folder")  # fmt: skip
    gpt2 = tiny_gpt2()  # trained on other module names: refused by the first of them
    inject_adapter(gpt2, LoraConfig(r=2, targets=["c_attn"]))
    save_adapter(gpt2, tmp_path / "gpt2")
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")]) == 2
    assert "adapter module transformer.h.0.attn.c_attn has no weight transformer.h.0.attn.c_attn.weight" in _error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, selection", [
    ({"target_modules": ["q_proj"]}, "target_modules ['q_proj']"),
    ({"exclude_modules": ["v_proj"]}, "target_modules ['q_proj', 'v_proj'], exclude_modules ['v_proj']"),
    ({"layers_to_transform": [1]}, "target_modules ['q_proj', 'v_proj'], layers_to_transform [1]"),
])  # fmt: skip
def test_weights_that_the_adapters_own_config_does_not_select_are_refused(tmp_path, capsys, edit, selection):
    # PEFT would load such an adapter without them, lorakit used to merge them: the two disagreed
    from lorakit.adapters import load_adapter
    from lorakit.errors import UserError

    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=2, targets=["q_proj", "v_proj"]), shard=None)
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    module = "model.layers.0.self_attn.v_proj" if "layers_to_transform" not in edit else "model.layers.0.self_attn.q_proj"
    message = (f"{adapter}: adapter_model.safetensors holds LoRA weights for {module}, which adapter_config.json does not "
               f"select ({selection}); PEFT would load the adapter without them. Add the module to target_modules, or "
               "remove its tensors")  # fmt: skip
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError) as raised:
        load_adapter(tiny_llama(), adapter)
    assert str(raised.value) == message


def test_a_target_naming_a_whole_path_is_selected_outside_layers_to_transform(tmp_path):
    # PEFT's layers_to_transform filters only the names a path ends with: a target that names the
    # module's whole path is selected in any layer, so its weights merge and load, not refused
    from lorakit.adapters import load_adapter
    from lorakit.inject import lora_layers

    targets = ["model.layers.0.self_attn.q_proj", "v_proj"]
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=targets, layers_to_transform=[1]))
    _randomise(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    base = save_model_folder(tmp_path / "base", tiny_llama(), make_tokenizer())
    merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(_plain(tmp_path / "out")(_ids()).logits, expected, atol=1e-5, rtol=0)
    model = tiny_llama()
    load_adapter(model, tmp_path / "adapter")
    assert [p for p, _ in lora_layers(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_a_stopped_merge_leaves_no_staging_and_a_killed_ones_is_swept(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import subprocess

    import lorakit.merge

    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    out = tmp_path / "merged"
    real = lorakit.merge._write_config

    def terminated(*args, **kwargs):  # a scheduler's SIGTERM after the weights are written
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lorakit.merge, "_write_config", terminated)
    with pytest.raises(SystemExit) as stop:
        main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)])
    assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no half-written folder, hidden or not
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(lorakit.merge, "_write_config", real)
    # a SIGKILL leaves its staging behind, named by its process: the next merge to the same place removes it
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = tmp_path / f".merged.tmp-{gone.pid}-x", tmp_path / f".merged.tmp-{os.getppid()}-y"
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert not dead.exists() and alive.exists() and (out / "config.json").is_file()


def test_a_merged_model_stops_where_the_fine_tuned_model_learned_to_stop(tmp_path):
    from transformers import GenerationConfig

    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    tok = make_tokenizer()  # its template ends a turn with <|eot_id|>, also its EOS; the model's config says 2
    end = tok.convert_tokens_to_ids("<|eot_id|>")
    assert GenerationConfig.from_pretrained(base).eos_token_id == 2 != end
    merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, end]
    # a ChatML tokenizer's end of turn and EOS are one token: listed once
    chatml = save_model_folder(tmp_path / "chatml", tiny_llama(), make_tokenizer("chatml"))
    merge_adapter_files(chatml, tmp_path / "adapter", tmp_path / "out2")
    im_end = make_tokenizer("chatml").convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(tmp_path / "out2").eos_token_id == [2, im_end]
    # an ordinary token a template writes after every reply is no stop; a base without a generation
    # config gets one with its config.json's ids (a multimodal config's text_config's)
    plain_end = tmp_path / "plain-end"
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '.' }}{% endfor %}"
    save_model_folder(plain_end, tiny_llama(), tok)
    (plain_end / "generation_config.json").unlink()
    config = json.loads((plain_end / "config.json").read_text())
    ids = {k: config.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (plain_end / "config.json").write_text(json.dumps({**config, "text_config": ids}))
    from lorakit.merge import _stop_where_trained

    _stop_where_trained(plain_end)
    written = json.loads((plain_end / "generation_config.json").read_text())
    assert written == {**{k: v for k, v in ids.items() if v is not None}, "eos_token_id": [ids["eos_token_id"], end]}


def test_files_linked_from_outside_the_folders_are_not_published_with_the_merge(tmp_path, capsys):
    base, _ = _lorakit_case(tmp_path, tiny_llama, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    # links as downloads and shared stores make them are copied: into the Hugging Face cache's blobs,
    # and to the file of that name in another model folder
    blobs = tmp_path / "hub" / "models--acme--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "0f3a").write_bytes((base / "tokenizer.json").read_bytes())
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(blobs / "0f3a")
    store = save_model_folder(tmp_path / "store", tiny_llama())
    (store / "vocab_notes.txt").write_text("kept")
    (base / "vocab_notes.txt").symlink_to(store / "vocab_notes.txt")
    (base / "README.md").symlink_to(secret)  # a card linked out is left out of the merged card
    merge_adapter_files(base, tmp_path / "adapter", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "vocab_notes.txt").read_text() == "kept" and not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (blobs / "0f3a").read_bytes()
    assert "PRIVATE KEY" not in (out / "README.md").read_text()
    # any other link out is refused before the weights are written: a secret beside some tool's
    # config.json (no model there) too
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "config.json").write_text('{"theme": "dark"}')
    (tool / "auth.json").write_text("TOKEN")
    (base / "auth.json").symlink_to(tool / "auth.json")
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out1")]) == 2
    assert "auth.json is a link to" in _error(capsys)
    (base / "auth.json").unlink()
    (base / "notes.txt").symlink_to(secret)
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out1")]) == 2
    assert _error(capsys) == (
        f"error: {base / 'notes.txt'} is a link to {secret}, outside the model's folder and no file of another model "
        "folder: lorakit does not copy it into the merged model; copy the file into the folder (cp --remove-destination) "
        "or remove the link"
    )
    assert not (tmp_path / "out1").exists()
    (base / "notes.txt").unlink()
    # an adapter's chat template is read from its folder only, by every command
    (tmp_path / "adapter" / "chat_template.jinja").symlink_to(secret)
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out2")]) == 2
    assert _error(capsys) == (
        f"error: {tmp_path / 'adapter' / 'chat_template.jinja'} is a link to {secret}, outside the adapter's folder; "
        "lorakit reads an adapter's files from its folder only: copy the template there"
    )
    (tmp_path / "adapter" / "chat_template.jinja").unlink()
    # a safetensors index naming a shard outside the folder is refused before anything reads it
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere/private.safetensors"}}
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    for path in base.iterdir():
        if path.is_file() and not path.is_symlink():
            (indexed / path.name).write_bytes(path.read_bytes())
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["merge", "--base", str(indexed), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out3")]) == 2
    assert _error(capsys) == (
        f"error: {indexed / 'model.safetensors.index.json'}: lists the shard '../elsewhere/private.safetensors', which "
        "is not a file name of the folder; a model folder keeps its shards beside the index: fix or re-save the index"
    )
