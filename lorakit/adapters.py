"""Adapter files in Hugging Face PEFT's format, so adapters move freely between lorakit, PEFT and vLLM.

A PEFT LoRA adapter folder holds:
    adapter_config.json        PEFT's field names (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight   (r, in)
                               base_model.model.<module path>.lora_B.weight   (out, r)
                               base_model.model.<module path>.lora_magnitude_vector (out,)  DoRA
                               base_model.model.<module path>.lora_embedding_A (r, num_embeddings)
                               base_model.model.<module path>.lora_embedding_B (dim, r)
                               base_model.model.<module path>.<param>         modules_to_save copies
                               base_model.model.<experts path>[.base_layer]*.lora_A.weight (E·r, in)
                               base_model.model.<experts path>[.base_layer]*.lora_B.weight (out, r·E)
PEFT wraps each targeted expert weight (`target_parameters`) in its own layer, nested in the
order the module registers them, so the last one's keys have no `.base_layer` and each earlier one
gets one more (Qwen3-MoE: gate_up_proj under `experts.base_layer.`, down_proj under `experts.`).
The adapter's name never appears in the keys. Only safetensors are read: a pickled adapter
(`adapter_model.bin`) could run arbitrary code when loaded, so it is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UserError, writing
from lorakit.experts import LoraExperts, expert_parameter_names
from lorakit.inject import (
    _pattern_value,
    filtered_experts,
    find_parameter_targets,
    find_targets,
    inject_adapter,
    lora_configs,
    lora_layers,
    saved_modules,
    selected_by_name,
    unselected_weights,
)
from lorakit.layers import LoraLayer, base_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# the chat template an adapter was trained with (data.chat_template), under transformers' own name
CHAT_TEMPLATE_NAME = "chat_template.jinja"
PREFIX = "base_model.model."
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")

# PEFT config keys that carry no information lorakit needs (bookkeeping or defaults-only here).
_PEFT_BOOKKEEPING = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "fan_in_fan_out", "megatron_config", "megatron_core",
    "runtime_config", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# PEFT features lorakit does not implement: refused when set to anything but their default.
_PEFT_UNSUPPORTED_DEFAULTS = {
    "bias": "none", "lora_bias": False, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "monteclora_config": None, "layer_replication": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "trainable_token_indices": None,
}  # fmt: skip
_LORAKIT_KEYS = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "init_lora_weights",
    "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layers_pattern", "target_parameters",
    "use_dora",
}  # fmt: skip
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


@dataclass
class AdapterFiles:
    """An adapter folder read into memory: its LoRA config, raw PEFT config and tensors (PEFT keys)."""

    path: Path
    config: LoraConfig
    peft_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def file_bytes(self) -> int:
        return (self.path / WEIGHTS_NAME).stat().st_size


# --------------------------------------------------------------------------- saving
def peft_config_dict(
    model: nn.Module, name: str = "default", *, base_model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
) -> dict[str, Any]:
    """The `adapter_config.json` content for adapter `name` on `model`, in PEFT's field names;
    `revision`: the base's commit on the Hub, where it is known."""
    config = lora_configs(model).get(name)
    if config is None:
        raise UserError(f"no adapter named {name!r} on the model; it has {sorted(lora_configs(model))}")
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora_A]
    paths = [p for p, layer in layers if isinstance(layer, LoraLayer)]
    kinds = {layer.kind.name for _, layer in layers if isinstance(layer, LoraLayer)}
    expert_params = [f"{p}.{param}" for p, layer in layers if isinstance(layer, LoraExperts) for param in layer.lora_A[name]]
    config_dict = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _targets_for_peft(model, paths) if paths else None,
        "target_parameters": _parameter_targets_for_peft(config, expert_params),
        "exclude_modules": None,
        "use_rslora": config.rslora,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": list(config.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": "conv1d" in kinds,
        "bias": "none",
        "use_dora": config.dora,
        "lora_bias": False,
    }
    if revision is not None:
        config_dict["revision"] = revision
    return config_dict


