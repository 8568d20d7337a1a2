"""QLoRA memory and speed: `quantize: nf4` against `quantize: none` (bf16 base), same run, same machine.

Builds a Llama-shaped model with random weights (default ~300M parameters: hidden 1024, 20
layers, 16 heads, 8 KV heads, MLP 2816, vocab 32000, untied head), saves it as a bf16 model
folder in a temp dir, and runs each measurement in its own subprocess so that peak memory is
per side:

  train none / train nf4   lorakit.train.setup + train_step (the code `lorakit train` runs):
                           LoRA r=16 on all linear layers, batch 1 x seq 512 (packed text),
                           bf16 compute; step time is the median over --steps steps after
                           --warmup steps.
  load nf4                 quant.load_model_4bit alone: its peak_bytes (tensor bytes held) and
                           the process's peak memory, against the model's bf16 size.
  load bf16                transformers' from_pretrained in bf16, for reference.

Memory "above baseline" is measured from the process's resident memory after imports, just
before the model is loaded. Two numbers are kept per side:
  rss   peak VmHWM (what `top` calls RES): anonymous memory plus file pages mapped by the
        process, e.g. a safetensors file while it is being read (clean pages the kernel can drop);
  anon  peak RssAnon (sampled every 10 ms): memory the process itself allocated.

    python bench/bench_qlora.py                        # the ~300M model (several minutes)
    python bench/bench_qlora.py --hidden 256 --layers 2 --intermediate 704 --vocab 4000   # quick
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {  # the goals, nf4 / bf16
    "frozen linear weights": 0.27,
    "peak training memory above baseline": 0.5,
    "step time": 1.3,
}
WORDS = (
    "the a of to and in is it that for on with as was at by be this are from or an have not but what all "
    "model data train rank matrix layer token loss batch learning gradient weight adapter frozen small low "
    "quick brown fox jumps over lazy dog answer question translate sort numbers hello world 12 345 6789"
).split()


# --------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemoryProbe:
    """Baseline and peak of the process's memory (bytes); RssAnon is sampled by a thread."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.rss_base = _status_kib("VmRSS") * 1024
        self.anon_base = _status_kib("RssAnon") * 1024
        self.anon_peak = self.anon_base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon_peak = max(self.anon_peak, _status_kib("RssAnon") * 1024)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.anon_peak = max(self.anon_peak, _status_kib("RssAnon") * 1024)
        return {
            "rss_base": self.rss_base,
            "rss_peak_above_base": _status_kib("VmHWM") * 1024 - self.rss_base,
            "anon_base": self.anon_base,
            "anon_peak_above_base": self.anon_peak - self.anon_base,
        }


# --------------------------------------------------------------------------- workers
def _imports():
    """Everything both sides import, so the baseline is taken with the same libraries loaded."""
    import bitsandbytes  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import lorakit.quant  # noqa: F401
    import lorakit.train  # noqa: F401

    return torch


def frozen_linear_bytes(model) -> dict:
    """Bytes of the frozen weights of the LoRA-wrapped linear layers, and of all frozen parameters.

    4-bit layers count what lorakit.quant's report counts: packed codes, 8-bit absmax, nested
    absmax and offset, and the two code tables once.
    """
    from lorakit.inject import lora_layers

    seen: set = set()

    def size(t) -> int:
        if t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    linear = params = 0
    for _, layer in lora_layers(model):
        if layer.kind.name == "linear4bit":
            state = layer.weight.quant_state
            params += state.shape.numel()
            linear += size(layer.weight.data) + size(state.absmax) + size(state.code)
            if state.nested:
                linear += size(state.offset) + size(state.state2.absmax) + size(state.state2.code)
        else:
            params += layer.weight.numel()
            linear += size(layer.weight)
    frozen = linear + sum(size(p) for p in model.parameters() if not p.requires_grad)  # `seen` skips the linears
    return {"linear_bytes": linear, "linear_params": params, "frozen_bytes": frozen}


