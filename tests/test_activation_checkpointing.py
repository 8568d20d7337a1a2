"""lorakit.activation_checkpointing: full and selective checkpointing (both of its ways: saved-tensor
hooks without a rerun, and the rerun with kept outputs) give the plain path's loss and gradients (on
CPU the same bits); the full rerun leaves out the projection nothing after it needs, selective
checkpointing every frozen projection and the attention; the hooks way recomputes each norm and
SwiGLU output once and raises on a saved tensor changed in place, the rerun way recomputes a kept
output changed in place instead of replaying it; nothing outlives the step; no gradient for the
first layer's input; Llama, GPT-2, Qwen2, Qwen3, OLMo 2, Phi-3, GPT-NeoX and Gemma 3."""

from __future__ import annotations

import weakref

import pytest
import torch
import transformers
from transformers.modeling_layers import GradientCheckpointingLayer

from helpers import DEVICES, dropout_way, tiny_gpt2, tiny_llama
from lorakit import activation_checkpointing, attention, fused
from lorakit.config import LoraConfig
from lorakit.inject import inject_adapter
from lorakit.layers import LoraLayer

LAYERS = 4
PROJECTIONS = 7  # q, k, v, o, gate, up, down per Llama layer
# The modes `_run` takes besides `enable`'s: selective checkpointing made to take its rerun way
SELECTIVE_RERUN = "selective (rerun)"
MODES = (True, "full", "selective", SELECTIVE_RERUN)


def _enable(model, mode, monkeypatch=None) -> None:
    """`activation_checkpointing.enable`, SELECTIVE_RERUN included (the switch is read at each
    layer's first call: it stays set until the caller's test ends)."""
    if mode == SELECTIVE_RERUN:
        assert monkeypatch is not None
        monkeypatch.setattr(activation_checkpointing, "SELECTIVE_WITHOUT_RERUN", False)
        mode = "selective"
    elif monkeypatch is not None:
        monkeypatch.setattr(activation_checkpointing, "SELECTIVE_WITHOUT_RERUN", True)
    activation_checkpointing.enable(model, mode)


def _model(dtype: torch.dtype, dropout: float = 0.0, packed: bool = False, device: str = "cpu"):
    model = tiny_llama(num_hidden_layers=LAYERS, attn_implementation="sdpa").to(device, dtype)
    if packed:
        assert attention.use_varlen_attention(model)
    inject_adapter(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    fused.use_fused_rms_norm(model)  # as `lorakit train` runs it
    assert fused.use_fused_silu_gate(model) == LAYERS
    fused.use_fused_rope(model)  # process-wide, so maybe switched already
    return model.train(), _count_base_calls(model)


def _count_base_calls(model) -> dict:
    """Give every adapter a nonzero B (B = 0 would hide adapter mistakes) and count the calls of
    the frozen projections under the adapters."""
    gen = torch.Generator().manual_seed(1)
    calls = {"n": 0}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            b = module.lora_B[module.active_adapter]
            b.data.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            base = module.base_forward

            def counted(x, base=base, out=None):
                calls["n"] += 1
                return base(x, out=out)

            module.base_forward = counted
    return calls


def _batch(packed: bool):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 400, (2, 40), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:  # two examples per row: the blocked attention kernel runs per example
        batch["position_ids"] = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, -1)
    return batch


