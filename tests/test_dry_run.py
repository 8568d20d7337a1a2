"""`lorakit train --dry-run` (lorakit.dry_run): the plan and counts a run would print, without a
weight read, and the mistakes a run would stop at, found before it."""

import json

import pytest
import torch
import yaml
from helpers import save_model_folder, training_workspace

from lorakit import models, quant
from lorakit.cli import main
from lorakit.quant import frozen_bytes_estimate


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return training_workspace(tmp_path_factory.mktemp("dry"), train=100, eval=8)


def _config(root, out, **train):
    cfg = {
        "model": str(root / "model"), "output_dir": str(out),
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "grad_accum": 2, "precision": "fp32", "eval_every": 2, **train},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _lines(text: str) -> dict[str, str]:
    return {line[:13].strip(): line[13:] for line in text.splitlines() if len(line) > 13 and line[12] == " " and line[:12].strip()}


def test_the_dry_run_prints_the_runs_counts_without_reading_a_weight(workspace, capsys, monkeypatch):
    out = workspace / "run"
    assert main(["train", _config(workspace, out)]) == 0
    run = _lines(capsys.readouterr().out)
    with monkeypatch.context() as m:  # the dry run may not load any weights
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
        m.setattr(quant, "load_model_4bit", lambda *a, **k: pytest.fail("loaded the model"))
        assert main(["train", _config(workspace, workspace / "fresh"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    dry = _lines(printed)
    assert "dry run: nothing trained" in printed and not (workspace / "fresh").exists()
    # the same counts as the run's own start summary
    assert dry["adapters"] == run["adapters"]
    assert dry["data"] == run["data"] and dry["eval"] == run["eval"] == "8 examples; every 2 steps"
    assert dry["plan"].startswith("3 steps (4 an epoch) x 8 rows of <= 32 tokens; 1 process")
    frozen = run["precision"].split("frozen weights ")[1].split(" MiB")[0]
    assert f"frozen weights in float32: {frozen} MiB" in dry["memory"]
    # DoRA's magnitudes (one per output row) counted as the run counts them
    assert main(["train", _config(workspace, workspace / "dora"), "lora.dora=true"]) == 0
    with_dora = _lines(capsys.readouterr().out)["adapters"]
    assert main(["train", _config(workspace, workspace / "dora_dry"), "lora.dora=true", "--dry-run"]) == 0
    assert _lines(capsys.readouterr().out)["adapters"] == with_dora
    # the plan of a two-process run: twice the rows a step, half the steps an epoch
    assert main(["train", _config(workspace, workspace / "two"), "--dry-run", "--nproc", "2"]) == 0
    assert _lines(capsys.readouterr().out)["plan"].startswith("3 steps (2 an epoch) x 16 rows of <= 32 tokens; 2 processes")
    # FSDP2 with QLoRA: each process holds half of the NF4 codes and of the other weights, and the
    # quantization state whole
    args = [_config(workspace, workspace / "fsdp"), "quantize=nf4", "train.distributed=fsdp", "--dry-run", "--nproc", "2"]
    assert main(["train", *args]) == 0
    assert "(per process under fsdp: its shards, plus the block being run" in _lines(capsys.readouterr().out)["memory"]
    model = models.meta_model(str(workspace / "model"))
    quantized = {id(model.get_submodule(path).weight) for path in quant.quantized_layers(model)}
    codes = sum(p.numel() for p in model.parameters() if id(p) in quantized)
    rest = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    state = codes * (1 / 64 + 4 / (64 * 256))  # 8-bit absmax per 64 weights, fp32 per 256 absmax
    assert frozen_bytes_estimate(model, torch.float32, nf4=True) == int(codes / 2 + state + rest * 4)
    assert frozen_bytes_estimate(model, torch.float32, nf4=True, shards=2) == int(codes / 4 + state + rest * 2)


def test_the_dry_run_stops_where_the_run_would(workspace, tmp_path, capsys):
    finished = workspace / "finished"
    assert main(["train", _config(workspace, finished, save_every=2)]) == 0  # a checkpoint at step 2
    capsys.readouterr()
    cases = [
        ([_config(workspace, finished)], "already holds a finished run; pass --resume"),
        ([_config(workspace, tmp_path / "a"), "quantize=nf4", "lora.targets=[q_proj]", "model=" + str(_odd_model(tmp_path))],
         "quantize: nf4: cannot quantize model.layers.0.mlp.down_proj (in_features=96"),
        ([_config(workspace, tmp_path / "b"), "lora.targets=[nothing_here]"], "lora.targets"),
        ([_config(workspace, tmp_path / "c"), "train.batch_size=64", "train.grad_accum=4"], "lower train.batch_size"),
        ([_config(workspace, tmp_path / "d"), f"data.train={_bad_data(tmp_path)}"], "bad.jsonl:2:"),
        ([_config(workspace, tmp_path / "e"), "quantize=nf4", "lora.init=pissa"], "lora.init = 'pissa' with quantize: nf4"),
        (["--nproc", "2"], "--nproc needs a YAML config"),
        ([_config(workspace, _file_at(tmp_path / "g" / "tensorboard").parent), "train.report_to=tensorboard"],
         "train.report_to: tensorboard cannot write"),
        ([_config(workspace, finished, save_every=2), "lora.r=8", "--resume"], "the lora (lora.r) changed since it was written"),
        # another number of rows a step, in one process or in two (the checkpoint's: 4 x 1)
        ([_config(workspace, finished, save_every=2), "train.batch_size=2", "--resume"],
         "batch_size x processes is 2 now but 4 in the checkpoint; resume with train.batch_size=4 for 1 process"),
        ([_config(workspace, finished, save_every=2), "--resume", "--nproc", "2"],
         "batch_size x processes is 8 now but 4 in the checkpoint; resume with train.batch_size=2 for 2 processes"),
    ]
    for args, message in cases:
        assert main(["train", *args, "--dry-run"]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def _file_at(path):
    path.parent.mkdir(parents=True)
    path.write_text("in the way")
    return path


def _odd_model(tmp_path):
    from helpers import tiny_llama

    return save_model_folder(tmp_path / "odd", tiny_llama(intermediate_size=96))


def _bad_data(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "1 plus 1 is", "completion": " 2"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    return path


def test_overrides_may_follow_the_flags(workspace, capsys):
    assert main(["train", _config(workspace, workspace / "late"), "--dry-run", "train.max_steps=2", "lora.r=2"]) == 0
    out = _lines(capsys.readouterr().out)
    assert out["plan"].startswith("2 steps") and "LoRA r=2 " in out["adapters"]
    with pytest.raises(SystemExit) as stop:  # anything else after the flags is still argparse's error
        main(["train", _config(workspace, workspace / "late"), "--dry-run", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_show_examples_names_the_file_and_line_of_each_example(workspace, tmp_path, capsys):
    # the training set's numbers are not a file's: several files, a blank line, a skipped record, one held out
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text('{"prompt": "1 plus 1 is", "completion": " 2"}\n\n{"prompt": 3}\n{"prompt": "2 plus 2 is", "completion": " 4"}\n')
    two.write_text('{"prompt": "3 plus 3 is", "completion": " 6"}\n{"prompt": "4 plus 4 is", "completion": " 8"}\n')
    args = ["train", _config(workspace, tmp_path / "where"), f"data.train=[{one}, {two}, {one}]", "data.skip_invalid=true",
            "data.packing=false", "train.batch_size=1", "--dry-run", "--show-examples", "6"]  # fmt: skip
    for held_out, want in (([], [f"{one}:1", f"{one}:4", f"{two}:1", f"{two}:2", f"{one}:1", f"{one}:4"]),
                           (["data.eval=null", "data.eval_fraction=0.25"], [f"{one}:1", f"{one}:4", f"{two}:2", f"{one}:1", f"{one}:4"])):  # fmt: skip
        for _ in range(2):  # tokenized, then from the cache
            assert main([*args, *held_out]) == 0
            headers = [line.split("): ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("example ")]
            assert headers == [f"example {i} of {len(want)} ({where}" for i, where in enumerate(want, 1)]


def test_the_summary_names_where_the_skipped_records_are(workspace, tmp_path, capsys):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text('{"prompt": "1 plus 1 is", "completion": " 2"}\n{"prompt": 3}\n{"prompt": "2 plus 2 is", "completion": " 4"}\n')
    two.write_text('{"text": 5}\n{"prompt": "4 plus 4 is", "completion": " 8"}\n')
    args = ["train", _config(workspace, tmp_path / "where"), f"data.train=[{one}, {two}, {one}]", f"data.eval=[{two}]",
            "data.skip_invalid=true", "data.packing=false", "train.batch_size=1", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    out = _lines(capsys.readouterr().out)
    # each file's records once, however often it is listed; the eval file's on the eval line
    assert out["data"].startswith("5 examples,") and out["data"].endswith(f"truncated 0, dropped 0, skipped 2 ({one}:2, {two}:1)")
    assert out["eval"].startswith(f"1 examples (skipped 1 ({two}:1))")


def test_show_examples_prints_the_first_examples_with_the_trained_tokens_marked(workspace, tmp_path, capsys, monkeypatch):
    records = [
        {"prompt": "2 plus 3 is", "completion": " 5"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Four."},
                      {"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]},
        {"text": "not shown"},
    ]  # fmt: skip
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _config(workspace, tmp_path / "show")
    args = ["train", cfg, f"data.train={tmp_path / 'mixed.jsonl'}", "data.eval=null", "train.eval_every=0", "data.packing=false", "train.batch_size=1", "data.max_length=64"]
    assert main([*args, "--dry-run", "--show-examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"\nexample 1 of 3 ({tmp_path / 'mixed.jsonl'}:1): 9 tokens, 3 trained\n2 plus 3 is⟦ 5<|eot_id|>⟧\n" in printed
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    chat = (f"<s>{header.format('user')}hello<|eot_id|>{header.format('assistant')}⟦Four.<|eot_id|>⟧"
            f"{header.format('user')}sort 3 1 2<|eot_id|>{header.format('assistant')}⟦1 2 3<|eot_id|>⟧")  # fmt: skip
    assert f"\n{chat}\n" in printed and f"example 2 of 3 ({tmp_path / 'mixed.jsonl'}:2):" in printed
    assert "not shown" not in printed and "example 3" not in printed
    assert main([*args, "--show-examples", "2"]) == 2
    assert "--show-examples goes with --dry-run" in capsys.readouterr().err
    assert main([*args, "--dry-run", "--show-examples", "-1"]) == 2
    # a stdout that cannot take the marks (LANG=C) gets [[ ]], and the text's own characters as escapes
    import io
    import sys

    (tmp_path / "accents.jsonl").write_text(json.dumps({"prompt": "café is", "completion": " coffee"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    code = main([*args[:2], f"data.train={tmp_path / 'accents.jsonl'}", *args[3:], "--dry-run", "--show-examples", "1"])
    assert code == 0, capsys.readouterr().err
    ascii_out.flush()
    assert "caf\\xe9 is[[ coffee<|eot_id|>]]" in ascii_out.buffer.getvalue().decode("ascii")


def test_a_trained_empty_reply_is_a_note_under_the_data_line_of_the_dry_run_and_the_run(workspace, tmp_path, capsys):
    hi = {"role": "user", "content": "hello"}
    records = [{"messages": [hi, {"role": "assistant", "content": "Four."}]}, {"messages": [hi, {"role": "assistant", "content": ""}]}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["train", _config(workspace, tmp_path / "run", max_steps=1), f"data.train={tmp_path / 'chats.jsonl'}", "data.eval=null",
            "train.eval_every=0", "train.batch_size=1", "train.grad_accum=1"]  # fmt: skip
    note = (f"note         1 chat record trains an empty assistant reply (first: {tmp_path / 'chats.jsonl'}:2), which teaches "
            'only its end of turn; give it text, mark it "weight": 0, or remove the record')  # fmt: skip
    for extra in (["--dry-run"], []):
        assert main([*args, *extra]) == 0
        printed = capsys.readouterr().out.splitlines()
        data_line = next(i for i, line in enumerate(printed) if line.startswith("data "))
        assert printed[data_line + 1] == note
