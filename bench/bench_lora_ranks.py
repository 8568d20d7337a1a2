"""The LoRA paper's claim in miniature, on the shipped demo model and task.

LoRA at r = 4, 8, 16 on the attention projections only and on all linear layers, against full
fine-tuning, each with the demo's data, steps, batch and schedule. Reported per run: held-out
exact match, trainable parameters, size of what must be saved (adapter file vs full
checkpoint), peak process memory and wall time. Each run is its own process so peak memory is
its own.

    python bench/bench_lora_ranks.py            # all 7 runs (about 20 minutes on 2 CPU cores)
    python bench/bench_lora_ranks.py --steps 20 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def run_one(spec: dict, out_dir: Path) -> dict:
    """Train one configuration in this process and measure it."""
    import torch

    from lorakit.config import build_run_config
    from lorakit.demo.run import DEMO_CONFIG, _merge
    from lorakit.evaluate import generation_accuracy
    from lorakit.metrics import peak_rss_bytes
    from lorakit.train import fit, setup

    overrides = {"output_dir": str(out_dir), "train.save_every": 0, "train.eval_generate": False, **spec.get("overrides", {})}
    if spec["mode"] == "lora":
        # As in the LoRA paper, alpha stays at the value set for the first rank tried (here the
        # demo's r=4, alpha=8), so s = alpha / r shrinks as r grows and the learning rate needs no retuning.
        overrides.update({"lora.r": spec["r"], "lora.alpha": 8, "lora.targets": spec["targets"]})
    cfg = build_run_config(_merge(DEMO_CONFIG, overrides), source="bench")
    start = time.perf_counter()
    quiet = lambda *a, **k: None  # noqa: E731
    run = setup(cfg, log=quiet)
    if spec["mode"] == "full":
        # Full fine-tuning: every weight trains, in fp32 like the adapters (no LoRA update is used:
        # B starts at zero and is frozen, so the wrapped layers compute exactly the base layer).
        for name, p in run.model.named_parameters():
            p.requires_grad_("lora_" not in name)
            if "lora_" not in name:
                p.data = p.data.float()
        from lorakit.train import make_optimizer

        run.optimizer = make_optimizer(cfg, run.model)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, run.scheduler.lr_lambdas[0])
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in run.model.named_parameters() if "lora_" not in n)
    fit(run, log=quiet)
    from lorakit.data_files import read_records

    records = [r for _, r in read_records(cfg.data.eval)]
    acc = generation_accuracy(run.model, run.tokenizer, records, max_new_tokens=16)
    elapsed = time.perf_counter() - start
    if spec["mode"] == "full":
        from safetensors.torch import save_file

        state = {n: p.detach().contiguous() for n, p in run.model.named_parameters() if "lora_" not in n}
        save_file(state, str(out_dir / "full.safetensors"))
        saved_bytes = (out_dir / "full.safetensors").stat().st_size
    else:
        saved_bytes = (out_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    return {
        "name": spec["name"],
        "accuracy": acc["accuracy"],
        "trainable": trainable,
        "base_params": total,
        "saved_bytes": saved_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "time_s": elapsed,
    }


def specs(steps: int | None) -> list[dict]:
    extra = {"train.max_steps": steps} if steps is not None else {}
    out = []
    for targets, label in ((ATTENTION, "attention"), ("all-linear", "all-linear")):
        for r in (4, 8, 16):
            out.append({"name": f"LoRA r={r} {label}", "mode": "lora", "r": r, "targets": targets, "overrides": dict(extra)})
    # Full fine-tuning moves every weight: a 10x smaller learning rate than LoRA's is the usual choice.
    out.append({"name": "full fine-tuning", "mode": "full", "overrides": {"train.lr": 2.0e-4, **extra}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child), Path(args.out))))
        return
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs(args.steps)):
            out = Path(tmp) / f"run{i}"
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--out", str(out)],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            if proc.returncode != 0:
                sys.exit(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['name']}: {100 * rows[-1]['accuracy']:.1f}% in {rows[-1]['time_s']:.0f}s", file=sys.stderr)
    full = rows[-1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| run | held-out exact match | trainable params | % of model | saved file | vs full checkpoint | peak memory | time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {100 * r['accuracy']:.1f}% | {r['trainable']:,} | {100 * r['trainable'] / r['base_params']:.2f}% "
            f"| {r['saved_bytes'] / 2**20:.2f} MiB | {r['saved_bytes'] / full['saved_bytes']:.3f}x "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['time_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
