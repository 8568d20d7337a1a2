"""Injecting adapters into whole models: targeting, freezing, switching, merging, unloading."""

import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, tiny_llava

from lorakit import (
    LoraConfig,
    UserError,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    load_adapter,
    merge_adapter,
    set_active_adapter,
    save_adapter,
    unload,
    unmerge_adapter,
    use_adapter,
)
from lorakit.inject import find_targets, lora_layers, selected_by_name


def _perturb(model, name):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=gen) * 0.1)
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.05)


def _ids():
    return torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def test_all_linear_skips_the_output_head_and_counts_are_exact():
    model = tiny_llama()
    paths = inject_adapter(model, LoraConfig(r=4, alpha=8))
    assert len(paths) == 2 * 7 and all("lm_head" not in p for p in paths)
    # per block: q (64->64), k (64->32), v (64->32), o (64->64), gate/up (64->128), down (128->64)
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    expected = 2 * sum(4 * (i + o) for i, o in shapes)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_target_forms_names_regex_exclude_layers():
    model = tiny_llama()
    assert find_targets(model, LoraConfig(targets=["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]  # fmt: skip
    assert find_targets(model, LoraConfig(targets=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]  # fmt: skip
    got = find_targets(model, LoraConfig(targets="all-linear", exclude=["mlp.gate_proj", "o_proj"], layers=[1]))
    assert got == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]  # fmt: skip
    gpt = find_targets(tiny_gpt2(), LoraConfig(targets=["c_attn"]))
    assert gpt == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_rank_and_alpha_patterns():
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                                     alpha_pattern={"layers.1.self_attn.v_proj": 1}))  # fmt: skip
    q = model.model.layers[0].self_attn.q_proj
    v0, v1 = model.model.layers[0].self_attn.v_proj, model.model.layers[1].self_attn.v_proj
    assert q.ranks["default"] == 2 and q.scaling["default"] == 4.0
    assert v0.ranks["default"] == 4 and v0.scaling["default"] == 2.0
    assert v1.scaling["default"] == 0.25


def test_no_match_lists_closest_names():
    with pytest.raises(UserError) as err:
        inject_adapter(tiny_llama(), LoraConfig(targets=["q_prj"]))
    assert str(err.value) == ("lora.targets = ['q_prj'] matches no layer LoRA can wrap (layers=None, exclude=None); closest "
                              "module names: q_proj, v_proj, o_proj")  # fmt: skip
    # a module's name as a string is a regex over whole paths (PEFT's reading): the list is what was meant
    with pytest.raises(UserError) as err:
        inject_adapter(tiny_llama(), LoraConfig(targets="q_proj"))
    assert str(err.value) == ("lora.targets = 'q_proj' matches no module: a string is a regex matched against whole module "
                              "paths (as PEFT's target_modules); to adapt the modules named q_proj, give a list, lora.targets: "
                              "[q_proj], or the regex '.*\\.q_proj'")  # fmt: skip


def test_a_rank_or_alpha_pattern_key_that_matches_no_adapted_module_is_refused(tmp_path):
    for option in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(UserError) as err:
            inject_adapter(tiny_llama(), LoraConfig(targets=["q_proj", "v_proj"], **{option: {"q_prj": 2}}))
        assert str(err.value) == (f"lora.{option}: 'q_prj' matches none of the adapted modules (a key matches the end of a "
                                  "module's path, as in PEFT); did you mean 'q_proj'? the adapted modules end in q_proj, v_proj")  # fmt: skip
    with pytest.raises(UserError, match=r"lora.rank_pattern: 'up_proj' matches none of the adapted modules .* end in q_proj, v_proj"):
        inject_adapter(tiny_llama(), LoraConfig(targets=["q_proj", "v_proj"], rank_pattern={"up_proj": 2}))
    # an adapter file keeps such keys (PEFT writes them): it loads as PEFT loads it
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, targets=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"v_proj": 2}}))
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    assert fresh.model.layers[0].self_attn.q_proj.ranks["default"] == 4


