"""`lorakit train --nproc 2` on CPU (gloo): DDP and FSDP2 against one process, resume, failures.

One process with batch_size 4 and two processes with batch_size 2 see the same global batch
(rows 0-3 of each chunk: rows 0-1 on rank 0, rows 2-3 on rank 1), so their losses and adapters
must agree to float rounding. Two-process runs go through torchrun in a subprocess; one-process
runs call the CLI in this process (no second interpreter start).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_model_folder, tiny_gpt2, tiny_llama, write_addition_data
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.config import build_run_config
from lorakit.distributed import resolve_strategy, transformer_blocks
from lorakit.errors import UserError
from lorakit.metrics import byte_size
from lorakit.models import meta_model
from lorakit.quant import frozen_bytes_estimate

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # like torchrun's workers (OMP_NUM_THREADS=1): on a busy shared CPU, more threads only wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_model_folder(root / "model")
    write_addition_data(root / "train.jsonl", 96)
    cfg = {
        "model": str(root / "model"),
        "data": {"train": str(root / "train.jsonl"), "max_length": 32},
        "lora": {"r": 4, "alpha": 8},
        # grad_accum 2: the first micro-batch of each step runs under no_sync
        "train": {"max_steps": STEPS, "grad_accum": 2, "lr": 1.0e-2, "precision": "fp32", "seed": 0,
                  "save_every": SAVE_AT, "scheduler": "linear"},
    }  # fmt: skip
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _torchrun(root, out, *args, shortcut=False, env=None, timeout=240):
    """`torchrun --standalone --nproc_per_node 2 -m lorakit train cfg.yaml ...` (or the shortcut
    `lorakit train cfg.yaml ... --nproc 2`) in a subprocess; returns (completed process, seconds)."""
    train = ["train", str(root / "cfg.yaml"), f"output_dir={out}", *args]
    if shortcut:
        command = [sys.executable, "-m", "lorakit", *train, "--nproc", "2"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit", *train]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=root)
    return proc, time.perf_counter() - start


def _failure(proc) -> str:
    """What a failed torchrun printed: the ranks' own error lines (an abort in C++ prints its reason
    early, above torchrun's long summary), then the end of stderr."""
    signs = ("Error", "error", "terminate called", "what()", "Abort", "Signal", "Traceback")
    lines = [line for line in proc.stderr.splitlines() if any(s in line for s in signs)]
    return "\n".join(lines[:60]) + "\n--- end of stderr ---\n" + proc.stderr[-3000:]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _kib(size: str) -> float:
    value, unit = size.split()
    return float(value) * (1024 if unit == "MiB" else 1)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k  # full tensors, never shards
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(workspace):
    """The reference: one process, batch_size 4."""
    out = workspace / "single"
    assert main(["train", str(workspace / "cfg.yaml"), f"output_dir={out}", "train.batch_size=4"]) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_run(workspace):
    out = workspace / "fsdp"
    # selective checkpointing (without a rerun: inside a block's forward FSDP2 has gathered its
    # parameters, so the fused paths run and register their recipes) must still match
    proc, _ = _torchrun(workspace, out, "train.batch_size=2", "train.distributed=fsdp", "train.gradient_checkpointing=selective")
    assert proc.returncode == 0, _failure(proc)
    return out


def _check_matches(run, single):
    losses, expected = _losses(run), _losses(single)
    assert len(losses) == STEPS  # one metrics writer
    assert max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-4, (losses, expected)
    assert _max_diff(_adapter(run / "adapter"), _adapter(single / "adapter")) <= 1e-5
    ckpt = f"checkpoints/step-{SAVE_AT}/adapter"
    assert _max_diff(_adapter(run / ckpt), _adapter(single / ckpt)) <= 1e-5
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_ddp_matches_one_process(workspace, single):
    out = workspace / "ddp"
    # with selective checkpointing too: each rank keeps and recomputes as one process does
    proc, _ = _torchrun(workspace, out, "train.batch_size=2", "train.distributed=ddp",
                        "train.gradient_checkpointing=selective", shortcut=True)  # fmt: skip
    assert proc.returncode == 0, _failure(proc)
    _check_matches(out, single)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["distributed"] == "ddp"
    assert proc.stdout.count("done:") == 1  # only rank 0 prints


def test_fsdp_matches_one_process(fsdp_run, single):
    _check_matches(fsdp_run, single)
    assert yaml.safe_load((fsdp_run / "config.yaml").read_text())["train"]["distributed"] == "fsdp"


