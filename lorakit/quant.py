"""QLoRA base weights: frozen linear layers stored as 4-bit NF4 with double quantization.

The format and kernels are bitsandbytes' own (`Linear4bit` holding a `Params4bit` and its
`QuantState`), so a quantized layer is interchangeable with what transformers + bitsandbytes
produce. Each weight (out, in) is cut into blocks of 64 values; a block stores 64 NF4 codes
(4 bits each) and its absmax. With double quantization the absmaxes (minus their mean) are
quantized again to 8 bits in blocks of 256, each such block keeping one fp32 scale:
4 + 8/64 + 32/(64*256) ~= 4.127 bits per parameter.

MoE expert weights (3-D, one per experts module: lorakit.experts) are quantized too, each
expert's (out, in) matrix on its own as a `Linear4bit`, held by an `Experts4bit` that runs the
experts forward itself (lorakit.experts.routed_forward): on MoE models they are nearly all the
weights.

`quantize_model` converts a model already in memory; `load_model_4bit` reads a model folder's
safetensors one tensor at a time and quantizes each linear weight as it arrives, so loading
never holds the whole 16-bit model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import nn

from lorakit import experts as moe
from lorakit.cpu_math import settle_vector_math
from lorakit.errors import UserError
from lorakit.layers import _is_conv1d, is_plain_linear, quant_state_of
from lorakit.metrics import byte_size, peak_rss_bytes
from lorakit.models import assemble_stored as _assemble_stored
from lorakit.models import check_float_weights, checkpoint_key_transform, load_config, load_model, read_stored, stored_keys
from lorakit.models import stored_pieces as _stored_pieces

log = logging.getLogger(__name__)

# The 16 NF4 levels of the QLoRA paper (Dettmers et al. 2023, appendix E): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero so padding and zero weights stay exact.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' kernels accept
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes absmax in blocks of 256 (its 4-bit matmul requires it)
INSTALL_HINT = "pip install 'bitsandbytes>=0.46.1' (lorakit's `quant` extra)"


@dataclass
class QuantReport:
    """What quantization did, with honest byte counts.

    linear_bytes_after counts everything a quantized layer holds for its weight: the packed NF4
    codes, the 8-bit absmax, the nested fp32 absmax and offset, and the two code tables (16 and
    256 fp32 values, shared by all layers of a device, so counted once).
    frozen_bytes_* cover every parameter of the model (linear weights, biases, embeddings, norms,
    head); "before" is in the dtype the weights were quantized from.
    peak_bytes (loading only): the most tensor bytes held at once while loading: every tensor
    materialised so far plus the full-precision tensor being converted.
    peak_rss_bytes: the process's peak resident memory so far, since the program started
        (`lorakit.metrics.peak_rss_bytes`).
    """

    layers: int
    params: int
    linear_bytes_before: int
    linear_bytes_after: int
    frozen_bytes_before: int
    frozen_bytes_after: int
    blocksize: int = 64
    double_quant: bool = True
    peak_bytes: Union[int, None] = None
    peak_rss_bytes: Union[int, None] = None
    expert_matrices: int = 0  # of `layers`, the MoE experts' (out, in) matrices (Experts4bit)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.linear_bytes_after / max(self.params, 1)

    def summary(self) -> str:
        line = (
            f"nf4: {self.layers} linear layers"
            + (f" ({self.expert_matrices} of them expert matrices)" if self.expert_matrices else "")
            + f", {self.params / 1e6:.2f}M params -> "
            f"{self.bits_per_param:.3f} bits/param; frozen linear weights {byte_size(self.linear_bytes_before)} -> "
            f"{byte_size(self.linear_bytes_after)}; all frozen weights {byte_size(self.frozen_bytes_before)} -> "
            f"{byte_size(self.frozen_bytes_after)}"
        )
        if self.peak_bytes is not None:
            line += f"; loading peak {byte_size(self.peak_bytes)} held"
        if self.peak_rss_bytes is not None:
            line += f", process peak RSS {byte_size(self.peak_rss_bytes)}"
        return line


def quantize_model(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
) -> QuantReport:
    """Replace every linear layer (nn.Linear, GPT-2 Conv1D) by a frozen NF4 `bnb.nn.Linear4bit`, in place, and every MoE experts module by an `Experts4bit` (each expert's matrix NF4 on its own).

    A layer is skipped when the last part of its module path is in `skip`, or when its weight is
    tied to an embedding. Weights are cast to `compute_dtype` and quantized on their own device
    (CUDA weights on the GPU); the full-precision layer is dropped from the model. Embeddings,
    norms and skipped layers are left as they are.

    Raises:
        UserError: bitsandbytes missing; a bad blocksize or compute dtype; no linear layers; a
            layer whose shape cannot be quantized (all such layers listed at once).
    """
    bnb = require_bitsandbytes()
    _check_args(compute_dtype, blocksize)
    before = _param_bytes(model)
    targets = _find_targets(model, tuple(skip))
    _check_shapes(targets, blocksize)
    expert_targets = _find_experts(model, tuple(skip), blocksize)
    linear_before = sum(m.weight.numel() * torch.empty((), dtype=compute_dtype).element_size() for _, m in targets)
    codes: dict[Any, tuple] = {}
    targets.reverse()
    while targets:  # pop, so nothing here keeps a replaced full-precision layer alive
        name, module = targets.pop()
        weight = module.weight.detach()
        if _is_conv1d(module):  # GPT-2's Conv1D stores (in, out)
            weight = weight.t()
        bias = None if module.bias is None else module.bias.detach().to(compute_dtype)
        new = _new_linear4bit(bnb, module, compute_dtype, double_quant)
        _set_quantized_weight(new, weight.to(compute_dtype), blocksize, double_quant, codes)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=False)
        _set_module(model, name, new)
        del module, weight
    for name in expert_targets:
        module = model.get_submodule(name)
        linear_before += sum(math.prod(moe.expert_shape(module, p)) for p in moe.expert_parameter_names(module)) * (
            torch.empty((), dtype=compute_dtype).element_size()
        )
        _set_module(model, name, Experts4bit.quantize(module, compute_dtype, blocksize, double_quant, codes))
        del module
    report = _report(model, blocksize, double_quant)
    report.frozen_bytes_before = before
    report.linear_bytes_before = linear_before
    return report


class Experts4bit(nn.Module):
    """A transformers experts module with its 3-D expert weights in NF4: one bitsandbytes
    `Linear4bit` (out, in) per expert and weight, in `experts4[weight][e]`.

    The module it replaces is kept as `base_layer` without those weights (set to None): its gate
    function, activation, biases and flags still serve, and its attributes read through. Forward is
    `lorakit.experts.routed_forward` over 4-bit matmuls; a `LoraExperts` wraps it like any experts
    module (`frozen_projection`, `expert_shape`, `weight_names` are what it asks of one).
    """

    __getattr__ = moe.passthrough_getattr

    def __init__(self, base: nn.Module, weight_names: list[str], compute_dtype: torch.dtype):
        super().__init__()
        self.base_layer = base
        self.weight_names = list(weight_names)
        self.compute_dtype = compute_dtype
        self.experts4 = nn.ModuleDict()

    @classmethod
    def quantize(
        cls, base: nn.Module, compute_dtype: torch.dtype, blocksize: int, double_quant: bool, codes: dict[Any, tuple]
    ) -> "Experts4bit":
        """Quantize `base`'s expert weights expert by expert (cast to `compute_dtype` first) and drop them from it."""
        bnb = require_bitsandbytes()
        names = moe.expert_parameter_names(base)
        new = cls(base, names, compute_dtype)
        for param in names:
            weight = getattr(base, param).detach()
            experts, fan_in, fan_out = moe.expert_shape(base, param)
            layers = nn.ModuleList()
            for e in range(experts):
                layer = _new_linear4bit_shaped(bnb, fan_in, fan_out, False, compute_dtype, double_quant)
                dense = weight[e].t() if base.is_transposed else weight[e]  # (out, in)
                _set_quantized_weight(layer, dense.to(compute_dtype), blocksize, double_quant, codes)
                layers.append(layer)
            new.experts4[param] = layers
            base.register_parameter(param, None)  # the 16-bit weight goes; the name stays
            del weight
        return new

    def expert_shape(self, param: str) -> tuple[int, int, int]:
        layers = self.experts4[param]
        return len(layers), layers[0].in_features, layers[0].out_features

    def frozen_projection(self, param: str) -> moe.Projection:
        import bitsandbytes as bnb

        layers = self.experts4[param]
        bias = getattr(self.base_layer, f"{param}_bias", None) if self.base_layer.has_bias else None

        def run(e: int, x: torch.Tensor) -> torch.Tensor:
            b = None if bias is None else bias[e].to(self.compute_dtype)
            y = bnb.matmul_4bit(x.to(self.compute_dtype), layers[e].weight.t(), bias=b, quant_state=quant_state_of(layers[e]))
            return y.to(x.dtype)

        return run

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        first = self.frozen_projection(moe.first_projection_name(self.base_layer))
        return moe.routed_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, first, self.frozen_projection("down_proj"))

    def extra_repr(self) -> str:
        return f"NF4 experts x{len(next(iter(self.experts4.values())))}: {', '.join(self.weight_names)}"


