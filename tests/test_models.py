"""lorakit.models: position limits, transformers' renames of stored keys, the structure on the meta device."""

import json
import re

import pytest
import torch
import transformers
import yaml
from helpers import save_model_folder, tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_qwen3_moe, write_addition_data

from lorakit.errors import UserError
from lorakit.models import base_reference, checkpoint_key_transform, load_tokenizer, meta_model, position_limit


def test_position_limit_tells_tables_from_computed_positions():
    assert position_limit(tiny_llama()) == (256, False)  # rotary: computed for any position
    assert position_limit(tiny_gpt2(n_positions=48)) == (48, True)  # learned table `wpe`
    gptj = transformers.GPTJConfig(vocab_size=400, n_embd=64, n_layer=1, n_head=4, n_positions=32, rotary_dim=8,
                                   bos_token_id=1, eos_token_id=2)  # fmt: skip
    with torch.device("meta"):  # as lorakit train checks it, before loading any weight
        assert position_limit(transformers.GPTJForCausalLM(gptj)) == (32, True)  # precomputed rotary table
    opt = transformers.OPTConfig(vocab_size=400, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                                 word_embed_proj_dim=64, max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    assert position_limit(transformers.OPTForCausalLM(opt)) == (40, True)  # learned, with OPT's offset of 2 rows
    assert position_limit(torch.nn.Linear(2, 2)) == (None, False)


def test_checkpoint_key_transform_follows_transformers():
    with torch.device("meta"):
        llama, neox, moe = tiny_llama(), tiny_gpt_neox(), tiny_qwen3_moe()
    same = checkpoint_key_transform(llama)
    assert same("model.layers.0.self_attn.q_proj.weight") == ("model.layers.0.self_attn.q_proj.weight", False)
    assert checkpoint_key_transform(neox)("embed_out.weight") == ("lm_head.weight", False)
    assert checkpoint_key_transform(moe)("model.layers.1.mlp.experts.3.up_proj.weight")[1] is True
    assert checkpoint_key_transform(moe)("model.layers.1.self_attn.q_proj.weight") == ("model.layers.1.self_attn.q_proj.weight", False)
    assert checkpoint_key_transform(torch.nn.Linear(2, 2))("weight") == ("weight", False)


def test_meta_model_and_a_folder_transformers_cannot_read(tmp_path):
    folder = save_model_folder(tmp_path / "m", tiny_llama())
    structure = meta_model(folder)
    assert structure is not None and all(p.is_meta for p in structure.parameters())
    assert meta_model(tmp_path / "none") is None
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"m: transformers could not load it"):
        load_tokenizer(folder)


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_tokenizer_file_that_is_not_utf8_is_named(tmp_path, capsys, name):
    # transformers read it with a UnicodeDecodeError that named no file (a traceback from the CLI)
    from lorakit.cli import main

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    text = (folder / name).read_text() if (folder / name).is_file() else "{{ messages }}"
    (folder / name).write_text(text, encoding="utf-16")
    with pytest.raises(UserError) as caught:
        load_tokenizer(folder)
    assert str(caught.value) == f"{folder / name}:1: not UTF-8 text (invalid start byte); save the file as UTF-8"
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if "error" in line] == [f"error: {caught.value}"]


@pytest.mark.parametrize("case", ["missing", "shape"])
def test_weights_that_do_not_fit_config_json_are_refused(tmp_path, case):
    # transformers would start a missing weight at random (and only print a report): a user error here
    from safetensors.torch import load_file, save_file

    from lorakit.models import load_model

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    if case == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 2)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    message = f"lack 1 weight the model needs ({key})" if case == "missing" else "a stored weight's shape differs"
    with pytest.raises(UserError, match=re.escape(message)):
        load_model(folder)