def _targets_for_peft(model: nn.Module, paths: list[str]) -> list[str]:
    r"""Leaf names if they select exactly `paths` in PEFT's matching; else the full paths.

    Writing the resolved set (rather than "all-linear" or our `layers` filter) means PEFT selects
    the same modules without having to agree with us on what "all-linear" or a block index is.
    Full paths, not a regex of them: on the MoE models whose layout transformers 5 changed
    (Mixtral, Qwen2/3-MoE, ...) PEFT 0.21 turns a string target_modules into the leaf names it
    matches, so `^(model\.layers\.1\.self_attn\.q_proj)$` took every block's q_proj there.
    """
    leaves = sorted({p.split(".")[-1] for p in paths})
    wrappable = [p for p, m in model.named_modules() if p and _wraps(m)]
    selected = [p for p in wrappable if p.split(".")[-1] in leaves]
    if selected == paths:
        return leaves
    return list(paths)


def _parameter_targets_for_peft(config: LoraConfig, expert_params: list[str]) -> Optional[list[str]]:
    """The config's own entries when PEFT selects the same weights with them (PEFT applies no layer
    or exclude filter to parameters); else the full parameter paths."""
    if not expert_params:
        return None
    if config.layers is None and config.exclude is None:
        return sorted(config.target_parameters)
    return sorted(expert_params)


def _wraps(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or base_kind(module) is not None


def peft_keys(path: str, layer) -> tuple[str, str]:
    """PEFT's file keys of the A and B matrices of the LoRA layer at module `path`."""
    if layer.kind.name == "embedding":
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def expert_peft_keys(path: str, params: list[str]) -> dict[str, tuple[str, str]]:
    """PEFT's (A key, B key) of each adapted expert weight of the experts module at `path`.

    `params` in registration order: PEFT nests a wrapper per weight in that order, so the last
    sits outermost and each earlier one is one `.base_layer` deeper."""
    out = {}
    for i, param in enumerate(params):
        inner = ".base_layer" * (len(params) - 1 - i)
        out[param] = (f"{PREFIX}{path}{inner}.lora_A.weight", f"{PREFIX}{path}{inner}.lora_B.weight")
    return out


def _adapter_tensors(path: str, layer, name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor of adapter `name` on one LoraLayer or LoraExperts."""
    if isinstance(layer, LoraExperts):
        keys = expert_peft_keys(path, list(layer.lora_A[name].keys()))
        return {k: t for param, pair in keys.items() for k, t in zip(pair, (layer.lora_A[name][param], layer.lora_B[name][param]))}
    a_key, b_key = peft_keys(path, layer)
    out = {a_key: layer.lora_A[name], b_key: layer.lora_B[name]}
    if name in layer.lora_magnitude:
        out[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude[name]
    if layer.saves_base_weight:
        out[f"{PREFIX}{path}.base_layer.weight"] = layer.weight
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (detached, contiguous, on CPU)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            out.update(_adapter_tensors(path, layer, name))
    for path, module in saved_modules(model):
        if name in module.copies:
            for key, value in module.copies[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = value
    return {k: _to_cpu(v) for k, v in out.items()}


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    full = getattr(t, "full_tensor", None)  # an FSDP2 DTensor shard: gather the whole tensor
    if callable(full):
        t = full()
    return t.to("cpu").contiguous().clone()


def save_adapter(
    model: nn.Module,
    directory: Union[str, Path],
    name: str = "default",
    *,
    base_model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write adapter `name` as a PEFT adapter folder, atomically (built aside, then renamed).

    An existing folder at `directory` is replaced only once the new one is complete, and keeps its
    other files and folders (`write_adapter_folder`).
    """
    config = peft_config_dict(model, name, base_model_name_or_path=base_model_name_or_path, revision=revision)
    tensors = adapter_state_dict(model, name)
    return write_adapter_folder(directory, config, tensors, extra_files=extra_files)


def write_adapter_folder(
    directory: Union[str, Path],
    peft_config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write a PEFT adapter folder atomically: built aside, then swapped in whole. An existing
    folder keeps what it holds besides an adapter's files (as PEFT's save_pretrained leaves them):
    they are hard-linked into the new one. An adapter's files it had and this one has not (a chat
    template, a model card) go, since they would describe the old adapter."""
    directory = Path(directory).absolute()  # ("." cannot be renamed; its absolute name can)
    staging = staging_folder(directory)
    try:
        write_safetensors(tensors, staging / WEIGHTS_NAME)
        for file_name, text in {CONFIG_NAME: json.dumps(peft_config, indent=2, sort_keys=True) + "\n", **(extra_files or {})}.items():
            with writing(staging / file_name):
                (staging / file_name).write_text(text)
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name not in ADAPTER_FILES and not (staging / entry.name).exists():
                    link_tree(entry, staging / entry.name)
        replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


# the endings of the files a model folder keeps its weights in (safetensors, torch, TF, Flax, GGUF)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# the files an adapter folder's writer owns: not carried over from the folder it replaces
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, CHAT_TEMPLATE_NAME, "README.md", "adapter_model.bin")


def link_tree(source: Path, target: Path) -> None:
    """Copy a file or folder to `target` (new, or an empty folder for a folder) as hard links where
    the file system can: lorakit replaces the folders it writes whole, never writing into their
    files, so a link keeps its content."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or one without links
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link, dirs_exist_ok=True)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link(str(source), str(target))


