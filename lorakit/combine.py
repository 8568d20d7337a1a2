"""`lorakit combine`: several LoRA adapters of one base model made into one, from their files alone
(PEFT's `add_weighted_adapter`, without loading the model).

Per module, adapter i's update is D_i = s_i · B_i @ A_i ((out, in); an embedding's (dim, vocab)),
s_i its scale (alpha / r, rank_pattern / alpha_pattern / rsLoRA resolved). With weights w_i:

    cat                  A = [w_1 s_1 A_1; ...; w_k s_k A_k], B = [B_1 ... B_k], so B @ A = sum of w_i D_i
                         exactly, at rank r_1 + ... + r_k
    svd                  the best rank-r approximation of sum w_i D_i, found from the factors (QR of the
                         stacked w_i s_i B_i and A_i, SVD of the small core), never forming the sum
    ties_svd             TIES-merging (Yadav et al. 2023): each D_i keeps its `density` share of
                         largest magnitudes; each entry takes the sign of the kept D_i's sum ("total")
                         or of their signs' count ("frequency"); the result is sum w_i D_i over the D_i
                         of that sign, divided by how many there are; then rank r
    dare_linear_svd      DARE (Yu et al. 2024): each D_i keeps each entry with probability `density`,
                         divided by it; then sum w_i D_i, rank r
    dare_ties_svd        DARE's pruning, then TIES' sign election and disjoint merge, rank r
    magnitude_prune_svd  each D_i keeps its `density` share of largest magnitudes; sum w_i D_i, rank r

as PEFT's methods of these names compute them, with its split of a rank-r result: B = U_r · S_r,
A = V_rᵀ. r is `rank` (default: the largest rank of the adapters, PEFT's default), at most a
module's smaller dimension. Only the adapters that hold a module take part in it. With a single
adapter the method is applied as asked (PEFT falls back to its rough `linear` then), so one adapter
can be scaled, pruned or cut to a lower rank. The written
adapter is a plain LoRA of one rank, the largest (a module of a smaller one padded with zeros, which
leave B @ A as it is), with alpha equal to it (s = 1) and `target_modules` the exact module paths:
PEFT and lorakit load it, and servers that read one rank and scale for every module (vLLM:
lora_alpha / r; llama.cpp: alpha / each tensor's rank, no rsLoRA) apply each module's update as
trained. So one adapter with per-module ranks or alphas, or rsLoRA, combined alone (cat, weight 1)
is the same adapter in a form every LoRA reader takes alike. DARE draws its masks from a generator
seeded from `seed` and the module's path, so a module's result does not depend on the others.

Refused: adapters whose update is not s · B @ A alone (DoRA's row magnitudes; PiSSA / OLoRA, which
move part of the base: `lorakit convert` writes them as plain LoRA first), `modules_to_save`
copies, which do not add up, and MoE expert weights (PEFT refuses these too). A base weight PEFT
saves beside an adapted embedding is carried over.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from lorakit.adapters import (
    PREFIX, AdapterFiles, adapter_scaling, check_factor_values, check_lora_pair, check_output_folder, read_adapter,
    write_adapter_folder,
)  # fmt: skip
from lorakit.errors import UserError
from lorakit.inject import _pattern_value, selected_by_name, unselected_weights

METHODS = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
# the methods that prune each update first, and so need `density`
PRUNING_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")

# a base weight PEFT saves beside an adapted embedding (a resized vocabulary's): carried over as it is
BASE_WEIGHT_SUFFIX = ".base_layer.weight"
# the factor pairs of the modules an adapter file holds: (A key suffix, B key suffix)
_FACTORS = {"linear": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}


@dataclass
class CombineReport:
    out_dir: Path
    method: str
    adapters: int
    modules: int
    rank: int
    notes: list[str]

    def summary(self) -> str:
        what = "1 adapter" if self.adapters == 1 else f"{self.adapters} adapters"
        lines = [f"combined {what} ({self.method}) over {self.modules} modules into an adapter of rank up to {self.rank} "
                 f"-> {self.out_dir}"]  # fmt: skip
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def combine_adapters(
    adapter_dirs: list[Union[str, Path]],
    out_dir: Union[str, Path],
    *,
    weights: Optional[list[float]] = None,
    method: str = "cat",
    rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign: str = "total",
    seed: int = 0,
    force: bool = False,
) -> CombineReport:
    """Write the combination of the adapters in `adapter_dirs` (see the module docstring) to `out_dir`.

    weights: one per adapter (default 1 each; negative ones subtract). rank: the svd methods'
    (default: the largest of the adapters' ranks). density: the pruning methods' kept share, in (0, 1].

    Raises:
        UserError: unreadable adapters, adapters that cannot be combined or do not fit each other,
            bad options, a non-empty `out_dir` without `force`.
    """
    _check_options(adapter_dirs, weights, method, rank, density, majority_sign)
    weights = list(weights) if weights is not None else [1.0] * len(adapter_dirs)
    out_dir = check_output_folder(out_dir, {f"adapter {i + 1}": d for i, d in enumerate(adapter_dirs)}, force, writes_adapter=True)
    files = [read_adapter(d) for d in adapter_dirs]
    for f in files:
        _check_combinable(f)
    factors = [_module_factors(f) for f in files]
    paths = sorted({p for fs in factors for p in fs})
    _check_shapes(files, factors, paths)
    if method != "cat" and rank is None:
        rank = max(max([f.config.r, *f.config.rank_pattern.values()]) for f in files)
    # the adapters' dtype, or fp32 where they differ (bf16 and fp16 hold no common 16-bit values)
    dtypes = {t.dtype for fs in factors for _, a, b, _ in fs.values() for t in (a, b)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    tensors, ranks, kinds = {}, {}, {}
    for path in paths:
        parts = [(w, fs[path]) for w, fs in zip(weights, factors) if path in fs]  # (w_i, (kind, A_i, B_i, s_i))
        kind = parts[0][1][0]
        if method == "cat":
            a = torch.cat([w * s * a_i.float() for w, (_, a_i, _, s) in parts])
            b = torch.cat([b_i.float() for _, (_, _, b_i, _) in parts], dim=1)
        else:
            try:
                a, b = _low_rank(method, parts, rank, density, majority_sign, _module_seed(seed, path))
            except torch.linalg.LinAlgError:  # an SVD of numbers out of range: reported below as such
                a = b = None
        if a is None or not _finite(a.to(dtype), b.to(dtype)):
            raise UserError(f"{path}: the combination is not finite in {str(dtype).replace('torch.', '')} (weights "
                            f"{', '.join(map(str, weights))}); use smaller weights")  # fmt: skip
        tensors[path], ranks[path], kinds[path] = (a.to(dtype), b.to(dtype)), a.shape[0], kind
    # every module at the largest rank, zeros beyond its own (B @ A unchanged): one r and one scale,
    # which is all vLLM (lora_alpha / r for every module) and llama.cpp (alpha / each tensor's rank) read
    r = max(ranks.values())
    padded = total = 0
    for path in paths:
        a, b = tensors.pop(path)
        padded += (r - a.shape[0]) * (a.shape[1] + b.shape[0])
        total += r * (a.shape[1] + b.shape[0])
        a_key, b_key = _FACTORS[kinds[path]]
        tensors[f"{PREFIX}{path}{a_key}"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])]).contiguous()
        tensors[f"{PREFIX}{path}{b_key}"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1).contiguous()
    tensors.update(_base_weights(files))
    write_adapter_folder(out_dir, _peft_config(files, sorted(paths), r), tensors)
    notes = []
    if padded:
        notes.append(f"modules of a smaller rank are padded with zeros to rank {r} (one rank for servers): {padded:,} of the "
                     f"file's {total:,} LoRA values ({100 * padded / total:.0f}%) are those zeros")  # fmt: skip
    bases = list(dict.fromkeys(str(f.peft_config.get("base_model_name_or_path")) for f in files))
    if len(bases) > 1:
        notes.append(f"the adapters name different base models ({', '.join(bases)}); their shapes fit, the base "
                     f"written is the first one's")  # fmt: skip
    return CombineReport(out_dir, method, len(files), len(paths), r, notes)


def _check_options(adapter_dirs: list, weights: Optional[list[float]], method: str, rank: Optional[int],
                   density: Optional[float], majority_sign: str) -> None:  # fmt: skip
    if not adapter_dirs:
        raise UserError("combine needs at least one --adapter")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise UserError(f"--weights: {len(weights)} given for {len(adapter_dirs)} adapters; give one weight per adapter, in their order")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise UserError(f"--weights {' '.join(map(str, weights))}: every weight must be a finite number")
    if rank is not None and method == "cat":
        raise UserError("--rank: cat keeps every adapter's rank (their sum); use --method svd for a chosen rank")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be a positive integer")
    if method in PRUNING_METHODS and density is None:
        raise UserError(f"--method {method} prunes each update first; give --density, the share kept, e.g. 0.5")
    if density is not None and method not in PRUNING_METHODS:
        raise UserError(f"--density: {method} prunes nothing; it is for {', '.join(PRUNING_METHODS)}")
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density {density}: must be in (0, 1], the share of each update kept")
    if majority_sign not in SIGN_METHODS:
        raise UserError(f"--majority-sign {majority_sign!r}: use total or frequency")


def _check_combinable(files: AdapterFiles) -> None:
    config, where = files.config, files.path
    reasons = []
    if config.dora:
        reasons.append("DoRA rescales each row by a trained magnitude, so its update is no B @ A to add")
    if config.init in ("pissa", "olora"):
        reasons.append(f"a {config.init} adapter moves part of the base into itself; write it as a plain LoRA first "
                       "(lorakit convert) and combine that")  # fmt: skip
    if config.modules_to_save:
        reasons.append(f"its modules_to_save ({', '.join(config.modules_to_save)}) are whole trained copies, which do not add up")
    if config.target_parameters:
        reasons.append("MoE expert weights (target_parameters) are not combined, as in PEFT")
    if reasons:
        raise UserError(f"{where}: cannot combine this adapter: {reasons[0]}")


def _module_factors(files: AdapterFiles) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, float]]:
    """module path -> (kind, A (r, in), B (out, r), scale s) of every module the file holds."""
    out, seen = {}, set()
    for key, tensor in files.tensors.items():
        if not tensor.is_floating_point():
            raise UserError(f"{files.path}: {key} holds {tensor.dtype} numbers; LoRA factors are floating point")
        for kind, (a_suffix, b_suffix) in _FACTORS.items():
            if key.endswith(a_suffix) and key.startswith(PREFIX):
                path = key[len(PREFIX) : -len(a_suffix)]
                if not selected_by_name(path, files.config):  # PEFT loads the adapter without them: no part of its update
                    raise UserError(unselected_weights(files.path, path, files.config))
                b_key = f"{PREFIX}{path}{b_suffix}"
                if b_key not in files.tensors:
                    raise UserError(f"{files.path}: {key} has no {b_key}; the adapter file is incomplete")
                a, b = files.tensors[key], files.tensors[b_key]
                check_lora_pair(files.path, path, a, b, None, _pattern_value(path, files.config.rank_pattern, files.config.r))
                check_factor_values(files.path, f"module {path}", a, b)
                out[path] = (kind, a, b, adapter_scaling(files.config, path))
                seen.update((key, b_key))
    other = sorted(k for k in set(files.tensors) - seen if not k.endswith(BASE_WEIGHT_SUFFIX))
    if other:
        b_suffixes = tuple(b for _, b in _FACTORS.values())
        if other[0].endswith(b_suffixes):
            raise UserError(f"{files.path}: {other[0]} has no A factor beside it; the adapter file is incomplete")
        raise UserError(f"{files.path}: {other[0]} is no LoRA factor (A or B); only plain LoRA adapters combine")
    if not out:
        raise UserError(f"{files.path}: the adapter holds no LoRA modules")
    return out


def _check_shapes(files: list[AdapterFiles], factors: list[dict], paths: list[str]) -> None:
    """Every adapter that holds a module adapts it with the same kind and shape, and its modules lie in
    the same model as the others' (an adapter whose nested paths share no first part with theirs,
    GPT-2's transformer.h.* beside Llama's model.layers.*, is another model's: their union loads on
    neither). A model's top-level modules (lm_head, beside model.* or transformer.*) tell nothing."""
    roots = [{path.split(".")[0] for path in fs if "." in path} for fs in factors]
    for i in range(1, len(files)):  # each against those before it, so the odd one out is named
        before = set().union(*roots[:i])
        if roots[i] and before and not roots[i] & before:
            raise UserError(
                f"{files[i].path}: adapts modules under {', '.join(sorted(roots[i]))}.*, the other adapters under "
                f"{', '.join(sorted(before))}.*: it is another model's adapter; combine adapters of one base model"
            )
    for path in paths:
        held = [(f.path, fs[path]) for f, fs in zip(files, factors) if path in fs]
        first, (kind, a, b, _) = held[0]
        for other, (other_kind, a2, b2, _) in held[1:]:
            if (other_kind, a2.shape[1], b2.shape[0]) != (kind, a.shape[1], b.shape[0]):
                raise UserError(
                    f"{path}: {first} adapts it as {kind} ({b.shape[0]} x {a.shape[1]}) and {other} as {other_kind} "
                    f"({b2.shape[0]} x {a2.shape[1]}); the adapters are not for the same base model"
                )


