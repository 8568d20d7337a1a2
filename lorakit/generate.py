"""`lorakit generate` and `lorakit chat`: text from a model (and adapter) with transformers' generate.

Decoding is `model.generate` with its KV cache; lorakit only prepares the inputs. Prompts in a
batch are LEFT-padded (the new tokens of every row then start at the same position) with an
attention mask, from which transformers derives the position ids, so a prompt gives the same
greedy completion alone or in a batch. Generation stops at EOS or at the chat template's
end-of-turn token (`<|eot_id|>`, `<|im_end|>`, ...), whichever the tokenizer has.

Tokenization matches lorakit.data: a plain prompt is tokenized with the tokenizer's special
tokens (a BOS where its post-processor adds one); a chat prompt is the chat template's render
with `add_generation_prompt=True`, tokenized without adding special tokens (the template writes
them), exactly like `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Union

import torch
from jinja2 import TemplateError, TemplateSyntaxError
from torch import nn

from lorakit.records import BadRecord, prompt_messages, record_tools
from lorakit.errors import UserError
from lorakit.models import padding_id, position_limit

# End-of-turn tokens of common chat templates; generation also stops at these when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

# A text, chat messages [{"role", "content"}], or {"messages": [...], "tools": [...]}: chat messages
# and the function schemas their template is given.
Prompt = Union[str, list[dict[str, Any]], dict[str, Any]]


def stop_token_ids(tokenizer: Any, model: Optional[nn.Module] = None) -> list[int]:
    """EOS, the model's generation-config EOS ids and any end-of-turn token the vocabulary has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    ids += [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


def chat_parts(prompt: Union[list[dict[str, Any]], dict[str, Any]]) -> tuple[list[dict[str, Any]], Optional[list[dict]]]:
    """A chat prompt's (messages, tools): chat messages alone, or {"messages", "tools"}."""
    return (prompt["messages"], prompt.get("tools")) if isinstance(prompt, dict) else (prompt, None)


def render_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool) -> list[int]:
    """Token ids of one prompt (see the module docstring for how they match training).

    Raises:
        UserError: chat requested but the tokenizer has no chat template; the template fails.
    """
    if chat or not isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat template, so --chat / chat prompts cannot be rendered; "
                "use a chat model's tokenizer or leave out --chat"
            )
        messages, tools = chat_parts([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
        if tools is not None and "tools" not in tokenizer.get_chat_template(tools=tools):
            raise UserError("the prompt has 'tools', but the chat template never reads `tools`, so they would be left out "
                            "of the prompt; use a model (or adapter) whose template writes them, or drop them")  # fmt: skip
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except TemplateSyntaxError as exc:
            raise UserError(f"the chat template does not parse ({exc}); fix it, or give the adapter or model another") from None
        except TemplateError as exc:  # e.g. Gemma's "System role not supported"
            raise UserError(f"the chat template failed on this conversation ({exc}); leave out what it refuses (a "
                            "system message, turns out of order) or give the adapter or model another template") from None  # fmt: skip
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


MIN_TEMPERATURE = 1e-5


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, batch_size: int = 1) -> None:
    """Raises UserError unless the sampling settings are usable (also for `chat`, before its first
    turn), naming the ones that are not."""
    rules = [
        # a temperature this close to 0 divides the logits past float32's range: inf, then NaN probabilities
        ("temperature", temperature, math.isfinite(temperature) and (temperature == 0 or temperature >= MIN_TEMPERATURE),
         f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("top_k", top_k, top_k >= 0, ">= 0 (0: off)"),
        ("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1, "a whole number >= 1"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "a whole number >= 1"),
    ]
    bad = [f"--{name.replace('_', '-')} {value}: must be {rule}" for name, value, ok, rule in rules if not ok]
    if bad:
        raise UserError("; ".join(bad))


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    chat: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    streamer: Any = None,
    places: Optional[Sequence[str]] = None,
) -> list[str]:
    """Completions of `prompts` (texts, or message lists when `chat`), in order, special tokens removed.

    Greedy when `temperature == 0`; otherwise sampling with temperature / top-p / top-k
    (`top_k=0` and `top_p=1` switch those filters off), seeded with `seed`, so the same call
    gives the same text. The global RNG state is left as it was.

    places: where each prompt came from (`read_prompt_file`'s FILE:LINE), named in messages about it.

    A model with a table of positions (GPT-2, GPT-J) generates at most until its positions run out,
    each prompt to its own end of the table (a batch whose longest prompt would end the others
    sooner runs one prompt at a time).

    Raises:
        UserError: bad sampling values; chat prompts without a chat template; a prompt that fills
            every position of a table of positions.
    """
    check_sampling(temperature, top_p, top_k, max_new_tokens, batch_size)
    from transformers import GenerationConfig

    def which(i: int) -> str:  # the prompt a message is about
        return f"{places[i]}: the prompt" if places else "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"

    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(render_prompt(tokenizer, prompt, chat=chat))
        except UserError as exc:
            raise UserError(f"{places[i] if places else f'prompt {i + 1}'}: {exc}" if places or len(prompts) > 1
                            else str(exc)) from None  # fmt: skip
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:  # (a tokenizer that adds no BOS: an empty text is no token to start from)
        raise UserError(f"{which(empty)} is empty and this tokenizer adds no start token; give text to continue")
    stops = stop_token_ids(tokenizer, model)
    pad_id = padding_id(tokenizer, model, fallback=stops[0] if stops else 0)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad_id)
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        options.update(do_sample=False)
    device = next(model.parameters()).device
    limit, table = position_limit(model)
    full = next((i for i, ids in enumerate(encoded) if table and len(ids) >= limit), None)
    if full is not None:  # said before any generation, whose output would be lost
        raise UserError(f"{which(full)} is {len(encoded[full])} tokens and fills all {limit} positions of the model (a "
                        "table with a row per position); shorten it")  # fmt: skip
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        if table and len(chunk) > 1 and limit - max(map(len, chunk)) < max_new_tokens:
            batches += [[ids] for ids in chunk]  # the longest prompt's end of the table would end the others' too
        else:
            batches.append(chunk)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for chunk in batches:
                width = max(len(ids) for ids in chunk)
                room = limit - width if table else max_new_tokens  # past the table there is no position
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, ids in enumerate(chunk):  # left padding
                    input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    mask[i, width - len(ids) :] = 1
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # generation-config chatter about unused flags
                    result = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.to(device),
                        generation_config=GenerationConfig(**{**options, "max_new_tokens": min(max_new_tokens, room)}),
                        streamer=streamer,
                    )
                for row in result[:, width:].tolist():
                    out.append(_decode(tokenizer, row, stops))
    finally:
        model.train(was_training)
    return out


