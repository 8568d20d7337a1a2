"""The causal-LM loss as a token sum, so callers normalise over a whole optimizer step.

`token_loss_sum` returns the summed cross-entropy over trainable tokens and their count. The
trainer divides the sum of every micro-batch (and every rank) by the total count, which makes the
loss independent of packing, batch composition and gradient accumulation.
`token_losses` returns each trainable token's cross-entropy instead, for losses built from sums
per sequence (the preference objectives of lorakit.preference).

With `chunk_tokens` set, the output head and the cross-entropy run chunk by chunk under
activation checkpointing: the full (tokens x vocab) logits and their fp32 copy never exist at
once, in forward or backward (a "fused linear cross-entropy"). A
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


def _chunk_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float], reduction: str = "sum"
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


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
    targets = shift_labels(batch["labels"])
    count = int((targets != IGNORE_INDEX).sum())
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    head, hidden, targets, _ = _head_inputs(model, batch, chunk_tokens, targets)
    if head is None:  # `hidden` holds the model's logits
        return _chunk_loss(nn.Identity(), hidden, targets, softcap), count
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


def _head_inputs(
    model: nn.Module, batch: dict, chunk_tokens: Optional[int], targets: torch.Tensor
) -> tuple[Optional[nn.Module], torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the model up to its output head -> (head, hidden (K, H), targets (K,), positions (K,)):
    the hidden states of the K positions that have a target, and where those are in the flattened
    (B*T) batch. Without `chunk_tokens` (or a head to split off): (None, the whole model's logits
    (B*T, V), every target (B*T,), None)."""
    body, head = _decoder_and_head(model) if chunk_tokens else (None, None)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
    if body is None:
        return None, model(**inputs).logits.flatten(0, 1), targets.flatten(), None
    hidden, targets = body(**inputs).last_hidden_state.flatten(0, 1), targets.flatten()
    # Only positions with a target need logits at all.
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return head, hidden.index_select(0, keep), targets.index_select(0, keep), keep


def token_losses(
    model: nn.Module, batch: dict, *, chunk_tokens: Optional[int] = None, workspace: Optional[dict] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trainable token's next-token cross-entropy and where it is: (losses (K,) fp32,
    positions (K,) int64 in the flattened (B*T) batch, aligned with `shift_labels`' targets).

    For losses built from per-sequence sums (DPO); arguments as for `token_loss_sum`, and the same
    chunked head: a frozen nn.Linear head through `lorakit.fused.linear_cross_entropy_rows`.
    """
    targets = shift_labels(batch["labels"])
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    head, hidden, targets, keep = _head_inputs(model, batch, chunk_tokens, targets)
    if head is None:  # `hidden` holds the model's logits
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        return _chunk_loss(nn.Identity(), hidden.index_select(0, keep), targets.index_select(0, keep), softcap, "none"), keep
    if _fusable_head(head):
        from lorakit.fused import linear_cross_entropy_rows

        losses = linear_cross_entropy_rows(
            hidden, head.weight, targets, bias=head.bias, chunk=chunk_tokens, softcap=softcap, ignore_index=IGNORE_INDEX,
            workspace=workspace,
        )  # fmt: skip
        return losses, keep
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_loss, head, h, t, softcap, "none", use_reentrant=False))
        else:
            pieces.append(_chunk_loss(head, h, t, softcap, "none"))
    return (torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)), keep


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
