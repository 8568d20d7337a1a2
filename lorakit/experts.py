"""LoRA on the fused expert weights of mixture-of-experts layers (PEFT's `target_parameters`).

transformers 5 keeps a MoE layer's experts as 3-D parameters of one module, not as linear layers:

    gate_up_proj (E, 2·I, H)   first projection of every expert, gate and up rows together
    down_proj    (E, H, I)     second projection
    (E, in, out) instead where the class says `is_transposed` (gpt-oss); `up_proj` alone where it
    has no gate; optional `*_bias` (E, out)

so `all-linear` never reaches them: on Qwen3-MoE or Mixtral it trains attention only. `LoraExperts`
wraps such a module and gives each targeted parameter one low-rank update per expert:

    y_e = x W_e^T + s · (x A_e^T) B_e^T          for the tokens routed to expert e

The factors are stored in PEFT's layout, so the files are PEFT's: A (E·r, in) holds the experts'
A_e one after the other (row e·r + j is row j of A_e); B (out, r·E) holds them interleaved
(column j·E + e is column j of B_e). Forward runs every routed expert with its adapter terms, as
the two low-rank products (never a materialised E·out·in update, which PEFT builds every step),
so the cost is LoRA's own and backward gives A and B their gradients without weight gradients.

Which module classes qualify: those transformers decorates with `use_experts_implementation`
(it sets `has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`), called as
`experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`. The gate between the
projections is the class's own `_apply_gate`, so model-specific gates (gpt-oss's clamped SwiGLU)
need nothing here. Under QLoRA the module is a `lorakit.quant.Experts4bit` (each expert's matrix
NF4 on its own), which offers the same through `frozen_projection` / `expert_shape`; both run
`routed_forward`, transformers' eager experts forward with the projections as functions.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.layers import unmerge_one

_INTERFACE = ("has_gate", "has_bias", "is_transposed", "num_experts")
FIRST_PROJECTIONS = ("gate_up_proj", "up_proj")
SECOND_PROJECTIONS = ("down_proj",)
Projection = Callable[[int, torch.Tensor], torch.Tensor]  # e, rows routed to expert e -> their projection


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts module LoRA can adapt (see the module docstring),
    its expert weights 16-bit or NF4 (lorakit.quant.Experts4bit)."""
    return all(hasattr(module, attr) for attr in _INTERFACE) and (
        isinstance(getattr(module, "down_proj", None), nn.Parameter) or hasattr(module, "frozen_projection")
    )


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The 3-D expert weights of an experts module, in registration order (PEFT nests in this order)."""
    if hasattr(module, "frozen_projection"):  # NF4 experts keep the order of the module they replaced
        return list(module.weight_names)
    names = FIRST_PROJECTIONS + SECOND_PROJECTIONS
    return [n for n, p in module.named_parameters(recurse=False) if n in names and p.dim() == 3]


def expert_shape(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(experts, in, out) of the expert weight `param`, whatever its layout or storage."""
    if hasattr(module, "frozen_projection"):
        return module.expert_shape(param)
    experts, d1, d2 = getattr(module, param).shape
    return (experts, d1, d2) if module.is_transposed else (experts, d2, d1)


def frozen_projection(module: nn.Module, param: str) -> Projection:
    """e, x -> x W_e^T (+ b_e): expert e's frozen projection `param` of rows x (T_e, in)."""
    if hasattr(module, "frozen_projection"):
        return module.frozen_projection(param)
    weights = getattr(module, param).unbind(0)  # unbind: one backward node for all experts
    bias = getattr(module, f"{param}_bias", None) if module.has_bias else None
    biases = bias.unbind(0) if bias is not None else None
    transposed = module.is_transposed

    def run(e: int, x: torch.Tensor) -> torch.Tensor:
        y = x @ weights[e] if transposed else x @ weights[e].t()
        return y if biases is None else y + biases[e]

    return run


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's (A_e, B_e) from PEFT's layout: A (E·r, in) -> (E, r, in), B (out, r·E) -> (E, out, r), views."""
    return a.view(experts, -1, a.shape[-1]), b.view(b.shape[0], -1, experts).permute(2, 0, 1)


def expert_delta(a: torch.Tensor, b: torch.Tensor, experts: int, scale: float, transposed: bool) -> torch.Tensor:
    """s · B_e @ A_e for every expert, fp32, in the fused weight's layout ((E, out, in), or (E, in, out) transposed)."""
    a_e, b_e = expert_factors(a, b, experts)
    delta = scale * torch.bmm(b_e.float(), a_e.float())
    return delta.transpose(1, 2) if transposed else delta


