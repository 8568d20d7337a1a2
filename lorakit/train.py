"""`lorakit train`: config -> model + adapters -> batches -> optimizer steps -> files.

The run is three plain functions: `setup` (load and check everything, restore a checkpoint),
`fit` (the loop) and `evaluate` (eval loss, optionally generation accuracy). The distributed
path (lorakit.distributed) reuses them; it only changes setup, the sampler, gradient reduction
and who writes files.

Loss normalisation is token-exact: every micro-batch's summed token loss is divided by the
number of trainable tokens in the whole optimizer step (all micro-batches, all ranks), so
packing, batch composition and gradient accumulation do not change the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml
from torch import nn

from lorakit import host_memory, preference
from lorakit.adapters import CHAT_TEMPLATE_NAME, CONFIG_NAME, WEIGHTS_NAME, read_chat_template
from lorakit.checkpoint import (
    RunFolderLock, folder_holder, in_use_error, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
    set_aside_checkpoint,
)  # fmt: skip
from lorakit.config import (
    BEST_METRICS, REFERENCE_OBJECTIVES, UNPAIRED_OBJECTIVES, DataConfig, RunConfig, best_metric_parts, data_files,
    data_sources, eval_key, eval_set_key, eval_set_sources, load_run_config, locate_problem, own_options, parse_overrides,
    reading_options,
)  # fmt: skip
from lorakit.config import eval_sets as config_eval_sets
from lorakit.errors import UserError
from lorakit.experts import LoraExperts
from lorakit.layers import PRINCIPAL_INITS
from lorakit.inject import count_parameters, inject_adapter, lora_layers, saved_modules
from lorakit.loss import LOSS_CHUNK_TOKENS, TokenLoss
from lorakit.metrics import MetricsLog, byte_size, peak_rss_bytes, strict_json, write_text_atomic
from lorakit.models import (
    base_reference, check_model_folder, load_config, load_model, load_tokenizer, meta_model, padding_id, pick_device, position_limit,
    resolve_precision,
)  # fmt: skip
from lorakit.preference import loss_module

# torch.compile's mode under `train.compile: true`, a switch for the benchmark's levers:
# "reduce-overhead" adds CUDA graphs on GPUs, where small models' steps are bound by kernel launches.
COMPILE_MODE = "default"


class TrainingDiverged(RuntimeError):
    """Loss or gradients became inf/NaN; the run stops, earlier checkpoints stay."""


@dataclass
class Distributed:
    """Who this process is among the training processes; a single process by default."""

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # Context manager factory for micro-batches whose gradients must not be reduced yet (DDP no_sync).
    no_sync: Callable[[], Any] = None  # type: ignore[assignment]
    # Wait for every rank (after rank 0 wrote a checkpoint).
    barrier: Callable[[], None] = lambda: None
    # Where the model is loaded before lorakit.distributed.wrap_model (None: the training device);
    # FSDP2 on GPUs loads on the CPU and shards onto the GPU block by block.
    load_device: Optional[torch.device] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    cfg: RunConfig
    output_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    model: nn.Module  # the LoRA model (unwrapped)
    # (input_ids, labels, position_ids) -> summed token loss (lorakit.loss.TokenLoss, maybe wrapped);
    # for a preference objective (..., sequence_ids) -> (summed pair loss, stats) (lorakit.preference.PreferenceLoss)
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: Any
    eval_sets: dict[str, Any]  # by name ("" for the one set): lorakit.config.eval_sets
    total_steps: int
    fingerprint: dict[str, Any]
    dist: Distributed = field(default_factory=Distributed)
    step: int = 0
    metrics: Optional[MetricsLog] = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    frozen_summary: str = ""
    eval_records: Optional[dict[str, list]] = None  # eval_generate's (record, system prompt) pairs, by eval set
    interrupted: Optional[int] = None  # the signal number that asked this process to stop
    # the signal every process agreed to stop on, read off each step's last all-reduce: a signal
    # reaches the processes of a job at different moments, and one that stopped a step before the
    # others would wait for them in its checkpoint's barrier while they wait for it in the next step
    stopping: Optional[int] = None
    # The parameters that train, listed once: walking the module tree for them took 0.2 ms a step
    # on the benchmark's model and CPU, host time that a GPU's small-model step waits for.
    trainable: list = field(default_factory=list)
    # the best eval so far of train.best_metric (for save_best and early stopping): its value and
    # step (None before the first eval) and how many evals since have not bettered it
    best: dict = field(default_factory=dict)
    # train.precompute_reference: the reference's summed log-probability of each training example,
    # (N,) fp32 on the device, looked up by the micro-batches' example_ids; None: computed each step
    reference_logps: Optional[torch.Tensor] = None
    # the wall time and tokens of the training so far: this process's (from `fit_started`, a
    # perf_counter reading), and those a resumed checkpoint had (`trained_before`), so that the
    # summary's time and speed are the run's, not the resumed part's
    fit_started: float = 0.0
    tokens_seen: int = 0
    trained_before: tuple[float, int] = (0.0, 0)
    # the main process's hold on output_dir (no other run writes there while this one lives); `close`
    folder_lock: Optional[RunFolderLock] = None

    def close(self) -> None:
        """Let output_dir go: another run may write there from now on."""
        if self.folder_lock is not None:
            self.folder_lock.release()


# --------------------------------------------------------------------------- setup
def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What must not change across a resume: the model, the data, the LoRA config and the objective."""

    def file_hash(path: Optional[str]) -> Optional[str]:
        if path is None:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def files_hash(value):  # one file's hash as before (a list of one too), so earlier checkpoints still resume
        sources = [(f, own_options(options, cfg.data)) for f, options in data_sources(value)]
        hashes = [file_hash(f) for f, _ in sources]
        if any(options for _, options in sources):  # a file's own options (so earlier checkpoints still resume)
            return [[h, options] for h, (_, options) in zip(hashes, sources)]
        return hashes[0] if len(hashes) == 1 else hashes or None

    model_dir = Path(cfg.model)
    model_id = cfg.model
    if model_dir.is_dir():
        check_model_folder(model_dir)  # its config.json is read here, before the model is loaded
        weights = sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors"))
        model_id = hashlib.sha256(((model_dir / "config.json").read_text() + repr(weights)).encode()).hexdigest()
    # the adapter training continues, for runs that have one (so checkpoints of earlier runs still resume)
    start = {} if cfg.adapter is None else {"adapter": [file_hash(str(Path(cfg.adapter) / n)) for n in (CONFIG_NAME, WEIGHTS_NAME)]}
    return {
        "model": model_id,
        "data": {"train": files_hash(cfg.data.train), "eval": _eval_hash(cfg.data.eval, files_hash), **_data_options(cfg)},
        "lora": _lora_fingerprint(cfg),
        "quantize": cfg.quantize,
        **start,
        **_objective_fingerprint(cfg),
    }


def _lora_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    lora = dataclasses.asdict(cfg.lora)
    if lora["layers_pattern"] is None:
        del lora["layers_pattern"]  # so checkpoints of earlier runs still resume
    return lora


def _eval_hash(value: Any, files_hash: Callable[[Any], Any]) -> Any:
    """data.eval's part of the fingerprint: its files' hashes, by set for named sets (a file moved
    to another set changes what that set's figures, and the best, mean)."""
    return {name: files_hash(files) for name, files in value.items()} if isinstance(value, dict) else files_hash(value)


