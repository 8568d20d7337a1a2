"""`lorakit train` with no config: the offline demo on the shipped model.

Evaluates the base model on the held-out dates, fine-tunes a LoRA adapter with the real trainer,
evaluates again and prints before/after side by side. Everything goes to `./lorakit-demo`
unless `output_dir=...` is given; any other `KEY=VALUE` override works as with a config file.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from lorakit.config import build_run_config, set_dotted
from lorakit.demo import EVAL_FILE, MAX_NEW_TOKENS, MODEL_DIR, TRAIN_FILE
from lorakit.errors import UserError

# Chosen so the whole demo (two evals and training) takes about 70 s on 2 CPU cores (and ~20 s
# more the first time, for the kernel build)
# (measured settings: scripts/make_demo_data.py and the model card in lorakit/demo/model).
DEMO_CONFIG: dict[str, Any] = {
    "model": str(MODEL_DIR),
    "output_dir": "lorakit-demo",
    # Examples are 40-50 tokens, so two never share a 64-token row: packing would change nothing.
    "data": {"train": str(TRAIN_FILE), "eval": str(EVAL_FILE), "max_length": 64, "packing": False},
    "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},  # 1.48% of the model's parameters
    "train": {
        "max_steps": 500, "batch_size": 16, "lr": 5.0e-3, "warmup_steps": 10, "scheduler": "cosine",
        "log_every": 10, "eval_every": 100, "save_every": 250, "eval_generate": True,
        "eval_max_new_tokens": MAX_NEW_TOKENS, "seed": 0,
        # The 5M-parameter demo model is sensitive to bf16 rounding (held-out accuracy after 500
        # steps ranged 57-99% over seeds in bf16, 95-97.5% in fp32); at this size fp32 costs little.
        "precision": "fp32",
    },
}  # fmt: skip


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def demo_config(overrides: dict[str, Any]):
    cfg = build_run_config(_merge(DEMO_CONFIG, overrides), source="demo")
    if isinstance(cfg.data.eval, dict):
        raise UserError("data.eval: the demo's before/after table reads one eval set; named eval sets are for your own "
                        "configs (lorakit train CONFIG.yaml)")  # fmt: skip
    # the demo evaluates the base before training itself (its table's "before")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_on_start=False))


def run_demo(overrides: dict[str, Any], *, resume: bool = False, log=print) -> int:
    from lorakit.train import setup

    cfg = demo_config(overrides)
    log("lorakit demo: teach a small pretrained model to write dates as YYYY-MM-DD with a LoRA adapter")
    data = f"{TRAIN_FILE.name} / {EVAL_FILE.name}" if _the_demos_data(cfg) else f"{cfg.data.train} / {cfg.data.eval}"
    log(f"  (model shipped in {MODEL_DIR}; data: {data}; no network needed)\n")
    run = setup(cfg, resume=resume, log=log)
    try:
        return _train_and_compare(run, log)
    finally:
        run.close()


def _train_and_compare(run, log) -> int:
    """The demo's run: the base model's scores, training, the scores after, what to try next."""
    from lorakit import train as trainer
    from lorakit.evaluate import generation_accuracy
    from lorakit.train import evaluate, final_summary, fit, start_summary

    log(start_summary(run) + "\n")

    before = None
    if run.step == 0:
        log(f"evaluating the base model on {'the held-out dates' if _the_demos_data(run.cfg) else 'the eval set'} ...")
        before = evaluate(run)
        run.metrics.log({"step": 0, **before})
        if run.eval_records:
            records, system_prompts = zip(*run.eval_records[""][:3])  # (record, its file's system prompt) pairs
            samples = generation_accuracy(run.model, run.tokenizer, records, max_new_tokens=MAX_NEW_TOKENS,
                                          system_prompt=list(system_prompts))  # fmt: skip
            for f in samples["failures"][:3]:
                log(f"  prompt {_last_user(f['prompt'])!r}: expected {f['expected']!r}, base model says {f['got']!r}")
        log(f"  base model: {_scores(before)}\n")
        run.model.train()

    try:
        summary = fit(run, log=log)
    except trainer.TrainingDiverged as exc:
        log(f"error: {exc}")
        return 1
    if "interrupted" in summary:
        return 128 + summary["interrupted"]
    log(final_summary(summary) + "\n")
    after = {k: summary[k] for k in ("eval_loss", "eval_accuracy") if k in summary}
    if before is None:
        before = next((e for e in run.metrics.entries if e.get("step") == 0 and "eval_accuracy" in e), {})
    log(f"{'':16}{'before':>10}{'after':>10}")
    if before and "eval_accuracy" in before and "eval_accuracy" in after:
        log(f"{'exact match':16}{100 * before['eval_accuracy']:>9.1f}%{100 * after['eval_accuracy']:>9.1f}%")
    if before and "eval_loss" in after:
        log(f"{'eval loss':16}{before['eval_loss']:>10.3f}{after['eval_loss']:>10.3f}")
    out = run.output_dir
    log(
        f"\nadapter: {out / 'adapter'}\nplot:    {out / 'loss.png'}\nmetrics: {out / 'metrics.jsonl'}\n\nnext:\n"
        f"  lorakit generate --model {MODEL_DIR} --adapter {out / 'adapter'} --chat --prompt 'Write this date as YYYY-MM-DD: July 4, 1999'\n"
        f"  lorakit chat --model {MODEL_DIR} --adapter {out / 'adapter'}\n"
        f"  lorakit merge --base {MODEL_DIR} --adapter {out / 'adapter'} --out {out / 'merged'}\n"
        f"  lorakit inspect {out / 'adapter'} --base {MODEL_DIR}"
    )
    return 0


def _the_demos_data(cfg) -> bool:
    """Whether the run trains and evaluates on the demo's own dates (overrides may give other data)."""
    return (cfg.data.train, cfg.data.eval) == (str(TRAIN_FILE), str(EVAL_FILE))


def _scores(result: dict[str, float]) -> str:
    parts = []
    if "eval_accuracy" in result:
        parts.append(f"exact match {100 * result['eval_accuracy']:.1f}%")
    parts.append(f"eval loss {result['eval_loss']:.3f}")
    return ", ".join(parts)


def _last_user(prompt: str) -> str:
    marker = "YYYY-MM-DD: "
    return prompt.split(marker, 1)[1].split("<", 1)[0].strip() if marker in prompt else prompt[-40:]