def _base_weights(files: list[AdapterFiles]) -> dict[str, torch.Tensor]:
    """The base weights the adapters carry (PEFT's saved embeddings), which must agree where shared."""
    out: dict[str, tuple[Path, torch.Tensor]] = {}
    for f in files:
        for key, tensor in f.tensors.items():
            if not key.endswith(BASE_WEIGHT_SUFFIX):
                continue
            if key in out and not torch.equal(out[key][1], tensor):
                raise UserError(f"{key}: {out[key][0]} and {f.path} carry different base weights (a vocabulary resized "
                                "differently?); the adapters are not for the same base model")  # fmt: skip
            out[key] = (f.path, tensor)
    return {key: tensor for key, (_, tensor) in out.items()}


def _finite(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isfinite(a).all() and torch.isfinite(b).all())


def _module_seed(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") >> 1


def _low_rank(method: str, parts: list, rank: int, density: Optional[float], majority_sign: str,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A (r, in), B (out, r)) of the rank-r approximation of the module's combined update."""
    if method == "svd":  # the sum has rank <= sum r_i: its SVD from the factors' QRs and the small core
        bs = torch.cat([w * s * b.float() for w, (_, _, b, s) in parts], dim=1)  # (out, R)
        as_ = torch.cat([a.float() for _, (_, a, _, _) in parts])  # (R, in)
        q_b, r_b = torch.linalg.qr(bs)
        q_a, r_a = torch.linalg.qr(as_.t())
        u, sv, vh = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)
        u, vh = q_b @ u, vh @ q_a.t()
    else:
        updates = [s * (b.float() @ a.float()) for _, (_, a, b, s) in parts]
        merged = _merge_updates(method, updates, [w for w, _ in parts], density, majority_sign, seed)
        u, sv, vh = torch.linalg.svd(merged, full_matrices=False)
    out_dim, in_dim = parts[0][1][2].shape[0], parts[0][1][1].shape[1]
    r = min(rank, out_dim, in_dim)
    keep = min(r, sv.shape[0])
    b = torch.zeros(out_dim, r)
    a = torch.zeros(r, in_dim)
    b[:, :keep] = u[:, :keep] * sv[:keep]
    a[:keep] = vh[:keep]
    return a, b


