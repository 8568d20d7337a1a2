"""Preference tuning: train on pairs of a chosen and a rejected answer to the same prompt.

Per pair, with log pi(y) the trained model's log-probability of an answer summed over its tokens,
|y| its token count, a(y) = log pi(y) / |y| the mean, and ref the frozen reference:

    dpo    (Rafailov et al. 2023)  z = beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)))
                                   loss = -log sigmoid(z)
    ipo    (Azar et al. 2023)      h = (a(y_c) - a_ref(y_c)) - (a(y_r) - a_ref(y_r))
                                   loss = (h - 1 / (2 beta))^2
    simpo  (Meng et al. 2024)      loss = -log sigmoid(beta * a(y_c) - beta * a(y_r) - gamma)
    orpo   (Hong et al. 2024)      odds(y) = a(y) - log(1 - exp(a(y)))   (the log-odds of exp(a))
                                   loss = -a(y_c) - beta * log sigmoid(odds(y_c) - odds(y_r))

and, per unpaired example labelled desirable or not, with r(y) = log pi(y) - log ref(y):

    kto    (Ethayarajh et al. 2024) z0 = max(0, mean of r over the KL examples: each example's
                                   prompt with another example's completion), no gradient
                                   loss = w_D * (1 - sigmoid(beta * (r(y) - z0)))   desirable
                                          w_U * (1 - sigmoid(beta * (z0 - r(y))))   undesirable

as TRL computes them (DPOTrainer's sigmoid and ipo losses, CPOTrainer's simpo, ORPOTrainer,
KTOTrainer's kto; a KTO example and its KL example sit in a batch as a pair's two answers do),
averaged over the pairs of an optimizer step (all micro-batches and processes). Each logs the
answers' rewards (dpo: beta * (log pi - log ref); ipo: the same of the means; simpo, orpo: beta *
a(y)); a pair counts as right when the chosen answer's reward is higher (`reward_accuracy`), and
`reward_margin` is the mean of chosen minus rejected reward.

The reference of dpo, ipo and kto is the model training starts from, run without gradients on the
same micro-batch: the base model, the same model with the adapter switched off
(`lorakit.inject.disable_adapters`), or, when training continues an adapter (an SFT adapter, say:
`adapter` in the run config), a frozen copy of that adapter carried by the model under the name
REFERENCE_ADAPTER (`lorakit.inject.use_adapter`). Either costs one forward pass and no memory for
a second model, and equals the trained model at the start, so DPO's first loss is exactly ln 2
(KTO's 0.5; a continued adapter's trained copy with lora.dropout > 0 differs by its dropout). The reference is frozen, so with train.precompute_reference it runs once instead,
over the whole training set before the first step (`precompute_reference_logps`), and the loss
takes each sequence's value from that table (`reference=`), saving the forward on every step.
simpo and orpo need no reference: one forward a micro-batch, as for SFT. Both
passes take the same packed batch (a pair's answers side by side in one row,
`lorakit.batching.BatchStream`) and the trainer's chunked output head, which gives each
token's log-probability without keeping (tokens x vocab) logits (`lorakit.loss.token_losses`);
the sums per answer are `index_add`s over the micro-batch's `sequence_ids`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import REFERENCE_OBJECTIVES, TrainConfig
from lorakit.errors import UserError
from lorakit.inject import disable_adapters, lora_layers, use_adapter
from lorakit.loss import LOSS_CHUNK_TOKENS, TokenLoss, token_losses

# the name of the frozen copy of the adapter training started from, the reference of dpo, ipo, kto
# when there is one (otherwise the reference is the base, adapters off)
REFERENCE_ADAPTER = "reference"
# what PreferenceLoss returns beside the loss, summed over the micro-batch's pairs: the pairs (KTO:
# examples), the chosen (desirable) and rejected (undesirable) answers' rewards and how many
# there are, the pairs (examples) right, and KTO's KL estimate times the examples
STAT_NAMES = ("pairs", "chosen_reward", "rejected_reward", "right", "chosen", "rejected", "kl")
# what a training step logs beside the loss (`step_metrics`; kl: KTO's only)
STEP_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl")


def sequence_logps(
    model: nn.Module,
    batch: dict,
    *,
    chunk_tokens: Optional[int] = None,
    workspace: Optional[dict] = None,
    count: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's log-probability summed over its trained tokens, and how many there are:
    ((S,) fp32, (S,) fp32). count: S, when the caller knows it (else read from the batch, a host sync).

    batch: `input_ids`, `labels`, `position_ids` (B, T) and `sequence_ids` (B, T): which sequence
    of the batch each token belongs to (0 .. S-1, -1 on padding), as BatchStream gives them for
    preference data. A sequence's first token never has a label, so the target of position t
    (the token at t+1) belongs to the sequence of t.
    """
    losses, positions = token_losses(model, batch, chunk_tokens=chunk_tokens, workspace=workspace)
    sequence_ids = batch["sequence_ids"]
    if count is None:
        count = sequence_count(sequence_ids)
    owner = F.pad(sequence_ids[:, 1:], (0, 1), value=-1).flatten().index_select(0, positions)
    logps = losses.new_zeros(count).index_add(0, owner, losses.neg())
    return logps, losses.new_zeros(count).index_add_(0, owner, torch.ones_like(losses))


