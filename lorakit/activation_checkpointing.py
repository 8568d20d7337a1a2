"""Gradient checkpointing of decoder layers: full, or selective (GEMM outputs kept).

Both run on transformers' layer checkpointing (non-reentrant `torch.utils.checkpoint`): in
forward each decoder layer keeps only its input, and backward reruns the layer to get back what
its own backward needs.

- full (`train.gradient_checkpointing: true`): the rerun is the whole layer forward, GEMMs
  included: about one more forward pass per step. One GEMM per layer is left out: in the rerun a
  LoRA layer computes its frozen projection only after its own tensors have been saved, and the
  checkpoint stops the rerun once the last tensor the backward needs is back. The last LoRA layer
  of a Llama-style layer (`down_proj`, whose output only joins the residual stream) therefore
  never computes its projection again. Nothing is assumed about the model: where a later op saves
  something (Gemma's norm after the MLP), the rerun goes on and the projection is computed.
- selective (`train.gradient_checkpointing: selective`): the outputs that LoRA layers computed in
  forward are kept, with their (T, r) products x @ A^T, and the rerun hands them back instead of
  recomputing them; so does lorakit's blocked CPU attention, with its probabilities. The rerun runs
  only the cheap ops between (norms, rotary embeddings, activation functions); under QLoRA it also
  skips dequantizing the 4-bit weights. It keeps one tensor per projection output (for a Llama layer
  q, k, v, o, gate, up, down) and the attention's output and probabilities: on the benchmark model
  on CPU 21.5 MiB a layer against 27.2 without checkpointing (1.5 under full), for a step about 5%
  slower than without checkpointing, where full's is about 25% slower.

What is kept is the tensor the LoRA layer returned, checked on replay against its version
counter: had the model changed it in place after the layer returned it, the rerun computes the
layer afresh instead of replaying a stale value. Only the fused LoRA path (`lorakit.fused.
lora_linear`: frozen linear / Conv1D / 4-bit base, not FSDP-sharded) replays or puts off its
projection; other layers, and frozen linear layers without an adapter, are recomputed in order.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from lorakit.config import GRADIENT_CHECKPOINTING_MODES

MODES = tuple(mode for mode in GRADIENT_CHECKPOINTING_MODES if mode)  # the ones that turn it on

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
    """`module`'s slot in the store of the checkpointed layer running now on this thread (selective:
    forward and rerun; full: the rerun only); None outside one."""
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
