"""Run-config loading: YAML, dotted overrides, one-pass validation."""

import re

import pytest

from lorakit.config import build_run_config, load_run_config, parse_overrides
from lorakit.errors import UserError


def test_overrides_are_yaml_scalars():
    got = parse_overrides(["train.max_steps=20", "lora.targets=[q_proj, v_proj]", "train.lr=1e-4", "data.eval=null",
                           "train.gradient_checkpointing=true"])  # fmt: skip
    assert got == {"train.max_steps": 20, "lora.targets": ["q_proj", "v_proj"], "train.lr": "1e-4", "data.eval": None,
                   "train.gradient_checkpointing": True}  # fmt: skip
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_overrides(["train.max_steps"])


def test_an_override_with_bytes_that_are_not_utf8_names_the_byte(tmp_path, capsys):
    from lorakit.cli import main

    # $'data.system_prompt=\xff' in a shell: Python keeps the byte as the lone surrogate U+DCFF,
    # which YAML refused as "not valid YAML (ReaderError)"; the demo's overrides (no config) too
    fix = "is not UTF-8 text; pass UTF-8 text (set the terminal's encoding to UTF-8)"
    for args, message in (
        ([str(tmp_path / "run.yaml"), "data.system_prompt=\udcff"], f"'data.system_prompt=\\udcff': byte 0xff at character 20 {fix}"),
        (["data.\udcc3=1"], f"'data.\\udcc3=1': byte 0xc3 at character 6 {fix}"),
    ):
        assert main(["train", *args]) == 2
        assert capsys.readouterr().err == f"error: override {message}\n"


def test_yaml_nested_past_the_recursion_limit_is_a_config_error(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    too_deep = "nested too deeply to read (lists or mappings some hundreds of levels inside each other); flatten it"
    with pytest.raises(UserError) as err:
        parse_overrides([f"data.system_prompt={deep}"])
    assert str(err.value) == f"override data.system_prompt=...: value is {too_deep}"
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: {{train: t.jsonl, system_prompt: {deep}}}\n")
    with pytest.raises(UserError) as err:
        load_run_config(path, check_paths=False)
    assert str(err.value) == f"{path}: invalid YAML: a value {too_deep}"


def test_yaml_aliases_that_expand_past_any_config_are_refused_before_a_walk(tmp_path):
    levels = ["    v0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"    v{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]  # 10^6 values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model: m\ndata:\n  chat_template_kwargs:\n" + "\n".join(levels) + "\n")
    with pytest.raises(UserError, match=r"bomb.yaml: its aliases \(\*name\) expand to more than 100,000 values"):
        load_run_config(bomb, check_paths=False)
    flow = "[&a0 [" + ", ".join(["lol"] * 10) + "], " + ", ".join(
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)
    ) + "]"  # the same as one override's value
    with pytest.raises(UserError, match=r"override data.columns=...: its aliases \(\*name\) expand to more than 100,000"):
        parse_overrides([f"data.columns={flow}"])
    # aliases as people use them, to repeat a setting, are fine
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: m\ndata:\n  train: &files t.jsonl\n  eval: *files\n")
    assert load_run_config(plain, check_paths=False).data.eval == "t.jsonl"


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl}\ntrain: {lr: 2e-4, max_steps: 5}\nlora: {r: 8}\n")
    cfg = load_run_config(path, parse_overrides(["train.max_steps=7", "lora.alpha=4"]), check_paths=False)
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7  # "2e-4" (a YAML 1.1 string) becomes a float
    assert cfg.lora.r == 8 and cfg.lora.alpha == 4.0 and cfg.lora.targets == "all-linear"
    assert cfg.data.packing is True and cfg.output_dir == "runs/lorakit"