_PATHS = [
    "model.layers.0.self_attn.q_proj", "model.layers.3.mlp.experts.7.down_proj",
    "model.vision_tower.encoder.layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.q_proj",
    "transformer.h.1.attn.c_attn", "h.0.attn.c_attn", "layers.1.q_proj", "model.blocks.1.attn.q_proj",
]  # fmt: skip


@pytest.mark.parametrize("layers, pattern, expected", [
    # no pattern: the first `<name>.<i>.` after another name, so the expert index 7 is not the block,
    # and a block list at the root (h.0, layers.1) has none
    ([1], None, [2, 3, 4, 7]),
    ([0, 3], None, [0, 1]),
    ([1], "", [2, 3, 4, 7]),  # empty: PEFT's default
    ([1], [], [2, 3, 4, 7]),
    ([1], "layers", [2, 3, 6]),  # any stack named layers, at the root too
    ([1], "language_model.layers", [3]),  # one stack of two (a regex, as in PEFT)
    ([0, 1], ["h", "blocks"], [4, 5, 7]),
])  # fmt: skip
def test_layers_read_block_indices_as_peft_does(layers, pattern, expected):
    # lorakit took the first number anywhere in the path and ignored layers_pattern, so an adapter
    # file selected other modules in lorakit than in PEFT
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = ["q_proj", "c_attn", "down_proj"]
    ours = [p for p in _PATHS if selected_by_name(p, LoraConfig(targets=targets, layers=layers, layers_pattern=pattern))]
    peft_config = PeftLoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert ours == [p for p in _PATHS if check_target_module_exists(peft_config, p)]
    assert ours == [_PATHS[i] for i in expected]


def _peft_selection(model, **kwargs) -> list[str]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(r=2, **kwargs)).base_model.targeted_module_names


