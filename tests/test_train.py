"""`lorakit train` end to end through the CLI on a tiny model: files, golden losses, resume, errors."""

import dataclasses
import functools
import json
import re
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    crash_and_resume, make_tokenizer, save_model_folder, tiny_gemma2, tiny_gpt2, tiny_gpt_neox, tiny_llama, without_timing, write_addition_data,
)
from safetensors.torch import load_file

import lorakit.adapters
from lorakit import host_memory
from lorakit import train as train_module
from lorakit.cli import main
from lorakit.config import build_run_config
from lorakit.checkpoint import RunFolderLock
from lorakit.errors import UserError
from lorakit.train import lr_lambda


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_model_folder(root / "model")
    write_addition_data(root / "train.jsonl", 160)
    with open(root / "eval.jsonl", "w") as f:
        for a in range(4):
            f.write(json.dumps({"prompt": f"{a} plus 1 is", "completion": f" {a + 1}"}) + "\n")
    return root


def _config(root, out, **train):
    cfg = {
        "model": str(root / "model"),
        "output_dir": str(out),
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 3.0e-3, "precision": "fp32", "seed": 0, "warmup_steps": 2, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _entries(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_train_writes_every_file_and_loss_falls(workspace, capsys):
    out = workspace / "run"
    assert main(["train", _config(workspace, out), "train.eval_every=6", "train.save_every=4"]) == 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                 "metrics.jsonl", "loss.png", "config.yaml", "summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-8"]  # keep_checkpoints=2
    entries = _entries(out)
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in train] == list(range(1, 13))
    assert set(train[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert [e["step"] for e in evals] == [6, 12]
    assert sum(e["loss"] for e in train[-3:]) < sum(e["loss"] for e in train[:3])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < train[0]["loss"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["eval_every"] == 6 and resolved["lora"]["r"] == 4
    # the base is a local folder: named by its absolute path (tools read a relative one from their own
    # working folder), and not as the card's base_model, which a hub checks as a repository id
    card = (out / "adapter" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1]) == {"library_name": "peft", "tags": ["lora", "lorakit"]}
    base = str(Path(resolved["model"]).resolve())
    assert f"- Base model: `{base}`" in card
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    printed = capsys.readouterr().out
    assert "trainable" in printed and "done: 12 steps" in printed


# The first losses of a fixed-seed fp32 run with LoRA dropout 0.1. Step 1 does not see dropout
# (B starts at zero); steps 2 and 3 moved when dropout's masks came to be drawn from a seed per
# layer call (lorakit/csrc/dropout_cpu.cpp) instead of by torch's bernoulli.
GOLDEN_LOSSES = [6.029090881347656, 6.017055988311768, 5.962164402008057]


@pytest.fixture
def allocator_calls(monkeypatch):
    """Records `lorakit train`'s calls to host_memory.keep_freed_memory instead of making them (the
    test process keeps glibc's defaults; tests/test_host_memory.py runs the real one apart)."""
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    return calls


def test_golden_losses(workspace, allocator_calls):
    """Regression guard: the first losses of a fixed-seed fp32 run on this tiny setup."""
    out = workspace / "golden"
    assert main(["train", _config(workspace, out, max_steps=3)]) == 0
    losses = [e["loss"] for e in _entries(out) if "loss" in e]
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    assert allocator_calls == [1]  # freed memory kept between steps on CPU (lorakit.host_memory)


@pytest.mark.parametrize("mode", [True, "selective"])
def test_gradient_checkpointing_gives_the_same_losses(workspace, mode, allocator_calls):
    # every layer checkpointed but the last (lorakit.activation_checkpointing.enable); dropout
    # masks are replayed in the recompute, so the run equals the golden one
    out = workspace / f"ckpt-{mode}"
    assert main(["train", _config(workspace, out, max_steps=3, gradient_checkpointing=mode)]) == 0
    losses = [e["loss"] for e in _entries(out) if "loss" in e]
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    assert allocator_calls == [1]  # freed memory kept for the rerun (lorakit.host_memory)


@pytest.mark.parametrize("make", [tiny_gemma2, tiny_gpt_neox], ids=["gemma2", "gpt-neox"])
def test_other_architectures_train_alike_with_and_without_checkpointing(tmp_path, make, allocator_calls):
    # Gemma 2: transformers refuses SDPA for it (soft-capped attention logits), so it trains on
    # eager attention. GPT-NeoX: a fused query_key_value projection and a parallel residual.
    save_model_folder(tmp_path / "model", make())
    write_addition_data(tmp_path / "train.jsonl", 48)
    write_addition_data(tmp_path / "eval.jsonl", 4, seed=1)
    losses = {}
    for mode in (False, True, "selective"):
        out = tmp_path / f"run-{mode}"
        assert main(["train", _config(tmp_path, out, max_steps=3, gradient_checkpointing=mode)]) == 0
        losses[mode] = [e["loss"] for e in _entries(out) if "loss" in e]
    assert len(losses[False]) == 3 and all(4.0 < loss < 8.0 for loss in losses[False])  # ~ln(400) at the start
    assert losses[True] == losses[False] and losses["selective"] == losses[False]  # the same bits on CPU


def test_compiled_model_gives_the_same_losses(workspace):
    # train.compile: true runs torch.compile on the model (the loss then comes from full logits);
    # without dropout, whose random stream differs under compile, it must match the eager run
    losses = []
    for name, compile_ in (("eager-nodrop", False), ("compiled-nodrop", True)):
        out = workspace / name
        assert main(["train", _config(workspace, out, max_steps=3, compile=compile_), "lora.dropout=0.0"]) == 0
        losses.append([e["loss"] for e in _entries(out) if "loss" in e])
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_resume_after_crash_is_bit_identical(workspace, monkeypatch):
    full = workspace / "full"
    assert main(["train", _config(workspace, full, save_every=4)]) == 0

    crashed = workspace / "crashed"
    crash_and_resume(monkeypatch, _config(workspace, crashed, save_every=4), crash_at=6)
    assert (crashed / "checkpoints" / "step-4").is_dir()
    assert without_timing(_entries(crashed)) == without_timing(_entries(full))
    a, b = _adapter(full), _adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _best_config(workspace, out, **train):
    # lr 0.03 on this data: eval loss 5.4716 at step 2, then 5.4826, 5.4833, 5.5924 (steps 4-8: worse), 5.4077;
    # lr 0.1: best at step 8 of 12 (5.4346), then 5.4364, 5.4364
    return _config(workspace, out, **{"eval_every": 2, "save_every": 2, "keep_checkpoints": 10, **train})


def _same_adapter(a_dir, b_dir) -> bool:
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (a_dir, b_dir))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_best_keeps_the_adapter_of_the_best_eval(workspace):
    out = workspace / "best"
    assert main(["train", _best_config(workspace, out, lr=0.1, save_best=True)]) == 0
    evals = [e for e in _entries(out) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10, 12]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert best["step"] == 8  # not the last: the test would pass with a copy of the final adapter otherwise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 8 and summary["best_eval_loss"] == best["eval_loss"] and "stopped_early" not in summary
    assert summary["best_adapter"] == str(out / "best_adapter") and summary["steps"] == 12
    assert _same_adapter(out / "best_adapter", out / "checkpoints" / "step-8" / "adapter")
    assert not _same_adapter(out / "best_adapter", out / "adapter")
    card = (out / "best_adapter" / "README.md").read_text()
    assert "Steps: 8," in card and f"| eval_loss | {best['eval_loss']:.4f} |" in card


def test_early_stopping_ends_the_run_after_patience_evals_without_a_better_one(workspace, capsys):
    out = workspace / "early"
    assert main(["train", _best_config(workspace, out, lr=0.03, early_stopping_patience=2, save_best=True)]) == 0
    entries = _entries(out)
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4, 5, 6]
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]  # the stop's own eval is the final one, not run twice
    assert evals[1]["eval_loss"] > evals[0]["eval_loss"] and evals[2]["eval_loss"] > evals[0]["eval_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped_early"] is True and summary["best_step"] == 2
    assert summary["eval_loss"] == evals[2]["eval_loss"] and summary["best_eval_loss"] == evals[0]["eval_loss"]
    assert _same_adapter(out / "best_adapter", out / "checkpoints" / "step-2" / "adapter")
    assert _same_adapter(out / "adapter", out / "checkpoints" / "step-6" / "adapter")
    printed = capsys.readouterr().out
    assert "eval         4 examples; every 2 steps, the best eval_loss kept in best_adapter/, early stopping after 2 evals " \
           "without a better eval_loss" in printed  # fmt: skip
    assert f"early stopping at step 6: eval_loss has not bettered {evals[0]['eval_loss']:.4f} (step 2) in 2 evals" in printed
    assert f"best eval_loss: {evals[0]['eval_loss']:.4f} at step 2 -> {out / 'best_adapter'}" in printed
    # --resume from the checkpoint of the stopping eval ends there again (nothing trains, nothing changes)
    before = (_entries(out), _adapter(out), (out / "best_adapter" / "adapter_model.safetensors").read_bytes(),
              (out / "summary.json").read_text())
    assert main(["train", _best_config(workspace, out, lr=0.03, early_stopping_patience=2, save_best=True), "--resume"]) == 0
    assert _entries(out) == before[0] and (out / "best_adapter" / "adapter_model.safetensors").read_bytes() == before[2]
    assert all(torch.equal(a, before[1][k]) for k, a in _adapter(out).items())
    assert (out / "summary.json").read_text() == before[3]  # the run's own record: its time, speed and losses
    assert "early stopping at step 6" in capsys.readouterr().out
    # patience 4 outlasts the bad patch (steps 4, 6, 8; step 10 is better): the run goes on to its end
    longer = workspace / "early4"
    assert main(["train", _best_config(workspace, longer, lr=0.03, early_stopping_patience=4)]) == 0
    summary = json.loads((longer / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stopped_early"] is False and not (longer / "best_adapter").exists()


def test_early_stopping_and_the_best_resume_exactly(workspace, monkeypatch):
    # the checkpoint at step 4 holds the best so far (step 2) and one eval without a better one
    whole = workspace / "early_whole"
    assert main(["train", _best_config(workspace, whole, lr=0.03, early_stopping_patience=2, save_best=True)]) == 0
    crashed = workspace / "early_crashed"
    crash_and_resume(monkeypatch, _best_config(workspace, crashed, lr=0.03, early_stopping_patience=2, save_best=True), crash_at=5)
    assert json.loads((crashed / "checkpoints" / "step-4" / "state.json").read_text())["best"] == {
        "metric": "eval_loss", "value": [e for e in _entries(whole) if "eval_loss" in e][0]["eval_loss"], "step": 2,
        "evals_since": 1, "saved": True,
    }  # fmt: skip
    assert without_timing(_entries(crashed)) == without_timing(_entries(whole))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, crashed))
    assert {k: a[k] for k in ("steps", "best_step", "best_eval_loss", "stopped_early")} == {
        k: b[k] for k in ("steps", "best_step", "best_eval_loss", "stopped_early")
    }  # fmt: skip
    assert _same_adapter(whole / "best_adapter", crashed / "best_adapter")


