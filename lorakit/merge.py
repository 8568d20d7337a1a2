"""`lorakit merge`: fold an adapter into its base model and write a plain Hugging Face model folder.

The base is streamed tensor by tensor from its safetensors files (`safe_open`, one shard at a
time), never loaded as a model: each tensor is read, updated if the adapter touches it, cast to
the output dtype and appended to the output shard being filled; a full output shard is written
and dropped. Tensors held at once: the adapter, one base tensor (plus its fp32 working copy and
the fp32 update s·B@A) and one output shard. `MergeReport.peak_held_bytes` counts exactly these.

Per base tensor `<path>.weight`:
    linear     W (out, in)  += s · B @ A                  (computed in fp32)
    conv1d     W (in, out)  += (s · B @ A)^T              GPT-2's Conv1D stores the transpose
    embedding  W (num, dim) += (s · B @ A)^T              A: (r, num), B: (dim, r)
    modules_to_save: W is replaced by the adapter's trained copy; a PEFT `base_layer.weight`
    (saved for resized embeddings) replaces the base weight before the update is added.
s comes from `adapters.adapter_scaling` (rank_pattern / alpha_pattern / rsLoRA resolved per module).
PiSSA / OLoRA adapters were trained against W less its principal part s · B0 @ A0 (their init):
that part is computed again from W, as loading such an adapter does, and taken out as well.
MoE expert weights (an adapter with `target_parameters`, lorakit.experts): transformers holds each
layer's experts as fused 3-D tensors but most checkpoints store them one by one (Qwen3-MoE:
`experts.<e>.gate_proj.weight`, `.up_proj`, `.down_proj`). The fused update s · B_e @ A_e of a
weight is built for all its experts at once, when the stream reaches the first of its stored keys,
and cut into the stored keys by transformers' own save-time conversion (`revert_weight_conversion`);
each piece is dropped once added, so the extra memory is one layer's expert update in fp32.
Stored keys that transformers renames on load (GPT-NeoX's `embed_out` for `lm_head`) are matched
to the adapter's module names its way, and written under their stored names.
Module kinds (Linear vs Conv1D vs Embedding) and tied weights are read from the model class built
on the meta device from config.json (no memory); when that fails (custom code), from the tensor
shapes and the adapter's `fan_in_fan_out`.

Tied embeddings: when the base ties its output head to the input embedding and the adapter changes
either one, both are written untied (the head gets the original embedding plus its own change, as
in the adapted model) and config.json gets `tie_word_embeddings: false`.

Output dtype: each floating tensor keeps the dtype it is stored in, unless `dtype` is given
(then every floating tensor is cast to it); config.json's `dtype` says which.

QLoRA adapters and accuracy: an adapter trained on an NF4 base learned to correct the *rounded*
weights W_q = dequant(quant(W)), not W. Merging it into the full-precision W gives W + ΔW, which
differs from what the adapter was trained with by W - W_q (NF4 rounding error, about 10% of a
weight's magnitude per element, unbiased). In practice that model is usually as good or slightly
better than the 4-bit one (the base is more precise), but it is not the model that was evaluated
during training, and some of ΔW may have been spent compensating rounding errors that no longer
exist. `simulate_nf4=True` merges into W_q instead: every layer lorakit's QLoRA loader quantizes
(all Linear / Conv1D layers except `lm_head` and weights tied to an embedding, not just the
targeted ones, because the adapter saw all of them rounded) is quantized with bitsandbytes NF4
(blocksize 64, double quantization, as `lorakit.quant`) and dequantized before the update is added,
so the merged model computes what the training-time model computed (up to its compute dtype).
MoE expert weights are rounded as lorakit.quant.Experts4bit holds them, each expert's (out, in)
matrix on its own; that matrix may be stored under several keys (Qwen3-MoE: gate_proj and up_proj
rows of one gate_up_proj), so when the stream reaches the first of them all are read, put together
through an index tensor cut by the same save-time conversion, rounded, updated and cut again.
The rounded weights are then stored in the base's dtype (or `--dtype`), not in 4 bits: the output
is the size of the base.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from safetensors import SafetensorError, safe_open

from lorakit.adapters import (
    CHAT_TEMPLATE_NAME, PREFIX, WEIGHT_SUFFIXES, WEIGHTS_NAME, AdapterFiles, adapter_scaling, check_factor_values, check_output_folder,
    check_weight_tying, inside_folder, read_adapter, read_chat_template, replace_dir, staging_folder, write_safetensors,
)  # fmt: skip
from lorakit.errors import UserError, writing
from lorakit.inject import selected_by_name, unselected_weights
from lorakit.layers import PRINCIPAL_INITS, principal_factors
from lorakit.metrics import peak_rss_bytes
from lorakit.experts import expert_delta
from lorakit.models import (
    DTYPES,
    assemble_stored,
    base_reference,
    check_model_folder,
    checkpoint_key_transform,
    cut_as_stored,
    looks_like_hub_id,
    meta_model,
    read_config_json,
    read_stored,
    stored_keys,
    stored_pieces,
)

INDEX_NAME = "model.safetensors.index.json"
NF4_BLOCKSIZE = 64
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# --------------------------------------------------------------------------- reading the base
@dataclass
class BaseLayout:
    """What a model folder holds, from the safetensors headers and config.json (no weights read).

    shapes / dtypes / files: checkpoint key -> shape, dtype, file.
    kinds: module path -> "linear" | "conv1d" | "embedding" (empty when the class could not be built).
    tied: checkpoint key -> the key it shares storage with in the model (e.g. lm_head.weight ->
        model.embed_tokens.weight), for keys transformers ties on load.
    stored_as: the model's key -> the checkpoint key it is stored under, where transformers renames
        keys on load (GPT-NeoX: lm_head.weight is stored as embed_out.weight). The merged folder
        keeps the stored names, so transformers renames them the same way when it loads the result.
    """

    folder: Path
    config: dict[str, Any]
    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    kinds: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    head: Optional[str] = None  # module path of the output head
    embedding: Optional[str] = None  # module path of the input embedding
    stored_as: dict[str, str] = field(default_factory=dict)
    model: Any = None  # the meta-device model (None when it could not be built)

    @property
    def shard_files(self) -> list[Path]:
        return list(dict.fromkeys(self.files.values()))

    def key_for(self, path: str, param: str = "weight") -> Optional[str]:
        """The checkpoint key of module `path`'s `param`, allowing a checkpoint saved without the
        base-model prefix (`h.0.attn.c_attn.weight` for `transformer.h.0.attn.c_attn`)."""
        key = f"{path}.{param}"
        key = self.stored_as.get(key, key)
        if key in self.shapes or key in self.tied:
            return key
        short = key.partition(".")[2]
        return short if short in self.shapes else None


def read_base_layout(folder: Union[str, Path], *, need_tokenizer: bool = True) -> BaseLayout:
    """Read the headers of a model folder's safetensors (single file or sharded with an index).

    Raises:
        UserError: missing folder / config / weights / tokenizer, a broken index or safetensors file.
    """
    folder = check_model_folder(folder, need_tokenizer=need_tokenizer)
    config = read_config_json(folder)  # an architecture transformers does not know is merged by the shapes
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: not a safetensors index ({exc}); re-save the model") from None
        names = list(dict.fromkeys(weight_map.values()))
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    files, shapes, dtypes = {}, {}, {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{index}: lists {name}, which is not in {folder}; the download is incomplete")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    files[key], shapes[key] = path, tuple(part.get_shape())
                    dtypes[key] = _ST_DTYPES.get(part.get_dtype(), torch.float32)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    layout = BaseLayout(folder, config, files, shapes, dtypes)
    _read_model_structure(layout)
    return layout


def _read_model_structure(layout: BaseLayout) -> None:
    """Fill kinds / tied / head / embedding / stored_as from the model class built on the meta device."""
    from lorakit.layers import base_kind

    model = meta_model(layout.folder)
    if model is None:  # custom code or an unknown architecture: fall back to shapes
        return
    layout.model = model
    transform = checkpoint_key_transform(model)
    for key in layout.shapes:
        renamed, converted = transform(key)
        if renamed != key and not converted:  # converted tensors (fused MoE experts) are no LoRA target
            layout.stored_as[renamed] = key
    for path, module in model.named_modules():
        kind = base_kind(module) if path else None
        if kind is not None:
            layout.kinds[path] = kind.name
    owners: dict[int, str] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        owner = owners.setdefault(id(param), key)
        if owner != key:
            layout.tied[key] = owner
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    for path, module in model.named_modules():
        if module is head and head is not None:
            layout.head = path
        if module is emb and emb is not None:
            layout.embedding = path
    # Keys the checkpoint stores and the model also ties: the checkpoint's copy of the owner wins.
    layout.tied = {k: v for k, v in layout.tied.items() if k not in layout.shapes or v not in layout.shapes}


# --------------------------------------------------------------------------- planning
@dataclass
class _Update:
    """One low-rank update of a base tensor: W += s · B @ A (transposed for conv1d / embedding)."""

    path: str
    kind: str  # linear | conv1d | embedding
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    init: str = "default"  # pissa | olora: B and A were trained against the base minus its principal part
    magnitude: Optional[torch.Tensor] = None  # DoRA: (out,)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """What merging adds to the fp32 base weight w, both in the checkpoint's layout: s · B @ A,
        less, for PiSSA / OLoRA adapters, the principal part s · B0 @ A0 their init moved out of W
        (computed again from w, as loading the adapter does); for DoRA, what rescaling each row of
        W + s · B @ A to its magnitude makes of W."""
        d = self.scale * (self.b.float() @ self.a.float())
        if self.init in PRINCIPAL_INITS:
            a0, b0 = principal_factors(w if self.kind == "linear" else w.t(), self.a.shape[0], self.scale, self.init)
            d -= self.scale * (b0 @ a0)
        if self.magnitude is not None:
            w_oi = w if self.kind == "linear" else w.t()  # (out, in)
            adapted = w_oi + d
            d = (self.magnitude.float() / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1) * adapted - w_oi
        return d if self.kind == "linear" else d.t()


@dataclass(eq=False)
class _ExpertWeight:
    """A fused MoE expert weight the merge changes: by an adapter's update (every expert's
    s · B_e @ A_e) and/or, with simulate_nf4, by NF4-rounding each expert's matrix as lorakit.quant
    does. It is held fused by the model, in `shape` (E, out, in) or, `transposed`, (E, in, out),
    and stored under the checkpoint keys `stored`."""

    path: str  # the experts module
    param: str  # gate_up_proj | up_proj | down_proj
    shape: tuple[int, ...]
    transposed: bool
    stored: tuple[str, ...] = ()
    a: Optional[torch.Tensor] = None  # (E·r, in), PEFT's layout (lorakit.experts)
    b: Optional[torch.Tensor] = None  # (out, r·E)
    scale: float = 0.0
    nf4: bool = False

    def fused_delta(self) -> torch.Tensor:
        return expert_delta(self.a, self.b, self.shape[0], self.scale, self.transposed).contiguous()

    def stored_values(self, layout: "BaseLayout") -> tuple[dict[str, torch.Tensor], bool]:
        """(checkpoint key -> fp32 tensor, whether those replace the stored values): the update's
        pieces to add, or with `nf4` the final values, for which every stored piece is read, put
        together (through an index tensor cut the same way), rounded expert by expert, updated."""
        if not self.nf4:
            return cut_as_stored(layout.model, f"{self.path}.{self.param}", self.fused_delta()), False
        where = stored_pieces(layout.model, f"{self.path}.{self.param}", self.shape)
        dtypes = {layout.dtypes[key] for key in where}
        stored_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        fused = assemble_stored(where, lambda key: read_stored(layout.files[key], key), self.shape, torch.float32)
        for e in range(self.shape[0]):
            dense = fused[e].t() if self.transposed else fused[e]  # (out, in), as lorakit.quant quantizes it
            dense.copy_(nf4_round(dense.to(stored_dtype)))
        if self.a is not None:
            fused += self.fused_delta()
        flat = fused.view(-1)
        return {key: flat[idx.reshape(-1).long()].view(idx.shape) for key, idx in where.items()}, True


@dataclass
class MergePlan:
    updates: dict[str, _Update]  # checkpoint key -> update
    replace: dict[str, torch.Tensor]  # checkpoint key -> tensor from the adapter
    extra: dict[str, str]  # key absent from the checkpoint -> key whose stored value it starts from
    untie: bool
    nf4: dict[str, str]  # checkpoint key -> "linear" | "conv1d", weights to NF4-round (simulate_nf4)
    experts: dict[str, _ExpertWeight] = field(default_factory=dict)  # checkpoint key -> its fused expert weight


def plan_merge(layout: BaseLayout, files: AdapterFiles, *, simulate_nf4: bool = False) -> MergePlan:
    """Match every adapter tensor to a base tensor and check all shapes, before any work.

    Raises:
        UserError: naming the first adapter tensor without a base tensor, or the first module
            whose shapes do not fit (both shapes given).
    """
    check_weight_tying(files, {key.removesuffix(".weight") for pair in layout.tied.items() for key in pair})
    config = files.config
    where = files.path
    fan_in_fan_out = bool(files.peft_config.get("fan_in_fan_out", False))
    lora: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    base_replace: dict[str, torch.Tensor] = {}
    experts, expert_keys = _plan_experts(layout, files, simulate_nf4)
    for key, tensor in files.tensors.items():
        if key in expert_keys:
            continue
        if not key.startswith(PREFIX):
            raise UserError(f"{where}: adapter tensor {key} does not start with {PREFIX!r}; not a PEFT LoRA adapter")
        name = key[len(PREFIX) :]
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif name.endswith(".base_layer.weight"):
            base_replace[name[: -len(".base_layer.weight")]] = tensor
        else:
            replace[name] = tensor
    updates: dict[str, _Update] = {}
    for path, parts in lora.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A.weight")
        b = parts.get("lora_embedding_B" if emb else "lora_B.weight")
        if a is None or b is None:
            raise UserError(f"{where}: module {path} has only one of its two LoRA matrices; the adapter file is incomplete")
        if not selected_by_name(path, config):
            raise UserError(unselected_weights(where, path, config))
        check_factor_values(where, f"module {path}", a, b)
        key = layout.key_for(path)
        if key is None:
            raise UserError(
                f"{where}: adapter module {path} has no weight {path}.weight in the base model "
                f"(base keys look like {', '.join(list(layout.shapes)[:3])}); is this adapter for another base model?"
            )
        w_shape = layout.shapes.get(key) or layout.shapes[layout.tied[key]]
        r = a.shape[0]
        kind = "embedding" if emb else _linear_kind(layout, path, w_shape, fan_in_fan_out)
        fan_in, fan_out = a.shape[1], b.shape[0]
        wanted = {"linear": (fan_out, fan_in), "conv1d": (fan_in, fan_out), "embedding": (fan_in, fan_out)}[kind]
        expected_r = _pattern_rank(config, path)
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or tuple(w_shape) != wanted or r != expected_r:
            raise UserError(
                f"{where}: {path} does not fit: adapter A {tuple(a.shape)}, B {tuple(b.shape)} (rank {expected_r} "
                f"in adapter_config.json) but the base weight {key} is {tuple(w_shape)}; "
                "the adapter was trained on a different base model"
            )
        magnitude = parts.get("lora_magnitude_vector")
        if config.dora != (magnitude is not None) or (magnitude is not None and tuple(magnitude.shape) != (fan_out,)):
            raise UserError(
                f"{where}: {path} has {'a' if magnitude is not None else 'no'} DoRA magnitude vector"
                + (f" {tuple(magnitude.shape)}" if magnitude is not None else "")
                + f" but adapter_config.json says use_dora = {config.dora}; the adapter file is inconsistent"
            )
        updates[key] = _Update(path, kind, a, b, adapter_scaling(config, path), config.init, magnitude)
    replaced: dict[str, torch.Tensor] = {}
    for name, tensor in list(replace.items()) + [(f"{p}.weight", t) for p, t in base_replace.items()]:
        path, _, param = name.rpartition(".")
        key = layout.key_for(path, param)
        if key is None:
            raise UserError(
                f"{where}: adapter tensor {PREFIX}{name} {tuple(tensor.shape)} has no matching tensor in the base model; "
                "is this adapter for another base model?"
            )
        w_shape = layout.shapes.get(key) or layout.shapes[layout.tied[key]]
        if tuple(tensor.shape) != tuple(w_shape):
            raise UserError(
                f"{where}: {PREFIX}{name} has shape {tuple(tensor.shape)} but the base tensor {key} is {tuple(w_shape)}; "
                "the adapter was trained on a different base model"
            )
        replaced[key] = tensor
    changed = set(updates) | set(replaced) | set(experts)
    # Tied keys the checkpoint does not store: write them only when untying.
    tied_changed = any(k in changed or v in changed for k, v in layout.tied.items())
    extra = {k: v for k, v in layout.tied.items() if tied_changed and k not in layout.shapes}
    nf4 = _nf4_keys(layout) if simulate_nf4 else {}
    return MergePlan(updates, replaced, extra, tied_changed, nf4, experts)


def _plan_experts(layout: BaseLayout, files: AdapterFiles, simulate_nf4: bool) -> tuple[dict[str, _ExpertWeight], set[str]]:
    """The fused expert weights the merge changes, by the checkpoint keys they are stored under, and
    the adapter keys their updates use: the adapter's `target_parameters` and, with simulate_nf4,
    every expert weight lorakit.quant quantizes. Every shape is checked against the base's headers."""
    from lorakit.adapters import expert_peft_keys
    from lorakit.experts import expert_parameter_names
    from lorakit.inject import find_parameter_targets
    from lorakit.quant import _find_experts

    config, where = files.config, files.path
    if not config.target_parameters and not simulate_nf4:
        return {}, set()
    if layout.model is None:
        if not config.target_parameters:
            return {}, set()  # _nf4_keys refuses a base without a model class
        raise UserError(
            f"{where}: the adapter adapts MoE expert weights (target_parameters), and merging them needs the base's "
            f"model class, which could not be built from {layout.folder / 'config.json'} (custom code?)"
        )
    weights: dict[tuple[str, str], _ExpertWeight] = {}

    def weight(path: str, param: str) -> _ExpertWeight:
        if (path, param) not in weights:
            module = layout.model.get_submodule(path)
            weights[(path, param)] = _ExpertWeight(path, param, tuple(getattr(module, param).shape), bool(module.is_transposed))
        return weights[(path, param)]

    used: set[str] = set()
    for path, params in find_parameter_targets(layout.model, config).items():
        module = layout.model.get_submodule(path)
        order = [p for p in expert_parameter_names(module) if p in params]
        for param, keys in expert_peft_keys(path, order).items():
            missing = [k for k in keys if k not in files.tensors]
            if missing:
                raise UserError(f"{where}: the adapter has no {missing[0]}, which its target_parameters imply; the file is incomplete")
            used.update(keys)
            a, b = (files.tensors[k] for k in keys)
            w = weight(path, param)
            experts = w.shape[0]
            fan_in, fan_out = (w.shape[1], w.shape[2]) if w.transposed else (w.shape[2], w.shape[1])
            r = _pattern_rank(config, f"{path}.{param}")
            if tuple(a.shape) != (experts * r, fan_in) or tuple(b.shape) != (fan_out, r * experts):
                raise UserError(
                    f"{where}: {path}.{param} does not fit: adapter A {tuple(a.shape)}, B {tuple(b.shape)} but {experts} "
                    f"experts of rank {r} on a {w.shape} weight need A {(experts * r, fan_in)}, "
                    f"B {(fan_out, r * experts)}; the adapter was trained on a different base model"
                )
            w.a, w.b, w.scale = a, b, adapter_scaling(config, f"{path}.{param}")
    if simulate_nf4:
        for path in _find_experts(layout.model, ("lm_head",), NF4_BLOCKSIZE):
            for param in expert_parameter_names(layout.model.get_submodule(path)):
                weight(path, param).nf4 = True
    out: dict[str, _ExpertWeight] = {}
    for (path, param), w in weights.items():
        pieces = stored_keys(layout.model, f"{path}.{param}", w.shape)
        for key, shape in pieces.items():
            if layout.shapes.get(key) != shape:
                raise UserError(
                    f"{where}: {path}.{param} is stored as {key} {shape}, which the base's files "
                    f"{'hold as ' + str(layout.shapes[key]) if key in layout.shapes else 'do not hold'}; "
                    "is the base another model, or saved by another transformers version?"
                )
        w.stored = tuple(pieces)
        out.update(dict.fromkeys(pieces, w))
    return out, used


