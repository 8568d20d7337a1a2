"""Training speed and memory of `lorakit train` against PEFT + transformers, and the distance to the limit.

Both sides train the same random-weight Llama-shaped model (hidden 768, 6 layers, 12 heads, 4 KV
heads, intermediate 2048, vocab 32000) on the same packed batches (2 x 512 tokens, built once by
lorakit.data and given to both), LoRA r=16 alpha=32 on every linear layer but the head, AdamW
(fused, lr 2e-4, grad-norm clip 1.0), same seed. Precision on both sides: frozen weights in bf16
(NF4 codes with bf16 compute for QLoRA), LoRA adapters and their AdamW state in fp32.

  lorakit  `lorakit train CONFIG` run in-process by a side process (lorakit.cli.main), with a timing
           wrapper around lorakit.train.train_step; nothing else changed.
  peft     transformers AutoModelForCausalLM (sdpa) + peft.get_peft_model + torch.optim.AdamW, loss
           from `model(input_ids, position_ids, labels).loss`; QLoRA over a bitsandbytes NF4
           base built with transformers' BitsAndBytesConfig (double quant, blocksize 64, bf16
           compute; no prepare_model_for_kbit_training, which would upcast norms to fp32).

Checkpointing cases: "ckpt" runs full checkpointing on both sides; "selective" runs lorakit's
`gradient_checkpointing: selective` against the same PEFT run (transformers' checkpointing is full).
The "dropout" case (not in the default set) is the plain case with LoRA dropout 0.05 on both sides;
the "dora" case (neither) is the plain case with DoRA on both sides.

Each side runs in its own process: `warmup` steps, then `steps` timed steps; step time and tokens/s
are medians; memory is the process's peak RSS (VmHWM) after its last step, also shown above
the RSS right after the imports (torch, transformers, lorakit or peft); on a CUDA GPU the table adds
each side's peak GPU memory (torch.cuda.max_memory_allocated). The limit is the FLOPs no LoRA
trainer can avoid divided by the best bf16 GEMM rate measured in the same run on the model's own
GEMM shapes (measured before the cases and again after them; the faster of the two counts):
  forward GEMMs of every linear layer and the head (2·T·in·out each), the input-gradient GEMMs of
  backward (the same again), attention scores and PV forward (4·d per attended query-key pair,
  causal within each packed example) and backward (2x forward), adapters 6·T·r·(in+out).
Full checkpointing also gets a second figure, against the limit plus the least its rerun computes
in backward (every layer but the last forward again, without its last frozen GEMM): the rerun is
the price of its memory, which the limit does not count.
A second table times each case's projection and head GEMMs alone, back to back in a step's order
(`gemm_sequence`): what they take when they run one after another, and the rest of the step.

    python bench/bench_speed.py                 # the full benchmark (plain, checkpointing full / selective, QLoRA)
    python bench/bench_speed.py --cases plain,selective   # a subset of the cases
    python bench/bench_speed.py --cases dropout  # LoRA dropout 0.05 on both sides
    python bench/bench_speed.py --rounds 3      # each side run 3 times, alternating; steps pooled (noisy machines)
    python bench/bench_speed.py --quick         # a small model and few steps, for development
    python bench/bench_speed.py --levers        # lorakit alone with each optimisation switched off
    python bench/bench_speed.py --scale 7b --steps 2   # the same at 7B layer shapes (three layers, 4096 tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(hidden=768, layers=6, heads=12, kv_heads=4, intermediate=2048, vocab=32000, batch=2, seq=512, steps=6, warmup=2)
QUICK = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=8000, batch=2, seq=256, steps=3, warmup=1)
# --scale 7b: the model is small enough that per-op costs (Python, rank-r products, 64-wide
# attention heads) weigh on every step; this asks how the same code fares at the shapes users train:
# three decoder layers of Mistral-7B's shape (hidden 4096, 32 heads, 8 KV heads, intermediate
# 14336, vocab 32000) on one packed row of 4096 tokens. On 2 cores a lorakit step takes ~40 s and
# PEFT's 70-100 s, and one pass of `gemm_sequence` ~35 s: it is timed 2 times, not 5.
SCALE_7B = dict(hidden=4096, layers=3, heads=32, kv_heads=8, intermediate=14336, vocab=32000, batch=1, seq=4096, steps=3,
                warmup=1, repeats=2)  # fmt: skip
R, ALPHA, LR, SEED = 16, 32.0, 2e-4, 0
# Called after every step of either side (bench/profile_step.py steps its profiler here).
STEP_HOOKS: list = []
# "selective": lorakit's selective checkpointing against PEFT's (transformers') full one, its only mode
CASES = {
    "plain": {},
    "ckpt": {"gradient_checkpointing": True},
    "selective": {"gradient_checkpointing": "selective"},
    "qlora": {"quantize": "nf4"},
    # not in the default set: LoRA dropout 0.05 on both sides (the benchmark has none)
    "dropout": {"dropout": 0.05},
    # not in the default set: DoRA on both sides (lorakit's `lora.dora`, PEFT's `use_dora`)
    "dora": {"dora": True},
}
# lorakit variants for --levers: (label, module switches, config overrides)
LEVERS = [
    ("lorakit (all levers)", {}, {}),
    ("- fused LoRA linear (plain autograd)", {"lorakit.fused.ENABLED": False}, {}),
    ("- bf16 adapter compute (fp32 adapter matmuls)", {"lorakit.fused.ADAPTER_COMPUTE": "adapter"}, {}),
    ("  rank-r products as oneDNN matmuls (not lorakit's bf16 kernels)", {"lorakit.fused.COMPILED_LORA_PRODUCTS": False}, {}),
    ("- fused linear CE (checkpointed chunks)", {"lorakit.fused.FUSED_CROSS_ENTROPY": False}, {}),
    ("  loss cross-entropy in PyTorch (not compiled)", {"lorakit.fused.COMPILED_CROSS_ENTROPY": False}, {}),
    ("  loss cross-entropy in PyTorch, the whole block at once (not 32 rows)",
     {"lorakit.fused.COMPILED_CROSS_ENTROPY": False, "lorakit.fused.SOFTMAX_ROWS": 1024}, {}),
    ("- fused RMSNorm (transformers' module)", {"lorakit.fused.FUSED_RMS_NORM": False}, {}),
    ("- blocked CPU attention (torch's flash SDPA per example)", {"lorakit.attention.BLOCKED_ATTENTION": False}, {}),
    ("  blocked CPU attention in PyTorch (not compiled)", {"lorakit.attention.COMPILED_ATTENTION": False}, {}),
    ("  compiled attention with oneDNN's GEMMs (not lorakit's bf16 ones)", {"lorakit.attention.COMPILED_BF16_GEMM": False}, {}),
    ("- varlen flash attention on GPUs (an SDPA call per example)", {"lorakit.attention.GPU_VARLEN_FLASH": False}, {}),
    ("  an SDPA call per example with cuDNN's attention on GPUs (a plan per sequence length)",
     {"lorakit.attention.GPU_VARLEN_FLASH": False, "lorakit.attention.CUDNN_ATTENTION": True}, {}),
    ("  fused RMSNorm in PyTorch (not compiled)", {"lorakit.fused.COMPILED_RMS_NORM": False}, {}),
    ("- fused SwiGLU gate (transformers' MLP)", {"lorakit.fused.FUSED_SILU_GATE": False}, {}),
    ("  fused SwiGLU gate in PyTorch (not compiled)", {"lorakit.fused.COMPILED_SILU_GATE": False}, {}),
    ("  SwiGLU gradients in fresh tensors (not over gate and up)", {"lorakit.fused.SILU_GATE_GRADIENTS_IN_PLACE": False}, {}),
    ("- fused RoPE (transformers' apply_rotary_pos_emb)", {"lorakit.fused.FUSED_ROPE": False}, {}),
    ("  loss chunk 256 tokens", {"lorakit.train.LOSS_CHUNK_TOKENS": 256}, {}),
    ("  loss chunk 1024 tokens", {"lorakit.train.LOSS_CHUNK_TOKENS": 1024}, {}),
    ("+ lora.dropout 0.05 (keep-mask from a seed, compiled)", {}, {"lora.dropout": 0.05}),
    ("+ lora.dropout 0.05 with PyTorch's bernoulli mask (kept)", {"lorakit.fused.COMPILED_DROPOUT": False}, {"lora.dropout": 0.05}),
    ("+ train.compile: true", {}, {"train.compile": True}),
    ("+ train.compile: true, mode reduce-overhead (CUDA graphs on GPUs)", {"lorakit.train.COMPILE_MODE": "reduce-overhead"},
     {"train.compile": True}),
    ("- glibc keeping freed memory (its default settings)", {"lorakit.host_memory.KEEP_FREED_MEMORY": False}, {}),
    ("- large blocks kept by size (glibc maps them afresh)", {"lorakit.host_memory.CACHE_LARGE_BLOCKS": False}, {}),
    ("+ train.gradient_checkpointing: true (full)", {}, {"train.gradient_checkpointing": True}),
    ("+ train.gradient_checkpointing: selective", {}, {"train.gradient_checkpointing": "selective"}),
    ("+ selective checkpointing with a rerun (not saved-tensor hooks)",
     {"lorakit.activation_checkpointing.SELECTIVE_WITHOUT_RERUN": False}, {"train.gradient_checkpointing": "selective"}),
    ("+ full checkpointing with glibc's default allocator settings (freed memory not kept)",
     {"lorakit.host_memory.KEEP_FREED_MEMORY": False}, {"train.gradient_checkpointing": True}),
]
WORDS = (
    "the a of to and in is it that for on with as was at by be this are from or an have not but what all were "
    "when we there can your which their said if do will each about how up out them then she many some model "
    "data train rank matrix layer token loss batch learning gradient weight adapter frozen small low quick "
    "brown fox jumps over lazy dog answer question translate sort numbers hello world 12 345 (x) [y] -> ;"
).split()


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's high-water mark,
    # which after `prepare` (the model built in fp32) was above lorakit's own peaks
    from lorakit.metrics import peak_rss_bytes

    return peak_rss_bytes()


def gpu_peak() -> int | None:
    """Peak bytes allocated on the GPU since the process started; None on CPU runs."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- preparation (parent)
