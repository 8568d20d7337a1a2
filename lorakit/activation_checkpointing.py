"""Gradient checkpointing of decoder layers: full, or selective (cheap ops recomputed, GEMM outputs kept).

- full (`train.gradient_checkpointing: true`): on transformers' layer checkpointing (non-reentrant
  `torch.utils.checkpoint`), each decoder layer keeps only its input in forward, and backward reruns
  the layer, GEMMs included: about one more forward pass per step. One GEMM per layer is left out:
  in the rerun a LoRA layer computes its frozen projection only after its own tensors have been
  saved, and the checkpoint stops the rerun once the last tensor the backward needs is back. The
  last LoRA layer of a Llama-style layer (`down_proj`, whose output only joins the residual
  stream) therefore never computes its projection again. Nothing is assumed about the model: where
  a later op saves something (Gemma's norm after the MLP), the rerun goes on and the projection is
  computed.
- selective (`train.gradient_checkpointing: selective`): what the GEMMs and the attention produced
  is kept; the outputs of the cheap ops between them (norms, the SwiGLU gate) are computed again in
  backward. Two ways, chosen per layer at its first call:
  - without a rerun, where every norm and MLP of the layer runs lorakit's fused kernels (Llama,
    Mistral, Qwen and the like; in one process, under DDP, and under FSDP2, whose blocks run on
    their gathered parameters): saved-tensor hooks keep what the layer's backward reads, except the
    outputs of `lorakit.fused.rms_norm` and `silu_gate`, which those ops register as
    `recomputable`: the hooks keep a recipe instead (its inputs are kept anyway: the norm's input,
    the gate and up projections) and backward computes the output again when it first reads it.
    No Python of the layer runs again: on the benchmark model on CPU a step costs 12-15 ms less
    than the rerun way, a few ms more than without checkpointing.
  - with a rerun, elsewhere (GPT-2's LayerNorm, Gemma's GELU gate): the outputs that LoRA layers
    computed in forward are kept, with their (T, r) products x @ A^T, and the checkpoint's rerun
    hands them back instead of recomputing them; so does lorakit's blocked CPU attention, with its
    probabilities. The rerun runs only the ops between them; under QLoRA it also skips
    dequantizing the 4-bit weights.
  Either way a Llama layer on the benchmark model on CPU keeps about 21 MiB, against 27.2 without
  checkpointing and 1.5 under full: the gate and up projections, the attention's q, k, v, output
  and probabilities, and the layer's input and mid-layer residual (or, rerun, the projections'
  outputs).

In the rerun way, what is kept is the tensor the LoRA layer returned, checked on replay against its
version counter: had the model changed it in place after the layer returned it, the rerun computes
the layer afresh instead of replaying a stale value. Only the fused LoRA path (`lorakit.fused.
lora_linear`: frozen linear / Conv1D / 4-bit base, not FSDP-sharded) replays or puts off its
projection; other layers, and frozen linear layers without an adapter, are recomputed in order. In
the hooks way, a kept tensor changed in place before backward reads it raises, as autograd does
without checkpointing, and so does a recipe whose inputs changed.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from lorakit.config import GRADIENT_CHECKPOINTING_MODES

MODES = tuple(mode for mode in GRADIENT_CHECKPOINTING_MODES if mode)  # the ones that turn it on
# Selective checkpointing without a rerun where a layer allows it (`recomputes_without_rerun`); off,
# every layer takes the rerun way (for the benchmark's levers and the tests). Benchmark model on CPU:
# about 12-15 ms a step less than the rerun way, the same bytes kept.
SELECTIVE_WITHOUT_RERUN = True

_state = threading.local()


class KeptOutputs:
    """What the LoRA layers of one checkpointed layer call computed in forward, per module, in
    call order: their output and the (T, r) product x @ A^T that their backward needs. Under full
    checkpointing the store is only there in the rerun, which records nothing: it marks the rerun."""

    def __init__(self) -> None:
        self.replaying = False
        self._kept: dict[int, list[tuple[torch.Tensor, int, Optional[torch.Tensor]]]] = {}

    def slot(self, module: nn.Module) -> "KeptSlot":
        return KeptSlot(self, id(module))


class KeptSlot:
    """One module's entry in a `KeptOutputs`, handed to `lorakit.fused.lora_linear`."""

    def __init__(self, kept: KeptOutputs, key: int) -> None:
        self.kept, self.key = kept, key

    @property
    def replaying(self) -> bool:
        return self.kept.replaying

    def record(self, out: torch.Tensor, extra: Any = None) -> None:
        """Keep `out` and, with it, whatever else the caller's rerun needs (`extra`: for a LoRA
        layer x @ A^T, for the attention its probabilities), which no one outside can change."""
        # Detached: the output's autograd node leads (through the checkpoint's saved-tensor hooks)
        # back to this store, a cycle through C++ that Python's collector cannot see. A detached
        # alias shares the storage and the version counter.
        out = out.detach()
        self.kept._kept.setdefault(self.key, []).append((out, out._version, extra))

    def take(self) -> Optional[tuple[torch.Tensor, Any]]:
        """The next kept (output, extra); None when there is none left or the output was changed
        in place since it was recorded (then the caller computes it again)."""
        queue = self.kept._kept.get(self.key)
        if not queue:
            return None
        out, version, extra = queue.pop(0)
        return (out, extra) if out._version == version else None


