#!/usr/bin/env bash
# The GPU check, prepared as one run for a lent CUDA machine (a few minutes): the equality tests of
# the optimised paths on CUDA, then the speed benchmark unchanged (bench/bench_speed.py).
# Needs torch with CUDA, transformers, peft, safetensors, pyyaml, tqdm, psutil, matplotlib and
# pytest there; lorakit runs from this checkout. QLoRA is benchmarked when bitsandbytes imports.
# The log is written to $OUT/gpu_check.log when OUT is set, else /tmp/gpu_check.log.
#
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="${OUT:-/tmp}/gpu_check.log"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__)' 2>&1 | tee "$log"
# the tests' CUDA cases: fused paths, packed attention, full and selective checkpointing against the plain path
python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_fused.py tests/test_attention.py tests/test_activation_checkpointing.py 2>&1 | tee -a "$log"
cases=plain,ckpt,selective
if python3 -c 'import bitsandbytes' 2>/dev/null; then cases+=,qlora; fi
python3 bench/bench_speed.py --cases "$cases" --rounds 2 2>&1 | tee -a "$log"
