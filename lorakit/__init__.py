"""lorakit: LoRA and QLoRA fine-tuning for PyTorch and Hugging Face causal language models.

The names below are imported on first use (PEP 562), not with the package: the command line's
`--help` and `--version` then answer without the second and a half that importing torch takes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_adapter": "lorakit.adapters", "read_adapter": "lorakit.adapters", "save_adapter": "lorakit.adapters",
    "DataConfig": "lorakit.config", "LoraConfig": "lorakit.config", "RunConfig": "lorakit.config",
    "TrainConfig": "lorakit.config", "load_run_config": "lorakit.config",
    "UserError": "lorakit.errors",
    "count_parameters": "lorakit.inject", "delete_adapter": "lorakit.inject", "describe_trainable": "lorakit.inject",
    "disable_adapters": "lorakit.inject", "inject_adapter": "lorakit.inject", "merge_adapter": "lorakit.inject",
    "set_active_adapter": "lorakit.inject", "unload": "lorakit.inject", "unmerge_adapter": "lorakit.inject",
    "use_adapter": "lorakit.inject",
    "LoraLayer": "lorakit.layers",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
