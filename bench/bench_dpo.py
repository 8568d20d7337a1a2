"""DPO (or KTO) with LoRA: `lorakit train` (train.objective: dpo / kto) against TRL's DPOTrainer (KTOTrainer) + PEFT + transformers.

Both sides train the same random-weight Llama-shaped model (hidden 512, 4 layers, 8 heads, 4 KV
heads, intermediate 1408, vocab 32000; frozen weights bf16) with LoRA r=16 alpha=32, dropout 0, on
every linear layer but the head, on the same preference pairs `{"prompt", "chosen", "rejected"}`
(a 256-token prompt and two 128-token answers, each answer followed by EOS: 385 tokens a sequence,
770 a pair), 2 pairs a step, sigmoid DPO loss with beta 0.1 against the base model (the adapter
switched off, computed every step), AdamW (fused, constant lr 5e-5, no weight decay, clip 1.0),
seed 0, no gradient checkpointing. Texts are built from the test tokenizer's words so that both
sides tokenize every pair into the same tokens (checked, and printed): each pair is the prompt's
tokens followed by each answer's, log-probabilities on the answers (and their EOS) only. Every pair
has the same length, so neither side pads and every step holds the same 1,540 tokens.

  lorakit  `lorakit train CONFIG` run in-process by a side process (lorakit.cli.main) with
           `train.objective: dpo`, `data.packing: false` (a row holds one pair: its chosen and
           rejected sequences one after the other, positions restarting), `train.batch_size: 2`;
           timed around lorakit.train.train_step.
  TRL      trl.DPOTrainer(model, ref_model=None, peft_config=LoraConfig(...)) over transformers'
           AutoModelForCausalLM (sdpa), DPOConfig(bf16=True, use_cpu=True,
           per_device_train_batch_size=2, gradient_checkpointing=False (TRL's default is True),
           ...): a batch is the 2 chosen and the 2 rejected sequences, 4 rows; timed from
           on_step_begin to on_step_end of a TrainerCallback (trainer set-up excluded). On CPU
           TRL 1.x's fused LM head (add_fused_lm_head, always on in DPOTrainer) scores every
           position, prompts included, in fp32 (the head's GEMMs and the [tokens x vocab] tiles):
           most of its step time and memory here (~85% of the step in a torch.profiler run).
  PEFT     a plain DPO loop written here over get_peft_model(...) (bf16 weights, fp32 adapters),
           as lean as PEFT + transformers allow: the 4 sequences in one forward, logits only for
           the answers' positions (`logits_to_keep`), their log-softmax in fp32, the reference
           under `model.disable_adapter()`, fused AdamW; timed per step after `loss.item()`.

Each side runs in its own process (the harness of bench_speed.py): warm-up steps, then timed
steps; step time and tokens/s are medians; memory is the process's peak RSS after its last step
(and above the RSS right after its imports). Tokens/s counts the pairs' tokens (no padding on
either side). Step 1 must give loss ln 2 = 0.6931 on both sides (the policy is the reference
while the adapter's B is zero) and reward accuracy 0 (chosen and rejected rewards are both 0).
Needs TRL, a bench-only extra (`pip install trl`; not in pyproject.toml).

KTO (`--objective kto`): the same prompts, each record's chosen answer labelled desirable and,
every other record, its rejected one undesirable: `{"prompt", "completion", "label"}`, 2 examples a
step. Each example comes with its KL example (its prompt and another example's completion), so a
step again holds 4 sequences of 385 tokens, and every side runs the policy and the reference over
all 4. lorakit pairs an example with the previous record's completion, TRL's KTOTrainer with the
previous one in its batch (cycled), the plain PEFT loop as lorakit: other partners, the same
tokens. KTO loss with beta 0.1, weights 1; step 1 gives loss 0.5 (1 - sigmoid(0)) on every side.
TRL's KTOTrainer reports no reward accuracy.

    python bench/bench_dpo.py               # 2 warm-up + 5 timed steps a side
    python bench/bench_dpo.py --rounds 3    # each side 3 times, alternating; steps pooled
    python bench/bench_dpo.py --objective kto
    python bench/bench_dpo.py --precompute-reference   # lorakit with train.precompute_reference

With --precompute-reference lorakit runs the reference once, over the training set before the first
step (its time is printed apart; the set is twice what the steps take), and its steps run the policy
alone; TRL and the plain PEFT loop still run the reference every step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_speed as harness  # noqa: E402  (the RSS readers, pooling and machine())

PROMPT, ANSWER = 256, 128  # tokens of text; each answer gets an EOS on both sides
SIZE = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, vocab=32000, batch=2,
            seq=2 * (PROMPT + ANSWER + 1), max_length=512, steps=5, warmup=2)  # fmt: skip
# batch: pairs (= lorakit rows) a step; seq: tokens of one pair (chosen + rejected sequence), so that
# harness.pooled's batch * seq is a step's tokens; max_length: per sequence (lorakit's data.max_length,
# TRL's max_length)
R, ALPHA, LR, BETA, SEED = harness.R, harness.ALPHA, 5e-5, 0.1, harness.SEED
NO_TRL = "bench/bench_dpo.py needs TRL, a bench-only extra: pip install trl"


# --------------------------------------------------------------------------- preparation (parent)
def words_text(tokenizer, rng: random.Random, n: int, lead: str) -> str:
    """Random words of exactly `n` tokens (without special tokens), starting with `lead`."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    pieces, used = [], 0
    while used < n:
        sep = lead if not pieces else " "
        fitting = [w for w in harness.WORDS if count(sep + w) <= n - used]
        word = sep + rng.choice(fitting)
        pieces.append(word)
        used += count(word)
    text = "".join(pieces)
    assert count(text) == n, (count(text), n, text)
    return text