def test_a_corrupt_weights_file_is_a_user_error_for_both_loaders(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.models import load_model
    from lorakit.quant import load_model_4bit

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(folder)
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
        load_model_4bit(folder, compute_dtype=torch.float32)


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"model_type": "llama",', "config.json: invalid JSON (Expecting property name enclosed in double quotes"),
        ("[]", "config.json: a JSON list, not an object of the model's settings; re-save or re-download"),
        ({"model_type": "nosuchmodel"}, "config.json: model_type = 'nosuchmodel' is not an architecture transformers"),
        ({"model_type": None}, "config.json: no model_type, the key that names the architecture"),
        ({"model_type": "t5"}, "config.json: model_type = 't5' is not a causal language model in transformers"),
        ({"hidden_size": "64"}, "config.json: Field 'hidden_size' expected int, got str (value: '64'); fix the value"),
    ],
    ids=["invalid-json", "not-an-object", "unknown-model-type", "no-model-type", "not-causal", "bad-field"],
)
def test_a_config_json_transformers_cannot_read_exits_2(tmp_path, capsys, config, message):
    from lorakit import LoraConfig, inject_adapter, save_adapter
    from lorakit.cli import main

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    adapter = tiny_llama()
    inject_adapter(adapter, LoraConfig(r=2, targets=["q_proj"]))
    save_adapter(adapter, tmp_path / "a")
    if isinstance(config, dict):
        written = {**json.loads((folder / "config.json").read_text()), **config}
        config = json.dumps({k: v for k, v in written.items() if v is not None})
    (folder / "config.json").write_text(config)
    data = write_addition_data(tmp_path / "d.jsonl", 4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": str(folder), "data": {"train": str(data)},
                                                       "output_dir": str(tmp_path / "out")}))  # fmt: skip
    commands = [
        ["train", str(tmp_path / "run.yaml")],
        ["train", str(tmp_path / "run.yaml"), "--dry-run"],
        ["generate", "--model", str(folder), "--prompt", "x"],
        ["eval", "--model", str(folder), "--data", str(data)],
    ]
    merge = ["merge", "--base", str(folder), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "merged")]
    json_level = message.startswith(("config.json: invalid", "config.json: a JSON"))
    for args in commands + ([merge] if json_level else []):
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and err[0].startswith(f"error: {folder / message}"), (args, err)
    if not json_level:  # merge works from the safetensors headers: an architecture it cannot build merges by the shapes
        assert main(merge) == 0


def test_a_weight_stored_as_integers_is_refused_by_both_loaders_and_the_cli(tmp_path, capsys):
    # an int8 export of another tool: transformers would take the integers as the weight's values
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file, save_file

    from lorakit.cli import main
    from lorakit.models import load_model
    from lorakit.quant import load_model_4bit

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.position_ids"] = torch.arange(8)  # an integer buffer (older checkpoints keep some) is no weight
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load_model(folder) is not None
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    message = f"{folder}: {key} is stored as torch.int8, not as floating-point numbers"
    with pytest.raises(UserError, match=re.escape(message)):
        load_model(folder)
    with pytest.raises(UserError, match=re.escape(message)):
        load_model_4bit(folder, compute_dtype=torch.float32)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1 plus 1 is", "completion": " 2"}) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": str(folder), "data": {"train": str(tmp_path / "d.jsonl")},
                                                       "output_dir": str(tmp_path / "out")}))  # fmt: skip
    for args in (["generate", "--model", str(folder), "--prompt", "x"], ["generate", "--model", str(folder), "--prompt", "x",
                 "--quantize", "nf4"], ["train", str(tmp_path / "run.yaml"), "--dry-run"]):  # fmt: skip
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and err[0].startswith(f"error: {message}; loaded, the integers would be the weight's values"), err


def test_an_adapter_names_its_base_so_other_tools_find_it(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_reference("models/tiny") == (str(folder.resolve()), None, False)
    # a folder of the Hugging Face cache: its repository id and commit
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    assert base_reference(str(snapshot)) == ("Qwen/Qwen2.5-0.5B", commit, True)
    unowned = tmp_path / "hub" / "models--gpt2" / "snapshots" / commit  # a model without an organisation
    unowned.mkdir(parents=True)
    assert base_reference(str(unowned)) == ("gpt2", commit, True)
    # a Hub id given to transformers (no such folder) stays as it is
    assert base_reference("org/model") == ("org/model", None, True)


def test_a_tokenizer_of_the_folders_own_code_is_refused_untrusted_and_never_run(tmp_path, capsys):
    from lorakit.cli import main

    folder = save_model_folder(tmp_path / "m", tiny_llama())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tok.MyTok", None]}, tokenizer_class="MyTok")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tok.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\n")
    with pytest.raises(UserError, match="this model's tokenizer needs custom code from its folder; if you trust it, set "
                       "trust_remote_code: true \\(train\\) or pass --trust-remote-code \\(generate, chat, eval\\)$"):
        load_tokenizer(folder)
    assert main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().endswith("or pass --trust-remote-code (generate, chat, eval)")
    assert not (tmp_path / "ran").exists()


def test_inference_keeps_a_bf16_model_in_bf16_on_a_cpu_that_computes_in_it(tmp_path, monkeypatch):
    import lorakit.models as models

    bf16 = save_model_folder(tmp_path / "bf16", tiny_llama().to(torch.bfloat16))
    fp32 = save_model_folder(tmp_path / "fp32", tiny_llama())
    cpu = torch.device("cpu")
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_has_bf16", lambda: has_bf16)
        assert models.inference_dtype(bf16, cpu) == expected  # (no fp32 copy at twice the memory where bf16 computes)
        assert models.inference_dtype(fp32, cpu) == torch.float32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    model, _ = models.load_for_inference(bf16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = models.load_for_inference(bf16, device="cpu", precision="fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_help_and_version_answer_without_importing_torch():
    import subprocess
    import sys

    probe = ("import sys; from lorakit.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False" and out.startswith("lorakit ")
    import lorakit

    assert lorakit.LoraConfig is lorakit.config.LoraConfig and "inject_adapter" in dir(lorakit)  # the names, on first use
