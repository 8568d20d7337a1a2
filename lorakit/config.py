"""Typed configuration: the LoRA adapter config and the `lorakit train` run config.

Every config is a dataclass, the single source of names, defaults and types. A run config is
read from YAML, patched with dotted `KEY=VALUE` overrides, and validated in one pass that
collects every problem before raising, so a user fixes a config in one go, not one error a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from lorakit.errors import UserError
from lorakit.models import looks_like_hub_id

LORA_INITS = ("default", "gaussian", "pissa", "olora")
# torch.finfo(torch.float32).max: a LoRA scale or a NEFTune noise bound past it is inf in the compute
FLOAT32_MAX = 3.4028234663852886e38


def block_index_regex(pattern: str) -> str:
    """PEFT's regex for the block index after `pattern`, one entry of layers_pattern (itself a regex,
    put in as it is), kept character for character so lorakit and PEFT select the same modules
    (lorakit.inject.block_index)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


@dataclass
class LoraConfig:
    """What adapters to add and how.

    targets: a list of module names matched against the end of each module path
        (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), a regex string matched in full
        against the whole path, or `"all-linear"`: every linear layer except the output head.
    exclude: same forms as `targets`; matching modules are never wrapped.
    rank_pattern / alpha_pattern: per-module overrides of `r` / `alpha`, keyed by a name or regex
        matched against the end of the module path (PEFT's semantics).
    layers: restrict adapters to these transformer block indices, read from each module path as
        PEFT reads `layers_to_transform`: the number after the first `<name>.` that follows another
        name (`model.layers.3.mlp.experts.7.down_proj` is block 3; `layers.0.q_proj` has none), or
        after `layers_pattern`. With a list of names or `all-linear`; a regex `targets` writes the
        indices into itself (PEFT refuses the two together).
    layers_pattern: PEFT's `layers_pattern`: the block list that `layers` counts in, a regex or a
        list of them, e.g. `"language_model.layers"` to leave a vision tower's `encoder.layers` out,
        or `"blocks"` for a block list at the model's root.
    modules_to_save: modules trained in full and saved with the adapter, e.g. `["lm_head"]`.
    dora: DoRA (PEFT's `use_dora`): a trained magnitude per output row on top of the low-rank
        update (lorakit.layers).
    target_parameters: MoE expert weights to adapt, named like PEFT's `target_parameters` and matched
        against the end of each parameter path (`"mlp.experts.gate_up_proj"`); see lorakit.experts.
        `targets: []` adapts the experts alone.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Union[list[str], str] = "all-linear"
    exclude: Union[list[str], str, None] = None
    rslora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers: Union[list[int], None] = None
    layers_pattern: Union[list[str], str, None] = None
    modules_to_save: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    dora: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def problems(self, where: str = "lora") -> list[str]:
        """Every invalid value, as messages naming the key and the fix."""
        # names and indices of the wrong type (an adapter_config.json's; a config's were replaced by
        # their defaults when read) would fail the checks below and the matching of module names
        hints = typing.get_type_hints(LoraConfig)
        out = [f"{where}.{key} = {getattr(self, key)!r}: expected {_type_name(hints[key])}"
               for key in ("targets", "exclude", "layers", "layers_pattern", "modules_to_save", "target_parameters")
               if not _coerce(getattr(self, key), hints[key])[0]]  # fmt: skip
        if out:
            return out
        if not _is_int(self.r) or self.r <= 0:
            out.append(f"{where}.r = {self.r!r}: the rank must be a positive integer, e.g. 8 or 16")
        if not _is_number(self.alpha) or self.alpha <= 0:
            out.append(f"{where}.alpha = {self.alpha!r}: must be a positive number, e.g. 2 x r")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            out.append(f"{where}.dropout = {self.dropout!r}: must be in [0, 1), e.g. 0.05")
        if self.init not in LORA_INITS:
            out.append(f"{where}.init = {self.init!r}: unknown init; use one of {', '.join(LORA_INITS)}")
        if isinstance(self.targets, (list, tuple)) and not self.targets and not self.target_parameters:
            out.append(f"{where}.targets = []: name at least one module, or use 'all-linear'")
        if self.target_parameters and _is_number(self.dropout) and self.dropout > 0:
            out.append(
                f"{where}.dropout = {self.dropout!r} with {where}.target_parameters: PEFT cannot load expert adapters "
                "trained with dropout; set dropout: 0"
            )
        if self.dora and self.target_parameters:
            out.append(f"{where}.dora with {where}.target_parameters: DoRA adapts linear layers, not MoE expert weights")
        if self.dora and self.init in ("pissa", "olora"):
            out.append(f"{where}.dora with {where}.init = {self.init!r}: use default or gaussian init with DoRA")
        if self.target_parameters and self.init not in ("default", "gaussian"):
            out.append(f"{where}.init = {self.init!r} with {where}.target_parameters: expert weights take default or gaussian")
        for name, rank in self.rank_pattern.items():
            if not _is_int(rank) or rank <= 0:
                out.append(f"{where}.rank_pattern[{name!r}] = {rank!r}: ranks must be positive integers")
        for name, alpha in self.alpha_pattern.items():
            if not _is_number(alpha) or alpha <= 0:
                out.append(f"{where}.alpha_pattern[{name!r}] = {alpha!r}: alphas must be positive numbers")
        out += self._scale_problems(where)
        if self.layers is not None and any(not _is_int(i) or i < 0 for i in self.layers):
            out.append(f"{where}.layers = {self.layers!r}: block indices must be integers >= 0")
        if self.layers == []:  # PEFT reads an empty list as every block; null says so plainly
            out.append(f"{where}.layers = []: names no block; list block indices, e.g. [0, 1], or set null for every block")
        out += self._layers_pattern_problems(where)
        # a string target, the exclude and the pattern keys are regexes (as PEFT reads them)
        patterns = [("targets", self.targets)] if isinstance(self.targets, str) and self.targets != "all-linear" else []
        patterns += [("exclude", self.exclude)] if isinstance(self.exclude, str) else []
        patterns += [(f"{key}[{name!r}]", name) for key in ("rank_pattern", "alpha_pattern") for name in getattr(self, key)]
        for key, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                out.append(f"{where}.{key} = {pattern!r}: not a valid regex ({exc}); fix it, or list module names instead")
        return out

    def _layers_pattern_problems(self, where: str) -> list[str]:
        """layers_pattern without layers, a pattern that is no regex, and layers with a regex target."""
        out = []
        if self.layers_pattern and self.layers is None:  # PEFT refuses it too
            out.append(f"{where}.layers_pattern = {self.layers_pattern!r} without {where}.layers: it names the block list "
                       f"that {where}.layers counts in; set {where}.layers, or remove it")  # fmt: skip
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        for pattern in patterns:
            try:  # alone first, so that the error's position is one in the user's pattern
                re.compile(pattern)
                re.compile(block_index_regex(pattern))
            except re.error as exc:
                out.append(f"{where}.layers_pattern = {pattern!r}: not a valid regex ({exc}); give the block list's name, "
                           "e.g. 'layers'")  # fmt: skip
        if isinstance(self.targets, str) and self.targets != "all-linear" and (self.layers is not None or self.layers_pattern):
            # PEFT refuses layers_to_transform with a string target_modules (its filter is one on the
            # names a path ends with; a regex already says which paths it takes), and so does lorakit,
            # so that a lora config selects what the same adapter_config.json selects in PEFT.
            # all-linear stays: it stands for a list of names, and the adapter file lists the modules
            key = "layers" if self.layers is not None else "layers_pattern"
            out.append(
                f"{where}.{key} = {getattr(self, key)!r} with a regex {where}.targets = {self.targets!r}: PEFT refuses the "
                f"two together; write the block indices into the regex (e.g. '.*\\.layers\\.(0|1)\\.self_attn\\.q_proj') and "
                f"remove {where}.{key}, or list module names in {where}.targets"
            )
        return out

    def _scale_problems(self, where: str) -> list[str]:
        """An alpha whose scale s = alpha / r (rsLoRA: alpha / sqrt(r)) overflows float32 at the
        smallest rank the config gives."""
        ranks = [r for r in (self.r, *self.rank_pattern.values()) if _is_int(r) and r > 0]
        if not ranks:
            return []
        low = min(ranks)
        divisor, formula = (math.sqrt(low), "alpha / sqrt(r)") if self.rslora is True else (low, "alpha / r")
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{name!r}]", a) for name, a in self.alpha_pattern.items())]
        return [
            f"{where}.{key} = {alpha!r}: the scale {formula} = {alpha / divisor:.3g} (r = {low}) is past the largest float32 "
            f"number ({FLOAT32_MAX:.3g}), so the update would be inf; use an alpha near r to 2 x r"
            for key, alpha in alphas
            if _is_number(alpha) and alpha > 0 and alpha / divisor > FLOAT32_MAX
        ]


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token batches (see lorakit.data)."""

    # a file, or a list of files read one after another (a file listed twice counts twice); a
    # list's file may come with options of its own: {path: b.jsonl, columns: {...}} (FILE_OPTIONS)
    train: Union[str, list[Union[str, dict[str, Any]]], None] = None
    # a file or a list (one eval set), or named sets {name: file or list}, each evaluated on its own
    eval: Union[str, list[Union[str, dict[str, Any]]], dict[str, Union[str, list[Union[str, dict[str, Any]]]]], None] = None
    eval_fraction: float = 0.0  # held out from `train` when `eval` is not given
    # auto | text | completion | instruction | chat | preference (prompt, chosen, rejected) | unpaired
    # (prompt, completion, label: KTO's)
    format: str = "auto"
    max_length: int = 1024
    too_long: str = "truncate"  # truncate | drop
    packing: bool = True
    train_on_inputs: bool = False
    # the assistant turns of a chat record trained: all, or the last one only (the earlier turns are
    # context); a turn marked "weight": 0 is never trained
    train_turns: str = "all"
    skip_invalid: bool = False
    # the records' own names for lorakit's keys, e.g. {prompt: question, completion: answer}
    columns: dict[str, str] = field(default_factory=dict)
    # a system message put first in every chat conversation that has none (chat data only)
    system_prompt: Union[str, None] = None
    cache_dir: Union[str, None] = None  # default: $LORAKIT_CACHE/data, else ~/.cache/lorakit/data
    # the chat template for chat records instead of the tokenizer's: a Jinja file, or "chatml"
    # (for base models without one); saved with the adapter, which inference and merge then use
    chat_template: Union[str, None] = None
    # variables for the chat template, as apply_chat_template's keyword arguments: Qwen3's
    # {enable_thinking: false}; set at the top of the template, which the adapter keeps
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


