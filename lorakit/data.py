"""Training data: JSONL/JSON records (or Parquet, Arrow, CSV, TSV rows) -> tokenized examples with
loss masks -> micro-batches.

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
               only with `data.format: unpaired`): a pair of examples, prompt + completion and the
               KL example, the prompt with the completion of the record before it (the first: of
               the last); `TokenizedDataset.desirable` holds the labels.

Token ids and labels:
- Non-chat text is tokenized with the tokenizer's special tokens (a BOS where its post-processor
  adds one); EOS is appended when the tokenizer has one and the ids do not already end with it,
  and it is trained, so the fine-tuned model learns to stop.
- Chat ids are exactly `tokenizer.apply_chat_template(messages)["input_ids"]`. An assistant turn
  is located by rendering message prefixes: it starts where the render of the messages before it
  with `add_generation_prompt=True` ends and ends where the render including it ends, so the
  span holds the content and the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`).
  Whitespace the template writes after the end-of-turn token (ChatML's "\\n") is not trained:
  generation stops at the end-of-turn token, so the model never produces it. Some templates render
  a turn one way while it is the last and another once a later turn follows (Qwen3's empty think
  block goes into the last assistant turn only; Mistral's system prompt into the last user turn):
  such a turn is found by its content instead (followed by the end-of-turn text, where the
  template writes one), after the turns before it, and trained with that end-of-turn text.
- A preference record's chat examples train only the answer's assistant turns; the prompt's own
  assistant turns are neither trained nor located (a template may rewrite them).
- A token is trainable when its characters overlap a trained span (a token straddling the
  prompt/completion boundary is trained). `train_on_inputs: true` trains every token.
- `labels` use the Hugging Face convention (aligned with `input_ids`; the loss shifts by one),
  -100 where there is no loss. The first token of every example is -100: nothing inside the
  example predicts it, and in a packed row this keeps the loss from crossing example boundaries.
- Examples longer than `max_length` are truncated (the end is cut) or, with `too_long: drop`,
  dropped; examples left with no trainable token are dropped. All of it is counted in `DataStats`.

Batches (`BatchStream`): rows are packed bins (best-fit decreasing, computed once; the bin order is
reshuffled every epoch) or single examples bucketed by length. There is no attention mask:
`position_ids` restart at 0 for every example and for the padding at the end of a row, and
transformers (masking_utils.find_packed_sequence_indices) turns restarting positions into a
block-diagonal causal mask when the model gets `attention_mask=None` and no KV cache
(`use_cache=False`). Packed and unpacked batches therefore give the same per-token losses.

Speed: records are rendered in Python (a chat template costs ~15 us per render) and tokenized in
large batches by the Rust tokenizer, which spreads a batch over all cores itself; worker
processes would only add pickling of texts and ids for the small Python share, so none are used.
The result is cached on disk (see `load_dataset`). Only JSONL and JSON are read: Parquet or CSV
would pull in `datasets`/`pyarrow` for what a one-line `datasets` export to JSONL does.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
from jinja2 import TemplateError
import torch

from lorakit.config import DataConfig, data_sources, eval_set_sources, own_options, reading_options
from lorakit.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# bump when tokenization, what is refused or the cache layout changes (10: a turn's own end of turn, the lead
# before a reply, tool results checked; 11: trained empty replies counted)
FORMAT_VERSION = 11
FORMATS = ("text", "completion", "instruction", "chat", "preference", "unpaired")
MAX_REPORTED = 10  # line numbers kept in DataStats.skipped_lines and listed in an error
CHUNK = 2048  # records per tokenizer batch: enough for the Rust thread pool, small enough to pipeline
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
_SKIP_HINT = "fix it, or skip invalid records with data.skip_invalid: true (lorakit eval --skip-invalid)"
# What a JSON value nested past Python's recursion limit is told (json raises RecursionError for it).
TOO_DEEP = "nested too deeply to read (lists or objects about 1000 levels inside each other, past Python's recursion limit)"


@dataclass
class DataStats:
    """What happened to the records of one data file; every count is reported to the user."""

    records: int = 0  # records in the file, invalid ones included
    examples: int = 0  # examples kept
    tokens: int = 0  # tokens in the kept examples
    trainable_tokens: int = 0  # labels != -100 in the kept examples
    truncated: int = 0  # kept, cut to max_length
    dropped_too_long: int = 0  # longer than max_length with too_long: drop
    dropped_no_trainable: int = 0  # no trainable token left (e.g. truncation cut the whole answer)
    skipped_invalid: int = 0  # invalid records skipped with skip_invalid: true
    skipped_lines: list[int] = field(default_factory=list)  # the first MAX_REPORTED of them
    # chat records with a trained assistant turn that says nothing (no text, call or reasoning):
    # it teaches only its end of turn, which in scraped data is a lost reply (a note, not an error)
    empty_replies: int = 0
    first_empty_reply_line: int = 0  # the line of the first of them (0: none)
    pairs: int = 0  # preference pairs kept (each is two examples); 0 for other data
    # unpaired (KTO) data: `pairs` counts its examples, each kept with its mismatched KL example
    unpaired: bool = False
    desirable: int = 0  # of those, labelled desirable


class TokenizedDataset:
    """Examples stored flat: `input_ids`/`labels` int32 arrays (N,) and int64 `offsets` (n+1,).

    Example i is `input_ids[offsets[i]:offsets[i+1]]`; labels are -100 where there is no loss.
    pairs: preference data, examples 2j (the chosen answer) and 2j+1 (the rejected one) are pair j.
    desirable: unpaired (KTO) data, which is pairs too: 2j is example j (prompt + completion), 2j+1
        its KL example (the same prompt with another example's completion), desirable[j] its label.
    lines: (n,) int64, the line of the record each example comes from (a Parquet / Arrow file's row);
        files, the files they come from, and file_ids (n,) int32, which of them (`record_of`).
    """

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, stats: DataStats, *, pairs: bool = False,
        desirable: Optional[np.ndarray] = None, lines: Optional[np.ndarray] = None, files: Sequence[str] = (),
        file_ids: Optional[np.ndarray] = None,
    ) -> None:  # fmt: skip
        self.input_ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.stats = stats
        self.pairs = pairs
        self.desirable = None if desirable is None else np.ascontiguousarray(desirable, dtype=np.bool_)
        assert self.input_ids.shape == self.labels.shape and self.offsets[-1] == len(self.input_ids)
        assert not pairs or len(self) % 2 == 0, "preference data holds whole pairs"
        assert self.desirable is None or (pairs and len(self.desirable) == len(self) // 2)
        self.lines = None if lines is None else np.ascontiguousarray(lines, dtype=np.int64)
        self.files = list(files)
        self.file_ids = np.zeros(len(self), np.int32) if file_ids is None else np.ascontiguousarray(file_ids, dtype=np.int32)
        assert (self.lines is None or len(self.lines) == len(self)) and len(self.file_ids) == len(self)
        self.skipped_at: Optional[list[str]] = None  # set where several files were read; see skipped_places
        self.empty_reply_at: Optional[str] = None  # likewise; see first_empty_reply

    def skipped_places(self) -> list[str]:
        """`FILE:LINE` of the first MAX_REPORTED invalid records skipped (data.skip_invalid)."""
        if self.skipped_at is not None:
            return self.skipped_at
        return [f"{self.files[0]}:{line}" for line in self.stats.skipped_lines] if len(self.files) == 1 else []

    def first_empty_reply(self) -> str:
        """`FILE:LINE` of the first chat record that trains an empty reply (`DataStats.empty_replies`);
        "" for none, or where not known."""
        if self.empty_reply_at is not None:
            return self.empty_reply_at
        line = self.stats.first_empty_reply_line
        return f"{self.files[0]}:{line}" if line and len(self.files) == 1 else ""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i, views of shape (L,)."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def record_of(self, i: int) -> Optional[str]:
        """`FILE:LINE` of the record example i comes from, where a user finds it; None if not known."""
        if self.lines is None or not self.files:
            return None
        return f"{self.files[self.file_ids[i]]}:{self.lines[i]}"

    def num_units(self) -> int:
        """What batches and held-out splits count: pairs for preference data, else examples."""
        return len(self) // 2 if self.pairs else len(self)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TokenizedDataset":
        """The examples at `indices` (the pairs, for preference data), in that order. The counts of
        what reading the files found (`FILE_COUNTS`) are kept; examples, pairs, tokens and
        trainable_tokens are those of the subset."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.pairs:
            idx = np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)
        lengths = self.lengths()[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(self.offsets[idx] - offsets[:-1], lengths)
        labels = self.labels[gather]
        stats = dataclasses.replace(
            self.stats,
            examples=len(idx),
            tokens=int(offsets[-1]),
            trainable_tokens=int((labels != IGNORE_INDEX).sum()),
            skipped_lines=list(self.stats.skipped_lines),
            pairs=len(idx) // 2 if self.pairs else 0,
        )
        desirable = None
        if self.desirable is not None:
            desirable = self.desirable[idx[0::2] // 2]
            stats.desirable = int(desirable.sum())
        subset = TokenizedDataset(
            self.input_ids[gather], labels, offsets, stats, pairs=self.pairs, desirable=desirable,
            lines=None if self.lines is None else self.lines[idx], files=self.files, file_ids=self.file_ids[idx],
        )  # fmt: skip
        subset.skipped_at = self.skipped_places()
        subset.empty_reply_at = self.first_empty_reply()
        return subset

    @classmethod
    def concat(cls, parts: Sequence["TokenizedDataset"], sources: Sequence[str]) -> "TokenizedDataset":
        """The examples of `parts` one after another, with their counts summed and their skipped
        records' places listed (the first MAX_REPORTED).

        Raises:
            UserError: preference pairs in some parts and other records in others.
        """
        if len(parts) == 1:
            return parts[0]
        kinds = [p.desirable is not None if p.pairs else None for p in parts]
        if len(set(kinds)) > 1:
            names = {None: "neither preference pairs nor labelled examples", False: "preference pairs",
                     True: "labelled (unpaired) examples"}  # fmt: skip
            other = next(i for i, k in enumerate(kinds) if k != kinds[0])
            raise UserError(
                f"{sources[other]}: holds {names[kinds[other]]}, while {sources[0]} holds {names[kinds[0]]}; the files "
                "of one run train with one objective, so list only one kind"
            )
        lengths = np.concatenate([p.lengths() for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        counts = {
            f.name: sum(getattr(p.stats, f.name) for p in parts)
            for f in dataclasses.fields(DataStats) if f.name not in ("skipped_lines", "unpaired", "first_empty_reply_line")
        }  # fmt: skip
        unpaired = parts[0].desirable is not None
        where: dict[str, Any] = {}  # each example's record, where every part knows its own
        if all(p.lines is not None and p.files for p in parts):
            files = list(dict.fromkeys(f for p in parts for f in p.files))  # a file listed twice is one file
            ids = [np.array([files.index(f) for f in p.files], dtype=np.int32)[p.file_ids] for p in parts]
            where = dict(lines=np.concatenate([p.lines for p in parts]), files=files, file_ids=np.concatenate(ids))
        joined = cls(
            np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]), offsets,
            DataStats(**counts, unpaired=unpaired), pairs=parts[0].pairs,
            desirable=np.concatenate([p.desirable for p in parts]) if unpaired else None, **where,
        )  # fmt: skip
        joined.skipped_at = [place for p in parts for place in p.skipped_places()][:MAX_REPORTED]
        joined.empty_reply_at = _first_empty_reply(parts)
        return joined

    def save(self, path: Union[str, Path]) -> None:
        """Write an .npz (no pickle) atomically: a temporary file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats = np.frombuffer(json.dumps(dataclasses.asdict(self.stats)).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                extra = {} if self.desirable is None else {"desirable": self.desirable}
                if self.lines is not None:  # (the file's name is not kept: the same bytes may be another file)
                    extra["lines"] = self.lines
                np.savez(
                    f, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets, stats=stats,
                    pairs=np.array([self.pairs]), **extra,
                )  # fmt: skip
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TokenizedDataset":
        with np.load(path, allow_pickle=False) as z:
            stats = DataStats(**json.loads(z["stats"].tobytes().decode()))
            pairs = bool(z["pairs"][0]) if "pairs" in z.files else False
            desirable = z["desirable"] if "desirable" in z.files else None
            lines = z["lines"] if "lines" in z.files else None
            return cls(z["input_ids"], z["labels"], z["offsets"], stats, pairs=pairs, desirable=desirable, lines=lines)


def _first_empty_reply(parts: Sequence[TokenizedDataset]) -> str:
    return next((place for place in (p.first_empty_reply() for p in parts) if place), "")


def show_example(
    tokenizer: Any, ids: np.ndarray, labels: np.ndarray, *, color: bool = False, marks: tuple[str, str] = ("⟦", "⟧")
) -> str:
    """An example's text as the model reads it, special tokens written out, with the trained tokens
    (labels not -100) in green (`color`, for a terminal) or between `marks`. Each run of trained or
    untrained tokens is what it adds to the decoded text of the tokens before it: decoded alone, a
    run would lose the space a SentencePiece decoder strips from a text's start (Llama's, Mistral's),
    and a character whose bytes two runs share would show as replacement characters in both; it is
    written whole in the run that completes it."""

    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    runs = [(trained, [i for i, _ in run]) for trained, run in
            itertools.groupby(zip(ids.tolist(), labels.tolist()), key=lambda t: t[1] != IGNORE_INDEX)]  # fmt: skip
    out, upto, before = [], [], ""
    for n, (trained, run_ids) in enumerate(runs):
        upto += run_ids
        whole = decode(upto)
        if n < len(runs) - 1:
            whole = whole.rstrip("\ufffd")  # a character the next run completes
        text = whole[len(before) :] if whole.startswith(before) else decode(run_ids)
        before = whole
        out.append((f"\033[32m{text}\033[0m" if color else f"{marks[0]}{text}{marks[1]}") if trained else text)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Reading records


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
    if "prompt" in record and "completion" in record and _label(record.get("label")) is not None:
        # TRL's unpaired preference (KTO) records, labelled as _label reads them (a CSV's "false" too):
        # not SFT data, whose undesirable answers would train
        return "unpaired"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def read_records(path: Union[str, Path], *, skip_invalid: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for every JSON object of a JSONL file or a JSON list (for a table
    file, `TABLE_SUFFIXES`: (row number, record) for every row).

    Raises:
        UserError: missing/unreadable/empty file, invalid JSON or a non-object record
            (`FILE:LINE: invalid JSON: <reason>`), unless `skip_invalid` skips such lines.
    """
    records, problems = _read(Path(path), skip_invalid=skip_invalid)
    if problems and not skip_invalid:
        _raise_problems(str(path), problems)
    return records


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, less a byte-order mark (Windows editors write one).

    Raises:
        UserError: bytes that are not UTF-8, named by their line (`FILE:LINE: not UTF-8 text`).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def undecodable_byte(text: str) -> Optional[str]:
    """Where a command-line argument or terminal line holds bytes that were not UTF-8, else None.

    Python keeps such bytes as lone surrogates (U+DC80-U+DCFF, its `surrogateescape`), which no
    tokenizer can encode."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    code = ord(found.group())
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
    return f"{what} at character {found.start() + 1} is not UTF-8 text"


def _read(path: Path, *, skip_invalid: bool) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(records, (line, problem) of the entries that are no readable record). The problems are
    returned, not raised, so that they are reported with the records' own (`tokenize_records`).

    Raises:
        UserError: a file that is missing, not UTF-8, empty or not readable as a whole (a JSON
            list's syntax error, a CSV's unclosed quote).
    """
    if path.is_dir():
        raise UserError(f"data file {str(path)!r} is a folder; set data.train / data.eval to a file in it (.jsonl, .json, .parquet, .csv)")
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} not found; set data.train / data.eval to a .jsonl, .json, .parquet or .csv file")
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        raise UserError(f"data file {str(path)!r} is compressed, which lorakit does not read; decompress it (e.g. gunzip) and give the file")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _read_table(path)
    text = read_utf8(path)
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: the file is empty; write one JSON object per line (JSONL) or a JSON list")
    if stripped[0] == "[":
        records = _read_json_list(path, text, skip_invalid=skip_invalid)
        escaped = _SURROGATE_ESCAPE.search(text) is not None
        found = [lone_surrogate(r) if escaped else None for _, r in records]
        problems = [(line, problem) for (line, _), problem in zip(records, found) if problem is not None]
        records = [record for record, problem in zip(records, found) if problem is None]
    else:
        records, problems = _read_jsonl(path, text)
    if not records and not problems:
        raise UserError(f"{path}: no records in the file; write one JSON object per line (JSONL) or a JSON list")
    return records, problems


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


# Tables read as records, a row each: Parquet and Arrow (Hugging Face datasets' files; needs
# pyarrow: lorakit's `parquet` extra), numbered by row from 1; CSV and TSV (a header row, then
# a record a row; string cells only, so no chat messages), numbered by the line a row starts on,
# as JSONL records are. A missing value (a null cell, an empty CSV cell) is a key the record lacks:
# a column other rows fill, such as Alpaca's empty `input`.
TABLE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv")


def _read_table(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(records, (line, problem) of the rows that are no record) of a table file."""
    if path.suffix.lower() in (".csv", ".tsv"):
        records, problems = _read_csv(path)
    else:
        records, problems = _read_arrow(path), []
    if not records and not problems:
        raise UserError(f"{path}: no rows in the table")
    return records, problems


def _read_csv(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    import csv

    csv.field_size_limit(2**31 - 1)  # whole documents in a cell: far beyond the module's 128 KiB default
    records, problems = [], []
    # Read as a stream, not decoded whole first: a StringIO of the text holds 4 bytes a character
    # besides it, 5-6x the file. A file read in text mode decodes a chunk ahead of the rows, so its
    # bad byte is named by the file's bytes (read_utf8), not by the row the reader is at.
    with open(path, newline="", encoding="utf-8-sig") as f:
        # strict: a quote never closed, or a cell going on after its closing quote, is an error, not
        # the rest of the file read as one cell (or the quotes dropped)
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
        line = 1
        try:
            header = next(reader, None)
            twice = next((name for i, name in enumerate(header or []) if name in header[:i]), None)
            if twice is not None:  # a row would keep one of its two cells, silently
                raise UserError(f"{path}:1: the header names the column {twice!r} twice; give each column its own name")
            while True:
                line = reader.line_num + 1  # where the next row starts (blank lines give empty rows)
                row = next(reader, None)
                if row is None:
                    break
                if not row:
                    continue
                if header is not None and len(row) > len(header):
                    problems.append((line, f"{len(row)} cells, more than the header's {len(header)}; quote cells that "
                                           "hold the delimiter"))  # fmt: skip
                    continue
                record = _Row((k, v) for k, v in zip(header, row) if v != "")
                record.empty = [k for k, v in zip(header, row) if v == ""]
                records.append((line, record))
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise UserError(f"{path}:{line}: a quoted cell of the row starting here is never closed (the file ends inside "
                                'it); close its quote, and write a quote inside a quoted cell twice ("")') from None  # fmt: skip
            if "expected after" in str(exc):
                raise UserError(f"{path}:{reader.line_num}: a cell goes on after its closing quote ({exc}); quote the whole "
                                'cell and write the quotes inside it twice ("")') from None  # fmt: skip
            raise UserError(f"{path}:{reader.line_num}: not readable as {path.suffix[1:].upper()} ({exc}); save it as UTF-8 "
                            "with quoted cells") from None  # fmt: skip
        except UnicodeDecodeError:
            read_utf8(path)  # raises, naming the bad byte's line
            raise
    return records, problems


class _Row(dict):
    """A CSV/TSV row as a record, which also knows its empty cells (`empty`): they are keys it
    lacks, and a record found invalid names them, since the reason is then often an empty cell."""

    empty: list[str] = []


def _read_arrow(path: Path) -> list[tuple[int, dict]]:
    suffix = path.suffix.lower()
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading {suffix} files needs pyarrow; pip install pyarrow (lorakit's `parquet` extra)") from None
    try:
        if suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:  # datasets writes the Arrow stream format; the file format is the other one
            try:
                table = pyarrow.ipc.open_stream(path).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_file(path).read_all()
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable {suffix[1:]} file ({str(exc).splitlines()[0]})") from None
    return [(i, _without_nulls(row)) for i, row in enumerate(table.to_pylist(), 1)]


def _without_nulls(value: Any) -> Any:
    """A table row with the keys whose value is null left out, in nested objects too: Arrow gives a
    column of objects the keys of all its rows, null where a row has none (a tool call's arguments,
    a message's tool_calls), so it cannot tell a key the record lacks from a null one."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _read_jsonl(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    records, problems = [], []
    loads = json.loads
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as exc:
            problems.append((lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except RecursionError:
            problems.append((lineno, f"the record is {TOO_DEEP}"))
            continue
        if not isinstance(obj, dict):
            problems.append((lineno, f"expected a JSON object per line, got {_kind(obj)}"))
            continue
        surrogate = lone_surrogate(obj) if _SURROGATE_ESCAPE.search(line) else None
        if surrogate is not None:
            problems.append((lineno, surrogate))
            continue
        records.append((lineno, obj))
    if problems and text.lstrip().startswith("{"):  # (a JSONL file of several objects is no one JSON value)
        _refuse_one_object(path, text)
    return records, problems


def _refuse_one_object(path: Path, text: str) -> None:
    """Raises UserError where a file whose lines are no JSON objects is one object written over
    several lines (pretty-printed), which its lines' errors would not tell."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return
    if isinstance(obj, dict):
        raise UserError(
            f"{path}: holds one JSON object written over several lines; a data file holds one object per line "
            "(JSONL) or a JSON list of objects: write each record on one line, or put them in [ ]"
        )


# A JSON escape of a UTF-16 surrogate: a lone one (\ud800 without its pair) decodes to no character,
# which the tokenizer cannot encode; only lines with such an escape are searched for one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(obj: Any, path: str = "") -> Optional[str]:
    """The problem of a record that holds a lone surrogate, in a string at `path` or a key, else None."""
    if isinstance(obj, str):
        found = _SURROGATE.search(obj)
        return None if found is None else f"'{path}' holds {_surrogate_escape(found)}"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _SURROGATE.search(key)
            if found is not None:
                return f"a key{f' of {path!r}' if path else ''} holds {_surrogate_escape(found)}"
            problem = lone_surrogate(value, f"{path}.{key}" if path else key)
            if problem is not None:
                return problem
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            problem = lone_surrogate(value, f"{path}[{i}]")
            if problem is not None:
                return problem
    return None


def _surrogate_escape(found: re.Match) -> str:
    return f"\\u{ord(found.group()):04x}, half of a UTF-16 surrogate pair and no character (an escape cut in two)"


def _read_json_list(path: Path, text: str, *, skip_invalid: bool = False) -> list[tuple[int, dict]]:
    """Parse a JSON list element by element to know each record's line. A syntax error cannot
    be skipped here (the rest of the list cannot be re-synchronised), so it always raises.
    Where elements share a line (`json.dump` writes the list on one), the records are numbered by
    their place in the list instead, so that each has a number of its own."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    records: list[tuple[int, dict]] = []
    i = skip(skip(0) + 1)
    line, counted = 1, 0
    try:
        if i < len(text) and text[i] == "]":
            return records
        while True:
            line += text.count("\n", counted, i)
            counted = i
            try:
                obj, end = dec.raw_decode(text, i)
            except RecursionError:
                raise UserError(f"{path}:{line}: the list element is {TOO_DEEP}; fix that element") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{line}: expected a list of JSON objects, got {_kind(obj)}; fix that element")
            records.append((line, obj))
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
            elif i < len(text) and text[i] == "]":
                break
            else:
                raise json.JSONDecodeError("expected ',' or ']' after a list element", text, i)
    except json.JSONDecodeError as exc:
        unskippable = " (data.skip_invalid cannot skip it: the rest of a list cannot be read past a syntax error)" if skip_invalid else ""
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){unskippable}; fix the list") from None
    if len({line for line, _ in records}) < len(records):
        return [(n, record) for n, (_, record) in enumerate(records, 1)]
    return records


def _kind(obj: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(obj), f"a number ({obj!r})" if isinstance(obj, (int, float)) else type(obj).__name__)


def _raise_problems(source: str, problems: list[tuple[int, str]]) -> None:
    if len(problems) == 1:
        line, msg = problems[0]
        raise UserError(f"{source}:{line}: {msg}; {_SKIP_HINT}")
    listed = "\n  ".join(f"{source}:{line}: {msg}" for line, msg in problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    hint = _SKIP_HINT.replace("fix it", "fix them")
    raise UserError(f"{source}: {len(problems)} invalid records ({hint}):\n  {listed}{more}")


# ---------------------------------------------------------------------------------------------
# Validating and rendering records


class BadRecord(Exception):
    """A record a user must fix; becomes `FILE:LINE: message` (or is skipped)."""


class Chat(NamedTuple):
    """A chat example before rendering."""

    messages: list[dict]
    untrained: tuple[int, ...] = ()  # indices of the assistant turns not trained
    tools: Optional[list[dict]] = None  # the JSON schemas given to the template as `tools`


def _says_nothing_trained(chat: Chat, writes_reasoning: bool) -> bool:
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
        raise BadRecord(f"'{name}' is missing" if key not in record else f"'{name}' must be a string, got {_kind(value)}")
    if not empty_ok and not value:
        raise BadRecord(f"'{name}' is empty; give it text or remove the record")
    return value


def prepare_record(
    record: dict, fmt: str, train_on_inputs: bool, train_turns: str = "all", *, format_key: str = "data.format"
) -> tuple[str, Any]:
    """Validate one record -> (format, (text, prompt_chars)), ("chat", Chat) or ("preference",
    [chosen, rejected]), each of those a completion or chat (format, payload). train_turns: "all" or
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
            raise BadRecord(f"'input' must be a string or missing, got {_kind(extra)}")
        if extra:
            prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction, input=extra)
        else:
            prompt = INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=instruction)
        return fmt, (prompt + _string(record, "output"), len(prompt))
    if fmt == "preference":
        return fmt, _with_tools(_preference_pair(record), record)
    if fmt == "unpaired":
        if _label(record["label"]) is None:
            raise BadRecord(
                f"'label' must be true (a desirable completion) or false (also 1 / 0, \"true\" / \"false\"), "
                f"got {_kind(record['label'])}"
            )
        try:
            own = _preference_pair({"prompt": record["prompt"], "chosen": record["completion"], "rejected": record["completion"]})
        except BadRecord as exc:  # read as a pair: its words name the pair's keys
            raise BadRecord(str(exc).replace("'chosen'", "'completion'")) from None
        return fmt, (record, _with_tools([own[0]], record)[0])
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


def _with_tools(examples: list[tuple[str, Any]], record: dict) -> list[tuple[str, Any]]:
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
        raise BadRecord(f"'tools' must be a list of function schemas, got {_kind(tools)}")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(
                f"tools[{i}] must be a function schema with a 'name' ({{\"type\": \"function\", \"function\": "
                f"{{\"name\": ..., \"parameters\": ...}}}}), got {_kind(tool) if not isinstance(tool, dict) else sorted(tool)}"
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
        raise BadRecord(f"{where} must be a non-empty list of calls ({{\"name\", \"arguments\"}}), got {_kind(value)}")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(f"{where}[{i}] must be a call with a function 'name' and 'arguments', got {_kind(call)}")
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
            raise BadRecord(f"{where}[{i}].arguments must be an object (or its JSON), got {_kind(arguments)}")
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


def _preference_pair(record: dict) -> list[tuple[str, Any]]:
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
        raise BadRecord(f"'prompt' must be a string or a list of chat messages, got {_kind(prompt)}")
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
            raise BadRecord(f"'{key}' must be a string or a list of chat messages (the prompt is chat), got {_kind(answer)}")
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
        got = "an empty list" if isinstance(raw, list) else _kind(raw)
        raise BadRecord(f"'{key}' must be a non-empty list of {{{role_key}, {text_key}}} objects, got {got}")
    roles = _SHAREGPT_ROLES if sharegpt else {**{r: r for r in _ROLES}, "function": "tool"}  # (OpenAI's older name)
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRecord(f"{key}[{i}] must be an object with '{role_key}' and '{text_key}', got {_kind(msg)}")
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
            got = "is missing" if text_key not in msg else f"must be a string, got {_kind(content)}"
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


class _ChatRenderer:
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


def _chat_spans(
    renderer: _ChatRenderer, chats: Sequence[Chat], train_on_inputs: bool
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


def _turn_alone(renderer: _ChatRenderer, turn: dict, tools: Optional[list[dict]]) -> Optional[str]:
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


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_records(
    records: Sequence[tuple[int, dict]], tokenizer: Any, cfg: DataConfig, *, source: str,
    option_keys: Optional[dict[str, str]] = None, unreadable: Sequence[tuple[int, str]] = (),
) -> TokenizedDataset:
    """Validate, render and tokenize records (from `read_records`) into a TokenizedDataset.
    option_keys: where cfg's format and columns were set, for messages, where not in the data
    section ({"columns": "data.train[1].columns"}: a data list's file sets its own).
    unreadable: (line, problem) of the entries the reader found no record in: reported with the
        records' own problems (one report for the whole file), or skipped and counted as the
        invalid records are (cfg.skip_invalid).

    Raises:
        UserError: `source:LINE: ...` for invalid records (unless cfg.skip_invalid), chat records
            with a tokenizer without chat template, a slow tokenizer, or no example left.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{source}: lorakit needs a fast (Rust) tokenizer; load it with AutoTokenizer (use_fast=True)")
    places = {"format": "data.format", "columns": "data.columns", **(option_keys or {})}
    format_key, columns_key = places["format"], places["columns"]
    stats = DataStats(records=len(records) + len(unreadable))
    problems: list[tuple[int, str]] = list(unreadable)
    prepared: list[tuple[int, str, Any]] = []
    kind = None  # "preference", "unpaired" or "non-preference": the file's records, from its first valid one
    unpaired: list[tuple[int, dict, tuple[str, Any]]] = []  # (line, record, its own example)
    chats: list[tuple[int, Chat]] = []  # the chat records (not a preference record's answers)
    for line, record in records:
        try:
            renamed = rename_columns(record, cfg.columns, source=columns_key)
            try:
                fmt, payload = prepare_record(renamed, cfg.format, cfg.train_on_inputs, cfg.train_turns, format_key=format_key)
            except BadRecord as exc:
                if renamed.keys() != record.keys():  # the keys it names are data.columns', not the file's
                    raise BadRecord(f"{exc} (keys as {columns_key} renames them; the record's own: {sorted(record)})") from None
                raise
            record = renamed
            this = fmt if fmt in ("preference", "unpaired") else "non-preference"
            if fmt == "chat":
                chats.append((line, payload))
            if kind is None:
                kind = this
            elif kind != this:
                raise BadRecord(
                    f"a {fmt} record in a file of {kind} records; a data file holds preference pairs (prompt, chosen, "
                    "rejected), labelled examples (prompt, completion, label) or other records, one kind only"
                )
        except BadRecord as exc:
            empty = getattr(record, "empty", None)
            problems.append((line, f"{exc} (empty cells: {', '.join(empty)})" if empty else str(exc)))
            continue
        # A pair's two examples stay next to each other (2j, 2j+1) through every step below.
        if fmt == "preference":
            prepared.extend((line, *side) for side in payload)
        elif fmt == "unpaired":
            unpaired.append((line, *payload))
        else:
            prepared.append((line, fmt, payload))
    pairs = kind in ("preference", "unpaired")
    labels_by_pair = _kl_pairs(unpaired, prepared, problems, source) if kind == "unpaired" else None
    if cfg.system_prompt is not None:  # every conversation: chats, preference answers, KL examples
        prepared = [(line, fmt, with_system_prompt(payload, cfg.system_prompt) if fmt == "chat" else payload)
                    for line, fmt, payload in prepared]  # fmt: skip
    chat_lines = [line for line, fmt, _ in prepared if fmt == "chat"]
    if chat_lines and tokenizer.chat_template is None:
        raise UserError(
            f"{source}:{chat_lines[0]}: chat records need a tokenizer with a chat template, and this one has "
            "none; set data.chat_template (chatml, or a Jinja file), use the tokenizer of a chat/instruct model, "
            "or write the data as prompt/completion records"
        )
    renderer = _ChatRenderer(tokenizer) if chat_lines else None
    if renderer is not None:
        _check_template_reads_tools(renderer, prepared, source)
        if cfg.system_prompt is not None:
            _check_template_writes_system(renderer, cfg.system_prompt, places.get("system_prompt", "data.system_prompt"))
        writes_reasoning = "reasoning_content" in renderer.template
        empty = [line for line, chat in chats if _says_nothing_trained(chat, writes_reasoning)]
        stats.empty_replies, stats.first_empty_reply_line = len(empty), empty[0] if empty else 0
    eos = tokenizer.eos_token_id
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of short-lived lists/tuples, no cycles: full collections only cost time
    try:
        # Pipeline: the worker thread tokenizes chunk k while this thread renders chunk k+1 and
        # then finishes chunk k (masks, truncation).
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for c in range(0, len(prepared) + CHUNK, CHUNK):
                job = _render_chunk(prepared[c : c + CHUNK], renderer, cfg.train_on_inputs, problems, pairs)
                future = pool.submit(_encode_job, backend, job) if job.size else None
                if pending is not None:
                    flat, labels, lengths, at = _assemble(
                        _finish_chunk(pending[0], pending[1].result(), eos), cfg, stats, pairs, kind == "unpaired"
                    )
                    lines = np.array([prepared[pending[2] + k][0] for k in at.tolist()], dtype=np.int64)
                    kept_pairs = (at[0::2] + pending[2]) // 2  # each kept pair's chosen side; CHUNK is even: pairs do not straddle
                    parts.append((flat, labels, lengths, kept_pairs, lines))
                pending = (job, future, c) if future is not None else None
    finally:
        if gc_was_on:
            gc.enable()
    if problems:
        problems.sort(key=lambda problem: problem[0])  # by line; a line's own problems in the order found
        if not cfg.skip_invalid:
            _raise_problems(source, problems)
        stats.skipped_invalid += len(problems)
        stats.skipped_lines = [line for line, _ in problems[:MAX_REPORTED]]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats.examples, stats.tokens = len(lengths), int(offsets[-1])
    stats.trainable_tokens = int((labels != IGNORE_INDEX).sum())
    stats.pairs = len(lengths) // 2 if pairs else 0
    if stats.examples == 0:
        raise UserError(_nothing_left(source, stats, cfg))
    desirable = None
    if labels_by_pair is not None:
        desirable = labels_by_pair[np.concatenate([p[3] for p in parts])]
        stats.unpaired, stats.desirable = True, int(desirable.sum())
    lines = np.concatenate([p[4] for p in parts]) if parts else np.zeros(0, np.int64)
    return TokenizedDataset(ids, labels, offsets, stats, pairs=pairs, desirable=desirable, lines=lines, files=[source])


def _check_template_writes_system(renderer: _ChatRenderer, prompt: str, key: str) -> None:
    """data.system_prompt (`key`) must reach the training text: refused where the chat template
    raises on a system turn (Gemma's), or leaves it out of a conversation that ends with a reply
    (Mistral v0.3's writes it into a last user turn only), rather than blamed on every record or
    silently trained without.

    Raises:
        UserError: naming `key` and what the template does with it.
    """
    turns = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": PROBE_REPLY}]
    with_system, without = renderer([[{"role": "system", "content": prompt}, *turns], turns], False)
    if not isinstance(without, str):
        return  # the template fails on a plain conversation: the records' own errors say so
    if isinstance(with_system, Exception):
        raise UserError(f"{key} = {prompt!r}: the chat template refuses a system turn ({with_system}); leave {key} out, "
                        "or use a template that writes system turns (data.chat_template)")  # fmt: skip
    if prompt.strip() not in with_system:
        raise UserError(
            f"{key} = {prompt!r}: the chat template leaves the system turn out of a conversation that ends with a reply "
            f"(as Mistral's writes it into a last user turn only), so no example would hold it; leave {key} out, or use "
            "a template that writes system turns (data.chat_template)"
        )


def _check_template_reads_tools(renderer: _ChatRenderer, prepared: list[tuple[int, str, Any]], source: str) -> None:
    """Raises UserError where chats give tools or tool calls that the chat template never reads
    (ChatML's, Llama 2's): they would be left out of the text silently, and a turn that only calls
    a tool trained as an empty reply."""
    if all(name in t for name in ("tools", "tool_calls") for t in (renderer.template, renderer.tools_template)):
        return
    for line, fmt, chat in prepared:
        if fmt != "chat":
            continue
        template = renderer.tools_template if chat.tools is not None else renderer.template
        for what, name, has in (("'tools'", "tools", chat.tools is not None),
                                ("assistant turns with 'tool_calls'", "tool_calls", any("tool_calls" in m for m in chat.messages))):  # fmt: skip
            if has and name not in template:
                raise UserError(
                    f"{source}:{line}: the record has {what}, but the chat template never reads `{name}`, so they "
                    "would be left out of the text; use a model whose template writes them (data.chat_template: a "
                    "Jinja file of one), or drop them from the data"
                )


def _kl_pairs(
    unpaired: list[tuple[int, dict, tuple[str, Any]]], prepared: list, problems: list[tuple[int, str]], source: str
) -> np.ndarray:
    """Unpaired (KTO) records -> pairs in `prepared`, and each pair's label: record j's example
    (its prompt and completion) and its KL example, its prompt with the completion of the record
    before it (the first: of the last), which KTO's reference point is estimated from. TRL pairs
    each example with its neighbour's completion within a batch the same way.

    Raises:
        UserError: fewer than two valid records (no other completion to pair with).
    """
    if len(unpaired) < 2:
        raise UserError(
            f"{source}: {len(unpaired)} valid labelled record; KTO pairs each example with another one's completion "
            "for its KL estimate, so it needs at least 2"
        )
    labels = []
    for j, (line, record, own) in enumerate(unpaired):
        other_line, other, _ = unpaired[j - 1]
        try:
            kl = _preference_pair({"prompt": record["prompt"], "chosen": other["completion"], "rejected": other["completion"]})[0]
            kl = _with_tools([kl], record)[0]  # the prompt's tools
        except BadRecord as exc:
            problems.append((line, f"its prompt does not take the completion of line {other_line} (its KL example): {exc}"))
            continue
        prepared.extend([(line, *own), (line, *kl)])
        labels.append(_label(record["label"]))
    return np.asarray(labels, dtype=np.bool_)


def _label(value: Any) -> Optional[bool]:
    """A KTO label: a JSON bool, 1 / 0, or "true" / "false" / "1" / "0" (CSV cells are strings); None
    for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


def _nothing_left(source: str, s: DataStats, cfg: DataConfig) -> str:
    if s.dropped_too_long:
        return (
            f"{source}: all {s.dropped_too_long} examples are longer than data.max_length = {cfg.max_length} "
            "tokens and were dropped (data.too_long: drop); raise data.max_length or set data.too_long: truncate"
        )
    if s.dropped_no_trainable:
        return (
            f"{source}: none of the {s.dropped_no_trainable} examples has a token to train on within "
            f"data.max_length = {cfg.max_length}: the prompts fill the whole length (raise data.max_length or "
            "shorten them), or, in chats, no assistant turn is trained (each has \"weight\": 0)"
        )
    return f"{source}: no valid record ({s.skipped_invalid} skipped as invalid, lines {s.skipped_lines}); fix the file"


@dataclass
class _Job:
    """One chunk of records on its way through render -> encode (worker thread) -> finish."""

    size: int
    plain: list[tuple[int, int]]  # (position in chunk, prompt characters)
    chats: list[tuple[int, list[tuple[int, int]]]]  # (position in chunk, trained character spans)
    plain_texts: list[str]
    chat_texts: list[str]
    offsets: bool  # whether masks need token offsets (else ids only, which is faster)


def _render_chunk(
    chunk: list[tuple[int, str, Any]], renderer: _ChatRenderer | None, train_on_inputs: bool,
    problems: list[tuple[int, str]], pairs: bool = False,
) -> _Job:
    plain = [(k, payload) for k, (_, fmt, payload) in enumerate(chunk) if fmt != "chat"]
    chats = [(k, payload) for k, (_, fmt, payload) in enumerate(chunk) if fmt == "chat"]
    ok, failed = [], set()
    if chats:
        for (k, _), r in zip(chats, _chat_spans(renderer, [chat for _, chat in chats], train_on_inputs)):
            if isinstance(r, str):
                if not (pairs and k % 2 and k - 1 in failed):  # one problem per record: a pair's first failure
                    problems.append((chunk[k][0], r))
                failed.add(k)
            else:
                ok.append((k, r))
    return _Job(
        size=len(chunk),
        plain=[(k, prompt_chars) for k, (_, prompt_chars) in plain],
        chats=[(k, spans) for k, (_, spans) in ok],
        plain_texts=[text for _, (text, _) in plain],
        chat_texts=[text for _, (text, _) in ok],
        offsets=not train_on_inputs,
    )


def _encode_job(backend: Any, job: _Job) -> tuple[list, list]:
    """Runs in a worker thread: the Rust tokenizer releases the GIL, so the main thread renders
    the next chunk meanwhile."""
    plain_offsets = job.offsets and any(p > 0 for _, p in job.plain)
    return (
        _encode(backend, job.plain_texts, special=True, offsets=plain_offsets),
        _encode(backend, job.chat_texts, special=False, offsets=job.offsets),
    )


def _finish_chunk(
    job: _Job, encoded: tuple[list, list], eos: int | None
) -> list[tuple[int, list[int], list[tuple[int, int]]]]:
    """(position in chunk, token ids, trainable token ranges [a, b)) of each valid record, in input order."""
    results: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}  # by position in chunk
    plain_enc, chat_enc = encoded
    for (k, prompt_chars), enc in zip(job.plain, plain_enc):
        if isinstance(enc, list):  # ids only: every token trains
            results[k] = (enc, [(0, -1)])  # -1: to the end, the EOS below included
        else:
            results[k] = (enc.ids, [(_first_token_ending_after(enc.offsets, prompt_chars), -1)])
        ids = results[k][0]
        if eos is not None and (not ids or ids[-1] != eos):  # append EOS so the model learns to stop
            ids.append(eos)
    for (k, spans), enc in zip(job.chats, chat_enc):
        if isinstance(enc, list):
            results[k] = (enc, [(0, -1)])
        else:
            offs = enc.offsets
            ranges = [(_first_token_ending_after(offs, a), _first_token_starting_at(offs, b)) for a, b in spans]
            results[k] = (enc.ids, ranges)
    return [(k, *results[k]) for k in range(job.size) if k in results]


def _encode(backend: Any, texts: list[str], *, special: bool, offsets: bool) -> list:
    """Batch-encode with the Rust tokenizer (parallel over cores). Without offsets, ids only."""
    if not texts:
        return []
    if offsets:
        return backend.encode_batch(texts, add_special_tokens=special)
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # skips offset tracking
    return [e.ids for e in fast(texts, add_special_tokens=special)]


def _first_token_ending_after(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first content token whose character span ends after `char`.

    Tokens added by the post-processor (BOS/EOS) have empty (0, 0) offsets and are skipped:
    a leading BOS is never trained, a trailing EOS always is."""
    lo, hi = 0, len(offsets)
    while lo < hi and offsets[lo] == (0, 0):
        lo += 1
    while hi > lo and offsets[hi - 1] == (0, 0):
        hi -= 1
    return bisect.bisect_right(offsets, char, lo, hi, key=lambda o: o[1])


def _first_token_starting_at(offsets: list[tuple[int, int]], char: int) -> int:
    return bisect.bisect_left(offsets, char, key=lambda o: o[0])


def _fit(ids: list[int], ranges: list[tuple[int, int]], max_len: int, drop: bool) -> tuple[int, list[tuple[int, int]]] | str:
    """(kept length, trainable ranges within it), or why the example is dropped: "dropped_too_long"
    or "dropped_no_trainable" (the DataStats counter)."""
    n = len(ids)
    if n > max_len:
        if drop:
            return "dropped_too_long"
        n = max_len
    clipped = []
    for a, b in ranges:
        a, b = max(a, 1), min(n if b < 0 else b, n)  # the first token is never a label
        if a < b:
            clipped.append((a, b))
    return (n, clipped) if clipped else "dropped_no_trainable"


def _assemble(
    seqs: list[tuple[int, list[int], list[tuple[int, int]]]], cfg: DataConfig, stats: DataStats, pairs: bool = False,
    unpaired: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Truncate or drop, build labels from trainable ranges -> (ids, labels, lengths) flat, and the
    position in chunk of each kept example (with `pairs`, both sides of each kept pair in turn).

    seqs: (position in chunk, ids, ranges) from `_finish_chunk`. With `pairs`, positions 2j and
    2j+1 are a preference pair, kept or dropped together (a dropped side counts for both)."""
    max_len, drop = cfg.max_length, cfg.too_long == "drop"
    # a KL example (odd, of unpaired data) is cut, never dropped: it only estimates KTO's reference
    # point, and dropping it would drop the example it belongs to for another record's length
    fitted = [(k, ids, _fit(ids, ranges, max_len, drop and not (unpaired and k % 2))) for k, ids, ranges in seqs]
    if pairs:
        by_pair: dict[int, list] = {}
        for item in fitted:
            by_pair.setdefault(item[0] // 2, []).append(item)
        fitted = []
        for sides in by_pair.values():
            if len(sides) < 2:
                continue  # the other side's record was invalid (already reported)
            reasons = [r for _, _, r in sides if isinstance(r, str)]
            fitted += [(k, ids, reasons[0]) for k, ids, _ in sides] if reasons else sides
    kept_ids: list[list[int]] = []
    kept_at: list[int] = []
    lengths: list[int] = []
    starts: list[int] = []  # flat positions where a trainable range starts / ends
    ends: list[int] = []
    total = 0
    for k, ids, fit in fitted:
        if isinstance(fit, str):
            setattr(stats, fit, getattr(stats, fit) + 1)
            continue
        n, clipped = fit
        if n < len(ids):
            stats.truncated += 1
            ids = ids[:n]
        for a, b in clipped:
            starts.append(total + a)
            ends.append(total + b)
        kept_ids.append(ids)
        kept_at.append(k)
        lengths.append(n)
        total += n
    flat = np.fromiter(itertools.chain.from_iterable(kept_ids), dtype=np.int32, count=total)
    delta = np.zeros(total + 1, dtype=np.int32)
    np.add.at(delta, np.asarray(starts, dtype=np.int64), 1)
    np.add.at(delta, np.asarray(ends, dtype=np.int64), -1)
    labels = np.where(np.cumsum(delta[:-1]) > 0, flat, IGNORE_INDEX).astype(np.int32)
    return flat, labels, np.asarray(lengths, dtype=np.int64), np.asarray(kept_at, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Loading with a disk cache


def load_dataset(
    path: Union[str, Path], tokenizer: Any, cfg: DataConfig, *, use_cache: bool = True, option_keys: Optional[dict[str, str]] = None
) -> TokenizedDataset:
    """Read, validate and tokenize a data file, or load it from the cache.

    The cache key is the sha256 of the file's bytes, the tokenizer (its JSON, chat template and
    special tokens), the options that change the result (format, max_length, too_long,
    train_on_inputs, skip_invalid, train_turns, columns, system_prompt) and lorakit/transformers/tokenizers
    versions. Files live in
    `cfg.cache_dir`, else `$LORAKIT_CACHE/data` (`~/.cache/lorakit/data`), as .npz (no pickle),
    written atomically. A cache that cannot be written only logs a warning.

    Raises:
        UserError: see `read_records` and `tokenize_records`.
    """
    path = Path(path)
    cache_file = None
    if use_cache and path.is_file():
        cache_file = _cache_dir(cfg) / f"{path.stem[:40]}-{_cache_key(path, tokenizer, cfg)[:32]}.npz"
        if cache_file.is_file():
            try:
                cached = TokenizedDataset.load(cache_file)
                cached.files = [str(path)]  # this name of the bytes the cache was made from
                return cached
            except Exception as exc:  # noqa: BLE001 - a broken cache file is rebuilt, never fatal
                log.warning("ignoring unreadable data cache %s: %s", cache_file, exc)
    records, unreadable = _read(path, skip_invalid=cfg.skip_invalid)
    dataset = tokenize_records(records, tokenizer, cfg, source=str(path), option_keys=option_keys, unreadable=unreadable)
    if cache_file is not None:
        try:
            dataset.save(cache_file)
        except OSError as exc:
            log.warning("could not write the data cache %s (%s); set data.cache_dir to a writable folder", cache_file, exc)
    return dataset


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    # $LORAKIT_CACHE is the root of all lorakit's caches, as for the kernels (cpu_kernels)
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser() / "data"


def _cache_key(path: Path, tokenizer: Any, cfg: DataConfig) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    options = {k: getattr(cfg, k) for k in ("format", "max_length", "too_long", "train_on_inputs", "skip_invalid", "train_turns")}
    for key in ("columns", "system_prompt"):
        if getattr(cfg, key):
            options[key] = getattr(cfg, key)  # (only when set: the caches of earlier runs stay valid)
    suffix = path.suffix.lower()
    meta = {
        "version": FORMAT_VERSION,
        # the same bytes read as CSV and as TSV (a.csv, a.tsv) are other records
        "reader": suffix if suffix in TABLE_SUFFIXES else "json",
        "instruction_template": [INSTRUCTION_TEMPLATE, INSTRUCTION_TEMPLATE_NO_INPUT],
        "options": options,
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(hashlib.sha256(backend.to_str().encode() if backend is not None else b"slow").digest())
    return h.hexdigest()


def load_train_eval(cfg: DataConfig, tokenizer: Any, *, seed: int) -> tuple[TokenizedDataset, dict[str, TokenizedDataset]]:
    """The train set, and the eval sets by name (`lorakit.config.eval_sets`; "" for the one set):
    `cfg.eval`'s if given, else a held-out `cfg.eval_fraction` of train (chosen from `seed`, the
    same every run) as the set "", else none. A list of files is read file by file (each cached on
    its own, with the options a file of the list sets for itself in place of `cfg`'s) and put
    together in its order, each train file's examples as often as its `repeat` says (`_repeated`).

    Raises:
        UserError: data.train unset, a held-out fraction that leaves train or eval empty, or a
            `repeat` that takes none of a file's examples.
    """
    if not cfg.train:
        raise UserError("data.train is not set; point it at a .jsonl or .json file")

    def load_source(path: str, options: dict[str, Any], where: str) -> TokenizedDataset:
        options = reading_options(options)
        if not options:
            return load_dataset(path, tokenizer, cfg)
        keys = {key: f"{where}.{key}" for key in options}  # its own options' place, for messages
        return load_dataset(path, tokenizer, dataclasses.replace(cfg, **options), option_keys=keys)

    def source_key(path: str, options: dict[str, Any]) -> tuple[str, str]:
        """What tells sources apart: a file listed with other reading options of its own is another
        source; options that equal the data section's are none."""
        return path, json.dumps(reading_options(own_options(options, cfg)), sort_keys=True)

    def read_once(sources: list[tuple[str, dict[str, Any]]], where: str) -> list[TokenizedDataset]:
        """Each listed file's examples, a source listed twice read once."""
        read: dict[tuple[str, str], TokenizedDataset] = {}
        for i, (path, options) in enumerate(sources):
            key = source_key(path, options)
            if key not in read:
                read[key] = load_source(path, options, f"{where}[{i}]")
        return [read[source_key(path, options)] for path, options in sources]

    def load(sources: list[tuple[str, dict[str, Any]]], where: str) -> TokenizedDataset:
        parts = read_once(sources, where)
        return _with_file_counts(TokenizedDataset.concat(parts, [path for path, _ in sources]), parts)

    def repeated(parts: list[TokenizedDataset]) -> TokenizedDataset:
        return TokenizedDataset.concat(
            [_repeated(part, options.get("repeat", 1), seed=seed, index=i, source=path)
             for i, (part, (path, options)) in enumerate(zip(parts, sources))],
            [path for path, _ in sources],
        )  # fmt: skip

    sources = data_sources(cfg.train)
    if cfg.eval or cfg.eval_fraction <= 0:  # (given eval data wins over a held-out fraction)
        parts = read_once(sources, "data.train")
        train = _with_file_counts(repeated(parts), parts)
        if not cfg.eval:
            return train, {}
        named = isinstance(cfg.eval, dict)
        return train, {
            name: load(set_sources, f"data.eval.{name}" if named else "data.eval")
            for name, set_sources in eval_set_sources(cfg.eval).items()
        }  # fmt: skip
    # Held out of the files' examples once each, however often a file is listed or repeated: a
    # file listed twice (weighted up) then trains twice on its training part, and never on what is
    # held out.
    keys = [source_key(path, options) for path, options in sources]
    first = {}  # each distinct source's first place in the list
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    distinct = list(first)
    parts = {key: load_source(*sources[i], f"data.train[{i}]") for key, i in first.items()}
    union = TokenizedDataset.concat([parts[k] for k in distinct], [path for path, _ in distinct])
    n = union.num_units()  # pairs are held out whole
    n_eval = max(1, round(n * cfg.eval_fraction))
    if n_eval >= n:
        raise UserError(
            f"data.eval_fraction = {cfg.eval_fraction} holds out {n_eval} of {n} {'pairs' if union.pairs else 'examples'}, leaving none to "
            "train on; lower it or give data.eval a file"
        )
    perm = np.random.default_rng([_seed(seed), 0xE7A1]).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[perm[:n_eval]] = True
    starts = dict(zip(distinct, np.cumsum([0] + [parts[k].num_units() for k in distinct])))
    kept = {k: np.flatnonzero(~held[starts[k] : starts[k] + parts[k].num_units()]) for k in distinct}
    train = _with_file_counts(repeated([parts[k].subset(kept[k]) for k in keys]), list(parts.values()))
    return train, {"": union.subset(np.flatnonzero(held))}


# What reading the files found, counted once for each file (each source: a file with reading
# options of its own) however often it is listed or repeated, and before eval_fraction holds out
# any: records, truncated, dropped and skipped describe the files, the other counts the set.
FILE_COUNTS = ("records", "truncated", "dropped_too_long", "dropped_no_trainable", "skipped_invalid", "empty_replies")


def _with_file_counts(data: TokenizedDataset, parts: list[TokenizedDataset]) -> TokenizedDataset:
    """`data` (made of `parts`, the sources as read, some maybe more than once) with `FILE_COUNTS`
    and the skipped records' places those of each distinct part once."""
    distinct = list({id(p): p for p in parts}.values())
    data.stats = dataclasses.replace(data.stats, **{name: sum(getattr(p.stats, name) for p in distinct) for name in FILE_COUNTS})
    data.skipped_at = [place for p in distinct for place in p.skipped_places()][:MAX_REPORTED]
    data.empty_reply_at = _first_empty_reply(distinct)
    return data


def _repeated(part: TokenizedDataset, repeat: float, *, seed: int, index: int, source: str) -> TokenizedDataset:
    """`part` (the examples data.train[index] trains on) with each example `int(repeat)` times, and a
    share `repeat % 1` of them once more, chosen from `seed` and the file's place in the list (the
    same every run; another place, another choice). What is counted is what batches count: pairs
    for preference data, an example with its KL example for KTO's.

    Raises:
        UserError: a repeat that takes none of the file's examples.
    """
    if repeat == 1:
        return part
    n = part.num_units()
    whole, share = divmod(float(repeat), 1.0)
    extra = round(n * share)
    if int(whole) * n + extra == 0:
        raise UserError(
            f"data.train[{index}].repeat = {repeat}: takes none of {source}'s {n} {'pairs' if part.pairs else 'examples'}; "
            f"raise it to at least {1 / n if n else 1:.3g}, or leave the file out"
        )
    chosen = np.sort(np.random.default_rng([_seed(seed), 0x5EED, index]).choice(n, size=extra, replace=False))
    return part.subset(np.concatenate([np.tile(np.arange(n), int(whole)), chosen]))


def _seed(seed: int) -> int:
    return int(seed) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# Batches


class BatchStream:
    """Endless, deterministic stream of micro-batches over epochs.

    Rows are packed bins (packing) or single examples. Each epoch orders the rows by a
    permutation drawn from (seed, epoch); micro-batch k of an epoch is the global chunk
    rows[k*G:(k+1)*G] with G = batch_size * world_size, and rank r takes rows
    [r*batch_size:(r+1)*batch_size] of it, so one process with batch_size 2b sees exactly the rows
    of 2 ranks with batch_size b. The incomplete last chunk of an epoch is dropped (the same rows
    in every setup with the same G; different rows every epoch, since the order changes).
    Without packing, rows are sorted by length inside windows of 64 chunks and the chunks of a
    window shuffled again, so a micro-batch holds examples of similar length (little padding).
    The state (epoch, micro-batches consumed) is global, so a run may resume with another
    world_size as long as G is the same.

    A micro-batch (B = batch_size rows, T = longest row in it):
        input_ids (B, T) int64, pad_id after the end of a row;
        labels (B, T) int64, aligned with input_ids (the loss shifts), -100 = no loss;
        position_ids (B, T) int64, restarting at 0 for each example and for the padding;
        num_tokens: int, tokens that are not padding;
        num_trainable: int, labels != -100 at positions 1.. (what a shifted loss counts).
    Feed the model `position_ids` with `attention_mask=None, use_cache=False`: transformers then
    builds a block-diagonal causal mask, so attention never crosses an example boundary.

    Preference data (`dataset.pairs`): a pair is what rows hold, pack and count: its chosen and
    rejected answers are two examples side by side in one row, which holds up to 2 x max_length
    tokens. Its micro-batches also have
        sequence_ids (B, T) int64: which example of the micro-batch a token belongs to, numbered
            along the rows (2p: pair p's chosen answer, 2p+1: its rejected one), -1 on padding;
        example_ids (S,) int64: which example of the dataset each of those S sequences is (where a
            per-example table, such as precomputed reference log-probabilities, is looked up);
        num_pairs: int;
        desirable (num_pairs,) bool, for unpaired (KTO) data, whose pairs are an example and its KL
            example: each example's label.
    """

    WINDOW_CHUNKS = 64

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        batch_size: int,
        max_length: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        lengths = dataset.lengths()
        if len(lengths) == 0:
            raise UserError("the dataset has no examples")
        if lengths.max() > max_length:
            raise UserError(
                f"an example has {lengths.max()} tokens, more than max_length = {max_length}; build the "
                "dataset with the same data.max_length as the batches"
            )
        self.pairs = dataset.pairs
        self.example_max_length = max_length  # positions restart per example: never beyond this
        if self.pairs:  # the unit is a pair: both answers go into the same row
            lengths, max_length = lengths[0::2] + lengths[1::2], 2 * max_length
        self.dataset, self.batch_size, self.max_length = dataset, batch_size, max_length
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.global_batch = batch_size * world_size
        # Row i holds the examples self._items[self._row_offsets[i]:self._row_offsets[i+1]].
        if packing:
            self._items, self._row_offsets = _pack(lengths, max_length)
        else:
            self._items, self._row_offsets = np.arange(len(lengths)), np.arange(len(lengths) + 1)
        self._row_lengths = np.add.reduceat(lengths[self._items], self._row_offsets[:-1])
        self.num_rows = len(self._row_offsets) - 1
        if self.num_rows < self.global_batch:
            what = "packed rows" if packing else ("pairs" if self.pairs else "examples")
            raise UserError(
                f"the dataset makes {self.num_rows} {what}, fewer than one micro-batch of batch_size x "
                f"processes = {self.global_batch} rows; lower train.batch_size or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def microbatches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def packing_efficiency(self) -> float:
        """Share of row slots holding tokens when rows are max_length long (1.0 = no padding)."""
        return float(self._row_lengths.sum()) / (self.num_rows * self.max_length)

    def next(self) -> dict[str, Any]:
        if self.position >= self.microbatches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._epoch_order(self.epoch), self.epoch
        g = self.position * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return self._collate(self._order[g : g + self.batch_size])

    def epoch_batches(self) -> Iterator[dict[str, Any]]:
        """Every row once (for eval), in a fixed order that ignores the seed and the stream state;
        the last chunk may be short. A rank whose share of it is empty gets one all-padding row
        (num_trainable 0) so every rank runs the same number of forwards (FSDP needs that)."""
        order = np.arange(self.num_rows)
        if not self.packing:
            order = np.argsort(self._row_lengths, kind="stable")
        for k in range(0, self.num_rows, self.global_batch):
            g = k + self.rank * self.batch_size
            mine = order[g : min(g + self.batch_size, k + self.global_batch)]
            yield self._collate(mine)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "packing": self.packing,
            "max_length": self.max_length,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. Raises UserError if the stream would differ."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "global_batch", "packing", "max_length", "num_rows"):
            if key in state and state[key] != mine[key]:
                what = {"global_batch": "batch_size x processes", "num_rows": "number of rows (data changed?)"}
                fix = "resume with the same data and settings"
                if key == "global_batch":  # the rows a step reads: the processes may change, their total may not
                    theirs = int(state[key])
                    fix = (f"resume with train.batch_size={theirs // self.world_size} for {self.world_size} "
                           f"process{'es' if self.world_size > 1 else ''}" if theirs % self.world_size == 0 else
                           f"resume with a number of processes that divides {theirs}, and batch_size to match")  # fmt: skip
                raise UserError(
                    f"cannot resume the data stream: {what.get(key, key)} is {mine[key]!r} now but "
                    f"{state[key]!r} in the checkpoint; {fix}"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Row ids of one epoch, a multiple of global_batch long (the incomplete chunk dropped)."""
        n, g = self.num_rows, self.global_batch
        rng = np.random.default_rng([_seed(self.seed), epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[: (n // g) * g]
        if self.packing:
            return order
        window = g * self.WINDOW_CHUNKS
        out = []
        for w in range(0, len(order), window):
            rows = order[w : w + window]
            rows = rows[np.argsort(self._row_lengths[rows], kind="stable")].reshape(-1, g)
            if self.shuffle:
                rows = rows[rng.permutation(len(rows))]
            out.append(rows.reshape(-1))
        return np.concatenate(out)

    def _collate(self, rows: np.ndarray) -> dict[str, Any]:
        ds = self.dataset
        width = int(self._row_lengths[rows].max()) if len(rows) else 1
        b = max(len(rows), 1)
        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((b, width), dtype=np.int64)
        sequence_ids = np.full((b, width), -1, dtype=np.int64) if self.pairs else None
        example_ids: list[int] = []
        desirable = [] if ds.desirable is not None else None
        num_tokens = sequence = 0
        for r, row in enumerate(rows):
            units = self._items[self._row_offsets[row] : self._row_offsets[row + 1]]
            if desirable is not None:
                desirable.extend(ds.desirable[units])
            t = 0
            for e in np.stack([2 * units, 2 * units + 1], axis=1).reshape(-1) if self.pairs else units:
                a, z = ds.offsets[e], ds.offsets[e + 1]
                input_ids[r, t : t + z - a] = ds.input_ids[a:z]
                labels[r, t : t + z - a] = ds.labels[a:z]
                labels[r, t] = IGNORE_INDEX  # never predict an example's first token from the previous one
                position_ids[r, t : t + z - a] = np.arange(z - a)
                if sequence_ids is not None:
                    sequence_ids[r, t : t + z - a] = sequence
                    example_ids.append(int(e))
                    sequence += 1
                t += z - a
            # padding: segments of its own, no labels, positions within what an example may use (a
            # row of pairs is up to twice as long, a table of positions is not)
            position_ids[r, t:] = np.arange(width - t) % self.example_max_length
            num_tokens += t
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "num_tokens": num_tokens,
            "num_trainable": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        }
        if sequence_ids is not None:
            batch["sequence_ids"], batch["num_pairs"] = torch.from_numpy(sequence_ids), sequence // 2
            batch["example_ids"] = torch.tensor(example_ids, dtype=torch.int64)
        if desirable is not None:
            batch["desirable"] = torch.tensor(desirable, dtype=torch.bool)
        return batch


def _pack(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing -> (example ids, row offsets), rows in creation order.

    Which examples share a row does not change the loss (attention and labels stop at example
    boundaries), so bins are computed once, tightly, and only their order is shuffled per epoch.
    """
    free: list[tuple[int, int]] = []  # (free slots, row) of rows that still have room, sorted
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))  # the fullest row the example fits in
        if j == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    items = np.fromiter(itertools.chain.from_iterable(sorted(r) for r in rows), dtype=np.int64, count=len(lengths))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return items, offsets