def test_early_stopping_on_evals_that_are_no_finite_number(workspace, monkeypatch, capsys):
    # a NaN eval is never better: patience runs out, and the summary has no best
    monkeypatch.setattr(train_module, "_evaluate", lambda run: {"eval_loss": math.nan, "eval_perplexity": math.nan})
    out = workspace / "early_nan"
    assert main(["train", _best_config(workspace, out, lr=0.03, early_stopping_patience=2, save_best=True)]) == 0
    assert "early stopping at step 4: eval_loss has been no finite number in 2 evals" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "best_step" not in summary and not (out / "best_adapter").exists()
    assert summary["stopped_early"] is True


def test_save_best_turned_on_at_a_resume_names_no_folder_it_did_not_write(workspace, monkeypatch):
    # the best (step 8) was measured while save_best was off: no best_adapter/ holds it, and none is named
    out = workspace / "best_late"
    config = _best_config(workspace, out, lr=0.1, early_stopping_patience=5, save_every=4)
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda run: (_ for _ in ()).throw(RuntimeError("crash")) if run.step == 9 else real_step(run))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", config])
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", config, "train.save_best=true", "--resume"]) == 0  # from step 8, whose eval is the best
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 8 and "best_adapter" not in summary


def test_a_resume_puts_back_the_best_adapter_of_its_checkpoint(workspace, monkeypatch):
    # the run dies at step 7, after step 6's eval wrote a better best_adapter/ than the step-4 checkpoint's
    # (step 2's); resumed to end at step 4, its best is step 2's, and best_adapter/ must hold that adapter
    out = workspace / "best_back"
    config = _best_config(workspace, out, lr=0.1, save_best=True, save_every=4)
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda run: (_ for _ in ()).throw(RuntimeError("crash")) if run.step == 7 else real_step(run))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", config])
    monkeypatch.setattr(train_module, "train_step", real_step)
    evals = {e["step"]: e["eval_loss"] for e in _entries(out) if "eval_loss" in e}
    assert evals[6] < evals[2] < evals[4] and "Steps: 6," in (out / "best_adapter" / "README.md").read_text()
    step6 = (out / "best_adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["train", config, "train.max_steps=4", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 2 and summary["best_eval_loss"] == evals[2]
    assert (out / "best_adapter" / "adapter_model.safetensors").read_bytes() != step6
    assert _same_adapter(out / "best_adapter", out / "checkpoints" / "step-4" / "best_adapter")
    assert "Steps: 2," in (out / "best_adapter" / "README.md").read_text()
    assert [e["step"] for e in _entries(out) if "eval_loss" in e] == [2, 4]  # step 4's eval is not run again at the end
    # with no best saved by the checkpoint's step, a best_adapter/ written after it is the lost part's
    early = workspace / "best_none"
    config = _best_config(workspace, early, lr=0.1, save_best=True, save_every=1, eval_every=3)
    monkeypatch.setattr(train_module, "train_step", lambda run: (_ for _ in ()).throw(RuntimeError("crash")) if run.step == 4 else real_step(run))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", config, "train.keep_checkpoints=10"])
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert (early / "best_adapter").is_dir()
    shutil.rmtree(early / "checkpoints" / "step-4")
    shutil.rmtree(early / "checkpoints" / "step-3")
    assert main(["train", config, "train.keep_checkpoints=10", "train.max_steps=2", "train.save_best=false", "--resume"]) == 0
    assert not (early / "best_adapter").exists() and "best_adapter" not in json.loads((early / "summary.json").read_text())


def test_a_new_run_starts_its_record_anew_where_a_run_died_before_its_first_checkpoint(workspace, monkeypatch):
    out = workspace / "died"
    real_step = train_module.train_step

    def crashing(run):
        if run.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(run)

    monkeypatch.setattr(train_module, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", _config(workspace, out, max_steps=6)])
    assert len(_entries(out)) == 3 and not (out / "checkpoints").exists()
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", _config(workspace, out, max_steps=6)]) == 0  # no checkpoint: a new run, no --resume
    assert [e["step"] for e in _entries(out)] == [1, 2, 3, 4, 5, 6, 6]  # six train entries and the final eval


def test_neftune_adds_bounded_noise_in_training_only():
    from helpers import tiny_llama

    from lorakit.train import add_neftune

    model = tiny_llama().train()
    ids = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(0))
    clean = model.get_input_embeddings()(ids)
    add_neftune(model, 5.0)
    noise = model.get_input_embeddings()(ids) - clean
    bound = 5.0 / (40 * 64) ** 0.5  # alpha / sqrt(L * d)
    assert noise.abs().max() <= bound and noise.abs().max() > 0.99 * bound
    assert abs(noise.abs().mean().item() - bound / 2) < 0.02 * bound  # uniform on [-bound, bound]
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    # another process (rank) draws other noise, while torch's generator advances alike in both
    noise = {}
    for rank in (0, 1):
        other = tiny_llama().train()
        add_neftune(other, 5.0, rank)
        torch.manual_seed(7)
        noise[rank] = other.get_input_embeddings()(ids) - clean
        noise[f"after{rank}"] = torch.rand(3)
    assert not torch.equal(noise[0], noise[1]) and torch.equal(noise["after0"], noise["after1"])


def test_neftune_changes_the_losses_and_resumes_bit_identically(workspace, monkeypatch, capsys):
    noisy, crashed = workspace / "neftune", workspace / "neftune_crashed"
    assert main(["train", _config(workspace, noisy, max_steps=6, save_every=3, neftune_alpha=5.0)]) == 0
    assert main(["train", _config(workspace, workspace / "neftune_off", max_steps=1)]) == 0
    plain = [e["loss"] for e in _entries(workspace / "neftune_off") if "loss" in e]
    losses = [e["loss"] for e in _entries(noisy) if "loss" in e]
    assert losses[0] != plain[0] and abs(losses[0] - plain[0]) < 0.05  # noise, not another model
    crash_and_resume(monkeypatch, _config(workspace, crashed, max_steps=6, save_every=3, neftune_alpha=5.0), crash_at=4)
    assert without_timing(_entries(crashed)) == without_timing(_entries(noisy))
    capsys.readouterr()
    assert main(["train", _config(workspace, workspace / "neftune_dpo", objective="dpo", neftune_alpha=5.0)]) == 2
    assert "train.neftune_alpha = 5.0: NEFTune is for SFT; dpo would compare noisy answers" in capsys.readouterr().err


def _signalling(fn, *, at_step: int, sig: int):
    """`fn(run)`, sending this process `sig` once it returns at step `at_step` (a user's Ctrl-C, a scheduler's SIGTERM)."""

    def wrapped(run):
        result = fn(run)
        if run.step == at_step:
            os.kill(os.getpid(), sig)
        return result

    return wrapped


def test_sigint_saves_a_checkpoint_and_resume_finishes(workspace, monkeypatch, capsys):
    out = workspace / "sigint"
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", _signalling(real_step, at_step=5, sig=signal.SIGINT))
    assert main(["train", _config(workspace, out)]) == 128 + signal.SIGINT
    assert "checkpoint saved" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-5" / "state.json").is_file()
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", _config(workspace, out), "--resume"]) == 0
    assert [e["step"] for e in _entries(out) if "loss" in e] == list(range(1, 13))


def test_a_signal_once_the_processes_agreed_to_stop_is_ignored():
    from types import SimpleNamespace

    run = SimpleNamespace(interrupted=None, stopping=None)
    previous = train_module._install_signal_handlers(run)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.interrupted == signal.SIGTERM  # the first: stop after this step
        run.stopping = signal.SIGTERM  # what every process agreed on
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's stop of the others, once one has exited
        run.stopping = None  # one process: a second Ctrl-C stops at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        train_module._restore_signal_handlers(previous)


def test_a_stop_during_the_final_eval_or_save_loses_nothing(workspace, monkeypatch, capsys):
    # the last step is done: a stop during the final eval checkpoints it, one during the save lets it end
    out = workspace / "final_stop"
    real_eval, real_save = train_module.evaluate, lorakit.adapters.save_adapter
    monkeypatch.setattr(train_module, "evaluate", _signalling(real_eval, at_step=12, sig=signal.SIGTERM))
    assert main(["train", _config(workspace, out)]) == 128 + signal.SIGTERM
    assert "SIGTERM: stopped at step 12; checkpoint saved" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-12" / "state.json").is_file() and not (out / "adapter").exists()
    assert [e["step"] for e in _entries(out) if "eval_loss" in e and e["step"] == 12] == []  # logged by the resume, once
    monkeypatch.setattr(train_module, "evaluate", real_eval)
    assert main(["train", _config(workspace, out), "--resume"]) == 0
    assert [e["step"] for e in _entries(out) if "eval_loss" in e].count(12) == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()

    def save_then_stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # during the save: recorded, and the finished run ends as it would
        return real_save(*args, **kwargs)

    monkeypatch.setattr(lorakit.adapters, "save_adapter", save_then_stop)
    assert main(["train", _config(workspace, workspace / "save_stop")]) == 0
    assert (workspace / "save_stop" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((workspace / "save_stop" / "summary.json").read_text())["steps"] == 12


def test_non_finite_loss_stops_and_sets_aside_the_checkpoint_that_gave_it(workspace, capsys, monkeypatch):
    # one huge update: step 2's loss is not finite, on the adapter step 1 wrote
    out = workspace / "diverge"
    code = main(["train", _config(workspace, out, save_every=1), "train.lr=1.0e+30", "train.max_grad_norm=0", "train.warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    err = err[err.index("error:") :]  # (after the progress bar)
    assert re.fullmatch(r"error: (loss|gradient norm) is (nan|inf) at step 2; stopped before updating the adapter\. Lower train.lr, "
                        r"raise train.warmup_steps or check the data; no earlier checkpoint: start again \(the checkpoint of step "
                        rf"1, whose adapter gave it, is set aside as {re.escape(str(out))}/checkpoints/diverged-step-1\)\n", err), err  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["diverged-step-1"]
    # a later divergence: --resume then continues from the checkpoint before the one set aside
    real_step = train_module.train_step

    def diverge_at_four(run):
        if run.step == 3:
            raise train_module.TrainingDiverged("loss is nan at step 4; stopped before updating the adapter")
        return real_step(run)

    later = workspace / "diverge_later"
    monkeypatch.setattr(train_module, "train_step", diverge_at_four)
    assert main(["train", _config(workspace, later, save_every=1, keep_checkpoints=3)]) == 1
    root = later / "checkpoints"
    err = capsys.readouterr().err
    assert err[err.index("error:") :] == (f"error: loss is nan at step 4; stopped before updating the adapter; --resume continues "
                                       f"from {root}/step-2 (the checkpoint of step 3, whose adapter gave it, is set aside as "
                                       f"{root}/diverged-step-3)\n")  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["diverged-step-3", "step-1", "step-2"]
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", _config(workspace, later, save_every=1, keep_checkpoints=3), "--resume"]) == 0
    assert [e["step"] for e in _entries(later) if "loss" in e] == list(range(1, 13))


def test_refuses_to_overwrite_and_resume_mismatch(workspace, capsys):
    out = workspace / "guard"
    assert main(["train", _config(workspace, out, max_steps=2, save_every=1)]) == 0
    capsys.readouterr()
    assert main(["train", _config(workspace, out, max_steps=2)]) == 2
    assert "already holds a finished run; pass --resume" in capsys.readouterr().err
    assert main(["train", _config(workspace, out, max_steps=2), "lora.r=8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lora (lora.r)" in err
    # data.columns is part of the data: another mapping is another run (none leaves the fingerprint as it was)
    assert main(["train", _config(workspace, out, max_steps=2), "data.columns={prompt: question}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data (data.columns)" in err
    assert main(["train", _config(workspace, out, max_steps=2), "data.system_prompt=Be brief.", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data (data.system_prompt)" in err


def test_a_list_of_data_files_trains_as_one_and_resumes_only_unchanged(workspace, capsys):
    out = workspace / "two_files"
    extra = workspace / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"{a} plus {a} is {2 * a}"}) + "\n" for a in range(8)))
    files = f"data.train=[{workspace / 'train.jsonl'}, {extra}]"
    assert main(["train", _config(workspace, out, max_steps=2, save_every=1), files]) == 0
    assert "data         168 examples" in capsys.readouterr().out  # 160 + 8
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]["train"]
    assert saved == [str(workspace / "train.jsonl"), str(extra)]
    extra.write_text(extra.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert main(["train", _config(workspace, out, max_steps=3, save_every=1), files, "--resume"]) == 2
    assert "cannot resume" in (err := capsys.readouterr().err) and "data (data.train)" in err
    assert main(["train", _config(workspace, out, max_steps=3), f"data.train=[{workspace / 'nowhere.jsonl'}, {extra}]"]) == 2
    assert "nowhere.jsonl': file not found" in capsys.readouterr().err
    # a list of one file is that file: a run started either way resumes the other way
    from lorakit.config import load_run_config
    from lorakit.train import fingerprint

    one, listed = (load_run_config(_config(workspace, out), {"data.train": v}) for v in (str(extra), [str(extra)]))
    assert fingerprint(one) == fingerprint(listed)
    assert main(["train", _config(workspace, out), f"data.train=[{workspace / 'train.jsonl'}, 3]"]) == 2
    assert "data.train: missing" not in capsys.readouterr().err  # the bad item is the one problem
    # a file with options of its own (here its records' name for "text"); the options are part of the data
    body = workspace / "body.jsonl"
    body.write_text("".join(json.dumps({"body": f"{a} plus {a} is {2 * a}"}) + "\n" for a in range(8)))
    own = f"data.train=[{workspace / 'train.jsonl'}, {{path: {body}, columns: {{text: body}}}}]"
    assert main(["train", _config(workspace, workspace / "own-options", max_steps=2), own]) == 0
    assert "data         168 examples" in capsys.readouterr().out
    trained, renamed = _adapter(out), _adapter(workspace / "own-options")  # the same records under another name
    assert renamed.keys() == trained.keys() and all(torch.equal(renamed[k], trained[k]) for k in trained)
    with_options = load_run_config(_config(workspace, out), {"data.train": [{"path": str(extra), "columns": {"text": "body"}}]})
    assert fingerprint(with_options)["data"]["train"] == [[fingerprint(listed)["data"]["train"], {"columns": {"text": "body"}}]]


def test_a_chat_template_for_a_base_model_is_trained_with_and_travels_with_the_adapter(tmp_path, capsys):
    from helpers import make_tokenizer, tiny_llama
    from transformers import AutoTokenizer

    from lorakit.chat_templates import CHAT_TEMPLATES
    from lorakit.models import load_for_inference

    save_model_folder(tmp_path / "base", tiny_llama(), make_tokenizer(None))  # a base model: no chat template
    chat = [{"messages": [{"role": "user", "content": f"{a} plus 1?"}, {"role": "assistant", "content": f"{a + 1}"}]}
            for a in range(16)]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    cfg = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"), "lora": {"r": 4},
           "data": {"train": str(tmp_path / "chat.jsonl"), "max_length": 64},
           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "save_every": 1}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "chat records need a tokenizer with a chat template, and this one has none; set data.chat_template" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "data.chat_template=chatml"]) == 0
    printed = capsys.readouterr().out
    for folder in (tmp_path / "out" / "adapter", tmp_path / "out" / "checkpoints" / "step-1" / "adapter"):
        assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    # the trained tokens are ChatML's, as apply_chat_template renders it
    tok = make_tokenizer(None)
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    from lorakit.config import DataConfig
    from lorakit.data import load_dataset

    data = load_dataset(tmp_path / "chat.jsonl", tok, DataConfig(max_length=64), use_cache=False)
    assert data.example(0)[0].tolist() == tok.apply_chat_template(chat[0]["messages"])["input_ids"]
    assert ("ends a turn with '<|im_end|>'" in printed) == (len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) != 1)
    # inference and merge take the adapter's template
    _, loaded = load_for_inference(tmp_path / "base", tmp_path / "out" / "adapter", device="cpu")
    assert loaded.chat_template == CHAT_TEMPLATES["chatml"]
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "out" / "adapter"), "--out", str(merged)]) == 0
    assert AutoTokenizer.from_pretrained(merged).chat_template == CHAT_TEMPLATES["chatml"]
    # and generators other than lorakit's stop at its end of turn, a token of this vocabulary
    from transformers import GenerationConfig

    end = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(end) == 1 and end[0] in GenerationConfig.from_pretrained(merged).eos_token_id
    # training that continues the adapter renders with its template (the base has none) and keeps it
    more = {**cfg, "adapter": str(tmp_path / "out" / "adapter"), "output_dir": str(tmp_path / "more")}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(more))
    assert main(["train", str(tmp_path / "more.yaml"), "--dry-run"]) == 0
    assert main(["train", str(tmp_path / "more.yaml")]) == 0
    assert (tmp_path / "more" / "adapter" / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    # an edit of the continued adapter's template is another run: its checkpoints do not resume
    (tmp_path / "out" / "adapter" / "chat_template.jinja").write_text(CHAT_TEMPLATES["chatml"].replace("\\n", " "))
    (tmp_path / "more" / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", str(tmp_path / "more.yaml"), "--resume"]) == 2
    assert "the data (data.adapter_chat_template) changed since it was written" in capsys.readouterr().err
    (tmp_path / "out" / "adapter" / "chat_template.jinja").write_text(CHAT_TEMPLATES["chatml"])
    # an edited template file is another run: its checkpoint does not resume
    template = tmp_path / "t.jinja"
    template.write_text(CHAT_TEMPLATES["chatml"])
    out = ["output_dir=" + str(tmp_path / "out2"), f"data.chat_template={template}"]
    assert main(["train", str(tmp_path / "c.yaml"), *out]) == 0  # 2 steps, a checkpoint at step 1
    template.write_text(CHAT_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|> "))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml"), *out, "train.max_steps=3", "--resume"]) == 2
    assert "data (data.chat_template)" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "data.chat_template=nowhere.jinja"]) == 2
    assert "data.chat_template = 'nowhere.jinja': no such file; give a Jinja template file or one of chatml" in capsys.readouterr().err