def _merge_updates(method: str, updates: list[torch.Tensor], weights: list[float], density: float,
                   majority_sign: str, seed: int) -> torch.Tensor:  # fmt: skip
    """The pruning methods' combination of full updates D_i (out, in) with weights w_i."""
    if density < 1:
        if method.startswith("dare"):
            generator = torch.Generator().manual_seed(seed)
            updates = [d * torch.bernoulli(torch.full_like(d, density), generator=generator) / density for d in updates]
        else:
            updates = [_keep_largest(d, density) for d in updates]
    stacked = torch.stack(updates)  # (k, out, in)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    if method in ("dare_linear_svd", "magnitude_prune_svd"):
        return (stacked * w).sum(0)
    # TIES: the sign each entry is elected (from the unweighted updates, as PEFT), then the mean of
    # the weighted updates of that sign
    votes = stacked.sum(0) if majority_sign == "total" else stacked.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(update: torch.Tensor, density: float) -> torch.Tensor:
    """`update` with all but its int(density * numel) largest magnitudes zeroed (PEFT's count)."""
    k = int(density * update.numel())
    mask = torch.zeros(update.numel(), dtype=update.dtype)
    mask[update.abs().flatten().topk(k).indices] = 1
    return update * mask.view_as(update)


def _peft_config(files: list[AdapterFiles], paths: list[str], r: int) -> dict:
    """The combined adapter's adapter_config.json: a plain LoRA of rank r on exactly these modules, s = 1."""
    raw = dict(files[0].peft_config)
    raw.update(
        r=r, lora_alpha=r, rank_pattern={}, alpha_pattern={}, target_modules=paths,
        exclude_modules=None, layers_to_transform=None, layers_pattern=None, use_rslora=False, init_lora_weights=True,
        use_dora=False, modules_to_save=None, target_parameters=None,
        fan_in_fan_out=any(bool(f.peft_config.get("fan_in_fan_out")) for f in files),
    )  # fmt: skip
    return raw


def combine_command(args: argparse.Namespace) -> int:
    report = combine_adapters(
        args.adapter, args.out, weights=args.weights, method=args.method, rank=args.rank, density=args.density,
        majority_sign=args.majority_sign, seed=args.seed, force=args.force,
    )  # fmt: skip
    print(report.summary())
    return 0