def _pattern_rank(config, path: str) -> int:
    from lorakit.inject import _pattern_value

    return _pattern_value(path, config.rank_pattern, config.r)


def _linear_kind(layout: BaseLayout, path: str, w_shape: tuple[int, ...], fan_in_fan_out: bool) -> str:
    kind = layout.kinds.get(path) or layout.kinds.get(path.partition(".")[2])
    if kind in ("linear", "conv1d"):
        return kind
    if kind == "embedding":
        return "embedding"
    # No model class: a square weight is ambiguous, so trust the adapter's fan_in_fan_out.
    return "conv1d" if fan_in_fan_out else "linear"


def _nf4_keys(layout: BaseLayout) -> dict[str, str]:
    """Checkpoint keys of the weights lorakit's QLoRA loader quantizes (see lorakit.quant)."""
    if not layout.kinds:
        raise UserError(
            f"{layout.folder}: --simulate-nf4 needs to know which layers are linear, but the model class could not "
            "be built from config.json (custom code?); merge without --simulate-nf4"
        )
    out: dict[str, str] = {}
    bad = []
    for path, kind in layout.kinds.items():
        if kind not in ("linear", "conv1d") or path.rpartition(".")[2] == "lm_head" or path == layout.head:
            continue
        key = layout.key_for(path)
        if key is None or key in layout.tied:
            continue  # tied to an embedding: stays 16-bit
        shape = layout.shapes[key]
        fan_in = shape[1] if kind == "linear" else shape[0]
        if fan_in % NF4_BLOCKSIZE:
            bad.append(f"{path} (in_features={fan_in})")
            continue
        out[key] = kind
    if bad:
        raise UserError(
            f"--simulate-nf4: {', '.join(bad)} cannot be NF4-quantized in blocks of {NF4_BLOCKSIZE}, so no QLoRA run "
            "trained on this base; merge without --simulate-nf4"
        )
    return out


