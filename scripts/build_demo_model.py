"""Pretrain the small Llama model shipped in `lorakit/demo/model/`.

Everything comes from text found on every Python 3.11 install, so the build is offline and
reproducible:

- prose: the English reference documentation in `pydoc_data.topics.topics` and the docstrings
  of the top-level standard library modules (read with `ast`, nothing is imported);
- chat: short generated conversations (repeat, uppercase, count, add, sort, spell, ...) rendered
  with the model's Llama-3 style chat template, so the base model knows the template and stops
  at `<|eot_id|>`. Dates and month names are left out on purpose: formatting dates is the demo
  task (`scripts/make_demo_data.py`), which the base model must not already know.

Steps: train a byte-level BPE tokenizer (digits split one by one) on the corpus, pack the token
stream into fixed windows, train `LlamaForCausalLM` from scratch with AdamW, save the folder with
`save_pretrained` (safetensors, fp32) and write its model card with the measured numbers.

Rebuild (5 minutes on 2 idle CPU cores; 28 minutes when the cores were shared):

    python scripts/build_demo_model.py --threads 2

Seeds are fixed and the data order is deterministic; with the same torch version and thread
count the weights are bit-identical, otherwise the loss agrees to about two decimals.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "lorakit" / "demo" / "model"
COMMAND = "python scripts/build_demo_model.py --threads 2"

PAD, BOS, EOT_TEXT = "<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [PAD, BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT]  # ids 0..5 in this order

# Llama-3 style. <|eot_id|> closes every turn and is the tokenizer's eos, so generation stops
# there. The {% generation %} block lets `return_assistant_tokens_mask=True` find the answer
# tokens (the assistant content and its <|eot_id|>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3's pre-tokenizer split with single digits: a run of newlines is always one piece (so
# "\n\n" after a chat header tokenizes the same before a word as before a digit), and every
# digit is its own token.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MODEL_KWARGS = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=5,
)

MONTHS = (
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
).split()


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def prose_documents() -> list[str]:
    """pydoc topics and stdlib docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(inspect.cleandoc(doc))
    return docs


def word_pool(docs: list[str]) -> list[str]:
    """Common lowercase words of the prose (no month names), sorted for determinism."""
    counts: dict[str, int] = {}
    for doc in docs:
        for w in re.findall(r"\b[a-z]{3,9}\b", doc):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= 20 and w not in MONTHS)


def chat_conversations(n: int, words: list[str], topics: dict[str, str], seed: int) -> list[list[dict]]:
    """n short generated conversations with one or two user/assistant turns."""
    rng = random.Random(seed)
    topic_keys = sorted(topics)

    def some_words(lo: int = 2, hi: int = 6) -> list[str]:
        return rng.sample(words, rng.randint(lo, hi))

    def first_sentence(text: str) -> str:
        text = " ".join(text.split())
        m = re.match(r"(.{20,240}?[.:])(\s|$)", text)
        return m.group(1) if m else text[:200]

    def turn() -> tuple[str, str]:
        kind = rng.randrange(13)
        ws = some_words()
        s = " ".join(ws)
        if kind == 0:
            return f"Repeat these words: {s}", s
        if kind == 1:
            return f"Write in capital letters: {s}", s.upper()
        if kind == 2:
            return f"What is the first word in: {s}?", ws[0]
        if kind == 3:
            return f"What is the last word in: {s}?", ws[-1]
        if kind == 4:
            return f"How many words are in: {s}?", str(len(ws))
        if kind == 5:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return f"What is {a} plus {b}?", str(a + b)
        if kind == 6:
            a = rng.randint(0, 999)
            return f"What number comes after {a}?", str(a + 1)
        if kind == 7:
            w = rng.choice(words)
            return f"Spell the word '{w}'.", " ".join(w)
        if kind == 8:
            return f"Reverse the order of the words: {s}", " ".join(reversed(ws))
        if kind == 9:
            nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
            return f"Sort these numbers: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))
        if kind == 10:
            return f"Join with commas: {s}", ", ".join(ws)
        if kind == 11:
            key = rng.choice(topic_keys)
            return f"What does the Python documentation say about '{key}'?", first_sentence(topics[key])
        greet = rng.choice(["Hello!", "Hi there.", "Good morning!", "Hey, are you there?"])
        return greet, rng.choice(["Hello! How can I help you?", "Hi! What can I do for you?"])

    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": "You are a helpful assistant. Answer briefly."})
        for _ in range(1 if rng.random() < 0.8 else 2):
            user, assistant = turn()
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append(messages)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on Llama-3 style pieces, one digit per token so numbers copy digit-wise."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return fast


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


