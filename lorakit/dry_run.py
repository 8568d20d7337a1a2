"""`lorakit train CONFIG --dry-run`: what a run checks before its first step, and its plan, without
loading a weight.

It validates the config, the output folder, the data (read, checked and tokenized, so the tokenized
data is cached for the run), the chat template and the preference records; builds the model from its
config.json on the meta device (no memory) with the adapters the run would add, or checks that the
adapter a run continues fits it; and prints what the run would train: the trainable parameters, the
data, the steps, and the memory its weights, adapters and optimizer state take (activations come on
top and depend on the batch). A user about to spend GPU hours on a config finds its mistakes in
seconds, on any machine.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from lorakit.config import REFERENCE_OBJECTIVES, RunConfig
from lorakit.data import IGNORE_INDEX, TokenizedDataset, show_example
from lorakit.errors import UserError
from lorakit.quant import frozen_bytes_estimate

# what an adapter parameter costs in training: its fp32 value, its gradient and AdamW's two moments
# (fp32, or 8-bit with adamw8bit)
TRAINABLE_BYTES = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}


def dry_run(
    cfg: RunConfig, *, resume: bool = False, processes: int = 1, show_examples: int = 0, log: Callable[[str], None] = print
) -> int:
    """Check everything `cfg` needs before a step and print its plan (see the module docstring);
    processes: the run's process count (`--nproc`), for the rows a step takes; show_examples: how
    many of the first training examples to print (`show_example`). Returns 0.

    Raises:
        UserError: what the run would refuse before its first step.
    """
    from lorakit.checkpoint import folder_holder, in_use_error, load_checkpoint
    from lorakit.batching import BatchStream
    from lorakit.data import load_train_eval
    from lorakit.models import (
        check_float_weights, check_model_folder, load_tokenizer, meta_model, pick_device, resolve_precision,
    )  # fmt: skip
    from lorakit.train import (
        _check_objective, _dropped, _examples, _objective_line, _skipped, check_output_dir, check_positions, data_config, prepare_chat_template,
        check_resume_step, check_token_ids, empty_replies_note, eval_sets_line, generation_eval_records, no_eos_note, plan_steps,
        serving_note, tied_copies_note, warmup_note,
    )  # fmt: skip

    holder = folder_holder(cfg.output_dir)
    if holder is not None:  # the run would be refused, first of all
        raise in_use_error(cfg.output_dir, holder)
    checkpoint = check_output_dir(Path(cfg.output_dir), resume)
    state = None
    if checkpoint is not None:  # the run refuses a damaged checkpoint, and a resume whose model, data or LoRA changed
        from lorakit.train import _check_same_run, check_resume_optimizer, fingerprint

        state, optimizer_state, _ = load_checkpoint(checkpoint)
        _check_same_run(state.get("fingerprint", {}), fingerprint(cfg), checkpoint)
        check_resume_optimizer(cfg.train.optimizer, optimizer_state, checkpoint)
    if cfg.train.trackers():
        from lorakit.tracking import check_tracker_paths

        check_tracker_paths(Path(cfg.output_dir), cfg.train.trackers())
    strategy = None
    if processes > 1:
        from lorakit.distributed import resolve_strategy

        strategy = resolve_strategy(cfg, pick_device().type)
    if cfg.train.optimizer == "adamw8bit":
        from lorakit.quant import require_bitsandbytes

        require_bitsandbytes("train.optimizer: adamw8bit")
    if Path(cfg.model).is_dir():  # (a Hub name is left to transformers)
        check_model_folder(cfg.model)  # safetensors weights there, looked for, not read
    check_positions(cfg, log)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepare_chat_template(tokenizer, cfg, log)
    train_set, eval_sets = load_train_eval(data_config(cfg), tokenizer, seed=cfg.train.seed)
    _check_objective(cfg, train_set, eval_sets)
    if cfg.train.eval_generate:
        generation_eval_records(cfg, eval_sets, tokenizer)  # every set has answers to compare with
    model = meta_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if model is None:
        raise UserError(f"model = {cfg.model!r}: its config.json does not build a transformers model here (an unknown "
                        "architecture, or custom code without trust_remote_code: true)")  # fmt: skip
    if Path(cfg.model).is_dir():
        check_float_weights(Path(cfg.model), model)  # from the safetensors headers, as the run's loaders check them
    dtype = resolve_precision(cfg.train.precision, pick_device())
    shards = processes if strategy == "fsdp" else 1  # FSDP2 shards the weights and the adapters
    frozen_bytes = frozen_bytes_estimate(model, dtype, nf4=cfg.quantize == "nf4", shards=shards)
    check_token_ids(model, cfg, train_set, eval_sets)
    trainable, total, adapted = _adapters(model, cfg)

    stream = BatchStream(train_set, batch_size=cfg.train.batch_size, max_length=cfg.data.max_length,
                         packing=cfg.data.packing, seed=cfg.train.seed, rank=0, world_size=processes)  # fmt: skip
    total_steps, steps_per_epoch = plan_steps(cfg, stream, processes)
    for note in (warmup_note(cfg, total_steps), tied_copies_note(model), no_eos_note(tokenizer), serving_note(cfg)):
        if note:
            log(note)
    if state is not None:
        check_resume_step(state["step"], total_steps, checkpoint)
        stream.load_state_dict(state["stream"])  # as the run does: the same rows a step (batch_size x processes)
    rows = cfg.train.batch_size * cfg.train.grad_accum * processes
    stats = dataclasses.asdict(train_set.stats)
    adapter_bytes = trainable * TRAINABLE_BYTES[cfg.train.optimizer]
    if cfg.adapter is not None and cfg.train.objective in REFERENCE_OBJECTIVES:
        adapter_bytes += trainable * 4  # the frozen copy of the starting adapter, the reference
    weights = "NF4 linear layers, the rest" if cfg.quantize == "nf4" else "frozen weights"
    sharded = " under fsdp: its shards, plus the block being run" if shards > 1 else ""
    lines = [
        f"model        {cfg.model} ({type(model).__name__}, {total:,} params, config.json only: no weight read)",
        f"adapters     LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {adapted}; trainable {trainable:,} "
        f"({100 * trainable / max(total, 1):.3f}%)" + (f"; continues {cfg.adapter} (fits the model)" if cfg.adapter else ""),
        f"data         {_examples(stats)}, {stats['tokens']:,} tokens ({stats['trainable_tokens']:,} trained); "
        f"{_dropped(stats)}, {_skipped(stats['skipped_invalid'], train_set.skipped_places())}",
        f"plan         {total_steps} steps ({steps_per_epoch} an epoch) x {rows} rows of <= {stream.max_length} tokens"
        f"{' (pairs)' if stream.pairs else ''}; {processes} process{'es' if processes > 1 else ''}; output {cfg.output_dir}"
        + (f", resuming from {checkpoint}" if checkpoint is not None else ""),
        f"memory       {weights} in {str(dtype).replace('torch.', '')}: {_size(frozen_bytes)}; adapters, gradients "
        f"and AdamW state {_size(adapter_bytes / shards)} (per process{sharded}, activations on top)",
    ]
    if eval_sets:
        lines.insert(3, f"eval         {eval_sets_line(eval_sets, cfg)}")
    note = empty_replies_note(stats["empty_replies"], train_set.first_empty_reply())
    if note:
        lines.insert(3, note)  # under the data line
    if cfg.train.objective != "sft":
        lines.insert(2, f"objective   {_objective_line(cfg)[1:]}")
    log("\n".join(lines))
    # a terminal or file that cannot take the marks (LANG=C) gets [[ ]], and the text's own
    # characters it cannot take as escapes
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    marks = ("⟦", "⟧") if _encodes("⟦⟧", encoding) else ("[[", "]]")
    for i in range(min(show_examples, len(train_set))):
        ids, labels = train_set.example(i)
        log(f"\nexample {i + 1} of {len(train_set):,}{_example_role(train_set, i)}: {len(ids)} tokens, "
            f"{int((labels != IGNORE_INDEX).sum())} trained")  # fmt: skip
        text = show_example(tokenizer, ids, labels, color=sys.stdout.isatty(), marks=marks)
        log(text.encode(encoding, "backslashreplace").decode(encoding))
    log("dry run: nothing trained; the tokenized data is cached for the run")
    return 0


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _example_role(data: TokenizedDataset, i: int) -> str:
    """Where example `i` comes from, " (FILE:LINE)", so its record can be found (the training set's
    numbers are not the files' when several are listed, or records were skipped, dropped or held
    out), and what it is of a preference or KTO data set."""
    what = [] if data.record_of(i) is None else [data.record_of(i)]
    if data.desirable is not None:
        label = "its KL example" if i % 2 else "desirable" if data.desirable[i // 2] else "undesirable"
        what.append(f"labelled example {i // 2 + 1}: {label}")
    elif data.pairs:
        what.append(f"pair {i // 2 + 1}: {'rejected' if i % 2 else 'chosen'}")
    return f" ({', '.join(what)})" if what else ""


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _adapters(model: nn.Module, cfg: RunConfig) -> tuple[int, int, str]:
    """(trainable, total parameters, what is adapted: "28 layers") with the adapter the run trains added
    to the meta model, counted and worded as the run's start summary has them."""
    from lorakit.adapters import check_fits, read_adapter
    from lorakit.inject import count_parameters, inject_adapter
    from lorakit.train import adapted_summary

    if cfg.adapter is not None:
        check_fits(model, read_adapter(cfg.adapter))
    # the shapes are init's alone: PiSSA / OLoRA would factor weights that are not there, and DoRA
    # take the norms of their rows (its magnitudes, one per output row, are counted here instead)
    paths = inject_adapter(model, dataclasses.replace(cfg.lora, init="default", dora=False))
    trainable, total = count_parameters(model)
    if cfg.lora.dora:
        magnitudes = 0
        for path in paths:
            layer = model.get_submodule(path)
            rows, cols = layer.kind.dense_weight(layer).shape  # (out, in); an embedding's (num, dim)
            magnitudes += cols if layer.kind.name == "embedding" else rows
        trainable, total = trainable + magnitudes, total + magnitudes
    return trainable, total, adapted_summary(model)
