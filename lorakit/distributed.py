"""`lorakit train` across processes: torchrun, process groups, DDP and FSDP2.

The single-device loop in lorakit.train runs unchanged in every process. This module only adds
what differs: launching (`launch_torchrun`), the process group and the `Distributed` handle the
loop talks to (`run_distributed`), and wrapping the model (`wrap_model`). The data stream shards
itself by rank (lorakit.batching.BatchStream) and the loop lets only rank 0 write files.

    torchrun --nproc_per_node N -m lorakit train CONFIG.yaml      # any torchrun options (multi-node)
    lorakit train CONFIG.yaml --nproc N                            # shortcut: torchrun --standalone

`train.distributed` picks how the model is spread over the processes:
    ddp   every process holds the whole frozen base; adapter gradients are all-reduced (DDP).
    fsdp  FSDP2 (`fully_shard`) per transformer block, then the root: the frozen base (4-bit
          too, with `quantize: nf4`) and the adapters are sharded, each block gathered only
          while it runs.
    auto  see `resolve_strategy`.

Environment:
    LORAKIT_DIST_TIMEOUT_S   seconds a collective may wait for the other ranks (default 300); a
                             rank that dies or hangs ends the job after at most this long.
    LORAKIT_TEST_FAIL_RANK   test hook: the process with this rank raises at the first optimizer
                             step, to check that the whole job then stops with an error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from lorakit import preference
from lorakit.config import RunConfig
from lorakit.errors import UserError, disk_full
from lorakit.loss import LOSS_CHUNK_TOKENS
from lorakit.preference import loss_module

DEFAULT_TIMEOUT_S = 300.0
# `--nproc`: a stopping job's workers get this many collective timeouts to finish their step and
# checkpoint before torchrun's agent kills them (its default, 30 s, is less than one step of a 7B
# model on CPU)
STOP_WAIT_FACTOR = 2
# auto picks FSDP on GPUs when the frozen weights take more than this share of one GPU's memory;
# the rest is left for activations, adapters, optimizer state and the allocator.
FSDP_MEMORY_SHARE = 0.5


# --------------------------------------------------------------------------- launching
def launch_torchrun(args: argparse.Namespace) -> int:
    """`lorakit train CONFIG --nproc N`: torchrun with N processes on this machine, run in this process
    (torch.distributed.run); the job's exit code.

    torchrun's agent runs here and starts each worker in a session of its own, so Ctrl-C at the
    terminal (SIGINT) and a SIGTERM to this command reach the agent alone; it sends the signal on to
    every worker at once and waits for them, and they stop after the same step with a checkpoint
    (lorakit.train: the processes agree on the step). The command then exits 128 + the signal, and 2
    when the workers stopped on a user error (printed once: `run_distributed`), without torchrun's
    tracebacks. The checks that need no process group run here first.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from lorakit.config import load_run_config, parse_overrides
    from lorakit.train import check_output_dir

    nproc = args.nproc
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: the number of processes must be >= 1")
    if args.config is None or "=" in str(args.config):
        raise UserError("--nproc needs a YAML config (lorakit train CONFIG.yaml --nproc N); the demo runs in one process")
    cfg = load_run_config(args.config, parse_overrides(args.overrides))
    # as on a CPU: `auto` on GPUs reads a GPU's memory, which would give this process a CUDA context
    # for the whole run; the workers check that choice themselves
    resolve_strategy(cfg, "cpu")
    check_output_dir(Path(cfg.output_dir), args.resume)
    # how long the agent waits for stopping workers before it kills them: a step and a checkpoint
    # (an environment variable, not --shutdown-timeout: torch releases before pytorch/pytorch#172596,
    # early 2026, have neither and would refuse the flag; they keep their 30 s)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(STOP_WAIT_FACTOR * _timeout_s())))
    torchrun_args = ["--standalone", "--nproc_per_node", str(nproc), "-m", "lorakit", "train", str(args.config),
                     *args.overrides, *(["--resume"] if args.resume else [])]  # fmt: skip
    # the agent's log lines (a signal passed on, a worker's exit code) say again what lorakit says
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(torchrun_args))
    except SignalException as exc:  # passed on to the workers, which saved a checkpoint and stopped
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        # the first process to fail decides (the agent then stops the others, which fail after it)
        rank, failure = exc.get_first_failure()
        if failure.exitcode == 2 or failure.exitcode > 128:  # a user error, printed, or a signal's clean stop
            return failure.exitcode
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"failed with exit code {failure.exitcode}")  # fmt: skip
        print(f"error: process {rank} of {nproc} {how} (its output is above)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- choosing a strategy
def resolve_strategy(cfg: RunConfig, device_type: str) -> str:
    """"ddp" or "fsdp" for `train.distributed`, checked before any model is loaded.

    auto: DDP, except on GPUs when the frozen base (with `quantize: nf4` its 4-bit size) takes
    more than half of one GPU's memory: then FSDP2, so each GPU holds only its share of it.

    Raises:
        UserError: FSDP2 with `train.optimizer: adamw8bit`.
    """
    choice = cfg.train.distributed
    if choice == "auto":
        choice = "ddp"
        if device_type == "cuda":
            weights = _weights_bytes(cfg)
            gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            choice = "fsdp" if weights is not None and weights > FSDP_MEMORY_SHARE * gpu else "ddp"
    if choice == "fsdp" and cfg.train.optimizer == "adamw8bit":
        # Checked: bitsandbytes' update kernel has no DTensor sharding rule, so the first step fails.
        raise UserError(
            "train.optimizer: adamw8bit does not run on FSDP2's sharded adapter (bitsandbytes' 8-bit update takes "
            "plain tensors); use train.optimizer: adamw (an adapter's AdamW state is small), or train.distributed: ddp"
            + (" (chosen by auto for this model's size)" if cfg.train.distributed == "auto" else "")
        )
    return choice


def _weights_bytes(cfg: RunConfig) -> Optional[int]:
    """What the frozen base of a local model folder takes (None for a Hub name): its safetensors
    files' size, or with `quantize: nf4` the 4-bit model's (the quantized layers in NF4, the rest in
    the run's precision), from config.json without reading a weight."""
    folder = Path(cfg.model or "")
    if not folder.is_dir():
        return None
    if cfg.quantize != "nf4":
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    from lorakit.models import meta_model, resolve_precision
    from lorakit.quant import frozen_bytes_estimate

    model = meta_model(str(folder), trust_remote_code=cfg.trust_remote_code)
    if model is None:
        return None
    return frozen_bytes_estimate(model, resolve_precision(cfg.train.precision, torch.device("cuda")), nf4=True)


# --------------------------------------------------------------------------- running one rank
@record  # torchrun's failure summary then shows this rank's traceback (user errors excepted: below)
def run_distributed(cfg: RunConfig, *, resume: bool = False) -> NoReturn:
    """One torchrun worker: join the process group, train with the shared loop, exit with its code.

    Reads RANK, WORLD_SIZE and LOCAL_RANK from torchrun. A rank that raises exits non-zero;
    torchrun then stops the others, and collectives time out after LORAKIT_DIST_TIMEOUT_S. A user
    error exits 2 with its one line, printed once however many processes met it, and no traceback.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    try:
        code = _train_this_rank(cfg, resume, local_rank)
    except (UserError, OSError) as exc:  # caught before @record, which would hand torchrun its traceback
        error = exc if isinstance(exc, UserError) else disk_full(exc)
        if error is None:
            raise
        if _first_to_report(str(error)):
            print(f"error: {error}", file=sys.stderr)
        _exit_skipping_native_teardown(2)
    # Only after success: tearing down a group whose peers died can block; exiting is enough then.
    tdist.destroy_process_group()
    _exit_skipping_native_teardown(code)


def _first_to_report(message: str) -> bool:
    """Whether this process prints its user error: the first of the job's processes to meet one does,
    and a later one only when its message differs (the processes read the same config and files, so
    they usually fail alike). They agree through the job's key-value store (torchrun's, at
    MASTER_ADDR:MASTER_PORT); without one reachable, every process prints its own."""
    try:
        store = tdist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=5)
        )
        if store.add("lorakit/user_errors", 1) == 1:
            store.set("lorakit/user_error", message)
            return True
        store.wait(["lorakit/user_error"])
        return store.get("lorakit/user_error").decode() != message
    except Exception:  # no store, or the first process gone before it wrote its message
        return True


def _train_this_rank(cfg: RunConfig, resume: bool, local_rank: int) -> int:
    """This process's part of the run: its process group, its `Distributed` handle, the shared loop."""
    from lorakit.train import Distributed, run_training

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    strategy = resolve_strategy(cfg, "cuda" if cuda else "cpu")
    # config.yaml then records what ran, not "auto"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, distributed=strategy))
    timeout_s = _timeout_s()
    if cuda:
        torch.cuda.set_device(local_rank)
    comm_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(comm_device, copy=True)  # NCCL reduces device tensors only
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(t.device)

    def barrier() -> None:
        tdist.barrier(device_ids=[local_rank]) if cuda else tdist.barrier()

    fail_rank = os.environ.get("LORAKIT_TEST_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) == rank:
        all_reduce_sum = _fail_on_first_call(rank)  # train_step's first collective

    dist = Distributed(
        rank=rank, world_size=world_size, all_reduce_sum=all_reduce_sum, barrier=barrier,
        # FSDP2 on GPUs: load on the CPU, fully_shard then moves one block at a time to the GPU.
        load_device=torch.device("cpu") if (cuda and strategy == "fsdp") else None,
    )  # fmt: skip
    return run_training(cfg, resume=resume, dist=dist)


def _exit_skipping_native_teardown(code: int) -> NoReturn:
    """End a worker whose run is over and written: Python's exit handlers run (trackers, logging),
    then the process exits without the interpreter's teardown. With torch 2.13 on gloo that teardown
    aborted about one worker exit in 15 on CPU ("terminate called without an active exception",
    after every atexit handler had run), failing a finished job.

    A stop signal from here on (torchrun stops the other workers once one has exited) ends the
    process as the default action does: a handler's SystemExit raised inside an exit handler would
    be printed with a traceback as "ignored" and the exit would go on regardless."""
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_DFL)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _timeout_s() -> float:
    raw = os.environ.get("LORAKIT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"LORAKIT_DIST_TIMEOUT_S={raw!r}: must be a positive number of seconds, e.g. 300")
    return value


def _fail_on_first_call(rank: int):
    def fail(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"LORAKIT_TEST_FAIL_RANK={rank}: rank {rank} fails at the first step (test hook)")

    return fail


# --------------------------------------------------------------------------- wrapping the model
class _Forward(nn.Module):
    """What the loop calls: the wrapped model's forward, with the model's config beside it.

    The loss (lorakit.loss) reads `config` (logit softcapping) and, for a bare model, runs the body
    and the output head separately; through this wrapper it always calls the whole model, so DDP's
    and FSDP2's root hooks run on every forward.
    """

    def __init__(self, module: nn.Module, config) -> None:
        super().__init__()
        self.module = module
        self.config = config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap_model(model: nn.Module, cfg: RunConfig, dist, device: torch.device) -> nn.Module:
    """The model the loop runs forward on: DDP, or FSDP2 applied in place to `model`.

    Sets `dist.no_sync` (skip the gradient reduction of all but the last micro-batch of a step).
    Both average gradients over ranks, which train_step's loss scale of world_size / global tokens
    turns into the token-exact sum.
    """
    strategy = resolve_strategy(cfg, device.type)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP reduces only parameters that require grad: the frozen base is never reduced, and it
        # is the same on every rank (loaded from the same files, and broadcast from rank 0 here).
        # Every adapter parameter is used in every forward, so no search for unused parameters;
        # buffers (rotary tables) are synced once at construction and never change, so no sync per step.
        # DDP wraps the whole loss computation, so the chunked fused output head runs under it too.
        ddp = DistributedDataParallel(
            loss_module(model, LOSS_CHUNK_TOKENS, cfg.train, dist.all_reduce_sum),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False, forward_sync_buffers=False,
        )  # fmt: skip
        dist.no_sync = ddp.no_sync
        return ddp

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, output head
    _move_quant_states(model, device)
    dist.no_sync = lambda: _fsdp_no_sync(model)
    # The loss calls the whole sharded model (full logits) so FSDP2's root hooks run on every forward.
    return loss_module(_Forward(model, getattr(model, "config", None)), None, cfg.train, dist.all_reduce_sum)


def _move_quant_states(model: nn.Module, device: torch.device) -> None:
    """QLoRA under FSDP2: the 4-bit layers' quantization statistics (one 8-bit absmax per 64 codes,
    double-quantized; lorakit.layers.quant_state_of) are no parameters, so fully_shard neither
    shards nor moves them: each rank keeps them whole, moved here to its device. The two code
    tables the layers share (lorakit.quant) stay shared: one copy per device, not one per layer."""
    moved: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor, shared: bool = False) -> torch.Tensor:
        if not shared:
            return t.to(device)
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    for state in _quant_states(model):
        state.absmax, state.code = move(state.absmax), move(state.code, shared=True)
        if state.nested:
            state.offset, state.state2.absmax = move(state.offset), move(state.state2.absmax)
            state.state2.code = move(state.state2.code, shared=True)