def _decode(tokenizer: Any, ids: list[int], stops: list[int]) -> str:
    """The text up to the first stop token (rows that stopped early are padded after it)."""
    for i, token in enumerate(ids):
        if token in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- prompt files
def read_prompts(path: Union[str, Path]) -> list[Prompt]:
    """One prompt per line, or JSONL with a "prompt" (text) or "messages" (chat, with the record's
    "tools" where it has them) field per line (`read_prompt_file`'s prompts)."""
    return read_prompt_file(path)[0]


def read_prompt_file(path: Union[str, Path]) -> tuple[list[Prompt], list[str]]:
    """The prompts of a file (`read_prompts`) and the place of each, `FILE:LINE`, for messages.

    Raises:
        UserError: missing file, no prompts, a JSON line without a usable field or with a lone surrogate (FILE:LINE).
    """
    from lorakit.data_files import TOO_DEEP, lone_surrogate, read_utf8

    stdin = str(path) == "-"  # standard input: a pipe (read as /dev/stdin, which read_utf8 reads like a file)
    path = Path("/dev/stdin") if stdin else Path(path)
    if path.is_dir():
        raise UserError(f"--prompts {str(path)!r} is a folder; give a text file (one prompt per line) or JSONL, or - for "
                        "standard input")  # fmt: skip
    if not path.exists():  # (a pipe or /dev/stdin is no regular file, and is read all the same)
        raise UserError(f"--prompts {str(path)!r}: file not found; give a text file (one prompt per line) or JSONL, or - for "
                        "standard input")  # fmt: skip
    try:
        lines = read_utf8(path).splitlines()
    except UserError as exc:
        raise UserError(str(exc).replace("/dev/stdin", "<stdin>", 1) if stdin else str(exc)) from None
    name = "<stdin>" if stdin else str(path)
    first = next((line.lstrip() for line in lines if line.strip()), "")
    suffix = path.suffix.lower()
    jsonl = suffix in (".jsonl", ".json") or (suffix != ".txt" and first.startswith("{"))
    why = f"a {suffix} file" if suffix in (".jsonl", ".json") else "its first prompt starts with '{'; a .txt file is read as text"
    prompts: list[Prompt] = []
    places: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        places.append(f"{name}:{number}")
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{name}:{number}: invalid JSON: {exc.msg} (read as JSONL: {why})") from None
        except RecursionError:
            raise UserError(f"{name}:{number}: the record is {TOO_DEEP}; fix that line") from None
        surrogate = lone_surrogate(record)
        if surrogate is not None:
            raise UserError(f"{name}:{number}: {surrogate}; fix the escape")
        if isinstance(record, dict) and "prompt" in record and "messages" in record:
            raise UserError(f"{name}:{number}: the line has both \"prompt\" and \"messages\"; give one of them")
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            try:
                messages, tools = prompt_messages(record["messages"]), record_tools(record)
            except BadRecord as exc:
                raise UserError(f"{name}:{number}: {exc}") from None
            prompts.append(messages if tools is None else {"messages": messages, "tools": tools})
        else:
            raise UserError(f"{name}:{number}: expected an object with a \"prompt\" string or a \"messages\" list")
    if not prompts:
        raise UserError(f"--prompts {name}: no prompts in the file")
    return prompts, places


