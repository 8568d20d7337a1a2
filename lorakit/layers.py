"""The LoRA layer: a frozen base layer plus named low-rank adapters.

    y = base(x) + s · B A dropout(x),    A: (r, in), B: (out, r), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

`LoraLayer` takes over the parameters of the layer it wraps and keeps them under their usual
names (`q_proj.weight`, `q_proj.bias`), so base checkpoints and FSDP see the same parameters as
before; it knows how to apply each kind of base itself (the dispatch table `BASE_KINDS`):

    linear     nn.Linear                  weight (out, in)
    conv1d     transformers' Conv1D        weight (in, out), GPT-2's transposed layout
    embedding  nn.Embedding               weight (num_embeddings, dim); adapter A: (r, num), B: (dim, r)
    linear4bit bitsandbytes Linear4bit    NF4 codes + quant_state, dequantized on the fly

Adapters live in `lora_A[name]` / `lora_B[name]` (plain Parameters, fp32 by default), so several
can sit on one layer; one is active at a time.

DoRA (Liu et al. 2024, PEFT's `use_dora`) adds a trained magnitude per output row,
`lora_magnitude[name]` (out,), and rescales each row of the adapted weight to it:

    W' = m / ||W + s·B A||_row · (W + s·B A)      y = x W'^T + bias

An embedding (W: (num, dim)) gets a magnitude per dimension, its norms over W's columns, as in
PEFT. The norm n is treated as a constant in backward (the paper's section 4.3, as PEFT does) and is
computed in fp32 from ||W||² per row (kept until W changes) and rank-r products, never forming an
(out, in) matrix. Without dropout the fused LoRA kernel runs and its output is rescaled:
y = m/n · (x W^T + s · x A^T B^T) + bias. With dropout, the base part of the rescaling sees the
dropped input, as in PEFT: y = base(x) + (m/n - 1) · x̃ W^T + m/n · s · x̃ A^T B^T with
x̃ = dropout(x), on the plain autograd path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import activation_checkpointing
from lorakit.errors import UserError


@dataclass(frozen=True)
class BaseKind:
    """How to run and update one kind of base layer."""

    name: str
    matches: Callable[[nn.Module], bool]
    # (out, in) fp32 view of the weight, whatever the storage layout or quantization
    dense_weight: Callable[["LoraLayer"], torch.Tensor]
    # write a (out, in) fp32 weight back in the storage layout and dtype
    set_dense_weight: Callable[["LoraLayer", torch.Tensor], None]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so this module does not import transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


# nn.Linear subclasses whose forward is x W^T + b all the same. Other subclasses that override
# forward are no linear layer to LoRA or to quantize: MoE routers built on nn.Linear return routing
# tuples (Phi-MoE's PhimoeTopKRouter, Llama 4's Llama4Router), DeepSeek-V4's grouped linear
# multiplies per group; wrapping or replacing them would change what they compute.
LINEAR_EQUIVALENTS = ("FalconLinear",)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's own (or an equivalent's, LINEAR_EQUIVALENTS)."""
    return isinstance(module, nn.Linear) and (
        type(module).forward is nn.Linear.forward or type(module).__name__ in LINEAR_EQUIVALENTS
    )


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def _set_linear(layer: "LoraLayer", w: torch.Tensor) -> None:
    layer.weight.data.copy_(w.to(layer.weight.dtype))


def _set_conv1d(layer: "LoraLayer", w: torch.Tensor) -> None:
    layer.weight.data.copy_(w.t().to(layer.weight.dtype))


def quant_state_of(layer: nn.Module):
    """A 4-bit layer's bitsandbytes QuantState. Kept on the module as well as on its Params4bit
    weight: FSDP2 turns the weight into plain (sharded, then gathered) tensors without it."""
    state = getattr(layer.weight, "quant_state", None)
    return layer.quant_state if state is None else state


def _dequant(layer: "LoraLayer") -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, quant_state_of(layer)).float()


def _set_4bit(layer: "LoraLayer", w: torch.Tensor) -> None:
    raise UserError(
        f"cannot merge an adapter into the 4-bit layer {layer.path or '(unnamed)'}: re-quantizing would lose the update; "
        "merge into the full-precision base with `lorakit merge` instead"
    )


# First match wins: Linear4bit subclasses nn.Linear, so it must come before linear.
BASE_KINDS: list[BaseKind] = [
    BaseKind("linear4bit", _is_linear4bit, _dequant, _set_4bit),
    BaseKind("linear", is_plain_linear, lambda l: l.weight.float(), _set_linear),
    BaseKind("conv1d", _is_conv1d, lambda l: l.weight.float().t(), _set_conv1d),
    BaseKind("embedding", lambda m: isinstance(m, nn.Embedding), lambda l: l.weight.float(), _set_linear),
]


