#!/usr/bin/env bash
# The GPU check, prepared as one run for a lent CUDA machine (5-9 minutes, at most 9.5): the
# equality tests of the optimised paths on CUDA, the speed benchmark unchanged (bench/bench_speed.py)
# on the issue's model and at 7B layer shapes, then a profile of lorakit's 7B step
# (bench/profile_step.py).
# Needs torch with CUDA, transformers, peft, safetensors, pyyaml, tqdm, psutil, matplotlib and
# pytest there; lorakit runs from this checkout. QLoRA is benchmarked when bitsandbytes imports.
# Each part has its own time limit and log, and a part that fails does not stop the next: the logs
# are written to $OUT (or /tmp): gpu_tests.log, gpu_bench.log, gpu_bench_7b.log, gpu_profile_7b.log.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-/tmp}"
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
# the tests' CUDA cases: fused paths, packed attention, full and selective checkpointing against the plain path
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_fused.py tests/test_attention.py tests/test_activation_checkpointing.py 2>&1 | tee -a "$logs/gpu_tests.log"
cases=plain,ckpt,selective
if python3 -c 'import bitsandbytes' 2>/dev/null; then cases+=,qlora; fi
# One round each: the GPU is not shared, unlike the CPU host the other runs came from. Steps of the
# issue's model take tens of milliseconds there, so more of them are timed.
timeout 180 python3 bench/bench_speed.py --cases "$cases" --steps 20 2>&1 | tee "$logs/gpu_bench.log"
timeout 180 python3 bench/bench_speed.py --scale 7b --cases "$cases" --steps 10 2>&1 | tee "$logs/gpu_bench_7b.log"
# where lorakit's 7B step goes: device time by kernel, host time by op
timeout 90 python3 bench/profile_step.py --scale 7b --case plain --sides lorakit --rows 25 2>&1 | tee "$logs/gpu_profile_7b.log"
