"""Training checkpoints: everything needed to resume a run exactly.

    checkpoints/step-<N>/
        adapter/            the adapter in PEFT format (loadable on its own)
        optimizer.pt        optimizer state (tensors; loaded with weights_only=True, never unpickled freely)
        rng.pt              torch CPU (and CUDA) RNG states, same loading rule
        state.json          step, data-stream position, scheduler step, run fingerprint

Each checkpoint is built under a temporary name and renamed into place, so a crash mid-write
never leaves a half checkpoint that looks complete; only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lorakit.adapters import replace_dir, save_adapter
from lorakit.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: Union[str, Path]) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: Union[str, Path],
    step: int,
    *,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    base_model_name_or_path: Optional[str] = None,
    adapter_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically and prune to the newest `keep`; adapter_files:
    text files written into its adapter folder too (a chat template)."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    try:
        save_adapter(model, staging / "adapter", base_model_name_or_path=base_model_name_or_path, extra_files=adapter_files)
        torch.save(optimizer_state, staging / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state, optimizer_state, rng) of a checkpoint folder; tensors load with weights_only=True."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is damaged ({exc.__class__.__name__}: {exc}); delete it to resume from an older one") from None
    return state, optimizer_state, rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