@pytest.mark.parametrize("layers, pattern, expected", [
    ([1], None, ["model.vision_tower.encoder.layers.1.self_attn.v_proj", "model.vision_tower.encoder.layers.1.self_attn.q_proj",
                 "model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.1.self_attn.v_proj"]),
    ([0], "language_model.layers", ["model.language_model.layers.0.self_attn.q_proj",
                                    "model.language_model.layers.0.self_attn.v_proj"]),
    ([1], ["encoder.layers"], ["model.vision_tower.encoder.layers.1.self_attn.v_proj",
                               "model.vision_tower.encoder.layers.1.self_attn.q_proj"]),
    ([0, 1], ["h", "language_model.layers"], [f"model.language_model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]),
])  # fmt: skip
def test_layers_pattern_picks_one_stack_of_a_vision_language_model_as_in_peft(layers, pattern, expected):
    targets = ["q_proj", "v_proj"]
    got = find_targets(tiny_llava(), LoraConfig(targets=targets, layers=layers, layers_pattern=pattern))
    assert got == expected
    assert got == _peft_selection(tiny_llava(), target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)


def test_layers_on_a_block_list_at_the_root_need_layers_pattern():
    # GPT2Model (no LM head): its blocks are h.<i>, which PEFT's default reading does not count
    model = tiny_gpt2().transformer
    with pytest.raises(UserError) as err:
        find_targets(model, LoraConfig(targets=["c_attn"], layers=[0]))
    assert str(err.value) == (
        "lora.layers = [0] selects none of the 2 modules lora.targets = ['c_attn'] matches (h.0.attn.c_attn, ...): none "
        "has a block index where PEFT reads one (`<block list>.<i>.` after another name, as in "
        "model.layers.0.self_attn.q_proj); fix lora.layers, or name the model's block list in lora.layers_pattern "
        "(e.g. 'blocks')"
    )
    with pytest.raises(ValueError, match="Target modules .* not found in the base model"):
        _peft_selection(tiny_gpt2().transformer, target_modules=["c_attn"], layers_to_transform=[0])
    got = find_targets(model, LoraConfig(targets=["c_attn"], layers=[0], layers_pattern="h"))
    assert got == ["h.0.attn.c_attn"]
    assert got == _peft_selection(tiny_gpt2().transformer, target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h")
    with pytest.raises(UserError) as err:  # an index the model has not
        find_targets(tiny_llama(), LoraConfig(targets=["q_proj"], layers=[2]))
    assert str(err.value).startswith("lora.layers = [2] selects none of the 2 modules lora.targets = ['q_proj'] matches "
                                     "(model.layers.0.self_attn.q_proj, ...): their block indices are [0, 1]; fix lora.layers")  # fmt: skip


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_unload_keep_outputs(make):
    model, ids = make(), _ids()
    inject_adapter(model, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"] if make is tiny_llama else []))
    _perturb(model, "default")
    expected = model(ids).logits
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    plain = unload(model)
    assert not list(lora_layers(plain))
    assert type(plain.lm_head).__name__ == "Linear"
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)


def test_disable_gives_base_exactly_even_when_merged():
    model, ids = tiny_llama(), _ids()
    base = tiny_llama()(ids).logits
    inject_adapter(model, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    _perturb(model, "default")
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.1)
    with disable_adapters(model):
        assert torch.equal(model(ids).logits, base)
    merge_adapter(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)
    assert not torch.allclose(model(ids).logits, base)


def _adapted(*names):
    """A tiny Llama with adapter "a" (all-linear, r 4) and/or "b" (q_proj, r 2), B non-zero."""
    model = tiny_llama()
    configs = {"a": LoraConfig(r=4, alpha=8), "b": LoraConfig(r=2, alpha=2, targets=["q_proj"])}
    for name in names:
        inject_adapter(model, configs[name], name)
        _perturb(model, name)
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_deleting_a_merged_adapter_takes_out_that_one_alone(dora):
    model, only_b, ids = tiny_llama(), tiny_llama(), _ids()
    for target, names in ((model, "ab"), (only_b, "b")):
        for name in names:
            inject_adapter(target, LoraConfig(r=2 + 2 * (name == "a"), alpha=4, targets=["q_proj", "v_proj"], dora=dora), name)
            _perturb(target, name)
    merge_adapter(model, "a")
    merge_adapter(model, "b")
    merge_adapter(only_b, "b")
    delete_adapter(model, "a")  # merged first: b comes out (DoRA undoes in reverse order), a out, b back in
    assert [layer.merged for _, layer in lora_layers(model)] == [["b"]] * 4
    torch.testing.assert_close(model(ids).logits, only_b(ids).logits, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=0)


def test_several_adapters_do_not_leak():
    ids = _ids()
    only_a, only_b, both = _adapted("a"), _adapted("b"), _adapted("a", "b")
    assert torch.equal(both(ids).logits, only_a(ids).logits)  # the first adapter stays active
    set_active_adapter(both, "b")
    assert torch.equal(both(ids).logits, only_b(ids).logits)
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    delete_adapter(both, "b")
    assert torch.equal(both(ids).logits, only_a(ids).logits)
    delete_adapter(both, "a")
    assert not list(lora_layers(both))
    torch.testing.assert_close(both(ids).logits, tiny_llama()(ids).logits, atol=0, rtol=0)


def test_a_second_adapter_does_not_wrap_the_firsts_trained_copies():
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]), "a")
    inject_adapter(model, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]), "b")  # all-linear again
    names = [n for n, _ in model.named_parameters() if n.startswith("lm_head.")]
    assert sorted(names) == ["lm_head.copies.a.weight", "lm_head.copies.b.weight", "lm_head.original.weight"]


