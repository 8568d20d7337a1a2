"""Loading Hugging Face model folders: device and precision choice, tokenizer, base model, adapter.

The documented path is a local folder (config.json, *.safetensors, tokenizer files). Weights are
read from safetensors only; `trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from safetensors import SafetensorError
from torch import nn

from lorakit.cpu_math import settle_vector_math
from lorakit.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# how a user runs a folder's own code, said where a model needs it (never run unasked)
TRUST_FIX = "if you trust it, set trust_remote_code: true (train) or pass --trust-remote-code (generate, chat, eval)"


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX, or AVX512 on recent torch)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512", "AVX512_BF16", "AMX") or "AVX512" in capability


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `precision` ("auto" picks bf16 where the hardware has it, else fp32)."""
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def check_utf8_path(folder: Path, what: str) -> None:
    """Raise a UserError where `folder`'s path holds bytes that are not UTF-8 (Python keeps them as
    lone surrogates): the tokenizers and safetensors libraries open UTF-8 paths only."""
    from lorakit.data_files import undecodable_byte

    problem = undecodable_byte(str(folder))
    if problem is not None:
        raise UserError(f"{what} folder {str(folder)!r}: {problem}, and the tokenizers and safetensors libraries open "
                        "UTF-8 paths only; rename the folder (or a folder above it)")  # fmt: skip


class BaseReference(NamedTuple):
    """How an adapter names the base it was trained on (adapter_config.json's base_model_name_or_path
    and revision, the card's base_model)."""

    name: str
    revision: Optional[str]
    on_hub: bool  # `name` is a Hub repository id, which a model card's base_model may hold


# a folder of the Hugging Face cache: .../models--ORG--NAME/snapshots/COMMIT
_HUB_SNAPSHOT = re.compile(r"models--(?:(?P<org>[^/]+?)--)?(?P<name>[^/]+)/snapshots/(?P<revision>[0-9a-f]{40})$")