def _objective_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The objective, for runs that have one other than sft (so checkpoints of earlier runs still resume)."""
    train = cfg.train
    if train.objective == "sft":
        return {}
    objective = {"name": train.objective, "beta": train.preference_beta(), "simpo_gamma": train.simpo_gamma}
    if train.objective == "kto":
        objective["kto_weights"] = [train.kto_desirable_weight, train.kto_undesirable_weight]
    return {"objective": objective}


def _data_options(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg.data)
    for key in ("train", "eval", "cache_dir"):
        d.pop(key)
    if d["train_turns"] == "all":
        del d["train_turns"]  # so checkpoints of earlier runs still resume
    for key in ("columns", "system_prompt", "chat_template_kwargs"):
        if not d[key]:
            del d[key]  # so checkpoints of earlier runs still resume
    from lorakit.chat_templates import chat_template_text, template_with_variables

    if d.get("chat_template_kwargs"):  # as the template gets them: false and 0 are other renders
        d["chat_template_kwargs"] = template_with_variables("", d["chat_template_kwargs"])
    source = chat_template_source(cfg)
    if source is not None and d["chat_template"] is None:  # the continued adapter's template
        d["adapter_chat_template"] = hashlib.sha256(chat_template_text(source).encode()).hexdigest()
    if d["chat_template"] is None:
        del d["chat_template"]  # so checkpoints of earlier runs still resume
    else:  # its text: an edited template file is another run
        d["chat_template"] = hashlib.sha256(chat_template_text(d["chat_template"]).encode()).hexdigest()
    return d


def check_output_dir(output_dir: Path, resume: bool) -> Optional[Path]:
    """The checkpoint to resume from; refuses to overwrite an earlier run without --resume, and an
    output_dir that cannot be made (a file on its path, a folder it may not write in)."""
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"output_dir {str(output_dir)!r}: {existing} is a file, not a folder; set output_dir to a folder path")
    # Tried, not read off the permission bits: root passes those everywhere, and /proc or /sys refuse
    # a new folder whatever they say. The probe goes at once, so a dry run leaves nothing behind.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorakit-probe-", dir=existing))
    except OSError as exc:
        raise UserError(f"output_dir {str(output_dir)!r}: cannot write in {existing} ({exc.strerror or exc}); set "
                        "output_dir to a folder you can write") from None  # fmt: skip
    _check_run_entries(output_dir)
    checkpoint = latest_checkpoint(output_dir)
    if resume:
        if checkpoint is None:
            raise UserError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; start without --resume")
        return checkpoint
    finished = (output_dir / "adapter" / "adapter_config.json").is_file()
    if checkpoint is not None or finished:
        what = "a finished run" if finished else f"checkpoints ({checkpoint.name})"
        raise UserError(
            f"output_dir {str(output_dir)!r} already holds {what}; pass --resume to continue it, or set a new "
            "output_dir=... so nothing is overwritten"
        )
    return None


# What a run writes in output_dir, by kind: folders it replaces whole (a link there would be swapped
# out, not followed, and left hidden beside the new folder), the folder it writes checkpoints into
# (a link to another disk is fine), and its files (renamed into place: a folder there stops that;
# metrics.jsonl is appended to and the lock written in place, so a link there, planted in a shared
# or copied run folder, would have the run write into the file it points at).
# where train.save_best keeps the adapter of the best eval, beside output_dir/adapter
BEST_ADAPTER_DIR = "best_adapter"
_REPLACED_FOLDERS = ("adapter", BEST_ADAPTER_DIR)
_RUN_FILES = ("metrics.jsonl", "loss.png", "config.yaml", "summary.json", RunFolderLock.NAME)


def _check_run_entries(output_dir: Path) -> None:
    """Refuse an entry of output_dir that has the name of something the run writes but not its kind
    (a file named `checkpoints`): found now, not after the first steps, when the run writes it."""
    for name in (*_REPLACED_FOLDERS, "checkpoints", *_RUN_FILES):
        path = output_dir / name
        if not path.is_symlink() and not path.exists():
            continue
        folder = name not in _RUN_FILES
        if path.is_symlink() and (name != "checkpoints" or not path.exists()):
            kind = "a symbolic link" if path.exists() else "a symbolic link to nothing"
        elif folder and not path.is_dir():
            kind = "a file"
        elif not folder and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a plain file"  # (a FIFO would block the run's open)
        else:
            continue
        raise UserError(f"output_dir {str(output_dir)!r}: {path} is {kind}, where the run writes its {name} "
                        f"{'folder' if folder else 'file'}; move it away, or set a new output_dir=...")  # fmt: skip


def warmup_note(cfg: RunConfig, total_steps: int) -> Optional[str]:
    """A warmup as long as the run never reaches its learning rate: said before the run, not
    refused (the step count comes from the data, which a config cannot know)."""
    warmup = cfg.train.warmup_steps
    if not warmup or warmup < total_steps:
        return None
    last = cfg.train.lr * lr_lambda(cfg, total_steps)(total_steps - 1)
    return (f"note: train.warmup_steps = {warmup} is not shorter than the run's {total_steps} steps: the learning rate "
            f"never reaches train.lr = {cfg.train.lr:g} (its last step's is {last:.3g}); lower train.warmup_steps or use "
            "train.warmup_ratio")  # fmt: skip


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    """The lr factor of each step: a linear warmup (warmup_steps, or warmup_ratio of the steps), then
    constant, or a linear / cosine decay from 1 toward min_lr_ratio at the end of the run, or (wsd:
    warmup, stable, decay) 1 until the last decay_ratio of the steps, which decay the same way in
    decay_shape (cosine, linear, or 1-sqrt, the cooldown of Hägele et al. 2024)."""
    kind, floor = cfg.train.scheduler, cfg.train.min_lr_ratio
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * total_steps)  # as transformers rounds it
    shape = (cfg.train.decay_shape or "cosine") if kind == "wsd" else kind
    decay_start = warmup
    if kind == "wsd":  # the decay's steps rounded up, as the warmup's are; a warmup that long keeps its steps
        ratio = 0.1 if cfg.train.decay_ratio is None else cfg.train.decay_ratio
        decay_steps = math.ceil(round(ratio * total_steps, 9))  # round: 0.1 x 30 is 3.0000000000000004 in floats
        decay_start = max(warmup, total_steps - decay_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        if shape == "linear":
            decay = 1.0 - progress
        elif shape == "1-sqrt":
            decay = 1.0 - math.sqrt(progress)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return factor


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW on trainable parameters; B matrices get lr x lr_ratio_b (LoRA+)."""
    a_params, b_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b_params if ".lora_B." in name else a_params).append(p)
    groups = [{"params": a_params, "lr": cfg.train.lr}]
    if b_params:
        groups.append({"params": b_params, "lr": cfg.train.lr * cfg.train.lr_ratio_b})
    groups = [g for g in groups if g["params"]]
    kwargs = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.train.weight_decay)
    if cfg.train.optimizer == "adamw8bit":
        from lorakit.quant import make_8bit_adamw

        return make_8bit_adamw(groups, **kwargs)
    device_type = next(iter(groups[0]["params"])).device.type
    # The fused kernel updates every tensor in one pass; it needs float params on CPU or CUDA.
    fused = device_type in ("cpu", "cuda") and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def setup(cfg: RunConfig, *, resume: bool = False, dist: Optional[Distributed] = None, log: Callable[[str], None] = print) -> Run:
    """Load and check everything a run needs; restore the newest checkpoint when resuming. The main
    process holds output_dir for the run from here (`Run.close` lets it go): a second run started
    into the same folder is refused.

    Raises:
        UserError: what in the config, model, data or output_dir the run refuses, before any step.
    """
    dist = dist or Distributed()
    holder = folder_holder(cfg.output_dir) if dist.is_main else None
    if holder is not None:  # said first: what the folder holds is the other run's doing
        raise in_use_error(cfg.output_dir, holder)
    check_output_dir(Path(cfg.output_dir), resume)  # a folder that cannot be made is said before the lock tries
    lock = RunFolderLock.take(cfg.output_dir) if dist.is_main else None
    try:
        run = _setup(cfg, resume, dist, log)
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        raise
    run.folder_lock = lock
    return run


def _setup(cfg: RunConfig, resume: bool, dist: Distributed, log: Callable[[str], None]) -> Run:
    from lorakit.batching import BatchStream
    from lorakit.data import load_train_eval

    output_dir = Path(cfg.output_dir)
    checkpoint = check_output_dir(output_dir, resume)  # again, now that no other run can write there
    fp = fingerprint(cfg)
    ckpt_state = None
    if checkpoint is not None:
        ckpt_state, optimizer_state, rng_state = load_checkpoint(checkpoint)
        _check_same_run(ckpt_state.get("fingerprint", {}), fp, checkpoint)
    model_config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)  # refused before kernels are built or data read

    device = dist_device(dist)
    dtype = resolve_precision(cfg.train.precision, device)
    if device.type == "cpu" and host_memory.KEEP_FREED_MEMORY:
        host_memory.keep_freed_memory()  # each step's memory, freed and taken again, without page faults
    torch.manual_seed(cfg.train.seed)
    check_positions(cfg, log if dist.is_main else lambda _: None)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepare_chat_template(tokenizer, cfg, log if dist.is_main else lambda _: None)
    train_set, eval_sets = load_train_eval(data_config(cfg), tokenizer, seed=cfg.train.seed)
    _check_objective(cfg, train_set, eval_sets)
    eval_records = generation_eval_records(cfg, eval_sets, tokenizer) if cfg.train.eval_generate else None
    # a token past the embedding table, said from config.json before the kernels' build and the weights' load
    check_token_ids(None, cfg, train_set, eval_sets, rows=getattr(model_config.get_text_config(), "vocab_size", None))
    announce = log if dist.is_main else None
    if device.type == "cpu" and host_memory.CACHE_LARGE_BLOCKS:
        # and the blocks glibc maps afresh, kept by size, before the model's weights come: the first
        # use of lorakit's kernels, which builds them (once per machine, said aloud), after the data's
        # checks so that a mistake there is said without that wait
        host_memory.cache_large_blocks(announce)

    load_device = dist.load_device or device
    if cfg.quantize == "nf4":
        from lorakit.quant import load_model_4bit

        model, report = load_model_4bit(cfg.model, compute_dtype=dtype, device=str(load_device), trust_remote_code=cfg.trust_remote_code)
        frozen_summary = report.summary()
    else:
        model = load_model(cfg.model, dtype=dtype, device=load_device, trust_remote_code=cfg.trust_remote_code)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters())
        frozen_summary = f"frozen weights {frozen / 2**20:.1f} MiB ({8 * frozen / max(1, sum(p.numel() for p in model.parameters())):.0f} bits/param)"
    check_token_ids(model, cfg, train_set, eval_sets)
    from lorakit import cpu_kernels, fused

    if device.type == "cpu" and dtype in cpu_kernels.DTYPES:
        # lorakit's compiled attention, RMSNorm, SwiGLU gate, RoPE and loss: built here (once per machine,
        # said aloud) rather than silently inside the first step, unless the block cache built them
        cpu_kernels.ops(announce)
    add_adapters(model, cfg)
    for note in (tied_copies_note(model), no_eos_note(tokenizer), serving_note(cfg)):
        if note:
            log(note)
    if cfg.train.objective != "sft":
        preference.disable_dropout(model)
    if cfg.train.neftune_alpha:
        add_neftune(model, cfg.train.neftune_alpha, dist.rank)
    fused.use_lorakit_kernels(model)  # per-example attention for packed rows, fused norms, gate and RoPE
    model.to(load_device)
    if cfg.train.gradient_checkpointing:
        from lorakit import activation_checkpointing

        activation_checkpointing.enable(model, cfg.train.gradient_checkpointing)
    model.train()

    pad_id = padding_id(tokenizer, model)
    stream = BatchStream(
        train_set, batch_size=cfg.train.batch_size, max_length=cfg.data.max_length, packing=cfg.data.packing,
        seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size, pad_id=pad_id,
    )  # fmt: skip
    total_steps, steps_per_epoch = plan_steps(cfg, stream, dist.world_size)
    note = warmup_note(cfg, total_steps)
    if note:
        log(note)

    if dist.world_size > 1:
        from lorakit.distributed import wrap_model

        train_model = wrap_model(model, cfg, dist, device)
    elif cfg.train.compile:
        # The compiled model returns full logits: the fused head's autograd function would break the graph.
        train_model = loss_module(torch.compile(model, mode=COMPILE_MODE), None, cfg.train)
    else:
        train_model = loss_module(model, LOSS_CHUNK_TOKENS, cfg.train)  # one process: no sum over others
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    run = Run(
        cfg=cfg, output_dir=output_dir, device=device, dtype=dtype, tokenizer=tokenizer, model=model,
        train_model=train_model, optimizer=optimizer, scheduler=scheduler, stream=stream, eval_sets=eval_sets,
        total_steps=total_steps, fingerprint=fp, dist=dist, frozen_summary=frozen_summary,
        data_stats={**dataclasses.asdict(train_set.stats), "skipped_at": train_set.skipped_places(),
                    "first_empty_reply": train_set.first_empty_reply()},
        eval_records=eval_records,
        trainable=[p for p in model.parameters() if p.requires_grad], best=new_best_record(cfg.train.best_metric),
    )  # fmt: skip
    run.metrics = MetricsLog(output_dir, enabled=dist.is_main)
    if ckpt_state is not None:  # refused before the reference pass, which may take an epoch's forwards
        check_resume_step(ckpt_state["step"], total_steps, checkpoint)
        check_resume_optimizer(cfg.train.optimizer, optimizer_state, checkpoint)
        stream.load_state_dict(ckpt_state["stream"])  # another batch_size x processes (the pass reads no stream state)
    if cfg.train.precompute_reference:
        to_go = total_steps - (ckpt_state["step"] if ckpt_state is not None else 0)
        if to_go < steps_per_epoch:  # the pass reads every pair; the steps save one reference forward each
            log(f"note: train.precompute_reference runs the reference over the whole training set, an epoch of "
                f"{steps_per_epoch} steps, and the {to_go} steps to go save less than that; it pays in runs of two "
                "epochs or more, so leave it off here")  # fmt: skip
        # Not kept in checkpoints: the pass is deterministic (fixed rows and order, the frozen
        # reference), so a resumed run recomputes the same table and goes on bit-exactly.
        start = time.perf_counter()
        # the PreferenceLoss itself, not a DDP wrapper's forward (no gradients, nothing to reduce)
        loss = next(m for m in train_model.modules() if isinstance(m, preference.PreferenceLoss))
        run.reference_logps = preference.precompute_reference_logps(loss, stream, device, dist.all_reduce_sum)
        log(f"precomputed the reference log-probabilities of {len(run.reference_logps)} sequences in "
            f"{time.perf_counter() - start:.1f} s (train.precompute_reference)")  # fmt: skip
    if ckpt_state is not None:
        changed = _restore(run, checkpoint, ckpt_state, optimizer_state, rng_state)
        log(f"resuming from {checkpoint} (step {run.step} of {total_steps})")
        if changed:
            log(f"  the config's {changed} hold from here, not the checkpoint's")
    elif dist.is_main:
        run.metrics.clear()  # a run that died before its first checkpoint left these; this run starts anew
    if cfg.train.trackers():
        run.metrics.trackers = _start_trackers(run, ckpt_state)
    return run


