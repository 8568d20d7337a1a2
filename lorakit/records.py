"""Records -> what to train: the prompt and answer of a plain record, or the messages of a chat
(with the turns left untrained), each checked; a bad record raises `BadRecord`, which the caller
names by file and line.

Record formats, detected per record from its keys (a file may mix them, preference records
aside) or forced with `data.format`:

- text:        `{"text": str}`; loss on every token (continued pre-training).
- completion:  `{"prompt": str, "completion": str}`; the two strings are joined as they are
               (put the separator, a space or newline, in either); loss on the completion.
- instruction: `{"instruction": str, "input": str (optional), "output": str}` (Alpaca), rendered as

                   ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}

               with the Input block left out when `input` is missing or empty; loss on the output.
- chat:        `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}` or
               ShareGPT's `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`,
               rendered with the tokenizer's own chat template; loss on the assistant turns only
               (not on those marked `"weight": 0`, OpenAI's format; with `train_turns: last`, on the
               last one only). Tool use as in OpenAI's fine-tuning format: assistant turns with
               `tool_calls`, `tool` turns with the results, and the record's `tools` (JSON schemas)
               given to the template; a message's other keys (`name`, `reasoning_content`, ...) reach
               the template as they are. ShareGPT's `function_call` / `observation` turns
               (LLaMA-Factory's) are an assistant's tool call and a tool's result.
- preference:  `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`
               (or whole conversations without a prompt): two examples, prompt + each answer, as
               completion or chat examples with the loss on the answer only; a file of them holds
               nothing else, and its examples come in pairs (`TokenizedDataset.pairs`). A record
               with chat `messages` beside its pair is chat unless `data.format: preference`.
- unpaired:    `{"prompt": str | messages, "completion": str | messages, "label": bool}` (KTO's;
               detected when `label` reads as a boolean, or forced with `data.format: unpaired`): a pair of examples, prompt + completion and the
               KL example, the prompt with the completion of the record before it (the first: of
               the last); `TokenizedDataset.desirable` holds the labels.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional

from lorakit.data_files import TOO_DEEP, kind_of


FORMATS = ("text", "completion", "instruction", "chat", "preference", "unpaired")
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "assistant", "observation": "tool", "tool": "tool"}  # fmt: skip
_FORMAT_KEYS = {
    "text": "text",
    "completion": "prompt + completion",
    "instruction": "instruction + output (input optional)",
    "chat": "messages (or ShareGPT conversations)",
    "preference": "chosen + rejected (and a prompt)",
    "unpaired": "prompt + completion + label",
}
_REQUIRED = {
    "text": ("text",), "completion": ("prompt", "completion"), "instruction": ("instruction", "output"), "chat": (),
    "preference": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
}  # fmt: skip


def rename_columns(record: dict, columns: dict[str, str], *, source: str = "data.columns") -> dict:
    """The record with its keys named as lorakit reads them: `columns` maps lorakit's key to the
    records' own name for it (data.columns, e.g. {"prompt": "question"}); names the record lacks
    are passed over, so one mapping serves files of several layouts.

    Raises:
        BadRecord: the record holds both a name and the key it is mapped to.
    """
    if not columns:
        return record
    taken = {name: key for key, name in columns.items() if name in record}
    out = {k: v for k, v in record.items() if k not in taken}
    for name, key in taken.items():
        if key in out:
            raise BadRecord(
                f"the record has both {key!r} and {name!r}, which {source} maps to {key!r}; "
                f"drop one of them from the data, or {key!r} from {source}"
            )
        out[key] = record[name]
    return out


def system_first(messages: list[dict], text: Optional[str]) -> list[dict]:
    """`messages` with a system message `text` (data.system_prompt) put first, where they have no
    system turn of their own; `messages` itself where nothing is added."""
    if text is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": text}, *messages]


def with_system_prompt(chat: "Chat", text: Optional[str]) -> "Chat":
    """A chat with a system message `text` put first (`system_first`); the indices of its
    untrained turns follow."""
    messages = system_first(chat.messages, text)
    if messages is chat.messages:
        return chat
    return chat._replace(messages=messages, untrained=tuple(i + 1 for i in chat.untrained))


def detect_format(record: dict) -> str | None:
    """"chat", "preference", "unpaired", "instruction", "completion" or "text" from the record's
    keys; None if none fits. A record with chat messages beside chosen/rejected answers (UltraFeedback's layout)
    is chat here; `data.format: preference` (which preference objectives set) reads its pair."""
    if "messages" in record or "conversations" in record:
        return "chat"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "prompt" in record and "completion" in record and read_label(record.get("label")) is not None:
        # TRL's unpaired preference (KTO) records, labelled as read_label reads them (a CSV's "false" too):
        # not SFT data, whose undesirable answers would train
        return "unpaired"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


class BadRecord(Exception):
    """A record a user must fix; becomes `FILE:LINE: message` (or is skipped)."""


class Chat(NamedTuple):
    """A chat example before rendering."""

    messages: list[dict]
    untrained: tuple[int, ...] = ()  # indices of the assistant turns not trained
    tools: Optional[list[dict]] = None  # the JSON schemas given to the template as `tools`


def says_nothing_trained(chat: Chat, writes_reasoning: bool) -> bool:
    """Whether a trained assistant turn of `chat` has no text (templates trim it), no tool call and
    no reasoning the template writes (`writes_reasoning`): it would teach the model to end its turn
    at once."""
    for i, msg in enumerate(chat.messages):
        if msg["role"] != "assistant" or i in chat.untrained or msg["content"].strip() or msg.get("tool_calls"):
            continue
        reasoning = msg.get("reasoning_content")
        if not (writes_reasoning and isinstance(reasoning, str) and reasoning.strip()):
            return True
    return False


def _string(record: dict, key: str, where: str = "", *, empty_ok: bool = False) -> str:
    value = record.get(key)
    name = f"{where}{key}"
    if not isinstance(value, str):
        raise BadRecord(f"'{name}' is missing" if key not in record else f"'{name}' must be a string, got {kind_of(value)}")
    if not empty_ok and not value:
        raise BadRecord(f"'{name}' is empty; give it text or remove the record")
    return value


def prepare_record(
    record: dict, fmt: str, train_on_inputs: bool, train_turns: str = "all", *, format_key: str = "data.format"
) -> tuple[str, Any]:
    """Validate one record -> (format, (text, prompt_chars)), ("chat", Chat), ("preference",
    [chosen, rejected]), each of those a completion or chat (format, payload), or ("unpaired",
    (record, its own completion or chat (format, payload))). train_turns: "all" or
    "last", the assistant turns of a chat record trained (those with weight 0 never are).
    format_key: where `fmt` was set, for messages (a data list's file may set its own).

    Raises:
        BadRecord: unknown format, wrong types, unknown roles, empty values.
    """
    found = detect_format(record)
    if fmt == "auto":
        if found is None:
            raise BadRecord(
                f"unknown record format, keys {sorted(record)}; "
                "expected one of text / prompt+completion / instruction+output / messages / prompt+chosen+rejected"
            )
        fmt = found
    elif not _has_keys(record, fmt):
        if fmt == "preference":
            hint = "; labelled records (prompt, completion, label) train with train.objective: kto" if "label" in record else ""
            raise BadRecord(f"not a preference record: keys {sorted(record)}; a pair needs chosen and rejected (and a prompt){hint}")
        raise BadRecord(f"{format_key} is '{fmt}' but the record has keys {sorted(record)}; it needs {_FORMAT_KEYS[fmt]}")
    if fmt in ("text", "completion", "instruction") and record_tools(record) is not None:
        raise BadRecord(f"'tools' is given to a {fmt} record, which has no chat template to give them to; tools go "
                        "with chat messages (or leave them out)")  # fmt: skip
    if fmt == "text":
        return fmt, (_string(record, "text"), 0)
    if fmt == "completion":
        prompt = _string(record, "prompt", empty_ok=True)
        return fmt, (prompt + _string(record, "completion"), len(prompt))
    if fmt == "instruction":
        instruction = _string(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRecord(f"'input' must be a string or missing, got {kind_of(extra)}")
        if extra:
            prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction, input=extra)
        else:
            prompt = INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=instruction)
        return fmt, (prompt + _string(record, "output"), len(prompt))
    if fmt == "preference":
        return fmt, with_tools(preference_pair(record), record)
    if fmt == "unpaired":
        if read_label(record["label"]) is None:
            raise BadRecord(
                f"'label' must be true (a desirable completion) or false (also 1 / 0, \"true\" / \"false\"), "
                f"got {kind_of(record['label'])}"
            )
        try:
            own = preference_pair({"prompt": record["prompt"], "chosen": record["completion"], "rejected": record["completion"]})
        except BadRecord as exc:  # read as a pair: its words name the pair's keys
            raise BadRecord(str(exc).replace("'chosen'", "'completion'")) from None
        return fmt, (record, with_tools([own[0]], record)[0])
    messages = _messages(record, train_on_inputs)
    tools = record_tools(record)
    _check_called_tools(messages, tools, "messages" if "messages" in record else "conversations")
    return "chat", Chat(messages, _untrained_turns(record, messages, train_turns), tools)


def _check_tool_results(messages: list[dict], key: str) -> None:
    """A tool turn answers the assistant turn before it (after that turn's other results), as
    OpenAI's API has it: a result after a user turn would train the model on an exchange it can
    never have. The calls may be the turn's `tool_calls` or its text (Hermes' `<tool_call>` in a
    ShareGPT `gpt` turn); where the calls have ids, `tool_call_id` must name one of them."""
    calls: Optional[list[dict]] = None  # the assistant turn's calls the tool turns so far answer
    for i, message in enumerate(messages):
        if message["role"] != "tool":
            calls = message.get("tool_calls", []) if message["role"] == "assistant" else None
            continue
        if calls is None:
            raise BadRecord(f"{key}[{i}] is a tool result with no assistant turn before it to answer; a tool turn follows "
                            "the assistant turn that called the tool (or another tool turn answering it)")  # fmt: skip
        ids = [call["id"] for call in calls if isinstance(call.get("id"), str)]
        answers = message.get("tool_call_id")
        if ids and isinstance(answers, str) and answers not in ids:
            raise BadRecord(f"{key}[{i}].tool_call_id = {answers!r} answers no call of the assistant turn before it "
                            f"(ids {', '.join(ids)}); give the id of the call it answers")  # fmt: skip


def _check_called_tools(messages: list[dict], tools: Optional[list[dict]], key: str) -> None:
    """Where a record gives its `tools`, every call names one of them: the model would otherwise
    learn to call functions it is never shown."""
    if tools is None:
        return
    names = [tool["function"]["name"] for tool in tools]
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls", ())):
            if call["function"]["name"] not in names:
                raise BadRecord(f"{key}[{i}].tool_calls[{j}] calls {call['function']['name']!r}, which the record's "
                                f"'tools' do not define ({', '.join(names)}); add its schema, or fix the name")  # fmt: skip


def with_tools(examples: list[tuple[str, Any]], record: dict) -> list[tuple[str, Any]]:
    """A preference record's examples with its `tools`, which only chat examples can take."""
    tools = record_tools(record)
    if tools is None:
        return examples
    if any(fmt != "chat" for fmt, _ in examples):
        raise BadRecord("'tools' is given but the prompt and answers are strings; tools go with chat messages")
    return [(fmt, chat._replace(tools=tools)) for fmt, chat in examples]


def record_tools(record: dict) -> Optional[list[dict]]:
    """The record's `tools` as OpenAI's function schemas ({"type": "function", "function": {...}}),
    what chat templates are given at inference; None without any. A list, or a JSON string of one
    (LLaMA-Factory's); a bare function ({"name", "description", "parameters"}) is wrapped."""
    tools = record.get("tools", record.get("functions"))  # (OpenAI's older name)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as exc:
            raise BadRecord(f"'tools' is a string but not JSON ({exc.msg}); give a list of function schemas") from None
        except RecursionError:
            raise BadRecord(f"'tools' is a JSON string {TOO_DEEP}; give a list of function schemas") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRecord(f"'tools' must be a list of function schemas, got {kind_of(tools)}")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(
                f"tools[{i}] must be a function schema with a 'name' ({{\"type\": \"function\", \"function\": "
                f"{{\"name\": ..., \"parameters\": ...}}}}), got {kind_of(tool) if not isinstance(tool, dict) else sorted(tool)}"
            )
        out.append(tool if "function" in tool else {"type": "function", "function": tool})
    return out


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's tool calls in OpenAI's form, [{"type": "function", "function": {"name",
    "arguments"}}, ...] (an `id` and other keys kept), with the arguments an object: transformers'
    convention, which templates write with `tojson` (OpenAI's JSON-string arguments are parsed, so
    they are not written as a quoted string). Also a bare {"name", "arguments"} call, one call
    alone, or a JSON string of either (ShareGPT's function_call turns)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"{where} is not JSON ({exc.msg}); give {{\"name\": ..., \"arguments\": {{...}}}}") from None
        except RecursionError:
            raise BadRecord(f"{where} is a JSON string {TOO_DEEP}; give {{\"name\": ..., \"arguments\": {{...}}}}") from None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise BadRecord(f"{where} must be a non-empty list of calls ({{\"name\", \"arguments\"}}), got {kind_of(value)}")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(f"{where}[{i}] must be a call with a function 'name' and 'arguments', got {kind_of(call)}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise BadRecord(f"{where}[{i}].arguments is a string but not JSON ({exc.msg}); give an object") from None
            except RecursionError:
                raise BadRecord(f"{where}[{i}].arguments is a JSON string {TOO_DEEP}; give an object") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise BadRecord(f"{where}[{i}].arguments must be an object (or its JSON), got {kind_of(arguments)}")
        if "function" in call:
            kept = {k: v for k, v in call.items() if v is not None and k != "function"}
        else:  # a bare call: its id stays beside the function, where templates read it
            kept, function = {k: call[k] for k in ("id",) if call.get(k) is not None}, {k: v for k, v in call.items() if k != "id"}
        out.append({**kept, "type": kept.get("type", "function"), "function": {**function, "arguments": arguments}})
    return out


def _untrained_turns(record: dict, messages: list[dict], train_turns: str) -> tuple[int, ...]:
    """The message indices of a chat record's assistant turns not to train: those marked
    `"weight": 0` (OpenAI's fine-tuning format; 1, null or no weight: trained) and, with train_turns
    "last", every one but the last."""
    key = "messages" if "messages" in record else "conversations"
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    untrained = set(assistant[:-1]) if train_turns == "last" else set()
    for i, msg in enumerate(record[key]):
        if msg.get("weight") is None:  # (null: a table's cell for the turns without one, as if missing)
            continue
        weight = msg["weight"]
        if weight not in (0, 1) or not isinstance(weight, (int, float)):
            raise BadRecord(f"{key}[{i}].weight = {weight!r}: use 0 (the turn is not trained) or 1 (it is)")
        if messages[i]["role"] != "assistant":
            raise BadRecord(f"{key}[{i}].weight: only assistant turns are trained or not; remove the weight of this {messages[i]['role']} turn")
        if weight == 0:
            untrained.add(i)
    return tuple(sorted(untrained))


def _has_keys(record: dict, fmt: str) -> bool:
    if fmt == "chat":
        return "messages" in record or "conversations" in record
    return all(k in record for k in _REQUIRED[fmt])


def preference_pair(record: dict) -> list[tuple[str, Any]]:
    """A preference record -> [chosen, rejected] as completion or chat (format, payload): a string
    prompt is joined with each answer as it is; a prompt of chat messages is followed by each
    answer as an assistant turn (a string) or turns (a list of messages). Only the answer's
    tokens count, never the prompt's, assistant turns of the prompt included. Without a prompt,
    chat answers that are whole conversations (TRL's implicit prompt) share their first turns: those
    are the prompt. A string prompt with chat answers is the user's turn before them, or, where the
    answers are whole conversations whose shared first turns hold a user turn (UltraFeedback's
    layout, with or without a system turn), already in them."""
    prompt = record.get("prompt")
    conversations = all(isinstance(record[key], list) for key in ("chosen", "rejected"))
    if "prompt" not in record:
        if not conversations:
            raise BadRecord("'prompt' is missing; give it, or give 'chosen' and 'rejected' as whole chat conversations")
        return _implicit_prompt_pair(_messages(record, False, key="chosen"), _messages(record, False, key="rejected"))
    if isinstance(prompt, str) and conversations:
        chosen, rejected = _messages(record, False, key="chosen"), _messages(record, False, key="rejected")
        if any(m["role"] == "user" for m in chosen[: _shared_turns(chosen, rejected)]):
            return _implicit_prompt_pair(chosen, rejected)
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        return [("completion", (prompt + _string(record, key), len(prompt))) for key in ("chosen", "rejected")]
    if not isinstance(prompt, list):
        raise BadRecord(f"'prompt' must be a string or a list of chat messages, got {kind_of(prompt)}")
    history = _messages({"prompt": prompt}, True, key="prompt") if prompt else []
    earlier_turns = tuple(i for i, m in enumerate(history) if m["role"] == "assistant")
    out = []
    for key in ("chosen", "rejected"):
        answer = record[key]
        if isinstance(answer, str):
            turns = [{"role": "assistant", "content": _string(record, key)}]
        elif isinstance(answer, list):
            turns = _messages(record, False, key=key)
        else:
            raise BadRecord(f"'{key}' must be a string or a list of chat messages (the prompt is chat), got {kind_of(answer)}")
        out.append(("chat", Chat(history + turns, earlier_turns)))
    return out


def _implicit_prompt_pair(chosen: list[dict], rejected: list[dict]) -> list[tuple[str, Any]]:
    """[chosen, rejected] chat payloads of answers that are whole conversations (validated)."""
    shared = _shared_turns(chosen, rejected)
    if shared == 0 or shared == max(len(chosen), len(rejected)):
        what = "start differently" if shared == 0 else "are the same conversation"
        raise BadRecord(f"'chosen' and 'rejected' {what}, so no prompt can be taken from them; give it as 'prompt'")
    earlier_turns = tuple(i for i, m in enumerate(chosen[:shared]) if m["role"] == "assistant")
    return [("chat", Chat(chosen, earlier_turns)), ("chat", Chat(rejected, earlier_turns))]


def _shared_turns(a: list[dict], b: list[dict]) -> int:
    """How many first turns two conversations have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_messages(messages: Any) -> list[dict]:
    """A prompt's chat messages (a `generate --prompts` line's), as training reads them: tool calls
    in OpenAI's form, null keys dropped; the last turn may be any role's.

    Raises:
        BadRecord: see `_messages`.
    """
    return _messages({"messages": messages}, True)


def _messages(record: dict, train_on_inputs: bool, *, key: str | None = None) -> list[dict]:
    """OpenAI `messages` or ShareGPT `conversations` -> the messages given to the chat template:
    each with its role and content (a string; "" for an assistant turn that only calls tools),
    `tool_calls` in OpenAI's form (`_tool_calls`) and, in OpenAI's layout, the message's other keys as
    they are (`name`, `tool_call_id`, `reasoning_content`, ...: what templates read), less those that
    are null (as transformers drops them: a table's cell for the messages without one) and lorakit's
    `weight`. `key`: the OpenAI-style list under another key (a preference record's prompt and
    answers)."""
    sharegpt = key is None and "messages" not in record
    key, role_key, text_key = ("conversations", "from", "value") if sharegpt else (key or "messages", "role", "content")
    raw = record[key]
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if isinstance(raw, list) else kind_of(raw)
        raise BadRecord(f"'{key}' must be a non-empty list of {{{role_key}, {text_key}}} objects, got {got}")
    roles = _SHAREGPT_ROLES if sharegpt else {**{r: r for r in _ROLES}, "function": "tool"}  # (OpenAI's older name)
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRecord(f"{key}[{i}] must be an object with '{role_key}' and '{text_key}', got {kind_of(msg)}")
        role = msg.get(role_key)
        if role_key not in msg:
            raise BadRecord(f"'{key}[{i}].{role_key}' is missing; give the message one of {', '.join(roles)}")
        if not isinstance(role, str) or role not in roles:
            raise BadRecord(f"{key}[{i}].{role_key} = {role!r}: unknown role; use one of {', '.join(roles)}")
        content = msg.get(text_key)
        if sharegpt:
            message = {"role": roles[role], "content": content}
            if role == "function_call":  # its value is the call, as JSON
                message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, f"{key}[{i}].{text_key}")}
        else:
            message = {k: v for k, v in msg.items() if v is not None and k != "weight"}
            message["role"] = roles[role]
            if "function_call" in message and "tool_calls" not in message:  # OpenAI's older layout of one call
                message["tool_calls"] = message.pop("function_call")
            if message.get("tool_calls") in ([], "", "[]"):  # what APIs and tables write for a turn without calls
                del message["tool_calls"]
            if "tool_calls" in message:
                if role != "assistant":
                    raise BadRecord(f"{key}[{i}].tool_calls: only assistant turns call tools, not this {role} turn")
                message["tool_calls"] = _tool_calls(message["tool_calls"], f"{key}[{i}].tool_calls")
                if content is None:  # OpenAI's content: null beside the calls
                    message["content"] = content = ""
        if not isinstance(message.get("content"), str):
            got = "is missing" if text_key not in msg else f"must be a string, got {kind_of(content)}"
            raise BadRecord(f"{key}[{i}].{text_key} {got}")
        out.append(message)
    _check_tool_results(out, key)
    if not train_on_inputs and out[-1]["role"] != "assistant":
        if key in ("chosen", "rejected"):
            raise BadRecord(f"'{key}' ends with a {out[-1]['role']} turn; an answer ends with an assistant turn")
        raise BadRecord(
            f"the chat ends with a {out[-1]['role']} turn, not an assistant reply to train on; "
            "end it with an assistant turn, or set data.train_on_inputs: true"
        )
    return out


def read_label(value: Any) -> Optional[bool]:
    """A KTO label: a JSON bool, 1 / 0, or "true" / "false" / "1" / "0" (CSV cells are strings); None
    for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None
