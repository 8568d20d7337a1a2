"""Where a training step's time goes, on each side of the speed benchmark (torch.profiler).

Builds bench_speed.py's model and batches, runs each side in its own process exactly as the
benchmark does, and profiles `--active` steps after the warm-up: the ops that took the most device
(GPU) time and the most CPU time, per step, and the step's wall time next to its busy device time
(a step far longer than its device time waits on the host: launches, syncs, Python).

    python bench/profile_step.py --scale 7b --case plain          # lorakit and PEFT
    python bench/profile_step.py --quick --sides lorakit --rows 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_speed  # noqa: E402


def profile_side(args: argparse.Namespace) -> None:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    work, size, case = Path(args.work), json.loads(args.size), bench_speed.CASES[args.case]
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])

    def report(prof) -> None:
        events = prof.key_averages()
        steps = args.active
        if on_gpu:
            # the kernels' own entries (an op's entry repeats the time of the kernels it launched);
            # annotations (the profiler's step, the optimizer's step) show on the GPU's timeline
            # too, spanning kernels already counted
            device_us = sum(
                e.self_device_time_total for e in events
                if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
                and not e.key.startswith(("ProfilerStep", "Optimizer."))
            )  # fmt: skip
            print(f"\n{args.side}: device busy {device_us / 1e3 / steps:.1f} ms a step (sum of kernels' own times)")
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))

    prof = profile(activities=activities, schedule=schedule(wait=size["warmup"], warmup=1, active=args.active), on_trace_ready=report)
    prof.start()
    bench_speed.STEP_HOOKS.append(prof.step)
    if args.side == "peft":
        out = bench_speed.side_peft(work, size, case)
    else:
        out = bench_speed.side_lorakit(work, size, case, json.loads(args.switches), {})
    prof.stop()
    timed = out["times"][size["warmup"] + 1 :]
    gpu = "" if out["peak_gpu"] is None else f"; peak GPU memory {out['peak_gpu'] / 2**30:.2f} GiB"
    print(f"{args.side}: wall {statistics.median(timed) * 1e3:.1f} ms a profiled step (median of {len(timed)}); "
          f"first loss {out['losses'][0]:.4f}{gpu}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--quick", action="store_true", help="bench_speed.py's small model")
    model.add_argument("--scale", choices=["7b"], help="three decoder layers of Mistral-7B's shape, 4096 tokens a step")
    parser.add_argument("--case", default="plain", choices=list(bench_speed.CASES))
    parser.add_argument("--sides", default="lorakit,peft")
    parser.add_argument("--active", type=int, default=3, help="profiled steps (after the warm-up and one more)")
    parser.add_argument("--rows", type=int, default=25, help="ops listed per table")
    parser.add_argument("--switches", default="{}", help='lorakit module switches as JSON, e.g. {"lorakit.fused.ENABLED": false}')
    for hidden in ("--side", "--work", "--size"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return profile_side(args)
    sides = args.sides.split(",")
    if any(side not in ("lorakit", "peft") for side in sides):
        parser.error(f"--sides {args.sides!r}: give lorakit, peft or both (comma-separated)")
    if args.active < 1 or args.rows < 1:
        parser.error("--active and --rows must be >= 1")
    size = dict(bench_speed.QUICK if args.quick else bench_speed.SCALE_7B if args.scale == "7b" else bench_speed.FULL)
    size["steps"] = 1 + args.active
    failed = []
    with tempfile.TemporaryDirectory(prefix="lorakit-profile-") as tmp:
        bench_speed.prepare(Path(tmp), size)
        for side in sides:
            cmd = [sys.executable, __file__, "--side", side, "--work", tmp, "--size", json.dumps(size), "--case", args.case,
                   "--active", str(args.active), "--rows", str(args.rows), "--switches", args.switches]  # fmt: skip
            if subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                failed.append(side)  # the other side still runs; the command's exit status says so
    if failed:
        raise SystemExit(f"the {' and '.join(failed)} side failed (its error is printed above)")


if __name__ == "__main__":
    main()
