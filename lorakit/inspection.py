"""`lorakit inspect`: what an adapter holds, how big each update is, and whether it fits a base.

Per LoRA module the update is ΔW = s · B @ A (B: (out, r), A: (r, in)). Its singular values come
from two thin QR factorisations, never from the (out, in) matrix:

    B = Q_B R_B,  A^T = Q_A R_A   =>   ΔW = Q_B (s · R_B R_A^T) Q_A^T

so the singular values of ΔW are those of the r x r matrix s · R_B R_A^T (Q_B, Q_A have
orthonormal columns). From them:
    norm            ||ΔW||_F = sqrt(sum σ_i^2)
    rank_1pct       how many σ_i exceed 1% of σ_1 (the directions the update really uses)
    effective_rank  exp(entropy of p_i = σ_i / sum σ_j) (Roy & Vetterli 2007): 1 for a single
                    direction, r when all r are equal
With a base model, the check reads only the safetensors headers (names, shapes, dtypes) and then
loads just the targeted weights, for the relative size ||ΔW||_F / ||W||_F.

MoE expert weights (`target_parameters`, lorakit.experts) get one row per fused weight: the norm
over all experts' updates, the largest rank>1% of any expert and the experts' mean effective rank.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

from lorakit.adapters import check_factor_values, check_lora_pair, read_adapter
from lorakit.errors import UserError
from lorakit.layers import PRINCIPAL_INITS


def update_spectrum(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values (descending) of scale · B @ A, via QR of B and A^T (r x r SVD)."""
    _, r_b = torch.linalg.qr(b.double())  # (out, r) -> R_B (r, r)
    _, r_a = torch.linalg.qr(a.double().t())  # (in, r) -> R_A (r, r)
    return torch.linalg.svdvals(scale * (r_b @ r_a.t()))


def spectrum_stats(sv: torch.Tensor) -> dict[str, float]:
    norm = float(sv.pow(2).sum().sqrt())
    top = float(sv[0]) if len(sv) else 0.0
    if top == 0.0:
        return {"norm": 0.0, "rank_1pct": 0, "effective_rank": 0.0}
    p = sv / sv.sum()
    p = p[p > 0]
    return {
        "norm": norm,
        "rank_1pct": int((sv > 0.01 * top).sum()),
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
    }


