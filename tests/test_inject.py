"""Injecting adapters into whole models: targeting, freezing, switching, merging, unloading."""

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from lorakit import (
    LoraConfig,
    UserError,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    merge_adapter,
    set_active_adapter,
    unload,
    unmerge_adapter,
    use_adapter,
)
from lorakit.inject import find_targets, lora_layers


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
    assert "matches no layer" in str(err.value) and "q_proj" in str(err.value)


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


def test_duplicate_adapter_name():
    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, alpha=2))
    with pytest.raises(UserError, match="already on the model"):
        inject_adapter(model, LoraConfig(r=2, alpha=2))
