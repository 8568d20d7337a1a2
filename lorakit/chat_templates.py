"""Chat templates: the built-in ones, the tokenizer's or a file's compiled as transformers
compiles them (sandboxed Jinja), and where each assistant turn lies in a rendered chat.

Chat ids are exactly `tokenizer.apply_chat_template(messages)["input_ids"]`. An assistant turn
is located by rendering message prefixes: it starts where the render of the messages before it
with `add_generation_prompt=True` ends and ends where the render including it ends, so the
span holds the content and the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`).
Whitespace the template writes after the end-of-turn token (ChatML's "\\n") is not trained:
generation stops at the end-of-turn token, so the model never produces it. Some templates render
a turn one way while it is the last and another once a later turn follows (Qwen3's empty think
block goes into the last assistant turn only; Mistral's system prompt into the last user turn):
such a turn is found by its content instead (followed by the end-of-turn text, where the
template writes one), after the turns before it, and trained with that end-of-turn text.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from jinja2 import TemplateError

from lorakit.data_files import read_utf8
from lorakit.errors import UserError
from lorakit.records import Chat


# The chat templates data.chat_template names: ChatML as Qwen and
# Axolotl write it; a turn ends in <|im_end|>, which generation stops at where the vocabulary has it
# as one token.
CHAT_TEMPLATES = {
    "chatml": (
        r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def chat_template_text(value: str) -> str:
    """data.chat_template's template: a name of CHAT_TEMPLATES, else a Jinja file's text.

    Raises:
        UserError: a file that cannot be read, or not as UTF-8 text (FILE:LINE).
    """
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    try:  # as data files: a byte-order mark would otherwise start every rendered example
        return read_utf8(Path(value))
    except OSError as exc:
        raise UserError(f"data.chat_template = {value!r}: cannot read it ({exc.strerror or exc}); give a UTF-8 Jinja file") from None
    except UserError as exc:
        raise UserError(f"data.chat_template: {exc}") from None


# The first line of a template that data.chat_template_kwargs' variables are set in.
TEMPLATE_VARIABLES_MARK = "{#- data.chat_template_kwargs -#}"


def template_with_variables(template: str, variables: dict[str, Any]) -> str:
    """`template` with `variables` (data.chat_template_kwargs) set on a first line of its own where
    the caller does not give them, `{%- if enable_thinking is not defined %}{%- set enable_thinking =
    false %}{%- endif %}`: every renderer of the template (lorakit's, transformers', vLLM's) then
    renders as apply_chat_template(..., enable_thinking=False) does, unless told otherwise, and an
    adapter that keeps the template keeps them. The line goes before those a template already
    starts with (a continued adapter's), so its values come first and the others stay; the same
    line twice is written once. The line's end is kept out of the text by the template engine's
    trim_blocks, as transformers and vLLM compile templates."""
    if not variables:
        return template
    sets = "".join(f"{{%- if {name} is not defined %}}{{%- set {name} = {_jinja_literal(value)} %}}{{%- endif %}}"
                   for name, value in variables.items())  # fmt: skip
    line = f"{TEMPLATE_VARIABLES_MARK}{sets}\n"
    return template if template.startswith(line) else line + template


def template_variables(template: str) -> set[str]:
    """The names a chat template reads from its caller (messages, add_generation_prompt,
    enable_thinking, ...), as transformers' template engine parses it.

    Raises:
        UserError: the template does not parse.
    """
    from jinja2 import meta

    environment = compiled_template(template).environment
    return set(meta.find_undeclared_variables(environment.parse(template)))


_TEMPLATE_FIX = "fix it, or give another (data.chat_template)"


def compiled_template(template: str, source: Optional[str] = None) -> Any:
    """`template` as transformers' template engine compiles it (and caches it) for apply_chat_template.

    Raises:
        UserError: the template does not parse; `FILE:LINE: ...` where `source` names its file.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template)
    except TemplateError as exc:
        line, reason = getattr(exc, "lineno", None), getattr(exc, "message", None) or str(exc)
        if source:
            raise UserError(f"{source}:{line or 1}: the chat template does not parse ({reason}); {_TEMPLATE_FIX}") from None
        raise UserError(f"the chat template does not parse ({f'line {line}: ' if line else ''}{reason}); {_TEMPLATE_FIX}") from None


def _jinja_literal(value: Any) -> str:
    """A Jinja expression of plain data (config.template_variable_problems' kinds); on one line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # JSON's escapes keep it on one line; characters beyond ASCII stay as they are
        return json.dumps(value, ensure_ascii=False)  # (\uXXXX pairs of an emoji would come back unpaired)
    if isinstance(value, list):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_jinja_literal(v)}" for k, v in value.items()) + "}"


# the reply of the probe conversations that find what a chat template writes around a turn
PROBE_REPLY = "lorakit-probe-reply"


class ChatRenderer:
    """Renders conversations exactly as `tokenizer.apply_chat_template(..., tokenize=False)`.

    apply_chat_template renders with the template transformers compiles (and caches), passing the
    tokenizer's special tokens; for messages that are plain {"role", "content"} string dicts (most
    lorakit passes) its per-call copying and rewriting of the data (null keys dropped, reasoning
    fields aliased) changes nothing, so calling the compiled template directly gives the same text at
    half the cost. Conversations with more (tools, tool calls, other message keys) go through
    apply_chat_template itself. Tests compare the two.
    """

    def __init__(self, tokenizer: Any) -> None:
        template = tokenizer.get_chat_template()
        # what apply_chat_template renders with: a tokenizer with several templates takes its
        # "tool_use" one for conversations with tools
        self.template, self.tools_template = template, tokenizer.get_chat_template(tools=[])
        self._tokenizer = tokenizer
        kwargs = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes too
        try:
            compiled = compiled_template(template)
            self._render = lambda conv, gen: compiled.render(
                messages=conv, tools=None, documents=None, add_generation_prompt=gen, **kwargs
            )
        except ImportError:  # pragma: no cover - transformers moved it: the public path
            self._render = lambda conv, gen: tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen
            )

    @functools.cached_property
    def end_of_turn(self) -> Optional[str]:
        """What the template writes right after an assistant turn's content (`<|eot_id|>`,
        `<|im_end|>`), from probe conversations: what follows the reply both where the conversation
        ends there and where a user turn follows it, as Phi-3's template also ends a whole
        conversation with EOS, which ends no turn; "" where it writes nothing (a model trained so
        never learns to stop), None where the probe does not render."""
        marker = PROBE_REPLY
        for conv in ([], [{"role": "system", "content": "Be brief."}]):
            conv = conv + [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": marker}]
            ended, going_on = self([conv, conv + [{"role": "user", "content": "Thanks."}]], False)
            if not isinstance(ended, str) or marker not in ended:
                continue
            after = ended[ended.rindex(marker) + len(marker) :]
            if isinstance(going_on, str) and going_on.count(marker) == 1:
                after = self._shared_start(after, going_on[going_on.index(marker) + len(marker) :])
            return after.rstrip()
        return None

    def _shared_start(self, a: str, b: str) -> str:
        """The longest start of `a` that `b` starts with too, in whole tokens: `<|end|>\n<|endoftext|>`
        and `<|end|>\n<|user|>` share `<|end|>\n`, not `<|end|>\n<|`."""
        ids_a, ids_b = (self._tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
        n = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        shared = self._tokenizer.decode(ids_a[:n])
        return shared if a.startswith(shared) and b.startswith(shared) else os.path.commonprefix([a, b])

    @functools.cached_property
    def reply_lead(self) -> str:
        """What the template writes between its generation prompt and an assistant turn's content
        (Mistral's " " after "[/INST]"), from a probe; "" where it writes nothing there, or the
        probe does not render."""
        marker, probe = PROBE_REPLY, [{"role": "user", "content": "Hello?"}]
        before = self([probe], True)[0]
        whole = self([probe + [{"role": "assistant", "content": marker}]], False)[0]
        if isinstance(before, str) and isinstance(whole, str) and whole.startswith(before) and marker in whole:
            return whole[len(before) : whole.index(marker, len(before))]
        return ""

    @functools.cached_property
    def generation_prompt(self) -> str:
        """What the template writes for add_generation_prompt (`<|im_start|>assistant\\n`), from a
        probe conversation; "" where it writes none, or the probe does not render."""
        probe = [{"role": "user", "content": "Hello?"}]
        without, with_prompt = self([probe], False)[0], self([probe], True)[0]
        if isinstance(without, str) and isinstance(with_prompt, str) and with_prompt.startswith(without):
            return with_prompt[len(without) :]
        return ""

    def __call__(
        self, convs: list[list[dict]], gen: bool, tools: Optional[Sequence[Optional[list[dict]]]] = None
    ) -> list[Union[str, Exception]]:
        """One text per conversation (with its `tools`: None, or one list or None per conversation),
        or the exception the template raised for it."""
        out: list[Union[str, Exception]] = []
        render, apply = self._render, self._tokenizer.apply_chat_template
        for conv, conv_tools in zip(convs, tools or [None] * len(convs)):
            try:
                if conv_tools is None and all(len(m) == 2 for m in conv):  # {"role", "content"} only
                    out.append(render(conv, gen))
                else:
                    out.append(apply(conv, tools=conv_tools, tokenize=False, add_generation_prompt=gen))
            except Exception as exc:  # noqa: BLE001 - a template error is about the user's data/template
                out.append(exc)
        return out


def chat_spans(
    renderer: ChatRenderer, chats: Sequence[Chat], train_on_inputs: bool
) -> list[Union[tuple[str, list[tuple[int, int]]], str]]:
    """Per conversation: (rendered text, character spans to train) or an error message.

    The assistant turns a chat does not train (`Chat.untrained`: a preference record's prompt,
    turns of weight 0, all but the last under train_turns: last) are not located either, so a
    template may rewrite them freely (Qwen3 drops the think blocks of earlier turns)."""
    convs, skips, tools = [c.messages for c in chats], [c.untrained for c in chats], [c.tools for c in chats]
    full = renderer(convs, False, tools)
    dropped = [_dropped_turn(t, msgs) if isinstance(t, str) else None for t, msgs in zip(full, convs)]
    if train_on_inputs:
        return [(dropped[i] or (t, [])) if isinstance(t, str) else _template_error(t) for i, t in enumerate(full)]  # spans unused
    trained = [[i for i, m in enumerate(msgs) if m["role"] == "assistant" and i not in skip] for msgs, skip in zip(convs, skips)]
    starts, ends = [], []  # (conversation, message index) of each prefix render
    for ci, msgs in enumerate(convs):
        for i in trained[ci]:
            starts.append((ci, i))
            if i != len(msgs) - 1:
                ends.append((ci, i))
    start_texts = dict(zip(starts, renderer([convs[c][:i] for c, i in starts], True, [tools[c] for c, _ in starts])))
    end_texts = dict(zip(ends, renderer([convs[c][: i + 1] for c, i in ends], False, [tools[c] for c, _ in ends])))
    out: list[Union[tuple[str, list[tuple[int, int]]], str]] = []
    for ci, msgs in enumerate(convs):
        text = full[ci]
        if not isinstance(text, str) or dropped[ci]:
            out.append(dropped[ci] or _template_error(text))
            continue
        spans, problem, cursor, passed = [], None, 0, []
        for i in (k for k, m in enumerate(msgs) if m["role"] == "assistant"):
            if i not in trained[ci]:
                passed.append(i)
                continue
            before = start_texts[(ci, i)]
            upto = text if i == len(msgs) - 1 else end_texts[(ci, i)]
            if isinstance(before, Exception) or isinstance(upto, Exception):
                problem = _template_error(before if isinstance(before, Exception) else upto)
                break
            if text.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                span = _ended_at_end_of_turn(text, msgs[i], (len(before), len(upto.rstrip())), renderer.end_of_turn)
            else:
                # found by content: the untrained turns since the last trained one are passed over by
                # theirs first, so the search starts after them (where the prefix renders locate a
                # turn, above, they play no part)
                after = cursor
                for k in passed:
                    over = _turn_by_content(text, msgs, k, None, after, renderer.end_of_turn)
                    after = over[1] if over is not None else after
                alone = _turn_alone(renderer, msgs[i], tools[ci]) if msgs[i].get("tool_calls") else None
                span = _turn_by_content(text, msgs, i, before, cursor, renderer.end_of_turn, after, alone,
                                        renderer.generation_prompt, renderer.reply_lead)  # fmt: skip
            passed = []
            if span is None:
                what = "its tool calls are not written as the template writes the turn alone" if msgs[i].get("tool_calls") \
                    else "this assistant turn's content is not in the render after the turns before it"  # fmt: skip
                problem = (
                    f"messages[{i}]: the chat template renders this conversation differently from its prefixes "
                    f"and {what}, so it cannot be located; untrained turns need not be: train the last turn only "
                    "(data.train_turns: last) or give this one \"weight\": 0 (a reasoning model's earlier <think> "
                    "blocks: move them into \"reasoning_content\"), or use a template that writes each turn as it is"
                )
                break
            spans.append(span)
            cursor = span[1]
        out.append(problem if problem else (text, spans))
    return out


def _dropped_turn(text: str, msgs: list[dict]) -> Optional[str]:
    """The problem of a render that leaves out a user or tool turn's content, else None.

    Templates that branch on a few roles (Phi-3's writes system, user and assistant turns) pass
    over the others without a word, so tool results would vanish from the training text. A
    template may trim a turn or write it as JSON (Llama 3.1's tool turns). Assistant turns are
    located by their own search, and templates may rewrite them (Qwen3's think blocks); system
    turns may be left out by design (Mistral v0.3's template writes the system prompt into a last
    user turn only, so never into a conversation that ends with a reply)."""
    for i, message in enumerate(msgs):
        content = message.get("content")
        if message["role"] not in ("user", "tool") or not isinstance(content, str) or not content.strip():
            continue
        if content.strip() in text:
            continue
        if not any(form in text for form in (json.dumps(content, ensure_ascii=False), json.dumps(content))):
            return (
                f"messages[{i}]: the chat template leaves this {message['role']!r} turn's content out of the text; "
                f"use a template that writes {message['role']!r} turns (data.chat_template), or drop them from the data"
            )
    return None


def _ended_at_end_of_turn(text: str, message: dict, span: tuple[int, int], end_of_turn: Optional[str]) -> tuple[int, int]:
    """`span`, a turn located by its prefix renders, cut after the end of turn that follows its
    content: a template that ends a whole conversation with more (Phi-3's EOS after `<|end|>`)
    would otherwise train that on the last turn."""
    content = message["content"].strip()
    at = text.find(content, span[0]) if content else span[0]
    stop = text.find(end_of_turn, at + len(content)) if end_of_turn and at >= 0 else -1
    return (span[0], stop + len(end_of_turn)) if 0 <= stop and stop + len(end_of_turn) < span[1] else span


def _turn_by_content(
    text: str, msgs: list[dict], i: int, before: Optional[str], cursor: int, end_of_turn: Optional[str], after: int = 0,
    alone: Optional[str] = None, header: str = "", lead: str = "",
) -> Union[tuple[int, int], None]:
    """The character span of assistant turn `i` in `text`, found by its content, for templates
    whose render of a conversation does not start with the render of its first turns: Qwen3 writes
    an empty think block into the last assistant turn only, so a turn renders one way as the last
    and another once a later one follows; Mistral writes the system prompt into the last user turn.

    The turn starts where the render of the turns before it ends when that is a prefix of `text`
    (as without a rewrite: what the template writes between the generation prompt and the content
    is trained too), else at its content, searched after the previous trained span (`cursor`), the
    untrained turns passed over since (`after`) and the message before it. It ends after the
    content and the template's end-of-turn text, with any whitespace the template keeps between
    them (an empty reply: at its end of turn). None when the content (stripped: templates trim it)
    is not found. A turn found by its content starts at the template's `lead` before it (Mistral's
    " " after "[/INST]"), where that is there: as where the prefix renders locate it, it is the
    reply's first token. A turn that calls tools: see `_tool_call_turn` (`alone`: `_turn_alone`'s;
    `header`: the template's generation prompt). before: None for a turn whose prefix render is not
    at hand (an untrained turn, only passed over)."""
    content = msgs[i]["content"].strip()
    if before is not None and text.startswith(before) and len(before) >= cursor:
        start = search = len(before)
    else:
        start, previous, search = None, msgs[i - 1]["content"].strip() if i else "", max(cursor, after)
        found = text.find(previous, search) if previous else -1
        search = found + len(previous) if found >= 0 else search
    if msgs[i].get("tool_calls"):
        return _tool_call_turn(text, msgs[i], start, search, end_of_turn, alone, header)
    # the content followed by the end of its turn, where the template writes one: the same words
    # may appear earlier in the template's own markup (Mistral's "[/INST]" holds "I", "INST")
    ended = re.compile(re.escape(content) + r"\s*" + re.escape(end_of_turn)).search(text, search) if end_of_turn else None
    at = ended.start() if ended is not None else text.find(content, search) if content else search
    if at < 0:
        return None
    if start is None:
        led = lead and at - len(lead) >= search and text.startswith(lead, at - len(lead))
        start = at - len(lead) if led else at
    return (start, ended.end() if ended is not None else at + len(content))


def _turn_alone(renderer: ChatRenderer, turn: dict, tools: Optional[list[dict]]) -> Optional[str]:
    """The template's text of an assistant turn on its own: after a one-word user turn, from its
    generation prompt on (trailing whitespace left out); None where that does not render so."""
    probe = [{"role": "user", "content": "Hi"}]
    before, whole = renderer([probe, [*probe, turn]], True, [tools, tools])[0], renderer([[*probe, turn]], False, [tools])[0]
    if isinstance(before, str) and isinstance(whole, str) and whole.startswith(before):
        return whole[len(before) :].rstrip() or None
    return None


def _tool_call_turn(
    text: str, message: dict, start: Optional[int], search: int, end_of_turn: Optional[str], alone: Optional[str], header: str = ""
) -> Union[tuple[int, int], None]:
    """The span of an assistant turn that calls tools, for `_turn_by_content`: the template's text of
    the turn on its own (`alone`), found after `search` (Hermes writes the tool result before it
    another way once the turn follows; Mistral moves the system prompt), less what only the last
    turn starts with (Qwen3's think block), and starting after the turn's header where the two
    overlap (`header`, the generation prompt); else its content up to the first end of turn after it. The span must
    hold every call's function name, else None: the calls are written another way, or not at all,
    where the turn is not the last, and the turn cannot be trained as it would be generated."""
    span, names = None, [call["function"]["name"] for call in message["tool_calls"]]
    # the longest end of `alone` that is in the text and still holds every call: what a template
    # writes at a turn's start only when it is the last (Qwen3's think block) is left out
    for k in range(len(alone or "")):
        piece = alone[k:]
        if not all(name in piece for name in names):
            break
        at = text.find(piece, search)
        if at >= 0:
            opened = text.rfind(header, 0, at + len(header)) if header else -1
            begin = opened + len(header) if opened >= 0 and opened + len(header) > at else at
            span = (begin if start is None else start, at + len(piece))
            break
    content = message["content"].strip()
    if span is None and end_of_turn and (content or start is not None):
        at = text.find(content, search) if content else start
        end = text.find(end_of_turn, at + len(content)) if at >= 0 else -1
        if end >= 0:
            span = (at if start is None else start, end + len(end_of_turn))
    if span is None or any(name not in text[span[0] : span[1]] for name in names):
        return None
    return span


def _template_error(exc: Exception) -> str:
    # (the report adds "fix it, or skip invalid records ...")
    return f"the chat template failed on this conversation: {exc}; the record does not fit the template (data.chat_template)"
