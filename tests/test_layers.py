"""LoraLayer against the dense reference W + s·B@A, for every base kind."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import UserError
from lorakit.layers import LoraLayer


def _randomise(layer: LoraLayer, name: str = "default") -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_A[name].normal_(std=0.1)
        layer.lora_B[name].normal_(std=0.1)


def test_linear_equals_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoraLayer(base, "proj")
    layer.add_adapter("default", r=4, alpha=8)
    _randomise(layer)
    x = torch.randn(3, 5, 16)
    s = 8 / 4
    dense = w + s * layer.lora_B["default"].detach() @ layer.lora_A["default"].detach()
    torch.testing.assert_close(layer(x), x @ dense.t() + b, atol=1e-6, rtol=0)
    assert layer.weight is base.weight  # the base weight keeps its name and identity


def test_conv1d_equals_dense_reference():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # GPT-2 layout: weight (in=16, out=12)
    nn.init.normal_(base.weight, std=0.2)
    layer = LoraLayer(base, "c_attn")
    layer.add_adapter("default", r=3, alpha=6, rslora=True)
    _randomise(layer)
    x = torch.randn(2, 7, 16)
    s = 6 / math.sqrt(3)
    dense = base.weight.detach().t() + s * layer.lora_B["default"].detach() @ layer.lora_A["default"].detach()
    torch.testing.assert_close(layer(x), x @ dense.t() + base.bias.detach(), atol=1e-6, rtol=0)
    assert layer.lora_A["default"].shape == (3, 16) and layer.lora_B["default"].shape == (12, 3)


def test_embedding_equals_dense_reference():
    torch.manual_seed(0)
    base = nn.Embedding(30, 8, padding_idx=0)
    layer = LoraLayer(base, "embed_tokens")
    layer.add_adapter("default", r=2, alpha=4)
    _randomise(layer)
    ids = torch.randint(0, 30, (3, 6))
    dense = base.weight.detach() + 2.0 * (layer.lora_B["default"] @ layer.lora_A["default"]).detach().t()
    torch.testing.assert_close(layer(ids), dense[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 12), lambda: Conv1D(12, 16), lambda: nn.Embedding(16, 12)])
def test_merge_unmerge_keep_outputs(make):
    torch.manual_seed(0)
    base = make()
    nn.init.normal_(base.weight)
    layer = LoraLayer(base, "m")
    layer.add_adapter("default", r=4, alpha=4)
    _randomise(layer)
    x = torch.randint(0, 16, (4, 3)) if isinstance(base, nn.Embedding) else torch.randn(4, 16)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged == ["default"]
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_default_init_is_kaiming_uniform_and_zero_b():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(100, 50), "m")
    layer.add_adapter("default", r=8, alpha=16)
    a = layer.lora_A["default"]
    bound = 1 / math.sqrt(100)  # kaiming_uniform with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), layer.base_forward(x), atol=0, rtol=0)


def test_gaussian_init_std():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(2000, 10), "m")
    layer.add_adapter("default", r=4, alpha=8, init="gaussian")
    assert abs(layer.lora_A["default"].std().item() - 0.25) < 0.01


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_keep_the_function(init):
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    x = torch.randn(5, 24)
    expected = base(x).detach()
    w0 = base.weight.detach().clone()
    layer = LoraLayer(base, "m")
    layer.add_adapter("default", r=4, alpha=8, init=init)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(layer.weight, w0)  # the principal part moved out of W
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w0)
        principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(layer.delta_weight("default"), principal, atol=1e-5, rtol=0)


def test_adapter_dtype_and_output_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLayer(base, "m")
    layer.add_adapter("default", r=2, alpha=2)
    assert layer.lora_A["default"].dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(8, 8), "m")
    layer.add_adapter("default", r=2, alpha=2, dropout=0.5)
    _randomise(layer)
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(4)
    assert not torch.allclose(y1, layer(x))


def test_merge_refuses_non_finite():
    layer = LoraLayer(nn.Linear(4, 4), "blocks.0.q")
    layer.add_adapter("default", r=1, alpha=1)
    with torch.no_grad():
        layer.lora_A["default"].fill_(float("inf"))
        layer.lora_B["default"].fill_(1.0)
    w0 = layer.weight.detach().clone()
    with pytest.raises(UserError, match="inf/NaN"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and layer.merged == []


def test_unsupported_layer_type():
    with pytest.raises(UserError, match="Conv2d"):
        LoraLayer(nn.Conv2d(3, 3, 3), "conv")


def test_unknown_init():
    layer = LoraLayer(nn.Linear(4, 4), "m")
    with pytest.raises(UserError, match="unknown LoRA init 'svd'"):
        layer.add_adapter("default", r=1, alpha=1, init="svd")
