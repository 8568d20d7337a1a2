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


def test_values_that_are_not_finite_are_written_as_null_so_the_file_is_strict_json(tmp_path):
    import json

    from lorakit.metrics import MetricsLog, strict_json

    def strict(text):  # NaN / Infinity are refused, as jq and JavaScript refuse them
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 2.5, "lr": 1e-4})
    log.log({"step": 1, "eval_loss": float("nan"), "eval_perplexity": float("inf")})
    log.log({"step": 2, "loss": 2.0, "samples": [{"score": float("-inf")}]})
    lines = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 1, "eval_loss": None, "eval_perplexity": None},
                     {"step": 2, "loss": 2.0, "samples": [{"score": None}]}]  # fmt: skip
    log.plot()  # a nan eval loss is a gap in the plot, not an error
    assert (tmp_path / "loss.png").stat().st_size > 0
    resumed = MetricsLog(tmp_path)
    resumed.resume_from(2)
    assert resumed.entries == lines
    resumed.plot()  # the nulls read back
    assert strict_json({"a": (1.0, float("nan"))}) == {"a": [1.0, None]}


def test_a_plot_that_cannot_be_written_is_a_note_once_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    import errno

    import matplotlib.figure

    from lorakit.metrics import MetricsLog, write_text_atomic

    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 2.0})

    def full(self, file, **kwargs):
        file.write(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    log.plot()
    log.plot()
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'loss.png'} not drawn (No space left on device); training goes on, and the plot is drawn "
        "again at the next chance\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    log.plot()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    # a text written atomically: a failure leaves the old file and no temp file
    write_text_atomic(tmp_path / "summary.json", "old")

    def cut(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    import os

    monkeypatch.setattr(os, "fsync", cut)
    try:
        write_text_atomic(tmp_path / "summary.json", "new")
    except OSError as exc:
        assert (exc.errno, exc.filename) == (errno.ENOSPC, str(tmp_path / "summary.json"))
    else:
        raise AssertionError("the write did not fail")
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == "old" and not list(tmp_path.glob(".*"))


def test_temp_files_are_made_new_never_through_a_planted_link(tmp_path, monkeypatch):
    import os
    import secrets

    from lorakit.metrics import write_text_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    draws = iter(["0000", "1111"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    (run / f".config.yaml.tmp-{os.getpid()}-0000").symlink_to(victim)  # a guessed name, planted as a link
    old = os.umask(0o022)
    try:
        write_text_atomic(run / "config.yaml", "model: m\n")
    finally:
        os.umask(old)
    assert victim.read_text() == "precious" and (run / "config.yaml").read_text() == "model: m\n"
    assert (run / "config.yaml").stat().st_mode & 0o777 == 0o644  # the umask's, not mkstemp's owner-only
    assert not (run / "config.yaml").is_symlink()


def test_metrics_are_never_appended_through_a_link_planted_while_the_run_goes_on(tmp_path):
    import os

    import pytest

    from lorakit.errors import UserError
    from lorakit.metrics import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    log = MetricsLog(tmp_path / "run")
    log.log({"step": 1, "loss": 2.0})
    (tmp_path / "run" / "metrics.jsonl").unlink()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl is not a plain file \\(a symbolic link\\?\\); the run appends its metrics"):
        log.log({"step": 2, "loss": 1.0})
    assert victim.read_text() == "precious\n"
    (tmp_path / "run" / "metrics.jsonl").unlink()
    os.mkfifo(tmp_path / "run" / "metrics.jsonl")  # nor does a FIFO there hang the run
    with pytest.raises(UserError, match="metrics.jsonl is not a plain file"):
        log.log({"step": 2, "loss": 1.0})