def test_inference_under_autocast_takes_the_plain_path():
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=4, alpha=8))
    _perturb(model, "default")
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids).logits  # bf16 products; the fused in-place sum would mix dtypes
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_use_adapter_switches_forward_only_and_restores():
    ids = _ids()
    only_b, both = _adapted("b"), _adapted("a", "b")
    with_a = both(ids).logits
    trainable = [n for n, p in both.named_parameters() if p.requires_grad]
    with use_adapter(both, "b"):  # layers without "b" run their base alone
        assert torch.equal(both(ids).logits, only_b(ids).logits)
        assert [n for n, p in both.named_parameters() if p.requires_grad] == trainable  # still "a"'s
    assert torch.equal(both(ids).logits, with_a)
    with pytest.raises(UserError, match="no adapter named 'c'"):
        with use_adapter(both, "c"):
            pass
    merge_adapter(both)
    with pytest.raises(UserError, match="an adapter is merged into the weights; unmerge_adapter"):
        with use_adapter(both, "b"):
            pass


def test_embedding_target():
    model, ids = tiny_llama(), _ids()
    inject_adapter(model, LoraConfig(r=4, alpha=4, targets=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert layer.kind.name == "embedding" and layer.lora_A["default"].shape == (4, 400)
    _perturb(model, "default")
    out = model(ids).logits
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, out, atol=1e-5, rtol=0)


def test_bad_config_values():
    with pytest.raises(UserError, match=r"lora.r = 0"):
        LoraConfig(r=0)
    with pytest.raises(UserError, match=r"lora.alpha = -1"):
        LoraConfig(alpha=-1)
    with pytest.raises(UserError, match=r"lora.dropout = 1.0: must be in \[0, 1\)"):
        LoraConfig(dropout=1.0)
    with pytest.raises(UserError, match=r"lora.init = 'lora-ga': unknown init"):
        LoraConfig(init="lora-ga")
    for kwargs, message in [
        (dict(layers=[]), "lora.layers = []: names no block; list block indices, e.g. [0, 1], or set null for every block"),
        (dict(layers_pattern="h"), "lora.layers_pattern = 'h' without lora.layers: it names the block list that lora.layers "
                                   "counts in; set lora.layers, or remove it"),
        (dict(layers=[0], layers_pattern=["h", "blocks("]),
         "lora.layers_pattern = 'blocks(': not a valid regex (missing ), unterminated subpattern at position 6); give the "
         "block list's name, e.g. 'layers'"),
        (dict(layers=[0], layers_pattern=5), "lora.layers_pattern = 5: expected a list of strings or a string or null"),
        # PEFT refuses layers_to_transform and layers_pattern with a string target_modules
        (dict(targets=r".*\.q_proj", layers=[1]),
         r"lora.layers = [1] with a regex lora.targets = '.*\\.q_proj': PEFT refuses the two together; write the block "
         r"indices into the regex (e.g. '.*\.layers\.(0|1)\.self_attn\.q_proj') and remove lora.layers, or list module "
         "names in lora.targets"),
        (dict(targets="q_proj", layers_pattern="layers"),
         "lora.layers_pattern = 'layers' without lora.layers: it names the block list that lora.layers counts in; set "
         "lora.layers, or remove it; lora.layers_pattern = 'layers' with a regex lora.targets = 'q_proj': PEFT refuses the "
         r"two together; write the block indices into the regex (e.g. '.*\.layers\.(0|1)\.self_attn\.q_proj') and "
         "remove lora.layers_pattern, or list module names in lora.targets"),
    ]:  # fmt: skip
        with pytest.raises(UserError) as err:
            LoraConfig(**kwargs)
        assert str(err.value) == message
    # all-linear stands for a list of names: layers apply as to one (and lorakit writes the modules it took)
    assert LoraConfig(targets="all-linear", layers=[1], layers_pattern="layers").layers == [1]


def test_duplicate_adapter_name():
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=2))
    with pytest.raises(UserError, match="already on the model"):
        inject_adapter(model, LoraConfig(r=2, alpha=2))