def prepare(work: Path, size: dict) -> dict:
    """Model folder and preference JSONL; the pairs' tokens as lorakit's and TRL's tokenization give them."""
    tokenizer = harness.write_model(work, size)
    rng = random.Random(SEED)
    records = []
    for _ in range(2 * (size["warmup"] + size["steps"]) * size["batch"]):  # twice what the steps take
        records.append({"prompt": words_text(tokenizer, rng, PROMPT, ""), "chosen": words_text(tokenizer, rng, ANSWER, " "),
                        "rejected": words_text(tokenizer, rng, ANSWER, " ")})  # fmt: skip
    if size["objective"] == "kto":  # labelled examples: chosen answers desirable, every other one rejected
        records = [{"prompt": r["prompt"], "completion": r["chosen" if j % 2 == 0 else "rejected"], "label": j % 2 == 0}
                   for j, r in enumerate(records)]  # fmt: skip
    with open(work / "train.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    # The sequences as TRL 1.x builds them: tokenizer(prompt + answer + eos_token) (no BOS: this
    # tokenizer adds none), the answer from where it leaves tokenizer(prompt).
    def sequence(prompt: str, answer: str) -> tuple[list[int], int]:
        return tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"], ANSWER + 1

    if size["objective"] == "kto":  # each example, then its KL example: its prompt with the previous record's completion
        expected = [sequence(r["prompt"], r["completion"]) for r in records]
        loop = [s for j, r in enumerate(records) for s in (expected[j], sequence(r["prompt"], records[j - 1]["completion"]))]
    else:
        expected = loop = [sequence(r["prompt"], r[key]) for r in records for key in ("chosen", "rejected")]
    (work / "sequences.json").write_text(json.dumps(loop))  # the plain PEFT loop's input
    (work / "labels.json").write_text(json.dumps([r.get("label") for r in records]))
    examples = lorakit_examples(work, size, tokenizer)
    return {"expected": expected, "lorakit": examples[0::2] if size["objective"] == "kto" else examples}


def data_config(work: Path, size: dict) -> dict:
    return {"train": str(work / "train.jsonl"), "max_length": size["max_length"], "packing": False,
            "cache_dir": str(work / "cache")}  # fmt: skip


def lorakit_examples(work: Path, size: dict, tokenizer) -> list[tuple[list[int], int]]:
    """(ids, trained tokens) of each sequence as lorakit tokenizes the pairs."""
    from lorakit.config import DataConfig
    from lorakit.data import load_train_eval

    train, _ = load_train_eval(DataConfig(**data_config(work, size)), tokenizer, seed=SEED)
    out = []
    for i in range(len(train)):
        start, end = int(train.offsets[i]), int(train.offsets[i + 1])
        out.append((train.input_ids[start:end].tolist(), int((train.labels[start:end] != -100).sum())))
    return out


def token_check(info: dict, trl_seqs: list | None) -> list[str]:
    """Notes on whether both sides train on the same tokens."""
    expected = sorted((tuple(ids), n) for ids, n in info["expected"])
    notes = []
    for side, got in (("lorakit", info["lorakit"]), ("TRL", trl_seqs)):
        if got is None:
            continue
        got = sorted((tuple(ids), n) for ids, n in got)
        if got == expected:
            notes.append(f"{side}: {len(got)} sequences of {len(got[0][0])} tokens ({got[0][1]} trained: the answer "
                         f"and its EOS), identical to the reference tokenization")  # fmt: skip
        else:
            lengths = sorted({(len(ids), n) for ids, n in got})
            first = next((a, b) for a, b in zip(got, expected) if a != b) if len(got) == len(expected) else None
            diff = "" if first is None else f"; first differing sequence: {list(first[0][0][:8])}... vs {list(first[1][0][:8])}..."
            notes.append(f"{side}: TOKENS DIFFER: {len(got)} sequences (expected {len(expected)}), (length, trained) "
                         f"{lengths[:4]} (expected {(len(expected[0][0]), expected[0][1])}){diff}")  # fmt: skip
    return notes


# --------------------------------------------------------------------------- the sides (children)
def side_lorakit(work: Path, size: dict) -> dict:
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline RSS)
    import yaml

    import lorakit.preference as lp
    import lorakit.train as lt
    from lorakit.cli import main

    base_rss = harness.rss_now()
    cfg = {
        "model": str(work / "model"), "output_dir": str(work / f"run-{os.getpid()}"),
        "data": data_config(work, size),
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": "all-linear"},
        "train": {"objective": size["objective"], "beta": BETA, "max_steps": size["warmup"] + size["steps"],
                  "batch_size": size["batch"], "lr": LR, "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "seed": SEED, "gradient_checkpointing": False, "log_every": 1000, "save_every": 0,
                  "precompute_reference": size.get("precompute", False)},
    }  # fmt: skip
    (work / "lorakit.yaml").write_text(yaml.safe_dump(cfg))
    times, losses, accuracies, peaks, reference_s = [], [], [], [], []
    inner, precompute = lt.train_step, lp.precompute_reference_logps

    def timed_precompute(*args, **kwargs):
        start = time.perf_counter()
        table = precompute(*args, **kwargs)
        reference_s.append(time.perf_counter() - start)
        return table

    def timed(run):
        start = time.perf_counter()
        result = inner(run)  # returns after loss.item()
        times.append(time.perf_counter() - start)
        losses.append(result["loss"])
        accuracies.append(result.get("reward_accuracy"))  # pairs whose chosen reward is the higher
        peaks.append(harness.rss_peak())
        return result

    lt.train_step, lp.precompute_reference_logps = timed, timed_precompute
    code = main(["train", str(work / "lorakit.yaml")])
    assert code == 0, f"lorakit train exited with {code}"
    return {"times": times, "losses": losses, "accuracies": accuracies, "peak_rss": peaks[-1], "base_rss": base_rss,
            "peak_gpu": None, "reference_s": reference_s}  # fmt: skip