def _quant_states(model: nn.Module) -> Iterator[Any]:
    """Each 4-bit layer's bitsandbytes QuantState (lorakit.layers.quant_state_of), once."""
    seen: set[int] = set()
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            yield state


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def frozen_bytes_held(model: nn.Module) -> tuple[int, int]:
    """(bytes of frozen weights this process holds, bytes of the whole frozen model): under FSDP2
    its shards of each parameter; 4-bit layers' quantization statistics count in full on every
    process (they are not sharded: `_move_quant_states`), as lorakit.quant's report counts them."""
    held = whole = 0
    for p in _frozen_parameters(model):
        size = p.element_size()
        whole += p.numel() * size
        held += (p.to_local() if hasattr(p, "to_local") else p).numel() * size
    tables: set[int] = set()
    for state in _quant_states(model):
        stats = [state.absmax] + ([state.offset, state.state2.absmax] if state.nested else [])
        for table in [state.code] + ([state.state2.code] if state.nested else []):
            if table.data_ptr() not in tables:  # the code tables are shared between layers: counted once
                tables.add(table.data_ptr())
                stats.append(table)
        n = sum(t.numel() * t.element_size() for t in stats)
        held, whole = held + n, whole + n
    return held, whole


def frozen_bytes_outside_blocks(model: nn.Module) -> int:
    """Bytes of the frozen weights outside the transformer blocks (embeddings, final norm, output
    head), whole: FSDP2's root group, which it gathers at the step's first forward and, as the root,
    keeps gathered through the backward (it needs them again there)."""
    inside = {id(p) for block in transformer_blocks(model) for p in block.parameters()}
    return sum(p.numel() * p.element_size() for p in _frozen_parameters(model) if id(p) not in inside)


def _frozen_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The model's frozen parameters, each once (a tied one is held twice)."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        # the frozen copy of a continued adapter (DPO's reference) is the adapter's, not the model's
        if p.requires_grad or id(p) in seen or preference.is_reference_parameter(name):
            continue
        seen.add(id(p))
        yield p


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (`model.layers`, `transformer.h`, ...), found generically:
    the ModuleList of same-class modules holding the most parameters."""
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's full optimizer state: cut the tensors of sharded (FSDP2)
    parameters into this rank's shards. Every rank loaded the same file, so no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