def load_for_command(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a CLI command's --model, --adapter and --quantize; a path that is not
    a folder is a UserError (a bare `org/name` is left to transformers, for users with a network)."""
    from lorakit.models import check_model_folder, load_for_inference, looks_like_hub_id

    if not looks_like_hub_id(args.model):
        check_model_folder(args.model)
    return load_for_inference(args.model, args.adapter, quantize=args.quantize, precision=args.precision,
                              trust_remote_code=args.trust_remote_code)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    if not -(2**63) <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: must fit in 64 bits, e.g. 0")
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def check_utf8_argument(flag: str, value: Optional[str]) -> None:
    """Raise a UserError where a command-line argument holds bytes that are not UTF-8."""
    from lorakit.data_files import undecodable_byte

    problem = None if value is None else undecodable_byte(value)
    if problem is not None:
        raise UserError(f"{flag}: {problem}; pass UTF-8 text (set the terminal's encoding to UTF-8)")


def with_system(prompt: Prompt, system: str) -> Prompt:
    """A chat prompt (a text: one user turn) with a system message first where it has none of its
    own (`system_first`, as data.system_prompt puts one in training)."""
    from lorakit.records import system_first

    messages, tools = chat_parts([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    with_it = system_first(messages, system)
    if with_it is messages:
        return prompt
    return with_it if tools is None else {"messages": with_it, "tools": tools}


def generate_command(args: argparse.Namespace) -> int:
    """Print the completion of --prompt, or one JSON line {"prompt", "completion"} per --prompts entry."""
    check_utf8_argument("--prompt", args.prompt)
    check_utf8_argument("--system", args.system)
    prompts, places = ([args.prompt], None) if args.prompt is not None else read_prompt_file(args.prompts)
    if args.system is not None:
        if not args.chat and any(isinstance(prompt, str) for prompt in prompts):
            raise UserError("--system goes with chat prompts: add --chat, or give --prompts JSONL lines with \"messages\"")
    asked = prompts if args.system is None else [with_system(prompt, args.system) for prompt in prompts]
    model, tokenizer = load_for_command(args)
    texts = generate(model, tokenizer, asked, chat=args.chat, batch_size=args.batch_size, places=places, **_sampling(args))
    if args.prompt is not None:
        print(texts[0])
    else:
        for prompt, text in zip(prompts, texts):
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    return 0


# --------------------------------------------------------------------------- chat
def chat_loop(
    model: nn.Module,
    tokenizer: Any,
    *,
    system: Optional[str] = None,
    stdin: Optional[TextIO] = None,
    stdout: Optional[TextIO] = None,
    **sampling: Any,
) -> list[dict[str, str]]:
    """Read user turns from `stdin` until EOF or `/exit`, streaming each reply to `stdout`.

    `/reset` forgets the conversation (the system prompt stays). Works with piped input; the
    `you> ` prompt is only shown on a terminal. Returns the final history.
    """
    from transformers import TextStreamer

    from lorakit.data_files import undecodable_byte

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; `lorakit chat` needs a chat model (or its tokenizer)")
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    if system:  # a template that refuses a system turn (Gemma's) is said once, before the first turn
        try:
            tokenizer.apply_chat_template([*start, {"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise UserError(f"--system {system!r}: the chat template refuses a system turn ({exc}); leave --system out, "
                            "or use a model (or adapter) whose template takes one") from None  # fmt: skip
    history = list(start)
    status = sys.stderr  # the banner and notes: stdout holds the replies alone (a pipe's reader)
    print("chat: /reset clears the conversation, /exit quits", file=status)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            if interactive:  # Ctrl-D after "you> ": the shell's prompt on a line of its own
                stdout.write("\n")
            break
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history = list(start)
            status.write("(conversation cleared)\n")
            continue
        if not message.strip():
            continue
        problem = undecodable_byte(message)
        if problem is not None:  # a terminal in another encoding: say so and wait for the next line
            status.write(f"(that line's {problem}; type it again in UTF-8)\n")
            continue
        history.append({"role": "user", "content": message})
        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = generate(model, tokenizer, [history], chat=True, batch_size=1, streamer=streamer, **sampling)[0]
        except UserError as exc:  # the conversation outgrew the model's positions: the session goes on
            history.pop()
            status.write(f"({exc}; /reset clears the conversation)\n")
            continue
        history.append({"role": "assistant", "content": reply})
    return history


def chat_command(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    check_sampling(sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["max_new_tokens"])
    check_utf8_argument("--system", args.system)
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 is said and retyped, under any locale
        sys.stdin.reconfigure(errors="surrogateescape")
    model, tokenizer = load_for_command(args)
    chat_loop(model, tokenizer, system=args.system, **_sampling(args))
    return 0