def write_model(work: Path, size: dict):
    """A random-weight bf16 Llama of `size`'s shape and the test tokenizer in `work / "model"`;
    returns the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import make_tokenizer

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = make_tokenizer()
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return tokenizer


def prepare(work: Path, size: dict) -> dict:
    """Model folder, text JSONL and the batches every side trains on (saved as tensors)."""
    import torch

    from lorakit.config import DataConfig
    from lorakit.batching import BatchStream
    from lorakit.data import load_train_eval

    tokenizer = write_model(work, size)
    rng = random.Random(SEED)
    steps = size["warmup"] + size["steps"]
    with open(work / "train.jsonl", "w") as f:
        # examples of ~40..1200 tokens, several per packed row; enough rows for every step
        for _ in range(steps * size["batch"] * 6 * max(1, size["seq"] // 512)):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 450)))}) + "\n")
    data = DataConfig(train=str(work / "train.jsonl"), format="text", max_length=size["seq"], packing=True,
                      cache_dir=str(work / "cache"))  # fmt: skip
    train, _ = load_train_eval(data, tokenizer, seed=SEED)
    stream = BatchStream(train, batch_size=size["batch"], max_length=size["seq"], packing=True, seed=SEED,
                         pad_id=tokenizer.pad_token_id)  # fmt: skip
    batches = [stream.next() for _ in range(steps)]
    torch.save([{k: batches[i][k] for k in ("input_ids", "labels", "position_ids")} for i in range(steps)], work / "batches.pt")
    return {"pairs": attention_pairs(batches), "tokens": [int(b["input_ids"].numel()) for b in batches]}


def attention_pairs(batches: list[dict]) -> float:
    """Mean number of attended (query, key) pairs per step: causal within each packed example."""
    totals = []
    for b in batches:
        n = 0
        for row in b["position_ids"].tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            n += sum((e - s) * (e - s + 1) // 2 for s, e in zip(starts, starts[1:]))
        totals.append(n)
    return statistics.mean(totals)


def layer_shapes(size: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's projections: q, k, v, o, gate, up, down."""
    h, i = size["hidden"], size["intermediate"]
    kv = size["kv_heads"] * h // size["heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def gemm_limit(size: dict, pairs: float) -> dict:
    """Unavoidable FLOPs per step and the best bf16 GEMM rate on this model's shapes."""
    import torch

    h, v, d = size["hidden"], size["vocab"], size["hidden"] // size["heads"]
    t = size["batch"] * size["seq"]
    shapes = layer_shapes(size) * size["layers"] + [(h, v)]
    gemm = sum(2 * t * a * b for a, b in shapes)
    attn_fwd = 4 * d * size["heads"] * pairs * size["layers"]
    adapters = sum(6 * t * R * (a + b) for a, b in shapes[:-1])
    flops = 2 * gemm + 3 * attn_fwd + adapters
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # A GPU runs one of these products in microseconds, less than a launch and a sync: time a burst.
    burst = 50 if device == "cuda" else 1
    best = 0.0
    for a, b in sorted(set(shapes)):
        for x_shape, w_shape in (((t, a), (a, b)), ((t, b), (b, a))):  # forward, input gradient
            x = torch.randn(*x_shape, dtype=torch.bfloat16, device=device)
            w = torch.randn(*w_shape, dtype=torch.bfloat16, device=device)
            x @ w
            times = []
            for _ in range(5):
                sync()
                start = time.perf_counter()
                for _ in range(burst):
                    x @ w
                sync()
                times.append((time.perf_counter() - start) / burst)
            best = max(best, 2 * x_shape[0] * x_shape[1] * w_shape[1] / min(times))
    # Full checkpointing computes each layer again in backward, which the limit above does not count.
    # The least any rerun must do, kept apart: every decoder layer but the last (whose backward comes
    # first, so that keeping its activations costs no extra peak) runs its forward again but for the
    # frozen GEMM of its last projection (whose output only joins the residual stream): the other
    # projections, their adapters (the last one's x @ A^T too: its backward reads it), the attention.
    layer = layer_shapes(size)
    rerun = (size["layers"] - 1) * (
        sum(2 * t * a * b for a, b in layer[:-1])
        + attn_fwd / size["layers"]
        + sum(2 * t * R * (a + b) for a, b in layer[:-1])
        + 2 * t * R * layer[-1][0]
    )
    return {"flops": flops, "gemm_rate": best, "limit_s": flops / best, "rerun_flops": rerun,
            "parts": {"linear+head fwd": gemm, "input grads": gemm, "attention": 3 * attn_fwd, "adapters": adapters}}