DATA_FORMATS = ("auto", "text", "completion", "instruction", "chat", "preference", "unpaired")
# the top-level keys of lorakit's record formats, which data.columns may take from other names
RECORD_KEYS = ("text", "prompt", "completion", "instruction", "input", "output", "messages", "conversations",
               "chosen", "rejected", "label", "tools")  # fmt: skip


def column_problems(columns: dict[str, str], where: str, example: str = "{prompt: question}") -> list[str]:
    """What is wrong with a data.columns mapping (lorakit's key -> the records' name for it);
    `example` shows the fix in the syntax of `where` (the config's, or --column's)."""
    problems = []
    for key, name in columns.items():
        if key not in RECORD_KEYS:
            close = difflib.get_close_matches(key, RECORD_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{where}: {key!r} is no key of lorakit's records; {hint}map one of {', '.join(RECORD_KEYS)} "
                            f"to your records' name for it, e.g. {example}")  # fmt: skip
        elif not name:
            problems.append(f"{where}.{key} = {name!r}: give the records' name for {key!r}")
    names = list(columns.values())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"{where}: {twice[0]!r} is named for {names.count(twice[0])} keys; map each key of the records once")
    return problems


@dataclass
class TrainConfig:
    """The optimisation loop (see lorakit.train)."""

    epochs: int = 1
    max_steps: Union[int, None] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2.0e-4
    lr_ratio_b: float = 1.0  # LoRA+: B matrices learn at lr * lr_ratio_b
    scheduler: str = "cosine"  # cosine | linear | constant | wsd (warmup, stable, decay)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a share of the run's steps (instead of warmup_steps)
    min_lr_ratio: float = 0.0  # cosine / linear / wsd decay ends at lr * min_lr_ratio, not 0
    decay_ratio: Union[float, None] = None  # wsd: the share of the steps, at the end, that decay (None: 0.1)
    decay_shape: Union[str, None] = None  # wsd: cosine | linear | 1-sqrt (None: cosine)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    optimizer: str = "adamw"  # adamw | adamw8bit
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: Union[bool, str] = False  # false | true (= full) | full | selective
    compile: bool = False
    seed: int = 0
    log_every: int = 1
    eval_every: Union[int, str] = 0  # steps between evals, or "epoch" (at each epoch's end); 0: at the end only
    eval_on_start: bool = False  # also eval before the first step (the base's figures, logged at step 0)
    eval_generate: bool = False  # also log eval_accuracy: exact match of greedy answers on data.eval
    eval_max_new_tokens: int = 64  # generation budget per answer for eval_generate
    save_every: Union[int, str] = 0  # steps between checkpoints, or "epoch"; 0: none but on interruption
    keep_checkpoints: int = 2
    distributed: str = "auto"  # auto | ddp | fsdp
    objective: str = "sft"  # sft (next-token loss) | dpo | ipo | simpo | orpo (preference pairs) | kto (labelled examples); lorakit.preference
    beta: Union[float, None] = None  # the preference objective's beta; None: its usual value (PREFERENCE_BETA)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    kto_desirable_weight: float = 1.0  # KTO's weights of the desirable and undesirable examples' losses
    kto_undesirable_weight: float = 1.0
    # dpo / ipo / kto: the reference's log-probabilities of the training set in one pass before the
    # first step, instead of a reference forward every micro-batch (lorakit.preference)
    precompute_reference: bool = False
    neftune_alpha: float = 0.0  # NEFTune: noise on the input embeddings in training (5 in the paper); 0: off
    save_best: bool = False  # also keep the adapter of the best eval so far (best_metric) in best_adapter/
    best_metric: str = "eval_loss"  # the eval figure save_best and early stopping watch (BEST_METRICS)
    early_stopping_patience: int = 0  # stop after this many evals in a row without a better best_metric; 0: off
    report_to: Union[list[str], str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb
    run_name: Union[str, None] = None  # the run's name in the trackers; None: the output_dir's name

    def trackers(self) -> list[str]:
        """report_to as a list ("none" and [] alike: no tracker)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [n for n in names if n != "none"]

    def preference_beta(self) -> float:
        """`beta`, or the objective's usual value when it is unset."""
        return self.beta if self.beta is not None else PREFERENCE_BETA[self.objective]


# The preference objectives (lorakit.preference) and the beta each uses unless train.beta is set:
# DPO's and IPO's 0.1 as in TRL; SimPO's reward scale 2.0 (TRL's CPO, the paper's range 2-2.5);
# ORPO's lambda 0.1 (TRL, the paper).
PREFERENCE_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
# those that compare with a frozen reference: the base with the adapter off
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")
# those that train on unpaired examples labelled desirable or not (data.format unpaired), not pairs
UNPAIRED_OBJECTIVES = ("kto",)
# every figure an eval reports (sft: loss, perplexity, accuracy; preference objectives: the rest)
EVAL_FIGURES = ("loss", "perplexity", "accuracy", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl")
# the eval figures train.best_metric may name, each with whether a higher value is better
BEST_METRICS = {
    "eval_loss": False, "eval_perplexity": False, "eval_accuracy": True, "eval_reward_accuracy": True,
    "eval_reward_margin": True,
}  # fmt: skip


@dataclass
class RunConfig:
    """Everything `lorakit train` needs; only `model` and `data.train` have no default."""

    model: Union[str, None] = None
    # an adapter folder (PEFT format) to continue training: its LoRA config and weights are the start
    adapter: Union[str, None] = None
    output_dir: str = "runs/lorakit"
    trust_remote_code: bool = False
    quantize: str = "none"  # none | nf4
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# train.gradient_checkpointing: true means full (lorakit.activation_checkpointing)
GRADIENT_CHECKPOINTING_MODES = (False, True, "full", "selective")

_CHOICES = {
    "quantize": ("none", "nf4"),
    "data.format": DATA_FORMATS,
    "data.too_long": ("truncate", "drop"),
    "data.train_turns": ("all", "last"),
    "train.scheduler": ("cosine", "linear", "constant", "wsd"),
    "train.optimizer": ("adamw", "adamw8bit"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.distributed": ("auto", "ddp", "fsdp"),
    "train.objective": ("sft", *PREFERENCE_BETA),
    "lora.init": LORA_INITS,
}

# (key, lowest allowed, whether the bound itself is allowed)
_RANGES = {
    "data.max_length": (2, True),
    "data.eval_fraction": (0.0, True),
    "train.epochs": (1, True),
    "train.max_steps": (1, True),
    "train.batch_size": (1, True),
    "train.grad_accum": (1, True),
    "train.lr": (0.0, False),
    "train.lr_ratio_b": (0.0, False),
    "train.warmup_steps": (0, True),
    "train.weight_decay": (0.0, True),
    "train.max_grad_norm": (0.0, True),
    "train.log_every": (1, True),
    "train.eval_max_new_tokens": (1, True),
    "train.keep_checkpoints": (1, True),
    "train.beta": (0.0, False),
    "train.simpo_gamma": (0.0, True),
    "train.kto_desirable_weight": (0.0, False),
    "train.kto_undesirable_weight": (0.0, False),
    "train.neftune_alpha": (0.0, True),
    "train.warmup_ratio": (0.0, True),
    "train.min_lr_ratio": (0.0, True),
    "train.decay_ratio": (0.0, False),
    "train.early_stopping_patience": (0, True),
}


# What YAML nested past Python's recursion limit is told (PyYAML stops at a few hundred levels).
_YAML_TOO_DEEP = "nested too deeply to read (lists or mappings some hundreds of levels inside each other)"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.max_steps=20", "lora.r=8"]` -> `{"train.max_steps": 20, "lora.r": 8}`.

    Values are parsed as YAML scalars, so `true`, `1e-4`, `[q_proj, v_proj]` and `null` work.
    """
    from lorakit.data_files import undecodable_byte

    out: dict[str, Any] = {}
    for pair in pairs:
        # before YAML, which calls such a byte (kept as a lone surrogate) a character it may not read
        problem = undecodable_byte(pair)
        if problem is not None:
            raise UserError(f"override {pair!r}: {problem}; pass UTF-8 text (set the terminal's encoding to UTF-8)")
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override {pair!r}: expected KEY=VALUE, e.g. train.max_steps=20")
        if key.strip() in out:  # (as a key given twice in the file is refused: which one was meant?)
            raise UserError(f"override {pair!r}: {key.strip()} is given twice on the command line; keep one")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"override {pair!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        except RecursionError:  # PyYAML reads nested lists and mappings recursively
            raise UserError(f"override {key.strip()}=...: value is {_YAML_TOO_DEEP}; flatten it") from None
        if _expanded_size(out[key.strip()], {}) > MAX_CONFIG_VALUES:
            raise UserError(f"override {key.strip()}=...: its aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} "
                            "values; write the values out")  # fmt: skip
    return out


def load_run_config(
    path: Union[str, Path, None], overrides: Union[dict[str, Any], None] = None, *, check_paths: bool = True
) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything at once.

    Raises:
        UserError: listing every problem: unknown keys (with "did you mean"), wrong types,
            out-of-range values, missing model folder or data files.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML file")
        from lorakit.data_files import read_utf8

        try:
            text = read_utf8(path)
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        except RecursionError:
            raise UserError(f"{path}: invalid YAML: a value {_YAML_TOO_DEEP}; flatten it") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the config must be a mapping of keys, got {type(loaded).__name__}")
        if _expanded_size(loaded, {}) > MAX_CONFIG_VALUES:
            raise UserError(f"{path}: its aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} values, which no run "
                            "config needs (an alias that repeats an alias that repeats ...); write the values out")  # fmt: skip
        raw = loaded
        places = {key: f"line {line}" for key, line in key_lines(text).items()}
    else:
        places = {}
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
        places[key] = "command line"  # a problem of this key is not the file's
    return build_run_config(raw, source=str(path) if path else "command line", check_paths=check_paths, places=places)


def locate_problem(message: str, path: Union[str, Path], overrides: Union[dict[str, Any], None] = None) -> str:
    """A problem found after the config was read, by the model or the data (`lora.targets = ...
    matches no layer`, `lora.rank_pattern: ...`), with the place its key was given, as the
    config's own problems have it: `run.yaml:12: lora.targets = ...`. Messages that begin with no
    config key (a data file's `train.jsonl:3: ...`) are returned as they are."""
    match = re.match(r"([a-z_]+)\.([a-z_]+)[\w.\[\]]*(?= =|:| )", message)
    sections = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig}
    section = sections.get(match.group(1)) if match else None
    if section is None or match.group(2) not in {f.name for f in dataclasses.fields(section)}:
        return message
    from lorakit.data_files import read_utf8

    try:
        places = {key: f"line {line}" for key, line in key_lines(read_utf8(Path(path))).items()}
    except (OSError, UserError):  # the file changed under the run: the message as it is
        return message
    places.update({key: "command line" for key in overrides or {}})
    return _join(str(path), [message], places)


# A YAML alias is the anchored value itself, not a copy: ten aliases of a list of ten aliases of ...
# load in microseconds, and every walk over the config (line numbers, checks, the copy it saves)
# would take 10^levels steps.
MAX_CONFIG_VALUES = 100_000


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values `value` holds once its aliases are written out; linear in the loaded objects
    (each shared one is counted once, by its id, and multiplied where it repeats)."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in sizes:
        sizes[id(value)] = 0  # (a value holding itself: counted as nothing more)
        items = value.values() if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(_expanded_size(v, sizes) for v in items)
    return sizes[id(value)]


def key_lines(text: str) -> dict[str, int]:
    """The line of every key of a YAML mapping's text, by the dotted name the config's problems use
    (`lora.r`, `data.train[1].columns`): where an error about it points."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                name = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines.setdefault(name, key_node.start_mark.line + 1)
                walk(value_node, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault(f"{prefix}[{i}]", item.start_mark.line + 1)
                walk(item, f"{prefix}[{i}]")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            walk(root, "")
    except (yaml.YAMLError, RecursionError):  # read once already (an alias to itself loops here): places only
        pass
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping, which it would otherwise
    resolve silently to the last value (a second `lora:` section replacing the first whole)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):  # (the base class refuses it as a key)
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key]}); keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


WSD_DECAY_SHAPES = ("cosine", "linear", "1-sqrt")


def _decay_problems(train: TrainConfig) -> list[str]:
    """train.decay_ratio and train.decay_shape: wsd's, in range, and only with wsd."""
    problems = []
    if _is_number(train.decay_ratio) and not train.decay_ratio <= 1:
        problems.append(f"train.decay_ratio = {train.decay_ratio!r}: must be in (0, 1], e.g. 0.1")
    if train.decay_shape is not None and train.decay_shape not in WSD_DECAY_SHAPES:
        problems.append(f"train.decay_shape = {train.decay_shape!r}: use one of {', '.join(WSD_DECAY_SHAPES)}")
    for key in ("decay_ratio", "decay_shape"):
        value = getattr(train, key)
        if value is not None and train.scheduler != "wsd":
            problems.append(
                f"train.{key} = {value!r} with train.scheduler = {train.scheduler!r}: it shapes the wsd schedule's final "
                f"decay; set train.scheduler: wsd, or remove {key}"
            )
    return problems


def build_run_config(
    raw: dict[str, Any], *, source: str = "config", check_paths: bool = True, places: Optional[dict[str, str]] = None
) -> RunConfig:
    """Turn a nested dict into a validated RunConfig, raising once with every problem.

    places: where each dotted key was given ("line 6" of the file `source`, or "command line"),
    named in the message beside its problem."""
    problems: list[str] = []
    # Bad values are reported and replaced by their defaults so the checks below still run:
    # the user sees every problem in one message.
    cfg = _convert(RunConfig, raw, "", problems)
    _expand_home(cfg)
    problems = _unlisted_file_options(raw.get("data"), problems)
    if cfg.adapter is not None:
        problems += _take_adapter_config(cfg, raw.get("lora"), check_paths, problems)
    problems += cfg.lora.problems("lora")
    for key, choices in _CHOICES.items():
        value = _get_dotted(cfg, key)
        if value not in choices:
            problems.append(f"{key} = {value!r}: use one of {', '.join(map(str, choices))}")
    for key, (low, inclusive) in _RANGES.items():
        value = _get_dotted(cfg, key)
        if value is None:
            continue
        if value < low or (not inclusive and value == low) or (isinstance(value, float) and not math.isfinite(value)):
            bound = f">= {low}" if inclusive else f"> {low}"
            problems.append(f"{key} = {value!r}: must be {bound}")
    if _is_number(cfg.train.neftune_alpha) and cfg.train.neftune_alpha > FLOAT32_MAX:
        problems.append(f"train.neftune_alpha = {cfg.train.neftune_alpha!r}: the noise, up to alpha / sqrt(row length x "
                        f"hidden size), would be past the largest float32 number ({FLOAT32_MAX:.3g}); NEFTune's alpha is "
                        "about 5 to 15")  # fmt: skip
    if cfg.train.gradient_checkpointing not in GRADIENT_CHECKPOINTING_MODES:
        problems.append(
            f"train.gradient_checkpointing = {cfg.train.gradient_checkpointing!r}: use false, true (= full), full or selective"
        )
    if cfg.train.eval_on_start and cfg.data.eval is None and not cfg.data.eval_fraction:
        problems.append("train.eval_on_start = true: needs eval data; set data.eval or data.eval_fraction")
    if cfg.train.eval_generate and cfg.data.eval is None:
        problems.append("train.eval_generate = true: needs data.eval, a file of records with reference answers")
    problems += _objective_problems(cfg)
    problems += _best_eval_problems(cfg)
    problems += _tracker_problems(cfg.train, check_paths)
    if _is_int(cfg.train.seed) and not -(2**63) <= cfg.train.seed < 2**63:
        problems.append(f"train.seed = {cfg.train.seed!r}: must fit in 64 bits, e.g. 0")
    if _is_number(cfg.train.warmup_ratio) and not cfg.train.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio = {cfg.train.warmup_ratio!r}: must be in [0, 1), e.g. 0.03")
    if cfg.train.warmup_ratio and cfg.train.warmup_steps:
        problems.append(
            f"train.warmup_ratio = {cfg.train.warmup_ratio!r} and train.warmup_steps = {cfg.train.warmup_steps!r}: "
            "set one of them"
        )
    if _is_number(cfg.train.min_lr_ratio) and not cfg.train.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio = {cfg.train.min_lr_ratio!r}: must be in [0, 1], e.g. 0.1")
    if cfg.train.min_lr_ratio and cfg.train.scheduler == "constant":
        problems.append(
            f"train.min_lr_ratio = {cfg.train.min_lr_ratio!r} with train.scheduler = 'constant': a constant lr does not "
            "decay to a floor; use cosine, linear or wsd, or remove min_lr_ratio"
        )
    problems += _decay_problems(cfg.train)
    for key in ("eval_every", "save_every"):
        value = getattr(cfg.train, key)
        if value != "epoch" and not (_is_int(value) and value >= 0):
            problems.append(f"train.{key} = {value!r}: give a number of steps (0: never) or epoch")
            setattr(cfg.train, key, 0)  # so the checks below still run
    if cfg.quantize == "nf4" and cfg.lora.init in ("pissa", "olora"):
        problems.append(
            f"lora.init = {cfg.lora.init!r} with quantize: nf4: {cfg.lora.init} factors the full-precision weights, "
            "which QLoRA does not hold; use default or gaussian init, or quantize: none"
        )
    problems += column_problems(cfg.data.columns, "data.columns")
    if cfg.data.system_prompt is not None and not cfg.data.system_prompt.strip():
        problems.append(f"data.system_prompt = {cfg.data.system_prompt!r}: give the system message's text, or leave it out")
    if cfg.data.train_turns == "last" and cfg.data.train_on_inputs:
        problems.append("data.train_turns = 'last' with data.train_on_inputs = true: every token is trained then; set one of them")
    if not 0 <= cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction = {cfg.data.eval_fraction!r}: must be in [0, 1)")
    if cfg.model is None:
        problems.append("model: missing; set it to a Hugging Face model folder (config.json + *.safetensors)")
    elif check_paths and not looks_like_hub_id(cfg.model) and not Path(cfg.model).is_dir():
        problems.append(f"model = {cfg.model!r}: folder not found; pass a local Hugging Face model folder")
    problems += _chat_template_problems(cfg.data.chat_template, check_paths)
    problems += template_variable_problems(cfg.data.chat_template_kwargs)
    if cfg.data.train is None and not any(p.startswith("data.train ") for p in problems):
        problems.append("data.train: missing; set it to a file of training records (.jsonl, .json, .parquet, .arrow, .csv, .tsv) or a list of them")
    problems += _eval_set_problems(cfg.data.eval, cfg.train.objective)
    for key in ("train", "eval"):
        problems += file_option_problems(f"data.{key}", getattr(cfg.data, key))
        files = data_files(getattr(cfg.data, key))
        if isinstance(getattr(cfg.data, key), list) and not files:
            problems.append(f"data.{key} = []: name at least one file, or leave it out")
        missing = [f for f in files if check_paths and isinstance(f, str) and not Path(f).is_file()]
        if missing:
            problems.append(f"data.{key} = {missing[0]!r}: file not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if problems:
        raise UserError(_join(source, problems, places or {}))
    return cfg


# what apply_chat_template itself gives a template: no variable to set from the config
_TEMPLATE_INPUTS = ("messages", "tools", "documents", "add_generation_prompt")


def template_variable_problems(variables: dict[str, Any]) -> list[str]:
    """What is wrong with data.chat_template_kwargs: names that are no Jinja variable or are the
    template's own inputs, values that are not YAML's plain data (or not finite)."""
    problems = []
    for name, value in variables.items():
        if not name.isidentifier() or keyword.iskeyword(name) or name in ("true", "false", "none") or name in _TEMPLATE_INPUTS:
            why = "apply_chat_template gives it itself" if name in _TEMPLATE_INPUTS else "not a template variable's name"
            problems.append(f"data.chat_template_kwargs.{name}: {why}; name the variable the template reads, e.g. enable_thinking")
        elif not _plain_data(value):
            problems.append(f"data.chat_template_kwargs.{name} = {value!r}: give a boolean, number, string, or a list or "
                            "mapping of them")  # fmt: skip
    return problems


def _plain_data(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def _chat_template_problems(value: Union[str, None], check_paths: bool) -> list[str]:
    from lorakit.chat_templates import CHAT_TEMPLATES

    if value is None or value in CHAT_TEMPLATES or not check_paths or Path(value).is_file():
        return []
    return [f"data.chat_template = {value!r}: no such file; give a Jinja template file or one of {', '.join(CHAT_TEMPLATES)}"]


# The data options a file of a data.train / data.eval list may set for its own records, in place
# of the data section's: {path: b.jsonl, format: instruction, columns: {instruction: question}};
# and, in data.train, `repeat`: how many times its examples count in an epoch (0.25: a seeded
# quarter of them, 3: each three times), which mixes sets in the proportions a user wants
FILE_OPTIONS = ("format", "columns", "system_prompt", "repeat")


def _expand_home(cfg: RunConfig) -> None:
    """`~` at the start of the config's paths made the home folder, as a shell does: YAML and
    key=value overrides keep it as written, and a run would make a folder named `~` (which a later
    `rm -rf ~` would take for the home folder)."""

    def home(path: Any) -> Any:
        return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path

    def sources(value: Any) -> Any:
        if isinstance(value, list):
            return [{**e, "path": home(e.get("path"))} if isinstance(e, dict) else home(e) for e in value]
        return home(value)

    cfg.model, cfg.adapter, cfg.output_dir = home(cfg.model), home(cfg.adapter), home(cfg.output_dir)
    cfg.data.train = sources(cfg.data.train)
    eval_set = cfg.data.eval
    cfg.data.eval = {k: sources(v) for k, v in eval_set.items()} if isinstance(eval_set, dict) else sources(eval_set)
    cfg.data.chat_template, cfg.data.cache_dir = home(cfg.data.chat_template), home(cfg.data.cache_dir)


def data_sources(value: Union[str, list[Any], None]) -> list[tuple[str, dict[str, Any]]]:
    """data.train, or one eval set, as (file, the file's own options) pairs: [] for None."""
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else list(value)
    return [(e, {}) if not isinstance(e, dict) else (e.get("path"), {k: v for k, v in e.items() if k != "path"}) for e in entries]


def own_options(options: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    """A list file's options less those equal to the data section's (`columns: {}` where data.columns
    is unset, `format: auto` where data.format is auto) and `repeat: 1`: they change nothing, so the
    file is the same source as without them, to the run's fingerprint and to what is held out of it once."""
    return {key: value for key, value in options.items() if value != (1 if key == "repeat" else getattr(data, key))}


def reading_options(options: dict[str, Any]) -> dict[str, Any]:
    """A list file's options that change how its records are read (DataConfig's fields), less
    `repeat`, which changes how often its examples count, not what they are."""
    return {key: value for key, value in options.items() if key != "repeat"}


def data_files(value: Union[str, list[Any], dict[str, Any], None]) -> list[str]:
    """data.train / data.eval as a list of files: [] for None, [path] for one path; named eval
    sets' files one set after another."""
    if isinstance(value, dict):
        return [f for files in eval_sets(value).values() for f in files]
    return [path for path, _ in data_sources(value)]


def _unlisted_file_options(data: Any, problems: list[str]) -> list[str]:
    """`problems` with the type error of a data.train / data.eval that is one file with options
    ({path: b.jsonl, columns: ...}, not in a list) said as such, and how to write it."""
    for key in ("train", "eval"):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, dict):
            continue
        entries = {f"data.{key}": value} if "path" in value or key == "train" else {f"data.eval.{k}": v for k, v in value.items()}
        where, entry = next(((w, e) for w, e in entries.items() if isinstance(e, dict) and "path" in e), (None, None))
        if where is None:
            continue
        wrong = f"data.{key} = {value!r}: expected "
        problems = [f"{where} = {entry!r}: a file with options of its own is an item of a list; write {where}: "
                    f"[{{path: {entry['path']}, ...}}]" if p.startswith(wrong) else p for p in problems]  # fmt: skip
    return problems


def file_option_problems(where: str, value: Any) -> list[str]:
    """What is wrong with the files of a data.train / data.eval list that come with options."""
    if isinstance(value, dict):
        return [p for name, files in value.items() for p in file_option_problems(f"{where}.{name}", files)]
    if not isinstance(value, list):
        return []
    problems = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            continue
        at = f"{where}[{i}]"
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            problems.append(f"{at}: a file with options of its own names its file as path, e.g. {{path: b.jsonl, "
                            "columns: {prompt: question}}")  # fmt: skip
        for key, option in entry.items():
            if key == "path":
                continue
            if key not in FILE_OPTIONS:
                close = difflib.get_close_matches(str(key), FILE_OPTIONS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"{at}.{key}: unknown key; {hint}a file's own keys are path, {', '.join(FILE_OPTIONS)}")
            elif key == "format" and option not in DATA_FORMATS:
                problems.append(f"{at}.format = {option!r}: use one of {', '.join(DATA_FORMATS)}")
            elif key == "columns":
                if not isinstance(option, dict) or not all(isinstance(k, str) and isinstance(n, str) for k, n in option.items()):
                    problems.append(f"{at}.columns = {option!r}: expected a mapping of lorakit's key to the records' name "
                                    "for it, e.g. {prompt: question}")  # fmt: skip
                else:
                    problems += column_problems(option, f"{at}.columns")
            elif key == "system_prompt" and option is not None and (not isinstance(option, str) or not option.strip()):
                problems.append(f"{at}.system_prompt = {option!r}: give the system message's text, or null for none")
            elif key == "repeat" and not where.startswith("data.train"):
                problems.append(f"{at}.repeat: an eval set is read whole; repeat weights the files of data.train, so remove "
                                "it here")  # fmt: skip
            elif key == "repeat" and (isinstance(option, bool) or not isinstance(option, (int, float)) or not 0 < option < math.inf):
                problems.append(f"{at}.repeat = {option!r}: give how many times the file's examples count in an epoch, a "
                                "number above 0 (0.5: a seeded half of them, 2: each twice)")  # fmt: skip
    return problems


def eval_sets(value: Union[str, list[Any], dict[str, Any], None]) -> dict[str, list[str]]:
    """data.eval as {set name: its files}: {} for None, one set named "" for a file or a list,
    the named sets as given."""
    return {name: [path for path, _ in sources] for name, sources in eval_set_sources(value).items()}


def eval_set_sources(value: Union[str, list[Any], dict[str, Any], None]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """data.eval as {set name: its (file, the file's own options) pairs}, as `eval_sets`."""
    if isinstance(value, dict):
        return {name: data_sources(files) for name, files in value.items()}
    return {"": data_sources(value)} if value is not None else {}


def eval_set_key(set_name: str) -> str:
    """Where an eval set is configured, for messages: data.eval, or data.eval.<set> for a named set."""
    return f"data.eval.{set_name}" if set_name else "data.eval"


def eval_key(set_name: str, metric: str) -> str:
    """An eval figure's key: eval_loss for the one eval set, eval_<set>_loss for a named set
    (transformers' naming for several eval datasets)."""
    return f"eval_{set_name}_{metric}" if set_name else f"eval_{metric}"


def best_metric_parts(metric: str, set_names: Iterable[str]) -> Optional[tuple[str, str]]:
    """(eval set name, the figure's key as BEST_METRICS names it) of a train.best_metric, e.g.
    ("gsm8k", "eval_loss") for eval_gsm8k_loss; None when it names no figure of these sets."""
    for name in sorted(set_names, key=len, reverse=True):  # the longest name that fits
        for base in BEST_METRICS:
            if metric == eval_key(name, base[len("eval_"):]):
                return name, base
    return None


def _take_adapter_config(cfg: RunConfig, raw_lora: Any, check_paths: bool, earlier: list[str]) -> list[str]:
    """Make cfg.lora the LoRA config of the adapter training starts from (`adapter`), its dropout
    the config's when the config sets one. Other lora keys the config sets must agree with the
    adapter's: the adapter's shape is fixed, so a different value is a mistake, not a wish. The
    modules the config's targets, exclude, layers and layers_pattern select are compared on the
    model's structure (`all-linear` against the adapter's list of names, layers against its paths), so the config
    that trained the adapter, or a resolved config.yaml, runs again as it is. `earlier`: the
    problems found so far (a value already reported as invalid is not compared)."""
    from lorakit.adapters import read_adapter_config

    if not Path(cfg.adapter).is_dir():
        return [f"adapter = {cfg.adapter!r}: folder not found; pass an adapter folder (adapter_config.json + "
                "adapter_model.safetensors)"] if check_paths else []  # fmt: skip
    try:
        start, _ = read_adapter_config(cfg.adapter)
    except UserError as exc:
        return [f"adapter = {cfg.adapter!r}: {exc}"]
    given = raw_lora if isinstance(raw_lora, dict) else {}
    invalid = {key for key in given if any(p.startswith((f"lora.{key} ", f"lora.{key}:")) for p in earlier)}
    keys = [k for k in given if k != "dropout" and hasattr(start, k) and k not in invalid]  # unknown keys: _convert's
    problems = []
    selection = [k for k in _SELECTION_KEYS if k in keys and _unordered(getattr(cfg.lora, k)) != _unordered(getattr(start, k))]
    if selection:
        problems += _same_modules(cfg, start, selection)
    for key in keys:
        mine, theirs = getattr(cfg.lora, key), getattr(start, key)
        if key not in _SELECTION_KEYS and _unordered(mine) != _unordered(theirs):  # PEFT writes lists in any order
            problems.append(
                f"lora.{key} = {mine!r}: training continues the adapter {cfg.adapter}, whose {key} is {theirs!r}; "
                f"remove lora.{key} (the adapter sets it)"
            )
    cfg.lora = dataclasses.replace(start, dropout=cfg.lora.dropout if "dropout" in given else start.dropout)
    return problems


# the lora keys that select modules together: compared by the modules they select
_SELECTION_KEYS = ("targets", "exclude", "layers", "layers_pattern")


def _same_modules(cfg: RunConfig, start: LoraConfig, keys: list[str]) -> list[str]:
    """[] when the config's targets / exclude / layers / layers_pattern select the adapter's modules
    on the model, else the problem. Compared on the model built from its config.json without weights; a model
    that cannot be built so is compared by the values as written."""
    from lorakit.inject import find_targets
    from lorakit.models import meta_model

    written = ", ".join(f"lora.{k} = {getattr(cfg.lora, k)!r}" for k in keys)
    fix = f"remove {' and '.join('lora.' + k for k in keys)} (the adapter sets {'it' if len(keys) == 1 else 'them'})"
    model = meta_model(cfg.model, trust_remote_code=cfg.trust_remote_code) if cfg.model and Path(cfg.model).is_dir() else None
    if model is None:
        theirs = ", ".join(f"{k} {getattr(start, k)!r}" for k in keys)
        return [f"{written}: training continues the adapter {cfg.adapter}, whose {theirs}; {fix}"]
    try:
        mine = dataclasses.replace(start, **{k: getattr(cfg.lora, k) for k in _SELECTION_KEYS})
    except UserError as exc:  # the config's own selection is invalid (a regex target with layers): that is the problem
        return [str(exc)]
    try:
        mine_paths = set(find_targets(model, mine))
    except UserError:
        mine_paths = set()
    try:
        theirs_paths = set(find_targets(model, start))
    except UserError:
        return [f"adapter = {cfg.adapter!r}: its targets {start.targets!r} match no layer of {cfg.model}; is it an "
                "adapter for another base model?"]  # fmt: skip
    if mine_paths == theirs_paths:
        return []
    extra = sorted(mine_paths - theirs_paths) or sorted(theirs_paths - mine_paths)
    side = "only the config's" if mine_paths - theirs_paths else "only the adapter's"
    return [
        f"{written}: selects other modules than the adapter {cfg.adapter} holds ({side}: {extra[0]}"
        f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}); {fix}"
    ]


def _unordered(value: Any) -> Any:
    return sorted(map(str, value)) if isinstance(value, (list, tuple)) else value


def _objective_problems(cfg: RunConfig) -> list[str]:
    """Settings that contradict train.objective (the data's records are checked when read)."""
    objective = cfg.train.objective
    problems = []
    if cfg.train.precompute_reference and objective not in REFERENCE_OBJECTIVES:
        problems.append(
            f"train.precompute_reference = true: train.objective: {objective} compares with no reference model; "
            f"set it to false (it is for {', '.join(REFERENCE_OBJECTIVES)})"
        )
    if objective not in PREFERENCE_BETA:
        if cfg.data.format == "preference":
            problems.append("data.format = 'preference': preference pairs train with train.objective dpo, ipo, simpo or orpo; set it")
        if cfg.data.format == "unpaired":
            problems.append("data.format = 'unpaired': labelled examples train with train.objective kto; set it")
        return problems
    if cfg.train.neftune_alpha:
        problems.append(
            f"train.neftune_alpha = {cfg.train.neftune_alpha!r}: NEFTune is for SFT; {objective} would compare noisy "
            "answers with a clean reference, set it to 0"
        )
    wanted = "unpaired" if objective in UNPAIRED_OBJECTIVES else "preference"
    if cfg.data.format not in ("auto", wanted):
        records = "labelled records (prompt, completion, label)" if wanted == "unpaired" else "preference records (prompt, chosen, rejected)"
        problems.append(
            f"data.format = {cfg.data.format!r}: train.objective: {objective} trains on {records}; use auto or {wanted}"
        )
    if objective in REFERENCE_OBJECTIVES and cfg.lora.init in ("pissa", "olora"):
        if cfg.adapter is None:
            problems.append(
                f"lora.init = {cfg.lora.init!r}: {objective.upper()}'s reference is the base with the adapter off, and "
                f"{cfg.lora.init} moves part of the base into the adapter; use default or gaussian"
            )
        else:
            problems.append(
                f"adapter = {cfg.adapter!r}: a {cfg.lora.init} adapter moves part of the base into itself, so "
                f"{objective.upper()} cannot hold it a second time, frozen, as the reference; write it as a plain "
                "LoRA first (lorakit convert) and continue that one"
            )
    if cfg.data.train_on_inputs:
        problems.append(f"data.train_on_inputs = true: {objective} compares the answers only; set it to false")
    if cfg.data.train_turns != "all":
        problems.append(
            f"data.train_turns = {cfg.data.train_turns!r}: {objective} trains the answers of its records, whatever their "
            "turns; remove it"
        )
    if cfg.train.eval_generate:
        problems.append(
            "train.eval_generate = true: preference data has no single reference answer; preference eval reports "
            "eval_reward_accuracy instead, set it to false"
        )
    return problems


def _best_eval_problems(cfg: RunConfig) -> list[str]:
    """save_best and early stopping need periodic evals of a figure the run measures."""
    train = cfg.train
    on = lambda v: v is True or (type(v) is int and v > 0)  # noqa: E731 (a bad value is reported by its own check)
    watched = [f"train.{k} = {getattr(train, k)!r}" for k in ("save_best", "early_stopping_patience") if on(getattr(train, k))]
    names = list(eval_sets(cfg.data.eval)) if isinstance(cfg.data.eval, dict) and cfg.data.eval else [""]
    parts = best_metric_parts(train.best_metric, names)
    problems = []
    if parts is None and (watched or best_metric_parts(train.best_metric, [""]) is None):
        # the figures this run's objective reports: rewards for preference objectives, perplexity (and
        # accuracy, with eval_generate) for sft
        preference = train.objective in PREFERENCE_BETA
        reported = ["eval_loss"] + (["eval_reward_accuracy", "eval_reward_margin"] if preference else ["eval_perplexity", "eval_accuracy"])
        choices = [eval_key(n, base[len("eval_"):]) for n in names for base in reported]
        problems.append(f"train.best_metric = {train.best_metric!r}: use one of {', '.join(choices)}"
                        + ("" if names == [""] else " (data.eval names its sets: the figure of one of them)"))  # fmt: skip
    if train.eval_every and cfg.data.eval is None and not cfg.data.eval_fraction:
        problems.append(f"train.eval_every = {train.eval_every!r}: there is no eval data to evaluate; set data.eval or "
                        "data.eval_fraction, or remove train.eval_every")  # fmt: skip
    if cfg.data.eval is not None and cfg.data.eval_fraction:
        problems.append(f"data.eval_fraction = {cfg.data.eval_fraction}: data.eval is set too, and eval data given wins "
                        "over a held-out fraction; remove one of them")  # fmt: skip
    if not watched:
        return problems
    if not train.eval_every:
        problems.append(f"{watched[0]}: needs evals during the run; set train.eval_every, e.g. to 100")
    if cfg.data.eval is None and not cfg.data.eval_fraction:
        problems.append(f"{watched[0]}: needs eval data; set data.eval or data.eval_fraction")
    if parts is None:
        return problems
    metric, objective = parts[1], train.objective
    preference = objective in PREFERENCE_BETA
    if metric == "eval_accuracy" and not train.eval_generate:
        problems.append(f"train.best_metric = {train.best_metric!r}: measured with train.eval_generate: true; set it, or watch "
                        "the loss")  # fmt: skip
    elif metric == "eval_perplexity" and preference:
        problems.append(f"train.best_metric = {train.best_metric!r}: {objective} reports no perplexity; watch the loss or the "
                        "reward accuracy")  # fmt: skip
    elif metric in ("eval_reward_accuracy", "eval_reward_margin") and not preference:
        problems.append(f"train.best_metric = {train.best_metric!r}: reported by preference objectives; watch the loss for sft")
    return problems


def _eval_set_problems(value: Any, objective: str) -> list[str]:
    """Named eval sets' names become parts of metric keys (eval_<name>_loss): keep them plain, and
    apart in the figures `objective` reports."""
    if not isinstance(value, dict):
        return []
    if not value:
        return ["data.eval = {}: name at least one eval set, or leave data.eval out"]
    problems = []
    for name, files in value.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            problems.append(f"data.eval: the set name {name!r} is no plain name; use letters, digits, - and _, starting with "
                            "a letter or digit (it becomes part of the eval keys, eval_<name>_loss)")  # fmt: skip
        elif not data_files(files):
            problems.append(f"data.eval.{name} = []: name at least one file, or leave the set out")
    keys = {}
    figures = EVAL_FIGURES if objective in PREFERENCE_BETA else ("loss", "perplexity", "accuracy")
    for name in value:
        for figure in figures:
            key = eval_key(name, figure)
            if key in keys and keys[key] != name:
                problems.append(f"data.eval: the sets {keys[key]!r} and {name!r} would both report {key}; rename one")
            keys[key] = name
    return problems


def _tracker_problems(train: TrainConfig, check_paths: bool) -> list[str]:
    from lorakit.tracking import TRACKER_PACKAGES, missing_packages

    names = train.trackers()
    unknown = [n for n in names if n not in TRACKER_PACKAGES]
    if unknown:
        return [f"train.report_to = {train.report_to!r}: unknown tracker {unknown[0]!r}; use {', '.join(TRACKER_PACKAGES)} (or none)"]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        return [f"train.report_to = {train.report_to!r}: {twice[0]} is listed twice; name each tracker once"]
    missing = missing_packages(names) if check_paths else []
    if missing:
        return [f"train.report_to = {train.report_to!r}: {missing[0]} is not installed; pip install {missing[0]} (lorakit's `{missing[0]}` extra)"]
    return []


def _join(source: str, problems: list[str], places: dict[str, str]) -> str:
    """One line, so the CLI's `error: ...` stays a single line however many problems there are:
    `run.yaml:6: lora.r = 0: ...`, or `run.yaml: 2 problems: line 6: ...; command line: ...`."""
    located = [(_place_of(problem, places), problem) for problem in problems]
    if len(located) == 1:
        place, problem = located[0]
        if place is None:
            return f"{source}: {problem}"
        return f"{source}:{place.removeprefix('line ')}: {problem}" if place.startswith("line ") else f"{place}: {problem}"
    return f"{source}: {len(problems)} problems: " + "; ".join(f"{p}: {q}" if p else q for p, q in located)


def _place_of(problem: str, places: dict[str, str]) -> Optional[str]:
    """Where the key a problem begins with (`lora.r = 0: ...`, `unknown key 'data.pack'; ...`) was
    given, or a key under it (an override `train.bogus.x=1`'s unknown `train.bogus`), or failing
    that its nearest enclosing key (a file entry's option: its entry)."""
    match = re.match(r"(?:unknown key ')?([A-Za-z_][\w.\[\]-]*)", problem)
    key = match.group(1).rstrip(".") if match else ""
    under = next((place for k, place in places.items() if k.startswith((key + ".", key + "["))), None) if key else None
    if key not in places and under is not None:
        return under
    while key:
        if key in places:
            return places[key]
        enclosing = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", key)  # `.name` or `[i]` off the end
        key = enclosing if enclosing != key else ""
    return None


def _takes_mapping(key: str) -> bool:
    """Whether a config key (`data.eval`, `lora.r`) may hold a mapping; True for keys this cannot
    tell (a section's, or deeper ones)."""
    section, _, name = key.partition(".")
    cls = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig}.get(section)
    if cls is None or not name or "." in name:
        return True
    hint = typing.get_type_hints(cls).get(name)
    if hint is None:
        return True

    def mapping(tp: Any) -> bool:
        if typing.get_origin(tp) in (Union, types.UnionType):
            return any(mapping(arg) for arg in typing.get_args(tp))
        return tp is dict or typing.get_origin(tp) is dict

    return mapping(hint)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """A KEY=VALUE override into a config mapping (`data.eval.a` sets a in the mapping data.eval).

    Raises:
        UserError: the key goes through a value that is no mapping (data.eval.a while data.eval is
            a file), which the override would silently replace.
    """
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, list):  # its items are no keys: the whole list, as it is now, to edit
            where = ".".join(parts[: i + 1])
            now = yaml.safe_dump(child, default_flow_style=True, width=math.inf).strip()
            raise UserError(f"override {key}={value!r}: {where} is a list, whose items an override does not reach; "
                            f"override the whole of it instead, e.g. {where}='{now}' with the item changed")  # fmt: skip
        if child is not None and not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            if not _takes_mapping(where):
                raise UserError(f"override {key}={value!r}: {where} is {child!r}, a value with no keys inside; set it "
                                f"itself, {where}=VALUE")  # fmt: skip
            raise UserError(
                f"override {key}={value!r}: {where} is {child!r}, not a mapping to set {parts[i + 1]!r} in; "
                f"override the whole of it instead, e.g. {where}='{{{parts[i + 1]}: ...}}'"
            )
        if child is None:
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _convert(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending a message for each unknown key or bad type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {raw!r}")
        return cls() if cls is not LoraConfig else LoraConfig()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            problems.append(f"unknown key '{prefix}{key}'{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _convert(hint, value if value is not None else {}, f"{prefix}{key}.", problems)
            continue
        ok, converted = _coerce(value, hint)
        if not ok:
            problems.append(f"{prefix}{key} = {value!r}: expected {_type_name(hint)}")
            continue
        kwargs[key] = converted
    if cls is LoraConfig:
        # LoraConfig validates itself on construction; collect its problems instead of raising.
        obj = LoraConfig.__new__(LoraConfig)
        for f in dataclasses.fields(LoraConfig):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(obj, f.name, kwargs.get(f.name, default))
        return obj
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = _coerce(value, arm)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return _is_int(value), value
    if hint is float:
        if _is_number(value):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            return False, None
        out_d = {}
        for k, v in value.items():
            ok_k, ck = _coerce(k, key_t)
            ok_v, cv = _coerce(v, val_t)
            if not (ok_k and ok_v):
                return False, None
            out_d[ck] = cv
        return True, out_d
    return isinstance(value, hint), value


_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_PLURALS.get(typing.get_args(hint)[0], _type_name(typing.get_args(hint)[0]))}"
    if origin is dict:
        k, v = typing.get_args(hint)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Any: "a value"}.get(hint, str(hint))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
