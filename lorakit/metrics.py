"""The run's record: `metrics.jsonl` (one JSON object per line) and `loss.png`.

Train entries carry `step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `elapsed_s`; eval entries
carry `step` and `eval_loss` (plus `eval_perplexity`, `eval_accuracy` when measured, a preference
objective's rewards; for named eval sets `eval_<name>_loss` and so on; step 0 for the eval before
the first step). Experiment trackers (lorakit.tracking) are handed each entry as it is written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, Optional, Union


class MetricsLog:
    """Appends entries to metrics.jsonl and redraws loss.png from them; `trackers` (an object with
    log(entry), lorakit.tracking.Trackers) gets each entry too."""

    def __init__(self, output_dir: Union[str, Path], *, enabled: bool = True, trackers: Optional[Any] = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.plot_path = Path(output_dir) / "loss.png"
        self.enabled = enabled
        self.trackers = trackers
        self.entries: list[dict[str, Any]] = []
        self.plot_failed = False  # said once

    def resume_from(self, step: int) -> None:
        """Keep the entries up to `step` (a checkpoint's), dropping what the interrupted run logged after it."""
        if not self.path.is_file():
            return
        kept = []
        lines = [(n, line) for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1) if line.strip()]
        for n, line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                from lorakit.errors import UserError  # (here: this module is loaded on its own, without torch, by a test)

                if n == lines[-1][0]:  # an append cut short (a full disk, a power loss): the lost entry is the last
                    break
                raise UserError(f"{self.path}:{n}: not a JSON entry ({line[:40]!r}); remove that line to resume") from None
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(entry)
        self.entries = kept
        if self.enabled:
            _write_atomic(self.path, "".join(json_line(e) for e in kept))

    def clear(self) -> None:
        """Start metrics.jsonl anew (a new run where an earlier one died before its first checkpoint)."""
        self.entries = []
        if self.enabled and self.path.is_file():
            _write_atomic(self.path, "")

    def log(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from lorakit.errors import writing

            with writing(self.path), _open_append(self.path) as f:
                f.write(json_line(entry))
            if self.trackers is not None:
                self.trackers.log(entry)

    def plot(self, title: str = "") -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(e["step"], e["loss"]) for e in self.entries if e.get("loss") is not None]
        # eval_loss, or each named eval set's eval_<name>_loss
        keys = list(dict.fromkeys(k for e in self.entries for k in e if re.fullmatch(r"eval_(.+_)?loss", k)))
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
        colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
        for i, key in enumerate(keys):
            evals = [(e["step"], e[key]) for e in self.entries if e.get(key) is not None]
            label = "eval loss" if key == "eval_loss" else f"eval {key[len('eval_'):-len('_loss')]} loss"
            ax.plot(*zip(*evals), "o-", label=label, color=colors[i % len(colors)], linewidth=1.2, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / trainable token)")
        ax.set_title(title or "lorakit training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = None
        try:
            tmp, f = new_temp_file(self.plot_path, "wb")
            with f:
                fig.savefig(f, format="png")
            os.replace(tmp, self.plot_path)
        except OSError as exc:
            # the plot is drawn again from the entries later: a failure here is no reason to stop
            # training (a full disk stops the run where it writes what a resume needs)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if not self.plot_failed:
                print(f"note: {self.plot_path} not drawn ({exc.strerror or exc}); training goes on, and the plot is "
                      "drawn again at the next chance", file=sys.stderr)  # fmt: skip
            self.plot_failed = True
        finally:
            plt.close(fig)


def json_line(entry: dict[str, Any]) -> str:
    """An entry as a line of strict JSON (`strict_json`)."""
    return json.dumps(strict_json(entry), allow_nan=False) + "\n"


def strict_json(value: Any) -> Any:
    """`value` with every float that is not finite (an eval loss that overflowed to inf, a nan)
    made None, written as null: `NaN` and `Infinity` are Python's, not JSON's, and jq, JavaScript or
    a tracker's reader refuse the whole file over one of them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (since the program started).

    On Linux this is VmHWM from /proc/self/status, the high-water mark of this program's own
    memory. getrusage's ru_maxrss would do elsewhere, but on Linux it also counts the memory of the
    process it was started from: fork, then exec, carry the parent's high-water mark into the
    child's, so a 0.7 GiB run started by a parent that once held 4 GiB reported 4 GiB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def byte_size(n: int) -> str:
    """A byte count as people read it: "1.25 MiB", "38.3 KiB"."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _open_append(path: Path) -> Any:
    """`path` opened to append to, never through a symbolic link: one planted in a shared run folder
    while the run goes on would have its metrics written into the file it points at.

    Raises:
        UserError: the name is a symbolic link (or not a plain file).
    """
    from lorakit.errors import UserError

    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # (ENXIO: a FIFO no one reads)
            raise
        raise UserError(f"{path} is not a plain file (a symbolic link?); the run appends its metrics there: remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a plain file; the run appends its metrics there: remove it")
    return os.fdopen(fd, "a", encoding="utf-8")


def new_temp_file(path: Path, mode: str) -> tuple[Path, Any]:
    """(name, open file) of a new file beside `path` to write it under, then rename into place. The
    name is `.NAME.tmp-PID-RANDOM` and made exclusively (O_EXCL, which never follows a link): a
    predictable name, planted as a link in a shared run folder, would have the write go through it.
    The file gets the permissions the umask gives (mkstemp's would be owner-only)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _write_atomic(path: Path, text: str) -> None:
    from lorakit.errors import writing  # (here: this module is loaded on its own, without torch, by a test)

    tmp = None
    try:
        with writing(path):
            tmp, f = new_temp_file(path, "w")
            with f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file (a power loss keeps one whole)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write a text file via temp + rename, so readers never see half a file."""
    _write_atomic(Path(path), text)