def test_an_override_into_a_list_names_the_whole_list_to_override(tmp_path):
    # data.train.1.columns.prompt=q: a list's items are no keys; the message gives the list as it
    # is, to edit (it used to suggest data.train='{1: ...}', a mapping data.train may not be)
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: [a.jsonl, {path: b.jsonl, columns: {prompt: question}}]}\n")
    with pytest.raises(UserError) as err:
        load_run_config(path, parse_overrides(["data.train.1.columns.prompt=q"]), check_paths=False)
    assert str(err.value) == (
        "override data.train.1.columns.prompt='q': data.train is a list, whose items an override does not reach; override "
        "the whole of it instead, e.g. data.train='[a.jsonl, {columns: {prompt: question}, path: b.jsonl}]' with the item "
        "changed"
    )


def test_an_override_into_a_value_says_to_set_the_value_or_the_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: a.jsonl, eval: b.jsonl}\nlora: {r: 4}\n")
    for override, message in [
        ("lora.r.x=3", "override lora.r.x=3: lora.r is 4, a value with no keys inside; set it itself, lora.r=VALUE"),
        ("data.train.x=c.jsonl", "override data.train.x='c.jsonl': data.train is 'a.jsonl', a value with no keys inside; set "
         "it itself, data.train=VALUE"),
        # data.eval may be named sets: the mapping is the fix
        ("data.eval.x=c.jsonl", "override data.eval.x='c.jsonl': data.eval is 'b.jsonl', not a mapping to set 'x' in; override "
         "the whole of it instead, e.g. data.eval='{x: ...}'"),
    ]:  # fmt: skip
        with pytest.raises(UserError) as err:
            load_run_config(path, parse_overrides([override]), check_paths=False)
        assert str(err.value) == message


def test_a_key_given_twice_in_the_yaml_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl}\nlora: {r: 4}\nlora: {r: 8}\n")
    with pytest.raises(UserError) as err:
        load_run_config(path, check_paths=False)
    assert str(err.value) == f"{path}:4: invalid YAML: key 'lora' given twice (first on line 3); keep one"
    path.write_text("model: m\ndata: {train: t.jsonl}\ntrain:\n  lr: 1.0e-4\n  max_steps: 3\n  lr: 2.0e-4\n")
    with pytest.raises(UserError, match=r"run.yaml:6: invalid YAML: key 'lr' given twice \(first on line 4\); keep one"):
        load_run_config(path, check_paths=False)
    # YAML's merge key repeats keys on purpose: the mapping's own value wins, as YAML says
    path.write_text("model: m\ndata: {train: t.jsonl}\nlora: &base {r: 4, alpha: 8}\ntrain: {seed: 1}\n")
    assert load_run_config(path, parse_overrides(["lora.r=16"]), check_paths=False).lora.r == 16
    path.write_text("model: m\ndata: {train: t.jsonl}\nlora:\n  <<: {r: 4, alpha: 8}\n  r: 16\n")
    cfg = load_run_config(path, check_paths=False)
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 8.0)


@pytest.mark.parametrize("data, message", [
    ({"train": {"path": "b.jsonl", "columns": {"prompt": "q"}}},
     "data.train = {'path': 'b.jsonl', 'columns': {'prompt': 'q'}}: a file with options of its own is an item of a list; "
     "write data.train: [{path: b.jsonl, ...}]"),
    ({"train": "a.jsonl", "eval": {"path": "b.jsonl", "columns": {"prompt": "q"}}},
     "data.eval = {'path': 'b.jsonl', 'columns': {'prompt': 'q'}}: a file with options of its own is an item of a list; "
     "write data.eval: [{path: b.jsonl, ...}]"),
    ({"train": "a.jsonl", "eval": {"gsm8k": "a.jsonl", "qa": {"path": "b.jsonl", "system_prompt": "Be brief."}}},
     "data.eval.qa = {'path': 'b.jsonl', 'system_prompt': 'Be brief.'}: a file with options of its own is an item of a "
     "list; write data.eval.qa: [{path: b.jsonl, ...}]"),
])  # fmt: skip
def test_a_file_with_options_outside_a_list_is_told_to_go_in_one(data, message):
    # it was "expected a string or a list of a string or a mapping of a string to a value or null"
    with pytest.raises(UserError) as err:
        build_run_config({"model": "m", "data": data}, check_paths=False)
    assert str(err.value) == f"config: {message}"


