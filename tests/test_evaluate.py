"""eval: token-exact loss against a per-example reference, exact-match accuracy on a known case."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tokenizer, save_model_folder, tiny_gpt2, tiny_llama

from lorakit.cli import main
from lorakit.config import DataConfig
from lorakit.data import load_dataset
from lorakit.records import INSTRUCTION_TEMPLATE_NO_INPUT
from lorakit.evaluate import evaluate_loss, final_answer, generation_accuracy
from lorakit.generate import generate

RECORDS = [
    {"prompt": "The quick brown", "completion": " fox jumps over the lazy dog."},
    {"instruction": "Sort the numbers 3 1 2", "output": "1 2 3"},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Four."}]},  # fmt: skip
    {"text": "Low-rank adaptation trains two small matrices."},
    {"prompt": "hello world ->", "completion": " bonjour le monde"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model, tok = tiny_llama(), make_tokenizer()
    dataset = load_dataset(path, tok, DataConfig(max_length=64, packing=False), use_cache=False)
    return model, tok, dataset, path


def _reference_loss(model, dataset):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            ids, labels = (torch.from_numpy(x).long()[None] for x in dataset.example(i))
            logits = model(ids).logits[0, :-1]
            targets = labels[0, 1:].clone()
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count, count


def test_loss_is_token_exact(setup):
    model, _, dataset, _ = setup
    model.train()
    ref, count = _reference_loss(model.eval(), dataset)
    model.train()
    for bs in (1, 2, 8):
        got = evaluate_loss(model, dataset, batch_size=bs, max_length=64)
        assert got["tokens"] == count
        assert got["loss"] == pytest.approx(ref, abs=1e-5)
        assert got["perplexity"] == pytest.approx(torch.tensor(ref).exp().item(), rel=1e-5)
    assert model.training  # mode restored


def test_accuracy_on_known_case(setup):
    model, tok, _, _ = setup
    # What the model greedily writes for each prompt, computed from the prompts directly.
    plain = generate(model, tok, ["Sorting:", INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction="Say hi")], max_new_tokens=5)
    msgs = [{"role": "user", "content": "hi"}]
    chat = generate(model, tok, [msgs], chat=True, max_new_tokens=5)[0]
    records = [
        {"prompt": "Sorting:", "completion": f"  {plain[0]}\n"},  # right (after strip)
        {"instruction": "Say hi", "input": "", "output": plain[1] + " extra"},  # wrong
        {"messages": msgs + [{"role": "assistant", "content": chat}, {"role": "user", "content": "more"}]},  # right
        {"text": "no answer: not counted"},
        {"messages": msgs + [{"role": "assistant", "content": "untrained", "weight": 0}]},  # not trained: not counted
    ]
    got = generation_accuracy(model, tok, records, max_new_tokens=5, batch_size=2)
    assert (got["correct"], got["total"]) == (2, 3) and got["accuracy"] == pytest.approx(2 / 3)
    assert got["failures"] == [{"prompt": "### Instruction:\nSay hi\n\n### Response:\n", "expected": plain[1] + " extra",
                                "got": plain[1]}]  # fmt: skip


def test_a_leading_reasoning_block_is_not_part_of_the_answer(setup, monkeypatch):
    # Qwen3's template trains an empty think block before each final reply; reasoning models write
    # a full one: the answer compared is what follows it
    model, tok, _, _ = setup
    replies = iter([["<think>\n\n</think>\n\nFour.", "<think>two and two</think> Five.", "Four. <think></think>"]])
    monkeypatch.setattr("lorakit.generate.generate", lambda *args, **kwargs: next(replies))
    ask = [{"role": "user", "content": "What is two plus two?"}]
    records = [{"messages": ask + [{"role": "assistant", "content": answer}]} for answer in ("Four.", "Four.", "Four.")]
    got = generation_accuracy(model, tok, records)
    assert (got["correct"], got["total"]) == (1, 3)
    assert [f["got"] for f in got["failures"]] == ["<think>two and two</think> Five.", "Four. <think></think>"]
    assert final_answer("<think>\nsteps\n</think>\n\n 42 ") == "42" == final_answer("42")


def test_cli_eval_json_and_table(setup, tmp_path, capsys):
    model, tok, dataset, path = setup
    folder = save_model_folder(tmp_path / "m", model, tok)
    assert main(["eval", "--model", str(folder), "--data", str(path), "--json", "--max-length", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    ref, count = _reference_loss(model, dataset)
    assert result["loss"] == pytest.approx(ref, abs=1e-5) and result["tokens"] == count
    assert result["accuracy"] is None and result["examples"] == 5
    args = ["eval", "--model", str(folder), "--data", str(path), "--generate", "--max-new-tokens", "4", "--max-length", "64"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == 4 and 0 <= result["correct"] <= 4 and len(result["failures"]) == min(3, 4 - result["correct"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"loss        {ref:.4f}" in out and "/4 exact matches" in out


def test_cli_eval_reads_other_column_names(setup, tmp_path, capsys):
    model, tok, _, path = setup
    folder = save_model_folder(tmp_path / "m", model, tok)
    rename = {"prompt": "question", "completion": "answer", "messages": "dialog"}
    named = tmp_path / "named.jsonl"
    with open(named, "w") as f:
        for line in path.read_text().splitlines():
            f.write(json.dumps({rename.get(k, k): v for k, v in json.loads(line).items()}) + "\n")
    args = ["--max-length", "64", "--generate", "--max-new-tokens", "4", "--json"]
    assert main(["eval", "--model", str(folder), "--data", str(path), *args]) == 0
    want = json.loads(capsys.readouterr().out)
    columns = [f"--column={k}={v}" for k, v in rename.items()]
    assert main(["eval", "--model", str(folder), "--data", str(named), *args, *columns]) == 0
    assert json.loads(capsys.readouterr().out) == want and want["total"] == 4
    for bad, messages in [(["prompt"], ["--column 'prompt': give KEY=NAME"]),
                          (["prompt=a", "prompt=b"], ["--column 'prompt=b': 'prompt' is already mapped to 'a'"]),
                          (["promt=question"], ["did you mean 'prompt'? map one of text, prompt", "e.g. --column prompt=question"]),
                          (["prompt=question", "text=question"], ["'question' is named for 2 keys"])]:  # fmt: skip
        assert main(["eval", "--model", str(folder), "--data", str(named), *[f"--column={b}" for b in bad]]) == 2
        err = capsys.readouterr().err
        assert all(m in err for m in messages) and err.count("\n") == 1, err


def test_cli_eval_refuses_bad_options_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from lorakit import generate

    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_for_command", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1 plus 1 is", "completion": " 2"}) + "\n")
    for options, message in [
        (["--column", "prompt"], "--column 'prompt': give KEY=NAME, lorakit's key and the records' name for it, e.g. prompt=question"),
        (["--column", "prompt=question", "--column", "text=question"], "--column: 'question' is named for 2 keys; map each key "
         "of the records once"),
        (["--system", ""], "--system '': give the system message's text, or leave --system out"),
        (["--system", " \n"], "--system ' \\n': give the system message's text, or leave --system out"),
    ]:  # fmt: skip
        assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), *options]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    # preference options: their values, and what --objective needs or has no use for
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for options, message in [
        (["--beta", "0"], "--beta 0.0: the objective's beta must be a number > 0 (training's train.beta)"),
        (["--simpo-gamma", "-1"], "--simpo-gamma -1.0: SimPO's margin must be a number >= 0 (training's train.simpo_gamma)"),
        (["--kto-undesirable-weight", "nan"], "--kto-desirable-weight 1.0 / --kto-undesirable-weight nan: KTO's weights must "
         "be > 0 (training's train.kto_desirable_weight / kto_undesirable_weight)"),
        (["--reference-adapter", str(tmp_path / "nope")], f"--reference-adapter {str(tmp_path / 'nope')!r}: folder not found; "
         "pass the adapter folder the run continued (adapter_config.json + adapter_model.safetensors)"),
        (["--objective", "dpo"], f"{data} holds preference pairs: their DPO rewards compare an adapter with its base; pass "
         "--adapter (or --objective simpo / orpo, which need no reference)"),
        (["--objective", "kto"], f"{data} holds labelled examples: their KTO rewards compare an adapter with its base; pass --adapter"),
        (["--objective", "orpo", "--reference-adapter", str(adapter)], "--reference-adapter: orpo compares with no reference; "
         "drop it, or use --objective dpo / ipo"),
        (["--objective", "simpo", "--generate"], f"--generate: {data} holds preference pairs, which have no single answer to match"),
        (["--objective", "kto", "--adapter", str(adapter), "--generate"], f"--generate: {data} holds labelled examples, which "
         "have no single answer to match"),
    ]:  # fmt: skip
        assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), *options]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    missing = str(tmp_path / "missing.jsonl")
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", missing]) == 2
    assert capsys.readouterr().err == (f"error: --data {missing!r}: no such file; give a .jsonl, .json, .parquet, .arrow, "
                                       ".csv or .tsv file of records\n")  # fmt: skip


def test_cli_eval_system_prompt_equals_the_message_in_the_data(setup, tmp_path, capsys):
    model, tok, _, _ = setup
    folder = save_model_folder(tmp_path / "m", model, tok)
    ask = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    system = {"role": "system", "content": "Answer briefly."}
    bare, given = tmp_path / "bare.jsonl", tmp_path / "given.jsonl"
    bare.write_text(json.dumps({"messages": ask}) + "\n")
    given.write_text(json.dumps({"messages": [system, *ask]}) + "\n")
    args = ["--max-length", "64", "--generate", "--max-new-tokens", "4", "--json"]
    assert main(["eval", "--model", str(folder), "--data", str(given), *args]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(folder), "--data", str(bare), *args, "--system", system["content"]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == want and got["tokens"] > 0
    assert main(["eval", "--model", str(folder), "--data", str(bare), *args]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != want["loss"]  # without it: another conversation
    # a byte that is not UTF-8 (kept by Python as a lone surrogate): refused before the model is read
    assert main(["eval", "--model", "no/such/model", "--data", str(bare), "--system", "caf\udce9"]) == 2
    assert capsys.readouterr().err == "error: --system: byte 0xe9 at character 4 is not UTF-8 text; pass UTF-8 text " \
                                      "(set the terminal's encoding to UTF-8)\n"  # fmt: skip


def test_bad_inputs(setup, tmp_path, capsys):
    model, tok, _, path = setup
    folder = save_model_folder(tmp_path / "m", model, tok)
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--data", str(path), "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    # a bad record stops eval with its line, and the hint names eval's own switch, which skips it
    bad = tmp_path / "bad.jsonl"
    ends_with_user = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "Bye"}]}  # the loss path's: no assistant turn after the last user's
    bad.write_text(path.read_text() + '{"prompt": "x", "completion": 3}\n' + json.dumps(ends_with_user) + "\n")
    args = ["eval", "--model", str(folder), "--data", str(bad), "--max-length", "64"]
    assert main(args) == 2
    assert "bad.jsonl:6: " in (err := capsys.readouterr().err) and "lorakit eval --skip-invalid" in err
    assert main([*args, "--skip-invalid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ref, _ = _reference_loss(model, setup[2])
    assert result["skipped"] == 2 and result["examples"] == 5 and result["loss"] == pytest.approx(ref, abs=1e-5)
    assert result["skipped_at"] == [f"{bad}:6", f"{bad}:7"]
    assert main([*args, "--skip-invalid", "--generate", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == 4 and result["skipped"] == 2  # generation leaves out what the loss left out
    assert main([*args, "--skip-invalid"]) == 0
    assert f"skipped     2 invalid records ({bad}:6, {bad}:7)\n" in capsys.readouterr().out


def test_max_length_follows_a_position_table(tmp_path, capsys):
    # GPT-2 (n_positions 16): by default examples are cut at 16 tokens, and more is refused
    folder = save_model_folder(tmp_path / "m", tiny_gpt2(n_positions=16), make_tokenizer())
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 4}) + "\n")
    assert main(["eval", "--model", str(folder), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 15  # 16 positions, 15 predicted tokens
    assert main(["eval", "--model", str(folder), "--data", str(data), "--max-length", "17"]) == 2
    assert "--max-length 17: give 1 to 16 (the rows of" in capsys.readouterr().err


def test_eval_notes_where_the_adapters_run_measured_otherwise(tmp_path, capsys):
    import argparse

    import yaml

    from lorakit.evaluate import _note_the_runs_own_settings

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"adapter": "sft/adapter", "train": {"objective": "dpo", "beta": 0.2}}))
    args = argparse.Namespace(adapter=str(tmp_path / "run" / "adapter"), beta=None, reference_adapter=None)
    _note_the_runs_own_settings(args, "dpo")
    assert capsys.readouterr().err == (f"note: the run of {args.adapter} trained with beta 0.2 (pass --beta 0.2); its reference was the "
                                       "starting adapter sft/adapter, here the base is (pass --reference-adapter sft/adapter): its "
                                       "eval_loss is not this one\n")  # fmt: skip
    _note_the_runs_own_settings(argparse.Namespace(adapter=args.adapter, beta=0.2, reference_adapter="sft/adapter"), "dpo")
    _note_the_runs_own_settings(argparse.Namespace(adapter=str(tmp_path / "none" / "adapter"), beta=None, reference_adapter=None), "dpo")
    assert capsys.readouterr().err == ""  # as the run measured, or no run beside it: nothing to say
    _note_the_runs_own_settings(argparse.Namespace(adapter=args.adapter, beta=None, reference_adapter="sft/adapter"), "ipo")
    assert "trained with objective dpo (pass --objective dpo)" in capsys.readouterr().err


def test_eval_measures_with_the_runs_data_settings_so_its_loss_is_the_runs(tmp_path, capsys):
    import yaml

    folder = save_model_folder(tmp_path / "model", tiny_llama(), make_tokenizer())
    chats = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"}, {"role": "assistant", "content": f"{2 * a}."},
                           {"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": f"{4 * a}."}]}
             for a in range(12)]  # fmt: skip
    chats.append({"messages": [{"role": "user", "content": "Tell a long story. " * 30}, {"role": "assistant", "content": "No."}]})
    for name, records in (("train", chats), ("eval", chats[8:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 200, "too_long": "drop",
            "train_turns": "last", "packing": False}  # fmt: skip
    cfg = {"model": str(folder), "output_dir": str(tmp_path / "run"), "data": data, "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "seed": 0, "lr": 1e-2, "save_every": 2}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    run_loss = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    capsys.readouterr()
    command = ["eval", "--model", str(folder), "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(tmp_path / "eval.jsonl"),
               "--batch-size", "4", "--json"]  # fmt: skip
    assert main(command) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["loss"] == pytest.approx(run_loss, rel=1e-6) and result["examples"] == 4  # the long story dropped
    assert captured.err == (f"note: as the run of {tmp_path / 'run' / 'adapter'} ({tmp_path / 'run' / 'config.yaml'}): "
                            "--max-length 200, --too-long drop, --train-turns last, --precision fp32\n")  # fmt: skip
    assert main([*command, "--train-turns", "all", "--too-long", "truncate"]) == 0  # flags win over the run's
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] > result["tokens"] and captured.err.endswith(": --max-length 200, --precision fp32\n")
    # a checkpoint's adapter is its run's too; a value the flag would not take is refused, naming the file
    step = tmp_path / "run" / "checkpoints" / "step-2" / "adapter"
    assert main([*command[:4], str(step), *command[5:]]) == 0 and "--train-turns last" in capsys.readouterr().err
    run_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    run_config["data"]["train_turns"] = "every"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_config))
    assert main(command) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run' / 'config.yaml'}: data.train_turns = 'every' is not a value lorakit eval measures with; "
        "pass --train-turns to set it yourself"
    )
    (tmp_path / "run" / "config.yaml").write_bytes(b"data: {max_length: \xff}\n")  # not UTF-8: no run's config to read
    assert main(command) == 0 and "note: as the run" not in capsys.readouterr().err