def _run(mode, dtype=torch.float32, dropout=0.0, packed=False, hook=None, device="cpu", monkeypatch=None):
    """Loss, gradients of the adapters, base-projection calls in forward and in backward."""
    model, calls = _model(dtype, dropout, packed, device)
    if hook is not None:
        model.model.layers[0].self_attn.q_proj.register_forward_hook(hook)
    if mode:
        _enable(model, mode, monkeypatch)
    torch.manual_seed(5)  # dropout masks
    loss = model(**{k: v.to(device) for k, v in _batch(packed).items()}).loss
    forward_calls = calls["n"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward_calls, calls["n"] - forward_calls


def _assert_close(got, want, dtype):
    assert got[1].keys() == want[1].keys() and len(want[1]) == 2 * LAYERS * PROJECTIONS
    for name, grad in want[1].items():
        if dtype == torch.float32:
            torch.testing.assert_close(got[1][name], grad, rtol=0, atol=1e-5, msg=name)
        else:
            assert (got[1][name].float() - grad.float()).norm() <= 1e-2 * grad.float().norm(), name
    torch.testing.assert_close(got[0], want[0], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.parametrize("dtype,dropout,packed", [(torch.float32, 0.1, False), (torch.float32, 0.0, True), (torch.bfloat16, 0.0, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_checkpointing_modes_give_the_plain_gradients(dtype, dropout, packed, device, monkeypatch):
    plain = _run(False, dtype, dropout, packed, device=device)
    assert plain[2] == LAYERS * PROJECTIONS and plain[3] == 0
    for mode in MODES:
        got = _run(mode, dtype, dropout, packed, device=device, monkeypatch=monkeypatch)
        _assert_close(got, plain, dtype)
        assert got[2] == LAYERS * PROJECTIONS
        # backward reruns every layer but the last: full recomputes its projections but down_proj
        # (the rerun stops once down_proj's saved tensors are back), selective none
        assert got[3] == (0 if mode in ("selective", SELECTIVE_RERUN) else (LAYERS - 1) * (PROJECTIONS - 1)), mode
        if device == "cpu":  # the rerun computes or keeps what the forward did: the same bits
            assert torch.equal(got[0], plain[0]) and all(torch.equal(got[1][k], g) for k, g in plain[1].items())


@pytest.mark.parametrize("how", ["regenerate", "kept"])
def test_checkpointing_replays_each_way_of_drawing_dropout(monkeypatch, how):
    # The test above runs LoRA dropout through the CPU kernel; the GPUs' way (a seeded private
    # generator, the mask drawn again in backward) and the kept bernoulli mask replay too.
    dropout_way(monkeypatch, how)
    plain = _run(False, torch.float32, 0.1)
    for mode in (True, "selective", SELECTIVE_RERUN):
        got = _run(mode, torch.float32, 0.1, monkeypatch=monkeypatch)
        assert torch.equal(got[0], plain[0]) and all(torch.equal(got[1][k], g) for k, g in plain[1].items()), mode


def test_selective_rerun_reuses_the_attention_output(monkeypatch):
    # Packed rows on CPU go through the blocked kernel; in PyTorch it makes 2 batched GEMMs per
    # query block forward (scores, probabilities @ values), 4 backward. Its selective rerun takes
    # the output and the probabilities back: no GEMM.
    monkeypatch.setattr(attention, "COMPILED_ATTENTION", False)
    calls = {"n": 0}
    real_bmm = torch.bmm

    def counting_bmm(*args, **kwargs):
        calls["n"] += 1
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    counts = {}
    for mode in (True, "selective", SELECTIVE_RERUN):
        model, _ = _model(torch.float32, packed=True)
        _enable(model, mode, monkeypatch)
        calls["n"] = 0
        loss = model(**_batch(packed=True)).loss
        forward = calls["n"]
        loss.backward()
        counts[mode] = (forward, calls["n"] - forward)
    forward, full_backward = counts[True]
    blocks = forward // (2 * LAYERS)  # query blocks per layer
    assert blocks > 0 and forward == 2 * LAYERS * blocks
    assert full_backward == 2 * (LAYERS - 1) * blocks + 4 * LAYERS * blocks
    assert counts["selective"] == counts[SELECTIVE_RERUN] == (forward, 4 * LAYERS * blocks)


def test_selective_rerun_reuses_the_compiled_attention_output(monkeypatch):
    # The compiled kernel runs once per layer in forward; the full rerun calls it again, the
    # selective one takes the kept output and probabilities back (the gradients are held equal by
    # test_checkpointing_modes_give_the_plain_gradients).
    from lorakit import cpu_kernels

    real = cpu_kernels.ops()
    calls = []

    class Counting:
        def attention_forward(self, *args):
            calls.append(args)
            return real.attention_forward(*args)

        def __getattr__(self, name):  # the other kernels as they are
            return getattr(real, name)

    monkeypatch.setattr(cpu_kernels, "ops", lambda: Counting())
    for mode, reruns in ((True, LAYERS - 1), ("selective", 0), (SELECTIVE_RERUN, 0)):
        model, _ = _model(torch.float32, packed=True)
        _enable(model, mode, monkeypatch)
        calls.clear()
        model(**_batch(packed=True)).loss.backward()
        assert len(calls) == LAYERS + reruns, mode


def test_output_changed_in_place_is_recomputed_not_replayed(monkeypatch):
    def doubled(module, inputs, output):
        output.mul_(2)  # after the LoRA layer returned (and the rerun way of selective checkpointing kept) it

    plain = _run(False, hook=doubled)
    got = _run(SELECTIVE_RERUN, hook=doubled, monkeypatch=monkeypatch)
    _assert_close(got, plain, torch.float32)
    assert got[3] == 1  # layer 0's q_proj only: its kept output went stale, so the rerun computed it
    # without a rerun, nothing saves q_proj's output (the attention saves the rotated q, computed after)
    got = _run("selective", hook=doubled, monkeypatch=monkeypatch)
    assert torch.equal(got[0], plain[0]) and all(torch.equal(got[1][k], g) for k, g in plain[1].items())
    assert got[3] == 0


def test_saved_tensor_changed_in_place_raises_as_without_checkpointing(monkeypatch):
    # The second layer's input is saved by its norm (and, without a rerun, read by the recipe of
    # the norm's output): changing it after the layer ran spoils what backward reads. Autograd
    # refuses that without checkpointing, and so does the hooks way of selective checkpointing.
    def doubled_input(module, args, output):
        with torch.no_grad():
            args[0].mul_(2)

    for mode in (False, "selective"):
        model, _ = _model(torch.float32)
        if mode:
            _enable(model, mode, monkeypatch)
        model.model.layers[1].register_forward_hook(doubled_input)
        loss = model(**_batch(packed=False)).loss
        with pytest.raises(RuntimeError, match="modified by an inplace operation|changed in place"):
            loss.backward()


def test_hooks_recompute_each_norm_and_gate_once(monkeypatch):
    # Without a rerun a checkpointed Llama layer keeps a recipe for its two norm outputs (read by
    # q/k/v and by gate/up) and its SwiGLU product (read by down_proj), and computes each once.
    computed = []
    real = activation_checkpointing._Recipe.get

    def counted(recipe):
        if recipe.value is None:
            computed.append(recipe)
        return real(recipe)

    monkeypatch.setattr(activation_checkpointing._Recipe, "get", counted)
    model, _ = _model(torch.float32)
    _enable(model, "selective", monkeypatch)
    loss = model(**_batch(packed=False)).loss
    layers = model.model.layers
    assert [layer._gradient_checkpointing_func.by_hooks for layer in layers[:-1]] == [True] * (LAYERS - 1)
    assert not layers[-1].gradient_checkpointing
    loss.backward()
    # the first layer's first norm has no backward (nothing before it needs a gradient): its output is kept
    assert len(computed) == 3 * (LAYERS - 1) - 1
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    assert sorted(r.value.shape[-1] for r in computed) == [hidden] * (2 * (LAYERS - 1) - 1) + [inter] * (LAYERS - 1)


def test_kept_outputs_die_with_the_step(monkeypatch):
    stores = []

    class Tracked(activation_checkpointing.KeptOutputs):
        def __init__(self):
            super().__init__()
            stores.append(weakref.ref(self))

    class TrackedRecipe(activation_checkpointing._Recipe):
        __slots__ = ("__weakref__",)

        def __init__(self, *args):
            super().__init__(*args)
            stores.append(weakref.ref(self))

    monkeypatch.setattr(activation_checkpointing, "KeptOutputs", Tracked)
    monkeypatch.setattr(activation_checkpointing, "_Recipe", TrackedRecipe)
    for mode, kept in ((SELECTIVE_RERUN, LAYERS - 1), ("selective", 3 * (LAYERS - 1) - 1)):
        stores.clear()
        model, _ = _model(torch.float32)
        _enable(model, mode, monkeypatch)
        loss = model(**_batch(packed=False)).loss
        assert len(stores) == kept and all(ref() is not None for ref in stores), mode
        loss.backward()
        del loss
        assert all(ref() is None for ref in stores), mode  # freed by reference counting: no cycle left behind


def test_last_layer_is_not_checkpointed():
    model = tiny_llama(num_hidden_layers=3)
    activation_checkpointing.enable(model, "selective")
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, True, False]
    with pytest.raises(ValueError, match="'sometimes'"):
        activation_checkpointing.enable(model, "sometimes")


def _family(name: str):
    torch.manual_seed(0)
    if name == "gpt2":  # Conv1D projections, q/k/v from one c_attn
        return tiny_gpt2(n_layer=3)
    shape = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attn_implementation="sdpa",
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if name in ("phi3", "gpt_neox"):  # no separate head_dim; GPT-NeoX: no grouped KV heads either
        shape = {k: v for k, v in shape.items() if k != "head_dim" and (name == "phi3" or k != "num_key_value_heads")}
    config, model = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # biased q/k/v
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),  # RMSNorms on q and k per head
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),  # norms after the attention and after the MLP
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),  # fused qkv_proj and gate_up_proj
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),  # LayerNorm, fused query_key_value, parallel residual
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),  # q/k norms, a norm after the MLP, GELU gate
    }[name]
    return getattr(transformers, model)(getattr(transformers, config)(**shape))


