"""Tiny models and local tokenizers for tests: no network, built in well under a second."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Where the equality tests of the optimised paths run: CPU always, and a CUDA GPU when there is one
# (bench/gpu_check.sh runs them there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A Llama-3 style template: header tokens around the role, <|eot_id|> closes every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A ChatML template (Qwen style): <|im_start|>role\n ... <|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adaptation trains two small matrices beside each frozen linear layer.",
    "user assistant system: What is two plus two? Four. Answer the question briefly.",
    "Translate to French: hello world -> bonjour le monde. Sort the numbers 3 1 2 -> 1 2 3.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok.to_str()


def make_tokenizer(template: str = "llama3", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template.

    template: "llama3", "chatml" or None (no chat template).
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>" if template != "chatml" else "<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if template == "llama3":
        tok.chat_template = LLAMA3_TEMPLATE
        tok.eos_token = "<|eot_id|>"
    elif template == "chatml":
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int = 400, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, vocab_size: int = 400, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **overrides))
    return model.eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 400, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**kwargs)).eval()


def tiny_causal_lm(architecture: str, seed: int = 0, vocab_size: int = 400, **overrides):
    """A tiny `{architecture}ForCausalLM` built from `{architecture}Config` (2 layers, width 64)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = getattr(transformers, f"{architecture}Config")(**{**kwargs, **overrides})
    return getattr(transformers, f"{architecture}ForCausalLM")(config).eval()


# GPT-NeoX stores its head as `embed_out`, which transformers 5 renames to `lm_head` on load.
tiny_gpt_neox = functools.partial(tiny_causal_lm, "GPTNeoX")
# Gemma 2 soft-caps its attention logits, so transformers runs it on eager attention, not SDPA.
tiny_gemma2 = functools.partial(tiny_causal_lm, "Gemma2", num_key_value_heads=2, head_dim=16)
# A mixture of experts whose experts are stored one by one and held fused (transformers 5).
tiny_qwen3_moe = functools.partial(
    tiny_causal_lm, "Qwen3Moe", num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4,
    num_experts_per_tok=2,
)  # fmt: skip


def tiny_llava(seed: int = 0, vocab_size: int = 400):
    """A tiny vision-language model: two stacks of numbered blocks, a CLIP vision tower's
    (`model.vision_tower.encoder.layers.<i>`) and a Llama's (`model.language_model.layers.<i>`),
    both with q/k/v_proj."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(vocab_size), image_token_index=vocab_size - 1)
    return LlavaForConditionalGeneration(config).eval()


def write_addition_data(path: Path, count: int, seed: int = 0) -> Path:
    """A learnable toy completion dataset ("3 plus 4 is" -> " 7") as JSONL, for training tests."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}) + "\n")
    return Path(path)


def training_workspace(root: Path, *, train: int, eval: int) -> Path:
    """`root` with a tiny model folder, `train` addition records in train.jsonl and `eval` others in eval.jsonl."""
    save_model_folder(root / "model")
    write_addition_data(root / "train.jsonl", train)
    write_addition_data(root / "eval.jsonl", eval, seed=1)
    return root


def save_model_folder(path: Path, model=None, tokenizer=None, *, max_shard_size: str | None = None) -> Path:
    """Write a Hugging Face model folder (config, safetensors, tokenizer) for CLI tests."""
    model = model if model is not None else tiny_llama()
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def splitmix_keep_mask(seed: int, numel: int, keep: float) -> torch.Tensor:
    """LoRA dropout's keep-mask as lorakit/csrc/dropout_cpu.cpp defines it, in plain Python: element
    i is kept when the low (even i) or high (odd i) 32 bits of SplitMix64's output i // 2 from
    `seed` are below floor(keep * 2^32)."""
    mask64, threshold = (1 << 64) - 1, int(keep * 2**32)
    kept = []
    for i in range(numel):
        z = (seed + (i // 2 + 1) * 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        z ^= z >> 31
        kept.append(((z >> 32) if i % 2 else (z & 0xFFFFFFFF)) < threshold)
    return torch.tensor(kept, dtype=torch.bool)


def dropout_way(monkeypatch, how: str) -> None:
    """Make the fused LoRA linear take one of its three ways to LoRA dropout on this CPU: "kernel"
    (the seeded compiled mask), "regenerate" (the GPUs' way: PyTorch's bernoulli from a seeded
    private generator, drawn again in backward) or "kept" (PyTorch's bernoulli mask, kept)."""
    from lorakit import fused

    monkeypatch.setattr(fused, "COMPILED_DROPOUT", how == "kernel")
    monkeypatch.setattr(fused, "_regenerates_mask", lambda device: how == "regenerate")


CHECKPOINTING_AND_NF4 = ("false", "full", "selective", "nf4")


def train_in_modes(tmp_path: Path, model_folder: Path, lora: dict, *, steps: int, lr: float, after=None) -> dict[str, list]:
    """Train `lorakit train` on the addition data without checkpointing, with full and selective
    checkpointing and with `quantize: nf4` (fp32 compute, seed 0); mode -> logged losses.
    `after(mode, output_dir)` runs after each run (to read what it printed or wrote)."""
    import yaml

    from lorakit.cli import main

    data = write_addition_data(tmp_path / "train.jsonl", 48)
    cfg = {
        "model": str(model_folder),
        "data": {"train": str(data), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, **lora},
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "precision": "fp32", "seed": 0, "log_every": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    losses = {}
    for mode in CHECKPOINTING_AND_NF4:
        out = tmp_path / f"out_{mode}"
        option = "quantize=nf4" if mode == "nf4" else f"train.gradient_checkpointing={mode}"
        assert main(["train", str(tmp_path / "cfg.yaml"), f"output_dir={out}", option]) == 0
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        if after is not None:
            after(mode, out)
    return losses


def crash_and_resume(monkeypatch, config: str, *overrides: str, crash_at: int) -> None:
    """`lorakit train CONFIG [KEY=VALUE ...]`, crashed (a RuntimeError in the loop) when step `crash_at`
    is done, then the same with `--resume` to the end: what a run that died and was restarted does."""
    import pytest

    from lorakit import train as train_module
    from lorakit.cli import main

    real_step = train_module.train_step

    def crashing(run):
        if run.step == crash_at:
            raise RuntimeError("simulated crash")
        return real_step(run)

    monkeypatch.setattr(train_module, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", config, *overrides])
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", config, *overrides, "--resume"]) == 0


def without_timing(entries: list[dict]) -> list[dict]:
    """metrics.jsonl entries without the fields that differ between identical runs (wall time)."""
    return [{k: v for k, v in e.items() if k not in ("tokens_per_s", "elapsed_s")} for e in entries]