def sequence_count(sequence_ids: torch.Tensor) -> int:
    """How many sequences a batch's `sequence_ids` number (a host sync on a GPU)."""
    return int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0


def pair_loss(
    objective: str,
    policy: torch.Tensor,
    tokens: torch.Tensor,
    reference: Optional[torch.Tensor],
    *,
    beta: float,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss of a preference objective and the answers' rewards (see the module docstring).

    policy, reference: (2P,) summed log-probabilities, chosen answers at even positions and rejected
    at odd (reference: None for simpo and orpo); tokens: (2P,) each answer's trained tokens.
    Returns (losses (P,), rewards (P, 2): the chosen and the rejected answer's).
    """
    if objective == "dpo":
        rewards = (beta * (policy - reference)).view(-1, 2)
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards
    mean = (policy / tokens).view(-1, 2)
    if objective == "ipo":
        ratio = mean - (reference / tokens).view(-1, 2)
        return (ratio[:, 0] - ratio[:, 1] - 1 / (2 * beta)) ** 2, beta * ratio
    rewards = beta * mean
    if objective == "simpo":
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - gamma), rewards
    if objective == "orpo":
        # log(1 - exp(a)) as log(-expm1(a)): exact where exp(a) is close to 1
        odds = mean - torch.log(-torch.expm1(mean))
        return -mean[:, 0] - beta * F.logsigmoid(odds[:, 0] - odds[:, 1]), rewards
    raise ValueError(f"unknown preference objective {objective!r}")


def kto_loss(
    ratio: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's loss per example (TRL's KTOTrainer, loss_type "kto") and its reward beta * ratio.

    ratio: (N,) log pi(y|x) - log ref(y|x), summed over the completion; kl: the reference point z0,
    a detached scalar; desirable: (N,) bool. A desirable example's loss is
    desirable_weight * (1 - sigmoid(beta * (ratio - kl))), an undesirable one's
    undesirable_weight * (1 - sigmoid(beta * (kl - ratio))).
    """
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio


class PreferenceLoss(nn.Module):
    """What the training loop calls for a preference objective: forward(input_ids, labels,
    position_ids, sequence_ids) -> (summed loss over the micro-batch's pairs, fp32 scalar; stats
    (STAT_NAMES,) fp32, detached). KTO's micro-batches also give `desirable`, each example's label.

    A module like `lorakit.loss.TokenLoss` (whose kept loss buffers it shares), so a DDP wrapper
    around it sees both passes.

    KTO's reference point z0 is the mean of log pi - log ref over the micro-batch's KL examples
    (each example's prompt with another's completion), clamped at 0 and detached, as TRL computes
    it: over the micro-batches of all processes, which `all_reduce_sum` sums (the identity in one
    process; under torchrun each process calls it once a micro-batch, in step).
    """

    def __init__(
        self, model: nn.Module, chunk_tokens: Optional[int], objective: str, beta: float, gamma: float = 0.0, *,
        kto_weights: tuple[float, float] = (1.0, 1.0), all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tokens = TokenLoss(model, chunk_tokens)  # keeps the fused loss's buffers; release() frees them
        self.objective, self.beta, self.gamma = objective, beta, gamma
        self.kto_weights, self.all_reduce_sum = kto_weights, all_reduce_sum
        self.has_reference_adapter = has_reference_adapter(model)

    @property
    def model(self) -> nn.Module:
        return self.tokens.model

    def release(self) -> None:
        self.tokens.release()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor,
        desirable: Optional[torch.Tensor] = None, reference: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """reference: (S,) fp32, the reference's summed log-probability of each sequence where they
        were computed beforehand (`precompute_reference_logps`); None: a reference forward here."""
        batch, kw = self._batch(input_ids, labels, position_ids, sequence_ids)
        if reference is None and self.objective in REFERENCE_OBJECTIVES:
            reference = self._reference_logps(batch, kw)
        policy, tokens = sequence_logps(self.model, batch, **kw)
        if self.objective == "kto":
            return self._kto(policy, reference, desirable)
        losses, rewards = pair_loss(self.objective, policy, tokens, reference, beta=self.beta, gamma=self.gamma)
        rewards = rewards.detach()
        n = torch.tensor(float(len(losses)), device=losses.device)
        stats = torch.stack([
            n, rewards[:, 0].sum(), rewards[:, 1].sum(), (rewards[:, 0] > rewards[:, 1]).sum().float(), n, n, n.new_zeros(()),
        ])  # fmt: skip
        return losses.sum(), stats

    def _kto(
        self, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = (policy - reference).view(-1, 2)  # (examples, [the example, its KL example])
        n = torch.tensor(float(len(ratio)), device=ratio.device)
        totals = self.all_reduce_sum(torch.stack([ratio[:, 1].detach().sum(), n]))
        kl = (totals[0] / totals[1].clamp(min=1)).clamp(min=0)
        return kto_result(ratio[:, 0], kl, desirable.to(ratio.device), beta=self.beta, weights=self.kto_weights)

    def log_ratios(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor
    ) -> torch.Tensor:
        """log pi - log ref of each sequence of the micro-batch, as (pairs, 2), without gradients."""
        batch, kw = self._batch(input_ids, labels, position_ids, sequence_ids)
        with torch.no_grad():
            return (sequence_logps(self.model, batch, **kw)[0] - self._reference_logps(batch, kw)).view(-1, 2)

    def _batch(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor
    ) -> tuple[dict, dict]:
        """The micro-batch as `sequence_logps` takes it, and its keyword arguments."""
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequence_ids": sequence_ids}
        # both passes number the same sequences: counted once
        kw = dict(chunk_tokens=self.tokens.chunk_tokens, workspace=self.tokens.workspace, count=sequence_count(sequence_ids))
        return batch, kw

    def _reference_logps(self, batch: dict, kw: dict) -> torch.Tensor:
        """The reference's summed log-probabilities, without gradients: the frozen REFERENCE_ADAPTER
        where the model carries one, else the base with the adapters off."""
        switch = use_adapter(self.model, REFERENCE_ADAPTER) if self.has_reference_adapter else disable_adapters(self.model)
        with torch.no_grad(), switch:
            return sequence_logps(self.model, batch, **kw)[0]


def precompute_reference_logps(
    loss: PreferenceLoss, stream: Any, device: torch.device,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:  # fmt: skip
    """The reference's summed log-probability of every example of the stream's dataset, (N,) fp32
    on `device`, indexed as the micro-batches' `example_ids` (KTO: each example and its KL example).

    One no-grad pass over `stream.epoch_batches()`, whose rows and order ignore the seed and the
    stream's state, so a resumed run recomputes the same values bit for bit. Under torchrun each
    process runs its share of the rows (every process the same number of forwards, as FSDP needs)
    and `all_reduce_sum` joins the shares: each example is filled by one process and the others
    add exact zeros. The batches are not the training's (other padding, other neighbours in a
    packed row), so the values may differ from an on-the-fly reference in the last bits of float32;
    attention and labels stop at example boundaries, so only rounding differs.
    """
    n = len(stream.dataset)
    table = torch.zeros(n, dtype=torch.float32, device=device)
    filled = torch.zeros(n, dtype=torch.float32, device=device)
    keys = ("input_ids", "labels", "position_ids", "sequence_ids")
    for batch in stream.epoch_batches():
        inputs = {k: batch[k].to(device) for k in keys}
        examples = batch["example_ids"].to(device)
        batch, kw = loss._batch(**inputs)
        kw["count"] = len(examples)
        table[examples] = loss._reference_logps(batch, kw).float()
        filled[examples] = 1.0
    table, filled = all_reduce_sum(table), all_reduce_sum(filled)
    # every example sits in one row (BatchStream refuses one longer than a row), read by one process
    assert bool((filled == 1).all()), "an example was not read exactly once in the reference pass"
    return table


def kto_result(
    ratio: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, *, beta: float, weights: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's summed loss over examples with log-ratios `ratio` (N,), reference point `kl` and labels
    `desirable` (N,), and their STAT_NAMES stats (an example is right when its reward has its
    label's sign)."""
    losses, rewards = kto_loss(ratio, kl, desirable, beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    rewards = rewards.detach()
    good, bad = desirable.float(), (~desirable).float()
    n = torch.tensor(float(len(ratio)), device=ratio.device)
    stats = torch.stack([
        n, (rewards * good).sum(), (rewards * bad).sum(), ((rewards > 0).float() * good + (rewards < 0).float() * bad).sum(),
        good.sum(), bad.sum(), kl.detach() * n,
    ])  # fmt: skip
    return losses.sum(), stats


def has_reference_adapter(model: nn.Module) -> bool:
    """Whether `model` (or the model a wrapper holds) carries the frozen REFERENCE_ADAPTER."""
    return any(REFERENCE_ADAPTER in layer.lora_A for _, layer in lora_layers(model))


def reference_parameters(model: nn.Module) -> int:
    """How many parameters the frozen REFERENCE_ADAPTER holds (0 without one): not the model's own."""
    return sum(p.numel() for name, p in model.named_parameters() if is_reference_parameter(name))


def is_reference_parameter(name: str) -> bool:
    """Whether the parameter of this name (from named_parameters) belongs to the REFERENCE_ADAPTER."""
    return _REFERENCE_PARAMETER.search(name) is not None


# lora_A.reference, lora_B.reference(.gate_up_proj for experts), lora_magnitude.reference, copies.reference.weight
_REFERENCE_PARAMETER = re.compile(rf"\.(lora_A|lora_B|lora_magnitude|copies)\.{REFERENCE_ADAPTER}(\.|$)")


def disable_dropout(model: nn.Module) -> int:
    """Turn the model's own dropout off, LoRA dropout left as configured; returns how many settings
    changed.

    Preference objectives compare log-probabilities of two answers (and, for DPO, IPO, KTO, with the
    reference's); dropout in the model would add noise to every pair's margin, and DPO's first
    loss would not be ln 2. TRL turns `nn.Dropout` modules off for DPO; models also drop with
    `F.dropout` and a float attribute (OPT's `dropout` and `activation_dropout`, Falcon's and Bloom's
    `hidden_dropout`, Llama's `attention_dropout` handed to SDPA), and some read the config at
    forward time, so those are zeroed too."""
    lora_dropout = {id(m) for _, layer in lora_layers(model) for m in getattr(layer, "lora_dropout", {}).values()}
    changed = 0
    for module in model.modules():
        if id(module) in lora_dropout:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    for name, value in (config.to_dict().items() if hasattr(config, "to_dict") else ()):
        if "dropout" in name and isinstance(value, float) and value > 0:
            setattr(config, name, 0.0)
            changed += 1
    return changed


def loss_module(
    model: nn.Module, chunk_tokens: Optional[int], train: TrainConfig,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> nn.Module:  # fmt: skip
    """The module the training loop runs forward on: TokenLoss (sft) or PreferenceLoss
    (all_reduce_sum: over the training processes, for KTO's reference point)."""
    if train.objective == "sft":
        return TokenLoss(model, chunk_tokens)
    return PreferenceLoss(
        model, chunk_tokens, train.objective, train.preference_beta(), train.simpo_gamma,
        kto_weights=(train.kto_desirable_weight, train.kto_undesirable_weight), all_reduce_sum=all_reduce_sum,
    )  # fmt: skip


def step_metrics(loss_sum: float, stats: torch.Tensor, *, kto: bool = False) -> dict[str, float]:
    """loss, reward_accuracy, reward_margin, chosen_reward, rejected_reward (and KTO's kl): means
    over the pairs (KTO: examples; the rewards over the desirable and undesirable ones) of `stats`
    (PreferenceLoss' stats, summed over micro-batches and processes). A KTO example is right when
    its reward has its label's sign."""
    pairs, chosen, rejected, right, n_chosen, n_rejected, kl = (float(v) for v in stats)
    n = max(pairs, 1.0)
    chosen, rejected = chosen / max(n_chosen, 1.0), rejected / max(n_rejected, 1.0)
    out = {
        "loss": loss_sum / n,
        "reward_accuracy": right / n,
        "reward_margin": chosen - rejected,
        "chosen_reward": chosen,
        "rejected_reward": rejected,
    }
    if kto:
        out["kl"] = kl / n
        # a class the step (or eval set) has no example of has no mean reward, nor a margin
        missing = [k for k, count in (("chosen_reward", n_chosen), ("rejected_reward", n_rejected)) if not count]
        for key in missing + (["reward_margin"] if missing else []):
            del out[key]
    return out


def evaluate_preference(
    model: nn.Module,
    dataset: Any,
    *,
    objective: str = "dpo",
    beta: float,
    gamma: float = 0.0,
    batch_size: int = 8,
    max_length: int,
    device: Optional[torch.device] = None,
    chunk_tokens: Optional[int] = LOSS_CHUNK_TOKENS,
    kto_weights: tuple[float, float] = (1.0, 1.0),
) -> dict[str, float]:
    """The objective's loss and reward accuracy / margin over every pair of a preference dataset
    (a lorakit.data.TokenizedDataset with pairs; for kto, its labelled examples, with z0 taken over
    the whole set, so neither the eval batch size nor the process count changes it), the model in
    eval mode under no_grad; its previous mode is restored. chunk_tokens: as for training (None for an FSDP-sharded model,
    whose root module must run every forward)."""
    from lorakit.batching import BatchStream

    kto = objective == "kto"
    if kto and dataset.desirable is None:
        raise UserError("KTO eval needs labelled records (prompt, completion, label); the eval data has other records")
    if not kto and (not dataset.pairs or dataset.desirable is not None):
        raise UserError("preference eval needs preference records (prompt, chosen, rejected); the eval data has other records")
    device = device or next(model.parameters()).device
    stream = BatchStream(
        dataset, batch_size=min(batch_size, dataset.num_units()), max_length=max_length, packing=False, seed=0,
        shuffle=False,
    )  # fmt: skip
    loss = PreferenceLoss(model, chunk_tokens, objective, beta, gamma, kto_weights=kto_weights)
    was_training = model.training
    model.eval()
    total_loss, stats = 0.0, torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    ratios, labels = [], []
    keys = ("input_ids", "labels", "position_ids", "sequence_ids")
    try:
        with torch.no_grad():
            for batch in stream.epoch_batches():
                inputs = {k: batch[k].to(device) for k in keys}
                if kto:  # z0 over the whole eval set (below), so no eval batch size or process count changes it
                    ratios.append(loss.log_ratios(**inputs).float().cpu())
                    labels.append(batch["desirable"])
                    continue
                batch_loss, batch_stats = loss(**inputs)
                total_loss += float(batch_loss)
                stats += batch_stats.double().cpu()
    finally:
        model.train(was_training)
    if kto:
        ratio = torch.cat(ratios)
        batch_loss, batch_stats = kto_result(
            ratio[:, 0], ratio[:, 1].mean().clamp(min=0), torch.cat(labels), beta=beta, weights=kto_weights
        )  # fmt: skip
        total_loss, stats = float(batch_loss), batch_stats.double()
    return step_metrics(total_loss, stats, kto=kto)