def worker_train(args) -> dict:
    _imports()
    from lorakit.config import build_run_config
    from lorakit.train import setup, train_step

    probe = MemoryProbe()
    cfg = build_run_config({
        "model": args.folder,
        "output_dir": str(Path(args.work) / f"run-{args.quantize}"),
        "quantize": args.quantize,
        "data": {"train": str(Path(args.work) / "train.jsonl"), "format": "text", "max_length": args.seq,
                 "packing": True, "cache_dir": str(Path(args.work) / "cache")},
        "lora": {"r": args.r, "alpha": 2 * args.r, "targets": "all-linear"},
        "train": {"batch_size": 1, "max_steps": args.warmup + args.steps, "precision": "bf16", "lr": 1e-4,
                  "optimizer": "adamw", "seed": 0, "gradient_checkpointing": args.gradient_checkpointing},
    })  # fmt: skip
    t0 = time.perf_counter()
    run = setup(cfg, log=lambda *_: None)
    setup_s = time.perf_counter() - t0
    after_setup = {"rss_above_base": _status_kib("VmRSS") * 1024 - probe.rss_base}
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        result = train_step(run)
        times.append(time.perf_counter() - start)
        losses.append(result["loss"])
    mem = probe.stop()
    tokens = result["tokens"]
    return {
        **mem, **after_setup, **frozen_linear_bytes(run.model),
        "setup_s": setup_s, "step_times": times, "step_s": statistics.median(times[args.warmup :]),
        "tokens_per_step": tokens, "losses": losses, "frozen_summary": run.frozen_summary,
        "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
    }  # fmt: skip


def worker_load(args) -> dict:
    torch = _imports()
    probe = MemoryProbe()
    t0 = time.perf_counter()
    if args.quantize == "nf4":
        from lorakit.quant import load_model_4bit

        model, report = load_model_4bit(args.folder, compute_dtype=torch.bfloat16)
        extra = {"peak_bytes": report.peak_bytes, "frozen_bytes_after": report.frozen_bytes_after,
                 "frozen_bytes_before": report.frozen_bytes_before, "summary": report.summary()}  # fmt: skip
    else:
        from lorakit.models import load_model

        model = load_model(args.folder, dtype=torch.bfloat16)
        extra = {"frozen_bytes_after": sum(p.numel() * p.element_size() for p in model.parameters())}
    load_s = time.perf_counter() - t0
    mem = probe.stop()
    return {**mem, **extra, "load_s": load_s, "rss_after_above_base": _status_kib("VmRSS") * 1024 - probe.rss_base}


# --------------------------------------------------------------------------- driver
def build_model_folder(args, folder: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import make_tokenizer

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear,
        "bf16_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    del model
    return info


def write_text_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 400)))}) + "\n")