def test_validation_reports_every_problem(workspace, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tmp_path / "missing-model"),
        "data": {"train": str(tmp_path / "missing.jsonl"), "max_lenght": 12},
        "lora": {"r": 0, "dropout": 1.5},
        "train": {"lr": "fast", "scheduler": "cosin", "batch_size": 0},
    }))  # fmt: skip
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for fragment in ("unknown key 'data.max_lenght'; did you mean 'data.max_length'?", "train.lr = 'fast': expected a number",
                     "lora.r = 0", "lora.dropout = 1.5", "train.scheduler = 'cosin'", "train.batch_size = 0: must be >= 1",
                     "model = ", "folder not found", "data.train = ", "file not found"):  # fmt: skip
        assert fragment in err, fragment


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["train", str(bad), "oops"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_a_hub_name_transformers_cannot_get_exits_2(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in every test: the name is not in the local cache either
    config = _config(workspace, tmp_path / "hub-run", max_steps=1)
    assert main(["train", config, "model=lorakit-tests/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "error: model 'lorakit-tests/no-such-model' is not a local folder, and transformers could not get it" in err
    assert "Traceback" not in err
    assert main(["generate", "--model", "lorakit-tests/no-such-model", "--prompt", "hi"]) == 2
    assert "could not get it from the Hugging Face Hub" in capsys.readouterr().err


def test_max_length_against_the_models_positions(workspace, tmp_path, capsys):
    # a position table (GPT-2's, n_positions 32) has no row past its end: refused before
    # the data is read; rotary positions (the Llama model, 256) go on, with a note
    save_model_folder(tmp_path / "gpt2", tiny_gpt2(n_positions=32))
    config = _config(workspace, tmp_path / "gpt2-run", max_steps=1)
    assert main(["train", config, f"model={tmp_path / 'gpt2'}", "data.max_length=33"]) == 2
    err = capsys.readouterr().err
    assert "data.max_length = 33 is longer than the 32 positions of" in err and "data.max_length: 32 or less" in err
    assert not (tmp_path / "gpt2-run").exists()
    assert main(["train", _config(workspace, tmp_path / "llama-run", max_steps=1), "data.max_length=300"]) == 0
    assert "note: data.max_length = 300 is past the 256 positions" in capsys.readouterr().out


def test_lr_schedules():
    from lorakit.config import build_run_config

    cfg = build_run_config({"model": "m", "data": {"train": "t"}, "train": {"warmup_steps": 2}}, check_paths=False)
    f = lr_lambda(cfg, 10)
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cfg.train.scheduler = "linear"
    assert lr_lambda(cfg, 10)(6) == pytest.approx(0.5)
    # warmup as a share of the steps (5 of 50), and a decay that ends at 10% of lr
    cfg = build_run_config(
        {"model": "m", "data": {"train": "t"}, "train": {"warmup_ratio": 0.1, "min_lr_ratio": 0.1}}, check_paths=False
    )
    f = lr_lambda(cfg, 50)
    assert [round(f(s), 4) for s in (0, 4, 5, 50)] == [round(1 / 6, 4), round(5 / 6, 4), 1.0, 0.1]
    assert f(27) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))
    with pytest.raises(UserError, match=r"warmup_ratio = 0.1 and train.warmup_steps = 2: set one of them"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"warmup_ratio": 0.1, "warmup_steps": 2}}, check_paths=False)
    short = build_run_config({"model": "m", "data": {"train": "t"}, "train": {"warmup_ratio": 0.04}}, check_paths=False)
    assert lr_lambda(short, 10)(0) == 0.5  # 0.4 of a step rounds up, as transformers does: never no warmup
    with pytest.raises(UserError, match=r"min_lr_ratio = 0.1 with train.scheduler = 'constant'"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"min_lr_ratio": 0.1, "scheduler": "constant"}},
                         check_paths=False)  # fmt: skip
    with pytest.raises(UserError, match=r"train.min_lr_ratio = 1.5: must be in \[0, 1\]"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"min_lr_ratio": 1.5}}, check_paths=False)


