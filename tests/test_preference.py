"""DPO (lorakit.preference) and preference data: records -> pairs, pair batches, the per-token
fused loss, the DPO loss and gradients against a plain reference, and `lorakit train` end to end."""

import copy
import dataclasses
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import crash_and_resume, make_tokenizer, save_model_folder, tiny_gpt2, tiny_llama, without_timing
from safetensors.torch import load_file, save_file

from lorakit import fused
from lorakit.adapters import save_adapter
from lorakit.cli import main
from lorakit.config import DataConfig, LoraConfig, load_run_config
from lorakit.batching import BatchStream
from lorakit.data import load_dataset, load_train_eval, tokenize_records
from lorakit.errors import UserError
from lorakit.inject import disable_adapters, inject_adapter, lora_layers, set_active_adapter
from lorakit.loss import LOSS_CHUNK_TOKENS
from lorakit.preference import (
    REFERENCE_ADAPTER, PreferenceLoss, disable_dropout, pair_loss, precompute_reference_logps, sequence_logps,
)
from lorakit.train import _dropped

IGNORE = -100


def build(records, tok=None, **cfg):
    tok = tok if tok is not None else make_tokenizer("llama3")
    return tokenize_records(list(enumerate(records, start=1)), tok, DataConfig(**cfg), source="p.jsonl")


def addition_pairs(count, seed=0):
    """The sum preferred over a wrong sum or over a refusal (which a tiny model learns to avoid fast)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rejected = " I do not know" if i % 2 else f" {a + b + rng.choice([-3, -2, -1, 1, 2, 3])}"
        out.append({"prompt": f"{a} plus {b} is", "chosen": f" {a + b}", "rejected": rejected})
    return out


# --------------------------------------------------------------------------- data
def test_string_pairs_are_two_completion_examples_with_the_answers_trained():
    tok = make_tokenizer("llama3")
    record = {"prompt": "Say hello:", "chosen": " hello there", "rejected": " no"}
    ds = build([record, {**record, "rejected": " go away now"}], tok)
    assert ds.pairs and len(ds) == 4 and ds.num_units() == 2 and ds.stats.pairs == 2
    completion = build([{"prompt": "Say hello:", "completion": " hello there"}, {"prompt": "Say hello:", "completion": " no"}], tok)
    for i in range(2):  # the same ids and labels as the completion format gives prompt + answer
        for got, want in zip(ds.example(i), completion.example(i)):
            assert got.tolist() == want.tolist()
    ids, labels = ds.example(1)
    prompt_len = len(tok("Say hello:")["input_ids"])
    assert (labels[:prompt_len] == IGNORE).all() and (labels[prompt_len:] == ids[prompt_len:]).all()


def test_chat_pairs_train_only_the_answer_not_the_prompts_assistant_turns():
    tok = make_tokenizer("llama3")
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add 2 and 3"}]
    ds = build([{"prompt": prompt, "chosen": "It is 5", "rejected": [{"role": "assistant", "content": "It is 6"}]}], tok)
    for i, answer in enumerate(["It is 5", "It is 6"]):
        ids, labels = ds.example(i)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True)["input_ids"]
        prefix = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ids.tolist() == full
        expected = [IGNORE] * len(prefix) + full[len(prefix) :]  # the answer and its <|eot_id|>
        assert labels.tolist() == expected
        assert tok.decode(ids[len(prefix) :]) == f"{answer}<|eot_id|>"


def test_whole_conversations_share_their_first_turns_as_the_prompt():
    # TRL's "implicit prompt": no prompt key, the answers are whole conversations
    user = {"role": "user", "content": "Add 2 and 3"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "5"}], "rejected": [user, {"role": "assistant", "content": "6"}]}
    explicit = {"prompt": [user], "chosen": "5", "rejected": "6"}
    # UltraFeedback's layout: a string prompt, and answers that are whole conversations repeating it
    ultrafeedback = {"prompt": "Add 2 and 3", **implicit}
    # a string prompt before chat answers: the user's turn
    user_turn = {"prompt": "Add 2 and 3", "chosen": [implicit["chosen"][1]], "rejected": [implicit["rejected"][1]]}
    # whole conversations that open with a system turn: the shared turns hold the user's, so they are the prompt
    system = {"role": "system", "content": "Be brief."}
    with_system = {"prompt": "Add 2 and 3", "chosen": [system, *implicit["chosen"]], "rejected": [system, *implicit["rejected"]]}
    assert build([with_system]).input_ids.tolist() == build([{"prompt": [system, user], "chosen": "5", "rejected": "6"}]).input_ids.tolist()
    a, b = build([implicit, ultrafeedback, user_turn]), build([explicit] * 3)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels) and a.pairs
    with pytest.raises(UserError, match=r"p.jsonl:1: 'prompt' is missing; give it, or give 'chosen' and 'rejected' as whole"):
        build([{"chosen": " a", "rejected": " b"}])
    with pytest.raises(UserError, match=r"p.jsonl:1: 'chosen' and 'rejected' are the same conversation"):
        build([{"chosen": implicit["chosen"], "rejected": implicit["chosen"]}])


def test_the_prompts_assistant_turns_are_not_located_so_a_template_may_rewrite_them():
    # Qwen3 drops the think block of assistant turns before the last user turn: a prompt's earlier
    # turn is then not in the render as written, which does not matter, it is not trained
    from test_data import QWEN3_LIKE, _trained_groups

    template = QWEN3_LIKE.replace(
        "{%- else %}{{- '<|im_start|>assistant\n' + m.content + '<|im_end|>\n' }}",
        "{%- else %}{{- '<|im_start|>assistant\n' + m.content.split('</think>')[-1].lstrip('\n') + '<|im_end|>\n' }}",
    )
    assert template != QWEN3_LIKE
    tok = make_tokenizer(template=None)
    tok.chat_template, tok.eos_token = template, "<|im_end|>"
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello."},
              {"role": "user", "content": "2+2?"}]  # fmt: skip
    ds = build([{"prompt": prompt, "chosen": "Four.", "rejected": "Five."}], tok)
    assert [_trained_groups(tok, ds.example(i)[1]) for i in range(2)] == [
        ["<think>\n\n</think>\n\nFour.<|im_end|>"], ["<think>\n\n</think>\n\nFive.<|im_end|>"]
    ]


def test_a_pair_is_dropped_whole_and_invalid_records_are_reported_by_line():
    long = " ".join(["word"] * 40)
    records = [
        {"prompt": "a", "chosen": " b", "rejected": long},  # rejected too long
        {"prompt": "c", "chosen": " d", "rejected": " e"},
        {"prompt": "f", "chosen": 3, "rejected": " g"},  # invalid
    ]
    ds = build(records, max_length=16, too_long="drop", skip_invalid=True)
    assert ds.stats.pairs == 1 and len(ds) == 2 and ds.stats.dropped_too_long == 2
    assert ds.stats.skipped_invalid == 1 and ds.stats.skipped_lines == [3]
    # the start summary's words, with why
    assert _dropped(dataclasses.asdict(ds.stats)) == "truncated 0 answers, dropped 1 pair (2 answers longer than max_length)"
    with pytest.raises(UserError, match=r"p.jsonl:3: 'chosen' must be a string, got a number"):
        build(records, max_length=16, too_long="drop")
    with pytest.raises(UserError, match=r"p.jsonl:2: a completion record in a file of preference records"):
        build([records[1], {"prompt": "x", "completion": " y"}])
    with pytest.raises(UserError, match=r"'rejected' ends with a user turn"):
        build([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "user", "content": "b"}]}])
    with pytest.raises(UserError, match=r"p.jsonl:1: not a preference record: keys \['completion', 'prompt'\]; a pair needs"):
        build([{"prompt": "x", "completion": " y"}], format="preference")


def test_a_record_with_chat_messages_and_a_pair_is_chat_unless_pairs_are_asked_for():
    # UltraFeedback's layout: its SFT split trains on `messages`, its preference split on the pair
    user = {"role": "user", "content": "Add 2 and 3"}
    record = {"prompt": "Add 2 and 3", "messages": [user, {"role": "assistant", "content": "5"}],
              "chosen": [user, {"role": "assistant", "content": "5"}], "rejected": [user, {"role": "assistant", "content": "6"}]}  # fmt: skip
    chat = build([record])
    assert not chat.pairs and len(chat) == 1
    assert np.array_equal(chat.input_ids, build([{"messages": record["messages"]}]).input_ids)
    pairs = build([record], format="preference")
    assert pairs.pairs and np.array_equal(pairs.input_ids, build([{k: record[k] for k in ("chosen", "rejected")}]).input_ids)


def test_invalid_records_are_counted_one_each_when_they_share_a_line():
    # a JSON list written on one line: every record reports line 1
    bad = {"prompt": "f", "chosen": 3, "rejected": " g"}
    good = {"prompt": "c", "chosen": " d", "rejected": " e"}
    ds = tokenize_records([(1, bad), (1, good), (1, bad), (1, bad)], make_tokenizer("llama3"), DataConfig(skip_invalid=True), source="p")
    assert ds.stats.skipped_invalid == 3 and ds.stats.pairs == 1


def test_held_out_pairs_stay_whole_and_the_cache_keeps_pairs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in addition_pairs(20)))
    tok = make_tokenizer("llama3")
    cfg = DataConfig(train=str(path), eval_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    train, sets = load_train_eval(cfg, tok, seed=0)
    held = sets[""]
    assert (train.num_units(), held.num_units()) == (15, 5) and train.pairs and held.pairs
    for ds in (train, held):  # every pair is one prompt answered twice
        for j in range(ds.num_units()):
            a, b = ds.example(2 * j)[0], ds.example(2 * j + 1)[0]
            assert tok.decode(a).split(" is")[0] == tok.decode(b).split(" is")[0]
    cached = load_dataset(path, tok, cfg)  # written by the first load, read back
    fresh = load_dataset(path, tok, cfg, use_cache=False)
    assert cached.pairs and np.array_equal(cached.input_ids, fresh.input_ids) and cached.stats == fresh.stats


def test_pair_batches_keep_both_answers_in_one_row():
    ds = build(addition_pairs(12), max_length=16)
    for packing in (False, True):
        stream = BatchStream(ds, batch_size=2, max_length=16, packing=packing, seed=0)
        seen, examples = [], []
        for _ in range(stream.microbatches_per_epoch()):
            batch = stream.next()
            seq, pos = batch["sequence_ids"], batch["position_ids"]
            n = int(seq.max()) + 1
            assert n == 2 * batch["num_pairs"] and batch["input_ids"].shape[1] <= 32
            for s in range(n):
                rows = (seq == s).any(dim=1).nonzero().flatten().tolist()
                assert len(rows) == 1  # a sequence sits in one row, and its pair beside it
                assert rows == (seq == (s ^ 1)).any(dim=1).nonzero().flatten().tolist()
                assert pos[seq == s].tolist() == list(range(int((seq == s).sum())))
                # example_ids name the dataset's example each sequence is: its tokens, chosen before rejected
                e = int(batch["example_ids"][s])
                assert batch["input_ids"][seq == s].tolist() == ds.example(e)[0].tolist() and e % 2 == s % 2
            seen.append(n // 2)
            examples += batch["example_ids"].tolist()
        assert sum(seen) == 12  # one epoch: every pair once
        assert sorted(examples) == list(range(24))
    single = BatchStream(ds, batch_size=1, max_length=16, packing=False, seed=0)
    assert single.num_rows == 12 and single.next()["num_pairs"] == 1


def test_padding_positions_stay_within_an_examples_length():
    # a row of pairs is up to 2 x max_length long; a model's table of positions (GPT-2) is not
    ds = build([{"prompt": "1 plus 1 is", "chosen": " 2", "rejected": " " + " ".join(["three"] * 20)}] +
               [{"prompt": "2", "chosen": " 4", "rejected": " 5"}] * 3, max_length=24)  # fmt: skip
    batch = BatchStream(ds, batch_size=4, max_length=24, packing=False, seed=0).next()
    assert batch["input_ids"].shape[1] > 24 and int(batch["position_ids"].max()) < 24


# --------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_per_token_fused_cross_entropy_and_its_gradient(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (21,))
    targets[[2, 9]] = IGNORE
    got = fused.linear_cross_entropy_rows(hidden, weight, targets, chunk=8, softcap=softcap)
    upstream = torch.randn(21, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), hidden)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    (g_want,) = torch.autograd.grad((want * upstream).sum(), hidden)
    assert got.dtype == torch.float32 and got[[2, 9]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)  # the softmax runs in fp32


def _adapted(model, seed=1):
    """LoRA on every linear layer with B non-zero, so the policy differs from the reference."""
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for name, b in layer.lora_B.items():
            b.data.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def _answer_logp(model, ids, labels):
    """(summed log-probability, mean log-probability) of an answer: a plain full-logit forward of
    one sequence (no packing, no fused head)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    mask = targets != IGNORE
    total = -F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    return total, total / mask.sum()