PRINCIPAL_INITS = ("pissa", "olora")  # inits that move the base weight's principal part into the adapter


def principal_factors(w: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial (A (r, in), B (out, r)) of a PiSSA or OLoRA adapter on the fp32 weight w (out, in).

    The adapter starts as W's principal part, scale · B @ A, and the base keeps the residual
    W - scale · B @ A, so the model is unchanged at step 0. Loading such an adapter recomputes these
    from the base, as PEFT does, to rebuild the residual its B and A were trained against.
    """
    if init == "pissa":
        # The top-r singular directions move into the adapter.
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
        sr = s_vals[:r] / scale
        return torch.diag(torch.sqrt(sr)) @ vh[:r], u[:, :r] @ torch.diag(torch.sqrt(sr))
    # OLoRA: an orthonormal basis of W's column space (QR) initialises B.
    q, rr = torch.linalg.qr(w)
    return rr[:r], q[:, :r]


def base_kind(module: nn.Module) -> Optional[BaseKind]:
    """The dispatcher for `module`, or None if LoRA cannot wrap it."""
    for kind in BASE_KINDS:
        if kind.matches(module):
            return kind
    return None


def unmerge_one(layer: Any, name: str) -> None:
    """Take merged adapter `name` alone out of `layer`'s weights (a LoraLayer or LoraExperts): the
    adapters merged after it come out first, as a DoRA adapter's rescaling undoes only in reverse
    order, and go back in after, so the others stay merged."""
    later = layer.merged[layer.merged.index(name) + 1 :]
    while layer.merged[-1] != name:
        layer.unmerge_last()
    layer.unmerge_last()
    for other in later:
        layer.merge(other)


class LoraLayer(nn.Module):
    """A base layer's frozen parameters plus named LoRA adapters.

    Shapes: input (..., in) for linear kinds, (...) integer ids for embeddings; output (..., out).
    """

    def __init__(self, base: nn.Module, path: str = ""):
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise UserError(
                f"cannot add LoRA to {path or 'module'} of type {type(base).__name__}; "
                "supported: nn.Linear, transformers Conv1D, nn.Embedding, bitsandbytes Linear4bit"
            )
        self.kind = kind
        self.path = path
        self.weight = base.weight
        self.bias = getattr(base, "bias", None) if kind.name != "embedding" else None
        if kind.name == "embedding":
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
            self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
            self._embedding_args = dict(
                padding_idx=base.padding_idx,
                max_norm=base.max_norm,
                norm_type=base.norm_type,
                scale_grad_by_freq=base.scale_grad_by_freq,
                sparse=base.sparse,
            )
        elif kind.name == "conv1d":
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = getattr(base, "compute_dtype", None)
        if kind.name == "linear4bit":
            self.quant_state = base.weight.quant_state  # see quant_state_of
        self.base_class = type(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only: (out,)
        # ||W||² per output row for DoRA's norm, computed once; a buffer so it moves with the layer
        self.register_buffer("_dora_row_sq", None, persistent=False)
        self._dora_norms: dict[str, torch.Tensor] = {}  # ||W + s·B A||_row of a merged DoRA adapter, to unmerge
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.active_adapter: Optional[str] = None
        self.merged: list[str] = []
        self.disabled = False
        # the base weight came from an adapter file (PEFT saves a targeted embedding's, e.g. of a
        # resized vocabulary): adapters saved from this layer carry it on
        self.saves_base_weight = False

    # ----------------------------------------------------------------- adapters
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "default",
        dora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create adapter `name`; `init` picks A and B (and, for pissa/olora, rewrites the base weight);
        `dora` adds a magnitude vector starting at the row norms of the adapted weight."""
        if name in self.lora_A:
            raise UserError(f"adapter {name!r} already exists on {self.path}; delete it first or pick another name")
        device = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if init == "default":
            if self.kind.name == "embedding":
                # PEFT's embedding init: A zeros, B normal, so the product starts at zero either way
                a.zero_()
                nn.init.normal_(b)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            if self.kind.name == "embedding":
                a.zero_()
                nn.init.normal_(b)
            else:
                nn.init.normal_(a, std=1 / r)
        elif init in PRINCIPAL_INITS:
            if self.kind.name not in ("linear", "conv1d"):
                raise UserError(f"init {init!r} needs a full-precision linear base; {self.path} is {self.kind.name}")
            if self.merged:
                raise UserError(f"unmerge the adapters of {self.path} before adding a {init} adapter")
            w = self.kind.dense_weight(self)
            a0, b0 = principal_factors(w, r, scale, init)
            a.copy_(a0)
            b.copy_(b0)
            self.kind.set_dense_weight(self, w - scale * (b.float() @ a.float()))
            self._dora_row_sq = None
        else:
            raise UserError(f"unknown LoRA init {init!r}; use one of default, gaussian, pissa, olora")
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scale
        self.ranks[name] = r
        if dora:
            with torch.no_grad():
                norms = self._adapted_row_norms(name)
            self.lora_magnitude[name] = nn.Parameter(norms.to(dtype))
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            unmerge_one(self, name)
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.scaling[name], self.ranks[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A.keys()), None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B @ A in fp32, shape (out, in) (for embeddings: (dim, num_embeddings))."""
        return self.scaling[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    def _adapted_row_norms(self, name: str) -> torch.Tensor:
        """||W + s·B A|| of every output row, fp32, no gradient (DoRA's norm), without forming either
        (out, in) matrix: ||W_k||² (kept until W changes) + 2s·B_k·(A W^T)_k + s²·B_k (A A^T) B_k^T.
        For an embedding (W: (num, dim), its update s·B A: (dim, num)) the rows are W's columns."""
        embedding = self.kind.name == "embedding"
        with torch.no_grad():
            if self._dora_row_sq is None:
                self._dora_row_sq = torch.linalg.vector_norm(self.kind.dense_weight(self), dim=0 if embedding else 1).square()
            a, b, s = self.lora_A[name].float(), self.lora_B[name].float(), self.scaling[name]
            if embedding:
                a_wt = (a.to(self.weight.dtype) @ self.weight).float()  # (r, dim) = A W
            else:
                frozen = self.base_forward(a.to(self.weight.dtype if self.weight.is_floating_point() else a.dtype))
                a_wt = (frozen if self.bias is None else frozen - self.bias.to(frozen.dtype)).float()  # (r, out) = A W^T
            cross = (b * a_wt.t()).sum(1)
            own = ((b @ (a @ a.t())) * b).sum(1)
            return (self._dora_row_sq.float() + 2 * s * cross + s * s * own).clamp_min(0).sqrt()

    @property
    def _dora_axis(self) -> int:
        """The axis of the dense weight DoRA's norm runs along: rows (out, in), an embedding's columns."""
        return 0 if self.kind.name == "embedding" else 1

    # ----------------------------------------------------------------- merging
    def merge(self, name: Optional[str] = None) -> None:
        """Add s·B@A into the base weight (computed in fp32; non-finite results are refused)."""
        name = name or self.active_adapter
        if name is None or name in self.merged:
            return
        self._dora_row_sq = None  # W changes
        w = self.kind.dense_weight(self)
        delta = self.delta_weight(name)
        merged = w + (delta.t() if self.kind.name == "embedding" else delta)
        if name in self.lora_magnitude:
            norms = torch.linalg.vector_norm(merged, dim=self._dora_axis)
            self._dora_norms[name] = norms  # of the unmerged weight: unmerge divides by m / norms again
            merged = merged * (self.lora_magnitude[name].detach().float() / norms).unsqueeze(self._dora_axis)
        if not torch.isfinite(merged).all():
            raise UserError(f"merging adapter {name!r} into {self.path} gives inf/NaN weights; the adapter is broken")
        self.kind.set_dense_weight(self, merged)
        self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to the weight dtype's rounding)."""
        while self.merged:
            self.unmerge_last()

    def unmerge_last(self) -> None:
        """Subtract the adapter merged last (a DoRA adapter's rescaling is undone in that order)."""
        self._dora_row_sq = None  # W changes
        name = self.merged.pop()
        w = self.kind.dense_weight(self)
        delta = self.delta_weight(name)
        if name in self.lora_magnitude:
            w = w / (self.lora_magnitude[name].detach().float() / self._dora_norms.pop(name)).unsqueeze(self._dora_axis)
        self.kind.set_dense_weight(self, w - (delta.t() if self.kind.name == "embedding" else delta))

    # ----------------------------------------------------------------- forward
    def base_forward(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The frozen layer's forward; linear kinds write into `out` (..., out_features) when given."""
        kind = self.kind.name
        if kind == "embedding":
            return F.embedding(x, self.weight, **self._embedding_args)
        if kind == "linear4bit":
            import bitsandbytes as bnb

            dtype = x.dtype
            xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(xc.dtype)
            result = bnb.matmul_4bit(xc, self.weight.t(), bias=bias, quant_state=quant_state_of(self)).to(dtype)
            return result if out is None else out.copy_(result)
        if kind == "linear" and out is None:
            return F.linear(x, self.weight, self.bias)
        # One GEMM over the flattened tokens with the bias as its accumulator: what F.linear and
        # transformers' Conv1D compute, bit for bit, here into a given output.
        weight_t = self.weight.t() if kind == "linear" else self.weight  # (in, out)
        x2 = x.reshape(-1, x.shape[-1])
        kwargs = {} if out is None else {"out": out.view(-1, self.out_features)}
        if self.bias is None:
            out2 = torch.mm(x2, weight_t, **kwargs)
        else:
            out2 = torch.addmm(self.bias, x2, weight_t, **kwargs)
        return out2.view(*x.shape[:-1], self.out_features) if out is None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not (self.disabled or name is None or name in self.merged) and self._fused_ok(x, self.lora_A[name]):
            from lorakit.fused import lora_linear

            drop = self.lora_dropout[name]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            dora = name in self.lora_magnitude
            if not (dora and p > 0):  # DoRA with dropout needs x̃ W^T apart: the plain path
                # without grad (eval, generation, DPO's reference pass) it computes what a training
                # forward computes, to the bit: a frozen copy of the trained adapter is its equal
                kept = activation_checkpointing.current_slot(self) if torch.is_grad_enabled() else None
                out = lora_linear(
                    x, self.lora_A[name], self.lora_B[name], base=self.base_forward, dense_weight=self._dense_weight_like,
                    scale=self.scaling[name], dropout=p, kept=kept,
                )  # fmt: skip
                if not dora:
                    return out
                # without dropout DoRA's output is m/n · (x W^T + s·x A^T B^T) + bias = m/n · out + (1 - m/n) · bias
                norm_scale = (self.lora_magnitude[name] / self._adapted_row_norms(name)).to(out.dtype)
                return out * norm_scale if self.bias is None else out * norm_scale + (1 - norm_scale) * self.bias.to(out.dtype)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as plain autograd ops (the reference the fused path is tested against)."""
        name = self.active_adapter
        result = self.base_forward(x)
        if self.disabled or name is None or name in self.merged:
            return result
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if self.kind.name == "embedding":
            # (..., r) rows of A^T picked by the token ids, then projected by B^T
            after_a = F.embedding(x, a.t(), **self._embedding_args)
            lora = (scale * (after_a @ b.t())).to(result.dtype)
            if name not in self.lora_magnitude:
                return result + lora
            norm_scale = (self.lora_magnitude[name] / self._adapted_row_norms(name)).to(result.dtype)  # (dim,)
            return norm_scale * (result + lora)
        dropped = self.lora_dropout[name](x)
        h = dropped.to(a.dtype)
        lora = scale * F.linear(F.linear(h, a), b)
        if name not in self.lora_magnitude:
            return result + lora.to(result.dtype)
        # DoRA: every row rescaled to its magnitude, the norm a constant (see the module docstring)
        norm_scale = (self.lora_magnitude[name] / self._adapted_row_norms(name)).to(result.dtype)
        if dropped is x:
            frozen = result if self.bias is None else result - self.bias.to(result.dtype)
        else:
            frozen = self.base_forward(dropped)
            frozen = frozen if self.bias is None else frozen - self.bias.to(frozen.dtype)
        return result + (norm_scale - 1) * frozen + norm_scale * lora.to(result.dtype)

    def _fused_ok(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        """Whether `lorakit.fused.lora_linear` computes this call (frozen linear-like base, plain tensors)."""
        from lorakit import fused

        return (
            fused.ENABLED
            and self.kind.name in ("linear", "conv1d", "linear4bit")
            # under autocast the products come out in its dtype, the in-place sum does not follow it
            and not torch.is_autocast_enabled(x.device.type)
            and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
            and not hasattr(a, "placements")  # FSDP2 shards (DTensor) take the plain path
            and x.is_floating_point()
        )

    def _dense_weight_like(self, g: torch.Tensor) -> torch.Tensor:
        """The frozen weight as (out, in) in g's dtype, for the input gradient of the fused path."""
        kind = self.kind.name
        if kind == "linear":
            return self.weight.to(g.dtype)
        if kind == "conv1d":
            return self.weight.t().to(g.dtype)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight.data, quant_state_of(self)).to(g.dtype)

    # ----------------------------------------------------------------- unwrapping
    def to_base_module(self) -> nn.Module:
        """A plain module of the original class holding this layer's (possibly merged) weights."""
        kind = self.kind.name
        if kind == "linear4bit":
            raise UserError(
                f"cannot unload LoRA from the 4-bit layer {self.path}; merge into the full-precision base with "
                "`lorakit merge`"
            )
        with torch.device("meta"):
            if kind == "linear":
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            elif kind == "conv1d":
                plain = self.base_class(self.out_features, self.in_features)
            else:
                plain = nn.Embedding(self.num_embeddings, self.embedding_dim, **self._embedding_args)
        plain.weight = self.weight
        if kind != "embedding":
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.ranks[n]}, s={self.scaling[n]:g}{', DoRA' if n in self.lora_magnitude else ''})"
                             for n in self.lora_A)  # fmt: skip
        return f"{self.kind.name} {self.in_features}->{self.out_features}, adapters=[{adapters}], active={self.active_adapter}"