def test_a_warmup_as_long_as_the_run_is_said_with_the_lr_it_ends_at():
    from lorakit.train import warmup_note

    def note(steps, **train):
        return warmup_note(build_run_config({"model": "m", "data": {"train": "t"}, "train": train}, check_paths=False), steps)

    assert note(10, warmup_steps=9) is None and note(10) is None and note(10, warmup_ratio=0.5) is None
    # the last of 4 steps runs at 4/11 of lr: (step + 1) / (warmup + 1)
    assert note(4, warmup_steps=10, lr=1e-3) == (
        "note: train.warmup_steps = 10 is not shorter than the run's 4 steps: the learning rate never reaches "
        "train.lr = 0.001 (its last step's is 0.000364); lower train.warmup_steps or use train.warmup_ratio"
    )


@pytest.mark.parametrize("shape", [None, "linear", "1-sqrt"])
def test_the_wsd_schedule_is_transformers_past_the_warmup(shape):
    from transformers.optimization import _get_wsd_scheduler_lambda

    train = {"scheduler": "wsd", "warmup_steps": 3, "decay_ratio": 0.25, "min_lr_ratio": 0.1, "decay_shape": shape}
    f = lr_lambda(build_run_config({"model": "m", "data": {"train": "t"}, "train": train}, check_paths=False), 40)
    ref = functools.partial(_get_wsd_scheduler_lambda, num_warmup_steps=3, num_stable_steps=27, num_decay_steps=10,
                            warmup_type="linear", decay_type=shape or "cosine", min_lr_ratio=0.1, num_cycles=0.5)  # fmt: skip
    assert [f(s) for s in range(3, 41)] == pytest.approx([ref(s) for s in range(3, 41)], abs=1e-12)
    assert [f(s) for s in (0, 2, 29, 30)] == [0.25, 0.75, 1.0, 1.0]  # lorakit's warmup: never a step at lr 0
    assert f(35) == pytest.approx(0.1 + 0.9 * {None: 0.5, "linear": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape])