# Projections the full rerun computes again in the two checkpointed layers of `_family`'s models.
# It stops once the last saved tensor is back: in Qwen2, Qwen3, Phi-3 and GPT-NeoX that is the last
# projection's own, so that projection is never rerun; OLMo 2's and Gemma 3's norms after the MLP
# read its output, and GPT-2's dropout after the MLP saves a mask.
FULL_RERUN_PROJECTIONS = {"gpt2": 2 * 4, "qwen2": 2 * 6, "qwen3": 2 * 6, "olmo2": 2 * 7, "phi3": 2 * 3, "gpt_neox": 2 * 3,
                          "gemma3": 2 * 7}  # fmt: skip
# Llama-style MLPs with separate gate and up projections, and RMSNorms of Llama's formula: the
# selective mode keeps recipes instead of rerunning those layers
SWIGLU_FAMILIES = ("qwen2", "qwen3", "olmo2")


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2", "qwen3", "olmo2", "phi3", "gpt_neox", "gemma3"])
def test_checkpointing_across_model_families(family, mode):
    results = {}
    for m in (False, mode):
        model = _family(family)
        inject_adapter(model, LoraConfig(r=4, alpha=8))
        fused.use_fused_rms_norm(model)
        assert fused.use_fused_silu_gate(model) == (3 if family in SWIGLU_FAMILIES else 0)
        fused.use_fused_rope(model)  # GPT-2 has no rotary embeddings
        base_calls = _count_base_calls(model)
        model.train()
        if m:
            activation_checkpointing.enable(model, m)
        torch.manual_seed(3)  # GPT-2's dropout
        ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        forward_calls = base_calls["n"]
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[m] = (loss.detach(), grads, forward_calls, base_calls["n"] - forward_calls)
    plain, got = results[False], results[mode]
    assert got[1].keys() == plain[1].keys() and plain[1]
    if mode == "full":
        # the rerun computes what the forward computed, in the same order: the same bits
        assert torch.equal(got[0], plain[0])
        for name, grad in plain[1].items():
            assert torch.equal(got[1][name], grad), name
    else:
        torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=0)
        for name, grad in plain[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=0, atol=1e-5, msg=name)
    assert got[2] == plain[2] > 0 and got[3] == (FULL_RERUN_PROJECTIONS[family] if mode == "full" else 0)
    if mode == "selective":  # without a rerun where the norms and the MLP are lorakit's fused ones
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        assert len(layers) == 2
        assert all(layer._gradient_checkpointing_func.by_hooks == (family in SWIGLU_FAMILIES) for layer in layers)


@pytest.mark.parametrize("mode", [True, "selective"])
def test_first_layer_input_gradient_is_not_computed(mode):
    # transformers' checkpointing makes the embeddings' output require grad (for reentrant
    # checkpointing); lorakit's non-reentrant checkpoints take that back, so backward computes no
    # gradient for the first layer's input: as many dense input-gradient products as without
    # checkpointing, and none into the embeddings' output
    counts, embedded = {}, []
    for checkpointed in (False, True):
        model, _ = _model(torch.float32)
        if checkpointed:
            activation_checkpointing.enable(model, mode)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: embedded.append(out))
        dense = [0]
        for module in model.modules():
            if isinstance(module, LoraLayer):
                weight = module._dense_weight_like  # called once per input-gradient product

                def counted(g, weight=weight):
                    dense[0] += 1
                    return weight(g)

                module._dense_weight_like = counted
        loss = model(**_batch(packed=False)).loss
        loss.backward()
        counts[checkpointed] = dense[0]
        assert not embedded[-1].requires_grad and embedded[-1].grad is None
    assert counts[True] == counts[False] == PROJECTIONS * LAYERS - 3  # the first layer's q, k, v need no input gradient