def gemm_sequence(size: dict) -> dict:
    """The step's projection and head GEMMs alone, back to back in a step's order: a floor per case.

    The limit's rate is the best of each shape timed alone, its operands hot in cache. A step runs
    ~90 such GEMMs one after another, each on its own weight fetched from memory; timed that way,
    with nothing else in between (no attention, no rank-r adapter products), they show how much of
    a step's time the GEMMs need by themselves.

    Order: each layer's projections forward, the head's forward and input gradient in the loss's
    chunks, then the layers' input gradients from the last layer down. Full checkpointing adds the
    rerun before each checkpointed layer's backward (every layer but the last, which lorakit does
    not checkpoint): its projections forward but the last, which lorakit's rerun never computes.
    Selective checkpointing and QLoRA run the plain case's GEMMs (QLoRA's dequantisation is not a
    GEMM). Returns {case: (GFLOP, fastest seconds of `repeats`, default 5)}.
    """
    import torch
    import torch.nn.functional as F

    from lorakit.loss import LOSS_CHUNK_TOKENS

    h, v, t = size["hidden"], size["vocab"], size["batch"] * size["seq"]
    shapes = layer_shapes(size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    weights = [[torch.randn(o, n, **bf16) for n, o in shapes] for _ in range(size["layers"])]
    head = torch.randn(v, h, **bf16)
    inputs = {n: torch.randn(t, n, **bf16) for n in {n for n, _ in shapes}}
    grads = {o: torch.randn(t, o, **bf16) for o in {o for _, o in shapes}}

    def step(rerun: bool) -> float:
        flops = 0.0
        for layer in weights:
            for (n, o), w in zip(shapes, layer):
                F.linear(inputs[n], w)
                flops += 2 * t * n * o
        for start in range(0, t, LOSS_CHUNK_TOKENS):
            rows = inputs[h][start : start + LOSS_CHUNK_TOKENS]
            F.linear(rows, head) @ head
            flops += 4 * rows.shape[0] * h * v
        for index in reversed(range(len(weights))):
            if rerun and index < len(weights) - 1:
                for (n, o), w in zip(shapes[:-1], weights[index][:-1]):
                    F.linear(inputs[n], w)
                    flops += 2 * t * n * o
            for (n, o), w in zip(shapes, weights[index]):
                grads[o] @ w
                flops += 2 * t * n * o
        return flops

    out = {}
    for case, rerun in (("plain", False), ("ckpt", True)):
        step(rerun)
        times = []
        for _ in range(size.get("repeats", 5)):
            sync()
            start = time.perf_counter()
            flops = step(rerun)
            sync()
            times.append(time.perf_counter() - start)
        out[case] = (flops / 1e9, min(times))
    out["selective"] = out["qlora"] = out["dropout"] = out["dora"] = out["plain"]
    return out


# --------------------------------------------------------------------------- the sides (children)
def side_lorakit(work: Path, size: dict, case: dict, switches: dict, overrides: dict) -> dict:
    import importlib

    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline RSS)
    import yaml

    import lorakit.train as lt
    from lorakit.cli import main

    base_rss = rss_now()

    for key, value in switches.items():
        module, _, attr = key.rpartition(".")
        setattr(importlib.import_module(module), attr, value)
    cfg = {
        "model": str(work / "model"), "output_dir": str(work / f"run-{os.getpid()}"), "quantize": case.get("quantize", "none"),
        "data": {"train": str(work / "train.jsonl"), "format": "text", "max_length": size["seq"], "packing": True,
                 "cache_dir": str(work / "cache")},
        "lora": {"r": R, "alpha": ALPHA, "dropout": case.get("dropout", 0.0), "targets": "all-linear",
                 "target_parameters": case.get("target_parameters", []), "dora": case.get("dora", False)},
        "train": {"max_steps": size["warmup"] + size["steps"], "batch_size": size["batch"], "lr": LR, "seed": SEED,
                  "gradient_checkpointing": case.get("gradient_checkpointing", False), "log_every": 1000, "save_every": 0},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    (work / "lorakit.yaml").write_text(yaml.safe_dump(cfg))
    times, losses, peaks = [], [], []
    inner = lt.train_step

    def timed(run):
        start = time.perf_counter()
        result = inner(run)  # returns after loss.item(): the step's work is done on any device
        times.append(time.perf_counter() - start)
        losses.append(result["loss"])
        peaks.append(rss_peak())
        for hook in STEP_HOOKS:
            hook()
        return result

    lt.train_step = timed
    code = main(["train", str(work / "lorakit.yaml")])
    assert code == 0, f"lorakit train exited with {code}"
    return {"times": times, "losses": losses, "peak_rss": peaks[-1], "base_rss": base_rss, "peak_gpu": gpu_peak()}


def side_peft(work: Path, size: dict, case: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    base_rss = rss_now()

    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {}
    if case.get("quantize") == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"],
        )  # fmt: skip
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, attn_implementation="sdpa", **kwargs)
    model.to(device)
    if case.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=case.get("dropout", 0.0), target_modules="all-linear",
                                             target_parameters=case.get("target_parameters"), use_dora=case.get("dora", False),
                                             task_type="CAUSAL_LM"))  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # PEFT keeps expert adapters (target_parameters) in the weight's dtype: fp32 like lorakit's
        p.data = p.data.float()
    assert all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    batches = torch.load(work / "batches.pt")
    times, losses = [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # one host sync per step (also ends the step on CUDA), like lorakit's logging
        times.append(time.perf_counter() - start)
        for hook in STEP_HOOKS:
            hook()
    return {"times": times, "losses": losses, "peak_rss": rss_peak(), "base_rss": base_rss, "peak_gpu": gpu_peak()}


def run_side(args: argparse.Namespace) -> None:
    work, size, case = Path(args.work), json.loads(args.size), json.loads(args.case)
    if args.side == "peft":
        out = side_peft(work, size, case)
    else:
        out = side_lorakit(work, size, case, json.loads(args.switches), json.loads(args.overrides))
    print("RESULT " + json.dumps(out))


def child(work: Path, size: dict, side: str, case: dict, switches: dict | None = None, overrides: dict | None = None) -> dict:
    args = ["--case", json.dumps(case), "--switches", json.dumps(switches or {}), "--overrides", json.dumps(overrides or {})]
    return run_child(Path(__file__), work, size, side, args)


def run_child(script: Path, work: Path, size: dict, side: str, args: list[str] = ()) -> dict:
    """`python SCRIPT --side SIDE --work WORK --size SIZE ARGS...` in its own process -> the dict it
    printed as `RESULT {...}`, with the medians of its timed steps added."""
    cmd = [sys.executable, str(script), "--side", side, "--work", str(work), "--size", json.dumps(size), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][7:])
    timed = out["times"][size["warmup"] :]
    out["step_s"] = statistics.median(timed)
    out["best_s"] = min(timed)  # least disturbed by other processes on a shared machine
    out["tokens_s"] = size["batch"] * size["seq"] / out["step_s"]
    return out