def _start_trackers(run: Run, ckpt_state: Optional[dict]):
    """The main process's experiment trackers; under torchrun the other processes learn whether
    they started, so a tracker that fails (not logged in) stops every process with its error."""
    trackers, failure = None, None
    if run.dist.is_main:
        try:
            trackers = open_trackers(run, ckpt_state)
        except UserError as exc:
            failure = exc
    if run.dist.world_size > 1 and run.dist.all_reduce_sum(torch.tensor([float(failure is not None)])).item() and failure is None:
        raise UserError("the main process could not start the experiment trackers (train.report_to); its error says why")
    if failure is not None:
        raise failure
    return trackers


def open_trackers(run: Run, ckpt_state: Optional[dict]):
    """The experiment trackers train.report_to names (lorakit.tracking), continuing the runs a
    resumed checkpoint names."""
    from lorakit.tracking import Trackers

    cfg = run.cfg
    trainable, total = _parameter_counts(run.model)
    config = {
        **cfg.to_dict(),
        "run": {"total_steps": run.total_steps, "processes": run.dist.world_size, "trainable_parameters": trainable,
                "parameters": total, "data": run.data_stats},
    }  # fmt: skip
    resume = None if ckpt_state is None else {**ckpt_state.get("trackers", {}), "step": ckpt_state["step"]}
    return Trackers(cfg.train.trackers(), run.output_dir, run_name=_run_name(run), config=config, resume_state=resume)


def _run_name(run: Run) -> str:
    """The run's name in the experiment trackers: train.run_name, or the output_dir's name."""
    return run.cfg.train.run_name or run.output_dir.resolve().name