def inspect_adapter(adapter_dir: Union[str, Path], base_dir: Union[str, Path, None] = None) -> dict[str, Any]:
    """A summary of the adapter as a JSON-ready dict (see the module docstring for the numbers).

    With `base_dir`: `base` holds `untouched` (linear modules the adapter leaves alone) and each
    module gets `relative` = ||ΔW|| / ||W||.

    Raises:
        UserError: missing or invalid adapter folder; with a base, the first adapter tensor or
            module that does not fit it (both shapes named).
    """
    from lorakit.adapters import PREFIX
    from lorakit.inject import _pattern_value, selected_by_name, unselected_weights
    from lorakit.merge import plan_merge, read_base_layout

    files = read_adapter(adapter_dir)
    config = files.config
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: list[dict[str, Any]] = []
    base_weights: list[dict[str, Any]] = []
    expert_rows, expert_keys = _expert_modules(files)
    for key, tensor in files.tensors.items():
        if key in expert_keys:
            continue
        if not key.startswith(PREFIX):
            raise UserError(f"{files.path}: adapter tensor {key} does not start with {PREFIX!r}; not a PEFT LoRA adapter")
        name = key[len(PREFIX) :]
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B"), (".lora_magnitude_vector", "M")):  # fmt: skip
            if name.endswith(suffix):
                entry = pairs.setdefault(name[: -len(suffix)], {})
                entry[slot] = tensor
                entry["embedding"] = entry.get("embedding", False) or "embedding" in suffix
                break
        else:
            _check_saved(files, key, name)
            entry = {"tensor": name, "shape": list(tensor.shape), "params": tensor.numel()}
            # PEFT saves an adapted embedding's own (base) weight too: no module of modules_to_save
            (base_weights if name.endswith(".base_layer.weight") else saved).append(entry)
    modules = []
    for path, entry in sorted(pairs.items(), key=lambda kv: _natural(kv[0])):
        if "A" not in entry or "B" not in entry:
            raise UserError(f"{files.path}: module {path} has only one of its two LoRA matrices; the adapter file is incomplete")
        a, b = entry["A"], entry["B"]
        check_lora_pair(files.path, path, a, b, entry.get("M"), _pattern_value(path, config.rank_pattern, config.r))
        if not selected_by_name(path, config):  # every loader refuses it; PEFT would not load these weights
            raise UserError(unselected_weights(files.path, path, config))
        check_factor_values(files.path, f"module {path}", a, b)
        scale = _scaling(config, path)
        stats = spectrum_stats(update_spectrum(a, b, scale))
        modules.append({
            "module": path,
            "kind": "embedding" if entry["embedding"] else "linear",
            "r": int(a.shape[0]),
            "alpha": float(_pattern_value(path, config.alpha_pattern, config.alpha)),
            "scaling": scale,
            "shape": [int(b.shape[0]), int(a.shape[1])],
            "params": a.numel() + b.numel() + (entry["M"].numel() if "M" in entry else 0),
            "dora": "M" in entry,
            **stats,
        })  # fmt: skip
    modules = sorted(modules + expert_rows, key=lambda m: _natural(m["module"]))
    result: dict[str, Any] = {
        "adapter": str(files.path),
        "targets": config.targets,
        # what narrows the targets (adapter_config.json's exclude_modules, layers_to_transform, layers_pattern)
        "exclude": config.exclude,
        "layers": config.layers,
        "layers_pattern": config.layers_pattern,
        "target_parameters": config.target_parameters,
        "r": config.r,
        "alpha": config.alpha,
        "rslora": config.rslora,
        "dora": config.dora,
        "init": config.init,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "modules_to_save": saved,
        "base_weights": base_weights,
        "lora_modules": len(modules),
        "params": sum(t.numel() for t in files.tensors.values()),
        "lora_params": sum(m["params"] for m in modules),
        "file_bytes": files.file_bytes,
        "modules": modules,
    }
    if base_dir is not None:
        layout = read_base_layout(base_dir, need_tokenizer=False)
        plan = plan_merge(layout, files)  # raises on the first mismatch, from the headers alone
        touched = {u.path for u in plan.updates.values()} | {u.path for u in plan.experts.values()}
        if layout.kinds:
            linear = [p for p, k in layout.kinds.items() if k in ("linear", "conv1d")]
        else:
            linear = [k.rpartition(".")[0] for k, s in layout.shapes.items() if k.endswith(".weight") and len(s) == 2]
        untouched = [
            p for p in linear
            if p not in touched and p.partition(".")[2] not in touched and layout.key_for(p) not in plan.replace
        ]  # fmt: skip
        by_path = {m["module"]: m for m in modules}
        for key, update in plan.updates.items():
            stored = layout.tied.get(key, key) if key not in layout.shapes else key
            with safe_open(str(layout.files[stored]), framework="pt") as f:
                w = f.get_tensor(stored).float()
            w_norm = float(w.double().norm())
            # what merging changes; for PiSSA / OLoRA not s·B@A, which started as W's principal part
            exact = update.init in PRINCIPAL_INITS or update.magnitude is not None
            change = float(update.delta(w).double().norm()) if exact else by_path[update.path]["norm"]
            by_path[update.path]["kind"] = update.kind
            by_path[update.path]["relative"] = change / w_norm if w_norm else math.inf
        for update in dict.fromkeys(plan.experts.values()):  # each fused weight once, over its stored keys
            w_norm = 0.0
            for key in update.stored:
                with safe_open(str(layout.files[key]), framework="pt") as f:
                    w_norm += float(f.get_tensor(key).double().norm()) ** 2
            row = by_path[f"{update.path}.{update.param}"]
            row["relative"] = row["norm"] / math.sqrt(w_norm) if w_norm else math.inf
        result["base"] = {
            "model": str(layout.folder),
            "compatible": True,
            "untouched": untouched,
            "replaced": sorted(plan.replace),
        }
    return result