def nf4_round(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) for a (out, in) weight, as lorakit.quant stores it: NF4, blocksize 64,
    double quantization, quantized from `weight`'s own dtype, dequantized to fp32."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(packed, state)


# --------------------------------------------------------------------------- writing
@dataclass
class MergeReport:
    """What a merge wrote and how much memory it took.

    peak_held_bytes: the most tensor bytes held at once (adapter + base tensor being merged + its
        fp32 working copies + the output shard being filled).
    peak_rss_bytes: the process's peak resident memory since the program started (so it includes
        torch itself and anything the caller did before; `lorakit.metrics.peak_rss_bytes`).
    """

    out_dir: Path
    dtype: torch.dtype
    shards: int
    tensors: int
    merged_modules: int
    replaced_tensors: int
    untied: bool
    output_bytes: int
    largest_input_shard_bytes: int
    adapter_bytes: int
    peak_held_bytes: int
    peak_rss_bytes: int
    nf4_rounded: int = 0

    def summary(self) -> str:
        mb = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (
            f"merged {self.merged_modules} LoRA modules, replaced {self.replaced_tensors} tensors"
            + (f", NF4-rounded {self.nf4_rounded} weights" if self.nf4_rounded else "")
            + (", untied the embeddings" if self.untied else "")
            + f" -> {self.out_dir} ({self.shards} shard{'s' * (self.shards != 1)}, {mb(self.output_bytes)}, "
            f"{str(self.dtype).replace('torch.', '')}); peak tensors held {mb(self.peak_held_bytes)} "
            f"(largest input shard {mb(self.largest_input_shard_bytes)}, adapter {mb(self.adapter_bytes)}), "
            f"process peak RSS {mb(self.peak_rss_bytes)}"
        )