def plan_steps(cfg: RunConfig, stream: Any, world_size: int) -> tuple[int, int]:
    """(the run's optimizer steps, the whole steps of an epoch) for the batches `stream` makes.
    `epochs` train on every micro-batch of that many passes: the stream runs on from one pass to
    the next, so an epoch's micro-batches need not fill whole steps, and the run takes as many
    steps as they fill, the last one finished with the next pass's first micro-batches (rounding
    down instead left up to grad_accum - 1 micro-batches an epoch untrained: with 20 micro-batches
    and grad_accum 12, 8 of them).

    Raises:
        UserError: the data makes fewer rows than one optimizer step takes.
    """
    per_epoch = stream.microbatches_per_epoch()
    steps_per_epoch = per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"one optimizer step needs batch_size x grad_accum x processes = "
            f"{cfg.train.batch_size * cfg.train.grad_accum * world_size} rows but the data makes "
            f"{stream.num_rows}; lower train.batch_size or train.grad_accum"
        )
    return cfg.train.max_steps or -(-per_epoch * cfg.train.epochs // cfg.train.grad_accum), steps_per_epoch


def is_due(every: Union[int, str], run: Run) -> bool:
    """Whether train.eval_every / save_every falls on the step just taken: every N steps, or
    ("epoch") the step whose micro-batches finish a pass over the data. An epoch need not end on
    a step (its micro-batches over grad_accum may leave a remainder, which the next epoch's first
    step takes in), so the step where the pass ends counts."""
    if every == "epoch":
        per_epoch, accum = run.stream.microbatches_per_epoch(), run.cfg.train.grad_accum
        return run.step * accum // per_epoch > (run.step - 1) * accum // per_epoch
    return bool(every) and run.step % every == 0


def add_adapters(model: nn.Module, cfg: RunConfig) -> None:
    """The adapter to train: new (cfg.lora), or the one training continues (cfg.adapter, whose config
    cfg.lora then is) with its weights. DPO, IPO and KTO then also get that adapter frozen, their reference
    (`lorakit.preference.REFERENCE_ADAPTER`, without dropout, so the reference is deterministic)."""
    if cfg.adapter is None:
        inject_adapter(model, cfg.lora)
        return
    from lorakit.adapters import apply_adapter, read_adapter

    files = read_adapter(cfg.adapter)
    apply_adapter(model, dataclasses.replace(files, config=cfg.lora), trainable=True)
    if cfg.train.objective in REFERENCE_OBJECTIVES:
        frozen = dataclasses.replace(files, config=dataclasses.replace(cfg.lora, dropout=0.0))
        apply_adapter(model, frozen, preference.REFERENCE_ADAPTER)


def tied_copies_note(model: nn.Module) -> Optional[str]:
    """What `modules_to_save` does to a model whose output head is its input embedding's weight: each
    entry trains a copy of its own, so the two no longer share one (said, as PEFT warns; lorakit has
    no `ensure_weight_tying` to train one copy for both). None where nothing is said."""
    config = getattr(model, "config", None)
    if not getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
        return None
    try:
        ends = {"input embedding": model.get_input_embeddings(), "output head": model.get_output_embeddings()}
    except (AttributeError, NotImplementedError):
        return None
    saved = {id(module) for _, module in saved_modules(model)}
    copied = [what for what, module in ends.items() if id(module) in saved]
    if not copied:
        return None
    if len(copied) == 2:
        return ("note: the model ties its output head to its input embedding; lora.modules_to_save trains a copy of "
                "each, apart, so they drift apart (a merge writes them untied)")  # fmt: skip
    other = next(what for what in ends if what not in copied)
    return (f"note: the model ties its output head to its input embedding, and lora.modules_to_save trains a copy of the "
            f"{copied[0]} alone: the {other} keeps the base's weights (new tokens learn nothing there); add it to "
            "modules_to_save to train both")  # fmt: skip


def no_eos_note(tokenizer: Any) -> Optional[str]:
    """A tokenizer without an end-of-text token: examples other than chats end with nothing to learn
    to stop at (a chat ends with its template's end of turn)."""
    if tokenizer.eos_token_id is not None:
        return None
    return ("note: the tokenizer has no eos_token, so completion, instruction and text examples end without one and the "
            "model does not learn where to stop; set eos_token in the model's tokenizer_config.json")  # fmt: skip


def serving_note(cfg: RunConfig) -> Optional[str]:
    """Per-module ranks or alphas, or rsLoRA: PEFT and lorakit apply them, servers do not (vLLM
    applies lora_alpha / r to every module, llama.cpp alpha / each tensor's rank without rsLoRA)."""
    what = [k for k, on in (("lora.rank_pattern", cfg.lora.rank_pattern), ("lora.alpha_pattern", cfg.lora.alpha_pattern),
                            ("lora.rslora", cfg.lora.rslora)) if on]  # fmt: skip
    # (an adapter that is no plain LoRA, which servers refuse and combine too, is no case for the note)
    plain = not (cfg.lora.dora or cfg.lora.modules_to_save or cfg.lora.init in PRINCIPAL_INITS or cfg.lora.target_parameters)
    if not what or not plain:
        return None
    adapter = Path(cfg.output_dir) / "adapter"
    return (f"note: {' and '.join(what)}: PEFT and lorakit apply the adapter as trained, vLLM and llama.cpp one scale "
            f"to every module (llama.cpp no rsLoRA); `lorakit combine --adapter {adapter} --out "
            f"{adapter.with_name('portable')}` writes it as they apply it")


def chat_template_source(cfg: RunConfig) -> Optional[str]:
    """The chat template a run renders chats with in place of the tokenizer's: data.chat_template,
    else the template of the adapter the run continues (its chat_template.jinja, which its own run
    wrote from data.chat_template), as generate, eval and merge use it with that adapter; None: the
    tokenizer's."""
    if cfg.data.chat_template is not None:
        return cfg.data.chat_template
    if cfg.adapter is not None and read_chat_template(cfg.adapter) is not None:  # (read: a folder there is refused)
        return str(Path(cfg.adapter) / CHAT_TEMPLATE_NAME)
    return None


def prepare_chat_template(tokenizer: Any, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Give `tokenizer` the run's chat template (`chat_template_source`) with the variables of
    data.chat_template_kwargs set in it.

    Raises:
        UserError: variables for a tokenizer without a chat template.
    """
    from lorakit.chat_templates import template_variables, template_with_variables

    if chat_template_source(cfg) is not None:
        use_chat_template(tokenizer, chat_template_source(cfg), log)
    variables = cfg.data.chat_template_kwargs
    if not variables:
        return
    if not tokenizer.chat_template:
        raise UserError(f"data.chat_template_kwargs = {variables}: the tokenizer has no chat template to give them to; "
                        "set data.chat_template (chatml, or a Jinja file)")  # fmt: skip
    if isinstance(tokenizer.chat_template, dict):
        raise UserError(
            f"data.chat_template_kwargs with a tokenizer of several chat templates ({', '.join(tokenizer.chat_template)}): "
            "the adapter keeps one template; set data.chat_template to a Jinja file of the one to train with"
        )
    unread = sorted(set(variables) - template_variables(tokenizer.chat_template))
    if unread:
        raise UserError(f"data.chat_template_kwargs.{unread[0]}: the chat template never reads {unread[0]!r}; check the "
                        "name against the template (enable_thinking for Qwen3's), or leave it out")  # fmt: skip
    tokenizer.chat_template = template_with_variables(tokenizer.chat_template, variables)


def use_chat_template(tokenizer: Any, value: str, log: Callable[[str], None]) -> None:
    """Give `tokenizer` the template `value` names (`chat_template_source`); say so where generation
    would not stop at its turns' end (not one token of the vocabulary: only EOS stops it then)."""
    from lorakit.chat_templates import CHAT_TEMPLATES, ChatRenderer, chat_template_text, compiled_template
    from lorakit.generate import stop_token_ids

    tokenizer.chat_template = chat_template_text(value)
    compiled_template(tokenizer.chat_template, source=None if value in CHAT_TEMPLATES else value)  # a file: FILE:LINE
    end = ChatRenderer(tokenizer).end_of_turn
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    if end == "":
        log("note         the chat template writes nothing after an assistant turn: no token is trained to end a reply, "
            "so the model will not learn to stop; end the assistant turns with {{ eos_token }}")  # fmt: skip
    elif end and not (len(ids) == 1 and ids[0] in stop_token_ids(tokenizer)):
        log(f"note         the chat template ends a turn with {end!r}, which is {len(ids)} tokens of this vocabulary, "
            "not a stop token: generation stops at EOS only; end the assistant turns with {{ eos_token }} to stop there")  # fmt: skip


def add_neftune(model: nn.Module, alpha: float, rank: int = 0) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al. 2023): while training, the input embeddings get uniform noise in
    [-m, m], m = alpha / sqrt(L·d) with L the micro-batch's row width (padded) and d the hidden
    size, as transformers' and TRL's `neftune_noise_alpha` add it (a packed row is one L, as in
    TRL's packed SFT). Eval and generation see clean embeddings.

    Each call draws one seed from torch's generator and the noise from a generator of its own,
    seeded with it and the process's `rank`: processes draw other noise for their rows, while
    torch's generator advances alike in all of them whatever their rows' shapes, so the state a
    checkpoint keeps resumes every process bit-exactly."""

    def noisy(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(device=output.device)
        generator.manual_seed(seed ^ (rank * 0x9E3779B97F4A7C15 % 2**62))
        bound = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound, generator=generator)

    return model.get_input_embeddings().register_forward_hook(noisy)


def data_config(cfg: RunConfig) -> DataConfig:
    """cfg.data, reading records as preference pairs under a preference objective (a record may hold
    chat messages beside its pair, as UltraFeedback's do, which `auto` reads as chat)."""
    if cfg.train.objective == "sft":
        return cfg.data
    pairs = "unpaired" if cfg.train.objective in UNPAIRED_OBJECTIVES else "preference"

    def files(value: Any) -> Any:  # the files of a list that set format: auto for themselves
        if isinstance(value, dict):
            return {name: files(v) for name, v in value.items()}
        if not isinstance(value, list):
            return value
        return [{**e, "format": pairs} if isinstance(e, dict) and e.get("format") == "auto" else e for e in value]

    data = cfg.data
    return dataclasses.replace(data, format=pairs if data.format == "auto" else data.format, train=files(data.train), eval=files(data.eval))


def check_resume_step(step: int, total_steps: int, checkpoint: Path) -> None:
    """A resume must start within the run: a checkpoint past its steps would end it behind them.

    Raises:
        UserError: the checkpoint's step is past `total_steps`.
    """
    if step > total_steps:
        raise UserError(
            f"--resume: the checkpoint {checkpoint} is at step {step}, past this run's {total_steps} steps "
            "(train.max_steps / epochs); resuming would end the run behind its own checkpoints, so raise "
            "train.max_steps or start a new output_dir"
        )


def check_token_ids(
    model: Optional[nn.Module], cfg: RunConfig, train_set: Any, eval_sets: dict[str, Any], *, rows: Optional[int] = None
) -> None:
    """Every token id of the data has a row in the model's input embeddings (a tokenizer of another
    model, or one with tokens added that the model was never resized for, gives ids past it); rows:
    the table's size where there is no model yet (config.json's vocab_size).

    Raises:
        UserError: an id past the embedding table, naming the data and the sizes.
    """
    if rows is None:
        try:
            rows = model.get_input_embeddings().num_embeddings
        except (NotImplementedError, AttributeError):  # custom code without the accessor: nothing to check against
            return
    if not isinstance(rows, int):
        return
    for where, data in [("data.train", train_set)] + [(eval_set_key(n), d) for n, d in eval_sets.items()]:
        top = int(data.input_ids.max()) if len(data.input_ids) else -1
        if top >= rows:
            raise UserError(
                f"{where}: the tokenizer gives token id {top}, but {cfg.model}'s embedding table has {rows} rows "
                f"(vocab_size); the tokenizer is not this model's, or it has tokens the model was never resized for: "
                "resize it first (transformers: model.resize_token_embeddings(len(tokenizer)), then save_pretrained) "
                "and train the new rows with lora.modules_to_save: [embed_tokens, lm_head]"
            )


def generation_eval_records(cfg: RunConfig, eval_sets: dict[str, Any], tokenizer: Any) -> dict[str, list[tuple[dict, Optional[str]]]]:
    """eval_generate's records of each eval set, as the data reads them (data.columns, or their
    file's own), each with the system prompt of its file (data.system_prompt, or the file's), checked
    before any step: every set needs a record with an answer to compare generations with, and the
    chat template must write the answers that call tools (`tool_call_answer`; records it fails on
    are left out under data.skip_invalid, as the eval set's loss leaves them out).

    Raises:
        UserError: a set whose records have no answer (text records), named with its files; FILE:LINE
            of an answer with tool calls the template does not write.
    """
    from lorakit.data_files import read_records
    from lorakit.records import BadRecord, rename_columns
    from lorakit.evaluate import prompt_and_answer, tool_call_answer

    records: dict[str, list[tuple[dict, Optional[str]]]] = {name: [] for name in eval_sets}
    for name, sources in eval_set_sources(cfg.data.eval).items():
        answers = 0
        files = [f for f, _ in sources]
        for f, options in sources:
            data = dataclasses.replace(cfg.data, **reading_options(options))  # the file's own options, as the data reads it
            columns, system_prompt = data.columns, data.system_prompt
            for line, record in read_records(f, skip_invalid=cfg.data.skip_invalid):
                try:
                    record = rename_columns(record, columns)
                except BadRecord:  # what tokenizing the eval set skipped (skip_invalid), this skips too
                    continue
                try:
                    case = prompt_and_answer(record, system_prompt)
                except UserError:  # an invalid record: the eval set's own reading reported or skipped it
                    records[name].append((record, system_prompt))
                    continue
                if case is not None and not isinstance(case[1], str):
                    try:
                        tool_call_answer(tokenizer, case[0], case[1])
                    except UserError as exc:
                        if cfg.data.skip_invalid:
                            continue
                        raise UserError(f"{f}:{line}: train.eval_generate: {exc}") from None
                records[name].append((record, system_prompt))
                answers += case is not None
        if not answers:
            raise UserError(
                f"train.eval_generate = true: {eval_set_key(name)} ({', '.join(files)}) has no record with an answer to compare "
                "generations with (text records have none); give it prompt/completion, instruction or chat records, "
                "or set train.eval_generate: false"
            )
    return records


def _check_objective(cfg: RunConfig, train_set, eval_sets: dict[str, Any]) -> None:
    """Preference pairs train with a preference objective, everything else with the next-token loss."""
    pairs, unpaired = cfg.train.objective != "sft", cfg.train.objective in UNPAIRED_OBJECTIVES
    named = config_eval_sets(cfg.data.eval)
    checked = [("data.train", train_set, data_files(cfg.data.train))]
    checked += [(eval_set_key(n), data, named.get(n) or data_files(cfg.data.train)) for n, data in eval_sets.items()]
    for key, data, files in checked:
        if data.pairs == pairs and (data.desirable is not None) == unpaired:
            continue
        where = ", ".join(files)
        if pairs:
            records = "labelled records (prompt, completion, label)" if unpaired else "preference records (prompt, chosen, rejected)"
            raise UserError(f"{where}: train.objective is {cfg.train.objective} but {key} holds no {records}; give it those")
        if data.desirable is not None:
            raise UserError(f"{where}: {key} holds labelled records (prompt, completion, label); set train.objective: kto")
        raise UserError(
            f"{where}: {key} holds preference records (prompt, chosen, rejected); set train.objective to dpo, "
            "ipo, simpo or orpo"
        )
    watched = cfg.train.save_best or cfg.train.early_stopping_patience
    parts = best_metric_parts(cfg.train.best_metric, eval_sets) if watched else None
    if parts is not None and parts[1] == "eval_reward_margin" and unpaired and parts[0] in eval_sets:
        classes = set(eval_sets[parts[0]].desirable.tolist())
        if len(classes) < 2:
            missing = "undesirable" if True in classes else "desirable"
            raise UserError(
                f"train.best_metric = {cfg.train.best_metric!r}: the eval set{' ' + repr(parts[0]) if parts[0] else ''} has no "
                f"{missing} example, so KTO's margin is undefined; watch the loss or the reward accuracy, or add such "
                "examples to the eval data"
            )


def check_positions(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Refuse rows longer than the model's position table, before the data is tokenized;
    say so when they are longer than the positions a rotary model was trained on.

    Raises:
        UserError: data.max_length above a position table's length (GPT-2's n_positions).
    """
    structure = meta_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if structure is None:  # a Hub name, custom code not trusted: the model's loader speaks for it
        return
    limit, table = position_limit(structure)
    if limit is None or cfg.data.max_length <= limit:
        return
    if table:
        raise UserError(
            f"data.max_length = {cfg.data.max_length} is longer than the {limit} positions of {cfg.model} (a table "
            f"with a row per position, config.json); set data.max_length: {limit} or less"
        )
    log(
        f"note: data.max_length = {cfg.data.max_length} is past the {limit} positions {cfg.model} was trained on "
        "(config.json); its positions are computed for any length, but examples longer than that are untrained ground"
    )


def dist_device(dist: Distributed) -> torch.device:
    device = pick_device()
    if device.type == "cuda" and dist.world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank)))
    return device


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    changed = [key for key in ("model", "adapter", "data", "lora", "quantize", "objective") if saved.get(key) != now.get(key)]
    if changed:
        details = []
        for key in changed:
            if isinstance(now.get(key), dict) and isinstance(saved.get(key), dict):
                sub = [k for k in dict.fromkeys([*now[key], *saved[key]]) if now[key].get(k) != saved[key].get(k)]
                details.append(f"{key} ({', '.join(key + '.' + s for s in sub)})" if sub else key)
            else:
                details.append(key)
        raise UserError(
            f"cannot resume from {checkpoint}: the {' and '.join(details)} changed since it was written; "
            "restore the original settings, or start a new run in another output_dir"
        )


def _restore(run: Run, checkpoint: Path, state: dict, optimizer_state: dict, rng_state: dict) -> str:
    """Restore the checkpoint into `run`; returns what of the optimiser's settings the config
    changes ("" if nothing; see `_keep_configured_rates`)."""
    from lorakit.adapters import copy_adapter_weights, read_adapter

    copy_adapter_weights(run.model, read_adapter(checkpoint / "adapter"), copy=_copy_into)
    configured = [(g["initial_lr"], g["weight_decay"]) for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(optimizer_state)
    if run.dist.world_size > 1:
        from lorakit.distributed import shard_optimizer_state

        shard_optimizer_state(run.optimizer)  # full tensors -> this rank's FSDP2 shards
    run.scheduler.load_state_dict(state["scheduler"])
    run.stream.load_state_dict(state["stream"])
    run.step = state["step"]
    restore_rng(rng_state)
    run.metrics.resume_from(run.step)
    trained = state.get("trained") or {}
    run.trained_before = (float(trained.get("seconds", 0.0)), int(trained.get("tokens", 0)))
    best = state.get("best")
    if best is not None and best.get("metric") == run.cfg.train.best_metric:  # another metric's best is no best
        run.best = best
    if run.dist.is_main:
        _restore_best_adapter(run, checkpoint, state)
    return _keep_configured_rates(run, configured)


def _restore_best_adapter(run: Run, checkpoint: Path, state: dict) -> None:
    """Put back best_adapter/ as it was at the checkpoint's step: the run that died after it may have
    written a better one since, which the resumed run may never reach (other settings), and whose
    step the restored best record no longer names. Checkpoints before lorakit kept it say nothing."""
    from lorakit.adapters import link_tree, replace_dir, staging_folder

    if "best_adapter_kept" not in state:
        return
    target = run.output_dir / BEST_ADAPTER_DIR
    if state["best_adapter_kept"]:
        staging = staging_folder(target)
        link_tree(checkpoint / BEST_ADAPTER_DIR, staging)
        replace_dir(staging, target)
    elif target.is_dir():  # written after the checkpoint, by the part of the run the resume replays
        shutil.rmtree(target)


def check_resume_optimizer(optimizer: str, optimizer_state: dict, checkpoint: Path) -> None:
    """Raises UserError when the checkpoint's optimizer state is another optimizer's than
    train.optimizer's (AdamW's moments are exp_avg / exp_avg_sq, 8-bit AdamW's state1 / state2):
    neither loads the other's, and the run would fail at its first step."""
    keys = {key for state in optimizer_state.get("state", {}).values() for key in state}
    saved = "adamw8bit" if "state1" in keys else "adamw" if "exp_avg" in keys else None
    if saved is not None and saved != optimizer:
        raise UserError(
            f"cannot resume from {checkpoint} with train.optimizer: {optimizer}: its optimizer state is {saved}'s; "
            f"resume with train.optimizer: {saved}, or start a new run in another output_dir"
        )


def _keep_configured_rates(run: Run, configured: list[tuple[float, float]]) -> str:
    """Loading the optimizer's and scheduler's states brings back the learning rates (train.lr, and
    lr_ratio_b's for the B matrices) and weight decay they were saved with, and the rate of the
    next step as the saved schedule set it, while the schedule's shape comes from the config: a run
    resumed with a lower train.lr, or a longer warmup, would go on at the old one, silently. The
    config's (initial lr, weight decay) per parameter group and its schedule hold instead (where
    nothing changed, the same numbers as the checkpoint's); returns what of the rates changed, for
    the log ("" if nothing)."""
    groups = run.optimizer.param_groups
    saved = [(g["initial_lr"], g["weight_decay"]) for g in groups]
    changed = []
    for what, i in (("learning rate", 0), ("weight decay", 1)):
        old, new = (", ".join(str(v[i]) for v in values) for values in (saved, configured))
        if old != new:
            changed.append(f"{what} {new} (was {old})")
    step = run.scheduler.last_epoch  # LambdaLR's own rate of this step: base_lr * lmbda(last_epoch)
    for group, (lr, decay), factor in zip(groups, configured, run.scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"], group["lr"] = lr, decay, lr * factor(step)
    run.scheduler.base_lrs = [lr for lr, _ in configured]
    run.scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
    return " and ".join(changed)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be an FSDP2 shard (DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value)


# --------------------------------------------------------------------------- the loop
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@contextlib.contextmanager
def _this_process_randomness(run: Run):
    """The step's random draws (LoRA and model dropout, NEFTune's noise) from torch's generator
    seeded for this process: a seed drawn from the shared generator, which advances alike in every
    process (so the state a checkpoint keeps resumes any number of them bit-exactly), mixed with
    the rank, so that each process draws its own masks for its rows (with one seed for all, every
    process dropped the same positions). The shared generator is put back after the step. One
    process draws from the shared generator itself."""
    if run.dist.world_size == 1:  # one process: its draws as they always were (the golden losses')
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,)))
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed ^ (run.dist.rank * 0x9E3779B97F4A7C15 % 2**62))
        yield


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns its (global) loss and grad norm."""
    cfg, dist = run.cfg, run.dist
    pairs = cfg.train.objective != "sft"
    micro = [run.stream.next() for _ in range(cfg.train.grad_accum)]
    # the loss is a mean over the step's trained tokens (sft) or its pairs (preference objectives)
    local_units = sum(b["num_pairs"] if pairs else b["num_trainable"] for b in micro)
    local = [local_units, sum(b["num_trainable"] for b in micro), sum(b["num_tokens"] for b in micro)]
    counts = dist.all_reduce_sum(torch.tensor([float(v) for v in local]))
    step_units, step_tokens, step_all_tokens = max(1.0, counts[0].item()), max(1.0, counts[1].item()), counts[2].item()
    # DDP and FSDP average gradients over ranks; scaling by world_size turns that average into the
    # sum that the token-exact (pair-exact) normalisation needs.
    scale = dist.world_size / step_units
    loss_sum = torch.zeros((), device=run.device)
    stats = torch.zeros(len(preference.STAT_NAMES), device=run.device) if pairs else None
    with _this_process_randomness(run):
        _forward_backward(run, micro, scale, pairs, loss_sum, stats)
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # the stop requests ride on the step's last all-reduce: every process stops after the same step
    asked = _stop_requests(run)
    if pairs:
        reduced = dist.all_reduce_sum(torch.cat([loss_sum.reshape(1), stats, asked]))
        extra = preference.step_metrics(reduced[0].item(), reduced[1:-len(asked)].cpu(), kto=cfg.train.objective == "kto")
        loss_value = extra.pop("loss")
    else:
        extra = {}
        reduced = dist.all_reduce_sum(torch.cat([loss_sum.reshape(1), asked]))
        loss_value = (reduced[0] / step_tokens).item()
    _agree_on_stop(run, reduced[-len(asked):])
    norm_value = float(grad_norm)
    if not math.isfinite(loss_value) or not math.isfinite(norm_value):
        run.optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        raise TrainingDiverged(
            f"{what} is {loss_value if what == 'loss' else norm_value} at step {run.step + 1}; stopped before updating "
            "the adapter. Lower train.lr, raise train.warmup_steps or check the data"
        )
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {
        "loss": loss_value, "grad_norm": norm_value, "lr": lr, "tokens": step_all_tokens, "trainable_tokens": step_tokens,
        **extra,
    }  # fmt: skip


def _forward_backward(
    run: Run, micro: list[dict], scale: float, pairs: bool, loss_sum: torch.Tensor, stats: Optional[torch.Tensor]
) -> None:
    """The step's micro-batches forward and backward, their gradients reduced with the last one;
    their losses (and preference statistics) added into `loss_sum` (`stats`)."""
    dist = run.dist
    for i, batch in enumerate(micro):
        batch = _to_device(batch, run.device)
        sync_ctx = dist.no_sync() if (dist.no_sync is not None and i < len(micro) - 1) else contextlib.nullcontext()
        with sync_ctx:
            inputs = [batch["input_ids"], batch["labels"], batch["position_ids"]]
            if pairs:
                kw = {"desirable": batch["desirable"]} if "desirable" in batch else {}  # KTO: each example's label
                if run.reference_logps is not None:  # train.precompute_reference: no reference forward here
                    kw["reference"] = run.reference_logps[batch["example_ids"]]
                batch_loss, batch_stats = run.train_model(*inputs, batch["sequence_ids"], **kw)
                stats += batch_stats
            else:
                batch_loss = run.train_model(*inputs)
            (batch_loss * scale).backward()
        loss_sum += batch_loss.detach().float()


def evaluate(run: Run) -> dict[str, float]:
    """eval_loss / eval_perplexity over the eval set (and eval_accuracy with eval_generate); for a
    preference objective its eval_loss, eval_reward_accuracy and the rewards."""
    # the training loss's kept logits buffers would otherwise sit beside eval's own logits
    for module in run.train_model.modules():
        if isinstance(module, TokenLoss):  # PreferenceLoss keeps its buffers in one too
            module.release()
    was_training = run.model.training
    try:
        return _evaluate(run)
    finally:
        run.model.train(was_training)


def _evaluate(run: Run) -> dict[str, float]:
    """Every eval set's figures, keyed by `lorakit.config.eval_key` (eval_loss; eval_<set>_loss)."""
    out: dict[str, float] = {}
    train = run.cfg.train
    for name, eval_set in run.eval_sets.items():
        if train.objective != "sft":
            # the training loss's chunking: none under FSDP2, whose root module must run every forward
            chunk = next(m.chunk_tokens for m in run.train_model.modules() if isinstance(m, TokenLoss))
            result = preference.evaluate_preference(
                run.model, eval_set, objective=train.objective, beta=train.preference_beta(), gamma=train.simpo_gamma,
                batch_size=train.batch_size, max_length=run.cfg.data.max_length, device=run.device, chunk_tokens=chunk,
                kto_weights=(train.kto_desirable_weight, train.kto_undesirable_weight),
            )  # fmt: skip
            out.update({eval_key(name, k): v for k, v in result.items()})
        else:
            from lorakit.evaluate import evaluate_loss

            result = evaluate_loss(
                run.model, eval_set, batch_size=run.cfg.train.batch_size, max_length=run.cfg.data.max_length,
                device=run.device,
            )  # fmt: skip
            out[eval_key(name, "loss")], out[eval_key(name, "perplexity")] = result["loss"], result["perplexity"]
        # Every rank evaluates the whole eval set: FSDP needs all ranks in every forward, and the
        # results are then identical everywhere without a gather.
        if run.eval_records is not None:
            from lorakit.evaluate import generation_accuracy

            records, system_prompts = zip(*run.eval_records[name])
            acc = generation_accuracy(
                run.model, run.tokenizer, records, max_new_tokens=run.cfg.train.eval_max_new_tokens,
                skip_invalid=run.cfg.data.skip_invalid, train_on_inputs=run.cfg.data.train_on_inputs,
                system_prompt=list(system_prompts),
            )
            out[eval_key(name, "accuracy")] = acc["accuracy"]
    return out