def _expert_modules(files) -> tuple[list[dict[str, Any]], set[str]]:
    """Rows for the adapter's expert weights (lorakit.experts) and the file keys they use.

    PEFT's keys do not name the weight, only its nesting depth, which follows the order the experts
    module registers its weights: transformers' experts classes all register the first projection
    (gate_up_proj or up_proj) before down_proj, so that order decodes them without the model."""
    from lorakit.adapters import PREFIX, expert_peft_keys
    from lorakit.experts import FIRST_PROJECTIONS, SECOND_PROJECTIONS, expert_factors
    from lorakit.inject import _pattern_value

    config = files.config
    if not config.target_parameters:
        return [], set()
    canonical = FIRST_PROJECTIONS + SECOND_PROJECTIONS
    leaves = sorted({t.rpartition(".")[2] for t in config.target_parameters} & set(canonical), key=canonical.index)
    paths = set()
    for key in files.tensors:
        name = key[len(PREFIX) :]
        if name.endswith(".lora_A.weight"):
            path = name[: -len(".lora_A.weight")]
            while path.endswith(".base_layer"):
                path = path[: -len(".base_layer")]
            paths.add(path)
    rows, used = [], set()
    for path in paths:
        params = [p for p in leaves if any(f"{path}.{p}" == t or f"{path}.{p}".endswith("." + t) for t in config.target_parameters)]
        if not params:
            continue
        for param, (a_key, b_key) in expert_peft_keys(path, params).items():
            if a_key not in files.tensors or b_key not in files.tensors:
                raise UserError(f"{files.path}: the adapter has no {a_key if a_key not in files.tensors else b_key}, which its "
                                "target_parameters imply; the file is incomplete")  # fmt: skip
            a, b = files.tensors[a_key], files.tensors[b_key]
            used.update((a_key, b_key))
            r = _pattern_value(f"{path}.{param}", config.rank_pattern, config.r)
            experts = a.shape[0] // r if a.dim() == 2 else 0
            if experts < 1 or a.shape[0] != experts * r or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise UserError(
                    f"{files.path}: {path}.{param}: adapter A {tuple(a.shape)}, B {tuple(b.shape)} are not the experts' "
                    f"LoRA matrices of rank {r} (A (experts·r, in), B (out, r·experts)); the adapter file is damaged, or "
                    "its adapter_config.json is another adapter's"
                )
            check_factor_values(files.path, f"{path}.{param}", a, b)
            scale = _scaling(config, f"{path}.{param}")
            a_e, b_e = expert_factors(a, b, experts)
            per_expert = [spectrum_stats(update_spectrum(a_e[e], b_e[e], scale)) for e in range(experts)]
            rows.append({
                "module": f"{path}.{param}",
                "kind": "experts",
                "r": r,
                "alpha": float(_pattern_value(f"{path}.{param}", config.alpha_pattern, config.alpha)),
                "scaling": scale,
                "shape": [experts, int(b.shape[0]), int(a.shape[1])],
                "params": a.numel() + b.numel(),
                "norm": math.sqrt(sum(st["norm"] ** 2 for st in per_expert)),
                "rank_1pct": max(st["rank_1pct"] for st in per_expert),
                "effective_rank": sum(st["effective_rank"] for st in per_expert) / experts,
            })  # fmt: skip
    return rows, used


def _check_saved(files, key: str, name: str) -> None:
    """Raise a UserError unless the non-LoRA tensor `name` is one PEFT saves: a copy of a module in
    modules_to_save, or the base weight of a targeted module (`.base_layer.weight`)."""
    parts = name.split(".")
    modules = [".".join(parts[:i]) for i in range(1, len(parts))]  # every module the tensor is under
    # PEFT's own rule: a module whose name ends with an entry, at a dot or not ("norm" saves every
    # input_layernorm too), as the adapter's loaders take it (adapters._with_saved_modules_as_peft_took_them)
    saved = any(m.endswith(t) for m in modules for t in files.config.modules_to_save)
    if saved or name.endswith(".base_layer.weight"):
        return
    raise UserError(
        f"{files.path}: adapter tensor {key} is no LoRA matrix (lora_A / lora_B / lora_embedding_A / lora_embedding_B / "
        "lora_magnitude_vector) and no module of modules_to_save; the adapter file is damaged, or not a LoRA adapter"
    )