def check_output_folder(
    out_dir: Union[str, Path], inputs: dict[str, Union[str, Path]], force: bool, *, writes_adapter: bool = False
) -> Path:
    """`out_dir` as a Path, refused when writing it would replace one of the `inputs` (what -> folder:
    the folder itself or a folder holding it, even with --force), when an adapter would be written
    into a model's folder (`writes_adapter`: it would take the model's chat template and card, even
    with --force) or, without `force`, when it is not empty."""
    out_dir = Path(out_dir)
    if writes_adapter and (out_dir / "config.json").is_file() and any(p.name.endswith(WEIGHT_SUFFIXES) for p in out_dir.iterdir()):
        raise UserError(f"--out {out_dir} holds a model (config.json and weights); write the adapter to a folder of its own")
    out = out_dir.resolve()
    for what, folder in inputs.items():
        folder_path = Path(folder).resolve()
        if out == folder_path or out in folder_path.parents:
            where = "is" if out == folder_path else "holds"
            raise UserError(f"--out {out_dir} {where} the {what} {folder}; write the result somewhere else")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder to write")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} exists and is not empty; pick another folder or pass --force to replace it")
    return out_dir


def new_folder(*, prefix: str, parent: Path) -> Path:
    """A new uniquely named folder in `parent`, with the permissions the umask gives a folder
    (mkdtemp's are owner-only, 0700, which the folder keeps when renamed into place: another user,
    or a serving container, could not read the adapter)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the permissions the umask gives a file (it makes them owner-only:
    a server running as another user could not read the weights) and a failed write raised as the
    OSError it is, with its errno and file (a full disk is then said as one)."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o22)  # (reading it means setting it; put back at once)
    os.umask(mask)
    return mask


def staging_folder(target: Path) -> Path:
    """A new hidden folder beside `target` to build it in (then `replace_dir`).

    Raises:
        UserError: `target`'s parent cannot be made or written (a file in the way, no permission).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stagings(target)
        return new_folder(prefix=f".{target.name}.tmp-{os.getpid()}-", parent=target.parent)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc} ({exc.filename or target.parent}); pick a folder "
                        "you can write to") from None  # fmt: skip


