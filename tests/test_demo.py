"""`lorakit train` with no config: the demo, shortened (the full demo's figures are in the benchmarks)."""

import json

from lorakit.cli import main


def test_shortened_demo_learns_the_task(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", f"output_dir={out}", "train.max_steps=250", "train.save_every=0"]) == 0
    printed = capsys.readouterr().out
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in entries if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 100, 200, 250]  # before training, every 100 steps, at the end
    before, after = evals[0], evals[-1]
    assert before["eval_accuracy"] <= 0.2  # the base model cannot do it
    assert after["eval_accuracy"] >= 0.3 and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    for fragment in ("before", "after", "exact match", "lorakit generate", "lorakit chat", "lorakit merge"):
        assert fragment in printed, fragment


def test_the_demo_takes_one_eval_set_and_evaluates_the_base_once(tmp_path, capsys):
    from lorakit.demo import EVAL_FILE
    from lorakit.demo.run import demo_config

    assert main(["train", f"output_dir={tmp_path / 'd'}", f"data.eval={json.dumps({'dates': str(EVAL_FILE)})}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.eval: the demo's before/after table reads one eval set") and err.count("\n") == 1
    # its own eval of the base is the eval before the first step: not run twice
    assert demo_config({"train.eval_on_start": True}).train.eval_on_start is False


def test_the_demo_names_the_data_it_was_given(tmp_path, capsys):
    from lorakit.demo import EVAL_FILE, TRAIN_FILE

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(line for line in EVAL_FILE.read_text().splitlines(keepends=True)[:20]))
    assert main(["train", f"output_dir={tmp_path / 'd'}", f"data.eval={mine}", "train.max_steps=1", "train.save_every=0"]) == 0
    printed = capsys.readouterr().out
    assert f"data: {TRAIN_FILE} / {mine};" in printed and "evaluating the base model on the eval set ..." in printed
    assert "held-out dates" not in printed
