"""lorakit.fused gives the plain path's losses and gradients (1e-5 in fp32, 1e-2 relative in bf16)."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import DEVICES, dropout_way, splitmix_keep_mask, tiny_llama
from lorakit import fused
from lorakit.config import LoraConfig
from lorakit.inject import inject_adapter, lora_layers
from lorakit.layers import LoraLayer
from lorakit.loss import token_loss_sum


@contextlib.contextmanager
def plain_path():
    names = ("ENABLED", "FUSED_CROSS_ENTROPY", "FUSED_RMS_NORM", "FUSED_SILU_GATE", "FUSED_ROPE")
    saved = [getattr(fused, name) for name in names]
    for name in names:
        setattr(fused, name, False)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(fused, name, value)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make_layer(base: nn.Module, *, dropout: float = 0.0, seed: int = 0) -> LoraLayer:
    torch.manual_seed(seed)
    layer = LoraLayer(base, "layer")
    layer.add_adapter("default", r=4, alpha=8, dropout=dropout)
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)  # B starts at zero; make A's gradient non-trivial
    return layer.train()


def run(layer: LoraLayer, x: torch.Tensor, forward) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    a.grad = b.grad = None
    y = forward(x)
    torch.manual_seed(123)
    g = torch.randn_like(y)
    y.backward(g)
    return y.detach(), x.grad, a.grad.clone(), b.grad.clone()


def check(got, want, tol: float, relative: bool) -> None:
    for name, g, w in zip(("output", "grad x", "grad A", "grad B"), got, want):
        assert g.dtype == w.dtype, name
        if relative:
            assert rel(g, w) < tol, (name, rel(g, w))
        else:
            torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)


def test_lora_linear_fp32_equals_plain():
    layer = make_layer(nn.Linear(24, 40))
    x = torch.randn(3, 5, 24)
    check(run(layer, x, layer.forward), run(layer, x, layer.plain_forward), 1e-5, relative=False)


def test_lora_conv1d_fp32_equals_plain():
    from transformers.pytorch_utils import Conv1D

    layer = make_layer(Conv1D(40, 24))
    x = torch.randn(2, 7, 24)
    check(run(layer, x, layer.forward), run(layer, x, layer.plain_forward), 1e-5, relative=False)


def test_lora_linear_bf16_equals_plain():
    layer = make_layer(nn.Linear(64, 96).to(torch.bfloat16))
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    got, want = run(layer, x, layer.forward), run(layer, x, layer.plain_forward)
    check(got, want, 1e-2, relative=True)
    assert got[2].dtype == torch.float32  # fp32 master weights keep fp32 gradients


@pytest.mark.parametrize("rows", [64, 33])
def test_lora_linear_bf16_products_kernels_equal_matmuls(monkeypatch, rows):
    # On an AVX512-BF16 CPU the rank-r products run on lorakit's kernels: same results as the bf16
    # matmuls within their rounding, and the adapters' gradients closer to an fp32 computation
    from lorakit import cpu_kernels

    ops = cpu_kernels.bf16_ops()
    if ops is None:
        pytest.skip("this build has no AVX512-BF16 kernels (the CPU lacks the instructions)")
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    layer = make_layer(nn.Linear(64, 96).to(torch.bfloat16))
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "bf16_ops", lambda: Counting())
    kernels = run(layer, x, layer.forward)
    assert sorted(set(calls)) == ["lora_outer", "lora_project"] and len(calls) == 4
    monkeypatch.setattr(fused, "COMPILED_LORA_PRODUCTS", False)
    matmuls = run(layer, x, layer.forward)
    assert len(calls) == 4
    check(kernels, matmuls, 1e-2, relative=True)
    # fp32 reference: the same layer and input in fp32
    reference = make_layer(nn.Linear(64, 96))
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    exact = run(reference, x.float(), reference.forward)
    for index in (2, 3):  # grad A, grad B
        assert rel(kernels[index], exact[index]) <= rel(matmuls[index], exact[index]) + 1e-4


def test_lora_linear_adapter_dtype_compute_bf16():
    layer = make_layer(nn.Linear(64, 96).to(torch.bfloat16))
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    fused.ADAPTER_COMPUTE = "adapter"
    try:
        got = run(layer, x, layer.forward)
    finally:
        fused.ADAPTER_COMPUTE = "input"
    check(got, run(layer, x, layer.plain_forward), 1e-2, relative=True)


@pytest.mark.parametrize("how", ["kernel", "regenerate", "kept"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_lora_linear_dropout_equals_masked_reference(monkeypatch, how, dtype, tol):
    # The fused path draws its keep-mask (a seed from the run's random stream and the mask a
    # function of it, or a bool tensor); the reference redraws it from the same seed and applies
    # it with plain ops.
    dropout_way(monkeypatch, how)
    p = 0.3
    layer = make_layer(nn.Linear(32, 48).to(dtype), dropout=p)
    x = torch.randn(6, 32, dtype=dtype)

    def keep_mask():
        torch.manual_seed(7)
        if how == "kept":
            return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        if how == "kernel":
            return splitmix_keep_mask(seed, x.numel(), 1 - p).view_as(x)
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p, generator=torch.Generator().manual_seed(seed))

    def fused_forward(x):
        torch.manual_seed(7)
        return layer.forward(x)

    def reference(x):
        mask = keep_mask()
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        h = (x * mask / (1 - p)).to(a.dtype)
        return layer.base_forward(x) + (layer.scaling["default"] * F.linear(F.linear(h, a), b)).to(dtype)

    got, want = run(layer, x, fused_forward), run(layer, x, reference)
    check(got, want, tol, relative=dtype != torch.float32)
    # about p of the inputs are dropped: A's gradient sees only the kept columns' rows
    assert 0.1 < 1 - keep_mask().float().mean() < 0.5


@pytest.mark.parametrize("how", ["kernel", "regenerate", "kept"])
def test_lora_linear_dropout_keeps_no_mask_unless_kept(monkeypatch, how):
    # What forward saves for backward: with a seeded mask nothing more than without dropout; with
    # PyTorch's bernoulli mask kept, one (T, in) bool tensor.
    dropout_way(monkeypatch, how)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)

    def saved(dropout: float) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        layer = make_layer(nn.Linear(32, 48).to(torch.bfloat16), dropout=dropout)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            layer(x)
        return packed

    without, with_dropout = saved(0.0), saved(0.2)
    if how != "kept":
        assert with_dropout == without
    else:
        assert sorted(with_dropout, key=str) == sorted(without + [(torch.bool, (10, 32))], key=str)


def test_lora_linear_eval_and_no_grad_use_plain_path():
    layer = make_layer(nn.Linear(16, 8), dropout=0.5).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.plain_forward(x))


def test_lora_linear_4bit_equals_plain():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 128, bias=False)
    q = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantizes
    q.weight.requires_grad_(False)
    layer = make_layer(q)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    check(run(layer, x, layer.forward), run(layer, x, layer.plain_forward), 1e-2, relative=True)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_equals_full_logits(softcap, device):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16).to(device).requires_grad_(True)
    weight = torch.randn(50, 16).to(device)
    targets = torch.randint(0, 50, (37,)).to(device)
    targets[::5] = -100
    got = fused.linear_cross_entropy_sum(hidden, weight, targets, chunk=8, softcap=softcap)
    (g_got,) = torch.autograd.grad(2.5 * got, hidden)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (g_want,) = torch.autograd.grad(2.5 * want, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softmax_rows", [5, 8])  # 8: the whole chunk at once, as on a GPU
@pytest.mark.parametrize("compiled", [False, True])  # True: on CPU the compiled loss kernel, no slices
@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_workspace_and_row_slices(monkeypatch, dtype, softmax_rows, compiled, device):
    # softmax slices of 5 rows over chunks of 8: slice and chunk boundaries fall everywhere; the kept
    # workspace must give the same result when reused for a call with fewer rows
    monkeypatch.setattr(fused, "SOFTMAX_ROWS", softmax_rows)
    monkeypatch.setattr(fused, "COMPILED_CROSS_ENTROPY", compiled)
    torch.manual_seed(0)
    weight = torch.randn(50, 16).to(device, dtype)
    workspace: dict = {}
    for rows in (37, 21):
        hidden = torch.randn(rows, 16).to(device, dtype).requires_grad_(True)
        targets = torch.randint(0, 50, (rows,)).to(device)
        targets[::4] = -100
        got = fused.linear_cross_entropy_sum(hidden, weight, targets, chunk=8, workspace=workspace)
        (g_got,) = torch.autograd.grad(got, hidden)
        logits = (hidden @ weight.t()).float()
        want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        (g_want,) = torch.autograd.grad(want, hidden)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert abs(got.detach().item() - want.detach().item()) <= tol * abs(want.detach().item())
        assert rel(g_got, g_want) < tol
    assert workspace["logits"].shape == (8, 50) and workspace["logits"].dtype == dtype
    sliced = not (compiled and device == "cpu")
    assert ("fp32" in workspace) == (dtype != torch.float32 and sliced)


def test_linear_cross_entropy_when_the_target_probability_underflows():
    # logit gaps of ~300: the targets' fp32 probabilities are 0, yet their loss is finite and exact
    torch.manual_seed(0)
    hidden = torch.eye(16, dtype=torch.float64)[:6]  # logits[i, v] = weight[v, i]
    weight = torch.randn(50, 16, dtype=torch.float64)
    weight[0] = 300.0  # token 0 wins every row by a wide margin
    targets = torch.tensor([1, 2, 3, 0, 4, -100])
    logits = hidden @ weight.t()
    assert (torch.softmax(logits.float(), 1)[torch.arange(5), targets[:5]][[0, 1, 2, 4]] == 0).all()
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    got = fused.linear_cross_entropy_sum(hidden.float(), weight.float(), targets, chunk=4)
    assert torch.isfinite(got) and want.item() > 4 * 100
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_equals_transformers(monkeypatch, compiled, dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(fused, "COMPILED_RMS_NORM", compiled)

    torch.manual_seed(0)
    norm = LlamaRMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 7, 32) * 3).to(dtype)
    grad_out = torch.randn(2, 7, 32).to(dtype)
    results = []
    for forward in (norm, lambda t: fused.rms_norm(t, norm.weight, norm.variance_epsilon)):
        norm.weight.grad = None
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        y.backward(grad_out)
        results.append((y.detach(), xi.grad, norm.weight.grad.clone()))
    (y, gx, gw), (y_want, gx_want, gw_want) = results[1], results[0]
    if compiled:  # its sum of squares runs in another order: the output may move by a few units in the last place
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(y, y_want, rtol=4 * ulp, atol=4 * ulp * float(y_want.abs().max()))
    else:
        assert torch.equal(y, y_want)  # the forward is the same ops in the same order
    assert gx.dtype == dtype and gw.dtype == dtype
    assert rel(gx, gx_want) < tol and rel(gw, gw_want) < tol, (rel(gx, gx_want), rel(gw, gw_want))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 50, 96), (1, 17, 96)])
def test_compiled_rms_norm_equals_the_pytorch_one(monkeypatch, x_dtype, w_dtype, shape):
    # 150 rows: several parallel chunks, whose weight-gradient partial sums are added at the end;
    # 17 rows: two chunks of unequal size, one per thread
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(x_dtype)
    weight = torch.empty(shape[-1]).uniform_(0.5, 1.5, generator=gen).to(w_dtype)
    grad = torch.randn(*shape, generator=gen)
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(fused, "COMPILED_RMS_NORM", compiled)
        xi, wi = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = fused.rms_norm(xi, wi, 1e-5)
        y.backward(grad.to(y.dtype))
        results[compiled] = (y.detach(), xi.grad, wi.grad)
    tol = 1e-5 if x_dtype == w_dtype == torch.float32 else 1e-2
    for name, got, want in zip(("output", "grad x", "grad weight"), results[True], results[False]):
        assert got.dtype == want.dtype, name  # output promoted as `weight * normed` promotes
        assert rel(got, want) < tol, (name, rel(got, want))


def test_use_fused_rms_norm_only_switches_the_llama_formula():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class GemmaStyleRMSNorm(nn.Module):  # weight applied as (1 + weight): must keep its forward
        def __init__(self, n):
            super().__init__()
            self.eps = 1e-6
            self.weight = nn.Parameter(torch.zeros(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    model = nn.Sequential(LlamaRMSNorm(16), GemmaStyleRMSNorm(16), nn.LayerNorm(16))
    assert fused.use_fused_rms_norm(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    assert fused.use_fused_rms_norm(model) == 0  # already switched
    x = torch.randn(3, 16)
    torch.testing.assert_close(model[1](x), GemmaStyleRMSNorm(16)(x))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_silu_gate_equals_transformers_mlp_gate(monkeypatch, compiled, dtype, tol):
    # 3 x 50 x 700 elements: several parallel chunks of the compiled kernel
    monkeypatch.setattr(fused, "COMPILED_SILU_GATE", compiled)
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 50, 700, generator=gen) * 4).to(dtype), torch.randn(3, 50, 700, generator=gen).to(dtype)
    grad = torch.randn(3, 50, 700, generator=gen).to(dtype)
    results = []
    for forward in (lambda g, u: F.silu(g) * u, fused.silu_gate):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        y = forward(g, u)
        y.backward(grad)
        results.append((y.detach(), g.grad, u.grad))
    (y_want, gg_want, gu_want), (y, gg, gu) = results
    exact = [t.double().requires_grad_(True) for t in (gate, up)]
    (F.silu(exact[0]) * exact[1]).backward(grad.double())
    if not compiled:  # autograd's ops, one by one
        assert torch.equal(y, y_want) and torch.equal(gg, gg_want) and torch.equal(gu, gu_want)
        return
    # its vectorized expf rounds differently: a few fp32 units, one bf16 unit now and then
    ulp = torch.finfo(dtype).eps
    assert ((y - y_want).abs() <= 4 * ulp * y_want.abs()).all()
    assert dtype == torch.float32 or (y != y_want).float().mean() < 2e-3
    for got, want, truth in ((gg, gg_want, exact[0].grad), (gu, gu_want, exact[1].grad)):
        assert got.dtype == dtype and rel(got, want) < tol, rel(got, want)
        assert rel(got, truth) <= max(tol / 10, 1.01 * rel(want, truth))  # rounded once: no further from fp64


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_gate_gradients_into_inputs_are_the_same_gradients(monkeypatch, compiled, dtype):
    monkeypatch.setattr(fused, "COMPILED_SILU_GATE", compiled)
    gen = torch.Generator().manual_seed(1)
    gate0, up0 = (torch.randn(3, 50, 700, generator=gen) * 4).to(dtype), torch.randn(3, 50, 700, generator=gen).to(dtype)
    grad = torch.randn(3, 50, 700, generator=gen).to(dtype)
    results = []
    for into_inputs in (False, True):
        g, u = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        gate, up = g * 1, u * 1  # the MLP's case: temporaries made in forward
        y = fused.silu_gate(gate, up, gradients_into_inputs=into_inputs)
        versions = gate._version, up._version
        y.backward(grad)
        results.append((y.detach(), g.grad, u.grad))
        if into_inputs:
            # the gradients went into gate's and up's own storage, and their versions moved as an
            # in-place op's would
            assert torch.equal(gate.detach(), g.grad) and torch.equal(up.detach(), u.grad)
            assert gate._version > versions[0] and up._version > versions[1]
        else:
            assert torch.equal(gate.detach(), gate0) and torch.equal(up.detach(), up0)
    (y_want, gg_want, gu_want), (y, gg, gu) = results
    assert torch.equal(y, y_want) and torch.equal(gg, gg_want) and torch.equal(gu, gu_want)


def test_silu_gate_gradients_into_inputs_refuse_a_second_backward():
    g, u = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    y = fused.silu_gate(g * 1, u * 1, gradients_into_inputs=True).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*SILU_GATE_GRADIENTS_IN_PLACE = False"):
        y.backward()


def test_silu_gate_keeps_one_tensor_less():
    # autograd keeps gate, silu(gate) and up; the fused gate keeps gate and up
    gate, up = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    for forward, kept in ((lambda: F.silu(gate) * up, 3), (lambda: fused.silu_gate(gate, up), 2)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            forward()
        assert len(saved) == kept and all(t.shape == (4, 64) for t in saved)


def test_use_fused_silu_gate_only_switches_the_swiglu_formula():
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    class ShiftedGate(LlamaMLP):  # the same parts in another formula: the probe tells them apart
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) + 1)

    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4)
    llama, gelu, shifted = LlamaMLP(config), LlamaMLP(config), ShiftedGate(config)
    gelu.act_fn = ACT2FN["gelu_pytorch_tanh"]  # Gemma's gate: keeps its forward
    model = nn.Sequential(llama, gelu, shifted)
    assert fused.use_fused_silu_gate(model) == 1
    assert "forward" in vars(llama) and "forward" not in vars(gelu) and "forward" not in vars(shifted)
    assert fused.use_fused_silu_gate(model) == 0  # already switched
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = llama.down_proj(F.silu(llama.gate_proj(x)) * llama.up_proj(x))
    torch.testing.assert_close(llama(x), want, rtol=1e-6, atol=1e-6)


def test_switching_probes_leave_training_mode_and_the_random_stream_alone():
    # probed in eval mode: in training mode LoRA dropout would make the two sides differ and draw
    # from the run's random stream, which moves every dropout mask of the run after it
    model = tiny_llama(seed=0)
    inject_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    model.train()
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    assert fused.use_fused_silu_gate(model) == 2 and fused.use_fused_rms_norm(model) == 2 * 2 + 1
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(m.training for m in model.modules())


@pytest.fixture
def llama_rope(monkeypatch):
    """transformers' Llama modeling file with its own `apply_rotary_pos_emb` back (an earlier test may have
    switched it; the switch is process-wide), restored after the test; yields the file and that function."""
    from transformers.models.llama import modeling_llama

    function = modeling_llama.apply_rotary_pos_emb
    original = getattr(function, "_lorakit_original", function)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    yield modeling_llama, original


def _count_kernel_calls(monkeypatch) -> list:
    calls: list = []
    apply = fused._Rope.apply
    monkeypatch.setattr(fused._Rope, "apply", lambda *args: calls.append(args[0].shape) or apply(*args))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_use_fused_rope_switches_llama_and_keeps_its_bits(monkeypatch, llama_rope, dtype):
    modeling_llama, original = llama_rope
    model = tiny_llama(seed=0).to(dtype)
    inject_adapter(model, LoraConfig(r=4, alpha=8))
    assert fused.use_fused_rope(model) == 1
    assert modeling_llama.apply_rotary_pos_emb._lorakit_original is original
    assert fused.use_fused_rope(model) == 0  # already switched
    calls = _count_kernel_calls(monkeypatch)
    model.train()
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].normal_(0, 0.05)
    ids = torch.randint(3, 400, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    results = []
    for switched in (True, False):
        monkeypatch.setattr(fused, "FUSED_ROPE", switched)
        model.zero_grad()
        logits = model(input_ids=ids, position_ids=positions).logits
        logits.float().square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert len(calls) == 2  # the two layers, with the switch on only
    (logits, grads), (want_logits, want_grads) = results
    assert torch.equal(logits, want_logits)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


FIXED_PARTIAL_ROPE = """
def rotate(x):  # Llama's rotation of the first 8 dimensions only: equal to Llama's at head_dim 8
    x, rest = x[..., :8], x[..., 8:]
    return torch.cat((torch.cat((-x[..., 4:], x[..., :4]), dim=-1), torch.zeros_like(rest)), dim=-1)