def looks_like_hub_id(name: str) -> bool:
    """`org/model` that is not a local path: left to transformers (users with network)."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def base_reference(model: str) -> BaseReference:
    """What an adapter trained on `model` records as its base: a folder of the Hugging Face cache as
    its repository id and commit; another folder as its absolute path, since other tools (transformers'
    `from_pretrained(adapter)`, AutoPeftModel, llama.cpp's converter) read a relative one from their
    own working folder, or as a Hub id; a name that is no folder (a Hub id) as it is."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return BaseReference(model, None, True)
    resolved = path.resolve()
    found = _HUB_SNAPSHOT.search(resolved.as_posix())
    if found:
        name = f"{found['org']}/{found['name']}" if found["org"] else found["name"]  # (gpt2: no organisation)
        return BaseReference(name, found["revision"], True)
    return BaseReference(str(resolved), None, False)


def check_model_folder(path: Union[str, Path], *, need_tokenizer: bool = True) -> Path:
    """Raise a UserError unless `path` is a usable model folder (safetensors weights, tokenizer)."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise UserError(f"model folder {str(path)!r} {what}; pass a local Hugging Face model folder")
    check_utf8_path(folder, "model")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; a model folder holds config.json, *.safetensors and tokenizer files")
    read_config_json(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise UserError(
                f"{folder}: only pickled weights ({pickled[0]}); lorakit loads safetensors only because unpickling "
                "can run code. Convert once in a trusted environment: "
                "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`"
            )
        raise UserError(f"{folder}: no *.safetensors weights")
    _check_index_names(folder / "model.safetensors.index.json")
    if need_tokenizer and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json); save the tokenizer into the model folder")
    return folder


def _check_index_names(index: Path) -> None:
    """Refuse a safetensors index that names a shard outside its folder (`../other/x.safetensors`):
    transformers and lorakit would read it, and a merge would write its tensors out again. An index
    that does not parse is left to the readers, which say so in their own words."""
    try:
        names = json.loads(index.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise UserError(f"{index}: lists the shard {name!r}, which is not a file name of the folder; a model folder "
                            "keeps its shards beside the index: fix or re-save the index")  # fmt: skip


def read_config_json(folder: Union[str, Path]) -> dict[str, Any]:
    """A model folder's config.json as a dict.

    Raises:
        UserError: the file is not UTF-8 JSON, or holds no JSON object.
    """
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); re-save or re-download the model's "
                        "config.json") from None  # fmt: skip
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc}); re-save or re-download the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a JSON {type(config).__name__}, not an object of the model's settings; re-save or "
                        "re-download the model's config.json")  # fmt: skip
    return config


def load_config(path: Union[str, Path], *, trust_remote_code: bool = False) -> Any:
    """The model's transformers config, read from config.json as `from_pretrained` reads it.

    Raises:
        UserError: config.json unreadable, without a model_type or with one this transformers does
            not know, a value transformers refuses, custom code not trusted, or not a causal LM.
    """
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    local = Path(path).exists()
    where = Path(path) / "config.json" if local else path
    try:
        with _loading_errors(path):
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except UserError:  # (a ValueError too) the folder's or the Hub's, as _loading_errors words it
        raise
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{path}: this model needs custom code from its folder; {TRUST_FIX}") from None
        model_type = read_config_json(path).get("model_type") if local else None
        if model_type is None and local:
            raise UserError(f"{where}: no model_type, the key that names the architecture (e.g. \"llama\"); re-save or "
                            "re-download the model's config.json") from None  # fmt: skip
        if local:
            raise UserError(f"{where}: model_type = {model_type!r} is not an architecture transformers "
                            f"{transformers.__version__} knows; check its spelling, or upgrade transformers") from None  # fmt: skip
        raise UserError(f"{where}: transformers cannot read its config: {str(exc).strip().splitlines()[0]}") from None
    except StrictDataclassError as exc:  # a value of the wrong type, e.g. "hidden_size": "64"
        detail = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{where}: {detail.partition(': ')[2] or detail}; fix the value, or re-download the model's "
                        "config.json") from None  # fmt: skip
    auto_map = getattr(config, "auto_map", None) or {}
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and "AutoModelForCausalLM" not in auto_map:
        raise UserError(f"{where}: model_type = {config.model_type!r} is not a causal language model in transformers "
                        "(no AutoModelForCausalLM class); lorakit fine-tunes decoder-only models (Llama, Qwen, GPT-2, ...)")  # fmt: skip
    return config


@contextlib.contextmanager
def _loading_errors(path: Union[str, Path]) -> Iterator[None]:
    """transformers' errors for a model it cannot get (a Hub name offline or misspelt, a gated
    repository, a folder's file it cannot read or parse) as a one-line UserError."""
    try:
        yield
    except SafetensorError as exc:
        raise UserError(f"{path}: a weights file is not a valid safetensors file ({exc}); re-save or re-download it") from None
    except UnicodeDecodeError as exc:  # a text file of the folder (tokenizer_config.json, chat_template.jinja) in UTF-16, say
        from lorakit.data_files import read_utf8

        folder = Path(path)
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if file.suffix in (".json", ".jinja", ".txt") and file.is_file():
                read_utf8(file)  # FILE:LINE of the first that is not UTF-8
        raise UserError(f"{path}: transformers could not load it: a file is not UTF-8 text ({exc.reason}); re-save or "
                        "re-download the model's files") from None  # fmt: skip
    except (OSError, json.JSONDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if Path(path).exists():
            raise UserError(f"{path}: transformers could not load it: {first}") from None
        raise UserError(
            f"model {str(path)!r} is not a local folder, and transformers could not get it from the Hugging Face Hub "
            f"({first}); pass a local model folder, or check the name and the network (HF_HUB_OFFLINE)"
        ) from None


def load_tokenizer(path: Union[str, Path], *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.exists():
        check_model_folder(folder)
    # the tokenizer's loader reads config.json too; a model transformers cannot build is refused here,
    # before any data is tokenized
    load_config(path, trust_remote_code=trust_remote_code)
    try:
        with _loading_errors(path):
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if isinstance(exc, UserError) or "trust_remote_code" not in str(exc):
            raise
        # a tokenizer class of the folder's own code (tokenizer_config.json's auto_map), never run untrusted
        raise UserError(f"{path}: this model's tokenizer needs custom code from its folder; {TRUST_FIX}") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of the loss and attention; eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def padding_id(tokenizer: Any, model: nn.Module, fallback: int = 0) -> int:
    """The id to fill padding with: the tokenizer's pad token where the model has an embedding row for
    it, else `fallback`. Padding is neither attended to nor trained, so any id the embedding can look
    up serves; a pad token added to the tokenizer without resizing the model has no row."""
    pad = tokenizer.pad_token_id
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (NotImplementedError, AttributeError):  # custom code without the accessor
        rows = None
    if pad is None or (rows is not None and not 0 <= pad < rows):
        return fallback
    return pad


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lorakit prints its own summary; per-tensor bars are noise


def load_model(
    path: Union[str, Path],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
) -> nn.Module:
    """Load a causal LM from a folder (safetensors only) in `dtype` on `device`, in eval mode.

    attn_implementation: None takes transformers' choice, SDPA where the architecture supports it
    (lorakit's packed attention then takes over in training) and its eager attention where it does
    not (Gemma 2, whose attention logits are soft-capped); naming "sdpa" for those raises.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if folder.exists():
        check_model_folder(folder, need_tokenizer=False)
    load_config(path, trust_remote_code=trust_remote_code)
    settle_vector_math()  # before any forward: the first could otherwise race (lorakit.cpu_math)
    _quiet_transformers()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with _loading_errors(path):
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True,
                **kwargs,
            )  # fmt: skip
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{path}: this model needs custom code from its folder; {TRUST_FIX}") from None
        raise
    except RuntimeError as exc:  # transformers raises this after its load report for a weight of another shape
        if "mismatched_sizes" in str(exc):
            raise UserError(f"{path}: a stored weight's shape differs from the one config.json implies (transformers' "
                            "load report above names it); the weights and config.json are of different models") from None
        raise
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would start those at random and only print a report
        raise UserError(f"{path}: the safetensors files lack {len(missing)} weight{'s' if len(missing) > 1 else ''} the "
                        f"model needs ({missing[0]}{', ...' if len(missing) > 1 else ''}); the folder is incomplete")  # fmt: skip
    if folder.is_dir():
        check_float_weights(folder, model)
    return model.to(device).eval()


# safetensors' integer dtypes, by their names in torch
_INTEGER_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
                   "I32": "int32", "U64": "uint64", "I64": "int64"}  # fmt: skip


def check_float_weights(folder: Path, model: nn.Module) -> None:
    """Refuse a folder that stores as integers a weight `model` holds as floating-point numbers (an
    int8 export of another tool, say): loading takes the integers as the weights' values, without
    any scale, and the model computes nonsense. Pre-quantized bitsandbytes weights stay integers in
    the model and pass. Reads the safetensors headers only.

    Raises:
        UserError: naming the first such tensor and its dtype; a weights file that does not read.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (ValueError, KeyError, TypeError, AttributeError):
        names = None  # transformers has read the folder already: what it could not index it did not load
    files = [folder / n for n in names] if names is not None else sorted(folder.glob("*.safetensors"))
    stored = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                stored.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file}: not a valid safetensors file ({str(exc).splitlines()[0]}); re-save or re-download it") from None
    integer = {key: _INTEGER_DTYPES[dtype] for key, dtype in stored.items() if dtype in _INTEGER_DTYPES}
    if not integer:
        return
    floats = {name for name, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()}
    transform, prefix = checkpoint_key_transform(model), getattr(model, "base_model_prefix", "")
    for key, dtype in integer.items():
        name = transform(key)[0]
        unprefixed = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
        if name in floats or f"{prefix}.{name}" in floats or unprefixed in floats:
            raise UserError(
                f"{folder}: {key} is stored as torch.{dtype}, not as floating-point numbers; loaded, the integers would "
                "be the weight's values (no scale) and the model would compute nonsense; use the model's float "
                "checkpoint (fp32, fp16 or bf16)"
            )


def model_dtype(path: Union[str, Path]) -> torch.dtype:
    """The dtype the folder's weights are stored in (config.json's dtype / torch_dtype), fp32 if unsaid."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def inference_dtype(model_path: Union[str, Path], device: torch.device) -> torch.dtype:
    """The compute dtype inference takes unless told: on a GPU training's `precision: auto`; on CPU
    fp32 (accurate, and fast where the CPU has no bf16 arithmetic), but a bf16 checkpoint stays bf16
    where the CPU computes in bf16 itself (AVX512-BF16, AMX): an fp32 copy of it would take twice its
    memory (3x while loading), for no speed."""
    if device.type != "cpu":
        return resolve_precision("auto", device)
    stored = model_dtype(model_path) if (Path(model_path) / "config.json").is_file() else torch.float32
    return torch.bfloat16 if stored == torch.bfloat16 and cpu_has_bf16() else torch.float32


def load_for_inference(
    model_path: Union[str, Path],
    adapter_path: Union[str, Path, None] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    trust_remote_code: bool = False,
    quantize: str = "none",
    precision: Optional[str] = None,
):
    """(model, tokenizer) with the adapter (if any) loaded, in eval mode.

    The adapter is checked against the model before any weight is touched. quantize "nf4" loads
    the base in 4-bit as QLoRA training does (`lorakit.quant.load_model_4bit`), computing in `dtype`
    (default: bf16 where the hardware has it, as training's `precision: auto`), so a QLoRA adapter
    runs over the base it was trained against. precision (a run config's `train.precision` value)
    sets `dtype` instead.
    """
    from lorakit.adapters import apply_adapter, read_adapter

    if Path(model_path).exists():
        check_model_folder(model_path)
    files = read_adapter(adapter_path) if adapter_path is not None else None
    device = torch.device(device) if device is not None else pick_device()
    if precision is not None:
        dtype = resolve_precision(precision, device)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if files is not None:
        from lorakit.adapters import read_chat_template

        template = read_chat_template(files.path)
        if template is not None:  # the template the adapter was trained with (data.chat_template)
            tokenizer.chat_template = template
    if quantize == "nf4":
        from lorakit.quant import load_model_4bit

        dtype = dtype or resolve_precision("auto", device)
        model, _ = load_model_4bit(model_path, compute_dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    else:
        dtype = dtype or inference_dtype(model_path, device)
        model = load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if files is not None:
        apply_adapter(model, files)
        model.to(device)
    return model.eval(), tokenizer


def meta_model(path: Union[str, Path], *, trust_remote_code: bool = False) -> Optional[nn.Module]:
    """The folder's model built from its config.json on the meta device: its module structure, no
    weights read, no memory. None where it cannot be built (custom code not trusted, an
    architecture this transformers does not know, no config)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
                with torch.device("meta"):
                    return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - callers fall back to what they can do without the structure
        return None


def position_limit(model: nn.Module) -> tuple[Optional[int], bool]:
    """How many positions `model` encodes (config: `n_positions`, else `max_position_embeddings`)
    and whether that is a hard limit: a position table with a row per position, learned (GPT-2's
    `wpe`, OPT's `embed_positions`) or precomputed (GPT-J's rotary `embed_positions`), which has no
    row for a later position, as opposed to rotary or ALiBi positions computed for any position
    (past the limit, untrained). (None, False) when the config names no limit."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None, False
    rows = (limit, limit + 2)  # OPT's table has an offset of 2
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = any(isinstance(m, nn.Embedding) and m is not inputs and m.num_embeddings in rows for m in model.modules())
    table = table or any(
        "position" in name and buffer.dim() == 2 and buffer.shape[0] in rows for name, buffer in model.named_buffers()
    )
    return limit, table


def checkpoint_key_transform(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """How transformers maps `model`'s checkpoint keys to its own on load, as a function of a key
    in the safetensors files: (the model's name for it, whether a converter must also run).

    transformers 5 renames some stored keys (GPT-NeoX stores its head as `embed_out`, held as
    `lm_head`; legacy `LayerNorm.gamma`) and converts others (MoE experts stored one by one and
    held as one fused tensor). lorakit's own readers of safetensors (the 4-bit loader, `merge`) apply
    the renames themselves and leave what needs a converter to transformers. Without the mapping
    (an older transformers, custom code) keys are taken as stored.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - the mapping is transformers-internal: without it, keys as stored
        return lambda key: (key, False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return lambda key: (key, False)

    def transform(key: str) -> tuple[str, bool]:
        renamed, converter = rename_source_key(key, renamings, converters)
        return renamed, converter is not None

    return transform


def cut_as_stored(model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`tensor`, a value of the model's tensor `name`, cut into the checkpoint keys transformers
    stores it under (its save-time conversion: MoE experts held fused, stored one by one)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, {name: tensor}))


def stored_keys(model: nn.Module, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of what transformers stores `name` (of `shape`) as (no memory)."""
    return {key: tuple(piece.shape) for key, piece in cut_as_stored(model, name, torch.empty(shape, device="meta")).items()}


def stored_pieces(model: nn.Module, name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Where the model's tensor `name` (of `shape`) is stored: checkpoint key -> the flat indices
    into the tensor of what that key holds (in the key's own shape).

    For tensors transformers converts on load (MoE experts stored one by one, Qwen3-MoE's
    gate_proj and up_proj rows in one fused gate_up_proj): its save-time conversion cuts an index
    tensor as it would cut the weight. Holds one int32 index per element of `name` while it runs.
    """
    numel = math.prod(shape)
    index = torch.arange(numel, dtype=torch.int64 if numel >= 2**31 else torch.int32).view(shape)
    return cut_as_stored(model, name, index)


def assemble_stored(
    pieces: dict[str, torch.Tensor], read: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The model's tensor put together from its stored keys (`stored_pieces`' indices; `read(key)`
    loads one), in `dtype`."""
    out = torch.empty(math.prod(shape), dtype=dtype)
    for key, index in pieces.items():
        out[index.reshape(-1).long()] = read(key).reshape(-1).to(dtype)
    return out.view(shape)


def read_stored(path: Union[str, Path], key: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)