def _checkpoint(run: Run) -> Path:
    state = {
        "fingerprint": run.fingerprint,
        "scheduler": run.scheduler.state_dict(),
        "stream": run.stream.state_dict(),
        "total_steps": run.total_steps,
        "best": run.best,
        "trackers": run.metrics.trackers.state() if run.metrics.trackers is not None else {},
        "trained": {"seconds": run.trained_before[0] + time.perf_counter() - run.fit_started,
                    "tokens": run.trained_before[1] + run.tokens_seen},  # fmt: skip
    }
    optimizer_state = optimizer_state_dict(run)
    path = None
    if run.dist.is_main:
        # The best adapter as it is now: a run resumed here must find this one, not one a later
        # part of the run (lost to the resume) wrote over it.
        best = run.output_dir / BEST_ADAPTER_DIR
        folders = {BEST_ADAPTER_DIR: best} if run.best.get("saved") and best.is_dir() else {}
        state["best_adapter_kept"] = bool(folders)
        path = save_checkpoint(
            run.output_dir, run.step, model=run.model, optimizer_state=optimizer_state, state=state,
            keep=run.cfg.train.keep_checkpoints, **_base_fields(run.cfg), adapter_files=_template_files(run),
            folders=folders,
        )  # fmt: skip
    else:
        _join_adapter_gathers(run)
    run.dist.barrier()
    return path or run.output_dir / "checkpoints" / f"step-{run.step}"


