"""The run's record: peak memory as the program's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lorakit.metrics import peak_rss_bytes

METRICS = Path(__file__).resolve().parents[1] / "lorakit" / "metrics.py"
MIB = 1 << 20


def test_peak_rss_is_the_programs_own_not_its_parents():
    # On Linux a child's getrusage peak starts at its parent's high-water mark (fork, then exec):
    # a parent that once held 512 MiB more than the child ever will must not show in the child's.
    ballast = b"\x01" * (512 * MIB)  # written, so resident
    assert peak_rss_bytes() >= len(ballast)
    # metrics.py loaded on its own: the lorakit package would import torch into the child
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('metrics', {str(METRICS)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "own = b'\\x02' * (64 << 20)\n"
        "print(module.peak_rss_bytes())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(child.stdout)
    assert 64 * MIB <= peak < 256 * MIB, peak / MIB
    del ballast


def test_a_resume_drops_a_cut_last_line_and_names_a_bad_one_elsewhere(tmp_path):
    import json

    import pytest

    from lorakit.errors import UserError
    from lorakit.metrics import MetricsLog

    entries = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"step": 4, "lo')  # an append cut short
    log = MetricsLog(tmp_path)
    log.resume_from(2)
    assert log.entries == entries[:2] and path.read_text() == "".join(json.dumps(e) + "\n" for e in entries[:2])
    path.write_text(json.dumps(entries[0]) + "\nnot json\n" + json.dumps(entries[1]) + "\n")
    with pytest.raises(UserError) as err:
        MetricsLog(tmp_path).resume_from(2)
    assert str(err.value) == f"{path}:2: not a JSON entry ('not json'); remove that line to resume"