def _batch_pairs(batch):
    """The batch's pairs, in its order: [((ids, labels) of sequence 2p, (ids, labels) of 2p+1)]."""
    seq = batch["sequence_ids"]
    return [[(batch["input_ids"][seq == s].tolist(), batch["labels"][seq == s].tolist()) for s in (2 * p, 2 * p + 1)]
            for p in range(batch["num_pairs"])]  # fmt: skip


def _reference_loss(objective, policy, reference, pairs, beta, gamma=0.0):
    """The objective's summed loss from plain full-logit forwards, one sequence at a time (no
    packing, no fused head), written out from the papers' formulas."""
    logp = _answer_logp
    losses = []
    for chosen, rejected in pairs:
        (pc, ac), (pr, ar) = logp(policy, *chosen), logp(policy, *rejected)
        with torch.no_grad():
            (rc, rac), (rr, rar) = logp(reference, *chosen), logp(reference, *rejected)
        if objective == "dpo":
            losses.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
        elif objective == "ipo":
            losses.append(((ac - rac) - (ar - rar) - 1 / (2 * beta)) ** 2)
        elif objective == "simpo":
            losses.append(-F.logsigmoid(beta * ac - beta * ar - gamma))
        else:  # orpo: the chosen answer's mean NLL plus the odds-ratio term
            odds = lambda a: torch.log(a.exp() / (1 - a.exp()))  # noqa: E731
            losses.append(-ac - beta * F.logsigmoid(odds(ac) - odds(ar)))
    return torch.stack(losses).sum()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, "full", "selective"])