def test_wsd_defaults_and_its_keys_elsewhere_are_refused():
    def build(**train):
        return build_run_config({"model": "m", "data": {"train": "t"}, "train": train}, check_paths=False)

    f = lr_lambda(build(scheduler="wsd"), 50)  # the last 10% (5 steps) decay, cosine, toward 0
    assert [f(s) for s in (0, 44, 45)] == [1.0, 1.0, 1.0]
    assert f(47) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5))) and f(50) == 0.0
    f = lr_lambda(build(scheduler="wsd"), 30)  # 10% of 30 steps is 3, not the 4 that 0.1 x 30 rounds up to in floats
    assert [f(s) for s in (26, 27)] == [1.0, 1.0] and f(28) < 1.0
    f = lr_lambda(build(scheduler="wsd", warmup_steps=9, decay_ratio=0.5), 10)  # a warmup past the decay's start
    assert [round(f(s), 4) for s in (8, 9)] == [0.9, 1.0]
    for train, message in [
        ({"decay_ratio": 0.2}, "train.decay_ratio = 0.2 with train.scheduler = 'cosine': it shapes the wsd schedule's "
                               "final decay; set train.scheduler: wsd, or remove decay_ratio"),
        ({"decay_shape": "linear", "scheduler": "linear"}, "train.decay_shape = 'linear' with train.scheduler = 'linear'"),
        ({"scheduler": "wsd", "decay_ratio": 0}, "train.decay_ratio = 0.0: must be > 0.0"),
        ({"scheduler": "wsd", "decay_ratio": 1.5}, r"train.decay_ratio = 1.5: must be in \(0, 1\], e.g. 0.1"),
        ({"scheduler": "wsd", "decay_shape": "exp"}, "train.decay_shape = 'exp': use one of cosine, linear, 1-sqrt"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            build(**train)


def test_a_wsd_run_steps_at_its_schedules_rates(workspace):
    out = workspace / "wsd"
    assert main(["train", _config(workspace, out, max_steps=6, scheduler="wsd", decay_ratio=0.5, decay_shape="linear")]) == 0
    f = lr_lambda(build_run_config(yaml.safe_load((out / "config.yaml").read_text()), check_paths=False), 6)
    assert [round(f(s), 4) for s in range(6)] == [0.3333, 0.6667, 1.0, 1.0, 0.6667, 0.3333]
    assert [e["lr"] for e in _entries(out) if "lr" in e] == pytest.approx([3.0e-3 * f(s) for s in range(6)], rel=1e-12)


def test_epoch_evals_and_checkpoints_come_at_the_step_where_each_pass_over_the_data_ends(workspace, capsys):
    # 26 rows in micro-batches of 2: 13 an epoch; 3 a step: the passes end in steps 5 (13 of 15), 9 (26 of 27)
    # and 13 (39 of 39: every micro-batch of the 3 passes is trained)
    out = workspace / "per-epoch"
    config = _config(workspace, out, max_steps=None, epochs=3, batch_size=2, grad_accum=3, eval_every="epoch",
                     save_every="epoch", keep_checkpoints=5)  # fmt: skip
    assert main(["train", config]) == 0
    print_out = capsys.readouterr().out
    assert "plan         13 steps x 6 rows" in print_out and "eval         4 examples; at each epoch's end\n" in print_out, print_out
    assert [e["step"] for e in _entries(out) if "eval_loss" in e] == [5, 9, 13]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5", "step-9"]
    with pytest.raises(UserError, match=r"train.eval_every = 'epochs': give a number of steps \(0: never\) or epoch"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"eval_every": "epochs"}}, check_paths=False)
    with pytest.raises(UserError, match=r"train.save_every = -1: give a number of steps \(0: never\) or epoch"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"save_every": -1}}, check_paths=False)


