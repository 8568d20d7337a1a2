"""The causal-LM loss as a token sum, so callers normalise over a whole optimizer step.

`token_loss_sum` returns the summed cross-entropy over trainable tokens and their count. The
trainer divides the sum of every micro-batch (and every rank) by the total count, which makes the
loss independent of packing, batch composition and gradient accumulation.

With `chunk_tokens` set, the output head and the cross-entropy run chunk by chunk under
activation checkpointing: the full (tokens x vocab) logits and their fp32 copy never exist at
once, in forward or backward (a "fused linear cross-entropy" built from plain PyTorch ops). A
frozen `nn.Linear` head goes through `lorakit.fused.linear_cross_entropy_sum`, which also computes
the hidden-state gradient in forward, so the head runs twice per step (forward, input gradient)
instead of three times (forward, recompute, input gradient); other heads (a LoRA-wrapped or
trained head) use activation checkpointing per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Rows of logits computed at once by the chunked output head. With the loss buffers kept between
# steps, 512 measured fastest (head + loss 143 ms for 1022 tokens at 32k vocab, against 151 ms at
# 1024 and 146 ms at 256) and halves the kept logits block (docs/benchmarks.md).
LOSS_CHUNK_TOKENS = 512


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with inputs -> (B, T) targets for each position (next token), -100 at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _decoder_and_head(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The body that returns hidden states and the output head, for models built the usual HF way."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None, None
    return body, head


def _fusable_head(head: nn.Module) -> bool:
    """A frozen plain nn.Linear head: lorakit.fused computes its loss and input gradient in one pass."""
    from lorakit import fused

    return (
        fused.FUSED_CROSS_ENTROPY
        and type(head) is nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


def token_loss_sum(
    model: nn.Module, batch: dict, *, chunk_tokens: Optional[int] = None, workspace: Optional[dict] = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's trainable tokens, and how many there are.

    batch: `input_ids` (B, T), `labels` (B, T) (-100: no loss), `position_ids` (B, T).
    chunk_tokens: run head + loss in chunks of this many tokens (None: one pass over full logits).
    workspace: a dict kept by the caller between calls, where the fused loss keeps its logits
    buffers (see `lorakit.fused.linear_cross_entropy_sum`).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    targets = shift_labels(labels)
    count = int((targets != IGNORE_INDEX).sum())
    position_ids = batch.get("position_ids")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    body, head = _decoder_and_head(model) if chunk_tokens else (None, None)
    if body is None:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return _chunk_loss(nn.Identity(), logits.flatten(0, 1), targets.flatten(), softcap), count
    hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    # Only positions with a target need logits at all.
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if _fusable_head(head):
        from lorakit.fused import linear_cross_entropy_sum

        total = linear_cross_entropy_sum(
            hidden, head.weight, targets, bias=head.bias, chunk=chunk_tokens, softcap=softcap, ignore_index=IGNORE_INDEX,
            workspace=workspace,
        )
        return total, count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, softcap)
    return total, count


class TokenLoss(nn.Module):
    """`token_loss_sum` as a module: forward(input_ids, labels, position_ids) -> summed loss.

    The training loop calls this instead of the model, so a DistributedDataParallel wrapper put
    around it sees the whole loss computation, chunked output head included. It keeps the fused
    loss's logits buffers between steps (`workspace`); `release()` frees them.
    """

    def __init__(self, model: nn.Module, chunk_tokens: Optional[int]):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.workspace: dict = {}

    def release(self) -> None:
        """Free the kept logits buffers (they come back on the next forward)."""
        self.workspace.clear()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return token_loss_sum(self.model, batch, chunk_tokens=self.chunk_tokens, workspace=self.workspace)[0]