def test_dpo_loss_and_gradients_match_a_plain_reference(make_model, checkpointing):
    tok = make_tokenizer("llama3")
    ds = build(addition_pairs(6) + [{"prompt": "7 plus 1 is", "chosen": " 8, I think", "rejected": " 9"}], tok, max_length=24)
    base = make_model()
    disable_dropout(base)
    reference = copy.deepcopy(base).eval()  # the adapter-free model DPO compares against
    model = _adapted(base)
    plain = copy.deepcopy(model)
    if checkpointing:
        from lorakit import activation_checkpointing

        activation_checkpointing.enable(model, checkpointing)
    model.train()
    stream = BatchStream(ds, batch_size=3, max_length=24, packing=True, seed=0)
    batch = stream.next()
    beta = 0.3
    loss, stats = PreferenceLoss(model, LOSS_CHUNK_TOKENS, "dpo", beta)(
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["sequence_ids"]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)

    # the same pairs, in the batch's order, one sequence at a time through the plain model
    pairs = _batch_pairs(batch)
    want_loss = _reference_loss("dpo", plain, reference, pairs, beta)
    want = torch.autograd.grad(want_loss, [p for p in plain.parameters() if p.requires_grad])
    assert stats[0].item() == batch["num_pairs"] >= 3
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in got) > 1e-4  # the gradients are not all zero


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_the_reference_is_the_adapter_training_continues_when_the_model_holds_it(objective):
    tok = make_tokenizer("llama3")
    ds = build(addition_pairs(6), tok, max_length=24)
    base = tiny_llama()
    disable_dropout(base)
    model = _adapted(base)  # the adapter training continues (an SFT adapter, say), B non-zero
    reference = copy.deepcopy(model).eval()  # a separate model holding it
    inject_adapter(model, LoraConfig(r=4, alpha=8, targets="all-linear"), name=REFERENCE_ADAPTER)
    for _, layer in lora_layers(model):
        layer.lora_A[REFERENCE_ADAPTER].data.copy_(layer.lora_A["default"])
        layer.lora_B[REFERENCE_ADAPTER].data.copy_(layer.lora_B["default"])
    set_active_adapter(model, "default")
    model.train()
    batch = BatchStream(ds, batch_size=3, max_length=24, packing=True, seed=0).next()
    inputs = [batch[k] for k in ("input_ids", "labels", "position_ids", "sequence_ids")]
    loss_fn = PreferenceLoss(model, LOSS_CHUNK_TOKENS, objective, 0.3)
    # the policy starts as its reference: every margin is 0, so DPO's loss is ln 2 a pair, IPO's (1 / (2 beta))^2
    loss, stats = loss_fn(*inputs)
    first = math.log(2) if objective == "dpo" else (1 / 0.6) ** 2
    assert abs(loss.item() - first * batch["num_pairs"]) < 1e-4 and stats[1] == stats[2] == 0
    # trained on: the loss and every gradient of the trained adapter against the frozen one
    gen = torch.Generator().manual_seed(7)
    for _, layer in lora_layers(model):
        layer.lora_B["default"].data.add_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.05)
    plain = copy.deepcopy(model)
    loss, _ = loss_fn(*inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * sum(1 for _ in lora_layers(model))  # the reference adapter stays frozen
    got = torch.autograd.grad(loss, params)
    want_loss = _reference_loss(objective, plain, reference, _batch_pairs(batch), 0.3)
    want = torch.autograd.grad(want_loss, [p for p in plain.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert all(layer.active_adapter == "default" for _, layer in lora_layers(model))  # switched back


@pytest.mark.parametrize("objective,beta", [("ipo", 0.4), ("simpo", 2.0), ("orpo", 0.3)])
def test_ipo_simpo_orpo_losses_and_gradients_match_their_formulas(objective, beta):
    tok = make_tokenizer("llama3")
    ds = build(addition_pairs(6), tok, max_length=24)
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    model = _adapted(base).train()
    plain = copy.deepcopy(model)
    batch = BatchStream(ds, batch_size=3, max_length=24, packing=True, seed=0).next()
    loss, stats = PreferenceLoss(model, LOSS_CHUNK_TOKENS, objective, beta, gamma=0.7)(
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["sequence_ids"]
    )
    got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    want_loss = _reference_loss(objective, plain, reference, _batch_pairs(batch), beta, gamma=0.7)
    want = torch.autograd.grad(want_loss, [p for p in plain.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert stats[0] == batch["num_pairs"] and max(g.abs().max().item() for g in got) > 1e-4


def unpaired_records(count, seed=0):
    """KTO's labelled examples: each addition pair's answers, the sum desirable, shuffled."""
    out = []
    for r in addition_pairs(count, seed):
        out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]  # fmt: skip
    random.Random(seed).shuffle(out)
    return out


def test_labelled_records_pair_each_example_with_the_previous_ones_completion(tmp_path):
    tok = make_tokenizer("llama3")
    chat_prompt = [{"role": "user", "content": "Add 2 and 3"}]
    records = [
        {"prompt": "1 plus 1 is", "completion": " 2", "label": True},
        {"prompt": "2 plus 2 is", "completion": " 5", "label": False},
        {"prompt": "x", "completion": " y", "label": "yes"},  # invalid: skipped
        {"prompt": chat_prompt, "completion": "5", "label": True},
    ]
    ds = build(records, tok, format="unpaired", max_length=32, skip_invalid=True)
    assert ds.pairs and ds.desirable.tolist() == [True, False, True] and ds.stats.skipped_invalid == 1
    # example j, then its KL example: its prompt with the completion of the example before (the first: the last's)
    want = [("1 plus 1 is", " 2"), ("1 plus 1 is", "5"), ("2 plus 2 is", " 5"), ("2 plus 2 is", " 2")]
    for i, (prompt, completion) in enumerate(want):
        ref = build([{"prompt": prompt, "completion": completion}], tok, max_length=32)
        assert np.array_equal(ds.example(i)[0], ref.example(0)[0]) and np.array_equal(ds.example(i)[1], ref.example(0)[1])
    chat = build([{"prompt": chat_prompt, "chosen": "5", "rejected": " 5"}], tok, max_length=32)
    assert np.array_equal(ds.example(4)[0], chat.example(0)[0]) and np.array_equal(ds.example(5)[0], chat.example(1)[0])
    with pytest.raises(UserError, match=r"p.jsonl:3: 'label' must be true \(a desirable completion\) or false .* got a string"):
        build(records, tok, format="unpaired", max_length=32)
    # labels as 1 / 0 or strings (a CSV's cells) read as bools; a too-long completion drops its own
    # example only: the next one's KL example, which borrows it, is cut instead
    loose = [{"prompt": "1 plus 1 is", "completion": " 2", "label": 1}, {"prompt": "2 plus 2 is", "completion": " 4", "label": "False"},
             {"prompt": "3 plus 3 is", "completion": " 6" * 20, "label": "true"}, {"prompt": "4 plus 4 is", "completion": " 8", "label": 0}]  # fmt: skip
    kept = build(loose, tok, format="unpaired", max_length=16, too_long="drop")
    assert kept.desirable.tolist() == [True, False, False] and kept.stats.dropped_too_long == 2 and kept.stats.truncated == 1
    assert tok.decode(kept.example(5)[0]).startswith("4 plus 4 is 6 6 6")  # record 4's KL example: record 3's completion, cut
    with pytest.raises(UserError, match=r"1 valid labelled record; KTO pairs each example with another one's completion"):
        build(records[:1], tok, format="unpaired", max_length=32)
    with pytest.raises(UserError, match=r"p.jsonl:1: data.format is 'unpaired' but the record has keys \['completion', 'prompt'\]"):
        build([{"prompt": "a", "completion": " b"}] * 2, tok, format="unpaired")
    # the labels follow held-out splits, the cache and batches
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unpaired_records(20)))
    cfg = DataConfig(train=str(path), format="unpaired", max_length=16, eval_fraction=0.25, cache_dir=str(tmp_path / "c"))
    train, sets = load_train_eval(cfg, tok, seed=0)
    held = sets[""]
    again, _ = load_train_eval(cfg, tok, seed=0)  # from the cache
    full = load_dataset(path, tok, cfg, use_cache=False)
    assert (train.num_units(), held.num_units()) == (30, 10) and np.array_equal(again.desirable, train.desirable)
    assert sorted(train.desirable.tolist() + held.desirable.tolist()) == sorted(full.desirable.tolist())
    assert train.stats.desirable == int(train.desirable.sum())
    batch = BatchStream(train, batch_size=4, max_length=16, packing=True, seed=0).next()
    for p, label in enumerate(batch["desirable"].tolist()):
        ids = batch["input_ids"][batch["sequence_ids"] == 2 * p].tolist()
        j = next(j for j in range(train.num_units()) if train.example(2 * j)[0].tolist() == ids)
        assert label == bool(train.desirable[j])


# adapter seed 1 moves the KL examples' log-probabilities down (z0 clamped at 0), seed 4 up
@pytest.mark.parametrize("weights,seed", [((1.0, 1.0), 1), ((1.5, 0.7), 4)])
def test_kto_loss_and_gradients_match_the_formula(weights, seed):
    tok = make_tokenizer("llama3")
    ds = build(unpaired_records(4), tok, format="unpaired", max_length=24)
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    model = _adapted(base, seed=seed).train()
    plain = copy.deepcopy(model)
    batch = BatchStream(ds, batch_size=3, max_length=24, packing=True, seed=0).next()
    beta = 0.3
    loss, stats = PreferenceLoss(model, LOSS_CHUNK_TOKENS, "kto", beta, kto_weights=weights)(
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["sequence_ids"], batch["desirable"]
    )
    got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    # written out: z0 = the mean of log pi - log ref over the KL examples (no gradient), clamped at 0
    ratios, kl = [], []
    for example, kl_example in _batch_pairs(batch):
        with torch.no_grad():
            kl.append(_answer_logp(plain, *kl_example)[0] - _answer_logp(reference, *kl_example)[0])
            ref = _answer_logp(reference, *example)[0]
        ratios.append(_answer_logp(plain, *example)[0] - ref)
    z0 = torch.stack(kl).mean().clamp(min=0)
    want_loss = sum(
        weights[0] * (1 - torch.sigmoid(beta * (r - z0))) if good else weights[1] * (1 - torch.sigmoid(beta * (z0 - r)))
        for r, good in zip(ratios, batch["desirable"].tolist())
    )
    want = torch.autograd.grad(want_loss, [p for p in plain.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    n = batch["num_pairs"]
    assert stats[0] == n >= 3 and stats[4] + stats[5] == n and stats[4] == batch["desirable"].sum()
    assert abs(stats[6].item() / n - z0.item()) < 1e-5 and (z0 > 0) == (seed == 4)
    assert max(g.abs().max().item() for g in got) > 1e-4


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_logps_are_the_on_the_fly_ones_of_the_same_sequences(objective):
    tok = make_tokenizer("llama3")
    kto = objective == "kto"
    ds = build(unpaired_records(12) if kto else addition_pairs(24), tok, format="unpaired" if kto else "auto", max_length=16)
    model = _adapted(tiny_llama()).train()
    loss = PreferenceLoss(model, LOSS_CHUNK_TOKENS, objective, 0.1)
    stream = BatchStream(ds, batch_size=3, max_length=16, packing=True, seed=0)
    table = precompute_reference_logps(loss, stream, torch.device("cpu"))
    # one per example of the dataset (KTO: each example and its KL example), the base's (adapter off)
    assert table.shape == (len(ds),) == (48,) and table.dtype == torch.float32 and (table < 0).all()
    with torch.no_grad(), disable_adapters(model):
        plain = torch.stack([_answer_logp(model, *(a.tolist() for a in ds.example(e)))[0] for e in range(len(ds))])
    torch.testing.assert_close(table, plain, rtol=1e-6, atol=1e-5)
    # the training stream's micro-batches over two epochs (other rows, other order): the on-the-fly
    # reference of each sequence is the table's entry up to float32 rounding, and so is the loss
    for _ in range(2 * stream.microbatches_per_epoch()):
        batch = stream.next()
        inputs = [batch[k] for k in ("input_ids", "labels", "position_ids", "sequence_ids")]
        desirable = batch.get("desirable")
        kw = dict(chunk_tokens=LOSS_CHUNK_TOKENS, count=len(batch["example_ids"]))
        on_the_fly = loss._reference_logps(dict(zip(("input_ids", "labels", "position_ids", "sequence_ids"), inputs)), kw)
        looked_up = table[batch["example_ids"]]
        torch.testing.assert_close(looked_up, on_the_fly, rtol=1e-6, atol=2e-6)
        want, want_stats = loss(*inputs, desirable)
        got, got_stats = loss(*inputs, desirable, reference=looked_up)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_stats, want_stats, rtol=1e-5, atol=1e-6)


def test_kto_eval_takes_z0_over_the_whole_set_whatever_the_batch_size():
    from lorakit.preference import evaluate_preference

    tok = make_tokenizer("llama3")
    ds = build(unpaired_records(6), tok, format="unpaired", max_length=24)
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    model = _adapted(base, seed=4)  # moves the KL examples up: z0 > 0
    got = [evaluate_preference(model, ds, objective="kto", beta=0.3, batch_size=b, max_length=24) for b in (2, 5, 12)]
    ratios, kl = [], []
    with torch.no_grad():
        for j in range(ds.num_units()):
            example, kl_example = ([x.tolist() for x in ds.example(2 * j + side)] for side in (0, 1))
            ratios.append(_answer_logp(model, *example)[0] - _answer_logp(reference, *example)[0])
            kl.append(_answer_logp(model, *kl_example)[0] - _answer_logp(reference, *kl_example)[0])
    z0 = torch.stack(kl).mean().clamp(min=0)
    want = sum(1 - torch.sigmoid(0.3 * (r - z0)) if good else 1 - torch.sigmoid(0.3 * (z0 - r))
               for r, good in zip(ratios, ds.desirable.tolist())) / ds.num_units()  # fmt: skip
    assert z0 > 0
    for result in got:
        assert abs(result["loss"] - want.item()) < 1e-5 and abs(result["kl"] - z0.item()) < 1e-5


def test_kto_metrics_leave_out_a_class_with_no_example():
    from lorakit.preference import STAT_NAMES, step_metrics

    stats = dict.fromkeys(STAT_NAMES, 0.0) | {"pairs": 4, "chosen_reward": 0.8, "right": 3, "chosen": 4, "kl": 0.4}
    got = step_metrics(2.0, torch.tensor(list(stats.values()), dtype=torch.float64), kto=True)
    assert got == {"loss": 0.5, "reward_accuracy": 0.75, "chosen_reward": 0.2, "kl": 0.1}


def test_the_models_dropout_is_off_and_lora_dropout_stays():
    from helpers import tiny_causal_lm

    llama = tiny_llama()
    inject_adapter(llama, LoraConfig(r=4, alpha=8, dropout=0.1))
    assert disable_dropout(llama) == 0
    assert all(layer.lora_dropout["default"].p == 0.1 for _, layer in lora_layers(llama))
    # GPT-2's nn.Dropout modules, OPT's F.dropout with float attributes (read from its config)
    for model in (tiny_gpt2(), tiny_causal_lm("OPT")):
        assert disable_dropout(model) > 0
        model.train()
        ids = torch.randint(0, 400, (2, 12))
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sequence_logps_sum_each_answers_tokens():
    tok = make_tokenizer("llama3")
    ds = build(addition_pairs(3), tok, max_length=16)
    model = tiny_llama().eval()
    batch = BatchStream(ds, batch_size=3, max_length=16, packing=True, seed=0).next()
    with torch.no_grad():
        got, tokens = sequence_logps(model, batch, chunk_tokens=LOSS_CHUNK_TOKENS)
        for s in range(len(got)):
            mask = batch["sequence_ids"] == s
            ids, labels = batch["input_ids"][mask], batch["labels"][mask]
            logp = model(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)
            targets = labels[1:]
            want = logp[targets != IGNORE].gather(1, targets[targets != IGNORE, None]).sum()
            assert abs(got[s].item() - want.item()) < 1e-5 and tokens[s] == (targets != IGNORE).sum()
    losses, rewards = pair_loss("dpo", got, torch.ones_like(got), got, beta=0.1)  # against itself: every z is 0
    assert torch.allclose(losses, torch.full_like(losses, math.log(2))) and not rewards.any()


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    save_model_folder(root / "model")
    for name, (count, seed) in {"train": (96, 0), "eval": (16, 1)}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_pairs(count, seed)))
    return root


def _config(root, out, **train):
    cfg = {
        "model": str(root / "model"),
        "output_dir": str(out),
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 16},
        "lora": {"r": 4, "alpha": 8},
        "train": {"objective": "dpo", "beta": 0.1, "max_steps": 12, "batch_size": 4, "lr": 1e-2, "precision": "fp32",
                  "seed": 0, "warmup_steps": 1, **train},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _entries(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_training_starts_at_ln2_and_learns_the_preference(workspace, capsys):
    out = workspace / "run"
    assert main(["train", _config(workspace, out, max_steps=30), "train.eval_every=15"]) == 0
    printed = capsys.readouterr().out
    assert "objective    DPO, beta 0.1" in printed and "96 pairs (192 answers)" in printed
    assert "truncated 48 answers, dropped 0 pairs" in printed
    train = [e for e in _entries(out) if "loss" in e]
    evals = [e for e in _entries(out) if "eval_loss" in e]
    # the policy starts as the reference (B = 0): z = 0 for every pair
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[0]["reward_margin"] == 0.0
    assert train[0]["reward_accuracy"] == 0.0  # no pair is right while the rewards tie
    late = train[-10:]
    assert sum(e["loss"] for e in late) / 10 < 0.6 and sum(e["reward_accuracy"] for e in late) / 10 > 0.6
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2) and evals[-1]["eval_reward_accuracy"] >= 0.75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_accuracy"] == evals[-1]["eval_reward_accuracy"]
    assert "eval loss 0." in printed and "reward accuracy" in printed and "DPO, beta 0.1" in (out / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
def test_ipo_simpo_orpo_train_end_to_end(workspace, objective, capsys):
    out = workspace / f"run_{objective}"
    assert main(["train", _config(workspace, out, max_steps=30, objective=objective)]) == 0
    printed = capsys.readouterr().out
    reference = "the base (adapter off)" if objective == "ipo" else "no reference model"
    assert f"objective    {objective.upper()}, beta " in printed and reference in printed
    train = [e for e in _entries(out) if "loss" in e]
    evals = [e for e in _entries(out) if "eval_loss" in e]
    if objective == "ipo":  # the policy starts as the reference: (0 - 1 / (2 beta))^2 with beta 0.1
        assert train[0]["loss"] == 25.0 and train[0]["reward_margin"] == 0.0
    assert sum(e["loss"] for e in train[-10:]) / 10 < train[0]["loss"]
    assert evals[-1]["eval_reward_accuracy"] >= 0.6


def test_kto_trains_on_labelled_examples_resumes_and_evaluates_as_the_trainer(workspace, monkeypatch, capsys):
    for name, (count, seed) in {"kto_train": (96, 0), "kto_eval": (16, 1)}.items():
        (workspace / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_records(count, seed)))
    data = [f"data.train={workspace / 'kto_train.jsonl'}", f"data.eval={workspace / 'kto_eval.jsonl'}"]
    out = workspace / "kto"
    config = _config(workspace, out, objective="kto", max_steps=30, batch_size=8, eval_every=15, save_every=10)
    assert main(["train", config, *data]) == 0
    printed = capsys.readouterr().out
    assert "objective    KTO, beta 0.1, weights 1.0 (desirable) / 1.0 (undesirable); reference: the base" in printed
    assert "192 labelled examples (96 desirable, 96 undesirable; each with its KL example)" in printed
    train = [e for e in _entries(out) if "loss" in e]
    evals = [e for e in _entries(out) if "eval_loss" in e]
    # the policy starts as the reference: every ratio and z0 are 0, so each loss is 1 - sigmoid(0)
    assert train[0]["loss"] == 0.5 and train[0]["kl"] == 0.0 and train[0]["reward_margin"] == 0.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.5 and evals[-1]["eval_reward_margin"] > 0
    assert sum(e["loss"] for e in train[-10:]) / 10 < 0.49
    crashed = workspace / "kto_crashed"
    crash_and_resume(monkeypatch, _config(workspace, crashed, objective="kto", max_steps=30, batch_size=8, eval_every=15,
                                          save_every=10), *data, crash_at=17)  # fmt: skip
    assert without_timing(_entries(crashed)) == without_timing(_entries(out))
    # lorakit eval reads the file as labelled examples and gives the trainer's eval
    capsys.readouterr()
    args = ["eval", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"), "--data",
            str(workspace / "kto_eval.jsonl"), "--max-length", "16", "--batch-size", "8", "--objective", "kto", "--json"]  # fmt: skip
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["examples"] == 32 and abs(got["loss"] - evals[-1]["eval_loss"]) < 1e-5
    assert abs(got["kl"] - evals[-1]["eval_kl"]) < 1e-5
    # z0 is the whole eval set's: another eval batch size gives the same numbers; and labelled
    # records are read as KTO's without --objective
    assert main([*args[:-3], "--batch-size", "3", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["objective"] == "kto" and abs(again["loss"] - got["loss"]) < 1e-6 and abs(again["kl"] - got["kl"]) < 1e-6
    assert main([*args, "--kto-desirable-weight", "-1"]) == 2
    assert "KTO's weights must be > 0" in capsys.readouterr().err
    # labelled records under sft are refused: their undesirable completions would be trained
    assert main(["train", _config(workspace, workspace / "kto_sft", objective="sft"), *data]) == 2
    assert "holds labelled records (prompt, completion, label); set train.objective: kto" in capsys.readouterr().err
    # KTO's margin needs both classes in the eval set: watching it on a one-class set is refused early
    good = [r for r in unpaired_records(8, seed=1) if r["label"]]
    (workspace / "kto_eval_good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    watched = _config(workspace, workspace / "kto_margin", objective="kto", eval_every=5, save_best=True,
                      best_metric="eval_reward_margin")  # fmt: skip
    assert main(["train", watched, data[0], f"data.eval={workspace / 'kto_eval_good.jsonl'}"]) == 2
    assert ("train.best_metric = 'eval_reward_margin': the eval set has no undesirable example, so KTO's margin is "
            "undefined") in capsys.readouterr().err  # fmt: skip
    # pairs under kto are refused with what kto needs
    assert main(["train", _config(workspace, workspace / "kto_bad", objective="kto"), "data.eval=null"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: data.format is 'unpaired' but the record has keys ['chosen', 'prompt', 'rejected']" in err
    assert "it needs prompt + completion + label" in err


def test_dpo_keeps_the_adapter_of_the_best_reward_accuracy(workspace):
    out = workspace / "best"
    assert main(["train", _config(workspace, out, eval_every=3, save_every=3, keep_checkpoints=4, save_best=True,
                                  best_metric="eval_reward_accuracy")]) == 0  # fmt: skip
    evals = [e for e in _entries(out) if "eval_loss" in e]
    best = max(evals, key=lambda e: e["eval_reward_accuracy"])  # the first of equals: a tie is no better
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == best["step"] and summary["best_eval_reward_accuracy"] == best["eval_reward_accuracy"]
    source = out / "adapter" if best["step"] == 12 else out / "checkpoints" / f"step-{best['step']}" / "adapter"
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "best_adapter", source))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_resume_is_bit_identical(workspace, monkeypatch, capsys):
    full, crashed = workspace / "full", workspace / "crashed"
    assert main(["train", _config(workspace, full, save_every=4, max_steps=8)]) == 0
    crash_and_resume(monkeypatch, _config(workspace, crashed, save_every=4, max_steps=8), crash_at=6)
    assert (crashed / "checkpoints" / "step-4").is_dir()
    assert without_timing(_entries(crashed)) == without_timing(_entries(full))
    # another objective or beta is another run: the checkpoint at step 4 is not resumed with it
    capsys.readouterr()
    assert main(["train", _config(workspace, crashed, save_every=4, max_steps=8), "train.beta=0.2", "--resume"]) == 2
    assert "the objective (objective.beta) changed since it was written" in capsys.readouterr().err
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (full, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_precomputed_reference_trains_as_the_per_step_one_and_resumes_bit_identically(workspace, objective, monkeypatch, capsys):
    data = []
    if objective == "kto":
        for name, (count, seed) in {"kto_train": (96, 0), "kto_eval": (16, 1)}.items():
            (workspace / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_records(count, seed)))
        data = [f"data.train={workspace / 'kto_train.jsonl'}", f"data.eval={workspace / 'kto_eval.jsonl'}"]
    # 28 steps of 24 a pass over the data: the second epoch reads the table in another order
    options = dict(objective=objective, max_steps=28, batch_size=4 if objective == "dpo" else 8, eval_every=14, save_every=10)
    per_step, pre, crashed = (workspace / f"pre_{objective}_{name}" for name in ("off", "on", "crashed"))
    capsys.readouterr()
    assert main(["train", _config(workspace, per_step, **options), *data]) == 0
    assert "precomputed" not in capsys.readouterr().out
    assert main(["train", _config(workspace, pre, precompute_reference=True, **options), *data]) == 0
    printed = capsys.readouterr().out
    sequences = 192 if objective == "dpo" else 384  # every answer (KTO: every example and its KL example)
    assert f"precomputed the reference log-probabilities of {sequences} sequences in " in printed
    assert "note: train.precompute_reference" not in printed  # 28 steps: more than an epoch
    assert "reference: the base (adapter off), precomputed in one pass before the first step" in printed
    want, got = _entries(per_step), _entries(pre)
    assert [e["step"] for e in got] == [e["step"] for e in want]
    first = 0.5 if objective == "kto" else math.log(2)  # the policy starts as the reference, precomputed or not
    assert abs(got[0]["loss"] - first) < 1e-6
    # the same losses and rewards, every step, up to float32 rounding of the reference in other batches
    for a, b in zip(got, want):
        for key in ("loss", "eval_loss", "reward_margin", "eval_reward_margin", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (pre, per_step))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    # a resume recomputes the same table: bit-identical to the uninterrupted run
    crash_and_resume(monkeypatch, _config(workspace, crashed, precompute_reference=True, **options), *data, crash_at=17)
    assert without_timing(_entries(crashed)) == without_timing(got)
    c = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_resume_that_cannot_go_on_is_refused_before_the_reference_pass(workspace, capsys):
    out = workspace / "pre_resume_short"
    assert main(["train", _config(workspace, out, max_steps=4, save_every=3, precompute_reference=True), "data.eval=null"]) == 0
    printed = capsys.readouterr().out
    assert "precomputed the reference log-probabilities of 192 sequences in " in printed
    assert ("note: train.precompute_reference runs the reference over the whole training set, an epoch of 24 steps, and "
            "the 4 steps to go save less than that; it pays in runs of two epochs or more, so leave it off here\n") in printed
    # the checkpoint is at step 3, the run now 2 steps long: refused, and the pass (an epoch's
    # reference forwards on a real data set) not run first
    assert main(["train", _config(workspace, out, max_steps=2, save_every=3, precompute_reference=True), "data.eval=null",
                 "--resume"]) == 2  # fmt: skip
    printed = capsys.readouterr()
    assert f"--resume: the checkpoint {out / 'checkpoints' / 'step-3'} is at step 3, past this run's 2 steps" in printed.err
    assert "precomputed" not in printed.out
    # so is a resume with another batch_size x processes (the data stream would differ)
    assert main(["train", _config(workspace, out, max_steps=4, save_every=3, batch_size=8, precompute_reference=True),
                 "data.eval=null", "--resume"]) == 2  # fmt: skip
    printed = capsys.readouterr()
    assert ("cannot resume the data stream: batch_size x processes is 8 now but 4 in the checkpoint; resume with "
            "train.batch_size=4 for 1 process") in printed.err
    assert "precomputed" not in printed.out


def test_a_precomputed_reference_is_refused_without_a_reference(workspace, capsys):
    out = workspace / "pre_bad"
    for objective in ("sft", "simpo", "orpo"):
        assert main(["train", _config(workspace, out, objective=objective, precompute_reference=True)]) == 2
        assert (f"train.precompute_reference = true: train.objective: {objective} compares with no reference model; "
                "set it to false (it is for dpo, ipo, kto)") in capsys.readouterr().err  # fmt: skip
    assert not out.exists()  # refused before anything was written


def test_dpo_under_checkpointing_and_nf4_gives_the_plain_losses(workspace):
    losses = {}
    for mode in ("false", "full", "selective", "nf4"):
        out = workspace / f"mode_{mode}"
        option = "quantize=nf4" if mode == "nf4" else f"train.gradient_checkpointing={mode}"
        assert main(["train", _config(workspace, out, max_steps=4), option, "data.eval=null"]) == 0
        losses[mode] = [e["loss"] for e in _entries(out) if "loss" in e]
    assert losses["full"] == losses["false"] and losses["selective"] == losses["false"]
    assert abs(losses["nf4"][0] - math.log(2)) < 1e-6 and losses["nf4"][-1] < losses["nf4"][0]


def test_objective_and_data_must_agree(workspace, capsys):
    out = workspace / "bad"
    sft_on_pairs = _config(workspace, out, objective="sft")
    assert main(["train", sft_on_pairs]) == 2
    assert "holds preference records (prompt, chosen, rejected); set train.objective to dpo, ipo, simpo or orpo" in capsys.readouterr().err
    (workspace / "sft.jsonl").write_text(json.dumps({"prompt": "1 plus 1 is", "completion": " 2"}) + "\n")
    assert main(["train", _config(workspace, out), f"data.train={workspace / 'sft.jsonl'}", "data.eval=null"]) == 2
    assert "sft.jsonl:1: not a preference record: keys ['completion', 'prompt']" in capsys.readouterr().err
    assert main(["train", _config(workspace, out), "lora.init=pissa", "train.eval_generate=true", "train.beta=0"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "train.beta = 0.0: must be > 0.0" in err
    assert "lora.init = 'pissa': DPO's reference is the base with the adapter off" in err
    assert "train.eval_generate = true: preference data has no single reference answer" in err
    assert "Traceback" not in err
    assert main(["train", _config(workspace, out, objective="sft"), "data.format=preference"]) == 2
    assert "data.format = 'preference': preference pairs train with train.objective dpo, ipo, simpo or orpo" in capsys.readouterr().err
    assert main(["train", _config(workspace, out, objective="simpo"), "lora.init=pissa", "train.max_steps=1"]) == 0  # no reference
    # UltraFeedback's layout (chat messages beside the pair) trains on the pairs under a preference objective
    user = {"role": "user", "content": "Add 2 and 3"}
    record = {"prompt": "Add 2 and 3", "messages": [user, {"role": "assistant", "content": "5"}],
              "chosen": [user, {"role": "assistant", "content": "5"}], "rejected": [user, {"role": "assistant", "content": "6"}]}  # fmt: skip
    (workspace / "ufb.jsonl").write_text((json.dumps(record) + "\n") * 8)
    capsys.readouterr()
    assert main(["train", _config(workspace, workspace / "ufb"), f"data.train={workspace / 'ufb.jsonl'}", "data.eval=null",
                 "data.max_length=48", "train.max_steps=1"]) == 0  # fmt: skip
    assert "8 pairs (16 answers)" in capsys.readouterr().out


def test_eval_command_reports_dpo_rewards_of_an_adapter(workspace, capsys):
    out = workspace / "run"
    if not (out / "adapter").is_dir():
        assert main(["train", _config(workspace, out, max_steps=30)]) == 0
    capsys.readouterr()
    eval_file = workspace / "eval.jsonl"
    args = ["eval", "--model", str(workspace / "model"), "--data", str(eval_file), "--max-length", "16", "--json"]
    assert main([*args, "--adapter", str(out / "adapter"), "--beta", "0.1"]) == 0
    got = json.loads(capsys.readouterr().out)
    evals = [e for e in _entries(out) if "eval_loss" in e]
    assert got["pairs"] == 16 and got["reward_accuracy"] >= 0.75
    # the trainer's own eval of the same adapter on the same file (it ran in fp32; eval loads fp32 on this CPU too)
    assert abs(got["loss"] - evals[-1]["eval_loss"]) < 1e-4
    assert main(args) == 2
    assert "holds preference pairs: their DPO rewards compare an adapter with its base; pass --adapter" in capsys.readouterr().err
    assert main([*args, "--objective", "simpo"]) == 0  # no reference: the base model alone
    base = json.loads(capsys.readouterr().out)
    assert (base["objective"], base["beta"], base["pairs"]) == ("simpo", 2.0, 16) and 0 <= base["reward_accuracy"] <= 1
    for bad, message in [(["--simpo-gamma", "nan"], "--simpo-gamma nan: SimPO's margin must be a number >= 0"),
                         (["--beta", "inf"], "--beta inf: the objective's beta must be a number > 0")]:  # fmt: skip
        assert main([*args, "--objective", "simpo", *bad]) == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- DPO after SFT: continuing an adapter
@pytest.fixture(scope="module")
def sft_adapter(workspace):
    """An SFT adapter trained on the chosen answers as completions: where DPO usually starts."""
    records = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in addition_pairs(96)]
    (workspace / "sft_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = workspace / "sft"
    config = _config(workspace, out, objective="sft", max_steps=12)
    assert main(["train", config, f"data.train={workspace / 'sft_data.jsonl'}", "data.eval=null", "lora.dropout=0.1"]) == 0
    return out / "adapter"


def test_dpo_continues_an_sft_adapter_against_it_as_the_reference(workspace, sft_adapter, capsys):
    from lorakit.train import setup

    out = workspace / "dpo_after_sft"
    config = _config(workspace, out, max_steps=20)
    capsys.readouterr()
    assert main(["train", config, f"adapter={sft_adapter}"]) == 0
    printed = capsys.readouterr().out
    assert f"continues {sft_adapter}" in printed and f"reference: the starting adapter {sft_adapter} (frozen)" in printed
    train = [e for e in _entries(out) if "loss" in e]
    evals = [e for e in _entries(out) if "eval_loss" in e]
    # the policy starts as its reference, the SFT adapter (B is not 0), with LoRA dropout 0.1 from its config
    # kept in the policy: so ln 2 up to the dropout's noise, not the base's margin
    assert abs(train[0]["loss"] - math.log(2)) < 0.02 and evals[-1]["eval_loss"] < math.log(2)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    start = json.loads((sft_adapter / "adapter_config.json").read_text())
    keys = ("r", "lora_alpha", "target_modules", "lora_dropout")
    assert {k: saved[k] for k in keys} == {k: start[k] for k in keys} and start["lora_dropout"] == 0.1
    assert f"continuing the adapter `{sft_adapter}`" in (out / "adapter" / "README.md").read_text()

    # without dropout the first loss is ln 2 exactly: the reference is the SFT adapter, not the base;
    # in bf16 too, where the frozen copy's forward (no grad) must round as the trained one's does
    for precision in ("fp32", "bf16"):
        out = workspace / f"dpo_after_sft_nodrop_{precision}"
        assert main(["train", _config(workspace, out, max_steps=1, precision=precision), f"adapter={sft_adapter}",
                     "lora.dropout=0"]) == 0  # fmt: skip
        first = _entries(out)[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["reward_margin"] == 0.0, precision
    cfg = load_run_config(_config(workspace, workspace / "fresh", max_steps=1), {"adapter": str(sft_adapter), "lora.dropout": 0.0})
    run = setup(cfg, log=lambda _: None)
    files = load_file(str(sft_adapter / "adapter_model.safetensors"))
    for path, layer in lora_layers(run.model):  # both adapters start as the SFT adapter; the reference is frozen
        for name in ("default", REFERENCE_ADAPTER):
            key = f"base_model.model.{path}.lora_B.weight"
            assert torch.equal(layer.lora_B[name].detach(), files[key]) and files[key].abs().sum() > 0
        assert layer.lora_B["default"].requires_grad and not layer.lora_B[REFERENCE_ADAPTER].requires_grad
        assert isinstance(layer.lora_dropout[REFERENCE_ADAPTER], torch.nn.Identity)

    # eval: against the base the SFT adapter already prefers the chosen answers; against itself it is ln 2
    args = ["eval", "--model", str(workspace / "model"), "--data", str(workspace / "eval.jsonl"), "--max-length", "16",
            "--json", "--adapter", str(sft_adapter)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    against_base = json.loads(capsys.readouterr().out)
    assert main([*args, "--reference-adapter", str(sft_adapter)]) == 0
    against_itself = json.loads(capsys.readouterr().out)
    assert abs(against_itself["loss"] - math.log(2)) < 1e-6 and against_itself["reward_margin"] == 0.0
    assert abs(against_base["loss"] - math.log(2)) > 1e-3
    assert main([*args, "--reference-adapter", str(sft_adapter), "--objective", "simpo"]) == 2
    assert "--reference-adapter: simpo compares with no reference" in capsys.readouterr().err


def test_a_precomputed_reference_of_a_continued_adapter_is_that_adapter(workspace, sft_adapter, capsys):
    # the table holds the frozen SFT adapter's log-probs (not the base's): the first loss is ln 2 exactly
    losses = {}
    for pre in (False, True):
        out = workspace / f"pre_after_sft_{pre}"
        assert main(["train", _config(workspace, out, max_steps=6, precompute_reference=pre), f"adapter={sft_adapter}",
                     "lora.dropout=0", "data.eval=null"]) == 0  # fmt: skip
        losses[pre] = [e["loss"] for e in _entries(out) if "loss" in e]
    assert f"reference: the starting adapter {sft_adapter} (frozen), precomputed in one pass" in capsys.readouterr().out
    assert losses[True][0] == pytest.approx(math.log(2), abs=1e-7) and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_continued_adapter_fixes_the_lora_config_and_resumes_only_unchanged(workspace, sft_adapter, monkeypatch, capsys):
    out = workspace / "continue_bad"
    assert main(["train", _config(workspace, out), f"adapter={sft_adapter}", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert f"lora.r = 8: training continues the adapter {sft_adapter}, whose r is 4; remove lora.r (the adapter sets it)" in err
    # the same targets in another order are the adapter's own (PEFT writes them in any order)
    targets = json.loads((sft_adapter / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, list) and len(targets) > 1
    cfg = load_run_config(_config(workspace, out), {"adapter": str(sft_adapter), "lora.targets": targets[::-1]})
    assert sorted(cfg.lora.targets) == sorted(targets) and cfg.lora.r == 4
    assert main(["train", _config(workspace, out), f"adapter={workspace / 'nowhere'}"]) == 2
    assert "adapter = " in (err := capsys.readouterr().err) and "nowhere': folder not found" in err
    # the config that trained the adapter (all-linear) runs again with it; other modules are refused
    sft_config = str(sft_adapter.parent / "config.yaml")
    assert yaml.safe_load(open(sft_config))["lora"]["targets"] == "all-linear"
    cfg = load_run_config(sft_config, {"adapter": str(sft_adapter), "output_dir": str(out)})
    assert sorted(cfg.lora.targets) == sorted(targets)
    assert main(["train", _config(workspace, out), f"adapter={sft_adapter}", "lora.targets=[q_proj]"]) == 2
    assert "lora.targets = ['q_proj']: selects other modules than the adapter" in (err := capsys.readouterr().err)
    assert "only the adapter's: model.layers.0.mlp.down_proj and 11 more); remove lora.targets" in err
    # a bad value is reported once, not also as a disagreement with the adapter
    assert main(["train", _config(workspace, out), f"adapter={sft_adapter}", "lora.r=abc"]) == 2
    assert "lora.r = 'abc'" in (err := capsys.readouterr().err) and "whose r is" not in err
    # an adapter without safetensors weights, or with pickled ones only
    for name, files in (("no_weights", []), ("pickled", ["adapter_model.bin"])):
        folder = workspace / name
        folder.mkdir()
        shutil.copy(sft_adapter / "adapter_config.json", folder)
        for f in files:
            (folder / f).write_bytes(b"not read")
        assert main(["train", _config(workspace, out), f"adapter={folder}"]) == 2
        err = capsys.readouterr().err
        assert ("refusing a pickled adapter" if files else "no adapter_model.safetensors") in err and "Traceback" not in err
    # an adapter of another base model
    gpt2_adapter = workspace / "gpt2_adapter"
    gpt2 = tiny_gpt2()
    inject_adapter(gpt2, LoraConfig(r=4, alpha=8, targets=["c_attn"]))
    save_adapter(gpt2, gpt2_adapter)
    assert main(["train", _config(workspace, out, objective="sft"), f"adapter={gpt2_adapter}",
                 f"data.train={workspace / 'sft_data.jsonl'}", "data.eval=null"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "targets ['c_attn'] match no layer of this model; is it an adapter for another base model?" in err
    # a PiSSA adapter moves part of the base into itself: DPO cannot hold it twice
    pissa = workspace / "pissa_adapter"
    shutil.copytree(sft_adapter, pissa)
    raw = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**raw, "init_lora_weights": "pissa"}))
    assert main(["train", _config(workspace, out), f"adapter={pissa}"]) == 2
    assert "a pissa adapter moves part of the base into itself" in capsys.readouterr().err

    # continued SFT (on the pairs' chosen answers), crashed and resumed: bit-identical
    copy_ = workspace / "sft_copy"
    shutil.copytree(sft_adapter, copy_)
    sft = [f"data.train={workspace / 'sft_data.jsonl'}", "data.eval=null", f"adapter={copy_}"]
    full, crashed = workspace / "continue_full", workspace / "continue_crashed"
    assert main(["train", _config(workspace, full, objective="sft", save_every=3, max_steps=6), *sft]) == 0
    config = _config(workspace, crashed, objective="sft", save_every=3, max_steps=6)
    crash_and_resume(monkeypatch, config, *sft, crash_at=4)
    assert without_timing(_entries(crashed)) == without_timing(_entries(full))
    # the adapter it continues changed since the checkpoint: that is another run
    shutil.rmtree(crashed / "adapter")
    tensors = load_file(str(copy_ / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in tensors.items()}, str(copy_ / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["train", config, *sft, "--resume"]) == 2
    assert "the adapter changed since it was written" in capsys.readouterr().err
