"""The shipped demo model and data: load with plain transformers, match their model card."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorakit.demo import EVAL_FILE, MODEL_DIR, TRAIN_FILE

ROOT = Path(__file__).resolve().parent.parent
MAX_FOLDER_BYTES = 25 * 1024 * 1024


@functools.lru_cache(maxsize=None)
def _model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


def _card() -> str:
    return (MODEL_DIR / "README.md").read_text(encoding="utf-8")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_folder_has_the_files_and_fits_the_size_budget():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{size / 2**20:.1f} MiB"


def test_model_loads_with_plain_transformers_and_generates():
    model, tok = _model(), _tokenizer()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token_id == model.config.pad_token_id
    assert tok.bos_token_id == model.config.bos_token_id
    assert len(tok) <= model.config.vocab_size
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_card_parameter_count_matches_the_weights():
    with safe_open(MODEL_DIR / "model.safetensors", framework="pt") as f:
        in_file = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    in_model = sum(p.numel() for p in _model().parameters())
    match = re.search(r"^\| parameters \| ([\d,]+)", _card(), re.MULTILINE)
    assert match, "model card has no parameters row"
    assert int(match.group(1).replace(",", "")) == in_file == in_model


def test_card_matches_config():
    config = AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    card = _card()
    row = f"| layers / hidden / MLP | {config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size} |"
    assert row in card
    assert f"| vocabulary | {config.vocab_size} " in card
    assert "python scripts/build_demo_model.py" in card
    tokens = int(re.search(r"\*\*([\d,]+) tokens seen\*\*", card).group(1).replace(",", ""))
    steps, batch, seq = map(int, re.search(r"(\d+) steps of AdamW.*?batches of (\d+) x (\d+)", card, re.S).groups())
    assert tokens == steps * batch * seq


def test_chat_template_renders_and_ends_turns_with_eos():
    tok = _tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tok.bos_token)
    assert text.endswith("Hello!" + tok.eos_token)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(ids["input_ids"], ids["assistant_masks"]) if m]
    assert tok.decode(answer) == "Hello!" + tok.eos_token


def test_digits_are_single_tokens():
    tok = _tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("2021-03-05", add_special_tokens=False)["input_ids"])
    assert pieces == ["2", "0", "2", "1", "-", "0", "3", "-", "0", "5"]


def test_data_parses_and_eval_is_held_out():
    train, evals = _rows(TRAIN_FILE), _rows(EVAL_FILE)
    assert 1000 <= len(train) and 100 <= len(evals) <= 200
    for row in train + evals:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["messages"][1]["content"])
    # Held out means unseen dates, not just unseen spellings of seen dates.
    answers = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not answers(train) & answers(evals)
    assert len(answers(evals)) == len(evals)


def test_data_script_rebuilds_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train, evals = module.make_splits(len(_rows(TRAIN_FILE)), len(_rows(EVAL_FILE)), seed=module.DEFAULT_SEED)
    module.write_jsonl(tmp_path / "train.jsonl", train)
    module.write_jsonl(tmp_path / "eval.jsonl", evals)
    assert (tmp_path / "train.jsonl").read_bytes() == TRAIN_FILE.read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == EVAL_FILE.read_bytes()