def side_trl(work: Path, size: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    base_rss = harness.rss_now()
    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    times, losses, accuracies, peaks = [], [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            peaks.append(harness.rss_peak())

    kto = size["objective"] == "kto"

    class Trainer(KTOTrainer if kto else DPOTrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(loss.item())  # TRL's own metrics already sync every step (.item() in _compute_loss)
            accuracies.append(None if kto else self._metrics["train"]["rewards/accuracies"][-1])
            return loss

    with open(work / "train.jsonl") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, attn_implementation="sdpa")
    common = dict(
        output_dir=str(work / f"trl-{os.getpid()}"), bf16=True, use_cpu=True, per_device_train_batch_size=size["batch"],
        gradient_accumulation_steps=1, max_steps=size["warmup"] + size["steps"], learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        beta=BETA, max_length=size["max_length"], gradient_checkpointing=False, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=SEED, data_seed=SEED, dataloader_num_workers=0,
    )  # fmt: skip
    if kto:  # KTO's own loss with weights 1; its KL completions need the sequential sampler (its default)
        args = KTOConfig(**common, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0)
    else:
        args = DPOConfig(**common, loss_type=["sigmoid"])
    assert not args.gradient_checkpointing, "TRL's default is checkpointing on; this benchmark runs without"
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Trainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[StepTimer()])  # fmt: skip
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "PEFT's adapters are expected in fp32"
    keys = ("completion_ids",) if kto else ("chosen_ids", "rejected_ids")
    seqs = [(row["prompt_ids"] + row[key], len(row[key])) for row in trainer.train_dataset for key in keys]
    trainer.train()
    return {"times": times, "losses": losses, "accuracies": accuracies, "peak_rss": peaks[-1], "base_rss": base_rss,
            "peak_gpu": None, "seqs": seqs, "padding_free": getattr(trainer, "padding_free", False)}  # fmt: skip


def side_peft(work: Path, size: dict) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    base_rss = harness.rss_now()
    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    sequences = json.loads((work / "sequences.json").read_text())  # chosen, rejected, ... (KTO: example, KL example, ...)
    labels = torch.tensor([bool(v) for v in json.loads((work / "labels.json").read_text())])
    rows = 2 * size["batch"]

    def answer_logps(ids: torch.Tensor, n: int) -> torch.Tensor:
        # logits for the last n + 1 positions only; the last one predicts nothing
        logits = model(input_ids=ids, logits_to_keep=n + 1).logits[:, :-1].float()
        return logits.log_softmax(-1).gather(-1, ids[:, -n:, None]).squeeze(-1).sum(-1)

    times, losses, accuracies, peaks = [], [], [], []
    for step in range(size["warmup"] + size["steps"]):
        chunk = sequences[step * rows : (step + 1) * rows]
        ids, n = torch.tensor([s for s, _ in chunk]), chunk[0][1]  # every sequence is as long, every answer too
        start = time.perf_counter()
        with torch.no_grad(), model.disable_adapter():
            reference = answer_logps(ids, n)
        policy = answer_logps(ids, n)
        rewards = BETA * (policy - reference)
        if size["objective"] == "kto":  # examples at even rows, their KL examples at odd ones
            ratio = (policy - reference)[0::2]
            kl = (policy - reference)[1::2].detach().mean().clamp(min=0)
            desirable = labels[step * size["batch"] : (step + 1) * size["batch"]]
            loss = torch.where(desirable, 1 - torch.sigmoid(BETA * (ratio - kl)), 1 - torch.sigmoid(BETA * (kl - ratio))).mean()
        else:
            loss = -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        accuracies.append(None if size["objective"] == "kto" else (rewards[0::2] > rewards[1::2]).float().mean().item())
        peaks.append(harness.rss_peak())
    return {"times": times, "losses": losses, "accuracies": accuracies, "peak_rss": peaks[-1], "base_rss": base_rss,
            "peak_gpu": None}  # fmt: skip


def child(work: Path, size: dict, side: str) -> dict:
    return harness.run_child(Path(__file__), work, size, side)


# --------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="run each side this many times, alternating; steps pooled")
    parser.add_argument("--steps", type=int, help=f"timed steps per side (default {SIZE['steps']})")
    parser.add_argument("--objective", choices=["dpo", "kto"], default="dpo", help="DPO on pairs, or KTO on labelled examples")
    parser.add_argument("--precompute-reference", action="store_true",
                        help="lorakit with train.precompute_reference: the reference in one pass before the first step")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side = {"trl": side_trl, "peft": side_peft, "lorakit": side_lorakit}[args.side]
        print("RESULT " + json.dumps(side(Path(args.work), json.loads(args.size))))
        return
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        import trl
    except ImportError as exc:
        raise SystemExit(f"{NO_TRL} ({exc})") from None
    size = dict(SIZE, objective=args.objective, precompute=args.precompute_reference)
    if args.steps is not None:
        size["steps"] = args.steps
    runs: dict[str, list[dict]] = {"lorakit": [], "trl": [], "peft": []}
    failed = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-dpo-") as tmp:
        work = Path(tmp)
        info = prepare(work, size)
        for round_ in range(args.rounds):
            for side in ("trl", "peft", "lorakit") if round_ % 2 == 0 else ("lorakit", "peft", "trl"):
                if side in failed:
                    continue
                try:
                    runs[side].append(child(work, size, side))
                except SystemExit as failure:  # the other side's numbers are still worth printing
                    failed[side] = str(failure)
    print(f"machine: {harness.machine()}")
    print(f"model: Llama shape hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, {size['kv_heads']} KV "
          f"heads, intermediate {size['intermediate']}, vocab {size['vocab']}, bf16; LoRA r={R} alpha={ALPHA:g} all linear "
          f"but the head; {_what(size)}, beta {BETA}; {size['batch']} {'examples (+ KL examples)' if size['objective'] == 'kto' else 'pairs'} "
          f"a step of {PROMPT}-token prompts and {ANSWER}-token answers (+ EOS): {size['batch'] * size['seq']:,} tokens; {size['warmup']} warm-up + "
          f"{size['steps']} timed steps, medians; rounds {args.rounds}")  # fmt: skip
    print(f"TRL {trl.__version__}")
    for note in token_check(info, runs["trl"][0]["seqs"] if runs["trl"] else None):
        print(f"tokens: {note}")
    if runs["trl"] and runs["trl"][0]["padding_free"]:
        print("note: TRL ran padding-free")
    pooled = {side: harness.pooled(outs, size) for side, outs in runs.items() if outs}
    report(pooled, size["objective"])
    passes = [s for out in runs["lorakit"] for s in out.get("reference_s", [])]
    if passes:
        examples = 2 * 2 * (size["warmup"] + size["steps"]) * size["batch"]  # the set's sequences (prepare)
        print(f"lorakit's reference pass (train.precompute_reference), before its first step: "
              f"{', '.join(f'{s:.2f}' for s in passes)} s for {examples} sequences")
    for side, failure in failed.items():
        print(f"\n{failure}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def _what(size: dict) -> str:
    return "KTO" if size["objective"] == "kto" else "DPO sigmoid"


def report(pooled: dict, objective: str = "dpo") -> None:
    trainer = "KTOTrainer" if objective == "kto" else "DPOTrainer"
    names = {"lorakit": "lorakit", "trl": f"TRL {trainer} + PEFT", "peft": "PEFT + transformers, plain loop"}
    first = 0.5 if objective == "kto" else math.log(2)  # the policy starts as the reference
    print("\n| side | s/step | fastest s | tokens/s | peak RSS GiB | above imports GiB | step-1 loss | step-1 reward acc | last loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in ("lorakit", "trl", "peft"):
        if side not in pooled:
            continue
        out = pooled[side]
        acc = out["accuracies"][0] if out["accuracies"] and out["accuracies"][0] is not None else None
        print(f"| {names[side]} | {out['step_s']:.3f} | {out['best_s']:.3f} | {out['tokens_s']:,.0f} | {harness.gib(out['peak_rss'])} "
              f"| {harness.gib(out['peak_rss'] - out['base_rss'])} | {out['losses'][0]:.4f} "
              f"| {'-' if acc is None else f'{acc:.2f}'} | {out['losses'][-1]:.4f} |")  # fmt: skip
    for side, out in pooled.items():
        if abs(out["losses"][0] - first) > 1e-3:
            print(f"WARNING: {names[side]}'s step-1 loss {out['losses'][0]:.6f} is not {first:.6f}")
    ours = pooled.get("lorakit")
    for side, label in (("trl", "TRL"), ("peft", "the plain PEFT loop")):
        if ours is None or side not in pooled:
            continue
        theirs = pooled[side]
        print(f"\ntokens/s lorakit/{label}: {ours['tokens_s'] / theirs['tokens_s']:.2f}x (fastest steps' "
              f"speed-up {theirs['best_s'] / ours['best_s']:.2f}x); peak RSS: {ours['peak_rss'] / theirs['peak_rss']:.2f}x "
              f"(above imports {(ours['peak_rss'] - ours['base_rss']) / (theirs['peak_rss'] - theirs['base_rss']):.2f}x); "
              f"rounds s/step {[round(t, 3) for t in ours['round_s']]} vs {[round(t, 3) for t in theirs['round_s']]}")  # fmt: skip
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
