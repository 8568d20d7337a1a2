"""Tool use in chat data: OpenAI's fine-tuning layout (assistant `tool_calls`, `tool` turns, the
record's `tools`), ShareGPT's function_call / observation turns, messages' other keys, and the
tool-call answers of generation eval."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tokenizer
from test_data import _trained_groups as trained_groups

from lorakit.config import DataConfig
from lorakit.data import tokenize_records
from lorakit.records import BadRecord, prepare_record
from lorakit.errors import UserError
from lorakit.evaluate import prompt_and_answer, tool_call_answer
from lorakit.generate import read_prompts, render_prompt

# A ChatML template that writes the tools into the system turn and each call as <tool_call>JSON</tool_call>
# after the reply's content (the layout of Qwen's); {% generation %} marks what an assistant writes, for
# transformers' own assistant mask (return_assistant_tokens_mask), the reference of the labels.
TOOLS_TEMPLATE_TAGGED = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}"
    "{%- endif %}{{- 'Tools:\n' }}{%- for tool in tools %}{{- tool | tojson }}{{- '\n' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}"
    "{%- if m.reasoning_content %}{{- '<think>' + m.reasoning_content + '</think>' }}{%- endif %}{{- m.content }}"
    "{%- for call in m.tool_calls or [] %}{{- '<tool_call>' + call.function | tojson + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- elif m.role != 'system' %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
TOOLS_TEMPLATE = TOOLS_TEMPLATE_TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")

FUNCTION = {
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": FUNCTION}]
# OpenAI's layout: the arguments a JSON string, the content null beside the calls
OPENAI_CHAT = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 degrees."},
]  # fmt: skip
# what the template is given: transformers' layout (the arguments an object)
RENDERED_CHAT = [
    OPENAI_CHAT[0],
    OPENAI_CHAT[1],
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    OPENAI_CHAT[3],
    OPENAI_CHAT[4],
]  # fmt: skip
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALL_ROME = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}


def tools_tokenizer():
    tok = make_tokenizer("chatml")
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def build(records, tok=None, **cfg):
    tok = tok if tok is not None else tools_tokenizer()
    return tokenize_records(list(enumerate(records, start=1)), tok, DataConfig(**cfg), source="d.jsonl")


def test_tool_calls_render_as_apply_chat_template_and_the_calls_are_trained():
    tok = tools_tokenizer()
    ds = build([{"messages": OPENAI_CHAT, "tools": TOOLS}], tok)
    ids, labels = ds.example(0)
    assert ids.tolist() == tok.apply_chat_template(RENDERED_CHAT, tools=TOOLS)["input_ids"]
    ref = tok.apply_chat_template(RENDERED_CHAT, tools=TOOLS, chat_template=TOOLS_TEMPLATE_TAGGED, return_dict=True,
                                  return_assistant_tokens_mask=True)  # fmt: skip
    assert ref["input_ids"] == ids.tolist()
    expected = [t if m == 1 else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
    assert labels.tolist() == expected
    # the call is trained, the tool's result and the tools' schemas are not
    assert trained_groups(tok, labels) == [CALL_TEXT + "<|im_end|>", "21 degrees.<|im_end|>"]
    assert '"get_weather"' in tok.decode(ids)


def test_the_layouts_of_a_tool_call_give_the_same_example():
    tok = tools_tokenizer()
    sharegpt = {  # LLaMA-Factory's: the call and the tools as JSON strings, the tools bare functions
        "conversations": [
            {"from": "system", "value": OPENAI_CHAT[0]["content"]},
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "{\"temp\": 21}"},
            {"from": "gpt", "value": "21 degrees."},
        ],
        "tools": json.dumps([FUNCTION]),
    }
    records = [
        {"messages": OPENAI_CHAT, "tools": TOOLS},
        {"messages": RENDERED_CHAT, "tools": [FUNCTION]},  # a bare function schema is wrapped
        sharegpt,
        {"messages": [*OPENAI_CHAT[:2], {"role": "assistant", "tool_calls": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                      *OPENAI_CHAT[3:]], "tools": json.dumps(TOOLS)},  # one bare call, no content
    ]  # fmt: skip
    ds = build(records, tok)
    first = [a.tolist() for a in ds.example(0)]
    for i in range(1, len(records)):
        assert [a.tolist() for a in ds.example(i)] == first, i


def test_messages_keep_their_other_keys_for_the_template_and_drop_null_ones():
    tok = tools_tokenizer()
    reasoning = [
        {"role": "user", "content": "Weather in Paris?", "name": None, "tool_calls": None},  # a table's empty cells
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is July.", "weight": 1, "tool_calls": []},
    ]
    ds = build([{"messages": reasoning}], tok)
    rendered = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is July."}]
    assert ds.example(0)[0].tolist() == tok.apply_chat_template(rendered)["input_ids"]
    assert trained_groups(tok, ds.example(0)[1]) == ["<think>It is July.</think>Sunny.<|im_end|>"]
    kind, chat = prepare_record({"messages": reasoning}, "auto", False)
    assert chat.messages == rendered and chat.tools is None


def test_a_preference_pair_with_tools_gives_each_answer_the_tools():
    tok = tools_tokenizer()
    call = RENDERED_CHAT[2]
    record = {"prompt": OPENAI_CHAT[:2], "chosen": [call], "rejected": "It is sunny.", "tools": TOOLS}
    ds = build([record], tok, format="preference")
    for i, answer in enumerate([call, {"role": "assistant", "content": "It is sunny."}]):
        ids, labels = ds.example(i)
        assert ids.tolist() == tok.apply_chat_template([*OPENAI_CHAT[:2], answer], tools=TOOLS)["input_ids"]
    assert trained_groups(tok, ds.example(0)[1]) == [CALL_TEXT + "<|im_end|>"]
    with pytest.raises(BadRecord, match="tools go with chat messages"):
        prepare_record({"prompt": "Weather?", "chosen": "a", "rejected": "b", "tools": TOOLS}, "auto", False)


@pytest.mark.parametrize(
    "messages, tools, message",
    [
        ([{"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}, {"role": "assistant", "content": "y"}],
         None, r"messages\[0\]\.tool_calls: only assistant turns call tools, not this user turn"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}],
         None, r"messages\[1\]\.tool_calls\[0\]\.arguments is a string but not JSON"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]}],
         None, r"messages\[1\]\.tool_calls\[0\]\.arguments must be an object \(or its JSON\), got a list"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}],
         None, r"messages\[1\]\.tool_calls\[0\] must be a call with a function 'name'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], None, r"messages\[1\]\.content must be a string"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], {"name": "f"}, r"'tools' must be a list of function schemas"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], [{"parameters": {}}], r"tools\[0\] must be a function schema with a 'name'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "[{", r"'tools' is a string but not JSON"),
        # a result with no call before it, or answering another call; a call to a function the tools do not define
        ([OPENAI_CHAT[1], OPENAI_CHAT[3], OPENAI_CHAT[4]], None, r"messages\[1\] is a tool result with no assistant turn before it"),
        ([*OPENAI_CHAT[:3], {**OPENAI_CHAT[3], "tool_call_id": "c2"}, OPENAI_CHAT[4]], None,
         r"messages\[3\]\.tool_call_id = 'c2' answers no call of the assistant turn before it \(ids c1\)"),
        (OPENAI_CHAT, [{"type": "function", "function": {"name": "get_time"}}],
         r"messages\[2\]\.tool_calls\[0\] calls 'get_weather', which the record's 'tools' do not define \(get_time\)"),
    ],
)  # fmt: skip
def test_bad_tool_data_names_the_place_and_the_fix(messages, tools, message):
    record = {"messages": messages} if tools is None else {"messages": messages, "tools": tools}
    with pytest.raises(UserError, match=r"d\.jsonl:1: " + message):
        build([record])


def test_a_tool_result_may_answer_calls_written_in_the_assistants_text():
    # Hermes' function-calling data (ShareGPT): the call is the gpt turn's text, the result a tool turn
    conversation = [{"from": "human", "value": "Weather in Paris?"},
                    {"from": "gpt", "value": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'},
                    {"from": "tool", "value": '<tool_response>{"temp": 21}</tool_response>'},
                    {"from": "gpt", "value": "21 degrees."}]  # fmt: skip
    assert len(build([{"conversations": conversation}], make_tokenizer("chatml"))) == 1


def test_tool_results_may_follow_each_other_after_one_turn_of_calls():
    calls = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}  # fmt: skip
    results = [{"role": "tool", "tool_call_id": i, "content": t} for i, t in (("b", "25"), ("a", "21"))]
    ds = build([{"messages": [OPENAI_CHAT[1], calls, *results, {"role": "assistant", "content": "21 and 25."}], "tools": TOOLS}])
    assert len(ds) == 1


def test_a_sharegpt_function_call_that_is_not_json_is_a_bad_record():
    record = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get_weather(Paris)"}]}
    with pytest.raises(UserError, match=r"d\.jsonl:1: conversations\[1\]\.value is not JSON"):
        build([record])


def test_a_template_that_never_reads_tools_or_calls_is_refused():
    chatml = make_tokenizer("chatml")
    with pytest.raises(UserError, match=r"d\.jsonl:2: the record has 'tools', but the chat template never reads `tools`"):
        build([{"messages": OPENAI_CHAT[1:2] + [OPENAI_CHAT[4]]}, {"messages": OPENAI_CHAT[1:2] + [OPENAI_CHAT[4]], "tools": TOOLS}], chatml)
    with pytest.raises(UserError, match=r"d\.jsonl:1: the record has assistant turns with 'tool_calls', but the chat template never reads `tool_calls`"):
        build([{"messages": OPENAI_CHAT}], chatml)


# Phi-3's way: a branch per role it knows, so a `tool` turn is passed over without a word
ROLES_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}<|system|>{{ m.content }}<|end|>{% elif m.role == 'user' %}"
    "<|user|>{{ m.content }}<|end|>{% elif m.role == 'assistant' %}<|assistant|>{{ m.content }}{% for c in m.tool_calls or [] %}"
    "{{ c.function | tojson }}{% endfor %}<|end|>{% elif m.role == 'tool' and json_tools %}<|tool|>{{ m.content | tojson }}"
    "<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_leaves_out_tool_turns_is_refused_and_one_that_writes_them_as_json_is_not():
    tok = make_tokenizer("chatml")
    tok.chat_template = ROLES_TEMPLATE.replace("{{ c.function | tojson }}", "{{ c.function | tojson }}{# tools #}")
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    chat = [{"role": "user", "content": "Weather in Paris?"}, call, {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "21 degrees."}]  # fmt: skip
    plain = {"messages": [chat[0], chat[3]]}
    for train_on_inputs in (False, True):
        with pytest.raises(UserError, match=r"d\.jsonl:2: messages\[2\]: the chat template leaves this 'tool' turn's content "
                                            r"out of the text; use a template that writes 'tool' turns \(data\.chat_template\)"):  # fmt: skip
            build([plain, {"messages": chat}], tok, train_on_inputs=train_on_inputs)
    ds = build([plain, {"messages": chat}], tok, skip_invalid=True)
    assert (ds.stats.examples, ds.stats.skipped_invalid) == (1, 1)
    # Llama 3.1's way: the tool's result written as a JSON string, quotes escaped; it is there
    tok.chat_template = tok.chat_template.replace("json_tools", "true")
    ids, labels = build([{"messages": chat}], tok).example(0)
    assert '<|tool|>"{\\"temp\\": 21}"<|end|>' in tok.decode(ids)
    assert trained_groups(tok, labels)[-1] == "21 degrees.<|end|>"


def test_data_columns_name_the_records_tools():
    a = build([{"messages": OPENAI_CHAT, "functions": TOOLS}], columns={"tools": "functions"})
    b = build([{"messages": OPENAI_CHAT, "tools": TOOLS}])
    assert [x.tolist() for x in a.example(0)] == [x.tolist() for x in b.example(0)]


def test_generation_eval_compares_a_tool_call_with_the_turn_the_template_writes():
    tok = tools_tokenizer()
    prompt, expected, is_chat = prompt_and_answer({"messages": OPENAI_CHAT[:3], "tools": TOOLS})
    assert is_chat and prompt == {"messages": RENDERED_CHAT[:2], "tools": TOOLS}
    assert expected == RENDERED_CHAT[2]
    assert tool_call_answer(tok, prompt, expected) == CALL_TEXT
    # the prompt is rendered with its tools, as training rendered it
    assert render_prompt(tok, prompt, chat=True) == tok.apply_chat_template(RENDERED_CHAT[:2], tools=TOOLS, add_generation_prompt=True)["input_ids"]
    # a plain answer stays its content
    assert prompt_and_answer({"messages": OPENAI_CHAT, "tools": TOOLS})[1] == "21 degrees."


def test_generate_reads_prompts_with_their_tools(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"messages": OPENAI_CHAT[:4], "tools": [FUNCTION]}, {"messages": OPENAI_CHAT[:2]}]  # the calls in OpenAI's layout
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_prompts(path) == [{"messages": RENDERED_CHAT[:4], "tools": TOOLS}, OPENAI_CHAT[:2]]  # read as training reads them
    path.write_text(json.dumps({"messages": OPENAI_CHAT[:2], "tools": {"name": "f"}}) + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:1: 'tools' must be a list of function schemas"):
        read_prompts(path)


def test_a_tokenizer_with_a_tool_use_template_renders_the_chats_with_tools_with_it():
    tok = make_tokenizer("chatml")
    tok.chat_template = {"default": tok.chat_template, "tool_use": TOOLS_TEMPLATE}  # as apply_chat_template picks
    plain = OPENAI_CHAT[1:2] + [OPENAI_CHAT[4]]
    ds = build([{"messages": plain}, {"messages": OPENAI_CHAT, "tools": TOOLS}], tok)
    assert ds.example(0)[0].tolist() == tok.apply_chat_template(plain)["input_ids"]
    assert ds.example(1)[0].tolist() == tok.apply_chat_template(RENDERED_CHAT, tools=TOOLS)["input_ids"]
    assert trained_groups(tok, ds.example(1)[1]) == [CALL_TEXT + "<|im_end|>", "21 degrees.<|im_end|>"]
    with pytest.raises(UserError, match="never reads `tool_calls`"):  # calls without tools: the default template
        build([{"messages": OPENAI_CHAT}], tok)


# Templates that render a conversation otherwise than its prefixes, with tool calls, written here after the
# behaviour of Qwen3's (an empty think block in the assistant turns after the last user turn only),
# Hermes-2-Pro's (the last tool result written without the newline the others get) and Mistral's (the
# system prompt and the tools at the last user turn; no generation prompt).
REWRITING_TOOL_TEMPLATES = {
    "qwen3": (
        "{%- if tools %}{{- '<|im_start|>system\nTools: ' + tools | tojson + '<|im_end|>\n' }}{%- endif %}"
        "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
        "{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}"
        "{%- if loop.index0 > ns.last_user %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{{- m.content }}"
        "{%- for call in m.tool_calls or [] %}{{- '\n<tool_call>' + call.function | tojson + '</tool_call>' }}{%- endfor %}"
        "{{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    "hermes": (
        "{%- if tools %}{{- '<|im_start|>system\nTools: ' + tools | tojson + '<|im_end|>\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}{{- m.content }}"
        "{%- for call in m.tool_calls or [] %}{{- '<tool_call>' + call.function | tojson + '</tool_call>' }}{%- endfor %}"
        "{{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
        "{%- elif m.role == 'tool' %}{{- '<|im_start|>tool\n' + m.content + '<|im_end|>' }}{%- if not loop.last %}{{- '\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set turns = messages %}{%- endif %}"
        "{%- set ns = namespace(last_user=-1) %}{%- for m in turns %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
        "{%- endif %}{%- endfor %}{{- bos_token }}{%- for m in turns %}{%- if m.role == 'user' %}"
        "{%- if loop.index0 == ns.last_user and tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
        "{{- '[INST]' }}{%- if loop.index0 == ns.last_user and system is defined %}{{- system + '\n\n' }}{%- endif %}{{- m.content + '[/INST]' }}"
        "{%- elif m.role == 'tool' %}{{- '[TOOL_RESULTS]' + m.content + '[/TOOL_RESULTS]' }}"
        "{%- elif m.tool_calls %}{% generation %}{{- '[TOOL_CALLS]' + m.tool_calls | map(attribute='function') | list | tojson + eos_token }}"
        "{% endgeneration %}{%- else %}{% generation %}{{- m.content + eos_token }}{% endgeneration %}{%- endif %}{%- endfor %}"
    ),
}


@pytest.mark.parametrize("name", sorted(REWRITING_TOOL_TEMPLATES))
def test_tool_calls_in_templates_that_rewrite_earlier_turns_are_trained_as_the_template_writes_them(name):
    tagged = REWRITING_TOOL_TEMPLATES[name]
    tok = make_tokenizer("chatml")
    tok.chat_template, tok.eos_token = tagged.replace("{% generation %}", "").replace("{% endgeneration %}", ""), "<|im_end|>"
    # a call after another call's result, a turn of text and calls, and a later user turn
    chat = [*RENDERED_CHAT[:2], {**RENDERED_CHAT[2], "content": "Let me look."}, RENDERED_CHAT[3],
            {**RENDERED_CHAT[2], "tool_calls": [CALL_ROME]}, {"role": "tool", "content": "{\"temp\": 25}"},
            {"role": "assistant", "content": "21 and 25 degrees."}, {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]  # fmt: skip
    ds = build([{"messages": chat, "tools": TOOLS}], tok)
    ids, labels = ds.example(0)
    assert ids.tolist() == tok.apply_chat_template(chat, tools=TOOLS)["input_ids"]
    ref = tok.apply_chat_template(chat, tools=TOOLS, chat_template=tagged, return_dict=True, return_assistant_tokens_mask=True)
    mask = [t if m == 1 else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"])]
    # each call is trained whole, as the template writes it, with its end of turn; the tool results are not
    groups = trained_groups(tok, labels)
    assert groups == trained_groups(tok, torch.tensor(mask)), (groups, trained_groups(tok, torch.tensor(mask)))
    assert sum("get_weather" in g for g in groups) == 2 and not any("temp" in g for g in groups)


def test_a_template_that_writes_calls_only_in_the_last_turn_is_refused():
    tok = tools_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE.replace("{%- for call in m.tool_calls or [] %}", "{%- for call in (m.tool_calls if loop.last else []) or [] %}")
    with pytest.raises(UserError, match=r"d\.jsonl:1: messages\[2\]: .*its tool calls are not written as the template writes the turn alone"):
        build([{"messages": OPENAI_CHAT, "tools": TOOLS}], tok)


def test_older_and_table_layouts_of_calls_read_as_openais():
    tok = tools_tokenizer()
    legacy = {  # OpenAI's function_call / functions / role "function"
        "messages": [*OPENAI_CHAT[:2], {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                     {"role": "function", "name": "get_weather", "content": "{\"temp\": 21}"}, OPENAI_CHAT[4]],
        "functions": [FUNCTION],
    }  # fmt: skip
    kind, chat = prepare_record(legacy, "auto", False)
    assert chat.tools == TOOLS and chat.messages[2]["tool_calls"] == [{"type": "function", "function": RENDERED_CHAT[2]["tool_calls"][0]["function"]}]
    assert chat.messages[3] == {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"}
    # a bare call keeps its id beside the function; "[]" and "" are no calls
    _, chat = prepare_record({"messages": [OPENAI_CHAT[1], {"role": "assistant", "tool_calls": [{"id": "c1", "name": "f", "arguments": {}}]}]}, "auto", False)
    assert chat.messages[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]
    for none in ("[]", ""):
        _, chat = prepare_record({"messages": [OPENAI_CHAT[1], {"role": "assistant", "content": "x", "tool_calls": none}]}, "auto", False)
        assert chat.messages[1] == {"role": "assistant", "content": "x"}
    # tools beside records without a chat template to give them to
    with pytest.raises(UserError, match=r"d\.jsonl:1: 'tools' is given to a completion record"):
        build([{"prompt": "Weather?", "completion": " Sunny.", "tools": TOOLS}], tok)


def test_a_parquet_table_of_tool_calls_reads_as_its_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    from lorakit.data_files import read_records

    records = [{"messages": OPENAI_CHAT, "tools": TOOLS},
               {"messages": [OPENAI_CHAT[1], {"role": "assistant", "content": "ok", "tool_calls": [
                   {"type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}]}],
                "tools": [{"type": "function", "function": {"name": "get_time", "description": "Now"}}]}]  # fmt: skip
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "t.parquet")  # one struct type: the union of keys
    read = [r for _, r in read_records(tmp_path / "t.parquet")]
    assert [prepare_record(r, "auto", False) for r in read] == [prepare_record(r, "auto", False) for r in records]


def test_generation_eval_leaves_out_the_tool_calls_the_template_fails_on_where_the_loss_skips_them():
    from helpers import tiny_llama

    from lorakit.evaluate import generation_accuracy

    tok = tools_tokenizer()  # a template that refuses calls without an id, as Mistral's does
    tok.chat_template = TOOLS_TEMPLATE.replace(
        "{%- for call in m.tool_calls or [] %}", "{%- for call in m.tool_calls or [] %}{%- if call.id is not defined %}"
        "{{- raise_exception('a tool call needs an id') }}{%- endif %}")  # fmt: skip
    good = {"messages": OPENAI_CHAT[:3], "tools": TOOLS}
    bad = {"messages": [*OPENAI_CHAT[:2], {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {}}]}], "tools": TOOLS}
    assert len(build([good, bad], tok, skip_invalid=True)) == 1  # the loss skips it
    model = tiny_llama(vocab_size=len(tok))
    got = generation_accuracy(model, tok, [good, bad], max_new_tokens=2, skip_invalid=True)
    assert got["total"] == 1
    with pytest.raises(UserError, match=r"record 2: the chat template failed on a conversation with tool calls \(a tool call needs an id\)"):
        generation_accuracy(model, tok, [good, bad], max_new_tokens=2)