def _resumable_copy(run, dest):
    """The run as it was when its step-SAVE_AT checkpoint was written (adapter and summary removed)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "summary.json").unlink()
    return dest


def test_resume_two_process_checkpoint_with_one_process(workspace, fsdp_run, single, capsys):
    out = _resumable_copy(fsdp_run, workspace / "resume1")
    # the same global batch: 1 process x batch_size 4 = 2 processes x batch_size 2
    assert main(["train", str(workspace / "cfg.yaml"), f"output_dir={out}", "train.batch_size=4", "--resume"]) == 0
    assert f"resuming from {out / 'checkpoints' / f'step-{SAVE_AT}'}" in capsys.readouterr().out
    assert len(_losses(out)) == STEPS
    assert max(abs(a - b) for a, b in zip(_losses(out), _losses(single))) <= 1e-4
    assert _max_diff(_adapter(out / "adapter"), _adapter(single / "adapter")) <= 1e-5
    # another global batch cannot continue the same data stream
    assert main(["train", str(workspace / "cfg.yaml"), f"output_dir={out}", "train.batch_size=2", "--resume"]) == 2
    assert "batch_size x processes is 2 now but 4 in the checkpoint; resume with train.batch_size=4 for 1 process" in (
        capsys.readouterr().err)


def test_resume_two_process_checkpoint_with_two_processes(workspace, fsdp_run, single):
    out = _resumable_copy(fsdp_run, workspace / "resume2")
    proc, _ = _torchrun(workspace, out, "train.batch_size=2", "train.distributed=fsdp", "--resume")
    assert proc.returncode == 0, _failure(proc)
    assert "resuming from" in proc.stdout
    assert len(_losses(out)) == STEPS
    assert max(abs(a - b) for a, b in zip(_losses(out), _losses(single))) <= 1e-4
    assert _max_diff(_adapter(out / "adapter"), _adapter(single / "adapter")) <= 1e-5


def test_a_failing_rank_ends_the_job(workspace):
    env = {"LORAKIT_TEST_FAIL_RANK": "1", "LORAKIT_DIST_TIMEOUT_S": "10"}
    proc, seconds = _torchrun(workspace, workspace / "failing", "train.batch_size=2", env=env, timeout=120)
    assert proc.returncode != 0
    assert "LORAKIT_TEST_FAIL_RANK=1: rank 1 fails" in proc.stderr
    # startup + 10 s collective timeout + torchrun's 30 s grace period, with room for a slow machine
    assert seconds < 90
    assert not (workspace / "failing" / "adapter").exists()


def test_strategy_choice(workspace, monkeypatch):
    def cfg(**kw):
        return build_run_config({"model": str(workspace / "model"), "data": {"train": str(workspace / "train.jsonl")}, **kw})

    assert resolve_strategy(cfg(), "cpu") == "ddp"
    assert resolve_strategy(cfg(train={"distributed": "fsdp"}), "cpu") == "fsdp"
    assert resolve_strategy(cfg(quantize="nf4", train={"distributed": "fsdp"}), "cpu") == "fsdp"
    # auto on GPUs: FSDP when the frozen base takes more than half a GPU; with nf4 the 4-bit model's
    # size (NF4 layers, the embeddings, norms and head in the run's precision) counts
    files = sum(p.stat().st_size for p in (workspace / "model").glob("*.safetensors"))  # fp32 weights
    four_bit = frozen_bytes_estimate(meta_model(str(workspace / "model")), torch.float32, nf4=True)
    assert 0.3 * files < four_bit < 0.6 * files  # this tiny model's embeddings and head are half its weights
    gpu = types.SimpleNamespace(total_memory=files)  # half of it: half the (fp32) weights
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    assert resolve_strategy(cfg(train={"precision": "fp32"}), "cuda") == "fsdp"
    assert resolve_strategy(cfg(quantize="nf4", train={"precision": "fp32"}), "cuda") == "ddp"
    gpu.total_memory = 2 * four_bit - 2  # half of it: just under the 4-bit model
    assert resolve_strategy(cfg(quantize="nf4", train={"precision": "fp32"}), "cuda") == "fsdp"
    gpu.total_memory = 2 * four_bit + 2
    assert resolve_strategy(cfg(quantize="nf4", train={"precision": "fp32"}), "cuda") == "ddp"
    # bitsandbytes' 8-bit AdamW cannot update FSDP2's sharded tensors: refused, whoever chose fsdp
    with pytest.raises(UserError, match="train.optimizer: adamw8bit does not run on FSDP2's sharded adapter"):
        resolve_strategy(cfg(train={"distributed": "fsdp", "optimizer": "adamw8bit"}), "cpu")
    with pytest.raises(UserError, match=r"train.distributed: ddp \(chosen by auto for this model's size\)"):
        resolve_strategy(cfg(train={"precision": "fp32", "optimizer": "adamw8bit"}), "cuda")


def test_quant_states_move_with_their_shared_code_tables_shared():
    # after fully_shard, each 4-bit layer's quantization state goes to the process's device; the
    # code tables all layers share stay one tensor there (the meta device stands in for a GPU)
    from lorakit.distributed import _move_quant_states
    from lorakit.quant import quantize_model

    model = tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    states = [m.quant_state for m in model.modules() if getattr(m, "quant_state", None) is not None]
    _move_quant_states(model, torch.device("meta"))
    moved = [t for st in states for t in (st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code)]
    assert len(states) == 14 and {t.device.type for t in moved} == {"meta"}
    assert len({id(st.code) for st in states}) == len({id(st.state2.code) for st in states}) == 1
    assert len({id(st.absmax) for st in states}) == 14  # each layer's own statistics


def test_nproc_needs_a_config(capsys):
    assert main(["train", "--nproc", "2"]) == 2
    assert "--nproc needs a YAML config" in capsys.readouterr().err


def test_nproc_checks_what_needs_no_process_group_before_it_starts_one(workspace, capsys):
    cfg = str(workspace / "cfg.yaml")
    cases = [
        (["--nproc", "0"], "--nproc 0: the number of processes must be >= 1"),  # not one process
        (["--nproc", "2", "--resume", f"output_dir={workspace / 'nothing-yet'}"], "--resume: no checkpoint in"),
        (["--nproc", "2", "train.distributed=fsdp", "train.optimizer=adamw8bit"], "adamw8bit does not run on FSDP2"),
    ]
    for args, message in cases:
        assert main(["train", cfg, *args]) == 2, message  # in this process: no worker was started
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_user_error_in_the_workers_is_one_line_and_exit_code_2(workspace):
    # met in every process, after the process group exists: printed once, without torchrun's tracebacks
    proc, _ = _torchrun(workspace, workspace / "too-little", "train.batch_size=400", shortcut=True)
    assert proc.returncode == 2, _failure(proc)
    assert proc.stderr.splitlines() == [
        "error: the dataset makes 32 packed rows, fewer than one micro-batch of batch_size x processes = 800 rows; "
        "lower train.batch_size or add data"
    ], proc.stderr
    # under torchrun itself the exit code is torchrun's, but the workers still print the line once
    proc, _ = _torchrun(workspace, workspace / "too-little", "train.batch_size=400")
    assert proc.returncode == 1 and proc.stderr.count("error: the dataset makes") == 1, proc.stderr
    assert f'File "{REPO / "lorakit"}' not in proc.stderr  # no worker's traceback (torchrun's own remains)


def test_a_stop_signal_while_a_worker_exits_ends_it_silently():
    # torchrun stops the other workers once one has exited; the signal can meet a worker inside its
    # exit handlers, where the CLI's SystemExit would be printed as "ignored" and the exit go on
    script = (
        "import atexit, os, signal, time\n"
        "from lorakit.cli import _exit_on_signal\n"
        "from lorakit.distributed import _exit_skipping_native_teardown\n"
        "signal.signal(signal.SIGTERM, _exit_on_signal)\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
        "_exit_skipping_native_teardown(2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (-signal.SIGTERM, "")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("target, sig", [("launcher", "SIGTERM"), ("launcher", "SIGINT"), ("one worker", "SIGTERM")])
def test_a_signal_stops_every_process_after_the_same_step_with_a_checkpoint(workspace, target, sig):
    # `lorakit train --nproc 2` runs torchrun's agent in its own process; the workers are its children.
    # A signal to the command (Ctrl-C, a scheduler's SIGTERM) is passed on to the workers; one that reaches
    # a single worker (a scheduler signalling each task, a few ms apart) must stop the others at the same
    # step too, or the first waits in the checkpoint's barrier while the others wait in the next step.
    out = workspace / f"signal-{target.replace(' ', '-')}-{sig}"
    command = [sys.executable, "-m", "lorakit", "train", str(workspace / "cfg.yaml"), f"output_dir={out}",
               "train.batch_size=2", "train.max_steps=400", "--nproc", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAKIT_DIST_TIMEOUT_S": "60"}
    proc = subprocess.Popen(command, env=env, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        # any checkpoint: each is renamed into place whole, and only the newest two are kept (step-2
        # lives about 0.1 s here, less than a busy machine may hold this process up)
        while not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid if target == "launcher" else workers[0], getattr(signal, sig))
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert time.monotonic() - signalled < 45, "a process waited for the others (the collective timeout is 60 s)"
    number = getattr(signal, sig)
    assert proc.returncode == 128 + number, stderr
    stopped = re.findall(rf"{sig}: stopped at step (\d+); checkpoint saved to (\S+); continue with --resume", stdout)
    assert len(stopped) == 1, stdout + stderr  # the main process says it, once
    step = int(stopped[0][0])
    assert SAVE_AT <= step < 400 and Path(stopped[0][1]) == out / "checkpoints" / f"step-{step}"
    assert json.loads((out / "checkpoints" / f"step-{step}" / "state.json").read_text())["step"] == step
    assert "Traceback" not in stderr
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # no worker left running


def test_transformer_blocks_are_found_generically():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert transformer_blocks(llama) == list(llama.model.layers)
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h)


VARIANTS = ["moe_experts", "dora", "dpo_fsdp", "dpo_ddp", "dpo_precompute_ddp", "dpo_continued_fsdp", "kto_ddp",
            "kto_precompute_fsdp", "best_fsdp", "qlora_fsdp", "qlora_moe_fsdp", "qlora_dpo_fsdp"]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_adapters_dora_dpo_and_qlora_match_one_process(workspace, variant):
    # LoRA on the fused expert weights (lorakit.experts): FSDP2 shards the (E·r, in) / (out, r·E)
    # factors; DoRA: the magnitudes are sharded, its norm reads the gathered weight; DPO: each
    # rank's micro-batch runs the reference (adapter off) and the policy, and the loss is a mean
    # over the pairs of all ranks; continuing an adapter, the reference is its frozen copy, sharded
    # beside the trained one. QLoRA: FSDP2 shards the packed NF4 codes (the quantization state
    # stays whole on the layer), in LoRA layers, in bitsandbytes' own Linear4bit (layers without
    # an adapter) and in the 4-bit MoE experts.
    from helpers import tiny_qwen3_moe
    from test_preference import addition_pairs, unpaired_records

    root = workspace / variant
    root.mkdir()
    cfg = yaml.safe_load((workspace / "cfg.yaml").read_text())
    if variant.startswith("qlora"):
        cfg["quantize"] = "nf4"
        cfg["lora"]["targets"] = ["q_proj", "v_proj", "down_proj"]  # the others stay bitsandbytes Linear4bit
    if variant in ("moe_experts", "qlora_moe_fsdp"):
        save_model_folder(root / "model", tiny_qwen3_moe())
        cfg["model"] = str(root / "model")
        cfg["lora"].update(targets=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    elif variant == "dora":
        cfg["lora"]["dora"] = True
    elif variant == "best_fsdp":  # save_best's adapter gathered from FSDP2 shards, one tracker writer
        write_addition_data(root / "eval.jsonl", 4, seed=1)
        cfg["data"]["eval"] = str(root / "eval.jsonl")
        cfg["train"].update(eval_every=1, save_best=True, early_stopping_patience=2, report_to="tensorboard")
    elif variant in ("qlora_fsdp", "qlora_moe_fsdp"):
        pass
    elif variant in ("kto_ddp", "kto_precompute_fsdp"):  # KTO's reference point z0: a mean over the micro-batches of both processes
        # precompute_reference: each process runs its share of the reference pass, the table is
        # joined by a sum, and the run matches one process's
        if variant == "kto_precompute_fsdp":
            cfg["train"]["precompute_reference"] = True
        (root / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_records(32)))
        (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_records(4, seed=1)))
        cfg["data"].update(train=str(root / "kto.jsonl"), eval=str(root / "eval.jsonl"), packing=False)
        cfg["train"].update(objective="kto", beta=0.5)
    else:
        # dpo_precompute_ddp: 62 pairs, so the reference pass's last chunk of 4 rows holds 2, both
        # rank 0's: rank 1 runs one all-padding row there (no sequences) and the table still fills
        pairs = 62 if variant == "dpo_precompute_ddp" else 64
        cfg["train"]["precompute_reference"] = variant == "dpo_precompute_ddp"
        (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_pairs(pairs)))
        (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_pairs(6, seed=1)))
        # a row is a pair: 8 a step; eval at the end (under FSDP2 through the root module's forward)
        cfg["data"].update(train=str(root / "prefs.jsonl"), eval=str(root / "eval.jsonl"), packing=False)
        cfg["train"].update(objective="dpo", beta=0.5)
    if variant == "dpo_continued_fsdp":  # from an adapter trained (SFT) on the addition records
        start = workspace / "cfg.yaml", f"output_dir={root / 'start'}", "train.max_steps=3", "train.save_every=0"
        assert main(["train", *map(str, start)]) == 0
        cfg["adapter"] = str(root / "start" / "adapter")
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "cfg.yaml"), f"output_dir={root / 'single'}", "train.batch_size=4"]) == 0
    strategy = "ddp" if variant.endswith("_ddp") else "fsdp"
    proc, _ = _torchrun(root, root / "fsdp", "train.batch_size=2", f"train.distributed={strategy}", "train.gradient_checkpointing=full")
    assert proc.returncode == 0, _failure(proc)
    _check_matches(root / "fsdp", root / "single")
    tensors = _adapter(root / "single" / "adapter")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("processes"))
    held, whole, *outside = re.findall(r"([\d.]+ [KM]iB)", line)
    # fsdp: also the root group (embeddings, final norm, head), held whole through a step
    assert len(outside) == (strategy == "fsdp") and all(0 < _kib(o) < _kib(whole) for o in outside), line
    if variant.startswith("qlora"):
        # each process holds its half of the packed codes, plus the whole quantization state; the
        # whole is what the quantization report counts
        assert "2 (fsdp)" in line and 0.5 * _kib(whole) < _kib(held) < 0.6 * _kib(whole), line
        report = next(line for line in proc.stdout.splitlines() if line.startswith("precision"))
        assert re.search(r"all frozen weights [\d.]+ [KM]iB -> ([\d.]+ [KM]iB)", report).group(1) == whole
    elif variant == "dpo_continued_fsdp":  # the frozen copy of the continued adapter is not the model's
        tensors = load_file(str(workspace / "model" / "model.safetensors"))
        assert whole == byte_size(sum(t.numel() * t.element_size() for t in tensors.values())), line
    if variant in ("moe_experts", "qlora_moe_fsdp"):
        assert sum(".mlp.experts." in k for k in tensors) == 8
    elif variant == "dora":
        assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == 2 * 7
    elif variant == "best_fsdp":
        got, want = (json.loads((root / side / "summary.json").read_text()) for side in ("fsdp", "single"))
        assert got["best_step"] == want["best_step"] and abs(got["best_eval_loss"] - want["best_eval_loss"]) < 1e-5
        assert got["stopped_early"] is want["stopped_early"] is False
        assert _max_diff(_adapter(root / "fsdp" / "best_adapter"), _adapter(root / "single" / "best_adapter")) <= 1e-5
        assert len(list((root / "fsdp" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    elif variant in ("dpo_fsdp", "dpo_ddp", "dpo_precompute_ddp", "dpo_continued_fsdp", "kto_ddp", "kto_precompute_fsdp",
                     "qlora_dpo_fsdp"):  # fmt: skip
        entries = [json.loads(line) for line in (root / "fsdp" / "metrics.jsonl").read_text().splitlines()]
        kto = variant.startswith("kto")
        first = 0.5 if kto else 0.6931472  # the policy starts as the reference
        assert abs(entries[0]["loss"] - first) < 1e-6 and all("reward_accuracy" in e for e in entries if "loss" in e)
        if variant == "kto_precompute_fsdp":  # 64 examples and their KL examples, said once (rank 0)
            assert proc.stdout.count("precomputed the reference log-probabilities of 128 sequences in ") == 1
        if variant == "dpo_precompute_ddp":  # both answers of the 62 pairs, said once (rank 0)
            assert proc.stdout.count("precomputed the reference log-probabilities of 124 sequences in ") == 1
        if kto:
            want = [json.loads(line) for line in (root / "single" / "metrics.jsonl").read_text().splitlines()]
            assert max(abs(a["kl"] - b["kl"]) for a, b in zip(entries, want) if "kl" in a) < 1e-5
            assert any(e.get("kl", 0) > 0 for e in entries)
        got, want = (json.loads((root / side / "summary.json").read_text()) for side in ("fsdp", "single"))
        assert abs(got["eval_loss"] - want["eval_loss"]) < 1e-5 and got["eval_reward_accuracy"] == want["eval_reward_accuracy"]