def test_every_problem_in_one_message():
    with pytest.raises(UserError) as err:
        build_run_config({"modle": "x", "data": {"train": "t", "pack": True}, "train": {"epochs": 0, "warmup_steps": -1,
                          "precision": "fp8", "seed": 1.5}, "lora": {"alpha": 0}}, check_paths=False)  # fmt: skip
    message = str(err.value)
    assert message.startswith("config: 8 problems: ")
    for fragment in ("unknown key 'modle'; did you mean 'model'?", "unknown key 'data.pack'; did you mean 'data.packing'?",
                     "train.seed = 1.5: expected an integer", "lora.alpha = 0.0: must be a positive number",
                     "train.precision = 'fp8': use one of auto, bf16, fp16, fp32", "train.epochs = 0: must be >= 1",
                     "train.warmup_steps = -1: must be >= 0", "model: missing"):  # fmt: skip
        assert fragment in message, fragment
    assert "\n" not in message


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: m\ndata:\n  train: [a, b\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: invalid YAML"):
        load_run_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_run_config(path)


def test_value_errors_name_the_line_or_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, colums: {}}\nlora:\n  r: 0\ntrain:\n  lr: -1\n")
    with pytest.raises(UserError) as err:
        load_run_config(path, check_paths=False)
    assert str(err.value) == (
        f"{path}: 3 problems: line 7: lora.r = 0: the rank must be a positive integer, e.g. 8 or 16; line 9: train.lr "
        "= -1.0: must be > 0.0; line 5: data.train[1].colums: unknown key; did you mean 'columns'? a file's own keys "
        "are path, format, columns, system_prompt, repeat"
    )
    # one problem: file:line; an override's problem is the command line's, not the file's
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:7: lora.r = 0: "):
        load_run_config(path, parse_overrides(["train.lr=1e-3", "data.train=a.jsonl"]), check_paths=False)
    with pytest.raises(UserError) as err:
        load_run_config(path, parse_overrides(["lora.r=4", "train.lr=1e-3", "data.train=a.jsonl", "train.batchsize=4"]),
                        check_paths=False)  # fmt: skip
    assert str(err.value) == "command line: unknown key 'train.batchsize'; did you mean 'train.batch_size'?"
    # an unknown key under a section the file sets is the command line's too, not the section's line
    with pytest.raises(UserError) as err:
        load_run_config(path, parse_overrides(["lora.r=4", "train.lr=1e-3", "data.train=a.jsonl", "train.bogus.x=1"]),
                        check_paths=False)  # fmt: skip
    assert str(err.value).startswith("command line: unknown key 'train.bogus'")
    with pytest.raises(UserError, match=r"override 'lora.r=8': lora.r is given twice on the command line; keep one"):
        parse_overrides(["lora.r=4", "lora.r=8"])


def test_eval_generate_needs_an_eval_file():
    with pytest.raises(UserError, match="train.eval_generate = true: needs data.eval"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"eval_generate": True}}, check_paths=False)


def test_gradient_checkpointing_modes():
    base = {"model": "m", "data": {"train": "t"}}
    for mode in (False, True, "full", "selective"):
        cfg = build_run_config({**base, "train": {"gradient_checkpointing": mode}}, check_paths=False)
        assert cfg.train.gradient_checkpointing == mode
    with pytest.raises(UserError, match="train.gradient_checkpointing = 'partial': use false, true .* or selective"):
        build_run_config({**base, "train": {"gradient_checkpointing": "partial"}}, check_paths=False)
    with pytest.raises(UserError, match="train.gradient_checkpointing = 1: expected true/false or a string"):
        build_run_config({**base, "train": {"gradient_checkpointing": 1}}, check_paths=False)