def _scaling(config, path: str) -> float:
    from lorakit.adapters import adapter_scaling

    return adapter_scaling(config, path)


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def format_report(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_adapter`'s result."""
    lines = [
        f"adapter   {info['adapter']}",
        f"targets   {info['targets']}"
        + (f", exclude {info['exclude']}" if info.get("exclude") else "")
        + (f", layers {info['layers']}" if info.get("layers") is not None else "")
        + (f" of {info['layers_pattern']}" if info.get("layers_pattern") else "")
        + (f", expert weights {info['target_parameters']}" if info.get("target_parameters") else ""),
        f"rank      r={info['r']}, alpha={info['alpha']:g}{', rsLoRA' if info['rslora'] else ''}"
        + (", DoRA" if info.get("dora") else "")
        + (f", rank_pattern={info['rank_pattern']}" if info["rank_pattern"] else "")
        + (f", alpha_pattern={info['alpha_pattern']}" if info["alpha_pattern"] else ""),
        f"params    {info['params']:,} ({info['lora_params']:,} in {info['lora_modules']} LoRA modules"
        + (f", {sum(s['params'] for s in info['modules_to_save']):,} in modules_to_save" if info["modules_to_save"] else "")
        + (f", {sum(s['params'] for s in info['base_weights']):,} in base weights PEFT saves beside embedding LoRA"
           if info.get("base_weights") else "")
        + f"); file {info['file_bytes'] / 2**20:.2f} MiB",
        "",
    ]
    relative = "base" in info
    header = ["module", "kind", "shape", "r", "alpha", "scale", "||ΔW||", "rank>1%", "eff.rank"] + (["||ΔW||/||W||"] if relative else [])
    rows = [header]
    for m in info["modules"]:
        row = [m["module"], m["kind"], "x".join(map(str, m["shape"])), str(m["r"]), f"{m['alpha']:g}", f"{m['scaling']:.4g}",
               f"{m['norm']:.4g}", str(m["rank_1pct"]), f"{m['effective_rank']:.2f}"]  # fmt: skip
        if relative:
            row.append(f"{m.get('relative', float('nan')):.3e}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("rank>1%: singular values of s·B@A above 1% of the largest; eff.rank: exp(entropy of the normalised spectrum)")
    if any(m["kind"] == "experts" for m in info["modules"]):
        lines.append("experts rows (shape experts x out x in): ||ΔW|| over all experts, the largest rank>1% of any expert, "
                     "the experts' mean eff.rank")  # fmt: skip
    if any(m.get("dora") for m in info["modules"]):
        lines.append("DoRA: the rows also rescale to trained magnitudes, so ||ΔW|| and the spectrum are of s·B@A, not of the "
                     "change to W" + ("; ||ΔW||/||W|| is the change merging makes" if relative else
                                      "; --base shows the change merging makes"))  # fmt: skip
    if info.get("init") in PRINCIPAL_INITS:
        lines.append(f"init {info['init']}: B@A started as the base weight's principal part, which the base lost, so ||ΔW|| and "
                     "the spectrum are of s·B@A, not of the change to W" + ("; ||ΔW||/||W|| is the change merging makes"
                     if relative else "; --base shows the change merging makes"))  # fmt: skip
    for s in info["modules_to_save"] + info.get("base_weights", []):
        lines.append(f"saved in full: {s['tensor']} {tuple(s['shape'])}")
    if relative:
        base = info["base"]
        lines.append(f"\nbase {base['model']}: every adapter tensor fits (names and shapes checked from the headers)")
        lines.append(f"linear modules left untouched: {len(base['untouched'])}"
                     + (f" ({', '.join(base['untouched'][:6])}{', ...' if len(base['untouched']) > 6 else ''})"
                        if base["untouched"] else ""))  # fmt: skip
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.adapter, args.base)
    if getattr(args, "json", False):
        print(json.dumps(info))
    else:
        print(format_report(info))
    return 0
