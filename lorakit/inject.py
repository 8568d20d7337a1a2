"""Putting adapters into a model and managing them: inject, switch, disable, merge, unload.

Works on any `nn.Module`: layers are chosen by their module path (`model.layers.0.self_attn.q_proj`),
wrapped in place by `LoraLayer`, and everything else is frozen. The LoRA configs of the adapters
on a model are kept in `model.lora_configs` (name -> LoraConfig) so they can be saved with the
weights.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import re
from typing import Iterator, Optional, Union

import torch
from torch import nn

from lorakit.config import LoraConfig, block_index_regex
from lorakit.errors import UserError
from lorakit.experts import LoraExperts, expert_parameter_names, is_experts_module
from lorakit.layers import LoraLayer, base_kind

# PEFT's reading of a block index for layers_to_transform (check_target_module_exists), kept
# character for character so lorakit and PEFT select the same modules from one adapter_config.json.
# Without layers_pattern: the first `<name>.<i>.` after at least one other name, lazily, so
# `model.layers.3.mlp.experts.7.down_proj` is block 3, not expert 7, and a block list at the root
# (`layers.0.q_proj`) or a module that is itself a block (`model.layers.3`) has no index.
_DEFAULT_BLOCK_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class SavedModule(nn.Module):
    """A module trained in full for an adapter (`modules_to_save`): one copy per adapter.

    The original stays untouched so disabling or switching adapters gives the base model back. A
    copy of a 16-bit module keeps fp32 parameters, as the LoRA matrices do: trained in bf16, an
    update smaller than the weight's rounding step is lost (at lr 1e-5, most of an embedding's rows
    would never move). Its forward runs in the original's dtypes, as the model around it does.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False

    def add_copy(self, name: str) -> None:
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            if p.is_floating_point() and p.element_size() < 4:
                p.data = p.data.float()
            p.requires_grad_(True)
        self.copies[name] = clone
        if self.active_adapter is None:
            self.active_adapter = name

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.copies:
            return self.original
        return self.copies[self.active_adapter]

    def forward(self, *args, **kwargs):
        module = self.current()
        params = self._in_original_dtypes(module) if module is not self.original else None
        if params is None:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, params, args, kwargs)

    def _in_original_dtypes(self, module: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """`module`'s parameters in the original's dtypes, None where they are in them already. Without
        gradients (eval, generation: a forward per new token) a cast is kept until its parameter
        changes (its version moves when the optimizer updates it in place), not made every call."""
        dtypes = {name: p.dtype for name, p in self.original.named_parameters()}
        params = dict(module.named_parameters())
        if all(p.dtype == dtypes.get(name, p.dtype) for name, p in params.items()):
            return None
        casts = self.__dict__.setdefault("_casts", {})  # (name -> (parameter, version, cast)); not state
        out = {}
        for name, p in params.items():
            dtype = dtypes.get(name, p.dtype)
            if p.dtype == dtype:
                out[name] = p
            elif torch.is_grad_enabled() and p.requires_grad:
                out[name] = p.to(dtype)
            else:
                kept = casts.get(name)
                if kept is None or kept[0] is not p or kept[1] != p._version:
                    kept = casts[name] = (p, p._version, p.detach().to(dtype))
                out[name] = kept[2]
        return out

    def settle(self, name: str) -> None:
        """Store adapter `name`'s copy in the original's dtypes: a copy that is not trained (an adapter
        loaded for inference) needs no fp32 master, and runs without a cast."""
        with torch.no_grad():
            dtypes = {n: p.dtype for n, p in self.original.named_parameters()}
            for n, p in self.copies[name].named_parameters():
                p.data = p.data.to(dtypes.get(n, p.dtype))

    def as_plain_module(self) -> nn.Module:
        """The current copy (or the original) as the model's own module, its parameters in the
        original's dtypes: what `unload` puts in the wrapper's place."""
        module = self.current()
        if module is not self.original:
            self.settle(self.active_adapter)
        return module

    def __getattr__(self, name: str):
        # Callers of e.g. `model.lm_head.weight` expect the wrapped module's attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)


def _is_target(path: str, targets: Union[list[str], str, None]) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _pattern_value(path: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the key matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_patterns(adapted: list[str], config: LoraConfig) -> None:
    """Refuse a rank_pattern / alpha_pattern key that matches none of the `adapted` paths."""
    for option in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, option):
            if any(re.match(rf"(.*\.)?({key})$", path) for path in adapted):
                continue
            ends = sorted({path.split(".")[-1] for path in adapted})
            close = difflib.get_close_matches(key.split(".")[-1], ends, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"lora.{option}: {key!r} matches none of the adapted modules (a key matches the end of a module's "
                f"path, as in PEFT); {hint}the adapted modules end in {', '.join(ends[:12])}{', ...' if len(ends) > 12 else ''}"
            )


def _output_head_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None:
            for path, module in model.named_modules():
                if module is head:
                    names.add(path)
    return names


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that `config` selects, in model order.

    Raises:
        UserError: when nothing matches; the message lists the closest module names.
    """
    if isinstance(config.targets, (list, tuple)) and not config.targets:
        return []  # the experts alone (config.target_parameters)
    heads = _output_head_names(model)
    # a modules_to_save wrapper's inside (its original and its adapters' trained copies) is never a target
    saved = tuple(p + "." for p, m in model.named_modules() if isinstance(m, SavedModule))
    # nor is an experts module's inside: QLoRA holds its expert weights as a 4-bit linear layer per
    # expert (lorakit.quant.Experts4bit), which `all-linear` would otherwise take for the model's own
    experts = tuple(p + "." for p, m in model.named_modules() if p and is_experts_module(m))
    chosen, outside_layers = [], []
    for path, module in model.named_modules():
        if not path or isinstance(module, (SavedModule,)) or ".lora_" in path or path.startswith(saved + experts):
            continue
        inner = module
        kind = base_kind(inner) if not isinstance(inner, LoraLayer) else inner.kind
        if kind is None:
            continue
        if config.targets == "all-linear":
            if kind.name == "embedding" or path in heads or path.split(".")[-1] in heads:
                continue
        elif not _is_target(path, config.targets):
            continue
        if _is_target(path, config.exclude):
            continue
        if not _in_layers(path, config):
            outside_layers.append(path)
            continue
        if any(path.startswith(c + ".") for c in chosen):
            continue
        chosen.append(path)
    if not chosen and outside_layers:
        raise UserError(_outside_layers(outside_layers, config))
    if not chosen:
        leaves = sorted({p.split(".")[-1] for p, m in model.named_modules() if p and base_kind(m) is not None})
        wanted = config.targets if isinstance(config.targets, list) else [config.targets]
        close = []
        for t in wanted:
            close += difflib.get_close_matches(str(t).split(".")[-1], leaves, n=3, cutoff=0.3)
        suggestion = close or leaves[:8]
        if isinstance(config.targets, str) and config.targets.split(".")[-1] in leaves:
            # a module's name given as a string, which PEFT's target_modules (and lorakit) read as a
            # regex over whole paths: the list form is what was meant
            name = config.targets.split(".")[-1]
            raise UserError(
                f"lora.targets = {config.targets!r} matches no module: a string is a regex matched against whole module "
                f"paths (as PEFT's target_modules); to adapt the modules named {name}, give a list, lora.targets: "
                f"[{name}], or the regex '.*\\.{name}'"
            )
        raise UserError(
            f"lora.targets = {config.targets!r} matches no layer LoRA can wrap (layers={config.layers!r}, "
            f"exclude={config.exclude!r}); closest module names: {', '.join(dict.fromkeys(suggestion))}"
        )
    return chosen


def _outside_layers(paths: list[str], config: LoraConfig) -> str:
    """The message for targets that match only modules outside `config.layers`."""
    indices = sorted({i for i in (block_index(p, config.layers_pattern) for p in paths) if i is not None})
    where = f"lora.layers = {config.layers!r}"
    if config.layers_pattern:
        where += f" (lora.layers_pattern = {config.layers_pattern!r})"
    found = (f"their block indices are {indices}" if indices else
             "none has a block index where PEFT reads one (`<block list>.<i>.` after another name, as in "
             "model.layers.0.self_attn.q_proj)")  # fmt: skip
    return (
        f"{where} selects none of the {len(paths)} modules lora.targets = {config.targets!r} matches ({paths[0]}, ...): "
        f"{found}; fix lora.layers, or name the model's block list in lora.layers_pattern (e.g. 'blocks')"
    )


def selected_by_name(path: str, config: LoraConfig) -> bool:
    """Whether `config`'s targets, exclude and layers select the module at `path`, from its name
    alone (for adapter files read without a model; all-linear, which needs the module's kind,
    passes every name)."""
    if config.targets != "all-linear" and not _is_target(path, config.targets):
        return False
    return not _is_target(path, config.exclude) and _in_layers(path, config)


def filtered_experts(path: str, config: LoraConfig) -> bool:
    """Whether `path` is an experts module whose weights `config.target_parameters` names, left out by
    its layers or exclude: lorakit applies those to target_parameters too, PEFT to target_modules
    only, so PEFT adapts such experts in every block. (PEFT nests a wrapper per adapted weight, so
    its files name the module `experts.base_layer`, `experts.base_layer.base_layer`, ...)"""
    if not config.target_parameters or (config.layers is None and not config.exclude):
        return False
    module = re.sub(r"(\.base_layer)+$", "", path)
    owners = [t.rpartition(".")[0] for t in config.target_parameters]
    named = any(not o or module == o or module.endswith("." + o) for o in owners)
    return named and (_is_target(module, config.exclude) or not _in_layers(module, config))


def unselected_weights(where: object, path: str, config: LoraConfig) -> str:
    """The message for an adapter file whose LoRA weights for `path` its own config does not select."""
    if filtered_experts(path, config):
        module = re.sub(r"(\.base_layer)+$", "", path)
        return (
            f"{where}: adapter_model.safetensors holds LoRA weights for the expert weights of {module} "
            f"(target_parameters {config.target_parameters!r}), a block that layers_to_transform / exclude_modules leave "
            "out: PEFT applies those two to target_modules only and adapts the expert weights of every block, lorakit "
            "to target_parameters too, so lorakit cannot load this adapter as PEFT does; in adapter_config.json, list "
            "target_modules by their full module paths and remove layers_to_transform and exclude_modules"
        )
    selection = f"target_modules {config.targets!r}"
    if config.exclude:
        selection += f", exclude_modules {config.exclude!r}"
    if config.layers is not None:
        selection += f", layers_to_transform {config.layers!r}"
    if config.layers_pattern:
        selection += f", layers_pattern {config.layers_pattern!r}"
    return (
        f"{where}: adapter_model.safetensors holds LoRA weights for {path}, which adapter_config.json does not "
        f"select ({selection}); PEFT would load the adapter without them. Add the module to target_modules, or "
        "remove its tensors"
    )


def block_index(path: str, layers_pattern: Union[list[str], str, None] = None) -> Optional[int]:
    """The block index that `layers` is matched against in module `path`, as PEFT reads it; None
    when the path has none. `layers_pattern` (a regex or a list of them) names the block list; with
    none given (or an empty one, as in PEFT) any `<name>.<i>.` after a first name counts."""
    if not layers_pattern:
        found = _DEFAULT_BLOCK_INDEX.match(path)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = re.match(block_index_regex(pattern), path)
            if found is not None:
                break
    index = found.groupdict().get("idx") if found is not None else None  # None: a pattern's own `|` matched around it
    return None if index is None else int(index)


def _in_layers(path: str, config: LoraConfig) -> bool:
    # a target naming the module's whole path selects it whatever its layer, as in PEFT (whose
    # layers_to_transform filters only the names a module's path ends with)
    if config.layers is None or (isinstance(config.targets, list) and path in config.targets):
        return True
    return block_index(path, config.layers_pattern) in config.layers


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """Module path -> the expert weights `config.target_parameters` selects there, in model order.

    A parameter matches when its path (`model.layers.0.mlp.experts.gate_up_proj`) equals an entry
    or ends with `.` + the entry, as in PEFT; `layers` and `exclude` apply to the module path.

    Raises:
        UserError: an entry matching nothing, or a match that is not a 3-D expert weight.
    """
    if not config.target_parameters:
        return {}
    chosen: dict[str, list[str]] = {}
    matched_entries = set()
    for path, module in model.named_modules():
        if ".lora_" in path or path.endswith(".base_layer") or ".base_layer." in path:
            continue
        base = module.base_layer if isinstance(module, LoraExperts) else module
        experts = is_experts_module(base)
        names = expert_parameter_names(base) if experts else [n for n, _ in base.named_parameters(recurse=False)]
        for param in names:
            full = f"{path}.{param}" if path else param
            hits = [t for t in config.target_parameters if full == t or full.endswith("." + t)]
            if not hits or _is_target(path, config.exclude) or not _in_layers(path, config):
                continue
            matched_entries.update(hits)
            if not experts:
                raise UserError(
                    f"lora.target_parameters: {full} ({type(base).__name__}.{param}) is not a 3-D expert weight of a "
                    "transformers MoE experts module; target linear layers with lora.targets instead"
                )
            chosen.setdefault(path, []).append(param)
    unmatched = [t for t in config.target_parameters if t not in matched_entries]
    if unmatched:
        names = sorted({f"{p.rpartition('.')[2]}.{w}" for p, m in model.named_modules()
                        if is_experts_module(m) and not p.endswith(".base_layer") for w in expert_parameter_names(m)})  # fmt: skip
        raise UserError(
            f"lora.target_parameters entry {unmatched[0]!r} matches no parameter (layers={config.layers!r}, "
            f"exclude={config.exclude!r}); the model's expert weights: {', '.join(names) or 'none (not a MoE model?)'}"
        )
    return chosen


def inject_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *, check_patterns: bool = True) -> list[str]:
    """Wrap the layers `config` selects with `LoraLayer`s carrying adapter `name`.

    Freezes every parameter that is not an adapter (or a `modules_to_save` copy). The first adapter
    added becomes the active one. Returns the wrapped module paths (expert modules included).
    check_patterns: refuse rank_pattern / alpha_pattern keys that match no adapted module (a typo
    would leave its modules at r / alpha); off for adapter files, which PEFT writes with such keys.

    Raises:
        UserError: bad config values, no matching layer, a pattern key that matches nothing, or an
            adapter name already in use.
    """
    problems = config.problems()
    if problems:
        raise UserError("; ".join(problems))
    configs = lora_configs(model)
    if name in configs:
        raise UserError(f"adapter {name!r} is already on the model; delete_adapter it first or pick another name")
    paths = find_targets(model, config)
    expert_targets = find_parameter_targets(model, config)
    if check_patterns:
        _check_patterns(paths + [f"{path}.{p}" for path, params in expert_targets.items() for p in params], config)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, path)
            _replace(model, path, module)
        module.add_adapter(
            name,
            _pattern_value(path, config.rank_pattern, config.r),
            _pattern_value(path, config.alpha_pattern, config.alpha),
            dropout=config.dropout,
            rslora=config.rslora,
            init=config.init,
            dora=config.dora,
        )
    for path, params in expert_targets.items():
        module = model.get_submodule(path)
        if not isinstance(module, LoraExperts):
            module = LoraExperts(module, path)
            _replace(model, path, module)
        ranks = {
            p: (_pattern_value(f"{path}.{p}", config.rank_pattern, config.r),
                _pattern_value(f"{path}.{p}", config.alpha_pattern, config.alpha))
            for p in params
        }  # fmt: skip
        module.add_adapter(name, ranks, rslora=config.rslora, init=config.init)
    for target in config.modules_to_save:
        matched = [p for p, _ in model.named_modules() if p and (p == target or p.endswith("." + target))]
        matched = [p for p in matched if ".copies." not in p and not p.endswith(".original")]
        if not matched:
            raise UserError(f"lora.modules_to_save: no module named {target!r} in the model")
        for path in matched:
            module = model.get_submodule(path)
            frozen_ints = [n for n, p in module.named_parameters() if not p.is_floating_point()]
            if frozen_ints:  # a 4-bit layer's packed codes (QLoRA): no full-precision weight to train
                raise UserError(
                    f"lora.modules_to_save: {path} holds no floating-point weight to train in full ({path}.{frozen_ints[0]} "
                    f"is {module.get_parameter(frozen_ints[0]).dtype}, e.g. a 4-bit layer under quantize: nf4); adapt it "
                    "with LoRA (lora.targets) instead, or train it in full with quantize: none"
                )
            if not isinstance(module, SavedModule):
                module = SavedModule(module)
                _replace(model, path, module)
            module.add_copy(name)
    configs[name] = config
    if len(configs) == 1:
        set_active_adapter(model, name)
    else:
        set_active_adapter(model, active_adapter(model) or name)
    return paths + list(expert_targets)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """name -> LoraConfig of every adapter on `model` (created empty on first use)."""
    configs = model.__dict__.get("lora_configs")
    if configs is None:
        configs = {}
        model.__dict__["lora_configs"] = configs
    return configs


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Union[LoraLayer, LoraExperts]]]:
    """Every module carrying adapters: LoRA layers and LoRA'd MoE experts (lorakit.experts).

    Both keep `lora_A` / `lora_B` keyed by adapter name and know `active_adapter`, `merged`,
    `disabled`, `merge`, `unmerge`, `delete_adapter` and `to_base_module`."""
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, LoraExperts)):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for path, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield path, module


def active_adapter(model: nn.Module) -> Optional[str]:
    """The name of the adapter used in forward, or None."""
    return model.__dict__.get("lora_active")


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter used in forward and the only trainable one.

    Raises:
        UserError: no adapter `name`, or another adapter merged into the weights (forward would
            run both).
    """
    if name not in lora_configs(model):
        raise UserError(f"no adapter named {name!r}; the model has {sorted(lora_configs(model))}")
    merged = next(((path, layer.merged) for path, layer in lora_layers(model) if set(layer.merged) - {name}), None)
    if merged is not None:
        raise UserError(f"{merged[0]}: adapter {merged[1][-1]!r} is merged into the weights, and forward would add {name!r} "
                        "on top of it; unmerge_adapter before switching adapters")  # fmt: skip
    model.__dict__["lora_active"] = name
    for _, layer in lora_layers(model):
        # A layer without this adapter runs its base alone, so adapters never leak into each other.
        layer.active_adapter = name if name in layer.lora_A else None
        magnitudes = list(getattr(layer, "lora_magnitude", {}).items())  # DoRA
        for n, p in list(layer.lora_A.items()) + list(layer.lora_B.items()) + magnitudes:
            p.requires_grad_(n == name)  # a Parameter, or a LoraExperts' ParameterDict (a Module)
    for _, module in saved_modules(model):
        module.active_adapter = name if name in module.copies else None
        for n, c in module.copies.items():
            for p in c.parameters():
                p.requires_grad_(n == name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are skipped, merged ones are taken out and put back after."""
    remerge = {}
    for path, layer in lora_layers(model):
        remerge[path] = list(layer.merged)
        layer.unmerge()
        layer.disabled = True
    for _, module in saved_modules(model):
        module.disabled = True
    try:
        yield model
    finally:
        for path, layer in lora_layers(model):
            layer.disabled = False
            for name in remerge.get(path, []):
                layer.merge(name)
        for _, module in saved_modules(model):
            module.disabled = False


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run forward with adapter `name` instead of the active one, which is restored after; which
    parameters require grad stays as it is (DDP and FSDP see the same trainable set throughout).

    Raises:
        UserError: no adapter `name`, or an adapter merged into the weights.
    """
    layers, saved = list(lora_layers(model)), list(saved_modules(model))
    if not any(name in layer.lora_A for _, layer in layers):
        raise UserError(f"no adapter named {name!r} on the model")
    merged = next((path for path, layer in layers if layer.merged), None)
    if merged is not None:
        raise UserError(f"{merged}: an adapter is merged into the weights; unmerge_adapter before switching adapters")
    previous = [layer.active_adapter for _, layer in layers], [module.active_adapter for _, module in saved]
    for _, layer in layers:
        layer.active_adapter = name if name in layer.lora_A else None
    for _, module in saved:
        module.active_adapter = name if name in module.copies else None
    try:
        yield model
    finally:
        for (_, layer), active in zip(layers, previous[0]):
            layer.active_adapter = active
        for (_, module), active in zip(saved, previous[1]):
            module.active_adapter = active


def delete_adapter(model: nn.Module, name: str) -> None:
    configs = lora_configs(model)
    if name not in configs:
        raise UserError(f"no adapter named {name!r}; the model has {sorted(configs)}")
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
    for _, module in saved_modules(model):
        if name in module.copies:
            del module.copies[name]
            if module.active_adapter == name:
                module.active_adapter = next(iter(module.copies.keys()), None)
    del configs[name]
    if active_adapter(model) == name:
        model.__dict__.pop("lora_active", None)
        if configs:
            set_active_adapter(model, next(iter(configs)))
    # Layers left with no adapter go back to plain modules.
    for path, layer in list(lora_layers(model)):
        if not layer.lora_A:
            _replace(model, path, layer.to_base_module())
    for path, module in list(saved_modules(model)):
        if not module.copies:
            _replace(model, path, module.original)


def merge_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold adapter `name` (default: the active one) into the base weights of the layers that have
    it, all or none: a layer that cannot take it (a 4-bit one, a non-finite result) takes the
    layers merged before it out again. A weight the layer shares with another module (an input
    embedding tied to the output head) is untied first, so that the other keeps the base's, as
    `lorakit merge` writes them; the model's config then says tie_word_embeddings: false.

    Raises:
        UserError: no adapter `name`, a 4-bit layer, or an adapter whose merge gives inf/NaN.
    """
    if name is not None and name not in lora_configs(model):
        raise UserError(f"no adapter named {name!r}; the model has {sorted(lora_configs(model))}")
    layers = [layer for _, layer in lora_layers(model) if (name or layer.active_adapter) in layer.lora_A]
    layers = [layer for layer in layers if (name or layer.active_adapter) not in layer.merged]
    _untie(model, layers)
    done = []
    try:
        for layer in layers:
            layer.merge(name)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge_last()
        raise


def _untie(model: nn.Module, layers: list[LoraLayer]) -> None:
    """Give each of `layers` a weight of its own where another module holds the same parameter."""
    holders: dict[int, int] = {}
    for module in model.modules():  # (each module once; a tied parameter is held by two of them)
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    untied = False
    for layer in layers:
        if not isinstance(layer, LoraLayer):  # (MoE experts: no weight an output head could share)
            continue
        if holders.get(id(layer.weight), 0) > 1 and layer.kind.name in ("linear", "conv1d", "embedding"):
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            untied = True
    if untied:
        _say_untied(model)


def _say_untied(model: nn.Module) -> None:
    """The model's config no longer says its head and input embedding share a weight."""
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Return the plain model: LoRA wrappers removed, the active adapter merged in if `merge`.

    With `merge=False` the base weights are restored (merged adapters are taken out again).
    `modules_to_save` keep the active adapter's trained copy when merging, the original otherwise.
    """
    if merge:
        merge_adapter(model)  # (all layers or none; tied weights untied)
    for path, layer in list(lora_layers(model)):
        if not merge:
            layer.unmerge()
        _replace(model, path, layer.to_base_module())
    for path, module in list(saved_modules(model)):
        _replace(model, path, module.as_plain_module() if merge else module.original)
    try:  # a trained copy of a tied embedding or head put in place: the two are apart now
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if merge and embedding is not None and head is not None and head.weight is not embedding.weight:
            _say_untied(model)
    except (AttributeError, NotImplementedError):  # any nn.Module: no embeddings to know of
        pass
    model.__dict__.pop("lora_configs", None)
    model.__dict__.pop("lora_active", None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical elements (from the
    layer's quantization state, which FSDP2's sharded weights no longer carry themselves)."""
    trainable = total = 0
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            quant_state = getattr(p, "quant_state", None) or (getattr(module, "quant_state", None) if name == "weight" else None)
            if quant_state is not None and getattr(quant_state, "shape", None) is not None:
                n = int(torch.Size(quant_state.shape).numel())
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)"
