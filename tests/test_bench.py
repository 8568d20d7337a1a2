"""The speed benchmark's accounting: the GEMMs it times back to back are the ones its limit counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_sequence_runs_the_gemms_the_limit_counts(bench):
    size = bench.QUICK
    floor = bench.gemm_sequence(size)
    parts = bench.gemm_limit(size, pairs=1.0)["parts"]
    plain_gflop, plain_s = floor["plain"]
    assert plain_gflop * 1e9 == pytest.approx(parts["linear+head fwd"] + parts["input grads"], rel=1e-12)
    # full checkpointing adds one forward of every layer but the last, without its last projection
    h, i, t = size["hidden"], size["intermediate"], size["batch"] * size["seq"]
    kv = size["kv_heads"] * h // size["heads"]
    rerun_layer = 2 * t * (h * h + 2 * h * kv + h * h + 2 * h * i)  # q, k, v, o, gate, up
    assert floor["ckpt"][0] * 1e9 == pytest.approx(plain_gflop * 1e9 + (size["layers"] - 1) * rerun_layer, rel=1e-12)
    assert floor["selective"] == floor["qlora"] == floor["plain"]
    assert 0 < plain_s and 0 < floor["ckpt"][1]


def test_rerun_counts_what_full_checkpointing_computes_again(bench):
    size, pairs = bench.QUICK, 1000.0
    limit = bench.gemm_limit(size, pairs=pairs)
    h, i, t, r = size["hidden"], size["intermediate"], size["batch"] * size["seq"], bench.R
    kv = size["kv_heads"] * h // size["heads"]
    gemms = 2 * t * (h * h + 2 * h * kv + h * h + 2 * h * i)  # q, k, v, o, gate, up: not down
    attention = 4 * (h // size["heads"]) * size["heads"] * pairs  # scores and PV, forward only
    adapters = 2 * t * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i)) + 2 * t * r * i  # down: x @ A^T only
    assert limit["rerun_flops"] == pytest.approx((size["layers"] - 1) * (gemms + attention + adapters), rel=1e-12)
    # its GEMMs are the ones gemm_sequence adds for the checkpointing case
    floor = bench.gemm_sequence(dict(size, repeats=1))
    assert (floor["ckpt"][0] - floor["plain"][0]) * 1e9 == pytest.approx((size["layers"] - 1) * gemms, rel=1e-12)


def test_scale_preset_has_mistral_7b_layer_shapes(bench):
    # --scale 7b claims Mistral-7B's decoder layer: 218,103,808 projection weights per layer
    size = bench.SCALE_7B
    shapes = bench.layer_shapes(size)
    assert shapes == [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    assert sum(a * b for a, b in shapes) == 218_103_808
    assert size["batch"] * size["seq"] == 4096 and size["vocab"] == 32000


def test_levers_chosen_by_words_in_their_labels(bench):
    labels = [label for label, _, _ in bench.chosen_levers(["train.compile", "varlen flash"])]
    assert labels == [
        "lorakit (all levers)",
        "- varlen flash attention on GPUs (an SDPA call per example)",
        "+ train.compile: true",
        "+ train.compile: true, mode reduce-overhead (CUDA graphs on GPUs)",
    ]
    assert len(bench.chosen_levers([])) == len(bench.LEVERS)
    with pytest.raises(SystemExit, match="--levers no-such-lever: no lever's label holds these words"):
        bench.chosen_levers(["no-such-lever"])


def test_every_lever_switch_names_an_existing_setting(bench):
    # a misspelt switch would only set a new attribute, and --levers would time the default twice
    import importlib

    for label, switches, _ in bench.LEVERS:
        for key, value in switches.items():
            module, _, attr = key.rpartition(".")
            current = getattr(importlib.import_module(module), attr, None)
            assert current is not None and type(current) is type(value), (label, key)


@pytest.mark.parametrize("script, args, said", [
    ("bench_speed.py", ["--quick", "--cases", "plain,foo"], "--cases: unknown case 'foo'; choose from plain, ckpt"),
    ("bench_speed.py", ["--quick", "--rounds", "0"], "--steps and --rounds must be >= 1"),
    ("bench_moe.py", ["--cases", "foo"], "--cases: unknown case 'foo'; choose from plain, qlora"),
    ("bench_dpo.py", ["--steps", "0"], "--steps must be >= 1"),
    ("bench_data.py", ["--baseline-n", "0"], "--n, --baseline-n and --max-length must be >= 1"),
    ("profile_step.py", ["--quick", "--sides", "lorakit,foo"], "--sides 'lorakit,foo': give lorakit, peft or both"),
])  # fmt: skip
def test_bad_benchmark_settings_are_refused_before_any_work(script, args, said):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCH.parent / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and said in done.stderr.splitlines()[-1], done.stderr
