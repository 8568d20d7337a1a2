"""The demo shipped with lorakit: a small pretrained Llama model and the date-formatting task.

`MODEL_DIR` is a Hugging Face model folder (built by `scripts/build_demo_model.py`), loadable
with `AutoModelForCausalLM.from_pretrained(MODEL_DIR)`. `TRAIN_FILE` / `EVAL_FILE` are chat
JSONL files (built by `scripts/make_demo_data.py`): write a date given in words as YYYY-MM-DD.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
DATA_DIR = DEMO_DIR / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
EVAL_FILE = DATA_DIR / "eval.jsonl"

# Greedy answers are 10 tokens plus <|eot_id|>; 16 leaves room without slowing the eval.
MAX_NEW_TOKENS = 16