def test_best_eval_and_early_stopping_settings():
    base = {"model": "m", "data": {"train": "t", "eval": "e"}}

    def problems(train, data=None):
        with pytest.raises(UserError) as err:
            build_run_config({**base, **({"data": data} if data else {}), "train": train}, check_paths=False)
        return str(err.value)

    cfg = build_run_config({**base, "train": {"save_best": True, "eval_every": 10, "early_stopping_patience": 3}}, check_paths=False)
    assert cfg.train.best_metric == "eval_loss" and cfg.train.early_stopping_patience == 3
    assert "train.save_best = True: needs evals during the run; set train.eval_every" in problems({"save_best": True})
    assert "train.early_stopping_patience = 2: needs eval data; set data.eval or data.eval_fraction" in problems(
        {"early_stopping_patience": 2, "eval_every": 5}, data={"train": "t"}
    )
    assert build_run_config({**base, "data": {"train": "t", "eval_fraction": 0.1}, "train": {"save_best": True, "eval_every": 5}},
                            check_paths=False).train.save_best  # fmt: skip
    assert "train.best_metric = 'eval_accuracy': measured with train.eval_generate: true" in problems(
        {"save_best": True, "eval_every": 5, "best_metric": "eval_accuracy"}
    )
    assert "train.best_metric = 'eval_reward_margin': reported by preference objectives; watch the loss for sft" in problems(
        {"save_best": True, "eval_every": 5, "best_metric": "eval_reward_margin"}
    )
    assert "train.best_metric = 'eval_perplexity': dpo reports no perplexity" in problems(
        {"save_best": True, "eval_every": 5, "best_metric": "eval_perplexity", "objective": "dpo"}
    )
    assert "train.best_metric = 'accuracy': use one of eval_loss, eval_perplexity, eval_accuracy\n" in problems(
        {"best_metric": "accuracy"}
    ) + "\n"  # (sft reports no rewards: not offered)
    assert "train.best_metric = 'accuracy': use one of eval_loss, eval_reward_accuracy, eval_reward_margin" in problems(
        {"best_metric": "accuracy", "objective": "dpo"}
    )
    assert problems({"early_stopping_patience": -1}).endswith("train.early_stopping_patience = -1: must be >= 0")  # that alone
    # evals without eval data, and two eval sources, are refused rather than ignored
    assert problems({"eval_every": 5}, data={"train": "t"}) == ("config: train.eval_every = 5: there is no eval data to evaluate; set "
                                                                "data.eval or data.eval_fraction, or remove train.eval_every")  # fmt: skip
    assert problems({}, data={"train": "t", "eval": "e", "eval_fraction": 0.1}) == (
        "config: data.eval_fraction = 0.1: data.eval is set too, and eval data given wins over a held-out fraction; remove one of them")
    # watched by nothing, best_metric is not checked against the run
    assert build_run_config({**base, "train": {"best_metric": "eval_accuracy"}}, check_paths=False)


def test_report_to_takes_a_name_a_list_or_none():
    base = {"model": "m", "data": {"train": "t"}}
    for value, names in (("tensorboard", ["tensorboard"]), (["wandb", "tensorboard"], ["wandb", "tensorboard"]), ("none", []), ([], [])):
        assert build_run_config({**base, "train": {"report_to": value}}, check_paths=False).train.trackers() == names
    with pytest.raises(UserError, match=r"train.report_to = \['tensorbord'\]: unknown tracker 'tensorbord'; use tensorboard, wandb"):
        build_run_config({**base, "train": {"report_to": ["tensorbord"]}}, check_paths=False)


def test_train_turns_settings():
    base = {"model": "m", "data": {"train": "t", "train_turns": "last"}}
    assert build_run_config(base, check_paths=False).data.train_turns == "last"
    with pytest.raises(UserError, match="data.train_turns = 'first': use one of all, last"):
        build_run_config({**base, "data": {"train": "t", "train_turns": "first"}}, check_paths=False)
    with pytest.raises(UserError, match="data.train_turns = 'last' with data.train_on_inputs = true: every token is trained"):
        build_run_config({**base, "data": {"train": "t", "train_turns": "last", "train_on_inputs": True}}, check_paths=False)
    with pytest.raises(UserError, match="data.train_turns = 'last': dpo trains the answers of its records"):
        build_run_config({**base, "train": {"objective": "dpo"}}, check_paths=False)