def test_eval_on_start_logs_the_base_at_step_0_and_changes_nothing_else(workspace, capsys):
    with_start, without = workspace / "evalstart", workspace / "evalnostart"
    assert main(["train", _config(workspace, with_start, max_steps=4, eval_every=2, save_best=True, eval_on_start=True)]) == 0
    assert "eval         4 examples; before the first step, every 2 steps, the best eval_loss" in capsys.readouterr().out
    assert main(["train", _config(workspace, without, max_steps=4, eval_every=2, save_best=True)]) == 0
    first, *rest = _entries(with_start)
    assert first["step"] == 0 and set(first) == {"step", "eval_loss", "eval_perplexity"}
    capsys.readouterr()
    assert main(["eval", "--model", str(workspace / "model"), "--data", str(workspace / "eval.jsonl"), "--json",
                 "--max-length", "64"]) == 0  # fmt: skip
    assert first["eval_loss"] == pytest.approx(json.loads(capsys.readouterr().out)["loss"], abs=1e-5)  # the base's
    # the same steps, evals, best and adapter, to the bit: the eval before the start draws no random numbers
    timeless = [[{k: v for k, v in e.items() if k not in ("tokens_per_s", "elapsed_s")} for e in run] for run in (rest, _entries(without))]
    assert timeless[0] == timeless[1]
    summaries = [json.loads((out / "summary.json").read_text()) for out in (with_start, without)]
    assert summaries[0]["best_step"] == summaries[1]["best_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(_adapter(with_start).values(), _adapter(without).values()))
    with pytest.raises(UserError, match="train.eval_on_start = true: needs eval data"):
        build_run_config({"model": "m", "data": {"train": "t"}, "train": {"eval_on_start": True}}, check_paths=False)


def test_named_eval_sets_are_each_evaluated_and_one_is_watched(workspace, capsys):
    other = workspace / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"{a} plus 2 is", "completion": f" {a + 2}"}) + "\n" for a in range(6)))
    one, named = workspace / "evalone", workspace / "evalnamed"
    assert main(["train", _config(workspace, one, max_steps=4, eval_every=2, save_best=True, eval_generate=True,
                                  eval_max_new_tokens=2)]) == 0  # fmt: skip
    sets = {"plus1": str(workspace / "eval.jsonl"), "mixed": [str(other), str(workspace / "eval.jsonl")]}
    args = ["train", _config(workspace, named, max_steps=4, eval_every=2, save_best=True, eval_generate=True,
                             eval_max_new_tokens=2, best_metric="eval_plus1_loss"), f"data.eval={json.dumps(sets)}"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval         plus1 4 examples, mixed 10 examples; every 2 steps, the best eval_plus1_loss kept in" in out
    assert "eval plus1 loss " in out and "eval mixed loss " in out and "eval mixed accuracy " in out
    evals = [e for e in _entries(named) if "eval_plus1_loss" in e]
    want = [e for e in _entries(one) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [e["step"] for e in want] == [2, 4]
    for got, ref in zip(evals, want):  # the set of the same file gives the same figures
        assert set(got) == {"step"} | {f"eval_{n}_{k}" for n in sets for k in ("loss", "perplexity", "accuracy")}
        assert (got["eval_plus1_loss"], got["eval_plus1_accuracy"]) == (ref["eval_loss"], ref["eval_accuracy"])
        assert got["eval_mixed_loss"] != got["eval_plus1_loss"]
    summary, reference = (json.loads((out / "summary.json").read_text()) for out in (named, one))
    assert summary["eval_sets"] == ["plus1", "mixed"] and summary["best_step"] == reference["best_step"]
    assert summary["best_eval_plus1_loss"] == reference["best_eval_loss"]
    assert all(torch.equal(a, b) for a, b in zip(_adapter(named).values(), _adapter(one).values()))
    with pytest.raises(UserError, match="train.best_metric = 'eval_loss': use one of eval_a_loss, eval_a_perplexity"):
        build_run_config({"model": "m", "data": {"train": "t", "eval": {"a": "x"}},
                          "train": {"save_best": True, "eval_every": 2}}, check_paths=False)  # fmt: skip


def test_named_eval_sets_resume_only_with_the_same_sets_and_a_failing_first_eval_leaves_no_handlers(workspace, capsys, monkeypatch):
    other = workspace / "other2.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"{a} plus 3 is", "completion": f" {a + 3}"}) + "\n" for a in range(3)))
    sets = {"a": str(workspace / "eval.jsonl"), "b": str(other)}
    out = workspace / "evalsets-resume"
    assert main(["train", _config(workspace, out, max_steps=2, save_every=1), f"data.eval={json.dumps(sets)}"]) == 0
    swapped = {"b": sets["a"], "a": sets["b"]}  # the same files in the same order, each in the other set
    capsys.readouterr()
    assert main(["train", _config(workspace, out, max_steps=2), f"data.eval={json.dumps(swapped)}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data (data.eval)" in err
    # an override into a data.eval that is a file, not sets, is refused rather than replacing it
    assert main(["train", _config(workspace, workspace / "evalsets-dotted"), "data.eval.a=x.jsonl"]) == 2
    assert "override data.eval.a='x.jsonl': data.eval is" in capsys.readouterr().err
    # the eval before the first step fails: the run's signal handlers are gone all the same
    def failing(run):
        raise RuntimeError("eval failed")

    monkeypatch.setattr(train_module, "evaluate", failing)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="eval failed"):
        train_module.run_training(build_run_config(yaml.safe_load(Path(_config(workspace, workspace / "evalfails",
                                                                               eval_on_start=True)).read_text())))  # fmt: skip
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_mistakes_found_before_the_first_step(workspace, tmp_path, capsys, monkeypatch):
    def refused(args, message):
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "no answer here"}) + "\n")
    for dry in ([], ["--dry-run"]):  # eval_generate on eval records without an answer: before training, not after it
        refused([_config(workspace, tmp_path / "noanswer", eval_generate=True), f"data.eval={json.dumps({'t': str(texts)})}", *dry],
                f"train.eval_generate = true: data.eval.t ({texts}) has no record with an answer")
    assert not (tmp_path / "noanswer" / "metrics.jsonl").exists()
    small = save_model_folder(tmp_path / "small", tiny_llama(vocab_size=50))  # the test tokenizer has 400 tokens
    capsys.readouterr()
    with monkeypatch.context() as patched:  # said from config.json: before the weights load (and the kernels build)
        patched.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
        for dry in ([], ["--dry-run"]):
            refused([_config(workspace, tmp_path / "vocab"), f"model={small}", *dry], "but " + str(small) + "'s embedding table has 50 rows")
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused([_config(workspace, tmp_path / "o"), f"output_dir={afile / 'run'}"], f"{afile} is a file, not a folder")
    # a key only the model can judge is named with its place in the file, or the command line
    config = Path(_config(workspace, tmp_path / "targets"))
    text = config.read_text().replace("  r: 4\n", "  r: 4\n  targets: [q_prj]\n")
    config.write_text(text)
    line = text.splitlines().index("  targets: [q_prj]") + 1
    for dry in ([], ["--dry-run"]):
        refused([str(config), *dry], f"error: {config}:{line}: lora.targets = ['q_prj'] matches no layer LoRA can wrap")
    refused([str(config), "lora.targets=[k_prj]"], "error: command line: lora.targets = ['k_prj'] matches no layer")
    # a checkpoint past this run's steps, and damaged checkpoints
    out = tmp_path / "ckpt"
    assert main(["train", _config(workspace, out, max_steps=5, save_every=2)]) == 0  # checkpoints at steps 2 and 4
    capsys.readouterr()
    for dry in ([], ["--dry-run"]):
        refused([_config(workspace, out, max_steps=1), "--resume", *dry], "is at step 4, past this run's 1 steps")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # the finished run's adapter stays
    step = out / "checkpoints" / "step-4"
    (step / "state.json").write_text(json.dumps({"step": "4"}))
    refused([_config(workspace, out, max_steps=6), "--resume"], f"checkpoint {step} is damaged (state.json holds no step number)")
    (step / "optimizer.pt").write_bytes(b"not a pickle at all")
    for dry in ([], ["--dry-run"]):
        refused([_config(workspace, out, max_steps=6), "--resume", *dry], "is damaged (optimizer.pt holds no tensors lorakit wrote)")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_made_is_one_line_before_the_model_loads(workspace, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_config", no_model)
    cases = [("/proc/lorakit-out", "cannot write in /proc (No such file or directory)")]  # root may write anywhere else
    if os.geteuid() != 0:  # the permission bits hold for everyone else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((str(locked / "run"), f"cannot write in {locked} (Permission denied)"))
    for out, problem in cases:
        for dry in ([], ["--dry-run"]):
            assert main(["train", _config(workspace, tmp_path / "o"), f"output_dir={out}", *dry]) == 2
            assert capsys.readouterr().err == (
                f"error: output_dir '{out}': {problem}; set output_dir to a folder you can write\n"
            )


def test_file_options_that_equal_the_data_sections_fingerprint_as_none(workspace):
    # a resume checkpoint of `train: [a.jsonl]` is this run's with options that change nothing
    data = str(workspace / "train.jsonl")

    def fingerprint(train, **section):
        cfg = build_run_config({"model": str(workspace / "model"), "data": {"train": train, "eval": [train[-1]], **section}})
        return train_module.fingerprint(cfg)["data"]

    plain = fingerprint([data])
    for entry, section in [({"columns": {}}, {}), ({"format": "auto", "system_prompt": None}, {}),
                           ({"format": "chat", "columns": {"prompt": "q"}}, {"format": "chat", "columns": {"prompt": "q"}}),
                           ({"system_prompt": "S."}, {"system_prompt": "S."})]:  # fmt: skip
        assert fingerprint([{"path": data, **entry}], **section) == fingerprint([data], **section), entry
    assert fingerprint([{"path": data, "columns": {}}]) == plain
    # options that change what is read still make another run
    hashed = plain["train"]
    assert fingerprint([{"path": data, "system_prompt": "S."}])["train"] == [[hashed, {"system_prompt": "S."}]]
    assert fingerprint([{"path": data, "columns": {}}], columns={"prompt": "q"})["train"] == [[hashed, {"columns": {}}]]
    # so does a repeat other than 1 (the train file's examples count as often in an epoch)
    repeated = lambda repeat: train_module.fingerprint(build_run_config(  # noqa: E731
        {"model": str(workspace / "model"), "data": {"train": [{"path": data, "repeat": repeat}], "eval": [data]}}))["data"]  # fmt: skip
    assert repeated(1) == plain and repeated(0.5)["train"] == [[hashed, {"repeat": 0.5}]]


def test_a_checkpoint_written_before_lora_layers_pattern_existed_still_resumes(workspace, tmp_path):
    # lora.layers_pattern is a new LoraConfig field: a null one in the fingerprint made every earlier
    # checkpoint "cannot resume ... the lora (lora.layers_pattern) changed"
    base = {"model": str(workspace / "model"), "data": {"train": str(workspace / "train.jsonl")}}
    cfg = build_run_config({**base, "lora": {"targets": ["q_proj"], "layers": [1]}})
    now = train_module.fingerprint(cfg)
    earlier = {**now, "lora": {k: v for k, v in dataclasses.asdict(cfg.lora).items() if k != "layers_pattern"}}
    train_module._check_same_run(earlier, now, tmp_path)
    patterned = build_run_config({**base, "lora": {"targets": ["q_proj"], "layers": [1], "layers_pattern": "layers"}})
    with pytest.raises(UserError) as err:
        train_module._check_same_run(earlier, train_module.fingerprint(patterned), tmp_path)
    assert str(err.value) == (f"cannot resume from {tmp_path}: the lora (lora.layers_pattern) changed since it was written; "
                              "restore the original settings, or start a new run in another output_dir")  # fmt: skip


def test_eval_command_matches_the_trainers_eval_loss(workspace, capsys):
    out = workspace / "evalmatch"
    assert main(["train", _config(workspace, out, max_steps=2)]) == 0
    trainer_loss = [e for e in _entries(out) if "eval_loss" in e][-1]["eval_loss"]
    capsys.readouterr()
    code = main(["eval", "--model", str(workspace / "model"), "--adapter", str(out / "adapter"),
                 "--data", str(workspace / "eval.jsonl"), "--json", "--max-length", "64"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(trainer_loss, abs=1e-5)
    # bf16: the same forward (lorakit's attention and fused kernels) and the run's batch size give its bits
    bf16 = workspace / "evalmatch-bf16"
    assert main(["train", _config(workspace, bf16, max_steps=2, precision="bf16")]) == 0
    trainer_loss = [e for e in _entries(bf16) if "eval_loss" in e][-1]["eval_loss"]
    capsys.readouterr()
    assert main(["eval", "--model", str(workspace / "model"), "--adapter", str(bf16 / "adapter"), "--data",
                 str(workspace / "eval.jsonl"), "--json", "--max-length", "64", "--precision", "bf16", "--batch-size", "4"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == trainer_loss


def test_a_resume_with_a_changed_learning_rate_and_weight_decay_goes_on_with_the_new_ones(workspace, monkeypatch, capsys):
    # the schedule's factors come from the config, the states saved the learning rates and weight
    # decay: the resumed steps must be those of a run configured with the new values throughout
    from lorakit import train as train_module

    new = workspace / "new-lr"  # (a longer warmup too: the first resumed step's rate is the new schedule's)
    assert main(["train", _config(workspace, new, save_every=4, lr=1e-3, weight_decay=0.1, lr_ratio_b=2.0, warmup_steps=3)]) == 0
    changed = workspace / "changed-lr"
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda run: real_step(run) if run.step < 6 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", _config(workspace, changed, save_every=4, lr=3e-3, lr_ratio_b=2.0)])
    monkeypatch.setattr(train_module, "train_step", real_step)
    capsys.readouterr()
    assert main(["train", _config(workspace, changed, save_every=4, lr=1e-3, weight_decay=0.1, lr_ratio_b=2.0, warmup_steps=3),
                 "--resume"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "the config's learning rate 0.001, 0.002 (was 0.003, 0.006) and weight decay 0.1, 0.1 (was 0.0, 0.0) hold" in printed
    resumed = {e["step"]: e["lr"] for e in _entries(changed) if "lr" in e and e["step"] > 4}
    fresh = {e["step"]: e["lr"] for e in _entries(new) if "lr" in e and e["step"] > 4}
    assert resumed == fresh and len(fresh) == 8


def test_a_resume_with_another_optimizer_is_refused_before_it_starts():
    from lorakit.train import check_resume_optimizer

    adamw = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}}, "param_groups": []}
    eight_bit = {"state": {0: {"step": 1, "state1": torch.zeros(2, dtype=torch.uint8), "state2": torch.zeros(2)}}, "param_groups": []}
    check_resume_optimizer("adamw", adamw, Path("ckpt"))
    check_resume_optimizer("adamw8bit", eight_bit, Path("ckpt"))
    check_resume_optimizer("adamw8bit", {"state": {}, "param_groups": []}, Path("ckpt"))  # nothing to tell it by
    with pytest.raises(UserError, match=r"cannot resume from ckpt with train.optimizer: adamw8bit: its optimizer state is adamw's; resume with train.optimizer: adamw"):
        check_resume_optimizer("adamw8bit", adamw, Path("ckpt"))
    with pytest.raises(UserError, match=r"its optimizer state is adamw8bit's"):
        check_resume_optimizer("adamw", eight_bit, Path("ckpt"))


def test_chat_template_kwargs_are_trained_with_and_kept_in_the_adapters_template(tmp_path, capsys):
    from helpers import make_tokenizer, tiny_llama
    from test_data import THINKING_TEMPLATE

    from lorakit.chat_templates import TEMPLATE_VARIABLES_MARK
    from lorakit.generate import render_prompt
    from lorakit.models import load_for_inference

    tok = make_tokenizer("chatml")
    tok.chat_template = THINKING_TEMPLATE
    save_model_folder(tmp_path / "base", tiny_llama(), tok)
    chat = [{"messages": [{"role": "user", "content": f"{a} plus 1?"}, {"role": "assistant", "content": f"{a + 1}"}]}
            for a in range(8)]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    cfg = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"), "lora": {"r": 4},
           "data": {"train": str(tmp_path / "chat.jsonl"), "max_length": 64, "chat_template_kwargs": {"enable_thinking": False}},
           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "save_every": 1}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    kept = (tmp_path / "out" / "adapter" / "chat_template.jinja").read_text()
    assert kept == TEMPLATE_VARIABLES_MARK + "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}\n" + THINKING_TEMPLATE
    # inference with the adapter renders as the base's template with enable_thinking=False
    _, loaded = load_for_inference(tmp_path / "base", tmp_path / "out" / "adapter", device="cpu")
    prompt = chat[0]["messages"][:1]
    expected = tok.apply_chat_template(prompt, add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert render_prompt(loaded, prompt, chat=True) == expected and "<think></think>" in tok.decode(expected)
    # the variables are part of the run: a checkpoint does not resume with others
    (tmp_path / "out" / "summary.json").unlink()
    capsys.readouterr()
    for other in ("{enable_thinking: true}", "{enable_thinking: 0}"):  # (0 == false in Python, not in the template)
        assert main(["train", str(tmp_path / "c.yaml"), f"data.chat_template_kwargs={other}", "--resume"]) == 2
        assert "the data (data.chat_template_kwargs) changed since it was written" in capsys.readouterr().err
    # a name the template never reads is a mistake, found before a step
    typo = ["data.chat_template_kwargs={enable_thinkng: false}", f"output_dir={tmp_path / 'typo'}", "--dry-run"]
    assert main(["train", str(tmp_path / "c.yaml"), *typo]) == 2
    assert "data.chat_template_kwargs.enable_thinkng: the chat template never reads 'enable_thinkng'" in capsys.readouterr().err
    # a tokenizer of several templates: which one the adapter would keep is the user's to say
    from lorakit.config import build_run_config
    from lorakit.train import prepare_chat_template

    several = make_tokenizer("chatml")
    several.chat_template = {"default": THINKING_TEMPLATE, "tool_use": THINKING_TEMPLATE}
    with pytest.raises(UserError, match=r"several chat templates \(default, tool_use\): the adapter keeps one template"):
        prepare_chat_template(several, build_run_config(cfg, check_paths=False), print)


def test_epochs_train_every_micro_batch_of_their_passes():
    # 20 micro-batches an epoch, grad_accum 12: one whole step an epoch, but rounding down left 8 untrained
    from types import SimpleNamespace

    stream = SimpleNamespace(microbatches_per_epoch=lambda: 20, num_rows=80)
    for epochs, steps in ((1, 2), (3, 5), (6, 10)):
        cfg = build_run_config({"model": "m", "data": {"train": "t"}, "train": {"grad_accum": 12, "epochs": epochs}}, check_paths=False)
        assert train_module.plan_steps(cfg, stream, 1) == (steps, 1)
        assert steps * 12 >= epochs * 20 > (steps - 1) * 12  # every micro-batch, less than a step more
    cfg = build_run_config({"model": "m", "data": {"train": "t"}, "train": {"grad_accum": 4, "epochs": 2}}, check_paths=False)
    assert train_module.plan_steps(cfg, stream, 1) == (10, 5)  # whole steps: as before


def test_a_resumed_runs_summary_counts_the_whole_runs_time_and_tokens(workspace, monkeypatch):
    out = workspace / "timed"
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda run: (_ for _ in ()).throw(RuntimeError("crash")) if run.step == 8 else real_step(run))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", _config(workspace, out, save_every=6)])
    monkeypatch.setattr(train_module, "train_step", real_step)
    state_file = out / "checkpoints" / "step-6" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["trained"]["tokens"] > 0 and 0 < state["trained"]["seconds"] < 100
    state["trained"]["seconds"] = 1000.0  # a long first part: the summary must count it
    state_file.write_text(json.dumps(state))
    assert main(["train", _config(workspace, out, save_every=6), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 1000 < summary["time_s"] < 1100 and all(e["elapsed_s"] > 1000 for e in _entries(out) if "loss" in e and e["step"] > 6)
    # packed rows of one length: steps 1-6 and 7-12 train as many tokens
    assert summary["tokens_per_s"] * summary["time_s"] == pytest.approx(2 * state["trained"]["tokens"], rel=1e-6)


def test_each_process_draws_its_own_dropout_masks_and_the_shared_generator_advances_alike():
    # one seed for all processes dropped the same positions of every process's rows
    from types import SimpleNamespace

    def masks(rank):
        torch.manual_seed(5)
        run = SimpleNamespace(device=torch.device("cpu"), dist=train_module.Distributed(rank=rank, world_size=2))
        with train_module._this_process_randomness(run):
            drawn = torch.nn.functional.dropout(torch.ones(4096), p=0.5)
        return drawn, torch.get_rng_state()

    (m0, after0), (m1, after1), (again, _) = masks(0), masks(1), masks(0)
    assert torch.equal(m0, again) and (m0 == m1).float().mean() < 0.6  # its own, and the same on a rerun (a resume)
    torch.manual_seed(5)
    torch.randint(0, 2**62, (1,))  # what the step takes from the shared generator, in every process
    assert torch.equal(after0, after1) and torch.equal(after0, torch.get_rng_state())


def test_a_chat_template_whose_turns_do_not_end_on_a_stop_token_is_said(tmp_path):
    from lorakit.train import use_chat_template

    turn = "{{ m.role + ': ' + m.content }}{% if m.role == 'assistant' %}END{% endif %}{{ '\\n' }}"
    notes = {}
    for name, end in (("eos", "{{ eos_token }}"), ("words", "[done]"), ("nothing", "")):
        path = tmp_path / f"{name}.jinja"
        path.write_text("{% for m in messages %}" + turn.replace("END", end) + "{% endfor %}")
        logged = []
        use_chat_template(make_tokenizer(template=None), str(path), logged.append)
        notes[name] = logged
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(UserError) as err:
        use_chat_template(make_tokenizer(template=None), str(broken), print)
    assert str(err.value) == f"{broken}:2: the chat template does not parse (unexpected '}}'); fix it, or give another (data.chat_template)"
    assert notes["eos"] == []
    assert notes["words"] == ["note         the chat template ends a turn with '[done]', which is 5 tokens of this vocabulary, not a "
                              "stop token: generation stops at EOS only; end the assistant turns with {{ eos_token }} to stop there"]
    assert notes["nothing"] == ["note         the chat template writes nothing after an assistant turn: no token is trained to end a "
                                "reply, so the model will not learn to stop; end the assistant turns with {{ eos_token }}"]


# --------------------------------------------------------------------------- the output folder
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_one_before(workspace, capsys, monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    out = workspace / "full-disk"
    config = _config(workspace, out, max_steps=5, save_every=2)
    real_save = torch.save
    saves = []

    def save(obj, f):  # the second checkpoint's optimizer state meets a full disk, as Python's file write does
        saves.append(1)
        if len(saves) == 3:
            with open("/dev/full", "wb") as full:
                real_save(obj, full)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", config]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(out))}/checkpoints/\.step-4\.tmp-\d+-\w+/"
                        r"optimizer\.pt: free some space there, or write elsewhere \(earlier outputs are intact\)", error), error
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # no staging left, step 2 whole
    assert not (out / ".lorakit-run.lock").exists()
    monkeypatch.setattr(torch, "save", real_save)
    whole = workspace / "full-disk-whole"
    assert main(["train", config, "--resume"]) == 0 and main(["train", _config(workspace, whole, max_steps=5, save_every=2)]) == 0
    resumed, uninterrupted = _adapter(out), _adapter(whole)  # from step 2 as if nothing had happened
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_one_run_at_a_time_writes_an_output_dir(workspace, capsys):
    import subprocess
    import sys

    out = workspace / "held"
    config = _config(workspace, out, max_steps=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lorakit.checkpoint import RunFolderLock; lock = RunFolderLock.take(sys.argv[1]); "
         "print('held', flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        (out / "checkpoints" / "step-3").mkdir(parents=True)  # what the holder wrote: the refusal says who holds it
        (out / "checkpoints" / "step-3" / "state.json").write_text("{}")
        for dry in ([], ["--dry-run"]):
            assert main(["train", config, *dry]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"error: output_dir {str(out)!r} is in use by another training run (process {holder.pid}); wait for it to "
                "end, or set a new output_dir=..."
            )  # fmt: skip
        assert sorted(p.name for p in out.iterdir()) == [".lorakit-run.lock", "checkpoints"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(out / "checkpoints")
    assert main(["train", config]) == 0  # the holder gone, its lock goes with it
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / ".lorakit-run.lock").exists()
    # a run refused in its setup leaves no folder it made
    refused = workspace / "refused" / "deeper"
    assert main(["train", _config(workspace, workspace / "refused-run", max_steps=2), f"output_dir={refused}", "data.max_length=1"]) == 2
    assert not (workspace / "refused").exists()


def test_a_link_planted_as_the_run_lock_is_never_written_through(workspace, capsys):
    out = workspace / "planted"
    out.mkdir()
    victim = workspace / "precious.txt"
    victim.write_text("precious\n")
    (out / ".lorakit-run.lock").symlink_to(victim)

    def refused_as(kind: str) -> None:  # by the run and by its dry run, before anything is written
        for dry in (["--dry-run"], []):
            assert main(["train", _config(workspace, out, max_steps=2), *dry]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"error: output_dir {str(out)!r}: {out / '.lorakit-run.lock'} is {kind}, where the run writes its "
                ".lorakit-run.lock file; move it away, or set a new output_dir=..."
            )  # fmt: skip

    refused_as("a symbolic link")
    assert victim.read_text() == "precious\n" and sorted(p.name for p in out.iterdir()) == [".lorakit-run.lock"]
    # the lock itself never opens through one, whoever asks (a link planted after the run's checks)
    with pytest.raises(UserError, match="is a symbolic link; lorakit writes its run's process id there, never through a link"):
        RunFolderLock.take(out)
    assert victim.read_text() == "precious\n"
    # nor is metrics.jsonl appended to through one (a resumed run's folder)
    (out / ".lorakit-run.lock").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    assert main(["train", _config(workspace, out, max_steps=2)]) == 2
    assert "metrics.jsonl is a symbolic link, where the run writes its metrics.jsonl file" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"
    # a FIFO as the lock does not hang the run: it is no plain file
    (out / "metrics.jsonl").unlink()
    os.mkfifo(out / ".lorakit-run.lock")
    refused_as("not a plain file")


def test_a_file_named_as_what_the_run_writes_is_refused_before_a_step(workspace, capsys):
    cases = {"checkpoints": ("file", "a file", "folder"), "adapter": ("link", "a symbolic link", "folder"),
             "best_adapter": ("file", "a file", "folder"), "metrics.jsonl": ("folder", "a folder", "file")}  # fmt: skip
    for name, (make, kind, wants) in cases.items():
        out = workspace / f"taken-{name}"
        out.mkdir()
        path = out / name
        if make == "file":
            path.write_text("mine")
        elif make == "link":
            (workspace / "elsewhere").mkdir(exist_ok=True)
            path.symlink_to(workspace / "elsewhere")
        else:
            path.mkdir()
        for dry in (["--dry-run"], []):
            assert main(["train", _config(workspace, out, max_steps=2), *dry]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"error: output_dir {str(out)!r}: {path} is {kind}, where the run writes its {name} {wants}; move it away, "
                "or set a new output_dir=..."
            )  # fmt: skip
        assert sorted(p.name for p in out.iterdir()) == [name]
    linked = workspace / "linked-checkpoints"  # a checkpoints folder on another disk is fine
    linked.mkdir()
    (workspace / "other-disk").mkdir()
    (linked / "checkpoints").symlink_to(workspace / "other-disk")
    assert main(["train", _config(workspace, linked, max_steps=2, save_every=1)]) == 0
    assert sorted(p.name for p in (workspace / "other-disk").iterdir()) == ["step-1"]  # (the last step saves the adapter)


def test_checkpoint_stagings_of_killed_runs_are_swept_and_pruning_hides_first(tmp_path):
    import subprocess
    import sys

    from lorakit.checkpoint import save_checkpoint
    from lorakit.inject import inject_adapter

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    root = tmp_path / "checkpoints"
    for name in (f".step-5.tmp-{gone.pid}-abc", f".step-9.tmp-{gone.pid}-pruned", f".step-7.tmp-{os.getpid()}-mine", ".step-3.tmp-x"):
        (root / name / "adapter").mkdir(parents=True)
    model = tiny_llama()
    inject_adapter(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    state = {"scheduler": {}, "stream": {}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer_state={"state": {}, "param_groups": []}, state=state, keep=2)
    # the dead process's two went, this process's and an unnumbered one stay; step-1 was pruned whole
    assert sorted(p.name for p in root.iterdir()) == [".step-3.tmp-x", f".step-7.tmp-{os.getpid()}-mine", "step-2", "step-3"]
    # pruning takes this run's checkpoints only: a linked checkpoints folder may hold another run's
    (root / "step-1").mkdir()
    (root / "step-1" / "state.json").write_text(json.dumps({"step": 1, "fingerprint": {"model": "another run"}}))
    save_checkpoint(tmp_path, 4, model=model, optimizer_state={"state": {}, "param_groups": []}, state=state, keep=2)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-1", "step-3", "step-4"]


def test_a_pad_token_the_model_has_no_row_for_pads_with_another_id(tmp_path, capsys):
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # added, the model not resized for it
    assert tokenizer.pad_token_id >= 400
    write_addition_data(tmp_path / "train.jsonl", 24)
    losses = {}
    for name, tok in (("resized-not", tokenizer), ("plain", make_tokenizer())):
        save_model_folder(tmp_path / name, tiny_llama(), tok)
        out = tmp_path / f"out-{name}"
        cfg = {"model": str(tmp_path / name), "output_dir": str(out), "data": {"train": str(tmp_path / "train.jsonl"), "packing": False},
               "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 3, "batch_size": 8, "precision": "fp32", "seed": 0}}  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
        losses[name] = [e["loss"] for e in _entries(out) if "loss" in e]
    assert losses["resized-not"] == losses["plain"]  # padding is neither attended to nor trained, whatever its id
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 plus 1 is\n12 plus 30 is a longer prompt\n")
    for batch in ("1", "2"):  # batched: left padding
        assert main(["generate", "--model", str(tmp_path / "resized-not"), "--adapter", str(tmp_path / "out-resized-not" / "adapter"),
                     "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", batch]) == 0  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-4:-2] == printed[-2:]


def test_notes_on_copies_of_tied_embeddings_and_a_tokenizer_without_eos(tmp_path, capsys):
    write_addition_data(tmp_path / "train.jsonl", 16)
    tokenizer = make_tokenizer(template=None)
    tokenizer.eos_token = None
    for name, model, tok in (("tied", tiny_llama(tie_word_embeddings=True), make_tokenizer()), ("untied", tiny_llama(), tokenizer)):
        save_model_folder(tmp_path / name, model, tok)
    base = {"data": {"train": str(tmp_path / "train.jsonl"), "packing": False, "max_length": 64}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"}}
    notes = {}
    for model, saved in (("tied", ["embed_tokens"]), ("tied", ["embed_tokens", "lm_head"]), ("untied", ["lm_head"])):
        cfg = {**base, "model": str(tmp_path / model), "output_dir": str(tmp_path / "out"), "lora": {"r": 2, "modules_to_save": saved}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        for dry in (["--dry-run"], []):
            assert main(["train", str(tmp_path / "c.yaml"), *dry]) == 0
            printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
            notes.setdefault((model, len(saved)), printed)
            assert notes[(model, len(saved))] == printed  # the dry run says what the run says
            shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert notes[("tied", 1)] == [
        "note: the model ties its output head to its input embedding, and lora.modules_to_save trains a copy of the input "
        "embedding alone: the output head keeps the base's weights (new tokens learn nothing there); add it to "
        "modules_to_save to train both"
    ]
    assert notes[("tied", 2)] == [
        "note: the model ties its output head to its input embedding; lora.modules_to_save trains a copy of each, apart, "
        "so they drift apart (a merge writes them untied)"
    ]
    assert notes[("untied", 1)] == [
        "note: the tokenizer has no eos_token, so completion, instruction and text examples end without one and the model "
        "does not learn where to stop; set eos_token in the model's tokenizer_config.json"
    ]


def test_per_module_scales_get_a_note_on_how_servers_apply_them():
    from lorakit.train import serving_note

    plain = build_run_config({"model": "m", "output_dir": "out", "data": {"train": "t.jsonl"}}, check_paths=False)
    assert serving_note(plain) is None
    patterned = build_run_config({"model": "m", "output_dir": "out", "data": {"train": "t.jsonl"},
                                  "lora": {"rank_pattern": {"o_proj": 4}, "rslora": True}}, check_paths=False)  # fmt: skip
    assert serving_note(patterned) == (
        "note: lora.rank_pattern and lora.rslora: PEFT and lorakit apply the adapter as trained, vLLM and llama.cpp one "
        "scale to every module (llama.cpp no rsLoRA); `lorakit combine --adapter out/adapter --out out/portable` writes "
        "it as they apply it"
    )
    dora = build_run_config({"model": "m", "output_dir": "out", "data": {"train": "t.jsonl"},
                             "lora": {"rslora": True, "dora": True}}, check_paths=False)  # fmt: skip
    assert serving_note(dora) is None  # no plain LoRA: servers (and combine) refuse it anyway