def _template_files(run: Run) -> dict[str, str]:
    """The chat template data.chat_template (or the continued adapter) gave, for the adapter folder
    (inference and merge use it)."""
    kept = chat_template_source(run.cfg) is not None or run.cfg.data.chat_template_kwargs
    return {CHAT_TEMPLATE_NAME: run.tokenizer.chat_template} if kept else {}


def _join_adapter_gathers(run: Run) -> None:
    """On ranks other than 0, while rank 0 saves the adapter: take part in the all-gathers that
    build its full tensors from FSDP2 shards (the same calls, in the same order; no-op without FSDP2)."""
    if run.dist.world_size > 1:
        from lorakit.adapters import adapter_state_dict

        adapter_state_dict(run.model)


def optimizer_state_dict(run: Run) -> dict:
    """The optimizer state with full (unsharded) tensors, so any number of processes can resume it."""
    state = run.optimizer.state_dict()

    def full(v):
        if hasattr(v, "full_tensor"):
            return v.full_tensor().cpu()
        return v.cpu() if isinstance(v, torch.Tensor) else v

    return {"state": {k: {n: full(t) for n, t in s.items()} for k, s in state["state"].items()}, "param_groups": state["param_groups"]}


def fit(run: Run, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train to total_steps (or until early stopping) with logging, eval, checkpoints and plots;
    returns the final summary, which the experiment trackers also get before they are closed."""
    trackers = run.metrics.trackers
    if trackers is None:
        return _fit(run, log)
    try:
        summary = _fit(run, log)
    except BaseException:
        trackers.finish({}, failed=True)
        raise
    interrupted = "interrupted" in summary  # its checkpoint's stub is no summary; a resume writes the real one
    trackers.finish({} if interrupted else summary, failed=interrupted)
    return summary


def _fit(run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    cfg, dist = run.cfg, run.dist
    main = dist.is_main
    if main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.fit_started, run.tokens_seen = time.perf_counter(), 0
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    run.model.train()
    previous_handlers = _install_signal_handlers(run)
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not main, dynamic_ncols=True, unit="step", file=sys.stderr)
    window_tokens, window_time = 0.0, 0.0
    evaluated_at, stop_early = None, _patience_spent(run)
    try:
        logged = _eval_logged_here(run) if run.step > 0 else None  # (a checkpoint is saved after its step's eval)
        if stop_early:  # resumed from the checkpoint of the eval that ended the run: it ends there again
            evaluated_at, last_eval = run.step, logged if logged is not None else evaluate(run)
        elif logged is not None:  # resumed at an eval's step: the run's end does not run it again
            evaluated_at, last_eval = run.step, logged
        elif cfg.train.eval_on_start and run.step == 0:
            # the starting point of the eval curves; not a candidate for the best (its adapter trained nothing)
            start_eval = evaluate(run)
            if start_eval:
                run.metrics.log({"step": 0, **start_eval})
        while run.step < run.total_steps and not stop_early:
            step_start = time.perf_counter()
            result = train_step(run)
            # tokens/s counts training time only, not eval, checkpoints or plotting
            window_time += time.perf_counter() - step_start
            run.tokens_seen += int(result["tokens"])
            window_tokens += result["tokens"]
            last_train = result
            if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
                now = time.perf_counter()
                tps = window_tokens / max(1e-9, window_time)
                window_tokens, window_time = 0.0, 0.0
                entry = {
                    "step": run.step, "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                    "tokens_per_s": tps, "elapsed_s": now - run.fit_started + run.trained_before[0],
                    **{k: result[k] for k in preference.STEP_METRICS if k in result},
                }  # fmt: skip
                run.metrics.log(entry)
                shown = {"acc": f"{result['reward_accuracy']:.2f}"} if "reward_accuracy" in result else {}
                bar.set_postfix(loss=f"{result['loss']:.4f}", **shown, lr=f"{result['lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            if is_due(cfg.train.eval_every, run) and run.step < run.total_steps:
                last_eval = evaluate(run)
                evaluated_at = run.step
                if last_eval:
                    run.metrics.log({"step": run.step, **last_eval})
                stop_early = _after_eval(run, last_eval)
            if is_due(cfg.train.save_every, run) and run.step < run.total_steps:
                _checkpoint(run)
            if main and (run.step % max(cfg.train.log_every, 10) == 0):
                run.metrics.plot(_plot_title(run))
            if _stop_signal(run) is not None or stop_early:
                break
        bar.close()
        # The handlers stay on through the final eval and save: a stop that comes during the eval
        # checkpoints the run (the resume evaluates and saves), and one during the save lets it end.
        return _finish(run, log, last_train=last_train, last_eval=last_eval, evaluated_at=evaluated_at, stop_early=stop_early)
    finally:
        bar.close()
        _restore_signal_handlers(previous_handlers)


def _stopped(run: Run, log: Callable[[str], None], stop: int) -> dict[str, Any]:
    path = _checkpoint(run)
    log(f"{signal.Signals(stop).name}: stopped at step {run.step}; checkpoint saved to {path}; continue with --resume")
    return {"interrupted": stop, "step": run.step, "checkpoint": str(path)}


def _finish(
    run: Run, log: Callable[[str], None], *, last_train: dict[str, float], last_eval: dict[str, float],
    evaluated_at: Optional[int], stop_early: bool,
) -> dict[str, Any]:  # fmt: skip
    """After the last step (or a stop): the checkpoint of a stopped run, else the final eval, the
    summary and the adapter."""
    cfg, dist, main = run.cfg, run.dist, run.dist.is_main
    stop = _stop_signal(run)
    if stop is not None:
        return _stopped(run, log, stop)
    if stop_early:
        best, metric = run.best, cfg.train.best_metric
        if best["value"] is None:
            log(f"early stopping at step {run.step}: {metric} has been no finite number in {best['evals_since']} evals")
        else:
            log(f"early stopping at step {run.step}: {metric} has not bettered {best['value']:.4f} (step {best['step']}) "
                f"in {best['evals_since']} evals")  # fmt: skip
    if evaluated_at != run.step:  # an early stop comes right after its eval
        last_eval = evaluate(run)
        stop = _agreed_stop(run)
        if stop is not None:  # the eval is not logged: the resume runs it again
            return _stopped(run, log, stop)
        if last_eval:
            run.metrics.log({"step": run.step, **last_eval})
            _after_eval(run, last_eval)
    elapsed = time.perf_counter() - run.fit_started + run.trained_before[0]
    if not last_train:  # nothing trained in this process (resumed where early stopping ended the run)
        last_train = next((e for e in reversed(run.metrics.entries) if "loss" in e), {})
    summary = {
        "steps": run.step,
        "processes": run.dist.world_size,  # (the global batch is batch_size x grad_accum x processes)
        "time_s": elapsed,
        "tokens_per_s": (run.tokens_seen + run.trained_before[1]) / max(elapsed, 1e-9),  # tokens_seen already counts every rank
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "final_loss": last_train.get("loss"),
        **{f"final_{k}": last_train[k] for k in ("reward_accuracy", "reward_margin") if k in last_train},
        **last_eval,
        **({"eval_sets": list(run.eval_sets)} if any(run.eval_sets) else {}),  # named sets: their order
        **_best_summary(run, stop_early),
        "adapter": str(run.output_dir / "adapter"),
    }
    earlier = _earlier_summary(run) if run.tokens_seen == 0 else None
    if earlier is not None:  # its time and speed are the run's; this process only ended it again
        summary = earlier
    if main:
        from lorakit.adapters import save_adapter

        save_adapter(run.model, run.output_dir / "adapter", **_base_fields(cfg),
                     extra_files={"README.md": model_card(run, summary), **_template_files(run)})  # fmt: skip
        run.metrics.plot(_plot_title(run))
    else:
        _join_adapter_gathers(run)
    dist.barrier()
    return summary


def _earlier_summary(run: Run) -> Optional[dict[str, Any]]:
    """summary.json of the run when it was written at this step (a resume after its early stop)."""
    try:
        earlier = json.loads((run.output_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and earlier.get("steps") == run.step else None


def new_best_record(metric: str) -> dict[str, Any]:
    """Run.best before any eval (kept in checkpoints as it is, so JSON); `saved`: whether
    best_adapter/ holds the best's adapter (save_best was on when it was measured)."""
    return {"metric": metric, "value": None, "step": None, "evals_since": 0, "saved": False}


def _patience_spent(run: Run) -> bool:
    """Whether early stopping has ended the run: patience evals in a row without a better value."""
    patience = run.cfg.train.early_stopping_patience
    return bool(patience) and run.best["evals_since"] >= patience


def _eval_logged_here(run: Run) -> Optional[dict[str, float]]:
    """The eval logged at the current step (by the run a resume continues), else None."""
    for entry in reversed(run.metrics.entries):
        if entry.get("step") == run.step and any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k != "step"}
    return None