def routed_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    first: Projection,
    second: Projection,
) -> torch.Tensor:
    """transformers' eager experts forward with the two projections given as functions.

    The (token, expert) pairs are sorted by expert so each expert runs one GEMM on its rows; ids
    >= num_experts (expert-parallel placeholders) are skipped, as transformers does. The gate
    between the projections is the module's own (`_apply_gate`, or `act_fn` without a gate).
    """
    experts = module.num_experts
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=experts + 1)[: experts + 1].tolist()
    order = order[: sum(counts[:experts])]  # placeholder ids sort last
    token_of = torch.div(order, top_k, rounding_mode="floor")
    rows = hidden_states[token_of]
    pieces = []
    for e, chunk in enumerate(rows.split(counts[:experts])):
        if chunk.shape[0] == 0:
            continue
        h = first(e, chunk)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        pieces.append(second(e, h))
    out_rows = torch.cat(pieces) if pieces else rows.new_zeros(0, hidden_states.shape[-1])
    if getattr(module, "has_post_expert_norm", False):
        out_rows = module.post_expert_norm(out_rows)
    out_rows = out_rows * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out_rows.dtype)
    result = torch.zeros_like(hidden_states)
    return result.index_add_(0, token_of, out_rows.to(result.dtype))


def first_projection_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def passthrough_getattr(module: nn.Module, name: str):
    """`nn.Module.__getattr__`, then the wrapped `base_layer`'s attribute (num_experts, act_fn, ...)."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        base = module.__dict__["_modules"].get("base_layer")
        if base is None:
            raise
        return getattr(base, name)


class LoraExperts(nn.Module):
    """A transformers experts module plus LoRA adapters on some of its 3-D expert weights.

    lora_A[adapter][param]: (E·r, in), lora_B[adapter][param]: (out, r·E), fp32 by default.
    The wrapped module is `base_layer`; attributes the MoE block reads (`num_experts`, ...) are
    its own, passed through.
    """

    def __init__(self, base: nn.Module, path: str = ""):
        super().__init__()
        if not is_experts_module(base):
            raise UserError(
                f"lora.target_parameters: {path or 'module'} ({type(base).__name__}) is not a transformers experts "
                "module (3-D gate_up_proj / down_proj weights); target its linear layers with lora.targets instead"
            )
        self.base_layer = base
        self.path = path
        self.num_experts = base.num_experts
        self.lora_A = nn.ModuleDict()  # adapter -> ParameterDict(param -> (E·r, in))
        self.lora_B = nn.ModuleDict()  # adapter -> ParameterDict(param -> (out, r·E))
        self.scaling: dict[str, dict[str, float]] = {}  # adapter -> param -> s
        self.ranks: dict[str, dict[str, int]] = {}  # adapter -> param -> r
        self.active_adapter: Optional[str] = None
        self.merged: list[str] = []
        self.disabled = False

    __getattr__ = passthrough_getattr

    # ----------------------------------------------------------------- shapes
    def features(self, param: str) -> tuple[int, int]:
        """(in, out) of one expert's projection held in `param`."""
        return expert_shape(self.base_layer, param)[1:]

    def adapted_parameters(self, name: str) -> list[str]:
        return list(self.lora_A[name].keys())

    # ----------------------------------------------------------------- adapters
    def add_adapter(
        self,
        name: str,
        params: dict[str, tuple[int, float]],
        *,
        rslora: bool = False,
        init: str = "default",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create adapter `name` on the expert weights `params` (param -> (r, alpha)); B starts at zero,
        so the model is unchanged."""
        if name in self.lora_A:
            raise UserError(f"adapter {name!r} already exists on {self.path}; delete it first or pick another name")
        if init not in ("default", "gaussian"):
            raise UserError(
                f"lora.init = {init!r} cannot start an adapter on the expert weights of {self.path}; "
                "use default or gaussian"
            )
        unknown = [p for p in params if p not in expert_parameter_names(self.base_layer)]
        if unknown:
            raise UserError(
                f"lora.target_parameters: {self.path}.{unknown[0]} is not an expert weight LoRA can adapt; "
                f"{self.path} has {', '.join(expert_parameter_names(self.base_layer))}"
            )
        device = next(self.base_layer.parameters()).device
        device = device if device.type != "meta" else torch.device("cpu")
        experts = self.num_experts
        a_set, b_set = nn.ParameterDict(), nn.ParameterDict()
        self.scaling[name], self.ranks[name] = {}, {}
        # Registration order, whatever order the config named them in: PEFT's nesting (and keys) follow it.
        for param in [p for p in expert_parameter_names(self.base_layer) if p in params]:
            r, alpha = params[param]
            fan_in, fan_out = self.features(param)
            a = torch.empty(experts * r, fan_in, dtype=dtype, device=device)
            if init == "default":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init of its (E·r, in) lora_A
            else:
                nn.init.normal_(a, std=1 / r)
            a_set[param] = nn.Parameter(a)
            b_set[param] = nn.Parameter(torch.zeros(fan_out, r * experts, dtype=dtype, device=device))
            self.scaling[name][param] = alpha / math.sqrt(r) if rslora else alpha / r
            self.ranks[name][param] = r
        self.lora_A[name], self.lora_B[name] = a_set, b_set
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            unmerge_one(self, name)
        del self.lora_A[name], self.lora_B[name]
        del self.scaling[name], self.ranks[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A.keys()), None)

    def factors(self, name: str, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's (A_e, B_e) of `param`: (E, r, in) and (E, out, r), views of the stored tensors."""
        return expert_factors(self.lora_A[name][param], self.lora_B[name][param], self.num_experts)

    def delta_weight(self, name: str, param: str) -> torch.Tensor:
        """s · B_e @ A_e for every expert, fp32, in `param`'s own layout ((E, out, in) or transposed)."""
        a, b = self.lora_A[name][param], self.lora_B[name][param]
        return expert_delta(a, b, self.num_experts, self.scaling[name][param], self.base_layer.is_transposed)

    # ----------------------------------------------------------------- merging
    def merge(self, name: Optional[str] = None) -> None:
        """Add every expert's s·B_e@A_e into its weights (in fp32; non-finite results are refused)."""
        name = name or self.active_adapter
        if name is None or name in self.merged:
            return
        if hasattr(self.base_layer, "frozen_projection"):
            raise UserError(
                f"cannot merge an adapter into the 4-bit experts {self.path or '(unnamed)'}: re-quantizing would lose the "
                "update; merge into the full-precision base with `lorakit merge` instead"
            )
        merged = {}  # every weight checked before any is written: all of the layer's or none
        for param in self.adapted_parameters(name):
            weight = getattr(self.base_layer, param)
            merged[param] = (weight.float() + self.delta_weight(name, param)).to(weight.dtype)
            if not torch.isfinite(merged[param]).all():
                raise UserError(f"merging adapter {name!r} into {self.path}.{param} gives inf/NaN weights; the adapter is broken")
        for param, weight in merged.items():
            getattr(self.base_layer, param).data.copy_(weight)
        self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self.unmerge_last()

    def unmerge_last(self) -> None:
        """Subtract the adapter merged last."""
        name = self.merged.pop()
        for param in self.adapted_parameters(name):
            weight = getattr(self.base_layer, param)
            weight.data.copy_((weight.float() - self.delta_weight(name, param)).to(weight.dtype))

    def to_base_module(self) -> nn.Module:
        return self.base_layer

    # ----------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return self._adapted_forward(name, hidden_states, top_k_index, top_k_weights)

    def _adapted_forward(
        self, name: str, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        base = self.base_layer
        first = self._projection(name, first_projection_name(base))
        second = self._projection(name, "down_proj")
        return routed_forward(base, hidden_states, top_k_index, top_k_weights, first, second)

    def _projection(self, name: str, param: str) -> Projection:
        """e, x -> expert e's projection `param` of x, with its LoRA term when `param` is adapted."""
        frozen = frozen_projection(self.base_layer, param)
        if param not in self.lora_A[name]:
            return frozen
        a, b = self.factors(name, param)
        a_list, b_list, scale = a.unbind(0), b.unbind(0), self.scaling[name][param]

        def run(e: int, x: torch.Tensor) -> torch.Tensor:
            y = frozen(e, x)
            lora = (x.to(a_list[e].dtype) @ a_list[e].t()) @ b_list[e].t()
            return y + (scale * lora).to(y.dtype)

        return run

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(" + ", ".join(f"{p}: r={r}, s={self.scaling[n][p]:g}" for p, r in self.ranks[n].items()) + ")"
            for n in self.lora_A
        )
        return f"experts x{self.num_experts}, adapters=[{adapters}], active={self.active_adapter}"