def _find_experts(model: nn.Module, skip: tuple[str, ...], blocksize: int) -> list[str]:
    """Paths of the MoE experts modules whose 3-D weights `quantize_model` quantizes: all of them,
    unless their name is in `skip` or blocks cannot cut a weight's rows (logged; it stays 16-bit)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, Experts4bit) or not moe.is_experts_module(module) or name.rpartition(".")[2] in skip:
            continue
        if isinstance(module, moe.LoraExperts):  # its base is what gets quantized
            continue
        uneven = [(p, moe.expert_shape(module, p)[1]) for p in moe.expert_parameter_names(module)]
        uneven = [(p, fan_in) for p, fan_in in uneven if fan_in % blocksize]
        if uneven:
            log.warning("%s: expert weight %s has in_features=%d, not a multiple of the NF4 blocksize %d; its "
                        "experts stay 16-bit", name, uneven[0][0], uneven[0][1], blocksize)  # fmt: skip
            continue
        out.append(name)
    return out


def load_model_4bit(
    folder: Union[str, Path],
    *,
    compute_dtype: torch.dtype,
    skip: Iterable[str] = ("lm_head",),
    trust_remote_code: bool = False,
    device: Union[str, torch.device] = "cpu",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[nn.Module, QuantReport]:
    """Build a causal LM from a Hugging Face folder straight into 4-bit, one tensor at a time.

    The model is built on the meta device from config.json, then each tensor of the folder's
    safetensors (one file or shards) is read, cast to `compute_dtype`, moved to `device` and
    either quantized (linear weights) or kept (embeddings, norms, head, biases), so memory peaks
    near the 4-bit model plus one full-precision tensor. Tied embeddings are re-tied;
    non-persistent buffers (rotary inv_freq) are recomputed by the model's own init. The result
    equals `from_pretrained(folder, dtype=compute_dtype)` followed by `quantize_model`. Every
    parameter is frozen (requires_grad=False). Returns the model in eval mode and its report.

    Keys are read as transformers maps them (`lorakit.models.checkpoint_key_transform`: GPT-NeoX's
    `embed_out` is the model's `lm_head`). MoE expert weights stored one by one (held fused, which
    transformers converts on load) are put together a layer's experts module at a time from their
    stored pieces (`lorakit.models.stored_pieces`: transformers' save-time conversion run on an
    index) and quantized expert by expert; expert weights stored fused are quantized once the
    stream is done, so they are held in 16 bits until then. A folder with other tensors that need a
    converter is loaded whole by transformers and then quantized: that loading peaks at the
    16-bit model.

    Raises:
        UserError: folder or config.json missing; only pickle (.bin) weights; weights missing
            from the files; anything `quantize_model` raises.
    """
    bnb = require_bitsandbytes()
    _check_args(compute_dtype, blocksize)
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    files = _safetensors_files(folder)
    device = torch.device(device)
    config = load_config(folder, trust_remote_code=trust_remote_code)
    settle_vector_math()  # before any forward: the first could otherwise race (lorakit.cpu_math)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=compute_dtype)
    # Each stored key as transformers maps it, read once from the headers: (the model's name, whether
    # a converter must run).
    transform = checkpoint_key_transform(model)
    headers = {path: _safetensors_header(path) for path in files}
    check_float_weights(folder, model)
    stored = {k: transform(k) for path in files for k in headers[path]}
    converted = [k for k, (_, needs_converter) in stored.items() if needs_converter]
    expert_pieces = _stored_expert_pieces(model, set(converted)) if converted else {}
    if converted and expert_pieces is None:
        # Weights stored in another layout than the model holds them, other than MoE experts:
        # transformers' own loader converts them, then the linear layers are quantized.
        log.info("%s: %d stored tensors need transformers' conversion on load (e.g. %s); loading the model whole, "
                 "then quantizing", folder, len(converted), converted[0])  # fmt: skip
        del model
        return _load_whole_then_quantize(folder, compute_dtype, skip, trust_remote_code, device, blocksize, double_quant)
    file_of = {k: path for path in files for k in headers[path]}
    held = _Held()
    # Non-persistent buffers are not in the files: materialise them first and let the model's
    # own init compute them (its parameters are still on meta, so nothing real is overwritten).
    with torch.no_grad():
        for key, buf in list(model.named_non_persistent_buffers()):
            _set_tensor(model, key, torch.empty_like(buf, device=device), param=False)
            held.add(buf)
        for module in {model.get_submodule(k.rpartition(".")[0]) for k, _ in model.named_non_persistent_buffers()}:
            model._init_weights(module)

    tied = {t: s for t, s in getattr(model, "all_tied_weights_keys", {}).items()}
    param_names = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    expected = param_names | {k for k, _ in _persistent_buffers(model)}
    targets = dict(_find_targets(model, tuple(skip), tied_names=set(tied) | set(tied.values())))
    _check_shapes(list(targets.items()), blocksize)
    for name, module in targets.items():
        _set_module(model, name, _new_linear4bit(bnb, module, compute_dtype, double_quant))
    prefix = getattr(model, "base_model_prefix", "")
    in_files = {_match_key(name, expected, prefix) for name, _ in stored.values()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    before = 0
    codes: dict[Any, tuple] = {}
    for path in files:
        for file_key, read in _safetensors_reader(path):
            if stored[file_key][1]:
                continue  # an expert's piece of a fused weight: put together below, a layer at a time
            key = _match_key(stored[file_key][0], expected, prefix)
            if key is None:
                unexpected.append(file_key)
                continue
            if key in tied and tied[key] in in_files:
                continue  # a saved copy of a tied weight: it is tied to the source below
            raw = read()
            held.add(raw)
            value = raw.to(device=device, dtype=compute_dtype) if raw.is_floating_point() else raw.to(device)
            if value.data_ptr() != raw.data_ptr():
                held.add(value)
            before += value.numel() * value.element_size()
            owner, _, leaf = key.rpartition(".")
            if owner in targets and leaf == "weight":
                layer = model.get_submodule(owner)
                weight = value.t() if _is_conv1d(targets[owner]) else value
                _set_quantized_weight(layer, weight, blocksize, double_quant, codes)
                held.drop(value, raw)
                held.add(*_weight4_tensors(layer))
                del weight
            else:
                _set_tensor(model, key, value, param=key in param_names)
                if value.data_ptr() != raw.data_ptr():
                    held.drop(raw)
            del raw, value
            loaded.add(key)
            if owner in targets:
                _release_freed_memory()
    for target, source in tied.items():
        if target in loaded and source not in loaded:
            target, source = source, target
        if source in loaded:
            owner, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
            loaded.add(target)
    if unexpected:
        log.warning("%s: %d tensors not used by the model, e.g. %s", folder, len(unexpected), unexpected[:3])
    # MoE expert weights stored one by one: each fused weight put together from its pieces, a layer's
    # experts module at a time, then quantized with the others below.
    quantizable = set(_find_experts(model, tuple(skip), blocksize))
    experts_before = 0
    by_module: dict[str, list[str]] = {}
    for path, param in expert_pieces or {}:
        by_module.setdefault(path, []).append(param)
    for path, params in by_module.items():
        module = model.get_submodule(path)
        for param in params:
            shape = tuple(getattr(module, param).shape)
            where = _stored_pieces(model, f"{path}.{param}", shape)
            held.add(*where.values())  # the index, while the pieces are put together
            value = _assemble_stored(where, lambda k: read_stored(file_of[k], k), shape, compute_dtype).to(device)
            held.add(value)
            held.drop(*where.values())
            before += value.numel() * value.element_size()
            _set_tensor(model, f"{path}.{param}", value, param=True)
            loaded.add(f"{path}.{param}")
            del where, value
        if path in quantizable:
            experts_before += sum(getattr(module, p).numel() for p in moe.expert_parameter_names(module))
            held.drop(*[getattr(module, p) for p in moe.expert_parameter_names(module)])
            new = Experts4bit.quantize(module, compute_dtype, blocksize, double_quant, codes)
            held.add(*[t for layer in new.modules() if is_4bit(layer) for t in _weight4_tensors(layer)])
            _set_module(model, path, new)
            quantizable.discard(path)
            del new
        del module
        _release_freed_memory()
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"{folder}: the safetensors files lack {len(missing)} weights the model from config.json needs "
            f"({shown}); the folder is incomplete or its config.json belongs to another model"
        )
    # Expert weights stored fused, as the model holds them: quantized once loaded (16-bit until then).
    for name in sorted(quantizable):
        module = model.get_submodule(name)
        experts_before += sum(getattr(module, p).numel() for p in moe.expert_parameter_names(module))
        _set_module(model, name, Experts4bit.quantize(module, compute_dtype, blocksize, double_quant, codes))
        del module
    model.eval()
    _release_freed_memory()
    report = _report(model, blocksize, double_quant)
    report.frozen_bytes_before = before
    report.linear_bytes_before = (
        sum(m.weight.numel() for m in targets.values()) + experts_before
    ) * torch.empty((), dtype=compute_dtype).element_size()
    report.peak_bytes = held.peak
    report.peak_rss_bytes = peak_rss_bytes()
    return model, report


def _stored_expert_pieces(model: nn.Module, converted: set[str]) -> Union[dict[tuple[str, str], set[str]], None]:
    """(experts module path, weight) -> the stored keys its fused weight is put together from,
    when every key in `converted` is such a piece (MoE experts stored one by one); else None."""
    out: dict[tuple[str, str], set[str]] = {}
    for path, module in model.named_modules():
        if not moe.is_experts_module(module):
            continue
        for param in moe.expert_parameter_names(module):
            keys = set(stored_keys(model, f"{path}.{param}", tuple(getattr(module, param).shape)))
            if keys & converted:
                out[(path, param)] = keys
    covered = set().union(*out.values()) if out else set()
    return out if converted <= covered else None


def _load_whole_then_quantize(
    folder: Path,
    compute_dtype: torch.dtype,
    skip: Iterable[str],
    trust_remote_code: bool,
    device: Union[str, torch.device],
    blocksize: int,
    double_quant: bool,
) -> tuple[nn.Module, QuantReport]:
    """`load_model_4bit`'s result the plain way: the whole model in `compute_dtype`, then `quantize_model`."""
    model = load_model(folder, dtype=compute_dtype, device=device, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    report = quantize_model(model, compute_dtype=compute_dtype, skip=skip, blocksize=blocksize, double_quant=double_quant)
    _release_freed_memory()
    report.peak_rss_bytes = peak_rss_bytes()
    return model.eval(), report


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(min(size, path.stat().st_size - 8)))
        except (ValueError, OverflowError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a valid safetensors file (its header does not read); re-save or re-download it")
    header.pop("__metadata__", None)
    return header


def _safetensors_reader(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for each tensor of a safetensors file, in file order; `read()` returns a fresh tensor.

    Plain reads into freshly allocated tensors rather than safetensors' memory map: tensors from
    a map are views of the file's pages, so every page read while loading would stay resident as
    long as one kept tensor (an embedding, a norm) points into it, and the peak would approach
    the 16-bit file size that 4-bit loading exists to avoid.
    """
    header = _safetensors_header(path)
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):

            def read(entry=entry) -> torch.Tensor:
                begin, end = entry["data_offsets"]
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise UserError(f"{path}: tensor dtype {entry['dtype']} is not supported")
                tensor = torch.empty(entry["shape"], dtype=dtype)
                if end > begin:
                    f.seek(start + begin)
                    f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
                return tensor

            yield name, read


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps quantization temporaries otherwise).

    Called after every quantized tensor: handed back only at the end of loading, the temporaries
    (in one heap per thread that allocated) made the process peak drift between 0.65x and 1.4x of
    the 16-bit size from run to run (bench/bench_qlora.py, 300M model); trimming every 16 or 64 MiB
    of weights still let it reach 0.8x-0.9x now and then. Per tensor it stayed at 0.65x-0.67x in 13
    runs of 13, for about 1 s more load time on that model (re-faulting the pages handed back).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (without importing bitsandbytes if it is absent)."""
    if sys.modules.get("bitsandbytes") is None:
        return False
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense fp32 weight (out_features, in_features) of a 4-bit linear layer.

    Dequantizes to fp32 whatever dtype the weight was quantized from, so the values are exactly
    code * absmax. Nothing is cached: callers that need it again dequantize again.
    """
    import bitsandbytes.functional as F

    if not is_4bit(module):
        raise TypeError(f"dequantize_weight needs a bitsandbytes Linear4bit, got {type(module).__name__}")
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference layout (only if a caller re-enabled it): undo it first.
        weight.data, state = F._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = module.quant_state = state
    fp32_state = copy.copy(state)
    fp32_state.dtype = torch.float32
    return F.dequantize_4bit(weight.data, fp32_state)


def make_8bit_adamw(params: Iterable[Any], **adamw_kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (block-wise 8-bit moments) for `params` (tensors or param groups).

    bitsandbytes 0.50 runs it on CUDA and on CPU. The device of the parameters is tried once
    with a one-step dry run, so an unsupported device fails here with a message, not mid-run.

    Raises:
        UserError: bitsandbytes missing, or its 8-bit AdamW does not run on the params' device.
    """
    bnb = require_bitsandbytes(what="train.optimizer: adamw8bit")
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    for device in sorted({str(p.device) for p in tensors}):
        problem = _adamw8bit_problem(bnb, device)
        if problem:
            raise UserError(
                f"train.optimizer: adamw8bit: bitsandbytes' 8-bit AdamW does not run on device {device} "
                f"({problem}); set train.optimizer: adamw"
            )
    return bnb.optim.AdamW8bit(params, **adamw_kwargs)


# --- internals -------------------------------------------------------------------------------


class _Held:
    """Running total of tensor bytes held by the loader, and its maximum."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def add(self, *tensors: torch.Tensor) -> None:
        self.now += sum(t.numel() * t.element_size() for t in tensors)
        self.peak = max(self.peak, self.now)

    def drop(self, *tensors: torch.Tensor) -> None:
        seen = set()
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                self.now -= t.numel() * t.element_size()


def quantized_layers(model: nn.Module, *, skip: Iterable[str] = ("lm_head",), blocksize: int = 64) -> list[str]:
    """The paths of the linear layers `load_model_4bit` quantizes in `model` (built from the same
    config.json, on the meta device will do), checked as it checks them (for `lorakit train --dry-run`).

    Raises:
        UserError: no bitsandbytes, no layer to quantize, a layer whose in_features blocks do not fit.
    """
    require_bitsandbytes()
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    targets = _find_targets(model, tuple(skip), tied_names=set(tied) | set(tied.values()))
    _check_shapes(targets, blocksize)
    return [name for name, _ in targets]


# NF4 with double quantization: 4 bits a weight, one 8-bit scale per 64 weights and one fp32 per 256 scales
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def frozen_bytes_estimate(model: nn.Module, dtype: torch.dtype, *, nf4: bool, shards: int = 1) -> int:
    """Bytes of `model`'s weights (built from config.json, on the meta device will do) in `dtype`
    that a process holds; with `nf4`, the linear layers and MoE expert weights `load_model_4bit`
    quantizes (checked as it checks them) in NF4, the rest in `dtype`. With `shards` (FSDP2's
    processes) each holds its share, except NF4's quantization state, whole everywhere.

    Raises:
        UserError: with `nf4`, what `quantized_layers` raises.
    """
    size = torch.tensor([], dtype=dtype).element_size()
    quantized = set()
    if nf4:
        quantized = {id(model.get_submodule(path).weight) for path in quantized_layers(model)}
        quantized |= {id(getattr(m, name)) for m in model.modules() if moe.is_experts_module(m) for name in moe.expert_parameter_names(m)}
    seen, total = set(), 0.0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel() * ((0.5 / shards + NF4_BYTES_PER_WEIGHT - 0.5) if id(p) in quantized else size / shards)
    return int(total)


def require_bitsandbytes(what: str = "quantize: nf4"):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bnb


def _check_args(compute_dtype: Any, blocksize: Any) -> None:
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"compute_dtype = {compute_dtype!r}: use torch.bfloat16, torch.float16 or torch.float32")
    if blocksize not in BLOCKSIZES:
        raise UserError(f"blocksize = {blocksize!r}: bitsandbytes accepts {', '.join(map(str, BLOCKSIZES))}")


def _find_targets(
    model: nn.Module, skip: tuple[str, ...], tied_names: Union[set[str], None] = None
) -> list[tuple[str, nn.Module]]:
    """(path, module) of every linear layer to quantize; raises when there is none."""
    import bitsandbytes as bnb

    tied_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears, out = [], []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) or not (is_plain_linear(module) or _is_conv1d(module)):
            continue  # (an nn.Linear subclass with its own forward, such as a MoE router, stays as it is)
        linears.append(name)
        if name.rpartition(".")[2] in skip:
            continue
        if id(module.weight) in tied_ids or (tied_names and f"{name}.weight" in tied_names):
            continue  # shares its weight with an embedding, which stays 16-bit
        out.append((name, module))
    if not out:
        what = type(model).__name__
        if not linears:
            raise UserError(
                f"quantize: nf4: {what} has no nn.Linear (or Conv1D) layers to quantize; use quantize: none"
            )
        raise UserError(
            f"quantize: nf4: every linear layer of {what} ({', '.join(linears[:4])}...) is skipped or tied to an "
            f"embedding (skip={list(skip)}); nothing would be quantized, use quantize: none"
        )
    return out


def _in_out(module: nn.Module) -> tuple[int, int]:
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _check_shapes(targets: list[tuple[str, nn.Module]], blocksize: int) -> None:
    # Blocks must not straddle rows: bitsandbytes' CPU dequantize kernel returns wrong values
    # when in_features is a multiple of 16 but not of the blocksize (verified on 0.50.2), and its
    # CPU inference layout reshapes absmax to (out, in / blocksize).
    bad = []
    for name, module in targets:
        fan_in, fan_out = _in_out(module)
        if fan_in % blocksize:
            bad.append(f"{name} (in_features={fan_in}, out_features={fan_out})")
    if bad:
        raise UserError(
            f"quantize: nf4: cannot quantize {'; '.join(bad[:3])}{f' and {len(bad) - 3} more layers' if len(bad) > 3 else ''} "
            f"in blocks of {blocksize}: in_features must be a multiple "
            f"of {blocksize} (a block may not straddle rows); train this model with quantize: none, or from Python leave "
            "such layers 16-bit with load_model_4bit(..., skip=[their last name part]) or quantize them in smaller blocks (blocksize=)"
        )


def _new_linear4bit(bnb: Any, module: nn.Module, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    fan_in, fan_out = _in_out(module)
    return _new_linear4bit_shaped(bnb, fan_in, fan_out, module.bias is not None, compute_dtype, double_quant)


def _new_linear4bit_shaped(
    bnb: Any, fan_in: int, fan_out: int, bias: bool, compute_dtype: torch.dtype, double_quant: bool
) -> nn.Module:
    new = bnb.nn.Linear4bit(
        fan_in,
        fan_out,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    # On CPUs with AVX512-BF16, Linear4bit.forward repacks the weight in eval mode into a layout
    # whose absmax is bf16 and whose matmul runs in bf16: lossy, not double-quantized, and
    # different from the saved format. Keep bitsandbytes' standard format.
    new.support_avx512bf16_for_cpu = False
    new.requires_grad_(False)
    return new


def _set_quantized_weight(
    layer: nn.Module, weight: torch.Tensor, blocksize: int, double_quant: bool, codes: dict[Any, tuple]
) -> None:
    """Quantize `weight` (out, in) on its own device into `layer` (a Linear4bit)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    # bitsandbytes gives every layer its own copy of the two code tables; share one per device.
    key = packed.device
    if key not in codes:
        codes[key] = (state.code, state.state2.code if double_quant else None)
    state.code = codes[key][0]
    if double_quant:
        if codes[key][1] is None:
            codes[key] = (codes[key][0], state.state2.code)
        state.state2.code = codes[key][1]
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state


def _weight4_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Tensors a 4-bit weight holds, code tables excluded (they are shared)."""
    state = layer.weight.quant_state
    out = [layer.weight.data, state.absmax]
    if state.nested:
        out += [state.offset, state.state2.absmax]
    return out


def _report(model: nn.Module, blocksize: int, double_quant: bool) -> QuantReport:
    layers = params = linear_after = 0
    seen: set[tuple[Any, int]] = set()

    def count(t: torch.Tensor) -> int:
        key = (t.device, t.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for module in model.modules():
        if is_4bit(module):
            state = module.weight.quant_state
            layers += 1
            params += state.shape.numel()
            linear_after += sum(count(t) for t in _weight4_tensors(module)) + count(state.code)
            if state.nested:
                linear_after += count(state.state2.code)
    other = sum(count(p) for p in model.parameters() if not isinstance(p, _params4bit_type()))
    report = QuantReport(layers, params, 0, linear_after, 0, linear_after + other, blocksize, double_quant)
    report.expert_matrices = sum(len(m) for e in model.modules() if isinstance(e, Experts4bit) for m in e.experts4.values())
    return report


def _params4bit_type() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Params4bit


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied ones


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            out.append((name, buf))
    return out


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner), leaf, new)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, *, param: bool) -> None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner)
    if param:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _match_key(file_key: str, expected: set[str], prefix: str) -> Union[str, None]:
    """The model's name for a checkpoint key saved with or without the base-model prefix."""
    if file_key in expected:
        return file_key
    if prefix and f"{prefix}.{file_key}" in expected:
        return f"{prefix}.{file_key}"
    if prefix and file_key.startswith(prefix + ".") and file_key[len(prefix) + 1 :] in expected:
        return file_key[len(prefix) + 1 :]
    return None


def _safetensors_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"model = {str(folder)!r}: folder not found; pass a local Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"model = {str(folder)!r}: no config.json; pass a Hugging Face model folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"{index}: lists shards that are not in the folder: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise UserError(
            f"model = {str(folder)!r}: has only pickle weights (pytorch_model*.bin); loading a pickle can run "
            "arbitrary code, so lorakit reads only safetensors. Convert once, in an environment you trust: "
            "python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}')\" (writes model.safetensors)"
        )
    raise UserError(f"model = {str(folder)!r}: no *.safetensors weights found in the folder")


def _adamw8bit_problem(bnb: Any, device: str) -> Union[str, None]:
    """None if one AdamW8bit step runs on `device`, else the reason. 4096 values: the smallest
    tensor bitsandbytes keeps in 8-bit state (smaller ones fall back to 32-bit)."""
    try:
        p = nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception as exc:  # any failure means this device is unsupported for the optimizer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None
