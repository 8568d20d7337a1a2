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
