"""`lorakit eval`: loss and perplexity over a dataset, and exact-match accuracy of greedy completions;
on preference pairs (prompt, chosen, rejected), a preference objective's loss, reward accuracy and
margin (DPO by default: the adapter against its base, or against --reference-adapter, the adapter
its training continued), and on labelled examples (prompt, completion, label) KTO's
(lorakit.preference).

The loss is the trainer's: the data is tokenized and masked by `lorakit.data` exactly as for
training, and `loss.token_loss_sum` is summed over every batch and divided by the number of
trained tokens of the whole set (token-exact, so batch size and padding do not change it).

Accuracy (`--generate`) compares the greedy completion of each record's prompt with its answer,
both stripped and without a leading `<think>...</think>` block (`final_answer`):
    completion   prompt -> completion
    instruction  the Alpaca prompt of lorakit.records -> output
    chat         the chat template over every message before the last assistant turn, with the
                 generation prompt -> that turn's content
Text records have no answer and are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jinja2 import TemplateError
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.inject import lora_configs
from lorakit.metrics import strict_json
from lorakit.loss import token_loss_sum
from lorakit.models import position_limit


def evaluate_loss(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    max_length: int,
    device: Optional[torch.device] = None,
) -> dict[str, float]:
    """{"loss", "perplexity", "tokens"}: mean next-token cross-entropy over the trained tokens.

    dataset: a lorakit.data.TokenizedDataset. The model runs in eval mode under no_grad; its
    previous mode is restored.
    """
    from lorakit.batching import BatchStream

    if len(dataset) == 0:
        raise UserError("the eval dataset has no examples")
    device = device or next(model.parameters()).device
    stream = BatchStream(
        dataset, batch_size=min(batch_size, len(dataset)), max_length=max_length, packing=False, seed=0, shuffle=False
    )
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        with torch.no_grad():
            for batch in stream.epoch_batches():
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss_sum, n = token_loss_sum(model, batch)
                total += loss_sum.double().cpu()
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError("the eval dataset has no trained tokens (every label is masked)")
    loss = float(total / count)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": count}


def prompt_and_answer(record: dict, system_prompt: Optional[str] = None) -> Optional[tuple[Any, Union[str, dict], bool]]:
    """(prompt, expected answer, is_chat) for a record, or None for a text record (and a chat whose
    last assistant turn has weight 0: untrained, so unscored).

    The prompt is a string (completion, instruction: rendered by lorakit.records) or the chat
    messages before the last assistant turn (after `system_prompt`, as data.system_prompt puts it;
    with the record's tools: {"messages", "tools"}). The answer is the turn's content, or, for a turn
    that calls tools, the turn itself (`tool_call_answer` renders it).

    Raises:
        UserError: a record lorakit.records would reject, or a chat without an assistant turn.
    """
    from lorakit.records import BadRecord, prepare_record, with_system_prompt

    try:
        fmt, payload = prepare_record(record, "auto", train_on_inputs=True)
    except BadRecord as exc:
        raise UserError(str(exc)) from None
    if fmt == "text":
        return None
    if fmt == "preference":
        raise UserError("a preference record (prompt, chosen, rejected) has no single answer to compare with")
    if fmt == "chat":
        chat = with_system_prompt(payload, system_prompt)
        messages = chat.messages
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError("a chat record has no assistant turn to compare with")
        if last in chat.untrained:  # "weight": 0: not trained, so not scored either
            return None
        prompt = messages[:last] if chat.tools is None else {"messages": messages[:last], "tools": chat.tools}
        turn = messages[last]
        return prompt, turn if turn.get("tool_calls") else turn["content"], True
    text, prompt_chars = payload
    return text[:prompt_chars], text[prompt_chars:], False


def tool_call_answer(tokenizer: Any, prompt: Any, turn: dict) -> str:
    """The text a model answers `prompt` with in an assistant `turn` that calls tools: the chat
    template's render of the turn after the generation prompt, up to its end of turn, with the
    special tokens left out as generation leaves them out of its text.

    Raises:
        UserError: the template fails, or does not render the turn after its generation prompt.
    """
    from lorakit.chat_templates import ChatRenderer
    from lorakit.generate import chat_parts

    messages, tools = chat_parts(prompt)
    try:
        before = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages + [turn], tools=tools, tokenize=False)
    except TemplateError as exc:
        raise UserError(f"the chat template failed on a conversation with tool calls ({exc}); fix the record or the template") from None
    if not whole.startswith(before):
        raise UserError(
            "the chat template does not write a turn with tool calls after its generation prompt, so the answer "
            "to compare with cannot be taken from it; score tool calls with a template that does"
        )
    text = whole[len(before) :].rstrip()
    end = ChatRenderer(tokenizer).end_of_turn
    text = text[: -len(end)] if end and text.endswith(end) else text
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


# A reasoning block before the answer (Qwen3, DeepSeek-R1; Qwen3's template writes an empty one
# into the reply it trains on): exact match is about the answer after it.
_REASONING = re.compile(r"\A\s*<think>.*?</think>", re.DOTALL)


def final_answer(text: str) -> str:
    """`text` without a leading <think>...</think> block, stripped."""
    return _REASONING.sub("", text, count=1).strip()


def generation_accuracy(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    show_failures: int = 3,
    skip_invalid: bool = False,
    train_on_inputs: bool = False,
    system_prompt: Union[str, None, Sequence[Optional[str]]] = None,
) -> dict[str, Any]:
    """{"accuracy", "correct", "total", "failures": [{"prompt", "expected", "got"}]} over the
    records that have an answer (exact match of `final_answer`s: stripped, a leading reasoning block
    left out; greedy; at most `show_failures` listed). skip_invalid: leave out the records the
    data's own reading (with `train_on_inputs`) skips as invalid, which it has counted, instead of
    raising. system_prompt: data.system_prompt, put first in chats without a system turn; or one
    per record (the files of a data list may set their own).

    Raises:
        UserError: see `prompt_and_answer`; no record with an answer.
    """
    from lorakit.records import BadRecord, prepare_record
    from lorakit.generate import chat_parts, generate

    system_prompts = [system_prompt] * len(records) if system_prompt is None or isinstance(system_prompt, str) else system_prompt
    cases = []
    for i, record in enumerate(records):
        try:
            if skip_invalid:
                prepare_record(record, "auto", train_on_inputs)  # what the loss skipped, this skips too
            case = prompt_and_answer(record, system_prompts[i])
            if case is not None and not isinstance(case[1], str):  # a turn that calls tools: its text
                case = (case[0], tool_call_answer(tokenizer, case[0], case[1]), case[2])
        except (UserError, BadRecord) as exc:
            if skip_invalid:
                continue
            raise UserError(f"record {i + 1}: {exc}") from None
        if case is not None:
            cases.append(case)
    if not cases:
        raise UserError("no record has an answer to compare with (text records have none); use prompt/completion, "
                        "instruction or chat records")  # fmt: skip
    got: list[str] = [""] * len(cases)
    for is_chat in (False, True):  # chat and plain prompts are tokenized differently
        idx = [i for i, c in enumerate(cases) if c[2] == is_chat]
        if idx:
            texts = generate(model, tokenizer, [cases[i][0] for i in idx], chat=is_chat,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)  # fmt: skip
            for i, text in zip(idx, texts):
                got[i] = text
    correct, failures = 0, []
    for (prompt, expected, is_chat), text in zip(cases, got):
        if final_answer(text) == final_answer(expected):
            correct += 1
        elif len(failures) < show_failures:
            shown = prompt
            if is_chat:
                messages, tools = chat_parts(prompt)
                shown = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            failures.append({"prompt": shown, "expected": expected, "got": text})
    return {"accuracy": correct / len(cases), "correct": correct, "total": len(cases), "failures": failures}


DEFAULT_MAX_LENGTH = 1024


def _preference_eval(args: argparse.Namespace, model: nn.Module, dataset: Any, max_length: int) -> int:
    """`lorakit eval` on preference pairs or labelled examples: an objective's loss and rewards
    (dpo, ipo, kto: the adapter against its base, or against --reference-adapter)."""
    from lorakit.config import PREFERENCE_BETA, REFERENCE_OBJECTIVES
    from lorakit.preference import evaluate_preference

    labelled = dataset.desirable is not None
    objective = args.objective or ("kto" if labelled else "dpo")
    _check_preference_options(args, objective)
    _note_the_runs_own_settings(args, objective)
    if objective in REFERENCE_OBJECTIVES:
        _check_plain_base(lora_configs(model)["default"], args.adapter, objective)
    if args.reference_adapter is not None:
        from lorakit.adapters import apply_adapter, read_adapter
        from lorakit.preference import REFERENCE_ADAPTER

        files = read_adapter(args.reference_adapter)
        _check_plain_base(files.config, args.reference_adapter, objective)
        device = next(model.parameters()).device
        apply_adapter(model, files, REFERENCE_ADAPTER)
        model.to(device)
    beta = args.beta if args.beta is not None else PREFERENCE_BETA[objective]
    result: dict[str, Any] = evaluate_preference(
        model, dataset, objective=objective, beta=beta, gamma=args.simpo_gamma, batch_size=args.batch_size,
        max_length=max_length, kto_weights=(args.kto_desirable_weight, args.kto_undesirable_weight),
    )  # fmt: skip
    result = {"examples" if objective == "kto" else "pairs": dataset.num_units(), "objective": objective, "beta": beta, **result}
    if args.skip_invalid:
        result["skipped"] = dataset.stats.skipped_invalid
        result["skipped_at"] = dataset.skipped_places()
    if args.json:
        print(json.dumps(strict_json(result), allow_nan=False))
        return 0
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def _check_preference_options(args: argparse.Namespace, objective: Optional[str]) -> None:
    """Refuse `lorakit eval`'s preference options that cannot work: their values whatever the data,
    and with `objective` (--objective's, before the model is read; else the one the data chose)
    what that objective needs or has no use for. kto's data is labelled examples, the others' pairs.

    Raises:
        UserError: naming the option and the fix.
    """
    from lorakit.config import REFERENCE_OBJECTIVES

    if args.beta is not None and not (math.isfinite(args.beta) and args.beta > 0):
        raise UserError(f"--beta {args.beta}: the objective's beta must be a number > 0 (training's train.beta)")
    if not (math.isfinite(args.simpo_gamma) and args.simpo_gamma >= 0):
        raise UserError(f"--simpo-gamma {args.simpo_gamma}: SimPO's margin must be a number >= 0 (training's train.simpo_gamma)")
    if not all(math.isfinite(w) and w > 0 for w in (args.kto_desirable_weight, args.kto_undesirable_weight)):
        raise UserError(
            f"--kto-desirable-weight {args.kto_desirable_weight} / --kto-undesirable-weight {args.kto_undesirable_weight}: "
            "KTO's weights must be > 0 (training's train.kto_desirable_weight / kto_undesirable_weight)"
        )
    if args.reference_adapter is not None and not Path(args.reference_adapter).is_dir():
        raise UserError(f"--reference-adapter {args.reference_adapter!r}: folder not found; pass the adapter folder the run "
                        "continued (adapter_config.json + adapter_model.safetensors)")  # fmt: skip
    if objective is None:
        return
    if args.adapter is None and objective in REFERENCE_OBJECTIVES:
        if objective == "kto":
            raise UserError(f"{args.data} holds labelled examples: their KTO rewards compare an adapter with its base; pass --adapter")
        raise UserError(
            f"{args.data} holds preference pairs: their {objective.upper()} rewards compare an adapter with its "
            "base; pass --adapter (or --objective simpo / orpo, which need no reference)"
        )
    if args.reference_adapter is not None and objective not in REFERENCE_OBJECTIVES:
        raise UserError(f"--reference-adapter: {objective} compares with no reference; drop it, or use --objective dpo / ipo")
    if args.generate:
        what = "labelled examples" if objective == "kto" else "preference pairs"
        raise UserError(f"--generate: {args.data} holds {what}, which have no single answer to match")


def _check_plain_base(config: LoraConfig, path: str, objective: str) -> None:
    """Refuse a PiSSA / OLoRA adapter where a reference is compared: loading one moves part of the
    base into the adapter, so neither the base with adapters off nor a second adapter over it is
    what the reference should be."""
    if config.init in ("pissa", "olora"):
        raise UserError(
            f"{path}: a {config.init} adapter moves part of the base into itself, so {objective.upper()}'s reference "
            "cannot be computed over it; write it as a plain LoRA first (lorakit convert) and evaluate that"
        )


def _max_length(asked: Optional[int], model: nn.Module, name: str, source: str = "--max-length") -> int:
    """--max-length (`source`: where `asked` came from), by default 1024 or a position table's length
    if shorter.

    Raises:
        UserError: --max-length below 1, or above a position table's length.
    """
    limit, table = position_limit(model)
    if asked is None:
        return min(DEFAULT_MAX_LENGTH, limit) if table else DEFAULT_MAX_LENGTH
    if asked < 1 or (table and asked > limit):
        most = f"{limit} (the rows of {name}'s position table)" if table else "any positive length"
        raise UserError(f"{source} {asked}: give 1 to {most}" + ("; pass --max-length" if source != "--max-length" else ""))
    return asked


def _columns(pairs: list[str]) -> dict[str, str]:
    """--column KEY=NAME options as a data.columns mapping, checked as the config checks it."""
    from lorakit.config import column_problems

    columns: dict[str, str] = {}
    for pair in pairs:
        key, sep, name = (part.strip() for part in pair.partition("="))
        if not sep:
            raise UserError(f"--column {pair!r}: give KEY=NAME, lorakit's key and the records' name for it, e.g. prompt=question")
        if key in columns and columns[key] != name:
            raise UserError(f"--column {pair!r}: {key!r} is already mapped to {columns[key]!r}; give each key once")
        columns[key] = name
    problems = column_problems(columns, "--column", example="--column prompt=question")
    if problems:
        raise UserError(problems[0])
    return columns


def _note_the_runs_own_settings(args: argparse.Namespace, objective: str) -> None:
    """Say so (stderr) where the adapter's run, whose config.yaml lorakit train writes beside its
    adapter/, measured with another objective, beta or reference than this eval does: its
    eval_loss would then not be this one."""
    from lorakit.config import PREFERENCE_BETA, REFERENCE_OBJECTIVES

    if args.adapter is None:
        return
    run = run_config_of(args.adapter)[1]
    train = run.get("train") if isinstance(run.get("train"), dict) else {}
    notes = []
    if train.get("objective") in PREFERENCE_BETA and train["objective"] != objective:
        notes.append(f"trained with objective {train['objective']} (pass --objective {train['objective']})")
    beta = args.beta if args.beta is not None else PREFERENCE_BETA.get(objective)
    if train.get("objective") == objective and train.get("beta") is not None and train["beta"] != beta:
        notes.append(f"trained with beta {train['beta']} (pass --beta {train['beta']})")
    if objective in REFERENCE_OBJECTIVES and run.get("adapter") and args.reference_adapter is None:
        notes.append(f"its reference was the starting adapter {run['adapter']}, here the base is "
                     f"(pass --reference-adapter {run['adapter']})")  # fmt: skip
    if notes:
        print(f"note: the run of {args.adapter} " + "; ".join(notes) + ": its eval_loss is not this one", file=sys.stderr)


# What of a run's config shapes its eval loss, and `lorakit eval`'s flag for each: the values a flag
# takes (None: any positive int; str: any text)
_RUN_FLAGS = {"max_length": "--max-length", "train_turns": "--train-turns", "train_on_inputs": "--train-on-inputs",
              "too_long": "--too-long", "system_prompt": "--system", "precision": "--precision"}  # fmt: skip
_RUN_VALUES: dict[str, Any] = {"max_length": None, "train_turns": ("all", "last"), "train_on_inputs": (True, False),
                               "too_long": ("truncate", "drop"), "system_prompt": str, "precision": ("auto", "bf16", "fp16", "fp32")}  # fmt: skip


def run_config_of(adapter: Union[str, Path]) -> tuple[Optional[Path], dict[str, Any]]:
    """The config.yaml of the lorakit run that wrote `adapter` (beside its adapter/ or best_adapter/,
    or two levels up from a checkpoint's) and what it holds; (None, {}) where there is none readable."""
    import yaml

    adapter = Path(adapter).absolute()
    candidates = [adapter.parent / "config.yaml"]
    if adapter.parent.parent.name == "checkpoints":  # output_dir/checkpoints/step-N/adapter
        candidates.append(adapter.parent.parent.parent / "config.yaml")
    for path in candidates:
        try:
            run = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):  # (ValueError: not UTF-8)
            continue
        if isinstance(run, dict):
            return path, run
    return None, {}


def _eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the loss is measured with (None: the default): the flags given, then, for the ones not
    given, the adapter's run's own (`run_config_of`), so that the figure is that run's eval_loss;
    said on stderr when any comes from the run.

    Raises:
        UserError: a value in the run's config.yaml that its flag would not take.
    """
    from lorakit.config import DataConfig

    given = {"max_length": args.max_length, "train_turns": args.train_turns, "too_long": args.too_long,
             "train_on_inputs": None if args.train_on_inputs is None else args.train_on_inputs == "true",
             "system_prompt": args.system, "precision": args.precision}  # fmt: skip
    path, run = run_config_of(args.adapter) if args.adapter is not None else (None, {})
    data, train = (run.get(section) if isinstance(run.get(section), dict) else {} for section in ("data", "train"))
    found = {**{key: value for key, value in data.items() if key in _RUN_FLAGS}, "precision": train.get("precision")}
    defaults = {**{key: getattr(DataConfig(), key) for key in _RUN_FLAGS if key != "precision"}, "precision": None}
    taken = {}
    for key, value in found.items():
        if given[key] is not None or value is None or value == defaults[key]:
            continue
        allowed = _RUN_VALUES[key]
        fits = (isinstance(value, int) and not isinstance(value, bool) and value >= 1 if allowed is None
                else isinstance(value, str) if allowed is str else value in allowed and type(value) is type(allowed[0]))  # fmt: skip
        if not fits:
            section = "train" if key == "precision" else "data"
            raise UserError(f"{path}: {section}.{key} = {value!r} is not a value lorakit eval measures with; pass "
                            f"{_RUN_FLAGS[key]} to set it yourself")  # fmt: skip
        taken[key] = value
    if taken:
        said = ", ".join(f"{_RUN_FLAGS[k]} {shlex.quote(str(v).lower() if isinstance(v, bool) else str(v))}" for k, v in taken.items())
        print(f"note: as the run of {args.adapter} ({path}): {said}", file=sys.stderr)
    if run.get("quantize") == "nf4" and getattr(args, "quantize", None) != "nf4":  # a flag with a default: said, not taken
        print(f"note: the run of {args.adapter} trained over the base in 4-bit NF4; pass --quantize nf4 for its eval_loss",
              file=sys.stderr)  # fmt: skip
    return {key: given[key] if given[key] is not None else taken.get(key) for key in _RUN_FLAGS}


def eval_command(args: argparse.Namespace) -> int:
    from lorakit.config import DataConfig
    from lorakit.data import load_dataset
    from lorakit.data_files import read_records
    from lorakit.records import BadRecord, rename_columns
    from lorakit.generate import check_utf8_argument, load_for_command

    # the options' own mistakes, refused before the model is read (no tokenizer encodes bytes that are not UTF-8)
    check_utf8_argument("--system", args.system)
    if args.system is not None and not args.system.strip():
        raise UserError(f"--system {args.system!r}: give the system message's text, or leave --system out")
    columns = _columns(args.column)
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data!r}: no such file; give a .jsonl, .json, .parquet, .arrow, .csv or .tsv file of records")
    _check_preference_options(args, args.objective)
    settings = _eval_settings(args)
    args.precision = settings.pop("precision")
    model, tokenizer = load_for_command(args)
    from lorakit.fused import use_lorakit_kernels

    use_lorakit_kernels(model)  # the trainer's forward, so the losses are a run's own (bf16 too)
    asked = settings.pop("max_length")
    max_length = _max_length(asked, model, args.model, "--max-length" if args.max_length is not None else "data.max_length of the run")
    system_prompt = settings["system_prompt"]
    # --objective reads the records as pairs (UltraFeedback's also hold chat messages, which auto
    # reads as chat), or kto as labelled examples (prompt, completion, label)
    fmt = "unpaired" if args.objective == "kto" else "preference" if args.objective else "auto"
    cfg = DataConfig(max_length=max_length, packing=False, format=fmt, skip_invalid=args.skip_invalid, columns=columns,
                     **{key: value for key, value in settings.items() if value is not None})  # fmt: skip
    dataset = load_dataset(args.data, tokenizer, cfg, use_cache=False)
    if dataset.pairs:
        return _preference_eval(args, model, dataset, max_length)
    if args.reference_adapter is not None:
        raise UserError(f"--reference-adapter: {args.data} holds no preference pairs, whose dpo / ipo rewards use a reference")
    result: dict[str, Any] = {"loss": None, "perplexity": None, "accuracy": None}
    result.update(evaluate_loss(model, dataset, batch_size=args.batch_size, max_length=max_length))
    result["examples"] = len(dataset)
    if args.skip_invalid:
        result["skipped"] = dataset.stats.skipped_invalid
        result["skipped_at"] = dataset.skipped_places()
    if args.generate:
        records = []
        for _, record in read_records(args.data, skip_invalid=args.skip_invalid):
            try:
                records.append(rename_columns(record, columns, source="--column"))
            except BadRecord:  # skipped by the loss above (--skip-invalid), so here too
                continue
        acc = generation_accuracy(
            model, tokenizer, records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            skip_invalid=args.skip_invalid, system_prompt=system_prompt,
        )  # fmt: skip
        result.update(accuracy=acc["accuracy"], correct=acc["correct"], total=acc["total"], failures=acc["failures"])
    if args.json:
        print(json.dumps(strict_json(result), ensure_ascii=False, allow_nan=False))
        return 0
    rows = [("examples", f"{result['examples']}"), ("tokens", f"{result['tokens']}"),
            ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}")]  # fmt: skip
    if args.skip_invalid:
        where = ", ".join(result["skipped_at"]) + (", ..." if result["skipped"] > len(result["skipped_at"]) else "")
        rows.insert(1, ("skipped", f"{result['skipped']} invalid records" + (f" ({where})" if result["skipped_at"] else "")))
    if args.generate:
        rows.append(("accuracy", f"{result['accuracy']:.2%} ({result['correct']}/{result['total']} exact matches)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for f in result.get("failures", []):
        print(f"\n--- failure\nprompt:   {f['prompt']!r}\nexpected: {f['expected']!r}\ngot:      {f['got']!r}")
    return 0