def _after_eval(run: Run, result: dict[str, float]) -> bool:
    """Follow train.best_metric over the evals (when save_best or early stopping asks): a better
    value becomes the best (save_best: its adapter is written to best_adapter/); True when early
    stopping should end the run. Every process sees the same eval figures, so they agree."""
    train = run.cfg.train
    if not (train.save_best or train.early_stopping_patience):
        return False
    metric = train.best_metric
    value = result.get(metric)
    if value is None:  # a KTO eval set with one class has no margin; setup refuses it, so this is a bug
        raise RuntimeError(f"the eval reported no {metric} (it reported {', '.join(result)})")
    best = run.best
    higher = BEST_METRICS[best_metric_parts(metric, run.eval_sets)[1]]
    better = math.isfinite(value) and (best["value"] is None or (value > best["value"] if higher else value < best["value"]))
    if better:
        best.update(value=value, step=run.step, evals_since=0, saved=train.save_best)
        if train.save_best:
            _save_best_adapter(run)
    else:
        best["evals_since"] += 1
    return _patience_spent(run)


def _save_best_adapter(run: Run) -> None:
    if run.dist.is_main:
        from lorakit.adapters import save_adapter

        card = model_card(run, {"step": run.step, run.best["metric"]: run.best["value"]})
        save_adapter(run.model, run.output_dir / BEST_ADAPTER_DIR, **_base_fields(run.cfg),
                     extra_files={"README.md": card, **_template_files(run)})  # fmt: skip
    else:
        _join_adapter_gathers(run)



def _best_summary(run: Run, stopped_early: bool) -> dict[str, Any]:
    """The summary's record of the best eval and early stopping (nothing when neither is on)."""
    train = run.cfg.train
    out: dict[str, Any] = {}
    if run.best["step"] is not None and (train.save_best or train.early_stopping_patience):
        out.update({"best_step": run.best["step"], f"best_{train.best_metric}": run.best["value"]})
    if train.early_stopping_patience:
        out["stopped_early"] = stopped_early
    if run.best.get("saved"):  # not when save_best was off as the best was measured (turned on at a resume)
        out["best_adapter"] = str(run.output_dir / BEST_ADAPTER_DIR)
    return out


def _plot_title(run: Run) -> str:
    model = Path(run.cfg.model)
    name = f"{model.parent.name}/{model.name}" if model.parent.name else model.name
    return f"{run.output_dir.name}: {name}, LoRA r={run.cfg.lora.r}"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


# the signals that stop a run cleanly, in the order of precedence when processes got different ones
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_signal(run: Run) -> Optional[int]:
    """The signal the run stops on after this step, if any: this process's own in one process (one that
    came during an eval or a checkpoint stops the run right after it), else the one every process
    agreed on in the step's all-reduce (one that came later stops them all after the next step)."""
    return run.interrupted if run.dist.world_size == 1 else run.stopping


def _stop_requests(run: Run) -> torch.Tensor:
    """This process's stop request, one count per signal of _STOP_SIGNALS, to sum over processes."""
    return torch.tensor([float(run.interrupted == sig) for sig in _STOP_SIGNALS], device=run.device)


def _agree_on_stop(run: Run, summed: torch.Tensor) -> None:
    """run.stopping from the stop requests summed over the processes: the first signal any asked for."""
    run.stopping = next((sig for sig, n in zip(_STOP_SIGNALS, summed.tolist()) if n > 0), None)


def _agreed_stop(run: Run) -> Optional[int]:
    """The stop signal every process agrees on outside a step (after the final eval), else None."""
    if run.dist.world_size == 1:
        return run.interrupted
    _agree_on_stop(run, run.dist.all_reduce_sum(_stop_requests(run)))
    return run.stopping


def _install_signal_handlers(run: Run) -> dict:
    """SIGINT / SIGTERM finish the current step, save a checkpoint and stop cleanly."""
    previous = {}

    def handler(signum, frame):
        if run.stopping is not None:
            # every process has agreed to stop after this step: torchrun stops the others with a
            # SIGTERM once one has exited, which must not cut this one's checkpoint or last line short
            return
        if run.interrupted is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        run.interrupted = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


def _base_fields(cfg: RunConfig) -> dict[str, Optional[str]]:
    """save_adapter's base_model_name_or_path and revision for the run's base (`base_reference`)."""
    base = base_reference(cfg.model)
    return {"base_model_name_or_path": base.name, "revision": base.revision}


def model_card(run: Run, summary: dict[str, Any]) -> str:
    cfg = run.cfg
    trainable, total = _parameter_counts(run.model)
    metrics = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items() if k != "adapter")
    base = base_reference(cfg.model)
    # a hub checks base_model as a repository id: a local folder is named in the text alone
    meta = {"library_name": "peft", **({"base_model": base.name} if base.on_hub else {}), "tags": ["lora", "lorakit"]}
    meta = yaml.safe_dump(meta, sort_keys=False)
    return f"""---
{meta}---
# LoRA adapter trained with lorakit

- Base model: `{base.name}`{f' (revision {base.revision})' if base.revision else ''}{' (NF4 4-bit during training)' if cfg.quantize == 'nf4' else ''}
- Training data: {', '.join(f'`{f}`' for f in data_files(cfg.data.train))} ({_examples(run.data_stats)}, {run.data_stats.get('tokens', '?')} tokens){_objective_line(cfg)}
- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets={cfg.lora.targets}, dropout={cfg.lora.dropout}{f', continuing the adapter `{cfg.adapter}`' if cfg.adapter else ''}
- Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)
- Steps: {run.step}, batch {cfg.train.batch_size} x accum {cfg.train.grad_accum} x processes {run.dist.world_size}, lr {cfg.train.lr}

| metric | value |
| --- | --- |
{metrics}

Load with lorakit (`lorakit generate --model BASE --adapter THIS_FOLDER ...`) or with PEFT
(`PeftModel.from_pretrained(base_model, "THIS_FOLDER")`).

## Full config
```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```
"""


def adapted_summary(model) -> str:
    """"196 layers" or, with MoE expert weights adapted, "96 layers and 48 expert modules"."""
    experts = sum(isinstance(layer, LoraExperts) for _, layer in lora_layers(model))
    linear = sum(1 for _ in lora_layers(model)) - experts
    if not experts:
        return f"{linear} layers"
    return (f"{linear} layers and " if linear else "") + f"{experts} expert modules"


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, without the frozen copy of the adapter a DPO run continues."""
    trainable, total = count_parameters(model)
    return trainable, total - preference.reference_parameters(model)


def _processes_line(run: Run) -> str:
    """How the processes hold the frozen model, e.g. "2 (fsdp); each holds 1.20 MiB of the 2.39 MiB of
    frozen weights (its shards; during a step also the embeddings, norm and head whole, 0.40 MiB,
    and one block at a time)"."""
    from lorakit.distributed import frozen_bytes_held, frozen_bytes_outside_blocks

    held, whole = frozen_bytes_held(run.model)
    how = "a whole copy"
    if run.cfg.train.distributed == "fsdp":
        outside = byte_size(frozen_bytes_outside_blocks(run.model))
        how = f"its shards; during a step also the embeddings, norm and head whole, {outside}, and one block at a time"
    return f"{run.dist.world_size} ({run.cfg.train.distributed}); each holds {byte_size(held)} of the {byte_size(whole)} of frozen weights ({how})"