class _Held:
    """Bytes of tensors held, and the most held at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def drop(self, n: int) -> None:
        self.now -= n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _ShardWriter:
    """Collects output tensors and writes a shard whenever the next tensor would overflow it."""

    def __init__(self, folder: Path, max_bytes: int, held: _Held) -> None:
        self.folder, self.max_bytes, self.held = folder, max_bytes, held
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        n = _nbytes(tensor)
        if self.buffer and self.size + n > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.size += n
        self.held.add(n)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        write_safetensors(self.buffer, path)
        self.parts.append((path, list(self.buffer)))
        self.total += self.size
        self.held.drop(self.size)
        self.buffer, self.size = {}, 0

    def finish(self) -> int:
        """Name the shards like transformers does and write the index; returns the shard count."""
        self.flush()
        n = len(self.parts)
        if n == 1:
            os.replace(self.parts[0][0], self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, (path, keys) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return n


def parse_size(text: Union[str, int]) -> int:
    """"2GB" -> 2*10**9, "500MiB" -> 500*2**20, 1000 -> 1000 (transformers' conventions)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size = {text!r}: use a size like 500MB, 2GB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def merge_adapter_files(
    base_dir: Union[str, Path],
    adapter_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[str, int] = "2GB",
    simulate_nf4: bool = False,
    force: bool = False,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into the model in `base_dir`, writing `out_dir`.

    The output is built in a hidden folder next to `out_dir` and renamed into place when complete,
    so `out_dir` never holds a partial model; with `force` an existing `out_dir` is replaced only then.

    Raises:
        UserError: missing or invalid folders, a base without tokenizer files, an adapter that
            does not fit the base (first mismatching module and both shapes), a non-empty
            `out_dir` without `force`, simulate_nf4 without bitsandbytes.
    """
    if simulate_nf4:
        from lorakit.quant import require_bitsandbytes

        require_bitsandbytes("--simulate-nf4")
    files = read_adapter(adapter_dir)
    template = read_chat_template(files.path)  # checked before any work; copied as it is
    layout = read_base_layout(base_dir)
    side_files(layout.folder)  # a link it will not copy: refused now, not after the weights are written
    out_dir = check_output_folder(out_dir, {"base model": layout.folder, "adapter": files.path}, force)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise UserError(f"--max-shard-size = {max_shard_size!r}: must be positive")
    plan = plan_merge(layout, files, simulate_nf4=simulate_nf4)
    if not plan.updates and not plan.replace and not any(w.a is not None for w in plan.experts.values()):
        raise UserError(
            f"{files.path}: the adapter changes no weight of {layout.folder} ({WEIGHTS_NAME} holds {len(files.tensors)} "
            "tensors), so merging it would add nothing to the base; check that this is the trained adapter's folder"
        )
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype = {dtype}: use torch.float32, torch.bfloat16 or torch.float16")

    held = _Held()
    adapter_bytes = sum(_nbytes(t) for t in files.tensors.values())
    held.add(adapter_bytes)  # the adapter stays in memory throughout
    staging = staging_folder(out_dir)
    try:
        with writing(out_dir):  # (a write's error names no file: the folder being written, then)
            shards, out_dtype, nf4_done, output_bytes = _write_merged(
                layout, files, plan, staging, held, max_bytes, dtype, simulate_nf4, template
            )
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeReport(
        out_dir=out_dir,
        dtype=out_dtype,
        shards=shards,
        tensors=len(layout.shapes) + len(plan.extra),
        merged_modules=len(plan.updates) + len({w for w in plan.experts.values() if w.a is not None}),
        replaced_tensors=len(plan.replace),
        untied=plan.untie,
        output_bytes=output_bytes,
        largest_input_shard_bytes=max(p.stat().st_size for p in layout.shard_files),
        adapter_bytes=adapter_bytes,
        peak_held_bytes=held.peak,
        peak_rss_bytes=peak_rss_bytes(),
        nf4_rounded=nf4_done,
    )


def _write_merged(
    layout: BaseLayout, files: AdapterFiles, plan: MergePlan, staging: Path, held: _Held, max_bytes: int,
    dtype: Optional[torch.dtype], simulate_nf4: bool, template: Optional[str],
) -> tuple[int, torch.dtype, int, int]:
    """Write the merged model into `staging`; (shards, its dtype, weights NF4-rounded, bytes written)."""
    writer = _ShardWriter(staging, max_bytes, held)
    stored = [t for k, t in layout.dtypes.items() if t.is_floating_point]
    out_dtype = dtype or _config_dtype(layout.config) or (max(set(stored), key=stored.count) if stored else torch.float32)
    nf4_done = 0
    pending: dict[_ExpertWeight, tuple[dict[str, torch.Tensor], bool]] = {}  # cut, not yet all written
    for shard in layout.shard_files:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                held.add(_nbytes(tensor))
                expert_part = _take_expert_part(key, plan, layout, pending, held)
                for target in [key] + [k for k, v in plan.extra.items() if v == key]:
                    out, rounded = _merged_tensor(target, tensor, plan, held, dtype, expert_part)
                    if target != key and out.data_ptr() == tensor.data_ptr():
                        out = out.clone()  # safetensors refuses two keys sharing storage
                    nf4_done += rounded
                    writer.add(target, out)  # counts `out`, even when it is `tensor` itself
                    del out
                if expert_part is not None:
                    held.drop(_nbytes(expert_part[0]))
                held.drop(_nbytes(tensor))
                del tensor, expert_part
    shards = writer.finish()
    _write_config(layout, staging, out_dtype, plan.untie)
    _copy_side_files(layout.folder, staging)
    (staging / MODEL_CARD_NAME).write_text(merged_model_card(layout.folder, files, out_dtype, simulate_nf4))
    if template is not None:  # the adapter's training template (data.chat_template) over the base's
        (staging / CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")  # as read (not through a link)
        _drop_config_template(staging)
    _stop_where_trained(staging)
    return shards, out_dtype, nf4_done, writer.total


def _take_expert_part(
    key: str,
    plan: MergePlan,
    layout: BaseLayout,
    pending: dict[_ExpertWeight, tuple[dict[str, torch.Tensor], bool]],
    held: _Held,
) -> Optional[tuple[torch.Tensor, bool]]:
    """(the expert-weight part stored under `key`, fp32; whether it replaces the stored value or is
    added to it), cutting its fused weight when first needed; the caller drops it from `held`."""
    weight = plan.experts.get(key)
    if weight is None:
        return None
    if weight not in pending:
        pieces, replaces = weight.stored_values(layout)
        held.add(sum(_nbytes(t) for t in pieces.values()))
        pending[weight] = (pieces, replaces)
    pieces, replaces = pending[weight]
    piece = pieces.pop(key)
    if not pieces:
        del pending[weight]
    return piece, replaces


def _merged_tensor(
    key: str,
    stored: torch.Tensor,
    plan: MergePlan,
    held: _Held,
    dtype: Optional[torch.dtype],
    expert_part: Optional[tuple[torch.Tensor, bool]] = None,
) -> tuple[torch.Tensor, bool]:
    """The output value of checkpoint key `key` (read as `stored`), and whether it was NF4-rounded.

    `expert_part`: what `_take_expert_part` gave for `key` (a fused expert weight's piece: the
    final value, or an update to add). Temporaries are counted in `held` while they live; the
    returned tensor is left for the caller's writer to count.
    """
    value = plan.replace.get(key, stored)
    update = plan.updates.get(key)
    nf4_kind = plan.nf4.get(key)
    if (expert_part is not None or update is not None or nf4_kind is not None) and not value.is_floating_point():
        raise UserError(
            f"{key} is stored as {value.dtype}, not as floating-point numbers; lorakit merges adapters into float weights "
            "only (an update added to integer weights would be rounded away); merge into the model's float checkpoint"
        )
    if expert_part is not None:
        piece, replaces = expert_part
        w = piece if replaces else value.float() + piece
        if not torch.isfinite(w).all():
            raise UserError(f"merging the adapter into {key} gives inf/NaN weights; the adapter is broken")
        return w.to(dtype or value.dtype), replaces
    if update is None and nf4_kind is None:
        return value.to(dtype if dtype is not None and value.is_floating_point() else value.dtype), False
    w = value.float()
    if w.data_ptr() == value.data_ptr():
        w = w.clone()
    held.add(_nbytes(w))  # fp32 working copy, in the checkpoint's layout
    if nf4_kind is not None:
        dense = w.t() if nf4_kind == "conv1d" else w  # (out, in), as lorakit.quant quantizes it
        rounded = nf4_round(dense.to(value.dtype))
        held.add(_nbytes(rounded))
        dense.copy_(rounded)
        held.drop(_nbytes(rounded))
        del rounded
    if update is not None:
        delta = update.delta(w)
        held.add(_nbytes(delta))
        w += delta
        held.drop(_nbytes(delta))
        del delta
        if not torch.isfinite(w).all():
            raise UserError(f"merging the adapter into {update.path} gives inf/NaN weights; the adapter is broken")
    out = w.to(dtype or value.dtype)
    if out.data_ptr() != w.data_ptr():
        held.add(_nbytes(out))  # both alive for a moment
        held.drop(_nbytes(out))
    held.drop(_nbytes(w))
    return out, nf4_kind is not None


def _config_dtype(config: dict[str, Any]) -> Optional[torch.dtype]:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _write_config(layout: BaseLayout, folder: Path, dtype: torch.dtype, untie: bool) -> None:
    config = dict(layout.config)
    config["dtype"] = str(dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    if untie:
        config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _stop_where_trained(folder: Path) -> None:
    """Add to generation_config.json's eos_token_id the tokens the fine-tuned model learned to stop
    at: the chat template's end of turn (chat data), where it is one special or added token (not an
    ordinary one, such as a "." a template writes after every reply), and the tokenizer's EOS (which
    ends every other example lorakit trains). Generators other than lorakit's (transformers, vLLM)
    stop only at the ids listed there, and a base may list another (Qwen2.5's base models:
    <|endoftext|>, while their template ends a turn with <|im_end|>): the merged model would write
    past its answer. A base without the file gets one, with the ids of
    config.json (or of its `text_config`, a multimodal model's); a folder whose tokenizer or
    template transformers cannot load is left as it is."""
    from transformers import AutoTokenizer

    from lorakit.chat_templates import ChatRenderer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - a config.json transformers cannot read (merged by the shapes) stops its
        return  # tokenizer classes from loading too (the errors are transformers' and huggingface_hub's own kinds)
    stops = []
    try:
        end = ChatRenderer(tokenizer).end_of_turn if tokenizer.chat_template else None
    except UserError:  # the base's own template does not compile: generation has no turns to end here
        end = None
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    if len(ids) == 1 and (ids[0] in tokenizer.all_special_ids or end in tokenizer.get_added_vocab()):
        stops.append(ids[0])
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    path = folder / "generation_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
    else:
        model_config = json.loads((folder / "config.json").read_text())
        text_config = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}
        config = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = model_config.get(key, text_config.get(key))
            if value is not None:
                config[key] = value
    eos = config.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    added = [i for i in dict.fromkeys(stops) if i not in eos]
    if added:
        config["eos_token_id"] = eos + added
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _drop_config_template(folder: Path) -> None:
    """Remove a chat template tokenizer_config.json holds (older transformers wrote it there), so the
    folder's chat_template.jinja is the one a tokenizer loads."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if isinstance(config, dict) and config.pop("chat_template", None) is not None:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def side_files(base: Path) -> list[Path]:
    """The base's files a merged model takes as they are: tokenizer files, generation config, chat
    template, custom code; every top-level file that is not weights, an index, config.json or the
    model card (those are written separately).

    Raises:
        UserError: one is a link out of the folder (`inside_folder`): a folder from elsewhere could
            link a private file there, to be published with the merged model.
    """
    files = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in ("config.json", INDEX_NAME, MODEL_CARD_NAME):
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        if not inside_folder(path, base):
            raise UserError(f"{path} is a link to {path.resolve()}, outside the model's folder and no file of another "
                            "model folder: lorakit does not copy it into the merged model; copy the file into the folder "
                            "(cp --remove-destination) or remove the link")  # fmt: skip
        files.append(path)
    return files


def _copy_side_files(base: Path, folder: Path) -> None:
    for path in side_files(base):
        shutil.copy2(path, folder / path.name)



MODEL_CARD_NAME = "README.md"
# What a merged model inherits from its base's card: its terms and what it is. Tags and the rest
# describe the base (or its own base), not the merge.
_INHERITED_CARD_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag")


def merged_model_card(base: Path, files: AdapterFiles, dtype: torch.dtype, simulate_nf4: bool) -> str:
    """The merged folder's README.md: what it was made of, then the adapter's and the base's own
    cards (their headings below the card's titles). The base's card is not copied as it is: it would describe
    the base as the folder's model, and a hub would list the merge under the base's name."""
    from lorakit import __version__

    base_meta, base_body = _card_parts(base / MODEL_CARD_NAME, base)
    _, adapter_body = _card_parts(files.path / MODEL_CARD_NAME, files.path)
    # a hub checks base_model as a repository id: a local folder is named in the text alone
    here, trained_on = base_reference(str(base)), str(files.peft_config.get("base_model_name_or_path") or "")
    hub_id = here.name if here.on_hub else trained_on if looks_like_hub_id(trained_on) else None
    meta: dict[str, Any] = {**({"base_model": hub_id} if hub_id else {}), "library_name": "transformers"}
    meta.update({key: base_meta[key] for key in _INHERITED_CARD_KEYS if key in base_meta})
    meta["tags"] = ["lorakit", "lora", "merged"]
    config = files.config
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    rounded = (" Each frozen weight was rounded through NF4 first (`--simulate-nf4`), as the 4-bit base the adapter"
               " was trained on held it.") if simulate_nf4 else ""  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        f"# {here.name if here.on_hub else base.name} with a LoRA adapter merged in",
        "",
        f"Written by `lorakit merge` (lorakit {__version__}): the weights of `{base}` with the LoRA adapter"
        f" `{files.path}` (r={config.r}, alpha={config.alpha}, targets: {targets}) added into them, stored in"
        f" {str(dtype).replace('torch.', '')}.{rounded} It loads as a plain model, without PEFT or lorakit:"
        ' `AutoModelForCausalLM.from_pretrained("THIS_FOLDER")`.',
    ]
    for title, body in (("The adapter's card", adapter_body), ("The base model's card", base_body)):
        if body.strip():
            lines += ["", f"## {title}", "", _headings_down(body.strip())]
    return "\n".join(lines) + "\n"