def pooled(outs: list[dict], size: dict) -> dict:
    """One side's runs as one: medians over every timed step of every run, the largest peak RSS."""
    out = dict(outs[0])
    timed = [t for o in outs for t in o["times"][size["warmup"] :]]
    out["step_s"], out["best_s"] = statistics.median(timed), min(timed)
    out["round_s"] = [o["step_s"] for o in outs]  # a slow spell on a shared host shows as one slow round
    out["tokens_s"] = size["batch"] * size["seq"] / out["step_s"]
    out["peak_rss"] = max(o["peak_rss"] for o in outs)
    out["base_rss"] = min(o["base_rss"] for o in outs)
    out["peak_gpu"] = None if out["peak_gpu"] is None else max(o["peak_gpu"] for o in outs)
    return out


# --------------------------------------------------------------------------- report
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), load average {load}")  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--quick", action="store_true", help="small model, few steps (development)")
    model.add_argument("--scale", choices=["7b"], help="7b: three decoder layers of Mistral-7B's shape, 4096 tokens a step")
    parser.add_argument("--cases", default="plain,ckpt,selective,qlora", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--levers", nargs="?", const="", metavar="WORDS",
                        help="lorakit alone with each lever switched off (plain case); with WORDS (comma-separated), "
                             "only the levers whose label holds one of them")  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed steps per side")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each side this many times, alternating which goes first; step times pooled")  # fmt: skip
    parser.add_argument("--side", help=argparse.SUPPRESS)
    for hidden in ("--work", "--size", "--case", "--switches", "--overrides"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    unknown = [name for name in args.cases.split(",") if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if args.steps is not None and args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    size = dict(QUICK if args.quick else SCALE_7B if args.scale == "7b" else FULL)
    if args.steps is not None:
        size["steps"] = args.steps
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        work = Path(tmp)
        print(f"machine: {machine()}", flush=True)
        info = prepare(work, size)
        limit = gemm_limit(size, info["pairs"])
        floor = gemm_sequence(size)
        print(f"model: hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; batch {size['batch']} x "
              f"{size['seq']} packed; LoRA r={R} all linear; {size['warmup']} warm-up + {size['steps']} timed steps, medians")  # fmt: skip
        print(f"limit: {limit['flops'] / 1e9:.1f} GFLOP/step at best bf16 GEMM {limit['gemm_rate'] / 1e9:.1f} GFLOP/s "
              f"= {limit['limit_s']:#.4g} s/step (" + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in limit["parts"].items()) + ")",
              flush=True)  # fmt: skip
        if args.levers is not None:
            return levers(work, size, limit, [w for w in args.levers.split(",") if w])
        rows, failed = [], []
        for name in args.cases.split(","):
            case = CASES[name]
            runs: dict[str, list[dict]] = {"peft": [], "lorakit": []}
            try:
                for round_ in range(args.rounds):
                    for side in ("peft", "lorakit") if round_ % 2 == 0 else ("lorakit", "peft"):
                        runs[side].append(child(work, size, side, case))
            except SystemExit as failure:  # one case failing (say, on a new GPU) leaves the others to run
                failed.append(name)
                print(f"  {name}: {failure}", flush=True)
                continue
            peft, mine = pooled(runs["peft"], size), pooled(runs["lorakit"], size)
            rows.append((name, mine, peft))
            rounds = {side: " ".join(f"{t:.3f}" for t in out["round_s"]) for side, out in (("lorakit", mine), ("peft", peft))}
            gpu = "" if mine["peak_gpu"] is None else f" (GPU {gib(mine['peak_gpu'])} / {gib(peft['peak_gpu'])} GiB)"
            print(f"  {name}: lorakit {mine['step_s']:.3f} s/step (rounds {rounds['lorakit']}), {gib(mine['peak_rss'])} GiB; "
                  f"peft {peft['step_s']:.3f} s/step (rounds {rounds['peft']}), {gib(peft['peak_rss'])} GiB{gpu}; "
                  f"first loss {mine['losses'][0]:.4f} / {peft['losses'][0]:.4f}", flush=True)  # fmt: skip
        if not rows:
            raise SystemExit(f"every case failed: {', '.join(failed)}")
        # The GEMM rate again, after the cases: a rate measured in a slow spell of a shared host
        # would loosen the limit. The table uses the faster of the two measurements.
        again = gemm_limit(size, info["pairs"])
        print(f"best bf16 GEMM rate measured again after the cases: {again['gemm_rate'] / 1e9:.1f} GFLOP/s "
              f"(before: {limit['gemm_rate'] / 1e9:.1f}); the table uses the faster", flush=True)  # fmt: skip
        if again["gemm_rate"] > limit["gemm_rate"]:
            limit = again
        after = gemm_sequence(size)
        floor = {case: min(floor[case], after[case], key=lambda f: f[1]) for case in floor}
        print(f"limit: {limit['limit_s']:#.4g} s/step")
        print_table(rows, limit)
        print_rerun_limit(rows, limit)
        print_gemm_floor(rows, floor, limit)
        print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if failed:
            raise SystemExit(f"cases that failed: {', '.join(failed)} (their errors are printed above)")


def print_table(rows: list[tuple[str, dict, dict]], limit: dict) -> None:
    print()
    # On a GPU the memory that limits training is the GPU's: its peak gets a column of its own.
    on_gpu = rows[0][1]["peak_gpu"] is not None
    print("| case | lorakit s/step | PEFT s/step | tokens/s ratio " + ("| peak GPU GiB lorakit / PEFT (ratio) " if on_gpu else "")
          + "| peak RSS GiB lorakit / PEFT (ratio) | above imports GiB (ratio) | lorakit / limit | PEFT / limit "
          "| fastest step lorakit / PEFT s (speed-up) | step-1 loss lorakit / PEFT |")  # fmt: skip
    print("| --- " * (11 if on_gpu else 10) + "|")
    for name, mine, peft in rows:
        above_m, above_p = mine["peak_rss"] - mine["base_rss"], peft["peak_rss"] - peft["base_rss"]
        gpu = (f"| {gib(mine['peak_gpu'])} / {gib(peft['peak_gpu'])} ({mine['peak_gpu'] / peft['peak_gpu']:.2f}x) "
               if on_gpu else "")  # fmt: skip
        print(f"| {name} | {mine['step_s']:.3f} | {peft['step_s']:.3f} | {mine['tokens_s'] / peft['tokens_s']:.2f}x {gpu}"
              f"| {gib(mine['peak_rss'])} / {gib(peft['peak_rss'])} ({mine['peak_rss'] / peft['peak_rss']:.2f}x) "
              f"| {gib(above_m)} / {gib(above_p)} ({above_m / above_p:.2f}x) "
              f"| {mine['step_s'] / limit['limit_s']:.2f}x | {peft['step_s'] / limit['limit_s']:.2f}x "
              f"| {mine['best_s']:.3f} / {peft['best_s']:.3f} ({peft['best_s'] / mine['best_s']:.2f}x) "
              f"| {mine['losses'][0]:.4f} / {peft['losses'][0]:.4f} |")  # fmt: skip


def print_rerun_limit(rows: list[tuple[str, dict, dict]], limit: dict) -> None:
    """Full checkpointing against the limit plus the least its rerun computes (see `gemm_limit`)."""
    for name, mine, peft in rows:
        if CASES[name].get("gradient_checkpointing") is not True:
            continue
        with_rerun = (limit["flops"] + limit["rerun_flops"]) / limit["gemm_rate"]
        print(f"\n{name}: the limit plus the least a full rerun computes ({limit['rerun_flops'] / 1e9:.1f} GFLOP) is "
              f"{with_rerun:#.4g} s/step; against it lorakit {mine['step_s'] / with_rerun:.2f}x, "
              f"PEFT {peft['step_s'] / with_rerun:.2f}x")  # fmt: skip


def print_gemm_floor(rows: list[tuple[str, dict, dict]], floor: dict, limit: dict) -> None:
    print("\nThe step's GEMMs alone, back to back (`gemm_sequence`; fastest of a few, before or after the cases):\n")
    print("| case | GEMMs GFLOP | back to back s (GFLOP/s) | / limit | lorakit step outside them s |")
    print("| --- | --- | --- | --- | --- |")
    for name, mine, _ in rows:
        gflop, seconds = floor[name]
        print(f"| {name} | {gflop:.1f} | {seconds:#.4g} ({gflop / seconds:.0f}) | {seconds / limit['limit_s']:.2f}x "
              f"| {mine['step_s'] - seconds:.3f} |")  # fmt: skip


def chosen_levers(words: list[str]) -> list[tuple[str, dict, dict]]:
    """The levers whose label holds one of `words` (all of them without words), after the baseline."""
    baseline, *rest = LEVERS
    chosen = [lever for lever in rest if not words or any(w in lever[0] for w in words)]
    if words and not chosen:
        raise SystemExit(f"--levers {','.join(words)}: no lever's label holds these words; the labels:\n"
                         + "\n".join(label for label, _, _ in rest))  # fmt: skip
    return [baseline] + chosen


def levers(work: Path, size: dict, limit: dict, words: list[str]) -> None:
    import torch

    on_gpu = torch.cuda.is_available()  # the GPU's peak memory is the one that limits training there
    print("\n| lorakit variant (plain case) | s/step | fastest s | tokens/s | " + ("peak GPU GiB | " if on_gpu else "")
          + "peak RSS GiB | above imports GiB | / limit | step-1 loss |")  # fmt: skip
    print("| --- " * (9 if on_gpu else 8) + "|")
    failed = []
    for label, switches, overrides in chosen_levers(words):
        try:
            out = child(work, size, "lorakit", {}, switches, overrides)
        except SystemExit as failure:  # one lever failing (say, compile on a new GPU) leaves the others to run
            failed.append(label)
            print(f"| {label} | failed: {str(failure).splitlines()[0]} |", flush=True)
            print(failure, flush=True)
            continue
        gpu = f"| {gib(out['peak_gpu'])} " if on_gpu else ""
        print(f"| {label} | {out['step_s']:.3f} | {out['best_s']:.3f} | {out['tokens_s']:,.0f} {gpu}| {gib(out['peak_rss'])} "
              f"| {gib(out['peak_rss'] - out['base_rss'])} | {out['step_s'] / limit['limit_s']:.2f}x "
              f"| {out['losses'][0]:.4f} |", flush=True)  # fmt: skip
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if failed:
        raise SystemExit(f"levers that failed: {', '.join(failed)} (their errors are printed above)")

if __name__ == "__main__":
    main()