def test_invalid_regexes_are_config_errors():
    base = {"model": "m", "data": {"train": "t"}}
    for lora, key in [({"targets": ".*(q_proj|v_proj"}, "lora.targets"), ({"exclude": "("}, "lora.exclude"),
                      ({"rank_pattern": {"(": 8}}, "lora.rank_pattern['(']"), ({"alpha_pattern": {"[": 8}}, "lora.alpha_pattern['[']")]:
        with pytest.raises(UserError, match=re.escape(key) + r" = .*: not a valid regex \(") as err:
            build_run_config({**base, "lora": lora}, check_paths=False)
        assert "\n" not in str(err.value)
    assert build_run_config({**base, "lora": {"targets": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"}}, check_paths=False)


def test_a_seed_must_fit_in_64_bits():
    base = {"model": "m", "data": {"train": "t"}}
    with pytest.raises(UserError, match=r"train.seed = 99999999999999999999999: must fit in 64 bits"):
        build_run_config({**base, "train": {"seed": 99999999999999999999999}}, check_paths=False)
    assert build_run_config({**base, "train": {"seed": -1}}, check_paths=False).train.seed == -1


def test_patterns_must_be_mappings():
    base = {"model": "m", "data": {"train": "t"}}
    for lora, message in [({"rank_pattern": ["q_proj"]}, "lora.rank_pattern = ['q_proj']: expected a mapping of a string to an integer"),
                          ({"alpha_pattern": [["q_proj", 4]]}, "lora.alpha_pattern = [['q_proj', 4]]: expected a mapping")]:  # fmt: skip
        with pytest.raises(UserError, match=re.escape(message)):
            build_run_config({**base, "lora": lora}, check_paths=False)


def test_an_alpha_or_neftune_alpha_that_overflows_float32_is_refused():
    base = {"model": "m", "data": {"train": "t"}}
    for section, values, message in [
        ("lora", {"r": 2, "alpha": 1e308}, "lora.alpha = 1e+308: the scale alpha / r = 5e+307 (r = 2) is past the largest float32"),
        ("lora", {"r": 4, "alpha": 8, "rank_pattern": {"q_proj": 1}, "alpha_pattern": {"v_proj": 1e39}},
         "lora.alpha_pattern['v_proj'] = 1e+39: the scale alpha / r = 1e+39 (r = 1)"),
        ("lora", {"r": 4, "alpha": 1e39, "rslora": True}, "lora.alpha = 1e+39: the scale alpha / sqrt(r) = 5e+38 (r = 4)"),
        ("train", {"neftune_alpha": 1e300}, "train.neftune_alpha = 1e+300: the noise, up to alpha / sqrt(row length x hidden size), "
                                            "would be past the largest float32 number"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=re.escape(message)) as err:
            build_run_config({**base, section: values}, check_paths=False)
        assert "\n" not in str(err.value)
    ok = build_run_config({**base, "lora": {"r": 16, "alpha": 1e38}, "train": {"neftune_alpha": 1e38}}, check_paths=False)
    assert ok.lora.alpha == 1e38 and ok.train.neftune_alpha == 1e38  # huge, but the scale and the noise stay finite


def test_a_continued_adapters_layers_pattern_is_compared_by_the_modules_it_selects(tmp_path):
    # PEFT's layers_pattern is a lora key like layers: a config that names the same blocks another
    # way continues the adapter; one that selects other modules is refused
    from helpers import save_model_folder, tiny_llama
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    get_peft_model(tiny_llama(), peft_config).save_pretrained(str(tmp_path / "adapter"))
    base = {"model": str(save_model_folder(tmp_path / "model")), "data": {"train": "t"}, "adapter": str(tmp_path / "adapter")}
    lora = {"targets": ["q_proj"], "layers": [1]}
    cfg = build_run_config({**base, "lora": {**lora, "layers_pattern": r"model\.layers"}}, check_paths=False)
    assert (cfg.lora.targets, cfg.lora.layers, cfg.lora.layers_pattern) == (["q_proj"], [1], "layers")  # the adapter's
    with pytest.raises(UserError) as err:
        build_run_config({**base, "lora": {**lora, "layers_pattern": "h"}}, check_paths=False)
    assert str(err.value) == (
        f"config: lora.layers_pattern = 'h': selects other modules than the adapter {tmp_path / 'adapter'} holds (only the "
        "adapter's: model.layers.1.self_attn.q_proj); remove lora.layers_pattern (the adapter sets it)"
    )


def test_a_regex_target_with_layers_is_a_config_error_when_continuing_an_adapter_too(tmp_path):
    # with an adapter the selection is compared on the model, which raised the bare LoraConfig error
    # (no "config:", the other problems lost) for a selection PEFT refuses
    from helpers import save_model_folder, tiny_llama

    from lorakit import LoraConfig, inject_adapter, save_adapter

    model = tiny_llama()
    inject_adapter(model, LoraConfig(r=2, targets=["q_proj"], layers=[1]))
    save_adapter(model, tmp_path / "adapter")
    base = {"model": str(save_model_folder(tmp_path / "model")), "data": {"train": "t"}}
    message = (r"lora.layers = [1] with a regex lora.targets = '.*\\.q_proj': PEFT refuses the two together; write the "
               r"block indices into the regex (e.g. '.*\.layers\.(0|1)\.self_attn\.q_proj') and remove lora.layers, or "
               "list module names in lora.targets")  # fmt: skip
    for adapter in ({}, {"adapter": str(tmp_path / "adapter")}):
        with pytest.raises(UserError) as err:
            build_run_config({**base, **adapter, "lora": {"targets": r".*\.q_proj", "layers": [1]}}, check_paths=False)
        assert str(err.value) == f"config: {message}"
    # the indices written into the regex select the adapter's modules: it continues
    cfg = build_run_config({**base, "adapter": str(tmp_path / "adapter"), "lora": {"targets": r".*\.1\.self_attn\.q_proj"}},
                           check_paths=False)  # fmt: skip
    assert cfg.lora.targets == ["model.layers.1.self_attn.q_proj"] and cfg.lora.layers is None


def test_a_problem_found_after_reading_is_located_by_its_key(tmp_path):
    from lorakit.config import locate_problem

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata:\n  train: t.jsonl\nlora:\n  r: 8\n  rank_pattern:\n    up_proj: 4\n")
    assert locate_problem("lora.rank_pattern: 'up_proj' matches none", path) == f"{path}:6: lora.rank_pattern: 'up_proj' matches none"
    assert locate_problem("data.train: the tokenizer gives token id 9", path) == f"{path}:3: data.train: the tokenizer gives token id 9"
    # a key the file does not give (a default) names its section; an override, the command line
    assert locate_problem("lora.targets = 'all-linear' matches no layer", path) == f"{path}:4: lora.targets = 'all-linear' matches no layer"
    assert locate_problem("train.lr = 1: x", path) == f"{path}: train.lr = 1: x"
    assert locate_problem("lora.r = 3: x", path, {"lora.r": 3}) == "command line: lora.r = 3: x"
    # no config key first: a data file's place, a file named like a section, a message of its own
    for message in ("train.jsonl:3: 'text' is missing", f"{path}:5: lora.r = 0: must be > 0", "data.jsonl: empty",
                    "lora.bogus: not a key", "no adapter named 'x'"):  # fmt: skip
        assert locate_problem(message, path) == message


def test_a_path_starting_with_a_tilde_is_in_the_home_folder_as_in_a_shell(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    cfg = build_run_config({
        "model": "~/models/m", "output_dir": "~/runs/x",
        "data": {"train": ["~/a.jsonl", {"path": "~/b.jsonl", "system_prompt": "~ stays text"}], "eval": {"dev": "~/c.jsonl"},
                 "chat_template": "~/t.jinja"},
    }, check_paths=False)  # fmt: skip
    assert (cfg.model, cfg.output_dir, cfg.data.chat_template) == ("/home/me/models/m", "/home/me/runs/x", "/home/me/t.jinja")
    assert cfg.data.train == ["/home/me/a.jsonl", {"path": "/home/me/b.jsonl", "system_prompt": "~ stays text"}]
    assert cfg.data.eval == {"dev": "/home/me/c.jsonl"}