def _card_parts(path: Path, folder: Path) -> tuple[dict[str, Any], str]:
    """A model card's YAML front matter (empty when there is none, or it is not a mapping) and its body;
    ({}, "") without a card, or for a link out of `folder` (`inside_folder`)."""
    if not path.is_file() or not inside_folder(path, folder):
        return {}, ""
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # (-sig: a byte-order mark is no text)
    match = re.match(r"---[ \t]*\r?\n(?:(.*?)\r?\n)?---[ \t]*(?:\r?\n|$)", text, re.S)
    if match is None:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def _headings_down(markdown: str) -> str:
    """Markdown headings two levels deeper, below the card's `##` titles (`# A` -> `### A`; the
    deepest, `######`, stays), code blocks left alone (a fence closes only on its own kind)."""
    out, fence = [], None
    for line in markdown.splitlines():
        marks = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
        if marks and (fence is None or (marks.group(1)[0] == fence[0] and len(marks.group(1)) >= len(fence))):
            fence = marks.group(1) if fence is None else None
        elif fence is None and (heading := re.match(r"(#{1,6})( |$)", line)):
            line = "#" * min(6, len(heading.group(1)) + 2) + line[len(heading.group(1)):]
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI
def merge_command(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    report = merge_adapter_files(
        args.base,
        args.adapter,
        args.out,
        dtype=dtype,
        max_shard_size=args.max_shard_size,
        simulate_nf4=args.simulate_nf4,
        force=args.force,
    )
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- PiSSA / OLoRA as plain LoRA
@dataclass
class ConvertReport:
    out_dir: Path
    modules: int
    r: int

    def summary(self) -> str:
        return (f"converted {self.modules} PiSSA/OLoRA modules into a plain LoRA adapter of rank {self.r} "
                f"over the unchanged base -> {self.out_dir}")  # fmt: skip


def principal_to_lora(
    base_dir: Union[str, Path], adapter_dir: Union[str, Path], out_dir: Union[str, Path], *, force: bool = False
) -> ConvertReport:
    """A PiSSA / OLoRA adapter written as a plain LoRA adapter over the original base.

    Such an adapter was trained against W less its principal part s · B0 @ A0 (its init, computed
    again from W here as loading it does), so what it changes is s · (B @ A - B0 @ A0) =
    s · [B, -B0] @ [A; A0]: a LoRA of rank 2r with A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r).
    r and rank_pattern double, alpha and alpha_pattern scale so s stays (x2, or x sqrt 2 under
    rsLoRA), init is the default. Servers that apply B @ A to the unchanged base (vLLM) and stacks
    of several adapters then take it as any LoRA. Only the targeted base weights are read.

    Raises:
        UserError: missing or invalid folders, an adapter that is not PiSSA / OLoRA or does not fit
            the base, a non-empty `out_dir` without `force`.
    """
    from lorakit.adapters import write_adapter_folder

    files = read_adapter(adapter_dir)
    config = files.config
    if config.init not in PRINCIPAL_INITS:
        raise UserError(f"{files.path}: init = {config.init!r}; only PiSSA and OLoRA adapters need converting, this one "
                        "is a plain LoRA adapter already")  # fmt: skip
    out_dir = check_output_folder(out_dir, {"adapter": files.path, "base model": base_dir}, force, writes_adapter=True)
    layout = read_base_layout(base_dir, need_tokenizer=False)
    plan = plan_merge(layout, files)
    tensors = dict(files.tensors)
    for key, update in plan.updates.items():
        stored = layout.tied.get(key, key) if key not in layout.shapes else key
        w = read_stored(layout.files[stored], stored).float()
        w_oi = w if update.kind == "linear" else w.t()  # (out, in)
        a0, b0 = principal_factors(w_oi, update.a.shape[0], update.scale, update.init)
        a_key, b_key = f"{PREFIX}{update.path}.lora_A.weight", f"{PREFIX}{update.path}.lora_B.weight"
        tensors[a_key] = torch.cat([update.a.float(), a0]).to(update.a.dtype).contiguous()
        tensors[b_key] = torch.cat([update.b.float(), -b0], dim=1).to(update.b.dtype).contiguous()
    alpha_factor = math.sqrt(2) if config.rslora else 2
    raw = dict(files.peft_config)
    raw.update(
        r=2 * config.r,
        lora_alpha=alpha_factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: alpha_factor * v for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
    write_adapter_folder(out_dir, raw, tensors)
    return ConvertReport(out_dir, len(plan.updates), 2 * config.r)


def convert_command(args: argparse.Namespace) -> int:
    print(principal_to_lora(args.base, args.adapter, args.out, force=args.force).summary())
    return 0