def token_stream(tokenizer: PreTrainedTokenizerFast, prose: list[str], chats: list[list[dict]], seed: int) -> torch.Tensor:
    """All documents, shuffled, as one 1-D stream: <|begin_of_text|> text <|end_of_text|> per prose
    document; chats are rendered by the template (which starts with <|begin_of_text|>)."""
    docs = [BOS + d + EOT_TEXT for d in prose]
    docs += [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    random.Random(seed).shuffle(docs)
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to lr/10


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch: int) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    losses = [model(input_ids=windows[i : i + batch], labels=windows[i : i + batch]).loss.item() for i in range(0, n, batch)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--chats", type=int, default=10000, help="generated conversations in the mix")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    from pydoc_data.topics import topics

    prose = prose_documents()
    chats = chat_conversations(args.chats, word_pool(prose), topics, seed=args.seed)
    chat_texts = [
        "".join(f"{m['role']}\n\n{m['content']}\n" for m in c) for c in chats
    ]  # the tokenizer sees chat words; the special tokens are added by the trainer
    tokenizer = train_tokenizer(prose + chat_texts, MODEL_KWARGS["vocab_size"])

    stream = token_stream(tokenizer, prose, chats, seed=args.seed)
    n_val = len(stream) // 50  # the last 2% of the shuffled stream is held out
    train_stream, val_stream = stream[:-n_val], stream[-n_val:]
    n_prose_tokens = sum(len(x) + 2 for x in tokenizer(prose, add_special_tokens=False)["input_ids"])
    print(
        f"corpus: {len(prose)} prose docs ({sum(map(len, prose))} chars), {len(chats)} chats, "
        f"{len(stream)} tokens ({n_prose_tokens} prose), {time.time() - t0:.0f}s",
        flush=True,
    )

    config = LlamaConfig(**MODEL_KWARGS)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    T, B = args.seq_len, args.batch_size
    losses: list[float] = []
    t_train = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_stream) - T, (B,), generator=gen)
        x = torch.stack([train_stream[s : s + T] for s in starts.tolist()])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t_train:.0f}s", flush=True)
    train_seconds = time.time() - t_train

    final_loss = sum(losses[-20:]) / len(losses[-20:])
    val_loss = eval_loss(model, val_stream, T, B)
    print(f"final train loss (mean of last 20 steps) {final_loss:.3f}, held-out loss {val_loss:.3f}", flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*"):
        if old.is_file():
            old.unlink()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=1, eos_token_id=[5, 2], pad_token_id=0, do_sample=False, max_new_tokens=64
    ).save_pretrained(args.out)

    stats = {
        "parameters": n_params,
        "tokens_seen": args.steps * B * T,
        "corpus_tokens": len(stream),
        "prose_tokens": n_prose_tokens,
        "prose_documents": len(prose),
        "chat_conversations": len(chats),
        "steps": args.steps,
        "batch_size": B,
        "seq_len": T,
        "lr": args.lr,
        "final_train_loss": round(final_loss, 4),
        "heldout_loss": round(val_loss, 4),
        "train_seconds": round(train_seconds),
        "threads": args.threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    sample = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat these words: open the file"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**sample, max_new_tokens=16, do_sample=False)
    stats["sample"] = tokenizer.decode(out[0, sample["input_ids"].shape[1] :], skip_special_tokens=True)
    print(json.dumps(stats, indent=1), flush=True)
    (args.out / "README.md").write_text(model_card(config, stats))


def model_card(config: LlamaConfig, s: dict) -> str:
    size_mb = s["parameters"] * 4 / 1e6
    return f"""# lorakit demo model

A small Llama model pretrained from scratch by `scripts/build_demo_model.py`, shipped with
lorakit so that `lorakit train` runs its demo offline. It is a toy: it knows a little Python
documentation English and a handful of chat chores, enough to show a LoRA fine-tune teaching
it a new skill in minutes on a CPU. It does not know how to format dates (the demo task).

| | |
| --- | --- |
| architecture | `LlamaForCausalLM` |
| parameters | {s["parameters"]:,} (fp32, {size_mb:.1f} MB) |
| layers / hidden / MLP | {config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size} |
| attention heads / KV heads | {config.num_attention_heads} / {config.num_key_value_heads} |
| vocabulary | {config.vocab_size} (byte-level BPE, digits split one by one) |
| context | {config.max_position_embeddings} positions (pretrained on {s["seq_len"]}) |
| tied embeddings | {config.tie_word_embeddings} |

## Data

All of it is on every Python {s["python"][:4]} install; nothing is downloaded.

- Prose: the reference documentation in `pydoc_data.topics.topics` and the docstrings of the
  top-level standard library modules ({s["prose_documents"]} documents, {s["prose_tokens"]:,} tokens).
- Chat: {s["chat_conversations"]:,} generated conversations (repeat, capitalise, count, add,
  sort, spell, reverse, join, quote the docs, greetings), rendered with the chat template.
  No dates or month names.
- Corpus: {s["corpus_tokens"]:,} tokens, shuffled by document; the last 2% is held out.

## Training

{s["steps"]} steps of AdamW (betas 0.9/0.95, weight decay 0.1, peak lr {s["lr"]}, cosine to lr/10,
clip 1.0), batches of {s["batch_size"]} x {s["seq_len"]} tokens: **{s["tokens_seen"]:,} tokens seen**.
{s["train_seconds"]} s on {s["threads"]} CPU threads (torch {s["torch"]}).

- final training loss (mean of the last 20 steps): **{s["final_train_loss"]}**
- held-out loss: **{s["heldout_loss"]}**

## Chat template

Llama-3 style: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>`.
`<|eot_id|>` (id 5) is the tokenizer's eos and ends every turn, so generation stops there;
`add_generation_prompt=True` appends the assistant header. The tokenizer adds no special tokens
by itself: the template writes `<|begin_of_text|>`.

Sample: "Repeat these words: open the file" -> {json.dumps(s["sample"])}

## Rebuild

```
{COMMAND}
```

Seeds and data order are fixed: the same torch version and thread count give the same weights.
"""


if __name__ == "__main__":
    main()
