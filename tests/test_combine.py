"""`lorakit combine` (lorakit.combine): the combined adapter's updates equal PEFT's add_weighted_adapter
for every method, load in PEFT and lorakit with the same logits, and bad input is refused."""

import json

import pytest
import torch
from helpers import save_model_folder, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.combine import combine_adapters
from lorakit.errors import UserError

peft = pytest.importorskip("peft")

# two PEFT adapters of other ranks, scales and targets: "one" also adapts the embedding (its own
# factor layout), "two" uses rsLoRA and a rank pattern; q_proj is the module both adapt
ONE = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
TWO = dict(r=6, lora_alpha=3, target_modules=["q_proj", "o_proj"], use_rslora=True, rank_pattern={"o_proj": 2})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    save_model_folder(root / "model")
    for seed, (name, config) in enumerate((("one", ONE), ("two", TWO)), start=1):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **config))
        model.save_pretrained(root / name)
    return root


def _peft_model(root, *names):
    model = peft.PeftModel.from_pretrained(tiny_llama(), root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    return model.eval()


def _deltas(model, name):
    """module path -> the adapter's update in its base weight's layout (PEFT's get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    return {
        path.removeprefix("base_model.model."): layer.get_delta_weight(name)
        for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and (name in layer.lora_A or name in layer.lora_embedding_A)
    }  # fmt: skip


@pytest.mark.parametrize(
    "method, weights, options",
    [
        ("cat", [0.7, -1.3], {}),
        ("svd", [0.7, -1.3], {}),
        ("svd", [1.0, 1.0], {"rank": 3}),
        ("ties_svd", [0.7, 1.3], {"density": 0.5}),
        ("ties_svd", [1.0, 0.5], {"density": 0.3, "majority_sign": "frequency"}),
        ("magnitude_prune_svd", [0.7, -1.3], {"density": 0.4}),
        # density 1 prunes nothing (DARE's random masks are tested below): the sign election and sums
        ("dare_ties_svd", [0.7, 1.3], {"density": 1.0}),
        ("dare_linear_svd", [0.7, -1.3], {"density": 1.0, "rank": 2}),
    ],
)
def test_combined_updates_equal_peft_add_weighted_adapter(adapters, tmp_path, method, weights, options):
    out = tmp_path / "mix"
    report = combine_adapters([adapters / "one", adapters / "two"], out, weights=weights, method=method, **options)
    model = _peft_model(adapters, "one", "two")
    peft_options = {"svd_rank": options["rank"]} if "rank" in options else {}
    peft_options.update({k: v for k, v in (("density", options.get("density")),) if v is not None})
    if "majority_sign" in options:
        peft_options["majority_sign_method"] = options["majority_sign"]
    model.add_weighted_adapter(["one", "two"], weights, "theirs", combination_type=method, **peft_options)
    model.load_adapter(out, adapter_name="ours")  # PEFT reads lorakit's file as it is
    theirs, ours = _deltas(model, "theirs"), _deltas(model, "ours")
    assert sorted(ours) == sorted(theirs) and len(ours) == report.modules == 7  # embed, q, v, o (2 layers)
    for path in theirs:
        scale = theirs[path].abs().max().item()
        assert (ours[path] - theirs[path]).abs().max().item() <= 2e-5 * max(scale, 1.0), path
    # the file: one rank and s = 1 everywhere (what vLLM and llama.cpp read), exact module paths as targets
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"] == {}
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"] and not config["use_rslora"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    rank_q = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0]
    assert rank_q == {"cat": 10}.get(method, options.get("rank", 6))  # cat: 4 + 6; svd: the largest rank (6)
    if method == "cat":  # the embedding's own rank 4 (one's alone), padded with zeros to the largest
        embed_a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
        assert embed_a.shape[0] == 10 and not embed_a[4:].any()


def test_cat_is_exact_and_loads_in_lorakit_with_the_weighted_sum_of_updates(adapters, tmp_path, capsys):
    # through the CLI; lorakit's model with the combined adapter gives the logits of the base with
    # 0.5 D_one - 2 D_two added to its weights, computed here from the files
    from lorakit.adapters import adapter_scaling, load_adapter, read_adapter

    out = tmp_path / "cat"
    args = ["combine", "--adapter", str(adapters / "one"), "--adapter", str(adapters / "two"), "--weights", "0.5", "-2",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert f"combined 2 adapters (cat) over 7 modules into an adapter of rank up to 10 -> {out}" in capsys.readouterr().out
    reference = tiny_llama()
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for w, name in ((0.5, "one"), (-2.0, "two")):
            files = read_adapter(adapters / name)
            for key, a in files.tensors.items():
                if not key.endswith(("lora_A.weight", "lora_embedding_A")):
                    continue
                path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                b = files.tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
                update = w * adapter_scaling(files.config, path) * (b @ a)
                weights[f"{path}.weight"] += update.t() if "embedding" in key else update
    model = tiny_llama()
    load_adapter(model, out)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() < 1e-4
    assert main(args) == 2  # an existing --out is never overwritten without --force
    assert "exists and is not empty; pick another folder or pass --force" in capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())  # r: the largest rank (v_proj and embed: 4, padded)
    assert config["r"] == config["lora_alpha"] == 10 and config["rank_pattern"] == {}


def test_dare_keeps_each_entry_with_the_density_and_rescales_it(adapters, tmp_path):
    # one adapter at full rank: the result is the pruned update itself, each entry 0 or D / density
    from lorakit.adapters import adapter_scaling, read_adapter

    files = read_adapter(adapters / "one")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    update = adapter_scaling(files.config, "model.layers.0.self_attn.q_proj") * (
        files.tensors[f"{key}.lora_B.weight"] @ files.tensors[f"{key}.lora_A.weight"]
    )
    got = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"dare{len(got)}-{seed}"
        combine_adapters([adapters / "one"], out, method="dare_linear_svd", density=0.5, rank=64, seed=seed)
        t = load_file(str(out / "adapter_model.safetensors"))
        got.setdefault(seed, []).append(t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"])
    pruned, tol = got[0][0], 1e-5 * update.abs().max().item()  # float32 SVD at full rank
    dropped, kept = pruned.abs() < tol, (pruned - update / 0.5).abs() < tol
    assert (dropped | kept).all()
    clear = update.abs() > 100 * tol  # entries that are not ~0 anyway
    assert 0.4 < kept[clear].float().mean().item() < 0.6
    assert torch.allclose(got[0][0], got[0][1], atol=1e-6) and not torch.allclose(got[0][0], got[1][0], atol=1e-3)


def test_the_combination_keeps_the_adapters_dtype_or_takes_fp32_where_they_differ(adapters, tmp_path):
    from safetensors.torch import save_file

    for name, dtype in (("half", torch.float16), ("brain", torch.bfloat16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((adapters / "one" / "adapter_config.json").read_text())
        tensors = load_file(str(adapters / "one" / "adapter_model.safetensors"))
        save_file({k: v.to(dtype) if ".lora_" in k else v for k, v in tensors.items()}, str(tmp_path / name / "adapter_model.safetensors"))
    for inputs, want in (([tmp_path / "half", tmp_path / "half"], torch.float16), ([tmp_path / "half", tmp_path / "brain"], torch.float32)):
        out = tmp_path / f"out-{want}"
        combine_adapters(inputs, out)
        assert {t.dtype for k, t in load_file(str(out / "adapter_model.safetensors")).items() if ".lora_" in k} == {want}


def test_adapters_that_cannot_be_combined_are_refused(adapters, tmp_path, capsys):
    torch.manual_seed(0)
    dora = tmp_path / "dora"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    saved = tmp_path / "saved"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(saved)
    other = tmp_path / "other"
    peft.get_peft_model(tiny_llama(hidden_size=32, intermediate_size=64), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(other)
    gpt2 = tmp_path / "gpt2"
    peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(gpt2)
    one = adapters / "one"
    cases = [
        ([one, gpt2], {}, f"{gpt2}: adapts modules under transformer.*, the other adapters under model.*: it is another model's "
                          "adapter; combine adapters of one base model"),
        ([one, dora], {}, "dora: cannot combine this adapter: DoRA rescales each row by a trained magnitude"),
        ([saved], {}, "saved: cannot combine this adapter: its modules_to_save (lm_head) are whole trained copies"),
        ([one, other], {}, "model.layers.0.self_attn.q_proj: " + str(one) + " adapts it as linear (64 x 64) and "),
        ([one], {"weights": [1.0, 2.0]}, "--weights: 2 given for 1 adapters; give one weight per adapter"),
        ([one], {"method": "ties"}, "--method 'ties': use one of cat, svd, ties_svd"),
        ([one], {"method": "ties_svd"}, "--method ties_svd prunes each update first; give --density"),
        ([one], {"method": "svd", "density": 0.5}, "--density: svd prunes nothing"),
        ([one], {"method": "dare_ties_svd", "density": 1.5}, "--density 1.5: must be in (0, 1]"),
        ([one], {"rank": 4}, "--rank: cat keeps every adapter's rank"),
        ([one], {"weights": [float("nan")]}, "--weights nan: every weight must be a finite number"),
        ([one], {"force": True, "out_dir": adapters}, f"--out {adapters} holds the adapter 1 {one}; write the result somewhere else"),
        ([one, one], {"weights": [1e39, 1.0]}, "the combination is not finite in float32 (weights 1e+39, 1.0); use smaller weights"),
        ([one, one], {"weights": [1e308, 1e308], "method": "svd"}, "the combination is not finite in float32"),
    ]
    for dirs, options, message in cases:
        with pytest.raises(UserError) as err:
            combine_adapters(dirs, options.pop("out_dir", tmp_path / "out"), **options)
        assert message in str(err.value)
    assert (one / "adapter_model.safetensors").is_file()  # --force never replaces an input
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(UserError, match=r"--out .*plain is a file; give a folder to write"):
        combine_adapters([one], tmp_path / "plain", force=True)
    with pytest.raises(UserError, match=r"cannot write .*plain/sub: File exists .*; pick a folder you can write to"):
        combine_adapters([one], tmp_path / "plain" / "sub")
    assert main(["combine", "--adapter", str(dora), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_weights_that_an_adapters_own_config_does_not_select_are_refused(adapters, tmp_path):
    # PEFT loads such an adapter without them, so add_weighted_adapter would leave them out: they
    # are refused, as merge and loading refuse them, not combined into an adapter that selects them
    import shutil

    narrowed = tmp_path / "narrowed"
    shutil.copytree(adapters / "two", narrowed)
    config = json.loads((narrowed / "adapter_config.json").read_text())
    (narrowed / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError) as err:
        combine_adapters([adapters / "one", narrowed], tmp_path / "out")
    assert str(err.value) == (
        f"{narrowed}: adapter_model.safetensors holds LoRA weights for model.layers.0.self_attn.o_proj, which "
        "adapter_config.json does not select (target_modules ['q_proj']); PEFT would load the adapter without them. "
        "Add the module to target_modules, or remove its tensors"
    )
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_top_level_modules_combines_and_a_damaged_one_is_named(adapters, tmp_path):
    # an adapter of lm_head alone shares no path root with model.layers.*: it is the same model's all the same
    torch.manual_seed(3)
    head = tmp_path / "head"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)).save_pretrained(head)
    combine_adapters([adapters / "one", head], tmp_path / "both")
    combined = _peft_model(tmp_path, "both")
    want = {**_deltas(_peft_model(adapters, "one"), "one"), **_deltas(_peft_model(tmp_path, "head"), "head")}
    got = _deltas(combined, "both")
    assert got.keys() == want.keys() and "lm_head" in got
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-5, atol=1e-6)
    # an adapter_config.json whose r its tensors do not have (alpha / r would scale the update wrongly)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_model.safetensors").write_bytes((head / "adapter_model.safetensors").read_bytes())
    config = json.loads((head / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(UserError, match=r"wrong: lm_head: adapter A \(2, 64\), B \(400, 2\) are not a LoRA module of rank 4"):
        combine_adapters([wrong], tmp_path / "out")
    # a NaN in a factor is the adapter's fault, not the weights'
    from safetensors.torch import save_file

    tensors = load_file(str(head / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"wrong: module lm_head holds inf/NaN values in its LoRA matrices; the adapter is broken"):
        combine_adapters([adapters / "one", wrong], tmp_path / "out")
    from lorakit.merge import merge_adapter_files  # merge says the same, before any weight is written

    with pytest.raises(UserError, match=r"wrong: module lm_head holds inf/NaN values in its LoRA matrices; the adapter is broken"):
        merge_adapter_files(adapters / "model", wrong, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_is_not_written_into_a_models_folder_even_with_force(adapters, tmp_path, capsys):
    import os
    import stat

    model = save_model_folder(tmp_path / "model", tiny_llama())
    (model / "chat_template.jinja").write_text("{{ messages }}")
    before = sorted(p.name for p in model.iterdir())
    assert main(["combine", "--adapter", str(adapters / "one"), "--out", str(model), "--force"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --out {model} holds a model (config.json and weights); write the adapter to a folder of its own"
    )
    assert sorted(p.name for p in model.iterdir()) == before
    for weights in model.glob("*.safetensors"):  # a model stored the old way is one too
        weights.rename(model / "pytorch_model.bin")
    assert main(["combine", "--adapter", str(adapters / "one"), "--out", str(model), "--force"]) == 2
    assert "holds a model (config.json and weights)" in capsys.readouterr().err
    # what it writes is readable by others as the umask says (safetensors itself writes owner-only files)
    mask = os.umask(0o022)
    try:
        assert main(["combine", "--adapter", str(adapters / "one"), "--out", str(tmp_path / "mine")]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "mine" / "adapter_model.safetensors").stat().st_mode) == 0o644


def test_a_full_disk_under_safetensors_is_said_as_the_os_error_it_is(tmp_path, monkeypatch, capsys):
    import errno

    from safetensors import SafetensorError

    import lorakit.adapters

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(lorakit.adapters, "save_file", full)
    with pytest.raises(OSError) as err:
        lorakit.adapters.write_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "a.safetensors"))
    from lorakit.errors import disk_full

    copied = OSError(errno.ENOSPC, "No space left on device", "/base/tokenizer.json", None, "/out/tokenizer.json")
    assert str(disk_full(copied)).startswith("no space left on device writing /out/tokenizer.json: ")  # the copy, not its source


def test_one_adapter_is_written_with_one_rank_and_scale_for_servers(adapters, tmp_path):
    # "two" has rsLoRA and a rank pattern: vLLM applies lora_alpha / r to every module and llama.cpp
    # alpha / each tensor's rank, without rsLoRA; the written adapter gives each its own update either way
    from lorakit.adapters import adapter_scaling, read_adapter

    out = tmp_path / "portable"
    report = combine_adapters([adapters / "two"], out)
    # o_proj (2 layers, 64 x 64) at rank 2 of 6: 2 x 4 x 128 zeros of the 4 modules' 4 x 6 x 128 values
    assert report.notes == ["modules of a smaller rank are padded with zeros to rank 6 (one rank for servers): 1,024 of "
                            "the file's 3,072 LoRA values (33%) are those zeros"]  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"], config["use_rslora"]) == (6, 6, {}, {}, False)
    source, written = read_adapter(adapters / "two"), load_file(str(out / "adapter_model.safetensors"))
    for key, a in source.tensors.items():
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            b, a_out, b_out = source.tensors[key.replace("lora_A", "lora_B")], written[key], written[key.replace("lora_A", "lora_B")]
            assert a_out.shape[0] == b_out.shape[1] == 6  # o_proj's rank 2, padded
            vllm_scale = config["lora_alpha"] / config["r"]
            llama_cpp_scale = config["lora_alpha"] / a_out.shape[0]
            for scale in (vllm_scale, llama_cpp_scale):
                torch.testing.assert_close(scale * b_out @ a_out, adapter_scaling(source.config, path) * b @ a, rtol=1e-6, atol=1e-7)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = _peft_model(adapters, "two")(ids).logits
        ours = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