def _remove_dead_stagings(target: Path) -> None:
    remove_dead_stagings(target.parent, re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-"))


def remove_dead_stagings(parent: Path, pattern: re.Pattern) -> None:
    """Remove the staging folders in `parent` that a process killed outright (SIGKILL, a power loss)
    left behind: their names match `pattern`, whose first group is their process's id, and that
    process no longer runs on this machine. A merge's can hold gigabytes, a checkpoint's the
    optimizer state."""
    for sibling in parent.iterdir():
        found = pattern.match(sibling.name)
        if found is None or int(found.group(1)) == os.getpid() or not sibling.is_dir():
            continue
        try:
            os.kill(int(found.group(1)), 0)  # no signal sent: only whether the process exists
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except (PermissionError, OverflowError):  # another user's process, running; no process id at all
            pass


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished folder into place; an old `target` is removed only after the move succeeds.

    A folder cannot be renamed over a non-empty one, so an old `target` is swapped with `staging` in
    one step where the system can (Linux's renameat2 RENAME_EXCHANGE): at every moment `target` is
    the old folder or the new one, whenever the process is killed. Elsewhere the old folder is renamed
    aside first, and a kill between the two renames leaves it only under `.NAME.old-PID`.
    """
    sync_to_disk(staging)  # its files on disk before the name points at them (a power loss keeps one whole)
    try:
        here = Path.cwd()
    except OSError:  # the working folder is gone already
        here = None
    where = target.resolve()
    try:
        _replace(staging, target)
    finally:
        if here is not None and (here == where or where in here.parents):
            # the process worked in the old folder (`lorakit ... --out .`, a notebook's save to "."):
            # it goes on in the new one, under the same name, rather than in a removed folder
            with contextlib.suppress(OSError):
                os.chdir(here)


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        sync_to_disk(target.parent, tree=False)
    elif _exchange_paths(staging, target):
        sync_to_disk(target.parent, tree=False)
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, now under the staging name
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        sync_to_disk(target.parent, tree=False)
        shutil.rmtree(old, ignore_errors=True)


def sync_to_disk(path: Path, *, tree: bool = True) -> None:
    """fsync a file, or a folder's entries (and with `tree`, every file and folder under it), so that
    a rename made after it survives a power loss with the data it names. Where the system cannot
    open a folder for it (Windows), the folders are left to the file system."""
    paths = [path]
    if tree and path.is_dir():
        for root, dirs, files in os.walk(path):
            paths += [Path(root) / name for name in (*files, *dirs)]
    for item in paths:
        try:
            fd = os.open(item, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # a folder on a system that does not sync them
            pass
        finally:
            os.close(fd)


_AT_FDCWD = -100  # renameat2's "relative to the working folder" (fcntl.h)
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (renameat2 with RENAME_EXCHANGE); False where this system
    or file system cannot (not Linux, a libc without renameat2, a file system without the flag)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the flag or the call unsupported here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --------------------------------------------------------------------------- reading
def read_adapter(directory: Union[str, Path]) -> AdapterFiles:
    """Read and check an adapter folder without touching any model.

    Raises:
        UserError: missing folder or config, invalid JSON, not a LoRA adapter, a PEFT feature
            lorakit does not support, a pickled adapter, a truncated or corrupted safetensors file.
    """
    directory = Path(directory)
    config, raw = read_adapter_config(directory)
    tensors = load_safetensors(directory / WEIGHTS_NAME)
    return AdapterFiles(directory, config, raw, tensors)


def check_weight_tying(files: AdapterFiles, tied: set[str]) -> None:
    """Refuse what PEFT's `ensure_weight_tying` builds and lorakit does not: a LoRA of the output
    head tied to the LoRA of an embedding, which PEFT does for an embedding it knows by name (its
    EMBEDDING_LAYER_NAMES: embed_tokens, not GPT-2's wte) whose weight the model ties to the head's
    (`tied`: the paths of such modules). Elsewhere PEFT ties nothing, and lorakit loads the adapter.
    """
    if not files.peft_config.get("ensure_weight_tying"):
        return
    for key in files.tensors:
        path, embedding_lora, _ = key[len(PREFIX) :].partition(".lora_embedding_")
        if embedding_lora and path.split(".")[-1] == "embed_tokens" and path in tied:
            raise UserError(
                f"{files.path / CONFIG_NAME}: ensure_weight_tying: true with LoRA on the embedding {path}, tied to the "
                "output head, which PEFT then ties to a LoRA of the head (lm_head) that lorakit does not build; save the "
                "adapter with ensure_weight_tying: false (PEFT's default), or merge it with PEFT"
            )


def read_adapter_config(directory: Union[str, Path]) -> tuple[LoraConfig, dict[str, Any]]:
    """(LoraConfig, raw PEFT config) of an adapter folder, its weights not read (only looked for).

    Raises:
        UserError: missing folder or config, invalid JSON, not a LoRA adapter, an unsupported PEFT
            feature, no safetensors weights (a pickled adapter is refused).
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "not found"
        raise UserError(f"adapter folder {str(directory)!r} {what}; pass the folder a run wrote (OUTPUT_DIR/adapter) or PEFT's "
                        "save_pretrained did")  # fmt: skip
    from lorakit.models import check_utf8_path

    check_utf8_path(directory, "adapter")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        inner = directory / "adapter"  # a run's output_dir, or one of its checkpoints, holds it here
        hint = f"; it holds one in {inner}: pass that" if (inner / CONFIG_NAME).is_file() else ""
        raise UserError(f"{directory}: no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    config = lora_config_from_peft(raw, source=str(config_path))
    if not (directory / WEIGHTS_NAME).is_file():
        pickled = [n for n in PICKLED_NAMES if (directory / n).is_file()]
        if pickled:
            raise UserError(
                f"{directory / pickled[0]}: refusing a pickled adapter: unpickling can run arbitrary code. "
                "Convert it once in a trusted environment: `python -c \"import torch; from safetensors.torch import "
                f"save_file; save_file(torch.load('{pickled[0]}', weights_only=True), '{WEIGHTS_NAME}')\"`"
            )
        raise UserError(f"{directory}: no {WEIGHTS_NAME}, the adapter's weights; an adapter folder holds {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME} (copy the whole folder)")  # fmt: skip
    return config, raw


def inside_folder(path: Path, folder: Path) -> bool:
    """Whether `path` is a file of the model or adapter `folder`, links followed: in the folder; in
    the Hugging Face cache's blobs (`models--ORG--NAME/blobs/`, where a snapshot's files and a
    `--local-dir` download's large ones link); or the file of the same name in another model or
    adapter folder (`ln -s /store/model/* work/`). A folder from elsewhere may link a private file
    (a key, /proc's environment) under a name lorakit reads and writes out again."""
    target = path.resolve()
    if target.is_relative_to(folder.resolve()):
        return True
    if target.parent.name == "blobs" and target.parent.parent.name.startswith("models--"):
        return True
    return target.name == path.name and _model_or_adapter_folder(target.parent)


def _model_or_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds a model (config.json naming a model_type) or an adapter
    (adapter_config.json naming a peft_type) beside safetensors weights: not any folder with a
    config.json, as many tools keep their settings and tokens (~/.config/APP/config.json)."""
    for name, key in (("config.json", "model_type"), (CONFIG_NAME, "peft_type")):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and key in config and any(folder.glob("*.safetensors")):
            return True
    return False


def read_chat_template(directory: Union[str, Path]) -> Optional[str]:
    """The chat template an adapter folder holds (chat_template.jinja, data.chat_template's), else None.

    Raises:
        UserError: the file is not UTF-8 text (or cannot be read), is a folder, or is a link out of
            the adapter's folder.
    """
    path = Path(directory) / CHAT_TEMPLATE_NAME
    if not path.exists():
        return None
    if not inside_folder(path, Path(directory)):
        raise UserError(f"{path} is a link to {path.resolve()}, outside the adapter's folder; lorakit reads an adapter's "
                        "files from its folder only: copy the template there")  # fmt: skip
    if path.is_dir():  # not passed over: the adapter would then run with another template than it trained with
        raise UserError(f"{path} is a folder, not a file; delete it to use the model's own template, or save the "
                        "adapter's chat template there as a file")  # fmt: skip
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark would start every render
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the chat template as UTF-8, or "
                        "delete the file to use the model's own template") from None  # fmt: skip
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); fix its permissions, or delete it to use the "
                        "model's own template") from None  # fmt: skip


def load_safetensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted one is a UserError naming the file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]}); re-save or re-download it") from None


def lora_config_from_peft(raw: dict[str, Any], *, source: str = CONFIG_NAME) -> LoraConfig:
    """Translate PEFT's adapter_config.json fields into a LoraConfig.

    Unknown keys (from newer PEFT versions) are ignored with a warning; PEFT features lorakit does
    not implement, when actually used, are refused.
    """
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UserError(f"{source}: peft_type = {peft_type!r}; lorakit reads LoRA adapters (peft_type \"LORA\")")
    for key, default in _PEFT_UNSUPPORTED_DEFAULTS.items():
        value = raw.get(key, default)
        if value not in (default, None, {}, False) or (key == "bias" and value != "none"):
            raise UserError(f"{source}: {key} = {value!r} is a PEFT feature lorakit does not support")
    unknown = sorted(set(raw) - _PEFT_BOOKKEEPING - set(_PEFT_UNSUPPORTED_DEFAULTS) - _LORAKIT_KEYS)
    if unknown:
        warnings.warn(f"{source}: ignoring config keys lorakit does not know: {', '.join(unknown)}", stacklevel=2)
    init = raw.get("init_lora_weights", True)
    if init is True or init is False:
        init = "default"
    elif isinstance(init, str) and init.startswith("pissa_niter"):
        raise UserError(
            f"{source}: init_lora_weights = {init!r}: PEFT's fast PiSSA takes the base's principal part from a randomized "
            "SVD, which cannot be computed again (two loads in PEFT differ too), so the model the adapter was "
            "trained on cannot be rebuilt; save it as plain LoRA in PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), or train with init_lora_weights: pissa"
        )
    elif init not in ("gaussian", "olora", "pissa"):
        raise UserError(f"{source}: init_lora_weights = {init!r} is not supported; lorakit knows default, gaussian, pissa, olora")
    if "r" not in raw:  # PEFT always writes it; its default (8) would be a guess at the tensors' rank
        raise UserError(f"{source}: r is missing; set it to the adapter's rank (the rows of its lora_A tensors)")
    for key, what in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
        if not isinstance(raw.get(key) or {}, dict):  # dict() would fail on a list of names, or take a list of pairs
            raise UserError(f"{source}: {key} = {raw[key]!r}: expected a mapping of module name (or regex) to {what}, "
                            'e.g. {"q_proj": 8}')  # fmt: skip
    for key in ("modules_to_save", "target_parameters"):
        if not isinstance(raw.get(key) or [], list):  # list() would split a string into letters
            example = json.dumps([raw[key]] if isinstance(raw[key], str) else ["lm_head"])
            raise UserError(f"{source}: {key} = {raw[key]!r}: expected a list of names, e.g. {example}")
    targets = raw.get("target_modules")
    target_parameters = list(raw.get("target_parameters") or [])
    if targets is None and not target_parameters:
        raise UserError(f"{source}: target_modules is missing")
    if targets is None:
        targets = []  # the experts alone
    if isinstance(targets, (list, tuple)):
        targets = list(targets)
    layers, layers_pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    if isinstance(targets, str) and (layers is not None or layers_pattern is not None):
        # PEFT's LoraConfig refuses these (an empty list too), so PEFT loads no such adapter
        key, value = ("layers_to_transform", layers) if layers is not None else ("layers_pattern", layers_pattern)
        regex = "" if targets == "all-linear" else f", or write the block indices into its regex and remove {key}"
        raise UserError(f"{source}: {key} = {value!r} with target_modules = {targets!r}, a string: PEFT refuses the two "
                        f"together and loads no such adapter; list the module names in target_modules{regex}")  # fmt: skip
    if layers_pattern and layers is None:
        raise UserError(f"{source}: layers_pattern = {layers_pattern!r} without layers_to_transform: PEFT refuses it (the "
                        "pattern names the block list those indices count in); set layers_to_transform, or remove "
                        "layers_pattern")  # fmt: skip
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers == []:  # PEFT filters no block then, whatever layers_pattern says
        layers, layers_pattern = None, None
    if layers_pattern in ("", []):  # PEFT: an empty pattern is its default one
        layers_pattern = None
    try:
        return LoraConfig(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            targets=targets,
            exclude=raw.get("exclude_modules"),
            rslora=bool(raw.get("use_rslora", False)),
            init=init,
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            layers=layers,
            layers_pattern=layers_pattern,
            modules_to_save=list(raw.get("modules_to_save") or []),
            target_parameters=target_parameters,
            dora=bool(raw.get("use_dora", False)),
        )
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- loading into a model
def expected_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape that `config` would create on `model` (nothing is modified)."""
    out: dict[str, tuple[int, ...]] = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        kind = module.kind if hasattr(module, "kind") else base_kind(module)
        r = _pattern_value(path, config.rank_pattern, config.r)
        if kind.name != "linear4bit":
            # PEFT saves the base weight of targeted embeddings too (resized vocabularies)
            out[f"{PREFIX}{path}.base_layer.weight"] = tuple(module.weight.shape)
        if kind.name == "embedding":
            num, dim = module.weight.shape
            out[f"{PREFIX}{path}.lora_embedding_A"] = (r, num)
            out[f"{PREFIX}{path}.lora_embedding_B"] = (dim, r)
            if config.dora:
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = (dim,)
            continue
        if kind.name == "conv1d":
            fan_in, fan_out = module.weight.shape
        elif kind.name == "linear4bit" or hasattr(module, "in_features"):
            fan_in, fan_out = module.in_features, module.out_features
        else:
            fan_out, fan_in = module.weight.shape
        out[f"{PREFIX}{path}.lora_A.weight"] = (r, fan_in)
        out[f"{PREFIX}{path}.lora_B.weight"] = (fan_out, r)
        if config.dora:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = (fan_out,)
    for path, params in find_parameter_targets(model, config).items():
        module = model.get_submodule(path)
        experts = module if isinstance(module, LoraExperts) else LoraExperts(module, path)
        order = [p for p in expert_parameter_names(experts.base_layer) if p in params]
        for param, (a_key, b_key) in expert_peft_keys(path, order).items():
            r = _pattern_value(f"{path}.{param}", config.rank_pattern, config.r)
            fan_in, fan_out = experts.features(param)
            out[a_key] = (experts.num_experts * r, fan_in)
            out[b_key] = (fan_out, r * experts.num_experts)
    for target in config.modules_to_save:
        for path, module in model.named_modules():
            if path and (path == target or path.endswith("." + target)) and ".copies." not in path:
                source = module.original if hasattr(module, "original") else module
                for key, value in source.state_dict().items():
                    out[f"{PREFIX}{path}.{key}"] = tuple(value.shape)
    return out


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_fits(model: nn.Module, files: AdapterFiles) -> None:
    """Raise a UserError naming the first key whose name or shape does not fit `model`."""
    try:
        expected = expected_shapes(model, files.config)
    except UserError:  # find_targets' words name lora.targets, which here the adapter's config sets
        raise UserError(
            f"{files.path}: the adapter's targets {files.config.targets!r} match no layer of this model; is it an "
            "adapter for another base model?"
        ) from None
    for key, tensor in files.tensors.items():
        if key not in expected:
            lora = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_[AB]\.weight|lora_embedding_[AB]|lora_magnitude_vector)", key)
            if lora is not None and filtered_experts(lora.group(1), files.config):  # PEFT's reading differs here
                raise UserError(unselected_weights(files.path, lora.group(1), files.config))
            if lora is not None and _has_submodule(model, lora.group(1)):
                path = lora.group(1)
                if not selected_by_name(path, files.config):  # there, but not what the config selects
                    raise UserError(unselected_weights(files.path, path, files.config))
                module = model.get_submodule(path)
                if base_kind(module) is None:  # selected, but of a kind lorakit has no LoRA layer for (PEFT's Conv2d)
                    raise UserError(
                        f"{files.path}: adapter_model.safetensors holds LoRA weights for {path}, a "
                        f"{type(module).__name__}; lorakit adapts linear layers, GPT-2's Conv1D and embeddings only"
                    )
            wanted = ", ".join(list(expected)[:3])
            raise UserError(
                f"{files.path}: adapter tensor {key} {tuple(tensor.shape)} has no matching module in the model "
                f"(expected keys like {wanted}); is this adapter for another base model?"
            )
        if tuple(tensor.shape) != expected[key]:
            raise UserError(
                f"{files.path}: {key} has shape {tuple(tensor.shape)} but the model needs {expected[key]}; "
                "the adapter was trained on a different base model"
            )
    missing = [k for k in expected if k not in files.tensors and not k.endswith(".base_layer.weight")]
    if missing:
        raise UserError(f"{files.path}: the adapter has no tensor {missing[0]} that its config implies ({len(missing)} missing)")


def _with_saved_modules_as_peft_took_them(model: nn.Module, files: AdapterFiles) -> AdapterFiles:
    """`files` with its modules_to_save entries as the full names of the modules the file saved.

    PEFT takes for an entry every module whose name ends with it as plain text (`norm` takes
    `input_layernorm` too: peft.utils.other's `_set_trainable`), lorakit's config only a name that
    ends there at a dot; a PEFT-made file holds a copy of every module PEFT took, a lorakit-made one
    of those lorakit took. So an entry stands for each module it ends whose weights the file holds.
    With PEFT's `ensure_weight_tying`, the output head tied to a saved embedding is saved too.
    """
    if not files.config.modules_to_save:
        return files
    entries = list(files.config.modules_to_save)
    if files.peft_config.get("ensure_weight_tying"):
        # PEFT then saves a tied output head's copy beside the embedding's (the same values)
        head = model.get_output_embeddings()
        entries += [path for path, module in model.named_modules() if head is not None and module is head]
    saved = []
    for path, module in model.named_modules():
        if path and any(path.endswith(entry) for entry in entries):
            if all(f"{PREFIX}{path}.{key}" in files.tensors for key in module.state_dict()):
                saved.append(path)
    if not saved:
        return files  # check_fits names what is missing
    full = [p for p in saved if not any(p != q and p.startswith(q + ".") for q in saved)]  # outermost only
    return dataclasses.replace(files, config=dataclasses.replace(files.config, modules_to_save=full))


def load_adapter(
    model: nn.Module, directory: Union[str, Path], name: str = "default", *, trainable: bool = False
) -> LoraConfig:
    """Add the adapter in `directory` to `model` under `name` and load its weights.

    Everything is checked before the model is touched, so on error the model is left as it was.
    With `trainable=False` (inference) the adapter's parameters do not require grad.
    """
    return apply_adapter(model, read_adapter(directory), name, trainable=trainable)


def apply_adapter(model: nn.Module, files: AdapterFiles, name: str = "default", *, trainable: bool = False) -> LoraConfig:
    """`load_adapter` of an adapter already read; returns its config as applied (modules_to_save
    entries as the full names of the modules it holds)."""
    if name in lora_configs(model):
        raise UserError(f"adapter {name!r} is already on the model; pass another name")
    check_weight_tying(files, _tied_embeddings(model))
    files = _with_saved_modules_as_peft_took_them(model, files)
    check_fits(model, files)
    inject_adapter(model, files.config, name, check_patterns=False)  # PEFT keeps keys that match nothing
    copy_adapter_weights(model, files, name)
    if not trainable:
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)
                if name in getattr(layer, "lora_magnitude", {}):
                    layer.lora_magnitude[name].requires_grad_(False)
        for _, module in saved_modules(model):
            if name in module.copies:
                for p in module.copies[name].parameters():
                    p.requires_grad_(False)
                module.settle(name)
    return files.config


def _tied_embeddings(model: nn.Module) -> set[str]:
    """The path of the model's input embedding where the output head shares its weight; none else."""
    try:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # any nn.Module: no embeddings to know of
        return set()
    if embedding is None or head is None or getattr(head, "weight", None) is not getattr(embedding, "weight", 0):
        return set()
    return {path for path, module in model.named_modules() if module is embedding}


def copy_adapter_weights(
    model: nn.Module,
    files: AdapterFiles,
    name: str = "default",
    copy: Callable[[torch.Tensor, torch.Tensor], None] = lambda param, value: param.copy_(value),
) -> None:
    """Copy an adapter's tensors into adapter `name`, already on the model with matching shapes.

    copy(param, value): how a full tensor goes into a parameter (the trainer passes one that
    handles FSDP2 shards).
    """
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if name not in layer.lora_A:
                continue
            for key, param in _adapter_tensors(path, layer, name).items():
                if not key.endswith(".base_layer.weight"):  # the layer's own weight: below, when the file has it
                    copy(param, files.tensors[key])
            if isinstance(layer, LoraExperts):
                continue
            base_weight = files.tensors.get(f"{PREFIX}{path}.base_layer.weight")
            if base_weight is not None:
                copy(layer.weight, base_weight)
                layer.saves_base_weight = True
        for path, module in saved_modules(model):
            if name in module.copies:
                for key, param in module.copies[name].named_parameters():
                    copy(param, files.tensors[f"{PREFIX}{path}.{key}"])


def check_lora_pair(source: Any, path: str, a: torch.Tensor, b: torch.Tensor, magnitude: Optional[torch.Tensor], r: int) -> None:
    """Raise a UserError unless A (r, in), B (out, r) and the DoRA magnitude (out,) of module `path`
    (of the adapter `source`) have the shapes of a rank-`r` LoRA module, the rank its
    adapter_config.json gives it: a scale of alpha / r with another r would be silently wrong."""
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] == r and (magnitude is None or
                                                                           tuple(magnitude.shape) == (b.shape[0],)):  # fmt: skip
        return
    dora = f", magnitude {tuple(magnitude.shape)}" if magnitude is not None else ""
    raise UserError(
        f"{source}: {path}: adapter A {tuple(a.shape)}, B {tuple(b.shape)}{dora} are not a LoRA module of rank {r} "
        f"(A (r, in), B (out, r){', magnitude (out,)' if dora else ''}; r from adapter_config.json); the adapter file is "
        "damaged, or its adapter_config.json is another adapter's"
    )


def check_factor_values(source: Any, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise a UserError where a LoRA module's matrices (`what`, of the adapter `source`) hold
    integers (cast to float, their update would be rounded to nothing) or inf/NaN."""
    stored = next((t.dtype for t in (a, b) if not t.is_floating_point()), None)
    if stored is not None:
        raise UserError(f"{source}: {what} holds {stored} numbers; LoRA matrices are floating point, so the adapter file "
                        "is damaged, or was not written by a LoRA trainer")  # fmt: skip
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise UserError(f"{source}: {what} holds inf/NaN values in its LoRA matrices; the adapter is broken (a diverged "
                        "run's, or a damaged file): use an earlier checkpoint's")  # fmt: skip


def adapter_scaling(config: LoraConfig, path: str) -> float:
    """The scale s of the module at `path` under `config` (patterns resolved)."""
    r = _pattern_value(path, config.rank_pattern, config.r)
    alpha = _pattern_value(path, config.alpha_pattern, config.alpha)
    return alpha / math.sqrt(r) if config.rslora else alpha / r