def test_merging_is_all_or_none_and_switching_refuses_a_merged_adapter():
    ids = _ids()
    model = _adapted("a", "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with use_adapter(model, "b"):
        only_b = model(ids).logits
    with pytest.raises(UserError, match=r"no adapter named 'c'; the model has \['a', 'b'\]"):
        merge_adapter(model, "c")
    # "b" covers the q_proj layers only: those merge, the others are left alone (PEFT's way)
    merge_adapter(model, "b")
    assert sorted(p for p, layer in lora_layers(model) if layer.merged) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    set_active_adapter(model, "b")  # the merged one itself: forward adds nothing on top
    torch.testing.assert_close(model(ids).logits, only_b, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter 'b' is merged into the weights, and forward "
                                        r"would add 'a' on top of it; unmerge_adapter before switching adapters"):  # fmt: skip
        set_active_adapter(model, "a")
    unmerge_adapter(model)
    set_active_adapter(model, "a")
    # a layer that cannot take the adapter takes the ones merged before it out again
    last = list(lora_layers(model))[-1][1]
    with torch.no_grad():
        last.lora_B["a"].fill_(float("inf"))
    with pytest.raises(UserError, match="gives inf/NaN weights"):
        merge_adapter(model, "a")
    assert not any(layer.merged for _, layer in lora_layers(model))
    after = model.state_dict()
    assert all(torch.allclose(after[k], v, atol=1e-6, rtol=0) for k, v in before.items() if "lora_" not in k)


def test_merging_an_adapted_tied_embedding_unties_the_head():
    ids = _ids()
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = model.lm_head.weight.detach().clone()
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    _perturb(model, "default")
    expected = model(ids).logits  # the head reads the base embedding; the input, the adapted one
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(model.lm_head.weight, head) and not model.config.tie_word_embeddings
    plain = unload(model)
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)


def test_a_saved_module_of_a_bf16_model_trains_an_fp32_copy_and_runs_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    head = model.lm_head.copies["default"]
    assert head.weight.dtype == torch.float32 and model.lm_head.original.weight.dtype == torch.bfloat16
    assert torch.equal(head.weight, model.lm_head.original.weight.float())
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, base)  # the copy runs as the original did
    logits.float().square().mean().backward()
    assert head.weight.grad.dtype == torch.float32 and model.model.embed_tokens.copies["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():  # an update far below bf16's step still moves every weight of the fp32 copy
        head.weight -= 1e-6 * torch.sign(head.weight.grad) + 1e-6 * (head.weight.grad == 0)
    assert bool((head.weight != model.lm_head.original.weight.float()).all())
    with torch.no_grad():  # without gradients (generation) a cast is made once, until the weight changes
        first = model.lm_head._in_original_dtypes(head)["weight"]
        assert model.lm_head._in_original_dtypes(head)["weight"] is first
        head.weight.add_(1.0)
        assert not torch.equal(model.lm_head._in_original_dtypes(head)["weight"], first)
        head.weight.sub_(1.0)
    merged = unload(model)
    assert merged.lm_head.weight.dtype == torch.bfloat16 and type(merged.lm_head) is torch.nn.Linear
    assert torch.equal(merged.lm_head.weight, head.weight.to(torch.bfloat16))


def test_a_saved_module_loaded_for_inference_is_stored_in_the_models_dtype(tmp_path):
    trained = tiny_llama().to(torch.bfloat16)
    inject_adapter(trained, LoraConfig(r=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        trained.lm_head.copies["default"].weight.add_(1e-3)
    save_adapter(trained, tmp_path / "a")
    ids = torch.randint(3, 400, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(ids).logits
    model = tiny_llama().to(torch.bfloat16)
    load_adapter(model, tmp_path / "a")  # trainable=False
    assert model.lm_head.copies["default"].weight.dtype == torch.bfloat16
    assert model.lm_head._in_original_dtypes(model.lm_head.copies["default"]) is None  # runs as it is, no cast
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_unloading_a_trained_copy_of_a_tied_head_says_the_model_is_untied():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.5)
    merged = unload(model)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight and merged.config.tie_word_embeddings is False
    torch.testing.assert_close(merged.lm_head.weight - 0.5, merged.model.embed_tokens.weight, atol=1e-6, rtol=0)
    untouched = tiny_llama(tie_word_embeddings=True)
    inject_adapter(untouched, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    assert unload(untouched).config.tie_word_embeddings is True  # nothing copied: still tied