def _class_name(model: nn.Module) -> str:
    """The model's class, not the subclass FSDP2's fully_shard swaps in (FSDPLlamaForCausalLM)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c.__name__ for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def start_summary(run: Run) -> str:
    trainable, total = _parameter_counts(run.model)
    s = run.data_stats
    lines = [
        f"model        {run.cfg.model} ({_class_name(run.model)}, {total:,} params)",
        f"adapters     LoRA r={run.cfg.lora.r} alpha={run.cfg.lora.alpha} on {adapted_summary(run.model)}; "
        f"trainable {trainable:,} ({100 * trainable / max(total, 1):.3f}%)"
        + (f"; continues {run.cfg.adapter}" if run.cfg.adapter is not None else ""),
        f"precision    {str(run.dtype).replace('torch.', '')} compute on {run.device}; {run.frozen_summary}",
        f"data         {_examples(s)}, {s.get('tokens'):,} tokens ({s.get('trainable_tokens'):,} trained); "
        f"{_dropped(s)}, {_skipped(s.get('skipped_invalid', 0), s.get('skipped_at', []))}",
        f"plan         {run.total_steps} steps x {run.cfg.train.batch_size * run.cfg.train.grad_accum * run.dist.world_size} rows "
        f"of <= {run.stream.max_length} tokens{' (pairs)' if run.stream.pairs else ''}; output {run.output_dir}",
    ]
    if run.eval_sets:
        lines.insert(4, f"eval         {eval_sets_line(run.eval_sets, run.cfg, resumed=run.step > 0)}")
    note = empty_replies_note(s.get("empty_replies", 0), s.get("first_empty_reply", ""))
    if note:
        lines.insert(4, note)  # under the data line (above eval's)
    if run.dist.world_size > 1:
        lines.append(f"processes    {_processes_line(run)}")
    if run.cfg.train.trackers():
        lines.append(f"tracking     {_tracking_line(run)}")
    if run.cfg.train.objective != "sft":
        lines.insert(2, f"objective   {_objective_line(run.cfg)[1:]}")
    untouched = _unadapted_experts(run.model)
    if untouched:
        lines.insert(2, f"note         the MoE experts are not adapted (their 3-D weights are no linear layers): "
                        f"lora.target_parameters: [{', '.join(untouched)}] adapts them")  # fmt: skip
    return "\n".join(lines)


def eval_sets_line(eval_sets: dict[str, Any], cfg: RunConfig, *, resumed: bool = False) -> str:
    """"4 examples; every 2 steps" or, for named sets, "gsm8k 4 examples, chat 8 examples; every 2 steps"."""
    sets = ", ".join(
        f"{name + ' ' if name else ''}{_examples(dataclasses.asdict(data.stats))}"
        # (a held-out eval_fraction's skipped records are the train files', counted on the data line)
        + (f" ({_skipped(data.stats.skipped_invalid, data.skipped_places())})" if data.stats.skipped_invalid and cfg.data.eval else "")
        for name, data in eval_sets.items()
    )  # fmt: skip
    return sets + _eval_plan(cfg, resumed=resumed)


def _eval_plan(cfg: RunConfig, *, resumed: bool = False) -> str:
    """"; every 50 steps, the best eval_loss kept in best_adapter/, early stopping after 3 evals
    without a better one" (what the eval line adds when evals run during the run; a resumed run
    has had its eval before the first step)."""
    train = cfg.train
    on_start = train.eval_on_start and not resumed
    if not train.eval_every:
        return "; before the first step and at the end" if on_start else ""
    every = "at each epoch's end" if train.eval_every == "epoch" else f"every {train.eval_every} steps"
    parts = (["before the first step"] if on_start else []) + [every]
    if train.save_best:
        parts.append(f"the best {train.best_metric} kept in {BEST_ADAPTER_DIR}/")
    if train.early_stopping_patience:
        evals = "eval" if train.early_stopping_patience == 1 else f"{train.early_stopping_patience} evals"
        parts.append(f"early stopping after {evals} without a better {train.best_metric}")
    return "; " + ", ".join(parts)


def _tracking_line(run: Run) -> str:
    """"tensorboard (runs/x/tensorboard), wandb (project lorakit, run x)"."""
    from lorakit.tracking import TENSORBOARD_DIR, wandb_project

    out = []
    for name in run.cfg.train.trackers():
        if name == "tensorboard":
            out.append(f"tensorboard ({run.output_dir / TENSORBOARD_DIR})")
        else:
            out.append(f"wandb (project {wandb_project()}, run {_run_name(run)})")
    return ", ".join(out)


def _objective_line(cfg: RunConfig) -> str:
    """"; DPO, beta 0.1; reference: ..." for a preference objective, "" for sft."""
    train = cfg.train
    if train.objective == "sft":
        return ""
    extra = f", gamma {train.simpo_gamma}" if train.objective == "simpo" else ""
    if train.objective == "kto":
        extra = f", weights {train.kto_desirable_weight} (desirable) / {train.kto_undesirable_weight} (undesirable)"
    # what the reference costs: one more forward a micro-batch, or one pass before the first step
    cost = "precomputed in one pass before the first step" if train.precompute_reference else "one more forward a micro-batch"
    if train.objective not in REFERENCE_OBJECTIVES:
        reference = "no reference model"
    elif cfg.adapter is not None:
        reference = f"reference: the starting adapter {cfg.adapter} (frozen), {cost}"
    else:
        reference = f"reference: the base (adapter off), {cost}"
    return f"; {train.objective.upper()}, beta {train.preference_beta()}{extra}; {reference}"


def _examples(stats: dict) -> str:
    """"120 examples" or, for preference data, "60 pairs (120 answers)"."""
    if stats.get("unpaired"):
        n, good = stats["pairs"], stats.get("desirable", 0)
        return f"{n} labelled examples ({good} desirable, {n - good} undesirable; each with its KL example)"
    if stats.get("pairs"):
        return f"{stats['pairs']} pairs ({stats['examples']} answers)"
    return f"{stats.get('examples')} examples"


def empty_replies_note(count: int, first_place: str) -> Optional[str]:
    """The note under the data line when `count` chat records train an assistant turn that says
    nothing (`DataStats.empty_replies`; `first_place`: FILE:LINE of the first); None for none."""
    if not count:
        return None
    first = f" (first: {first_place})" if first_place else ""
    return (f"note         {count} chat record{'s train' if count > 1 else ' trains'} an empty assistant reply{first}, "
            'which teaches only its end of turn; give it text, mark it "weight": 0, or remove the record')  # fmt: skip


def _skipped(count: int, places: list[str]) -> str:
    """"skipped 0", or "skipped 12 (a.jsonl:2, b.jsonl:5, ...)": the first places of the invalid
    records skip_invalid skipped."""
    if not count or not places:
        return f"skipped {count}"
    return f"skipped {count} ({', '.join(places)}{', ...' if count > len(places) else ''})"


def _dropped(stats: dict) -> str:
    """"truncated 3, dropped 1 (1 longer than max_length)" or, for preference data (a pair is
    dropped whole, both answers counted in the stats), "truncated 3 answers, dropped 1 pair (2
    answers with no token to train within max_length)"."""
    truncated, too_long, untrainable = stats.get("truncated"), stats.get("dropped_too_long", 0), stats.get("dropped_no_trainable", 0)
    dropped = too_long + untrainable
    answers = " answers" if stats.get("pairs") else ""
    reasons = [f"{too_long}{answers} longer than max_length"] if too_long else []
    reasons += [f"{untrainable}{answers} with no token to train within max_length"] if untrainable else []
    why = f" ({', '.join(reasons)})" if reasons else ""
    if not stats.get("pairs"):
        return f"truncated {truncated}, dropped {dropped}{why}"
    unit = "labelled example" if stats.get("unpaired") else "pair"
    return f"truncated {truncated} answers, dropped {dropped // 2} {unit}{'' if dropped // 2 == 1 else 's'}{why}"


def _unadapted_experts(model) -> list[str]:
    """`mlp.experts.gate_up_proj`-style names of the expert weights of MoE experts modules no adapter touches."""
    from lorakit.experts import expert_parameter_names, is_experts_module

    if any(isinstance(m, LoraExperts) for m in model.modules()):
        return []  # experts are targeted (maybe on some layers only, as the config asks)
    names = []
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        short = ".".join(path.split(".")[-2:])
        names += [f"{short}.{p}" for p in expert_parameter_names(module)]
    return list(dict.fromkeys(names))


def final_summary(summary: dict[str, Any]) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['time_s']:.1f}s, {summary['tokens_per_s']:,.0f} tokens/s, "
             f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"]  # fmt: skip
    if summary.get("final_loss") is not None:
        parts.append(f"final train loss {summary['final_loss']:.4f}")
    for name in summary.get("eval_sets", [""]):
        label, key = f"eval{' ' + name if name else ''}", functools.partial(eval_key, name)
        if key("perplexity") in summary:
            parts.append(f"{label} loss {summary[key('loss')]:.4f} (perplexity {summary[key('perplexity')]:.2f})")
        elif key("reward_accuracy") in summary:
            margin = f", margin {summary[key('reward_margin')]:.3f}" if key("reward_margin") in summary else ""
            parts.append(f"{label} loss {summary[key('loss')]:.4f}, reward accuracy {100 * summary[key('reward_accuracy')]:.1f}%{margin}")
        if key("accuracy") in summary:
            parts.append(f"{label} accuracy {100 * summary[key('accuracy')]:.1f}%")
    parts.append(f"adapter: {summary['adapter']}")
    if "best_step" in summary:
        metric = next(k[len("best_"):] for k in summary if k.startswith("best_eval_"))
        where = f" -> {summary['best_adapter']}" if "best_adapter" in summary else ""
        parts.append(f"best {metric}: {summary['best_' + metric]:.4f} at step {summary['best_step']}{where}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- command
def train_command(args: argparse.Namespace) -> int:
    try:
        return _train_command(args)
    except UserError as exc:
        if args.config is not None and "=" not in str(args.config) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            # a problem the model or the data found with a config key: where in the file it was given
            exc.args = (locate_problem(exc.args[0], args.config, parse_overrides(args.overrides)),)
        raise


def _train_command(args: argparse.Namespace) -> int:
    if getattr(args, "show_examples", 0) and not getattr(args, "dry_run", False):
        raise UserError("--show-examples goes with --dry-run: lorakit train CONFIG.yaml --dry-run --show-examples N")
    if getattr(args, "dry_run", False):
        from lorakit.dry_run import dry_run

        if args.nproc is not None and args.nproc < 1:
            raise UserError(f"--nproc {args.nproc}: the number of processes must be >= 1")
        if args.nproc and (args.config is None or "=" in str(args.config)):
            raise UserError("--nproc needs a YAML config (lorakit train CONFIG.yaml --nproc N); the demo runs in one process")
        if args.show_examples < 0:
            raise UserError(f"--show-examples {args.show_examples}: give how many examples to print (>= 0)")
        return dry_run(_command_config(args), resume=args.resume, processes=args.nproc or 1, show_examples=args.show_examples)
    if args.nproc is not None:  # --nproc 0 too: refused there, not taken for one process
        from lorakit.distributed import launch_torchrun

        return launch_torchrun(args)
    if args.config is None or "=" in str(args.config):
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        from lorakit.demo.run import run_demo

        return run_demo(parse_overrides(overrides), resume=args.resume)
    cfg = load_run_config(args.config, parse_overrides(args.overrides))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from lorakit.distributed import run_distributed

        return run_distributed(cfg, resume=args.resume)
    return run_training(cfg, resume=args.resume)


def _command_config(args: argparse.Namespace) -> RunConfig:
    """The run config `lorakit train` was given: the YAML file with its overrides, or the demo's."""
    if args.config is None or "=" in str(args.config):
        from lorakit.demo.run import demo_config

        return demo_config(parse_overrides(([args.config] if args.config else []) + list(args.overrides)))
    return load_run_config(args.config, parse_overrides(args.overrides))


def _after_divergence(run: Run, dist: Distributed) -> str:
    """Where a diverged run goes on from. The adapter of step `run.step` gave the non-finite value
    on the next batch, so a resume from its checkpoint would rerun that batch on the same weights
    and stop again whatever the learning rate: the main process sets that checkpoint aside, so that
    --resume takes the one before it."""
    had = (run.output_dir / "checkpoints" / f"step-{run.step}").is_dir()
    dist.barrier()  # every process has looked before the main one moves it
    if dist.is_main and had:
        set_aside_checkpoint(run.output_dir, run.step)
    dist.barrier()
    last = latest_checkpoint(run.output_dir)
    where = f"--resume continues from {last}" if last else "no earlier checkpoint: start again"
    aside = run.output_dir / "checkpoints" / f"diverged-step-{run.step}"
    return where + (f" (the checkpoint of step {run.step}, whose adapter gave it, is set aside as {aside})" if had else "")


def run_training(cfg: RunConfig, *, resume: bool = False, dist: Optional[Distributed] = None) -> int:
    """setup -> summary -> fit -> summary; exit code 0, or 128+signal when interrupted."""
    dist = dist or Distributed()
    log = print if dist.is_main else (lambda *_: None)
    run = setup(cfg, resume=resume, dist=dist, log=log)
    try:
        log(start_summary(run))
        try:
            summary = fit(run, log=log)
        except TrainingDiverged as exc:
            print(f"error: {exc}; {_after_divergence(run, dist)}", file=sys.stderr)
            return 1
        if "interrupted" in summary:
            return 128 + summary["interrupted"]
        log(final_summary(summary))
        if dist.is_main:
            write_text_atomic(run.output_dir / "summary.json", json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n")
        return 0
    finally:
        run.close()