def run_worker(kind: str, quantize: str, args, folder: Path, work: Path) -> dict:
    out = work / f"{kind}-{quantize}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--quantize", quantize, "--folder", str(folder),
           "--work", str(work), "--result", str(out), "--seq", str(args.seq), "--r", str(args.r),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"  {kind} {quantize}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def machine() -> str:
    import bitsandbytes
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}"
    )


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def report(info: dict, tr: dict, ld: dict, args) -> str:
    none, nf4 = tr["none"], tr["nf4"]
    rows = [
        ("frozen linear weights", none["linear_bytes"], nf4["linear_bytes"], mib),
        ("all frozen weights", none["frozen_bytes"], nf4["frozen_bytes"], mib),
        ("peak training memory above baseline", none["rss_peak_above_base"], nf4["rss_peak_above_base"], mib),
        ("  of it anonymous (excl. mapped file pages)", none["anon_peak_above_base"], nf4["anon_peak_above_base"], mib),
        ("memory after setup above baseline", none["rss_above_base"], nf4["rss_above_base"], mib),
        ("step time (median)", none["step_s"], nf4["step_s"], lambda s: f"{s:.2f} s"),
        ("setup time (load + inject)", none["setup_s"], nf4["setup_s"], lambda s: f"{s:.1f} s"),
    ]
    goal_key = {"frozen linear weights": "frozen linear weights",
                "peak training memory above baseline": "peak training memory above baseline",
                "step time (median)": "step time"}  # fmt: skip
    lines = [
        f"machine: {machine()}",
        f"model: Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV, MLP "
        f"{args.intermediate}, vocab {args.vocab}: {info['params'] / 1e6:.1f}M params ({info['linear_params'] / 1e6:.1f}M "
        f"in quantized linears), bf16 size {mib(info['bf16_bytes'])}",
        f"training: LoRA r={args.r} all-linear ({none['trainable'] / 1e6:.2f}M trainable), batch 1 x seq {args.seq} "
        f"({int(none['tokens_per_step'])} tokens/step), bf16 compute, AdamW, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} steps after {args.warmup} warm-up",
        f"nf4 summary: {nf4['frozen_summary']}",
        "",
        f"| {'measure':<44} | {'none (bf16)':>12} | {'nf4':>12} | {'nf4/bf16':>8} | {'goal':>11} |",
        f"|{'-' * 46}|{'-' * 14}|{'-' * 14}|{'-' * 10}|{'-' * 13}|",
    ]
    for name, a, b, fmt in rows:
        ratio = b / a if a else float("nan")
        goal = GOALS.get(goal_key.get(name, ""), None)
        mark = "" if goal is None else (f"<={goal:g} {'ok' if ratio <= goal else 'MISS'}")
        lines.append(f"| {name:<44} | {fmt(a):>12} | {fmt(b):>12} | {ratio:>7.3f}x | {mark:>11} |")
    nf4l, bf16l = ld["nf4"], ld["bf16"]
    lines += [
        "",
        f"loading ({mib(info['bf16_bytes'])} of bf16 weights):",
        f"| {'measure':<44} | {'bytes':>12} | {'/ bf16 size':>11} |",
        f"|{'-' * 46}|{'-' * 14}|{'-' * 13}|",
    ]
    for name, value in [
        ("load_model_4bit: report.peak_bytes (held)", nf4l["peak_bytes"]),
        ("load_model_4bit: peak RSS above baseline", nf4l["rss_peak_above_base"]),
        ("load_model_4bit: peak anonymous above base", nf4l["anon_peak_above_base"]),
        ("load_model_4bit: RSS after load above base", nf4l["rss_after_above_base"]),
        ("4-bit model's frozen weights (report)", nf4l["frozen_bytes_after"]),
        ("bf16 from_pretrained: peak RSS above base", bf16l["rss_peak_above_base"]),
        ("bf16 from_pretrained: peak anonymous", bf16l["anon_peak_above_base"]),
    ]:
        lines.append(f"| {name:<44} | {mib(value):>12} | {value / info['bf16_bytes']:>10.3f}x |")
    lines.append(f"load time: nf4 {nf4l['load_s']:.1f} s, bf16 {bf16l['load_s']:.1f} s")
    lines.append(f"step times (s): none {[round(t, 2) for t in none['step_times']]}, nf4 {[round(t, 2) for t in nf4['step_times']]}")
    lines.append(f"losses: none {[round(v, 3) for v in none['losses']]}, nf4 {[round(v, 3) for v in nf4['losses']]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing on both sides")
    p.add_argument("--json", help="also write the raw results here")
    # internal: one measurement in this process
    p.add_argument("--worker", choices=("train", "load"), help=argparse.SUPPRESS)
    p.add_argument("--quantize", choices=("none", "nf4", "bf16"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = (worker_train if args.worker == "train" else worker_load)(args)
        Path(args.result).write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        work = Path(tmp)
        folder = work / "model"
        t0 = time.perf_counter()
        info = build_model_folder(args, folder)
        write_text_data(work / "train.jsonl", 30 * (args.warmup + args.steps))
        print(f"built {info['params'] / 1e6:.1f}M-param bf16 folder in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        ld = {q: run_worker("load", q, args, folder, work) for q in ("nf4", "bf16")}
        tr = {q: run_worker("train", q, args, folder, work) for q in ("none", "nf4")}
    text = report(info, tr, ld, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": info, "train": tr, "load": ld, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
