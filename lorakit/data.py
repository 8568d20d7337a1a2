"""Training data: records (`lorakit.data_files`, `lorakit.records`) -> tokenized examples with loss
masks, cached on disk; `lorakit.batching` makes micro-batches of them.

Token ids and labels:
- Non-chat text is tokenized with the tokenizer's special tokens (a BOS where its post-processor
  adds one); EOS is appended when the tokenizer has one and the ids do not already end with it,
  and it is trained, so the fine-tuned model learns to stop.
- Chat ids are exactly `tokenizer.apply_chat_template(messages)["input_ids"]`; the assistant
  turns' spans are located as `lorakit.chat_templates` describes.
- A preference record's chat examples train only the answer's assistant turns; the prompt's own
  assistant turns are neither trained nor located (a template may rewrite them).
- A token is trainable when its characters overlap a trained span (a token straddling the
  prompt/completion boundary is trained). `train_on_inputs: true` trains every token.
- `labels` use the Hugging Face convention (aligned with `input_ids`; the loss shifts by one),
  -100 where there is no loss. The first token of every example is -100: nothing inside the
  example predicts it, and in a packed row this keeps the loss from crossing example boundaries.
- Examples longer than `max_length` are truncated (the end is cut) or, with `too_long: drop`,
  dropped; examples left with no trainable token are dropped. All of it is counted in `DataStats`.

Speed: records are rendered in Python (a chat template costs ~15 us per render) and tokenized in
large batches by the Rust tokenizer, which spreads a batch over all cores itself; worker
processes would only add pickling of texts and ids for the small Python share, so none are used.
The result is cached on disk (see `load_dataset`).
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from lorakit.chat_templates import PROBE_REPLY, ChatRenderer, chat_spans
from lorakit.config import DataConfig, data_sources, eval_set_sources, own_options, reading_options
from lorakit.data_files import MAX_REPORTED, TABLE_SUFFIXES, raise_problems, read_with_problems
from lorakit.errors import UserError
from lorakit.records import (
    INSTRUCTION_TEMPLATE, INSTRUCTION_TEMPLATE_NO_INPUT, BadRecord, Chat, preference_pair, prepare_record, read_label,
    rename_columns, says_nothing_trained, with_system_prompt, with_tools,
)

log = logging.getLogger(__name__)


IGNORE_INDEX = -100
# bump when tokenization, what is refused or the cache layout changes (10: a turn's own end of turn, the lead
# before a reply, tool results checked; 11: trained empty replies counted)
FORMAT_VERSION = 11
CHUNK = 2048  # records per tokenizer batch: enough for the Rust thread pool, small enough to pipeline


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
# Tokenizing


def tokenize_records(
    records: Sequence[tuple[int, dict]], tokenizer: Any, cfg: DataConfig, *, source: str,
    option_keys: Optional[dict[str, str]] = None, unreadable: Sequence[tuple[int, str]] = (),
) -> TokenizedDataset:
    """Validate, render and tokenize records (from `read_with_problems`) into a TokenizedDataset.
    option_keys: where cfg's format and columns were set, for messages, where not in the data
    section ({"columns": "data.train[1].columns"}: a data list's file sets its own).
    unreadable: (line, problem) of the entries the reader found no record in: reported with the
        records' own problems (one report for the whole file), or skipped and counted as the
        invalid records are (cfg.skip_invalid).

    Raises:
        UserError: `source:LINE: ...` for invalid records (unless cfg.skip_invalid), chat records
            with a tokenizer without chat template, a slow tokenizer, or no example left; tools or
            tool calls the template never reads, a system prompt it refuses or leaves out, fewer
            than 2 labelled (KTO) records, a file mixing preference or labelled records with others.
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
    renderer = ChatRenderer(tokenizer) if chat_lines else None
    if renderer is not None:
        _check_template_reads_tools(renderer, prepared, source)
        if cfg.system_prompt is not None:
            _check_template_writes_system(renderer, cfg.system_prompt, places.get("system_prompt", "data.system_prompt"))
        writes_reasoning = "reasoning_content" in renderer.template
        empty = [line for line, chat in chats if says_nothing_trained(chat, writes_reasoning)]
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
            raise_problems(source, problems)
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


def _check_template_writes_system(renderer: ChatRenderer, prompt: str, key: str) -> None:
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


def _check_template_reads_tools(renderer: ChatRenderer, prepared: list[tuple[int, str, Any]], source: str) -> None:
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
            kl = preference_pair({"prompt": record["prompt"], "chosen": other["completion"], "rejected": other["completion"]})[0]
            kl = with_tools([kl], record)[0]  # the prompt's tools
        except BadRecord as exc:
            problems.append((line, f"its prompt does not take the completion of line {other_line} (its KL example): {exc}"))
            continue
        prepared.extend([(line, *own), (line, *kl)])
        labels.append(read_label(record["label"]))
    return np.asarray(labels, dtype=np.bool_)


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
    chunk: list[tuple[int, str, Any]], renderer: ChatRenderer | None, train_on_inputs: bool,
    problems: list[tuple[int, str]], pairs: bool = False,
) -> _Job:
    plain = [(k, payload) for k, (_, fmt, payload) in enumerate(chunk) if fmt != "chat"]
    chats = [(k, payload) for k, (_, fmt, payload) in enumerate(chunk) if fmt == "chat"]
    ok, failed = [], set()
    if chats:
        for (k, _), r in zip(chats, chat_spans(renderer, [chat for _, chat in chats], train_on_inputs)):
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
        UserError: see `read_with_problems` and `tokenize_records`.
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
    records, unreadable = read_with_problems(path, skip_invalid=cfg.skip_invalid)
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
        raise UserError("data.train is not set; point it at a data file (.jsonl, .json, .parquet, .arrow, .csv or .tsv) or a list of them")

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
    perm = np.random.default_rng([rng_seed(seed), 0xE7A1]).permutation(n)
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
    chosen = np.sort(np.random.default_rng([rng_seed(seed), 0x5EED, index]).choice(n, size=extra, replace=False))
    return part.subset(np.concatenate([np.tile(np.arange(n), int(whole)), chosen]))


def rng_seed(seed: int) -> int:
    return int(seed) & ((1 << 63) - 1)