def current_slot(module: nn.Module) -> Optional[KeptSlot]:
    """`module`'s slot in the store of the checkpointed layer running now on this thread (selective's
    rerun way: forward and rerun; full: the rerun only); None outside one."""
    stack = getattr(_state, "stack", None)
    return stack[-1].slot(module) if stack else None


@contextlib.contextmanager
def _active(kept: KeptOutputs, replaying: bool) -> Iterator[None]:
    stack = _state.__dict__.setdefault("stack", [])
    kept.replaying = replaying
    stack.append(kept)
    try:
        yield
    finally:
        stack.pop()


def _selective_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # Called by torch.utils.checkpoint once per layer call: the forward records into a fresh store,
    # the rerun in backward replays from the same one; the store dies with that call's graph.
    kept = KeptOutputs()
    return _active(kept, replaying=False), _active(kept, replaying=True)


def _full_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # Full checkpointing: the forward runs as without checkpointing; the rerun is marked, so that
    # LoRA layers compute their projection after their saves (see the module docstring).
    return contextlib.nullcontext(), _active(KeptOutputs(), replaying=True)


# ------------------------------------------------------------------ selective, without a rerun
_recipes = threading.local()  # .table: {id(tensor): (weakref, version, _Recipe)} inside a hooked layer


class _Recipe:
    """How backward gets back an output the forward did not keep: `compute()` on inputs that are
    kept anyway, run once when the output is first read (then shared by the other readers, and
    freed with the last of them)."""

    __slots__ = ("compute", "inputs", "versions", "value")

    def __init__(self, compute: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        self.compute, self.inputs, self.value = compute, inputs, None
        self.versions = tuple(t._version for t in inputs)

    def get(self) -> torch.Tensor:
        if self.value is None:
            if tuple(t._version for t in self.inputs) != self.versions:
                raise RuntimeError(
                    "selective checkpointing: an input of an output recomputed for backward was changed in place "
                    "after the forward used it; keep the model from modifying it, or use full checkpointing"
                )
            with torch.no_grad():
                self.value = self.compute()
        return self.value


def recomputable(out: torch.Tensor, compute: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    """Inside a layer under selective checkpointing without a rerun: backward may get `out` back
    as `compute()` (no autograd; the same bits) instead of keeping it. `inputs`: the tensors
    `compute` reads, which the op that made `out` saved for its own backward. Elsewhere a no-op,
    and so where that op has no backward (nothing it read needs a gradient): its inputs are not
    kept then, and checking them would refuse changes autograd accepts."""
    table = getattr(_recipes, "table", None)
    if table is not None and out.grad_fn is not None:
        table[id(out)] = (weakref.ref(out), out._version, _Recipe(compute, inputs))


def _pack(t: torch.Tensor) -> Any:
    entry = _recipes.table.get(id(t))
    if entry is not None and entry[0]() is t and t._version == entry[1]:
        return entry[2]
    # kept as it is, with its version: autograd checks that itself only for tensors it packs
    return t, t._version


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Recipe):
        return packed.get()
    t, version = packed
    if t._version != version:
        raise RuntimeError(
            f"one of the tensors saved for backward ({tuple(t.shape)}, {t.dtype}) was modified by an inplace "
            f"operation under selective checkpointing: version {t._version}, expected {version}"
        )
    return t


def _keep_by_hooks(function: Callable, *args: Any) -> Any:
    outer = getattr(_recipes, "table", None)
    _recipes.table = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return function(*args)
    finally:
        _recipes.table = outer


def recomputes_without_rerun(layer: nn.Module) -> bool:
    """Whether selective checkpointing can run `layer` without a rerun: every norm in it and its
    MLP run lorakit's fused kernels (whose outputs are `recomputable`; the other ops between the
    GEMMs save nothing of their own) and no parameter is a DTensor as its forward starts (FSDP2
    gathers a block's parameters before; sharded adapters would take the plain LoRA path, whose
    copies of its inputs only a rerun avoids keeping)."""
    from lorakit import fused

    if not SELECTIVE_WITHOUT_RERUN:
        return False
    norms = [m for m in layer.modules() if "norm" in type(m).__name__.lower()]
    mlps = [m for name, m in layer.named_children() if name == "mlp" or type(m).__name__.endswith("MLP")]
    sharded = any(hasattr(p, "placements") for p in layer.parameters())
    return bool(mlps) and not sharded and all(fused.runs_fused(m) for m in norms + mlps)


class _SelectiveCheckpoint:
    """A selectively checkpointed layer's `_gradient_checkpointing_func`: without a rerun where
    `recomputes_without_rerun` (decided at the first call, after FSDP2 or DDP have wrapped the
    model), else transformers' checkpoint with the kept outputs replayed."""

    def __init__(self, layer: nn.Module, rerun: Callable) -> None:
        self.layer, self.rerun = weakref.ref(layer), rerun  # weak: the layer holds this
        self.by_hooks: Optional[bool] = None

    def __call__(self, function: Callable, *args: Any) -> Any:
        if self.by_hooks is None:
            self.by_hooks = recomputes_without_rerun(self.layer())
        return _keep_by_hooks(function, *args) if self.by_hooks else self.rerun(function, *args)


def enable(model: nn.Module, mode: Union[bool, str]) -> None:
    """Turn on gradient checkpointing of `model`'s decoder layers (mode: True / "full", or "selective").

    The last checkpointed layer runs without checkpointing: backward starts with it, so its
    rerun would come right after its forward and hold all its activations at once anyway; keeping
    them from the forward costs about no extra peak memory and saves that layer's rerun.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if mode not in MODES:
        raise ValueError(f"gradient checkpointing mode {mode!r}: use True, 'full' or 'selective'")
    contexts = _selective_contexts if mode == "selective" else _full_contexts
    kwargs: dict = {"use_reentrant": False, "context_fn": contexts}
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    # transformers also hooks the input embeddings so that their output requires grad. Only
    # reentrant checkpointing needs that (its layers' outputs need no grad when their inputs need
    # none); here it made backward compute the first layer's input gradients (three GEMMs and a
    # norm, ~6 ms a step on the benchmark model) into a .grad of the embeddings' output nobody reads.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if layers:
        layers[-1].gradient_checkpointing = False
    if mode == "selective":
        for layer in layers[:-1]:
            layer._gradient_checkpointing_func = _SelectiveCheckpoint(layer, layer._gradient_checkpointing_func)
