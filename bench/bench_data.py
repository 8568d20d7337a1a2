"""Preprocessing speed of lorakit.data against a straightforward per-example loop.

Generates N synthetic chat and N instruction records (JSONL), then measures tokens per second of
  - baseline: read the JSONL and, per example, call the tokenizer the plain way:
      chat:        `apply_chat_template(messages)` for the ids, plus one call per assistant turn
                   for the prefix before it (with the generation prompt) and one through it, whose
                   token counts bound the trained span (the usual way to get the labels);
      instruction: `tokenizer(prompt)` and `tokenizer(prompt + output)` (+ EOS);
    the "ids only" row is the chat loop without the label calls (a lower bound for any loop);
  - lorakit: `load_dataset` without cache (read, validate, render, batch-tokenize, write cache);
  - cache hit: `load_dataset` again (hash the file + tokenizer, load the .npz).
The baseline runs on the first --baseline-n examples (per-example cost does not depend on N);
its ids (and labels, where both define them the same way) are checked against lorakit's.

    python bench/bench_data.py                 # 100k + 100k, baseline on 10k
    python bench/bench_data.py --n 5000        # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lorakit.config import DataConfig  # noqa: E402
from lorakit.data import load_dataset  # noqa: E402
from lorakit.records import INSTRUCTION_TEMPLATE, INSTRUCTION_TEMPLATE_NO_INPUT
from tests.helpers import make_tokenizer  # noqa: E402

WORDS = (
    "the a of to and in is it that for on with as was at by be this are from or an have not but what all "
    "were when we there can your which their said if do will each about how up out them then she many some "
    "model data train rank matrix layer token loss batch learning gradient weight adapter frozen small low "
    "quick brown fox jumps over lazy dog answer question translate sort numbers hello world bonjour monde "
    "Four two plus three 12 345 6789 (x) [y] {z} -> => ; : ! ? 'quoted' \"double\" café naïve"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_chat(rng: random.Random) -> dict:
    msgs = [{"role": "system", "content": sentence(rng, 5, 20)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": sentence(rng, 10, 60)})
        msgs.append({"role": "assistant", "content": sentence(rng, 20, 120)})
    return {"messages": msgs}


def make_instruction(rng: random.Random) -> dict:
    rec = {"instruction": sentence(rng, 5, 30), "output": sentence(rng, 20, 150)}
    if rng.random() < 0.6:
        rec["input"] = sentence(rng, 5, 60)
    return rec


def read_jsonl(path: Path, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def baseline_chat(path: Path, tok, n: int, *, labels: bool) -> tuple[float, list[list[int]], list[list[int]]]:
    t0 = time.perf_counter()
    all_ids, all_labels = [], []
    for rec in read_jsonl(path, n):
        msgs = rec["messages"]
        ids = tok.apply_chat_template(msgs)["input_ids"]
        if labels:
            lab = [-100] * len(ids)
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    s = len(tok.apply_chat_template(msgs[:i], add_generation_prompt=True)["input_ids"])
                    e = len(tok.apply_chat_template(msgs[: i + 1])["input_ids"])
                    lab[s:e] = ids[s:e]
            all_labels.append(lab)
        all_ids.append(ids)
    return time.perf_counter() - t0, all_ids, all_labels


def baseline_instruction(path: Path, tok, n: int) -> tuple[float, list[list[int]], list[list[int]]]:
    t0 = time.perf_counter()
    all_ids, all_labels = [], []
    for rec in read_jsonl(path, n):
        if rec.get("input"):
            prompt = INSTRUCTION_TEMPLATE.format(instruction=rec["instruction"], input=rec["input"])
        else:
            prompt = INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=rec["instruction"])
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + rec["output"])["input_ids"] + [tok.eos_token_id]
        all_ids.append(ids)
        all_labels.append([-100] * len(p) + ids[len(p) :])
    return time.perf_counter() - t0, all_ids, all_labels


def agree(ds, ids: list[list[int]], labels: list[list[int]]) -> tuple[bool, float]:
    """(ids identical, share of examples whose labels are identical; the first label is -100 in
    lorakit by design, so it is compared from position 1)."""
    same_ids, same_labels = True, 0
    for i, (a, b) in enumerate(zip(ids, labels)):
        x, y = ds.example(i)
        same_ids &= x.tolist() == a
        same_labels += y[1:].tolist() == b[1:]
    return same_ids, same_labels / max(len(ids), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="examples per dataset")
    ap.add_argument("--baseline-n", type=int, default=10_000, help="examples the baseline loop runs on")
    ap.add_argument("--max-length", type=int, default=4096)
    args = ap.parse_args()
    if args.n < 1 or args.baseline_n < 1 or args.max_length < 1:
        ap.error("--n, --baseline-n and --max-length must be >= 1")
    base_n = min(args.baseline_n, args.n)
    tok = make_tokenizer("llama3")
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = DataConfig(max_length=args.max_length, cache_dir=str(tmp / "cache"))
        for name, make in (("chat", make_chat), ("instruction", make_instruction)):
            path = tmp / f"{name}.jsonl"
            with open(path, "w") as f:
                for _ in range(args.n):
                    f.write(json.dumps(make(rng)) + "\n")
            t0 = time.perf_counter()
            ds = load_dataset(path, tok, cfg)
            t_lorakit = time.perf_counter() - t0
            t0 = time.perf_counter()
            hit = load_dataset(path, tok, cfg)
            t_hit = time.perf_counter() - t0
            assert np.array_equal(hit.input_ids, ds.input_ids) and np.array_equal(hit.labels, ds.labels)
            assert ds.stats.examples == args.n, ds.stats
            base_tokens = int(ds.offsets[base_n])
            lorakit_rate = ds.stats.tokens / t_lorakit
            if name == "chat":
                t_ids, ids, _ = baseline_chat(path, tok, base_n, labels=False)
                rows.append((f"{name} (ids only)", base_n, base_tokens, base_tokens / t_ids, None, None, None, "-"))
                t_base, ids, labels = baseline_chat(path, tok, base_n, labels=True)
            else:
                t_base, ids, labels = baseline_instruction(path, tok, base_n)
            same_ids, same_labels = agree(ds, ids, labels)
            base_rate = base_tokens / t_base
            check = f"ids {'==' if same_ids else '!='}, labels {same_labels:.0%} =="
            rows.append((name, args.n, ds.stats.tokens, base_rate, lorakit_rate, lorakit_rate / base_rate, t_hit, check))
            # the ids-only row gets its ratio against lorakit too
            if name == "chat":
                r = rows[-2]
                rows[-2] = (*r[:4], None, lorakit_rate / r[3], None, r[7])

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, os.cpu_count() = {os.cpu_count()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}"
    )
    print(f"tokenizer: tests.helpers.make_tokenizer('llama3') (byte-level BPE, 400 tokens); baseline on {base_n} examples")
    head = ("dataset", "examples", "tokens", "baseline tok/s", "lorakit tok/s", "speedup", "cache hit s", "check")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, n, tokens, base, ours, ratio, hit, check in rows:
        cells = (
            name,
            f"{n:,}",
            f"{tokens:,}",
            f"{base:,.0f}",
            f"{ours:,.0f}" if ours else "",
            f"{ratio:.1f}x",
            f"{hit:.2f}" if hit is not None else "",
            check,
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
