"""lorakit.data and the modules it reads through (data_files, records, chat_templates):
formats, masks, truncation, files, cache and errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tokenizer

import lorakit.chat_templates
import lorakit.data_files
import lorakit.records
from lorakit.config import DataConfig
from lorakit.data import DataStats, TokenizedDataset, load_dataset, load_train_eval, tokenize_records
from lorakit.data_files import read_records
from lorakit.errors import UserError
from lorakit.records import detect_format
from lorakit.train import empty_replies_note

CHAT = [
    {"role": "system", "content": "Answer the question briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Sort the numbers 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]

# The helpers' templates with {% generation %} around what must be trained: transformers'
# own assistant-mask code (return_assistant_tokens_mask) is the independent reference.
GEN_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def tok_ids(tok, text: str, special: bool = True) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def build(records: list[dict], tok=None, **cfg) -> TokenizedDataset:
    tok = tok if tok is not None else make_tokenizer("llama3")
    return tokenize_records(list(enumerate(records, start=1)), tok, DataConfig(**cfg), source="d.jsonl")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def expected_labels(ids: list[int], trainable: list[bool]) -> list[int]:
    out = [t if m else -100 for t, m in zip(ids, trainable)]
    out[0] = -100  # nothing predicts an example's first token
    return out


def _trained_groups(tok, labels) -> list[str]:
    """The decoded runs of trained tokens."""
    groups, current = [], []
    for t in labels.tolist() + [-100]:
        if t != -100:
            current.append(t)
        elif current:
            groups.append(tok.decode(current))
            current = []
    return groups


# ---------------------------------------------------------------------------------------------
# Formats


def test_detect_format():
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "instruction"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"conversations": []}) == "chat"
    assert detect_format({"prompt": "a"}) is None
    assert detect_format({"question": "a", "answer": "b"}) is None
    # KTO's labelled records in every form a label takes (a CSV holds "false"), which SFT must not train
    for label in (True, False, 1, 0, "false", "True", " 1 ", "0"):
        assert detect_format({"prompt": "a", "completion": "b", "label": label}) == "unpaired", label
    for label in (2, "maybe", None, 0.5):  # no KTO label: a completion record with an extra key
        assert detect_format({"prompt": "a", "completion": "b", "label": label}) == "completion", label


def test_text_format_trains_every_token_and_appends_eos():
    tok = make_tokenizer("llama3")
    ds = build([{"text": "The quick brown fox."}, {"text": "Four.<|eot_id|>"}], tok)
    ids, labels = ds.example(0)
    want = tok_ids(tok, "The quick brown fox.") + [tok.eos_token_id]
    assert ids.tolist() == want
    assert labels.tolist() == expected_labels(want, [True] * len(want))
    ids, _ = ds.example(1)  # already ends with EOS: not doubled
    assert ids.tolist() == tok_ids(tok, "Four.<|eot_id|>") and ids[-2] != tok.eos_token_id
    assert ds.stats.tokens == len(want) + len(ids) and ds.stats.trainable_tokens == ds.stats.tokens - 2


def test_completion_format_masks_the_prompt():
    tok = make_tokenizer("chatml")
    ds = build([{"prompt": "Translate to French: hello world ->", "completion": " bonjour le monde"}], tok)
    prompt = tok_ids(tok, "Translate to French: hello world ->")
    want = tok_ids(tok, "Translate to French: hello world -> bonjour le monde") + [tok.eos_token_id]
    assert want[: len(prompt)] == prompt  # the boundary falls between tokens in this example
    ids, labels = ds.example(0)
    assert ids.tolist() == want
    assert labels.tolist() == expected_labels(want, [i >= len(prompt) for i in range(len(want))])
    assert tok.decode([t for t in labels if t != -100]) == " bonjour le monde<|im_end|>"


@pytest.mark.parametrize("with_input", [True, False])
def test_instruction_format_uses_the_documented_template(with_input):
    tok = make_tokenizer("llama3")
    record = {"instruction": "Sort the numbers.", "output": "1 2 3"}
    prompt = "### Instruction:\nSort the numbers.\n\n### Response:\n"
    if with_input:
        record["input"] = "3 1 2"
        prompt = "### Instruction:\nSort the numbers.\n\n### Input:\n3 1 2\n\n### Response:\n"
    ids, labels = build([record], tok).example(0)
    want = tok_ids(tok, prompt + "1 2 3") + [tok.eos_token_id]
    n_prompt = len(tok_ids(tok, prompt))
    assert ids.tolist() == want
    assert labels.tolist() == expected_labels(want, [i >= n_prompt for i in range(len(want))])


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_chat_ids_equal_apply_chat_template_and_labels_cover_assistant_turns(template):
    tok = make_tokenizer(template)
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]]
    ds = build([{"messages": c} for c in chats], tok)
    for i, messages in enumerate(chats):
        ids, labels = ds.example(i)
        assert ids.tolist() == tok.apply_chat_template(messages)["input_ids"]
        ref = tok.apply_chat_template(
            messages, chat_template=GEN_TEMPLATES[template], return_dict=True, return_assistant_tokens_mask=True
        )
        assert ref["input_ids"] == ids.tolist()  # the tagged template renders the same text
        assert labels.tolist() == expected_labels(ref["input_ids"], [m == 1 for m in ref["assistant_masks"]])
    # read back: each assistant turn's trained tokens are its content plus the end-of-turn token
    eot = "<|eot_id|>" if template == "llama3" else "<|im_end|>"
    assert _trained_groups(tok, ds.example(0)[1]) == ["Four." + eot, "1 2 3" + eot]


def test_a_template_that_ends_the_conversation_with_eos_trains_each_turns_own_end():
    # Phi-3's way: each turn ends with its end-of-turn token, and the whole conversation with EOS
    # after it (when no generation prompt is asked for), which ends no turn: every reply is trained
    # through its own end of turn, as transformers' assistant mask has it, not through the EOS
    phi3 = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    tok = make_tokenizer(template=None)
    tok.chat_template = phi3
    assert lorakit.chat_templates.ChatRenderer(tok).end_of_turn == "<|im_end|>"
    ds = build([{"messages": CHAT}, {"messages": CHAT[1:3]}], tok)
    for i, messages in enumerate([CHAT, CHAT[1:3]]):
        ref = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert ds.example(i)[0].tolist() == ref["input_ids"] and ref["input_ids"][-1] == tok.eos_token_id
        assert ds.example(i)[1].tolist() == expected_labels(ref["input_ids"], [m == 1 for m in ref["assistant_masks"]])
    assert _trained_groups(tok, ds.example(0)[1]) == ["Four.<|im_end|>", "1 2 3<|im_end|>"]


# Templates that render a turn differently once a later turn follows, written here after the
# behaviour of Qwen3's (an empty think block in the assistant turns after the last user turn
# only) and Mistral's (the system prompt inside the last user turn).
QWEN3_LIKE = (
    "{%- set ns = namespace(searching=true, last_query=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if ns.searching and m.role == 'user' %}"
    "{%- set ns.searching = false %}{%- set ns.last_query = messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role != 'assistant' %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif loop.index0 > ns.last_query %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
MISTRAL_LIKE = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set turns = messages %}{%- endif %}{{- bos_token }}"
    "{%- for m in turns %}{%- if m.role == 'user' %}{{- '[INST] ' }}"
    "{%- if loop.last and system is defined %}{{- system + '\n\n' }}{%- endif %}{{- m.content + '[/INST]' }}"
    "{%- else %}{{- ' ' + m.content|trim + eos_token }}{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize("template", ["qwen3", "mistral"])
def test_chat_templates_that_rewrite_earlier_turns(template):
    tok = make_tokenizer(template=None)
    tok.chat_template, tok.eos_token = {"qwen3": (QWEN3_LIKE, "<|im_end|>"), "mistral": (MISTRAL_LIKE, "</s>")}[template]
    ds = build([{"messages": CHAT}, {"messages": CHAT[:3]}, {"messages": CHAT[1:3] + [CHAT[3], {"role": "assistant", "content": ""}]}], tok)
    for i, messages in enumerate([CHAT, CHAT[:3]]):
        assert ds.example(i)[0].tolist() == tok.apply_chat_template(messages)["input_ids"]
    if template == "qwen3":  # the last turn as the model generates it, think block included; earlier ones as rendered
        assert _trained_groups(tok, ds.example(0)[1]) == ["Four.<|im_end|>", "<think>\n\n</think>\n\n1 2 3<|im_end|>"]
        assert _trained_groups(tok, ds.example(1)[1]) == ["<think>\n\n</think>\n\nFour.<|im_end|>"]
        assert _trained_groups(tok, ds.example(2)[1]) == ["Four.<|im_end|>", "<think>\n\n</think>\n\n<|im_end|>"]
    else:  # from the space the template writes before each reply (the first turn: " Four" is one token)
        assert _trained_groups(tok, ds.example(0)[1]) == [" Four.</s>", " 1 2 3</s>"]
        assert _trained_groups(tok, ds.example(1)[1]) == [" Four.</s>"]


def test_a_reply_that_spells_template_markup_is_found_where_its_turn_ends():
    # Mistral-like with a system prompt: the render of the prefixes differs, so the reply is found by
    # its content, which "[/INST]" holds too ("I", "INST"); it is the one followed by the end of turn,
    # and it starts with the space the template writes before a reply, as where the prefixes locate it
    tok = make_tokenizer(template=None)
    tok.chat_template, tok.eos_token = MISTRAL_LIKE, "</s>"
    system = {"role": "system", "content": "Be brief."}
    for reply in ("I", "INST", "T"):
        ds = build([{"messages": [system, {"role": "user", "content": "Which letter?"}, {"role": "assistant", "content": reply}]}], tok)
        assert _trained_groups(tok, ds.example(0)[1]) == [f" {reply}</s>"]


def test_a_turn_the_template_rewrites_is_refused():
    tok = make_tokenizer(template=None)  # a template that writes the reply upper-cased when it is not the last
    tok.chat_template = (
        "{%- for m in messages %}{{- m.role + ': ' }}{%- if m.role == 'assistant' and not loop.last %}{{- m.content|upper }}"
        "{%- else %}{{- m.content }}{%- endif %}{{- '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(UserError, match=r"d\.jsonl:1: messages\[1\]: .*content is not in the render"):
        build([{"messages": CHAT[1:]}], tok)


def test_sharegpt_conversations_equal_messages():
    tok = make_tokenizer("chatml")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}
    a = build([{"messages": CHAT}, sharegpt], tok)
    for x, y in zip(a.example(0), a.example(1)):
        assert x.tolist() == y.tolist()
    assert a.example(1)[0].tolist() == tok.apply_chat_template(CHAT)["input_ids"]


@pytest.mark.parametrize("template", ["llama3", "qwen3"])
def test_chat_turn_weights_and_train_turns_last_leave_turns_untrained(template):
    # OpenAI's fine-tuning format: an assistant turn with "weight": 0 stays as context, untrained;
    # train_turns: last trains only the final assistant turn. The ids never change.
    tok = make_tokenizer(template if template == "llama3" else None)
    if template == "qwen3":
        tok.chat_template, tok.eos_token = QWEN3_LIKE, "<|im_end|>"
    eot = "<|eot_id|>" if template == "llama3" else "<|im_end|>"
    last = "1 2 3" + eot if template == "llama3" else "<think>\n\n</think>\n\n1 2 3<|im_end|>"
    weighted = [dict(m, weight=0) if m["content"] == "Four." else m for m in CHAT]
    ds = build([{"messages": CHAT}, {"messages": weighted}], tok)
    plain, zero = ds.example(0), ds.example(1)
    assert np.array_equal(plain[0], zero[0]) and zero[0].tolist() == tok.apply_chat_template(CHAT)["input_ids"]
    assert _trained_groups(tok, zero[1]) == [last]
    # the untrained turn's tokens are exactly the ones the plain example trains and this one does not
    first = [i for i, (a, b) in enumerate(zip(plain[1].tolist(), zero[1].tolist())) if a != b]
    assert tok.decode(plain[0][first].tolist()) == "Four." + eot
    assert zero[1].tolist() == [t if i not in first else -100 for i, t in enumerate(plain[1].tolist())]
    # weight 1 is the default; train_turns: last equals weight 0 on every earlier turn
    ones = [dict(m, weight=1) if m["role"] == "assistant" else m for m in CHAT]
    again = build([{"messages": ones}, {"messages": CHAT}], tok, train_turns="last")
    assert np.array_equal(again.example(0)[1], zero[1]) and np.array_equal(again.example(1)[1], zero[1])
    assert np.array_equal(build([{"messages": ones}], tok).example(0)[1], plain[1])
    # ShareGPT's turns take a weight too; a chat whose every turn has weight 0 trains nothing and is dropped
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
                                  for m in weighted]}  # fmt: skip
    nothing = [dict(m, weight=0) if m["role"] == "assistant" else m for m in CHAT]
    ds = build([sharegpt, {"messages": nothing}, {"messages": CHAT[1:3]}], tok)
    assert len(ds) == 2 and np.array_equal(ds.example(0)[1], zero[1]) and ds.stats.dropped_no_trainable == 1
    with pytest.raises(UserError, match=r"in chats, no assistant turn is trained \(each has \"weight\": 0\)"):
        build([{"messages": nothing}], tok)


def test_an_untrained_turn_is_passed_over_where_turns_are_found_by_content():
    # Mistral-like with a system prompt: every turn is found by its content. The untrained first
    # reply must be passed over, or the search for the last one's user turn ("sure?") stops inside
    # the first user turn ("Are you sure?") and the first "Yes." is trained instead
    tok = make_tokenizer(template=None)
    tok.chat_template, tok.eos_token = MISTRAL_LIKE, "</s>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Are you sure?"},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "Yes."}]  # fmt: skip
    plain = build([{"messages": msgs}], tok).example(0)
    weighted = build([{"messages": [dict(m, weight=0) if i == 2 else m for i, m in enumerate(msgs)]}], tok).example(0)
    last = build([{"messages": msgs}], tok, train_turns="last").example(0)
    groups = [i for i, t in enumerate(plain[1].tolist()) if t != -100]
    assert _trained_groups(tok, plain[1]) == [" Yes.</s>", " Yes.</s>"]  # from the space before each reply
    for labels in (weighted[1], last[1]):
        trained = [i for i, t in enumerate(labels.tolist()) if t != -100]
        assert trained and trained == groups[len(groups) - len(trained):]  # the last reply's tokens, as in the plain chat


def test_turns_found_by_content_allow_the_whitespace_a_template_keeps_before_the_end_of_turn():
    # an untrained reply with trailing whitespace ("Yes.\n", ChatML keeps it) may not move the
    # search onto a later equal reply; a reply "Yes. " (Qwen3-like) ends at its end of turn, not at
    # the next "Yes."; an empty reply trains its end of turn (Mistral-like with a system prompt)
    tok = make_tokenizer("chatml")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Yes.\n", "weight": 0},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "Yes.", "weight": 0}]  # fmt: skip
    plain = build([{"messages": [{k: v for k, v in m.items() if k != "weight"} for m in msgs]}], tok).example(0)[1]
    weighted = build([{"messages": msgs}], tok).example(0)[1]
    second = [i for i, t in enumerate(plain.tolist()) if t != -100][5:9]  # "Yes.\n<|im_end|>" is 5 tokens
    assert [i for i, t in enumerate(weighted.tolist()) if t != -100] == second
    assert _trained_groups(tok, build([{"messages": msgs[:4]}], tok, train_turns="last").example(0)[1]) == ["Yes.<|im_end|>"]
    qwen = make_tokenizer(template=None)
    qwen.chat_template, qwen.eos_token = QWEN3_LIKE, "<|im_end|>"
    spaced = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes. "}, {"role": "user", "content": "Yes."},
              {"role": "assistant", "content": "ok"}]  # fmt: skip
    assert _trained_groups(qwen, build([{"messages": spaced}], qwen).example(0)[1]) == [
        "Yes. <|im_end|>", "<think>\n\n</think>\n\nok<|im_end|>"
    ]  # fmt: skip
    mistral = make_tokenizer(template=None)
    mistral.chat_template, mistral.eos_token = MISTRAL_LIKE, "</s>"
    empty = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    assert _trained_groups(mistral, build([{"messages": empty}], mistral).example(0)[1]) == [" </s>"]


def test_trained_replies_that_say_nothing_are_counted_with_the_first_place():
    hi = {"role": "user", "content": "Hi"}
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    records = [
        {"messages": CHAT},
        {"messages": [hi, {"role": "assistant", "content": "Yes."}, hi, {"role": "assistant", "content": " \n"}]},  # line 2
        {"messages": [hi, {"role": "assistant", "content": "", "weight": 0}, hi, {"role": "assistant", "content": "ok"}]},
        {"messages": [hi, {"role": "assistant", "content": ""}, hi, {"role": "assistant", "content": "ok"}]},  # line 4
        {"messages": [hi, {"role": "assistant", "content": ""}, hi, {"role": "assistant", "content": "ok"}]},  # last only
    ]  # fmt: skip
    stats = build(records[:4]).stats
    assert (stats.empty_replies, stats.first_empty_reply_line) == (2, 2)
    assert build(records[4:], train_turns="last").stats.empty_replies == 0  # the empty turn is not trained
    says_nothing = lorakit.records.says_nothing_trained
    calls = [hi, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "noon"}]
    assert not says_nothing(lorakit.records.Chat(calls), writes_reasoning=False)
    thought = [hi, {"role": "assistant", "content": "", "reasoning_content": "They greet me."}]
    # reasoning is something to train only where the template writes it
    assert [says_nothing(lorakit.records.Chat(thought), w) for w in (True, False)] == [False, True]
    # several files: counted once each, the first file's first place
    other = tokenize_records([(4, records[3])], make_tokenizer("llama3"), DataConfig(), source="e.jsonl")
    joined = TokenizedDataset.concat([build(records[:1]), other], ["d.jsonl", "e.jsonl"])
    assert (joined.stats.empty_replies, joined.first_empty_reply()) == (1, "e.jsonl:4")
    assert joined.subset([1]).first_empty_reply() == "e.jsonl:4" and build(records[:4]).first_empty_reply() == "d.jsonl:2"
    assert empty_replies_note(joined.stats.empty_replies, joined.first_empty_reply()) == (
        'note         1 chat record trains an empty assistant reply (first: e.jsonl:4), which teaches only its end of '
        'turn; give it text, mark it "weight": 0, or remove the record'
    )  # fmt: skip
    assert empty_replies_note(0, "") is None


@pytest.mark.parametrize(
    "weight, where, message",
    [
        (0.5, 2, r"messages\[2\]\.weight = 0\.5: use 0 \(the turn is not trained\) or 1 \(it is\)"),
        ("0", 2, r"messages\[2\]\.weight = '0': use 0"),
        (0, 1, r"messages\[1\]\.weight: only assistant turns are trained or not; remove the weight of this user turn"),
    ],
)
def test_a_bad_turn_weight_names_the_message_and_the_fix(weight, where, message):
    messages = [dict(m, weight=weight) if i == where else m for i, m in enumerate(CHAT)]
    with pytest.raises(UserError, match=r"d\.jsonl:1: " + message):
        build([{"messages": messages}])


def test_a_role_that_is_no_string_is_a_bad_record_and_a_null_weight_is_none(tmp_path):
    tok = make_tokenizer("llama3")
    bad = [{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "yo"}]},
           {"conversations": [{"from": {"a": 1}, "value": "hi"}, {"from": "gpt", "value": "yo"}]}]  # fmt: skip
    path = write_jsonl(tmp_path / "roles.jsonl", bad + [{"messages": CHAT}])
    with pytest.raises(UserError, match=r"roles.jsonl:1: messages\[0\].role = \['user'\]: unknown role; use one of system"):
        load_dataset(path, tok, DataConfig(), use_cache=False)
    kept = load_dataset(path, tok, DataConfig(skip_invalid=True), use_cache=False).stats
    assert (kept.skipped_invalid, kept.examples) == (2, 1)
    # a table writes null into the turns without a weight: as if it were missing
    nulls = [{"messages": [{"role": "user", "content": "hi", "weight": None}, {"role": "assistant", "content": "yo", "weight": None},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo2", "weight": 0}]}]  # fmt: skip
    plain = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo2", "weight": 0}]}]  # fmt: skip
    got = load_dataset(write_jsonl(tmp_path / "nulls.jsonl", nulls), tok, DataConfig(), use_cache=False)
    want = load_dataset(write_jsonl(tmp_path / "plain.jsonl", plain), tok, DataConfig(), use_cache=False)
    assert np.array_equal(got.labels, want.labels) and (got.labels != -100).any()


def test_train_on_inputs_trains_every_token():
    tok = make_tokenizer("llama3")
    ds = build([{"messages": CHAT}, {"prompt": "Q: two plus two?", "completion": " Four."}], tok, train_on_inputs=True)
    for i in range(2):
        ids, labels = ds.example(i)
        assert labels.tolist() == expected_labels(ids.tolist(), [True] * len(ids))
    # a chat that ends with a user turn is fine when the inputs are trained
    assert len(build([{"messages": CHAT[:2]}], tok, train_on_inputs=True)) == 1


def test_truncation_and_drop_counts():
    tok = make_tokenizer("llama3")
    lengths = [len(tok_ids(tok, t)) + 1 for t in ("a b", "The quick brown fox jumps over the lazy dog.")]
    assert lengths[0] < 10 < lengths[1]
    long_prompt = {"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " Four."}
    records = [{"text": "a b"}, {"text": "The quick brown fox jumps over the lazy dog."}, long_prompt]
    ds = build(records, tok, max_length=10)
    s = ds.stats
    assert (s.records, s.examples, s.truncated, s.dropped_too_long, s.dropped_no_trainable) == (3, 2, 1, 0, 1)
    assert ds.lengths().tolist() == [lengths[0], 10]
    assert ds.example(1)[0].tolist() == (tok_ids(tok, records[1]["text"]) + [tok.eos_token_id])[:10]
    assert s.tokens == lengths[0] + 10 and s.trainable_tokens == lengths[0] - 1 + 9
    s = build(records, tok, max_length=10, too_long="drop").stats
    assert (s.examples, s.truncated, s.dropped_too_long, s.dropped_no_trainable) == (1, 0, 2, 0)
    assert json.loads(json.dumps(dataclasses.asdict(s)))["dropped_too_long"] == 2


def test_subset_and_read_records_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text": "b b",\n   "x": 1}, {"text": "c"}\n]\n')
    assert [line for line, _ in read_records(path)] == [2, 4, 5]
    ds = load_dataset(path, make_tokenizer("llama3"), DataConfig(), use_cache=False)
    sub = ds.subset([2, 0])
    assert len(sub) == 2 and sub.stats.examples == 2 and sub.stats.records == 3
    for j, i in enumerate([2, 0]):
        assert [x.tolist() for x in sub.example(j)] == [x.tolist() for x in ds.example(i)]


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    # files saved by Windows editors: UTF-8 with a BOM, CRLF line ends
    records = [{"prompt": "1 plus 1 is", "completion": " 2"}, {"prompt": "2 plus 2 is", "completion": " 4"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in records).encode() + b"\r\n")
    assert read_records(jsonl) == [(1, records[0]), (2, records[1])]
    listed = tmp_path / "d.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).replace("\n", "\r\n").encode())
    assert [r for _, r in read_records(listed)] == records


# ---------------------------------------------------------------------------------------------
# Loading: cache and eval split


def test_cache_hit_returns_identical_arrays_without_tokenizing(tmp_path, monkeypatch):
    tok = make_tokenizer("llama3")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 400 + [{"text": "hello"}])
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    first = load_dataset(path, tok, cfg)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit tokenized the records again")

    with monkeypatch.context() as patch:
        patch.setattr(lorakit.data, "tokenize_records", no_tokenizing)
        hit = load_dataset(path, tok, cfg)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(first, name), getattr(hit, name))
    assert hit.stats == first.stats
    load_dataset(path, tok, dataclasses.replace(cfg, max_length=16))  # another option: another entry
    load_dataset(path, make_tokenizer("chatml"), cfg)  # another tokenizer: another entry
    write_jsonl(path, [{"messages": CHAT}] * 401)  # other content: another entry
    assert load_dataset(path, tok, cfg).stats.examples == 401
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_the_same_bytes_read_as_csv_and_as_tsv_are_cached_apart(tmp_path):
    tok = make_tokenizer("llama3")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), skip_invalid=True)
    for name in ("a.csv", "a.tsv"):  # the same stem, so the same cache file name but for the key
        (tmp_path / name).write_text("text\nab,cd\nef\n")
    # as CSV the row 'ab,cd' has 2 cells under 1 header (skipped); as TSV it is the text 'ab,cd'
    assert load_dataset(tmp_path / "a.csv", tok, cfg).stats.examples == 1
    assert load_dataset(tmp_path / "a.tsv", tok, cfg).stats.examples == 2
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_columns_take_lorakit_keys_from_the_records_own_names(tmp_path):
    tok = make_tokenizer("llama3")
    plain = [{"prompt": "2 plus 2 is", "completion": " 4"}, {"messages": CHAT}, {"text": "just text"},
             {"instruction": "Say hi", "input": "", "output": "hi"}]  # fmt: skip
    named = [{"question": "2 plus 2 is", "answer": " 4", "id": 7}, {"conversation": CHAT}, {"text": "just text"},
             {"instruction": "Say hi", "input": "", "response": "hi"}]  # fmt: skip
    columns = {"prompt": "question", "completion": "answer", "messages": "conversation", "output": "response"}
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), packing=False)
    want = load_dataset(write_jsonl(tmp_path / "plain.jsonl", plain), tok, cfg)
    path = write_jsonl(tmp_path / "named.jsonl", named)
    with pytest.raises(UserError, match="named.jsonl:1: .*prompt"):  # without the mapping nothing fits
        load_dataset(path, tok, cfg)
    got = load_dataset(path, tok, dataclasses.replace(cfg, columns=columns))
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(got, name), getattr(want, name))
    assert got.stats == want.stats and len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the mapping keys the cache
    # a record holding both a name and the key it stands for is an error naming both (or skipped)
    write_jsonl(path, named + [{"prompt": "a", "question": "b", "answer": "c"}])
    with pytest.raises(UserError, match="named.jsonl:5: the record has both 'prompt' and 'question'"):
        load_dataset(path, tok, dataclasses.replace(cfg, columns=columns))
    skipped = load_dataset(path, tok, dataclasses.replace(cfg, columns=columns, skip_invalid=True))
    assert skipped.stats.skipped_invalid == 1 and skipped.stats.examples == 4
    # a record that fits no format after renaming names the keys both ways
    write_jsonl(path, [{"prompt": "a", "response": "b"}])
    with pytest.raises(UserError, match=r"named.jsonl:1: unknown record format, keys \['output', 'prompt'\].* \(keys as "
                                        r"data.columns renames them; the record's own: \['prompt', 'response'\]\)"):  # fmt: skip
        load_dataset(path, tok, dataclasses.replace(cfg, columns=columns))
    # preference pairs under other names, and a swap of two keys
    pair = {"query": "2 plus 2 is", "good": " 4", "bad": " 5"}
    pairs = load_dataset(write_jsonl(tmp_path / "pairs.jsonl", [pair]), tok,
                         dataclasses.replace(cfg, columns={"prompt": "query", "chosen": "good", "rejected": "bad"}))  # fmt: skip
    swapped = {"prompt": "2 plus 2 is", "chosen": " 5", "rejected": " 4"}
    swap = load_dataset(write_jsonl(tmp_path / "swap.jsonl", [swapped]), tok,
                        dataclasses.replace(cfg, columns={"chosen": "rejected", "rejected": "chosen"}))  # fmt: skip
    assert pairs.pairs and np.array_equal(pairs.input_ids, swap.input_ids) and np.array_equal(pairs.labels, swap.labels)


def test_a_system_prompt_is_put_first_in_every_conversation_without_one(tmp_path):
    tok = make_tokenizer("llama3")
    system = {"role": "system", "content": "You add numbers."}
    user, reply = {"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "4"}
    own = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]  # has its own: kept
    bare = [
        {"messages": [user, {**reply, "weight": 0}, user, reply]},  # an untrained turn: its index moves with the insert
        {"conversations": [{"from": "human", "value": "2 plus 2?"}, {"from": "gpt", "value": "4"}]},
        {"messages": own},
        {"text": "plain text: no conversation"},
    ]
    given = [{"messages": [system, *bare[0]["messages"]]}, {"messages": [system, user, reply]}, {"messages": own}, bare[3]]
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), packing=False)
    want = load_dataset(write_jsonl(tmp_path / "given.jsonl", given), tok, cfg)
    path = write_jsonl(tmp_path / "bare.jsonl", bare)
    got = load_dataset(path, tok, dataclasses.replace(cfg, system_prompt=system["content"]))
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(got, name), getattr(want, name))
    assert not np.array_equal(load_dataset(path, tok, cfg).input_ids[:8], got.input_ids[:8])  # another cache entry
    # preference pairs (a chat prompt, and whole conversations sharing their first turns) and KTO's examples
    pairs = [{"prompt": [user], "chosen": "4", "rejected": "5"},
             {"chosen": [user, reply], "rejected": [user, {**reply, "content": "5"}]}]  # fmt: skip
    want = load_dataset(write_jsonl(tmp_path / "pg.jsonl", [{**pairs[0], "prompt": [system, user]},
                                                          {k: [system, *v] for k, v in pairs[1].items()}]), tok, cfg)  # fmt: skip
    got = load_dataset(write_jsonl(tmp_path / "pb.jsonl", pairs), tok, dataclasses.replace(cfg, system_prompt=system["content"]))
    assert got.pairs and np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
    kto = [{"prompt": [user], "completion": "4", "label": True}, {"prompt": [user], "completion": "5", "label": False}]
    want = load_dataset(write_jsonl(tmp_path / "kg.jsonl", [{**r, "prompt": [system, user]} for r in kto]), tok,
                        dataclasses.replace(cfg, format="unpaired"))  # fmt: skip
    got = load_dataset(write_jsonl(tmp_path / "kb.jsonl", kto), tok,
                       dataclasses.replace(cfg, format="unpaired", system_prompt=system["content"]))  # fmt: skip
    assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)  # KL examples too
    # what generation is asked for eval: the same conversation
    from lorakit.evaluate import prompt_and_answer

    assert prompt_and_answer(bare[1], system["content"]) == ([system, user], "4", True)
    assert prompt_and_answer(bare[2], system["content"]) == (own[:2], "Hello", True)


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"promt": "question"}, "data.columns: 'promt' is no key of lorakit's records; did you mean 'prompt'?"),
        ({"prompt": "q", "completion": "q"}, "data.columns: 'q' is named for 2 keys"),
        ({"prompt": ""}, "data.columns.prompt = '': give the records' name for 'prompt'"),
        ({"prompt": 3}, "data.columns = {'prompt': 3}: expected a mapping of a string to a string"),
    ],
    ids=["unknown key", "a name twice", "empty name", "not a string"],
)
def test_bad_columns_are_config_errors(tmp_path, columns, message):
    from lorakit.config import build_run_config

    raw = {"model": "m", "data": {"train": "t.jsonl", "columns": columns}}
    with pytest.raises(UserError) as err:
        build_run_config(raw, check_paths=False)
    assert message in str(err.value)


def test_load_train_eval_holds_out_a_deterministic_fraction(tmp_path):
    tok = make_tokenizer("llama3")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"example {i}"} for i in range(20)])
    cfg = DataConfig(train=str(path), eval_fraction=0.25, cache_dir=str(tmp_path / "c"))
    (train, sets), (_, again) = load_train_eval(cfg, tok, seed=1), load_train_eval(cfg, tok, seed=1)
    ev, ev2 = sets[""], again[""]  # a held-out fraction is the one eval set
    assert list(sets) == [""] and (len(train), len(ev)) == (15, 5) and np.array_equal(ev.input_ids, ev2.input_ids)
    texts = lambda d: {tok.decode(d.example(i)[0]) for i in range(len(d))}  # noqa: E731
    assert not texts(train) & texts(ev) and len(texts(train) | texts(ev)) == 20
    assert load_train_eval(dataclasses.replace(cfg, eval_fraction=0.0), tok, seed=1)[1] == {}
    _, sets = load_train_eval(dataclasses.replace(cfg, eval=str(path)), tok, seed=1)
    assert list(sets) == [""] and len(sets[""]) == 20
    # named eval sets: each on its own, in the order given
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": "other"}])
    _, sets = load_train_eval(dataclasses.replace(cfg, eval={"b": str(other), "a": [str(path), str(other)]}), tok, seed=1)
    assert list(sets) == ["b", "a"] and (len(sets["b"]), len(sets["a"])) == (1, 21)


def test_a_list_of_files_reads_them_in_order_as_one_dataset(tmp_path):
    tok = make_tokenizer("llama3")
    first = [{"prompt": f"{i} plus 1 is", "completion": f" {i + 1}"} for i in range(5)] + [{"text": "a " * 90}]
    second = [{"messages": CHAT}, {"instruction": "Say hi", "output": "hi"}, {"prompt": "x", "completion": 3}]
    a, b = write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)
    both = write_jsonl(tmp_path / "both.jsonl", first + second)
    cfg = DataConfig(train=[str(a), str(b), str(a)], max_length=64, skip_invalid=True, cache_dir=str(tmp_path / "c"))
    got, _ = load_train_eval(cfg, tok, seed=0)
    once = load_dataset(both, tok, dataclasses.replace(cfg, train=str(both)), use_cache=False)
    n = len(first) + len(second) - 1  # the invalid record is skipped
    assert len(got) == n + len(first)  # a file listed twice counts twice
    for i in range(n):
        assert all(np.array_equal(x, y) for x, y in zip(got.example(i), once.example(i)))
    assert all(np.array_equal(x, y) for x, y in zip(got.example(n), once.example(0)))
    # what reading found is counted for each file once (a.jsonl is read once); the set's counts are the set's
    s = got.stats
    assert load_dataset(a, tok, cfg, use_cache=False).stats.truncated >= 1 and s.truncated == once.stats.truncated
    assert (s.records, s.examples, s.skipped_invalid) == (9, 14, 1) and got.skipped_places() == [f"{b}:3"]
    assert s.tokens == int(got.offsets[-1]) and s.trainable_tokens == int((got.labels != -100).sum())
    # held out once, however often a file is listed: nothing held out is trained on
    train, sets = load_train_eval(dataclasses.replace(cfg, eval_fraction=0.3), tok, seed=0)
    held = sets[""]
    rows = lambda d: [tuple(d.example(i)[0].tolist()) for i in range(len(d))]  # noqa: E731
    a_rows = set(rows(load_dataset(a, tok, cfg, use_cache=False)))
    held_a = len(set(rows(held)) & a_rows)
    assert len(held) == 2 and not set(rows(held)) & set(rows(train)) and len(set(rows(train)) | set(rows(held))) == n
    assert len(train) == 2 * (6 - held_a) + (2 - (2 - held_a))  # a's training part twice, b's once
    # pairs and other records do not mix
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 plus 1 is", "chosen": " 2", "rejected": " 3"}])
    with pytest.raises(UserError, match=r"a.jsonl: holds neither preference pairs nor labelled examples, while .*p.jsonl holds preference pairs"):
        load_train_eval(DataConfig(train=[str(prefs), str(a)], max_length=24), tok, seed=0)


def test_a_system_prompt_the_template_refuses_or_leaves_out_is_refused_by_its_key():
    tok = make_tokenizer(template=None)
    records = [{"messages": CHAT[1:3]}]
    # Gemma's way: the template raises on a system turn; the setting is named, not every record
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{{ m.role + ': ' + m.content + eos_token }}{% endfor %}")  # fmt: skip
    with pytest.raises(UserError) as err:
        build(records, tok, system_prompt="Be brief.")
    assert str(err.value) == ("data.system_prompt = 'Be brief.': the chat template refuses a system turn (System role not "
                              "supported); leave data.system_prompt out, or use a template that writes system turns "
                              "(data.chat_template)")  # fmt: skip
    # Mistral's way: the system prompt only in a last user turn, so never in a conversation that ends with a reply
    tok.chat_template, tok.eos_token = MISTRAL_LIKE, "</s>"
    with pytest.raises(UserError, match=r"^data.train\[1\].system_prompt = 'Be brief.': the chat template leaves the "
                                        r"system turn out of a conversation that ends with a reply"):
        tokenize_records(list(enumerate(records, 1)), tok, DataConfig(system_prompt="Be brief."), source="d.jsonl",
                         option_keys={"system_prompt": "data.train[1].system_prompt"})  # fmt: skip
    assert len(build(records, tok)) == 1  # without it the records train


def test_the_files_of_a_list_may_set_their_own_columns_format_and_system_prompt(tmp_path):
    from lorakit.config import build_run_config
    from lorakit.train import generation_eval_records

    tok = make_tokenizer("llama3")
    chat = CHAT[1:3]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2 plus 2 is", "answer": " 4"}])  # read as completions
    dialogs = write_jsonl(tmp_path / "dialogs.jsonl", [{"dialog": chat}])
    prompted = write_jsonl(tmp_path / "prompted.jsonl", [{"prompt": "1 plus 1 is", "completion": " 2"}])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat}])
    raw = {"model": "m", "data": {"train": [
        {"path": str(qa), "columns": {"prompt": "question", "completion": "answer"}},
        {"path": str(dialogs), "columns": {"messages": "dialog"}, "system_prompt": "Be brief."},
        {"path": str(prompted), "format": "text", "columns": {"text": "prompt"}},  # the prompt alone, as text
    ], "eval": [str(chats), {"path": str(dialogs), "columns": {"messages": "dialog"}, "system_prompt": None}],
        "max_length": 64, "cache_dir": str(tmp_path / "c"), "system_prompt": "Said first."}}  # fmt: skip
    cfg = build_run_config(raw, check_paths=False)
    train, sets = load_train_eval(cfg.data, tok, seed=0)

    def example(record, system_prompt=None):  # the record under lorakit's own keys, read with no options
        path = write_jsonl(tmp_path / "one.jsonl", [record])
        return [x.tolist() for x in load_dataset(path, tok, DataConfig(max_length=64, system_prompt=system_prompt), use_cache=False).example(0)]

    assert [x.tolist() for x in train.example(0)] == example({"prompt": "2 plus 2 is", "completion": " 4"})
    assert [x.tolist() for x in train.example(1)] == example({"messages": chat}, "Be brief.")
    assert tok.decode(train.example(2)[0]) == "1 plus 1 is" + tok.eos_token and (train.example(2)[1][1:] != -100).all()
    assert [x.tolist() for x in sets[""].example(0)] == example({"messages": chat}, "Said first.")  # data.system_prompt
    assert [x.tolist() for x in sets[""].example(1)] == example({"messages": chat})  # the file's null: none
    # eval_generate reads each file as its options say, with its own system prompt
    records = generation_eval_records(cfg, sets, tok)
    assert records[""] == [({"messages": chat}, "Said first."), ({"messages": chat}, None)]
    # the same file with other options is another source, held out on its own
    twice = dataclasses.replace(cfg.data, train=[str(chats), {"path": str(chats), "system_prompt": "Other."}], eval=None,
                                eval_fraction=0.5)  # fmt: skip
    held_train, held = load_train_eval(twice, tok, seed=0)
    assert (len(held_train), len(held[""])) == (1, 1)
    assert {tuple(d.example(0)[0].tolist()) for d in (held_train, held[""])} == {
        tuple(example({"messages": chat}, s)[0]) for s in ("Said first.", "Other.")}  # fmt: skip
    # ... but not with options that equal the data section's: the same source listed twice, its one example held out
    same = dataclasses.replace(twice, train=[str(chats), {"path": str(chats), "system_prompt": "Said first.", "columns": {}}])
    with pytest.raises(UserError) as err:
        load_train_eval(same, tok, seed=0)
    assert str(err.value) == ("data.eval_fraction = 0.5 holds out 1 of 1 examples, leaving none to train on; lower it or "
                              "give data.eval a file")  # fmt: skip
    # a record error caused by a file's own option names that option
    both = write_jsonl(tmp_path / "both.jsonl", [{"question": "2 plus 2 is", "prompt": "x", "answer": " 4"}])
    for entry, message in [
        ({"path": str(qa), "format": "instruction"}, r"qa.jsonl:1: data.train\[1\].format is 'instruction' but the record has keys"),
        ({"path": str(both), "columns": {"prompt": "question"}}, r"both.jsonl:1: the record has both 'prompt' and 'question', "
                                                                  r"which data.train\[1\].columns maps to 'prompt'"),
        ({"path": str(qa), "format": "completion", "columns": {"prompt": "question"}},
         r"data.train\[1\].format is 'completion' .* \(keys as data.train\[1\].columns renames them"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            load_train_eval(dataclasses.replace(cfg.data, train=[str(chats), entry], eval=None), tok, seed=0)
    with pytest.raises(UserError, match=r"qa.jsonl:1: data.format is 'chat'"):  # the data section's, named as such
        load_train_eval(dataclasses.replace(cfg.data, train=[{"path": str(qa), "system_prompt": "S."}], format="chat", eval=None), tok, seed=0)
    # under a preference objective a file's format: auto reads pairs, as data.format: auto does
    from lorakit.train import data_config

    dpo = build_run_config({"model": "m", "data": {"train": [{"path": "p.jsonl", "format": "auto"}, "q.jsonl"], "eval": {
        "a": [{"path": "p.jsonl", "format": "auto"}]}}, "train": {"objective": "kto"}}, check_paths=False).data  # fmt: skip
    assert data_config(dataclasses.replace(cfg, data=dpo, train=dataclasses.replace(cfg.train, objective="kto"))).train == [
        {"path": "p.jsonl", "format": "unpaired"}, "q.jsonl"]  # fmt: skip


@pytest.mark.parametrize("entry, message", [
    ({"columns": {"prompt": "q"}}, "data.train[1]: a file with options of its own names its file as path"),
    ({"path": "b.jsonl", "colums": {}}, "data.train[1].colums: unknown key; did you mean 'columns'? a file's own keys are path, "
                                        "format, columns, system_prompt"),
    ({"path": "b.jsonl", "format": "chats"}, "data.train[1].format = 'chats': use one of auto, text, completion"),
    ({"path": "b.jsonl", "columns": {"promt": "q"}}, "data.train[1].columns: 'promt' is no key of lorakit's records"),
    ({"path": "b.jsonl", "columns": ["prompt"]}, "data.train[1].columns = ['prompt']: expected a mapping of lorakit's key"),
    ({"path": "b.jsonl", "system_prompt": " "}, "data.train[1].system_prompt = ' ': give the system message's text, or null"),
])  # fmt: skip
def test_bad_options_of_a_file_are_config_errors(entry, message):
    from lorakit.config import build_run_config

    for key, value in (("train", ["a.jsonl", entry]), ("eval", {"set": ["a.jsonl", entry]})):
        with pytest.raises(UserError) as err:
            build_run_config({"model": "m", "data": {"train": "a.jsonl", key: value}}, check_paths=False)
        assert message.replace("data.train", f"data.{key}" if key == "train" else "data.eval.set") in str(err.value)


def test_repeat_counts_a_files_examples_as_often_as_it_says(tmp_path):
    tok = make_tokenizer("llama3")
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"{i} plus 1 is", "completion": f" {i + 1}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"line {i}"} for i in range(20)])
    cfg = DataConfig(train=[{"path": str(a), "repeat": 2.5}, {"path": str(b), "repeat": 0.3}], max_length=32,
                     cache_dir=str(tmp_path / "c"))  # fmt: skip
    rows = lambda d: [tuple(d.example(i)[0].tolist()) for i in range(len(d))]  # noqa: E731
    a_rows, b_rows = rows(load_dataset(a, tok, cfg, use_cache=False)), rows(load_dataset(b, tok, cfg, use_cache=False))
    got, _ = load_train_eval(cfg, tok, seed=0)
    assert len(got) == 25 + 6 and got.stats.examples == 31 and got.stats.records == 30  # the files' records, once each
    counts = {r: rows(got)[:25].count(r) for r in a_rows}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # every example twice, a seeded half of them a third time
    assert len(set(rows(got)[25:])) == 6 and set(rows(got)[25:]) <= set(b_rows)  # 30% of b, each once
    assert rows(load_train_eval(cfg, tok, seed=0)[0]) == rows(got)  # the same choice every run ...
    assert rows(load_train_eval(cfg, tok, seed=1)[0])[25:] != rows(got)[25:]  # ... another with another seed
    assert got.record_of(0) == got.record_of(10) == f"{a}:1" and got.record_of(25).startswith(f"{b}:")  # the copies' records
    # repeat: 1 is the file as it is; an integer repeat is the file listed that often
    plain = DataConfig(train=[str(a), str(a), str(a)], max_length=32, cache_dir=cfg.cache_dir)
    assert rows(load_train_eval(dataclasses.replace(cfg, train=[{"path": str(a), "repeat": 3}]), tok, seed=0)[0]) == rows(
        load_train_eval(plain, tok, seed=0)[0])  # fmt: skip
    assert rows(load_train_eval(dataclasses.replace(cfg, train=[{"path": str(a), "repeat": 1}]), tok, seed=0)[0]) == a_rows
    # held out once per file, whatever its repeat: nothing held out is trained on
    mixed = dataclasses.replace(cfg, train=[{"path": str(a), "repeat": 2}, str(a), {"path": str(b), "repeat": 0.5}], eval_fraction=0.2)
    train, sets = load_train_eval(mixed, tok, seed=0)
    held = set(rows(sets[""]))
    assert len(held) == 6 and not held & set(rows(train))
    held_a = len(held & set(a_rows))
    assert len(train) == 3 * (10 - held_a) + round(0.5 * (20 - (6 - held_a)))
    # preference pairs are repeated whole
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} is", "chosen": " yes", "rejected": f" no {i}"} for i in range(8)])
    pairs, _ = load_train_eval(DataConfig(train=[{"path": str(p), "repeat": 0.5}], max_length=32, format="preference"), tok, seed=0)
    assert pairs.stats.pairs == 4 and len(pairs) == 8
    assert all(tok.decode(pairs.example(2 * j)[0]).split(" is")[0] == tok.decode(pairs.example(2 * j + 1)[0]).split(" is")[0]
               for j in range(4))  # fmt: skip
    with pytest.raises(UserError) as err:
        load_train_eval(dataclasses.replace(cfg, train=[str(b), {"path": str(a), "repeat": 0.01}]), tok, seed=0)
    assert str(err.value) == f"data.train[1].repeat = 0.01: takes none of {a}'s 10 examples; raise it to at least 0.1, or leave the file out"


@pytest.mark.parametrize("key, entry, message", [
    ("train", {"path": "b.jsonl", "repeat": 0}, "data.train[1].repeat = 0: give how many times the file's examples count in an "
                                                "epoch, a number above 0 (0.5: a seeded half of them, 2: each twice)"),
    ("train", {"path": "b.jsonl", "repeat": "2"}, "data.train[1].repeat = '2': give how many times"),
    ("train", {"path": "b.jsonl", "repeat": True}, "data.train[1].repeat = True: give how many times"),
    ("train", {"path": "b.jsonl", "repeat": float("inf")}, "data.train[1].repeat = inf: give how many times"),
    ("eval", {"path": "b.jsonl", "repeat": 2}, "data.eval[1].repeat: an eval set is read whole; repeat weights the files of "
                                               "data.train, so remove it here"),
])  # fmt: skip
def test_a_bad_repeat_is_a_config_error(key, entry, message):
    from lorakit.config import build_run_config

    with pytest.raises(UserError) as err:
        build_run_config({"model": "m", "data": {"train": "a.jsonl", key: ["a.jsonl", entry]}}, check_paths=False)
    assert message in str(err.value)


def test_parquet_arrow_csv_and_tsv_tables_read_as_their_jsonl(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet

    tok = make_tokenizer("llama3")
    cfg = DataConfig(max_length=64)
    same = lambda a, b: np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)  # noqa: E731
    # chat messages (a list of structs) and Alpaca records whose empty input is a null cell
    chats = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    alpaca = [{"instruction": "Say hi", "input": None, "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"}]
    for records in (chats, alpaca):
        table = pa.Table.from_pylist(records)
        pyarrow.parquet.write_table(table, tmp_path / "d.parquet")
        with pa.ipc.new_stream(tmp_path / "d.arrow", table.schema) as writer:  # datasets' cache files
            writer.write_table(table)
        want = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if v is not None} for r in records]),
                            tok, cfg, use_cache=False)  # fmt: skip
        for name in ("d.parquet", "d.arrow"):
            assert same(load_dataset(tmp_path / name, tok, cfg, use_cache=False), want), name
    # CSV / TSV: a header, then a record a row (a completion spanning two lines, quoted)
    completions = [{"prompt": "1 plus 1 is", "completion": " 2"}, {"prompt": "a, b and\nc", "completion": " d"}]
    want = load_dataset(write_jsonl(tmp_path / "c.jsonl", completions), tok, cfg, use_cache=False)
    for name, delimiter in (("c.csv", ","), ("c.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "completion"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(completions)
        assert same(load_dataset(tmp_path / name, tok, cfg, use_cache=False), want), name
    # CSV rows are named by the line they start on; a row with more cells than the header (an
    # unquoted comma) is refused; an empty cell is a missing key; a cell may hold a whole document
    long = "word " * 40_000
    (tmp_path / "m.csv").write_text(
        'prompt,completion,text\n"a\nb",c,\n\n,,' + long + '\nHello, world,x,y\n', encoding="utf-8"
    )
    with pytest.raises(UserError, match=r"m.csv:6: 4 cells, more than the header's 3; quote cells that hold the delimiter"):
        load_dataset(tmp_path / "m.csv", tok, cfg, use_cache=False)
    mixed = load_dataset(tmp_path / "m.csv", tok, dataclasses.replace(cfg, skip_invalid=True), use_cache=False)
    assert len(mixed) == 2 and mixed.stats.skipped_lines == [6] and mixed.stats.truncated == 1
    # a bad row is named by its number
    pyarrow.parquet.write_table(pa.Table.from_pylist([{"prompt": "x", "completion": " y"}, {"prompt": "x", "completion": None}]),
                                tmp_path / "bad.parquet")  # fmt: skip
    with pytest.raises(UserError, match=r"bad.parquet:2: "):
        load_dataset(tmp_path / "bad.parquet", tok, cfg, use_cache=False)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"broken.parquet: not a readable parquet file"):
        load_dataset(tmp_path / "broken.parquet", tok, cfg, use_cache=False)


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_table_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
    # the header row (line 1; it was "line 0"), and a row past the text reader's first chunk
    rows = b"".join(b"q%d,a%d\n" % (i, i) for i in range(2, 2000))
    for name, data, line in (("h.csv", b"pro\xffmpt,completion\nq,a\n", 1), ("r.csv", b"prompt,completion\n" + rows + b"q,\xe9\n", 2000),
                             ("r.tsv", b"prompt\tcompletion\nq\t\xe9\n", 2)):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_dataset(tmp_path / name, make_tokenizer("llama3"), DataConfig(skip_invalid=True), use_cache=False)
        reason = "invalid start byte" if line == 1 else "invalid continuation byte"
        assert str(err.value) == f"{tmp_path / name}:{line}: not UTF-8 text ({reason}); save the file as UTF-8"


def test_with_skip_invalid_a_file_of_no_valid_record_counts_its_unreadable_lines_too(tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_text('{"foo": 1}\n{"text": 2}\nnot json\n')
    with pytest.raises(UserError) as err:
        load_dataset(path, make_tokenizer("llama3"), DataConfig(skip_invalid=True), use_cache=False)
    assert str(err.value) == f"{path}: no valid record (3 skipped as invalid, lines [1, 2, 3]); fix the file"
    # with a valid record, the summary's counts hold every skipped line too
    path.write_text('{"text": "ok"}\n{"foo": 1}\nnot json\n')
    stats = load_dataset(path, make_tokenizer("llama3"), DataConfig(skip_invalid=True), use_cache=False).stats
    assert (stats.records, stats.skipped_invalid, stats.skipped_lines) == (3, 2, [2, 3])


def test_a_table_header_naming_a_column_twice_is_refused(tmp_path):
    # a row would keep one of its two cells: "first,second,done" trained as the prompt "second"
    for name, text in (("d.csv", "prompt,prompt,completion\nfirst,second,done\n"), ("d.tsv", "prompt\tcompletion\tprompt\na\tb\tc\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as err:
            load_dataset(tmp_path / name, make_tokenizer("llama3"), DataConfig(), use_cache=False)
        assert str(err.value) == f"{tmp_path / name}:1: the header names the column 'prompt' twice; give each column its own name"


def test_a_csv_file_is_read_as_a_stream_not_held_whole_beside_its_rows(tmp_path):
    # decoding the file whole into a StringIO held its bytes, its text and the StringIO's copy
    # (4 bytes a character) at once, besides the rows read: 6x the file on top of what it reads to
    import tracemalloc

    path = tmp_path / "big.csv"
    path.write_text("prompt,completion\n" + "".join(f"q{i}{'x' * 1000},a{i}{'y' * 1000}\n" for i in range(2000)))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        records, problems = lorakit.data_files._read_csv(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (len(records), problems) == (2000, [])
    assert peak - held < size // 4, (size, held, peak)


def load(tmp_path, records, tok=None, **cfg):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return load_dataset(path, tok if tok is not None else make_tokenizer("llama3"), DataConfig(**cfg), use_cache=False)


OK = {"messages": CHAT[1:3]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"text": "a",}', r"d\.jsonl:2: invalid JSON: .*skip_invalid"),
        ({"question": "q", "answer": "a"}, r"d\.jsonl:2: unknown record format, keys \['answer', 'question'\]; "
         r"expected one of text / prompt\+completion / instruction\+output / messages"),
        ("[1, 2]", r"d\.jsonl:2: expected a JSON object per line, got a list"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, r"d\.jsonl:2: messages\[0\]\.content must be a string, got a list"),
        ({"messages": [{"role": "bot", "content": "a"}]}, r"d\.jsonl:2: messages\[0\]\.role = 'bot': unknown role; use one of system, user, assistant"),
        ({"conversations": [{"from": "robot", "value": "a"}]}, r"conversations\[0\]\.from = 'robot': unknown role; use one of system, human"),
        ({"messages": []}, r"d\.jsonl:2: 'messages' must be a non-empty list .* got an empty list"),
        ({"messages": CHAT[:2]}, r"d\.jsonl:2: the chat ends with a user turn, not an assistant reply .*train_on_inputs: true"),
        ({"prompt": "q", "completion": 4}, r"d\.jsonl:2: 'completion' must be a string, got a number \(4\)"),
        ({"text": ""}, r"d\.jsonl:2: 'text' is empty"),
        # a lone surrogate (json.dumps writes it as the escape \ud800): no character, the tokenizer cannot encode it
        ({"prompt": "a \ud800 b", "completion": "c"}, r"d\.jsonl:2: 'prompt' holds \\ud800, half of a UTF-16 surrogate pair "
         r"and no character \(an escape cut in two\); fix it, or skip invalid records with data\.skip_invalid: true"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\udc00"}]},
         r"d\.jsonl:2: 'messages\[1\]\.content' holds \\udc00"),
    ],
)
def test_invalid_records_name_file_line_and_fix(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, [OK, bad, OK])
    # skip_invalid: skipped, counted, line kept
    ds = load(tmp_path, [OK, bad, OK], skip_invalid=True)
    assert (ds.stats.records, ds.stats.examples, ds.stats.skipped_invalid, ds.stats.skipped_lines) == (3, 2, 1, [2])


def test_a_lone_surrogate_in_a_json_list_or_a_prompts_file_names_its_line(tmp_path):
    from lorakit.generate import read_prompts

    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps(OK) + ",\n" + json.dumps({"text": "x \ud83d"}) + "]")  # an emoji's pair cut in two
    with pytest.raises(UserError, match=r"d\.json:2: 'text' holds \\ud83d, half of a UTF-16 surrogate pair"):
        load_dataset(path, make_tokenizer("llama3"), DataConfig(), use_cache=False)
    ds = load_dataset(path, make_tokenizer("llama3"), DataConfig(skip_invalid=True), use_cache=False)
    assert (ds.stats.records, ds.stats.examples, ds.stats.skipped_invalid, ds.stats.skipped_lines) == (2, 1, 1, [2])
    assert json.loads(json.dumps("\ud83d\ude00")) == "\U0001f600"  # a whole pair is a character, and passes
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok \ud83d\ude00"}, {"prompt": "\ud800"}])
    with pytest.raises(UserError, match=r"p\.jsonl:2: 'prompt' holds \\ud800"):
        read_prompts(prompts)


def test_records_nested_past_the_recursion_limit_are_record_errors(tmp_path):
    from lorakit.generate import read_prompts

    deep = 100_000
    lists, objects = "[" * deep + "]" * deep, '{"a": ' * deep + "1" + "}" * deep
    too_deep = "nested too deeply to read (lists or objects about 1000 levels inside each other, past Python's recursion limit)"
    hint = "fix it, or skip invalid records with data.skip_invalid: true (lorakit eval --skip-invalid)"
    cases = [
        ('{"messages": ' + lists + "}", f"the record is {too_deep}"),
        ('{"text": "x", "meta": ' + objects + "}", f"the record is {too_deep}"),
        ({**OK, "tools": lists}, f"'tools' is a JSON string {too_deep}; give a list of function schemas"),
        ({"messages": [CHAT[1], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": objects}}]}]},
         f"messages[1].tool_calls[0].arguments is a JSON string {too_deep}; give an object"),
    ]  # fmt: skip
    for bad, problem in cases:
        with pytest.raises(UserError) as err:
            load(tmp_path, [OK, bad, OK])
        assert str(err.value) == f"{tmp_path / 'd.jsonl'}:2: {problem}; {hint}"
        ds = load(tmp_path, [OK, bad, OK], skip_invalid=True)
        assert (ds.stats.records, ds.stats.examples, ds.stats.skipped_invalid, ds.stats.skipped_lines) == (3, 2, 1, [2])
    # a JSON list cannot be read on past an element it could not read, so that is never skipped
    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps(OK) + ',\n{"text": "x", "meta": ' + lists + "}]")
    with pytest.raises(UserError) as err:
        load_dataset(path, make_tokenizer("llama3"), DataConfig(skip_invalid=True), use_cache=False)
    assert str(err.value) == f"{path}:2: the list element is {too_deep}; fix that element"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, '{"prompt": "x", "meta": ' + lists + "}"])
    with pytest.raises(UserError) as err:
        read_prompts(prompts)
    assert str(err.value) == f"{prompts}:2: the record is {too_deep}; fix that line"


def test_each_example_knows_the_file_and_line_of_its_record(tmp_path):
    tok = make_tokenizer("llama3")
    cfg = DataConfig(max_length=12, too_long="drop", skip_invalid=True, cache_dir=str(tmp_path / "cache"))
    long = {"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " again"}
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", {"text": 3}, long, {"text": "b"}])
    for _ in range(2):  # tokenized, then from the cache (which keeps the lines, not the file's name)
        ds = load_dataset(path, tok, cfg)
        assert [ds.record_of(i) for i in range(len(ds))] == [f"{path}:1", f"{path}:5"]
    pair = {"prompt": "q", "chosen": " a", "rejected": " b"}
    pairs = load_dataset(write_jsonl(tmp_path / "p.jsonl", [pair, {"prompt": "q"}, pair]), tok, cfg, use_cache=False)
    assert [pairs.record_of(i) for i in range(len(pairs))] == [f"{tmp_path / 'p.jsonl'}:{n}" for n in (1, 1, 3, 3)]
    other = load_dataset(write_jsonl(tmp_path / "e.jsonl", [{"text": "c"}]), tok, cfg, use_cache=False)
    both = TokenizedDataset.concat([ds, other, ds], ["d", "e", "d"]).subset([4, 2, 0])
    assert [both.record_of(i) for i in range(3)] == [f"{path}:5", f"{tmp_path / 'e.jsonl'}:1", f"{path}:1"]
    assert both.files == [str(path), str(tmp_path / "e.jsonl")]


def test_every_problem_is_listed_at_once(tmp_path):
    with pytest.raises(UserError) as err:
        load(tmp_path, [{"text": 1}, OK, {"messages": "hi"}, {"x": 1}])
    msg = str(err.value)
    assert "d.jsonl: 3 invalid records (fix them, or skip invalid records with data.skip_invalid: true" in msg and all(f"d.jsonl:{i}:" in msg for i in (1, 3, 4))


def test_file_level_errors(tmp_path):
    tok = make_tokenizer("llama3")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match=r"empty\.jsonl: the file is empty"):
        load_dataset(empty, tok, DataConfig(), use_cache=False)
    with pytest.raises(UserError, match=r"missing\.jsonl' not found"):
        load_dataset(tmp_path / "missing.jsonl", tok, DataConfig(), use_cache=False)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "a"},\n{"text": "b"\n]')
    with pytest.raises(UserError, match=r"broken\.json:4: invalid JSON: Expecting ',' delimiter"):
        load_dataset(broken, tok, DataConfig(), use_cache=False)
    with pytest.raises(UserError, match=r"d\.jsonl: all 2 examples are longer than data\.max_length = 4 .*too_long: truncate"):
        load(tmp_path, [{"text": "The quick brown fox"}] * 2, max_length=4, too_long="drop")
    with pytest.raises(UserError, match=r"none of the 1 examples has a token to train on within data\.max_length = 4"):
        load(tmp_path, [{"prompt": "The quick brown fox", "completion": " jumps"}], max_length=4)
    with pytest.raises(UserError, match=r"d\.jsonl:1: chat records need a tokenizer with a chat template"):
        load(tmp_path, [OK], make_tokenizer(None))
    with pytest.raises(UserError, match=r"data\.format is 'instruction' but the record has keys \['text'\]"):
        load(tmp_path, [{"text": "a"}], format="instruction")
    with pytest.raises(UserError, match=r"d\.jsonl:1: data\.format is 'chat' but the record has keys \['text'\]; it needs messages"):
        load(tmp_path, [{"text": "a"}], format="chat")
    strict = make_tokenizer("chatml")
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 0 %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match=r"d\.jsonl:1: the chat template failed on this conversation: Conversation roles must alternate"):
        load(tmp_path, [{"messages": CHAT}], strict)


def test_stats_shape():
    fields = {f.name: f.type for f in dataclasses.fields(DataStats)}
    assert list(fields) == [
        "records", "examples", "tokens", "trainable_tokens", "truncated", "dropped_too_long",
        "dropped_no_trainable", "skipped_invalid", "skipped_lines", "empty_replies", "first_empty_reply_line", "pairs", "unpaired",
        "desirable",
    ]


# A template with a variable of its own, as Qwen3's enable_thinking: false writes an empty think block
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\n' }}"
    "{%- if m.role == 'assistant' and enable_thinking is defined and enable_thinking is false %}{{- '<think></think>' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think></think>' }}{%- endif %}{%- endif %}"
)


def test_template_variables_render_as_apply_chat_template_keyword_arguments():
    from lorakit.chat_templates import template_with_variables

    tok = make_tokenizer("chatml")
    tok.chat_template = THINKING_TEMPLATE
    expected = [tok.apply_chat_template(CHAT, tokenize=False, enable_thinking=False),
                tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)]  # fmt: skip
    tok.chat_template = template_with_variables(THINKING_TEMPLATE, {"enable_thinking": False})
    assert [tok.apply_chat_template(CHAT, tokenize=False), tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)] == expected
    assert "<think></think>Four." in expected[0]
    ds = build([{"messages": CHAT}], tok)  # the data renders with them too; the generation prompt holds the think block
    assert ds.example(0)[0].tolist() == tok(expected[0], add_special_tokens=False)["input_ids"]
    assert _trained_groups(tok, ds.example(0)[1]) == ["Four.<|im_end|>", "1 2 3<|im_end|>"]
    # the caller may still say otherwise, as with apply_chat_template's own keyword
    assert "<think>" not in tok.apply_chat_template(CHAT, tokenize=False, enable_thinking=True)
    # set again (a continued adapter's template): the new line comes first and wins, the old one stays
    # for the names it alone sets, and the same line is not written twice
    again = template_with_variables(tok.chat_template, {"enable_thinking": True, "extra": 1})
    assert again.count("data.chat_template_kwargs") == 2 and template_with_variables(again, {"enable_thinking": True, "extra": 1}) == again
    tok.chat_template = again
    assert "<think>" not in tok.apply_chat_template(CHAT, tokenize=False)
    assert template_with_variables(THINKING_TEMPLATE, {}) == THINKING_TEMPLATE
    # every kind of plain value arrives as it was given, and the template's own text is untouched
    values = {"s": "a \"quoted\"\nline é ✓ 😀 {{ x }} %}", "n": None, "f": 0.25, "e": 1.5e-07, "i": -3, "l": [1, "x", False],
              "d": {"k": [None, 2.5]}}  # fmt: skip
    tok.chat_template = template_with_variables("\n\n{{ [s, n, f, e, i, l, d] | tojson }}", values)
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text.startswith("\n\n[") and json.loads(text) == list(values.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"enable-thinking": False}, "data.chat_template_kwargs.enable-thinking: not a template variable's name"),
        ({"messages": []}, "data.chat_template_kwargs.messages: apply_chat_template gives it itself"),
        ({"false": 1}, "data.chat_template_kwargs.false: not a template variable's name"),
        ({"when": "2024-01-01"}, None),
        ({"ratio": float("nan")}, "data.chat_template_kwargs.ratio = nan: give a boolean, number, string"),
    ],
)
def test_bad_chat_template_kwargs_are_config_errors(tmp_path, kwargs, message):
    from lorakit.config import build_run_config

    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    cfg = {"model": str(tmp_path), "data": {"train": str(tmp_path / "t.jsonl"), "chat_template_kwargs": kwargs}}
    if message is None:
        assert build_run_config(cfg).data.chat_template_kwargs == kwargs
        return
    with pytest.raises(UserError, match=re.escape(message)):
        build_run_config(cfg)


def test_a_chat_template_file_is_read_as_data_files_are(tmp_path):
    from lorakit.adapters import read_chat_template
    from lorakit.chat_templates import CHAT_TEMPLATES, chat_template_text

    # saved by a Windows editor: the byte-order mark would start every rendered example
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf" + CHAT_TEMPLATES["chatml"].encode())
    assert chat_template_text(str(tmp_path / "bom.jinja")) == CHAT_TEMPLATES["chatml"]
    (tmp_path / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf{{ messages }}")  # an adapter's copy
    assert read_chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "latin1.jinja").write_bytes("{# caf\u00e9 #}\n{{ messages }}".encode("latin-1"))
    with pytest.raises(UserError) as caught:
        chat_template_text(str(tmp_path / "latin1.jinja"))
    assert str(caught.value) == (f"data.chat_template: {tmp_path / 'latin1.jinja'}:1: not UTF-8 text (invalid continuation "
                                 "byte); save the file as UTF-8")  # fmt: skip
    with pytest.raises(UserError) as caught:
        chat_template_text(str(tmp_path))
    assert str(caught.value) == f"data.chat_template = {str(tmp_path)!r}: cannot read it (Is a directory); give a UTF-8 Jinja file"


def test_a_files_unreadable_lines_and_invalid_records_are_reported_together(tmp_path):
    # one report for the whole file, in line order, not the JSON errors first and the records' after a fix
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n{"foo": 1}\n{"text": 3}\n')
    with pytest.raises(UserError) as err:
        load_dataset(path, make_tokenizer("llama3"), DataConfig(), use_cache=False)
    listed = [line.strip().split(": ", 1)[0] for line in str(err.value).splitlines()[1:]]
    assert str(err.value).startswith(f"{path}: 3 invalid records") and listed == [f"{path}:{i}" for i in (2, 3, 4)]


def test_a_one_line_json_list_numbers_its_records_by_place(tmp_path):
    tok = make_tokenizer("llama3")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"foo": 1}, {"text": 3}, {"text": "b"}]))  # json.dump: one line
    with pytest.raises(UserError) as err:
        load_dataset(path, tok, DataConfig(), use_cache=False)
    listed = [line.strip().split(": ", 1)[0] for line in str(err.value).splitlines()[1:]]
    assert listed == [f"{path}:2", f"{path}:3"]  # each record its own number, in the list's order
    ds = load_dataset(path, tok, DataConfig(skip_invalid=True), use_cache=False)
    assert [ds.record_of(i) for i in range(len(ds))] == [f"{path}:1", f"{path}:4"] and ds.skipped_places() == [f"{path}:2", f"{path}:3"]
    # a list with a record a line is named by lines, as before
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in [{"text": "a"}, {"foo": 1}]) + "\n]\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:3: unknown record format"):
        load_dataset(path, tok, DataConfig(), use_cache=False)
    # a syntax error cannot be skipped, and says so where skipping was asked for
    path.write_text('[{"text": "a"}, {"text": "b",}]')
    with pytest.raises(UserError) as err:
        load_dataset(path, tok, DataConfig(skip_invalid=True), use_cache=False)
    assert str(err.value) == (f"{path}:1: invalid JSON: Expecting property name enclosed in double quotes (column 30) (data.skip_invalid "
                              "cannot skip it: the rest of a list cannot be read past a syntax error); fix the list")  # fmt: skip


@pytest.mark.parametrize("name, text, message", [
    ("one.json", '{\n  "prompt": "q",\n  "completion": "a"\n}\n', "{path}: holds one JSON object written over several lines; a data file "
     "holds one object per line (JSONL) or a JSON list of objects: write each record on one line, or put them in [ ]"),
    ("open.csv", 'prompt,completion\nq,a\n"never closed,b\nq2,a2\n', '{path}:3: a quoted cell of the row starting here is never closed '
     '(the file ends inside it); close its quote, and write a quote inside a quoted cell twice ("")'),
    ("open.tsv", 'prompt\tcompletion\n"q\ty\n', "{path}:2: a quoted cell of the row starting here is never closed"),
    ("after.csv", 'prompt,completion\n"quoted" then more,b\n', "{path}:2: a cell goes on after its closing quote (',' expected after "
     "'\"'); quote the whole cell and write the quotes inside it twice (\"\")"),
    ("empty.csv", "prompt,completion\nq,\n", "{path}:2: unknown record format, keys ['prompt']; expected one of text"),
    ("role.jsonl", '{"messages": [{"content": "hi"}]}\n', "{path}:1: 'messages[0].role' is missing; give the message one of system, user"),
    ("d.jsonl.gz", "x", "data file '{path}' is compressed, which lorakit does not read; decompress it (e.g. gunzip) and give the file"),
])  # fmt: skip
def test_malformed_files_get_a_message_that_names_the_cause(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_dataset(path, make_tokenizer("llama3"), DataConfig(), use_cache=False)
    assert message.format(path=path) in str(err.value)
    if name == "empty.csv":  # the empty cell is named, the likely reason
        assert str(err.value).endswith("(empty cells: completion); fix it, or skip invalid records with data.skip_invalid: true "
                                       "(lorakit eval --skip-invalid)")  # fmt: skip
    with pytest.raises(UserError) as err:
        load_dataset(tmp_path, make_tokenizer("llama3"), DataConfig(), use_cache=False)
    assert str(err.value).startswith(f"data file '{tmp_path}' is a folder; set data.train / data.eval to a file in it")


def test_file_counts_are_each_files_once_however_often_it_is_listed_or_repeated(tmp_path):
    tok = make_tokenizer("llama3")
    long = {"prompt": "a " * 40, "completion": " b"}
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "x " * 40}, {"prompt": "q", "completion": " a"}, {"foo": 1}, long,
                                              {"text": "short"}])  # fmt: skip
    base = DataConfig(max_length=16, skip_invalid=True, cache_dir=str(tmp_path / "c"))
    counts = lambda d: (d.stats.records, d.stats.truncated, d.stats.dropped_no_trainable, d.stats.skipped_invalid, d.skipped_places())  # noqa: E731
    once = load_dataset(path, tok, base, use_cache=False)
    assert counts(once) == (5, 1, 1, 1, [f"{path}:3"])  # the text cut, the long prompt left nothing to train
    for train in ([str(path)] * 3, [{"path": str(path), "repeat": 3}], [{"path": str(path), "repeat": 0.5}],
                  [str(path), {"path": str(path), "repeat": 2}]):  # fmt: skip
        got, _ = load_train_eval(dataclasses.replace(base, train=train), tok, seed=0)
        assert counts(got) == counts(once), train
    assert load_train_eval(dataclasses.replace(base, train=[str(path)] * 3), tok, seed=0)[0].stats.examples == 3 * once.stats.examples
    held, sets = load_train_eval(dataclasses.replace(base, train=[str(path)] * 2, eval_fraction=0.34), tok, seed=0)
    assert counts(held) == counts(once) and len(sets[""]) == 1  # before eval_fraction holds any out
    # another file's places follow the first's; an eval file's are its own
    other = write_jsonl(tmp_path / "g.jsonl", [{"text": "fine"}, {"bar": 2}])
    got, sets = load_train_eval(dataclasses.replace(base, train=[str(path), str(other)], eval=[str(other), str(other)]), tok, seed=0)
    assert got.skipped_places() == [f"{path}:3", f"{other}:2"] and got.stats.skipped_invalid == 2
    assert sets[""].skipped_places() == [f"{other}:2"] and sets[""].stats.skipped_invalid == 1 and len(sets[""]) == 2


def test_the_data_cache_is_under_lorakit_cache_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "root"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    load_dataset(path, make_tokenizer("llama3"), DataConfig())
    assert [p.parent for p in (tmp_path / "root").rglob("*.npz")] == [tmp_path / "root" / "data"]


def test_the_summary_says_why_examples_were_dropped():
    from lorakit.train import _dropped

    stats = {"truncated": 1, "dropped_too_long": 2, "dropped_no_trainable": 1}
    assert _dropped(stats) == "truncated 1, dropped 3 (2 longer than max_length, 1 with no token to train within max_length)"
    assert _dropped({"truncated": 0, "dropped_too_long": 0, "dropped_no_trainable": 0}) == "truncated 0, dropped 0"
    pairs = {"truncated": 0, "dropped_too_long": 0, "dropped_no_trainable": 4, "pairs": 3}
    assert _dropped(pairs) == "truncated 0 answers, dropped 2 pairs (4 answers with no token to train within max_length)"


def test_show_example_marks_runs_without_changing_the_text():
    # A SentencePiece-style decoder strips one space from a text's start (Llama's, Mistral's): each
    # run is what it adds to the text before it, so the space before a trained reply stays, and a
    # character whose bytes two runs share is written once, whole
    from tokenizers import decoders

    from lorakit.data import show_example

    tok = make_tokenizer(template=None)
    tok.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    ids = tok("Hi there[/INST] You are welcome. café", add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    reply, accent = tokens.index("Y") - 1, tokens.index("Ã")  # "Ġ" before "You"; é is "Ã", "©"
    labels = np.array([i if reply <= k <= accent else -100 for k, i in enumerate(ids)])
    shown = show_example(tok, np.array(ids), labels)
    assert shown.replace("⟦", "").replace("⟧", "") == tok.decode(ids) == "Hi there[/INST] You are welcome. café"
    assert shown == "Hi there[/INST]⟦ You are welcome. caf⟧é"