"""
INTERLEAVED_ROPE = """
def rotate(x):  # GPT-J's interleaved rotation
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
"""


@pytest.mark.parametrize("rotate", [INTERLEAVED_ROPE, FIXED_PARTIAL_ROPE], ids=["interleaved", "fixed_partial"])
def test_fused_rope_leaves_other_formulas_and_calls_alone(monkeypatch, llama_rope, rotate):
    # a modeling file with the same signature and another formula
    source = types.ModuleType("lorakit_test_other_rope")
    exec(
        "import torch\n"
        + rotate
        + "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):\n"
        "    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)\n"
        "    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin\n"
        "class Attention(torch.nn.Module):\n"
        "    def forward(self, q, k, cos, sin):\n"
        "        return apply_rotary_pos_emb(q, k, cos, sin)\n",
        source.__dict__,
    )
    monkeypatch.setitem(sys.modules, source.__name__, source)
    other = source.apply_rotary_pos_emb
    assert fused.use_fused_rope(source.Attention()) == 0 and source.apply_rotary_pos_emb is other

    # Llama's, switched: calls the kernel does not cover go to the original, with its result
    modeling_llama, original = llama_rope
    assert fused.use_fused_rope(tiny_llama(seed=0)) == 1
    switched = modeling_llama.apply_rotary_pos_emb
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    cos, sin = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    others = [
        ((q.half(), k.half(), cos.half(), sin.half()), {}),  # a dtype without a kernel
        ((q.transpose(1, 2), k.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2}),  # (B, T, H, D) layout
        ((q, k, cos.clone().requires_grad_(True), sin), {}),  # a learned rotation
        ((q, k.bfloat16(), cos, sin), {}),  # mixed dtypes
    ]
    for args, kwargs in others:
        assert all(torch.equal(a, b) for a, b in zip(switched(*args, **kwargs), original(*args, **kwargs)))
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(switched(q, k, cos, sin), original(q, k, cos, sin)))
    assert len(calls) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_fused_rope_on_each_device_equals_transformers(monkeypatch, llama_rope, device):
    # on CPU the kernel computes it, elsewhere transformers' ops do: the same bits either way
    modeling_llama, original = llama_rope
    assert fused.use_fused_rope(tiny_llama(seed=0)) == 1
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4 * 8, generator=gen).bfloat16().view(2, 6, 4, 8).transpose(1, 2).to(device)
    k = torch.randn(2, 6, 2 * 8, generator=gen).bfloat16().view(2, 6, 2, 8).transpose(1, 2).to(device)
    cos, sin = (torch.randn(2, 6, 8, generator=gen).bfloat16().to(device) for _ in range(2))
    got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, original(q, k, cos, sin)))
    assert len(calls) == (1 if device == "cpu" else 0)


def _model_step(dtype: torch.dtype, dropout: float = 0.0, device: str = "cpu") -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_llama(seed=0).to(device, dtype)
    model.config.final_logit_softcapping = None
    inject_adapter(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    if fused.FUSED_RMS_NORM:
        assert fused.use_fused_rms_norm(model) == 2 * 2 + 1
    if fused.FUSED_SILU_GATE:
        assert fused.use_fused_silu_gate(model) == 2
    fused.use_fused_rope(model)  # process-wide: off in the plain path through FUSED_ROPE
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].normal_(0, 0.05)
    model.train()
    torch.manual_seed(2)
    ids = torch.randint(3, 400, (2, 24))
    labels = ids.clone()
    labels[:, :3] = -100
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two packed examples per row
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}
    loss, count = token_loss_sum(model, batch, chunk_tokens=16)
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach() / count), grads


@pytest.mark.parametrize("device", DEVICES)
def test_model_step_fp32_equals_plain(device):
    loss, grads = _model_step(torch.float32, device=device)
    with plain_path():
        want_loss, want = _model_step(torch.float32, device=device)
    assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    assert grads.keys() == want.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_model_step_bf16_equals_plain(device):
    # In bf16 the plain path's gradients are themselves ~0.8% (relative, all together) away from
    # its fp32 result on this tiny model, and the fused path's about as far in other directions:
    # the two bf16 paths sit 0.9% (CPU) to 1.0% (H200) apart, two roundings' worth. Checked: the
    # loss within 1e-2 of the plain bf16 path's; all gradients together within 1e-2 of the plain
    # path's exact (fp32) result and no further from it than the plain bf16 path is; within 1.5e-2
    # of the plain bf16 path; each tensor within 3e-2 of it.
    loss, grads = _model_step(torch.bfloat16, device=device)
    with plain_path():
        want_loss, want = _model_step(torch.bfloat16, device=device)
        _, exact = _model_step(torch.float32, device=device)
    assert abs(loss - want_loss) <= 1e-2 * abs(want_loss)

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[n].flatten().float() for n in sorted(d)])

    assert rel(flat(grads), flat(exact)) < 1e-2
    assert rel(flat(grads), flat(exact)) <= 1.25 * rel(flat(want), flat(exact))
    assert rel(flat(grads), flat(want)) < 1.5e-2
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert rel(grads[name], want[name]) < 3e-2, (name, rel(grads[name], want[name]))
