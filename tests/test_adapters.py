"""PEFT file format: round trips with Hugging Face PEFT in both directions, and bad files."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, save_model_folder, tiny_gpt2, tiny_llama, tiny_llava
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lorakit import LoraConfig, UserError, inject_adapter, load_adapter, save_adapter
from lorakit.inject import lora_layers


def _ids():
    return torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomise(named_params):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name or "lora_embedding_B" in name or "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_lorakit_adapter_loads_in_peft(make, tmp_path):
    model = make()
    inject_adapter(model, LoraConfig(r=4, alpha=16, rslora=True, rank_pattern={"mlp.*": 2}, layers=[1],
                                     modules_to_save=["lm_head"] if make is tiny_llama else []))  # fmt: skip
    _randomise(model.named_parameters())
    expected = model(_ids()).logits
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 16 and config["use_rslora"] is True
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    peft_model = PeftModel.from_pretrained(make(), str(tmp_path / "adapter"))
    assert peft_model.base_model.targeted_module_names == [p for p, _ in lora_layers(model)]
    torch.testing.assert_close(peft_model(_ids()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit, key", [
    ({"target_modules": ".*\\.self_attn\\.q_proj", "layers_to_transform": [1]}, "layers_to_transform = [1]"),
    ({"target_modules": "all-linear", "layers_to_transform": []}, "layers_to_transform = []"),
    ({"target_modules": ".*\\.self_attn\\.q_proj", "layers_pattern": ""}, "layers_pattern = ''"),
])  # fmt: skip
def test_a_string_target_modules_with_layers_is_refused_as_in_peft(edit, key, tmp_path):
    # PEFT's LoraConfig refuses these, so PEFT loads no such adapter; lorakit loaded it, filtering
    # the regex's matches by a block index of its own
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))
    with pytest.raises(UserError) as err:
        load_adapter(tiny_llama(), adapter)
    name = key.split(" = ")[0]
    # all-linear is no regex to write block indices into
    regex = "" if edit["target_modules"] == "all-linear" else f", or write the block indices into its regex and remove {name}"
    assert str(err.value) == (
        f"{adapter / 'adapter_config.json'}: {key} with target_modules = {edit['target_modules']!r}, a string: PEFT refuses "
        f"the two together and loads no such adapter; list the module names in target_modules{regex}"
    )


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_adapter_loads_in_lorakit(make, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"] if make is tiny_llama else ["c_attn", "c_fc", "wte"]
    peft_config = PeftLoraConfig(
        r=8, lora_alpha=12, lora_dropout=0.1, target_modules=targets, use_rslora=True,
        rank_pattern={targets[1]: 4}, alpha_pattern={targets[0]: 3},
        modules_to_save=["lm_head"] if make is tiny_llama else None,
    )  # fmt: skip
    peft_model = get_peft_model(make(), peft_config)
    _randomise(peft_model.named_parameters())
    if make is tiny_llama:
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    peft_model.eval()
    expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = make()
    config = load_adapter(model, tmp_path / "peft")
    assert config.rank_pattern == {targets[1]: 4} and config.dropout == 0.1
    model.eval()
    torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)


def test_peft_modules_to_save_entries_match_as_peft_matches_them(tmp_path):
    # PEFT takes every module whose name ends with an entry as plain text: "norm" is the final norm and
    # every input_layernorm and post_attention_layernorm; lorakit's own config ends a name at a dot
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                             modules_to_save=["norm"]))  # fmt: skip
    _randomise(peft_model.named_parameters())
    peft_model.eval()
    expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = tiny_llama()
    config = load_adapter(model, tmp_path / "peft")
    assert config.modules_to_save == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                      "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                      "model.norm"]  # fmt: skip
    model.eval()
    torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)
    # lorakit's own file with the same entry saved the final norm alone, and reads back so
    inject_adapter(own := tiny_llama(), LoraConfig(r=4, alpha=8, targets=["o_proj"], modules_to_save=["norm"]))
    _randomise(own.named_parameters())
    save_adapter(own, tmp_path / "own")
    assert load_adapter(tiny_llama(), tmp_path / "own").modules_to_save == ["model.norm"]


def test_peft_ensure_weight_tying_loads_the_tied_heads_copy_or_is_refused(tmp_path):
    # a tied embedding saved in full: PEFT saves the output head's copy too, and uses it
    tied = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    peft_model = get_peft_model(tied(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                       modules_to_save=["embed_tokens"], ensure_weight_tying=True))  # fmt: skip
    _randomise(peft_model.named_parameters())
    peft_model.eval()
    expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "saved"))
    model = tied()
    assert load_adapter(model, tmp_path / "saved").modules_to_save == ["model.embed_tokens", "lm_head"]
    model.eval()
    torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)
    # LoRA on the tied embedding: PEFT ties a LoRA of lm_head to it, which lorakit does not build
    peft_model = get_peft_model(tied(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                       ensure_weight_tying=True))  # fmt: skip
    peft_model.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(UserError) as err:
        load_adapter(tied(), tmp_path / "lora")
    assert str(err.value) == (
        f"{tmp_path / 'lora' / 'adapter_config.json'}: ensure_weight_tying: true with LoRA on the embedding "
        "model.embed_tokens, tied to the output head, which PEFT then ties to a LoRA of the head (lm_head) that lorakit "
        "does not build; save the adapter with ensure_weight_tying: false (PEFT's default), or merge it with PEFT"
    )
    # where PEFT ties nothing (an untied model; GPT-2's wte, a name PEFT does not know), lorakit loads the adapter as PEFT does
    for make, target in ((tiny_llama, "embed_tokens"), (lambda: tiny_gpt2(), "wte")):
        peft_model = get_peft_model(make(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=[target], ensure_weight_tying=True))
        _randomise(peft_model.named_parameters())
        peft_model.eval()
        expected = peft_model(_ids()).logits
        peft_model.save_pretrained(str(tmp_path / target))
        model = make()
        load_adapter(model, tmp_path / target)
        torch.testing.assert_close(model.eval()(_ids()).logits, expected, atol=1e-5, rtol=0)
    # merge reads the tying from the base folder: refused over the tied base, merged over the untied one
    from lorakit.merge import merge_adapter_files

    save_model_folder(tmp_path / "tied-base", tied(), make_tokenizer())
    with pytest.raises(UserError, match="ensure_weight_tying: true with LoRA on the embedding model.embed_tokens, tied"):
        merge_adapter_files(tmp_path / "tied-base", tmp_path / "lora", tmp_path / "merged")
    save_model_folder(tmp_path / "untied-base", tiny_llama(), make_tokenizer())
    merge_adapter_files(tmp_path / "untied-base", tmp_path / "embed_tokens", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


def _llava_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the language model's logits on text, the vision tower's last hidden state on an image) of a
    tiny_llava: at its initial scale the image barely moves the logits, so each stack is compared alone."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 399, (2, 10), generator=gen)  # 399 is the image token
    pixels = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        return model(input_ids=ids).logits, model.model.vision_tower(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("layers, pattern, selected", [
    ([1], "language_model.layers", ["model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.v_proj"]),
    ([0], ["h", "encoder.layers"], ["model.vision_tower.encoder.layers.0.self_attn.v_proj",
                                    "model.vision_tower.encoder.layers.0.self_attn.q_proj"]),
    ([], "h", 8),  # PEFT reads an empty list as every block, whatever the pattern
])  # fmt: skip
def test_peft_adapter_with_layers_pattern_loads_in_lorakit(layers, pattern, selected, tmp_path):
    # lorakit ignored layers_pattern (and selected nothing with []): it expected the other stack's
    # blocks too, and refused the adapter for tensors it lacks
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=layers,
                                 layers_pattern=pattern)  # fmt: skip
    peft_model = get_peft_model(tiny_llava(), peft_config)
    _randomise(peft_model.named_parameters())
    expected = _llava_outputs(peft_model.base_model.model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = tiny_llava()
    config = load_adapter(model, tmp_path / "peft")
    assert (config.layers, config.layers_pattern) == ((layers, pattern) if layers else (None, None))
    paths = [p for p, _ in lora_layers(model)]
    assert paths == peft_model.base_model.targeted_module_names
    assert (paths if isinstance(selected, list) else len(paths)) == selected
    got, base = _llava_outputs(model), _llava_outputs(tiny_llava())
    for ours, theirs, plain in zip(got, expected, base):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # the adapted stack moved (by more than the tolerance), the other did not
    moved = [not torch.allclose(ours, plain, atol=1e-4, rtol=0) for ours, plain in zip(got, base)]
    assert moved == [any("language_model" in p for p in paths), any("vision_tower" in p for p in paths)]


def test_lorakit_adapter_with_layers_pattern_loads_in_peft(tmp_path):
    model = tiny_llava()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], layers=[1],
                                     layers_pattern="language_model.layers"))  # fmt: skip
    _randomise(model.named_parameters())
    expected = _llava_outputs(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # the modules trained, by name: PEFT needs no layer filter to select them
    assert config["target_modules"] == ["model.language_model.layers.1.self_attn.q_proj",
                                        "model.language_model.layers.1.self_attn.v_proj"]  # fmt: skip
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None
    peft_model = PeftModel.from_pretrained(tiny_llava(), str(tmp_path / "adapter"))
    assert peft_model.base_model.targeted_module_names == [p for p, _ in lora_layers(model)]
    for ours, theirs in zip(expected, _llava_outputs(peft_model.base_model.model)):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[0], _llava_outputs(tiny_llava())[0], atol=1e-4, rtol=0)


def test_a_layers_pattern_without_layers_to_transform_is_refused_as_in_peft(tmp_path):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "layers_pattern": "layers"}))
    with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also be specified"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))
    with pytest.raises(UserError) as err:
        load_adapter(tiny_llama(), adapter)
    assert str(err.value) == (
        f"{adapter / 'adapter_config.json'}: layers_pattern = 'layers' without layers_to_transform: PEFT refuses it (the "
        "pattern names the block list those indices count in); set layers_to_transform, or remove layers_pattern"
    )


def test_an_adapters_embedding_base_weight_is_carried_on(tmp_path):
    # PEFT saves a targeted embedding's base weight (a resized vocabulary's rows, say); an adapter
    # loaded with it and saved again (training continued it) keeps it, or the model it gives changes
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]))
    _randomise(peft_model.named_parameters())
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.base_layer.weight[:50].mul_(1.5)
    expected = peft_model.eval()(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    model = tiny_llama()
    load_adapter(model, tmp_path / "peft", trainable=True)
    save_adapter(model, tmp_path / "again")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "again")
    torch.testing.assert_close(fresh.eval()(_ids()).logits, expected, atol=1e-5, rtol=0)


def test_lorakit_round_trip_and_atomic_overwrite(tmp_path):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    _randomise(model.named_parameters())
    out = tmp_path / "a"
    save_adapter(model, out)
    save_adapter(model, out)  # replacing an existing adapter leaves no temp folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    other = tiny_llama()
    load_adapter(other, out)
    assert torch.equal(other(_ids()).logits, model(_ids()).logits)
    assert not any(p.requires_grad for p in other.parameters())


def test_replacing_a_folder_leaves_the_old_or_the_new_one_whenever_it_is_killed(tmp_path, monkeypatch):
    from lorakit import adapters

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
        return tmp_path / name

    target = folder("target", "old")
    adapters.replace_dir(folder(".staging", "new"), target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    # killed right after the swap, before the old folder is removed: target is the new folder, whole
    monkeypatch.setattr(adapters.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        adapters.replace_dir(folder(".staging2", "newer"), target)
    assert (target / "f").read_text() == "newer" and (tmp_path / ".staging2" / "f").read_text() == "new"
    monkeypatch.undo()
    # the swap is one call: os.replace (the two-rename fallback, whose window this closes) is not used
    monkeypatch.setattr(adapters.os, "replace", lambda *a: pytest.fail("renamed in two steps"))
    adapters.replace_dir(folder(".staging3", "newest"), target)
    assert (target / "f").read_text() == "newest"
    monkeypatch.undo()
    # where the system cannot swap, the two renames still replace it
    monkeypatch.setattr(adapters, "_exchange_paths", lambda a, b: False)
    adapters.replace_dir(folder(".staging4", "last"), target)
    assert (target / "f").read_text() == "last" and sorted(p.name for p in tmp_path.iterdir()) == [".staging2", "target"]


def test_a_replaced_folder_is_on_disk_before_its_name_points_at_it(tmp_path, monkeypatch):
    from lorakit import adapters
    from lorakit.metrics import write_text_atomic

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(adapters.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    staging = tmp_path / ".staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "f").write_text("new")
    (staging / "sub" / "g").write_text("new")
    inodes = {p: p.stat().st_ino for p in (staging, staging / "f", staging / "sub", staging / "sub" / "g", tmp_path)}
    adapters.replace_dir(staging, tmp_path / "target")
    assert set(inodes.values()) <= set(synced)  # every file and folder of it, and the folder that names it
    assert synced[-1] == inodes[tmp_path]  # that one after the rename
    synced.clear()
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert synced == [(tmp_path / "summary.json").stat().st_ino]


def test_unknown_peft_keys_warn(tmp_path):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["shiny_new_option"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(UserError, match="refusing a pickled adapter: unpickling can run arbitrary code"):
        load_adapter(tiny_llama(), tmp_path)


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path)
    # a run's output_dir or checkpoint, which holds the adapter one level down
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    save_adapter(model, tmp_path / "run" / "adapter")
    with pytest.raises(UserError) as err:
        load_adapter(tiny_llama(), tmp_path / "run")
    assert str(err.value) == (f"{tmp_path / 'run'}: no adapter_config.json; an adapter folder holds adapter_config.json and "
                              f"adapter_model.safetensors; it holds one in {tmp_path / 'run' / 'adapter'}: pass that")  # fmt: skip
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(UserError, match="peft_type = 'IA3'"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "lora_bias": True}))
    with pytest.raises(UserError, match="lora_bias = True is a PEFT feature lorakit does not support"):
        load_adapter(tiny_llama(), tmp_path)
    # PEFT's fast PiSSA: its randomized SVD cannot be computed again to rebuild the base it trained on
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                                              "init_lora_weights": "pissa_niter_4"}))  # fmt: skip
    with pytest.raises(UserError, match=r"init_lora_weights = 'pissa_niter_4': PEFT's fast PiSSA .* save it as plain LoRA in PEFT"):
        load_adapter(tiny_llama(), tmp_path)


def test_truncated_safetensors(tmp_path):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_mismatched_adapter_leaves_model_untouched(tmp_path):
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    wider = tiny_llama(hidden_size=96, num_attention_heads=4)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_adapter(wider, tmp_path / "a")
    message = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (2, 64)" in message
    assert "(2, 96)" in message
    assert not list(lora_layers(wider))
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_round_trip_with_peft(init, tmp_path):
    """PiSSA/OLoRA move W's principal part into A, B; loading re-runs the init on the base, as PEFT does."""
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=init))  # fmt: skip
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = tiny_llama()
    assert load_adapter(model, tmp_path / "peft").init == init
    torch.testing.assert_close(model(_ids()).logits, peft_model(_ids()).logits, atol=1e-5, rtol=0)

    ours = tiny_llama()
    inject_adapter(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init=init))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(_ids()).logits, ours(_ids()).logits, atol=1e-5, rtol=0)


