"""LoRA on MoE expert weights: `lorakit train` against PEFT's `target_parameters` + transformers.

Both sides train the same random-weight Qwen3-MoE-shaped model (hidden 512, 4 layers, 8 heads,
4 KV heads, 32 experts of intermediate 256, 4 routed per token, vocab 32000) on the same packed
batches (2 x 512 tokens), LoRA r=16 alpha=32 on every linear layer but the head (q, k, v, o) and
on both expert weights (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), AdamW (fused, lr
2e-4, clip 1.0), bf16 frozen weights, fp32 adapters. Each side runs in its own process (the
harness of bench_speed.py): warm-up steps, then timed steps; medians; peak RSS.

  lorakit  `lorakit train` (lorakit.experts: each routed expert's two low-rank products)
  peft     get_peft_model(..., target_parameters=[...]) over transformers' default experts
           implementation: PEFT adds every expert's full update s·B_e@A_e to the weight each step

Cases: "plain" (bf16 frozen weights) and "qlora": lorakit with `quantize: nf4` (linear layers and
every expert's matrix NF4) against PEFT over a bitsandbytes 4-bit base from transformers'
BitsAndBytesConfig (which quantizes the linear layers; the 3-D expert weights stay bf16).

    python bench/bench_moe.py               # both cases, 6 timed steps a side
    python bench/bench_moe.py --rounds 3    # each side 3 times, alternating; steps pooled
    python bench/bench_moe.py --cases qlora
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_speed as harness  # noqa: E402  (the side processes, RSS readers and pooling)

SIZE = dict(hidden=512, layers=4, heads=8, kv_heads=4, experts=32, top_k=4, moe_intermediate=256, vocab=32000,
            batch=2, seq=512, steps=6, warmup=2)  # fmt: skip
EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def prepare(work: Path, size: dict) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lorakit.config import DataConfig
    from lorakit.batching import BatchStream
    from lorakit.data import load_train_eval
    from tests.helpers import make_tokenizer

    torch.manual_seed(harness.SEED)
    config = Qwen3MoeConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=4 * size["hidden"],
        moe_intermediate_size=size["moe_intermediate"], num_experts=size["experts"], num_experts_per_tok=size["top_k"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        head_dim=size["hidden"] // size["heads"], max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tokenizer = make_tokenizer()
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(harness.SEED)
    steps = size["warmup"] + size["steps"]
    with open(work / "train.jsonl", "w") as f:
        for _ in range(steps * size["batch"] * 6):
            f.write(json.dumps({"text": " ".join(rng.choice(harness.WORDS) for _ in range(rng.randint(15, 450)))}) + "\n")
    data = DataConfig(train=str(work / "train.jsonl"), format="text", max_length=size["seq"], packing=True,
                      cache_dir=str(work / "cache"))  # fmt: skip
    train, _ = load_train_eval(data, tokenizer, seed=harness.SEED)
    stream = BatchStream(train, batch_size=size["batch"], max_length=size["seq"], packing=True, seed=harness.SEED,
                         pad_id=tokenizer.pad_token_id)  # fmt: skip
    batches = [stream.next() for _ in range(steps)]
    torch.save([{k: b[k] for k in ("input_ids", "labels", "position_ids")} for b in batches], work / "batches.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", default="plain,qlora", help="comma-separated: plain, qlora")
    args = parser.parse_args()
    import tempfile

    cases = {"plain": {"target_parameters": EXPERT_WEIGHTS}, "qlora": {"target_parameters": EXPERT_WEIGHTS, "quantize": "nf4"}}
    unknown = [name for name in args.cases.split(",") if name not in cases]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r}; choose from {', '.join(cases)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-moe-") as tmp:
        work = Path(tmp)
        prepare(work, SIZE)
        for name in args.cases.split(","):
            outs: dict[str, list[dict]] = {"lorakit": [], "peft": []}
            for round_ in range(args.rounds):  # each side first in every other round
                for side in ("lorakit", "peft") if round_ % 2 == 0 else ("peft", "lorakit"):
                    outs[side].append(harness.child(work, SIZE, side, cases[name]))
            results[name] = (harness.pooled(outs["lorakit"], SIZE), harness.pooled(outs["peft"], SIZE))
    print(f"machine: {harness.machine()}")
    print(f"model: Qwen3-MoE shape {SIZE}; LoRA r={harness.R} on q/k/v/o and both expert weights")
    for name, (ours, theirs) in results.items():
        report(name, ours, theirs)


def report(name: str, ours: dict, theirs: dict) -> None:
    print(f"\n{name}:\n")
    print("| side | s/step | tokens/s | peak RSS (GiB) | first loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side, out in (("lorakit", ours), ("PEFT + transformers", theirs)):
        print(f"| {side} | {out['step_s']:.3f} | {out['tokens_s']:,.0f} | {harness.gib(out['peak_rss'])} | {out['losses'][0]:.4f} |")
    print(f"\ntokens/s lorakit/PEFT: {ours['tokens_s'] / theirs['tokens_s']:.2f}x; "
          f"peak memory: {ours['peak_rss'] / theirs['peak_rss']:.2f}x; rounds {[round(t, 3) for t in ours['round_s']]} vs {[round(t, 3) for t in theirs['round_s']]}")  # fmt: skip


if __name__ == "__main__":
    main()
