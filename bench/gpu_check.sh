#!/usr/bin/env bash
# The GPU check, prepared as one run for a lent CUDA machine (at most GPU_CHECK_SECONDS, default
# 540): the equality tests of the optimised paths on CUDA, the speed benchmark unchanged
# (bench/bench_speed.py) on the issue's model, the GPU levers there (varlen flash attention,
# torch.compile with and without CUDA graphs), the benchmark at 7B layer shapes, then, with time
# left, LoRA on MoE expert weights and DoRA against PEFT (bench/bench_moe.py, --cases dora) and a
# profile of both sides' steps on the issue's model (bench/profile_step.py).
# Needs torch with CUDA, transformers, peft, safetensors, pyyaml, tqdm, matplotlib and
# pytest there; lorakit runs from this checkout. QLoRA is benchmarked when bitsandbytes imports.
# Each part has its own time limit (cut to what is left of the whole) and log, and a part that
# fails does not stop the next: the logs are written to $OUT (or /tmp): gpu_tests.log,
# gpu_bench.log, gpu_levers.log, gpu_bench_7b.log, gpu_moe.log, gpu_dora.log, gpu_profile.log.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-/tmp}"
budget="${GPU_CHECK_SECONDS:-540}"

# part SECONDS LOG COMMAND...: runs COMMAND for at most SECONDS, or what is left of the budget
part() {
    local cap=$1 log=$2
    shift 2
    local left=$((budget - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        echo "skipped (${left} s of the budget left): $*" | tee -a "$logs/$log"
        return
    fi
    echo "== $* (at most ${limit} s; ${SECONDS} s in)" | tee -a "$logs/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$logs/$log"
}

python3 - <<'EOF' 2>&1 | tee "$logs/gpu_tests.log"
import importlib, torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
for name in ("transformers", "peft", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # bitsandbytes is optional: QLoRA is left out without it
        print(name, "not usable:", exc)
EOF
# the tests' CUDA cases: fused paths, packed attention (varlen flash included), full and selective
# checkpointing against the plain path
part 110 gpu_tests.log python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_fused.py tests/test_attention.py tests/test_activation_checkpointing.py
cases=plain,ckpt,selective
if python3 -c 'import bitsandbytes' 2>/dev/null; then cases+=,qlora; fi
# One round each: the GPU is not shared, unlike the CPU host the other runs came from. Steps of the
# issue's model take tens of milliseconds there, so more of them are timed.
part 150 gpu_bench.log python3 bench/bench_speed.py --cases "$cases" --steps 20
part 150 gpu_levers.log python3 bench/bench_speed.py --levers "varlen flash,train.compile" --steps 20
part 180 gpu_bench_7b.log python3 bench/bench_speed.py --scale 7b --cases "$cases" --steps 8
moe_cases=plain
if python3 -c 'import bitsandbytes' 2>/dev/null; then moe_cases+=,qlora; fi
part 90 gpu_moe.log python3 bench/bench_moe.py --cases "$moe_cases"
part 60 gpu_dora.log python3 bench/bench_speed.py --cases dora --steps 20
# where the issue's model's steps go on each side (launch-bound there): device time by kernel, host time by op
part 90 gpu_profile.log python3 bench/profile_step.py --case plain --rows 25
echo "gpu_check: ${SECONDS} s"