def test_patterns_and_name_lists_of_another_json_type_exit_2(tmp_path, capsys):
    # dict() failed on a list of names and took a list of pairs; list() split a string into letters
    from helpers import make_tokenizer, save_model_folder

    from lorakit.cli import main

    base = save_model_folder(tmp_path / "base", tiny_llama(), make_tokenizer())
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value, message in [
        ("rank_pattern", ["q_proj"], "rank_pattern = ['q_proj']: expected a mapping of module name (or regex) to rank, e.g. "),
        ("alpha_pattern", [["q_proj", 4]], "alpha_pattern = [['q_proj', 4]]: expected a mapping of module name (or regex) to alpha"),
        ("modules_to_save", "lm_head", "modules_to_save = 'lm_head': expected a list of names, e.g. [\"lm_head\"]"),
        # names and indices of another type failed where module names are matched (TypeError)
        ("target_modules", 5, "lora.targets = 5: expected a list of strings or a string"),
        ("target_modules", ["q_proj", None], "lora.targets = ['q_proj', None]: expected a list of strings or a string"),
        ("exclude_modules", [5], "lora.exclude = [5]: expected a list of strings or a string or null"),
        ("modules_to_save", [5], "lora.modules_to_save = [5]: expected a list of strings"),
        ("target_parameters", [5], "lora.target_parameters = [5]: expected a list of strings"),
        ("layers_to_transform", 0.5, "lora.layers = 0.5: expected a list of integers or null"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        for args in (["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "x"],
                     ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]):  # fmt: skip
            assert main(args) == 2, (key, args[0])
            err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert err and err[0].startswith(f"error: {adapter / 'adapter_config.json'}: {message}"), err


def test_weights_of_a_selected_layer_lorakit_cannot_wrap_are_not_called_unselected(tmp_path):
    # PEFT adapts a Conv2d its target_modules names: the refusal says what the layer is, not that
    # adapter_config.json leaves it out (which it does not)
    from torch import nn

    from lorakit.adapters import check_fits, read_adapter

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 4, 3), nn.Linear(8, 8)

    get_peft_model(Model(), PeftLoraConfig(r=2, target_modules=["conv", "lin"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError) as err:
        check_fits(Model(), read_adapter(tmp_path / "adapter"))
    assert str(err.value) == (f"{tmp_path / 'adapter'}: adapter_model.safetensors holds LoRA weights for conv, a Conv2d; "
                              "lorakit adapts linear layers, GPT-2's Conv1D and embeddings only")  # fmt: skip


def test_a_chat_template_jinja_that_is_a_folder_is_refused_not_passed_over(tmp_path, capsys):
    from lorakit.adapters import read_chat_template
    from lorakit.cli import main
    from lorakit.config import build_run_config
    from lorakit.train import chat_template_source

    model = tiny_llama()
    base = save_model_folder(tmp_path / "m", model, make_tokenizer())
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "a")
    (adapter / "chat_template.jinja").mkdir()
    message = (f"{adapter / 'chat_template.jinja'} is a folder, not a file; delete it to use the model's own template, or save "
               "the adapter's chat template there as a file")  # fmt: skip
    with pytest.raises(UserError) as err:
        read_chat_template(adapter)
    assert str(err.value) == message
    with pytest.raises(UserError) as err:  # a run that continues the adapter
        chat_template_source(build_run_config({"model": str(base), "adapter": str(adapter), "data": {"train": "t.jsonl"}},
                                              check_paths=False))  # fmt: skip
    assert str(err.value) == message
    capsys.readouterr()  # (the model folder's progress bar)
    for args in (["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "x"],
                 ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]):  # fmt: skip
        assert main(args) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_saved_folders_have_the_permissions_the_umask_gives(tmp_path):
    # not mkdtemp's owner-only 0700: another user, or a serving container, reads the adapter
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    old = os.umask(0o027)
    try:
        save_adapter(model, tmp_path / "a")
        save_adapter(model, tmp_path / "a")  # replacing one too
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750


def test_saving_into_a_folder_keeps_its_other_files(tmp_path, monkeypatch):
    # as PEFT's save_pretrained: the folder's own files stay; an old adapter's template and card go
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, targets=["q_proj"]))
    folder = tmp_path / "a"
    (folder / "runs").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "runs" / "log.txt").write_text("log")
    (folder / "chat_template.jinja").write_text("{{ old }}")
    (folder / "README.md").write_text("old card")
    save_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt", "runs"]
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "runs" / "log.txt").read_text() == "log"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(model.model.layers)
    monkeypatch.chdir(folder)
    save_adapter(model, ".")  # the current folder: written by its absolute name
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "adapter_config.json").is_file()
    # and the process goes on in the new folder, not in the old one, now removed
    assert Path.cwd() == folder and sorted(os.listdir(".")) == sorted(p.name for p in folder.iterdir())
