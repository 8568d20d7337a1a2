"""lorakit: LoRA and QLoRA fine-tuning for PyTorch and Hugging Face causal language models."""

from lorakit.adapters import load_adapter, read_adapter, save_adapter
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig, load_run_config
from lorakit.errors import UserError
from lorakit.inject import (
    count_parameters,
    delete_adapter,
    describe_trainable,
    disable_adapters,
    inject_adapter,
    merge_adapter,
    set_active_adapter,
    unload,
    unmerge_adapter,
    use_adapter,
)
from lorakit.layers import LoraLayer

__version__ = "0.1.0"

__all__ = [
    "DataConfig", "LoraConfig", "LoraLayer", "RunConfig", "TrainConfig", "UserError",
    "count_parameters", "delete_adapter", "describe_trainable", "disable_adapters", "inject_adapter",
    "load_adapter", "load_run_config", "merge_adapter", "read_adapter", "save_adapter",
    "set_active_adapter", "unload", "unmerge_adapter", "use_adapter",
]  # fmt: skip
